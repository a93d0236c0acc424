"""The layout keeps its promises: no import circles between modules, and each module imports
only its own layer or the layers below it (read from the source, nothing imported).

Layers, bottom up: inferpool's floor (types, config, errors, validation, ...), reasoning/,
routing/, the session modules (render and record), actors/ and the weight transfer, the
facade (Pool, Session), deploy/ and bench/, the command line. ``if TYPE_CHECKING:`` imports
are not dependencies; imports inside functions are.

Run: pytest tests/unit/test_layout.py
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "inferpool": "inferpool",
    "actors": "inferpool.actors",
    "routing": "inferpool.routing",
    "reasoning": "inferpool.reasoning",
    "deploy": "inferpool.deploy",
    "bench": "inferpool.bench",
}
FLOOR = {
    "errors",
    "validation",
    "config",
    "types",
    "log",
    "metrics",
    "openai_types",
    "sequences",
    "ray_utils",
    "hub",
    "tiny_model",
    "discovery",
    "registry",
    "reasoning_config",
    "placement_config",
    "heap",
}
SESSION_MODULES = {"chat", "replies", "message_index", "segment", "session_tree", "session_sync", "staleness", "turns"}
FACADE = {"pool", "lifecycle", "session", "stats", "rollout", "weights.push", "__init__"}


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[1:2] == ["cli"]:
        return 7
    if parts[1:2] in (["deploy"], ["bench"]):
        return 6
    rest = ".".join(parts[1:]) or "__init__"
    if parts[1:2] == ["reasoning"]:
        return 1
    if parts[1:2] == ["routing"]:
        return 2
    if rest in SESSION_MODULES:
        return 3
    if parts[1:2] == ["actors"] or (rest.startswith("weights") and rest not in FACADE):
        return 4
    if rest in FACADE:
        return 5
    assert rest in FLOOR, f"{module}: place it in a layer (tests/unit/test_layout.py)"
    return 0


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *filter(None, [base])])
            # "from package import module" needs the module; "from module import name" the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:  # the module itself, or the package a name came from
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {m: imports(m, p, known) for m, p in found.items()}


def test_no_module_imports_a_layer_above_its_own() -> None:
    bad = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph().items()
        for d in deps
        if layer(d) > layer(m)
    ]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circles() -> None:
    deps = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in deps.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_product_files_stay_small() -> None:
    big = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 450}
    assert not big, f"files over ~400 lines (give each concept its own home): {big}"
