"""Pruning: channel-group analysis and physical removal of channels."""

from slimkit.prune.channels import ChannelGroup, Member, UntraceableModel, channel_groups, shrink_
from slimkit.prune.importance import channel_importance

__all__ = ["ChannelGroup", "Member", "UntraceableModel", "channel_groups", "channel_importance", "shrink_"]
