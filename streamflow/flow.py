"""Flow control of roles: pausing and resuming them, and limiting their starts.

A role's flow control is one hash per role, :meth:`~streamflow.keys.Keys.flow_control`
(``<ns>:{flow:<role>}:control``); while the role is paused its ``paused`` field holds the time
(ms since the epoch) it was paused. Being a key, a pause survives restarts of workers and of
Redis (with persistence) and reaches a worker that starts later.

Operators write it (:func:`pause`, :func:`resume`: ``streamflow pause``, ``Client.pause``);
workers read it through a :class:`PauseWatch`: one pipelined ``HGET`` per role every
:data:`REFRESH_EVERY` seconds, and each reader looks at the cached value before each read. A
poll rather than a signal on the signals stream: the key has to be read anyway (at start-up,
after a missed signal, after an outage), one round trip per worker per half second costs
nothing next to the reads, and half a second is below one blocking read (``block_ms``, 1 s), so
a pause takes effect within one read cycle either way with a single mechanism.

Limits (:class:`Limiter`, ``limit.lua``): a role may be held to N starts per period (GCRA with a
burst of :data:`RATE_BURST` seconds' worth, at least 1: every start due is granted in one call,
and at most ``rate x window + burst`` in any window) and to M jobs held at once, across every
worker and process. They are declared in code (``@app.role(rate_limit="100/m",
concurrency_limit=5)``) and overridden at run time by the ``rate_count``, ``rate_period_ms`` and
``concurrency`` fields of the same hash (``streamflow limit``; 0 means no limit). A worker's
reader asks the script for permits before it reads (and its adopter before it adopts: see
:mod:`streamflow.intake`), and reads only as many entries as were granted: a limited job waits
in the stream, in its place, not read by anyone, so it has no lease to lose. A running slot is a
token in ``{flow:<role>}:running`` with an expiry (the lease TTL, renewed while the entry is
held), so a worker that dies gives its slots back when they expire. A grant the read did not use
(the stream had fewer entries) is handed back at once, unless a start was granted since. Limits
per key within a role (a customer id) are in :mod:`streamflow.keylimits`: the key is known only
after the read.

The pause, resume and limit operations are written once as :mod:`streamflow.steps` generators,
for the asyncio and the blocking client alike.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, partitions, steps, streams
from streamflow.app import format_rate, parse_rate
from streamflow.delivery import InFlight
from streamflow.errors import ConfigError, UnknownRoleError
from streamflow.keys import Keys, validate_name
from streamflow.logs import BadKeys
from streamflow.protocol import now_ms
from streamflow.scripts import Scripts
from streamflow.steps import Steps

logger = logging.getLogger(__name__)

#: The field of a role's flow control hash that says it is paused (and since when, in ms).
PAUSED_FIELD = "paused"
#: Seconds between a worker's looks at whether its roles are paused.
REFRESH_EVERY = 0.5
#: The fields that set a role's limits at run time (0: no limit), over the declared ones.
RATE_COUNT, RATE_PERIOD, CONCURRENCY = "rate_count", "rate_period_ms", "concurrency"
#: The same for each limit key of a role (see :mod:`streamflow.keylimits`).
KEY_RATE_COUNT, KEY_RATE_PERIOD = "key_rate_count", "key_rate_period_ms"
KEY_CONCURRENCY = "key_concurrency"
_ALL_LIMITS = (
    RATE_COUNT,
    RATE_PERIOD,
    CONCURRENCY,
    KEY_RATE_COUNT,
    KEY_RATE_PERIOD,
    KEY_CONCURRENCY,
)
#: Seconds a reader waits before asking again when all of a role's running slots are taken.
SLOT_POLL = 0.05
#: A rate limit's burst, in seconds of its rate: ``max(1, floor(rate x RATE_BURST))`` starts
#: (50/s: 5; 100/m: 1) may be granted at once after a pause, so a reader that asks late makes
#: up the time lost. Over any window of ``w`` seconds at most ``rate x w + burst`` are granted.
RATE_BURST = 0.1
#: Seconds after which the grant a rate-limited read held while it blocked has aged: the start
#: of the entry it returns is taken again at the rate (see :mod:`streamflow.intake`).
CONFIRM_AFTER = 0.005


def role_known(redis: Any, keys: Keys, role: str) -> Steps[bool]:
    """Whether ``role`` exists: its stream, schedule, dead letters or config, or a known role.

    The config (partitions, priority levels) counts: a role's jobs may all wait at a level
    above 0, whose streams are not the role stream.
    """
    pipe = redis.pipeline(transaction=False)
    pipe.exists(
        keys.role_stream(role), keys.delayed(role), keys.dead_letters(role), keys.role_config(role)
    )
    pipe.sismember(keys.known_roles(), role)
    existing, known = yield pipe.execute()
    return bool(existing) or bool(known)


def pause(redis: Any, keys: Keys, role: str, *, force: bool = False) -> Steps[bool]:
    """Pause ``role``; True if it was running (a pause keeps the time of the first).

    Raises:
        InvalidNameError: ``role`` is not a valid role name.
        UnknownRoleError: Nothing is known of ``role`` (no stream, no worker served it) and
            ``force`` is not set: a misspelt name would otherwise pause nothing, silently.
    """
    validate_name(role, "role")
    if not force and not (yield from role_known(redis, keys, role)):
        raise UnknownRoleError(
            f"unknown role {role!r}: no stream and no worker has served it "
            "(force=True / --force pauses it anyway, before it exists)"
        )
    added = yield redis.hsetnx(keys.flow_control(role), PAUSED_FIELD, str(now_ms()))
    return bool(added)


def resume(redis: Any, keys: Keys, role: str) -> Steps[bool]:
    """Resume ``role``; True if it was paused.

    Raises:
        InvalidNameError: ``role`` is not a valid role name.
    """
    removed = yield redis.hdel(keys.flow_control(validate_name(role, "role")), PAUSED_FIELD)
    return bool(removed)


def paused_since(redis: Any, keys: Keys, roles: Sequence[str]) -> Steps[dict[str, int]]:
    """The roles of ``roles`` that are paused, each with the time it was paused (ms).

    One round trip for all. A garbled value (anything may write the key) reads as paused since
    0: a key that says paused is obeyed.
    """
    if not roles:
        return {}
    pipe = redis.pipeline(transaction=False)
    for role in roles:
        pipe.hget(keys.flow_control(role), PAUSED_FIELD)
    replies = yield pipe.execute(raise_on_error=False)
    out: dict[str, int] = {}
    for role, value in zip(roles, _data(replies), strict=True):
        if value is not None:
            out[role] = int(value) if value.isdigit() else 0
    return out


def _data(replies: list[Any]) -> list[Any]:
    """Pipelined replies, a refusal for the data (``WRONGTYPE``: another type of key) as None.

    An outage is raised. Anyone with a worker's rights may write another type of key at a role's
    flow keys: a reader shows no pause or limit there rather than failing every role.
    """
    for reply in replies:
        if isinstance(reply, Exception) and connect.is_outage(reply):
            raise reply
    return [None if isinstance(reply, Exception) else reply for reply in replies]


@dataclass(frozen=True, slots=True)
class Limits:
    """A role's limits as set at run time (None: not set there, the declared one applies).

    Attributes:
        rate: ``"10/s"``, or ``"off"`` (no limit, whatever is declared), or None.
        concurrency: Jobs held at once, 0 for no limit, or None.
        running: Running slots taken now (tokens not expired).
        key_rate: Like ``rate``, for each limit key of the role.
        key_concurrency: Like ``concurrency``, for each limit key of the role.
        busy_keys: Limit keys holding running slots now.
        parked_keys: Limit keys with jobs parked (waiting for their key), summed over the role's
            partitions (a key with jobs parked on two partitions counts twice).
    """

    rate: str | None = None
    concurrency: int | None = None
    running: int = 0
    key_rate: str | None = None
    key_concurrency: int | None = None
    busy_keys: int = 0
    parked_keys: int = 0


def set_limits(
    redis: Any,
    keys: Keys,
    role: str,
    *,
    rate: str | None = None,
    concurrency: int | None = None,
    key_rate: str | None = None,
    key_concurrency: int | None = None,
    reset: bool = False,
) -> Steps[Limits]:
    """Set a role's limits at run time; returns them as they are now.

    Args:
        redis: The client.
        keys: Key names.
        role: The role.
        rate: ``"10/s"``-style, or ``"off"``; None leaves it as it is.
        concurrency: At most this many held at once, 0 for none; None leaves it as it is.
        key_rate: Like ``rate``, for each limit key of the role.
        key_concurrency: Like ``concurrency``, for each limit key of the role.
        reset: Drop every run-time setting first (the declared limits apply again).

    Raises:
        ConfigError: A rate is not ``COUNT/PERIOD`` or ``off``, or a concurrency is negative.
    """
    key = keys.flow_control(validate_name(role, "role"))
    fields = _rate_fields(rate, RATE_COUNT, RATE_PERIOD) | _rate_fields(
        key_rate, KEY_RATE_COUNT, KEY_RATE_PERIOD
    )
    for field, cap in ((CONCURRENCY, concurrency), (KEY_CONCURRENCY, key_concurrency)):
        if cap is not None:
            if cap < 0:
                raise ConfigError("a concurrency limit must be 0 (no limit) or more")
            fields[field] = cap
    if reset:
        yield redis.hdel(key, *_ALL_LIMITS)
    if fields:
        yield redis.hset(key, mapping=fields)
    found = yield from read_limits(redis, keys, [role])
    return found[role]


def _rate_fields(rate: str | None, count_field: str, period_field: str) -> dict[str, int]:
    if rate is None:
        return {}
    count, period = (0, 0) if rate == "off" else parse_rate(rate)
    return {count_field: count, period_field: period}


def _shown_rate(count: Any, period: Any) -> str | None:
    """A run-time rate as set (``"off"`` for 0); garbage written by others reads as off."""
    if count is None:
        return None
    try:
        return "off" if int(count) <= 0 else format_rate(int(count), max(int(period or 1), 1))
    except ValueError:
        return "off"


def _cap(value: Any) -> int | None:
    return None if value is None else int(value) if value.isdigit() else 0


def read_limits(redis: Any, keys: Keys, roles: Sequence[str]) -> Steps[dict[str, Limits]]:
    """Each role's run-time limits, its running slots and its busy and parked keys now.

    Two round trips for all: the roles' partitions, then the rest (the parked keys of every
    partition summed).
    """
    shards = yield from _recorded_shards(redis, keys, roles)
    pipe = redis.pipeline(transaction=False)
    now = now_ms()
    for role in roles:
        pipe.hmget(keys.flow_control(role), list(_ALL_LIMITS))
        pipe.zcount(keys.flow_running(role), now, "+inf")
        pipe.zcount(keys.flow_keys(role), now, "+inf")
        for shard in shards[role]:
            pipe.zcard(keys.parked(shard))
    replies = iter(_data((yield pipe.execute(raise_on_error=False))))
    out: dict[str, Limits] = {}
    for role in roles:
        fields, running, busy = next(replies), next(replies), next(replies)
        parked = sum(int(next(replies) or 0) for _ in shards[role])
        count, period, cap, key_count, key_period, key_cap = fields or (None,) * len(_ALL_LIMITS)
        out[role] = Limits(
            _shown_rate(count, period),
            _cap(cap),
            int(running or 0),
            _shown_rate(key_count, key_period),
            _cap(key_cap),
            int(busy or 0),
            parked,
        )
    return out


def _recorded_shards(
    redis: Any, keys: Keys, roles: Sequence[str]
) -> Steps[dict[str, tuple[str, ...]]]:
    """Each role's partitions as recorded (the role alone if none is, or it is garbled)."""
    pipe = redis.pipeline(transaction=False)
    for role in roles:
        pipe.hget(keys.role_config(role), partitions.SHARDS_FIELD)
    # Errors as values: another type of key at a config's name is the role alone.
    replies = yield pipe.execute(raise_on_error=False)
    out: dict[str, tuple[str, ...]] = {}
    for role, recorded in zip(roles, replies, strict=True):
        out[role] = (role,)
        if recorded is not None and not isinstance(recorded, Exception):
            with contextlib.suppress(ConfigError):
                out[role] = partitions.parse(role, recorded).shards
    return out


