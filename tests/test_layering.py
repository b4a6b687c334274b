"""The design rules a reader relies on: mmcore stands alone (no Prefect, no app, no cycle), the stage
graph is declared once and read everywhere, the run folder's names live in one module."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from mmcore import graph, layout
from mmcore.provenance import runtime_nodes
from tests.conftest import REPO

UPWARD = ("flows", "tasks", "deployments", "mmpipe", "prefect", "prefect_dask")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((REPO / package).rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (a lazy import is an import)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text())):  # every import that can run
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return found


def _mmcore_graph() -> dict[str, set[str]]:
    mods = _modules("mmcore")
    known = set(mods)
    return {m: {i for i in _imports(p, m, known) if i in known and i != m} for m, p in mods.items()}


def test_mmcore_imports_nothing_above_it_not_even_inside_functions():
    bad = []
    for name, path in _modules("mmcore").items():
        for imp in _imports(path, name, set()):
            if imp.split(".")[0] in UPWARD:
                bad.append(f"{name} imports {imp}")
    assert not bad, bad


def test_mmcore_import_graph_has_no_cycle():
    edges = _mmcore_graph()
    # A package imports its own submodules (mmcore.report -> mmcore.report.page): not a cycle.
    edges = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_a_stage_code_digest_covers_only_what_it_uses():
    """The report's code is in no earlier stage's cache key; no stage imports a sibling stage."""
    from mmcore.provenance import code_digest

    def reach(module: str) -> set[str]:
        edges, seen, todo = _mmcore_graph(), set(), [module]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(edges.get(m, ()))
        return seen

    for s in graph.STAGES.values():
        others = {o.module for o in graph.STAGES.values() if o is not s}
        used = reach(s.module)
        assert not {m for m in used if m in others or any(m.startswith(o + ".") for o in others)}, (s.name, used)
        assert code_digest(s.module)  # resolvable, packages included
    assert "mmcore.config" not in reach("mmcore.train") and "mmcore.config" not in reach("mmcore.report")


def test_mmcore_imports_without_prefect():
    modules = sorted(_modules("mmcore"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'flows', 'tasks', 'mmpipe'))\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_one_task_factory_builds_every_stage_task():
    from tasks import stages

    assert list(stages.STAGE_TASKS) == list(graph.ORDER)
    assert [t.name for t in stages.STAGE_TASKS.values()] == list(graph.ORDER)
    for path in (REPO / "tasks").glob("*.py"):
        defs = [n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)]
        assert not set(defs) & set(graph.ORDER), f"{path.name} defines a per-stage function: {set(defs) & set(graph.ORDER)}"


def test_the_graph_matches_the_config_and_the_stage_modules():
    from mmcore.config import PipelineConfig

    for s in graph.STAGES.values():
        mod = importlib.import_module(s.module)
        assert callable(mod.run), s.name
        assert PipelineConfig.model_fields[s.section].annotation is getattr(mod, s.config)
        assert s.input is None or s.input == graph.LAST_RUN or s.input in s.reads
    roots = [s for s in graph.STAGES.values() if s.input is None]
    assert all(callable(importlib.import_module(s.module).read_input) for s in roots)
    assert [s.name for s in graph.plan("split")] == ["clean", "probe", "quality", "decontam", "split", "report"]
    assert [s.name for s in graph.plan()] == list(graph.ORDER)
    with pytest.raises(Exception, match="unknown stage 'trian'; expected one of clean, probe"):
        graph.stage("trian")


def test_no_literal_run_folder_file_name_outside_the_layout_module():
    # config.json is also Hugging Face's own model file name, spelled by the model code.
    names = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str) and "." in v} - {"config.json"}
    bad = []
    for package in ("mmcore", "mmpipe", "flows", "tasks", "deployments"):
        for name, path in _modules(package).items():
            if name == "mmcore.layout":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    hits = [n for n in names if n == node.value or node.value.endswith("/" + n)]
                    bad += [f"{name}:{node.lineno} {node.value!r}" for _ in hits]
    assert not bad, bad


def test_readme_stage_table_is_the_graph():
    readme = (REPO / "README.md").read_text()
    assert graph.markdown_table() in readme, "README's stage table differs from mmcore.graph.markdown_table()"


def test_readme_config_reference_is_the_config_models():
    from mmcore.config import reference_table

    readme = (REPO / "README.md").read_text()
    assert reference_table() in readme, "README's config reference differs from mmcore.config.reference_table()"


def test_readme_documents_every_reason_code_and_command():
    readme = (REPO / "README.md").read_text()
    for s in graph.STAGES.values():
        for code in getattr(importlib.import_module(s.module), "REASONS", {}):
            assert f"| {s.name} | `{code}` |" in readme, (s.name, code)
    for cmd in ("make demo", "make test", "mmpipe synth", "mmpipe run", "mmpipe inspect", "mmpipe report"):
        assert cmd in readme, cmd
    assert "## Extending mmpipe" in readme
