"""``streamflow demo``: a streaming DAG task run end to end, on a Redis the demo starts itself.

The demo picks its Redis (:func:`redis_for_demo`): the ``--redis-url`` given, else a private
redis-server on a free loopback port in a temporary directory, else the in-process fake Redis.
:func:`run_demo` then runs a worker for the roles of :mod:`streamflow.dag.demo` and a
coordinator as tasks of its own event loop (no child process), submits the sensor task, shows
live per-node progress, and prints the result and how fast the batches streamed. It stops
everything on its way out, also on Ctrl-C; with ``keep`` it stays up until Ctrl-C instead, and
serves the dashboard too when the ``dashboard`` extra is installed (:func:`_start_dashboard`).

On the fake Redis, whose blocking reads return at once, each role gets its own worker and the
workers and the coordinator take turns in burst mode (as :mod:`streamflow.testing` does).
"""

from __future__ import annotations

import logging
import shlex
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup
from redis.asyncio import Redis

from streamflow import connect, extras
from streamflow.cli.progress import follow
from streamflow.client import Client
from streamflow.dag import demo as demo_app
from streamflow.dag.coordinator import Coordinator
from streamflow.dag.tasks import TaskState
from streamflow.errors import MissingExtraError
from streamflow.metrics import Health, MetricsServer
from streamflow.ops.server import RedisServer
from streamflow.worker import Worker

Echo = Callable[[str], None]
#: Stops what :func:`_start` started.
Stop = Callable[[], Awaitable[None]]

#: Namespaces are this plus a random suffix, so a shared Redis never mixes two demo runs.
NAMESPACE_PREFIX = "sf-demo-"
#: How long an idle read blocks: it bounds how long the worker takes to stop.
BLOCK_MS = 250
#: Seconds between turns of the workers and the coordinator on the fake Redis.
FAKE_TICK = 0.02
#: Seconds between progress polls on a terminal, and between progress lines otherwise.
REDRAW = 0.1
PRINT_EVERY = 0.5
#: Seconds a Ctrl-C on a shared Redis gives the task's cancel and the worker's stop.
STOP_TIMEOUT = 5.0
#: Seconds the task may take per source batch (plus a minute) before the demo gives up.
TIME_PER_BATCH = 1.0
#: The signals that stop the demo.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
#: What needs the ``testing`` extra (fakeredis), in the error when it is missing.
FAKE_FEATURE = "the demo without redis-server on PATH"
INSTALL_HINT = "For a real one: apt-get install redis-server (Debian/Ubuntu), brew install redis."


def main(redis_url: str | None, *, batches: int, keep: bool, echo: Echo, live: bool) -> int:
    """``streamflow demo``: pick a Redis, run :func:`run_demo` on it; returns the exit code.

    SIGINT and SIGTERM raise KeyboardInterrupt while redis-server starts, and are blocked from
    then until :func:`run_demo` listens for them: asyncio's own Ctrl-C handler would cancel
    the main task in a way the demo's task group may swallow. Each is also recorded, because
    Python drops an exception raised in its fork hooks (a Ctrl-C while redis-server is spawned
    would be lost). Once the demo is over they are ignored: stopping redis-server and removing
    its directory must not be cut short.
    """
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS}
    demo = partial(
        run_demo, batches=batches, keep=keep, echo=echo, live=live, shared=redis_url is not None
    )
    try:
        with redis_for_demo(redis_url, echo) as url:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                return 128 + received[0] if received else anyio.run(demo, url)
            finally:
                for signum in STOP_SIGNALS:
                    signal.signal(signum, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    except KeyboardInterrupt:
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def redis_for_demo(url: str | None, echo: Echo) -> Iterator[str | None]:
    """Yield a Redis URL: the given one, a private redis-server's, or None for the fake one.

    A private server is stopped, and its temporary directory removed, when the block ends.

    Raises:
        MissingExtraError: No redis-server on PATH, and the ``testing`` extra (the fake Redis)
            is not installed.
    """
    if url is not None:
        echo(f"using the Redis at {connect.redact_url(url)}")
        yield url
        return
    if not RedisServer.available():
        extras.require("testing", FAKE_FEATURE)  # before saying that the fake one is used
        echo("redis-server is not on PATH: running everything in this one process on the")
        echo(f"in-process fake Redis (fakeredis) instead. {INSTALL_HINT}")
        yield None
        return
    with RedisServer() as server:
        pid, directory = server.pid, server.directory
        echo(
            f"started a private redis-server on port {server.port} (pid {pid}, data in {directory})"
        )
        try:
            yield server.url
        finally:
            echo(f"stopping redis-server (pid {pid}) and removing {directory}")


@dataclass
class _Run:
    """What the demo has done so far (read by the Ctrl-C path and the summary)."""

    redis: Redis
    url: str | None
    shared: bool
    namespace: str
    echo: Echo
    task_id: str | None = None
    task: TaskState | None = None
    signum: int | None = None
    stop: Stop | None = None
    metrics: dict[str, int] = field(default_factory=dict)
    dashboard: str | None = None


async def run_demo(
    url: str | None,
    *,
    batches: int,
    keep: bool,
    echo: Echo,
    live: bool = False,
    shared: bool = False,
) -> int:
    """Run the demo task on ``url`` (None: the fake Redis); returns the exit code.

    0 when the task succeeded, 1 when it did not, 128 + the signal number after Ctrl-C or
    SIGTERM. ``live`` redraws the progress table in place (for a terminal). ``shared`` says
    the Redis outlives the demo: an interrupted task is cancelled there, and a finished one
    is left to look at.
    """
    if url is None:
        fakeredis = extras.require("testing", FAKE_FEATURE)
        redis: Redis = fakeredis.FakeAsyncRedis()
    else:
        redis = connect.connect(url, name="streamflow-demo")
    run = _Run(redis, url, shared, NAMESPACE_PREFIX + uuid.uuid4().hex[:8], echo)
    # Held until the end, so that a second Ctrl-C cannot break off the clean-up.
    with anyio.open_signal_receiver(*STOP_SIGNALS) as received, _unblocked(STOP_SIGNALS):
        try:
            if url is not None:
                await connect.ping(redis, url)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, received, run, tg.cancel_scope)
                await _serve_demo(tg, run, batches, keep=keep, live=live)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await redis.aclose()
    if run.signum is not None:
        return 128 + run.signum
    return 0 if run.task is not None and run.task.state == "succeeded" else 1


