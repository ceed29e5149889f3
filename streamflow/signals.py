"""The signals stream and cooperative cancel.

Sending a cancel (:func:`send_cancel`) sets a persistent marker and appends a signal to the
signals stream in one script. Every worker runs a :class:`SignalListener`: at start it takes the
stream's position, then loads every live marker into its :class:`CancelBook`, then follows the
stream from that position with its own cursor (plain XREAD, a broadcast: a consumer group would
give each signal to one worker only). So a cancel sent while no worker runs, or while the
listener was not reading, is still honoured, and checking whether a message may start costs no
Redis round trip.

Workers report what each cancel stopped in a hash per signal (consumer -> :class:`CancelReport`),
which ``streamflow cancel --wait`` reads.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup, TaskStatus
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import connect, streams
from streamflow.delivery import Delivery, InFlight
from streamflow.errors import ProtocolError, UnknownTargetError
from streamflow.keys import NAME_PATTERN, Keys, cancel_member, cancel_target
from streamflow.logs import shown
from streamflow.protocol import MESSAGE_FIELD, PROTOCOL_VERSION, Job, encode, new_message_id, now_ms
from streamflow.records import SIGNAL_FIELD, CancelReport, CancelSignal, decode_signal
from streamflow.scripts import Scripts
from streamflow.steps import Steps

logger = logging.getLogger(__name__)

#: How long a cancel marker lives: long enough to outlive any queued or delayed message.
DEFAULT_MARKER_TTL_MS = 7 * 24 * 3600 * 1000
#: The signals stream keeps about this many recent signals (markers keep older cancels alive).
SIGNALS_MAX_LEN = 10_000
#: Cancel markers read per round trip at start-up.
MARKERS_PER_READ = 1000
#: How often an unreadable signals stream (another type at its name) is tried again.
UNREADABLE_RETRY_S = 5.0
#: How long a cancel's report hash is kept.
REPORT_TTL_MS = 3600 * 1000
#: At most this many stream entries and delayed messages are read to find a message id.
MESSAGE_LOOKUP_LIMIT = 200_000
#: Entries read per round trip while looking for a message id.
_LOOKUP_PAGE = 1000


@dataclass(slots=True)
class CancelBook:
    """Which task and message ids are cancelled, held in memory by each worker."""

    _by_target: dict[tuple[str, str], tuple[CancelSignal, float]] = field(default_factory=dict)
    marker_ttl_ms: int = DEFAULT_MARKER_TTL_MS

    def add(self, signal: CancelSignal) -> None:
        """Record a cancel for the marker TTL, counted from now.

        Not from the signal's ``created_at_ms``: a sender with a skewed clock must not have its
        cancel ignored.
        """
        expires = time.time() + self.marker_ttl_ms / 1000
        self._by_target[(signal.target, signal.target_id)] = (signal, expires)

    def match(self, job: Job) -> CancelSignal | None:
        """The cancel that applies to ``job``, if any."""
        if not self._by_target:
            return None
        for key in (
            ("message", job.id),
            ("any", job.id),
            ("task", job.task_id),
            ("any", job.task_id),
        ):
            if key[1] is None:
                continue
            found = self._by_target.get(key)  # type: ignore[arg-type]
            if found is not None:
                if found[1] >= time.time():
                    return found[0]
                del self._by_target[key]  # type: ignore[arg-type]
        return None

    def for_task(self, task_id: str) -> CancelSignal | None:
        """The cancel of a whole task, if any."""
        for key in (("task", task_id), ("any", task_id)):
            found = self._by_target.get(key)
            if found is not None and found[1] >= time.time():
                return found[0]
        return None

    def __len__(self) -> int:
        return len(self._by_target)


def matches(signal: CancelSignal, job: Job) -> bool:
    """Whether ``signal`` cancels ``job``."""
    if signal.target in ("message", "any") and job.id == signal.target_id:
        return True
    return signal.target in ("task", "any") and job.task_id == signal.target_id


class SignalListener:
    """Follows the signals stream for one worker and keeps its :class:`CancelBook`.

    Args:
        redis: The client (the listener's blocking reads take one of its connections).
        keys: Key names.
        book: The cancel book to fill.
        on_cancel: Called for every cancel signal that arrives while listening.
        block_ms: How long one blocking read waits.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        book: CancelBook,
        on_cancel: Callable[[CancelSignal], None],
        *,
        block_ms: int = 1000,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._book = book
        self._on_cancel = on_cancel
        self._block_ms = block_ms
        self._scripts = Scripts(redis)
        self._position = b"0-0"
        self.signals_seen = 0
        self.bad_signals = 0
        #: Records read back from Redis that were skipped as malformed, by kind:
        #: ``cancel_marker`` (a marker or index member), ``cancel_index`` (the index itself),
        #: ``signals_stream`` (another type at the signals stream's name).
        self.bad_records: dict[str, int] = {}
        self._stream_broken = False

    async def load(self) -> None:
        """Take the stream's position, then load every live cancel marker."""
        try:
            self._position = await streams.last_id(self._redis, self._keys.signals())
        except ResponseError as exc:
            self._unreadable_stream(exc)
        await self._reload_markers()
        if len(self._book):
            logger.info("%d cancels in force", len(self._book))

    async def _reload_markers(self) -> None:
        """Load every live marker the index names (its cost grows with cancels, not keys).

        Everything read here may have been written by anyone with write access to the
        namespace: a bad index, member or marker is skipped and counted, with one warning per
        load, and never stops the worker.
        """
        problems: list[str] = []
        targets = await self._indexed_targets(problems)
        names = [self._keys.cancel_marker(*target) for target in targets]
        values = []
        for start in range(0, len(names), MARKERS_PER_READ):
            chunk = names[start : start + MARKERS_PER_READ]
            values += await streams.get_many(self._redis, chunk, raise_on_error=False)
        for target, name, raw in zip(targets, names, values, strict=True):
            if raw is None:
                continue  # expired or deleted since it was indexed
            problem = self._load_marker(target, raw)
            if problem is not None:
                problems.append(f"{name}: {problem}")
        if problems:
            logger.warning(
                "skipped %d malformed cancel markers (first: %s)",
                len(problems),
                shown(problems[0]),
            )

    async def _indexed_targets(self, problems: list[str]) -> list[tuple[str, str]]:
        """The (target, target id) of every marker the index lists as live (or nearly)."""
        index = self._keys.cancel_index()
        # Scores are expiry times by the server's clock: a day of slack for this one's.
        since = now_ms() - 24 * 3600 * 1000
        try:
            members: Any = await self._redis.zrange(index, since, "+inf", byscore=True)
        except ResponseError as exc:  # another type at the index's name
            self._count_bad("cancel_index")
            problems.append(f"{index}: {exc}")
            return []
        targets = []
        for member in members:
            target = cancel_target(bytes(member).decode(errors="replace"))
            if target is None:
                self._count_bad("cancel_marker")
                problems.append(f"{index}: member {member!r} names no cancel marker")
            else:
                targets.append(target)
        return targets

    def _load_marker(self, target: tuple[str, str], raw: bytes | Exception) -> str | None:
        """Add one marker's cancel to the book; what is wrong with it, if it was skipped.

        A marker means what its key says: a signal whose own target disagrees is applied to
        the key's target (and counted), so a marker cannot redirect a cancel elsewhere.
        """
        if isinstance(raw, Exception):  # WRONGTYPE: not a string
            self._count_bad("cancel_marker")
            return str(raw)
        try:
            signal = decode_signal({SIGNAL_FIELD: raw})
        except ProtocolError as exc:
            self._count_bad("cancel_marker")
            return str(exc)
        if (signal.target, signal.target_id) != target:
            self._count_bad("cancel_marker")
            self._book.add(signal.model_copy(update={"target": target[0], "target_id": target[1]}))
            return f"its signal names {signal.target} {signal.target_id}: applied to its key's"
        self._book.add(signal)
        return None

    def statistics(self) -> dict[str, int]:
        """Malformed records skipped so far, by kind (``signal`` for malformed signals)."""
        counts = dict(self.bad_records)
        if self.bad_signals:
            counts["signal"] = self.bad_signals
        return counts

    def _unreadable_stream(self, exc: ResponseError) -> None:
        """Warn (once until it is readable again) that the signals stream cannot be read."""
        if not self._stream_broken:
            self._stream_broken = True
            self._count_bad("signals_stream")
            logger.warning(
                "cannot read the signals stream %s (%s): new cancels do not reach this worker "
                "until it is fixed (it loads their markers only at start); retrying every %gs",
                self._keys.signals(),
                exc,
                UNREADABLE_RETRY_S,
            )

    def _count_bad(self, kind: str) -> None:
        self.bad_records[kind] = self.bad_records.get(kind, 0) + 1

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the stream from the loaded position until cancelled."""
        backoff = connect.Backoff("reading the signals stream")
        outage = False
        task_status.started()
        while True:
            try:
                if outage:
                    # Signals may have been trimmed from the stream while we could not read
                    # it: their markers are still there.
                    await self._reload_markers()
                    outage = False
                entries = await streams.read_broadcast(
                    self._redis,
                    self._keys.signals(),
                    after=self._position,
                    count=100,
                    block_ms=self._block_ms,
                )
            except connect.TRANSIENT_ERRORS as exc:
                await backoff.failed(exc)
                outage = True
                continue
            except ResponseError as exc:
                self._unreadable_stream(exc)
                await anyio.sleep(UNREADABLE_RETRY_S)
                continue
            self._stream_broken = False
            backoff.succeeded()
            for entry in entries:
                self._position = entry.id
                signal = self._remember(entry.fields, announce=True)
                if signal is not None:
                    await self._persist(signal)

    def _remember(self, fields: dict[bytes, bytes], *, announce: bool) -> CancelSignal | None:
        try:
            signal = decode_signal(fields)
        except ProtocolError as exc:
            # A bad signal never stops a worker: log it once and go on.
            self.bad_signals += 1
            logger.warning("ignoring a malformed signal: %s", exc)
            return None
        self._book.add(signal)
        if announce:
            self.signals_seen += 1  # live arrivals only, not markers loaded at start
            logger.info(
                "cancel of %s %s (%s) requested by %s",
                signal.target,
                signal.target_id,
                shown(signal.reason),  # the sender's text: escaped whatever formats the log
                shown(signal.requested_by or "unknown"),
            )
            self._on_cancel(signal)
        return signal

    async def _persist(self, signal: CancelSignal) -> None:
        # A signal sent by a plain XADD (no marker) becomes persistent too; SET NX keeps the
        # sender's marker and TTL when there is one.
        marker = self._keys.cancel_marker(signal.target, signal.target_id)
        # On failure it is in memory already; the next worker to see it tries again.
        with contextlib.suppress(*connect.TRANSIENT_ERRORS):
            await self._scripts.mark_cancel(
                keys=[marker, self._keys.cancel_index()],
                args=[
                    encode(signal),
                    self._book.marker_ttl_ms,
                    cancel_member(signal.target, signal.target_id),
                ],
                client=self._redis,
            )


class StopReporter:
    """Applies cancel signals to what one worker holds, and reports what they stopped.

    A matching handler has its cancel token set at once; if it has not stopped after its
    role's ``cancel_grace`` its cancel scope is cancelled (a hard cancel: its cleanup still
    runs). Either way the delivery is acknowledged as ``cancelled``. Queued messages that match
    are refused before they start (the worker checks the book).

    Args:
        redis: The client.
        keys: Key names.
        consumer: The worker's consumer name (the report's field).
        held: The deliveries the worker holds.
        book: The worker's cancel book.
    """

    def __init__(
        self, redis: Redis, keys: Keys, consumer: str, held: InFlight, book: CancelBook
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._consumer = consumer
        self._held = held
        self.book = book
        self.task_group: TaskGroup | None = None
        self._stopped: dict[str, list[str]] = {}
        self._running: dict[str, set[Delivery]] = {}
        # Reports are written from several tasks over different connections: one at a time,
        # each with the state as of its write, or a stale report could land last.
        self._write_lock = anyio.Lock()

    def on_signal(self, signal: CancelSignal) -> None:
        """Cancel the running handlers ``signal`` matches (called by the listener)."""
        matched = [
            d
            for d in self._held
            if d.job is not None and d.cancel is None and not d.lost and matches(signal, d.job)
        ]
        for delivery in matched:
            delivery.stop("cancelled", signal.reason, hard=False, signal=signal)
            if delivery.finished is None:
                delivery.finished = anyio.Event()
        self._running[signal.id] = set(matched)
        if self.task_group is not None:
            self.task_group.start_soon(self._enforce, signal.id, matched)

    async def _enforce(self, signal_id: str, matched: list[Delivery]) -> None:
        await self._write(signal_id)
        if not matched:
            return
        grace = max(d.role.cancel_grace for d in matched)
        with anyio.move_on_after(grace):
            for delivery in matched:
                assert delivery.finished is not None
                await delivery.finished.wait()
        stubborn = [d for d in matched if d.finished is not None and not d.finished.is_set()]
        for delivery in stubborn:
            if delivery.scope is not None:
                logger.warning(
                    "hard-cancelling %s message %s: it did not stop within %.1fs of the cancel",
                    delivery.role.name,
                    delivery.job.id if delivery.job else "?",
                    grace,
                )
                reason = delivery.cancel.reason if delivery.cancel is not None else ""
                delivery.stop("cancelled", reason, hard=True)

    async def stopped(self, signal_id: str, delivery: Delivery) -> None:
        """Record that ``delivery`` was stopped (or refused) because of ``signal_id``."""
        if delivery.job is not None:
            self._stopped.setdefault(signal_id, []).append(delivery.job.id)
        self._running.get(signal_id, set()).discard(delivery)
        await self._write(signal_id)

    async def _write(self, signal_id: str) -> None:
        with anyio.move_on_after(5, shield=True), contextlib.suppress(*connect.TRANSIENT_ERRORS):
            async with self._write_lock:
                state = CancelReport(
                    consumer=self._consumer,
                    stopped=list(self._stopped.get(signal_id, [])),
                    running=len(self._running.get(signal_id, ())),
                    at_ms=now_ms(),
                )
                await report(self._redis, self._keys, signal_id, state)


async def report(redis: Redis, keys: Keys, signal_id: str, report: CancelReport) -> None:
    """Write one worker's report on a cancel."""
    key = keys.cancel_report(signal_id)
    pipe = redis.pipeline(transaction=False)
    pipe.hset(key, report.consumer, encode(report))
    pipe.pexpire(key, REPORT_TTL_MS)
    await pipe.execute()


