"""The observability commands of the ``streamflow`` CLI: ``inspect``, ``workers``, ``exporter``.

The views themselves are built by :mod:`streamflow.ops.inspect` and :mod:`streamflow.registry`;
this module only prints them, as text for people or as JSON for scripts.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
import click
import orjson
from anyio.abc import TaskStatus
from redis.asyncio import Redis

from streamflow import config, connect, logs
from streamflow.cli.options import (
    connect_redis,
    connection_options,
    echo_json,
    errors_to_exit,
    logger,
    metrics_host_option,
    serving_metrics,
    wait_ready,
)
from streamflow.errors import ConfigError, RedisUnavailable, StreamflowError
from streamflow.keys import Keys
from streamflow.logs import echo
from streamflow.metrics import Health
from streamflow.ops.exporter import Exporter
from streamflow.ops.inspect import (
    ConsumerInfo,
    GroupInfo,
    RoleDetail,
    RoleInfo,
    inspect_role,
    inspect_roles,
)
from streamflow.protocol import now_ms
from streamflow.registry import (
    CoordinatorInfo,
    ProcessInfo,
    SchedulerInfo,
    WorkerInfo,
    coordinators,
    live_workers,
    schedulers,
)

#: How many of the oldest pending entries ``inspect ROLE`` lists unless told.
DEFAULT_COUNT = 10
#: The refresh interval of a bare ``--watch``, in seconds.
DEFAULT_WATCH = 2.0

T = TypeVar("T")
Render = Callable[[], Awaitable[str]]


@click.command("inspect")
@click.argument("role", required=False)
@click.option(
    "--count",
    type=click.IntRange(0, 10_000),
    help=f"With ROLE: how many of the oldest pending entries to list. [default: {DEFAULT_COUNT}]",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see docs/operations.md).")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    is_flag=False,
    flag_value=DEFAULT_WATCH,
    default=None,
    metavar="[SECONDS]",
    help=f"Redraw every SECONDS (default {DEFAULT_WATCH:g}) until Ctrl-C. Put ROLE first.",
)
@connection_options
@errors_to_exit
def inspect_command(
    role: str | None,
    count: int | None,
    as_json: bool,
    watch: float | None,
    redis_url: str,
    namespace: str,
) -> None:
    """Show every role (or ROLE in detail): stream, groups, consumers, pending, lag, retries."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    if count is not None and role is None:
        raise ConfigError("--count applies to 'streamflow inspect ROLE' only")
    keys = Keys(settings.namespace)

    async def render(redis: Redis) -> str:
        if role is None:
            roles = await inspect_roles(redis, keys)
            return _roles_json(keys, roles, watch) if as_json else _roles_text(keys, roles)
        detail = await inspect_role(
            redis, keys, role, count=DEFAULT_COUNT if count is None else count
        )
        if detail is None:
            raise ConfigError(f"unknown role {role!r} in namespace {keys.namespace!r}")
        return _role_json(keys, detail, watch) if as_json else _role_text(detail)

    title = f"streamflow inspect {role or ''}".rstrip() + f" (namespace {keys.namespace})"
    try:
        anyio.run(_show, settings, render, watch, None if as_json else title)
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was in place
        if watch is None:
            raise
        sys.exit(0)


async def _show(
    settings: config.ConnectionSettings,
    render: Callable[[Redis], Awaitable[str]],
    watch: float | None,
    title: str | None,
) -> None:
    """Print one view, or with ``watch`` redraw it every ``watch`` seconds until a signal."""
    redis = connect_redis(settings, name="streamflow-cli")
    try:
        await connect.ping(redis, settings.url)
        # The first view comes before the watch, so that an unknown role ends the command.
        view = await _once(lambda: render(redis))
        if watch is None:
            echo(view)
            return
        async with anyio.create_task_group() as tg:
            await tg.start(_stop_on_signal, tg.cancel_scope)
            await _watch(lambda: render(redis), view, watch, title)
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()


async def _once(read: Callable[[], Awaitable[T]]) -> T:
    """``await read()``, with Redis failures reported as one line rather than a traceback."""
    with connect.public_errors("reading from Redis"):
        return await read()


