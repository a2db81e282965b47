"""The shape of the code: no import cycles, no task-kind switches, old run configs still load."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import attnlab
from attnlab.legacy import upgrade_run_config

SRC = Path(attnlab.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> attnlab modules it imports`` (top-level and function-level imports alike)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in modules:  # attnlab.x.y -> attnlab.x
                    name = name.rpartition(".")[0]
                if name and name != mod and name.startswith("attnlab"):
                    graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None. A package's ``__init__`` importing its
    own submodules (re-exports) is not a cycle of its own."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if m.startswith(n + "."):  # a submodule importing its parent package's re-exports
                continue
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_graph_test_finds_a_planted_cycle():
    graph = {"attnlab.a": {"attnlab.b"}, "attnlab.b": {"attnlab.c"}, "attnlab.c": {"attnlab.a"}}
    assert find_cycle(graph) == ["attnlab.a", "attnlab.b", "attnlab.c", "attnlab.a"]
    assert find_cycle({"attnlab.a": {"attnlab.b"}, "attnlab.b": set()}) is None


def test_no_import_cycles_in_attnlab():
    graph = import_graph()
    assert "attnlab.train" in graph["attnlab.cli"]  # lazy imports count: the graph is real
    assert "attnlab.build" in graph["attnlab.train"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_commands_share_one_builder():
    graph = import_graph()
    for command in (
        "attnlab.train",
        "attnlab.evaluate",
        "attnlab.analyze",
        "attnlab.bench.training",
    ):
        reach = set()
        todo = [command]
        while todo:
            m = todo.pop()
            for n in graph[m]:
                if n not in reach:
                    reach.add(n)
                    todo.append(n)
        assert "attnlab.build" in reach, command
        assert "attnlab.train" not in graph[command] or command == "attnlab.train"


def test_no_task_kind_switch_in_src():
    pattern = re.compile(r"task\.kind|\"classification\"|'classification'|== \"lm\"|\bTASKS\[")
    hits = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        if p.name != "legacy.py"  # reads old run configs: the only place old kinds are named
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits


@pytest.mark.parametrize(
    "kind, head, target",
    [
        ("classification", {"pooling": "max"}, "attnlab.tasks.ClassificationTask"),
        ("lm", {"tie_embeddings": False}, "attnlab.tasks.LanguageModelTask"),
    ],
)
def test_old_run_configs_are_upgraded(kind, head, target):
    old = {
        "task": {"name": "x", "kind": kind, "num_classes": 2, "max_len": 8},
        "model": {"d_model": 8, "pooling": "max", "tie_embeddings": False},
        "optim": {"lr": 1e-3},
    }
    new = upgrade_run_config(old)
    assert new["task"]["module"]["_target_"] == target
    for key, value in head.items():
        assert new["task"]["module"][key] == value
    assert "pooling" not in new["model"] and "tie_embeddings" not in new["model"]
    assert new["model"]["_target_"] == "attnlab.models.Backbone"
    assert new["optim"]["_target_"] == "attnlab.optim.build_optimizer"
    assert upgrade_run_config(new) == new  # a current record is left alone


def test_a_checkpoint_in_the_old_layout_still_evaluates(tmp_path):
    """A finished run from before tasks were components (task.kind, head options in model)
    is evaluated with the same result as in today's layout: no user's work is lost."""
    import torch

    from attnlab.config import compose
    from attnlab.evaluate import evaluate
    from attnlab.paths import default_data_dir
    from attnlab.train import train
    from tests.test_train import TINY_IMDB, TINY_MODEL

    if default_data_dir() is None:
        pytest.skip("needs ../shared/data")
    run = tmp_path / "run"
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    train(compose("train", [*TINY_MODEL, *TINY_IMDB, cache], run_dir=str(run)))
    ckpt = torch.load(run / "checkpoints/best.ckpt", map_location="cpu", weights_only=False)
    old = ckpt["attnlab_config"]
    module = old["task"].pop("module")
    old["task"]["kind"] = "classification"
    old["model"]["pooling"] = module["pooling"]
    old["model"]["tie_embeddings"] = True
    for key in ("_target_", "_partial_"):
        old["model"].pop(key)
        old["optim"].pop(key)
    torch.save(ckpt, tmp_path / "old.ckpt")
    args = [f"paths.cache_dir={tmp_path / 'cache'}", "split=val"]
    new = evaluate(compose("evaluate", [f"ckpt={run / 'checkpoints/best.ckpt'}", *args]))
    legacy = evaluate(compose("evaluate", [f"ckpt={tmp_path / 'old.ckpt'}", *args]))
    assert legacy == new and "val/acc" in legacy
