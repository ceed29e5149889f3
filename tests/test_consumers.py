"""Dead consumer names are deleted once they hold nothing; live ones and holders never."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import scripts, streams
from streamflow.client import SyncClient
from streamflow.consumers import ConsumerNames
from streamflow.dag.coordinator import Coordinator
from streamflow.errors import InvalidNameError
from streamflow.keys import COORDINATORS, GROUP, Keys
from streamflow.scripts import Scripts
from tests.helpers import wait_for
from tests.processes import Record, Workers

pytestmark = pytest.mark.redis


def group_consumers(client: sync_redis.Redis, keys: Keys, role: str = "work") -> dict[str, int]:
    """The group's consumer names with their pending counts."""
    found = client.xinfo_consumers(keys.role_stream(role), GROUP)
    return {c["name"].decode(): int(c["pending"]) for c in found}  # type: ignore[union-attr]


@pytest.mark.slow
def test_crash_loop_of_sigkilled_workers_leaves_only_live_consumer_names(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    record = Record(tmp_path / "record.txt")
    workers = Workers(tmp_path, redis_url, namespace, record.path)
    client = sync_redis.Redis.from_url(redis_url)
    keys = Keys(namespace)
    try:
        keeper = workers.start("keeper")
        keeper.wait_ready()
        published: list[str] = []
        most = 0
        with SyncClient(redis_url, namespace=namespace) as publisher:
            for round_ in range(8):
                name = f"crash-{round_}"
                victim = workers.start(name, concurrency=2)
                victim.wait_ready()
                # Every other victim dies holding work: its name must stay until that work is
                # adopted, and the work must not be lost with it (DELCONSUMER would drop it).
                if round_ % 2 == 0:
                    slow = {"seconds_by_consumer": {name: 600}, "seconds": 0.05}
                    ids = set(publisher.publish_many("work", [slow, slow]))
                    published += ids
                    wait_for(lambda: ids <= record.ids("START"), 20, f"{name} starts")  # noqa: B023
                victim.kill()
                most = max(most, len(group_consumers(client, keys)))
        assert most >= 2, "no dead name was ever seen"
        last_kill = time.monotonic()

        # Live: the keeper. Recently dead: none once their work was adopted and a lease TTL
        # (1 s) and a few cleanup ticks (0.33 s each) passed.
        wait_for(
            lambda: set(group_consumers(client, keys)) == {"keeper"},
            30,
            "only the live worker's name left",
            every=0.1,
        )
        print(f"up to {most} names; 1 left {time.monotonic() - last_kill:.1f}s after the last kill")
        wait_for(lambda: set(published) <= record.ids("DONE"), 30, "the adopted work finished")
        assert "consumer names of stopped processes" in keeper.stderr()
        keeper.assert_clean_log()
    finally:
        workers.kill_all()
        client.close()


# -- the script and the step, against a real Redis ---------------------------------------------


async def hold_entry(redis: Redis, stream: str, consumer: str) -> None:
    """Give ``consumer`` one pending entry."""
    await redis.xadd(stream, {"message": b"{}"})
    await streams.read_group(redis, stream, consumer, count=1, block_ms=None)


async def names(redis: Redis, stream: str, group: str = GROUP) -> set[str]:
    return {streams.text(c["name"]) for c in await redis.xinfo_consumers(stream, group)}


@pytest.mark.anyio
async def test_only_a_dead_empty_consumer_is_deleted(redis: Redis, namespace: str) -> None:
    keys = Keys(namespace)
    stream = keys.role_stream("r")
    await streams.ensure_group(redis, stream)
    # dead-holder: holds an entry, no mark. live: marked, holds nothing. dead: neither.
    await hold_entry(redis, stream, "dead-holder")
    for name in ("live", "dead", "me"):
        await redis.xgroup_createconsumer(stream, GROUP, name)
    # Not a name a worker could hold: written by something else, left alone.
    await redis.xgroup_createconsumer(stream, GROUP, "odd{name}")
    registered = Scripts(redis)
    live = ConsumerNames(redis, registered, keys, "live", ttl_ms=60_000, every=20)
    live.serve([(stream, GROUP)])
    await live.mark()
    # ttl 0: every consumer counts as idle long enough.
    me = ConsumerNames(redis, registered, keys, "me", ttl_ms=0, every=1)
    with anyio.fail_after(10):
        assert await me.forget_dead(stream, GROUP) == ["dead"]
        assert await names(redis, stream) == {"dead-holder", "live", "me", "odd{name}"}
        assert me.forgotten == 1

        # The script checks again, whatever the caller believed: a holder and a marked name
        # passed as candidates are refused.
        candidates = [
            (name.encode(), keys.consumer_mark(stream, name)) for name in ("dead-holder", "live")
        ]
        assert await scripts.forget_consumers(registered, redis, stream, GROUP, candidates) == []
        assert (await redis.xpending(stream, GROUP))["pending"] == 1

        # Once its entry is acknowledged, the former holder goes too; the live one stays.
        [(entry_id, _)] = await redis.xrange(stream, count=1)
        await redis.xack(stream, GROUP, entry_id)
        assert await me.forget_dead(stream, GROUP) == ["dead-holder"]
        assert await names(redis, stream) == {"live", "me", "odd{name}"}


@pytest.mark.anyio
async def test_a_stopped_worker_deletes_its_marks(redis: Redis, namespace: str) -> None:
    keys = Keys(namespace)
    names_ = ConsumerNames(redis, Scripts(redis), keys, "w", ttl_ms=30_000, every=10)
    names_.serve([(keys.role_stream("r"), GROUP), (keys.tasks_control(), "coordinators")])
    await names_.mark()
    marks = [f"{namespace}:{{role:r}}:alive:w", f"{namespace}:{{tasks}}:alive:w"]
    assert [
        keys.consumer_mark(keys.role_stream("r"), "w"),
        keys.consumer_mark(keys.tasks_control(), "w"),
    ] == marks
    assert await redis.exists(*marks) == 2
    assert 0 < await redis.pttl(marks[0]) <= 30_000
    await names_.unmark()
    assert await redis.exists(*marks) == 0


@pytest.mark.anyio
async def test_coordinator_deletes_dead_coordinators_names_and_spares_live_ones(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    control = keys.tasks_control()
    await streams.ensure_group(redis, control, COORDINATORS)
    for name in ("coord-dead", "coord-live"):
        await redis.xgroup_createconsumer(control, COORDINATORS, name)
    await redis.set(keys.consumer_mark(control, "coord-live"), b"1", px=60_000)
    coordinator = Coordinator(
        redis, namespace=namespace, consumer="coord-me", lease_ttl=0.3, block_ms=100
    )
    mark = keys.consumer_mark(control, "coord-me")
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(coordinator.run)
            assert await redis.exists(mark)  # marked as soon as it reads the stream
            while "coord-dead" in await names(redis, control, COORDINATORS):
                await anyio.sleep(0.05)
            coordinator.stop()
    assert "coord-live" in await names(redis, control, COORDINATORS)
    assert not await redis.exists(mark)  # a clean stop gives its marks up


def test_a_mark_is_in_the_slot_of_its_stream() -> None:
    keys = Keys("sf")
    assert keys.consumer_mark(keys.role_stream("r#2.7"), "w-1") == "sf:{role:r#2.7}:alive:w-1"
    assert keys.consumer_mark(keys.events("r"), "c") == "sf:{role:r}:alive:c"
    with pytest.raises(InvalidNameError):
        keys.consumer_mark("other:{role:r}:stream", "w-1")
    with pytest.raises(InvalidNameError):
        keys.consumer_mark(keys.role_stream("r"), "bad{name}")


@pytest.mark.anyio
async def test_a_stream_or_group_that_is_gone_is_no_crash(redis: Redis, namespace: str) -> None:
    keys = Keys(namespace)
    stream = keys.role_stream("gone")
    registered = Scripts(redis)
    me = ConsumerNames(redis, registered, keys, "me", ttl_ms=0, every=1)
    candidates = [(b"dead", keys.consumer_mark(stream, "dead"))]
    with anyio.fail_after(10):
        assert await me.forget_dead(stream, GROUP) == []  # no stream
        await redis.xadd(stream, {"message": b"{}"})
        assert await me.forget_dead(stream, GROUP) == []  # no group
        # The script itself (a group deleted between the listing and the script): NOGROUP,
        # which the cleanup loop takes for a lost group (its reader recreates it).
        with pytest.raises(ResponseError) as raised:
            await scripts.forget_consumers(registered, redis, stream, GROUP, candidates)
        assert streams.is_group_lost(raised.value), raised.value
