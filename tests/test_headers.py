"""Job headers: set by every publisher, read by handlers as ``ctx.headers``, bounded on the wire."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from redis.asyncio import Redis

from streamflow import App, Client, Context, SyncClient, hostile
from streamflow.delivery import Outcome
from streamflow.keys import Keys
from streamflow.protocol import (
    MAX_HEADER_VALUE,
    MAX_HEADERS,
    PROTOCOL_VERSION,
    decode_job,
    now_ms,
)
from tests.helpers import make_worker, run_cli, running, wait_until

pytestmark = pytest.mark.anyio

TRACE = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


def _recording_app(seen: dict[str, dict[str, str]]) -> App:
    app = App()

    @app.role("traced")
    async def traced(ctx: Context, payload: Any) -> None:
        with pytest.raises(TypeError):
            ctx.headers["x"] = "y"  # type: ignore[index]  # read-only
        seen[ctx.message_id] = dict(ctx.headers)

    return app


@pytest.mark.slow
async def test_headers_round_trip_from_async_sync_bulk_and_cli(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    seen: dict[str, dict[str, str]] = {}
    both = {**TRACE, "correlation-id": "order-42"}
    client = Client(redis, namespace=namespace)
    # The first publish caches the role's layout: later ones may take the one-round-trip path,
    # which must not drop headers.
    plain = await client.publish("traced", 2)
    one = await client.publish("traced", 1, headers=both)
    many = await client.publish_many("traced", [3, 4], headers={"batch": "b1"})
    # On the wire: a job without headers has no headers field at all.
    entries = await redis.xrange(Keys(namespace).role_stream("traced"))
    carried = [b'"headers"' in fields[b"message"] for _, fields in entries]
    assert carried == [False, True, True, True]
    with SyncClient(redis_url, namespace=namespace) as sync:
        blocking_plain = sync.publish("traced", 8)  # caches the layout first
        blocking = sync.publish("traced", 5, headers={"from": "sync"})
        blocking_many = sync.publish_many("traced", [6], headers={"from": "sync-many"})
    done = run_cli(
        "publish", "traced", "--json", "7", "--header", "from=cli", "--header", "eq=a=b",
        "--redis-url", redis_url, "--namespace", namespace,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from_cli = done.stdout.strip()

    async with running(make_worker(_recording_app(seen), redis, namespace)):
        await wait_until(lambda: len(seen) == 8)
    assert seen == {
        one: both,
        plain: {},
        many[0]: {"batch": "b1"},
        many[1]: {"batch": "b1"},
        blocking_plain: {},
        blocking: {"from": "sync"},
        blocking_many[0]: {"from": "sync-many"},
        from_cli: {"from": "cli", "eq": "a=b"},
    }


@pytest.mark.parametrize(
    ("headers", "rule"),
    [
        ({f"h{i}": "v" for i in range(MAX_HEADERS + 1)}, "at most 64 items"),
        ({"with space": "v"}, "should match pattern"),
        ({"": "v"}, "at least 1 character"),
        ({"big": "x" * (MAX_HEADER_VALUE + 1)}, "at most 4096 characters"),
        ({f"h{i}": "x" * 4000 for i in range(5)}, "limit 16384"),
        ({"n": 1}, "valid string"),
    ],
)
async def test_publish_refuses_headers_over_the_limits_before_writing(
    redis: Redis, redis_url: str, namespace: str, headers: dict[str, Any], rule: str
) -> None:
    client = Client(redis, namespace=namespace)
    with pytest.raises(ValueError, match=rule):
        await client.publish("traced", 1, headers=headers)
    with pytest.raises(ValueError, match=rule):
        await client.publish_many("traced", [1], headers=headers)
    with SyncClient(redis_url, namespace=namespace) as sync, pytest.raises(ValueError, match=rule):
        sync.publish("traced", 1, headers=headers)
    assert await redis.xlen(Keys(namespace).role_stream("traced")) == 0


@pytest.mark.slow
def test_cli_refuses_bad_headers_with_one_line(redis_url: str, namespace: str) -> None:
    common = ("--redis-url", redis_url, "--namespace", namespace)
    no_value = run_cli("publish", "traced", "--json", "1", "--header", "novalue", *common)
    assert no_value.returncode == 2
    assert "--header 'novalue': give NAME=VALUE" in no_value.stderr
    bad_name = run_cli("publish", "traced", "--json", "1", "--header", "a b=c", *common)
    assert bad_name.returncode == 2 and "Traceback" not in bad_name.stderr
    assert "invalid headers" in bad_name.stderr


def _raw_job(headers: Any) -> bytes:
    doc = {
        "protocol": PROTOCOL_VERSION,
        "kind": "job",
        "id": "raw-1",
        "role": "traced",
        "payload": None,
        "created_at_ms": now_ms(),
        "headers": headers,
    }
    return orjson.dumps(doc)


async def test_raw_entries_with_headers_over_the_limits_are_dead_lettered(
    redis: Redis, namespace: str
) -> None:
    stream = Keys(namespace).role_stream("traced")
    bad = {
        "count": _raw_job({f"h{i}": "v" for i in range(MAX_HEADERS + 1)}),
        "value": _raw_job({"big": "x" * (MAX_HEADER_VALUE + 1)}),
        "type": _raw_job({"n": 1}),
        "shape": _raw_job(["not", "a", "map"]),
        # A header name written twice: which value wins depends on the parser.
        "twice": _raw_job({"a": "1", "b": "2"}).replace(b'"b"', b'"a"'),
    }
    entry_of = {}
    for name, raw in bad.items():
        entry_of[name] = (await redis.xadd(stream, {"message": raw})).decode()
    good = (await redis.xadd(stream, {"message": _raw_job(TRACE)})).decode()
    outcomes: list[Outcome] = []
    seen: dict[str, dict[str, str]] = {}
    async with running(make_worker(_recording_app(seen), redis, namespace, outcomes)):
        await wait_until(lambda: len(outcomes) == len(bad) + 1)
    reasons = {o.entry_id: (o.status, o.reason) for o in outcomes}
    assert reasons[good] == ("acked", None)
    assert seen == {"raw-1": TRACE}
    expected = {name: "invalid_message" for name in bad} | {"twice": "invalid_json"}
    assert {name: reasons[entry_of[name]] for name in bad} == {
        name: ("dead_lettered", reason) for name, reason in expected.items()
    }


def test_headers_decode_on_the_fast_path_without_the_full_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers = {**TRACE, "key:with:colons": "value: with colons and spaces"}
    raws = [_raw_job(headers), _raw_job({}), _raw_job(TRACE)]
    twice = _raw_job({"a": "1", "b": "2"}).replace(b'"b"', b'"a"')

    def full_check(raw: bytes, what: str = "message") -> None:
        raise AssertionError(f"the full check ran for {raw!r}")

    monkeypatch.setattr(hostile, "check", full_check)
    assert [decode_job({b"message": raw}).headers for raw in raws] == [headers, {}, TRACE]
    # A header name written twice is what sends a job with headers to the full check.
    with pytest.raises(AssertionError, match="the full check ran"):
        decode_job({b"message": twice})


async def test_a_context_made_by_hand_has_empty_headers() -> None:
    ctx = Context("m", "1-0", "r", 1, "c", 0)
    assert dict(ctx.headers) == {}
    with pytest.raises(RuntimeError, match="made by a worker"):
        await ctx.publish("r", 1)
    await anyio.lowlevel.checkpoint()
