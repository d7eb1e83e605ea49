"""Track tensor storages as operators create them and as they are freed, on any device.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen operator below
autograd, in forward and in backward. Each new output storage gets a record and a weak
reference whose callback marks it freed: PyTorch keeps a storage's Python object alive
exactly as long as the storage itself, so the callback runs when the memory is released.

Attribution to modules uses forward pre/post hooks (a stack of qualified names). Backward
operators run outside any module call, so in a training step a torch-function mode tags the
autograd node of every forward output with the module that made it, and backward operators
are attributed through the node being executed (``torch._C._current_autograd_node``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from slimkit.memory.timeline import StorageRecord

MODULE_TAG = "slimkit.memory.module"
# torch.tensor(...) builds its tensor outside the dispatcher and hands it to one of these:
# their input is new, not a tensor that existed before the step.
_LIFTS = {"aten.lift_fresh", "aten.lift_fresh_copy", "aten.lift"}
_current_node = getattr(torch._C, "_current_autograd_node", lambda: None)


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in nested tuples, lists and mappings (model outputs, call arguments)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages behind ``t``; a wrapper subclass (DTensor, ...) has its inner ones."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        out = []
        for a in attrs:
            inner = getattr(t, a)
            if isinstance(inner, torch.Tensor):
                out += _storages(inner)
        return out
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return []
    if st.device.type == "meta" or st.nbytes() == 0:
        return []
    return [st]


class StorageTracker:
    """Records every storage an operator creates and the event at which it is freed.

    Events are numbered in order: one per operator (after it ran), plus the markers the
    caller adds with :meth:`mark`. ``phase`` is set by the caller as the step proceeds.
    """

    def __init__(self, model: nn.Module):
        self.records: list[StorageRecord] = []
        self.events: list[tuple[str, str | None, str]] = []
        self.phase = "start"
        self._live: dict[int, StorageRecord] = {}
        self._stack: list[str] = []
        self._last_backward_module: str | None = None
        self._closed = False
        self._model = model
        self._param_module = {
            id(p): name.rpartition(".")[0] for name, p in model.named_parameters()
        }

    # -- registering ------------------------------------------------------------------

    def register(self, t: torch.Tensor, kind: str, name: str | None = None,
                 module: str | None = None) -> None:
        """Count ``t``'s storage from the start as ``kind`` (parameters, inputs, ...).

        A storage registered twice keeps its first kind (a parameter passed as an input
        stays a parameter).
        """
        for st in _storages(t):
            if self._record_of(st) is None:
                self._add(st, t, created=0, op=kind, module=module, phase="start", name=name, kind=kind)

    def set_kind(self, t: torch.Tensor, kind: str, name: str | None = None) -> None:
        """Recategorise ``t``'s storage (a backward output that became a ``.grad``)."""
        for st in _storages(t):
            rec = self._record_of(st)
            if rec is not None and rec.kind in (None, "gradients", "optimizer_state"):
                rec.kind = kind
                rec.name = rec.name or name

    def mark(self, op: str) -> None:
        """Add an event that is not an operator (``<start>``, ``<end>``)."""
        self.events.append((op, None, self.phase))

    def close(self) -> None:
        """Stop recording frees: storages still alive now stay alive in the profile."""
        self._closed = True

    # -- watching a step --------------------------------------------------------------

    @staticmethod
    def warm_up() -> None:
        """Run one operator under both modes, before the step is watched.

        The first operator a dispatch mode sees in a process imports ``torch._dynamo``;
        the frames of that import stay in a reference cycle, and with them whatever
        tensors those frames' callers held, until the cycle collector runs. Doing it once
        here, before the caller collects, keeps such leftovers out of the profile.
        """
        throwaway = StorageTracker(nn.Module())
        with _NodeTagger(throwaway), _OperatorWatcher(throwaway):
            torch.ones(1, requires_grad=True).mul(2)

    @contextmanager
    def watching(self, tag_backward: bool = False) -> Iterator[None]:
        """Record operators and module calls inside the block.

        Args:
            tag_backward: also tag autograd nodes with their module, so that backward
                operators are attributed (needed for a training step only).
        """
        with ExitStack() as stack:
            for name, m in self._model.named_modules():
                stack.callback(m.register_forward_pre_hook(self._enter(name)).remove)
                stack.callback(m.register_forward_hook(self._leave, always_call=True).remove)
            if tag_backward:
                stack.enter_context(_NodeTagger(self))
            stack.enter_context(_OperatorWatcher(self))
            yield

    def _enter(self, name: str):
        def hook(module, args):
            self._stack.append(name)
        return hook

    def _leave(self, module, args, output):
        if self._stack:
            self._stack.pop()

    def current_module(self) -> str | None:
        """The innermost module running now, as well as it can be told."""
        if self._stack:  # also true when a checkpointed block recomputes in backward
            return self._stack[-1]
        if self.phase != "backward":
            return None
        node = _current_node()
        if node is not None:
            found = node.metadata.get(MODULE_TAG)
            if found is None and hasattr(node, "variable"):  # AccumulateGrad of a parameter
                found = self._param_module.get(id(node.variable))
            if found is not None:
                self._last_backward_module = found
        # An untagged node (an inner step of a composite op) belongs to the module
        # whose operators ran just before it.
        return self._last_backward_module

    # -- called by the modes ------------------------------------------------------------

    def seen_input(self, t: torch.Tensor) -> None:
        """A tensor an operator read: if it is new to us it existed before the step."""
        for st in _storages(t):
            if self._record_of(st) is None:
                self._add(st, t, created=0, op="<before the step>", module=None, phase="start",
                          name=None, kind="other")

    def operator_ran(self, op: str, out: Any) -> None:
        index = len(self.events)
        module = self.current_module()
        for t in tensors_in(out):
            for st in _storages(t):
                rec = self._record_of(st)
                if rec is None:
                    self._add(st, t, created=index, op=op, module=module, phase=self.phase)
                elif st.nbytes() > rec.nbytes:
                    # An out= operator grew an existing storage; counted at its largest
                    # size over its whole life.
                    rec.nbytes = st.nbytes()
        self.events.append((op, module, self.phase))

    # -- bookkeeping --------------------------------------------------------------------

    def _record_of(self, st: torch.UntypedStorage) -> StorageRecord | None:
        rec = self._live.get(st._cdata)
        if rec is not None and rec.ref() is not st:
            # The address belongs to a new storage; the old one's callback has not run.
            self._freed(st._cdata, rec)
            return None
        return rec

    def _add(self, st: torch.UntypedStorage, t: torch.Tensor, *, created: int, op: str,
             module: str | None, phase: str, name: str | None = None, kind: str | None = None) -> None:
        key = st._cdata
        rec = StorageRecord(st.nbytes(), created, phase, op, module, tuple(t.shape),
                            str(t.dtype).removeprefix("torch."), name, kind)
        rec.ref = weakref.ref(st, lambda _ref, key=key, rec=rec: self._freed(key, rec))
        self._live[key] = rec
        self.records.append(rec)

    def _freed(self, key: int, rec: StorageRecord) -> None:
        if self._live.get(key) is rec:
            del self._live[key]
        if not self._closed and rec.freed is None:
            rec.freed = len(self.events)


class _OperatorWatcher(TorchDispatchMode):
    def __init__(self, tracker: StorageTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = str(func.overloadpacket)
        if op not in _LIFTS:
            for t in tensors_in((args, kwargs)):
                self.tracker.seen_input(t)
        out = func(*args, **kwargs)
        self.tracker.operator_ran(op, out)
        return out


class _NodeTagger(TorchFunctionMode):
    """Tags the autograd node of each forward output with the module that made it."""

    def __init__(self, tracker: StorageTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        stack = self.tracker._stack
        if stack and torch.is_grad_enabled():
            for t in tensors_in(out):
                node = t.grad_fn
                if node is not None:
                    node.metadata.setdefault(MODULE_TAG, stack[-1])
        return out
