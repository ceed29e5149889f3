"""``streamflow worker --processes N``: a parent that runs, restarts and stops N worker children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from streamflow import config
from streamflow.cli.worker import worker, worker_settings
from streamflow.client import SyncClient
from streamflow.config import WorkerSettings
from streamflow.errors import ConfigError
from streamflow.ops.supervisor import child_command, child_settings
from tests.helpers import ROOT, clean_env, recorded, wait_for
from tests.processes import Record, Workers

pytestmark = [pytest.mark.redis, pytest.mark.slow]


# -- a child's settings go through its command line whole ------------------------------------


def unusual_settings(tmp_path: Path) -> WorkerSettings:
    """Settings in which every field differs from its default."""
    tls = {}
    for field in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        tls[field] = tmp_path / f"{field}.pem"
        tls[field].write_text("not read\n")
    return WorkerSettings(
        redis_url="rediss://user:S3cretCanary@redis.example:6380/2",
        namespace="ns1",
        **tls,
        app="tests.apps:app",
        roles=("record", "other"),
        concurrency=7,
        consumer_name="c1",
        processes=3,
        read_count=9,
        prefetch=5,
        block_ms=50,
        max_message_bytes=2048,
        shutdown_grace=1.5,
        dead_letter_max_len=10,
        lease_ttl=9.0,
        renew_interval=2.5,
        reclaim_interval=0.5,
        metrics_port=9100,
        metrics_host="0.0.0.0",
        strict=True,
        server_checks=False,
        parent_pid=1234,
        parent_fd=5,
    )


def parse_worker(argv: list[str], environment: dict[str, str]) -> WorkerSettings:
    """The settings ``streamflow worker ARGV`` builds with only ``environment`` set."""
    with pytest.MonkeyPatch.context() as patch:
        for name in config.ENV_VARS:
            patch.delenv(name, raising=False)
        for name, value in environment.items():
            patch.setenv(name, value)
        with worker.make_context("worker", argv) as ctx:
            return worker_settings(ctx.params)


def test_the_test_settings_differ_from_the_defaults_in_every_field(tmp_path: Path) -> None:
    settings, default = unusual_settings(tmp_path), WorkerSettings(app="other.module:app")
    assert [
        n for n in WorkerSettings.model_fields if getattr(settings, n) == getattr(default, n)
    ] == []


@pytest.mark.parametrize("unusual", [True, False], ids=["every-field-set", "defaults"])
def test_settings_to_command_line_and_back_give_the_same_settings(
    tmp_path: Path, unusual: bool
) -> None:
    settings = unusual_settings(tmp_path) if unusual else WorkerSettings(app="tests.apps:app")
    argv = config.command_line(settings)
    assert parse_worker(argv, settings.environment()) == settings
    assert "S3cretCanary" not in " ".join(argv)  # the password travels in the environment


def test_a_child_is_one_process_without_checks_with_its_own_name_port_and_lifeline(
    tmp_path: Path,
) -> None:
    settings = unusual_settings(tmp_path).model_copy(update={"server_checks": True})
    child = child_settings(settings, 2, lifeline=7)
    command = child_command(child)
    assert command[:4] == [sys.executable, "-m", "streamflow", "worker"]
    assert parse_worker(command[4:], settings.environment()) == child
    changed = {
        n: getattr(child, n)
        for n in WorkerSettings.model_fields
        if getattr(child, n) != getattr(settings, n)
    }
    assert changed == {
        "processes": 1,
        "server_checks": False,
        "parent_pid": os.getpid(),
        "parent_fd": 7,
        "consumer_name": "c1-2",
        "metrics_port": 9102,
    }


def test_a_child_metrics_port_past_65535_is_a_config_error(tmp_path: Path) -> None:
    settings = WorkerSettings(app="tests.apps:app", metrics_port=65_535)
    assert child_settings(settings, 0, lifeline=7).metrics_port == 65_535
    with pytest.raises(ConfigError, match="past 65535"):
        child_settings(settings, 1, lifeline=7)


def live_children(parent: subprocess.Popen[bytes]) -> set[int]:
    """Pids of the parent's child processes that are alive (zombies excluded)."""
    pids = set()
    try:
        children = psutil.Process(parent.pid).children()
    except psutil.NoSuchProcess:
        return set()
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


