"""Tied weights: tensors that slicing a channel group would have to change in more than one place.

A channel group slices the weights of its members. When such a weight is also another
module's weight (a Linear head sharing the embedding matrix, two convolutions given one
parameter), or forward reads it directly (``F.conv2d(x, self.conv.weight)``), or an
excluded module uses the member, slicing it for the group would untie the weights or
break the other use. The analysis cannot tell what the other use needs, so such groups
are refused; a module simply called twice is different and is handled by the analysis.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from torch import fx, nn

from slimkit.prune.channels.groups import Member
from slimkit.prune.channels.ops import NORM_TYPES, op_name

# Attributes a direct read of which says nothing about the tensor's shape or values.
_METADATA = {"dtype", "device", "is_cuda", "requires_grad"}
_KNOWN = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def sliced_tensors(module: nn.Module, role: str) -> tuple[str, ...]:
    """The attributes of ``module`` that a member of role ``role`` slices."""
    if role == "in":
        return ("weight",)
    if isinstance(module, NORM_TYPES):
        return ("weight", "bias", "running_mean", "running_var")
    return ("weight", "bias")


class Ties:
    """Every place each parameter and buffer of a model is used, to refuse tied ones."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, leaves: Iterable[str]):
        self.model = model
        self.uses: dict[int, list[str]] = defaultdict(list)
        # named_modules() lists a module registered under two names once: that is one
        # module called twice, which the analysis ties soundly, not two tied modules.
        for name, module in model.named_modules():
            for attr, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is not None:
                    self.uses[id(t)].append(f"{name}.{attr}" if name else attr)
        for node in gm.graph.nodes:
            if node.op != "get_attr" or all(_metadata_read(u) for u in node.users):
                continue
            try:
                t = _resolve(model, str(node.target))
            except AttributeError:
                continue
            users = ", ".join(sorted({_user(u) for u in node.users}))
            self.uses[id(t)].append(f"also read directly in forward by {users}")
        self.inside_leaf: dict[int, str] = {}
        for leaf in sorted(leaves):
            for m in model.get_submodule(leaf).modules():
                self.inside_leaf.setdefault(id(m), leaf)

    def reasons(self, members: Iterable[Member]) -> list[str]:
        """Why the group with these members cannot be sliced without breaking a tie."""
        found: list[str] = []
        for m in members:
            module = self.model.get_submodule(m.module)
            leaf = self.inside_leaf.get(id(module))
            if leaf is not None:
                found.append(f"module {m.module!r} is also used inside the excluded module {leaf!r}")
            extra = sorted((set(module._parameters) | set(module._buffers)) - _KNOWN)
            if extra:
                # e.g. weight_norm's weight_g and weight_v, from which forward rebuilds the weight
                found.append(f"module {m.module!r} has tensors channel pruning does not slice: {', '.join(extra)}")
            for attr in sliced_tensors(module, m.role):
                t = getattr(module, attr, None)
                here = f"{m.module}.{attr}"
                others = [u for u in self.uses.get(id(t), ()) if u != here] if t is not None else []
                if others:
                    what = " and ".join(o if o.startswith("also read ") else f"the same tensor as {o!r}" for o in others)
                    found.append(f"tied weights: {here!r} is {what}; slicing it for these channels would untie or break the other use")
        return list(dict.fromkeys(found))


def _metadata_read(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) == "getattr" and node.args[1] in _METADATA


def _user(node: fx.Node) -> str:
    return repr(str(node.target)) if node.op == "call_module" else op_name(node)


def _resolve(model: nn.Module, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)
