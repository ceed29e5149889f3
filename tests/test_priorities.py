"""Priority levels: keys, the read order and its guard, publishing, and the worker per level.

Process tests (a SIGKILLed worker with prioritised entries pending) are marked slow.
"""

from __future__ import annotations

import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import App, Client, Context, LeaseSettings, Retry, SyncClient, Worker, partitions
from streamflow.delivery import Outcome
from streamflow.errors import ConfigError, InvalidNameError
from streamflow.keys import MAX_PRIORITIES, Keys
from streamflow.middleware import Middleware, Publish, PublishNext
from streamflow.ops.exporter import Exporter
from streamflow.ops.inspect import inspect_role, inspect_roles
from streamflow.priorities import GUARD_EVERY, LevelOrder, guard_bound
from streamflow.protocol import new_message_id, now_ms
from tests.helpers import (
    CLI,
    ROOT,
    clean_env,
    last_statuses,
    make_worker,
    running,
    wait_for,
    wait_until,
)
from tests.processes import (
    Record,
    Workers,
    assert_none_lost_and_duplicates_allowed,
    unique,
)

ROLE = "ranked"


def ranked_app(seen: list[Any] | None = None, *, levels: int = 3, **options: Any) -> App:
    app = App()

    @app.role(ROLE, priorities=levels, **options)
    async def ranked(ctx: Context, payload: Any) -> None:
        if seen is not None:
            seen.append(payload)

    return app


@dataclass
class Runs:
    """What a handler saw: its payloads, and the most of it that ran at once."""

    seen: list[Any] = field(default_factory=list)
    running: int = 0
    most: int = 0


async def limited_worker(redis: Redis, namespace: str, pause: float) -> tuple[Worker, Runs]:
    """A worker (concurrency 8) of a role with 3 levels and a concurrency limit of 2 whose jobs
    take ``pause`` s each; the role is created."""
    app, runs = App(), Runs()

    @app.role(ROLE, priorities=3, concurrency_limit=2)
    async def ranked(ctx: Context, payload: Any) -> None:
        runs.running += 1
        runs.most = max(runs.most, runs.running)
        await anyio.sleep(pause)
        runs.running -= 1
        runs.seen.append(payload)

    # Running slots expire with the lease TTL (a dead worker's come back): a TTL longer than
    # any stall of a loaded test machine, so that the bound is the limit's and not a slot's
    # expiry.
    lease = LeaseSettings(ttl=10.0, reclaim_interval=0.1)
    worker = make_worker(app, redis, namespace, concurrency=8, lease=lease)
    await worker.drain()  # creates the role
    return worker, runs


def raw_job(role: str, payload: Any, **fields: Any) -> bytes:
    doc = {"protocol": 1, "kind": "job", "id": new_message_id(), "role": role}
    doc |= {"payload": payload, "created_at_ms": now_ms(), **fields}
    return orjson.dumps(doc)


# -- keys and the read order (no Redis) ------------------------------------------------------


def test_level_streams_share_the_partitions_slot_and_level_zero_is_the_role_stream() -> None:
    keys = Keys("ns")
    assert keys.level_streams("orders", 3) == [
        "ns:{role:orders}:stream",
        "ns:{role:orders}:level:1",
        "ns:{role:orders}:level:2",
    ]
    assert keys.delayed("orders#1.7", 2) == "ns:{role:orders#1.7}:level-delayed:2"
    for level in range(3):
        stream = keys.role_stream("orders#1.7", level)
        assert keys.level_of_stream(stream) == level
        assert keys.role_of_stream(stream) == "orders#1.7"
    assert keys.role_of_stream("ns:{role:orders}:level:9") is None
    for bad in (-1, MAX_PRIORITIES, True, "1"):
        with pytest.raises(InvalidNameError):
            keys.role_stream("orders", bad)  # type: ignore[arg-type]


