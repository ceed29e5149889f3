"""Partitioned roles on one Redis: names, the recorded layout, routing, start-up checks, views.

The same features on a 3-master cluster (partitions on different masters, adoption after a
SIGKILL, a DAG) are in test_cluster.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

import streamflow
from streamflow import App, Client, Context, SyncClient, Worker, partitions
from streamflow.delivery import Outcome
from streamflow.errors import ConfigError, InvalidNameError
from streamflow.keys import Keys, role_of_shard, shard_tag, validate_shard
from streamflow.ops.inspect import inspect_role, inspect_roles
from streamflow.testing import Harness
from tests.helpers import ROOT, clean_env

SLOTS = 16384


def slot(shard: str) -> int:
    return key_slot(shard_tag(shard).encode())


# -- names and plans (no Redis) --------------------------------------------------------------


def test_shard_names_are_a_role_then_index_and_salt_and_nothing_else() -> None:
    for good in ("orders", "orders#1", "orders#2.17", "a.b-c#63.999999"):
        assert validate_shard(good) == good
    for bad in ("orders#0", "orders#", "orders#1.", "orders#1.x", "{orders}", "o:x", "#1", ""):
        with pytest.raises(InvalidNameError):
            validate_shard(bad)
    assert role_of_shard("orders#2.17") == "orders" and role_of_shard("orders") == "orders"
    keys = Keys("ns")
    assert keys.role_stream("orders#2.17") == "ns:{role:orders#2.17}:stream"
    assert keys.role_config("orders") == "ns:{role:orders}:config"
    with pytest.raises(InvalidNameError):
        keys.role_config("orders#1")  # a role's config is under its first partition only


@pytest.mark.parametrize("count", [2, 3, 5, 8])
def test_without_a_slot_map_partitions_are_spread_evenly_over_the_slot_space(count: int) -> None:
    shards = partitions.plan("orders", count)
    assert shards == partitions.plan("orders", count)  # deterministic
    assert shards[0] == "orders" and len(set(shards)) == count
    first, width = slot("orders"), SLOTS // count
    for index, shard in enumerate(shards):
        assert role_of_shard(validate_shard(shard)) == "orders"
        offset = (slot(shard) - first - index * width) % SLOTS
        assert offset < max(width // 4, 1), (shard, offset)


def test_with_a_slot_map_each_partition_goes_to_the_next_master() -> None:
    def owner(s: int) -> str:
        return "a" if s < 5461 else "b" if s < 10923 else "c"

    three = partitions.plan("orders", 3, owner)
    assert len({owner(slot(s)) for s in three}) == 3
    six = [owner(slot(s)) for s in partitions.plan("orders", 6, owner)]
    assert sorted(six) == ["a", "a", "b", "b", "c", "c"]
    assert six[:3] == six[3:]  # round the masters, starting at the first partition's
    with pytest.raises(ConfigError):
        partitions.plan("orders", 0)
    with pytest.raises(ConfigError):
        partitions.plan("orders", partitions.MAX_PARTITIONS + 1)


def test_a_key_always_picks_the_same_partition_by_crc32() -> None:
    layout = partitions.Layout("orders", partitions.plan("orders", 3))
    # The documented rule, reproducible in any language: zlib's CRC-32 of the UTF-8 key.
    assert partitions.partition_of("order-42", 3) == 1475806942 % 3 == 1
    assert layout.for_key("order-42") == layout.shards[1]
    assert {layout.pick("user:7") for _ in range(5)} == {layout.shards[0]}
    assert layout.pick(None, "dedup-1") == layout.for_key("dedup-1")
    assert [layout.pick(None) for _ in range(6)] == list(layout.shards) * 2
    assert partitions.single("orders").pick("anything") == "orders"
    assert zlib.crc32(b"alpha") % 3 == partitions.partition_of("alpha", 3)


def test_a_recorded_layout_must_belong_to_its_role() -> None:
    good = partitions.parse("orders", b"orders orders#1.3 orders#2")
    assert good.count == 3 and good.shards[1] == "orders#1.3"
    for bad in (b"", b"other other#1", b"orders#1 orders", b"orders orders", b"orders x#1"):
        with pytest.raises(ConfigError, match="recorded partitions"):
            partitions.parse("orders", bad)


# -- on a real Redis -----------------------------------------------------------------------


def hot_app(count: int, seen: list[Any] | None = None) -> App:
    app = App()

    @app.role("hot", partitions=count)
    async def hot(ctx: Context, payload: Any) -> None:
        if seen is not None:
            seen.append(payload)

    return app


@pytest.mark.redis
@pytest.mark.anyio
async def test_the_first_worker_records_the_partitions_and_one_declaring_others_refuses(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await Worker(hot_app(3), redis, namespace=namespace).drain()
    layout = await partitions.load(redis, keys, "hot")
    assert layout is not None and layout.shards == partitions.plan("hot", 3)
    recorded = await redis.hget(keys.role_config("hot"), "shards")
    assert recorded == " ".join(layout.shards).encode()
    for shard in layout.shards:  # every partition has its group
        assert await redis.xinfo_groups(keys.role_stream(shard))
    await Worker(hot_app(3), redis, namespace=namespace).drain()  # agreeing: fine
    with pytest.raises(partitions.PartitionMismatch, match="created with 3 partition"):
        await Worker(hot_app(2), redis, namespace=namespace).drain()
    assert await redis.hget(keys.role_config("hot"), "shards") == recorded


@pytest.mark.redis
@pytest.mark.slow
def test_the_cli_worker_refuses_other_partitions_in_one_line(
    redis_url: str, namespace: str
) -> None:
    import redis as redis_sync

    with redis_sync.Redis.from_url(redis_url) as plain:
        plain.hset(Keys(namespace).role_config("work3"), "shards", "work3 work3#1")
    command = [sys.executable, "-m", "streamflow", "worker", "--app", "tests.apps:app"]
    command += ["--role", "work3", "--redis-url", redis_url, "--namespace", namespace]
    done = subprocess.run(
        command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: role 'work3' was created with 2 partition(s)"), lines
    assert "Traceback" not in done.stderr


@pytest.mark.redis
@pytest.mark.anyio
async def test_publishing_spreads_by_key_or_round_robin_and_early_jobs_are_not_stranded(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    client = Client(redis, namespace=namespace)
    # Before any worker created the role: everything goes to its first partition.
    early = await client.publish_many("hot", ({"early": i} for i in range(4)))
    assert await redis.xlen(keys.role_stream("hot")) == 4
    seen: list[Any] = []
    outcomes: list[Outcome] = []
    worker = Worker(
        hot_app(3, seen), redis, namespace=namespace, block_ms=100, on_outcome=outcomes.append
    )
    await worker.drain()
    assert {o.message_id for o in outcomes} == set(early)
    layout = await partitions.load(redis, keys, "hot")
    assert layout is not None
    client = Client(redis, namespace=namespace)  # a fresh publisher reads the layout
    await client.publish_many("hot", ({"n": i} for i in range(30)))
    await client.publish_many("hot", ({"k": i} for i in range(5)), keys=["order-42"] * 5)
    await client.publish("hot", {"k": 5}, key="order-42")
    with SyncClient(redis_url, namespace=namespace) as sync:
        sync.publish("hot", {"k": 6}, key="order-42")
        sync.publish_many("hot", [{"n": 30 + i} for i in range(3)])
    lengths = [await redis.xlen(keys.role_stream(s)) for s in layout.shards]
    assert lengths == [11, 11 + 7, 11]  # 10 + 1 round-robin each, order-42 on partition 1
    await worker.drain()
    assert [p["k"] for p in seen if "k" in p] == list(range(7))  # the key's order held
    assert sorted(p["n"] for p in seen if "n" in p) == list(range(33))


@pytest.mark.redis
@pytest.mark.anyio
async def test_inspect_shows_a_partitioned_role_once_with_its_totals(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await Worker(hot_app(3), redis, namespace=namespace).drain()
    client = Client(redis, namespace=namespace)
    await client.publish_many("hot", ({"n": i} for i in range(9)))
    layout = await partitions.load(redis, keys, "hot")
    assert layout is not None
    # Two entries delivered and left pending, on partition 2.
    await redis.xreadgroup("workers", "someone", {keys.role_stream(layout.shards[2]): ">"}, 2)
    [info] = [r for r in await inspect_roles(redis, keys) if r.role == "hot"]
    assert (info.partitions, info.length) == (3, 9)
    [group] = info.groups
    assert (group.name, group.pending, group.lag) == ("workers", 2, 7)
    assert {c.name: c.pending for c in group.consumers}["someone"] == 2
    detail = await inspect_role(redis, keys, "hot")
    assert detail is not None
    assert [(e.partition, e.consumer) for e in detail.oldest_pending] == [(2, "someone")] * 2


@pytest.mark.anyio
async def test_the_harness_runs_a_partitioned_role_on_fakeredis() -> None:
    app = App()
    calls: list[int] = []

    @app.role("hot", partitions=4)
    async def hot(ctx: Context, payload: Any) -> None:
        if payload["n"] == 3:
            raise ValueError("bad three")
        calls.append(payload["n"])

    async with Harness(app) as harness:
        for n in range(8):
            await harness.publish("hot", {"n": n}, key=f"k{n}")
        await harness.drain()
        assert sorted(calls) == [0, 1, 2, 4, 5, 6, 7]
        assert [d.reason for d in await harness.dead_letters("hot")] == ["failed"]
        assert await harness.queued("hot") == 0


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.slow
async def test_the_dlq_commands_take_partitioned_dead_letter_ids(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    app = App()

    @app.role("hot", partitions=3)
    async def hot(ctx: Context, payload: Any) -> None:
        raise streamflow.Fatal("no")

    client = Client(redis, namespace=namespace)
    await Worker(app, redis, namespace=namespace).drain()  # creates the partitions
    await client.publish_many("hot", [{"n": i} for i in range(3)])  # one per partition
    await Worker(app, redis, namespace=namespace).drain()
    conn = ["--redis-url", redis_url, "--namespace", namespace]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "streamflow", *args, *conn]
        return subprocess.run(
            command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60
        )

    listed = cli("dlq", "list", "hot", "--json")
    assert listed.returncode == 0, listed.stderr
    ids = [json.loads(line)["id"] for line in listed.stdout.splitlines()]
    assert sorted(i.split(":")[0] for i in ids) == ["0", "1", "2"]
    shown = cli("dlq", "show", "hot", ids[1])
    assert shown.returncode == 0 and ids[1] in shown.stdout, shown.stderr
    missing = cli("dlq", "show", "hot", "7:1-0")  # no partition 7
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    replayed = cli("dlq", "replay", "hot", ids[2])
    assert replayed.returncode == 0 and "1 replayed" in replayed.stdout, replayed.stderr
    assert await client.dead_letter_count("hot") == 2


@pytest.mark.redis
@pytest.mark.anyio
async def test_publish_many_needs_one_key_per_payload(redis: Redis, namespace: str) -> None:
    await Worker(hot_app(3), redis, namespace=namespace).drain()
    client = Client(redis, namespace=namespace)
    with pytest.raises(ValueError):
        await client.publish_many("hot", [{"n": 1}, {"n": 2}], keys=["only-one"])
    assert await queued_jobs(redis, namespace) == 0


async def queued_jobs(redis: Redis, namespace: str) -> int:
    """Jobs in the role's partition streams (nothing is published when the keys are wrong)."""
    layout = await partitions.load(redis, Keys(namespace), "hot")
    assert layout is not None
    return sum([await redis.xlen(Keys(namespace).role_stream(s)) for s in layout.shards])
