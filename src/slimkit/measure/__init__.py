"""One fair measurement harness used by every variant and every benchmark.

Submodules are imported on use: :mod:`slimkit.measure.serve` runs in processes that must
not import torch.
"""
