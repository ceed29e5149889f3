"""Test applications for worker subprocesses: ``streamflow worker --app tests.apps:app``.

Handlers report what they did through files named by ``SFTEST_*`` environment variables (never
``STREAMFLOW_*``: the CLI rejects unknown variables with that prefix). To add a role, register
another handler on ``app`` below; reuse :func:`record` to leave a trace the test can poll.

Roles:
    record: appends ``ctx.message_id`` and a newline to the file named by ``SFTEST_RECORD``.
    sleepy: sleeps ``payload["seconds"]``, then records like ``record``; first it reports
        ``payload["progress"]`` (with ``payload["message"]``) when the payload has it.
    work: the crash-test handler (see :func:`work`); it appends :func:`trace` lines to the file
        named by ``SFTEST_RECORD``. Retries: 3 attempts, 2 s base backoff.
    poison: the same handler with ``max_deliveries=3``, for messages that kill their worker.
    work3: the same handler on a role with 3 partitions (the cluster tests).
    ranked: the same handler on a role with 3 priority levels (the priority tests).
    forge: raises ``Fatal(payload["text"])`` (text from outside, in the logs and dead letters).
    gather: a task node's job reads every input batch (``ctx.inputs()``); then it records like
        ``record``.
    ops1007: the same again, 3 partitions, for the cluster operations tests: its first
        partition's hash slot is 4, so ``redis-cli --cluster reshard --cluster-slots 5`` from the
        first master of a fresh cluster moves it (and only four empty slots besides).
    careful: the README's cooperative handler (see :func:`careful_role`), traced like ``work``.
    parent: publishes two ``child`` jobs with ``ctx.publish`` (see :func:`parent_role`).
    child: traces ``CHILD`` (``ORPHAN`` if it did not inherit a ``correlation-id`` header).

Trace lines (one ``write`` each, so lines from several processes never interleave) are
``EVENT message_id entry_id attempt pid consumer unix_time`` with EVENT one of ``START`` (the
handler began), ``DONE`` (it returned normally: the worker will try to ack), ``FAIL`` (it is
about to raise :class:`streamflow.Retry`) and ``CANCELLED`` (the worker cancelled it: lease
lost, shutdown grace over). A SIGKILLed handler leaves its ``START`` line only.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

import streamflow

#: The environment variable naming the file that handlers append message ids to.
RECORD_ENV = "SFTEST_RECORD"

app = streamflow.App()


def record(ctx: streamflow.Context) -> None:
    """Append the message id as one line to the file named by ``SFTEST_RECORD``."""
    with open(os.environ[RECORD_ENV], "a", encoding="utf-8") as out:
        out.write(ctx.message_id + "\n")
        out.flush()


@dataclass(frozen=True)
class Line:
    """One trace line, as :func:`trace` writes it."""

    event: str
    message_id: str
    entry_id: str
    attempt: int
    pid: int
    consumer: str
    at: float


def read_trace(path: Path) -> list[Line]:
    """The complete trace lines of ``path``.

    A line is written with one ``write``; a reader may still catch the last one half written,
    so only lines ending in a newline count.
    """
    if not path.exists():
        return []
    out = []
    for raw in path.read_text().split("\n")[:-1]:
        event, message_id, entry_id, attempt, pid, consumer, at = raw.split(" ")
        out.append(Line(event, message_id, entry_id, int(attempt), int(pid), consumer, float(at)))
    return out


def trace(ctx: streamflow.Context, event: str) -> None:
    """Append one trace line (see the module docstring) to the file named by ``SFTEST_RECORD``."""
    line = (
        f"{event} {ctx.message_id} {ctx.entry_id} {ctx.attempt} {os.getpid()} {ctx.consumer} "
        f"{time.time():.6f}\n"
    )
    with open(os.environ[RECORD_ENV], "a", encoding="utf-8") as out:
        out.write(line)


@app.role("record")
async def record_role(ctx: streamflow.Context, payload: Any) -> None:
    record(ctx)


@app.role("sleepy")
async def sleepy_role(ctx: streamflow.Context, payload: Any) -> None:
    if "progress" in payload:
        await ctx.progress(payload["progress"], message=payload.get("message"))
    await anyio.sleep(float(payload["seconds"]))
    record(ctx)


async def work(ctx: streamflow.Context, payload: Any) -> None:
    """Trace START, then do what the payload (a dict, every key optional) says.

    * ``kill``: SIGKILL this worker process right after START.
    * ``block`` (seconds): block the event loop this long right after START (``time.sleep``
      in an async handler: the mistake the loop-stall watchdog reports).
    * ``fail_attempts`` (int): on attempts up to this one, trace FAIL and raise
      ``Retry(delay=payload["retry_delay"])`` (None: the role's backoff).
    * ``seconds``: sleep this long; ``seconds_by_consumer`` ({consumer name: seconds})
      overrides it for the named workers, so one message can be slow on one worker and quick
      on another.
    * ``shield``: sleep shielded from cancellation (a handler that ignores cancel and
      finishes its side effect anyway).
    * ``end_by_consumer`` ({consumer name: "retry" | "fatal"}): after the sleep, the named
      workers trace FAIL and raise ``Retry(delay=0)`` (re-queue at once) or ``Fatal``
      (dead-letter) instead of finishing.

    Then trace DONE. A cancellation while sleeping traces CANCELLED and propagates.
    """
    payload = payload or {}
    trace(ctx, "START")
    if payload.get("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if payload.get("block"):
        time.sleep(float(payload["block"]))  # noqa: ASYNC251 - the deliberate mistake
    if ctx.attempt <= int(payload.get("fail_attempts", 0)):
        trace(ctx, "FAIL")
        raise streamflow.Retry("failing as asked", delay=payload.get("retry_delay"))
    by_consumer = payload.get("seconds_by_consumer", {})
    seconds = float(by_consumer.get(ctx.consumer, payload.get("seconds", 0)))
    try:
        if seconds > 0:
            with anyio.CancelScope(shield=bool(payload.get("shield"))):
                await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        trace(ctx, "CANCELLED")
        raise
    end = payload.get("end_by_consumer", {}).get(ctx.consumer)
    if end is not None:
        trace(ctx, "FAIL")
        if end == "fatal":
            raise streamflow.Fatal("fatal as asked")
        raise streamflow.Retry("retrying at once as asked", delay=0)
    trace(ctx, "DONE")


app.role("work", retry=streamflow.RetryPolicy(max_attempts=3, backoff=2.0))(work)
app.role("poison", max_deliveries=3)(work)
app.role("work3", retry=streamflow.RetryPolicy(max_attempts=3, backoff=2.0), partitions=3)(work)
app.role("ranked", retry=streamflow.RetryPolicy(max_attempts=3, backoff=2.0), priorities=3)(work)


@app.role("forge")
async def forge_role(ctx: streamflow.Context, payload: Any) -> None:
    raise streamflow.Fatal(payload["text"])


@app.role("gather")
async def gather_role(ctx: streamflow.Context, payload: Any) -> None:
    if ctx.task_id is not None:
        async for _ in ctx.inputs():
            pass
    record(ctx)


app.role("ops1007", partitions=3)(work)


@app.role("careful")
async def careful_role(ctx: streamflow.Context, payload: Any) -> None:
    """The README's cooperative handler: steps with ``ctx.cancel.raise_if_cancelled()`` between.

    ``steps`` steps of ``step`` seconds (``steps_by_consumer``: {consumer name: steps}
    overrides it). Traces START, then DONE, or CANCELLED when it stops on the cancel token or
    is cancelled hard; ``SHUTDOWN`` once when it first sees ``ctx.shutting_down``.
    """
    trace(ctx, "START")
    steps = int(payload.get("steps_by_consumer", {}).get(ctx.consumer, payload["steps"]))
    told = False
    try:
        for _ in range(steps):
            ctx.cancel.raise_if_cancelled()
            if ctx.shutting_down and not told:
                told = True
                trace(ctx, "SHUTDOWN")
            await anyio.sleep(float(payload["step"]))
    except (streamflow.Cancelled, anyio.get_cancelled_exc_class()):
        trace(ctx, "CANCELLED")
        raise
    trace(ctx, "DONE")


@app.role("kept_work", keep_result=60)
async def kept_work(ctx: streamflow.Context, payload: Any) -> dict[str, Any]:
    """``work``, keeping as its result who ran it (tests/test_jobs.py)."""
    await work(ctx, payload)
    return {"consumer": ctx.consumer, "attempt": ctx.attempt}


@app.role("parent")
async def parent_role(ctx: streamflow.Context, payload: Any) -> None:
    """Trace START, publish two ``child`` jobs (by ordinal, then by key), trace PUBLISHED.

    With ``payload["kill"]``, SIGKILL this worker right after, on the entry's first delivery
    only (an adopted entry has a higher delivery count); then trace DONE.
    """
    trace(ctx, "START")
    await ctx.publish("child", {"parent": ctx.message_id})
    await ctx.publish("child", {"parent": ctx.message_id}, idempotency_key="second")
    trace(ctx, "PUBLISHED")
    if payload.get("kill") and ctx.fencing_token & 0xFFFFFFFF == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    trace(ctx, "DONE")


@app.role("child")
async def child_role(ctx: streamflow.Context, payload: Any) -> None:
    trace(ctx, "CHILD" if ctx.headers.get("correlation-id") else "ORPHAN")