def test_the_read_order_puts_the_top_first_and_each_lower_level_first_within_the_bound() -> None:
    order = LevelOrder(3)
    reads = [order.next() for _ in range(4 * guard_bound(3))]
    assert reads[0] == (2, 1, 0)
    assert sum(r[0] == 2 for r in reads) == len(reads) * (GUARD_EVERY - 1) // GUARD_EVERY
    for level in (0, 1):
        firsts = [i for i, r in enumerate(reads) if r[0] == level]
        gaps = [b - a for a, b in zip([-1, *firsts], firsts, strict=False)]
        assert firsts and max(gaps) <= guard_bound(3), (level, gaps)
    assert all(sorted(r) == [0, 1, 2] for r in reads)  # every read may reach every level
    with pytest.raises(ValueError):
        LevelOrder(1)


def test_a_role_declares_one_to_max_priorities() -> None:
    for bad in (0, MAX_PRIORITIES + 1, 2.0):
        with pytest.raises(ConfigError, match="priorities must be"):
            ranked_app(levels=bad)  # type: ignore[arg-type]


# -- publishing ------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.anyio
async def test_publishing_refuses_a_priority_the_role_does_not_have_clearly(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    client = Client(redis, namespace=namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="has no priority levels"):
            await client.publish(ROLE, {}, priority=1)  # not created yet: only level 0
    await Worker(ranked_app(), redis, namespace=namespace).drain()
    client = Client(redis, namespace=namespace)
    for bad, match in (
        (3, "levels 0 to 2"),
        (-1, "levels 0 to 2"),
        ("2", "integer"),
        (True, "integer"),
    ):
        with pytest.raises(ValueError, match=match):
            await client.publish(ROLE, {}, priority=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=match):
            await client.publish_many(ROLE, [{}, {}], priorities=[0, bad])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="differ in length"):
        await client.publish_many(ROLE, [{}, {}], priorities=[1])
    for level in range(3):  # nothing published by a refused call
        assert await redis.xlen(keys.role_stream(ROLE, level)) == 0
    with SyncClient(redis_url, namespace=namespace) as sync:
        with pytest.raises(ValueError, match="levels 0 to 2"):
            sync.publish(ROLE, {}, priority=7)
        sync.publish(ROLE, {"s": 1}, priority=2)
        sync.publish_many(ROLE, [{"s": 2}, {"s": 3}], priorities=[1, 0])
    await client.publish(ROLE, {"a": 1}, priority=2)
    await client.publish(ROLE, {"a": 2}, priority=1, delay=60)
    await client.publish(ROLE, {"a": 3}, priority=2, dedup_key="once")
    await client.publish(ROLE, {"a": 3}, priority=2, dedup_key="once")
    assert [await redis.xlen(keys.role_stream(ROLE, lv)) for lv in range(3)] == [1, 1, 3]
    assert await redis.zcard(keys.delayed(ROLE, 1)) == 1
    [(_, fields)] = await redis.xrange(keys.role_stream(ROLE, 1))
    assert orjson.loads(fields[b"message"])["priority"] == 1
    [(_, fields)] = await redis.xrange(keys.role_stream(ROLE, 0))
    assert "priority" not in orjson.loads(fields[b"message"])  # level 0: the bytes as before


@pytest.mark.redis
@pytest.mark.anyio
async def test_the_levels_are_recorded_and_a_worker_declaring_others_refuses(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await Worker(ranked_app(levels=1), redis, namespace=namespace).drain()
    assert await redis.hget(keys.role_config(ROLE), "levels") is None  # plain: nothing more
    await Worker(ranked_app(levels=3), redis, namespace=namespace).drain()  # adds priorities
    assert await redis.hget(keys.role_config(ROLE), "levels") == b"3"
    for level in range(3):
        assert await redis.xinfo_groups(keys.role_stream(ROLE, level))
    for other in (1, 2):
        with pytest.raises(partitions.PriorityMismatch, match="3 priority level"):
            await Worker(ranked_app(levels=other), redis, namespace=namespace).drain()
    await redis.hset(keys.role_config(ROLE), "levels", "x9")
    with pytest.raises(ConfigError, match="recorded priority levels"):
        await partitions.load(redis, keys, ROLE)


# -- the worker ------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_backlog_of_high_drains_before_low_while_low_keeps_its_guarded_share(
    redis: Redis, namespace: str
) -> None:
    await Worker(ranked_app(), redis, namespace=namespace).drain()
    client = Client(redis, namespace=namespace)
    count = 300
    await client.publish_many(ROLE, [{"p": 0, "i": i} for i in range(count)])
    await client.publish_many(
        ROLE, [{"p": 1, "i": i} for i in range(count)], priorities=[1] * count
    )
    await client.publish_many(
        ROLE, [{"p": 2, "i": i} for i in range(count)], priorities=[2] * count
    )
    seen: list[Any] = []
    worker = Worker(ranked_app(seen), redis, namespace=namespace, concurrency=4, prefetch=4)
    await worker.drain()
    order = [p["p"] for p in seen]
    assert len(order) == 3 * count
    last_high = max(i for i, p in enumerate(order) if p == 2)
    before = order[:last_high]
    print(f"before the last high job: {[before.count(level) for level in (2, 1, 0)]} (2, 1, 0)")
    # High went first: most of what ran before the last high job was high ...
    assert before.count(2) == count - 1
    assert before.count(2) / len(before) >= 0.6, (before.count(0), before.count(1))
    # ... and each lower level still got its share: one read in guard_bound first, each
    # read taking at most the budget (concurrency + prefetch = 8 entries).
    reads = count / 8
    for level in (0, 1):
        assert before.count(level) >= reads / guard_bound(3) - 2, (level, before.count(level))
    # Within a level, publishing order holds.
    for level in range(3):
        assert [p["i"] for p in seen if p["p"] == level] == list(range(count))


