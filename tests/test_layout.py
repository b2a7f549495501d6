"""The package layout (minillm/__init__.py's map): no import cycles, no oversized files, new code on new paths,
and the old flat paths still importing as the same module objects."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minillm"
OLD_PATHS = {"chunked_losses": "losses.chunked", "fused_head": "losses.fused_head", "topk": "losses.topk",
             "chunking": "losses.heads", "sampling": "generation.sampling", "engine": "generation.engine",
             "speculative": "generation.speculative", "rollout": "generation.rollout", "bench_phase": "bench.phase",
             "bench_kl": "bench.kl"}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _imports(name: str, path: Path, is_pkg: bool, modules) -> set[str]:
    """Every minillm module ``name`` imports, anywhere in the file (lazy imports inside functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        for target in targets:
            while target and target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name and not (modules[target][1] and name.startswith(target + ".")):
                out.add(target)
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_new_code_does_not_import_the_deprecated_paths():
    deprecated = {f"minillm.{old}" for old in OLD_PATHS}
    offenders = {name: sorted(deps & deprecated) for name, deps in _graph().items()
                 if deps & deprecated and name not in deprecated}
    assert offenders == {}


def test_lower_layers_do_not_import_upper_ones():
    order = ["minillm.cli", "minillm.demo", "minillm.trainers", "minillm.generation", "minillm.losses"]
    graph = _graph()
    for lower_index, lower in enumerate(order[2:], start=2):
        for name, deps in graph.items():
            if name == lower or name.startswith(lower + "."):
                upper = [d for d in deps for u in order[:lower_index] if d == u or d.startswith(u + ".")]
                assert not upper, f"{name} (layer {lower}) imports {upper}"


def test_files_stay_under_the_size_limit():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > 650} == {}


@pytest.mark.parametrize("old, new", sorted(OLD_PATHS.items()))
def test_old_paths_still_import_as_the_new_modules(old, new):
    assert importlib.import_module(f"minillm.{old}") is importlib.import_module(f"minillm.{new}")
    source = (PACKAGE / f"{old}.py").read_text()
    assert "Deprecated import path" in source.split('"""')[1]


def test_the_old_engine_path_keeps_its_dispatcher():
    from minillm.engine import ENGINES, fast_mixed_sample, sample_rollouts
    from minillm.generation.dispatch import sample_rollouts as new

    assert sample_rollouts is new and ENGINES == ("naive", "fast", "speculative") and callable(fast_mixed_sample)
