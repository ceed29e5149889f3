"""``streamflow schedule ...`` (manage schedules) and ``streamflow scheduler`` (fire them).

See :mod:`streamflow.scheduler` and docs/schedules.md.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO, TypeVar

import anyio
import click
import orjson

from streamflow import config
from streamflow import scheduler as runner
from streamflow.cli.options import (
    connect_redis,
    connection_options,
    echo_json,
    errors_to_exit,
    open_client,
    wait_ready,
)
from streamflow.client import Client
from streamflow.consumers import default_consumer_name
from streamflow.errors import ConfigError
from streamflow.keys import validate_name
from streamflow.logs import echo, printable
from streamflow.protocol import now_ms
from streamflow.schedules import Schedule, iso

logger = logging.getLogger("streamflow")

T = TypeVar("T")


def _run(redis_url: str, namespace: str, action: Callable[[Client], Awaitable[T]]) -> T:
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)

    async def main() -> T:
        async with open_client(settings) as client:
            return await action(client)

    return anyio.run(main)


@click.group()
def schedule() -> None:
    """Schedules: list, add, remove, pause, resume, run-now."""


def _row(client_now: int, stored: runner.Stored, sid: str) -> dict[str, Any]:
    if sid in stored.invalid:
        return {"id": sid, "valid": False, "error": stored.invalid[sid]}
    found = stored.schedules[sid]
    last, ran = stored.last.get(sid), stored.runs.get(sid)
    paused = sid in stored.paused
    upcoming = None if paused else runner.next_run(found, last, client_now)
    return {
        "id": sid,
        "valid": True,
        "role": found.target,
        "rule": found.describe(),
        "paused": paused,
        "next_run": None if upcoming is None else iso(upcoming),
        "last_tick": None if last is None else iso(last),
        "last_run": None if ran is None else iso(ran),
        "definition": found.model_dump(mode="json"),
    }


def _line(row: dict[str, Any]) -> str:
    if not row["valid"]:
        return f"{row['id']}  INVALID: {row['error']}"
    state = "paused" if row["paused"] else f"next {row['next_run']}"
    return f"{row['id']}  -> {row['role']}  {row['rule']}  {state}  last run {row['last_run']}"


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of objects.")
@connection_options
@errors_to_exit
def list_(as_json: bool, redis_url: str, namespace: str) -> None:
    """List the schedules with their next run times (UTC)."""

    async def action(client: Client) -> list[dict[str, Any]]:
        stored = await runner.load(client.redis, client.keys)
        now = now_ms()
        return [_row(now, stored, sid) for sid in sorted({*stored.schedules, *stored.invalid})]

    rows = _run(redis_url, namespace, action)
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        echo(printable(_line(row)))


@schedule.command("add")
@click.argument("schedule_id")
@click.option("--role", help="The role its jobs go to.")
@click.option("--graph", "graph_file", type=click.File(), help="Instead: a task graph (JSON).")
@click.option("--cron", help="A cron expression (5 fields, or 6 with seconds first).")
@click.option("--every", type=float, help="Instead of --cron: seconds between ticks.")
@click.option("--timezone", default="UTC", show_default=True, help="The cron's IANA zone.")
@click.option("--payload", default="null", help="The payload as JSON (templates allowed).")
@click.option("--catch-up", default=0, show_default=True, help="Missed ticks to fire late.")
@click.option("--overlap", type=click.Choice(["allow", "skip"]), default="allow", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the stored definition as JSON.")
@connection_options
@errors_to_exit
def add(
    schedule_id: str,
    payload: str,
    graph_file: TextIO | None,
    as_json: bool,
    redis_url: str,
    namespace: str,
    **rule: Any,
) -> None:
    """Add (or replace) a schedule; its ticks start after now.

    It publishes a job to --role, or submits the task graph of --graph (a JSON file; the
    payload is then the task's params).
    """
    try:
        graph = None if graph_file is None else orjson.loads(graph_file.read())
        found = Schedule(id=schedule_id, payload=orjson.loads(payload), graph=graph, **rule)
    except ValueError as exc:  # orjson's and pydantic's errors are ValueErrors
        raise click.UsageError(f"invalid schedule: {exc}") from None
    _run(redis_url, namespace, lambda client: runner.add(client.redis, client.keys, found))
    if as_json:
        echo_json(found.model_dump(mode="json"))
    else:
        echo(printable(f"added {found.id}: {found.describe()}"))


def _by_id(redis_url: str, namespace: str, schedule_id: str, verb: str) -> None:
    async def action(client: Client) -> bool:
        stored = await runner.load(client.redis, client.keys)
        if schedule_id not in stored.schedules and schedule_id not in stored.invalid:
            return False
        if verb == "removed":
            await runner.remove(client.redis, client.keys, schedule_id)
        else:
            await runner.pause(client.redis, client.keys, schedule_id, paused=verb == "paused")
        return True

    if not _run(redis_url, namespace, action):
        raise ConfigError(f"no schedule {schedule_id!r}")


def _simple(name: str, verb: str, doc: str) -> click.Command:
    @click.argument("schedule_id")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @connection_options
    @errors_to_exit
    def command(schedule_id: str, as_json: bool, redis_url: str, namespace: str) -> None:
        _by_id(redis_url, namespace, schedule_id, verb)
        if as_json:
            echo_json({"id": schedule_id, verb: True})
        else:
            echo(printable(f"{verb} {schedule_id}"))

    command.__doc__ = doc
    return schedule.command(name)(command)


remove = _simple(
    "remove", "removed", "Remove a schedule (a code-declared one returns when a scheduler starts)."
)
pause = _simple("pause", "paused", "Pause a schedule: its ticks pass without firing.")
resume = _simple("resume", "resumed", "Resume a paused schedule from its next tick.")


@schedule.command("run-now")
@click.argument("schedule_id")
@click.option("--json", "as_json", is_flag=True, help="Print the message id as JSON.")
@connection_options
@errors_to_exit
def run_now(schedule_id: str, as_json: bool, redis_url: str, namespace: str) -> None:
    """Publish one run of a schedule now, outside its ticks (paused or not)."""

    async def action(client: Client) -> str | None:
        stored = await runner.load(client.redis, client.keys)
        found = stored.schedules.get(schedule_id)
        return None if found is None else await runner.run_now(client, found)

    message_id = _run(redis_url, namespace, action)
    if message_id is None:
        raise ConfigError(f"no valid schedule {schedule_id!r}")
    if as_json:
        echo_json({"id": schedule_id, "message_id": message_id})
    else:
        echo(message_id)


def load_schedules(path: str) -> list[Schedule]:
    """Import ``module:attribute``: a :class:`Schedule` or an iterable of them.

    Raises:
        ConfigError: The module or attribute is missing, or it holds something else.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"invalid schedules {path!r}: expected 'package.module:attribute'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load schedules {path!r}: {exc}") from None
    found = (
        [obj] if isinstance(obj, Schedule) else list(obj) if isinstance(obj, list | tuple) else None
    )
    if found is None or not all(isinstance(s, Schedule) for s in found):
        raise ConfigError(f"{path!r} is not a Schedule or a list of them")
    return found


