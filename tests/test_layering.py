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
    "streamflow.scripts",
    "streamflow.connect",
    "streamflow.outage",
    "streamflow.sentinel",
    "streamflow.pipelines",
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


@pytest.mark.slow
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


def test_intake_imports_neither_the_worker_nor_the_dag_side() -> None:
    """Read -> decide -> settle goes downward: the worker and the coordinator use the intake."""
    imports = runtime_imports(PACKAGE / "intake.py")
    above = {
        name
        for name in imports
        if name in ("streamflow.worker", "streamflow.dag")
        or name.startswith(("streamflow.worker.", "streamflow.dag."))
    }
    assert not above
    assert "streamflow.streams" in imports  # the check sees the imports it looks at


def test_only_the_otel_module_imports_opentelemetry_and_nothing_imports_it() -> None:
    """The ``otel`` extra stays optional: the coordinator and workers reach tracing only
    through the app's middleware (``dag.tracing``'s seam), never by importing it, lazily or not.
    """
    importers = {}
    for path in PACKAGE.rglob("*.py"):
        imports = runtime_imports(path)
        otel = {name for name in imports if name.split(".")[0] == "opentelemetry"}
        otel |= {name for name in imports if name == "streamflow.otel"}
        if otel:
            importers[str(path.relative_to(PACKAGE))] = otel
    assert list(importers) == ["otel.py"]
    assert "opentelemetry.trace" in importers["otel.py"]  # the check sees what it looks at


def test_the_stream_commands_are_below_the_scripts() -> None:
    """scripts calls Lua over stream replies parsed by streams; streams never calls a script."""
    assert "scripts" not in _ours("streams")
    assert "streams" in _ours("scripts")  # the check sees the imports it looks at


def test_only_the_group_reader_adopts_and_parses_raw_reads() -> None:
    """One group reader: nobody else sends XAUTOCLAIM or parses replies with streams' privates."""
    wrong = [
        f"{path.relative_to(PACKAGE)}: {ast.unparse(node)}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ("streams.py", "scripts.py", "intake.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and (node.attr == "xautoclaim" or (node.attr.startswith("_") and _is_streams(node.value)))
    ]
    assert not wrong


def _is_streams(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id in ("streams", "scripts")


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


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """The dotted name of the module at ``path`` in the package at ``root``."""
    return ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of the package at ``root``, with the modules of it that it imports.

    As :func:`runtime_imports` reads them: imports inside functions count (a lazy import closes
    a circle as surely as one at the top), ``if TYPE_CHECKING:`` blocks do not.
    """
    modules = {module_name(path, root): path for path in root.rglob("*.py")}
    return {
        name: {found for found in runtime_imports(path) if found in modules and found != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, as a path that ends where it starts (None: no circle)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        path.append(name)
        for imported in sorted(graph[name]):
            if imported in path:
                return [*path[path.index(imported) :], imported]
            if imported not in done and (cycle := visit(imported)):
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        if name not in done and (cycle := visit(name)):
            return cycle
    return None


def test_no_import_circle_among_the_package_modules() -> None:
    """Imports point one way (docs/architecture.md), also through function-level imports."""
    graph = import_graph()
    assert {"streamflow.cli", "streamflow.cli.options", "streamflow.worker"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_check_sees_a_lazy_circle_and_not_a_type_checking_one(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\nimport pkg.c\n")
    (package / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    graph = import_graph(package)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg", "pkg.b", "pkg.c"},
        "pkg.b": {"pkg.a"},
        "pkg.c": set(),
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    del graph["pkg.b"], graph["pkg.a"]
    assert find_cycle(graph) is None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imported(node: ast.AST) -> list[str]:
    """The dotted names an import statement imports; a relative one is of streamflow."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    module = ".".join(part for part in ("streamflow" if node.level else "", node.module) if part)
    return [f"{module}.{alias.name}" for alias in node.names]


def private_imports(path: Path) -> list[str]:
    """Every import in ``path`` of a private (underscore) name of a streamflow module, by line."""
    return [
        f"{path.name} line {node.lineno}: {name}"
        for node in ast.walk(ast.parse(path.read_text()))
        for name in _imported(node)
        if name.split(".")[0] == "streamflow" and any(_is_private(p) for p in name.split("."))
    ]


def test_no_module_imports_a_private_name_of_another() -> None:
    """What a sibling shares is public (e.g. streamflow.cli.options); the rest stays private."""
    wrong = [found for path in sorted(PACKAGE.rglob("*.py")) for found in private_imports(path)]
    assert not wrong


def test_private_import_check_sees_names_and_modules(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "from streamflow.cli.options import _client, open_client\n"
        "from streamflow import __version__, _x\n"
        "from streamflow._hidden import name\n"
        "import streamflow._lazy\n"
        "from other import _theirs\n"
        "from .cli import _relative\n"
        "import _thread\n"
    )
    assert private_imports(source) == [
        "sample.py line 1: streamflow.cli.options._client",
        "sample.py line 2: streamflow._x",
        "sample.py line 3: streamflow._hidden.name",
        "sample.py line 4: streamflow._lazy",
        "sample.py line 6: streamflow.cli._relative",
    ]


#: The delivery path: what a worker runs for every message.
DELIVERY_PATH = (
    "worker",
    "pool",
    "intake",
    "runner",
    "settle",
    "leases",
    "signals",
    "nodes",
    "decisions",
    "delivery",
)
WINGS = ("streamflow.dag", "streamflow.ops", "streamflow.cli", "streamflow.dashboard")


def _module_level_imports(module: str) -> set[str]:
    """Modules ``module`` imports when it is imported (top level only, TYPE_CHECKING out)."""
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.exists():
        path = PACKAGE.joinpath(*module.split(".")[1:], "__init__.py")
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if _is_module(name)}


