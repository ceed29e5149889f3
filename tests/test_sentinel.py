"""Redis Sentinel: ``redis+sentinel://`` URLs, and workers that follow the master on failover.

The failover tests run ``streamflow worker`` subprocesses (role ``work`` of ``tests.apps``,
which traces START/DONE lines with the worker's pid to a file outside Redis) against a master,
a replica and sentinels started by the test (see ``tests/sentinel.py``), publish under load
with a dedup key per message (so the publisher's own retries are safe), fail the master over,
and compare what was acknowledged to the publisher with what the handlers did. The figures
are printed (``pytest -s``) and checked against the bounds in docs/operations.md.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from streamflow import Client, RedisUnavailable, SyncClient, config, connect, pipelines, sentinel
from streamflow.errors import ConfigError
from streamflow.keys import GROUP, Keys
from tests.apps import Line, read_trace
from tests.conftest import _require_redis_server
from tests.helpers import clean_env
from tests.processes import LoggedWorker, assert_healthy, spawn_worker
from tests.sentinel import SERVICE, LocalSentinel, local_sentinel

pytestmark = pytest.mark.slow

ROLE = "work"
CANARY = "Canary-S3cret-7f1d"
#: How far before the kill a lost message may have been acknowledged, on top of the replica's
#: lag (seconds since its last acknowledgement, 0 to 1) read just before the kill: the
#: documented bound, "writes the replica had not received yet".
LOST_WINDOW = 1.0
#: How long after the kill the first start of a message delivered twice may come: the read
#: that delivered it reached the worker before the master died, its handler started just after.
DUPLICATE_SLACK = 1.0


# -- URLs -------------------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    parsed = connect.parse_sentinel_url(
        "redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:26381/mymaster"
        "?db=3&sentinel_username=watch&sentinel_password=s%40nt"
    )
    assert parsed.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert parsed.service == "mymaster"
    assert parsed.db == 3
    assert (parsed.username, parsed.password) == ("app", "p@ss")
    assert (parsed.sentinel_username, parsed.sentinel_password) == ("watch", "s@nt")
    assert "p@ss" not in repr(parsed) and "s@nt" not in repr(parsed)


def test_a_sentinel_url_without_credentials_or_parameters_takes_defaults() -> None:
    parsed = connect.parse_sentinel_url("redis+sentinel://10.0.0.1:26379/cache")
    assert parsed == connect.SentinelURL(sentinels=(("10.0.0.1", 26379),), service="cache")
    assert connect.parse_sentinel_url("redis+sentinel://:only@h/m").password == "only"
    assert connect.parse_sentinel_url("redis+sentinel://:only@h/m").username is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://h:26379", "needs the master's service name"),
        ("redis+sentinel://h:26379/", "needs the master's service name"),
        ("redis+sentinel://h:26379/mymaster/0", "give the database as ?db=N"),
        ("redis+sentinel://h:26379/my%20master", "bad service name"),
        ("redis+sentinel://h:0/m", "bad port"),
        ("redis+sentinel://h:x/m", "bad port"),
        ("redis+sentinel://h:1,,h:2/m", "each sentinel must be host[:port]"),
        ("redis+sentinel://::1/m", "each sentinel must be host[:port]"),
        ("redis+sentinel://[::1/m", "each sentinel must be host[:port]"),
        ("redis+sentinel://h/m?db=x", "db must be a database number"),
        ("redis+sentinel://h/m?ssl=true", "unknown parameter 'ssl'"),
        ("redis+sentinel://h/m?db=1&db=2", "given twice"),
        ("redis+sentinel://h/m#frag", "no #fragment"),
    ],
)
def test_an_invalid_sentinel_url_is_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match="invalid Redis URL") as caught:
        connect.validate_url(url)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        f"redis+sentinel://app:{CANARY}@h:1/m?db=x",
        f"redis+sentinel://h:1/m?sentinel_password={CANARY}&bogus=1",
        f"redis+sentinel://h:1/m?db=x&SENTINEL_PASSWORD={CANARY}",
        # Unencoded '@' in a parameter: refused, and the password still masked.
        f"redis+sentinel://h:1/m?sentinel_password={CANARY}@x{CANARY}",
        f"redis+sentinel://app:{CANARY}@h:1/m?sentinel_password={CANARY}@{CANARY}",
    ],
)
def test_no_error_about_a_sentinel_url_shows_a_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        connect.validate_url(url)
    assert CANARY not in str(caught.value)
    assert CANARY not in connect.redact_url(url)


def test_redacting_a_sentinel_url_keeps_everything_but_the_passwords() -> None:
    url = f"redis+sentinel://app:{CANARY}@s1:1,s2:2/m?db=1&sentinel_password={CANARY}"
    assert connect.redact_url(url) == (
        "redis+sentinel://app:***@s1:1,s2:2/m?db=1&sentinel_password=***"
    )


def test_settings_accept_a_sentinel_url_and_show_it_without_password() -> None:
    url = f"redis+sentinel://app:{CANARY}@s1:26379/m"
    settings = config.build(config.ConnectionSettings, redis_url=url)
    assert settings.safe_url == "redis+sentinel://app:***@s1:26379/m"


def test_tls_files_with_a_sentinel_url_are_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read")
    with pytest.raises(ConfigError, match="TLS is not supported with redis\\+sentinel"):
        connect.connect("redis+sentinel://h:26379/m", tls_ca_file=ca)


def test_the_sync_client_refuses_a_sentinel_url_clearly() -> None:
    with pytest.raises(ConfigError, match="SyncClient does not support redis\\+sentinel"):
        SyncClient("redis+sentinel://127.0.0.1:26379/mymaster")


@pytest.mark.anyio
async def test_a_sentinel_client_has_no_retries_and_short_sentinel_timeouts() -> None:
    client = connect.connect(
        "redis+sentinel://u:pw@127.0.0.1:1/m?db=2&sentinel_password=spw",
        socket_timeout=30,
        name="probe",
        max_connections=7,
    )
    try:
        pool: Any = client.connection_pool
        kwargs = pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("u", "pw", 2)
        assert kwargs["retry"].get_retries() == 0
        assert kwargs["socket_timeout"] == 30
        assert kwargs["client_name"] == "probe"
        assert pool.max_connections == 7
        (asked,) = pool.sentinel_manager.sentinels
        sentinel_kwargs = asked.connection_pool.connection_kwargs
        assert sentinel_kwargs["password"] == "spw"
        assert sentinel_kwargs["socket_timeout"] == sentinel.SENTINEL_TIMEOUT
        assert sentinel_kwargs["retry"].get_retries() == 0
        assert asked.single_connection_client
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_unreachable_sentinels_fail_fast_without_showing_a_password() -> None:
    ports = [_closed_port(), _closed_port()]
    url = f"redis+sentinel://app:{CANARY}@" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/m"
    client = connect.connect(url)
    try:
        began = time.monotonic()
        with anyio.fail_after(10), pytest.raises(RedisUnavailable) as caught:
            await connect.ping(client, url)
        assert time.monotonic() - began < 5
    finally:
        await client.aclose()
    assert CANARY not in str(caught.value)
    assert "No master found for 'm'" in str(caught.value)


@pytest.mark.parametrize(
    ("reply", "gone"),
    [
        ("NOREPLICAS Not enough good replicas to write.", True),
        ("UNBLOCKED force unblock from blocking operation, instance state changed", True),
        ("UNBLOCKED the stream key no longer exists", False),
        ("NOGROUP No such key or consumer group", False),
        ("ERR something else", False),
    ],
)
def test_only_replies_of_a_former_master_count_as_an_outage(reply: str, gone: bool) -> None:
    assert sentinel._master_gone(redis_sync.ResponseError(reply)) is gone


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- failover under load ----------------------------------------------------------------------


@pytest.fixture
def group() -> Iterator[LocalSentinel]:
    """1 master, 1 replica, 3 sentinels (quorum 2); the test waits for them to be ready."""
    _require_redis_server()
    with local_sentinel(sentinels=3, quorum=2, wait=False) as running:
        yield running


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    return tmp_path / "trace.txt"


StartWorker = Callable[[str, str], LoggedWorker]


@pytest.fixture
def start_worker(tmp_path: Path, trace_file: Path) -> Iterator[StartWorker]:
    """Start a ``work`` worker on a URL and namespace; all are killed at teardown."""
    started: list[LoggedWorker] = []

    def start(url: str, namespace: str) -> LoggedWorker:
        log = tmp_path / f"worker-{len(started)}.log"
        worker = spawn_worker(url, namespace, ROLE, log, clean_env(SFTEST_RECORD=str(trace_file)))
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture
async def admin(group: LocalSentinel) -> AsyncIterator[Redis]:
    """The test's own client of whichever server is master (through the sentinels)."""
    client = connect.connect(group.url, socket_timeout=2.0, name="test-admin")
    yield client
    await client.aclose()


