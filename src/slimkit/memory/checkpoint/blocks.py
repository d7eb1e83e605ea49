"""Which modules are the blocks: :func:`resolve_blocks` (patterns, or ``auto`` for the
model's repeated layers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from slimkit.config import LayerSelector
from slimkit.errors import ConfigError, LayerSelectionError
from slimkit.layers import select_names


def resolve_blocks(model: nn.Module, blocks: LayerSelector | Literal["auto"] | Sequence[str] = "auto") -> list[str]:
    """Qualified names of the blocks ``blocks`` chooses in ``model``, in definition order.

    ``auto`` finds the model's repeated layers: the longest ``ModuleList`` (or
    ``Sequential``) whose children all have one type, such as BERT's ``encoder.layer``.
    An empty list chooses no block (for autocast alone).

    Raises:
        ConfigError: ``auto`` found no repeated layers, or chosen blocks nest.
        LayerSelectionError: a pattern matches no module.
    """
    if isinstance(blocks, str) and blocks == "auto":
        names = _auto_blocks(model)
    else:
        selector = blocks if isinstance(blocks, LayerSelector) else LayerSelector(targets=list(blocks))
        if not selector.targets:
            return []
        names = select_names([n for n, _ in model.named_modules() if n], selector, what="module")
        if not names:
            raise LayerSelectionError(f"{selector.targets} minus {selector.ignore} leaves no module to checkpoint")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        a, b = nested[0]
        raise ConfigError(f"blocks: {b!r} is inside {a!r}; a checkpointed block recomputes everything in it, "
                          "so choose one or the other (e.g. add the inner one to ignore)")
    return names


def _auto_blocks(model: nn.Module) -> list[str]:
    best: tuple[int, int, str, list[str]] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
            continue
        kinds = {type(c) for c in m}
        if len(kinds) != 1 or not any(True for _ in next(iter(m)).parameters()):
            continue
        size = sum(p.numel() for p in m.parameters())
        children = [f"{name}.{k}" if name else k for k, _ in m.named_children()]
        if best is None or (len(m), size) > (best[0], best[1]):
            best = (len(m), size, name, children)
    if best is None:
        raise ConfigError("blocks: 'auto' found no repeated layers (a ModuleList of same-type modules with "
                          "parameters); name the blocks, e.g. blocks=['re:encoder\\.layer\\.\\d+']")
    return best[3]
