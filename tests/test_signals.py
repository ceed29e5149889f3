"""Cancel (streamflow/signals.py, ``Client.cancel``, ``ctx.cancel``), on a real redis-server.

Through the signals stream and the persistent markers: queued, running, delayed and adopted
messages, tasks, raw XADD signals from outside, the CLI's ``cancel``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis as redis_sync
from redis import exceptions as redis_exceptions
from redis.asyncio import Redis

from streamflow import App, Client, Context, Retry, SyncClient, streams
from streamflow.context import Cancelled
from streamflow.delivery import Outcome
from streamflow.errors import CancelledIdWarning, UnknownTargetError
from streamflow.keys import GROUP, Keys
from streamflow.signals import CancelBook, SignalListener
from tests.helpers import ROOT, last_statuses, make_worker, run_cli, running, wait_until

pytestmark = pytest.mark.anyio


async def test_a_cooperative_handler_observes_cancel_quickly_and_cleans_up(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started, cleaned = anyio.Event(), []
    observed_after: list[float] = []

    @app.role("long")
    async def long(ctx: Context, payload: Any) -> None:
        started.set()
        try:
            await ctx.cancel.wait_cancelled()
            observed_after.append(time.monotonic())
            ctx.cancel.raise_if_cancelled()
        finally:
            cleaned.append(ctx.cancel.reason)

    client = Client(redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            message_id = await client.publish("long", task_id="t1")
            await started.wait()
            sent = time.monotonic()
            await client.cancel("t1", target="task", reason="user asked")
            await wait_until(lambda: outcomes)
    assert observed_after[0] - sent < 1.0
    assert cleaned == ["user asked"]
    assert last_statuses(outcomes) == {message_id: "cancelled"}
    assert await redis.xlen(Keys(namespace).role_stream("long")) == 0


async def test_a_handler_that_ignores_cancel_is_hard_cancelled_after_the_grace(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started, cleaned = anyio.Event(), []

    @app.role("stubborn", cancel_grace=0.2)
    async def stubborn(ctx: Context, payload: Any) -> None:
        if payload == "other":
            return
        started.set()
        try:
            await anyio.sleep(60)
        finally:
            cleaned.append(True)

    client = Client(redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            stuck = await client.publish("stubborn", "x")
            await started.wait()
            await client.cancel(stuck, target="message")
            await wait_until(lambda: len(outcomes) == 1)
            other = await client.publish("stubborn", "other")  # the worker keeps serving
            await wait_until(lambda: len(outcomes) == 2)
    assert cleaned == [True]
    assert last_statuses(outcomes) == {stuck: "cancelled", other: "acked"}


def recording_app() -> tuple[App, list[str]]:
    """An app whose role ``r`` records the message id of every job it runs (in the list)."""
    app = App()
    ran: list[str] = []

    @app.role("r")
    async def handler(ctx: Context, payload: Any) -> None:
        ran.append(ctx.message_id)

    return app, ran


async def test_a_queued_message_cancelled_before_it_is_read_never_starts(
    redis: Redis, namespace: str
) -> None:
    app, ran = recording_app()
    client = Client(redis, namespace=namespace)
    doomed = await client.publish("r", 1)
    kept = await client.publish("r", 2)
    # Sent while no worker runs: the marker makes a worker started later honour it.
    await client.cancel(doomed, target="message")
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            await wait_until(lambda: len(outcomes) == 2)
    assert ran == [kept]
    assert last_statuses(outcomes) == {doomed: "cancelled", kept: "acked"}


@pytest.mark.slow
async def test_a_message_waiting_for_a_retry_is_not_retried_after_cancel(
    redis: Redis, namespace: str
) -> None:
    app = App()
    attempts: list[int] = []

    @app.role("flaky")
    async def flaky(ctx: Context, payload: Any) -> None:
        attempts.append(ctx.attempt)
        raise Retry(delay=0.5)

    client = Client(redis, namespace=namespace)
    outcomes: list[Outcome] = []
    keys = Keys(namespace)
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            message_id = await client.publish("flaky", task_id="job7")
            await wait_until(lambda: [o.status for o in outcomes] == ["retried"])
            await client.cancel("job7", target="task")
            await wait_until(lambda: len(outcomes) == 2)
    assert attempts == [1]
    assert [o.status for o in outcomes] == ["retried", "cancelled"]
    assert outcomes[1].message_id == message_id
    assert await redis.zcard(keys.delayed("flaky")) == 0


@pytest.mark.slow
async def test_an_adopted_entry_of_a_dead_worker_is_not_restarted_after_cancel(
    redis: Redis, namespace: str
) -> None:
    app, ran = recording_app()
    keys = Keys(namespace)
    stream = keys.role_stream("r")
    await streams.ensure_group(redis, stream)
    client = Client(redis, namespace=namespace)
    message_id = await client.publish("r", 1)
    await streams.read_group(redis, stream, "dead-worker", count=1, block_ms=None)
    await client.cancel(message_id)
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            await wait_until(lambda: outcomes)  # adopted after the 1 s TTL
    assert ran == []
    assert last_statuses(outcomes) == {message_id: "cancelled"}
    assert (await redis.xpending(stream, GROUP))["pending"] == 0


async def test_cancel_of_one_task_stops_only_its_handlers_across_two_workers(
    redis: Redis, namespace: str
) -> None:
    app = App()
    release = anyio.Event()
    started: list[str] = []

    @app.role("job", cancel_grace=5)
    async def job(ctx: Context, payload: Any) -> None:
        started.append(ctx.message_id)
        with anyio.CancelScope() as scope:
            ctx_cancelled = ctx.cancel
            async with anyio.create_task_group() as tg:

                async def stop_on_cancel() -> None:
                    await ctx_cancelled.wait_cancelled()
                    scope.cancel()

                tg.start_soon(stop_on_cancel)
                await release.wait()
                tg.cancel_scope.cancel()

    client = Client(redis, namespace=namespace)
    outcomes: list[Outcome] = []
    w1 = make_worker(app, redis, namespace, outcomes, concurrency=4)
    w2 = make_worker(app, redis, namespace, outcomes, concurrency=4)
    with anyio.fail_after(15):
        async with running(w1, w2):
            doomed = [await client.publish("job", i, task_id="doomed") for i in range(3)]
            kept = [await client.publish("job", i, task_id="kept") for i in range(3)]
            await wait_until(lambda: len(started) == 6)
            result = await client.cancel("doomed", target="task", wait=True, timeout=5)
            assert result.complete, result
            assert sorted(m for _, m in result.stopped) == sorted(doomed)
            release.set()
            await wait_until(lambda: len(outcomes) == 6)
    got = last_statuses(outcomes)
    assert {got[m] for m in doomed} == {"cancelled"}
    assert {got[m] for m in kept} == {"acked"}


@pytest.mark.slow
async def test_cancel_wait_times_out_for_an_unknown_id(redis: Redis, namespace: str) -> None:
    app = App()

    @app.role("r")
    async def handler(ctx: Context, payload: Any) -> None:
        pass

    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            client = Client(redis, namespace=namespace)
            result = await client.cancel("no-such-task", wait=True, timeout=0.5, preemptive=True)
    assert not result.complete and result.stopped == []


async def test_cancel_refuses_an_id_that_names_nothing_unless_preemptive(
    redis: Redis, namespace: str
) -> None:
    """A cancel of an unknown id would silently cancel whatever is later submitted or
    published under it, for 7 days: refused, and no marker is written, unless asked for."""
    keys = Keys(namespace)
    client = Client(redis, namespace=namespace)
    await client.publish("other", {"id": "ghost"}, task_id="not-ghost")  # a near miss
    for target in ("task", "message", "any"):
        with pytest.raises(UnknownTargetError, match="nothing to cancel: 'ghost'"):
            await client.cancel("ghost", target=target)  # type: ignore[arg-type]
        assert not await redis.exists(keys.cancel_marker(target, "ghost"))
    assert not await redis.exists(keys.signals())

    await client.cancel("ghost", target="task", preemptive=True)
    await client.cancel("ghost-message", target="message", preemptive=True)
    graph = {"nodes": [{"id": "a", "role": "r"}]}
    with pytest.warns(CancelledIdWarning, match="task ghost is cancelled already"):
        await client.submit(graph, task_id="ghost", roles=["r"])
    with pytest.warns(CancelledIdWarning, match="message ghost-message is cancelled already"):
        await client.publish("r", 1, message_id="ghost-message")
    warned = pytest.warns(CancelledIdWarning, match="message ghost-message is cancelled already")
    with SyncClient(redis_url_of(redis), namespace=namespace) as sync, warned:
        sync.publish("r", 1, message_id="ghost-message")


async def test_cancel_finds_tasks_and_queued_running_and_delayed_messages(
    redis: Redis, namespace: str
) -> None:
    client = Client(redis, namespace=namespace)
    queued = await client.publish("r", 1)
    delayed = await client.publish("r", 2, delay=3600)
    grouped = await client.publish("r", 3, task_id="plain-task")
    task_id = await client.submit({"nodes": [{"id": "a", "role": "r"}]}, roles=["r"])
    stream = Keys(namespace).role_stream("r")
    await streams.ensure_group(redis, stream)
    await streams.read_group(redis, stream, "running-worker", count=1, block_ms=None)  # running
    for target_id, target in (
        (queued, "message"),
        (delayed, "message"),
        (grouped, "any"),
        ("plain-task", "task"),  # messages carrying a task id, with no DAG state
        (task_id, "task"),
        (task_id, "any"),
    ):
        result = await client.cancel(target_id, target=target)  # type: ignore[arg-type]
        assert result.signal_id


@pytest.mark.slow
def test_cli_cancel_of_an_unknown_id_is_an_error_and_preemptive_is_explicit(
    redis_url: str, namespace: str
) -> None:
    conn = ("--redis-url", redis_url, "--namespace", namespace)
    done = run_cli("cancel", "nonexistent", "--task", *conn)
    assert done.returncode == 2, done
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: nothing to cancel: 'nonexistent'") and "--preemptive" in line
    marker = Keys(namespace).cancel_marker("any", "nonexistent")
    with redis_sync.Redis.from_url(redis_url) as plain:
        assert not plain.exists(marker)
        done = run_cli("cancel", "nonexistent", "--preemptive", *conn)
        assert done.returncode == 0, done
        assert plain.exists(marker)
        plain.sadd(Keys(namespace).known_roles(), "r")
    done = run_cli("publish", "r", "--json", "{}", "--id", "nonexistent", *conn)
    assert done.returncode == 0, done
    assert done.stdout == "nonexistent\n"
    assert "warning: message nonexistent is cancelled already" in done.stderr
    graph = '{"nodes": [{"id": "a", "role": "r"}]}'
    done = run_cli("submit", "-", "--id", "nonexistent", *conn, stdin=graph)
    assert done.returncode == 0, done
    assert "warning: task nonexistent is cancelled already" in done.stderr


async def test_raw_xadd_cancel_from_outside_works_and_bad_signals_are_ignored(
    redis: Redis, namespace: str
) -> None:
    app = App()
    started = anyio.Event()

    @app.role("long")
    async def long(ctx: Context, payload: Any) -> None:
        started.set()
        await ctx.cancel.wait_cancelled()

    keys = Keys(namespace)
    client = Client(redis, namespace=namespace)
    outcomes: list[Outcome] = []
    w = make_worker(app, redis, namespace, outcomes)
    with anyio.fail_after(10):
        async with running(w):
            message_id = await client.publish("long", 1)
            await started.wait()
            for bad in (b"{nope", b'{"protocol":1,"kind":"explode"}', b'{"protocol":9}'):
                await redis.xadd(keys.signals(), {b"signal": bad})
            await redis.xadd(keys.signals(), {b"other": b"x"})
            signal = {
                "protocol": 1,
                "kind": "cancel",
                "id": "sig-from-go",
                "target": "message",
                "target_id": message_id,
                "reason": "from go",
                "created_at_ms": 1763800000000,
            }
            await redis.execute_command("XADD", keys.signals(), "*", "signal", orjson.dumps(signal))
            await wait_until(lambda: outcomes)
            # The worker made the raw cancel persistent (its marker outlives the broadcast).
            marker = keys.cancel_marker("message", message_id)
            with anyio.fail_after(5):
                while not await redis.exists(marker):
                    await anyio.sleep(0.01)
    assert last_statuses(outcomes) == {message_id: "cancelled"}
    assert w._signals.bad_signals == 4


async def test_cancellable_abandons_an_awaitable_and_shield_protects_a_section(
    redis: Redis, namespace: str
) -> None:
    app = App()
    events: list[str] = []
    started = anyio.Event()

    @app.role("r", cancel_grace=0.1)
    async def handler(ctx: Context, payload: Any) -> None:
        started.set()
        try:
            await ctx.cancellable(anyio.sleep(60))
        except Cancelled:
            events.append("abandoned")
        with ctx.shield():
            await anyio.sleep(0.3)  # past the grace: the hard cancel waits for the section
            events.append("section done")
        await anyio.sleep(60)
        events.append("never")

    client = Client(redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(10):
        async with running(make_worker(app, redis, namespace, outcomes)):
            message_id = await client.publish("r", 1)
            await started.wait()
            await client.cancel(message_id)
            await wait_until(lambda: outcomes)
    assert events == ["abandoned", "section done"]
    assert last_statuses(outcomes) == {message_id: "cancelled"}


@pytest.mark.slow
def test_cli_cancel_wait_reports_what_stopped(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env.update(
        STREAMFLOW_REDIS_URL=redis_url,
        STREAMFLOW_NAMESPACE=namespace,
        SFTEST_RECORD=str(tmp_path / "record"),
    )
    cli = [sys.executable, "-m", "streamflow"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=40
        )

    worker_proc = subprocess.Popen(
        [*cli, "worker", "--app", "tests.apps:app", "--role", "sleepy", "--block-ms", "100"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        published = run("publish", "sleepy", "--json", '{"seconds": 30}', "--id", "long-one")
        assert published.stdout.strip() == "long-one", published.stderr
        done = run("cancel", "long-one", "--message", "--wait", "--timeout", "20")
        assert done.returncode == 0, done.stderr
        assert "stopped long-one on " in done.stdout
        missing = run("cancel", "nobody", "--preemptive", "--wait", "--timeout", "0.5")
        assert missing.returncode == 1
        assert "nothing matching 'nobody' was stopped" in missing.stderr
    finally:
        worker_proc.kill()
        worker_proc.wait()


@pytest.mark.slow
def test_cancel_while_the_worker_is_sigkilled_is_honoured_by_the_worker_that_adopts_it(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """Real processes: the handler runs on A, A is SIGKILLed, the cancel is sent, B adopts."""
    trace = tmp_path / "trace"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env.update(
        STREAMFLOW_REDIS_URL=redis_url, STREAMFLOW_NAMESPACE=namespace, SFTEST_RECORD=str(trace)
    )
    worker_cmd = [
        sys.executable,
        "-m",
        "streamflow",
        "worker",
        "--app",
        "tests.apps:app",
        "--role",
        "work",
        "--block-ms",
        "100",
        "--lease-ttl",
        "1.5",
        "--reclaim-interval",
        "0.2",
    ]

    def starts() -> list[str]:
        text = trace.read_text() if trace.exists() else ""
        return [line for line in text.splitlines() if line.startswith("START ")]

    def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    r = redis_sync.Redis.from_url(redis_url)
    keys = Keys(namespace)
    a = subprocess.Popen(worker_cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    b = None
    try:
        message_id = publish_sync(redis_url, namespace, {"seconds": 60})
        wait_for(lambda: len(starts()) == 1)
        a.kill()
        a.wait()
        cancel = subprocess.run(
            [sys.executable, "-m", "streamflow", "cancel", message_id, "--message"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cancel.returncode == 0, cancel.stderr
        b = subprocess.Popen(worker_cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        # B adopts the entry after the lease TTL and settles it as cancelled, never starting it.
        wait_for(lambda: r.xlen(keys.role_stream("work")) == 0)
        assert int(r.xpending(keys.role_stream("work"), GROUP)["pending"]) == 0
        assert len(starts()) == 1
        assert r.xlen(keys.dead_letters("work")) == 0
    finally:
        for proc in (a, b):
            if proc is not None:
                proc.kill()
                proc.wait()
        r.close()


def publish_sync(redis_url: str, namespace: str, payload: Any) -> str:
    with SyncClient(redis_url, namespace=namespace) as client:
        return client.publish("work", payload)


async def test_the_marker_reload_after_an_outage_backs_off_while_redis_still_fails(
    redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage the listener reloads the cancel markers (the signals may have been
    trimmed meanwhile). Redis can fail again during that reload (seen in
    tests/test_cluster_ops.py with a master SIGKILLed): the failed reload is an outage too,
    backed off and retried, and the cancel whose signal was trimmed is still learnt from its
    marker."""
    await Client(redis, namespace=namespace).cancel("m-trimmed", target="message", preemptive=True)
    await redis.xtrim(Keys(namespace).signals(), maxlen=0)  # only the marker is left
    real_read, real_get = streams.read_broadcast, streams.get_many
    calls = {"read": 0, "get": 0}

    async def read_failing_once(*args: Any, **kwargs: Any) -> list[streams.Entry]:
        calls["read"] += 1
        if calls["read"] == 1:
            raise redis_exceptions.ConnectionError("the signals' master is down")
        return await real_read(*args, **kwargs)

    async def get_failing_once(*args: Any, **kwargs: Any) -> list[bytes | None]:
        calls["get"] += 1
        if calls["get"] == 1:
            raise redis_exceptions.ConnectionError("Redis is still down")
        return await real_get(*args, **kwargs)

    monkeypatch.setattr(streams, "read_broadcast", read_failing_once)
    monkeypatch.setattr(streams, "get_many", get_failing_once)
    book = CancelBook()
    listener = SignalListener(redis, Keys(namespace), book, lambda signal: None, block_ms=50)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.run)
            await wait_until(lambda: len(book) == 1, timeout=15)
            tg.cancel_scope.cancel()
    assert calls["get"] == 2, calls


def redis_url_of(redis: Redis) -> str:
    """The URL of the test's Redis, from its client's connection settings."""
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