@dataclass
class Publisher:
    """Publishes ``p-000000``, ``p-000001``, ... from a few tasks until stopped.

    Each message has its id as dedup key and is retried until Redis takes it, so every id is
    acknowledged once; ``acked`` maps it to the wall-clock time the acknowledgement arrived.
    """

    client: Client
    acked: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    stopping: bool = False
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    async def run(self) -> None:
        while not self.stopping:
            message_id = f"p-{next(self._numbers):06d}"
            await self._publish(message_id)
            self.acked[message_id] = time.time()
            await anyio.sleep(0.004)

    async def _publish(self, message_id: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                got = await self.client.publish(
                    ROLE, {}, message_id=message_id, dedup_key=message_id
                )
            except RedisUnavailable:
                self.failures += 1
                if time.monotonic() > deadline:
                    raise
                await anyio.sleep(0.05)
            else:
                assert got == message_id
                return

    def acked_after(self, moment: float) -> set[str]:
        # A copy first (one C call): a waiting thread reads this while publishers add to it.
        acked = self.acked.copy()
        return {m for m, at in acked.items() if at > moment}


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll ``predicate`` (sync, run in a thread) until true; fail naming ``what``."""
    try:
        with anyio.fail_after(timeout):
            while not await anyio.to_thread.run_sync(predicate):
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout} s") from None


def done(trace: list[Line]) -> Counter[str]:
    """How many times each message's handler ran to the end."""
    return Counter(line.message_id for line in trace if line.event == "DONE")


async def wait_settled(admin: Redis, namespace: str, timeout: float) -> None:
    """Until the role stream is empty and nothing is pending (everything acknowledged)."""
    stream = Keys(namespace).role_stream(ROLE)
    with anyio.fail_after(timeout):
        while True:
            with suppress(*connect.TRANSIENT_ERRORS):
                pending = int((await admin.xpending(stream, GROUP))["pending"])
                if pending == 0 and await admin.xlen(stream) == 0:
                    return
            await anyio.sleep(0.05)


def assert_same_processes_kept_working(workers: list[LoggedWorker]) -> None:
    """Each worker is the process that was started, started once and logged no traceback."""
    assert_healthy(workers)


@dataclass
class Failover:
    """When a failover happened, as the test saw it (wall-clock times, like the trace's)."""

    began: float  # the kill or the SENTINEL FAILOVER command
    dead_at: float  # the master process reaped, or the command answered
    promoted_at: float  # every sentinel names the replica
    followed_at: float  # by then every client has moved to the new master
    lag: tuple[int, int] = (0, 0)  # the replica's lag right before (bytes, seconds)


@dataclass
class Report:
    """What a failover cost, next to the documented bounds."""

    how: str
    failover: Failover
    acked: dict[str, float]
    failures: int
    lost: list[str]
    lost_bound: int
    duplicated: dict[str, int]
    duplicate_bound: int

    def __str__(self) -> str:
        f = self.failover
        return (
            f"failover report ({self.how}): {len(self.acked)} messages acknowledged to the "
            f"publisher, {self.failures} failed publish attempts retried; replica's last ack "
            f"before it {f.lag[1]} s old ({f.lag[0]} bytes behind then); sentinels promoted the "
            f"replica {f.promoted_at - f.began:.2f} s after it began; LOST {len(self.lost)} "
            f"(bound: {self.lost_bound} acknowledged in the window){self._lost_span()} "
            f"{self.lost[:8]}; "
            f"DUPLICATED {len(self.duplicated)} (bound: {self.duplicate_bound} started in the "
            f"window) {sorted(self.duplicated)[:8]}"
        )

    def _lost_span(self) -> str:
        if not self.lost:
            return ""
        times = [self.acked[m] - self.failover.began for m in self.lost]
        return f", acknowledged {min(times):+.2f} s to {max(times):+.2f} s from the start"


async def kill_master(group: LocalSentinel) -> Failover:
    """SIGKILL the master; the sentinels notice after DOWN_AFTER_MS and promote the replica."""
    lag = await anyio.to_thread.run_sync(group.replication_lag)
    began = time.time()
    await anyio.to_thread.run_sync(group.master.kill)
    dead_at = time.time()
    await wait_until(group.failed_over, 20, "sentinels promote the replica")
    promoted = time.time()
    # The old master is gone: nothing can be acknowledged by it after this.
    return Failover(began, dead_at, promoted, promoted, lag)


async def planned_failover(group: LocalSentinel) -> Failover:
    """SENTINEL FAILOVER: the replica is promoted while the old master still runs.

    The sentinels reconfigure the old master only ~10 s later; until then a connection still
    open to it writes there, and those writes are lost. streamflow's pool asks the sentinels
    every MASTER_CHECK_INTERVAL whether the master moved, which bounds that window.
    """
    began = time.time()
    with redis_sync.Redis(port=group.sentinels[0].port, socket_timeout=5) as asked:
        asked.execute_command("SENTINEL", "FAILOVER", SERVICE)
    answered = time.time()
    await wait_until(group.failed_over, 20, "sentinels promote the replica")
    promoted = time.time()
    return Failover(began, answered, promoted, promoted + sentinel.MASTER_CHECK_INTERVAL + 1.0)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["master killed", "SENTINEL FAILOVER"])
