"""``streamflow pause``, ``resume`` and ``limit``: flow control of roles (see streamflow.flow)."""

from __future__ import annotations

import dataclasses
from typing import Any

import anyio
import click

from streamflow import config
from streamflow.cli.options import connection_options, echo_json, errors_to_exit, open_client
from streamflow.flow import Limits
from streamflow.logs import echo, shown


@click.command()
@click.argument("role")
@click.option("--force", is_flag=True, help="Pause a role nothing is known of yet (no stream).")
@click.option("--json", "as_json", is_flag=True, help="The outcome as one JSON object.")
@connection_options
@errors_to_exit
def pause(role: str, force: bool, as_json: bool, redis_url: str, namespace: str) -> None:
    """Pause ROLE: workers start no new jobs of it until resumed; running ones finish.

    Publishing goes on (jobs wait in the stream). The pause is a key in Redis: it outlives
    worker restarts. A role nothing is known of is refused unless --force (a misspelt name
    would pause nothing).
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    changed = anyio.run(_pause, settings, role, force)
    done = "paused: workers start no new jobs of it within a second"
    _report(role, True, changed, as_json, done=done, unchanged="was paused already")


@click.command()
@click.argument("role")
@click.option("--json", "as_json", is_flag=True, help="The outcome as one JSON object.")
@connection_options
@errors_to_exit
def resume(role: str, as_json: bool, redis_url: str, namespace: str) -> None:
    """Resume a paused ROLE: its workers start its jobs again within a second."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    changed = anyio.run(_resume, settings, role)
    _report(role, False, changed, as_json, done="resumed", unchanged="was not paused")


def _report(
    role: str, paused: bool, changed: bool, as_json: bool, *, done: str, unchanged: str
) -> None:
    """Print what pause or resume did: JSON, or ``role ROLE`` then ``done`` or ``unchanged``."""
    if as_json:
        echo_json({"role": role, "paused": paused, "changed": changed})
    else:
        echo(f"role {shown(role)} {done if changed else unchanged}")


async def _pause(settings: config.ConnectionSettings, role: str, force: bool) -> bool:
    async with open_client(settings) as client:
        return await client.pause(role, force=force)


async def _resume(settings: config.ConnectionSettings, role: str) -> bool:
    async with open_client(settings) as client:
        return await client.resume(role)


@click.command()
@click.argument("role")
@click.option("--rate", help="At most COUNT/PERIOD starts (10/s, 100/m, 5/2h), or off.")
@click.option("--concurrency", type=int, help="At most this many held at once (0: no limit).")
@click.option("--key-rate", help="Per limit key: at most COUNT/PERIOD starts, or off.")
@click.option(
    "--key-concurrency", type=int, help="Per limit key: at most this many running (0: no limit)."
)
@click.option("--reset", is_flag=True, help="Drop the run-time limits: the declared ones apply.")
@click.option("--json", "as_json", is_flag=True, help="The limits as one JSON object.")
@connection_options
@errors_to_exit
def limit(
    role: str,
    rate: str | None,
    concurrency: int | None,
    key_rate: str | None,
    key_concurrency: int | None,
    reset: bool,
    as_json: bool,
    redis_url: str,
    namespace: str,
) -> None:
    """Set or show ROLE's start rate and concurrency limits across all workers.

    Set here, a limit overrides the one the app declares (@app.role(rate_limit=...,
    concurrency_limit=..., key_rate_limit=..., key_concurrency=...)); --reset drops them all.
    The --key-* limits hold for each limit key (a job's streamflow-limit-key header) on its
    own. Workers apply a change within half a second. Without options, shows the limits set at
    run time, the running slots taken, and the keys busy and parked.
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    wanted = {
        "rate": rate,
        "concurrency": concurrency,
        "key_rate": key_rate,
        "key_concurrency": key_concurrency,
        "reset": reset,
    }
    found = anyio.run(_limit, settings, role, wanted)
    if as_json:
        echo_json({"role": role, **dataclasses.asdict(found)})
        return
    echo(
        f"role {shown(role)}: rate {found.rate or 'unset'}, concurrency "
        f"{_cap(found.concurrency)}; per key: rate {found.key_rate or 'unset'}, concurrency "
        f"{_cap(found.key_concurrency)} (unset: as the app declares); {found.running} running "
        f"slots taken, {found.busy_keys} keys running, {found.parked_keys} keys with parked jobs"
    )


def _cap(value: int | None) -> str:
    return "unset" if value is None else str(value or "off")


async def _limit(settings: config.ConnectionSettings, role: str, wanted: dict[str, Any]) -> Limits:
    async with open_client(settings) as client:
        return await client.limit(role, **wanted)
