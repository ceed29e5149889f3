"""Kept job outcomes: results of async and sync handlers, failures as typed errors, ``call``."""

from __future__ import annotations

import shlex
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from pydantic import BaseModel
from redis.asyncio import Redis

from streamflow import (
    App,
    Client,
    ConfigError,
    Context,
    Fatal,
    JobCancelledError,
    JobDeadLetteredError,
    JobExpiredError,
    ResultTimeoutError,
    SyncClient,
    Worker,
    results,
)
from streamflow.delivery import Outcome
from streamflow.keys import Keys
from streamflow.records import (
    FINAL_JOB_TYPES,
    JobResult,
    decode_lifecycle,
    json_schemas,
)
from tests.helpers import running, wait_for_query

pytestmark = pytest.mark.anyio


class Total(BaseModel):
    total: int


def results_app(started: anyio.Event | None = None) -> App:
    app = App()

    @app.role("kept", keep_result=60)
    async def kept(ctx: Context, payload: Any) -> Any:
        if payload == "fatal":
            raise Fatal("cannot do that")
        if payload == "big":
            return "x" * 300_000
        if payload == "set":
            return {1, 2}
        if payload == "wait":
            assert started is not None
            started.set()
            await ctx.cancel.wait_cancelled()
            return "stopped early"  # returned after a cancel: still cancelled
        return {"doubled": payload * 2, "attempt": ctx.attempt}

    @app.role("kept_sync", keep_result=timedelta(minutes=1))
    def kept_sync(ctx: Context, payload: Any) -> Total:
        return Total(total=sum(payload))

    @app.role("plain")
    async def plain(ctx: Context, payload: Any) -> Any:
        return payload + 1

    return app


def worker(app: App, redis: Redis, namespace: str) -> Worker:
    return Worker(app, redis, namespace=namespace, block_ms=100, max_message_bytes=200_000)


async def test_async_and_sync_handlers_results_are_kept_for_their_role(
    redis: Redis, namespace: str
) -> None:
    async with Client(redis, namespace=namespace) as client:
        a = await client.publish("kept", 21)
        b = await client.publish("kept_sync", [1, 2, 3])
        with anyio.fail_after(20):
            async with running(worker(results_app(), redis, namespace)):
                assert await client.result(a, timeout=10) == {"doubled": 42, "attempt": 1}
                assert await client.result(b, role="kept_sync", timeout=10) == {"total": 6}
        # Kept with the role's TTL (60 s), read with a plain GET.
        key = Keys(namespace).result("kept", a)
        assert 50_000 < await redis.pttl(key) <= 60_000
        record = JobResult.model_validate_json(await redis.get(key))
        assert (record.status, record.result, record.role) == (
            "succeeded",
            {"doubled": 42, "attempt": 1},
            "kept",
        )


async def test_a_plain_role_keeps_nothing_unless_the_publisher_asks(
    redis: Redis, namespace: str
) -> None:
    async with Client(redis, namespace=namespace) as client:
        not_kept = await client.publish("plain", 1)
        kept = await client.publish("plain", 2, keep_result=5)
        # A job that names a task, but is not one of its node's runs, is kept like any other.
        of_task = await client.publish("plain", 3, keep_result=5, task_id="t9")
        with anyio.fail_after(20):
            async with running(worker(results_app(), redis, namespace)):
                assert await client.result(kept, timeout=10) == 3
                assert await client.result(of_task, role="plain", timeout=10) == 4
                with pytest.raises(ResultTimeoutError) as info:
                    await client.result(not_kept, timeout=0.3)
        assert info.value.message_id == not_kept
        assert await redis.get(Keys(namespace).result("plain", not_kept)) is None
        assert 0 < await redis.pttl(Keys(namespace).result("plain", kept)) <= 5000


async def test_kept_outcomes_are_reported_and_told_like_plain_acks(
    redis: Redis, namespace: str
) -> None:
    """Kept outcomes go through the batched acker: each is still reported to ``on_outcome``
    and told as a lifecycle event, with its record in Redis by then."""
    keys = Keys(namespace)
    started = anyio.Event()
    outcomes: list[Outcome] = []
    async with Client(redis, namespace=namespace) as client:
        done = await client.publish_many("kept", [1, 2, 3])
        doomed = await client.publish("kept", "wait")
        app = results_app(started)
        w = Worker(app, redis, namespace=namespace, block_ms=100, on_outcome=outcomes.append)
        with anyio.fail_after(20):
            async with running(w):
                await started.wait()
                await client.cancel(doomed, target="message", reason="no longer")
                await wait_for_query(lambda: _stat(w, "cancelled"))
                await wait_for_query(lambda: _stat_at_least(w, "acked", 3))
        assert {(o.message_id, o.status) for o in outcomes} == {
            *((mid, "acked") for mid in done),
            (doomed, "cancelled"),
        }
        for mid in [*done, doomed]:
            assert await redis.exists(keys.result("kept", mid)) == 1
        events = [
            event
            for _, fields in await redis.xrange(keys.lifecycle())
            for event in decode_lifecycle(fields)[0]
        ]
        finals = {(e.message_id, e.type) for e in events if e.type in FINAL_JOB_TYPES}
        assert finals == {*((mid, "succeeded") for mid in done), (doomed, "cancelled")}


