"""The ``streamflow dlq`` commands: list, show, replay and purge a role's dead letters."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from datetime import datetime

import anyio
import click

from streamflow import config
from streamflow.cli.options import (
    EXIT_NOTHING_DONE,
    connection_options,
    echo_json,
    errors_to_exit,
    open_client,
)
from streamflow.deadletters import DeadLetterEntry, ReplayResult
from streamflow.errors import ConfigError
from streamflow.logs import echo, shown


@click.group()
def dlq() -> None:
    """Dead letters: list, show, replay, purge."""


@dlq.command("list")
@click.argument("role")
@click.option("--count", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document per line.")
@connection_options
@errors_to_exit
def dlq_list(role: str, count: int, as_json: bool, redis_url: str, namespace: str) -> None:
    """List the oldest dead letters of ROLE."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    total, entries = anyio.run(_dlq_list, settings, role, count)
    for entry in entries:
        letter = entry.letter
        if letter is None:
            if as_json:
                echo_json({"id": entry.id, "problem": entry.problem})
            else:
                echo(f"{entry.id}  unreadable: {shown(entry.problem)}")
            continue
        if as_json:
            echo_json({"id": entry.id, **letter.model_dump(mode="json")})
        else:
            when = datetime.fromtimestamp(letter.dead_at_ms / 1000).isoformat(timespec="seconds")
            # Every field was written by whoever could write the stream: one line each.
            echo(
                f"{entry.id}  {when}  {letter.reason:<19} message={shown(letter.message_id or '-')}"
                f" attempts={letter.attempts}  {shown(letter.detail, 100)}"
            )
    if not as_json:
        echo(
            f"{total} dead letters in {role!r}"
            + (f" (showing {len(entries)})" if total > len(entries) else "")
        )


async def _dlq_list(
    settings: config.ConnectionSettings, role: str, count: int
) -> tuple[int, list[DeadLetterEntry]]:
    async with open_client(settings) as client:
        return await client.dead_letter_count(role), await client.dead_letters(role, count=count)


@dlq.command("show")
@click.argument("role")
@click.argument("dead_id")
@connection_options
@errors_to_exit
def dlq_show(role: str, dead_id: str, redis_url: str, namespace: str) -> None:
    """Show one dead letter of ROLE in full, with its original fields."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    _check_entry_ids([dead_id])
    entry = anyio.run(_dlq_show, settings, role, dead_id)
    if entry is None:
        raise ConfigError(f"no dead letter {dead_id!r} in role {role!r}")
    doc = {
        "id": entry.id,
        **(entry.letter.model_dump(mode="json") if entry.letter else {"problem": entry.problem}),
        "raw": {k: v.decode(errors="backslashreplace") for k, v in entry.raw.items()},
    }
    echo_json(doc, indent=True)


def _check_entry_ids(ids: Sequence[str]) -> None:
    for entry_id in ids:
        # A partitioned role's dead letters are <partition>:<entry id>.
        if not re.fullmatch(r"(\d+:)?\d+-\d+", entry_id):
            raise ConfigError(
                f"{entry_id!r} is not a dead letter id (like 1718000000000-0, or 2:1718000000000-0 "
                "for a partitioned role)"
            )


async def _dlq_show(
    settings: config.ConnectionSettings, role: str, dead_id: str
) -> DeadLetterEntry | None:
    async with open_client(settings) as client:
        return await client.dead_letter(role, dead_id)


@dlq.command("replay")
@click.argument("role")
@click.argument("dead_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter of ROLE.")
@connection_options
@errors_to_exit
def dlq_replay(
    role: str, dead_ids: tuple[str, ...], replay_all: bool, redis_url: str, namespace: str
) -> None:
    """Send dead letters back to ROLE's stream, attempts reset (each exactly once).

    Exits 3 when nothing was replayed (no dead letters, or every one skipped).
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    if bool(dead_ids) == replay_all:
        raise ConfigError("give dead-letter ids or --all")
    _check_entry_ids(dead_ids)
    result = anyio.run(_dlq_replay, settings, role, None if replay_all else list(dead_ids))
    for dead_id, new_id in result.replayed:
        echo(f"replayed {dead_id} -> {new_id}")
    for dead_id, why in result.skipped:
        echo(f"skipped {dead_id}: {shown(why, 1000)}", err=True)  # may quote a forged letter
    echo(f"{len(result.replayed)} replayed, {len(result.skipped)} skipped")
    if not result.replayed:
        sys.exit(EXIT_NOTHING_DONE)


async def _dlq_replay(
    settings: config.ConnectionSettings, role: str, dead_ids: list[str] | None
) -> ReplayResult:
    async with open_client(settings) as client:
        return await client.replay(role, dead_ids)


@dlq.command("purge")
@click.argument("role")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@connection_options
@errors_to_exit
def dlq_purge(role: str, yes: bool, redis_url: str, namespace: str) -> None:
    """Delete every dead letter of ROLE."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    if not yes:
        click.confirm(f"delete every dead letter of {role!r}?", abort=True)
    count = anyio.run(_dlq_purge, settings, role)
    echo(f"purged {count} dead letters from {role!r}")


async def _dlq_purge(settings: config.ConnectionSettings, role: str) -> int:
    async with open_client(settings) as client:
        return await client.purge_dead_letters(role)