async def send_cancel(
    redis: Redis,
    scripts: Scripts,
    keys: Keys,
    *,
    target: str,
    target_id: str,
    reason: str,
    requested_by: str,
    marker_ttl_ms: int = DEFAULT_MARKER_TTL_MS,
) -> CancelSignal:
    """Set the cancel marker and announce the cancel on the signals stream."""
    signal = CancelSignal(
        protocol=PROTOCOL_VERSION,
        kind="cancel",
        id=new_message_id(),
        target=target,  # type: ignore[arg-type]
        target_id=target_id,
        reason=reason,
        requested_by=requested_by,
        created_at_ms=now_ms(),
    )
    await scripts.cancel(
        keys=[keys.signals(), keys.cancel_marker(target, target_id), keys.cancel_index()],
        args=[encode(signal), marker_ttl_ms, SIGNALS_MAX_LEN, cancel_member(target, target_id)],
        client=redis,
    )
    return signal


async def read_reports(redis: Redis, keys: Keys, signal_id: str) -> dict[str, CancelReport]:
    """Every worker's report on a cancel, by consumer name."""
    key = keys.cancel_report(signal_id)
    try:
        raw = await streams.hash_items(redis, key)
    except ResponseError as exc:  # another type at the report's name: no report to read
        logger.warning("cannot read the cancel reports %s: %s", key, shown(exc))
        return {}
    reports = {}
    for name, value in raw.items():
        try:
            reports[name] = CancelReport.model_validate_json(value)
        except ValidationError as exc:  # anyone with write access may have written it
            logger.warning("skipping a malformed cancel report in %s: %s", key, shown(exc))
    return reports


