"""Worker processes for the process-level tests, and the record their handlers write.

``Workers`` starts ``streamflow worker --app tests.apps:app`` subprocesses (killed at teardown
by whoever made it); their handlers append START / DONE / FAIL / CANCELLED lines to a record
file outside Redis (see ``tests/apps.py``), which ``Record`` reads back. Used by the crash,
cluster, consumer-name, supervisor and untrusted-input tests.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.apps import Line, read_trace
from tests.helpers import CLI, ROOT, clean_env, wait_for

ROLE = "work"
TTL = 1.0
RECLAIM = 0.2
#: Lease options of most tests: adoption after ~1 s, a renewal every third of it.
FAST_LEASE = ("--lease-ttl", str(TTL), "--reclaim-interval", str(RECLAIM), "--block-ms", "200")


# -- the external record ----------------------------------------------------------------------


class Record:
    """The record file the handlers of every worker of a test append to."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[Line]:
        return read_trace(self.path)

    def events(self, event: str, consumer: str | None = None) -> list[Line]:
        return [
            line
            for line in self.lines()
            if line.event == event and (consumer is None or line.consumer == consumer)
        ]

    def ids(self, event: str, consumer: str | None = None) -> set[str]:
        return {line.message_id for line in self.events(event, consumer)}

    def counts(self, event: str) -> Counter[str]:
        return Counter(line.message_id for line in self.events(event))


# -- worker processes -------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """A ``streamflow worker`` subprocess with consumer name ``name``; stderr goes to ``log``."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the worker logs that it is serving; fail at once if it exits."""

        def serving() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.stderr()}")
            return " serving " in self.stderr()

        wait_for(serving, timeout, f"worker {self.name} logs 'serving'")

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the worker and reap it (it must have been alive)."""
        assert self.alive(), f"worker {self.name} died before it was killed:\n{self.stderr()}"
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=10) == -signal.SIGKILL

    def assert_clean_log(self) -> None:
        assert "Traceback" not in self.stderr(), self.stderr()


class Workers:
    """Starts ``streamflow worker --app tests.apps:app`` processes; all are killed at teardown."""

    def __init__(self, tmp_path: Path, redis_url: str, namespace: str, record: Path) -> None:
        self._tmp = tmp_path
        self._connection = ["--redis-url", redis_url, "--namespace", namespace]
        self._env = clean_env(SFTEST_RECORD=str(record))
        self.started: list[WorkerProcess] = []

    def start(
        self,
        name: str,
        *options: str,
        roles: Sequence[str] = (ROLE,),
        concurrency: int = 4,
        lease: Sequence[str] = FAST_LEASE,
        pass_fds: Sequence[int] = (),
    ) -> WorkerProcess:
        """Start a worker with consumer name ``name`` (unique within the test)."""
        log = self._tmp / f"worker-{name}.log"
        command = [*CLI, "worker", "--app", "tests.apps:app", *self._connection]
        for role in roles:
            command += ["--role", role]
        command += ["--consumer-name", name, "--concurrency", str(concurrency), *lease, *options]
        with open(log, "wb") as err:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=pass_fds,
            )
        worker = WorkerProcess(name, process, log)
        self.started.append(worker)
        return worker

    def kill_all(self) -> None:
        for worker in self.started:
            if worker.process.poll() is None:
                worker.process.kill()  # SIGKILL ends a SIGSTOPped process too
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=10)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def assert_none_lost_and_duplicates_allowed(
    record: Record, published: Sequence[str], may_repeat: set[str] | Counter[str]
) -> Counter[str]:
    """Every published id finished at least once, and at most once more per kill it was in
    flight at: ``may_repeat`` holds those ids (a Counter: how many kills). Returns the DONE
    counts of the published ids."""
    allowed = may_repeat if isinstance(may_repeat, Counter) else Counter(may_repeat)
    wanted = set(published)
    done = Counter({m: n for m, n in record.counts("DONE").items() if m in wanted})
    lost = [message_id for message_id in published if done[message_id] == 0]
    assert not lost, f"{len(lost)} of {len(published)} messages never finished: {lost[:10]}"
    repeated = {message_id: n for message_id, n in done.items() if n > 1}
    assert set(repeated) <= set(allowed), (
        f"processed more than once without having been in flight at a kill: "
        f"{sorted(set(repeated) - set(allowed))[:10]}"
    )
    excess = {m: n for m, n in repeated.items() if n > 1 + allowed[m]}
    assert not excess, f"processed more often than 1 + kills in flight: {excess}"
    return done