@dataclass(frozen=True, slots=True)
class Watched:
    """What a worker watches: paused roles, and roles limited (per key) at run time.

    ``unreadable``: the roles whose flow control key holds another type (anyone with the
    worker's rights may write one there): read as neither paused nor limited, rather than
    stopping every worker.
    """

    paused: dict[str, int]
    limited: set[str]
    key_limited: set[str]
    unreadable: set[str]


def _watched(redis: Any, keys: Keys, roles: Sequence[str]) -> Steps[Watched]:
    """What a worker watches, in one round trip: paused roles and roles limited at run time.

    The paused ones as :func:`paused_since` reads them, each with the time it was paused; then
    the roles whose flow control key holds another type (anyone with the worker's rights may
    write one there): read as neither paused nor limited, rather than stopping every worker.
    """
    found = Watched({}, set(), set(), set())
    if not roles:
        return found
    pipe = redis.pipeline(transaction=False)
    for role in roles:
        fields = [PAUSED_FIELD, RATE_COUNT, CONCURRENCY, KEY_RATE_COUNT, KEY_CONCURRENCY]
        pipe.hmget(keys.flow_control(role), fields)
    replies = yield pipe.execute(raise_on_error=False)
    for role, reply in zip(roles, replies, strict=True):
        if isinstance(reply, Exception):
            if connect.is_outage(reply):
                raise reply
            found.unreadable.add(role)  # WRONGTYPE
            continue
        since, rate, cap, key_rate, key_cap = reply
        if since is not None:
            found.paused[role] = int(since) if since.isdigit() else 0
        if rate is not None or cap is not None:
            found.limited.add(role)
        if key_rate is not None or key_cap is not None:
            found.key_limited.add(role)
    return found


