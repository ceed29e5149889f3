"""Job status (``Client.job``, ``streamflow job``) in every state, and results across a crash."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from streamflow import App, Client, Context, Fatal, Retry, SyncClient, Worker, connect
from streamflow.cli.jobs import describe
from streamflow.jobs import JobStatus
from streamflow.keys import JOB_PROGRESS, Keys
from streamflow.ops.server import RedisServer
from streamflow.records import JobResult
from tests.helpers import run_cli, running, wait_for, wait_for_query
from tests.processes import Record, Workers

pytestmark = pytest.mark.anyio


def status_app(gate: threading.Event) -> App:
    app = App()

    @app.role("plain")
    async def plain(ctx: Context, payload: Any) -> Any:
        if payload == "fatal":
            raise Fatal("no way")
        if payload == "retry":
            raise Retry("later", delay=60)
        if payload == "hold":
            while not gate.is_set():
                await anyio.sleep(0.01)
        return payload

    @app.role("kept", keep_result=60)
    async def kept(ctx: Context, payload: Any) -> Any:
        return {"echo": payload}

    return app


async def test_status_in_every_state(redis: Redis, namespace: str) -> None:
    gate = threading.Event()
    async with Client(redis, namespace=namespace) as client:
        unknown = await client.job("never-published")
        assert (unknown.state, unknown.ended) == ("unknown", False)
        queued_id = await client.publish("plain", "hold")
        queued = await client.job(queued_id, role="plain")
        assert (queued.state, queued.attempt, queued.role) == ("queued", 1, "plain")
        # A retry due at once waits in the stream, as attempt 2 (a raw entry, no worker yet).
        again = {"protocol": 1, "kind": "job", "id": "again-1", "role": "plain", "attempt": 2}
        await redis.xadd(
            Keys(namespace).role_stream("plain"),
            {"message": orjson.dumps({**again, "created_at_ms": 1, "payload": 0})},
        )
        due_now = await client.job("again-1")
        assert (due_now.state, due_now.attempt, due_now.due_at_ms) == ("retrying", 2, None)
        delayed_id = await client.publish("plain", 1, delay=timedelta(minutes=5))
        delayed = await client.job(delayed_id, role="plain")
        assert delayed.state == "delayed" and delayed.due_at_ms is not None
        expired_id = await client.publish("plain", 1, deadline=timedelta(milliseconds=1))
        await anyio.sleep(0.01)
        ids = {p: await client.publish("plain", p) for p in ("fatal", "retry", "ack")}
        kept_id = await client.publish("kept", 7)
        w = Worker(status_app(gate), redis, namespace=namespace, block_ms=100, consumer="w1")
        with anyio.fail_after(30):
            async with running(w):

                async def state_of(mid: str, state: str) -> bool:
                    return (await client.job(mid)).state == state

                await wait_for_query(lambda: state_of(queued_id, "running"))
                run = await client.job(queued_id)
                assert (run.consumer, run.worker_alive, run.deliveries) == ("w1", True, 1)
                assert run.lease_age_ms is not None and run.lease_age_ms >= 0
                await wait_for_query(lambda: state_of(ids["retry"], "retrying"))
                retrying = await client.job(ids["retry"])
                assert retrying.attempt == 2 and retrying.due_at_ms is not None
                await wait_for_query(lambda: state_of(kept_id, "succeeded"))
                await wait_for_query(lambda: state_of(ids["fatal"], "failed"))
                await wait_for_query(lambda: state_of(expired_id, "expired"))
                gate.set()
                await wait_for_query(lambda: state_of(queued_id, "unknown"))
        succeeded = await client.job(kept_id)
        assert (succeeded.kept, succeeded.result, succeeded.consumer) == (True, {"echo": 7}, "w1")
        failed = await client.job(ids["fatal"])
        assert (failed.reason, failed.kept) == ("fatal", False)
        assert "no way" in (failed.detail or "")
        # Acknowledged without a kept outcome: nothing is left in Redis.
        assert (await client.job(ids["ack"])).state == "unknown"
        await client.cancel(delayed_id, target="message")
        cancelled = await client.job(delayed_id, role="plain")
        # The cancel marker says so while the job still waits in the schedule: the schedule
        # comes first (it has not been refused yet), then the marker once it is gone.
        assert cancelled.state == "delayed"
        await redis.delete(Keys(namespace).delayed("plain"))
        assert (await client.job(delayed_id)).state == "cancelled"
        for found in (queued, due_now, delayed, run, retrying, succeeded, failed, unknown):
            assert describe(found).startswith(f"job {found.message_id}")
            orjson.dumps(found.to_json())


def test_job_command_output_and_exit_codes(redis_url: str, namespace: str) -> None:
    conn = ["--redis-url", redis_url, "--namespace", namespace]
    done = run_cli("job", "nope", *conn)
    assert done.returncode == 3 and "unknown" in done.stdout
    with SyncClient(redis_url, namespace=namespace) as client:
        mid = client.publish("plain", 1)
        key = Keys(namespace).result("plain", "by-hand")
        record = JobResult(
            protocol=1,
            kind="result",
            message_id="by-hand",
            role="plain",
            status="dead_lettered",
            reason="failed",
            detail="boom",
            consumer="w9",
            finished_at_ms=1,
        )
        client.redis.set(key, record.model_dump_json())
    done = run_cli("job", mid, "--role", "plain", *conn)
    assert done.returncode == 0 and f"job {mid} (role plain): queued" in done.stdout
    done = run_cli("job", mid, "--json", *conn)
    doc = orjson.loads(done.stdout)
    assert (done.returncode, doc["state"], doc["message_id"]) == (0, "queued", mid)
    done = run_cli("job", mid, "--wait", "--timeout", "0.3", *conn)
    assert done.returncode == 1 and "queued" in done.stdout
    done = run_cli("job", "by-hand", "--wait", *conn)
    assert done.returncode == 1 and "failed (failed): boom" in done.stdout


# -- a worker killed while it runs a job whose result is kept -----------------------------------


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, namespace: str) -> Iterator[tuple[Workers, Record]]:
    record = Record(tmp_path / "record.txt")
    started = Workers(tmp_path, redis_url, namespace, record.path)
    try:
        yield started, record
    finally:
        started.kill_all()


@pytest.mark.redis
def test_result_after_the_worker_running_it_was_killed_is_the_rerun_s_once(
    workers: tuple[Workers, Record], redis_url: str, namespace: str
) -> None:
    procs, record = workers
    keys = Keys(namespace)
    first = procs.start("w1", roles=["kept_work"])
    first.wait_ready()
    with SyncClient(redis_url, namespace=namespace) as client:
        mid = client.publish("kept_work", {"seconds_by_consumer": {"w1": 60}})
        wait_for(lambda: record.ids("START", "w1") == {mid}, 20, "w1 starts the job")
        running_on = anyio.run(_status, redis_url, namespace, mid)
        assert (running_on.state, running_on.consumer, running_on.worker_alive) == (
            "running",
            "w1",
            True,
        )
        first.kill()
        plain = sync_redis.Redis.from_url(redis_url)
        wait_for(lambda: not plain.exists(keys.consumer_alive("w1")), 10, "w1's name expires")
        dead = anyio.run(_status, redis_url, namespace, mid)
        assert (dead.state, dead.consumer, dead.worker_alive) == ("running", "w1", False)
        procs.start("w2", roles=["kept_work"]).wait_ready()
        assert client.result(mid, timeout=20) == {"consumer": "w2", "attempt": 1}
    assert record.counts("DONE")[mid] == 1 and record.ids("DONE", "w2") == {mid}
    ended = anyio.run(_status, redis_url, namespace, mid)
    assert (ended.state, ended.consumer) == ("succeeded", "w2")
    plain.close()


async def _status(redis_url: str, namespace: str, message_id: str) -> JobStatus:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        return await client.job(message_id)


def test_publish_keep_result_then_job_wait_succeeds(
    workers: tuple[Workers, Record], redis_url: str, namespace: str
) -> None:
    conn = ["--redis-url", redis_url, "--namespace", namespace]
    done = run_cli("publish", "work", "--json", "{}", "--keep-result", "60", *conn)
    assert done.returncode == 0, done.stderr
    mid = done.stdout.strip()
    bad = run_cli("publish", "work", "--json", "{}", "--keep-result", "0", *conn)
    assert bad.returncode == 2 and "--keep-result" in bad.stderr
    procs, _ = workers
    procs.start("w1", roles=["work"]).wait_ready()
    done = run_cli("job", mid, "--wait", "--timeout", "30", "--json", *conn)
    doc = orjson.loads(done.stdout)
    assert (done.returncode, doc["state"], doc["kept"], doc["result"]) == (
        0,
        "succeeded",
        True,
        None,
    )


# -- a running job's progress and headers ---------------------------------------------------------


def progress_app(gate: threading.Event) -> App:
    app = App()

    @app.role("work")
    async def work(ctx: Context, payload: Any) -> Any:
        if payload == "report":
            await ctx.progress(40, message="copying")
        while not gate.is_set():
            await anyio.sleep(0.01)
        return payload

    return app


@pytest.mark.slow
async def test_running_job_shows_its_latest_progress_and_headers(
    private_redis: Callable[..., RedisServer], namespace: str
) -> None:
    server = private_redis()
    redis_url = server.url
    gate = threading.Event()
    keys = Keys(namespace)
    redis = connect.connect(redis_url)
    # Every SET and DEL of a progress key, to count them (none for runs that report none).
    await redis.config_set("notify-keyspace-events", "Kg$")
    listener = redis.pubsub()
    await listener.psubscribe(f"__keyspace@0__:{namespace + ':' + JOB_PROGRESS.pattern}")
    try:
        async with Client(redis, namespace=namespace) as client:
            quiet = await client.publish("work", "quiet", headers={"trace": "t-1"})
            reporting = await client.publish("work", "report", headers={"who": "me"})
            w = Worker(progress_app(gate), redis, namespace=namespace, block_ms=100, consumer="w1")
            with anyio.fail_after(30):
                async with running(w):

                    async def reported() -> bool:
                        return (await client.job(reporting)).progress is not None

                    await wait_for_query(reported)
                    found = await client.job(reporting)
                    assert (found.state, found.progress, found.progress_message) == (
                        "running",
                        40,
                        "copying",
                    )
                    assert found.progress_at_ms is not None and found.headers == {"who": "me"}
                    assert "progress: 40 copying" in describe(found)
                    assert "headers: who=me" in describe(found)
                    done = await anyio.to_thread.run_sync(
                        lambda: run_cli(
                            "job",
                            reporting,
                            "--json",
                            "--redis-url",
                            redis_url,
                            "--namespace",
                            namespace,
                        )
                    )
                    doc = orjson.loads(done.stdout)
                    assert (doc["state"], doc["progress"], doc["progress_message"]) == (
                        "running",
                        40,
                        "copying",
                    )
                    assert doc["headers"] == {"who": "me"} and doc["progress_at_ms"] > 0
                    await wait_for_query(lambda: _state(client, quiet, "running"))
                    silent = await client.job(quiet)
                    assert silent.progress is None and silent.headers == {"trace": "t-1"}
                    assert "progress_at_ms" not in silent.to_json()
                    gate.set()
                    await wait_for_query(lambda: _state(client, reporting, "unknown"))
                    await wait_for_query(lambda: _state(client, quiet, "unknown"))
                    # The run's end deleted its progress key (in its events' round trip).
                    await wait_for_query(lambda: _gone(redis, keys.job_progress(reporting)))
            seen = await _notifications(listener)
        # One SET PX by the run that reported, one DEL at its end; nothing for the quiet one.
        key = keys.job_progress(reporting)
        assert seen == [(key, "set"), (key, "expire"), (key, "del")]
    finally:
        await listener.aclose()
        await redis.aclose()


async def _state(client: Client, message_id: str, state: str) -> bool:
    return (await client.job(message_id)).state == state


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def _notifications(listener: Any) -> list[tuple[str, str]]:
    """The keyspace notifications received so far: (key, event)."""
    seen = []
    while (message := await listener.get_message(timeout=0.2)) is not None:
        if message["type"] == "pmessage":
            channel = message["channel"].decode().split(":", 1)[1]
            seen.append((channel, message["data"].decode()))
    return seen
