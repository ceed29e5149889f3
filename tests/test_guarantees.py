"""Delivery guarantees on a real redis-server, with in-process workers and short leases.

Retries and their backoff, ``Retry``/``Fatal``, handler timeouts, deadlines, delayed publishing,
lease renewal, adoption of a dead consumer's entries, lost leases, consumer-name exclusivity,
dead-letter replay (API and CLI) and graceful stop.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Awaitable, Sequence
from datetime import timedelta
from typing import Any

import anyio
import orjson
import pytest
from anyio.abc import TaskStatus
from redis.asyncio import Redis

from streamflow import (
    App,
    Client,
    ConfigError,
    Context,
    Fatal,
    LeaseSettings,
    Outcome,
    Retry,
    RetryPolicy,
    connect,
    streams,
)
from streamflow.keys import GROUP, Keys
from streamflow.leases import RELEASE_IDLE_MS
from streamflow.protocol import decode_job, now_ms
from streamflow.records import decode_dead_letter
from tests.helpers import LEASE, ROOT, make_worker, running, statuses, wait_for_query, wait_until

pytestmark = pytest.mark.anyio


async def pending(redis: Redis, stream: str) -> list[dict[str, Any]]:
    """The group's pending entries: message_id, consumer, time_since_delivered, times_delivered."""
    rows: list[dict[str, Any]] = await redis.xpending_range(stream, GROUP, "-", "+", 1000)
    return rows


