"""The package layering of STYLE.md, read from the source: server -> engine -> kernels, kernels on
torch and triton alone, and no import cycle anywhere (imports inside functions count too)."""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("server", "engine", "kernels", "load_tests")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at any depth of the file, resolved to our module names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # "from engine.models import layers" names a module; "from engine.config import X" names its module.
        graph[name] = {m for m in imports_of(path) if m in files and m != name}
    return graph


def test_layers_point_one_way():
    graph = project_graph()
    for name, deps in graph.items():
        top = name.split(".")[0]
        for dep in deps:
            dep_top = dep.split(".")[0]
            assert not (top == "engine" and dep_top in ("server", "load_tests")), f"{name} imports {dep}"
            assert not (top == "kernels" and dep_top != "kernels"), f"{name} imports {dep}"
            assert not (top == "load_tests" and dep_top in ("engine", "kernels")), f"{name} imports {dep}"
    kernel_files = [p for p in (ROOT / "kernels").rglob("*.py")]
    allowed = {"torch", "triton", "numpy", "kernels", "__future__"} | set(sys.stdlib_module_names)  # numpy: host-side work lists
    for path in kernel_files:
        for dep in imports_of(path):
            assert dep.split(".")[0] in allowed, f"{path.name} imports {dep}"
    for path in (ROOT / "engine").rglob("*.py"):
        assert not any(d.split(".")[0] in ("fastapi", "starlette", "uvicorn") for d in imports_of(path)), path


def test_no_import_cycles():
    graph = project_graph()
    # A package imports nothing just because a submodule is imported: drop package -> own child edges.
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