async def test_workers_follow_the_master_through_a_failover_under_load(
    how: str,
    group: LocalSentinel,
    admin: Redis,
    start_worker: StartWorker,
    trace_file: Path,
    namespace: str,
) -> None:
    workers = [start_worker(group.url, namespace) for _ in range(2)]
    await anyio.to_thread.run_sync(group.wait_ready)
    for worker in workers:
        await wait_until(worker.serving, 20, "worker logs 'serving'")
    client = Client(connect.connect(group.url, socket_timeout=2.0), namespace=namespace)
    publisher = Publisher(client)
    fail_over = kill_master if how == "master killed" else planned_failover
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(publisher.run)
                await wait_until(lambda: len(done(read_trace(trace_file))) >= 100, 15, "100 done")
                failover = await fail_over(group)
                await wait_until(
                    lambda: (
                        len(publisher.acked_after(failover.followed_at)) >= 150
                        and handled_by_each(
                            workers,
                            read_trace(trace_file),
                            publisher.acked_after(failover.followed_at),
                        )
                    ),
                    20,
                    "150 messages published after the failover, and each worker handling some",
                )
                publisher.stopping = True
            after = publisher.acked_after(failover.followed_at)
            await wait_until(
                lambda: after <= set(done(read_trace(trace_file))),
                20,
                "every message published after the failover handled",
            )
            await wait_settled(admin, namespace, 20)
    finally:
        await client.aclose()
    trace = read_trace(trace_file)
    report = account(how, failover, publisher, trace)
    print(f"\n{report}")

    assert_same_processes_kept_working(workers)
    for worker in workers:  # both processes handled messages published after the failover
        pid = worker.process.pid
        assert any(
            line.pid == pid and line.event == "DONE" and line.message_id in after for line in trace
        ), f"worker {pid} handled nothing after the failover\n{worker.stderr()}"
    if how == "master killed":
        assert publisher.failures > 0, "the publisher never saw the failover"
        assert any("Redis unavailable" in w.stderr() for w in workers)
    else:
        assert any("moved from" in w.stderr() for w in workers)
    assert set(done(trace)) <= set(publisher.acked), "a handler ran a message never published"
    # The documented bounds (docs/operations.md, "Redis Sentinel").
    window = lost_window(failover)
    for message_id in report.lost:
        assert window[0] <= publisher.acked[message_id] <= window[1], report
    first_start = first_starts(trace)
    for message_id in report.duplicated:
        assert first_start[message_id] <= window[1] + DUPLICATE_SLACK, report