class Supervisor:
    """A ``streamflow worker --processes N`` parent; remembers every child pid it has seen."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log
        self.seen: set[int] = set()

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> set[int]:
        if self.process.poll() is not None:
            raise AssertionError(f"supervisor exited early:\n{self.stderr()}")
        pids = live_children(self.process)
        self.seen |= pids
        return pids

    def serving_count(self) -> int:
        return self.stderr().count(" serving ")

    def kill_all(self) -> None:
        for pid in self.seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def record_file(tmp_path: Path) -> Path:
    return tmp_path / "record.txt"


def start_supervisor(
    tmp_path: Path, redis_url: str, namespace: str, record_file: Path, *options: str
) -> Supervisor:
    """``streamflow worker --app tests.apps:app OPTIONS`` (give ``--processes N`` and roles)."""
    log = tmp_path / "supervisor.log"
    command = [sys.executable, "-m", "streamflow", "worker", "--app", "tests.apps:app", *options]
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [*command, "--redis-url", redis_url, "--namespace", namespace],
            cwd=ROOT,
            env=clean_env(SFTEST_RECORD=str(record_file)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return Supervisor(process, log)


@pytest.fixture
def supervisor(
    tmp_path: Path, redis_url: str, namespace: str, record_file: Path
) -> Iterator[Supervisor]:
    """A parent serving role ``record`` with 2 worker processes; all are killed at teardown."""
    sup = start_supervisor(
        tmp_path, redis_url, namespace, record_file, "--role", "record", "--processes", "2"
    )
    try:
        yield sup
    finally:
        sup.kill_all()


def publish(redis_url: str, namespace: str, count: int) -> list[str]:
    with SyncClient(redis_url, namespace=namespace) as client:
        return client.publish_many("record", [{"n": n} for n in range(count)])


def test_processes_2_runs_restarts_and_stops_two_worker_children(
    supervisor: Supervisor, redis_url: str, namespace: str, record_file: Path
) -> None:
    wait_for(lambda: len(supervisor.children()) == 2, 15, "2 worker children")
    first = supervisor.children()
    wait_for(lambda: supervisor.serving_count() >= 2, 15, "both children log 'serving'")

    ids = publish(redis_url, namespace, 20)
    wait_for(lambda: set(ids) <= set(recorded(record_file)), 10, "20 jobs recorded")

    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(children := supervisor.children()) == 2 and victim not in children,
        15,
        "a replacement child",
    )
    replacement = supervisor.children() - first
    assert len(replacement) == 1
    wait_for(lambda: supervisor.serving_count() >= 3, 15, "the replacement logs 'serving'")

    more = publish(redis_url, namespace, 5)
    wait_for(lambda: set(more) <= set(recorded(record_file)), 10, "5 more jobs recorded")

    all_children = set(supervisor.seen)
    assert all_children == first | replacement
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.process.wait(timeout=15) == 0, supervisor.stderr()
    assert not [pid for pid in all_children if psutil.pid_exists(pid)]
    assert "Traceback" not in supervisor.stderr()


# -- children die with their supervisor --------------------------------------------------------

#: Leases far longer than any wait below: work that moves on within them was released, not
#: adopted after its lease expired.
LONG_LEASE = ("--lease-ttl", "120", "--reclaim-interval", "0.2", "--block-ms", "200")
#: Slow on the doomed workers, quick on the one started afterwards.
SLOW_BUT_QUICK_ON_SURVIVOR = {"seconds": 600, "seconds_by_consumer": {"survivor": 0.1}}


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie left for a reaper does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def publish_work(redis_url: str, namespace: str, count: int) -> list[str]:
    with SyncClient(redis_url, namespace=namespace) as client:
        return client.publish_many("work", [SLOW_BUT_QUICK_ON_SURVIVOR] * count)


def assert_survivor_finishes(workers: Workers, record: Record, ids: list[str]) -> None:
    """A new worker finishes ``ids`` well within the lease TTL: they were released."""
    workers.start("survivor", lease=LONG_LEASE).wait_ready()
    wait_for(lambda: set(ids) <= record.ids("DONE", "survivor"), 30, "the survivor finishes")
    assert set(ids) <= record.ids("CANCELLED"), "the doomed handlers were not stopped"


def test_children_of_a_sigkilled_supervisor_stop_and_release_their_work(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    record = Record(tmp_path / "record.txt")
    workers = Workers(tmp_path, redis_url, namespace, record.path)
    options = ["--role", "work", "--processes", "2", "--consumer-name", "sup"]
    options += ["--concurrency", "2", "--prefetch", "0", "--shutdown-grace", "1", *LONG_LEASE]
    sup = start_supervisor(tmp_path, redis_url, namespace, record.path, *options)
    try:
        wait_for(lambda: sup.serving_count() >= 2, 30, "both children log 'serving'")
        children = sup.children()
        assert len(children) == 2
        ids = publish_work(redis_url, namespace, 4)
        wait_for(lambda: set(ids) <= record.ids("START"), 20, "the children start 4 jobs")
        assert {line.consumer for line in record.events("START")} == {"sup-0", "sup-1"}

        sup.process.kill()
        sup.process.wait(timeout=10)
        killed = time.monotonic()
        wait_for(lambda: not any(running(pid) for pid in children), 30, "the children exit")
        print(f"children exited {time.monotonic() - killed:.2f}s after the supervisor's SIGKILL")

        assert_survivor_finishes(workers, record, ids)
        assert "supervising process is gone" in sup.stderr() or "SIGTERM" in sup.stderr()
        assert "Traceback" not in sup.stderr(), sup.stderr()
    finally:
        sup.kill_all()
        workers.kill_all()


def test_worker_stops_and_releases_its_work_when_its_lifeline_pipe_closes(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """The portable path alone: the parent (this test) lives on, only the pipe reaches EOF."""
    record = Record(tmp_path / "record.txt")
    workers = Workers(tmp_path, redis_url, namespace, record.path)
    read_end, write_end = os.pipe()
    try:
        lifeline = ("--parent-pid", str(os.getpid()), "--parent-fd", str(read_end))
        child = workers.start(
            "child", *lifeline, "--shutdown-grace", "1", lease=LONG_LEASE, pass_fds=(read_end,)
        )
        os.close(read_end)
        child.wait_ready()
        ids = publish_work(redis_url, namespace, 2)
        wait_for(lambda: set(ids) <= record.ids("START", "child"), 20, "the child starts 2 jobs")

        os.close(write_end)
        write_end = -1
        assert child.process.wait(timeout=30) == 0, child.stderr()
        assert "supervising process is gone" in child.stderr()
        assert_survivor_finishes(workers, record, ids)
        child.assert_clean_log()
    finally:
        if write_end >= 0:
            os.close(write_end)
        workers.kill_all()


#: A stand-in supervisor: starts the worker command it is given as a child with a lifeline (the
#: fd in argv[1], inherited from the test, which keeps the write end open), prints the child's
#: pid, then waits to be killed.
FAKE_PARENT = """
import os, subprocess, sys, time
fd, command = sys.argv[1], sys.argv[2:]
command += ["--parent-pid", str(os.getpid()), "--parent-fd", fd]
child = subprocess.Popen(command, pass_fds=(int(fd),), stdin=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_gets_sigterm_from_the_kernel_when_its_parent_dies(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """The Linux path alone: the pipe stays open (this test holds it), the parent is killed."""
    log = tmp_path / "child.log"
    read_end, write_end = os.pipe()
    command = record_worker(redis_url, namespace)
    pid = 0
    try:
        with open(log, "wb") as err:
            parent = subprocess.Popen(
                [sys.executable, "-c", FAKE_PARENT, str(read_end), *command],
                cwd=ROOT,
                env=clean_env(SFTEST_RECORD=str(tmp_path / "record.txt")),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                pass_fds=(read_end,),
            )
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        parent.stdout.close()
        wait_for(lambda: b" serving " in log.read_bytes(), 30, "the child logs 'serving'")
        parent.kill()
        parent.wait(timeout=10)
        wait_for(lambda: not running(pid), 30, "the orphaned child exits")
        text = log.read_text(errors="replace")
        assert "SIGTERM: finishing in-flight work" in text, text
        assert "Traceback" not in text, text
    finally:
        os.close(read_end)
        os.close(write_end)
        if pid and running(pid):
            os.kill(pid, signal.SIGKILL)


def record_worker(redis_url: str, namespace: str) -> list[str]:
    """The command of a worker serving role ``record``."""
    command = [sys.executable, "-m", "streamflow", "worker", "--app", "tests.apps:app"]
    return [*command, "--role", "record", "--redis-url", redis_url, "--namespace", namespace]


def run_worker(redis_url: str, namespace: str, *options: str) -> subprocess.CompletedProcess[bytes]:
    """Run a worker that is expected to exit by itself."""
    return subprocess.run(
        [*record_worker(redis_url, namespace), *options],
        cwd=ROOT,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )


def test_worker_whose_parent_died_before_it_started_exits_at_once(
    redis_url: str, namespace: str
) -> None:
    """The race: the parent died before the child asked to be signalled (getppid differs)."""
    reply = run_worker(redis_url, namespace, "--parent-pid", str(os.getpid() + 100_000))
    assert reply.returncode == 0, reply.stderr
    assert b"is gone; not starting" in reply.stderr
    assert b" serving " not in reply.stderr


def test_worker_refuses_a_parent_fd_that_is_not_open(redis_url: str, namespace: str) -> None:
    reply = run_worker(redis_url, namespace, "--parent-fd", "987")
    assert reply.returncode == 2, reply.stderr
    assert b"--parent-fd 987 is not an open file descriptor" in reply.stderr
    assert b"Traceback" not in reply.stderr
