"""Lifecycle hooks and resources (streamflow.lifecycle), and the message fields of ctx.log lines.

In-process workers, coordinators and harnesses on a real redis-server; worker OS processes for
the exit code, the one ``error:`` line and SIGTERM. Hooks in other processes count their
effects in a file (tests/lifecycle_apps.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, assert_type

import anyio
import orjson
import pytest
from redis.asyncio import Redis

import streamflow
from streamflow import (
    App,
    Client,
    ConfigError,
    Context,
    Coordinator,
    Resources,
    StartupError,
    Worker,
)
from streamflow.delivery import Outcome
from streamflow.logs import JsonFormatter, TextFormatter
from streamflow.testing import Harness
from tests.helpers import ROOT, clean_env, recorded, running, wait_for, wait_until

pytestmark = pytest.mark.anyio

DOCS = ROOT / "docs" / "concepts.md"
CLI = (sys.executable, "-m", "streamflow")


class Pool:
    """Stands for a connection pool."""

    def __init__(self, name: str = "real") -> None:
        self.name = name
        self.closed = False


class Counter:
    """A second resource, made by a plain (threaded) hook."""

    def __init__(self) -> None:
        self.value = 0


def hooked_app(events: list[str]) -> App:
    """Two startup hooks (async, plain), two shutdown hooks (plain, async), one role."""
    app = App()

    @app.on_startup
    async def open_pool(resources: Resources) -> None:
        resources[Pool] = Pool()
        events.append("start pool")

    @app.on_startup
    def open_counter(resources: Resources) -> None:
        resources[Counter] = Counter()
        events.append("start counter")

    @app.on_shutdown
    def close_counter(resources: Resources) -> None:
        events.append(f"stop counter {resources[Counter].value}")

    @app.on_shutdown
    async def close_pool(resources: Resources) -> None:
        pool = resources[Pool]
        pool.closed = True
        events.append(f"stop pool {pool.name}")

    @app.role("use")
    async def use(ctx: Context, payload: int) -> None:
        pool = assert_type(ctx.resources[Pool], Pool)  # typed by its key
        ctx.resources[Counter].value += payload
        events.append(f"handled {payload} with {pool.name}")

    return app


@pytest.mark.slow
async def test_hooks_run_in_order_around_serving_and_handlers_get_typed_resources(
    redis: Redis, namespace: str
) -> None:
    events: list[str] = []
    app = hooked_app(events)
    outcomes: list[Outcome] = []
    worker = Worker(app, redis, namespace=namespace, on_outcome=outcomes.append)
    with anyio.fail_after(20):
        async with running(worker):
            assert events == ["start pool", "start counter"]  # before it served
            await Client(redis, namespace=namespace).publish("use", 2)
            await wait_until(lambda: len(outcomes) == 1)
            assert events[-1] == "handled 2 with real"
        await worker.wait_stopped()
    assert [o.status for o in outcomes] == ["acked"]
    assert events == [
        "start pool",
        "start counter",
        "handled 2 with real",
        "stop counter 2",
        "stop pool real",
    ]


async def test_a_failing_startup_hook_stops_the_worker_after_the_shutdown_hooks_ran(
    redis: Redis, namespace: str
) -> None:
    events: list[str] = []
    app = App()

    @app.on_startup
    def first(resources: Resources) -> None:
        events.append("start first")

    @app.on_startup
    async def broken(resources: Resources) -> None:
        raise OSError("db down")

    @app.on_startup
    def never(resources: Resources) -> None:
        events.append("start never")

    @app.on_shutdown
    async def close(resources: Resources) -> None:
        events.append(f"stop {resources.get(Pool)}")

    @app.role("use")
    async def use(ctx: Context, payload: Any) -> None:
        events.append("handled")

    worker = Worker(app, redis, namespace=namespace)
    with anyio.fail_after(10), pytest.raises(StartupError, match="broken failed: OSError"):
        await worker.run()
    assert events == ["start first", "stop None"]
    # It never took its consumer name: nothing of it is left in Redis.
    assert await redis.keys(f"{namespace}*") == []


async def test_a_failing_shutdown_hook_is_logged_and_the_next_one_runs(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    app = App()

    @app.on_shutdown
    def broken(resources: Resources) -> None:
        raise RuntimeError("flush failed")

    @app.on_shutdown
    def after(resources: Resources) -> None:
        events.append("after")

    @app.role("use")
    async def use(ctx: Context, payload: Any) -> None: ...

    with anyio.fail_after(10):
        await Worker(app, redis, namespace=namespace).drain()
    assert events == ["after"]
    assert "shutdown hook tests.test_lifecycle" in caplog.text
    assert "RuntimeError: flush failed" in caplog.text


def test_resources_are_typed_checked_and_read_only_once_serving() -> None:
    resources = Resources()
    resources[Pool] = Pool()
    assert isinstance(resources[Pool], Pool)
    assert Pool in resources and Counter not in resources
    assert resources.get(Counter) is None
    with pytest.raises(TypeError, match="resource Pool given a Counter"):
        resources[Pool] = Counter()  # type checkers let it pass (T is solved as object)
    with pytest.raises(KeyError, match=r"no resource of type Counter \(have: Pool\)"):
        resources[Counter]
    resources._frozen = True
    with pytest.raises(RuntimeError, match="read-only"):
        resources[Counter] = Counter()


def test_a_hook_must_take_the_resources() -> None:
    app = App()
    with pytest.raises(ConfigError, match="<lambda>' must take"):
        app.on_startup(lambda: None)  # type: ignore[type-var]
    with pytest.raises(ConfigError, match=r"hook '\S*no_resources' must take \(resources\)"):

        @app.on_shutdown  # type: ignore[type-var]
        async def no_resources() -> None: ...


async def test_the_coordinator_runs_the_apps_hooks(redis: Redis, namespace: str) -> None:
    events: list[str] = []
    app = hooked_app(events)
    coordinator = Coordinator(redis, app=app, namespace=namespace)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(coordinator.run)
            assert events == ["start pool", "start counter"]
            coordinator.stop()
    assert events[2:] == ["stop counter 0", "stop pool real"]


async def test_the_harness_runs_the_hooks_once_and_a_test_can_pin_a_resource(
    redis_url: str,
) -> None:
    events: list[str] = []
    app = hooked_app(events)
    fake = Pool("fake")
    with anyio.fail_after(20):
        async with Harness(app, redis_url=redis_url, resources={Pool: fake}) as h:
            assert events == ["start pool", "start counter"]  # the hook ran, its Pool ignored
            assert h.resources[Pool] is fake
            await h.publish("use", 1)
            await h.drain()
            await h.publish("use", 2)
            await h.drain()  # a second worker: the hooks do not run again
            assert events[2:] == ["handled 1 with fake", "handled 2 with fake"]
    assert events[4:] == ["stop counter 3", "stop pool fake"]
    assert fake.closed


async def test_a_failing_startup_hook_fails_the_harness_after_the_shutdown_hooks(
    redis_url: str,
) -> None:
    events: list[str] = []
    app = App()

    @app.on_startup
    def broken(resources: Resources) -> None:
        raise ValueError("bad config")

    @app.on_shutdown
    def close(resources: Resources) -> None:
        events.append("stopped")

    with anyio.fail_after(10), pytest.raises(StartupError, match="ValueError"):
        async with Harness(app, redis_url=redis_url):
            pass
    assert events == ["stopped"]


# -- worker processes ---------------------------------------------------------------------------


@contextlib.contextmanager
def worker_process(
    tmp_path: Path, redis_url: str, namespace: str, app: str, *args: str, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``streamflow [ARGS] worker --app tests.lifecycle_apps:APP``; its stderr in a file."""
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        process = subprocess.Popen(
            [*CLI, *args, "worker", "--app", app, "--block-ms", "200"],
            cwd=ROOT,
            env=clean_env(
                STREAMFLOW_REDIS_URL=redis_url,
                STREAMFLOW_NAMESPACE=namespace,
                SFTEST_HOOKS=str(tmp_path / "hooks.txt"),
                **env,
            ),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["worker", "coordinator"])
