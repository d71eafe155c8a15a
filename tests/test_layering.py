"""The package layering of STYLE.md, read from the source: server -> engine -> roseinfer_kernels (the
kernels), which depends on torch and triton alone; no import cycle anywhere (imports inside functions
count too); and no top-level package of ours shares its name with one that an installed distribution
provides."""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("server", "engine", "roseinfer_kernels", "load_tests")


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
            assert not (top == "roseinfer_kernels" and dep_top != "roseinfer_kernels"), f"{name} imports {dep}"
            assert not (top == "load_tests" and dep_top in ("engine", "roseinfer_kernels")), f"{name} imports {dep}"
    kernel_files = [p for p in (ROOT / "roseinfer_kernels").rglob("*.py")]
    # numpy: host-side work lists
    allowed = {"torch", "triton", "numpy", "roseinfer_kernels", "__future__"} | set(sys.stdlib_module_names)
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


def test_no_installed_distribution_provides_our_top_level_names():
    """Our packages import by their bare names, so one that another distribution also installs
    shadows it or is shadowed, by path order: transformers 5.25 requires Hugging Face's `kernels`,
    which is why the kernels live in `roseinfer_kernels` (under `kernels`, transformers' own
    `from kernels import ...` found ours from the repository root and failed, and `roseinfer`
    run from elsewhere imported Hugging Face's package under our name)."""
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    for name in PACKAGES:
        others = [d for d in owners.get(name, []) if d.lower() != "roseinfer"]
        assert not others, f"{name} is also installed by {others}"
