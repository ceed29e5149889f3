"""Per-key limits within a role (streamflow.keylimits) against a real redis-server.

In-process workers for the mechanics (a saturated key parks its jobs while other keys flow, the
rate per key, hostile keys, run-time limits, adoption within the role's limits); worker
processes for the whole path with a SIGKILL of a worker that holds a key's slot.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
from prometheus_client import generate_latest
from redis.asyncio import Redis

from streamflow import App, Client, Context, SyncClient, partitions
from streamflow.delivery import Decision, Delivery, InFlight, Outcome
from streamflow.flow import PauseWatch
from streamflow.keylimits import LIMIT_KEY_HEADER, KeyLimiter, check_limit_key
from streamflow.keys import Keys
from streamflow.ops.inspect import inspect_roles
from streamflow.protocol import Job, encode, now_ms
from streamflow.records import decode_parked_item
from streamflow.scripts import Scripts
from streamflow.streams import Entry
from tests.helpers import (
    make_worker,
    most_at_once,
    run_cli,
    running,
    wait_for,
    wait_for_query,
    wait_until,
)
from tests.processes import TTL, Record, Workers, assert_none_lost_and_duplicates_allowed

pytestmark = pytest.mark.anyio


class Ledger:
    """Start and finish times per limit key, and the most of a key's jobs running at once."""

    def __init__(self) -> None:
        self.running: dict[str, int] = defaultdict(int)
        self.most: dict[str, int] = defaultdict(int)
        self.starts: dict[str, list[float]] = defaultdict(list)
        self.done: list[str] = []

    def start(self, key: str) -> None:
        self.running[key] += 1
        self.most[key] = max(self.most[key], self.running[key])
        self.starts[key].append(time.monotonic())

    def finish(self, key: str, message_id: str) -> None:
        self.running[key] -= 1
        self.done.append(message_id)


def keyed_app(ledger: Ledger, gate: anyio.Event, **limits: Any) -> App:
    """An app whose ``keyed`` role records its jobs per limit key; ``wait`` jobs wait for gate."""
    app = App()

    @app.role("keyed", **limits)
    async def keyed(ctx: Context, payload: Any) -> None:
        key = ctx.headers.get(LIMIT_KEY_HEADER, "")
        ledger.start(key)
        try:
            if payload and payload.get("wait"):
                await gate.wait()
            await anyio.sleep(0.02)
        finally:
            ledger.finish(key, ctx.message_id)

    return app


async def test_a_saturated_key_parks_its_jobs_while_other_keys_keep_flowing(
    redis: Redis, namespace: str
) -> None:
    ledger, gate = Ledger(), anyio.Event()
    app = keyed_app(ledger, gate, key_concurrency=1)
    client = Client(redis, namespace=namespace)
    keys = Keys(namespace)
    outcomes: list[Outcome] = []
    workers = [make_worker(app, redis, namespace, outcomes, concurrency=4) for _ in range(2)]
    with anyio.fail_after(30):
        async with running(*workers):
            blocker = await client.publish("keyed", {"wait": True}, limit_key="busy")
            await wait_until(lambda: ledger.running["busy"] == 1)
            waiting = [await client.publish("keyed", {}, limit_key="busy") for _ in range(20)]
            others = [
                await client.publish("keyed", {}, limit_key=f"cust-{i % 4}") for i in range(40)
            ]
            # Every other key's jobs run while "busy" holds its one slot: no buffer filled
            # with busy's jobs, none of them held by a worker (parked, out of the stream).
            await wait_until(lambda: set(others) <= set(ledger.done))
            assert not set(waiting) & set(ledger.done) and ledger.running["busy"] == 1
            assert await redis.llen(keys.park("keyed", "busy")) == 20
            assert await redis.zrange(keys.parked("keyed"), 0, -1) == [b"busy"]
            assert await redis.xlen(keys.role_stream("keyed")) <= 1  # only the running one
            # The finished jobs' slots are freed by the next sweep (every 50 ms).
            await wait_until(
                lambda: sum(w.statistics().key_slots.get("keyed", 0) for w in workers) == 1
            )
            metrics = generate_latest(workers[0].enable_metrics()).decode()
            assert "streamflow_key_limit_parks_total" in metrics
            gate.set()
            await wait_until(lambda: set(waiting) <= set(ledger.done), timeout=20)
            await wait_until(lambda: all(not w.statistics().key_slots for w in workers))
    assert ledger.most == {"busy": 1, "cust-0": 1, "cust-1": 1, "cust-2": 1, "cust-3": 1}
    assert sorted(ledger.done) == sorted([blocker, *waiting, *others])  # each ran once
    assert sum(w.statistics().key_parks.get("keyed", 0) for w in workers) >= 20
    assert sum(o.status == "parked" for o in outcomes) >= 20
    assert await redis.zcard(keys.parked("keyed")) == 0
    assert await redis.exists(keys.flow_key_slots("keyed", "busy"), keys.park("keyed", "busy")) == 0