def handled_by_each(workers: list[LoggedWorker], trace: list[Line], ids: set[str]) -> bool:
    """Whether every worker process has finished one of the messages ``ids``."""
    pids = {line.pid for line in trace if line.event == "DONE" and line.message_id in ids}
    return all(worker.process.pid in pids for worker in workers)


def lost_window(failover: Failover) -> tuple[float, float]:
    """When a lost message may have been acknowledged.

    A kill: what the replica had not received, i.e. the last moments before the kill (its
    last ack, up to a second old, bounds it). A planned failover: from the command until
    every client had moved to the new master.
    """
    if failover.followed_at == failover.promoted_at:  # killed: nothing acknowledged after
        return failover.began - LOST_WINDOW - failover.lag[1], failover.dead_at
    return failover.began, failover.followed_at


def first_starts(trace: list[Line]) -> dict[str, float]:
    first: dict[str, float] = {}
    for line in trace:
        if line.event == "START":
            first.setdefault(line.message_id, line.at)
    return first


def account(how: str, failover: Failover, publisher: Publisher, trace: list[Line]) -> Report:
    runs = done(trace)
    start, end = lost_window(failover)
    started = first_starts(trace)
    return Report(
        how=how,
        failover=failover,
        acked=publisher.acked,
        failures=publisher.failures,
        lost=sorted(m for m in publisher.acked if m not in runs),
        lost_bound=sum(start <= at <= end for at in publisher.acked.values()),
        duplicated={m: n for m, n in runs.items() if n > 1},
        duplicate_bound=sum(start <= at <= end + DUPLICATE_SLACK for at in started.values()),
    )


@pytest.mark.anyio
async def test_a_held_connection_follows_the_master_after_a_planned_failover(
    group: LocalSentinel, admin: Redis
) -> None:
    """A connection held out of the pool (a client's publishes, a worker's reads) is neither
    checked out nor released, where the pool follows the master: it asks before each use, and
    lands on the new master long before the sentinels reconfigure the old one (~10 s)."""
    await anyio.to_thread.run_sync(group.wait_ready)
    held = pipelines.Held(admin.connection_pool)
    try:
        with anyio.fail_after(30):
            assert await _port_of(held) == group.master.port
            await planned_failover(group)
        with anyio.fail_after(sentinel.MASTER_CHECK_INTERVAL + 3):
            while await _port_of(held) != group.replica.port:
                await anyio.sleep(0.05)
    finally:
        await held.aclose()


async def _port_of(held: pipelines.Held) -> int:
    """The port of the server the held connection talks to."""
    info = await held.execute(("INFO", "server"))
    text = info.decode() if isinstance(info, bytes) else str(info)
    return int(text.split("tcp_port:", 1)[1].split()[0])
