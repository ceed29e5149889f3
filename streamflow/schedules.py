"""Schedules: what a periodic job is, and when its ticks fall. Pure: no I/O, no clock.

A :class:`Schedule` publishes a job to a role at every *tick*: the times of a cron expression
in a time zone (read with `cronsim <https://pypi.org/project/cronsim/>`_, the
``streamflow[schedules]`` extra), or every fixed interval. Ticks are whole milliseconds since
the Unix epoch, the same in every process, so that a tick names one run wherever it is
computed:

* an interval's ticks are the multiples of the interval since the epoch (elapsed time: no time
  zone, no DST);
* a cron expression's ticks are wall-clock times in the schedule's zone (``zoneinfo``). On a
  DST change a time that does not exist (02:30 when clocks jump from 02:00 to 03:00) fires at
  the first time after the jump; a time that exists twice fires once, at its first occurrence.

:func:`due_ticks` decides which ticks a scheduler fires now (the missed-ticks policy);
:mod:`streamflow.scheduler` fires them exactly once across processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streamflow import extras
from streamflow.keys import NAME_PATTERN
from streamflow.protocol import check_headers

#: The header that carries a run's scheduled time (ISO 8601, UTC, milliseconds).
SCHEDULED_AT_HEADER = "streamflow-scheduled-at"
#: The header that carries the schedule's id.
SCHEDULE_HEADER = "streamflow-schedule"
#: A payload string equal to this is replaced by the run's scheduled time (ISO 8601, UTC).
SCHEDULED_AT_FIELD = "{scheduled_at}"
#: A payload string equal to this is replaced by the run's scheduled time in epoch ms.
SCHEDULED_MS_FIELD = "{scheduled_ms}"
#: The shortest interval: ticks closer together than the scheduler's poll would bunch up.
MIN_EVERY = 1.0
#: The longest interval (about ten years).
MAX_EVERY = 10 * 366 * 86400.0
#: The most missed ticks a schedule may catch up.
MAX_CATCH_UP = 1000
#: The largest stored definition read back from Redis, in bytes.
MAX_DEFINITION_BYTES = 64 * 1024

Overlap = Literal["allow", "skip"]


class Schedule(BaseModel):
    """A job published to a role at every tick of a cron expression or a fixed interval.

    Exactly one of ``cron`` and ``every`` is given, and exactly one of ``role`` and ``graph``.
    Validated when built, and again when read back from Redis (a stored definition is
    untrusted); a graph is checked when its task is submitted.

    Attributes:
        id: The schedule's name (letters, digits, ``_ . -``; at most 64 characters).
        role: The role its jobs go to.
        graph: Instead of ``role``: a DAG task graph (the JSON form of
            :class:`~streamflow.Graph`) submitted as a task at every tick, with ``payload`` as
            the task's params (an object, or None).
        cron: A cron expression: five fields, or six with seconds first
            (``*/10 * * * * *``: every ten seconds).
        every: Instead of ``cron``: seconds between ticks (at least 1), counted from the epoch.
        timezone: The IANA zone the cron expression's times are in (``Europe/Berlin``).
        payload: The job's payload. Any string in it equal to ``"{scheduled_at}"`` or
            ``"{scheduled_ms}"`` becomes the run's scheduled time (ISO 8601 UTC, or epoch ms).
        headers: Headers of every job (``ctx.headers``); the scheduler adds
            ``streamflow-schedule`` and ``streamflow-scheduled-at``.
        catch_up: Missed ticks: how many ticks before the latest due one still fire after a
            gap in which no scheduler ran (0: skip them; at most 1000).
        overlap: ``"allow"``: fire whatever the previous run does; ``"skip"``: skip a tick
            while the previous run is still queued or running.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    role: str | None = None
    graph: dict[str, Any] | None = None
    cron: str | None = Field(default=None, max_length=256)
    every: float | None = Field(default=None, ge=MIN_EVERY, le=MAX_EVERY)
    timezone: str = Field(default="UTC", max_length=64)
    payload: Any = None
    headers: dict[str, str] = Field(default_factory=dict)
    catch_up: int = Field(default=0, ge=0, le=MAX_CATCH_UP)
    overlap: Overlap = "allow"

    @field_validator("id", "role")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and NAME_PATTERN.fullmatch(value) is None:
            raise ValueError(
                "use 1-64 letters, digits, '_', '-' or '.', starting with one of the first two"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        return check_headers(value)

    @model_validator(mode="after")
    def _one_rule(self) -> Schedule:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of cron and every")
        if (self.role is None) == (self.graph is None):
            raise ValueError("give exactly one of role and graph")
        if self.graph is not None and not isinstance(self.payload, dict | None):
            raise ValueError("a task's params (the payload) must be an object")
        if self.every is not None and not math.isfinite(self.every):
            raise ValueError("every must be a finite number of seconds")
        if self.cron is not None:
            _cronsim(self.cron, datetime.now(UTC))  # raises on an invalid expression
        return self

    def to_json(self) -> bytes:
        """The definition as stored in Redis."""
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Schedule:
        """A definition read back from Redis.

        Raises:
            ValueError: Too large, not JSON, or not a valid schedule (pydantic's
                ``ValidationError`` is a ``ValueError``).
        """
        if len(raw) > MAX_DEFINITION_BYTES:
            raise ValueError(f"definition of {len(raw)} bytes (at most {MAX_DEFINITION_BYTES})")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        return cls.model_validate(data)

    @property
    def target(self) -> str:
        """Where its runs go: the role, or ``task`` for a graph."""
        return self.role if self.role is not None else "task"

    def describe(self) -> str:
        """The rule in one phrase: ``cron '0 3 * * *' Europe/Berlin`` or ``every 30s``."""
        if self.cron is not None:
            return f"cron {self.cron!r} {self.timezone}"
        return f"every {self.every:g}s"


def zone(name: str) -> ZoneInfo:
    """The time zone ``name``.

    Raises:
        ValueError: No such zone (or a name zoneinfo refuses, such as a path).
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def _cronsim(expr: str, start: datetime, *, reverse: bool = False) -> Any:
    cronsim = extras.require("schedules", "a cron schedule")
    try:
        return cronsim.CronSim(expr, start, reverse=reverse)
    except cronsim.CronSimError as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None


def _to_ms(moment: datetime) -> int:
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def _at(ms: int, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ms // 1000, UTC).astimezone(tz)


def next_tick(schedule: Schedule, after_ms: int) -> int:
    """The first tick strictly after ``after_ms`` (epoch ms)."""
    if schedule.every is not None:
        step = round(schedule.every * 1000)
        return (after_ms // step + 1) * step
    assert schedule.cron is not None
    # cronsim counts in whole seconds: start from the second that holds after_ms.
    it = _cronsim(schedule.cron, _at(after_ms, zone(schedule.timezone)))
    return _to_ms(next(it))


def due_ticks(schedule: Schedule, last_ms: int, now_ms: int, *, oldest_ms: int = 0) -> list[int]:
    """The ticks to fire now, oldest first: the missed-ticks policy.

    The due ticks are those after ``last_ms`` (the last tick fired or skipped) and not after
    ``now_ms``. The latest of them always fires, however late; of those before it, the
    ``catch_up`` latest fire too and the rest are skipped. Ticks before ``oldest_ms`` never
    fire (the scheduler passes the start of the dedup window, so that no tick can fire twice).

    Args:
        schedule: The schedule.
        last_ms: The last tick fired or skipped (epoch ms).
        now_ms: Now (epoch ms).
        oldest_ms: No tick before this fires.
    """
    wanted = schedule.catch_up + 1
    floor = max(last_ms, oldest_ms - 1)
    if schedule.every is not None:
        step = round(schedule.every * 1000)
        latest = now_ms // step * step
        ticks = [t for t in range(latest, latest - wanted * step, -step) if t > floor]
        return ticks[::-1]
    assert schedule.cron is not None
    # Backwards from the end of the current second: cronsim yields times strictly before it.
    start = _at(now_ms // 1000 * 1000 + 1000, zone(schedule.timezone))
    found: list[int] = []
    for moment in _cronsim(schedule.cron, start, reverse=True):
        tick = _to_ms(moment)
        if tick <= floor or len(found) == wanted:
            break
        if tick <= now_ms:
            found.append(tick)
    return found[::-1]


def skipped_count(schedule: Schedule, last_ms: int, first_fired_ms: int, *, limit: int) -> int:
    """How many ticks after ``last_ms`` and before ``first_fired_ms`` are skipped (up to limit).

    For the log line that says a gap's ticks were skipped.
    """
    count, tick = 0, last_ms
    while count < limit:
        tick = next_tick(schedule, tick)
        if tick >= first_fired_ms:
            break
        count += 1
    return count


def iso(ms: int) -> str:
    """Epoch ms as ISO 8601 in UTC with milliseconds: ``2026-03-29T01:00:00.000Z``."""
    moment = datetime.fromtimestamp(0, UTC) + timedelta(milliseconds=ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(payload: Any, tick_ms: int) -> Any:
    """The payload of the run at ``tick_ms``: template strings replaced by the scheduled time."""
    if payload == SCHEDULED_AT_FIELD:
        return iso(tick_ms)
    if payload == SCHEDULED_MS_FIELD:
        return tick_ms
    if isinstance(payload, Mapping):
        return {key: render(value, tick_ms) for key, value in payload.items()}
    if isinstance(payload, list):
        return [render(value, tick_ms) for value in payload]
    return payload


def run_id(schedule_id: str, tick_ms: int) -> str:
    """The message (or task) id of a schedule's run at ``tick_ms`` (the same everywhere)."""
    return f"sched.{schedule_id}.{tick_ms}"


def dedup_key(schedule_id: str, tick_ms: int) -> str:
    """The dedup key that makes the run at ``tick_ms`` publish at most once."""
    return f"schedule:{schedule_id}:{tick_ms}"
