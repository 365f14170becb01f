"""The package's import graph carries the design: no cycles, and no import from a lower layer to a
higher one (DESIGN.md's layer list; keep LAYERS current when adding a module)."""

import ast
from pathlib import Path

import nmsparse

ROOT = Path(nmsparse.__file__).parent

# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    {"version", "_registry", "_io", "progress", "_topk_numba", "schema", "env", "_cxx"},
    {"_topk_cpu", "pattern", "quantgrid"},
    {"mask", "grad", "schedule", "select", "allocate", "score", "refine"},
    {"parametrize", "permute", "models", "datasets"},
    {"export"},
    {"method"},
    {"sparsifier"},
    {"oneshot", "runtime"},
    {"bench", "bench_decode"},
    {"config"},
    {"train"},
    {"cli", "__main__"},
    {"__init__"},  # the package's public surface
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every nmsparse import of every module: top level, inside functions and under TYPE_CHECKING."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base) + (f".{node.module}" if node.module else "")
                else:
                    target = node.module or ""
                if target.split(".")[0] != "nmsparse":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges[name].add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name.split(".")[0] == "nmsparse")
    return edges


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _layer(module: str) -> int:
    unit = _unit(module)
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_import_graph.py: add it to LAYERS")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
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

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_modules():
    edges = _edges(_modules())
    assert _cycles(edges) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    edges = _edges(_modules())
    upward = sorted(f"{src} -> {dst}" for src, targets in edges.items() for dst in targets
                    if dst in edges and _layer(dst) > _layer(src))
    assert upward == []


def test_the_checker_finds_a_cycle_and_an_upward_import():
    edges = {"nmsparse.mask": {"nmsparse.sparsifier"}, "nmsparse.sparsifier": {"nmsparse.mask"}}
    assert _cycles(edges) == [["nmsparse.mask", "nmsparse.sparsifier"]]
    assert _layer("nmsparse.sparsifier") > _layer("nmsparse.mask")
    assert _layer("nmsparse.oneshot.prune") > _layer("nmsparse.method.base")


def test_no_function_in_the_package_is_longer_than_80_lines():
    """Functions stay short enough to read at once (issue 26): docstring included, nested functions counted
    with their parent."""
    root = Path(nmsparse.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(root)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
