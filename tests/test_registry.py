"""The registries of coordinators and schedulers on a real redis-server: a scheduler's entry
beats with its passes and goes on a clean stop; entries anyone may write are read as untrusted."""

from __future__ import annotations

import logging

import anyio
import orjson
import pytest
from redis.asyncio import Redis

from streamflow import Client, registry
from streamflow.keys import Keys
from streamflow.protocol import now_ms
from streamflow.scheduler import Scheduler
from streamflow.schedules import Schedule
from tests.helpers import wait_for_query

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def scheduler_entry(name: str, **changes: object) -> bytes:
    """A well-formed scheduler entry, with ``changes`` applied."""
    entry: dict[str, object] = {
        "consumer": name,
        "host": "h",
        "pid": 1,
        "version": "0",
        "started_at_ms": 1,
        "updated_at_ms": now_ms(),
        "schedules": 2,
        "paused": 0,
        "sent": 0,
        "last_pass_ms": None,
        "late_ms": 0,
    }
    return orjson.dumps({**entry, **changes})


@pytest.mark.slow  # waits for a second beat (5 s)
async def test_a_scheduler_registers_its_passes_and_withdraws_its_entry_on_stop(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await redis.sadd(keys.known_roles(), "tick")
    client = Client(redis, namespace=namespace)
    declared = [Schedule(id="a", role="tick", every=1), Schedule(id="b", role="tick", every=3600)]
    await redis.sadd(keys.schedules_paused(), "b")
    running = Scheduler(client, declared, poll=0.05, name="s-1")
    started = now_ms()

    async def listed() -> list[registry.SchedulerInfo]:
        return await registry.schedulers(redis, keys)

    async def fired_once() -> bool:
        found = await listed()
        return bool(found) and found[0].sent >= 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(running.run)
            # Listed once its first pass is done, with what that pass read.
            await wait_for_query(listed)
            (first,) = await listed()
            assert (first.consumer, first.schedules, first.paused) == ("s-1", 2, 1)
            assert first.last_pass_ms is not None and first.last_pass_ms >= started
            assert first.live() and first.version == registry.VERSION
            # The first tick of "a" falls a second after its first pass: the next beat (5 s
            # later) says it was sent, and how late.
            await wait_for_query(fired_once, timeout=20)
            (later,) = await listed()
            stats = running.statistics()
            assert later.last_pass_ms is not None and later.last_pass_ms > first.last_pass_ms
            assert stats.passes > 1 and stats.sent >= 1
            assert 0 <= later.late_ms < 5000
            running.stop()
    assert await listed() == []


async def test_a_dead_schedulers_entry_reads_as_stale_and_is_forgotten_after_a_day(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    now = now_ms()
    dead = scheduler_entry("dead", updated_at_ms=now - registry.TTL_MS - 1)
    old = scheduler_entry("old", updated_at_ms=now - registry.FORGET_MS - 1)
    await redis.hset(keys.schedulers(), mapping={"dead": dead, "old": old})
    fresh = registry.SchedulerInfo.model_validate_json(scheduler_entry("fresh"))
    await registry.SCHEDULERS.announce(redis, keys, fresh)
    found = {info.consumer: info for info in await registry.schedulers(redis, keys)}
    assert set(found) == {"dead", "fresh"}
    assert found["fresh"].live() and not found["dead"].live()


HOSTILE: dict[bytes, bytes] = {
    b"\xff\xfe": b"{",
    b"list": b"[1]",
    b"wrong-type": scheduler_entry("wrong-type", pid="x"),
    b"negative": scheduler_entry("negative", late_ms=-1),
    b"far-future": scheduler_entry("far-future", started_at_ms=10**16),
    b"huge-host": scheduler_entry("huge-host", host="h" * 10_000),
}


async def test_hostile_scheduler_entries_are_skipped_with_a_warning_each(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys(namespace)
    await redis.hset(keys.schedulers(), mapping={**HOSTILE, b"good": scheduler_entry("good")})
    with caplog.at_level(logging.WARNING, "streamflow.registry"):
        found = await registry.schedulers(redis, keys)
    assert [info.consumer for info in found] == ["good"]
    skipped = [r.getMessage() for r in caplog.records if "malformed scheduler entry" in r.message]
    assert len(skipped) == len(HOSTILE), skipped
    assert any("\\xff\\xfe" in line for line in skipped)  # the name, escaped


async def test_a_polling_reader_warns_of_each_hostile_entry_once(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys(namespace)
    await redis.hset(keys.schedulers(), mapping=HOSTILE)
    once = registry.WarnOnce()
    with caplog.at_level(logging.WARNING, "streamflow.registry"):
        for _ in range(3):
            assert await registry.schedulers(redis, keys, warn=once) == []
    assert len(caplog.records) == len(HOSTILE)


async def test_another_type_at_the_registry_lists_nothing_and_stops_no_scheduler(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys(namespace)
    await redis.set(keys.schedulers(), "not a hash")
    with caplog.at_level(logging.WARNING, "streamflow.registry"):
        assert await registry.schedulers(redis, keys) == []
    assert "cannot read the scheduler registry" in caplog.text
    client = Client(redis, namespace=namespace)
    running = Scheduler(client, poll=0.05)
    with anyio.fail_after(20), caplog.at_level(logging.WARNING, "streamflow.registry"):
        async with anyio.create_task_group() as tg:
            await tg.start(running.run)
            await wait_until_warned(caplog, "cannot write the scheduler registry")
            assert running.statistics().passes >= 1  # its passes go on
            running.stop()


async def wait_until_warned(caplog: pytest.LogCaptureFixture, text: str) -> None:
    async def warned() -> bool:
        return text in caplog.text

    await wait_for_query(warned, timeout=15)
