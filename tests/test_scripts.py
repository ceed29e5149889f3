"""Contract tests of the fenced Lua scripts, against a real redis-server.

Every script in `Scripts.FENCED` runs through the same four cases: the caller owns the entry,
another consumer owns it, the entry is gone (acknowledged and deleted), and the group is gone
(``NOGROUP``). For each: the reply, and the stream, pending list and other keys afterwards. A
refusal must leave everything as it was.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

import streamflow
from streamflow import connect
from streamflow.keys import GROUP, Keys
from streamflow.ops.server import RedisServer
from streamflow.scripts import Kept, Scripts, keep_results, settle
from streamflow.streams import is_group_lost
from tests.helpers import ROOT

pytestmark = pytest.mark.anyio

ME, OTHER = "me", "other"
#: The path of a redis-server 8.2 or newer: the scripts' tests then also run on it. Without it
#: they run on the redis-server on PATH only (7.0 on CI): the 8.2 cases are not collected, so
#: nothing shows as skipped.
REDIS8_ENV = "SFTEST_REDIS8_SERVER"
#: A released entry's idle time, and the idle time a case starts from (below it).
RELEASED_MS, STALE_MS = 10_000_000, 500_000


@dataclass(frozen=True)
class Setup:
    """The keys and entry of one case."""

    scripts: Scripts
    stream: str
    dead: str
    events: str
    delayed: str
    batch: str
    entry_id: bytes
    result: str = ""


@dataclass(frozen=True)
class State:
    """What a script may change: the stream, its pending list (no idle times) and other keys."""

    entries: list[bytes]
    pending: list[tuple[bytes, bytes, int]]
    dead: int
    events: int
    delayed: list[bytes]
    batch: bytes | None
    result: bytes | None = None


def _version(executable: str) -> tuple[int, ...]:
    out = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"v=(\d+)\.(\d+)", out.stdout)
    assert found, out.stdout
    return tuple(int(part) for part in found.groups())


@pytest.fixture(scope="module")
def redis8_server() -> Iterator[RedisServer]:
    """A private redis-server 8.2 or newer, from ``$SFTEST_REDIS8_SERVER``."""
    executable = os.environ[REDIS8_ENV]  # collected only when it is set (any_redis)
    if _version(executable) < (8, 2):
        pytest.fail(f"{REDIS8_ENV}={executable} is older than Redis 8.2", pytrace=False)
    with RedisServer(executable=executable, appendonly=False) as server:
        yield server


@pytest.fixture(params=["path", *(["redis8"] if os.environ.get(REDIS8_ENV) else [])])
async def any_redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """A client of the session redis-server (on PATH), then of the 8.2+ one when there is one."""
    name = "redis_server" if request.param == "path" else "redis8_server"
    server: RedisServer = request.getfixturevalue(name)
    client = connect.connect(server.url)
    yield client
    await client.aclose()


async def _state(redis: Redis, s: Setup) -> State:
    entries = [entry_id for entry_id, _ in await redis.xrange(s.stream)]
    try:
        rows: Any = await redis.xpending_range(s.stream, GROUP, min="-", max="+", count=100)
    except ResponseError as exc:
        assert is_group_lost(exc)
        rows = []
    return State(
        entries=entries,
        pending=[(r["message_id"], r["consumer"], r["times_delivered"]) for r in rows],
        dead=await redis.xlen(s.dead),
        events=await redis.xlen(s.events),
        delayed=await redis.zrange(s.delayed, 0, -1),
        batch=await redis.get(s.batch),
        result=await redis.get(s.result) if s.result else None,
    )


async def _idle_ms(redis: Redis, s: Setup) -> int:
    rows: Any = await redis.xpending_range(s.stream, GROUP, min="-", max="+", count=1)
    return int(rows[0]["time_since_delivered"])


Call = Callable[[Redis, Setup], Awaitable[Any]]
Effect = Callable[[Redis, Setup, State, State], Awaitable[None]]


@dataclass(frozen=True)
class Contract:
    """How to call one fenced script, what it replies, and what it does when allowed."""

    call: Call
    done: Any
    refused: Any
    effect: Effect


async def _settled(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert after.entries == [] and after.pending == []


async def _renewed(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert after == before
    assert await _idle_ms(redis, s) < STALE_MS


async def _released(redis: Redis, s: Setup, before: State, after: State) -> None:
    # Still ours, adoptable at once, and one delivery lower (the adoption adds it back).
    assert after.pending == [(s.entry_id, ME.encode(), 0)]
    assert await _idle_ms(redis, s) >= RELEASED_MS


async def _retried(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert after.entries == [] and after.pending == []
    assert after.delayed == [b"next"]


async def _dead_lettered(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert after.entries == [] and after.pending == []
    assert (after.dead, after.events) == (1, 1)
    [(_, fields)] = await redis.xrange(s.dead)
    assert fields == {b"reason": b"failed"}


async def _dead_lettered_kept(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert after.entries == [] and after.pending == []
    assert (after.dead, after.events) == (1, 0)
    [(_, fields)] = await redis.xrange(s.dead)
    assert fields == {b"reason": b"failed"}  # the record is not a field of the dead letter
    assert after.result == b'{"f":1}'
    assert 0 < await redis.pttl(s.result) <= 60_000


async def _emitted(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert (after.entries, after.pending) == (before.entries, before.pending)
    assert (after.batch, after.events) == (b"[1]", 1)


async def _finished(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert after.entries == [] and after.pending == []
    # A run's ``accepted`` not written yet goes first, then how it ended.
    written = [fields[b"event"] for _, fields in await redis.xrange(s.events)]
    assert written == [b"accepted-event", b"done-event"]


async def _kept(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert after.entries == [] and after.pending == []
    assert after.result == b'{"r":1}'
    assert 0 < await redis.pttl(s.result) <= 60_000


def _one(name: str, keys: Callable[[Setup], list[str]], args: Callable[[Setup], list[Any]]) -> Call:
    async def call(redis: Redis, s: Setup) -> Any:
        script = getattr(s.scripts, name)
        return await script(keys=keys(s), args=args(s), client=redis)

    return call


def _park_list(s: Setup) -> str:
    return s.stream + "-park"  # one server, no cluster: the slot does not matter here


async def _parked(redis: Redis, s: Setup, before: State, after: State) -> None:
    # Out of the stream and its pending list, onto the key's list; the key is due at 7.
    assert after.entries == [] and after.pending == []
    assert await redis.zrange(s.delayed, 0, -1, withscores=True) == [(b"cust-1", 7.0)]
    assert await redis.llen(_park_list(s)) == 1
    assert await redis.get(s.stream + "-starts") is None  # carried in the item
    # unpark.lua moves it back: a new entry, same fields, and how often it was parked.
    woken = await s.scripts.unpark(
        keys=[s.stream, s.delayed, _park_list(s)], args=["cust-1", "due", 1000], client=redis
    )
    assert woken[1] == 3
    [(entry_id, fields)] = await redis.xrange(s.stream)
    assert entry_id == woken[0] and entry_id != s.entry_id
    assert fields == {b"message": b"{}", b"parked": b"1"}
    assert await redis.zcard(s.delayed) == 0 and await redis.llen(_park_list(s)) == 0


async def _park(redis: Redis, s: Setup) -> Any:
    await redis.set(s.stream + "-starts", 3)
    keys = [s.stream, s.delayed, _park_list(s), s.stream + "-starts"]
    return await s.scripts.park(keys=keys, args=[GROUP, ME, s.entry_id, "cust-1", 7], client=redis)


CONTRACTS: dict[str, Contract] = {
    "park.lua": Contract(_park, done=1, refused=0, effect=_parked),
    "settle.lua": Contract(
        _one("settle", lambda s: [s.stream], lambda s: [GROUP, ME, b'["%s"]' % s.entry_id]),
        done=[],
        refused=["id"],
        effect=_settled,
    ),
    "renew.lua": Contract(
        _one("renew", lambda s: [s.stream], lambda s: [GROUP, ME, RELEASED_MS, s.entry_id]),
        done=[],
        refused=["id"],
        effect=_renewed,
    ),
    "release.lua": Contract(
        _one("release", lambda s: [s.stream], lambda s: [GROUP, ME, RELEASED_MS, s.entry_id]),
        done=1,
        refused=0,
        effect=_released,
    ),
    "retry.lua": Contract(
        _one(
            "retry", lambda s: [s.stream, s.delayed], lambda s: [GROUP, ME, s.entry_id, 1, "next"]
        ),
        done=1,
        refused=None,
        effect=_retried,
    ),
    "dead_letter.lua": Contract(
        _one(
            "dead_letter",
            lambda s: [s.stream, s.dead, s.events],
            lambda s: [GROUP, ME, s.entry_id, 100, "failed-event", "reason", "failed"],
        ),
        done="new id",
        refused=None,
        effect=_dead_lettered,
    ),
    # A job whose outcome is kept: its failure record is written in the same step.
    "dead_letter.lua (kept)": Contract(
        _one(
            "dead_letter",
            lambda s: [s.stream, s.dead, s.stream, s.result],
            lambda s: [GROUP, ME, s.entry_id, 100, "", "reason", "failed", '{"f":1}', 60_000],
        ),
        done="new id",
        refused=None,
        effect=_dead_lettered_kept,
    ),
    "emit.lua": Contract(
        _one(
            "emit",
            lambda s: [s.stream, s.batch, s.events],
            lambda s: [GROUP, ME, s.entry_id, "[1]", 60_000, "batch-event"],
        ),
        done=1,
        refused=None,
        effect=_emitted,
    ),
    "finish.lua": Contract(
        _one(
            "finish",
            lambda s: [s.stream, s.events],
            lambda s: [GROUP, ME, s.entry_id, "accepted-event", "done-event"],
        ),
        done=1,
        refused=None,
        effect=_finished,
    ),
    "result.lua": Contract(
        _one(
            "result",
            lambda s: [s.stream, s.result],
            lambda s: [GROUP, ME, s.entry_id, '{"r":1}', 60_000],
        ),
        done=[],
        refused=["id"],
        effect=_kept,
    ),
}


def test_every_fenced_script_has_a_contract() -> None:
    assert {name.split()[0] for name in CONTRACTS} == Scripts.FENCED


def test_the_owner_check_is_written_only_in_the_fence_prelude() -> None:
    """No script restates the fence: only fence.lua reads an entry's owner from XPENDING."""
    lua = Path(streamflow.__file__).parent / "lua"
    # claim.lua reads delivery counts, forget.lua whether a consumer holds anything: no fence.
    readers = {
        path.name for path in lua.glob("*.lua") if "redis.call('XPENDING'" in path.read_text()
    }
    assert readers == {"fence.lua", "claim.lua", "forget.lua"}
    for name in Scripts.FENCED:
        text = Scripts.source(name)
        assert re.match(r"#!lua( flags=allow-oom)?\n-- The fence: a prelude", text), name