def _is_module(name: str) -> bool:
    if not name.startswith("streamflow."):
        return False
    relative = PACKAGE.joinpath(*name.split(".")[1:])
    return relative.with_suffix(".py").exists() or (relative / "__init__.py").exists()


@pytest.mark.parametrize("module", DELIVERY_PATH)
def test_the_delivery_path_loads_no_wing(module: str) -> None:
    """What a worker imports to run a message brings in none of dag/, ops/, cli/ (lazy aside)."""
    seen, todo = set(), [f"streamflow.{module}"]
    while todo:
        name = todo.pop()
        for found in _module_level_imports(name) - seen:
            seen.add(found)
            todo.append(found)
    assert not {name for name in seen if name.startswith(WINGS)}


def imports_of_test_modules(path: Path) -> list[str]:
    """Every import in ``path`` of a test module (``tests...test_*``), by line."""
    return [
        f"{path.name} line {node.lineno}: {name}"
        for node in ast.walk(ast.parse(path.read_text()))
        for name in _imported(node)
        if name.split(".")[0] == "tests" and any(p.startswith("test_") for p in name.split("."))
    ]


@pytest.mark.slow
def test_no_test_module_imports_another() -> None:
    """What tests share lives in helpers (tests/helpers.py, processes.py, dag/helpers.py...)."""
    paths = sorted(Path(__file__).parent.rglob("*.py"))
    wrong = [found for path in paths for found in imports_of_test_modules(path)]
    assert not wrong


def test_test_import_check_sees_names_and_modules(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "from tests.test_outage import spawn_worker\n"
        "from tests.dag.test_coordinator import system\n"
        "from tests import test_client\n"
        "import tests.test_jobs\n"
        "from tests.helpers import wait_until\n"
        "from tests.dag.helpers import chain\n"
    )
    assert imports_of_test_modules(source) == [
        "sample.py line 1: tests.test_outage.spawn_worker",
        "sample.py line 2: tests.dag.test_coordinator.system",
        "sample.py line 3: tests.test_client",
        "sample.py line 4: tests.test_jobs",
    ]


def test_only_the_cli_imports_the_dashboard() -> None:
    """The dashboard is a wing (the ``dashboard`` extra): the core never imports it."""
    graph = import_graph()
    wrong = sorted(
        name
        for name, imports in graph.items()
        if not name.startswith(("streamflow.dashboard", "streamflow.cli"))
        and any(found.startswith("streamflow.dashboard") for found in imports)
    )
    assert not wrong
    assert "streamflow.dashboard.settings" in graph["streamflow.cli.dashboard"]  # it sees imports


def test_the_dashboard_reads_no_private_attribute_of_another_object() -> None:
    """It reads Redis through the public API and the ops modules, like any other tool."""
    found = {
        path.name: private_accesses(path) for path in sorted((PACKAGE / "dashboard").glob("*.py"))
    }
    assert found and not any(found.values()), found
