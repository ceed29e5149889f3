"""The worker against a real redis-server: round trips, interop, concurrency, bad input."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson
import pytest
from fakeredis import FakeAsyncRedis as FakeRedis
from pydantic import BaseModel
from redis.asyncio import Redis

from streamflow import App, Client, Context, RetryPolicy, Worker, scripts, streams
from streamflow import intake as intake_module
from streamflow.config import WorkerSettings
from streamflow.decisions import dead
from streamflow.delivery import Delivery, Outcome
from streamflow.keys import GROUP, Keys
from streamflow.records import decode_dead_letter
from streamflow.scripts import Scripts
from tests.helpers import pending_count, running, wait_until

pytestmark = pytest.mark.anyio


async def test_published_jobs_are_handled_acked_and_deleted(redis: Redis, namespace: str) -> None:
    app = App()
    seen: list[Any] = []

    @app.role("echo")
    async def echo(ctx: Context, payload: Any) -> None:
        seen.append(payload)

    client = Client(redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(20):
        async with running(
            Worker(app, redis, namespace=namespace, block_ms=100, on_outcome=outcomes.append)
        ):
            first = await client.publish("echo", {"n": -1})
            ids = await client.publish_many("echo", ({"n": i} for i in range(500)))
            await wait_until(lambda: len(outcomes) == 501)
    assert sorted(p["n"] for p in seen) == list(range(-1, 500))
    assert {o.message_id for o in outcomes} == {first, *ids}
    assert {o.status for o in outcomes} == {"acked"}
    stream = Keys(namespace).role_stream("echo")
    assert await redis.xlen(stream) == 0
    assert await pending_count(redis, stream) == 0


async def test_raw_xadd_from_another_language_is_processed(redis: Redis, namespace: str) -> None:
    """Publish exactly as docs/protocol.md tells a non-Python service to: no streamflow code."""
    app = App()
    seen: list[tuple[str, Any, int]] = []

    @app.role("greet")
    async def greet(ctx: Context, payload: Greeting) -> None:
        seen.append((ctx.message_id, payload.text, ctx.attempt))

    key = f"{namespace}:{{role:greet}}:stream"
    body = (
        b'{"protocol":1,"kind":"job","id":"2b1f0c9e4d5a4e7f9a1b2c3d4e5f6a7b","role":"greet",'
        b'"payload":{"text":"hello from redis-cli"},"created_at_ms":1763800000000}'
    )
    await redis.execute_command("XADD", key, "*", "message", body)  # before any worker exists
    with anyio.fail_after(10):
        async with running(Worker(app, redis, namespace=namespace, block_ms=100)):
            await redis.execute_command("XADD", key, "*", "message", body.replace(b"2b1f", b"ffff"))
            await wait_until(lambda: len(seen) == 2)
    assert sorted(seen) == [
        ("2b1f0c9e4d5a4e7f9a1b2c3d4e5f6a7b", "hello from redis-cli", 1),
        ("ffff0c9e4d5a4e7f9a1b2c3d4e5f6a7b", "hello from redis-cli", 1),
    ]


async def test_concurrency_n_runs_exactly_n_handlers_at_once(redis: Redis, namespace: str) -> None:
    app = App()
    n = 8
    active = peak = done = 0
    full = anyio.Event()

    @app.role("slow")
    async def slow(ctx: Context, payload: Any) -> None:
        nonlocal active, peak, done
        active += 1
        peak = max(peak, active)
        if active == n:
            full.set()
        await full.wait()  # only returns once n handlers were running together
        await anyio.sleep(0.001)
        active -= 1
        done += 1

    await Client(redis, namespace=namespace).publish_many("slow", range(3 * n))
    with anyio.fail_after(10):
        async with running(Worker(app, redis, namespace=namespace, block_ms=100, concurrency=n)):
            await wait_until(lambda: done == 3 * n)
    assert peak == n


async def test_sync_handlers_run_in_threads_without_blocking_the_loop(
    redis: Redis, namespace: str
) -> None:
    app = App()
    release = threading.Event()
    threads: list[int] = []
    async_done = anyio.Event()

    @app.role("blocking")
    def blocking(ctx: Context, payload: Any) -> None:
        threads.append(threading.get_ident())
        assert release.wait(10)

    @app.role("quick")
    async def quick(ctx: Context, payload: Any) -> None:
        async_done.set()

    client = Client(redis, namespace=namespace)
    with anyio.fail_after(15):
        async with running(
            Worker(app, redis, namespace=namespace, block_ms=100, concurrency=4)
        ) as worker:
            await client.publish("blocking", 1)
            await wait_until(lambda: len(threads) == 1)
            # The sync handler is blocked in its thread; async work still flows.
            await client.publish("quick", 2)
            await async_done.wait()
            release.set()
            await wait_until(lambda: worker.statistics().acked == 2)
    assert threads[0] != threading.get_ident()


class Greeting(BaseModel):
    text: str


class Order(BaseModel):
    sku: str
    quantity: int


def _job(role: str, payload: Any, message_id: str, **extra: Any) -> bytes:
    doc = {"protocol": 1, "kind": "job", "id": message_id, "role": role, "payload": payload}
    return orjson.dumps({**doc, "created_at_ms": 1, **extra})


BAD_ENTRIES: list[tuple[str, dict[bytes, bytes]]] = [
    ("invalid_json", {b"message": b"{not json"}),
    ("invalid_json", {b"message": b"\xff\xfe\x00"}),
    ("invalid_message", {b"message": b'"just a string"'}),
    ("invalid_message", {b"payload": b"{}"}),
    ("invalid_message", {b"message": _job("orders", {}, "x1", colour="red")}),
    ("unsupported_version", {b"message": _job("orders", {}, "x2", protocol=99)}),
    ("unknown_kind", {b"message": _job("orders", {}, "x3", kind="mystery")}),
    ("too_large", {b"message": _job("orders", {"sku": "a" * 5000, "quantity": 1}, "x4")}),
    ("wrong_role", {b"message": _job("invoices", {"sku": "a", "quantity": 1}, "x5")}),
    ("invalid_payload", {b"message": _job("orders", {"sku": "a", "quantity": "many"}, "x6")}),
    ("failed", {b"message": _job("orders", {"sku": "boom", "quantity": 1}, "x7")}),
]


async def test_malformed_entries_are_dead_lettered_and_neighbours_still_processed(
    redis: Redis, namespace: str
) -> None:
    app = App()
    handled: list[str] = []

    @app.role("orders", retry=RetryPolicy(max_attempts=1))
    async def orders(ctx: Context, order: Order) -> None:
        if order.sku == "boom":
            raise RuntimeError("the handler blew up")
        handled.append(ctx.message_id)

    keys = Keys(namespace)
    stream = keys.role_stream("orders")
    good_ids = []
    for i, (_, fields) in enumerate(BAD_ENTRIES):
        good = f"good{i}"
        good_ids.append(good)
        await redis.xadd(stream, {b"message": _job("orders", {"sku": "s", "quantity": i}, good)})
        await redis.xadd(stream, fields)
    outcomes: list[Outcome] = []
    worker = Worker(
        app,
        redis,
        namespace=namespace,
        block_ms=100,
        max_message_bytes=4096,
        on_outcome=outcomes.append,
    )
    with anyio.fail_after(10):
        async with running(worker):
            await wait_until(lambda: len(outcomes) == 2 * len(BAD_ENTRIES))
            assert not worker.stopping
    assert sorted(handled) == sorted(good_ids)
    letters = [decode_dead_letter(f) for _, f in await redis.xrange(keys.dead_letters("orders"))]
    # Handlers run concurrently, so dead letters come in any order: match them by raw bytes.
    # Raw fields are kept verbatim up to the size limit (4096 here), so a flood of oversized
    # messages cannot fill Redis through the dead-letter stream.
    expected = {
        tuple(sorted((k, v[:4096]) for k, v in f.items())): reason for reason, f in BAD_ENTRIES
    }
    got = {}
    for letter, raw in letters:
        assert letter.detail and letter.role == "orders" and letter.consumer == worker.consumer
        got[tuple(sorted((k.encode(), v) for k, v in raw.items()))] = letter.reason
    assert got == expected  # every bad entry, verbatim, with its own reason
    (failed,) = [letter for letter, _ in letters if letter.reason == "failed"]
    assert failed.error is not None and failed.error.type == "RuntimeError"
    assert failed.job is not None and failed.job.id == "x7" and failed.attempts == 1
    assert await redis.xlen(stream) == 0
    assert await pending_count(redis, stream) == 0
    assert worker.statistics().dead_lettered == len(BAD_ENTRIES)
    # The snapshot as JSON: the (role, outcome) keys, which JSON cannot carry, come nested.
    stats = worker.statistics()
    data = orjson.loads(orjson.dumps(stats.to_dict()))
    assert data["by_role"]["orders"]["acked"] == len(good_ids) == stats.by_role["orders", "acked"]
    assert data["dead_by_role"] == {"orders": {r: n for (_, r), n in stats.dead_by_role.items()}}
    assert sum(data["dead_by_role"]["orders"].values()) == data["dead_lettered"]


async def test_ack_is_refused_for_an_entry_another_consumer_owns(
    redis: Redis, namespace: str
) -> None:
    stream = Keys(namespace).role_stream("r")
    await streams.ensure_group(redis, stream)
    entry_id = await redis.xadd(stream, {b"message": b"{}"})
    await streams.read_group(redis, stream, "alice", count=10, block_ms=None)
    await redis.xclaim(stream, GROUP, "bob", 0, [entry_id])  # bob adopted it
    registered = Scripts(redis)
    assert await scripts.settle(registered, redis, stream, "alice", [entry_id]) == [entry_id]
    pending = await redis.xpending_range(stream, GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(entry_id, b"bob")]
    moved = await scripts.dead_letter(
        registered,
        redis,
        stream=stream,
        dead_stream=stream + "x",
        consumer="alice",
        entry_id=entry_id,
        fields=[(b"dead_letter", b"{}")],
        max_len=10,
    )
    assert moved is None
    assert await scripts.settle(registered, redis, stream, "bob", [entry_id]) == []
    assert await redis.xlen(stream) == 0


async def test_a_lost_consumer_group_is_recreated_and_work_continues(
    redis: Redis, namespace: str
) -> None:
    app = App()
    seen: list[int] = []

    @app.role("echo")
    async def echo(ctx: Context, payload: int) -> None:
        seen.append(payload)

    client = Client(redis, namespace=namespace)
    stream = Keys(namespace).role_stream("echo")
    with anyio.fail_after(15):
        async with running(Worker(app, redis, namespace=namespace, block_ms=100)):
            await client.publish("echo", 1)
            await wait_until(lambda: seen == [1])
            await redis.delete(stream)  # as after a restart of a Redis without persistence
            await client.publish("echo", 2)
            await wait_until(lambda: seen == [1, 2])


async def test_renewals_and_acks_that_find_the_group_gone_lose_their_entries_not_the_worker(
    redis: Redis, namespace: str
) -> None:
    """After a Redis restart without persistence, a publisher may recreate a role's stream
    before the reader recreates its group: the worker's renewal and acknowledgement then get
    NOGROUP. Their entries are lost (the group's pending list is gone), and nothing raises."""
    app = App()

    @app.role("held")
    async def held(ctx: Context, payload: int) -> None:
        pass

    outcomes: list[Outcome] = []
    worker = Worker(app, redis, namespace=namespace, block_ms=100, on_outcome=outcomes.append)
    stream = Keys(namespace).role_stream("held")
    await Client(redis, namespace=namespace).publish_many("held", [1, 2, 3])  # no group yet
    running_one, finished_one, failed_one = (
        Delivery(app.get_role("held"), "held", stream, entry)
        for entry in await streams.read_range(redis, stream)
    )
    for delivery in (running_one, finished_one, failed_one):
        worker._held.add(delivery)
    with anyio.fail_after(10):
        worker._settler.acker.add(finished_one)
        await worker._settler.acker.flush()
        await worker._settler.apply(failed_one, dead("fatal", "gave up"))
        await worker._leases.renew_once()
    assert [(o.entry_id, o.status) for o in outcomes] == [
        (finished_one.entry.id.decode(), "lost"),
        (failed_one.entry.id.decode(), "lost"),
    ]
    assert running_one.lost


async def test_stop_lets_in_flight_handlers_finish_and_acks_them(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started = anyio.Event()
    finished: list[str] = []

    @app.role("slow")
    async def slow(ctx: Context, payload: Any) -> None:
        started.set()
        await anyio.sleep(0.3)
        finished.append(ctx.message_id)

    worker = Worker(app, redis, namespace=namespace, block_ms=100)
    message_id = await Client(redis, namespace=namespace).publish("slow")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await started.wait()
            worker.stop()
    assert finished == [message_id]
    assert worker.statistics().acked == 1
    assert await redis.xlen(Keys(namespace).role_stream("slow")) == 0


async def test_a_stopped_worker_has_given_every_connection_back_to_the_pool(
    redis: Redis, namespace: str
) -> None:
    """The readers' held connections included (one per stream read, reading when stopped)."""
    app = App()
    done = anyio.Event()

    @app.role("plain", partitions=2)
    async def plain(ctx: Context, payload: Any) -> None:
        done.set()

    client = Client(redis, namespace=namespace)
    await client.publish("plain")
    pool: Any = redis.connection_pool
    before = set(pool._in_use_connections)  # the client's publish lane holds one
    worker = Worker(app, redis, namespace=namespace, block_ms=100)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await done.wait()
            assert len(pool._in_use_connections) > len(before)
            worker.stop()
    assert set(pool._in_use_connections) == before


async def test_handlers_past_the_shutdown_grace_are_cancelled_and_stay_pending(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started = anyio.Event()
    cleaned_up: list[bool] = []

    @app.role("stuck")
    async def stuck(ctx: Context, payload: Any) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cleaned_up.append(True)

    worker = Worker(app, redis, namespace=namespace, block_ms=100, shutdown_grace=0.2)
    await Client(redis, namespace=namespace).publish("stuck")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await started.wait()
            worker.stop()
    assert cleaned_up == [True]
    # Not acknowledged: the entry stays pending, to be adopted by another worker.
    assert await pending_count(redis, Keys(namespace).role_stream("stuck")) == 1


async def test_dedup_key_publishes_once(redis: Redis, namespace: str) -> None:
    client = Client(redis, namespace=namespace)
    first = await client.publish("echo", 1, dedup_key="order-42")
    again = await client.publish("echo", 2, dedup_key="order-42")
    other = await client.publish("echo", 3, dedup_key="order-43")
    assert again == first != other
    assert await redis.xlen(Keys(namespace).role_stream("echo")) == 2


async def test_a_restart_with_the_same_consumer_name_resumes_its_pending_entries(
    redis: Redis, namespace: str
) -> None:
    app = App()
    seen: list[int] = []

    @app.role("echo")
    async def echo(ctx: Context, payload: int) -> None:
        seen.append(payload)

    stream = Keys(namespace).role_stream("echo")
    await streams.ensure_group(redis, stream)
    await Client(redis, namespace=namespace).publish_many("echo", range(5))
    # A previous run of "w1" read three entries and died before acknowledging them.
    await streams.read_group(redis, stream, "w1", count=3, block_ms=None)
    assert await pending_count(redis, stream) == 3
    with anyio.fail_after(10):
        async with running(Worker(app, redis, namespace=namespace, block_ms=100, consumer="w1")):
            await wait_until(lambda: len(seen) == 5)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert await pending_count(redis, stream) == 0


async def test_a_pending_entry_deleted_from_the_stream_is_reported_not_silently_dropped(
    redis: Redis, namespace: str
) -> None:
    app = App()

    @app.role("echo")
    async def echo(ctx: Context, payload: int) -> None:
        pass

    keys = Keys(namespace)
    stream = keys.role_stream("echo")
    await streams.ensure_group(redis, stream)
    await Client(redis, namespace=namespace).publish("echo", 1)
    (entry,) = await streams.read_group(redis, stream, "w1", count=1, block_ms=None)
    await redis.xdel(stream, entry.id)  # e.g. a blind MAXLEN trim
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(
            Worker(
                app,
                redis,
                namespace=namespace,
                block_ms=100,
                consumer="w1",
                on_outcome=outcomes.append,
            )
        ):
            await wait_until(lambda: len(outcomes) == 1)
    assert outcomes[0].status == "dead_lettered" and outcomes[0].reason == "invalid_message"
    (letter,) = [decode_dead_letter(f)[0] for _, f in await redis.xrange(keys.dead_letters("echo"))]
    assert "deleted from the stream" in letter.detail
    assert await pending_count(redis, stream) == 0


async def _stopped_while_running(
    redis: Redis,
    namespace: str,
    app: App,
    role: str,
    running: Callable[[], Awaitable[object]],
    limit: float,
) -> None:
    """Stops a worker (30 s grace) once ``running`` returns while it runs one job of ``role``.

    Well within the grace, the handler must stop by itself: its job released and handed
    back (still pending) for another worker.
    """
    outcomes: list[Outcome] = []
    worker = Worker(
        app, redis, namespace=namespace, block_ms=100, shutdown_grace=30, on_outcome=outcomes.append
    )
    await Client(redis, namespace=namespace).publish(role, {})
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            await running()
            worker.stop()
            await worker.wait_stopped()
    assert [o.status for o in outcomes] == ["released"]
    assert await pending_count(redis, Keys(namespace).role_stream(role)) == 1


async def test_shutdown_is_not_a_cancel_and_handlers_that_check_it_stop_at_a_safe_point(
    redis: Redis, namespace: str
) -> None:
    app = App()
    steps: list[int] = []
    seen: list[tuple[bool, bool]] = []

    @app.role("steps")
    async def work(ctx: Context, payload: Any) -> None:
        for step in range(1000):
            ctx.cancel.raise_if_cancelled()  # a user cancel only: shutdown does not trip it
            if ctx.shutting_down:
                seen.append((ctx.shutting_down, ctx.cancel.cancelled))
                ctx.raise_if_shutting_down()  # e.g. after saving a checkpoint
            steps.append(step)
            await anyio.sleep(0.01)

    await _stopped_while_running(
        redis, namespace, app, "steps", lambda: wait_until(lambda: len(steps) >= 3), 10
    )
    assert seen == [(True, False)]


async def test_a_handler_awaiting_wait_shutdown_checkpoints_and_hands_its_job_back(
    redis: Redis, namespace: str
) -> None:
    # The checkpoint pattern of README and operations.md: race the work against
    # ctx.wait_shutdown(), save progress when the worker begins to shut down, then stop.
    app = App()
    checkpoints: list[tuple[bool, bool]] = []
    started = anyio.Event()

    @app.role("long")
    async def long(ctx: Context, payload: Any) -> None:
        started.set()
        with anyio.fail_after(20):  # only the shutdown ends this wait
            await ctx.wait_shutdown()
        checkpoints.append((ctx.shutting_down, ctx.cancel.cancelled))
        ctx.raise_if_shutting_down()

    await _stopped_while_running(redis, namespace, app, "long", started.wait, 15)
    assert checkpoints == [(True, False)]


async def _peak_in_flight(
    redis: Redis, namespace: str, jobs: int, seconds: float, **options: Any
) -> tuple[int, int]:
    """Handle ``jobs`` jobs of ``seconds`` each; the most entries the worker held, and its
    concurrency."""
    app = App()
    peak = done = 0

    @app.role("paced")
    async def paced(ctx: Context, payload: Any) -> None:
        nonlocal peak, done
        peak = max(peak, worker.statistics().in_flight)
        if seconds:
            await anyio.sleep(seconds)
        done += 1

    worker = Worker(app, redis, namespace=namespace, block_ms=100, **options)
    await Client(redis, namespace=namespace).publish_many("paced", ({"n": i} for i in range(jobs)))
    async with running(worker):
        await wait_until(lambda: done == jobs, timeout=30)
    return peak, worker.concurrency


@pytest.mark.slow
async def test_auto_prefetch_reads_ahead_for_short_jobs(redis: Redis, namespace: str) -> None:
    peak, concurrency = await _peak_in_flight(redis, namespace, 5000, 0, concurrency=4)
    # Held beyond the handler slots: read ahead, at most read_count (1000) more.
    assert concurrency < peak <= concurrency + 1000, peak


@pytest.mark.slow
async def test_auto_prefetch_holds_almost_nothing_ahead_of_slow_jobs(
    redis: Redis, namespace: str
) -> None:
    # 0.2 s jobs on 2 slots: 10 finish a second, 0.5 start within the 50 ms the prefetch covers.
    peak, concurrency = await _peak_in_flight(redis, namespace, 16, 0.2, concurrency=2)
    assert peak <= concurrency + 1, peak


@pytest.mark.slow
async def test_prefetch_0_never_holds_more_than_the_handler_slots(
    redis: Redis, namespace: str
) -> None:
    peak, concurrency = await _peak_in_flight(redis, namespace, 2000, 0, concurrency=4, prefetch=0)
    assert peak == concurrency


def test_auto_prefetch_follows_the_pace_within_read_count_and_16_mib(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sizing rule alone, on a clock the test moves: what the worker finishes in 50 ms,
    at most read_count entries and about 16 MiB of messages at their recent size."""
    clock = [1000.0]
    monkeypatch.setattr(intake_module.time, "monotonic", lambda: clock[0])
    app = App()

    @app.role("paced")
    async def paced(ctx: Context, payload: Any) -> None:
        pass

    worker = Worker(app, FakeRedis(), concurrency=64)
    role = app.get_role("paced")

    def read(size: int, finished: int, seconds: float) -> int:
        """A read of one entry of ``size`` bytes after ``finished`` entries in ``seconds``."""
        clock[0] += seconds
        read_ahead = worker._read_ahead
        read_ahead.in_flight = 0
        read_ahead.received += finished - 1
        entry = streams.Entry(b"1-0", {b"message": b"x" * size})
        worker._pool.dispatch(role, "paced", "s", [entry], confirmed_at=clock[0])
        read_ahead.adapt()
        return read_ahead.prefetch

    assert worker._read_ahead.prefetch == 0  # nothing measured yet
    # Short jobs: 100,000 a second; read_count (1000) bounds it.
    assert [read(200, 10_000, 0.1) for _ in range(3)] == [1000, 1000, 1000]
    # 1 MiB messages at the same pace: 16 MiB of them, once their size settled.
    assert [read(1024 * 1024, 10_000, 0.1) for _ in range(10)][-1] == 16
    # Slow jobs: 64 a second (1 s each on 64 slots) holds 3 read ahead, once the pace settled.
    assert [read(200, 64, 1.0) for _ in range(20)][-1] == 3
    # An idle worker's prefetch falls to 0.
    assert [read(200, 1, 1.0) for _ in range(20)][-1] == 0


#: WorkerSettings fields of the process around a worker (the CLI's), not of the worker itself.
PROCESS_SETTINGS = {
    "app",
    "processes",
    "metrics_port",
    "metrics_host",
    "strict",
    "server_checks",
    "parent_pid",
    "parent_fd",
    "redis_url",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
}


def test_from_settings_gives_the_worker_every_worker_setting() -> None:
    """Every WorkerSettings field either reaches the worker or is the process's: none dropped."""
    app = App()
    for name in ("first", "second"):
        app.role(name)(_nothing)
    settings = WorkerSettings(
        app="tests.apps:app",
        roles=("second",),
        namespace="elsewhere",
        concurrency=7,
        consumer_name="settings-test-1",
        read_count=11,
        prefetch=5,
        block_ms=123,
        max_message_bytes=4321,
        shutdown_grace=2.5,
        dead_letter_max_len=77,
        lease_ttl=9.0,
        renew_interval=1.5,
        reclaim_interval=0.7,
    )
    worker = Worker.from_settings(app, settings, FakeRedis())
    leases = worker._leases.settings
    seen: dict[str, object] = {
        "roles": tuple(role.name for role in worker._roles),
        "namespace": worker._keys.namespace,
        "concurrency": worker.concurrency,
        "consumer_name": worker.consumer,
        "read_count": worker._read_ahead.read_count,
        "prefetch": worker._read_ahead.prefetch,
        "block_ms": worker._intake._block_ms,
        "max_message_bytes": worker._runner._max_bytes,
        "shutdown_grace": worker._grace,
        "dead_letter_max_len": worker._settler._dead_max_len,
        "lease_ttl": leases.ttl,
        "renew_interval": leases.renew_interval,
        "reclaim_interval": leases.reclaim_interval,
    }
    assert set(seen) | PROCESS_SETTINGS == set(WorkerSettings.model_fields)
    assert seen == {name: getattr(settings, name) for name in seen}
    # Each value differs from its default, so the worker did not just happen to match.
    defaults = WorkerSettings(app="tests.apps:app")
    assert all(getattr(defaults, name) != value for name, value in seen.items())


async def _nothing(ctx: Context, payload: Any) -> None:
    pass


@pytest.mark.parametrize(
    "options", [{"concurrency": 0}, {"read_count": 0}, {"prefetch": -1}, {"prefetch": "soon"}]
)
def test_settings_that_cannot_work_are_refused_at_construction(options: dict[str, Any]) -> None:
    # read_count 0 would reach Redis as COUNT 0: no limit, the whole stream in one read.
    with pytest.raises(ValueError, match="must be"):
        Worker(App(), FakeRedis(), **options)