async def test_a_key_rate_spaces_that_keys_starts_across_workers(
    redis: Redis, namespace: str
) -> None:
    ledger, gate = Ledger(), anyio.Event()
    app = keyed_app(ledger, gate, key_rate_limit="10/s")
    client = Client(redis, namespace=namespace)
    workers = [make_worker(app, redis, namespace, concurrency=4) for _ in range(2)]
    with anyio.fail_after(30):
        async with running(*workers):
            started = time.monotonic()
            limited = [await client.publish("keyed", {}, limit_key="slow") for _ in range(15)]
            free = [await client.publish("keyed", {}, limit_key=f"fast-{i}") for i in range(10)]
            await wait_until(lambda: set(free) <= set(ledger.done), timeout=5)
            assert time.monotonic() - started < 1.0  # other keys are not held by slow's rate
            await wait_until(lambda: set(limited) <= set(ledger.done), timeout=20)
    starts = sorted(ledger.starts["slow"])
    # One start per 100 ms: any one-second window holds at most 10 (and a start of slack).
    for index, first in enumerate(starts):
        assert sum(1 for at in starts[index:] if at < first + 1.0) <= 11
    assert starts[-1] - starts[0] >= 14 * 0.1 * 0.9


def role_r_app(**options: Any) -> App:
    """An app with a role ``r`` declared with ``options`` whose handler does nothing."""
    app = App()

    @app.role("r", **options)
    async def handler(ctx: Context, payload: Any) -> None:
        return None

    return app


def key_limiter(
    redis: Redis,
    keys: Keys,
    held: InFlight | None = None,
    *,
    concurrency: int = 1,
    ttl_ms: int = 30_000,
    scripts: Scripts | None = None,
) -> KeyLimiter:
    """Consumer ``me``'s KeyLimiter of role ``r``, with a key concurrency of ``concurrency``."""
    return KeyLimiter(
        redis,
        Scripts(redis) if scripts is None else scripts,
        keys,
        "me",
        InFlight() if held is None else held,
        PauseWatch(redis, keys, ["r"], anyio.Event()),
        {"r": (None, concurrency)},
        ttl_ms=ttl_ms,
    )


def keyed_delivery(app: App, keys: Keys, index: int, key: str) -> tuple[Delivery, Job]:
    """Entry ``1-<index>`` of role ``r``: job ``m<index>`` with the limit key ``key``."""
    job = Job(
        protocol=1,
        kind="job",
        id=f"m{index}",
        role="r",
        payload={},
        created_at_ms=1,
        headers={LIMIT_KEY_HEADER: key},
    )
    entry = Entry(f"1-{index}".encode(), {b"message": encode(job)}, 1)
    return Delivery(app.get_role("r"), "r", keys.role_stream("r"), entry), job


def test_a_limit_key_is_checked_and_shown_escaped() -> None:
    assert check_limit_key("cust-42@eu/1") == "cust-42@eu/1"
    for bad in ["", "a b", "x" * 129, "a*", "{tag}", "evil\x1b[31m\u202e"]:
        with pytest.raises(ValueError, match="invalid limit key") as refused:
            check_limit_key(bad)
        assert "\x1b" not in str(refused.value) and "\u202e" not in str(refused.value)