@pytest.mark.redis
@pytest.mark.anyio
async def test_an_idle_prioritised_worker_wakes_for_a_job_on_any_level(
    redis: Redis, namespace: str
) -> None:
    seen: list[Any] = []
    outcomes: list[Outcome] = []
    worker = make_worker(ranked_app(seen), redis, namespace, outcomes, block_ms=5000)
    client = Client(redis, namespace=namespace)
    async with running(worker):
        await anyio.sleep(0.2)  # the reader is blocked on every level
        for level in (0, 2, 1):
            with anyio.fail_after(2):  # far less than the 5 s block
                await client.publish(ROLE, {"level": level}, priority=level)
                await wait_until(lambda level=level: {"level": level} in seen)
    assert worker.statistics().acked == 3


@pytest.mark.redis
@pytest.mark.anyio
async def test_retries_delays_dead_letters_replays_and_cancels_keep_the_level(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    attempts: list[int] = []
    started: list[Any] = []
    app = App()

    @app.role(ROLE, priorities=3, retry=streamflow_retry(3), max_deliveries=10)
    async def ranked(ctx: Context, payload: Any) -> None:
        if payload.get("fail"):
            attempts.append(ctx.attempt)
            raise Retry(delay=0.05) if ctx.attempt < 3 else RuntimeError("no")
        if payload.get("slow"):
            started.append(ctx.message_id)
            await anyio.sleep(30)

    outcomes: list[Outcome] = []
    worker = make_worker(app, redis, namespace, outcomes)
    client = Client(redis, namespace=namespace)
    await worker.drain()
    failing = await client.publish(ROLE, {"fail": True}, priority=2)
    delayed = await client.publish(ROLE, {"later": True}, priority=1, delay=0.3)
    assert await redis.zcard(keys.delayed(ROLE, 1)) == 1
    async with running(worker):
        await wait_until(lambda: last_statuses(outcomes).get(failing) == "dead_lettered")
        await wait_until(lambda: last_statuses(outcomes).get(delayed) == "acked")
        slow = await client.publish(ROLE, {"slow": True}, priority=2)
        await wait_until(lambda: slow in started)
        await client.cancel(slow, target="message")
        await wait_until(lambda: last_statuses(outcomes).get(slow) == "cancelled")
    assert attempts == [1, 2, 3]
    # The retries stayed at level 2: the schedule of level 2 was used, never level 0's.
    assert await redis.zcard(keys.delayed(ROLE, 0)) == 0
    [letter] = await client.dead_letters(ROLE)
    assert letter.letter is not None and letter.letter.job is not None
    assert letter.letter.job.priority == 2
    await client.replay(ROLE)
    assert await redis.xlen(keys.role_stream(ROLE, 2)) == 1  # back on its level
    assert await redis.xlen(keys.role_stream(ROLE, 0)) == 0


def streamflow_retry(attempts: int) -> Any:
    from streamflow import RetryPolicy

    return RetryPolicy(max_attempts=attempts, backoff=0.01, max_backoff=0.02)


@pytest.mark.redis
@pytest.mark.anyio
async def test_raw_xadd_chooses_a_level_and_a_hostile_priority_is_dead_lettered_or_clamped(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys(namespace)
    seen: list[Any] = []
    outcomes: list[Outcome] = []
    worker = make_worker(ranked_app(seen), redis, namespace, outcomes)
    await worker.drain()
    # A raw publisher picks the level by the stream it XADDs to.
    await redis.xadd(keys.role_stream(ROLE, 2), {"message": raw_job(ROLE, "top", priority=2)})
    await redis.xadd(keys.role_stream(ROLE, 0), {"message": raw_job(ROLE, "low")})
    # A priority the protocol refuses (not an integer, out of 0..4): dead-lettered.
    for bad in ("2", -1, 5, 2.5, 2**63 - 1):
        await redis.xadd(
            keys.role_stream(ROLE, 1), {"message": raw_job(ROLE, repr(bad), priority=bad)}
        )
    # A priority the protocol allows but the stream disagrees with: runs where it is, warned.
    await redis.xadd(
        keys.role_stream(ROLE, 0), {"message": raw_job(ROLE, "mislabelled", priority=4)}
    )
    await worker.drain()
    assert seen[0] == "top"
    assert set(seen) == {"top", "low", "mislabelled"}
    assert await redis.xlen(keys.dead_letters(ROLE)) == 5
    client = Client(redis, namespace=namespace)
    letters = await client.dead_letters(ROLE)
    assert {entry.letter.reason for entry in letters if entry.letter} == {"invalid_message"}
    assert all("priority" in (entry.letter.detail or "") for entry in letters if entry.letter)
    await client.purge_dead_letters(ROLE)
    # A valid priority the role lacks (4 of 0..2), dead-lettered (expired): its replay is
    # clamped to the role's highest level.
    stale = raw_job(ROLE, "stale", priority=4, deadline_ms=1)
    await redis.xadd(keys.role_stream(ROLE, 0), {"message": stale})
    await worker.drain()
    [letter] = await client.dead_letters(ROLE)
    assert letter.letter is not None and letter.letter.reason == "expired"
    await client.replay(ROLE)
    assert [await redis.xlen(keys.role_stream(ROLE, level)) for level in range(3)] == [0, 0, 1]
    assert "level 0" in caplog.text and "priority 4" in caplog.text


# -- views -----------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.anyio
async def test_inspect_job_and_the_exporter_show_the_depth_of_each_level(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await Worker(ranked_app(), redis, namespace=namespace).drain()
    client = Client(redis, namespace=namespace)
    await client.publish_many(ROLE, [{}] * 5, priorities=[0, 0, 0, 2, 2])
    later = await client.publish(ROLE, {}, priority=1, delay=60)
    top = (await client.publish_many(ROLE, [{}], priorities=[2]))[0]
    # One entry of level 2 delivered and left pending.
    await redis.xreadgroup("workers", "someone", {keys.role_stream(ROLE, 2): ">"}, 1)
    [info] = [r for r in await inspect_roles(redis, keys) if r.role == ROLE]
    assert (info.length, info.delayed, info.partitions) == (6, 1, 1)
    assert info.levels is not None
    assert [(lv.level, lv.length, lv.pending, lv.delayed) for lv in info.levels] == [
        (0, 3, 0, 0),
        (1, 0, 0, 1),
        (2, 3, 1, 0),
    ]
    detail = await inspect_role(redis, keys, ROLE)
    assert detail is not None and [e.level for e in detail.oldest_pending] == [2]
    assert (await client.job(top)).priority == 2
    assert (await client.job(later)).state == "delayed"
    assert (await client.job(later)).priority == 1
    exporter = Exporter(redis, namespace=namespace)
    await exporter.refresh()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in exporter.collect()
        for s in metric.samples
    }
    for level, length in ((0, 3), (1, 0), (2, 3)):
        labels = (("level", str(level)), ("role", ROLE))
        assert samples[("streamflow_priority_level_length", labels)] == length
    # A role without priorities shows no levels.
    plain = App()
    plain.role("flat")(lambda ctx, payload: None)
    await Worker(plain, redis, namespace=namespace).drain()
    [flat] = [r for r in await inspect_roles(redis, keys) if r.role == "flat"]
    assert flat.levels is None


class Stamp(Middleware):
    """A publish middleware that only adds a header: the levels must pass through it."""

    async def publish(self, message: Publish, call_next: PublishNext) -> str:
        message.headers["stamped"] = "yes"
        return await call_next(message)


@pytest.mark.redis
@pytest.mark.anyio
async def test_publishing_through_a_middleware_keeps_each_jobs_level(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await Worker(ranked_app(), redis, namespace=namespace).drain()
    client = Client(redis, namespace=namespace)
    client.add_middleware(Stamp())
    await client.publish_many(ROLE, [{"i": i} for i in range(4)], priorities=[2, 0, 1, 2])
    await client.publish(ROLE, {"i": 4}, priority=1)
    with pytest.raises(ValueError, match="differ in length"):
        await client.publish_many(ROLE, [{}, {}], priorities=[1])
    lengths = [await redis.xlen(keys.role_stream(ROLE, level)) for level in range(3)]
    assert lengths == [1, 2, 2]
    [(_, fields)] = await redis.xrange(keys.role_stream(ROLE, 0))
    assert orjson.loads(fields[b"message"])["headers"] == {"stamped": "yes"}


# -- processes -------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
def test_the_cli_publishes_at_a_level_and_refuses_one_the_role_lacks_in_one_line(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    connection = ["--redis-url", redis_url, "--namespace", namespace]
    keys = Keys(namespace)
    with redis_sync_client(redis_url) as plain:  # the role as its first worker records it
        plain.hset(keys.role_config("ranked"), mapping={"shards": "ranked", "levels": "3"})
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"seconds": 0}\n{"seconds": 0}\n')
    publish = [*CLI, "publish", "ranked", *connection]
    for extra in (["--json", "{}", "--priority", "2"], ["--file", str(lines), "--priority", "1"]):
        done = subprocess.run(
            publish + extra, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    refused = subprocess.run(
        [*publish, "--json", "{}", "--priority", "3"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: priority 3 refused: role 'ranked' has priority levels 0 to 2"
    )
    with redis_sync_client(redis_url) as plain:
        lengths = [plain.xlen(keys.role_stream("ranked", level)) for level in range(3)]
    assert lengths == [0, 2, 1]
    shown = subprocess.run(
        [*CLI, "inspect", "ranked", *connection],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert (
        "priority levels (highest first): 2: 1 in stream, 0 pending, 0 delayed; "
        "1: 2 in stream, 0 pending, 0 delayed; 0: 0 in stream, 0 pending, 0 delayed"
    ) in shown.stdout


@pytest.mark.redis
@pytest.mark.slow
def test_a_sigkilled_workers_prioritised_entries_are_adopted_on_every_level_and_none_lost(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    record = Record(tmp_path / "record.txt")
    workers = Workers(tmp_path, redis_url, namespace, record.path)
    keys = Keys(namespace)
    try:
        a_name, b_name = unique("a"), unique("b")
        victim = workers.start(a_name, "--prefetch", "0", roles=["ranked"], concurrency=6)
        victim.wait_ready()
        slow = {"seconds_by_consumer": {a_name: 60, b_name: 0.2}}
        with SyncClient(redis_url, namespace=namespace) as sync:
            ids = sync.publish_many("ranked", [slow] * 6, priorities=[0, 1, 2, 0, 1, 2])
            wait_for(lambda: set(ids) <= record.ids("START", a_name), 15, "the victim starts 6")
            survivor = workers.start(b_name, roles=["ranked"], concurrency=8)
            survivor.wait_ready()
            victim.kill()
            more = sync.publish_many("ranked", [{"seconds": 0.05}] * 6, priorities=[2, 1, 0] * 2)
            wait_for(lambda: set(ids + more) <= record.ids("DONE", b_name), 20, "all finished")
        assert_none_lost_and_duplicates_allowed(record, ids + more, set(ids))
        with redis_sync_client(redis_url) as plain:
            for level in range(3):
                stream = keys.role_stream("ranked", level)
                wait_for(lambda s=stream: plain.xlen(s) == 0, 5, f"level {level} settled")
                assert plain.xpending(stream, "workers")["pending"] == 0
            assert plain.xlen(keys.dead_letters("ranked")) == 0
        # An adoption after a crash is not a failed attempt, at any level.
        assert {line.attempt for line in record.events("START", b_name)} == {1}
        survivor.assert_clean_log()
    finally:
        workers.kill_all()


def redis_sync_client(url: str) -> Any:
    import redis as redis_sync

    return redis_sync.Redis.from_url(url)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.anyio
async def test_levels_of_partitions_on_a_cluster_read_block_retry_and_settle_in_their_slots(
    namespace: str,
) -> None:
    from streamflow import connect
    from tests.cluster import local_cluster, require_cluster_tools

    require_cluster_tools()
    keys = Keys(namespace)
    seen: list[Any] = []
    app = App()

    @app.role(ROLE, partitions=3, priorities=3, retry=streamflow_retry(2))
    async def ranked(ctx: Context, payload: Any) -> None:
        seen.append(payload)
        if payload.get("fail") and ctx.attempt == 1:
            raise Retry(delay=0.05)

    with local_cluster() as cluster:
        redis = connect.connect(cluster.url)
        try:
            outcomes: list[Outcome] = []
            worker = make_worker(app, redis, namespace, outcomes, block_ms=3000)
            client = Client(redis, namespace=namespace)
            async with running(worker):
                await anyio.sleep(0.3)  # every partition's reader blocks on its 3 levels
                with anyio.fail_after(2):  # woken well before the 3 s block ends
                    await client.publish(ROLE, {"n": -1}, priority=2, key="k")
                    await wait_until(lambda: {"n": -1} in seen)
                await client.publish_many(
                    ROLE, [{"n": i} for i in range(60)], priorities=[i % 3 for i in range(60)]
                )
                await client.publish(ROLE, {"fail": True}, priority=1, key="x")
                await client.publish(ROLE, {"later": True}, priority=2, delay=0.2)
                await wait_until(lambda: len([o for o in outcomes if o.status == "acked"]) == 63)
            layout = await partitions.load(redis, keys, ROLE)
            assert layout is not None and layout.levels == 3 and layout.count == 3
            for shard in layout.shards:
                for stream in keys.level_streams(shard, 3):
                    assert await redis.xlen(stream) == 0
            assert sorted(p["n"] for p in seen if "n" in p) == list(range(-1, 60))
            assert [o.status for o in outcomes].count("retried") == 1
        finally:
            await redis.aclose()


# -- read_levels.lua and the Harness ---------------------------------------------------------


@pytest.mark.redis
@pytest.mark.anyio
async def test_read_levels_takes_the_levels_in_the_order_given_within_the_budget(
    redis: Redis, namespace: str
) -> None:
    from streamflow import scripts, streams

    keys = Keys(namespace)
    names = [keys.role_stream(ROLE, level) for level in (2, 1, 0)]
    for name in names:
        await streams.ensure_group(redis, name)
    for level, count in ((1, 3), (0, 5)):
        for i in range(count):
            await redis.xadd(keys.role_stream(ROLE, level), {"message": f"{level}-{i}"})
    registered = scripts.Scripts(redis)

    async def read(order: list[str], count: int) -> list[tuple[int, list[bytes]]]:
        found = await scripts.read_levels(registered, redis, order, "c", count=count)
        return [
            (keys.level_of_stream(stream), [e.fields[b"message"] for e in entries])
            for stream, entries in found
        ]

    # The top level is empty: level 1's three, then one of level 0 fills the budget of 4.
    assert await read(names, 4) == [(1, [b"1-0", b"1-1", b"1-2"]), (0, [b"0-0"])]
    # Another order: level 0 first (a guard read).
    assert await read(names[::-1], 2) == [(0, [b"0-1", b"0-2"])]
    assert await read(names, 10) == [(0, [b"0-3", b"0-4"])]
    assert await read(names, 10) == []  # nothing new anywhere: no entry, no error
    assert (await redis.xpending(names[2], "workers"))["pending"] == 5  # delivered to "c"
    await redis.delete(names[0])
    with pytest.raises(ResponseError, match="NOGROUP"):
        await read(names, 1)


@pytest.mark.anyio
async def test_the_harness_serves_levels_on_fakeredis_higher_first() -> None:
    from streamflow.testing import Harness

    seen: list[Any] = []
    async with Harness(ranked_app(seen)) as harness:  # the role exists from the start
        await harness.publish(ROLE, "low")
        await harness.publish(ROLE, "top", priority=2)
        await harness.publish(ROLE, "middle", priority=1, delay=60)
        await harness.drain()
    assert seen == ["top", "low", "middle"]  # the delayed one fast-forwarded last


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_limited_role_with_levels_never_runs_more_than_its_limit(
    redis: Redis, namespace: str
) -> None:
    worker, runs = await limited_worker(redis, namespace, 0.01)
    seen, client = runs.seen, Client(redis, namespace=namespace)
    await client.publish_many(ROLE, list(range(30)), priorities=[i % 3 for i in range(30)])
    async with running(worker):
        await wait_until(lambda: len(seen) == 30)
        for round_ in range(5):  # an idle reader, blocked on every level, woken by 3 at once
            await anyio.sleep(0.2)
            await client.publish_many(
                ROLE, [100 + 3 * round_ + i for i in range(3)], priorities=[2, 1, 0]
            )
            await wait_until(lambda round_=round_: len(seen) == 33 + 3 * round_)
    assert sorted(seen) == [*range(30), *range(100, 115)]
    assert runs.most <= 2


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_blocked_read_of_a_limited_role_beyond_its_grants_starts_all_and_leaks_no_slot(
    redis: Redis, namespace: str
) -> None:
    # Three jobs land on three levels between the reader's read of the levels (empty) and its
    # blocking read, which so returns one entry per level: one more than the limit's 2 grants.
    # The third must wait for a slot its own first two free, not for their tokens to expire
    # (the lease TTL, 10 s here), and every slot must be given back.
    worker, runs = await limited_worker(redis, namespace, 0.05)
    seen, client = runs.seen, Client(redis, namespace=namespace)
    reader = worker._intake.reader
    read_levels, armed = reader.read_levels, [True]

    async def publish_after_an_empty_read(names: Any, *, count: int) -> Any:
        found = await read_levels(names, count=count)
        if armed[0] and not found:
            armed[0] = False
            await client.publish_many(ROLE, [2, 1, 0], priorities=[2, 1, 0])
        return found

    reader.read_levels = publish_after_an_empty_read  # type: ignore[method-assign]
    async with running(worker):
        await wait_until(lambda: len(seen) == 3, timeout=5.0)
        await wait_until(lambda: not worker.statistics().limit_slots)
    assert (await client.limit(ROLE)).running == 0
    assert armed == [False]
    assert sorted(seen) == [0, 1, 2]
    assert runs.most <= 2


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_paused_role_with_levels_starts_nothing_until_resumed_and_loses_nothing(
    redis: Redis, namespace: str
) -> None:
    seen: list[Any] = []
    client = Client(redis, namespace=namespace)
    worker = make_worker(ranked_app(seen), redis, namespace)
    await worker.drain()  # creates the role
    async with running(worker):
        await client.pause(ROLE)
        await anyio.sleep(1.2)  # the pause is seen within a poll (0.5 s)
        await client.publish_many(ROLE, [0, 1, 2, 3, 4, 5], priorities=[2, 1, 0, 2, 1, 0])
        await anyio.sleep(0.5)
        assert seen == []  # nothing started while paused, at any level
        await client.resume(ROLE)
        await wait_until(lambda: len(seen) == 6)
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]


@pytest.mark.anyio
async def test_a_follow_up_job_can_be_published_at_a_level() -> None:
    from streamflow.testing import Harness

    seen: list[Any] = []
    app = App()

    @app.role("parent")
    async def parent(ctx: Context, payload: Any) -> None:
        await ctx.publish(ROLE, "child-top", priority=2)

    @app.role(ROLE, priorities=3)
    async def ranked(ctx: Context, payload: Any) -> None:
        seen.append(payload)

    async with Harness(app) as harness:
        await harness.publish("parent", None)
        await harness.drain(["parent"])
        keys = harness.keys
        assert await harness.redis.xlen(keys.role_stream(ROLE, 2)) == 1
        assert await harness.redis.xlen(keys.role_stream(ROLE, 0)) == 0
        await harness.drain([ROLE])
    assert seen == ["child-top"]