async def _setup(redis: Redis, namespace: str, case: str) -> Setup:
    keys = Keys(namespace)
    role = "fenced"
    s = Setup(
        scripts=Scripts(redis),
        stream=keys.role_stream(role),
        dead=keys.dead_letters(role),
        events=keys.events(role),
        delayed=keys.delayed(role),
        batch=keys.batch(role, "t1", "n1", 1, 1),
        entry_id=await redis.xadd(keys.role_stream(role), {"message": "{}"}),
        result=keys.result(role, "m1"),
    )
    if case == "nogroup":
        return s
    await redis.xgroup_create(s.stream, GROUP, id="0")
    reader = OTHER if case == "foreign" else ME
    await redis.xreadgroup(GROUP, reader, {s.stream: ">"})
    if case == "gone":
        # Settled meanwhile (by an adopter, after this consumer's lease was lost).
        await redis.xack(s.stream, GROUP, s.entry_id)
        await redis.xdel(s.stream, s.entry_id)
        return s
    # Stale, so that a renewal or a release shows in the idle time.
    await redis.xclaim(s.stream, GROUP, reader, 0, [s.entry_id], idle=STALE_MS, justid=True)
    return s


def _expected_refusal(contract: Contract, s: Setup) -> Any:
    return [s.entry_id] if contract.refused == ["id"] else contract.refused


