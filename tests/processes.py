"""Worker processes for the process-level tests, and the record their handlers write.

``Workers`` starts ``streamflow worker --app tests.apps:app`` subprocesses (killed at teardown
by whoever made it); their handlers append START / DONE / FAIL / CANCELLED lines to a record
file outside Redis (see ``tests/apps.py``), which ``Record`` reads back. Used by the crash,
cluster, consumer-name, supervisor and untrusted-input tests. ``spawn_worker`` starts a
``LoggedWorker`` with short lease times (the outage and Sentinel tests); ``Shell`` runs the
docs' console commands as a reader would (the getting-started and protocol pages' tests).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.apps import Line, read_trace
from tests.helpers import CLI, ROOT, clean_env, free_port, wait_for

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
class Process:
    """A streamflow worker or coordinator subprocess; stderr goes to ``log``.

    ``ready_line`` is what it logs once it runs; ``assert_clean_log`` fails on any of
    ``unclean`` in its log.
    """

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    ready_line: str = " serving "
    unclean: tuple[str, ...] = ("Traceback",)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the process logs that it runs; fail at once if it exits."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.stderr()}")
            return self.ready_line in self.stderr()

        wait_for(ready, timeout, f"{self.name} logs {self.ready_line!r}")

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the process and reap it (it must have been alive)."""
        assert self.alive(), f"{self.name} died before it was killed:\n{self.stderr()}"
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=10) == -signal.SIGKILL

    def kill_when(
        self,
        condition: Callable[[], bool],
        timeout: float,
        what: str,
        *,
        while_frozen: Callable[[], bool] | None = None,
        sample: bool = False,
    ) -> None:
        """SIGKILL the process at a moment ``condition`` holds.

        The condition is polled; when it holds, the process is frozen (SIGSTOP) and the
        condition checked again (twice, so that what the process sent before it froze has
        landed): a process that moved on in between is thawed and polled again, so the kill
        lands in the state the condition describes, however brief. Before a thaw,
        ``while_frozen`` (if given) is awaited, e.g. until work piles up for the process.

        With ``sample``, for a moment too brief to be seen while the process runs (the time
        between two of its round trips), the process is frozen over and over instead, for a
        random sliver of a millisecond or two between freezes, and the condition checked while
        it is frozen.
        """
        if sample:
            self._kill_when_sampled(condition, timeout, what)
            return
        deadline = time.monotonic() + timeout

        def alive_and_condition() -> bool:
            assert self.alive(), f"{self.name} exited before the kill:\n{self.stderr()}"
            return condition()

        while True:
            left = max(deadline - time.monotonic(), 0)
            wait_for(alive_and_condition, left, what, every=0.001)
            self.process.send_signal(signal.SIGSTOP)
            # Checked twice: commands the process wrote just before it froze may still be in
            # Redis's socket buffer, handled in the same event-loop turn as the first check's
            # reads (in either order). By the second check's round trip they have landed.
            if condition() and condition():
                self.kill()
                return
            if while_frozen is not None:
                left = max(deadline - time.monotonic(), 0)
                wait_for(while_frozen, left, f"{what} (frozen)", every=0.01)
            self.process.send_signal(signal.SIGCONT)

    def _kill_when_sampled(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.alive(), f"{self.name} exited before the kill:\n{self.stderr()}"
            self.process.send_signal(signal.SIGSTOP)
            if condition() and condition():  # twice: see kill_when
                self.kill()
                return
            self.process.send_signal(signal.SIGCONT)
            time.sleep(random.uniform(0.0002, 0.002))  # let it run a random sliver, then look
        raise AssertionError(f"{what} not seen within {timeout} s of sampling")

    def assert_clean_log(self) -> None:
        log = self.stderr()
        assert not any(text in log for text in self.unclean), log


def popen_logged(
    command: Sequence[str], log: Path, env: dict[str, str], pass_fds: Sequence[int] = ()
) -> subprocess.Popen[bytes]:
    """Start ``command`` in the repository with no stdin or stdout and its stderr in ``log``."""
    with open(log, "wb") as err:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            pass_fds=pass_fds,
        )


def kill_all(started: Sequence[Process]) -> None:
    """SIGKILL every process still running (a SIGSTOPped one too) and reap them all."""
    for each in started:
        if each.process.poll() is None:
            each.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            each.process.wait(timeout=10)


class Workers:
    """Starts ``streamflow worker --app tests.apps:app`` processes; all are killed at teardown."""

    def __init__(self, tmp_path: Path, redis_url: str, namespace: str, record: Path) -> None:
        self._tmp = tmp_path
        self._connection = ["--redis-url", redis_url, "--namespace", namespace]
        self._env = clean_env(SFTEST_RECORD=str(record))
        self.started: list[Process] = []

    def start(
        self,
        name: str,
        *options: str,
        roles: Sequence[str] = (ROLE,),
        concurrency: int = 4,
        lease: Sequence[str] = FAST_LEASE,
        pass_fds: Sequence[int] = (),
    ) -> Process:
        """Start a worker with consumer name ``name`` (unique within the test)."""
        log = self._tmp / f"worker-{name}.log"
        command = [*CLI, "worker", "--app", "tests.apps:app", *self._connection]
        for role in roles:
            command += ["--role", role]
        command += ["--consumer-name", name, "--concurrency", str(concurrency), *lease, *options]
        process = popen_logged(command, log, self._env, pass_fds)
        worker = Process(name, process, log)
        self.started.append(worker)
        return worker

    def kill_all(self) -> None:
        kill_all(self.started)


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