async def live_consumers(redis: Redis, keys: Keys) -> set[str]:
    """The consumer names of every live worker (from their liveness keys)."""
    found = await streams.scan_keys(redis, keys.consumer_alive_pattern())
    return {name for key in found if (name := keys.consumer_of_alive_key(key))}


async def check_target(redis: Redis, keys: Keys, target: str, target_id: str) -> None:
    """Raise unless ``target_id`` names a known task or a message still to settle.

    A task is known while its state is kept (its retention), or while a job carrying its id
    waits or runs. A job is found in a role stream (queued, or running: entries are deleted
    when settled) or a delayed schedule (a delay or a retry): no per-message key exists, so
    the streams are read, at most :data:`MESSAGE_LOOKUP_LIMIT` entries in all, in pages of
    1,000. It costs nothing on the publishing path.

    Raises:
        UnknownTargetError: Nothing matches (or the lookup's limit was reached first).
    """
    checks_task = target in ("task", "any") and NAME_PATTERN.fullmatch(target_id) is not None
    if checks_task and await redis.exists(keys.task_state(target_id)):
        return
    fields = {"task": ("task_id",), "message": ("id",)}.get(target, ("id", "task_id"))
    found, read = await _find_job(redis, keys, fields, target_id)
    if found:
        return
    what = {"task": "no known task", "message": "no message"}.get(target, "no task or message")
    cut = " (the lookup's limit: it may be further back)" if read >= MESSAGE_LOOKUP_LIMIT else ""
    raise UnknownTargetError(
        f"nothing to cancel: {target_id!r} names {what} (no task state, no queued, delayed or "
        f"running job among {read} entries{cut}); to cancel an id before it is published or "
        "submitted, ask for a pre-emptive cancel (--preemptive, preemptive=True)"
    )


