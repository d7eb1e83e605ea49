"""``slimkit.distill(teacher, student, data, config)``: the package is the verb."""

import subprocess
import sys

import torch
from tiny_models import SeededMLP

import slimkit
from slimkit.distill import DistillConfig, DistillData, LossTerm


def test_the_package_is_callable_as_the_verb():
    x = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    student = SeededMLP(8, 1)
    cfg = DistillConfig(losses=[LossTerm(kind="soft_kl", temperature=2.0)], max_steps=2, batch_size=16)
    result = slimkit.distill(SeededMLP(32, 0), student, DistillData({"x": x}), cfg, progress=False)
    assert result.steps == 2 and slimkit.distill.DistillConfig is DistillConfig


def test_the_verb_is_there_before_anything_imported_the_package():
    code = "import sys, slimkit; assert 'slimkit.distill' not in sys.modules; assert callable(slimkit.distill); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
