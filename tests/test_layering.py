"""The package's layers: core primitives -> techniques -> stages and recipes -> runner -> CLI.

Imports are read from the source (those inside functions too, since they run sooner or
later), so a cycle is caught even where lazy imports keep Python from tripping over it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import slimkit

SRC = Path(slimkit.__file__).parent
# Modules that read names or run recipes: nothing below them may import them.
UPPER = ["slimkit.stages", "slimkit.serialize", "slimkit.recipe", "slimkit.runner", "slimkit.exporting",
         "slimkit.benching", "slimkit.cli"]
# Below the stages, only these may import them: each loads a saved model (replaying its
# recorded stages) and nothing registered imports it.
LOADERS = {"slimkit.measure.serve": "the serving process's entry point",
           "slimkit.memory.shared_weights": "load_shared maps a saved folder's weights",
           "slimkit.parallel.stage_job": "parallel workers load the model they train and save it trained",
           "slimkit.deploy.bundle": "bundles a saved model, and loads the one a verified bundle installs"}
# Core primitives: what every technique stands on.
CORE = ["slimkit.config", "slimkit.errors", "slimkit.registry", "slimkit.layers", "slimkit.zoo.loaded",
        "slimkit.zoo.models", "slimkit.quantize.api"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, name: str, known: set[str], is_package: bool = False) -> set[str]:
    """The modules of ``known`` that module ``name`` (whose code is ``source``) imports, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import sub` imports the submodule; `from mod import name` the module.
            subs = {f"{base}.{a.name}" for a in node.names} & known
            found |= subs if subs else {base}
    return (found & known) - {name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: imports_of(p.read_text(), name, set(paths), p.name == "__init__.py") for name, p in paths.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert cycles == []


def test_techniques_never_import_the_stages_recipes_runner_or_cli():
    graph = import_graph()
    below = reachable(graph, "slimkit.stages")
    assert {"slimkit.quantize.ort", "slimkit.prune.cnn", "slimkit.train.stage"} <= below
    assert below.isdisjoint(UPPER)


def test_below_the_stages_only_loaders_of_saved_models_import_them():
    graph = import_graph()
    importers = {m for m, deps in graph.items() if m not in UPPER and deps & set(UPPER)}
    assert importers <= set(LOADERS)
    assert reachable(graph, "slimkit.stages").isdisjoint(LOADERS)


def test_core_primitives_stand_on_nothing_that_registers_a_method():
    graph = import_graph()
    techniques = {m for m in graph if m.split(".")[1:2] in (["compress"], ["deploy"], ["distill"], ["memory"],
                                                               ["prune"], ["train"])}
    for core in CORE:
        assert reachable(graph, core).isdisjoint(techniques | set(UPPER)), core
    assert reachable(graph, "slimkit.registry") == {"slimkit.config", "slimkit.errors"}


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    source = "from . import b\nfrom .c import x\ndef f():\n    from slimkit.runner import run\n    import slimkit.cli\n"
    known = {"p.b", "p.c", "slimkit.runner", "slimkit.cli", "slimkit.recipe"}
    assert imports_of(source, "p.a", known) == {"p.b", "p.c", "slimkit.runner", "slimkit.cli"}
