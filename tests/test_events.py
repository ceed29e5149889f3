"""Lifecycle events and progress (streamflow.events), on a real redis-server."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from redis.asyncio import Redis

from streamflow import (
    App,
    Client,
    Context,
    Coordinator,
    Graph,
    LeaseSettings,
    Retry,
    Worker,
)
from streamflow.cli.progress import follow
from streamflow.context import Fatal
from streamflow.events import ENTRY_BYTES, ENTRY_EVENTS, MAX_BUFFERED, EventLog
from streamflow.keys import GROUP, Keys
from streamflow.protocol import Job, now_ms
from streamflow.records import (
    FINAL_JOB_TYPES,
    MAX_ENTRY_EVENTS,
    MAX_ITEM_JOBS,
    LifecycleEvent,
    decode_lifecycle,
    json_schemas,
)
from streamflow.scripts import EVENT_ENTRIES
from tests.dag.helpers import chain, system
from tests.helpers import CLI, ROOT, clean_env, run_cli, running, wait_for_query, wait_until

pytestmark = pytest.mark.anyio


def worker(app: App, redis: Redis, namespace: str, **kw: Any) -> Worker:
    return Worker(
        app,
        redis,
        namespace=namespace,
        block_ms=100,
        lease=LeaseSettings(ttl=2.0, reclaim_interval=0.2),
        **kw,
    )


async def collect(
    client: Client, into: list[LifecycleEvent], until: int, **filters: Any
) -> list[LifecycleEvent]:
    """Follow events matching ``filters`` into ``into`` until ``until`` final events arrived."""
    finals = 0
    async for event in client.events(**filters):
        into.append(event)
        finals += event.type in FINAL_JOB_TYPES
        if finals >= until:
            break
    return into


async def stored(redis: Redis, namespace: str) -> list[LifecycleEvent]:
    """Every event the stream holds, validated against the model."""
    entries = await redis.xrange(Keys(namespace).lifecycle())
    found = []
    for _, fields in entries:
        events, problems = decode_lifecycle(fields)
        assert not problems
        found += events
    return found


async def test_two_live_subscribers_and_a_late_one_see_started_progress_and_succeeded(
    redis: Redis, namespace: str
) -> None:
    app, release = App(), anyio.Event()

    @app.role("resize")
    async def resize(ctx: Context, payload: Any) -> str:
        await ctx.progress(10, message="opened")
        await release.wait()
        await ctx.progress({"done": 3, "of": 3})
        return "ok"

    client = Client(redis, namespace=namespace)
    first: list[LifecycleEvent] = []
    second: list[LifecycleEvent] = []
    late: list[LifecycleEvent] = []
    with anyio.fail_after(20):
        async with running(worker(app, redis, namespace)), anyio.create_task_group() as tg:
            since = now_ms()
            # Both follow from now on, whenever their first read happens: no race with the
            # job's first events (a sleep before publishing would only make one unlikely).
            tg.start_soon(partial(collect, client, first, 1, since_ms=since - 1))
            tg.start_soon(partial(collect, client, second, 1, since_ms=since - 1))
            message_id = await client.publish("resize", {"w": 1})
            await wait_until(lambda: any(e.type == "progress" for e in first))
            release.set()
            await wait_until(lambda: len(first) >= 4 and len(second) >= 4)
            # A subscriber that starts after the job ended replays it, from ``since_ms``.
            await collect(client, late, 1, message_id=message_id, since_ms=since - 1000)
    for seen in (first, second, late):
        assert [e.type for e in seen] == ["started", "progress", "progress", "succeeded"]
        assert {e.message_id for e in seen} == {message_id}
        assert seen[1].progress == 10 and seen[1].message == "opened"
        assert seen[2].progress == {"done": 3, "of": 3}
        assert seen[0].role == "resize" and seen[0].attempt == 1


async def test_retrying_failed_dead_lettered_and_filters(redis: Redis, namespace: str) -> None:
    app = App()

    @app.role("flaky")
    async def flaky(ctx: Context, payload: Any) -> None:
        if ctx.attempt == 1:
            raise Retry("not yet", delay=0)
        raise Fatal("broken for good")

    @app.role("other")
    async def other(ctx: Context, payload: Any) -> None:
        return None

    client = Client(redis, namespace=namespace)
    flaky_events: list[LifecycleEvent] = []
    one_job: list[LifecycleEvent] = []
    with anyio.fail_after(20):
        async with running(worker(app, redis, namespace)), anyio.create_task_group() as tg:
            # From the start of the (fresh) namespace's stream: no race with the first events.
            tg.start_soon(partial(collect, client, flaky_events, 2, roles=["flaky"], since_ms=0))
            expired = await client.publish("flaky", 1, deadline=datetime(2000, 1, 1, tzinfo=UTC))
            target = await client.publish("flaky", 2)
            tg.start_soon(partial(collect, client, one_job, 1, message_id=target, since_ms=0))
            await client.publish("other", 3)
            await wait_until(lambda: len(flaky_events) >= 5 and one_job)
    assert {e.role for e in flaky_events} == {"flaky"}  # the role filter
    assert [e.type for e in one_job] == ["started", "retrying", "started", "failed"]
    retrying, failed = one_job[1], one_job[3]
    assert retrying.detail == "not yet" and retrying.delay == 0 and retrying.attempt == 1
    assert failed.reason == "fatal" and failed.attempt == 2
    dead = [e for e in flaky_events if e.message_id == expired]
    assert [(e.type, e.reason) for e in dead] == [("dead_lettered", "expired")]


async def test_a_role_with_events_off_writes_none(redis: Redis, namespace: str) -> None:
    app, ran = App(), []

    @app.role("quiet", events=False)
    async def quiet(ctx: Context, payload: Any) -> None:
        await ctx.progress(50)  # accepted, written nowhere
        ran.append(payload)

    @app.role("loud")
    async def loud(ctx: Context, payload: Any) -> None:
        ran.append(payload)

    client = Client(redis, namespace=namespace)
    with anyio.fail_after(20):
        async with running(worker(app, redis, namespace)):
            for n in range(5):
                await client.publish("quiet", n)
            await client.publish("loud", "x")
            await wait_until(lambda: len(ran) == 6)
            await anyio.sleep(0.3)  # past the linger: anything buffered is written
    events = await stored(redis, namespace)
    assert {e.role for e in events} == {"loud"}
    assert [e.type for e in events] == ["started", "succeeded"]


@pytest.mark.slow
async def test_progress_in_a_tight_loop_is_rate_limited_and_keeps_the_last_value(
    redis: Redis, namespace: str
) -> None:
    app = App()

    @app.role("busy")
    async def busy(ctx: Context, payload: Any) -> None:
        deadline = anyio.current_time() + 1.2
        n = 0
        while anyio.current_time() < deadline:
            n += 1
            await ctx.progress(n)
            await anyio.lowlevel.checkpoint()
        await ctx.progress(-1, message="last")

    client = Client(redis, namespace=namespace)
    with anyio.fail_after(20):
        async with running(worker(app, redis, namespace)):
            message_id = await client.publish("busy", None)

            async def finished() -> bool:
                return any(e.type == "succeeded" for e in await stored(redis, namespace))

            await wait_for_query(finished)
    progress = [e for e in await stored(redis, namespace) if e.type == "progress"]
    # 1.2 s at one event per 0.5 s: the first at once, then at most one per interval, then
    # the last value written before the job's final event (thousands of calls in all).
    assert 2 <= len(progress) <= 5
    assert progress[-1].progress == -1 and progress[-1].message == "last"
    # The run's latest progress was kept while it ran, and deleted when it ended.
    key = Keys(namespace).job_progress(message_id)
    await wait_for_query(lambda: _absent(redis, key))  # written with the final event


async def test_bad_progress_values_are_refused_in_the_handler(redis: Redis, namespace: str) -> None:
    app, errors = App(), []

    @app.role("bad")
    async def bad(ctx: Context, payload: Any) -> None:
        for value in ("text", True, float("nan"), {"big": "x" * 5000}, {"set": {1}}):
            try:
                await ctx.progress(value)
            except ValueError as exc:
                errors.append(str(exc))

    client = Client(redis, namespace=namespace)
    with anyio.fail_after(20):
        async with running(worker(app, redis, namespace)):
            await client.publish("bad", None)
            await wait_until(lambda: len(errors) == 5)


async def test_event_log_writes_many_events_per_entry_capped_near_max_len(
    redis: Redis, namespace: str
) -> None:
    log = EventLog(redis, Keys(namespace), "w1", max_len=150)
    for n in range(30_000):
        log.add("progress", role="r", progress=n)
        if n % MAX_BUFFERED == MAX_BUFFERED - 1:
            await log.flush()
    log.add("progress", role="r", progress=-1)
    for _ in range(MAX_BUFFERED):  # a full buffer drops what comes next, and counts it
        log.add("progress", role="r", progress=-2)
    await log.flush()
    assert (log.written, log.dropped) == (30_000 + MAX_BUFFERED, 1)
    entries = await redis.xrange(Keys(namespace).lifecycle())
    assert 150 <= len(entries) < 400  # 400 written; MAXLEN ~ trims whole nodes only
    sizes = {len(orjson.loads(fields[b"events"])) for _, fields in entries}
    assert sizes == {ENTRY_EVENTS}
    first = orjson.loads(entries[-MAX_BUFFERED // ENTRY_EVENTS][1][b"events"])[0]
    assert LifecycleEvent.model_validate(first).progress == -1


async def test_a_subscriber_skips_what_it_cannot_read_and_reads_the_rest(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    stream = Keys(namespace).lifecycle()
    good = {"protocol": 1, "kind": "lifecycle", "type": "started", "at_ms": 1, "role": "r"}
    await redis.xadd(stream, {"events": b"not json"})
    await redis.xadd(stream, {"other": b"[]"})
    await redis.xadd(stream, {"events": orjson.dumps([{"kind": "lifecycle"}, good])})
    client, seen = Client(redis, namespace=namespace), []
    with anyio.fail_after(10):
        async for event in client.events(since_ms=0):
            seen.append(event)
            break
    assert [e.type for e in seen] == ["started"]
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 3


def test_the_lifecycle_event_is_in_the_json_schema() -> None:
    schema = json_schemas()["lifecycle"]
    assert "started" in orjson.dumps(schema).decode()
    assert schema["properties"]["kind"]["const"] == "lifecycle"


@pytest.mark.slow
async def test_task_and_node_transitions_and_node_job_progress_by_task_id(
    redis_url: str, namespace: str
) -> None:
    seen: list[LifecycleEvent] = []
    async with system(redis_url, namespace) as (client, _, _):

        async def follow(task_id: str) -> None:
            async for event in client.events(task_id=task_id, since_ms=0):
                seen.append(event)
                if event.type == "task" and event.state in ("succeeded", "failed"):
                    return

        with anyio.fail_after(60):
            task_id = await client.submit(chain(12, 4))
            await follow(task_id)
    assert {e.task_id for e in seen} == {task_id}
    tasks = [(e.previous, e.state) for e in seen if e.type == "task"]
    assert tasks == [("queued", "running"), ("running", "succeeded")]
    nodes = {(e.node_id, e.state) for e in seen if e.type == "node"}
    assert {("source", "running"), ("source", "succeeded"), ("analyze", "succeeded")} <= nodes
    jobs = [e for e in seen if e.type in ("started", "succeeded")]
    assert jobs and all(e.node_id and e.message_id for e in jobs)


@pytest.mark.slow
async def test_streamflow_events_json_replays_and_follows_live(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    app = App()

    @app.role("cli")
    async def handle(ctx: Context, payload: Any) -> None:
        await ctx.progress(payload)

    client = Client(redis, namespace=namespace)
    base = ["events", "--redis-url", redis_url, "--namespace", namespace, "--json"]
    with anyio.fail_after(60):
        async with running(worker(app, redis, namespace)):
            first = await client.publish("cli", 1)
            await wait_for_query(lambda: _has(redis, namespace, first, "succeeded"))
            # A late subscriber replays the job that already ended.
            done = await anyio.to_thread.run_sync(
                partial(run_cli, *base, "--since", "60", "--message", first, "--count", "3")
            )
            assert done.returncode == 0, done.stderr
            lines = [orjson.loads(line) for line in done.stdout.splitlines()]
            assert [doc["type"] for doc in lines] == ["started", "progress", "succeeded"]
            assert lines[1]["progress"] == 1 and lines[1]["message_id"] == first
            # A live one sees jobs published after it started, filtered by type.
            live = await anyio.open_process(
                [*CLI, *base, "--type", "succeeded", "--role", "cli", "--count", "2"],
                cwd=ROOT,
                env=clean_env(),
                stderr=None,
            )
            async with live:
                while live.returncode is None:
                    await client.publish("cli", 2)
                    with anyio.move_on_after(0.3):
                        await live.wait()
                assert live.stdout is not None
                out = b""
                async for chunk in live.stdout:
                    out += chunk
    docs = [orjson.loads(line) for line in out.splitlines()]
    assert [doc["type"] for doc in docs] == ["succeeded", "succeeded"]
    assert first not in {doc["message_id"] for doc in docs}


async def _has(redis: Redis, namespace: str, message_id: str, type_: str) -> bool:
    return any(
        e.message_id == message_id and e.type == type_ for e in await stored(redis, namespace)
    )


def _bare_log() -> EventLog:
    """An event log that is never written (its buffer is read by the test)."""
    return EventLog(Redis(), Keys("t"), "w-1")


def _context(job: Job) -> Context:
    """The context a worker gives a run of ``job`` (what its ``started`` event is read from)."""
    return Context(
        job.id, "1-0", job.role, job.attempt, "w-1", 1, task_id=job.task_id, node_id=job.node_id
    )


def test_a_group_of_jobs_reads_as_the_events_of_the_general_path() -> None:
    jobs = [
        Job(protocol=1, kind="job", id=f"job-{n}", role="r", attempt=n + 1, created_at_ms=1)
        for n in range(250)
    ]
    log = _bare_log()
    for job in jobs:
        log.started(_context(job))  # the hot path: one group per millisecond
    log.succeeded(jobs, "r")  # one group per acknowledged batch
    entries = log._entries(log._buffer)
    docs = [item for entry in entries for item in orjson.loads(entry)]
    assert {doc["kind"] for doc in docs} == {"lifecycle_jobs"}
    assert [sum(len(d["message_ids"]) for d in orjson.loads(e)) for e in entries] == [
        100,
        100,
        100,
        100,
        100,
    ]
    events = [e for entry in entries for e in decode_lifecycle({b"events": entry})[0]]
    general = _bare_log()
    for type_ in ("started", "succeeded"):
        for job in jobs:
            general.job(type_, job, "r")
    expected = [orjson.loads(raw) for raw in general._buffer]
    found = [e.model_dump(exclude_none=True) for e in events]
    for doc in [*expected, *found]:
        doc.pop("at_ms")
    assert found == expected
    assert [e.type for e in events] == ["started"] * 250 + ["succeeded"] * 250


def test_entries_are_bounded_in_events_and_bytes() -> None:
    log = _bare_log()
    log.add("progress", role="r", progress={"blob": "x" * 4000}, message="m" * 1000)
    for _ in range(5):
        log.add("progress", role="r", progress={"blob": "x" * 4000})
    jobs = [
        Job(protocol=1, kind="job", id="i" * 128, role="r", created_at_ms=1) for _ in range(150)
    ]
    log.succeeded(jobs, "r")
    entries = log._entries(log._buffer)
    assert all(len(entry) <= ENTRY_BYTES for entry in entries)
    counted = [len(decode_lifecycle({b"events": entry})[0]) for entry in entries]
    assert sum(counted) == 156 and max(counted) <= ENTRY_EVENTS


def test_a_task_jobs_events_keep_its_ids() -> None:
    job = Job(protocol=1, kind="job", id="a1", role="r", task_id="t1", created_at_ms=1)
    log = _bare_log()
    log.started(_context(job))
    log.succeeded([job], "r")
    events = decode_lifecycle({b"events": log._entries(log._buffer)[0]})[0]
    assert [(e.type, e.task_id) for e in events] == [("started", "t1"), ("succeeded", "t1")]


def test_a_reader_skips_bad_groups_and_bounds_what_one_entry_expands_to() -> None:
    group = {
        "protocol": 1,
        "kind": "lifecycle_jobs",
        "type": "succeeded",
        "at_ms": 1,
        "role": "r",
        "consumer": "w",
        "message_ids": ["a", "b"],
        "attempts": [1, 1],
    }
    uneven = {**group, "attempts": [1]}
    bad_id = {**group, "message_ids": ["a", "b c"]}
    other_type = {**group, "type": "failed"}
    events, problems = decode_lifecycle(
        {b"events": orjson.dumps([uneven, bad_id, other_type, group])}
    )
    assert [e.message_id for e in events] == ["a", "b"] and len(problems) == 3
    big = {**group, "message_ids": ["x"] * MAX_ITEM_JOBS, "attempts": [1] * MAX_ITEM_JOBS}
    events, problems = decode_lifecycle({b"events": orjson.dumps([big] * 20)})
    assert len(events) == MAX_ENTRY_EVENTS and len(problems) == 1


@pytest.mark.slow
async def test_submit_wait_and_status_show_a_running_nodes_progress(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    app, release = App(), anyio.Event()

    @app.role("halfway")
    async def halfway(ctx: Context, payload: Any) -> None:
        await ctx.progress(50, message="half")
        await release.wait()

    client, lines = Client(redis, namespace=namespace), []
    coordinator = Coordinator(redis, namespace=namespace, block_ms=100, sweep_interval=0.1)
    with anyio.fail_after(30):
        async with running(worker(app, redis, namespace)), anyio.create_task_group() as tg:
            await tg.start(coordinator.run)
            task_id = await client.submit(Graph("p").node("n", role="halfway"))
            tg.start_soon(partial(follow, client, task_id, echo=lines.append, live=False))
            await wait_until(lambda: any("[progress 50 half]" in line for line in lines))
            # status TASK reads it back from the node's job's progress key.
            done = await anyio.to_thread.run_sync(
                lambda: run_cli(
                    "status", task_id, "--redis-url", redis_url, "--namespace", namespace
                )
            )
            assert done.returncode == 0 and "[progress 50 half]" in done.stdout, done.stdout
            release.set()
            await wait_until(lambda: any(" succeeded " in line for line in lines))
            coordinator.stop()


async def test_a_settle_refused_by_the_owner_check_writes_no_final_event(
    redis: Redis, namespace: str
) -> None:
    app, release, outcomes = App(), anyio.Event(), []

    @app.role("fenced")
    async def fenced(ctx: Context, payload: Any) -> None:
        with ctx.shield():  # finishes even though its lease is taken away
            await release.wait()

    client = Client(redis, namespace=namespace)
    stream = Keys(namespace).role_stream("fenced")
    with anyio.fail_after(20):
        async with running(worker(app, redis, namespace, on_outcome=outcomes.append)):
            message_id = await client.publish("fenced", None)
            await wait_for_query(lambda: _has(redis, namespace, message_id, "started"))
            # Another consumer takes the entry over (as an adoption would) while it runs.
            (entry_id,) = [e for e, _ in await redis.xrange(stream)]
            await redis.xclaim(stream, GROUP, "thief", 0, [entry_id])
            release.set()
            await wait_until(lambda: [o.status for o in outcomes] == ["lost"])
            await anyio.sleep(0.3)  # past the linger: a final event would be written by now
    types = [e.type for e in await stored(redis, namespace) if e.message_id == message_id]
    assert types == ["started"]


async def _absent(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_a_failed_events_write_is_dropped_logged_once_and_never_fails_a_settle(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Events are best effort: a key of another type where they go (anyone with a worker's
    rights may write one) drops them, says so once, and every job is still acknowledged; once
    the key is gone they are written again."""
    caplog.set_level(logging.INFO, logger="streamflow.events")
    app, ran = App(), []

    @app.role("best")
    async def best(ctx: Context, payload: Any) -> None:
        ran.append(payload)

    keys = Keys(namespace)
    await redis.set(keys.lifecycle(), "not a stream")
    client = Client(redis, namespace=namespace)
    one = worker(app, redis, namespace)
    with anyio.fail_after(20):
        async with running(one):
            for n in range(30):
                await client.publish("best", n)
            await wait_until(lambda: len(ran) == 30 and one.statistics().acked == 30)
            await wait_until(lambda: one._events.dropped >= 60)  # started and succeeded
            await client.publish("best", 30)
            await wait_until(lambda: one._events.dropped >= 62)
            dropping = [r for r in caplog.records if "dropping lifecycle events" in r.message]
            assert len(dropping) == 1
            await redis.delete(keys.lifecycle())
            await client.publish("best", 31)
            await wait_until(lambda: one.statistics().acked == 32)
            await wait_for_query(lambda: _stored_types(redis, namespace))
    assert any("writing lifecycle events again" in r.message for r in caplog.records)
    assert await redis.xlen(keys.lifecycle()) >= 1


async def _stored_types(redis: Redis, namespace: str) -> bool:
    return {e.type for e in await stored(redis, namespace)} == {"started", "succeeded"}


async def test_a_write_of_many_entries_goes_in_bounded_calls_in_order(
    redis: Redis, namespace: str
) -> None:
    log = EventLog(redis, Keys(namespace), "w1", max_len=10_000)
    big = {"blob": "x" * 4000}
    for n in range(450):  # large events: a few to an entry, more entries than one call takes
        log.add("progress", role="r", progress=big | {"n": n})
    await log.flush()
    assert await redis.xlen(Keys(namespace).lifecycle()) > EVENT_ENTRIES
    events = await stored(redis, namespace)
    assert [e.progress["n"] for e in events if isinstance(e.progress, dict)] == list(range(450))
