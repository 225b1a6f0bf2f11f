"""The house rules that a reader of the tree can check: no import cycle inside `clif` (lazy imports included),
`clif.errors` at the bottom, the family compared only in `clif/models.py`, no sys.path edits."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "clif"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the clif modules it imports (at the top or inside functions); packages' __init__ excluded."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name and modules[t].name != "__init__.py"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert graph["clif.train.loop"] and "clif.errors" in graph["clif.cli"]  # the graph sees real imports
    assert cycles(graph) == []
    assert graph["clif.errors"] == set()  # the bottom: every module may import it


def test_subpackages_stack_as_floors():
    """Counting a subpackage (contrastive/, eval/, ...) as one node, imports still never loop: a floor imports only
    from floors below it (stage 1's probe reads clif.retrieval, not clif.eval, which reads contrastive/)."""
    graph = import_graph()

    def node(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else module

    floors: dict[str, set[str]] = {}
    for a, targets in graph.items():
        floors.setdefault(node(a), set()).update(node(b) for b in targets if node(b) != node(a))
    assert "clif.contrastive" in floors["clif.eval"]  # the graph sees the evaluation reading stage 1's CLIP
    assert cycles(floors) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_family_is_compared_only_in_the_seam():
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *REPO.glob("*.py")]:
        if path in (PACKAGE / "models.py", PACKAGE / "fixtures" / "tiny.py") or "toyworld" in path.parts:
            continue  # the seam itself; the fixture builder picks what to build by kind (sd15, sdxl, clipseg, ...)
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"family\s*[!=]=\s*[\"']|[\"']\s*[!=]=\s*family\b", line):
                offenders.append(f"{path.relative_to(REPO)}:{i}")
    assert offenders == []


def test_no_sys_path_edits():
    files = [*PACKAGE.rglob("*.py"), *REPO.glob("*.py"), *(REPO / "bench").glob("*.py"), *(REPO / "tests").glob("*.py")]
    assert [str(p.relative_to(REPO)) for p in files if "sys.path." + "insert" in p.read_text()] == []


def test_each_trainer_run_reads_as_a_short_story():
    """run() of every training script stays at most 100 lines: the mechanics live in the package."""
    for script in ("train_clif.py", "train_ti.py", "train_lora.py"):
        tree = ast.parse((REPO / script).read_text())
        run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
        assert run.end_lineno - run.lineno + 1 <= 100, script
        calls = {n.func.id if isinstance(n.func, ast.Name) else n.func.attr for n in ast.walk(run)
                 if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))}
        assert {"prepare", "start_run", "start_loop", "train", "close"} <= calls, script  # the one skeleton


def _test_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((REPO / "tests").glob("test_*.py"))}


def test_real_photo_tests_use_the_data_gate():
    """A test that needs ../shared/data is marked needs_data (skipped when absent, failed under CI=true); one that
    calls pytest.skip itself bypasses the gate."""
    bypass = [name for name, text in _test_sources().items() if re.search(r"pytest\.skip\(", text)]
    assert not bypass, f"pytest.skip called directly in {bypass}: use conftest.needs_data"


def test_no_wall_clock_limit_decides_a_test():
    """Subprocess timeouts are the generous conftest.HANG_GUARD_S, never a number tuned to a quiet machine."""
    from conftest import HANG_GUARD_S

    assert HANG_GUARD_S >= 3600
    literal = r"timeout=(\d[\d_.]*)|time\.(?:time|monotonic)\(\) \+ (\d[\d_.]*)"
    tight = [(n, m) for n, text in _test_sources().items() for m in re.findall(literal, text)]
    assert not tight, f"literal subprocess timeouts: {tight}; use timeout=HANG_GUARD_S"