# -- worker processes that log to a file (outage and Sentinel tests) ---------------------------


@dataclass
class LoggedWorker:
    """A ``streamflow worker`` subprocess whose stderr goes to ``log``."""

    process: subprocess.Popen[bytes]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def serving(self) -> bool:
        if not self.alive:
            raise AssertionError(f"worker exited early:\n{self.stderr()}")
        return "serving" in self.stderr()

    def kill(self) -> None:
        """SIGKILL it and every descendant, and reap it."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def spawn_worker(
    url: str, namespace: str, role: str, log: Path, env: dict[str, str]
) -> LoggedWorker:
    """``streamflow worker --app tests.apps:app --role ROLE`` with short block, lease and
    reclaim times, its stderr in ``log``."""
    command = [sys.executable, "-m", "streamflow", "worker", "--app", "tests.apps:app"]
    command += ["--role", role, "--redis-url", url, "--namespace", namespace]
    command += ["--block-ms", "200", "--lease-ttl", "2", "--reclaim-interval", "0.2"]
    process = popen_logged(command, log, env)
    return LoggedWorker(process, log)


def assert_healthy(workers: list[LoggedWorker]) -> None:
    """Still the same processes, each started once, no traceback in their logs."""
    for worker in workers:
        log = worker.stderr()
        assert worker.alive, log
        assert log.count(" serving ") == 1, log
        assert "Traceback" not in log, log


# -- the docs' console commands, run as a reader would -------------------------------------------


#: Redirects the page's ``redis-cli`` to the test's server (the page assumes the default one).
PRELUDE = 'redis-cli() { command redis-cli -u "$STREAMFLOW_REDIS_URL" "$@"; }\n'
#: Commands that change something: run once, never again to wait for an output.
MUTATING = (
    "streamflow publish",
    "streamflow submit",
    "streamflow cancel",
    "streamflow dlq replay",
    "streamflow dlq purge",
    "redis-cli XADD",
    "mkdir",
    "python publish.py",
)
#: How long a shown command may take, and be run again until it prints what is shown.
DEADLINE = 120.0


@dataclass
class Command:
    """One ``$`` line of a console block and the output lines shown after it."""

    line: str
    shown: list[str] = field(default_factory=list)


def pattern(shown: str) -> re.Pattern[str]:
    """A shown output line as a regex: ``...`` is any text, runs of spaces any white space."""
    parts = [r"\s+".join(map(re.escape, p.split())) for p in shown.strip().split("...")]
    return re.compile(r"\s*" + ".*".join(parts) + r"\s*")


def matches(shown: list[str], output: str) -> bool:
    """Each shown line matches a line of ``output``, in order (other lines may come between)."""
    lines = iter(output.splitlines())
    wanted = [pattern(s) for s in shown if s.strip() not in ("", "...")]
    return all(any(p.fullmatch(line) for line in lines) for p in wanted)


class Shell:
    """Runs the page's commands in one working directory; background ones until :meth:`close`."""

    def __init__(self, workdir: Path, logs: Path, redis_url: str) -> None:
        self.workdir = workdir
        self._logs = logs
        self._env = clean_env(STREAMFLOW_REDIS_URL=redis_url)
        self._env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self._env['PATH']}"
        self._port = str(free_port())
        self._background: list[subprocess.Popen[bytes]] = []

    def run(self, command: Command, *, once: bool = False) -> None:
        """Run ``command``; fail unless it exits 0 and prints what the page shows.

        A command that only reads is run again until it does (not with ``once``).
        """
        line = re.sub(r"(?<![0-9])9100(?![0-9])", self._port, command.line)
        if line.endswith("&"):
            self._start(line[:-1])
            return
        again = not once and not command.line.startswith(MUTATING)
        deadline = time.monotonic() + DEADLINE
        while True:
            done = subprocess.run(
                ["bash", "-c", PRELUDE + line],
                cwd=self.workdir,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=DEADLINE,
            )
            ok = done.returncode == 0 and matches(command.shown, done.stdout)
            if ok or not again or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # polling for a condition, not waiting for a process to be fast
        context = f"{line}\nexpected {command.shown}\ngot:\n{done.stdout}\n{self.background_logs()}"
        assert done.returncode == 0 and ok, context

    def _start(self, line: str) -> None:
        with open(self._logs / f"background-{len(self._background)}.log", "wb") as log:
            self._background.append(
                subprocess.Popen(
                    ["bash", "-c", PRELUDE + "exec " + line],
                    cwd=self.workdir,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group: the whole tree is stopped at close
                )
            )

    def background_logs(self) -> str:
        """The last lines the background commands wrote."""
        logs = sorted(self._logs.glob("background-*.log"))
        return "-- background:\n" + "\n".join(p.read_text()[-2000:] for p in logs)

    def close(self) -> None:
        """Stop every background command (SIGTERM, then SIGKILL after 30 s)."""
        for process in self._background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._background:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