async def _watch(render: Render, view: str, every: float, title: str | None) -> None:
    """Clear the screen and draw ``view``, then a new one every ``every`` seconds, forever.

    Off a terminal the views follow one another. With JSON (``title`` None) each view is one
    compact line and problems go to stderr, so that stdout stays JSON Lines. An outage does not
    end the watch: it is reported and the next refresh tries again.
    """
    shown: str | None = view
    while True:
        if shown is not None:
            if title is not None:
                click.clear()
                stamp = datetime.now().isoformat(sep=" ", timespec="seconds")
                echo(f"{title} at {stamp}, every {every:g}s (Ctrl-C to stop)\n")
            echo(shown)
        await anyio.sleep(every)
        try:
            shown = await _once(render)
        except RedisUnavailable as exc:
            shown = _problem(f"Redis unavailable ({exc}); retrying every {every:g}s", title)
        except StreamflowError as exc:
            shown = _problem(f"error: {exc}", title)


def _problem(text: str, title: str | None) -> str | None:
    """What a watch shows after a failed refresh: ``text``, or with JSON nothing (see stderr)."""
    if title is None:
        echo(text, err=True)
        return None
    return text


async def _stop_on_signal(
    scope: anyio.CancelScope, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            scope.cancel()
            return


def _dump(doc: dict[str, Any], watch: float | None) -> str:
    option = orjson.OPT_INDENT_2 if watch is None else 0
    return orjson.dumps(doc, option=option).decode()


def _roles_json(keys: Keys, roles: list[RoleInfo], watch: float | None) -> str:
    doc = {"namespace": keys.namespace, "roles": [r.model_dump(mode="json") for r in roles]}
    return _dump(doc, watch)


def _role_json(keys: Keys, detail: RoleDetail, watch: float | None) -> str:
    return _dump({"namespace": keys.namespace, "role": detail.model_dump(mode="json")}, watch)


def _roles_text(keys: Keys, roles: list[RoleInfo]) -> str:
    if not roles:
        return f"no roles in namespace {keys.namespace}"
    lines: list[str] = []
    for info in roles:
        lines += _role_lines(info)
    return "\n".join(lines)


def _role_text(detail: RoleDetail) -> str:
    lines = _role_lines(detail)
    if not detail.oldest_pending:
        return "\n".join([*lines, "no pending entries"])
    rows = [["ID", "GROUP", "CONSUMER", "IDLE", "DELIVERIES", "AGE"]]
    rows += [
        [
            (f"{e.partition}:{e.id}" if detail.partitions > 1 else e.id)
            + (f" (level {e.level})" if detail.levels else ""),
            e.group,
            e.consumer,
            _duration(e.idle_ms),
            str(e.deliveries),
            _duration(e.age_ms),
        ]
        for e in detail.oldest_pending
    ]
    total = sum(group.pending for group in detail.groups)
    lines.append(f"oldest pending entries ({len(detail.oldest_pending)} of {total}):")
    return "\n".join(lines + ["  " + line for line in _table(rows)])


def _role_lines(info: RoleInfo) -> list[str]:
    split = f" ({info.partitions} partitions)" if info.partitions > 1 else ""
    lines = [
        f"role {logs.shown(info.role)}{split}: {info.length} in stream, {info.delayed} delayed, "
        + _plural(info.dead_letters, "dead letter")
    ]
    if info.levels:
        lines.append(
            "  priority levels (highest first): "
            + "; ".join(
                f"{lv.level}: {lv.length} in stream, {lv.pending} pending, {lv.delayed} delayed"
                for lv in reversed(info.levels)
            )
        )
    if info.paused:
        since = datetime.fromtimestamp((info.paused_at_ms or 0) / 1000).isoformat(
            timespec="seconds"
        )
        lines.append(f"  paused since {since}: no new jobs start (streamflow resume to resume)")
    if info.rate_limit or info.concurrency_limit is not None or info.running_slots:
        cap = "unset" if info.concurrency_limit is None else str(info.concurrency_limit or "off")
        lines.append(
            f"  limits set at run time: rate {info.rate_limit or 'unset'}, concurrency {cap}; "
            f"{info.running_slots} running slots taken"
        )
    if info.key_rate_limit or info.key_concurrency is not None or info.busy_keys:
        cap = "unset" if info.key_concurrency is None else str(info.key_concurrency or "off")
        lines.append(
            f"  per-key limits set at run time: rate {info.key_rate_limit or 'unset'}, "
            f"concurrency {cap}; {info.busy_keys} keys running"
        )
    if info.parked_keys:
        lines.append(f"  {info.parked_keys} limit keys with parked jobs (waiting for their key)")
    if not info.groups:
        lines.append("  no consumer group (no worker has served this role)")
    for group in info.groups:
        lag = "unknown" if group.lag is None else str(group.lag)
        oldest = (
            f", oldest pending {_duration(group.oldest_pending_age_ms)} old"
            if group.oldest_pending_age_ms is not None
            else ""
        )
        if group.oldest_pending_idle_ms is not None:
            oldest += f", longest idle {_duration(group.oldest_pending_idle_ms)}"
        lines.append(f"  group {group.name}: {group.pending} pending, lag {lag}{oldest}")
        lines += ["    " + line for line in _consumer_lines(group)]
    return lines


def _consumer_lines(group: GroupInfo) -> list[str]:
    """The live consumers and those holding entries; the others are only counted.

    Redis keeps every consumer name a group ever saw, so stopped workers pile up there.
    """
    shown = [c for c in group.consumers if c.alive or c.pending]
    rows = [
        [c.name, f"{c.pending} pending", f"idle {_duration(c.idle_ms)}", _state(c)] for c in shown
    ]
    lines = _table(rows)
    hidden = len(group.consumers) - len(shown)
    if hidden:
        lines.append(f"and {_plural(hidden, 'stopped consumer')} holding nothing")
    if not group.consumers:
        lines.append("no consumers")
    return lines


def _state(consumer: ConsumerInfo) -> str:
    return "alive" if consumer.alive else "stopped"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document per line.")
@connection_options
@errors_to_exit
def workers(as_json: bool, redis_url: str, namespace: str) -> None:
    """List the live workers, coordinators and schedulers of the namespace, with their health.

    A killed worker is gone after its lease TTL; a coordinator or scheduler that stopped is
    gone, one that died is listed as gone (last seen ...) for a day.
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    found = anyio.run(_workers, settings)
    now = now_ms()
    if as_json:
        for info in found.workers:
            echo(info.model_dump_json())
        for kind, beating in (("coordinator", found.coordinators), ("scheduler", found.schedulers)):
            for one in beating:
                echo_json({"kind": kind, "live": one.live(now), **one.model_dump()})
        return
    if not found.workers:
        echo(f"no live workers in namespace {settings.namespace}")
    else:
        rows = [_WORKER_COLUMNS.split()] + [_worker_row(info, now) for info in found.workers]
        echo("\n".join(_table(rows)))
    if not found.coordinators:
        echo(f"no coordinator in namespace {settings.namespace}: tasks stay queued")
    else:
        rows = [_COORDINATOR_COLUMNS.split()]
        rows += [_coordinator_row(c, now) for c in found.coordinators]
        echo("\n".join(_table(rows)))
    if not found.schedulers:
        echo(f"no scheduler in namespace {settings.namespace}: schedules do not fire")
    else:
        rows = [_SCHEDULER_COLUMNS.split()]
        rows += [_scheduler_row(one, now) for one in found.schedulers]
        echo("\n".join(_table(rows)))


_WORKER_COLUMNS = "CONSUMER HOST PID ROLES VERSION STARTED IN-FLIGHT PROCESSED UPDATED"
_COORDINATOR_COLUMNS = "COORDINATOR HOST PID FUNCTIONS VERSION STARTED EVENTS HEALTH"
_SCHEDULER_COLUMNS = "SCHEDULER HOST PID VERSION STARTED SCHEDULES SENT LAST-PASS LATE HEALTH"


def _started(info: ProcessInfo) -> str:
    return datetime.fromtimestamp(info.started_at_ms / 1000).isoformat(timespec="seconds")


def _health(info: ProcessInfo, now: int) -> str:
    seen = _duration(max(0, now - info.updated_at_ms)) + " ago"
    return f"live (seen {seen})" if info.live(now) else f"gone (last seen {seen})"


def _coordinator_row(info: CoordinatorInfo, now: int) -> list[str]:
    return [
        info.consumer,
        info.host,
        str(info.pid),
        ",".join(info.functions),
        info.version,
        _started(info),
        str(info.events),
        _health(info, now),
    ]


def _scheduler_row(info: SchedulerInfo, now: int) -> list[str]:
    last = info.last_pass_ms
    schedules = f"{info.schedules} ({info.paused} paused)" if info.paused else str(info.schedules)
    return [
        info.consumer,
        info.host,
        str(info.pid),
        info.version,
        _started(info),
        schedules,
        str(info.sent),
        "none yet" if last is None else _duration(max(0, now - last)) + " ago",
        _duration(info.late_ms),
        _health(info, now),
    ]


def _worker_row(info: WorkerInfo, now: int) -> list[str]:
    started = datetime.fromtimestamp(info.started_at_ms / 1000).isoformat(timespec="seconds")
    return [
        info.consumer,
        info.host,
        str(info.pid),
        ",".join(f"{r}[paused]" if r in info.paused else r for r in info.roles),
        info.version,
        started,
        str(info.in_flight),
        str(info.processed),
        _duration(max(0, now - info.updated_at_ms)) + " ago",
    ]


@dataclass(frozen=True, slots=True)
class _Processes:
    """What ``workers`` lists."""

    workers: list[WorkerInfo]
    coordinators: list[CoordinatorInfo]
    schedulers: list[SchedulerInfo]


async def _workers(settings: config.ConnectionSettings) -> _Processes:
    redis = connect_redis(settings, name="streamflow-cli")
    keys = Keys(settings.namespace)
    try:
        await connect.ping(redis, settings.url)
        found = await _once(lambda: live_workers(redis, keys))
        return _Processes(found, await coordinators(redis, keys), await schedulers(redis, keys))
    finally:
        await redis.aclose()


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _duration(ms: int) -> str:
    """A duration for people: ``850ms``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    seconds = ms // 1000
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86_400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86_400}d{seconds % 86_400 // 3600:02d}h"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as lines of left-aligned columns two spaces apart.

    Cells are read back from Redis (names of roles and consumers, what workers say about
    themselves): each is escaped and bounded, so that none adds a line or a terminal control.
    """
    if not rows:
        return []
    rows = [[logs.shown(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


@click.command()
@click.option(
    "--metrics-port",
    envvar="STREAMFLOW_METRICS_PORT",
    type=click.IntRange(0, 65_535),
    required=True,
    help="Serve the queue gauges on /metrics (and /healthz, /readyz) on this port.",
)
@metrics_host_option
@click.option(
    "--interval",
    type=click.FloatRange(0.1, 3600),
    default=5.0,
    show_default=True,
    help="Seconds between reads of the queue figures.",
)
@connection_options
@errors_to_exit
def exporter(
    metrics_port: int, metrics_host: str, interval: float, redis_url: str, namespace: str
) -> None:
    """Serve the namespace's queue gauges (run one per namespace, beside the workers)."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    anyio.run(_export, settings, metrics_port, interval, metrics_host)


async def _export(
    settings: config.ConnectionSettings, port: int, interval: float, host: str = "127.0.0.1"
) -> None:
    redis = connect_redis(settings, name="streamflow-exporter")
    if not await wait_ready(redis, settings.url, checks=False, strict=False):
        return
    queues = Exporter(redis, namespace=settings.namespace, interval=interval)
    health = Health(redis)
    try:
        with serving_metrics(queues.registry, health, port, host):
            async with anyio.create_task_group() as tg:
                tg.start_soon(health.run)
                tg.start_soon(queues.run)
                health.started = True
                logger.info("exporting queue figures of namespace %s", settings.namespace)
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    async for _ in received:
                        break
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
