"""The package's layering, read from the source (no Redis): which module may import or touch what.

See docs/architecture.md: the data of the hot path lives in ``delivery`` (no I/O), the rules in
``decisions`` import it and nothing that talks to Redis.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import streamflow

PACKAGE = Path(streamflow.__file__).parent
#: Modules that send Redis commands or hold connections, and the clients themselves.
IO_MODULES = {
    "redis",
    "streamflow.streams",
    "streamflow.connection",
    "streamflow.sentinel",
    "streamflow.leases",
    "streamflow.signals",
    "streamflow.settle",
    "streamflow.nodes",
    "streamflow.worker",
}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def runtime_imports(path: Path) -> set[str]:
    """Modules ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks left out)."""
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text())]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # `from streamflow import streams` imports the module streams.
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        pending.extend(ast.iter_child_nodes(node))
    return found


def _io(imports: set[str]) -> set[str]:
    return {
        name for name in imports if any(name == m or name.startswith(f"{m}.") for m in IO_MODULES)
    }


@pytest.mark.parametrize("module", ["delivery", "decisions"])
def test_delivery_and_decisions_import_nothing_with_io(module: str) -> None:
    imports = runtime_imports(PACKAGE / f"{module}.py")
    assert imports, module
    assert not _io(imports), f"{module} imports {sorted(_io(imports))}"


HOT_PATH_TYPES = {"Delivery", "InFlight", "Decision", "Outcome", "WorkerStatistics"}


def test_the_hot_path_types_are_defined_and_imported_from_delivery() -> None:
    from streamflow import delivery

    for name in HOT_PATH_TYPES:
        assert getattr(delivery, name).__module__ == "streamflow.delivery"
    assert streamflow.Outcome is delivery.Outcome
    # Every import names their home, not a module that happens to import them.
    roots = [PACKAGE, Path(__file__).parent]
    wrong = [
        f"{path.name}: from {node.module} import {alias.name}"
        for root in roots
        for path in sorted(root.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module not in ("streamflow.delivery", "streamflow")
        for alias in node.names
        if alias.name in HOT_PATH_TYPES and (node.module or "").startswith("streamflow")
    ]
    assert not wrong