@pytest.mark.parametrize("name", sorted(CONTRACTS))
@pytest.mark.parametrize("case", ["owner", "foreign", "gone", "nogroup"])
async def test_fenced_script_acts_only_for_the_owner(
    any_redis: Redis, namespace: str, name: str, case: str
) -> None:
    redis, contract = any_redis, CONTRACTS[name]
    with anyio.fail_after(30):
        s = await _setup(redis, namespace, case)
        before = await _state(redis, s)
        if case == "nogroup":
            with pytest.raises(ResponseError) as raised:
                await contract.call(redis, s)
            assert is_group_lost(raised.value)
            assert await _state(redis, s) == before
            return
        reply = await contract.call(redis, s)
        after = await _state(redis, s)
        if case == "owner":
            if contract.done == "new id":
                assert isinstance(reply, bytes) and re.fullmatch(rb"\d+-\d+", reply)
            else:
                assert reply == contract.done
            await contract.effect(redis, s, before, after)
        else:
            assert reply == _expected_refusal(contract, s)
            assert after == before
            if case == "foreign":
                assert await _idle_ms(redis, s) >= STALE_MS


# -- settle.lua on batches: which ids it takes, and what it deletes -----------------------------


async def _entries_and_pending(redis: Redis, stream: str) -> tuple[list[bytes], dict[bytes, bytes]]:
    entries = [entry_id for entry_id, _ in await redis.xrange(stream)]
    rows: Any = await redis.xpending_range(stream, GROUP, min="-", max="+", count=10_000)
    return entries, {r["message_id"]: r["consumer"] for r in rows}


