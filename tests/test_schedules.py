"""Pure tests of schedules: definitions, next and due ticks; fixed clocks, no Redis, no sleeps."""

from __future__ import annotations

import itertools
from datetime import datetime
from zoneinfo import ZoneInfo

import orjson
import pytest

from streamflow.schedules import (
    Schedule,
    dedup_key,
    due_ticks,
    iso,
    next_tick,
    render,
    run_id,
    skipped_count,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def at(year: int, month: int, day: int, hour: int, minute: int = 0, *, tz: ZoneInfo) -> int:
    return ms(datetime(year, month, day, hour, minute, tzinfo=tz))


def test_interval_ticks_are_multiples_of_the_interval_since_the_epoch() -> None:
    every = Schedule(id="s", role="r", every=30)
    assert next_tick(every, 0) == 30_000
    assert next_tick(every, 29_999) == 30_000
    assert next_tick(every, 30_000) == 60_000


def test_cron_ticks_follow_the_time_zone() -> None:
    daily = Schedule(id="s", role="r", cron="0 9 * * *", timezone="America/New_York")
    start = at(2026, 1, 5, 12, tz=BERLIN)  # 06:00 in New York
    assert next_tick(daily, start) == at(2026, 1, 5, 9, tz=NEW_YORK)


def test_a_time_skipped_by_dst_fires_once_right_after_the_jump() -> None:
    # Berlin, 2026-03-29: clocks go from 02:00 to 03:00; 02:30 does not exist that day.
    nightly = Schedule(id="s", role="r", cron="30 2 * * *", timezone="Europe/Berlin")
    first = next_tick(nightly, at(2026, 3, 28, 12, tz=BERLIN))
    second = next_tick(nightly, first)
    assert first == at(2026, 3, 29, 3, tz=BERLIN)
    assert second == at(2026, 3, 30, 2, 30, tz=BERLIN)
    # The day is 23 hours long: the ticks are 23.5 h apart, not 24.
    assert second - first == 23.5 * 3600 * 1000


def test_a_time_repeated_by_dst_fires_once() -> None:
    # Berlin, 2026-10-25: clocks go from 03:00 back to 02:00; 02:30 happens twice.
    nightly = Schedule(id="s", role="r", cron="30 2 * * *", timezone="Europe/Berlin")
    ticks = [next_tick(nightly, at(2026, 10, 24, 12, tz=BERLIN))]
    ticks.append(next_tick(nightly, ticks[0]))
    assert ticks[0] == ms(datetime(2026, 10, 25, 2, 30, fold=0, tzinfo=BERLIN))
    assert ticks[1] == at(2026, 10, 26, 2, 30, tz=BERLIN)  # not the second 02:30
    # due_ticks over the whole night agrees with next_tick.
    assert due_ticks(nightly, at(2026, 10, 25, 0, tz=BERLIN), at(2026, 10, 25, 5, tz=BERLIN)) == [
        ticks[0]
    ]


def test_hourly_cron_over_the_autumn_change_counts_wall_clock_hours() -> None:
    hourly = Schedule(id="s", role="r", cron="0 * * * *", timezone="Europe/Berlin", catch_up=10)
    start, end = at(2026, 10, 25, 0, tz=BERLIN), at(2026, 10, 25, 4, tz=BERLIN)
    ticks = due_ticks(hourly, start, end)
    assert ticks == sorted(set(ticks)) and ticks[-1] == end
    assert all(next_tick(hourly, a) == b for a, b in itertools.pairwise(ticks))


def test_the_latest_due_tick_fires_and_missed_ones_are_skipped_by_default() -> None:
    every = Schedule(id="s", role="r", every=10)
    assert due_ticks(every, last_ms=0, now_ms=95_000) == [90_000]
    assert skipped_count(every, 0, 90_000, limit=100) == 8
    assert due_ticks(every, last_ms=90_000, now_ms=99_999) == []


def test_catch_up_fires_up_to_n_missed_ticks_oldest_first() -> None:
    every = Schedule(id="s", role="r", every=10, catch_up=3)
    assert due_ticks(every, last_ms=0, now_ms=95_000) == [60_000, 70_000, 80_000, 90_000]
    assert due_ticks(every, last_ms=70_000, now_ms=95_000) == [80_000, 90_000]
    cron = Schedule(id="s", role="r", cron="*/10 * * * * *", catch_up=2)
    assert due_ticks(cron, last_ms=0, now_ms=95_500) == [70_000, 80_000, 90_000]


def test_no_tick_before_the_oldest_allowed_fires() -> None:
    every = Schedule(id="s", role="r", every=10, catch_up=5)
    assert due_ticks(every, 0, 95_000, oldest_ms=80_000) == [80_000, 90_000]


def test_the_scheduled_time_fills_payload_templates() -> None:
    payload = {"at": "{scheduled_at}", "ms": "{scheduled_ms}", "keep": ["x", 1, "{other}"]}
    assert render(payload, 1_000) == {
        "at": "1970-01-01T00:00:01.000Z",
        "ms": 1_000,
        "keep": ["x", 1, "{other}"],
    }
    assert iso(at(2026, 3, 29, 3, tz=BERLIN)) == "2026-03-29T01:00:00.000Z"


def test_a_tick_has_one_message_id_and_one_dedup_key() -> None:
    assert run_id("nightly", 5) == "sched.nightly.5"
    assert dedup_key("nightly", 5) == "schedule:nightly:5"


def test_a_definition_round_trips_through_json() -> None:
    schedule = Schedule(
        id="s", role="r", cron="0 3 * * *", timezone="Europe/Berlin", payload={"a": 1}
    )
    assert Schedule.from_json(schedule.to_json()) == schedule


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"role": "r"}, "exactly one of cron and every"),
        ({"every": 60}, "exactly one of role and graph"),
        ({"every": 60, "role": "r", "graph": {"nodes": []}}, "exactly one of role and graph"),
        ({"every": 60, "graph": {"nodes": []}, "payload": [1]}, "must be an object"),
        ({"role": "r", "cron": "* * * * *", "every": 5}, "exactly one of cron and every"),
        ({"role": "r", "cron": "61 * * * *"}, "invalid cron expression"),
        ({"role": "r", "every": 0.5}, "greater than or equal to 1"),
        ({"role": "r", "every": 60, "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"role": "r", "every": 60, "timezone": "../../etc/passwd"}, "unknown time zone"),
        ({"role": "r:x", "every": 60}, "1-64 letters"),
        ({"role": "r\n", "every": 60}, "1-64 letters"),
        ({"role": "r", "every": 60, "catch_up": 10**6}, "less than or equal"),
        ({"role": "r", "every": 60, "overlap": "queue"}, "'allow' or 'skip'"),
        ({"role": "r", "every": 60, "extra": 1}, "Extra inputs"),
        ({"role": "r", "every": 60, "headers": {"a": 1}}, "valid string"),
        ({"role": "r", "every": 60, "headers": {"a b": "c"}}, "invalid headers"),
    ],
)
def test_invalid_definitions_are_refused(fields: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Schedule.from_json(orjson.dumps({"id": "s", **fields}))


@pytest.mark.parametrize("raw", [b"not json", b"[1]", b"{" * 10, b"x" * 70_000])
def test_garbage_is_refused_as_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Schedule.from_json(raw)