@click.command()
@click.option(
    "--schedules",
    "schedules_path",
    help="module:attribute of a Schedule or a list of them, written to Redis at start-up.",
)
@click.option("--poll", default=runner.POLL, show_default=True, help="Seconds between passes.")
@click.option(
    "--name",
    help="Its name in `streamflow workers` and the dashboard (default: host, pid and a random "
    "suffix).",
)
@connection_options
@errors_to_exit
def scheduler(
    schedules_path: str | None, poll: float, name: str | None, redis_url: str, namespace: str
) -> None:
    """Fire the namespace's schedules; run two or more for availability (each tick fires once)."""
    declared = load_schedules(schedules_path) if schedules_path else []
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    name = validate_name(name, "scheduler name") if name else default_consumer_name()
    anyio.run(_serve, settings, declared, poll, name)


async def _serve(
    settings: config.ConnectionSettings,
    declared: list[Schedule],
    poll: float,
    name: str,
) -> None:
    import signal

    redis = connect_redis(settings, name="streamflow-scheduler")
    if not await wait_ready(redis, settings.url, checks=False, strict=False):
        return
    try:
        client = Client(redis, namespace=settings.namespace)
        running = runner.Scheduler(client, declared, poll=poll, name=name)
        async with anyio.create_task_group() as tg:
            await tg.start(running.run)
            logger.info("scheduler %s running (namespace %s)", running.name, settings.namespace)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    running.stop()
                    break
    finally:
        await redis.aclose()