async def test_settle_orders_ids_by_number_not_by_text(any_redis: Redis, namespace: str) -> None:
    """Ids across digit boundaries: the batch's first and last are found by number, refusals
    come back in the order given, and nothing but what was settled leaves the stream (an
    entry never delivered stays, even once nothing is pending)."""
    redis, stream = any_redis, Keys(namespace).role_stream("order")
    scripts = Scripts(redis)
    for entry_id in ["9-0", "9-99", "10-0", "10-5", "10-10", "10-100", "100-0", "100-7"]:
        await redis.xadd(stream, {"message": "{}"}, id=entry_id)
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, OTHER, {stream: ">"}, count=1)  # 9-0
    await redis.xreadgroup(GROUP, ME, {stream: ">"})
    await redis.xadd(stream, {"message": "{}"}, id="1000-0")  # never delivered
    with anyio.fail_after(30):
        batch = [b"100-0", b"10-5", b"9-99", b"10-100", b"9-0", b"99-0"]
        assert await settle(scripts, redis, stream, ME, batch) == [b"9-0", b"99-0"]
        entries, pending = await _entries_and_pending(redis, stream)
        assert entries == [b"9-0", b"10-0", b"10-10", b"100-7", b"1000-0"]
        assert pending == {b"9-0": b"other", b"10-0": b"me", b"10-10": b"me", b"100-7": b"me"}
        assert await settle(scripts, redis, stream, ME, [b"100-7", b"10-10", b"10-0"]) == []
        left = ([b"9-0", b"1000-0"], {b"9-0": b"other"})
        assert await _entries_and_pending(redis, stream) == left
        assert await settle(scripts, redis, stream, OTHER, [b"9-0"]) == []
        assert await _entries_and_pending(redis, stream) == ([b"1000-0"], {})


async def test_keep_results_refuses_every_id_when_the_group_is_gone(
    any_redis: Redis, namespace: str
) -> None:
    """As settle does: the worker's acker counts them as lost leases instead of crashing, and
    no result is written for a job it no longer owns."""
    redis, keys = any_redis, Keys(namespace)
    stream = keys.role_stream("gone")
    entry_id = await redis.xadd(stream, {"message": "{}"})
    kept = [Kept(entry_id, keys.result("gone", "m1"), b'{"r":1}', 60_000)]
    with anyio.fail_after(30):
        refused = await keep_results(Scripts(redis), redis, stream=stream, consumer=ME, kept=kept)
        assert refused == {entry_id}
        assert await redis.exists(keys.result("gone", "m1")) == 0


async def test_keep_results_keeps_and_settles_exactly_the_owned_entries_of_a_batch(
    any_redis: Redis, namespace: str
) -> None:
    """Each owned entry gets its own record and leaves the stream; a foreign one neither."""
    redis, keys = any_redis, Keys(namespace)
    stream = keys.role_stream("batch")
    ids = [await redis.xadd(stream, {"message": "{}"}) for _ in range(4)]
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, ME, {stream: ">"})
    await redis.xclaim(stream, GROUP, OTHER, 0, [ids[2]])
    kept = [Kept(i, keys.result("batch", f"m{n}"), b"%d" % n, 60_000) for n, i in enumerate(ids)]
    with anyio.fail_after(30):
        refused = await keep_results(
            Scripts(redis), redis, stream=stream, consumer=ME, kept=kept[::-1]
        )
        assert refused == {ids[2]}
        values = [await redis.get(keys.result("batch", f"m{n}")) for n in range(4)]
        assert values == [b"0", b"1", None, b"3"]
        assert await _entries_and_pending(redis, stream) == ([ids[2]], {ids[2]: b"other"})


