"""The package layout: no module of fastlora (kernels included) imports, at any depth and
lazily or not, a module that imports it back. Imports of a package's ``__init__`` (``from
.. import __version__``) are not edges: a package is whole before its modules run."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package ``__init__``) for fastlora/ and kernels/."""
    found = {}
    for path in [*ROOT.glob("fastlora/**/*.py"), *ROOT.glob("kernels/**/*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["fastlora", *parts]
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _imports(name: str, path: Path, package: bool, modules: dict) -> set[str]:
    """The non-package modules that ``name`` imports anywhere in its file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                       for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name and not modules[t][1])
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_one_that_imports_it_back():
    modules = _modules()
    assert "fastlora.adapters.bank" in modules and "fastlora.kernels.linear" in modules
    graph = {name: _imports(name, path, package, modules)
             for name, (path, package) in modules.items()}
    assert _cycles(graph) == []


def test_the_root_holds_the_public_surface_only():
    """The ops, the implementation choice and the multi-adapter data live in their packages
    (design.md's layers); the root keeps the public entry points."""
    root = sorted(p.name for p in (ROOT / "fastlora").glob("*.py"))
    assert root == ["__init__.py", "__main__.py", "demo.py", "functional.py", "reference.py"]