def test_a_failing_startup_hook_exits_non_zero_with_one_error_line_and_runs_shutdown_hooks(
    tmp_path: Path, redis_url: str, namespace: str, command: str
) -> None:
    app = "tests.lifecycle_apps:failing"
    done = subprocess.run(
        [*CLI, command, "--app", app],
        cwd=ROOT,
        env=clean_env(
            STREAMFLOW_REDIS_URL=redis_url,
            STREAMFLOW_NAMESPACE=namespace,
            SFTEST_HOOKS=str(tmp_path / "hooks.txt"),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    stderr = done.stderr
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [
        "error: startup hook tests.lifecycle_apps.open_database failed: "
        "ConnectionRefusedError('no database at db:5432')"
    ], stderr
    # No traceback printed by the process; the log record has it, indented under its line.
    assert not [line for line in lines if line.startswith("Traceback")], stderr
    assert "ERROR streamflow.lifecycle: startup hook tests.lifecycle_apps.open_database" in stderr
    assert "    ConnectionRefusedError: no database at db:5432" in stderr
    assert recorded(tmp_path / "hooks.txt") == [
        "start first",
        "stop database None",
        "stop first",
    ]


@pytest.mark.slow
def test_shutdown_hooks_run_after_sigterm_within_the_grace(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    app = "tests.lifecycle_apps:serving"
    effects = tmp_path / "hooks.txt"
    slow_flush = {"SFTEST_STOP_SLEEP": "0.5"}
    with worker_process(tmp_path, redis_url, namespace, app, **slow_flush) as (process, log):
        wait_for(lambda: " serving " in log.read_text(), 60, "the worker serves")
        with streamflow.SyncClient(redis_url, namespace=namespace) as client:
            client.publish("work", 7)
        wait_for(lambda: "handled 7" in recorded(effects), 30, "the job is handled")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    assert recorded(effects) == ["start", "handled 7", "stop pool", "stop flush"]
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stuck", "done"),
    [("SFTEST_STOP_SLEEP", ["start", "stop pool"]), ("SFTEST_PLAIN_STOP_SLEEP", ["start"])],
    ids=["async", "plain"],
)
def test_a_shutdown_hook_past_the_grace_is_given_up_and_the_process_exits(
    tmp_path: Path, redis_url: str, namespace: str, stuck: str, done: list[str]
) -> None:
    app = "tests.lifecycle_apps:serving"
    effects = tmp_path / "hooks.txt"
    env = {stuck: "600", "STREAMFLOW_SHUTDOWN_GRACE": "1"}
    with worker_process(tmp_path, redis_url, namespace, app, **env) as (process, log):
        wait_for(lambda: " serving " in log.read_text(), 60, "the worker serves")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    assert recorded(effects) == done
    assert "shutdown hooks did not finish within 1.0s" in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_ctx_log_lines_carry_role_message_id_and_attempt_in_both_formats(
    tmp_path: Path, redis_url: str, namespace: str, fmt: str
) -> None:
    app = "tests.lifecycle_apps:serving"
    effects = tmp_path / "hooks.txt"
    args = ("--log-format", fmt)
    with worker_process(tmp_path, redis_url, namespace, app, *args) as (process, log):
        wait_for(lambda: "serving" in log.read_text(), 60, "the worker serves")
        with streamflow.SyncClient(redis_url, namespace=namespace) as client:
            message_id = client.publish("work", 5)
        wait_for(lambda: "handled 5" in recorded(effects), 30, "the job is handled")
        wait_for(lambda: "working on 5" in log.read_text(), 10, "the handler's line is written")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    [line] = [line for line in log.read_text().splitlines() if "working on 5" in line]
    if fmt == "json":
        doc = orjson.loads(line)
        assert doc["logger"] == "streamflow.handler"
        assert (doc["message"], doc["role"], doc["attempt"]) == ("working on 5", "work", 1)
        assert doc["message_id"] == message_id
    else:
        assert re.fullmatch(
            rf"\S+ \S+ INFO streamflow\.handler: working on 5 "
            rf"\[role=work message_id={message_id} attempt=1\]",
            line,
        ), line


async def test_ctx_log_lines_of_a_task_node_carry_task_and_node_ids(redis_url: str) -> None:
    app = App()

    @app.role("step")
    async def step(ctx: Context, payload: Any) -> None:
        ctx.log.warning("stepping")

    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    capture = Capture()
    handler_logger = logging.getLogger("streamflow.handler")
    handler_logger.addHandler(capture)
    try:
        with anyio.fail_after(30):
            async with Harness(app, redis_url=redis_url) as h:
                run = await h.run_task(streamflow.Graph("one").node("only", role="step"))
    finally:
        handler_logger.removeHandler(capture)
    assert run.succeeded
    [record] = records
    text = TextFormatter().format(record)
    assert text.endswith(
        f"streamflow.handler: stepping [role=step message_id={record.__dict__['message_id']} "
        f"task_id={run.task_id} node_id=only attempt=1]"
    ), text
    doc = orjson.loads(JsonFormatter().format(record))
    assert (doc["task_id"], doc["node_id"], doc["role"]) == (run.task_id, "only", "step")


# -- the documented example -----------------------------------------------------------------------


def doc_blocks(marker: str) -> str:
    """The Python block after ``<!-- example: MARKER -->`` in docs/concepts.md."""
    found = re.search(rf"<!-- example: {marker} -->\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert found is not None, marker
    return found.group(1)


@pytest.mark.slow
async def test_the_documented_lifecycle_example_runs(redis: Redis, namespace: str) -> None:
    scope: dict[str, Any] = {"__name__": "lifecycle_example"}
    exec(compile(doc_blocks("lifecycle"), "concepts.md:lifecycle", "exec"), scope)
    exec(compile(doc_blocks("lifecycle-test"), "concepts.md:lifecycle-test", "exec"), scope)
    with anyio.fail_after(20):
        await scope["test_reserve_uses_the_fake_inventory"]()  # the page's own test
        # The example's app in a real worker, hooks and all.
        app: App = scope["app"]
        inventories: list[Any] = []
        app.on_startup(lambda resources: inventories.append(resources[scope["Inventory"]]))
        outcomes: list[Outcome] = []
        worker = Worker(app, redis, namespace=namespace, on_outcome=outcomes.append)
        async with running(worker):
            await Client(redis, namespace=namespace).publish("reserve", "sku-9")
            await wait_until(lambda: len(outcomes) == 1)
        await worker.wait_stopped()
    assert [o.status for o in outcomes] == ["acked"]
    [inventory] = inventories
    assert inventory.reserved == ["sku-9"]
    assert inventory.closed
