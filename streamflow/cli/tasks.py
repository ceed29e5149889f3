"""The task commands of the ``streamflow`` CLI: coordinator, submit, status, tasks, result."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import anyio
import click
import orjson

from streamflow import config, connect
from streamflow.cli.commands import (
    _client,
    _connect,
    _connection_options,
    _errors_to_exit,
    _ready,
    _serving_metrics,
    _tls_options,
    logger,
    main,
    metrics_host_option,
)
from streamflow.client import Client
from streamflow.dag.coordinator import Coordinator
from streamflow.dag.graph import GraphError, load
from streamflow.dag.tasks import TaskState
from streamflow.errors import ConfigError
from streamflow.logs import echo, printable
from streamflow.metrics import Health


@main.command()
@click.option("--app", "app_path", envvar="STREAMFLOW_APP", help="App with coordinator functions.")
@click.option(
    "--role-limit",
    "role_limits",
    multiple=True,
    metavar="ROLE=N",
    help="At most N nodes of ROLE run at once across all tasks; repeat for several roles.",
)
@click.option("--consumer-name", help="Stable consumer name (default: coord-host-pid-random).")
@click.option("--lease-ttl", type=float, default=30.0, show_default=True, help="Seconds.")
@click.option("--sweep-interval", type=float, default=1.0, show_default=True, help="Seconds.")
@click.option(
    "--retention",
    type=float,
    default=7 * 24 * 3600.0,
    show_default=True,
    help="Seconds a finished task's state and results are kept.",
)
@click.option("--block-ms", type=int, default=1000, show_default=True)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65_535),
    help="Serve /metrics, /healthz and /readyz on this port.",
)
@metrics_host_option
@click.option(
    "--strict",
    envvar="STREAMFLOW_STRICT",
    is_flag=True,
    help="Refuse to start when the start-up checks of Redis warn (see `worker --strict`).",
)
@_connection_options
@_errors_to_exit
def coordinator(
    app_path: str | None,
    role_limits: tuple[str, ...],
    consumer_name: str | None,
    lease_ttl: float,
    sweep_interval: float,
    retention: float,
    block_ms: int,
    metrics_port: int | None,
    metrics_host: str,
    strict: bool,
    redis_url: str,
    namespace: str,
) -> None:
    """Drive DAG tasks: turn workers' events into task state and fan out work."""
    settings = config.build(
        config.ConnectionSettings, redis_url=redis_url, namespace=namespace, **_tls_options()
    )
    app = config.load_app(app_path) if app_path else None
    limits: dict[str, int] = {}
    for item in role_limits:
        role, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--role-limit {item!r}: use ROLE=N with N at least 1")
        limits[role] = int(count)
    options = {
        "app": app,
        "namespace": settings.namespace,
        "consumer": consumer_name,
        "role_limits": limits,
        "lease_ttl": lease_ttl,
        "block_ms": block_ms,
        "sweep_interval": sweep_interval,
        "retention": retention,
    }
    try:
        anyio.run(_coordinate, settings, options, (metrics_port, metrics_host), strict)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def _coordinate(
    settings: config.ConnectionSettings,
    options: dict[str, Any],
    metrics_at: tuple[int | None, str],
    strict: bool = False,
) -> None:
    redis = _connect(
        settings,
        socket_timeout=options["block_ms"] / 1000 + 10,
        name="streamflow-coordinator",
        # On a cluster it holds a blocking reader per events stream (a role partition's), and
        # redis-py's cluster pool fails at its limit instead of waiting: room for many.
        max_connections=512 if connect.is_cluster_url(settings.url) else 64,
    )
    if not await _ready(redis, settings.url, checks=True, strict=strict):
        return
    coord = Coordinator(redis, **options)
    health = Health(redis)
    metrics_port, metrics_host = metrics_at
    metrics = coord.enable_metrics if metrics_port is not None else None
    try:
        with _serving_metrics(metrics, health, metrics_port, metrics_host):
            async with anyio.create_task_group() as tg:
                tg.start_soon(health.run)
                await tg.start(coord.run)
                health.started = True
                logger.info(
                    "coordinator %s on %s (namespace %s)",
                    coord.consumer,
                    settings.safe_url,
                    settings.namespace,
                )
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    async for _ in received:
                        coord.stop()
                        break
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
    logger.info("coordinator %s stopped", coord.consumer)


