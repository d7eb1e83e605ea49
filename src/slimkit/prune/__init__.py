"""Pruning: ``prune_(model, config)``; channel-group analysis and physical removal of CNN
channels; removal of transformer attention heads and FFN neurons; channel and head/FFN sensitivity."""

from slimkit.prune.api import Pruned, prune_
from slimkit.prune.channels import ChannelGroup, Member, UntraceableModel, channel_groups, shrink_
from slimkit.prune.cnn import ChannelPruneConfig, group_key
from slimkit.prune.heads import LayerStructure, TransformerPruneConfig
from slimkit.prune.importance import channel_importance, taylor_importance
from slimkit.prune.magnitude import (
    GradualPruner,
    GradualSchedule,
    MagnitudePruneConfig,
    MakePermanentConfig,
    make_permanent_,
)
from slimkit.prune.sensitivity import channel_costs, channel_sensitivity, cost_of, ratios_for_budget
from slimkit.prune.transformer import prune_transformer_
from slimkit.prune.transformer_sensitivity import (
    config_for_budget,
    transformer_costs,
    transformer_sensitivity,
)

__all__ = [
    "prune_transformer_",
    "prune_",
    "Pruned",
    "TransformerPruneConfig",
    "ChannelPruneConfig",
    "group_key",
    "channel_sensitivity",
    "channel_costs",
    "cost_of",
    "ratios_for_budget",
    "transformer_sensitivity",
    "transformer_costs",
    "config_for_budget",
    "taylor_importance",
    "MagnitudePruneConfig",
    "MakePermanentConfig",
    "make_permanent_",
    "GradualSchedule",
    "GradualPruner",
    "LayerStructure",
    "ChannelGroup",
    "Member",
    "UntraceableModel",
    "channel_groups",
    "channel_importance",
    "shrink_",
]
