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
    "streamflow.connect",
    "streamflow.outage",
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
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module not in ("streamflow.delivery", "streamflow")
        for alias in node.names
        if alias.name in HOT_PATH_TYPES and (node.module or "").startswith("streamflow")
    ]
    assert not wrong


def _is_attr_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "setattr", "hasattr")
        and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    )


def private_accesses(path: Path) -> list[str]:
    """Every ``x._name`` in ``path`` where ``x`` is not ``self`` (dunders aside), by line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = None
        if isinstance(node, ast.Attribute):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                name = node.attr
        elif _is_attr_call(node):
            # getattr(worker, "_x") and setattr(worker, "_x", v) read and write the same way.
            name = node.args[1].value  # type: ignore[attr-defined]
        if name and name.startswith("_") and not name.startswith("__"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_metrics_reads_no_private_attribute_of_another_object() -> None:
    """metrics reads public statistics() snapshots and observe_* callbacks only."""
    assert not private_accesses(PACKAGE / "metrics.py")


def test_private_access_check_sees_reads_and_writes(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "def f(worker, self):\n"
        "    self._ok = worker.public\n"
        "    worker._signals_latency = print\n"
        "    return worker._settler.stats, getattr(worker, '_x'), type(worker).__name__\n"
    )
    assert sorted(private_accesses(source)) == [
        "line 3: worker._signals_latency",
        "line 4: getattr(worker, '_x')",
        "line 4: worker._settler",
    ]


#: What builds a Redis client or a pool (redis-py's constructors, and a Sentinel's master_for).
CLIENT_BUILDERS = {
    "from_url",
    "from_pool",
    "BlockingConnectionPool",
    "RedisCluster",
    "Sentinel",
    "master_for",
}


def client_builders(path: Path) -> list[str]:
    """Every call in ``path`` that builds a Redis client or pool, by line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = func.value if isinstance(func, ast.Attribute) else None
        # Client.from_url is streamflow's own constructor, which calls connect.connect.
        if name in CLIENT_BUILDERS and not (isinstance(owner, ast.Name) and owner.id == "cls"):
            found.append(f"{path.name} line {node.lineno}: {ast.unparse(node)[:60]}")
    return found


def test_only_connect_builds_redis_clients() -> None:
    """Reaching Redis lives in one module: the CLI, Client and SyncClient go through it."""
    wrong = [
        found
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "connect.py"
        for found in client_builders(path)
    ]
    assert not wrong
    assert client_builders(PACKAGE / "connect.py")  # the check sees what it looks for


def _ours(module: str) -> set[str]:
    return {
        name.split(".")[1]
        for name in runtime_imports(PACKAGE / f"{module}.py")
        if name.startswith("streamflow.")
    }


#: The modules of reaching Redis, each with the only streamflow modules it may import: connect
#: builds the clients from the parts below it (and re-exports them); they import only leaves.
CONNECT_MODULES = {
    "connect": {"errors", "outage", "sentinel", "urls"},
    "outage": {"errors"},
    "sentinel": {"outage"},
    "urls": {"errors"},
}


@pytest.mark.parametrize("module", sorted(CONNECT_MODULES))
def test_connect_and_its_parts_import_only_the_leaves_and_each_other(module: str) -> None:
    """connect is below streams: it and its parts import only errors and each other (no circle)."""
    assert _ours(module) == CONNECT_MODULES[module]


#: (attribute, attribute of its owner or None) of the calls that stop a handler by hand.
STOP_CALLS = {("_shut_down", None), ("_set", "cancel"), ("cancel", "scope")}


def _stops_by_hand(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return [
            t
            for t in node.targets
            if isinstance(t, ast.Attribute)
            and (
                t.attr in ("lost", "released")
                # delivery.cancel = signal; not self.cancel (a script) nor self.step.cancel.
                or (t.attr == "cancel" and isinstance(t.value, ast.Name) and t.value.id != "self")
            )
        ]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        owner = node.func.value
        owner_attr = owner.attr if isinstance(owner, ast.Attribute) else None
        called = {(node.func.attr, owner_attr), (node.func.attr, None)}
        if called & STOP_CALLS:
            return [node.func]
    return []


def stop_writes(path: Path) -> list[str]:
    """Every place in ``path`` that stops a handler by hand: sets a delivery's ``lost``,
    ``released`` or ``cancel``, its handler's cancel token or shutdown flag, or cancels its
    ``scope``."""
    return [
        f"{path.name} line {node.lineno}: {ast.unparse(hit)}"
        for node in ast.walk(ast.parse(path.read_text()))
        for hit in _stops_by_hand(node)
    ]


def test_only_delivery_stop_stops_a_handler() -> None:
    """Stopping a handler for a reason is written once, in ``Delivery.stop``."""
    found = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "delivery.py"
        for hit in stop_writes(path)
    ]
    assert not found


def test_stop_check_sees_every_hand_written_stop(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "def f(delivery, tg):\n"
        "    delivery.lost = True\n"
        "    delivery.released = True\n"
        "    delivery.cancel = signal\n"
        "    delivery.context.cancel._set('lease lost')\n"
        "    delivery.context._shut_down()\n"
        "    delivery.scope.cancel()\n"
        "    tg.cancel_scope.cancel()\n"
        "    self.step.cancel = 'x'\n"
    )
    assert [hit.split(":")[0] for hit in stop_writes(source)] == [
        f"sample.py line {n}" for n in range(2, 8)
    ]
