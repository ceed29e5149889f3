"""Per-key limits within a role: N starts per period and M running at once per limit key.

A job carries its limit key (a customer id, say) in the ``streamflow-limit-key`` header
(``publish(..., limit_key="cust-42")``); a role declares ``key_concurrency`` and/or
``key_rate_limit`` (or ``streamflow limit ROLE --key-concurrency/--key-rate`` sets them at run
time). Jobs without the header are not limited per key.

**Why park, not wait.** The key is known only once an entry is read and decoded, so the role's
limiter (:mod:`streamflow.flow`), which grants permits *before* a read, cannot hold such a job
in the stream. Waiting in the worker would hold the entry's lease and a buffer slot for as long
as the key is saturated: one busy customer could fill every worker's buffer (head-of-line
blocking of every other key), and releasing it back to the stream would come back at once
through adoption, a hot loop that also raises its delivery count. So a job held back by its
key is **parked**: ``park.lua`` moves it, in one step fenced by the caller's ownership, from
the role stream (acknowledged and deleted) to its key's parked list next to the stream
(``{role:<shard>}:park:<key>``) and notes when to look at the key again in
``{role:<shard>}:parked`` (a sorted set: key -> wake time). A parked job holds no lease, no
worker's buffer and no handler slot; nothing is lost if every worker dies.

**Waking.** ``unpark.lua`` moves the oldest parked job of a key back to the end of the stream
it was parked from (its priority level's, for a role with priorities: the level is recorded
with the parked job), in one step, as a new entry (its ``parked`` field counts the parks;
parked again, it goes to the front of its key's list, so a key's jobs keep their order). A
key's parked list is one per partition, whatever the levels: its jobs are woken in the order
they were parked, not by level. A job is woken:

* when a running slot of its key frees: the worker that frees it (its job settled) wakes one
  job of the key on that partition (or on another partition of the role if none is parked
  there), if the key is marked as having parked jobs (``{flow:<role>}:waiting``, marked after
  each park with a count, so that a worker finding none to wake removes only the mark it saw);
* when its key's wake time comes: the time the rate allows the next start, or, for a
  concurrency limit, the earliest expiry of the key's slots, which is when the slot of a worker
  that died comes back. Every worker looks at the due keys of its key-limited roles every
  :data:`WAKE_POLL` seconds (one ``ZRANGE`` per partition);
* at once after parking, if a slot freed between the refusal and the mark (the park and the
  slots live in different slots of a Redis Cluster, so they cannot be one script: a park is
  followed by the mark and a look at the key's slots, a release by a look at the mark, and
  whichever comes second sees the other).

A woken job is not given the slot: it asks again when it is read. If another job of its key
took the slot meanwhile, it is parked again (at the front). Each such round costs a read and
three script calls, and happens at most once per wake: no hot loop.

**Slots** (``key_limit.lua``, in the role's ``{flow:<role>}`` slot, so every worker of every
partition agrees): a running slot is a token in ``{flow:<role>}:keyslots:<key>`` with the
lease TTL as its expiry, renewed every third of it while the job is held, freed as soon as
its handler ends: the slot of a SIGKILLed worker comes back within the TTL. The rate is a GCRA
per key (``{flow:<role>}:keyrate:<key>``), like the role's.

**Calls per batch, work per job.** A request waits one turn of the event loop, and those
waiting then (and those that came while the previous call was out) get one ``acquire_many``
call per role, grouped by key (each key's slots and rate read and written once). The worker's
pool wakes idle consumers one per turn, so a batch is what asked during about one round trip,
not a whole read (about 15 jobs in ``benchmarks/keylimits_cost.py``). The slots freed by a sweep
go in one ``release_many`` call per role. Each job still costs its key's names and its token as
arguments of both calls, and its key's commands inside the scripts: with few jobs per key in a
batch that is most of what the gate costs (``docs/benchmarks.md``, "Per-key limits: where the
time goes").

**Untrusted keys.** A limit key is 1 to :data:`MAX_LIMIT_KEY` characters of letters, digits and
``_.:@+=/-``; ``publish`` refuses anything else, and a worker dead-letters a job of a
key-limited role whose header breaks the rule (``invalid_message``, the key escaped and cut in
the detail). Its text is then safe in key names, ``SCAN`` patterns and log lines.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import anyio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, decisions
from streamflow.delivery import Decision, Delivery, InFlight
from streamflow.flow import PauseWatch
from streamflow.keys import GROUP, Keys
from streamflow.logs import shown
from streamflow.protocol import Job, now_ms
from streamflow.records import PARKED_FIELD
from streamflow.scripts import Scripts
from streamflow.streams import START_COUNT_TTL_MS

logger = logging.getLogger(__name__)

#: The header that names a job's limit key.
LIMIT_KEY_HEADER = "streamflow-limit-key"
#: Longest limit key, in characters.
MAX_LIMIT_KEY = 128
#: What a limit key may hold: no glob, brace or control character, no space.
LIMIT_KEY_PATTERN = re.compile(rf"[A-Za-z0-9_.:@+=/\-]{{1,{MAX_LIMIT_KEY}}}")
#: Seconds between a worker's looks at the due parked keys of its key-limited roles.
WAKE_POLL = 0.25
#: Seconds between a worker's sweeps of its key slots (freeing those whose jobs ended).
SWEEP_EVERY = 0.05
#: Most due keys woken per partition per look.
WAKE_BATCH = 100


def check_limit_key(key: Any) -> str:
    """``key`` if it is a valid limit key.

    Raises:
        ValueError: It is not a string of 1 to :data:`MAX_LIMIT_KEY` letters, digits and
            ``_.:@+=/-`` (the message shows it escaped and cut).
    """
    if isinstance(key, str) and LIMIT_KEY_PATTERN.fullmatch(key):
        return key
    raise ValueError(
        f"invalid limit key {shown(str(key))}: 1 to {MAX_LIMIT_KEY} letters, digits and _.:@+=/-"
    )


def with_limit_key(headers: Mapping[str, str] | None, limit_key: str) -> dict[str, str]:
    """``headers`` with the limit key header set to ``limit_key`` (checked).

    Raises:
        ValueError: ``limit_key`` is not a valid limit key.
    """
    return {**(headers or {}), LIMIT_KEY_HEADER: check_limit_key(limit_key)}


@dataclass(slots=True)
class _Ask:
    """One job's request for a start, waiting for its read's batch (see ``KeyLimiter``)."""

    key: str
    token: str
    slot: _Slot
    reply: asyncio.Future[tuple[int, int, int]]


@dataclass(frozen=True, slots=True)
class _Slot:
    """A running slot of a limit key that this worker holds, for one entry."""

    role: str
    key: str
    shard: str
    stream: str
    entry_id: bytes


class KeyLimiter:
    """A worker's side of per-key limits: the gate before a job starts, parking, waking.

    Args:
        redis: The client.
        scripts: The registered scripts (``key_limit``, ``park``, ``unpark``).
        keys: Key names.
        consumer: This worker's consumer name (its tokens start with it).
        held: The entries this worker holds (a slot is freed once its entry is not).
        watch: The roles' flow control as last read (per-key limits set at run time).
        declared: Each served role's declared per-key limits: (rate or None, concurrency or
            None).
        ttl_ms: How long a slot outlives its last renewal (the lease TTL).
    """

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        consumer: str,
        held: InFlight,
        watch: PauseWatch,
        declared: Mapping[str, tuple[tuple[int, int] | None, int | None]],
        *,
        ttl_ms: int,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self._consumer = consumer
        self._held = held
        self._watch = watch
        self._declared = {
            role: limits for role, limits in declared.items() if limits != (None, None)
        }
        self._ttl_ms = ttl_ms
        # The gate's requests waiting for the next batch (one key_limit.lua call per role for
        # all the jobs of a read), and the task sending them.
        self._asks: list[_Ask] = []
        self._sender: asyncio.Task[None] | None = None
        self._seq = itertools.count(1)
        self._slots: dict[str, _Slot] = {}
        # The token of each entry holding a slot, and the tokens whose handler has ended: freed
        # at the next sweep, which the end wakes (not only when the entry is settled: the
        # acknowledgement is batched, and the slot is the key's running job).
        self._tokens: dict[tuple[str, bytes], str] = {}
        self._ended: set[str] = set()
        self._kick = anyio.Event()
        self._renewed_at = time.monotonic()
        self._next_look = 0.0  # when the waker looks at the due keys next (monotonic)
        #: Each key-limited role's partitions (set when the worker starts serving).
        self.shards: dict[str, tuple[str, ...]] = {}
        #: Each role's priority levels (a role absent has 1): a woken job goes back to its own.
        self.levels: dict[str, int] = {}
        #: Jobs this worker parked, and parked jobs it woke, by role.
        self.parks: dict[str, int] = {}
        self.wakes: dict[str, int] = {}

    def limits(self, role: str) -> bool:
        """Whether ``role`` has per-key limits (declared, or set at run time as last read)."""
        return role in self._declared or role in self._watch.key_limited_at_run_time

    def slots(self) -> dict[str, int]:
        """Per-key running slots this worker holds, by role."""
        out: dict[str, int] = {}
        for slot in self._slots.values():
            out[slot.role] = out.get(slot.role, 0) + 1
        return out

    def _script_args(
        self, role: str, key: str, op: str, tokens: Sequence[str]
    ) -> tuple[list[str], list[str | int]]:
        rate, cap = self._declared.get(role, (None, None))
        count, period = rate or (0, 0)
        keys = [
            self._keys.flow_control(role),
            self._keys.flow_key_slots(role, key),
            self._keys.flow_key_rate(role, key),
            self._keys.flow_keys(role),
            self._keys.flow_waiting(role),
        ]
        return keys, [op, key, count, period, cap or 0, self._ttl_ms, *tokens]

    async def _call(
        self, role: str, key: str, op: str, tokens: Sequence[str] = (), *, client: Any = None
    ) -> Any:
        keys, args = self._script_args(role, key, op, tokens)
        return await self._scripts.key_limit(keys=keys, args=args, client=client or self._redis)

    async def _acquire(self, key: str, token: str, slot: _Slot) -> tuple[int, int, int]:
        """Ask for a start of ``key``'s job (``token``): (granted, next or wake at, tracked).

        The request waits for the batch of the read it came with: every job of a read asks at
        once (its consumers start together), and one ``key_limit.lua`` call per role answers
        them all, grouped by key, instead of one call per job.
        """
        ask = _Ask(key, token, slot, asyncio.get_running_loop().create_future())
        self._asks.append(ask)
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send_asks())
        return await ask.reply

    async def _send_asks(self) -> None:
        """Answer the waiting requests, batch after batch, until none is left."""
        asks: list[_Ask] = []
        try:
            await asyncio.sleep(0)  # the other consumers of the same read ask meanwhile
            while self._asks:
                asks, self._asks = self._asks, []
                by_role: dict[str, list[_Ask]] = {}
                for ask in asks:
                    by_role.setdefault(ask.slot.role, []).append(ask)
                for role, group in by_role.items():
                    await self._answer(role, group)
        finally:
            self._sender = None
            for ask in (*asks, *self._asks):  # cancelled: the askers hand their jobs back
                if not ask.reply.done():
                    ask.reply.set_exception(ConnectionError("per-key limit requests cancelled"))
            self._asks = []

    async def _answer(self, role: str, asks: list[_Ask]) -> None:
        """One ``acquire_many`` call for ``role``'s requests; each asker gets its reply."""
        by_key: dict[str, list[_Ask]] = {}
        for ask in asks:
            by_key.setdefault(ask.key, []).append(ask)
        ordered = [ask for group in by_key.values() for ask in group]
        tokens = {key: [ask.token for ask in group] for key, group in by_key.items()}
        try:
            flat = await self._call_many(role, "acquire_many", tokens)
            if not isinstance(flat, list) or len(flat) != 3 * len(ordered):
                raise ResponseError(f"key_limit.lua acquire_many replied {shown(repr(flat))}")
        except Exception as exc:  # each asker gets the error (an outage: hands its job back)
            for ask in ordered:
                if not ask.reply.done():
                    ask.reply.set_exception(exc)
            return
        for index, ask in enumerate(ordered):
            granted, at, tracked = (int(v) for v in flat[3 * index : 3 * index + 3])
            if ask.reply.done():  # its asker was cancelled: a slot it got is freed at once
                if tracked:
                    self._slots[ask.token] = ask.slot
                    self._ended.add(ask.token)
                    self._kick.set()
                continue
            ask.reply.set_result((granted, at, tracked))

    async def _call_many(self, role: str, op: str, tokens: Mapping[str, Sequence[str]]) -> Any:
        """``acquire_many`` or ``release_many`` for several keys of ``role`` in one call."""
        rate, cap = self._declared.get(role, (None, None))
        count, period = rate or (0, 0)
        keys = [
            self._keys.flow_control(role),
            "",
            "",
            self._keys.flow_keys(role),
            self._keys.flow_waiting(role),
        ]
        args: list[str | int] = [op, "", count, period, cap or 0, self._ttl_ms]
        for index, (key, group) in enumerate(tokens.items()):
            slots = [self._keys.flow_key_slots(role, key), self._keys.flow_key_rate(role, key)]
            if index == 0:
                keys[1:3] = slots
            else:
                keys += slots
            args += [key, len(group), *group]
        return await self._scripts.key_limit(keys=keys, args=args, client=self._redis)

    async def aclose(self) -> None:
        """Stop answering per-key requests (a batch being sent is cancelled)."""
        if self._sender is not None:
            self._sender.cancel()

    async def gate(self, delivery: Delivery, job: Job) -> Decision | None:
        """Before ``job`` starts: None if it may (a slot of its key taken), else its decision.

        The decision parks it (its key is saturated or its rate spent), dead-letters it (its
        key is invalid) or hands it back (Redis cannot be asked now).
        """
        role = delivery.role.name
        key = job.headers.get(LIMIT_KEY_HEADER) if job.headers else None
        if key is None or not self.limits(role):
            return None
        try:
            check_limit_key(key)
        except ValueError as exc:
            return decisions.dead("invalid_message", str(exc), job)
        token = f"{self._consumer}:k{next(self._seq)}"
        slot = _Slot(role, key, delivery.shard, delivery.stream, delivery.entry.id)
        try:
            granted, at, tracked = await self._acquire(key, token, slot)
        except connect.TRANSIENT_ERRORS:
            return decisions.RELEASE  # cannot ask: hand it back rather than run it unlimited
        if not granted:
            return Decision("park", job, detail=key, wake_at_ms=at)
        if tracked:
            self._slots[token] = slot
            self._tokens[delivery.stream, delivery.entry.id] = token
        if at and PARKED_FIELD in delivery.entry.fields:
            await self._next_by_rate(delivery.shard, key, at)
        return None

    async def _next_by_rate(self, shard: str, key: str, at_ms: int) -> None:
        """A woken job of a rate-limited key started: wake its key's next one when the rate allows.

        Without this the key's other parked jobs would wait for the safety wake (a lease TTL
        later), not for the rate. Only an existing wake time is lowered (``XX LT``).
        """
        try:
            await self._redis.zadd(self._keys.parked(shard), {key: at_ms}, xx=True, lt=True)
        except connect.TRANSIENT_ERRORS:
            return  # the safety wake comes
        self._look_by(at_ms)

    def _look_by(self, at_ms: int) -> None:
        """Look at the due keys by ``at_ms`` (server ms, taken as this host's) at the latest."""
        self._next_look = min(self._next_look, time.monotonic() + max(at_ms - now_ms(), 0) / 1000)

    def finished(self, delivery: Delivery) -> None:
        """``delivery``'s handler has ended (or never started): free its key's slot soon."""
        token = self._tokens.pop((delivery.stream, delivery.entry.id), None)
        if token is not None:
            self._ended.add(token)
            self._kick.set()

    async def park(self, delivery: Delivery, decision: Decision) -> bool:
        """Apply a ``park`` decision (``park.lua``); False if the entry is not ours any more.

        Then marks the key as having parked jobs (so that the worker freeing its next slot
        wakes one) and looks again at it: a slot freed between the refusal and the mark found
        no job to wake, so this wakes one itself.
        """
        role, key, shard = delivery.role.name, decision.detail, delivery.shard
        keys = [
            delivery.stream,
            self._keys.parked(shard),
            self._keys.park(shard, key),
            self._keys.starts(shard, delivery.entry.id.decode()),
        ]
        args: list[str | bytes | int] = [
            GROUP,
            self._consumer,
            delivery.entry.id,
            key,
            decision.wake_at_ms,
            self._keys.level_of_stream(delivery.stream),  # woken back onto its own level
        ]
        if not int(await self._scripts.park(keys=keys, args=args, client=self._redis)):
            return False
        self.parks[role] = self.parks.get(role, 0) + 1
        self._look_by(decision.wake_at_ms)
        logger.debug("parked %s entry %s (limit key %s)", role, delivery.entry.id.decode(), key)
        try:
            if int(await self._call(role, key, "parked")):
                await self.wake(role, shard, key, "now")
        except connect.TRANSIENT_ERRORS:
            pass  # the key's wake time still comes
        return True

    async def wake(self, role: str, shard: str, key: str, mode: str) -> bool:
        """Wake one parked job of ``key`` on ``shard`` (``mode``: ``now`` or ``due``)."""
        # Every level's stream: the job goes back to the level it was parked from.
        streams = self._keys.level_streams(shard, self.levels.get(role, 1))
        keys = [streams[0], self._keys.parked(shard), self._keys.park(shard, key), *streams[1:]]
        reply = await self._scripts.unpark(
            keys=keys, args=[key, mode, self._ttl_ms], client=self._redis
        )
        if not reply:
            return False
        self.wakes[role] = self.wakes.get(role, 0) + 1
        entry_id, starts = reply[0], int(reply[1])
        if starts:  # a suspect parked: its starts go on counting (poison detection)
            counted = self._keys.starts(shard, entry_id.decode())
            await self._redis.set(counted, starts, px=START_COUNT_TTL_MS)
        return True

    async def _wake_freed(self, role: str, shard: str, key: str, mark: int) -> None:
        """A slot of ``key`` freed and jobs of it were parked: wake one, on ``shard`` first.

        None found on any partition: the key's mark is removed, unless a job was parked since
        (its count moved on), so that the next release of the key asks nothing more.
        """
        shards = self.shards.get(role, (shard,))
        for candidate in (shard, *(s for s in shards if s != shard)):
            if await self.wake(role, candidate, key, "now"):
                return
        await self._call(role, key, "unmark", [str(mark)])

    async def sweep(self) -> None:
        """Free the slots of entries no longer held (waking a job of each key); renew the rest."""
        done: dict[tuple[str, str, str], list[str]] = {}
        ended, self._ended = self._ended, set()
        for token, slot in list(self._slots.items()):
            if token in ended or not self._held.holds(slot.stream, slot.entry_id):
                done.setdefault((slot.role, slot.key, slot.shard), []).append(token)
                del self._slots[token]
                self._tokens.pop((slot.stream, slot.entry_id), None)
        if done:
            await self._release(done)
        if time.monotonic() - self._renewed_at < self._ttl_ms / 3000:
            return
        self._renewed_at = time.monotonic()
        by_key: dict[tuple[str, str], list[str]] = {}
        for token, slot in self._slots.items():
            by_key.setdefault((slot.role, slot.key), []).append(token)
        for (role, key), tokens in by_key.items():
            await self._call(role, key, "renew", tokens)

    async def _release(self, done: dict[tuple[str, str, str], list[str]]) -> None:
        """Free the slots of ``done``, one ``release_many`` call per role; wake marked keys.

        A key is released once per sweep whatever the number of its ended jobs, and a key
        with jobs on several partitions of a role is released with all its tokens at once.
        """
        by_role: dict[str, dict[str, list[str]]] = {}
        shard_of: dict[tuple[str, str], str] = {}
        for (role, key, shard), tokens in done.items():
            by_role.setdefault(role, {}).setdefault(key, []).extend(tokens)
            shard_of.setdefault((role, key), shard)
        for role, keyed in by_role.items():
            marks = await self._call_many(role, "release_many", keyed)
            for key, mark in zip(keyed, marks, strict=True):
                if int(mark):
                    await self._wake_freed(role, shard_of[role, key], key, int(mark))

    async def wake_due(self, *, every_role: bool = False) -> None:
        """Wake one job of each parked key whose wake time has come, on every partition.

        Only the key-limited roles, unless ``every_role``: a role whose per-key limits were
        removed at run time still has parked jobs, and they are all woken (no limit holds them).
        Then notes when the earliest key still parked falls due (at most :data:`WAKE_POLL`
        seconds ahead: other workers park too).
        """
        horizon = now_ms() + 1000  # the scripts decide by the server's clock
        self._next_look = time.monotonic() + WAKE_POLL
        for role, shards in self.shards.items():
            limited = self.limits(role)
            if limited or every_role:
                for shard in shards:
                    await self._wake_due_on(role, shard, horizon, 1 if limited else WAKE_BATCH)

    async def _wake_due_on(self, role: str, shard: str, horizon: int, each: int) -> None:
        parked = self._keys.parked(shard)
        due = await self._redis.zrangebyscore(parked, "-inf", horizon, start=0, num=WAKE_BATCH)
        for raw in cast(list[bytes], due):
            key = raw.decode(errors="replace")
            if not LIMIT_KEY_PATTERN.fullmatch(key):  # written by someone else: not ours
                logger.warning("removed an invalid limit key %s from %s", shown(key), parked)
                await self._redis.zrem(parked, raw)
                continue
            for _ in range(each):
                if not await self.wake(role, shard, key, "due" if each == 1 else "now"):
                    break
        earliest = await self._redis.zrange(parked, 0, 0, withscores=True)
        if earliest:
            self._look_by(int(earliest[0][1]))

    async def earliest_parked(self) -> int | None:
        """The server time (ms) at which the first parked key of the served roles falls due.

        None when no job of theirs is parked, on any partition (any level).
        """
        earliest: int | None = None
        for shards in self.shards.values():
            for shard in shards:
                first = await self._redis.zrange(self._keys.parked(shard), 0, 0, withscores=True)
                if first:
                    at = int(first[0][1])
                    earliest = at if earliest is None else min(earliest, at)
        return earliest

    async def wake_for_drain(self) -> bool:
        """For a burst drain: False if no job of the served roles is parked; else wake some.

        Waits until the first parked key falls due (at most :data:`WAKE_POLL` seconds, then
        looks again: a slot freed by another worker wakes its key's jobs sooner), then wakes
        the due keys' jobs (:meth:`wake_due`), for the drain's next pass to read them.
        """
        earliest = await self.earliest_parked()
        if earliest is None:
            return False
        await anyio.sleep(min(max(earliest - now_ms(), 0) / 1000, WAKE_POLL))
        await self.wake_due(every_role=True)
        return True

    async def run(self, stopping: anyio.Event) -> None:
        """Sweep slots and wake due keys until the worker stops (outages waited out).

        The slots as soon as a handler holding one ends, else every :data:`SWEEP_EVERY`
        seconds; the due keys when the earliest falls due, and at least every
        :data:`WAKE_POLL` seconds.
        """
        sweeps = connect.Backoff("freeing and renewing per-key slots")
        wakes = connect.Backoff("waking parked jobs")
        looks = itertools.count()
        while not stopping.is_set():
            with anyio.move_on_after(SWEEP_EVERY):
                await self._kick.wait()  # a handler ended: free its slot now
            self._kick = anyio.Event()
            await sweeps.attempt(self.sweep)
            if time.monotonic() >= self._next_look and not stopping.is_set():
                # Every 10th look also at roles whose per-key limits were removed.
                await wakes.attempt(partial(self.wake_due, every_role=next(looks) % 10 == 0))