@main.command()
@click.argument("graph_file", type=click.File("rb"))
@click.option("--params", "params_json", help="Task parameters as a JSON object.")
@click.option("--id", "task_id", help="The task id (default: a random one).")
@click.option("--wait", is_flag=True, help="Show progress until the task ends; exit 1 unless ok.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@_connection_options
@_errors_to_exit
def submit(
    graph_file: Any,
    params_json: str | None,
    task_id: str | None,
    wait: bool,
    timeout: float | None,
    redis_url: str,
    namespace: str,
) -> None:
    """Submit the task graph in GRAPH_FILE (JSON, or YAML by extension; - for stdin)."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    try:
        spec = load(graph_file.read(), filename=getattr(graph_file, "name", "") or "")
    except GraphError as exc:
        _refused(exc)
    params = None
    if params_json is not None:
        try:
            params = orjson.loads(params_json)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"--params is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise ConfigError("--params must be a JSON object")
    try:
        final = anyio.run(_submit, settings, spec, params, task_id, wait, timeout)
    except GraphError as exc:
        _refused(exc)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if final is not None:
        echo(printable(f"task {final.id} {outcome_text(final)}"))
        sys.exit(0 if final.state == "succeeded" else 1)


def _refused(exc: GraphError) -> NoReturn:
    """Print why a graph is refused (one problem: one line) and exit with status 2."""
    if len(exc.problems) == 1:
        echo(f"error: invalid task graph: {exc.problems[0]}", err=True)
    else:
        echo(f"error: {exc}", err=True)
    sys.exit(2)


async def _submit(
    settings: config.ConnectionSettings,
    spec: Any,
    params: dict[str, Any] | None,
    task_id: str | None,
    wait: bool,
    timeout: float | None,  # noqa: ASYNC109 - the --timeout option
) -> TaskState | None:
    async with _client(settings) as client:
        task_id = await client.submit(spec, params=params, task_id=task_id)
        echo(task_id)
        if not wait:
            return None
        try:
            with anyio.fail_after(timeout):
                return await follow(client, task_id)
        except TimeoutError:
            why = await _unfinished(client, task_id)
            echo(f"error: task {task_id} {why} after {timeout:g}s", err=True)
            sys.exit(1)


async def _unfinished(client: Client, task_id: str) -> str:
    """Why a task followed with --wait has not finished: ``queued: no coordinator ...``."""
    from streamflow import registry

    task = await client.task(task_id)
    if task is not None and task.state == "queued":
        if not await registry.live_coordinator(client.redis, client.keys):
            return "queued: no coordinator is running (start streamflow coordinator)"
        return "still queued"
    return "still running"


async def follow(
    client: Client,
    task_id: str,
    *,
    echo: Callable[[str], None] = click.echo,
    live: bool | None = None,
    every: float = 0.0,
    poll: float = 0.2,
) -> TaskState:
    """Show per-node progress until the task ends; returns its final state.

    Args:
        client: The client.
        task_id: The task.
        echo: Where lines go.
        live: Redraw the table in place (default: when stdout is a terminal); otherwise print
            each node's line when it changed, at most every ``every`` seconds.
        every: The least time between two printed updates, when not live.
        poll: Seconds between reads of the task state (it lives in Redis: it is polled).

    Raises:
        ConfigError: The task disappeared (it expired).
    """
    live = sys.stdout.isatty() if live is None else live
    drawn = 0
    shown: dict[str, str] = {}
    last_print = float("-inf")
    while True:
        task = await client.task(task_id)
        if task is None:
            raise ConfigError(f"task {task_id} disappeared (expired?)")
        lines = progress_lines(task)
        if live:
            echo((f"\x1b[{drawn}F\x1b[J" if drawn else "") + "\n".join(lines))
            drawn = len(lines)
        elif task.terminal or anyio.current_time() - last_print >= every:
            last_print = anyio.current_time()
            for line in lines if not shown else lines[1:]:
                key = line.split()[0]
                if shown.get(key) != line:
                    shown[key] = line
                    echo(line)
        if task.terminal:
            return task
        await anyio.sleep(poll)


#: The order node states are counted in by :func:`task_summary`.
_NODE_STATES = ("succeeded", "running", "queued", "failed", "cancelled", "skipped")


def task_summary(task: TaskState) -> str:
    """The task's state and its nodes' by state: ``cancelled (4 nodes: 2 succeeded, 2 cancelled)``.

    Not ``done/total``: a cancelled task's cancelled nodes are finished, not done.
    """
    counts = {state: 0 for state in _NODE_STATES}
    for node in task.nodes.values():
        counts[node.state] = counts.get(node.state, 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    count = len(task.nodes)
    return f"{task.state} ({count} node{'' if count == 1 else 's'}: {parts})"


def why_line(task: TaskState) -> str | None:
    """Why the task ended as it did: ``reason:`` of a cancel, ``error:`` of a failure."""
    if task.state == "cancelled":
        return f"reason: {_cancel_reason(task)}"
    if task.error:
        return f"error: {task.error}"
    return None


def outcome_text(task: TaskState) -> str:
    """The final state with its cause: ``failed: <error>``, ``cancelled (reason: ...)``."""
    if task.state == "cancelled":
        return f"cancelled (reason: {_cancel_reason(task)})"
    return f"{task.state}: {task.error}" if task.error else task.state


def _cancel_reason(task: TaskState) -> str:
    # "cancelled" is the default reason of a cancel: it says nothing more than the state.
    return "none given" if task.error in (None, "", "cancelled") else str(task.error)


def progress_lines(task: TaskState) -> list[str]:
    """A header and one line per node: state, runs done/dispatched, batches in/out, items."""
    width = max(len(n) for n in task.nodes)
    head = f"{'node':<{width}}  {'state':<9} {'runs':>11} {'in':>7} {'out':>7} {'items':>9}"
    lines = [head]
    for node_id, node in task.nodes.items():
        runs = f"{node.completed}/{node.dispatched}"
        lines.append(
            f"{node_id:<{width}}  {node.state:<9} {runs:>11} {node.batches_in:>7} "
            f"{node.batches_out:>7} {node.items_out:>9}"
            + (f"  ({node.waiting})" if node.waiting else "")
        )
    # Read back from Redis: no value may add a line or a terminal control of its own.
    return [printable(line) for line in lines]


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="The full state as JSON.")
@_connection_options
@_errors_to_exit
def status(task_id: str, as_json: bool, redis_url: str, namespace: str) -> None:
    """Show a task's state and every node's."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    task = anyio.run(_status, settings, task_id)
    if task is None:
        raise ConfigError(f"unknown task {task_id!r} (or it expired)")
    if as_json:
        echo(task.model_dump_json(indent=2))
        return
    echo(printable(f"task {task.id} ({task.name}): {task_summary(task)}"))
    why = why_line(task)
    if why:
        echo(printable(why))
    echo("\n".join(progress_lines(task)))


async def _status(settings: config.ConnectionSettings, task_id: str) -> TaskState | None:
    async with _client(settings) as client:
        return await client.task(task_id)


@main.command()
@click.option(
    "--state",
    type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
    help="Only tasks in this state.",
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document per line.")
@_connection_options
@_errors_to_exit
def tasks(state: Any, limit: int, as_json: bool, redis_url: str, namespace: str) -> None:
    """List tasks, newest first."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    found = anyio.run(_tasks, settings, state, limit)
    if not found and not as_json:
        echo("no tasks" + (f" in state {state}" if state else ""))
    for task in found:
        if as_json:
            echo(task.model_dump_json())
        else:
            echo(printable(f"{task.id}  {task_summary(task)}  {task.name}"))


async def _tasks(settings: config.ConnectionSettings, state: Any, limit: int) -> list[TaskState]:
    async with _client(settings) as client:
        return await client.tasks(state=state, limit=limit)


@main.command()
@click.argument("task_id")
@click.option("--node", help="This node's output (default: every node without children).")
@_connection_options
@_errors_to_exit
def result(task_id: str, node: str | None, redis_url: str, namespace: str) -> None:
    """Print a task's results as JSON: {node: [items...]}."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    try:
        out = anyio.run(_result, settings, task_id, node)
    except LookupError as exc:
        raise ConfigError(str(exc)) from None
    echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


async def _result(
    settings: config.ConnectionSettings, task_id: str, node: str | None
) -> dict[str, list[Any]]:
    async with _client(settings) as client:
        return await client.result(task_id, node)