class PauseWatch:
    """A worker's cached view of which of its roles are paused.

    Args:
        redis: The client.
        keys: Key names.
        roles: The roles the worker serves.
        stopping: Set when the worker stops: waiters return.
        every: Seconds between refreshes.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        roles: Sequence[str],
        stopping: anyio.Event,
        *,
        every: float = REFRESH_EVERY,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._roles = list(roles)
        self._stopping = stopping
        self._every = every
        self._paused: dict[str, int] = {}
        self._changed = anyio.Event()
        #: The roles whose limits are set at run time (as last read).
        self.limited_at_run_time: set[str] = set()
        #: The roles whose per-key limits are set at run time (as last read).
        self.key_limited_at_run_time: set[str] = set()
        #: Flow control keys found holding another type, by kind (``flow_control``).
        self.bad_records: dict[str, int] = {}
        self._unreadable: set[str] = set()

    def is_paused(self, role: str) -> bool:
        """Whether ``role`` was paused at the last refresh."""
        return role in self._paused

    def paused(self) -> dict[str, int]:
        """The roles paused at the last refresh, each with the time it was paused (ms)."""
        return dict(self._paused)

    def states(self) -> dict[str, bool]:
        """Each role watched: whether it was paused at the last refresh."""
        return {role: role in self._paused for role in self._roles}

    async def refresh(self) -> None:
        """Read whether the roles are paused now; wake the readers of resumed roles."""
        watched = await steps.run(_watched(self._redis, self._keys, self._roles))
        found = watched.paused
        self.limited_at_run_time = watched.limited
        self.key_limited_at_run_time = watched.key_limited
        self._report_unreadable(watched.unreadable)
        if found.keys() != self._paused.keys():
            for role in found.keys() - self._paused.keys():
                logger.info("role %s is paused: no new jobs of it start here", role)
            for role in self._paused.keys() - found.keys():
                logger.info("role %s is resumed", role)
        self._paused = found
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _report_unreadable(self, roles: set[str]) -> None:
        """Warn once (until it reads again) of each role whose flow control is not a hash."""
        for role in sorted(roles - self._unreadable):
            self.bad_records["flow_control"] = self.bad_records.get("flow_control", 0) + 1
            logger.warning(
                "the flow control of role %s (%s) is not a hash: the role is served as not "
                "paused and without run-time limits until it is (DEL it, then pause or limit "
                "the role again)",
                role,
                self._keys.flow_control(role),
            )
        self._unreadable = roles

    async def wait_resumed(self, role: str) -> None:
        """Wait until ``role`` is not paused (or the worker stops)."""
        while self.is_paused(role) and not self._stopping.is_set():
            await self._changed.wait()

    def stop(self) -> None:
        """The worker stops: wake every waiter."""
        self._changed.set()

    async def run(self) -> None:
        """Refresh every ``every`` seconds until the worker stops (an outage is waited out)."""
        backoff = connect.Backoff("reading which roles are paused")
        while not self._stopping.is_set():
            with anyio.move_on_after(self._every):
                await self._stopping.wait()
            if self._stopping.is_set():
                return
            await backoff.attempt(self.refresh)


def _text(value: Any) -> str:
    """A script's string reply (bytes from a client without decoding) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


