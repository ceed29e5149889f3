"""The ``streamflow`` commands that write to the queues: ``publish``, ``cancel``, and ``schema``.

``schema`` prints the JSON Schema of what ``publish`` and every other producer write.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import IO, Any

import anyio
import click
import orjson

from streamflow import config
from streamflow.cli.options import (
    EXIT_NOTHING_DONE,
    connection_options,
    echo_json,
    errors_to_exit,
    open_client,
)
from streamflow.client_ops import CancelResult
from streamflow.dag import submissions
from streamflow.errors import ConfigError
from streamflow.logs import echo, shown
from streamflow.protocol import check_headers, keep_result_ms
from streamflow.records import json_schemas


@click.command()
@click.argument("role")
@click.option("--json", "json_text", help="The payload, as one JSON document.")
@click.option(
    "--file",
    "file",
    type=click.File("rb"),
    help="Read one JSON payload per line from a file ('-' for stdin).",
)
@click.option(
    "--key",
    help="A partitioned role: jobs with the same key go to the same partition, in order.",
)
@click.option("--id", "message_id", help="The message id (single publish only).")
@click.option("--dedup-key", help="Publish at most once per key within the dedup window.")
@click.option("--delay", type=float, help="Start no earlier than this many seconds from now.")
@click.option(
    "--at",
    "at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"]),
    help="Start no earlier than this time (ISO 8601; local time without an offset).",
)
@click.option(
    "--deadline",
    help="Do not start it after this: seconds from now (e.g. 300), or a time (ISO 8601; local "
    "time without an offset). Past it the job is dead-lettered as expired.",
)
@click.option(
    "--header",
    "header_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A header for the handler (ctx.headers), e.g. traceparent=00-...; repeatable. Every "
    "job published carries them.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse (exit 2) a role that no worker ever served, instead of a warning naming the "
    "known roles.",
)
@click.option(
    "--keep-result",
    type=float,
    help="Keep the job's outcome this many seconds (see streamflow job), whatever its role says.",
)
@click.option(
    "--priority",
    type=int,
    help="The priority level of every job published, for a role declared with priorities=N: "
    "0 (the default, lowest) to N-1 (highest, taken first). A level the role does not have "
    "is refused (exit 2).",
)
@connection_options
@errors_to_exit
def publish(
    role: str,
    json_text: str | None,
    file: IO[bytes] | None,
    key: str | None,
    message_id: str | None,
    dedup_key: str | None,
    delay: float | None,
    at: datetime | None,
    deadline: str | None,
    header_pairs: tuple[str, ...],
    strict: bool,
    keep_result: float | None,
    priority: int | None,
    redis_url: str,
    namespace: str,
) -> None:
    """Publish jobs to ROLE; prints one message id per line.

    A publish dropped by --dedup-key (the key was used within the dedup window) prints the
    first message's id, says so on stderr and exits 3: nothing was published.
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    if (json_text is None) == (file is None):
        raise ConfigError("give exactly one of --json or --file")
    single = (message_id, dedup_key, delay, at, deadline, keep_result)
    if file is not None and any(option is not None for option in single):
        raise ConfigError(
            "--id, --dedup-key, --delay, --at, --deadline and --keep-result apply to a single "
            "--json publish"
        )
    if delay is not None and at is not None:
        raise ConfigError("give --delay or --at, not both")
    _check_keep(keep_result)
    if json_text is not None:
        payloads = [_parse_json(json_text.encode(), "--json")]
    else:
        assert file is not None
        payloads = list(_read_lines(file))
    when = at if at is not None else delay
    from streamflow.protocol import new_message_id

    # With a dedup key the id is chosen here: getting another one back means a dedup hit.
    sent_id = message_id or (new_message_id() if dedup_key else None)
    options = (
        key,
        sent_id,
        dedup_key,
        when,
        _deadline(deadline),
        strict,
        keep_result,
        _headers(header_pairs),
        priority,
    )
    try:
        ids = anyio.run(_publish, settings, role, payloads, options)
    except ValueError as exc:  # a value out of the protocol's bounds, or the role's levels
        raise ConfigError(str(exc)) from None
    for one in ids:
        echo(one)
    if dedup_key and ids != [sent_id]:
        echo(
            f"deduplicated: dedup key already used by message {ids[0]}; nothing published", err=True
        )
        sys.exit(EXIT_NOTHING_DONE)


def _check_keep(seconds: float | None) -> None:
    """``--keep-result``: within the protocol's bounds (1 ms to 30 days)."""
    try:
        keep_result_ms(seconds)
    except ValueError as exc:
        raise ConfigError(f"--keep-result: {exc}") from None


