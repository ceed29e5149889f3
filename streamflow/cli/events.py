"""``streamflow events``: follow the lifecycle events stream live (:mod:`streamflow.events`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import get_args

import anyio
import click

from streamflow import config
from streamflow.cli.options import connection_options, errors_to_exit, open_client
from streamflow.logs import echo, printable
from streamflow.protocol import now_ms
from streamflow.records import LifecycleEvent, LifecycleType


@click.command()
@click.option("--role", "roles", multiple=True, help="Only events of this role (repeatable).")
@click.option("--message", "message_id", help="Only events of this job (message id).")
@click.option("--task", "task_id", help="Only events of this task, its nodes and their jobs.")
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(get_args(LifecycleType)),
    help="Only events of this type (repeatable).",
)
@click.option(
    "--since",
    type=click.FloatRange(min=0),
    help="First replay the events of the last SECONDS (as far as the capped stream holds them).",
)
@click.option("--count", type=click.IntRange(min=1), help="Exit after this many events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line (the protocol's).")
@connection_options
@errors_to_exit
def events(
    roles: tuple[str, ...],
    message_id: str | None,
    task_id: str | None,
    types: tuple[str, ...],
    since: float | None,
    count: int | None,
    as_json: bool,
    redis_url: str,
    namespace: str,
) -> None:
    """Follow lifecycle events live: jobs started, progress, retried, ended; task and node states.

    Runs until interrupted (or --count events). Events are best effort: the queue's state is the
    truth (streamflow inspect, status).
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    since_ms = None if since is None else now_ms() - int(since * 1000)
    anyio.run(_follow, settings, roles, message_id, task_id, types, since_ms, count, as_json)


async def _follow(
    settings: config.ConnectionSettings,
    roles: tuple[str, ...],
    message_id: str | None,
    task_id: str | None,
    types: tuple[str, ...],
    since_ms: int | None,
    count: int | None,
    as_json: bool,
) -> None:
    shown = 0
    async with open_client(settings) as client:
        async for event in client.events(
            roles=roles or None,
            message_id=message_id,
            task_id=task_id,
            types=types or None,
            since_ms=since_ms,
        ):
            echo(event.model_dump_json(exclude_none=True) if as_json else line(event))
            shown += 1
            if count is not None and shown >= count:
                return


def line(event: LifecycleEvent) -> str:
    """One event as a line of text: time, type, then what it is about and what it says."""
    at = datetime.fromtimestamp(event.at_ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]
    parts = [at, f"{event.type:<13}"]
    if event.role is not None:
        parts.append(event.role)
    if event.message_id is not None:
        parts.append(event.message_id)
    if event.task_id is not None:
        parts.append(f"task {event.task_id}" + (f"/{event.node_id}" if event.node_id else ""))
    if event.attempt is not None:
        parts.append(f"attempt {event.attempt}")
    if event.state is not None:
        parts.append(f"{event.previous or '-'} -> {event.state}")
    if event.progress is not None:
        parts.append(f"progress {event.progress}")
    for text in (event.message, event.reason, event.detail):
        if text:
            parts.append(text)
    # Read back from Redis: no value may add a line or a terminal control of its own.
    return printable(" ".join(str(part) for part in parts))
