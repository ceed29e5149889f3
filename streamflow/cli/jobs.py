"""``streamflow job``: where one job is, from what Redis holds (see :mod:`streamflow.jobs`)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import anyio
import click
import orjson

from streamflow import config, results
from streamflow.cli.options import connection_options, echo_json, errors_to_exit, open_client
from streamflow.client import Client
from streamflow.jobs import JobStatus
from streamflow.logs import echo, printable

#: Exit codes: 0 found (with --wait: succeeded); 1 with --wait: it failed, expired, was
#: cancelled or did not end in time; 2 an error; 3 unknown (nothing in Redis names it).
EXIT_NOT_OK, EXIT_UNKNOWN = 1, 3


@click.command()
@click.argument("message_id")
@click.option("--role", help="The job's role: only its keys are read (faster).")
@click.option("--json", "as_json", is_flag=True, help="The status as one JSON object.")
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit 1 unless it succeeded.")
@click.option("--timeout", type=float, help="With --wait: give up after this many seconds.")
@connection_options
@errors_to_exit
def job(
    message_id: str,
    role: str | None,
    as_json: bool,
    wait: bool,
    timeout: float | None,
    redis_url: str,
    namespace: str,
) -> None:
    """Show where a job is: queued, delayed, running, retrying, ended, or unknown.

    Exit status: 0 when the job is found (with --wait: when it succeeded); 1 with --wait when
    it failed, expired, was cancelled or did not end within --timeout; 3 when nothing in Redis
    names it (an acknowledged job whose outcome was not kept leaves nothing behind).
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    found = anyio.run(_job, settings, message_id, role, wait, timeout)
    if as_json:
        echo_json(found.to_json())
    else:
        echo(describe(found))
    sys.exit(exit_code(found, wait))


def exit_code(found: JobStatus, wait: bool) -> int:
    """The command's exit status for ``found`` (see :func:`job`)."""
    if found.state == "unknown":
        return EXIT_UNKNOWN
    if wait and found.state != "succeeded":
        return EXIT_NOT_OK
    return 0


async def _job(
    settings: config.ConnectionSettings,
    message_id: str,
    role: str | None,
    wait: bool,
    timeout: float | None,  # noqa: ASYNC109 - the --timeout option
) -> JobStatus:
    async with open_client(settings) as client:
        first = await client.job(message_id, role=role)
        if not wait or first.ended or first.state == "unknown":
            return first
        return await _wait(client, first, timeout)


async def _wait(client: Client, first: JobStatus, timeout: float | None) -> JobStatus:  # noqa: ASYNC109
    """Follow the job until it ends (or is gone: ended without its outcome kept)."""
    last = first

    async def ended() -> JobStatus | None:
        nonlocal last
        last = await client.job(first.message_id, role=first.role)
        return last if last.ended or last.state == "unknown" else None

    news = results.EndEvents(client.redis, client.keys, first.message_id)
    await results.wait_for_end(ended, timeout, news)
    return last


def _when(ms: int | None) -> str:
    if ms is None:
        return "?"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def describe(s: JobStatus) -> str:
    """Where the job is, then its result, progress and headers, if any: a line each.

    Each line is made :func:`printable` (a job's values are untrusted text).
    """
    result = "result: " + orjson.dumps(s.result).decode() if s.state == "succeeded" else ""
    lines = (_where(s), result, _progress_line(s), _headers_line(s))
    return "\n".join(printable(line) for line in lines if line)


def _progress_line(s: JobStatus) -> str:
    """``progress: 40 copying (at ...)`` for a running job that reported progress."""
    if s.progress_at_ms is None:
        return ""
    message = f" {s.progress_message}" if s.progress_message else ""
    value = orjson.dumps(s.progress).decode()
    return f"progress: {value}{message} (at {_when(s.progress_at_ms)})"


def _headers_line(s: JobStatus) -> str:
    if not s.headers:
        return ""
    return "headers: " + ", ".join(f"{name}={value}" for name, value in s.headers.items())


def _where(s: JobStatus) -> str:
    """One line saying where the job is."""
    head = f"job {s.message_id}" + (f" (role {s.role})" if s.role else "")
    if s.priority:
        head += f" at priority {s.priority}"
    attempt = f"attempt {s.attempt}" if s.attempt is not None else ""
    if s.state == "running":
        alive = "alive" if s.worker_alive else "dead: another worker adopts it after the lease"
        text = (
            f"running on {s.consumer} ({alive}), {attempt}, lease age {s.lease_age_ms} ms, "
            f"{s.deliveries} deliveries"
        )
    elif s.state in ("delayed", "retrying") and s.due_at_ms is not None:
        text = f"{s.state} until {_when(s.due_at_ms)}, {attempt}"
    elif s.state in ("queued", "retrying"):
        text = f"{s.state}, {attempt}, queued (first published {_when(s.created_at_ms)})"
    elif s.state == "succeeded":
        text = f"succeeded, {attempt}, by {s.consumer} at {_when(s.finished_at_ms)}"
    elif s.state == "unknown":
        text = f"unknown: {s.detail}"
    elif s.state == "parked":
        text = f"{s.detail}, {attempt} (first published {_when(s.created_at_ms)})"
    else:  # failed, expired, cancelled
        text = f"{s.state} ({s.reason}): {s.detail}"
        if s.finished_at_ms is not None:
            text += f" [at {_when(s.finished_at_ms)}]"
    return f"{head}: {text}"
