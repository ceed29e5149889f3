"""Leases against a real redis-server: fencing tokens and where a lost lease is found."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import redis as sync_redis
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from streamflow import App, Client, Context, Retry, Worker, scripts, streams
from streamflow.delivery import Delivery, Outcome
from streamflow.keys import GROUP, Keys
from streamflow.leases import LeaseSettings
from streamflow.runner import fencing_token
from streamflow.scripts import Scripts
from tests.helpers import ROOT, running, wait_until

pytestmark = pytest.mark.anyio


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.slow
async def test_fencing_token_rises_with_every_change_of_owner(redis: Redis, namespace: str) -> None:
    """A dead worker's delivery, the adoption of it, then a retry: each run's token is larger
    than every token before it."""
    app = App()
    runs: list[tuple[int, int]] = []  # (attempt, token)

    @app.role("fenced")
    async def fenced(ctx: Context, payload: Any) -> None:
        runs.append((ctx.attempt, ctx.fencing_token))
        if ctx.attempt == 1:
            raise Retry("again", delay=0)

    keys = Keys(namespace)
    stream = keys.role_stream("fenced")
    await Client(redis, namespace=namespace).publish("fenced", {"n": 1})
    await streams.ensure_group(redis, stream)
    # A worker that took the entry and died: its delivery counted 1.
    [ghost] = await streams.read_group(redis, stream, "ghost-1", count=1, block_ms=None)
    ghost_token = fencing_token(1, ghost.deliveries)
    lease = LeaseSettings(ttl=0.3, reclaim_interval=0.05)
    with anyio.fail_after(20):
        async with running(Worker(app, redis, namespace=namespace, block_ms=100, lease=lease)):
            await wait_until(lambda: len(runs) == 2, 15)
    (first_attempt, adopted), (second_attempt, retried) = runs
    assert (first_attempt, second_attempt) == (1, 2)
    assert ghost_token == (1 << 32) | 1
    assert adopted == (1 << 32) | 2 > ghost_token  # the adoption added a delivery
    assert retried == (2 << 32) | 1 > adopted  # a retry is a new entry with a higher attempt


def fenced_set_script() -> str:
    """The Lua block after ``<!-- example: fenced-set -->`` in docs/concepts.md."""
    text = (ROOT / "docs" / "concepts.md").read_text()
    return text.split("<!-- example: fenced-set -->\n```lua\n", 1)[1].split("```", 1)[0]


async def test_the_documented_fenced_write_refuses_a_late_run(redis: Redis, namespace: str) -> None:
    """The concepts page's fenced SET, run as printed: a frozen run's late write loses to the
    run that adopted its entry, and both lose to a retry; a run may write again."""
    fenced = redis.register_script(fenced_set_script())
    keys = [f"{namespace}:effect", f"{namespace}:effect:fence"]
    frozen, adopted, retried = fencing_token(1, 1), fencing_token(1, 2), fencing_token(2, 1)
    assert await fenced(keys=keys, args=["adopted", adopted]) == 1
    assert await fenced(keys=keys, args=["frozen", frozen]) == 0  # lands late: refused
    assert await redis.get(keys[0]) == b"adopted"
    assert await fenced(keys=keys, args=["adopted again", adopted]) == 1
    assert await fenced(keys=keys, args=["retried", retried]) == 1
    assert await fenced(keys=keys, args=["adopted late", adopted]) == 0
    assert await redis.get(keys[0]) == b"retried"


def lease_app(gate: anyio.Event, started: anyio.Event) -> App:
    app = App()

    @app.role("held")
    async def held(ctx: Context, payload: Any) -> None:
        started.set()
        await gate.wait()

    return app


async def steal(redis: Redis, stream: str, to: str = "thief") -> None:
    """Give every pending entry of ``stream`` to consumer ``to`` (as an adoption would)."""
    rows: Any = await redis.xpending_range(stream, GROUP, "-", "+", 100)
    ids = [row["message_id"] for row in rows]
    await redis.xclaim(stream, GROUP, to, 0, ids, justid=True)


async def test_a_lease_lost_found_only_at_settle_is_counted_as_such(
    redis: Redis, namespace: str
) -> None:
    """The handler finishes before any renewal notices that another worker took the entry:
    the refused acknowledgement is a lost lease (the handler may have run twice) and is
    counted in streamflow_lease_losses_total{found="settle"}."""
    gate, started = anyio.Event(), anyio.Event()
    outcomes: list[Outcome] = []
    worker = Worker(
        lease_app(gate, started),
        redis,
        namespace=namespace,
        block_ms=100,
        lease=LeaseSettings(ttl=60),  # no renewal during the test
        on_outcome=outcomes.append,
    )
    registry = worker.enable_metrics()
    stream = Keys(namespace).role_stream("held")
    with anyio.fail_after(20):
        async with running(worker):
            await Client(redis, namespace=namespace).publish("held", {})
            await started.wait()
            await steal(redis, stream)
            gate.set()
            await wait_until(lambda: bool(outcomes))
    assert [o.status for o in outcomes] == ["lost"]
    assert worker.statistics().lease_losses == {"settle": 1}
    assert sample(registry, "streamflow_lease_losses_total", found="settle") == 1
    assert sample(registry, "streamflow_lease_losses_total", found="renewal") == 0
    # The other consumer still holds it: nothing was applied.
    assert await redis.xlen(stream) == 1


async def test_a_renewal_leaves_a_queued_ack_to_be_found_lost_at_settle(
    redis: Redis, namespace: str
) -> None:
    """A handler finished and its ack waits for the acker's next batch when a renewal finds
    the entry owned elsewhere: nothing runs any more, so the renewal neither marks it lost nor
    counts it; the refused acknowledgement does (found="settle": it may have run twice)."""
    app = App()

    @app.role("held")
    async def held(ctx: Context, payload: Any) -> None:
        pass

    outcomes: list[Outcome] = []
    worker = Worker(app, redis, namespace=namespace, on_outcome=outcomes.append)
    stream = Keys(namespace).role_stream("held")
    await streams.ensure_group(redis, stream)
    await Client(redis, namespace=namespace).publish("held", {})
    [entry] = await streams.read_group(redis, stream, worker.consumer, count=1, block_ms=None)
    delivery = Delivery(app.get_role("held"), "held", stream, entry)
    delivery.started = True  # its handler ran
    worker._held.add(delivery)
    with anyio.fail_after(10):
        worker._settler.acker.add(delivery)
        await steal(redis, stream)
        await worker._leases.renew_held()
        assert not delivery.lost
        assert worker.statistics().lease_losses == {}
        await worker._settler.acker.flush()
    assert [o.status for o in outcomes] == ["lost"]
    assert worker.statistics().lease_losses == {"settle": 1}
    assert await redis.xlen(stream) == 1  # the other consumer still holds it


@pytest.mark.parametrize("applied", [True, False], ids=["ack_applied", "ack_not_applied"])
async def test_an_acknowledgement_whose_reply_was_lost_is_checked_before_it_is_called_lost(
    redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch, applied: bool
) -> None:
    """The connection drops after the acknowledgement was sent. If Redis applied it (the entry
    is gone), it is acknowledged, not a lost lease; if another consumer holds the entry now,
    it is a lost lease found at settle."""
    app = App()

    @app.role("acked")
    async def acked(ctx: Context, payload: Any) -> None:
        pass

    stream = Keys(namespace).role_stream("acked")
    real_settle = scripts.settle
    calls = 0

    async def settle_then_drop(
        registered: Scripts, client: Redis, key: str, consumer: str, ids: Sequence[bytes]
    ) -> list[bytes]:
        nonlocal calls
        calls += 1
        if calls == 1:
            if applied:
                await real_settle(registered, client, key, consumer, ids)
            else:
                await steal(client, key)  # the lease expired meanwhile: adopted elsewhere
            raise RedisConnectionError("Connection reset by peer (the reply is lost)")
        return await real_settle(registered, client, key, consumer, ids)

    monkeypatch.setattr(scripts, "settle", settle_then_drop)
    outcomes: list[Outcome] = []
    worker = Worker(app, redis, namespace=namespace, block_ms=100, on_outcome=outcomes.append)
    registry = worker.enable_metrics()
    with anyio.fail_after(20):
        async with running(worker):
            await Client(redis, namespace=namespace).publish("acked", {})
            await wait_until(lambda: bool(outcomes))
    stats = worker.statistics()
    assert calls == 2
    if applied:
        assert [o.status for o in outcomes] == ["acked"]
        assert stats.lease_losses == {}
        assert stats.ack_replies_lost == 1
        assert sample(registry, "streamflow_ack_replies_lost_total") == 1
        assert await redis.xlen(stream) == 0
    else:
        assert [o.status for o in outcomes] == ["lost"]
        assert stats.lease_losses == {"settle": 1}
        assert stats.ack_replies_lost == 0
        assert sample(registry, "streamflow_lease_losses_total", found="settle") == 1


async def test_renewal_latency_is_observed(redis: Redis, namespace: str) -> None:
    gate, started = anyio.Event(), anyio.Event()
    worker = Worker(
        lease_app(gate, started),
        redis,
        namespace=namespace,
        block_ms=100,
        lease=LeaseSettings(ttl=0.3),
    )
    registry = worker.enable_metrics()

    def renewals() -> float:
        return sample(registry, "streamflow_lease_renewal_seconds_count") or 0.0

    with anyio.fail_after(20):
        async with running(worker):
            await Client(redis, namespace=namespace).publish("held", {})
            await started.wait()
            await wait_until(lambda: renewals() >= 3, 10)
            gate.set()
    total = sample(registry, "streamflow_lease_renewal_seconds_sum")
    assert total is not None and 0 < total < renewals() * 0.3


@pytest.mark.slow
async def test_entries_taken_over_while_the_loop_was_blocked_are_not_started(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """One handler blocks the event loop past the lease's safe age; meanwhile another worker
    takes over the two entries this worker holds (one queued, one waiting behind the blocker
    as a suspect). Neither may start here once the loop runs again."""
    app = App()
    keys = Keys(namespace)
    stream = keys.role_stream("mixed")
    started: list[str] = []

    @app.role("mixed")
    async def mixed(ctx: Context, payload: Any) -> None:
        started.append(payload["name"])
        if len(started) == 1:
            # Whichever starts first blocks the loop (the order of the others is the worker's
            # business); meanwhile another worker adopts the two others.
            with sync_redis.Redis.from_url(redis_url) as other:
                others = [i for name, i in ids.items() if name != payload["name"]]
                other.xclaim(stream, GROUP, "thief", 0, others, justid=True)
            time.sleep(1.0)  # noqa: ASYNC251 - the blocked loop this test is about

    client = Client(redis, namespace=namespace)
    await streams.ensure_group(redis, stream)
    for name in ("blocker", "suspect", "queued"):
        await client.publish("mixed", {"name": name})
    # All three were read before by this consumer name: a restart resumes them as suspects
    # (delivered twice). Each already had a rerun, so each runs alone among suspects.
    entries = await streams.read_group(redis, stream, "resumer", count=3, block_ms=None)
    ids = {name: e.id for name, e in zip(("blocker", "suspect", "queued"), entries, strict=True)}
    for entry in entries[:2]:
        await redis.set(keys.starts("mixed", entry.id.decode()), 1)
    outcomes: list[Outcome] = []
    worker = Worker(
        app,
        redis,
        namespace=namespace,
        block_ms=100,
        consumer="resumer",
        concurrency=2,
        prefetch=1,
        lease=LeaseSettings(ttl=0.9, renew_interval=0.3),  # confirmed again after 0.6 s
        on_outcome=outcomes.append,
    )
    with anyio.fail_after(20):
        async with running(worker):
            await wait_until(lambda: len(outcomes) == 3, 15)
    assert len(started) == 1, started
    statuses = {o.entry_id.encode(): o.status for o in outcomes}
    assert statuses == {i: "acked" if n == started[0] else "lost" for n, i in ids.items()}
    assert worker.statistics().lease_losses == {"unstarted": 2}
    rows: Any = await redis.xpending_range(stream, GROUP, "-", "+", 10)
    assert {r["consumer"] for r in rows} == {b"thief"}