@contextmanager
def _unblocked(signals: set[signal.Signals]) -> Iterator[None]:
    """Let ``signals`` in (see :func:`main`), as they were before when the block ends."""
    before = signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


async def _serve_demo(tg: TaskGroup, run: _Run, batches: int, *, keep: bool, live: bool) -> None:
    """Start the services, run the task, then stop them (or, with ``keep``, wait for Ctrl-C)."""
    with ExitStack() as metrics:
        run.stop = await _start(tg, run, metrics if keep else None)
        await _run_task(run, batches, keep=keep, live=live)
        if keep:
            stop_dashboard = await _start_dashboard(run)
            if stop_dashboard is not None:
                metrics.callback(stop_dashboard)
            _print_next_steps(run)
            await anyio.sleep_forever()
        await run.stop()


async def _watch_signals(received: AsyncIterator[int], run: _Run, scope: anyio.CancelScope) -> None:
    """On the first SIGINT or SIGTERM, stop: at once, or tidily on a Redis that stays up."""
    async for signum in received:
        run.signum = signum
        run.echo(f"{signal.Signals(signum).name}: stopping the demo")
        if run.shared:
            with anyio.move_on_after(STOP_TIMEOUT):
                await _cancel_unfinished(run)
                if run.stop is not None:
                    await run.stop()
        scope.cancel()
        return


async def _start(tg: TaskGroup, run: _Run, metrics: ExitStack | None) -> Stop:
    """Start the workers and the coordinator; returns an async function that stops them."""
    app = demo_app.app
    if run.url is None:
        return await _start_fake(tg, run)
    worker = Worker(
        app,
        run.redis,
        namespace=run.namespace,
        concurrency=16,
        block_ms=BLOCK_MS,
        shutdown_grace=STOP_TIMEOUT / 2,
    )
    coordinator = Coordinator(run.redis, app=app, namespace=run.namespace, block_ms=BLOCK_MS)
    if metrics is not None:
        health = Health(run.redis)
        health.started = True
        tg.start_soon(health.run)
        for name, registry in (
            ("worker", worker.enable_metrics()),
            ("coordinator", coordinator.enable_metrics()),
        ):
            server = MetricsServer(registry, health, port=0, host="127.0.0.1")
            run.metrics[name] = metrics.enter_context(server).port
    await tg.start(worker.run)
    await tg.start(coordinator.run)
    run.echo(
        f"in this process, as tasks (no child process): a worker for {', '.join(app.roles)} "
        f"and a coordinator, in namespace {run.namespace}"
    )

    async def stop() -> None:
        worker.stop()
        coordinator.stop()
        with anyio.move_on_after(10):
            await worker.wait_stopped()

    return stop