class Limiter:
    """A worker's side of the limits: permits before reads, running slots while entries are held.

    Args:
        redis: The client.
        scripts: The registered scripts (``limit.lua``).
        keys: Key names.
        consumer: This worker's consumer name (its tokens start with it).
        held: The entries this worker holds (a slot is freed once its entry is not).
        declared: Each served role's declared limits: (rate or None, concurrency or None).
        ttl_ms: How long a slot outlives its last renewal (the lease TTL).
    """

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        consumer: str,
        held: InFlight,
        declared: Mapping[str, tuple[tuple[int, int] | None, int | None]],
        *,
        ttl_ms: int,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self._consumer = consumer
        self._held = held
        self._declared = dict(declared)
        self._ttl_ms = ttl_ms
        self._seq = itertools.count(1)
        #: Slots this worker holds: token -> (role, stream, entry id).
        self._slots: dict[str, tuple[str, str, bytes]] = {}
        self._renewed_at = time.monotonic()
        self._untracked: set[str] = set()  # granted starts that hold no running slot
        self._tat: dict[str, str] = {}  # granted start -> the rate state its grant left
        self._rated: set[str] = set()  # roles whose last grant was under a rate limit
        self._unrated: set[str] = set()  # roles whose last grant was under no rate limit
        #: Reads a limit held back (the reader waited), by role.
        self.waits: dict[str, int] = {}
        #: Limit keys found holding another type, by kind (``flow_limits``).
        self._bad_keys = BadKeys(logger)  # roles whose limit keys hold another type
        self.bad_records = self._bad_keys.counts

    def declares(self, role: str) -> bool:
        """Whether the app declares a limit on ``role``."""
        rate, cap = self._declared.get(role, (None, None))
        return rate is not None or cap is not None

    def slots(self) -> dict[str, int]:
        """Running slots this worker holds, by role."""
        out: dict[str, int] = {}
        for role, _, _ in self._slots.values():
            out[role] = out.get(role, 0) + 1
        return out

    def rated(self, role: str) -> bool | None:
        """Whether ``role``'s last grant was under a rate limit (None: none granted yet)."""
        if role in self._rated:
            return True
        return False if role in self._unrated else None

    async def confirm(self, role: str, wanted: int) -> tuple[int, float]:
        """Take up to ``wanted`` starts at the rate again, slots untouched.

        Returns:
            How many were granted, and (with none) seconds until the next is due.
        """
        reply = await self._call(role, "confirm", refund=wanted)
        granted, wait_us = (int(v) for v in reply[:2])
        return granted, 0.0 if granted else max(wait_us, 1) / 1_000_000

    async def _call(
        self, role: str, op: str, tokens: Sequence[str] = (), refund: int = 0, tat: str = ""
    ) -> Any:
        rate, cap = self._declared.get(role, (None, None))
        count, period = rate or (0, 0)
        keys = [
            self._keys.flow_control(role),
            self._keys.flow_rate(role),
            self._keys.flow_running(role),
        ]
        burst_ms = round(RATE_BURST * 1000)
        args: list[str | int] = [op, count, period, cap or 0, self._ttl_ms, burst_ms]
        args += [refund, tat, *tokens]
        try:
            reply = await self._scripts.limit(keys=keys, args=args, client=self._redis)
        except ResponseError as exc:
            if connect.is_outage(exc):
                raise
            self._unusable(role, keys, exc)
            # Served without its limits, rather than not at all: no slot is tracked.
            if op == "confirm":
                return [refund, 0]
            return [len(tokens), 0, 0, b""] if op == "acquire" else [0, 0]
        if op == "acquire":  # the one step that reads every limit key
            self._bad_keys.ok(role)
        return reply

    def _unusable(self, role: str, keys: Sequence[str], exc: ResponseError) -> None:
        """Warn once (until they work again) that a role's limit keys hold another type."""
        self._bad_keys.bad(
            "flow_limits",
            role,
            "the limits of role %s cannot be applied (%s): it is served without them until "
            "they can; a key of another type at %s? DEL it",
            role,
            exc,
            " or ".join(keys),
        )

    async def acquire(self, role: str, wanted: int) -> tuple[list[str], float]:
        """Ask for up to ``wanted`` starts: the tokens granted, else seconds to wait.

        Under a rate limit, every start due (up to ``wanted`` and the burst) is granted at
        once; with none due, the wait is until the next one is, to the microsecond.
        """
        tokens = [f"{self._consumer}:{next(self._seq)}" for _ in range(wanted)]
        reply = await self._call(role, "acquire", tokens)
        granted, wait_us, slots = (int(v) for v in reply[:3])
        tat = _text(reply[3]) if len(reply) > 3 else ""
        if granted:
            if not slots:  # no concurrency limit: nothing to free or renew later
                self._untracked.update(tokens[:granted])
            if tat:
                self._rated.add(role)
                self._unrated.discard(role)
                self._tat.update(dict.fromkeys(tokens[:granted], tat))
            else:
                self._rated.discard(role)
                self._unrated.add(role)
            return tokens[:granted], 0.0
        self.waits[role] = self.waits.get(role, 0) + 1
        if wait_us < 0:
            return [], SLOT_POLL
        self._rated.add(role)
        return [], max(wait_us, 1) / 1_000_000

    async def bind(
        self, role: str, stream: str, entries: Sequence[streams.Entry], tokens: Sequence[str]
    ) -> None:
        """Tie a token to each entry read (and held); give back the starts not used."""
        for token, entry in zip(tokens, entries, strict=False):
            self._tat.pop(token, None)
            if token in self._untracked:
                self._untracked.discard(token)
            else:
                self._slots[token] = (role, stream, entry.id)
        unused = list(tokens[len(entries) :])
        if not unused:
            return
        tat = self._tat.get(unused[0], "")
        for token in unused:
            self._tat.pop(token, None)
        slotted = [token for token in unused if token not in self._untracked]
        self._untracked.difference_update(unused)
        if slotted:
            await self._call(role, "release", slotted)
        if tat:  # given back only if no start was granted since (see limit.lua)
            await self._call(role, "refund", refund=len(unused), tat=tat)

    async def sweep(self) -> None:
        """Free the slots of entries no longer held; renew the others every third of the TTL."""
        done: dict[str, list[str]] = {}
        for token, (role, stream, entry_id) in list(self._slots.items()):
            if not self._held.holds(stream, entry_id):
                done.setdefault(role, []).append(token)
                del self._slots[token]
        for role, tokens in done.items():
            await self._call(role, "release", tokens)
        if time.monotonic() - self._renewed_at < self._ttl_ms / 3000:
            return
        self._renewed_at = time.monotonic()
        by_role: dict[str, list[str]] = {}
        for token, (role, _, _) in self._slots.items():
            by_role.setdefault(role, []).append(token)
        for role, tokens in by_role.items():
            await self._call(role, "renew", tokens)

    async def run(self, stopping: anyio.Event) -> None:
        """Sweep every :data:`SLOT_POLL` seconds until the worker stops (outages waited out)."""
        backoff = connect.Backoff("freeing and renewing running slots")
        while not stopping.is_set():
            with anyio.move_on_after(SLOT_POLL):
                await stopping.wait()
            await backoff.attempt(self.sweep)
