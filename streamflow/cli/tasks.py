"""The task commands of the ``streamflow`` CLI: coordinator, submit, status, tasks, result."""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

import anyio
import click
import orjson

from streamflow import config, connect
from streamflow.cli.options import (
    connect_redis,
    connection_options,
    echo_json,
    errors_to_exit,
    logger,
    metrics_host_option,
    open_client,
    serving_metrics,
    tls_options,
    wait_ready,
)
from streamflow.cli.progress import (
    follow,
    node_progress,
    outcome_text,
    progress_lines,
    task_summary,
    why_line,
)
from streamflow.client import Client
from streamflow.dag.coordinator import Coordinator
from streamflow.dag.graph import GraphError, load
from streamflow.dag.tasks import TaskState
from streamflow.errors import ConfigError
from streamflow.logs import echo, printable
from streamflow.metrics import Health
from streamflow.records import LifecycleEvent


@click.command()
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
@connection_options
@errors_to_exit
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
        config.ConnectionSettings, redis_url=redis_url, namespace=namespace, **tls_options()
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
    redis = connect_redis(
        settings,
        socket_timeout=options["block_ms"] / 1000 + 10,
        name="streamflow-coordinator",
        # On a cluster it holds a blocking reader per events stream (a role partition's), and
        # redis-py's cluster pool fails at its limit instead of waiting: room for many.
        max_connections=512 if connect.is_cluster_url(settings.url) else 64,
    )
    if not await wait_ready(redis, settings.url, checks=True, strict=strict):
        return
    coord = Coordinator(redis, **options)
    health = Health(redis)
    metrics_port, metrics_host = metrics_at
    metrics = coord.enable_metrics if metrics_port is not None else None
    try:
        with serving_metrics(metrics, health, metrics_port, metrics_host):
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


@click.command()
@click.argument("graph_file", type=click.File("rb"))
@click.option("--params", "params_json", help="Task parameters as a JSON object.")
@click.option("--id", "task_id", help="The task id (default: a random one).")
@click.option("--wait", is_flag=True, help="Show progress until the task ends; exit 1 unless ok.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@connection_options
@errors_to_exit
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
    async with open_client(settings) as client:
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


@click.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="The full state as JSON.")
@connection_options
@errors_to_exit
def status(task_id: str, as_json: bool, redis_url: str, namespace: str) -> None:
    """Show a task's state and every node's."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    task, progress = anyio.run(_status, settings, task_id)
    if task is None:
        raise ConfigError(f"unknown task {task_id!r} (or it expired)")
    if as_json:
        echo(task.model_dump_json(indent=2))
        return
    echo(printable(f"task {task.id} ({task.name}): {task_summary(task)}"))
    why = why_line(task)
    if why:
        echo(printable(why))
    echo("\n".join(progress_lines(task, progress)))


async def _status(
    settings: config.ConnectionSettings, task_id: str
) -> tuple[TaskState | None, dict[str, LifecycleEvent]]:
    """The task's state, and its running nodes' latest progress."""
    async with open_client(settings) as client:
        task = await client.task(task_id)
        return task, (await node_progress(client, task) if task is not None else {})


@click.command()
@click.option(
    "--state",
    type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]),
    help="Only tasks in this state.",
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document per line.")
@connection_options
@errors_to_exit
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
    async with open_client(settings) as client:
        return await client.tasks(state=state, limit=limit)


@click.command()
@click.argument("task_id")
@click.option("--node", help="This node's output (default: every node without children).")
@connection_options
@errors_to_exit
def result(task_id: str, node: str | None, redis_url: str, namespace: str) -> None:
    """Print a task's results as JSON: {node: [items...]}."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    try:
        out = anyio.run(_result, settings, task_id, node)
    except LookupError as exc:
        raise ConfigError(str(exc)) from None
    echo_json(out, indent=True)


async def _result(
    settings: config.ConnectionSettings, task_id: str, node: str | None
) -> dict[str, list[Any]]:
    async with open_client(settings) as client:
        return await client.task_result(task_id, node)
