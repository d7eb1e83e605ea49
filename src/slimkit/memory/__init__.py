"""Memory: where it goes (profiler), how to plan it (activation arena), how to trade
compute for it (checkpointing to a budget) and how to share it (memory-mapped weights,
a content-addressed weight store)."""
