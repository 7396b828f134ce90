"""Imports point one way (``mmlab.MODULE_ORDER``) and never in a circle, imports inside functions
included; every module imports on its own."""

import ast
import subprocess
import sys
from pathlib import Path

import mmlab

PACKAGE = Path(mmlab.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            out[name] = f
    return out


def _imports(path: Path, modules) -> set[str]:
    """The mmlab modules ``path`` imports anywhere in it (``from mmlab import x`` counts as ``x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "mmlab":  # from mmlab import engine / run
            names = [f"mmlab.{a.name}" if a.name in modules else "mmlab" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n == "mmlab":
                found.add("")  # the public surface itself
            elif n.startswith("mmlab.") and n[len("mmlab."):] in modules:
                found.add(n[len("mmlab."):])
    return found


def _layer(module: str) -> int:
    """Index of the MODULE_ORDER layer a module belongs to (its longest listed prefix)."""
    best = None
    for i, layer in enumerate(mmlab.MODULE_ORDER):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"mmlab.{module} is in no layer of mmlab.MODULE_ORDER; add it there"
    return best[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(f, modules) - {m} for m, f in modules.items()}


def test_imports_follow_the_module_order():
    bad = []
    for m, deps in _graph().items():
        for d in deps:
            if d == "":
                if _layer(m) != len(mmlab.MODULE_ORDER) - 1:
                    bad.append(f"mmlab.{m} imports the public surface `mmlab` (only the command line may)")
            elif _layer(d) > _layer(m) or (_layer(d) == _layer(m) and d.split(".")[0] != m.split(".")[0]):
                bad.append(f"mmlab.{m} (layer {_layer(m)}) imports mmlab.{d} (layer {_layer(d)})")
    assert not bad, "imports against mmlab.MODULE_ORDER:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph, state = _graph(), {}

    def visit(u, path):
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if v == "":
                continue
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [u, v]))
            if v not in state:
                visit(v, path + [u])
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [])


def test_every_module_imports_alone():
    """Each module in a fresh state of mmlab's modules (torch stays loaded, so this is quick)."""
    code = ("import importlib, sys\n"
            f"for m in {sorted(_modules())!r}:\n"
            "    for k in [k for k in sys.modules if k == 'mmlab' or k.startswith('mmlab.')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module('mmlab.' + m)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