async def _find_job(
    redis: Redis, keys: Keys, fields: tuple[str, ...], target_id: str
) -> tuple[bool, int]:
    """Whether a queued, running or delayed job has ``target_id`` in ``fields``; entries read."""
    needle = f'"{target_id}"'.encode()
    read = 0
    level_streams, level_schedules = keys.level_patterns()
    for pattern, reader in (
        (keys.role_pattern(), _stream_page),
        (level_streams, _stream_page),
        (keys.delayed_pattern(), _zset_page),
        (level_schedules, _zset_page),
    ):
        for key in sorted(await streams.scan_keys(redis, pattern)):
            cursor: Any = None
            while read < MESSAGE_LOOKUP_LIMIT:
                count = min(_LOOKUP_PAGE, MESSAGE_LOOKUP_LIMIT - read)
                try:
                    bodies, cursor = await reader(redis, key, cursor, count)
                except ResponseError:  # another type at a role key's name: nothing there
                    break
                read += len(bodies)
                if any(needle in body and _names(body, fields, target_id) for body in bodies):
                    return True, read
                if len(bodies) < count:
                    break
    return False, read


async def _stream_page(redis: Redis, key: str, after: Any, count: int) -> tuple[list[bytes], Any]:
    reply: Any = await redis.xrange(key, "-" if after is None else f"({after}", "+", count)
    bodies = [bytes(fields.get(MESSAGE_FIELD, b"")) for _, fields in reply]
    return bodies, (reply[-1][0].decode() if reply else after)


