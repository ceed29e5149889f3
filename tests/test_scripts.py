"""Contract tests of the fenced Lua scripts, against a real redis-server.

Every script in `Scripts.FENCED` runs through the same four cases: the caller owns the entry,
another consumer owns it, the entry is gone (acknowledged and deleted), and the group is gone
(``NOGROUP``). For each: the reply, and the stream, pending list and other keys afterwards. A
refusal must leave everything as it was.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

import streamflow
from streamflow.keys import GROUP, Keys
from streamflow.streams import Scripts, is_group_lost

pytestmark = pytest.mark.anyio

ME, OTHER = "me", "other"
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


async def _emitted(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert (after.entries, after.pending) == (before.entries, before.pending)
    assert (after.batch, after.events) == (b"[1]", 1)


async def _finished(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert after.entries == [] and after.pending == []
    assert after.events == 1


async def _kept(redis: Redis, s: Setup, before: State, after: State) -> None:
    assert after.entries == [] and after.pending == []
    assert after.result == b'{"r":1}'
    assert 0 < await redis.pttl(s.result) <= 60_000


def _one(name: str, keys: Callable[[Setup], list[str]], args: Callable[[Setup], list[Any]]) -> Call:
    async def call(redis: Redis, s: Setup) -> Any:
        script = getattr(s.scripts, name)
        return await script(keys=keys(s), args=args(s), client=redis)

    return call


CONTRACTS: dict[str, Contract] = {
    "settle.lua": Contract(
        _one("settle", lambda s: [s.stream], lambda s: [GROUP, ME, s.entry_id]),
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
            lambda s: [GROUP, ME, s.entry_id, "done-event"],
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
    assert set(CONTRACTS) == Scripts.FENCED


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
    redis: Redis, namespace: str, name: str, case: str
) -> None:
    contract = CONTRACTS[name]
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
