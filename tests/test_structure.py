"""Structure: the import graph of the package, read from the source with `ast` (nothing is imported).

The stages `train`, `evaluate` and `runs` stand side by side on shared lower layers (`run_folder`,
`adapters`, `table`, `probes`); the machine is probed in one module; the run folder's file names
are spelled in one module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_nb"
STAGES = ("train", "evaluate", "runs")
RUN_FOLDER_NAMES = {"settings.yaml", "run.json", "log.jsonl", "trainer_state.json", "metrics.json", "generations.md",
                    "loss.png", "adapter", "initial_adapter", ".lora-nb.lock", "adapter_config.json",
                    "adapter_model.safetensors"}
# Modules that read or write run folders: they take the names from run_folder.py.
RUN_FOLDER_USERS = ("train", "evaluate", "runs", "plots", "pipeline", "adapters", "launch", "__main__")


def _tree(name: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def _imports(name: str, module_level_only: bool = False) -> set[str]:
    """The package modules that `name` imports (function-local imports too, unless `module_level_only`)."""
    tree = _tree(name)
    nodes = tree.body if module_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("lora_nb."):
                found.add(node.module.split(".")[1])
            elif node.module == "lora_nb":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lora_nb."))
    return found & set(_modules())


def _attribute_path(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


@pytest.mark.parametrize("stage", STAGES)
def test_stages_stand_side_by_side(stage):
    others = set(STAGES) - {stage}
    assert not _imports(stage) & others, f"{stage} imports {sorted(_imports(stage) & others)}"


def test_shared_layers_import_no_stage():
    for layer in ("run_folder", "adapters", "table", "probes", "host_memory", "files", "errors"):
        assert not _imports(layer) & {*STAGES, "plots", "pipeline"}, layer


def test_module_level_imports_have_no_cycle():
    graph = {name: _imports(name, module_level_only=True) for name in _modules()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(name):] + (name,)))
        if name in done:
            return
        for child in graph[name]:
            visit(child, path + (name,))
        done.add(name)

    for name in graph:
        visit(name, ())


@pytest.mark.parametrize("entry", ["__init__", "environment", "workshop", "widgets", "__main__", "loading"])
def test_light_entry_points_load_no_stage(entry):
    """The environment check, the configurator and the CLI's --help start without peft, datasets or matplotlib."""
    graph = {name: _imports(name, module_level_only=True) for name in _modules()}
    reached, todo = set(), [entry]
    while todo:
        for child in graph[todo.pop()] - reached:
            reached.add(child)
            todo.append(child)
    assert not reached & {*STAGES, "plots", "adapters", "data", "batching"}, sorted(reached)


def test_probes_is_the_bottom_layer():
    assert _imports("probes") == set()


def test_only_probes_asks_torch_about_cuda_support():
    askers = {}
    for name in _modules():
        for node in ast.walk(_tree(name)):
            path = _attribute_path(node) if isinstance(node, ast.Attribute) else ""
            if path.endswith(("cuda.is_available", "cuda.is_bf16_supported")):
                askers.setdefault(name, set()).add(path)
    assert set(askers) == {"probes"}, askers


@pytest.mark.parametrize("name", RUN_FOLDER_USERS)
def test_run_folder_names_are_spelled_once(name):
    literals = {node.value for node in ast.walk(_tree(name)) if isinstance(node, ast.Constant)}
    literals.discard("adapter")  # also a plain word: the merge record's key, a message's subject
    assert not literals & RUN_FOLDER_NAMES, sorted(literals & RUN_FOLDER_NAMES)
    assert RUN_FOLDER_NAMES <= {node.value for node in ast.walk(_tree("run_folder")) if isinstance(node, ast.Constant)}