def _deadline(text: str | None) -> datetime | timedelta | None:
    """``--deadline``: seconds from now, or an ISO 8601 time."""
    if text is None:
        return None
    try:
        return timedelta(seconds=float(text))
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--deadline {text!r}: give seconds from now or an ISO 8601 time"
        ) from None


def _headers(pairs: tuple[str, ...]) -> dict[str, str] | None:
    """``--header NAME=VALUE`` options as a dict (a name given twice: the last value wins)."""
    headers = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--header {pair!r}: give NAME=VALUE")
        headers[name] = value
    try:
        return check_headers(headers) if headers else None
    except ValueError as exc:
        raise ConfigError(f"--header: {exc}") from None


def _parse_json(raw: bytes, where: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{where}: invalid JSON: {exc}") from None


def _read_lines(file: IO[bytes]) -> Iterator[Any]:
    for number, line in enumerate(file, start=1):
        if line.strip():
            yield _parse_json(line, f"line {number}")


async def _publish(
    settings: config.ConnectionSettings,
    role: str,
    payloads: list[Any],
    options: tuple[
        str | None,
        str | None,
        str | None,
        Any,
        Any,
        bool,
        float | None,
        dict[str, str] | None,
        int | None,
    ],
) -> list[str]:
    key, message_id, dedup_key, when, deadline, strict, keep_result, headers, priority = options
    async with open_client(settings) as client:
        if len(payloads) == 1:
            one = await client.publish(
                role,
                payloads[0],
                key=key,
                message_id=message_id,
                dedup_key=dedup_key,
                delay=when,
                deadline=deadline,
                headers=headers,
                strict=strict,
                keep_result=keep_result,
                priority=priority,
            )
            return [one]
        keys = None if key is None else [key] * len(payloads)
        levels = None if priority is None else [priority] * len(payloads)
        return await client.publish_many(
            role, payloads, keys=keys, strict=strict, headers=headers, priorities=levels
        )


@click.command()
@click.option(
    "--kind",
    type=click.Choice(sorted({*json_schemas(), *submissions.json_schemas()})),
    help="Only this kind.",
)
def schema(kind: str | None) -> None:
    """Print the JSON Schema of every message kind of the wire protocol."""
    schemas = {**json_schemas(), **submissions.json_schemas()}
    out = schemas[kind] if kind else schemas
    echo_json(out, indent=True)


@click.command()
@click.argument("target_id")
@click.option("--task", "target", flag_value="task", help="TARGET_ID is a task id.")
@click.option("--message", "target", flag_value="message", help="TARGET_ID is a message id.")
@click.option("--reason", default="cancelled", show_default=True, help="Shown to handlers.")
@click.option("--requested-by", default="cli", show_default=True, help="Who asks, for logs.")
@click.option(
    "--wait",
    is_flag=True,
    help="Return once something matching was stopped and nothing matching still runs "
    "(a cancel of work not yet started stays in force, but --wait then times out).",
)
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="With --wait: give up after this many seconds (exit 1).",
)
@click.option(
    "--preemptive",
    is_flag=True,
    help="Cancel the id even if it names no known task and no queued, delayed or running "
    "message: what is submitted or published under it within 7 days is refused at once. "
    "Without it such an id is an error (exit 2).",
)
@connection_options
@errors_to_exit
def cancel(
    target_id: str,
    target: str | None,
    reason: str,
    requested_by: str,
    wait: bool,
    timeout: float,
    preemptive: bool,
    redis_url: str,
    namespace: str,
) -> None:
    """Cancel a task (all its messages) or one message by id, on every worker."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    try:
        result = anyio.run(
            _cancel,
            settings,
            target_id,
            target or "any",
            reason,
            requested_by,
            (wait, timeout, preemptive),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    echo(f"cancel {result.signal_id} sent for {target or 'task or message'} {target_id}")
    for consumer, message_id in result.stopped:
        echo(f"stopped {shown(message_id)} on {shown(consumer)}")
    if wait and not result.complete:
        if result.stopped:
            why = f"still running on {shown(', '.join(result.running_on), 1000)}"
        else:
            why = f"nothing matching {target_id!r} was stopped (unknown id, or not picked up yet)"
        echo(f"error: timed out after {timeout:g}s: {why}", err=True)
        sys.exit(1)


async def _cancel(
    settings: config.ConnectionSettings,
    target_id: str,
    target: Any,
    reason: str,
    requested_by: str,
    how: tuple[bool, float, bool],
) -> CancelResult:
    wait, timeout, preemptive = how
    async with open_client(settings) as client:
        return await client.cancel(
            target_id,
            target=target,
            reason=reason,
            requested_by=requested_by,
            wait=wait,
            timeout=timeout,
            preemptive=preemptive,
        )