async def test_hostile_limit_keys_are_refused_at_publish_and_dead_lettered_by_workers(
    redis: Redis, namespace: str
) -> None:
    ledger, gate = Ledger(), anyio.Event()
    app = keyed_app(ledger, gate, key_concurrency=1)
    client = Client(redis, namespace=namespace)
    keys = Keys(namespace)
    with pytest.raises(ValueError, match="invalid limit key"):
        await client.publish("keyed", {}, limit_key="a\nforged log line")
    # A raw XADD publisher can put anything in the header: the worker refuses the job, with
    # the key escaped in the dead letter, and never builds a key name from it.
    hostile = "x}{role:other}:stream\x1b[2J" + "y" * 300
    job = Job(
        protocol=1,
        kind="job",
        id="hostile-1",
        role="keyed",
        payload={},
        created_at_ms=1,
        headers={LIMIT_KEY_HEADER: hostile},
    )
    await redis.xadd(keys.role_stream("keyed"), {"message": encode(job)})
    # Garbage written into the parked keys' index is removed, not followed.
    await redis.zadd(keys.parked("keyed"), {"bad key*": 0})
    outcomes: list[Outcome] = []
    with anyio.fail_after(20):
        async with running(make_worker(app, redis, namespace, outcomes)):
            await wait_until(lambda: any(o.message_id == "hostile-1" for o in outcomes))

            async def cleaned() -> bool:
                return not await redis.zcard(keys.parked("keyed"))

            await wait_for_query(cleaned)
    (outcome,) = [o for o in outcomes if o.message_id == "hostile-1"]
    assert (outcome.status, outcome.reason) == ("dead_lettered", "invalid_message")
    (letter,) = [entry.letter for entry in await client.dead_letters("keyed")]
    assert letter is not None and "invalid limit key" in letter.detail
    assert "\x1b" not in letter.detail and len(letter.detail) < 400
    assert ledger.done == []
    assert await redis.zcard(keys.parked("keyed")) == 0


async def test_per_key_limits_set_at_run_time_apply_and_show_in_inspect(
    redis: Redis, namespace: str, redis_url: str
) -> None:
    ledger, gate = Ledger(), anyio.Event()
    app = keyed_app(ledger, gate)  # nothing declared
    client = Client(redis, namespace=namespace)
    shown = await client.limit("keyed", key_concurrency=1, key_rate="100/s")
    assert (shown.key_concurrency, shown.key_rate) == (1, "100/s")
    with anyio.fail_after(30):
        async with running(make_worker(app, redis, namespace, concurrency=4)):
            await client.publish("keyed", {"wait": True}, limit_key="busy")
            await wait_until(lambda: ledger.running["busy"] == 1)
            more = [await client.publish("keyed", {}, limit_key="busy") for _ in range(3)]
            keys = Keys(namespace)

            async def parked() -> bool:
                return await redis.llen(keys.park("keyed", "busy")) == 3

            await wait_for_query(parked)
            (info,) = [r for r in await inspect_roles(redis, keys) if r.role == "keyed"]
            assert (info.key_concurrency, info.key_rate_limit) == (1, "100/s")
            assert (info.busy_keys, info.parked_keys) == (1, 1)
            # Removing the per-key limit at run time wakes every parked job.
            await client.limit("keyed", key_concurrency=0, key_rate="off")
            await wait_until(lambda: set(more) <= set(ledger.done), timeout=10)
            gate.set()
    shown_text = run_cli("inspect", "keyed", "--redis-url", redis_url, "--namespace", namespace)
    assert "per-key limits set at run time: rate off, concurrency off" in shown_text.stdout
    reset = await client.limit("keyed", reset=True)
    assert (reset.key_concurrency, reset.key_rate) == (None, None)


@pytest.mark.slow
async def test_adopted_entries_start_within_the_roles_concurrency_limit(
    redis: Redis, namespace: str
) -> None:
    ledger, gate = Ledger(), anyio.Event()
    gate.set()
    app = App()

    @app.role("capped", concurrency_limit=1)
    async def capped(ctx: Context, payload: Any) -> None:
        ledger.start("all")
        await anyio.sleep(0.1)
        ledger.finish("all", ctx.message_id)

    client = Client(redis, namespace=namespace)
    ids = await client.publish_many("capped", [{} for _ in range(5)])
    stream = Keys(namespace).role_stream("capped")
    await redis.xgroup_create(stream, "workers", id="0")
    await redis.xreadgroup("workers", "dead-one", {stream: ">"}, count=10)  # a dead worker's
    worker = make_worker(app, redis, namespace, concurrency=4)
    with anyio.fail_after(30):
        async with running(worker):
            await wait_until(lambda: set(ids) <= set(ledger.done), timeout=20)
    assert worker.statistics().adopted == 5
    assert ledger.most["all"] == 1  # adopted one at a time, not all five at once


