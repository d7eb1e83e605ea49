"""Choosing layers by qualified name, with ``re:`` regexes and an ignore list."""

from __future__ import annotations

import re
from collections.abc import Iterable

from slimkit.config import LayerSelector
from slimkit.errors import LayerSelectionError


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern


def select_names(names: Iterable[str], selector: LayerSelector, what: str = "layer") -> list[str]:
    """Names chosen by ``selector`` from ``names``, in their original order.

    Raises:
        LayerSelectionError: a pattern in ``targets`` or ``ignore`` matches no name, which
            almost always means a typo; the message lists candidates.
    """
    names = list(names)
    for field in ("targets", "ignore"):
        for pattern in getattr(selector, field):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise LayerSelectionError(f"{field}: bad regex {pattern!r}: {e}") from None
            if not any(_matches(n, pattern) for n in names):
                sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise LayerSelectionError(
                    f"{field}: {pattern!r} matches no {what}; {what}s that can be chosen here "
                    f"are named like: {sample}"
                )
    return [
        n
        for n in names
        if any(_matches(n, p) for p in selector.targets)
        and not any(_matches(n, p) for p in selector.ignore)
    ]


def select_modules(model, selector: LayerSelector, types: tuple[type, ...]) -> list[str]:
    """Qualified names of the submodules of ``model`` of ``types`` that ``selector`` chooses."""
    names = [n for n, m in model.named_modules() if isinstance(m, types) and n]
    if not names:
        raise LayerSelectionError(
            f"the model has no layers of type {', '.join(t.__name__ for t in types)}"
        )
    return select_names(names, selector)


def set_module(model, name: str, new) -> None:
    """Replace the submodule called ``name`` (a qualified name) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
