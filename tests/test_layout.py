"""The import rules of the package, checked on the source (AST), and the size of its modules.

- no import cycle, ``TYPE_CHECKING`` and function-level imports included;
- the core (``xmpp/``) imports no feature, transport or web module;
- transports import only the stream interface of the core (and each other);
- only ``server.py`` imports the wiring, and only the CLI imports ``server.py``;
- no module over 500 lines.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "boshroster"
STREAM_INTERFACE = {"boshroster.xmpp.stream", "boshroster.xmpp.xmlio", "boshroster.xmpp.errors", "boshroster.xmpp.tags"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """boshroster modules imported anywhere in the file (resolved to modules, not names)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != "boshroster" and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}


def test_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("boshroster.xmpp")))
def test_the_core_imports_no_feature(name):
    outside = {dep for dep in GRAPH[name] if not dep.startswith("boshroster.xmpp")}
    assert not outside, f"{name} imports {sorted(outside)}"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("boshroster.transports")))
def test_transports_import_only_the_stream_interface(name):
    outside = {d for d in GRAPH[name] if not d.startswith("boshroster.transports") and d not in STREAM_INTERFACE}
    assert not outside, f"{name} imports {sorted(outside)}"


def test_only_the_server_imports_the_wiring_and_only_the_cli_imports_the_server():
    wiring_users = {n for n, deps in GRAPH.items() if "boshroster.wiring" in deps}
    server_users = {n for n, deps in GRAPH.items() if "boshroster.server" in deps}
    assert wiring_users == {"boshroster.server"}
    assert server_users <= {n for n in GRAPH if n.startswith("boshroster.cli")}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_module_over_500_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= 500, f"{name} has {lines} lines"


def test_the_rules_see_imports():
    """The checker itself: it finds relative, TYPE_CHECKING and function-level imports."""
    assert "boshroster.xmpp.stream" in GRAPH["boshroster.xmpp.sessions"]  # under TYPE_CHECKING
    assert "boshroster.server" in GRAPH["boshroster.cli.main"]  # inside a function
    assert "boshroster.im.version" in GRAPH["boshroster.wiring"]
