"""The scheduler on a real redis-server: each tick once across schedulers, policies, the CLI."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis
from redis.asyncio import Redis

import streamflow
from streamflow import Client, connect, registry
from streamflow.keys import Keys
from streamflow.ops.server import RedisServer
from streamflow.protocol import now_ms
from streamflow.scheduler import Scheduler, add, load, pause, run_now
from streamflow.schedules import SCHEDULED_AT_HEADER, Schedule, iso
from tests.apps import RECORD_ENV
from tests.helpers import (
    CLI,
    ROOT,
    clean_env,
    kill_tree,
    make_worker,
    run_cli,
    running,
    wait_for,
    wait_for_query,
    wait_until,
)

pytestmark = pytest.mark.anyio

app = streamflow.App()
#: (message id, scheduled-at header, payload) of every run the in-process worker handled.
handled: list[tuple[str, str, Any]] = []
#: Set to let ``held`` runs end.
release: list[anyio.Event] = []


@app.role("tick")
async def tick(ctx: streamflow.Context, payload: Any) -> None:
    handled.append((ctx.message_id, ctx.headers[SCHEDULED_AT_HEADER], payload))


@app.role("held")
async def held(ctx: streamflow.Context, payload: Any) -> None:
    handled.append((ctx.message_id, ctx.headers[SCHEDULED_AT_HEADER], payload))
    await release[-1].wait()


@pytest.fixture
async def client(redis: Redis, namespace: str) -> AsyncIterator[Client]:
    handled.clear()
    release[:] = [anyio.Event()]
    # The roles are known (as if served before): publishing to them does not warn.
    await redis.sadd(Keys(namespace).known_roles(), "tick", "held", "record")
    yield Client(redis, namespace=namespace)


def ticks_of(schedule_id: str, ids: list[str]) -> list[int]:
    prefix = f"sched.{schedule_id}."
    return [int(i.removeprefix(prefix)) for i in ids if i.startswith(prefix)]


def assert_each_tick_once(ticks: list[int], step_ms: int, at_least: int) -> None:
    counts = Counter(ticks)
    assert all(n == 1 for n in counts.values()), counts
    ordered = sorted(counts)
    assert len(ordered) >= at_least, ordered
    assert ordered == list(range(ordered[0], ordered[-1] + step_ms, step_ms)), ordered


async def stream_ids(client: Client, role: str) -> list[str]:
    from streamflow.protocol import decode_job

    entries = await client.redis.xrange(client.keys.role_stream(role))
    return [decode_job(fields).id for _, fields in entries]


@pytest.mark.slow
@pytest.mark.parametrize("rule", [{"every": 1}, {"cron": "* * * * * *"}], ids=["interval", "cron"])
async def test_three_schedulers_fire_every_tick_exactly_once(
    client: Client, namespace: str, rule: dict[str, Any]
) -> None:
    schedule = Schedule(id="s", role="tick", payload={"at": "{scheduled_at}"}, catch_up=3, **rule)
    schedulers = [Scheduler(client, [schedule], poll=0.05) for _ in range(3)]
    with anyio.fail_after(20):
        async with (
            running(make_worker(app, client.redis, namespace)),
            anyio.create_task_group() as tg,
        ):
            for one in schedulers:
                await tg.start(one.run)
            await wait_for_query(lambda: _count_at_least(4), timeout=15)
            for one in schedulers:
                one.stop()
    ids = [message_id for message_id, _, _ in handled]
    assert_each_tick_once(ticks_of("s", ids), 1000, at_least=4)
    assert sum(one.statistics().sent for one in schedulers) >= len(ids)
    for message_id, at, payload in handled:  # the scheduled time, as header and template
        assert at == payload["at"] == iso(ticks_of("s", [message_id])[0])


async def _count_at_least(n: int) -> bool:
    return len(handled) >= n


async def _with_last(client: Client, schedule: Schedule, last: int) -> Scheduler:
    await add(client.redis, client.keys, schedule)
    await client.redis.zadd(client.keys.schedule_ticks(), {schedule.id: last})
    return Scheduler(client)


async def test_missed_ticks_are_skipped_unless_caught_up(client: Client) -> None:
    now = now_ms() // 10_000 * 10_000
    with anyio.fail_after(10):
        skip = await _with_last(client, Schedule(id="skip", role="tick", every=10), now - 60_000)
        catch = Schedule(id="catch", role="tick", every=10, catch_up=2)
        await _with_last(client, catch, now - 60_000)
        await skip.step()
        await skip.step()  # a second pass fires nothing more
        ids = await stream_ids(client, "tick")
    latest = now if now_ms() - now < 10_000 else now + 10_000
    assert ticks_of("skip", ids) == [latest]
    assert ticks_of("catch", ids) == [latest - 20_000, latest - 10_000, latest]


GRAPH = {"nodes": [{"id": "a", "role": "tick"}], "edges": []}


@pytest.mark.filterwarnings("ignore::streamflow.errors.NoCoordinatorWarning")
async def test_a_graph_schedule_submits_one_task_per_tick_across_schedulers(
    client: Client,
) -> None:
    now = now_ms() // 1000 * 1000
    schedule = Schedule(id="g", graph=GRAPH, every=1, catch_up=5, payload={"at": "{scheduled_at}"})
    first = await _with_last(client, schedule, now - 4000)
    schedulers = [first, Scheduler(client), Scheduler(client)]
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            for one in schedulers:  # three passes at once over the same due ticks
                tg.start_soon(one.step)
        tasks = await client.tasks()
    ticks = ticks_of("g", [task.id for task in tasks])
    assert_each_tick_once(ticks, 1000, at_least=4)
    for task in tasks:
        spec = await client.task(task.id)
        assert spec is not None and spec.state == "queued"


async def test_a_new_schedule_starts_after_now(client: Client) -> None:
    with anyio.fail_after(10):
        await add(client.redis, client.keys, Schedule(id="new", role="tick", every=1))
        scheduler = Scheduler(client)
        before = now_ms()
        await scheduler.step()
        assert await stream_ids(client, "tick") == []
        stored = await load(client.redis, client.keys)
        assert stored.last["new"] >= before


async def test_a_paused_schedule_does_not_fire_and_resumes_from_its_next_tick(
    client: Client,
) -> None:
    now = now_ms()
    with anyio.fail_after(10):
        scheduler = await _with_last(
            client, Schedule(id="p", role="tick", every=1, catch_up=5), now - 10_000
        )
        await pause(client.redis, client.keys, "p")
        await scheduler.step()
        assert await stream_ids(client, "tick") == []
        assert (await load(client.redis, client.keys)).last["p"] == now - 10_000
        resumed_at = now_ms()
        await pause(client.redis, client.keys, "p", paused=False)
        assert (await load(client.redis, client.keys)).last["p"] >= resumed_at
        await wait_for_query(lambda: _fired_after(client, scheduler), timeout=5)
    # None of the ten ticks of the pause was caught up, catch_up=5 notwithstanding.
    assert all(tick > resumed_at for tick in ticks_of("p", await stream_ids(client, "tick")))


async def _fired_after(client: Client, scheduler: Scheduler) -> bool:
    await scheduler.step()
    return bool(ticks_of("p", await stream_ids(client, "tick")))


@pytest.mark.slow
async def test_overlap_skip_skips_ticks_while_the_previous_run_goes_on(
    client: Client, namespace: str
) -> None:
    schedule = Schedule(id="o", role="held", every=1, overlap="skip")
    scheduler = Scheduler(client, [schedule], poll=0.05)
    with anyio.fail_after(25):
        async with (
            running(make_worker(app, client.redis, namespace)),
            anyio.create_task_group() as tg,
        ):
            await tg.start(scheduler.run)
            await wait_for_query(lambda: _count_at_least(1), timeout=10)
            first = ticks_of("o", [handled[0][0]])[0]
            # Three more ticks pass while the first run holds on: none of them fires.
            await wait_for_query(lambda: _last_tick_at_least(client, first + 3000), 10)
            assert len(handled) == 1
            release.append(anyio.Event())
            release[-2].set()
            await wait_for_query(lambda: _count_at_least(2), timeout=10)
            release[-1].set()
            scheduler.stop()
    ticks = ticks_of("o", [message_id for message_id, _, _ in handled])
    assert ticks[1] > first + 3000  # the ticks in between were skipped, not delayed


async def _last_tick_at_least(client: Client, tick: int) -> bool:
    stored = await load(client.redis, client.keys)
    return stored.last.get("o", 0) >= tick


@pytest.mark.slow
async def test_overlap_allow_fires_while_the_previous_run_goes_on(
    client: Client, namespace: str
) -> None:
    scheduler = Scheduler(client, [Schedule(id="a", role="held", every=1)], poll=0.05)
    with anyio.fail_after(20):
        async with (
            running(make_worker(app, client.redis, namespace)),
            anyio.create_task_group() as tg,
        ):
            await tg.start(scheduler.run)
            await wait_for_query(lambda: _count_at_least(2), timeout=10)
            release[-1].set()
            scheduler.stop()


async def test_hostile_definitions_are_warned_about_once_and_others_still_fire(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = {
        "garbage": b"\xff\xfe not json",
        "huge": b"[" + b"1," * 40_000 + b"1]",
        "liar": Schedule(id="other", role="tick", every=1).to_json(),
        "bad-zone": orjson.dumps({"id": "bad-zone", "role": "tick", "every": 1, "timezone": "/x"}),
        "deep": b"[" * 5000 + b"]" * 5000,
    }
    await client.redis.hset(client.keys.schedules(), mapping=hostile)
    await client.redis.zadd(client.keys.schedule_ticks(), {"garbage": 1e300, "good": 0})
    good = Schedule(id="good", role="tick", every=1)
    scheduler = await _with_last(client, good, now_ms() - 1000)
    with anyio.fail_after(10), caplog.at_level(logging.WARNING, "streamflow.scheduler"):
        await scheduler.step()
        await scheduler.step()
    warned = [r.getMessage() for r in caplog.records if "invalid definition" in r.getMessage()]
    assert len(warned) == len(hostile), warned
    assert ticks_of("good", await stream_ids(client, "tick"))


async def test_a_schedule_that_cannot_publish_is_warned_about_and_others_still_fire(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # Someone overwrote the role's partition record with a string: publishing to it fails.
    await client.redis.set(client.keys.role_config("broken"), "x")
    await client.redis.sadd(client.keys.known_roles(), "broken")
    now = now_ms()
    scheduler = await _with_last(client, Schedule(id="b", role="broken", every=1), now - 1000)
    await _with_last(client, Schedule(id="good", role="tick", every=1), now - 1000)
    with anyio.fail_after(10), caplog.at_level(logging.WARNING, "streamflow.scheduler"):
        await scheduler.step()
    assert any("'b' skipped: firing failed" in r.getMessage() for r in caplog.records)
    assert ticks_of("good", await stream_ids(client, "tick"))


async def test_schedule_keys_of_the_wrong_type_are_warned_about_not_fatal(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    await client.redis.set(client.keys.schedules(), "not a hash")
    scheduler = Scheduler(client)
    with anyio.fail_after(10), caplog.at_level(logging.WARNING, "streamflow.scheduler"):
        await scheduler.step()
        await scheduler.step()
    warned = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warned) == 1, warned


async def test_a_scheduler_with_schedules_starts_on_a_definitions_key_of_the_wrong_type(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Writing the code's schedules meets WRONGTYPE: warned about once, never fatal."""
    await client.redis.set(client.keys.schedules(), "not a hash")
    scheduler = Scheduler(client, [Schedule(id="s", role="tick", every=1)], poll=0.05)
    with anyio.fail_after(10), caplog.at_level(logging.WARNING, "streamflow.scheduler"):
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            await wait_until(lambda: any("cannot be read" in r.message for r in caplog.records))
            scheduler.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot be written" in m]) == 1, messages


