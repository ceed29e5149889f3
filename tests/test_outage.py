"""Redis outages under load: killed and restarted, connections killed, frozen, down.

Worker subprocesses (``streamflow worker --app tests.apps:app --role record``) run against a
private redis-server with an fsync-always AOF, which the tests kill, restart and pause. The
workers must ride every outage out by themselves; the test's own publisher retries with a dedup
key per message, which makes its retries safe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.exceptions import (
    ClusterError,
    OutOfMemoryError,
    RedisClusterException,
    ResponseError,
)

from streamflow import (
    Client,
    RedisCommandError,
    RedisUnavailable,
    SyncClient,
    connect,
    partitions,
    streams,
)
from streamflow.keys import GROUP, Keys
from streamflow.ops.server import RedisServer
from streamflow.worker import Worker
from tests.apps import app
from tests.helpers import ROOT, free_port
from tests.processes import LoggedWorker, assert_healthy, spawn_worker

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROLE = "record"
#: The worker's blocking reads use a socket timeout of block time + 10 s (see cli._serve).
WORKER_READ_TIMEOUT = 0.2 + 10.0


StartWorker = Callable[[RedisServer, str], LoggedWorker]


@pytest.fixture
def record_file(tmp_path: Path) -> Path:
    return tmp_path / "record.txt"


@pytest.fixture
def start_worker(tmp_path: Path, record_file: Path) -> Iterator[StartWorker]:
    """Start a ``record`` worker on a server and namespace; all are killed at teardown."""
    started: list[LoggedWorker] = []

    def start(server: RedisServer, namespace: str) -> LoggedWorker:
        log = tmp_path / f"worker-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
        env["SFTEST_RECORD"] = str(record_file)
        worker = spawn_worker(server.url, namespace, ROLE, log, env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
def server(private_redis: Callable[..., RedisServer]) -> RedisServer:
    """A private redis-server with an AOF synced on every write, safe to kill -9."""
    return private_redis(appendonly=True, appendfsync="always")


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[Redis]:
    """The test's own connection for inspecting the server (a short timeout, no retries)."""
    client = connect.connect(server.url, socket_timeout=2.0, name="test-admin")
    yield client
    await client.aclose()


def recorded(path: Path) -> set[str]:
    return set(path.read_text().splitlines()) if path.exists() else set()


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``predicate`` (sync) until true; fail naming ``what`` after ``timeout`` s."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout} s") from None


async def start_workers(
    start_worker: StartWorker, server: RedisServer, namespace: str, n: int
) -> list[LoggedWorker]:
    workers = [start_worker(server, namespace) for _ in range(n)]
    for worker in workers:
        await wait_until(worker.serving, 20, "worker logs 'serving'")
    return workers


async def publish_reliably(client: Client, message_id: str, *, give_up_after: float = 30) -> int:
    """Publish until Redis takes it; returns how many attempts failed.

    The dedup key makes a retry safe even when the failed attempt did reach Redis.
    """
    failures = 0
    deadline = time.monotonic() + give_up_after
    while True:
        try:
            got = await client.publish(
                ROLE, {"n": message_id}, message_id=message_id, dedup_key=message_id
            )
        except RedisUnavailable:
            failures += 1
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.05)
        else:
            assert got == message_id
            return failures


async def settled(admin: Redis, namespace: str) -> bool:
    """Whether the role stream is empty and nothing is pending (everything acknowledged)."""
    stream = Keys(namespace).role_stream(ROLE)
    info = await admin.xpending(stream, GROUP)
    return int(info["pending"]) == 0 and await admin.xlen(stream) == 0