async def test_failures_are_raised_as_typed_errors(redis: Redis, namespace: str) -> None:
    async with Client(redis, namespace=namespace) as client:
        fatal = await client.publish("kept", "fatal")
        expired = await client.publish("kept", 1, deadline=timedelta(milliseconds=1))
        too_big = await client.publish("kept", "big")
        not_json = await client.publish("kept", "set")
        await anyio.sleep(0.01)  # the deadline passes before any worker reads it
        with anyio.fail_after(20):
            async with running(worker(results_app(), redis, namespace)):
                with pytest.raises(JobDeadLetteredError) as dead:
                    await client.result(fatal, timeout=10)
                with pytest.raises(JobExpiredError) as late:
                    await client.result(expired, timeout=10)
                with pytest.raises(JobDeadLetteredError) as big:
                    await client.result(too_big, timeout=10)
                with pytest.raises(JobDeadLetteredError) as odd:
                    await client.result(not_json, timeout=10)
        assert (dead.value.reason, dead.value.message_id) == ("fatal", fatal)
        assert "cannot do that" in dead.value.detail
        assert late.value.reason == "expired"
        # Over the limit (the worker's max message size): refused whole, never cut.
        assert big.value.reason == "result_too_large"
        assert "over the limit of 200000" in big.value.detail
        assert odd.value.reason == "invalid_result" and "not JSON" in odd.value.detail
        assert await client.dead_letter_count("kept") == 4


async def test_a_cancelled_job_raises_cancelled(redis: Redis, namespace: str) -> None:
    started = anyio.Event()
    async with Client(redis, namespace=namespace) as client:
        doomed = await client.publish("kept", "wait")
        with anyio.fail_after(20):
            async with running(worker(results_app(started), redis, namespace)):
                await started.wait()
                await client.cancel(doomed, target="message", reason="changed my mind")
                with pytest.raises(JobCancelledError) as info:
                    await client.result(doomed, timeout=10)
        assert "changed my mind" in info.value.detail


async def test_call_round_trips_and_times_out(redis: Redis, namespace: str) -> None:
    async with Client(redis, namespace=namespace) as client:
        with anyio.fail_after(20):
            with pytest.raises(ResultTimeoutError) as info:
                await client.call("plain", 1, timeout=0.2)  # no worker yet
            async with running(worker(results_app(), redis, namespace)):
                assert await client.call("plain", 41, timeout=10) == 42
                assert await client.call("kept", 5, timeout=10) == {"doubled": 10, "attempt": 1}
        # The timed-out call's job ran once a worker came, and its result was kept.
        assert await client.result(info.value.message_id, timeout=0) == 2


async def test_sync_client_result_and_call(redis: Redis, redis_url: str, namespace: str) -> None:
    outcome: dict[str, Any] = {}

    def sync_side() -> None:
        with SyncClient(redis_url, namespace=namespace) as client:
            outcome["call"] = client.call("kept_sync", [4, 5], timeout=10)
            mid = client.publish("kept", "fatal")
            try:
                client.result(mid, timeout=10)
            except JobDeadLetteredError as exc:
                outcome["error"] = exc.reason
            with pytest.raises(ResultTimeoutError):
                client.result("never-published", role="kept", timeout=0.1)

    with anyio.fail_after(30):
        async with running(worker(results_app(), redis, namespace)):
            await anyio.to_thread.run_sync(sync_side)
    assert outcome == {"call": {"total": 9}, "error": "fatal"}


def slow_app(gate: threading.Event) -> App:
    """Roles whose jobs end when ``gate`` is set: one tells events, one does not."""
    app = App()

    async def wait_for_gate(ctx: Context, payload: Any) -> Any:
        while not gate.is_set():
            await anyio.sleep(0.01)
        return payload

    app.role("told", keep_result=60)(wait_for_gate)
    app.role("untold", keep_result=60, events=False)(wait_for_gate)
    return app