# -- retries ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_failed_attempts_are_retried_with_backoff_from_the_schedule_without_holding_a_slot(
    redis: Redis, namespace: str
) -> None:
    base = 0.4
    app = App()
    attempts: list[tuple[int, str, float]] = []
    events: list[str] = []

    @app.role("flaky", retry=RetryPolicy(max_attempts=3, backoff=base, factor=2.0))
    async def flaky(ctx: Context, payload: Any) -> None:
        if payload == "other":
            events.append("other")
            return
        attempts.append((ctx.attempt, ctx.message_id, time.monotonic()))
        events.append(f"attempt {ctx.attempt}")
        if ctx.attempt < 3:
            raise RuntimeError(f"transient failure on attempt {ctx.attempt}")

    keys = Keys(namespace)
    client = Client(redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(20):
        async with running(make_worker(app, redis, namespace, outcomes, concurrency=1)):
            message_id = await client.publish("flaky", "job")
            await wait_until(lambda: len(attempts) == 1)
            # The next attempt waits in the delayed schedule, not in the stream or the worker.
            await wait_for_query(lambda: _equals(redis.zcard(keys.delayed("flaky")), 1))
            assert len(attempts) == 1
            assert await redis.xlen(keys.role_stream("flaky")) == 0
            # The only handler slot is free during the backoff: another message runs now.
            await client.publish("flaky", "other")
            await wait_until(lambda: "other" in events)
            assert events == ["attempt 1", "other"]
            await wait_until(lambda: statuses(outcomes, message_id)[-1:] == ["acked"])
    assert [a for a, _, _ in attempts] == [1, 2, 3]
    assert {m for _, m, _ in attempts} == {message_id}
    gaps = [later[2] - earlier[2] for earlier, later in itertools.pairwise(attempts)]
    # The n-th retry waits at least half its base delay (the jitter's lower bound).
    assert gaps[0] >= base / 2, gaps
    assert gaps[1] >= base * 2 / 2, gaps
    assert statuses(outcomes, message_id) == ["retried", "retried", "acked"]
    assert await redis.zcard(keys.delayed("flaky")) == 0
    assert await redis.xlen(keys.role_stream("flaky")) == 0


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_short_backoffs_are_not_stretched_to_the_schedule_poll_interval(
    redis: Redis, namespace: str
) -> None:
    """Four retries with a 0.02 s base backoff each wait at most 0.02 s (plus overhead), not
    until the next one-second look at the delayed schedule."""
    app = App()
    starts: list[float] = []

    @app.role("quick", retry=RetryPolicy(max_attempts=5, backoff=0.02, factor=1.0))
    async def quick(ctx: Context, payload: Any) -> None:
        starts.append(time.monotonic())
        if ctx.attempt < 5:
            raise RuntimeError("again")

    outcomes: list[Outcome] = []
    with anyio.fail_after(15):
        async with running(make_worker(app, redis, namespace, outcomes)):
            message_id = await Client(redis, namespace=namespace).publish("quick")
            await wait_until(lambda: statuses(outcomes, message_id)[-1:] == ["acked"])
    gaps = [round(later - earlier, 3) for earlier, later in itertools.pairwise(starts)]
    assert len(gaps) == 4
    assert max(gaps) < 0.5, f"retries due after <= 0.02 s started after {gaps} s"


@pytest.mark.slow
async def test_raise_retry_with_a_delay_overrides_the_role_backoff(
    redis: Redis, namespace: str
) -> None:
    app = App()
    starts: list[float] = []

    @app.role("later", retry=RetryPolicy(max_attempts=2, backoff=60.0))
    async def later(ctx: Context, payload: Any) -> None:
        starts.append(time.monotonic())
        if ctx.attempt == 1:
            raise Retry("not ready yet", delay=0.3)

    outcomes: list[Outcome] = []
    with anyio.fail_after(15):
        async with running(make_worker(app, redis, namespace, outcomes)):
            message_id = await Client(redis, namespace=namespace).publish("later")
            await wait_until(lambda: statuses(outcomes, message_id) == ["retried", "acked"])
    gap = starts[1] - starts[0]
    assert 0.3 <= gap < 5.0, gap  # its own 0.3 s, not the role's 30-60 s backoff
    retried = outcomes[0]
    assert retried.error is not None and retried.error.type == "Retry"


async def test_exhausted_retries_are_dead_lettered_as_failed_with_the_last_error(
    redis: Redis, namespace: str
) -> None:
    app = App()
    calls: list[int] = []

    @app.role("doomed", retry=RetryPolicy(max_attempts=3, backoff=0.05))
    async def doomed(ctx: Context, payload: Any) -> None:
        calls.append(ctx.attempt)
        raise ValueError(f"bad value on attempt {ctx.attempt}")

    keys = Keys(namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(15):
        async with running(make_worker(app, redis, namespace, outcomes)):
            message_id = await Client(redis, namespace=namespace).publish("doomed", {"x": 1})
            await wait_until(lambda: "dead_lettered" in statuses(outcomes, message_id))
    assert calls == [1, 2, 3]
    assert statuses(outcomes, message_id) == ["retried", "retried", "dead_lettered"]
    assert outcomes[-1].reason == "failed"
    (entry,) = await streams.read_range(redis, keys.dead_letters("doomed"))
    letter, raw = decode_dead_letter(entry.fields)
    assert letter.reason == "failed"
    assert letter.message_id == message_id
    assert letter.attempts == 3
    assert letter.error is not None
    assert letter.error.type == "ValueError"
    assert letter.error.message == "bad value on attempt 3"
    assert "attempt 3 of 3" in letter.detail
    assert letter.job is not None and letter.job.attempt == 3 and letter.job.payload == {"x": 1}
    assert decode_job({b"message": raw["message"]}).id == message_id
    assert await redis.xlen(keys.role_stream("doomed")) == 0
    assert await redis.zcard(keys.delayed("doomed")) == 0


async def test_fatal_is_dead_lettered_at_once_without_a_retry(redis: Redis, namespace: str) -> None:
    app = App()
    calls: list[int] = []

    @app.role("strict", retry=RetryPolicy(max_attempts=5, backoff=0.05))
    async def strict(ctx: Context, payload: Any) -> None:
        calls.append(ctx.attempt)
        raise Fatal("this order can never be shipped")

    keys = Keys(namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            message_id = await Client(redis, namespace=namespace).publish("strict")
            await wait_until(lambda: statuses(outcomes, message_id) == ["dead_lettered"])
            assert await redis.zcard(keys.delayed("strict")) == 0  # no retry scheduled
    assert calls == [1]
    assert outcomes[0].reason == "fatal"
    (entry,) = await streams.read_range(redis, keys.dead_letters("strict"))
    letter, _ = decode_dead_letter(entry.fields)
    assert letter.reason == "fatal"
    assert letter.attempts == 1
    assert letter.detail == "this order can never be shipped"
    assert letter.error is not None and letter.error.type == "Fatal"
    assert await redis.xlen(keys.role_stream("strict")) == 0


@pytest.mark.slow
async def test_handler_timeout_cancels_the_handler_and_counts_as_a_failed_attempt(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started: list[float] = []
    cleaned_up: list[float] = []

    @app.role("slow", timeout=0.2, retry=RetryPolicy(max_attempts=2, backoff=0.05))
    async def slow(ctx: Context, payload: Any) -> None:
        started.append(time.monotonic())
        try:
            await anyio.sleep(30)
        finally:
            cleaned_up.append(time.monotonic())

    keys = Keys(namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(15):
        async with running(make_worker(app, redis, namespace, outcomes)):
            message_id = await Client(redis, namespace=namespace).publish("slow")
            await wait_until(lambda: "dead_lettered" in statuses(outcomes, message_id))
    assert statuses(outcomes, message_id) == ["retried", "dead_lettered"]
    assert len(started) == len(cleaned_up) == 2  # each attempt's finally block ran
    for begin, end in zip(started, cleaned_up, strict=True):
        assert 0.2 <= end - begin < 5.0
    (entry,) = await streams.read_range(redis, keys.dead_letters("slow"))
    letter, _ = decode_dead_letter(entry.fields)
    assert letter.reason == "failed"
    assert letter.attempts == 2
    assert "timed out" in letter.detail
    assert letter.error is not None and "timed out" in letter.error.message


# -- deadlines and delays --------------------------------------------------------------------


async def test_a_message_past_its_deadline_is_dead_lettered_as_expired_and_never_started(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started: list[str] = []

    @app.role("timely")
    async def timely(ctx: Context, payload: Any) -> None:
        started.append(ctx.message_id)

    keys = Keys(namespace)
    client = Client(redis, namespace=namespace)
    late = await client.publish("timely", 1, deadline=timedelta(seconds=-1))
    raw = orjson.dumps(
        {
            "protocol": 1,
            "kind": "job",
            "id": "raw-expired",
            "role": "timely",
            "created_at_ms": 1,
            "deadline_ms": 2,
        }
    )
    await redis.xadd(keys.role_stream("timely"), {b"message": raw})
    on_time = await client.publish("timely", 2, deadline=timedelta(minutes=5))
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            await wait_until(lambda: len(outcomes) == 3)
    assert started == [on_time]
    expired = {o.message_id: o.reason for o in outcomes if o.status == "dead_lettered"}
    assert expired == {late: "expired", "raw-expired": "expired"}
    letters = [
        decode_dead_letter(e.fields)[0]
        for e in await streams.read_range(redis, keys.dead_letters("timely"))
    ]
    assert {letter.reason for letter in letters} == {"expired"}
    # attempts is the job's attempt number when it was dead-lettered: its first, never started.
    assert all(letter.attempts == 1 and "deadline passed" in letter.detail for letter in letters)


@pytest.mark.slow
async def test_a_retry_whose_deadline_passes_during_the_backoff_expires(
    redis: Redis, namespace: str
) -> None:
    app = App()
    calls: list[int] = []

    @app.role("hurry", retry=RetryPolicy(max_attempts=3, backoff=1.0))
    async def hurry(ctx: Context, payload: Any) -> None:
        calls.append(ctx.attempt)
        raise RuntimeError("try again")

    outcomes: list[Outcome] = []
    with anyio.fail_after(15):
        async with running(make_worker(app, redis, namespace, outcomes)):
            message_id = await Client(redis, namespace=namespace).publish(
                "hurry", deadline=timedelta(seconds=0.3)
            )
            await wait_until(lambda: "dead_lettered" in statuses(outcomes, message_id))
    assert calls == [1]  # the second attempt (due after >= 0.5 s) was past the deadline
    assert statuses(outcomes, message_id) == ["retried", "dead_lettered"]
    assert outcomes[-1].reason == "expired"


@pytest.mark.slow
async def test_a_delayed_publish_starts_no_earlier_than_its_delay(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started: dict[str, float] = {}

    @app.role("timer")
    async def timer(ctx: Context, payload: Any) -> None:
        started[ctx.message_id] = time.monotonic()

    keys = Keys(namespace)
    client = Client(redis, namespace=namespace)
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace)):
            before = time.monotonic()
            delayed = await client.publish("timer", delay=0.5)
            now = await client.publish("timer")
            # It waits in the role's schedule, not in the stream.
            assert await redis.zcard(keys.delayed("timer")) == 1
            await wait_until(lambda: delayed in started and now in started)
    assert started[delayed] - before >= 0.5
    assert started[now] < started[delayed]
    assert await redis.zcard(keys.delayed("timer")) == 0


@pytest.mark.slow
async def test_a_delayed_publish_with_a_dedup_key_publishes_once(
    redis: Redis, namespace: str
) -> None:
    app = App()
    handled: list[Any] = []

    @app.role("once")
    async def once(ctx: Context, payload: Any) -> None:
        handled.append((ctx.message_id, payload))

    keys = Keys(namespace)
    client = Client(redis, namespace=namespace)
    first = await client.publish("once", 1, dedup_key="invoice-7", delay=0.3)
    again = await client.publish("once", 2, dedup_key="invoice-7", delay=0.3)
    assert again == first
    assert await redis.zcard(keys.delayed("once")) == 1
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            await wait_until(lambda: len(outcomes) == 1)
            # No second copy is due later either.
            assert await redis.zcard(keys.delayed("once")) == 0
            assert await redis.xlen(keys.role_stream("once")) == 0
    assert handled == [(first, 1)]
    assert await client.publish("once", 3, dedup_key="invoice-7") == first  # still remembered


# -- leases ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_lease_renewal_keeps_a_long_handler_from_being_adopted(
    redis: Redis, namespace: str
) -> None:
    # A TTL of 2 s (renewals every 0.67 s): the loop this test shares with both workers may
    # stall for a second on a loaded machine without the lease lapsing.
    lease = LeaseSettings(ttl=2.0, reclaim_interval=0.1)
    app = App()
    runs: list[str] = []
    done = anyio.Event()

    @app.role("long")
    async def long(ctx: Context, payload: Any) -> None:
        runs.append(ctx.consumer)
        await anyio.sleep(3 * lease.ttl)
        done.set()

    stream = Keys(namespace).role_stream("long")
    outcomes: list[Outcome] = []
    first = make_worker(app, redis, namespace, outcomes, consumer="renewer-a", lease=lease)
    second = make_worker(app, redis, namespace, outcomes, consumer="renewer-b", lease=lease)
    idle: list[int] = []
    with anyio.fail_after(30):
        async with running(first), running(second):
            await Client(redis, namespace=namespace).publish("long")
            await wait_until(lambda: runs)
            while not done.is_set():
                rows = await pending(redis, stream)
                if rows:
                    assert [r["consumer"].decode() for r in rows] == runs[:1]
                    idle.append(int(rows[0]["time_since_delivered"]))
                await anyio.sleep(0.05)
            await wait_until(lambda: len(outcomes) == 1)
    assert len(runs) == 1
    assert [o.status for o in outcomes] == ["acked"]
    assert len(idle) > 10
    assert max(idle) < lease.ttl_ms, max(idle)
    assert first.statistics().adopted == second.statistics().adopted == 0
    owner = first if runs[0] == first.consumer else second
    assert owner.statistics().renewals >= 3


@pytest.mark.slow
async def test_entries_of_a_dead_consumer_are_adopted_after_the_lease_ttl(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started: dict[str, float] = {}
    release = anyio.Event()

    @app.role("orphans")
    async def orphans(ctx: Context, payload: Any) -> None:
        started[ctx.message_id] = time.monotonic()
        await release.wait()

    stream = Keys(namespace).role_stream("orphans")
    await streams.ensure_group(redis, stream)
    ids = await Client(redis, namespace=namespace).publish_many("orphans", range(3))
    # A worker called "ghost" read them and died without acknowledging anything.
    read_at = time.monotonic()
    ghost = await streams.read_group(redis, stream, "ghost", count=10, block_ms=None)
    assert len(ghost) == 3
    outcomes: list[Outcome] = []
    worker = make_worker(app, redis, namespace, outcomes)
    with anyio.fail_after(15):
        async with running(worker):
            await wait_until(lambda: len(started) == 3)
            rows = await pending(redis, stream)
            assert {r["consumer"].decode() for r in rows} == {worker.consumer}
            assert [r["times_delivered"] for r in rows] == [2, 2, 2]
            release.set()
            await wait_until(lambda: len(outcomes) == 3)
    assert set(started) == set(ids)
    assert min(started.values()) - read_at >= LEASE.ttl
    assert {o.status for o in outcomes} == {"acked"}
    assert worker.statistics().adopted == 3
    assert await pending(redis, stream) == []
    assert await redis.xlen(stream) == 0


@pytest.mark.slow
async def test_an_entry_delivered_more_than_max_deliveries_is_dead_lettered_as_poison(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started: list[str] = []

    @app.role("poison", max_deliveries=2)
    async def poison(ctx: Context, payload: Any) -> None:
        started.append(ctx.message_id)

    keys = Keys(namespace)
    stream = keys.role_stream("poison")
    await streams.ensure_group(redis, stream)
    message_id = await Client(redis, namespace=namespace).publish("poison")
    (entry,) = await streams.read_group(redis, stream, "crashed-1", count=1, block_ms=None)
    await redis.xclaim(stream, GROUP, "crashed-2", 0, [entry.id])  # adopted, crashed again
    # crashed-2 counted its rerun before starting it, as every worker does for a redelivery.
    await streams.count_start(redis, keys.starts("poison", entry.id.decode()))
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            await wait_until(lambda: outcomes)
    assert started == []
    assert [(o.message_id, o.status, o.reason) for o in outcomes] == [
        (message_id, "dead_lettered", "max_deliveries")
    ]
    (dead,) = await streams.read_range(redis, keys.dead_letters("poison"))
    letter, _ = decode_dead_letter(dead.fields)
    assert letter.reason == "max_deliveries" and "started 2 times (limit 2)" in letter.detail
    # What is known, not a guess: the lease expired before an outcome was settled, whether
    # the worker died, froze, or had its event loop blocked by the handler.
    assert "crashed or froze each time" not in letter.detail
    assert "lease expired" in letter.detail and "event loop blocked" in letter.detail


#: Lost-lease tests renew often and adopt late: the loss is seen at once, and the worker does
#: not adopt the stolen entry back before the test has looked at it.
LOST_LEASE = LeaseSettings(ttl=3.0, renew_interval=0.1, reclaim_interval=0.1)


async def test_a_lost_lease_cancels_the_handler_and_applies_no_outcome(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started = anyio.Event()
    finally_seen: list[str | None] = []

    @app.role("stolen")
    async def stolen(ctx: Context, payload: Any) -> None:
        started.set()
        try:
            await anyio.sleep(30)
        finally:
            finally_seen.append(ctx.cancel.reason)

    keys = Keys(namespace)
    stream = keys.role_stream("stolen")
    outcomes: list[Outcome] = []
    worker = make_worker(app, redis, namespace, outcomes, lease=LOST_LEASE)
    with anyio.fail_after(10):
        async with running(worker):
            message_id = await Client(redis, namespace=namespace).publish("stolen")
            await started.wait()
            (row,) = await pending(redis, stream)
            await redis.xclaim(stream, GROUP, "thief", 0, [row["message_id"]])
            await wait_until(lambda: outcomes)
    assert finally_seen == ["lease lost"]
    assert [o.status for o in outcomes] == ["lost"]
    # Nothing was applied: still in the stream, pending under the thief, no dead letter.
    rows = await pending(redis, stream)
    assert [(r["message_id"], r["consumer"]) for r in rows] == [(row["message_id"], b"thief")]
    assert await redis.xlen(stream) == 1
    assert await redis.xlen(keys.dead_letters("stolen")) == 0
    assert await redis.zcard(keys.delayed("stolen")) == 0
    stats = worker.statistics()
    assert (stats.lost, stats.acked, stats.retried, stats.dead_lettered) == (1, 0, 0, 0)
    assert stats.lease_losses == {"renewal": 1}  # found while the handler ran
    # The outcome still names the message (the job was decoded and ran).
    assert outcomes[0].message_id == message_id


async def test_a_sync_handler_that_finishes_after_losing_its_lease_is_not_acknowledged(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started = threading.Event()
    saw_cancel: list[bool] = []

    @app.role("stubborn")
    def stubborn(ctx: Context, payload: Any) -> None:
        started.set()
        deadline = time.monotonic() + 10
        while not ctx.cancel.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)  # a thread cannot be interrupted: it notices and returns
        saw_cancel.append(ctx.cancel.cancelled)

    keys = Keys(namespace)
    stream = keys.role_stream("stubborn")
    outcomes: list[Outcome] = []
    worker = make_worker(app, redis, namespace, outcomes, lease=LOST_LEASE)
    with anyio.fail_after(15):
        async with running(worker):
            message_id = await Client(redis, namespace=namespace).publish("stubborn")
            await wait_until(started.is_set)
            (row,) = await pending(redis, stream)
            await redis.xclaim(stream, GROUP, "thief", 0, [row["message_id"]])
            await wait_until(lambda: outcomes)
    assert saw_cancel == [True]
    assert [o.status for o in outcomes] == ["lost"]
    rows = await pending(redis, stream)
    assert [(r["message_id"], r["consumer"]) for r in rows] == [(row["message_id"], b"thief")]
    assert await redis.xlen(stream) == 1  # the refused ack deleted nothing
    assert worker.statistics().acked == 0
    # Found at renewal; the refused ack of the same delivery is not counted again.
    assert worker.statistics().lease_losses == {"renewal": 1}
    assert outcomes[0].message_id == message_id


async def test_a_live_consumer_name_cannot_be_used_by_a_second_worker(
    redis: Redis, namespace: str
) -> None:
    app = App()
    handled: list[str] = []

    @app.role("named")
    async def named(ctx: Context, payload: Any) -> None:
        handled.append(ctx.consumer)

    keys = Keys(namespace)
    client = Client(redis, namespace=namespace)
    alive = keys.consumer_alive("same-name")
    with anyio.fail_after(15):
        async with running(make_worker(app, redis, namespace, consumer="same-name")):
            holder = await redis.get(alive)
            assert holder
            second = make_worker(app, redis, namespace, consumer="same-name")
            with pytest.raises(ConfigError, match="same-name"):
                await second.run()
            assert await redis.get(alive) == holder  # the refused worker did not free it
            await client.publish("named")
            await wait_until(lambda: len(handled) == 1)
        assert await redis.exists(alive) == 0  # a clean stop gives the name up
        async with running(make_worker(app, redis, namespace, consumer="same-name")):
            await client.publish("named")
            await wait_until(lambda: len(handled) == 2)
    assert handled == ["same-name", "same-name"]


@pytest.mark.slow
async def test_the_name_of_a_crashed_worker_is_free_again_after_its_liveness_ttl(
    redis: Redis, namespace: str
) -> None:
    app = App()
    handled: list[str] = []

    @app.role("named")
    async def named(ctx: Context, payload: Any) -> None:
        handled.append(ctx.consumer)

    # A worker that died without a clean stop left its liveness key behind (TTL 1 s here).
    alive = Keys(namespace).consumer_alive("crashed")
    await redis.set(alive, "token-of-a-dead-process", px=LEASE.ttl_ms)
    with pytest.raises(ConfigError, match="crashed"):
        await make_worker(app, redis, namespace, consumer="crashed").run()
    await wait_for_query(lambda: _equals(redis.exists(alive), 0), timeout=5)
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, consumer="crashed")):
            await Client(redis, namespace=namespace).publish("named")
            await wait_until(lambda: handled == ["crashed"])


# -- dead letters: replay --------------------------------------------------------------------


async def _dead_letter_all(
    redis: Redis, namespace: str, role: str, count: int, *, extra: Sequence[bytes] = ()
) -> list[str]:
    """Publish ``count`` jobs that fail twice (then die) and raw ``extra`` entries; run them all."""
    app = App()

    @app.role(role, retry=RetryPolicy(max_attempts=2, backoff=0.0))
    async def doomed(ctx: Context, payload: Any) -> None:
        raise ValueError("no luck")

    ids = await Client(redis, namespace=namespace).publish_many(role, range(count))
    for body in extra:
        await redis.xadd(Keys(namespace).role_stream(role), {b"message": body})
    outcomes: list[Outcome] = []
    with anyio.fail_after(20):
        async with running(make_worker(app, redis, namespace, outcomes)):
            await wait_until(
                lambda: sum(o.status == "dead_lettered" for o in outcomes) == count + len(extra)
            )
    return ids


async def test_concurrent_replays_send_each_dead_letter_back_exactly_once(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    ids = await _dead_letter_all(redis, namespace, "again", 50, extra=[b"{not json"])
    letters = [
        decode_dead_letter(e.fields)[0]
        for e in await streams.read_range(redis, keys.dead_letters("again"))
    ]
    assert len(letters) == 51
    assert {(l.reason, l.attempts) for l in letters if l.job} == {("failed", 2)}  # noqa: E741
    (bad,) = [l for l in letters if l.job is None]  # noqa: E741
    assert bad.reason == "invalid_json"

    results = []
    with anyio.fail_after(20):
        async with (
            Client.from_url(redis_url, namespace=namespace) as one,
            Client.from_url(redis_url, namespace=namespace) as two,
        ):

            async def replay(client: Client) -> None:
                results.append(await client.replay("again"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(replay, one)
                tg.start_soon(replay, two)
    replayed = [dead_id for result in results for dead_id, _ in result.replayed]
    assert len(replayed) == 50
    assert len(set(replayed)) == 50
    for result in results:  # each replay saw the malformed one and said why it skipped it
        reasons = dict(result.skipped)
        assert any("invalid_json" in why for why in reasons.values()), result.skipped
    jobs = [
        decode_job(e.fields) for e in await streams.read_range(redis, keys.role_stream("again"))
    ]
    assert len(jobs) == 50
    assert sorted(job.id for job in jobs) == sorted(ids)
    assert {job.attempt for job in jobs} == {1}
    remaining = await streams.read_range(redis, keys.dead_letters("again"))
    assert [decode_dead_letter(e.fields)[0].reason for e in remaining] == ["invalid_json"]


async def test_replay_skips_a_corrupt_dead_letter_entry_with_a_reason(
    redis: Redis, namespace: str
) -> None:
    """One unreadable entry in a dead-letter stream must not block replaying the others."""
    keys = Keys(namespace)
    ids = await _dead_letter_all(redis, namespace, "mixed", 2)
    corrupt = await redis.xadd(keys.dead_letters("mixed"), {b"dead_letter": b"{garbage"})
    with anyio.fail_after(10):
        result = await Client(redis, namespace=namespace).replay("mixed")
    assert len(result.replayed) == 2
    assert [dead_id for dead_id, _ in result.skipped] == [_text(corrupt)]
    jobs = [
        decode_job(e.fields) for e in await streams.read_range(redis, keys.role_stream("mixed"))
    ]
    assert sorted(job.id for job in jobs) == sorted(ids)


async def cli(*args: str) -> tuple[int, str, str]:
    """Run ``python -m streamflow ARGS``; returns (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    with anyio.fail_after(30):
        done = await anyio.run_process(
            [sys.executable, "-m", "streamflow", *args], check=False, cwd=ROOT, env=env
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.mark.slow
async def test_dlq_cli_lists_shows_replays_and_purges(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    ids = await _dead_letter_all(redis, namespace, "cli-dead", 3)
    conn = ["--redis-url", redis_url, "--namespace", namespace]

    code, out, err = await cli("dlq", "list", "cli-dead", *conn)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1] == "3 dead letters in 'cli-dead'"
    assert len(lines) == 4 and all("failed" in line and "attempts=2" in line for line in lines[:3])
    dead_ids = [line.split()[0] for line in lines[:3]]

    code, out, err = await cli("dlq", "list", "cli-dead", "--json", *conn)
    assert code == 0, err
    docs = [orjson.loads(line) for line in out.strip().splitlines()]
    assert [d["id"] for d in docs] == dead_ids
    assert sorted(d["message_id"] for d in docs) == sorted(ids)

    code, out, err = await cli("dlq", "show", "cli-dead", dead_ids[0], *conn)
    assert code == 0, err
    shown = orjson.loads(out)
    assert shown["id"] == dead_ids[0] and shown["reason"] == "failed"
    assert shown["error"]["type"] == "ValueError"
    assert orjson.loads(shown["raw"]["message"])["id"] == shown["message_id"]

    code, out, err = await cli("dlq", "show", "cli-dead", "0-1", *conn)
    assert code == 2 and "no dead letter" in err

    code, out, err = await cli("dlq", "replay", "cli-dead", dead_ids[0], *conn)
    assert code == 0, err
    assert f"replayed {dead_ids[0]} -> " in out and "1 replayed, 0 skipped" in out
    (job,) = [
        decode_job(e.fields) for e in await streams.read_range(redis, keys.role_stream("cli-dead"))
    ]
    assert job.id == shown["message_id"] and job.attempt == 1

    code, out, err = await cli("dlq", "replay", "cli-dead", dead_ids[0], *conn)
    assert code == 3, err  # nothing was replayed
    assert "0 replayed, 1 skipped" in out and f"skipped {dead_ids[0]}" in err

    code, out, err = await cli("dlq", "replay", "cli-dead", *conn)
    assert code == 2 and "--all" in err

    code, out, err = await cli("dlq", "purge", "cli-dead", "--yes", *conn)
    assert code == 0, err
    assert "purged 2 dead letters" in out

    code, out, err = await cli("dlq", "list", "cli-dead", *conn)
    assert code == 0 and out.strip().splitlines() == ["0 dead letters in 'cli-dead'"]
    code, out, err = await cli("dlq", "replay", "cli-dead", "--all", *conn)
    assert code == 3 and "0 replayed, 0 skipped" in out
    assert await redis.xlen(keys.role_stream("cli-dead")) == 1


@pytest.mark.slow
async def test_dlq_cli_answers_a_malformed_dead_letter_id_with_one_line_not_a_traceback(
    redis_url: str, namespace: str
) -> None:
    conn = ["--redis-url", redis_url, "--namespace", namespace]
    for command in ("show", "replay"):
        code, _, err = await cli("dlq", command, "cli-bad", "not-an-id", *conn)
        assert "Traceback" not in err, err
        assert code == 2 and err.startswith("error:"), (code, err)


@pytest.mark.slow
async def test_dlq_cli_list_shows_the_readable_dead_letters_beside_a_corrupt_one(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    await _dead_letter_all(redis, namespace, "cli-corrupt", 2)
    await redis.xadd(keys.dead_letters("cli-corrupt"), {b"dead_letter": b"{garbage"})
    code, out, err = await cli(
        "dlq", "list", "cli-corrupt", "--redis-url", redis_url, "--namespace", namespace
    )
    assert code == 0, err
    assert sum("failed" in line for line in out.splitlines()) == 2, out


# -- graceful stop ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_stop_runs_only_the_started_message_and_hands_back_the_rest_unstarted(
    redis: Redis, namespace: str
) -> None:
    """Concurrency 1, five slow messages, stop once the first has started: the first finishes
    and is acked; none of the other four starts. Those the worker had read ahead are released
    (idle past any TTL, delivery count lowered so adoption restores it); the rest were never
    delivered. The next worker runs all four as first attempts, each with delivery count 1."""
    app = App()
    stream = Keys(namespace).role_stream("queue")
    started: list[tuple[str, int]] = []
    delivery_counts: dict[str, int] = {}

    @app.role("queue")
    async def queue(ctx: Context, payload: Any) -> None:
        started.append((ctx.message_id, ctx.attempt))
        (row,) = await redis.xpending_range(stream, GROUP, ctx.entry_id, ctx.entry_id, 1)
        delivery_counts[ctx.message_id] = int(row["times_delivered"])
        await anyio.sleep(0.3)

    ids = await Client(redis, namespace=namespace).publish_many("queue", range(5))
    outcomes: list[Outcome] = []
    worker = make_worker(app, redis, namespace, outcomes, concurrency=1)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await wait_until(lambda: started)
            worker.stop()
    assert started == [(ids[0], 1)]
    # (Acks are batched, so a release may be reported before the ack.)
    assert [o.message_id for o in outcomes if o.status == "acked"] == [ids[0]]
    released = [o for o in outcomes if o.status != "acked"]
    assert {o.status for o in released} <= {"released"}
    assert worker.statistics().released == len(released)
    rows = await pending(redis, stream)
    assert sorted(r["message_id"].decode() for r in rows) == sorted(o.entry_id for o in released)
    for row in rows:
        assert row["consumer"].decode() == worker.consumer
        assert row["time_since_delivered"] >= RELEASE_IDLE_MS - 60_000  # past any lease TTL
        assert row["times_delivered"] == 0  # adoption adds the 1 back
    assert await redis.xlen(stream) == 4
    after = make_worker(app, redis, namespace, outcomes, concurrency=1)
    with anyio.fail_after(15):
        async with running(after):
            await wait_until(lambda: len(started) == 5 and outcomes[-1].status == "acked")
    assert sorted(started[1:]) == sorted((i, 1) for i in ids[1:])
    assert delivery_counts == dict.fromkeys(ids, 1)
    assert after.statistics().adopted == len(released)
    assert await pending(redis, stream) == []
    assert await redis.xlen(stream) == 0


@pytest.mark.slow
async def test_a_handler_past_the_shutdown_grace_is_released_for_immediate_adoption(
    redis: Redis, namespace: str
) -> None:
    app = App()
    runs: list[str] = []

    @app.role("sticky")
    async def sticky(ctx: Context, payload: Any) -> None:
        runs.append(ctx.consumer)
        if len(runs) == 1:
            await anyio.sleep(30)

    stream = Keys(namespace).role_stream("sticky")
    # A long lease: only the release (not the TTL) can make the entry adoptable within the test.
    lease = LeaseSettings(ttl=60.0, reclaim_interval=0.1)
    outcomes: list[Outcome] = []
    first = make_worker(app, redis, namespace, outcomes, shutdown_grace=0.2, lease=lease)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(first.run)
            message_id = await Client(redis, namespace=namespace).publish("sticky")
            await wait_until(lambda: runs)
            first.stop()
    assert [o.status for o in outcomes] == ["released"]
    (row,) = await pending(redis, stream)
    assert row["consumer"].decode() == first.consumer
    assert row["time_since_delivered"] >= RELEASE_IDLE_MS - 60_000  # past any lease TTL
    assert row["times_delivered"] == 0  # lowered, so that the adoption restores it to 1
    second = make_worker(app, redis, namespace, outcomes, lease=lease)
    with anyio.fail_after(10):
        async with running(second):
            await wait_until(lambda: len(outcomes) == 2)
    assert runs == [first.consumer, second.consumer]
    assert [(o.message_id, o.status) for o in outcomes[1:]] == [(message_id, "acked")]
    assert second.statistics().adopted == 1
    assert outcomes[0].message_id == message_id  # the released outcome names its message too


@pytest.mark.slow
async def test_more_roles_than_free_slots_do_not_overflow_the_worker(
    redis_url: str, namespace: str
) -> None:
    """Three roles, concurrency 1: the three readers each see the one free slot, so one message
    per role arriving at once gives the worker three entries for one slot. It must queue them,
    not crash (it once raised WouldBlock from a bounded memory stream), and still run one
    handler at a time."""
    app = App()
    active = peak = 0
    handled: list[str] = []

    async def handle(ctx: Context, payload: Any) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await anyio.sleep(0.5)  # busy while the other readers' replies arrive
        active -= 1
        handled.append(ctx.role)

    roles = ["r1", "r2", "r3"]
    for role in roles:
        app.role(role)(handle)
    name = f"overflow-{namespace}"
    redis = connect.connect(redis_url, name=name)
    keys = Keys(namespace)
    crashed: list[BaseException] = []
    worker = make_worker(app, redis, namespace, concurrency=1, block_ms=1500)

    async def run_worker(*, task_status: TaskStatus[None]) -> None:
        try:
            await worker.run(task_status=task_status)
        except Exception as exc:
            crashed.append(exc)

    async def readers_blocked() -> bool:
        clients = await redis.client_list()
        blocked = [c for c in clients if c.get("name") == name and c.get("cmd") == "xreadgroup"]
        return sum("b" in c.get("flags", "") for c in blocked) == len(roles)

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(run_worker)
                await wait_for_query(readers_blocked)
                pipe = redis.pipeline(transaction=True)
                for role in roles:
                    pipe.xadd(keys.role_stream(role), {b"message": _job(role)})
                await pipe.execute()
                await wait_until(lambda: len(handled) == len(roles) or crashed)
                worker.stop()
    finally:
        await redis.aclose()
    assert not crashed, f"the worker crashed: {crashed[0]!r}"
    assert sorted(handled) == roles
    assert peak == 1


def _job(role: str) -> bytes:
    doc = {
        "protocol": 1,
        "kind": "job",
        "id": f"job-{role}",
        "role": role,
        "created_at_ms": now_ms(),
    }
    return orjson.dumps(doc)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