async def test_run_now_publishes_outside_the_ticks(client: Client) -> None:
    schedule = Schedule(id="now", role="tick", cron="0 0 1 1 *", payload="{scheduled_ms}")
    with anyio.fail_after(10):
        first = await run_now(client, schedule)
        second = await run_now(client, schedule)
        assert await stream_ids(client, "tick") == [first, second]


@pytest.mark.slow
async def test_the_scheduler_rides_out_a_redis_kill_and_restart(
    private_redis: Callable[..., RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = private_redis(appendonly=True, appendfsync="always")
    redis = connect.connect(server.url, socket_timeout=2.0)
    client = Client(redis, namespace="outage")
    await redis.sadd(client.keys.known_roles(), "tick")
    scheduler = Scheduler(client, [Schedule(id="o", role="tick", every=1)], poll=0.05)
    stream = client.keys.role_stream("tick")

    async def published(n: int) -> bool:
        return await redis.xlen(stream) >= n

    def outage_logged() -> bool:
        return any("running the schedules" in r.getMessage() for r in caplog.records)

    try:
        with anyio.fail_after(40), caplog.at_level(logging.WARNING):
            async with anyio.create_task_group() as tg:
                await tg.start(scheduler.run)
                await wait_for_query(lambda: published(2), timeout=10)
                await anyio.to_thread.run_sync(server.kill)
                await wait_until(outage_logged, timeout=10)
                await anyio.to_thread.run_sync(server.restart)
                before = await redis.xlen(stream)
                await wait_for_query(lambda: published(before + 2), timeout=15)
                scheduler.stop()
        ticks = ticks_of("o", await stream_ids(client, "tick"))
        assert len(ticks) == len(set(ticks))  # no tick twice, outage or not
        outages = [r for r in caplog.records if "running the schedules" in r.getMessage()]
        assert not any(r.exc_info for r in outages)  # logged, not a traceback
    finally:
        await redis.aclose()


def docs_example() -> dict[str, Any]:
    """The names the first Python block of docs/schedules.md defines."""
    text = (ROOT / "docs" / "schedules.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    names: dict[str, Any] = {"__name__": "docs_schedules"}
    exec(compile(code, "docs/schedules.md", "exec"), names)  # our own docs, run as written
    return names


@pytest.mark.slow
async def test_the_docs_example_fires_and_its_handler_sees_the_scheduled_time(
    client: Client, namespace: str
) -> None:
    example = docs_example()
    outcomes: list[Any] = []
    scheduler = Scheduler(client, example["schedules"])
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)  # writes the schedules to Redis
            scheduler.stop()
        # The heartbeat's last tick a minute ago: its current tick is due.
        await client.redis.zadd(client.keys.schedule_ticks(), {"heartbeat": now_ms() - 61_000})
        await scheduler.step()
        worker = make_worker(example["app"], client.redis, namespace, outcomes)
        async with running(worker):
            await wait_until(lambda: len(outcomes) == 1)
    assert outcomes[0].status == "acked", outcomes  # the handler's assertion held
    stored = await load(client.redis, client.keys)
    assert set(stored.schedules) == {"nightly-report", "heartbeat"}


def cli(redis_url: str, namespace: str, *args: str) -> Any:
    done = run_cli(*args, "--redis-url", redis_url, "--namespace", namespace)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout) if "--json" in args else done.stdout


@pytest.mark.slow
async def test_cli_adds_lists_pauses_resumes_runs_and_removes(
    client: Client, redis_url: str, namespace: str
) -> None:
    def run(*args: str) -> Any:
        return cli(redis_url, namespace, "schedule", *args)

    added = await anyio.to_thread.run_sync(
        lambda: run(
            "add",
            "nightly",
            "--role",
            "tick",
            "--cron",
            "30 2 * * *",
            "--timezone",
            "Europe/Berlin",
            "--payload",
            '{"n": 1}',
            "--json",
        )
    )
    assert added["cron"] == "30 2 * * *" and added["payload"] == {"n": 1}
    [row] = await anyio.to_thread.run_sync(lambda: run("list", "--json"))
    assert row["id"] == "nightly" and row["paused"] is False and row["next_run"].endswith("Z")
    assert "nightly" in await anyio.to_thread.run_sync(lambda: run("list"))
    assert await anyio.to_thread.run_sync(lambda: run("pause", "nightly", "--json")) == {
        "id": "nightly",
        "paused": True,
    }
    [row] = await anyio.to_thread.run_sync(lambda: run("list", "--json"))
    assert row["paused"] is True and row["next_run"] is None
    await anyio.to_thread.run_sync(lambda: run("resume", "nightly", "--json"))
    ran = await anyio.to_thread.run_sync(lambda: run("run-now", "nightly", "--json"))
    assert await stream_ids(client, "tick") == [ran["message_id"]]
    await anyio.to_thread.run_sync(lambda: run("remove", "nightly", "--json"))
    assert await anyio.to_thread.run_sync(lambda: run("list", "--json")) == []
    await client.redis.hset(client.keys.schedules(), "junk\x1b[2J", b"\xff")
    [row] = await anyio.to_thread.run_sync(lambda: run("list", "--json"))
    assert row["valid"] is False and row["error"].startswith("not JSON")
    listed = await anyio.to_thread.run_sync(lambda: run("list"))
    assert "INVALID" in listed and "\x1b" not in listed  # printed safely
    missing = run_cli(
        "schedule", "pause", "nightly", "--redis-url", redis_url, "--namespace", namespace
    )
    assert missing.returncode != 0 and "no schedule 'nightly'" in missing.stderr
    bad = run_cli(
        "schedule", "add", "x", "--role", "tick", "--cron", "bad", "--redis-url", redis_url
    )
    assert bad.returncode != 0 and "invalid cron expression" in bad.stderr


def start_scheduler(
    tmp_path: Path, redis_url: str, namespace: str, name: str, *extra: str
) -> subprocess.Popen[bytes]:
    command = [
        *CLI,
        "scheduler",
        *extra,
        "--schedules",
        "tests.schedule_apps:every_second",
        "--poll",
        "0.1",
        "--redis-url",
        redis_url,
        "--namespace",
        namespace,
    ]
    with open(tmp_path / f"scheduler-{name}.log", "ab") as err:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


@pytest.mark.slow
def test_each_tick_fires_once_through_a_sigkill_of_one_of_three_scheduler_processes(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    record = tmp_path / "record.txt"
    worker = subprocess.Popen(
        [
            *CLI,
            "worker",
            "--app",
            "tests.apps:app",
            "--role",
            "record",
            "--block-ms",
            "100",
            "--redis-url",
            redis_url,
            "--namespace",
            namespace,
        ],
        cwd=ROOT,
        env=clean_env(**{RECORD_ENV: str(record)}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    schedulers = [start_scheduler(tmp_path, redis_url, namespace, str(i)) for i in range(3)]

    def recorded() -> list[int]:
        text = record.read_text() if record.exists() else ""
        return ticks_of("every-second", text.split())

    def has(n: int) -> bool:
        return len(recorded()) >= n

    try:
        wait_for(lambda: has(3), 45, "3 ticks")
        schedulers[0].send_signal(signal.SIGKILL)
        wait_for(lambda: has(6), 20, "6 ticks")
        schedulers[0].wait()
        schedulers[0] = start_scheduler(tmp_path, redis_url, namespace, "0b")
        wait_for(lambda: has(10), 30, "10 ticks")
        schedulers[1].send_signal(signal.SIGKILL)
        wait_for(lambda: has(13), 20, "13 ticks")
    finally:
        for process in [*schedulers, worker]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*schedulers, worker]:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    assert_each_tick_once(recorded(), 1000, at_least=13)
    stray = (tmp_path / "scheduler-2.log").read_text()
    assert "Traceback" not in stray, stray


def scheduler_docs(conn: list[str]) -> dict[str, dict[str, Any]]:
    """The schedulers ``streamflow workers --json`` lists, by name."""
    lines = run_cli("workers", "--json", *conn).stdout.splitlines()
    docs = [orjson.loads(line) for line in lines]
    return {doc["consumer"]: doc for doc in docs if doc.get("kind") == "scheduler"}


def scheduler_row(conn: list[str], name: str) -> str:
    (row,) = [
        line for line in run_cli("workers", *conn).stdout.splitlines() if line.startswith(name)
    ]
    return row


@pytest.mark.slow
def test_workers_lists_scheduler_processes_with_their_health_until_they_stop(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """A scheduler shows in ``workers`` once its first pass is done, with its host, pid, schedules
    and passes; stopped, it is gone at once; killed, it reads as gone once its entry is stale. A
    malformed entry beside them is skipped with a warning."""
    conn = ["--redis-url", redis_url, "--namespace", namespace]
    with redis.Redis.from_url(redis_url) as plain:
        plain.hset(Keys(namespace).schedulers(), "forged", "[1]")
    none = run_cli("workers", *conn)
    assert none.returncode == 0, none.stderr
    assert f"no scheduler in namespace {namespace}: schedules do not fire" in none.stdout
    assert "skipping the malformed scheduler entry forged" in none.stderr
    stopped = start_scheduler(tmp_path, redis_url, namespace, "s1", "--name", "s1")
    killed = start_scheduler(tmp_path, redis_url, namespace, "s2", "--name", "s2")

    def passed(name: str) -> bool:
        doc = scheduler_docs(conn).get(name)
        return doc is not None and doc["live"] and doc["last_pass_ms"] is not None

    try:
        wait_for(lambda: passed("s1") and passed("s2"), 45, "both listed", every=0.5)
        doc = scheduler_docs(conn)["s1"]
        assert (doc["pid"], doc["host"], doc["schedules"]) == (stopped.pid, socket.gethostname(), 1)
        assert doc["late_ms"] >= 0 and doc["version"] == registry.VERSION
        row = scheduler_row(conn, "s1 ")
        assert "live (seen" in row and f" {stopped.pid} " in row
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(timeout=30) == 0
        assert set(scheduler_docs(conn)) == {"s2"}  # withdrawn on a clean stop
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=10)
        wait_for(lambda: not scheduler_docs(conn)["s2"]["live"], 40, "s2 stale", every=1)
        assert "gone (last seen" in scheduler_row(conn, "s2 ")
    finally:
        for process in (stopped, killed):
            kill_tree(process)
    log = (tmp_path / "scheduler-s1.log").read_text()
    assert "Traceback" not in log, log