@pytest.mark.slow
@pytest.mark.parametrize(
    ("role", "recheck", "watchers"),
    [
        ("told", 60.0, results.MAX_WATCHERS),  # woken by the final event, not the re-check
        ("untold", 0.2, results.MAX_WATCHERS),  # no event: the re-check finds it
        ("told", 60.0, 0),  # past the waiters that may watch: polls
    ],
)
async def test_a_long_wait_ends_on_the_final_event_or_the_recheck(
    redis: Redis,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    role: str,
    recheck: float,
    watchers: int,
) -> None:
    monkeypatch.setattr(results, "RECHECK", recheck)
    monkeypatch.setattr(results, "MAX_WATCHERS", watchers)
    gate = threading.Event()
    async with Client(redis, namespace=namespace) as client:
        mid = await client.publish(role, "done")
        with anyio.fail_after(20):
            async with running(worker(slow_app(gate), redis, namespace)):
                async with anyio.create_task_group() as tg:
                    got: list[Any] = []

                    async def wait() -> None:
                        got.append(await client.result(mid, role=role, timeout=30))

                    tg.start_soon(wait)
                    await anyio.sleep(0.5)  # past the quick polls: waiting on events now
                    assert got == []
                    gate.set()
                    with anyio.fail_after(5):  # well before the 60 s re-check
                        while not got:
                            await anyio.sleep(0.01)
                assert got == ["done"]
                assert results._watchers.get(redis, 0) == 0


async def test_a_result_is_readable_with_plain_redis_cli(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    async with Client(redis, namespace=namespace) as client:
        mid = await client.publish("kept", 3)
        with anyio.fail_after(20):
            async with running(worker(results_app(), redis, namespace)):
                await client.result(mid, timeout=10)
    # As docs/protocol.md says: GET <namespace>:{role:<role>}:result:<message id>.
    key = f"{namespace}:{{role:kept}}:result:{mid}"
    done = await anyio.run_process(["redis-cli", "-u", redis_url, "GET", key])
    doc = orjson.loads(done.stdout)
    assert doc["status"] == "succeeded" and doc["result"] == {"doubled": 6, "attempt": 1}
    assert doc["kind"] == "result" and doc["protocol"] == 1
    assert set(doc) <= set(json_schemas()["result"]["properties"])


async def test_task_ids_still_give_the_task_results(redis: Redis, namespace: str) -> None:
    """``result`` of an id that names no task is a job's; a task's keeps its old meaning."""
    async with Client(redis, namespace=namespace) as client:
        await redis.hset(Keys(namespace).task_state("t1"), "v", 1)
        with pytest.raises(LookupError, match="unknown task"):
            await client.result("t1")  # a task id, with no spec: the task path


def test_keep_result_is_bounded(redis_url: str, namespace: str) -> None:
    app = App()
    with pytest.raises(ConfigError, match="30 days"):
        app.role("r", keep_result=timedelta(days=31))
    with (
        SyncClient(redis_url, namespace=namespace) as client,
        pytest.raises(ValueError, match="30 days"),
    ):
        client.publish("r", 1, keep_result=0, strict=False)


async def test_a_worker_that_lost_the_entry_writes_no_result(redis: Redis, namespace: str) -> None:
    """The fence: result.lua refuses when another consumer owns the entry (see test_scripts)."""
    keys = Keys(namespace)
    gate = threading.Event()
    app = App()

    @app.role("slow", keep_result=60)
    async def slow(ctx: Context, payload: Any) -> str:
        while not gate.is_set():
            await anyio.sleep(0.01)
        return "late"

    async with Client(redis, namespace=namespace) as client:
        mid = await client.publish("slow", 1)
        w = Worker(app, redis, namespace=namespace, block_ms=100, consumer="w1")
        with anyio.fail_after(20):
            async with running(w):
                stream = keys.role_stream("slow")

                async def held() -> bool:
                    return bool((await redis.xpending(stream, "workers"))["pending"])

                await wait_for_query(held)
                # Another consumer takes the entry over (as an adoption after a lost lease).
                entry = (await redis.xrange(stream))[0][0]
                await redis.xclaim(stream, "workers", "thief", 0, [entry])
                gate.set()
                await wait_for_query(lambda: _stat(w, "lost"))
        assert await redis.get(keys.result("slow", mid)) is None


async def _stat(w: Worker, name: str) -> bool:
    return bool(getattr(w.statistics(), name))


async def _stat_at_least(w: Worker, name: str, count: int) -> bool:
    return int(getattr(w.statistics(), name)) >= count


def test_the_protocol_page_s_result_example_is_the_key_and_json_a_worker_writes() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    block = page.split("<!-- results-example -->\n```console\n", 1)[1].split("```", 1)[0]
    command, value = block.splitlines()[:2]
    assert shlex.split(command) == [
        "$",
        "redis-cli",
        "GET",
        Keys("sf").result("resize", "job-42"),
    ]
    record = JobResult.model_validate_json(value)
    assert (record.status, record.result) == ("succeeded", {"url": "thumbs/cat.png"})