# -- worker processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_per_key_concurrency_holds_across_three_worker_processes_and_a_killed_slot_comes_back(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """Three workers, one key's slot held by a worker that is SIGKILLed.

    The ledger is the handlers' record (START/DONE per message, each published under a known
    key): per key, never more than the limit at once; the other keys flow while the held key is
    saturated; after the kill the held key's jobs start again within the lease TTL (plus a
    look of the waker and a read), and nothing is lost.
    """
    record_path = tmp_path / "record"
    workers = Workers(tmp_path, redis_url, namespace, record_path)
    record = Record(record_path)
    connection = ["--redis-url", redis_url, "--namespace", namespace]
    direct = redis_sync.Redis.from_url(redis_url)
    sync = SyncClient(redis_url, namespace=namespace)
    try:
        limited = run_cli("limit", "work", "--key-concurrency", "1", "--json", *connection)
        assert json.loads(limited.stdout)["key_concurrency"] == 1, limited.stderr
        first = workers.start("a")
        first.wait_ready()
        key_of: dict[str, str] = {}
        hold = sync.publish("work", {"seconds_by_consumer": {"a": 60}}, limit_key="held")
        key_of[hold] = "held"
        wait_for(lambda: hold in record.ids("START"), 20, "the long job started on a")
        others = [workers.start(name) for name in ("b", "c")]
        for worker in others:
            worker.wait_ready()
        for index in range(40):
            key = f"k{index % 4}"
            key_of[sync.publish("work", {"seconds": 0.05}, limit_key=key)] = key
        held = [sync.publish("work", {"seconds": 0.05}, limit_key="held") for _ in range(5)]
        key_of |= dict.fromkeys(held, "held")
        flowing = {m for m, k in key_of.items() if k != "held"}
        wait_for(lambda: record.ids("DONE") >= flowing, 30, "the other keys' jobs done")
        assert not set(held) & record.ids("START")  # the held key stayed saturated
        assert int(direct.xlen(Keys(namespace).role_stream("work"))) <= 1
        first.kill()
        killed_at = time.time()
        wait_for(lambda: record.ids("DONE") >= set(key_of), 30, "every job done")
        assert_none_lost_and_duplicates_allowed(record, list(key_of), set())
        restarted = min(
            line.at
            for line in record.events("START")
            if line.at > killed_at and key_of[line.message_id] == "held"
        )
        assert restarted - killed_at < TTL + 2.0, restarted - killed_at
        spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
        done_at = {(end.message_id, end.consumer): end.at for end in record.events("DONE")}
        for line in record.events("START"):
            end = done_at.get((line.message_id, line.consumer), killed_at)
            spans[key_of[line.message_id]].append((line.at, end))
        most = {key: most_at_once([a for a, _ in s], [b for _, b in s]) for key, s in spans.items()}
        assert most == dict.fromkeys(["held", "k0", "k1", "k2", "k3"], 1)
        for worker in others:
            worker.assert_clean_log()
    finally:
        sync.close()
        direct.close()
        workers.kill_all()


async def test_key_limit_script_caps_a_keys_slots_and_says_when_to_ask_again(
    redis: Redis, namespace: str
) -> None:
    keys, scripts = Keys(namespace), Scripts(redis)

    async def call(op: str, *tokens: str, cap: int = 2, rate: tuple[int, int] = (0, 0)) -> Any:
        lua_keys = [
            keys.flow_control("r"),
            keys.flow_key_slots("r", "k"),
            keys.flow_key_rate("r", "k"),
            keys.flow_keys("r"),
            keys.flow_waiting("r"),
        ]
        args: list[str | int] = [op, "k", *rate, cap, 300, *tokens]
        return await scripts.key_limit(keys=lua_keys, args=args, client=redis)

    assert await call("acquire", "t1") == [1, 0, 1]
    assert await call("acquire", "t2") == [1, 0, 1]
    granted, wake = await call("acquire", "t3")
    assert granted == 0 and 0 < wake - now_ms() <= 400  # when t1's slot would expire
    assert await call("free") == 0
    assert await redis.zrange(keys.flow_keys("r"), 0, -1) == [b"k"]
    assert await call("release", "t1") == 0  # no job of the key parked: nothing to wake
    assert await call("free") == 1
    # A parked job marks its key: the next release says so, and an unmark with a stale count
    # (a job parked since) keeps the mark.
    assert await call("parked") == 1
    assert await call("parked") == 1
    assert await call("release", "none") == 2
    await call("unmark", "1")
    assert await redis.zscore(keys.flow_waiting("r"), "k") == 2
    await call("unmark", "2")
    assert await redis.zscore(keys.flow_waiting("r"), "k") is None
    assert await call("renew", "t2", "gone") == 1  # only slots still held are renewed
    await call("release", "t2")
    assert await redis.exists(keys.flow_key_slots("r", "k"), keys.flow_keys("r")) == 0
    # A slot not renewed expires: a dead worker's comes back after the TTL.
    assert (await call("acquire", "t4", cap=1))[0] == 1
    taken = time.monotonic()
    assert (await call("acquire", "t5", cap=1))[0] == 0

    async def came_back() -> bool:
        return bool((await call("acquire", "t5", cap=1))[0])

    await wait_for_query(came_back, timeout=3)
    assert time.monotonic() - taken >= 0.25
    # The rate: one start per 100 ms, and when the next is due.
    first = await call("acquire", "r1", cap=0, rate=(10, 1000))
    assert first[0] == 1 and first[2] == 0 and 0 < first[1] - now_ms() <= 110
    refused = await call("acquire", "r2", cap=0, rate=(10, 1000))
    assert refused[0] == 0 and abs(refused[1] - first[1]) <= 1
    # Run-time settings override the declared ones (0: no limit).
    await redis.hset(keys.flow_control("r"), mapping={"key_rate_count": 0, "key_concurrency": 0})
    assert (await call("acquire", "r3", cap=1, rate=(10, 1000)))[0] == 1


async def test_a_parked_suspect_keeps_its_start_count_when_woken(
    redis: Redis, namespace: str
) -> None:
    keys, scripts = Keys(namespace), Scripts(redis)
    stream = keys.role_stream("r")
    entry_id: bytes = await redis.xadd(stream, {"message": "{}"})  # type: ignore[assignment]
    await redis.xgroup_create(stream, "workers", id="0")
    await redis.xreadgroup("workers", "me", {stream: ">"})
    await redis.set(keys.starts("r", entry_id.decode()), 2)  # started twice before
    park_keys = [stream, keys.parked("r"), keys.park("r", "k"), keys.starts("r", entry_id.decode())]
    args: list[str | bytes | int] = ["workers", "me", entry_id, "k", 0]
    assert await scripts.park(keys=park_keys, args=args, client=redis) == 1
    limiter = key_limiter(redis, keys, ttl_ms=1000, scripts=scripts)
    assert await limiter.wake("r", "r", "k", "due")
    found: Any = await redis.xrange(stream)
    [(woken, fields)] = found
    assert fields[b"parked"] == b"1"
    assert await redis.get(keys.starts("r", woken.decode())) == b"2"
    assert await redis.pttl(keys.starts("r", woken.decode())) > 0
    assert limiter.wakes == {"r": 1}
    assert not await limiter.wake("r", "r", "k", "now")  # nothing left
    assert await redis.zcard(keys.parked("r")) == 0


async def test_a_keys_slot_is_freed_when_its_handler_ends_before_the_ack_is_applied(
    redis: Redis, namespace: str
) -> None:
    app = role_r_app(key_concurrency=1)
    keys, held = Keys(namespace), InFlight()
    limiter = key_limiter(redis, keys, held)
    delivery, job = keyed_delivery(app, keys, 1, "k")
    held.add(delivery)  # its acknowledgement is still queued: the entry is held
    assert await limiter.gate(delivery, job) is None
    assert await redis.zcard(keys.flow_key_slots("r", "k")) == 1
    limiter.finished(delivery)
    await limiter.sweep()
    assert await redis.zcard(keys.flow_key_slots("r", "k")) == 0
    assert limiter.slots() == {}
    await limiter.aclose()


async def test_a_parked_job_of_a_role_with_priorities_is_woken_onto_its_own_level(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger, gate = Ledger(), anyio.Event()
    app = keyed_app(ledger, gate, key_concurrency=1, priorities=3)
    client, keys = Client(redis, namespace=namespace), Keys(namespace)
    worker = make_worker(app, redis, namespace, concurrency=4)
    with anyio.fail_after(20):
        async with running(worker):
            blocker = await client.publish("keyed", {"wait": True}, limit_key="k")
            await wait_until(lambda: ledger.running["k"] == 1)
            high = await client.publish("keyed", {"wait": True}, limit_key="k", priority=2)

            async def parked() -> bool:
                return bool(await redis.llen(keys.park("keyed", "k")))

            await wait_for_query(parked)
            gate.set()  # the blocker ends; the level-2 job is woken and runs, then ends too
            await wait_until(lambda: high in ledger.done)
    assert ledger.done == [blocker, high]
    assert worker.statistics().key_wakes == {"keyed": 1}
    # Woken onto level 2 (not level 0): the runner's check of its priority found it in place.
    assert not [r for r in caplog.records if "says priority" in r.getMessage()]
    assert await redis.xlen(keys.role_stream("keyed")) == 0


async def test_unpark_puts_a_job_back_on_the_level_it_was_parked_from(
    redis: Redis, namespace: str
) -> None:
    keys, scripts = Keys(namespace), Scripts(redis)
    streams = keys.level_streams("r", 3)
    await redis.xgroup_create(streams[2], "workers", id="0", mkstream=True)
    entry_id: bytes = await redis.xadd(streams[2], {"message": "{}"})  # type: ignore[assignment]
    await redis.xreadgroup("workers", "me", {streams[2]: ">"})
    limiter = key_limiter(redis, keys, ttl_ms=1000, scripts=scripts)
    limiter.levels = {"r": 3}
    app = role_r_app(priorities=3)
    delivery = Delivery(app.get_role("r"), "r", streams[2], Entry(entry_id, {}, 1))
    job = Job(protocol=1, kind="job", id="m1", role="r", payload={}, created_at_ms=1)
    decision = Decision("park", job, detail="k", wake_at_ms=0)
    # Parked, then woken at once (no slot of the key is taken): back on level 2, not 0.
    assert await limiter.park(delivery, decision)
    assert limiter.wakes == {"r": 1}
    assert await redis.xlen(streams[0]) == 0
    [(woken, fields)] = await redis.xrange(streams[2])
    assert woken != entry_id and fields[b"parked"] == b"1"
    await limiter.aclose()


async def test_inspect_counts_parked_keys_on_every_partition(redis: Redis, namespace: str) -> None:
    keys, client = Keys(namespace), Client(redis, namespace=namespace)
    layout = await partitions.ensure(redis, keys, "keyed", 3, 2)
    await client.limit("keyed", key_concurrency=1)
    await client.publish("keyed", {})  # the role's streams exist: inspect lists it
    # Keys parked on the second and third partitions only (whatever their jobs' levels).
    await redis.zadd(keys.parked(layout.shards[1]), {"a": 1, "b": 1})
    await redis.zadd(keys.parked(layout.shards[2]), {"c": 1})
    (info,) = [r for r in await inspect_roles(redis, keys) if r.role == "keyed"]
    assert info.parked_keys == 3
    assert (await client.limit("keyed")).parked_keys == 3


async def test_a_parked_job_is_shown_as_waiting_for_its_key(
    redis: Redis, namespace: str, redis_url: str
) -> None:
    ledger, gate = Ledger(), anyio.Event()
    app = keyed_app(ledger, gate, key_concurrency=1, priorities=2)
    client, keys = Client(redis, namespace=namespace), Keys(namespace)
    with anyio.fail_after(30):
        async with running(make_worker(app, redis, namespace, concurrency=4)):
            await client.publish("keyed", {"wait": True}, limit_key="busy")
            await wait_until(lambda: ledger.running["busy"] == 1)
            held = await client.publish("keyed", {}, limit_key="busy", priority=1)

            async def parked() -> bool:
                return bool(await redis.llen(keys.park("keyed", "busy")))

            await wait_for_query(parked)
            found = await client.job(held)
            assert (found.state, found.role, found.priority) == ("parked", "keyed", 1)
            assert found.detail == "parked: waiting for its limit key busy"
            assert found.headers == {LIMIT_KEY_HEADER: "busy"}
            assert (await client.job(held, role="keyed")).state == "parked"
            shown_text = await anyio.to_thread.run_sync(
                lambda: run_cli("job", held, "--redis-url", redis_url, "--namespace", namespace)
            )
            assert "parked: waiting for its limit key busy" in shown_text.stdout
            gate.set()
            await wait_until(lambda: held in ledger.done)


def test_a_parked_item_is_decoded_and_garbage_refused() -> None:
    assert decode_parked_item(b"2,1;7:message2:{}6:parked1:1") == (
        1,
        {b"message": b"{}", b"parked": b"1"},
    )
    assert decode_parked_item(b"0;7:message2:{}") == (0, {b"message": b"{}"})  # no level: 0
    for garbage in (b"", b"no separator", b"0;9:message", b"0;x:y", b"0;7:message"):
        assert decode_parked_item(garbage) is None


async def test_a_burst_drain_runs_the_jobs_its_roles_parked_before_it_returns(
    redis: Redis, namespace: str
) -> None:
    ledger, gate = Ledger(), anyio.Event()
    gate.set()
    app = keyed_app(ledger, gate, key_rate_limit="20/s", key_concurrency=1)
    client, keys = Client(redis, namespace=namespace), Keys(namespace)
    limited = [await client.publish("keyed", {}, limit_key="k") for _ in range(6)]
    other = await client.publish("keyed", {}, limit_key="other")
    worker = make_worker(app, redis, namespace, concurrency=4)
    with anyio.fail_after(20):
        await worker.drain()
    # Every job ran once, and nothing is left parked.
    assert sorted(ledger.done) == sorted([*limited, other])
    assert worker.statistics().key_parks.get("keyed", 0) >= 5
    assert await redis.zcard(keys.parked("keyed")) == 0
    assert await redis.exists(keys.park("keyed", "k")) == 0


async def test_the_jobs_of_a_read_ask_their_keys_in_one_script_call(
    redis: Redis, namespace: str
) -> None:
    app = role_r_app(key_concurrency=2)
    keys, held = Keys(namespace), InFlight()
    limiter = key_limiter(redis, keys, held, concurrency=2)

    async def script_calls() -> int:
        stats: Any = await redis.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("eval", "evalsha"))

    await limiter.gate(*keyed_delivery(app, keys, 0, "warm"))  # loads the script
    before = await script_calls()
    # A read of 7 jobs of 3 keys (a: 3, b: 2, c: 2), gated at once like its consumers do.
    asked = [keyed_delivery(app, keys, i, key) for i, key in enumerate("aaabbcc", start=1)]
    results: list[Any] = [None] * len(asked)

    async def gate(index: int) -> None:
        results[index] = await limiter.gate(*asked[index])

    async with anyio.create_task_group() as tg:
        for index in range(len(asked)):
            tg.start_soon(gate, index)
    assert await script_calls() - before == 1
    # Two of each key may start (key_concurrency=2): the third "a" is parked.
    assert [r is None for r in results] == [True, True, False, True, True, True, True]
    assert results[2].kind == "park" and results[2].detail == "a"
    for key, taken in (("a", 2), ("b", 2), ("c", 2)):
        assert await redis.zcard(keys.flow_key_slots("r", key)) == taken
    # Their ends free every slot in one call too
    for d, _ in asked:
        limiter.finished(d)
    before = await script_calls()
    await limiter.sweep()
    assert await script_calls() - before == 1
    # (the warm-up's slot too: its entry is not held), and no key holds a slot any more.
    assert await redis.zcard(keys.flow_keys("r")) == 0
    assert limiter.slots() == {}
    await limiter.aclose()
