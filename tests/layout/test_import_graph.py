"""The import structure, read from the source (ast), so that it stays as docs/architecture.md says:

* no import circle among the modules of espo_async/, actors/ and protocols/ (function-level and
  TYPE_CHECKING imports count too);
* no actor imports another actor's module: a module under actors/ imports from actors/ only its
  own family (actors/samplers/vllm.py may use actors/samplers/base.py); what two actors share
  lives in espo_async/ or protocols/;
* espo_async/ and protocols/ never import actors/; protocols/ never imports espo_async/;
* espo_async/training/ is the learner's: outside it only actors/learner.py imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("espo_async", "actors", "protocols")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import sub`` counts as pkg.sub)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else resolve(base))
    found.discard(None)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _family(module: str) -> str:
    """actors.samplers.vllm -> actors.samplers; actors.learner -> actors.learner."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_actor_imports_another_actor():
    bad = [f"{m} imports {d}" for m, deps in _graph().items() if m.startswith("actors.")
           for d in deps if d.startswith("actors.") and d != "actors" and _family(d) != _family(m)]
    assert not bad, "\n".join(bad)


def test_library_layers_do_not_import_upwards():
    bad = []
    for m, deps in _graph().items():
        for d in deps:
            if m.startswith(("espo_async", "protocols")) and d.startswith("actors"):
                bad.append(f"{m} imports {d}")
            if m.startswith("protocols") and d.startswith("espo_async"):
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(bad)


def test_training_is_the_learners_alone():
    bad = [f"{m} imports {d}" for m, deps in _graph().items()
           if not m.startswith("espo_async.training") and m != "actors.learner"
           for d in deps if d.startswith("espo_async.training")]
    assert not bad, "\n".join(bad)


def test_the_graph_reader_sees_imports():
    graph = _graph()
    assert "espo_async.core.losses" in graph["espo_async.core"]  # relative, from the package face
    assert "espo_async.core.advantages" in graph["espo_async.core.losses"]  # relative, in a module
    assert "protocols" in graph["actors.stopper"]