async def test_settle_deletes_exactly_the_settled_entries(any_redis: Redis, namespace: str) -> None:
    """Random batches over several stream nodes (100 entries each), out of order, with ids
    another consumer holds and ids already settled: after each one the stream holds exactly the
    entries not settled, undelivered ones included, and the pending list the ones still held."""
    redis, stream = any_redis, Keys(namespace).role_stream("batches")
    scripts, rng = Scripts(redis), random.Random(20)
    pipe = redis.pipeline(transaction=False)
    for _ in range(450):
        pipe.xadd(stream, {"message": "{}"})
    all_ids = list(await pipe.execute())
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, ME, {stream: ">"}, count=400)
    foreign = set(rng.sample(all_ids[:400], 30))
    await redis.xclaim(stream, GROUP, OTHER, 0, sorted(foreign), justid=True)
    mine = [entry_id for entry_id in all_ids[:400] if entry_id not in foreign]
    rng.shuffle(mine)
    settled: set[bytes] = set()
    with anyio.fail_after(60):
        while mine:
            size = rng.randint(1, 80)
            taken, mine = mine[:size], mine[size:]
            strays = rng.sample(sorted(foreign | settled), min(3, len(foreign | settled)))
            batch = taken + strays
            rng.shuffle(batch)
            assert await settle(scripts, redis, stream, ME, batch) == [
                entry_id for entry_id in batch if entry_id in strays
            ]
            settled |= set(taken)
            entries, pending = await _entries_and_pending(redis, stream)
            assert entries == [entry_id for entry_id in all_ids if entry_id not in settled]
            held = {entry_id: ME.encode() for entry_id in mine + taken if entry_id not in settled}
            held |= dict.fromkeys(foreign, OTHER.encode())
            assert pending == held
    assert await redis.xlen(stream) == len(foreign) + 50


async def test_renew_takes_only_owned_ids_that_were_not_released(
    any_redis: Redis, namespace: str
) -> None:
    """renew.lua checks a batch the same way: across digit boundaries, an id held by another
    consumer, one released at shutdown and one gone are lost (in the order given); the others
    are renewed, and nothing else changes."""
    redis, stream = any_redis, Keys(namespace).role_stream("renew")
    scripts = Scripts(redis)
    for entry_id in ["9-0", "9-99", "10-0", "10-5", "10-10", "100-0"]:
        await redis.xadd(stream, {"message": "{}"}, id=entry_id)
    await redis.xgroup_create(stream, GROUP, id="0")
    await redis.xreadgroup(GROUP, ME, {stream: ">"})
    await redis.xclaim(stream, GROUP, OTHER, 0, ["10-0"], justid=True)
    await redis.xclaim(stream, GROUP, ME, 0, ["9-99"], idle=RELEASED_MS, justid=True)
    stale = ["9-0", "10-5", "10-10", "100-0"]
    await redis.xclaim(stream, GROUP, ME, 0, stale, idle=STALE_MS, justid=True)
    with anyio.fail_after(30):
        batch = [b"100-0", b"10-0", b"9-99", b"10-10", b"50-0", b"9-0", b"10-5"]
        lost = await scripts.renew(keys=[stream], args=[GROUP, ME, RELEASED_MS, *batch])
        assert lost == [b"10-0", b"9-99", b"50-0"]
        rows: Any = await redis.xpending_range(stream, GROUP, min="-", max="+", count=10)
        idle = {r["message_id"]: (r["consumer"], r["time_since_delivered"]) for r in rows}
        assert {i: c for i, (c, _) in idle.items()} == {
            b"9-0": b"me",
            b"9-99": b"me",
            b"10-0": b"other",
            b"10-5": b"me",
            b"10-10": b"me",
            b"100-0": b"me",
        }
        assert all(idle[i.encode()][1] < STALE_MS for i in stale)
        assert idle[b"9-99"][1] >= RELEASED_MS


# -- limit.lua: a role's start rate and running slots ------------------------------------------


