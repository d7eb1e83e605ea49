"""Tensor parallel for transformer blocks, alone (``tp``) or under FSDP (``fsdp+tp``).

In each block the query, key and value projections and the first MLP layer are split by
output features (column-wise) and the attention output and second MLP layer by input
features (row-wise), as in Megatron-LM: each process computes a slice of the heads and
of the MLP's hidden units, and one all-reduce after each row-wise layer rebuilds the
block's output. Layer names come from :data:`PLANS`; a model without those layers is
refused with the block named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from slimkit.distill.attention import HEAD_COUNT_ATTRIBUTES
from slimkit.errors import ConfigError
from slimkit.memory.checkpoint.blocks import resolve_blocks
from slimkit.parallel.distributed import Distributed
from slimkit.parallel.fsdp import Sharded
from slimkit.parallel.world import World

# Per model family: the attention module, its q/k/v projections, its output projection,
# and the MLP's two layers, as names inside one block.
PLANS: dict[str, dict[str, Any]] = {
    "bert": {"attention": "attention.self", "qkv": ("query", "key", "value"),
             "out": "attention.output.dense", "mlp": ("intermediate.dense", "output.dense")},
    "distilbert": {"attention": "attention", "qkv": ("q_lin", "k_lin", "v_lin"),
                   "out": "attention.out_lin", "mlp": ("ffn.lin1", "ffn.lin2")},
}
# Attributes of an attention module that count heads or their width, divided by the degree.
WIDTH_ATTRIBUTES = ("all_head_size", "inner_dim")


def _plan_for(block: nn.Module) -> dict[str, Any] | None:
    names = {n for n, _ in block.named_modules()}
    for plan in PLANS.values():
        wanted = [plan["out"], *plan["mlp"], *(f"{plan['attention']}.{c}" for c in plan["qkv"])]
        if all(w in names for w in wanted):
            return plan
    return None


def tensor_plan(model: nn.Module, degree: int) -> dict[str, tuple[dict[str, Any], nn.Module]]:
    """Each transformer block of ``model`` with its layer plan, checked against ``degree``.

    Raises:
        ConfigError: the model has no repeated blocks, a block has none of the layers of
            :data:`PLANS`, or ``degree`` does not divide a layer's heads or MLP width.
    """
    try:
        blocks = resolve_blocks(model, "auto")
    except ConfigError:
        raise ConfigError("parallel.strategy: tensor parallel splits transformer blocks, and the model has no "
                          "repeated blocks (a ModuleList of layers); use ddp or fsdp") from None
    problems, out = [], {}
    for name in blocks:
        block = model.get_submodule(name)
        plan = _plan_for(block)
        if plan is None:
            linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)][:8]
            known = "; ".join(f"{k}: {v['attention']}.{{{','.join(v['qkv'])}}}, {v['out']}, {' + '.join(v['mlp'])}"
                              for k, v in PLANS.items())
            problems.append(f"block {name!r} has none of the layers tensor parallel splits (its Linear layers: "
                            f"{', '.join(linears) or 'none'}); known layouts: {known}. Use ddp or fsdp")
            continue
        attention = block.get_submodule(plan["attention"])
        heads = next((getattr(attention, a) for a in HEAD_COUNT_ATTRIBUTES if isinstance(getattr(attention, a, None), int)), None)
        if heads is None:
            problems.append(f"{name}.{plan['attention']}: cannot tell its head count (no "
                            f"{' / '.join(HEAD_COUNT_ATTRIBUTES)} attribute)")
        elif heads % degree:
            problems.append(f"{name}.{plan['attention']}: {heads} attention heads do not split across {degree} "
                            f"processes; choose a degree dividing every layer's heads (a pruned model may keep "
                            "different counts per layer)")
        hidden = block.get_submodule(plan["mlp"][0]).out_features
        if hidden % degree:
            problems.append(f"{name}.{plan['mlp'][0]}: {hidden} MLP units do not split across {degree} processes")
        out[name] = (plan, attention)
    if problems:
        raise ConfigError(problems)
    return out


def parallelize_blocks(model: nn.Module, mesh: DeviceMesh) -> list[str]:
    """Split every transformer block of ``model`` across ``mesh`` in place; the blocks' names."""
    degree = mesh.size()
    planned = tensor_plan(model, degree)
    for name, (plan, attention) in planned.items():
        layout = {f"{plan['attention']}.{c}": ColwiseParallel() for c in plan["qkv"]}
        layout[plan["out"]] = RowwiseParallel()
        layout[plan["mlp"][0]] = ColwiseParallel()
        layout[plan["mlp"][1]] = RowwiseParallel()
        parallelize_module(model.get_submodule(name), mesh, layout)
        # Each process now computes heads / degree heads of the full width.
        for attr in (*HEAD_COUNT_ATTRIBUTES, *WIDTH_ATTRIBUTES):
            value = getattr(attention, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(attention, attr, value // degree)
    return list(planned)


def split_outputs(model: nn.Module, degree: int) -> list[str]:
    """The modules whose outputs tensor parallel leaves split across processes: each
    block's attention (its projections, scores and context) and first MLP layer."""
    return [f"{block}.{name}" for block, (plan, _) in tensor_plan(model, degree).items()
            for name in (plan["attention"], plan["mlp"][0])]


def refuse_split_terms(config: Any, student: nn.Module, degree: int) -> None:
    """Loss terms reading a split layer would see one process's slice of it."""
    prefixes = split_outputs(student, degree)
    bad = [f"losses[{i}] ({t.kind}) on {s!r}" for i, t in enumerate(config.losses) for s in t.layers
           if any(s == p or s.startswith(p + ".") for p in prefixes)]
    if bad:
        raise ConfigError(f"parallel.strategy: tensor parallel splits the outputs of {', '.join(bad)} across processes; "
                          "map layers whose outputs are whole (a block's output, such as "
                          f"{next(iter(tensor_plan(student, degree)))!r}), or use ddp or fsdp")


class TensorParallel(Distributed):
    """``strategy: tp``: every process sees the whole batch and computes a slice of each block."""

    name = "tp"
    evaluate_everywhere = True

    def __init__(self, world: World, config: Any):
        super().__init__(world, config)
        self.mesh = init_device_mesh(self.device.type, (world.size,))
        self.dp_rank, self.dp_size = 0, 1

    def check_training(self, config: Any, student: nn.Module) -> None:
        refuse_split_terms(config, student, self.size)

    def wrap(self, student: nn.Module, projections: nn.ModuleDict, loss_probe: Callable[[], torch.Tensor]) -> Callable[..., Any]:
        parallelize_blocks(student, self.mesh)
        return student

    def optimizer(self, factory, params):
        opt = factory(params)
        # The split layers' weights are DTensors and the rest plain tensors; the fused
        # multi-tensor kernels need one kind per call.
        for group in opt.param_groups:
            group["foreach"] = False
        return opt


class ShardedTensorParallel(Sharded):
    """``strategy: fsdp+tp``: tensor parallel inside groups of ``tp_degree`` processes,
    FSDP across the groups, on a 2-D mesh (``dp`` x ``tp``)."""

    name = "fsdp+tp"

    def __init__(self, world: World, config: Any):
        tp = config.tensor_degree
        if world.size % tp:
            raise ConfigError(f"parallel.tp_degree: {world.size} processes do not split into groups of {tp}; "
                              "choose a tp_degree dividing the number of processes")
        mesh = init_device_mesh(world.device.type, (world.size // tp, tp), mesh_dim_names=("dp", "tp"))
        super().__init__(world, config, mesh["dp"])
        self.mesh2d = mesh
        self.dp_rank, self.dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()

    def check_training(self, config: Any, student: nn.Module) -> None:
        refuse_split_terms(config, student, self.mesh2d["tp"].size())

    def wrap(self, student: nn.Module, projections: nn.ModuleDict, loss_probe: Callable[[], torch.Tensor]) -> Callable[..., Any]:
        blocks = parallelize_blocks(student, self.mesh2d["tp"])
        self.shard_(student, projections, blocks)  # each block's TP shards, sharded again across groups
        return student
