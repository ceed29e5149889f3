"""``streamflow worker --processes N``: a parent that runs, restarts and stops N worker children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from streamflow.client import SyncClient
from tests.helpers import ROOT, clean_env, recorded, wait_for

pytestmark = pytest.mark.redis


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


@pytest.fixture
def supervisor(
    tmp_path: Path, redis_url: str, namespace: str, record_file: Path
) -> Iterator[Supervisor]:
    """A parent serving role ``record`` with 2 worker processes; all are killed at teardown."""
    log = tmp_path / "supervisor.log"
    command = [sys.executable, "-m", "streamflow", "worker", "--app", "tests.apps:app"]
    command += ["--role", "record", "--processes", "2"]
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [*command, "--redis-url", redis_url, "--namespace", namespace],
            cwd=ROOT,
            env=clean_env(SFTEST_RECORD=str(record_file)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    sup = Supervisor(process, log)
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
