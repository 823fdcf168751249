"""The package's dependency rules hold: no import cycles inside a package (function-level imports
count too), the core never imports an entry point, data_pipeline never imports a trainer."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("janus", "data_pipeline", "pretrain", "finetune", "benchmarks")


def imports_of(path: Path, package: str) -> set[str]:
    """Modules (dotted, inside the repo's packages) that ``path`` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    modules = {f"{p}.{f.stem}" for p in PACKAGES for f in (REPO / p).glob("*.py") if f.stem != "__init__"}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    out = {}
    for package in PACKAGES:
        for f in (REPO / package).glob("*.py"):
            if f.stem != "__init__":
                out[f"{package}.{f.stem}"] = imports_of(f, package)
    return out


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(g):
        if not state.get(node):
            visit(node, [node])


@pytest.mark.parametrize("package,forbidden", [("janus", ("pretrain", "finetune", "benchmarks")),
                                               ("data_pipeline", ("janus.trainer", "pretrain", "finetune", "benchmarks")),
                                               ("finetune", ("pretrain",))])
def test_dependencies_point_one_way(package, forbidden):
    bad = {m: sorted(i for i in deps if i.startswith(forbidden))
           for m, deps in graph().items() if m.startswith(package + ".")}
    assert not {m: v for m, v in bad.items() if v}
