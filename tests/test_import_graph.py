"""The package's import graph, read from the source with `ast` (nothing is imported).

Rules (issue 22, "one mechanism each"):
(a) no circle among the package's modules, counting module-level and function-local imports (imports under
    `if TYPE_CHECKING:` never run and are left out);
(b) a protocol module (`protocols/<name>.py`) imports no sibling protocol module; what protocols share lives in
    `protocols/__init__.py`, `protocols/base.py` or a shared-helper module listed in SHARED_PROTOCOL_MODULES;
(c) a function-local import of a project module says why it is local, with a comment `# lazy: <reason>` on the
    import's first line or on the line above it, e.g. `# lazy: start-up time (torch)` or `# lazy: optional (faiss)`.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

PACKAGE = "ssl_segbench"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _shared_protocol_modules() -> set[str]:
    """protocols/__init__.py's SHARED_MODULES (the helpers the protocols share), read from its source: one list, the
    one discovery uses."""
    tree = ast.parse((ROOT / "protocols" / "__init__.py").read_text())
    value, = (n.value for n in tree.body if isinstance(n, ast.Assign)
              and [getattr(t, "id", None) for t in n.targets] == ["SHARED_MODULES"])
    return set(ast.literal_eval(value))


SHARED_PROTOCOL_MODULES = _shared_protocol_modules()
LAZY = re.compile(r"#\s*lazy:\s*\S")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(import node, is it inside a function) for every import that runs, skipping `if TYPE_CHECKING:` blocks."""
    def walk(node, local):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    yield from walk(ast.Module(body=[sub], type_ignores=[]), local)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local
            yield from walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    yield from walk(tree, False)


def targets(node, name: str, package: bool, modules: set[str]) -> set[str]:
    """The project modules that import `node` in module `name` (a package if `package`) loads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if node.level:
        base = name.split(".") if package else name.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in modules:
            found.add(sub)
        elif source in modules:
            found.add(source)
    found.discard(name)
    return found


def lazy_comment_lines(source: str) -> set[int]:
    """Line numbers that carry a `# lazy: <reason>` comment."""
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT and LAZY.match(tok.string)}


def scan(sources: dict[str, tuple[str, bool]]):
    """sources: module name → (source text, is a package). Returns (edges: module → {(target, is local, line)},
    unexplained local imports: [(module, line, target)])."""
    modules = set(sources)
    edges: dict[str, set[tuple[str, bool, int]]] = {m: set() for m in modules}
    unexplained = []
    for name, (text, package) in sources.items():
        lazy = lazy_comment_lines(text)
        for node, local in _imports(ast.parse(text)):
            for target in targets(node, name, package, modules):
                edges[name].add((target, local, node.lineno))
                if local and not {node.lineno, node.lineno - 1} & lazy:
                    unexplained.append((name, node.lineno, target))
    return edges, unexplained


def find_cycle(edges: dict[str, set]) -> list[str] | None:
    """One import circle as [m0, m1, ..., m0], or None."""
    graph = {m: sorted({t for t, _, _ in out}) for m, out in edges.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def sibling_protocol_imports(edges: dict[str, set]) -> list[tuple[str, int, str]]:
    """(module, line, sibling) for each protocol module importing another protocol module."""
    prefix = f"{PACKAGE}.protocols."
    protocols = {m for m in edges if m.startswith(prefix) and m[len(prefix):] not in SHARED_PROTOCOL_MODULES}
    return sorted((m, line, t) for m in protocols for t, _, line in edges[m] if t in protocols)


def package_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), is_package(p)) for p in sorted(ROOT.rglob("*.py"))}


# the package itself


def test_package_has_no_import_circle():
    edges, _ = scan(package_sources())
    assert len(edges) > 40 and sum(map(len, edges.values())) > 100  # the scan saw the package
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_protocol_imports_a_sibling_protocol():
    edges, _ = scan(package_sources())
    bad = sibling_protocol_imports(edges)
    assert not bad, "protocol imports a sibling protocol (move the shared helper to protocols/base.py or a shared " \
                    "module): " + "; ".join(f"{m} line {line} imports {t}" for m, line, t in bad)


def test_function_local_imports_say_why():
    edges, unexplained = scan(package_sources())
    assert any(local for out in edges.values() for _, local, _ in out)  # there are local imports, all explained
    assert not unexplained, "function-local import of a project module without a `# lazy: <reason>` comment: " + \
        "; ".join(f"{m} line {line} ({t})" for m, line, t in unexplained)


# the checker on planted examples, so the tests above cannot pass vacuously

def _synthetic(**modules: str) -> dict[str, tuple[str, bool]]:
    """pkg.<name> sources; a name ending in __init__ is a package (e.g. protocols__init__ → pkg.protocols)."""
    out = {}
    for key, text in modules.items():
        package = key.endswith("__init__")
        dotted = key.removesuffix("__init__").replace("__", ".").strip(".")
        out[".".join(p for p in ("pkg", dotted) if p)] = (text, package)
    return out


def test_checker_resolves_relative_imports_and_finds_a_local_circle():
    src = _synthetic(__init__="", a="from .b import f\n",
                     b="def f():\n    from . import c  # lazy: start-up time\n",
                     c="import os\nfrom .sub.d import g\n", sub__init__="", sub__d="from .. import a\n")
    edges, unexplained = scan(src)
    assert {t for t, _, _ in edges["pkg.a"]} == {"pkg.b"}
    assert edges["pkg.b"] == {("pkg.c", True, 2)}
    assert {t for t, _, _ in edges["pkg.sub.d"]} == {"pkg.a"}
    assert unexplained == []
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.c", "pkg.sub.d", "pkg.a"]
    src["pkg.sub.d"] = ("from .. import e\n", False)  # d imports no module of the package now: no circle
    assert find_cycle(scan(src)[0]) is None


def test_checker_finds_the_registry_circle_and_skips_type_checking():
    src = _synthetic(__init__="from . import x\nREG = {}\n", x="from . import REG\n",
                     y="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .z import T\n",
                     z="from .y import u\n")
    edges, _ = scan(src)
    assert find_cycle(edges) == ["pkg", "pkg.x", "pkg"]
    assert edges["pkg.y"] == set()


def test_checker_flags_sibling_protocols_but_not_shared_modules():
    src = _synthetic(__init__="", protocols__init__="from . import a, b\n", protocols__base="",
                     protocols__training="", protocols__a="from .base import P\nfrom .training import h\n",
                     protocols__b="from . import base\ndef f():\n    from .a import g  # lazy: test\n")
    src = {k.replace("pkg.", f"{PACKAGE}.", 1) if k != "pkg" else PACKAGE: v for k, v in src.items()}
    edges, _ = scan(src)
    assert sibling_protocol_imports(edges) == [(f"{PACKAGE}.protocols.b", 3, f"{PACKAGE}.protocols.a")]


def test_checker_wants_the_lazy_comment_on_or_above_the_line():
    src = _synthetic(__init__="", e="", a=(
        "def f():\n"
        "    # lazy: optional dependency\n"
        "    from .e import x\n"
        "def g():\n"
        "    from .e import y  # needed\n"
        "def h():\n"
        "    # lazy:\n"
        "    from . import e\n"
        "class C:\n"
        "    from .e import z\n"))
    _, unexplained = scan(src)
    assert unexplained == [("pkg.a", 5, "pkg.e"), ("pkg.a", 8, "pkg.e")]
