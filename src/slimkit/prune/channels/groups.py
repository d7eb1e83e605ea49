"""What a channel group is: the module dimensions whose channels are kept or removed together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["out", "in", "norm", "depthwise"]


@dataclass(frozen=True)
class Member:
    """One place where a channel group's channels live.

    Attributes:
        module: qualified name of the module.
        role: ``out`` (output channels of a Conv/Linear: weight dimension 0 and bias),
            ``in`` (input channels of a Conv/Linear: weight dimension 1), ``norm`` (a batch
            norm's weight, bias and running statistics), ``depthwise`` (a depthwise
            convolution, whose input and output channels are the same channels).
        offset: where the group's channels start along the module's dimension (non-zero
            when the module reads a concatenation).
        block: consecutive features per channel; a ``[C, H, W]`` map flattened into a
            Linear gives each channel ``H * W`` input features.
        extent: the module's size along that dimension when the model was analysed.
    """

    module: str
    role: Role
    offset: int
    block: int
    extent: int

    @property
    def dim(self) -> int:
        """The dimension of the module's weight that the group slices."""
        return 1 if self.role == "in" else 0


@dataclass(eq=False)
class ChannelGroup:
    """Channels that must be kept or removed together, wherever they appear.

    Channel ``i`` of the group is index ``offset + i`` (times ``block``) of every member.
    Groups hash by identity, so they can key the ``keep`` mapping of
    :func:`slimkit.prune.shrink_`.

    Attributes:
        index: position in the list :func:`slimkit.prune.channel_groups` returned.
        size: number of channels.
        members: every module dimension that holds these channels.
        reasons: why the group cannot be pruned; empty when it can.
    """

    index: int
    size: int
    members: tuple[Member, ...]
    reasons: tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        """Whether :func:`slimkit.prune.shrink_` may remove channels of this group."""
        return not self.reasons

    @property
    def producers(self) -> tuple[Member, ...]:
        """Members whose filters compute the channels (``out`` and ``depthwise``)."""
        return tuple(m for m in self.members if m.role in ("out", "depthwise"))

    def __repr__(self) -> str:
        names = ", ".join(f"{m.module}[{m.role}{f'@{m.offset}' if m.offset else ''}]" for m in self.members[:6])
        more = f", +{len(self.members) - 6}" if len(self.members) > 6 else ""
        state = "prunable" if self.prunable else f"fixed: {self.reasons[0]}"
        return f"ChannelGroup(#{self.index}, {self.size} channels, {state}; {names}{more})"
