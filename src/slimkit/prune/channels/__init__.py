"""Which channels must be removed together, and removing them.

Structured pruning removes whole channels, and a channel is shared: a convolution's
output channel ``c`` is also channel ``c`` of the batch norm after it, an input channel of
the next convolution, and, through a residual addition, of every layer that writes to or
reads from the same stream. :func:`channel_groups` traces the model with ``torch.fx`` and
follows every tensor's channel axis through the graph to find these *channel groups*;
:func:`shrink_` then slices every tied parameter and buffer so that the model becomes a
smaller dense model.

The analysis is conservative: an operation it does not understand, a grouped
convolution, or a channel that reaches the model's input or output makes the groups
involved non-prunable, with the reason recorded on the group. It never guesses.

The package is split by concern, each module depending only on those above it:

- :mod:`~slimkit.prune.channels.groups`: the data, :class:`ChannelGroup` and :class:`Member`;
- :mod:`~slimkit.prune.channels.ops`: the modules and operations the analysis understands;
- :mod:`~slimkit.prune.channels.tracing`: tracing with ``torch.fx`` and recording shapes;
- :mod:`~slimkit.prune.channels.ties`: tied weights, which refuse the groups that slice them;
- :mod:`~slimkit.prune.channels.analysis`: following channels through the graph;
- :mod:`~slimkit.prune.channels.shrink`: slicing the modules of a group;
- :mod:`~slimkit.prune.channels.check`: shrinking, then checking every shape against the
  analysis, and undoing it all if one is wrong.
"""

from slimkit.prune.channels.analysis import Analysis, analyse, channel_groups
from slimkit.prune.channels.check import shrink_checked_
from slimkit.prune.channels.groups import ChannelGroup, Member, Role
from slimkit.prune.channels.ops import CONV_TYPES, NORM_TYPES
from slimkit.prune.channels.shrink import extent, shrink_, slice_channels
from slimkit.prune.channels.tracing import UntraceableModel, trace

# The names this package had as a single module, for code that still imports them.
_CONV, _NORM, _extent, _slice = CONV_TYPES, NORM_TYPES, extent, slice_channels

__all__ = [
    "Analysis",
    "CONV_TYPES",
    "NORM_TYPES",
    "ChannelGroup",
    "Member",
    "Role",
    "UntraceableModel",
    "analyse",
    "channel_groups",
    "extent",
    "shrink_",
    "shrink_checked_",
    "slice_channels",
    "trace",
]