async def _zset_page(redis: Redis, key: str, start: Any, count: int) -> tuple[list[bytes], Any]:
    start = start or 0
    reply: Any = await redis.zrange(key, start, start + count - 1)
    return [bytes(member) for member in reply], start + len(reply)


def _names(body: bytes, fields: tuple[str, ...], target_id: str) -> bool:
    """Whether a job's body (untrusted JSON) has ``target_id`` in one of ``fields``."""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(decoded, dict) and any(decoded.get(f) == target_id for f in fields)


def cancelled_already(redis: Any, keys: Keys, target: str, target_id: str) -> Steps[bool]:
    """Whether a cancel of ``target`` (``task`` or ``message``) ``target_id`` is in force.

    Its own marker or an ``any`` marker of the id: both markers share one slot. For an asyncio
    or a blocking client (see :mod:`streamflow.steps`).
    """
    pipe = redis.pipeline(transaction=False)
    for marker in cancel_markers(keys, target, target_id):
        pipe.exists(marker)
    return any((yield pipe.execute()))


def cancel_markers(keys: Keys, target: str, target_id: str) -> tuple[str, str]:
    """The markers whose existence means a cancel of ``target_id`` is in force (one slot)."""
    return keys.cancel_marker(target, target_id), keys.cancel_marker("any", target_id)


def cancelled_already_text(target: str, target_id: str) -> str:
    """The warning given when ``target_id`` is published or submitted under a cancel."""
    return (
        f"{target} {target_id} is cancelled already (a pre-emptive cancel, kept 7 days): "
        "workers refuse its work at once, as cancelled"
    )