async def _limit(
    redis: Redis,
    keys: Keys,
    op: str,
    *tokens: str,
    declared: tuple[int, int, int] = (0, 0, 0),
    refund: int = 0,
    ttl_ms: int = 60_000,
    burst_ms: int = 0,
    tat: str = "",
) -> list[int]:
    count, period, cap = declared
    reply = await _limit_raw(
        redis, keys, op, count, period, cap, ttl_ms, burst_ms, refund, tat, *tokens
    )
    return [int(value) for value in reply[:2]]  # then: whether slots are tracked, the TAT


async def _limit_raw(redis: Redis, keys: Keys, *args: str | int) -> list[Any]:
    """``limit.lua`` on role ``r`` with ``args`` as they are (op ... tokens)."""
    reply = await Scripts(redis).limit(
        keys=[keys.flow_control("r"), keys.flow_rate("r"), keys.flow_running("r")],
        args=list(args),
        client=redis,
    )
    return list(reply)


async def test_limit_caps_running_slots_and_frees_released_and_expired_ones(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    cap = (0, 0, 2)
    assert await _limit(redis, keys, "acquire", "a", "b", "c", declared=cap) == [2, -1]
    assert await redis.zrange(keys.flow_running("r"), 0, -1) == [b"a", b"b"]
    assert await _limit(redis, keys, "acquire", "d", declared=cap) == [0, -1]
    await _limit(redis, keys, "release", "a", declared=cap)
    assert await _limit(redis, keys, "acquire", "d", declared=cap) == [1, 0]
    # A slot whose holder stopped renewing it (a dead worker) comes back once it expires.
    await _limit(redis, keys, "renew", "b", declared=cap, ttl_ms=1)
    await anyio.sleep(0.01)  # past the 1 ms expiry, by the server's clock
    assert await _limit(redis, keys, "acquire", "e", declared=cap) == [1, 0]
    assert sorted(await redis.zrange(keys.flow_running("r"), 0, -1)) == [b"d", b"e"]
    # Set at run time, the cap overrides the declared one; 0 lifts it.
    await redis.hset(keys.flow_control("r"), "concurrency", 0)
    assert await _limit(redis, keys, "acquire", "f", "g", declared=cap) == [2, 0]


async def test_limit_spaces_starts_by_the_rate_and_takes_refunds(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    rate = (1, 60_000, 0)  # one start a minute: the next is far off
    assert await _limit(redis, keys, "acquire", "a", "b", declared=rate) == [1, 0]
    tat = (await redis.get(keys.flow_rate("r"))).decode()
    granted, wait_us = await _limit(redis, keys, "acquire", "c", declared=rate)
    assert granted == 0 and 59_000_000 < wait_us <= 60_000_000
    # A refund names the state its grant left: a stale one (a start granted since) is refused.
    stale = await _limit(redis, keys, "refund", declared=rate, refund=1, tat="1.000")
    assert stale == [0, 0]
    await _limit(redis, keys, "refund", declared=rate, refund=1, tat=tat)  # not used
    assert await _limit(redis, keys, "acquire", "c", declared=rate) == [1, 0]
    assert await redis.pttl(keys.flow_rate("r")) > 0  # the state expires by itself
    # Set at run time, "off" (count 0) lifts the declared rate.
    await redis.hset(keys.flow_control("r"), mapping={"rate_count": 0, "rate_period_ms": 0})
    assert await _limit(redis, keys, "acquire", "d", "e", declared=rate) == [2, 0]
    # A start under a rate alone holds no running slot (nothing to free or renew later).
    raw = await Scripts(redis).limit(
        keys=[keys.flow_control("x"), keys.flow_rate("x"), keys.flow_running("x")],
        args=["acquire", 1, 60_000, 0, 60_000, 0, 0, "", "z"],
        client=redis,
    )
    assert [int(v) for v in raw[:3]] == [1, 0, 0]
    assert not await redis.exists(keys.flow_running("x"))
    # And a run-time rate applies where none is declared (from a fresh state).
    await redis.delete(keys.flow_rate("r"))
    await redis.hset(keys.flow_control("r"), mapping={"rate_count": 1, "rate_period_ms": 60_000})
    assert (await _limit(redis, keys, "acquire", "f"))[0] == 1
    assert (await _limit(redis, keys, "acquire", "g"))[0] == 0


async def test_limit_grants_every_start_due_up_to_the_burst_and_never_more(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    rate = (50, 1000, 0)  # 50/s: one start every 20 ms; a 100 ms burst window: 5 starts
    many = [f"t{i}" for i in range(20)]
    granted, _ = await _limit(redis, keys, "acquire", *many, declared=rate, burst_ms=100)
    assert granted == 5  # a fresh state: the burst at once, not one start per call
    granted, wait_us = await _limit(redis, keys, "acquire", *many, declared=rate, burst_ms=100)
    assert granted == 0 and 0 < wait_us <= 20_000  # the next start is due within T
    await anyio.sleep(wait_us / 1_000_000)  # exactly until due: then it is granted
    granted, _ = await _limit(redis, keys, "acquire", *many, declared=rate, burst_ms=100)
    assert granted >= 1
    # A caller that asks late gets every start due since, up to the burst, in one call.
    await anyio.sleep(0.07)
    granted, _ = await _limit(redis, keys, "acquire", *many, declared=rate, burst_ms=100)
    assert 3 <= granted <= 5
    # Whatever the calls, the grants of any interval stay within rate x interval + burst.
    await redis.delete(keys.flow_rate("r"))
    began, total = time.monotonic(), 0
    while time.monotonic() - began < 0.5:
        total += (await _limit(redis, keys, "acquire", *many, declared=rate, burst_ms=100))[0]
    assert total <= 50 * (time.monotonic() - began) + 5 + 1  # one: the clocks' rounding
    assert total >= 50 * 0.5 * 0.9
    # confirm takes starts at the rate alone (a blocked read's aged grant), no running slot.
    await redis.delete(keys.flow_rate("r"))
    capped = (50, 1000, 1)
    assert await _limit(redis, keys, "confirm", declared=capped, refund=9, burst_ms=100) == [5, 0]
    assert not await redis.exists(keys.flow_running("r"))
    granted, wait_us = await _limit(redis, keys, "confirm", declared=capped, refund=1)
    assert granted == 0 and wait_us > 0


#: A command a script calls: ``redis.call('XGROUP', 'DELCONSUMER', ...)`` gives both words.
_CALL = re.compile(r"redis\.p?call\('([A-Za-z]+)'(?:,\s*'([A-Za-z]+)')?")


def _allow_oom_scripts() -> set[str]:
    lua = Path(streamflow.__file__).parent / "lua"
    return {
        path.stem
        for path in lua.glob("*.lua")
        if path.read_text().startswith("#!lua flags=allow-oom\n")
    }


def _scripts_named(text: str, start: str, end: str) -> set[str]:
    """The script names in backquotes in ``text`` between ``start`` and ``end``."""
    part = text.split(start, 1)[1].split(end, 1)[0]
    lua = Path(streamflow.__file__).parent / "lua"
    stems = {path.stem for path in lua.glob("*.lua")}
    return set(re.findall(r"`([a-z_]+)`", part)) & stems


async def test_scripts_that_run_on_a_full_redis_only_call_what_redis_allows_there(
    redis: Redis,
) -> None:
    """A script with ``flags=allow-oom`` runs at OOM and may call anything: so it must call only
    commands Redis itself runs at OOM (no ``denyoom`` flag), to free memory, never to add."""
    claimed = _allow_oom_scripts()
    assert {"settle", "renew", "release", "claim", "forget", "read_levels"} <= claimed
    for name in sorted(claimed):
        calls = {
            (cmd.lower() + (f"|{sub.lower()}" if cmd.upper() == "XGROUP" and sub else ""))
            for cmd, sub in _CALL.findall(Scripts.source(f"{name}.lua"))
        }
        assert calls, name
        info: Any = await redis.execute_command("COMMAND", "INFO", *sorted(calls))
        deny = sorted(cmd for cmd in calls if "denyoom" in info[cmd]["flags"])
        assert not deny, f"{name}.lua claims allow-oom but calls {deny}"


def test_the_docs_name_exactly_the_scripts_that_run_on_a_full_redis() -> None:
    claimed = _allow_oom_scripts()
    operations = (ROOT / "docs" / "operations.md").read_text()
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    assert _scripts_named(operations, "**A full Redis.**", "So what an operator sees") == claimed
    assert _scripts_named(architecture, "Only the scripts whose every", "so that a full") == claimed