async def wait_settled(admin: Redis, namespace: str, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while True:
            with contextlib.suppress(*connect.TRANSIENT_ERRORS):
                if await settled(admin, namespace):
                    return
            await anyio.sleep(0.05)


async def test_workers_ride_out_a_redis_kill_and_restart_under_load(
    server: RedisServer,
    admin: Redis,
    start_worker: StartWorker,
    record_file: Path,
    namespace: str,
) -> None:
    workers = await start_workers(start_worker, server, namespace, 2)
    ids = [f"kill-{n:04d}" for n in range(300)]
    published: list[str] = []
    failures = 0
    client = Client(connect.connect(server.url, socket_timeout=2.0), namespace=namespace)
    try:
        with anyio.fail_after(60):

            async def publisher(share: list[str]) -> None:
                nonlocal failures
                for message_id in share:
                    failures += await publish_reliably(client, message_id)
                    published.append(message_id)
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as tg:
                for start in range(3):  # three publishers at once
                    tg.start_soon(publisher, ids[start::3])
                await wait_until(lambda: len(recorded(record_file)) >= 80, 20, "80 recorded")
                await anyio.to_thread.run_sync(server.kill)
                await anyio.sleep(1.0)  # the outage: publishing fails meanwhile
                await anyio.to_thread.run_sync(server.restart)
            await wait_until(
                lambda: set(ids) <= recorded(record_file), 30, "every published id recorded"
            )
            await wait_settled(admin, namespace, 20)
    finally:
        await client.aclose()
    assert sorted(published) == ids
    assert failures > 0, "the publisher never saw the outage"
    assert await admin.xlen(Keys(namespace).dead_letters(ROLE)) == 0
    assert_healthy(workers)
    assert any("Redis unavailable" in w.stderr() for w in workers)


async def test_killing_every_client_connection_changes_nothing_but_a_short_pause(
    server: RedisServer,
    admin: Redis,
    start_worker: StartWorker,
    record_file: Path,
    namespace: str,
) -> None:
    workers = await start_workers(start_worker, server, namespace, 2)
    client = Client(connect.connect(server.url, socket_timeout=2.0), namespace=namespace)
    before = [f"before-{n:03d}" for n in range(100)]
    after = [f"after-{n:03d}" for n in range(100)]
    try:
        with anyio.fail_after(40):
            for message_id in before[:50]:
                await publish_reliably(client, message_id)
            killed = await admin.client_kill_filter(_type="normal", skipme=True)
            # Both workers' connections, and the test publisher's, went.
            assert int(killed) >= 3
            for message_id in before[50:]:
                await publish_reliably(client, message_id)
            await wait_until(lambda: set(before) <= recorded(record_file), 15, "before recorded")
            # Work published after the kill is handled promptly: no lease TTL to wait out.
            began = time.monotonic()
            for message_id in after:
                await publish_reliably(client, message_id)
            await wait_until(lambda: set(after) <= recorded(record_file), 15, "after recorded")
            assert time.monotonic() - began < 5
            await wait_settled(admin, namespace, 15)
    finally:
        await client.aclose()
    assert_healthy(workers)


async def test_workers_carry_on_after_redis_was_frozen_past_their_read_timeout(
    server: RedisServer,
    admin: Redis,
    start_worker: StartWorker,
    record_file: Path,
    namespace: str,
) -> None:
    workers = await start_workers(start_worker, server, namespace, 2)
    client = Client(connect.connect(server.url, socket_timeout=2.0), namespace=namespace)
    first = [f"first-{n:03d}" for n in range(50)]
    frozen = [f"frozen-{n:03d}" for n in range(50)]
    last = [f"last-{n:03d}" for n in range(50)]
    try:
        with anyio.fail_after(60):
            for message_id in first:
                await publish_reliably(client, message_id)
            await wait_until(lambda: set(first) <= recorded(record_file), 15, "first recorded")
            for message_id in frozen:  # some of these are in flight when Redis freezes
                await publish_reliably(client, message_id)
            server.pause()
            try:
                await anyio.sleep(WORKER_READ_TIMEOUT + 1.0)  # the freeze must outlast it
            finally:
                server.resume()
            for message_id in last:
                await publish_reliably(client, message_id)
            everything = set(first) | set(frozen) | set(last)
            await wait_until(lambda: everything <= recorded(record_file), 30, "all recorded")
            await wait_settled(admin, namespace, 20)
    finally:
        await client.aclose()
    assert_healthy(workers)
    # The freeze did reach the workers: their reads timed out and they reconnected.
    assert any("Redis unavailable" in w.stderr() for w in workers)


async def test_publishing_to_a_redis_that_is_down_fails_fast(server: RedisServer) -> None:
    url = server.url
    await anyio.to_thread.run_sync(server.kill)
    async with Client.from_url(url, namespace="down") as client:
        for publish in (
            lambda: client.publish(ROLE, 1),
            lambda: client.publish(ROLE, 1, dedup_key="k"),
            lambda: client.publish(ROLE, 1, delay=5),
            lambda: client.publish_many(ROLE, [1, 2]),
        ):
            began = time.monotonic()
            with anyio.fail_after(10), pytest.raises(RedisUnavailable):
                await publish()
            assert time.monotonic() - began < 5
    began = time.monotonic()
    with SyncClient(url, namespace="down") as sync_client, pytest.raises(RedisUnavailable):
        sync_client.publish(ROLE, 1)
    assert time.monotonic() - began < 5


async def test_publishing_to_a_frozen_redis_fails_after_the_socket_timeout(
    server: RedisServer,
) -> None:
    """A frozen Redis accepts connections but never answers: the socket timeout bounds it."""
    client = Client(connect.connect(server.url, socket_timeout=1.0), namespace="frozen")
    server.pause()
    try:
        began = time.monotonic()
        with anyio.fail_after(10), pytest.raises(RedisUnavailable):
            await client.publish(ROLE, 1)
        assert time.monotonic() - began < 5
    finally:
        server.resume()
        await client.aclose()


async def fill_until_refused(client: Client, payload: dict[str, str]) -> tuple[list[str], Any]:
    """Publish chunks of 20 jobs until Redis is full; (the ids taken, the error raised)."""
    published: list[str] = []
    with anyio.fail_after(120):
        while True:
            try:
                published += await client.publish_many(ROLE, [payload] * 20)
            except Exception as exc:  # what the public API raises is what the test checks
                return published, exc


async def test_a_worker_started_on_a_full_redis_stays_up_and_drains_it(
    private_redis: Callable[..., RedisServer],
    start_worker: StartWorker,
    record_file: Path,
) -> None:
    # Redis full (maxmemory + noeviction): XADD is refused, and so was every script,
    # including the acknowledgement that deletes entries, the one thing that frees memory.
    server = private_redis(extra_args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
    namespace = "full"
    keys = Keys(namespace)
    admin = connect.connect(server.url, socket_timeout=5.0, name="test-admin")
    try:
        # The role as earlier workers left it: its record and consumer group exist.
        await partitions.ensure(admin, keys, ROLE, 1)
        await streams.ensure_group(admin, keys.role_stream(ROLE))
        async with Client(admin, namespace=namespace) as client:
            published, refused = await fill_until_refused(client, {"pad": "x" * 2000})
            # Publishers see the documented error, never a raw redis-py one.
            assert isinstance(refused, RedisUnavailable), repr(refused)
            assert "maxmemory" in str(refused)
            # Then one by one, to the last byte (memory moves a little between calls).
            with pytest.raises(RedisUnavailable, match="maxmemory"):
                for _ in range(100):
                    published.append(await client.publish(ROLE, {"pad": "x" * 2000}))
            with (
                SyncClient(server.url, namespace=namespace) as sync_client,
                pytest.raises(RedisUnavailable, match="maxmemory"),
            ):
                sync_client.publish(ROLE, {"pad": "x" * 2000})
            assert len(published) > 500
            started = time.monotonic()
            worker = start_worker(server, namespace)
            await wait_until(
                lambda: set(published) <= recorded(record_file) or not worker.alive,
                120,
                "every job handled",
            )
            assert worker.alive, worker.stderr()
            drained = time.monotonic() - started
            await wait_settled(admin, namespace, 60)
            # Memory came back: publishing works again, and the same worker handles it.
            after = await client.publish(ROLE, {"after": "drain"})
            await wait_until(lambda: after in recorded(record_file), 30, "new job handled")
        assert_healthy([worker])
        print(f"drained {len(published)} jobs from a full Redis in {drained:.1f} s")
    finally:
        await admin.aclose()


async def test_a_worker_started_while_redis_is_down_waits_for_it_and_serves(
    server: RedisServer, admin: Redis, start_worker: StartWorker, record_file: Path
) -> None:
    # A deploy that starts workers before Redis, or during a restart or failover.
    server.kill()
    worker = start_worker(server, "late")
    await wait_until(
        lambda: "Redis unavailable while connecting" in worker.stderr() or not worker.alive,
        30,
        "the worker reports the outage",
    )
    assert worker.alive, worker.stderr()
    server.start()
    await wait_until(worker.serving, 60, "worker logs 'serving'")
    async with Client(admin, namespace="late") as client:
        message_id = await client.publish(ROLE, {"n": 1})
        await wait_until(lambda: message_id in recorded(record_file), 30, "job handled")
    log = worker.stderr()
    assert log.count("Redis unavailable while connecting") == 1, log  # logged once
    assert_healthy([worker])


async def publish_and_wait_handled(
    client: Client, record_file: Path, count: int, what: str
) -> list[str]:
    """Publish ``count`` jobs and wait until the workers recorded every one."""
    ids = await client.publish_many(ROLE, [{"n": i} for i in range(count)])
    await wait_until(lambda: set(ids) <= recorded(record_file), 60, what)
    return ids


async def test_workers_ride_out_a_redis_that_turned_replica_and_back(
    server: RedisServer, admin: Redis, start_worker: StartWorker, record_file: Path
) -> None:
    # A demoted master: blocked reads are released with UNBLOCKED, every write (and every
    # script) is refused with READONLY until it is a master again.
    workers = await start_workers(start_worker, server, "demoted", 2)
    async with Client(admin, namespace="demoted") as client:
        await publish_and_wait_handled(client, record_file, 20, "jobs before")
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        await wait_until(
            lambda: all("READONLY" in w.stderr() or not w.alive for w in workers),
            30,
            "every worker meets READONLY",
        )
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await publish_and_wait_handled(client, record_file, 50, "jobs after")
    await wait_settled(admin, "demoted", 30)
    assert_healthy(workers)


async def test_workers_ride_out_a_busy_script(
    server: RedisServer, admin: Redis, start_worker: StartWorker, record_file: Path
) -> None:
    # A script running past busy-reply-threshold: every other command is refused with BUSY.
    workers = await start_workers(start_worker, server, "busy", 1)
    await admin.config_set("busy-reply-threshold", 100)
    busy = connect.connect(server.url, socket_timeout=None, name="test-busy")
    async with Client(admin, namespace="busy") as client, anyio.create_task_group() as tg:
        await publish_and_wait_handled(client, record_file, 20, "jobs before")

        async def spin() -> None:
            with contextlib.suppress(ResponseError):  # ended by SCRIPT KILL
                await busy.eval("while true do end", 0)

        tg.start_soon(spin)
        await wait_until(
            lambda: all("BUSY" in w.stderr() or not w.alive for w in workers),
            30,
            "the worker meets BUSY",
        )
        await admin.script_kill()
        await wait_answers(admin)
        await publish_and_wait_handled(client, record_file, 50, "jobs after")
    await busy.aclose()
    await wait_settled(admin, "busy", 30)
    assert_healthy(workers)


async def wait_answers(admin: Redis) -> None:
    """Wait until Redis answers PING again (a killed script ends a moment after SCRIPT KILL)."""
    with anyio.fail_after(30):
        while True:
            try:
                await admin.ping()
                return
            except ResponseError:
                await anyio.sleep(0.02)


@pytest.mark.parametrize(
    ("reply", "outage", "group_lost"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", True, False),
        ("READONLY You can't write against a read only replica.", True, False),
        (
            "MISCONF Redis is configured to save RDB snapshots, but it's unable to persist",
            True,
            False,
        ),
        ("LOADING Redis is loading the dataset in memory", True, False),
        ("BUSY Redis is busy running a script.", True, False),
        ("MASTERDOWN Link with MASTER is down", True, False),
        ("NOREPLICAS Not enough good replicas to write.", True, False),
        ("CLUSTERDOWN The cluster is down", True, False),
        ("TRYAGAIN Multiple keys request during rehashing of slot", True, False),
        ("MOVED 3999 127.0.0.1:6381", True, False),
        ("ASK 3999 127.0.0.1:6381", True, False),
        ("UNBLOCKED the stream key no longer exists", True, False),
        ("NOGROUP No such key 's' or consumer group 'g'", False, True),
        ("NOPERM this user has no permissions to run the 'xadd' command", False, False),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False, False),
        ("BUSYGROUP Consumer Group name already exists", False, False),
        ("ERR Error running script, @user_script:1: bad", False, False),
    ],
)
def test_one_classifier_tells_outages_from_the_callers_errors(
    reply: str, outage: bool, group_lost: bool
) -> None:
    # As redis-py parses the reply (the class it picks, or a plain ResponseError).
    exc = BaseParser.parse_error(reply)
    assert connect.is_outage(exc) is outage
    assert streams.is_group_lost(exc) is group_lost
    # The public API's promise: a documented error, the original kept as the cause.
    expected = RedisUnavailable if outage else RedisCommandError
    with pytest.raises(expected) as caught, connect.public_errors("doing it"):
        raise exc
    assert caught.value.__cause__ is exc


@pytest.mark.parametrize(
    "exc",
    [
        ClusterError("TTL exhausted."),
        RedisClusterException("Redis Cluster cannot be connected. Please provide at least"),
        RedisClusterException("startup_nodes could not agree on a valid slots cache: a vs b"),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
def test_cluster_redirection_failures_are_outages(exc: Exception) -> None:
    assert connect.is_outage(exc)


async def make_full(admin: Redis) -> None:
    """Make Redis full for good: 1 MB of padding, then ``maxmemory`` below what it uses.

    With ``noeviction`` nothing can be evicted, so every command that may add memory is
    refused with OOM until the padding is deleted.
    """
    await admin.setrange("pad", 1_000_000, "x")  # small command: no large query buffer
    used = int((await admin.info("memory"))["used_memory"])
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", used - 300_000)


async def test_a_running_worker_rides_out_redis_filling_up_and_resumes(
    server: RedisServer, admin: Redis, start_worker: StartWorker, record_file: Path
) -> None:
    # Full while a worker runs: its lease renewal, liveness refresh and acknowledgements
    # meet OOM within one renewal tick.
    workers = await start_workers(start_worker, server, "filling", 1)
    async with Client(admin, namespace="filling") as client:
        await publish_and_wait_handled(client, record_file, 20, "jobs before")
        await make_full(admin)
        await wait_until(
            lambda: "OOM" in workers[0].stderr() or not workers[0].alive,
            30,
            "the worker meets OOM",
        )
        assert workers[0].alive, workers[0].stderr()
        with pytest.raises(RedisUnavailable, match="OOM"):
            await client.publish(ROLE, {"too": "much"})
        await admin.delete("pad")
        await publish_and_wait_handled(client, record_file, 50, "jobs after")
    await wait_settled(admin, "filling", 30)
    assert_healthy(workers)


async def test_an_outage_is_logged_once_and_counted_once(caplog: pytest.LogCaptureFixture) -> None:
    backoff = connect.Backoff("testing", first=0.001, cap=0.002)
    outages, recoveries = connect.Backoff.outages, connect.Backoff.recoveries
    for _ in range(3):
        await backoff.failed(OutOfMemoryError("command not allowed", status_code="OOM"))
    backoff.succeeded()
    unavailable = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert unavailable == ["Redis unavailable while testing (OOM command not allowed); retrying"]
    assert (connect.Backoff.outages, connect.Backoff.recoveries) == (outages + 1, recoveries + 1)


def spawn(command: list[str], log: Path) -> LoggedWorker:
    """``python -m streamflow COMMAND...`` with its stderr in ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamflow", *command],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return LoggedWorker(process, log)


def reported_outage(process: LoggedWorker) -> bool:
    """Whether ``process`` logged waiting for Redis at start-up (or exited)."""
    return "Redis unavailable while connecting" in process.stderr() or not process.alive


async def test_a_coordinator_and_an_exporter_started_while_redis_is_down_come_up(
    server: RedisServer, admin: Redis, tmp_path: Path
) -> None:
    server.kill()
    connection = ["--redis-url", server.url, "--namespace", "late"]
    port = free_port()
    started = [
        spawn(["coordinator", *connection], tmp_path / "coordinator.log"),
        spawn(["exporter", "--metrics-port", str(port), *connection], tmp_path / "exporter.log"),
    ]
    try:
        for process in started:
            await wait_until(partial(reported_outage, process), 30, "the outage is reported")
            assert process.alive, process.stderr()
        server.start()
        coordinator, exporter = started
        # Up: the coordinator registered its functions, the exporter serves queue figures.
        await wait_until(lambda: " coordinator " in coordinator.stderr(), 60, "coordinator up")
        assert await admin.smembers(Keys("late").known_functions())
        await wait_until(lambda: "exporting" in exporter.stderr(), 60, "exporter up")
        for process in started:
            log = process.stderr()
            assert process.alive, log
            assert log.count("Redis unavailable while connecting") == 1, log
            assert "Traceback" not in log, log
    finally:
        for process in started:
            process.kill()


async def test_the_error_that_stops_a_worker_is_not_hidden_by_its_cleanup_on_a_full_redis(
    server: RedisServer, admin: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Giving the consumer name up at shutdown is a script Redis refuses when full: the error
    # that ended the worker must be the one raised, not that OOM.
    redis = connect.connect(server.url, socket_timeout=5.0, name="test-worker")
    worker = Worker(app, redis, roles=[ROLE], namespace="hidden", block_ms=100)

    async def break_down() -> None:
        await make_full(admin)
        raise RuntimeError("the real failure")

    monkeypatch.setattr(worker._leases, "renew_forever", break_down)
    try:
        with anyio.fail_after(30), pytest.raises(BaseExceptionGroup) as caught:
            await worker.run()
    finally:
        await redis.aclose()
    assert caught.group_contains(RuntimeError, match="the real failure")
    assert not caught.group_contains(OutOfMemoryError)


async def test_workers_ride_out_redis_failing_to_persist(
    private_redis: Callable[..., RedisServer],
    tmp_path: Path,
    start_worker: StartWorker,
    record_file: Path,
) -> None:
    # A failed BGSAVE with stop-writes-on-bgsave-error (the default): every write and every
    # script is refused with MISCONF, which redis-py raises as a plain ResponseError.
    data = tmp_path / "data"
    server = private_redis(directory=data, extra_args=["--save", "3600 1"])
    admin = connect.connect(server.url, socket_timeout=5.0, name="test-admin")
    try:
        workers = await start_workers(start_worker, server, "misconf", 1)
        async with Client(admin, namespace="misconf") as client:
            await publish_and_wait_handled(client, record_file, 20, "jobs before")
            shutil.rmtree(data)  # the disk is gone: the next snapshot fails
            await admin.bgsave()
            await wait_for_query(lambda: admin.info("persistence"), "rdb_last_bgsave_status", "err")
            await wait_until(
                lambda: "MISCONF" in workers[0].stderr() or not workers[0].alive,
                30,
                "the worker meets MISCONF",
            )
            with pytest.raises(RedisUnavailable, match="MISCONF"):
                await client.publish(ROLE, {"not": "persisted"})
            # The operator's way out when snapshots can wait.
            await admin.config_set("stop-writes-on-bgsave-error", "no")
            await publish_and_wait_handled(client, record_file, 50, "jobs after")
        await wait_settled(admin, "misconf", 30)
        assert_healthy(workers)
    finally:
        await admin.config_set("save", "")  # a shutdown must not try to save
        await admin.aclose()


async def wait_for_query(
    query: Callable[[], Awaitable[dict[str, Any]]], field: str, value: str
) -> None:
    """Poll an INFO section until ``field`` is ``value``."""
    with anyio.fail_after(30):
        while (await query()).get(field) != value:
            await anyio.sleep(0.05)