async def _start_fake(tg: TaskGroup, run: _Run) -> Stop:
    """On the fake Redis: a worker per role and a coordinator, each draining in turns."""
    app = demo_app.app
    steps: list[Callable[[], Awaitable[Any]]] = [
        Worker(app, run.redis, roles=[role], namespace=run.namespace, concurrency=8).drain
        for role in app.roles
    ]
    steps.append(Coordinator(run.redis, app=app, namespace=run.namespace).drain)
    for step in steps:
        tg.start_soon(_repeat, step)
    run.echo(
        f"in this process: a worker for each of {', '.join(app.roles)} and a coordinator, "
        f"taking turns on the fake Redis, in namespace {run.namespace}"
    )

    async def stop() -> None:
        pass  # the task group's cancel ends the turns; the fake Redis keeps nothing

    return stop


async def _repeat(step: Callable[[], Awaitable[Any]]) -> None:
    while True:
        await step()
        await anyio.sleep(FAKE_TICK)


async def _run_task(run: _Run, batches: int, *, keep: bool, live: bool) -> None:
    """Submit the demo task, show its progress until it ends, then its result and figures."""
    client = Client(run.redis, namespace=run.namespace)
    app = demo_app.app
    run.task_id = await client.submit(
        demo_app.graph(batches), roles=app.roles, functions=app.functions
    )
    run.echo(
        f"submitted task {run.task_id}: {batches} batches of {demo_app.BATCH_SIZE} readings "
        "-> clean -> enrich (each per batch) -> totals (metrics.aggregate) -> report"
    )
    with anyio.fail_after(60 + batches * TIME_PER_BATCH), _quiet_info_logs():
        run.task = await follow(
            client, run.task_id, echo=run.echo, live=live, every=PRINT_EVERY, poll=REDRAW
        )
    task = run.task
    run.echo(f"task {task.id} {task.state}" + (f": {task.error}" if task.error else ""))
    if task.state == "succeeded":
        result = await client.result(task.id)
        run.echo("result: " + orjson.dumps(result).decode())
    for line in figures(task, fake=run.url is None):
        run.echo(line)
    if run.shared and not keep:
        run.echo(
            f"the task stays in namespace {run.namespace}: streamflow status {task.id} "
            f"--redis-url {shlex.quote(connect.redact_url(run.url or ''))} "
            f"--namespace {run.namespace}"
        )


@contextmanager
def _quiet_info_logs() -> Iterator[None]:
    """Hold back streamflow's INFO lines while progress is drawn: they would break the table.

    Only at the default level: ``--log-level DEBUG`` (or WARNING) is left as it is.
    """
    log = logging.getLogger("streamflow")
    if logging.getLogger().level != logging.INFO or log.level != logging.NOTSET:
        yield
        return
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(logging.NOTSET)


def figures(task: TaskState, *, fake: bool = False) -> list[str]:
    """How the task streamed: batches, first downstream start, end to end, throughput."""
    source = task.nodes[demo_app.SOURCE]
    lines = [
        f"batches: {source.batches_out} from the source ({source.items_out:,} readings), "
        f"{task.nodes['enrich'].batches_out} enriched downstream"
    ]
    started, ended = source.started_at_ms, source.finished_at_ms
    first_child = task.nodes["clean"].started_at_ms
    if started is not None and first_child is not None:
        lines.append(f"first downstream start: {first_child - started} ms after the source started")
    if started is not None and ended is not None and task.finished_at_ms is not None:
        lines.append(
            f"the source emitted for {(ended - started) / 1000:.2f} s (it paces itself); "
            f"the last node finished {task.finished_at_ms - ended} ms after it"
        )
    if task.finished_at_ms is not None:
        seconds = max(task.finished_at_ms - task.created_at_ms, 1) / 1000
        lines.append(f"end to end: {seconds:.2f} s from submit to the last node")
        lines.append(f"throughput: {source.items_out / seconds:,.0f} readings/s")
    if fake:
        lines.append("(on the fake Redis, in turns: timings are only indicative)")
    return lines


async def _cancel_unfinished(run: _Run) -> None:
    """Cancel the demo task if it is still running, and give the coordinator time to see it."""
    if run.task_id is None or (run.task is not None and run.task.terminal):
        return
    client = Client(run.redis, namespace=run.namespace)
    await client.cancel(run.task_id, target="task", reason="demo interrupted")
    with anyio.move_on_after(STOP_TIMEOUT / 2):
        run.task = await client.wait(run.task_id)
    run.echo(f"cancel sent for task {run.task_id}" + (f": {run.task.state}" if run.task else ""))


