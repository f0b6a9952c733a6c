"""The import rules of docs/architecture.md ("Layers"), checked against the code.

The test reads the rules from the document's layer table (``| layer | modules | may import |``)
and every ``import`` of the package with ``ast`` (imports inside functions included): a module
may import its own layer and the layers its row names, nothing else of detres. It also fails
on an import cycle between modules. The document and the code cannot drift apart.
"""
import ast
import re
from pathlib import Path

import pytest

from helpers import ROOT

DOC = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "detres"


def layer_table() -> dict[str, tuple[list[str], set[str]]]:
    """{layer: (module prefixes, layers it may import)} from the document's table."""
    text = DOC.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["layer", "modules", "may import"], header
    table = {}
    for row in rows[2:]:
        layer, modules, allowed = (c.strip() for c in row.strip("|").split("|"))
        prefixes = re.findall(r"`([\w.]+)`", modules)
        names = {a.strip() for a in allowed.split(",")} - {"", "nothing"}
        table[layer] = (prefixes, names)
    return table


def layer_of(module: str, table: dict[str, tuple[list[str], set[str]]]) -> str | None:
    """The layer whose longest module prefix matches ``module``."""
    best, length = None, -1
    for layer, (prefixes, _) in table.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > length:
                best, length = layer, len(p)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def detres_imports(path: Path, text: str | None = None) -> set[str]:
    """The detres modules ``path`` imports (``from detres.x import y``: detres.x.y when that
    is a module, else detres.x). The package imports absolutely: a relative import fails."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "detres"}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import"
            if (node.module or "").split(".")[0] != "detres":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                as_path = ROOT / Path(*sub.split("."))
                found.add(sub if as_path.with_suffix(".py").is_file() or as_path.is_dir()
                          else node.module)
    return found - {module_name(path)}


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: detres_imports(path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    table = layer_table()
    assert [m for m in MODULES if layer_of(m, table) is None] == []


def test_imports_point_the_way_the_document_says():
    table = layer_table()
    unknown = {a for _, names in table.values() for a in names} - set(table)
    assert not unknown, f"the table names layers it does not define: {unknown}"
    wrong = []
    for module, imports in GRAPH.items():
        mine = layer_of(module, table)
        for target in imports:
            theirs = layer_of(target, table)
            if theirs is not None and theirs != mine and theirs not in table[mine][1]:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert wrong == []


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])
    # a package's __init__ re-exporting its modules is not a cycle of code
    real = [c for c in cycles if not any(MODULES[m].name == "__init__.py" for m in c[:-1])]
    assert real == []


@pytest.mark.parametrize("source, expected", [
    ("from detres.models.rpn import RPN", {"detres.models.rpn"}),
    ("from detres.models import rpn", {"detres.models.rpn"}),
    ("def f():\n    import detres.data.loader", {"detres.data.loader"}),
])
def test_the_import_reader_sees_each_form(source, expected):
    assert detres_imports(PACKAGE / "tasks" / "probe.py", source) == expected