async def _start_dashboard(run: _Run) -> Callable[[], None] | None:
    """The dashboard on a free loopback port, when its extra is installed; returns its stop.

    It runs in a thread with an event loop and a Redis connection of its own: uvicorn takes
    over SIGINT and SIGTERM in the main thread, which are the demo's, and not in another one.
    """
    try:
        extras.require("dashboard", "the demo's dashboard")
    except MissingExtraError:
        return None
    import uvicorn

    from streamflow.dashboard.server import create_app
    from streamflow.dashboard.settings import DashboardSettings

    assert run.url is not None
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    settings = DashboardSettings(port=listening.getsockname()[1])
    redis = connect.connect(run.url, name="streamflow-demo-dashboard")
    app = create_app(Client(redis, namespace=run.namespace), settings)
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=1, server_header=False
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        try:
            await server.serve(sockets=[listening])
        finally:
            await redis.aclose()

    thread = threading.Thread(target=anyio.run, args=(serve,), name="dashboard", daemon=True)
    thread.start()
    for _ in range(200):  # uvicorn says when it has started by a flag, not an event
        if server.started or not thread.is_alive():
            break
        await anyio.sleep(0.05)
    run.dashboard = settings.url() if server.started else None

    def stop() -> None:
        server.should_exit = True
        thread.join(5)
        listening.close()

    return stop


def _print_next_steps(run: _Run) -> None:
    """With ``keep``: the URL, the namespace and the commands to try next."""
    assert run.url is not None and run.task_id is not None
    echo = run.echo
    echo("")
    running = "the worker and the coordinator" + ("" if run.shared else " and redis-server")
    if run.dashboard is not None:
        running += " and the dashboard"
    echo(f"still running until Ctrl-C: {running}. Try, in another shell:")
    activate = _activate_hint()
    if activate:
        echo(f"  {activate}")
    echo(
        f"  export STREAMFLOW_REDIS_URL={shlex.quote(connect.redact_url(run.url))} "
        f"STREAMFLOW_NAMESPACE={run.namespace}"
    )
    for why, command in _next_steps(run.task_id, run.metrics):
        if why:
            echo(f"  # {why}")
        echo(f"  {command}")
    if run.dashboard is not None:
        echo(f"dashboard: {run.dashboard}")


def _next_steps(task_id: str, metrics: dict[str, int]) -> list[tuple[str, str]]:
    """(why, command) pairs for :func:`_print_next_steps`; an empty why goes with the last."""
    cli, python = _commands()
    graph = f"{python} -m streamflow.dag.demo | {cli} submit -"
    alert = '{"sensor": "s1", "celsius": 41.5}'
    steps = [
        ("the task just run, node by node, and its result", f"{cli} status {task_id}"),
        ("", f"{cli} result {task_id}"),
        ("run it again, with 50 batches", f"{graph} --wait --params '{{\"batches\": 50}}'"),
        (
            "a long one; then cancel it by the id it printed",
            f"{graph} --params '{{\"batches\": 2000}}'",
        ),
        ("", f"{cli} cancel TASK_ID --task --wait"),
        ("a plain job: the demo's worker logs it", f"{cli} publish demo.alert --json '{alert}'"),
        ("streams, consumer groups, pending, dead letters; tasks; workers", f"{cli} inspect"),
        ("", f"{cli} tasks; {cli} workers"),
        ("one more worker, in its own process", f"{cli} worker --app streamflow.dag.demo:app"),
    ]
    for name, port in metrics.items():
        steps.append((f"the {name}'s metrics", f"curl -s http://127.0.0.1:{port}/metrics"))
    return steps


def _commands() -> tuple[str, str]:
    """How to call the CLI and this Python from a shell (plain names when PATH finds them)."""
    here = Path(sys.executable).parent
    if _activate_hint() or shutil.which("streamflow") == str(here / "streamflow"):
        return "streamflow", "python"
    python = shlex.quote(sys.executable)
    return f"{python} -m streamflow", python


def _activate_hint() -> str | None:
    """``. VENV/bin/activate`` when this runs in a virtualenv whose bin is not on PATH."""
    activate = Path(sys.executable).parent / "activate"
    if sys.prefix == sys.base_prefix or not activate.exists():
        return None
    if shutil.which("streamflow") == str(activate.parent / "streamflow"):
        return None
    return f". {shlex.quote(str(activate))}"
