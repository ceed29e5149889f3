"""Crash load: N messages through W worker processes while workers are SIGKILLed and restarted.

Starts a private redis-server, W ``streamflow worker --app tests.apps:app --role work``
processes (each handler appends START and DONE lines to a record file outside the workers, see
``tests/apps.py``), publishes N jobs, and SIGKILLs one worker (and starts a fresh one in its
place) at ``--kills`` evenly spaced points of the run. At the end it compares the record with
the published ids and prints:

* ``lost``: published ids that never finished (must be 0);
* ``duplicates``: extra completions (an id finished twice counts 1);
* ``bound``: kills x concurrency, the most duplicates a kill should cause (a worker runs at
  most ``concurrency`` handlers), and the entries actually pending under each victim when it
  was killed (only those may run again);
* ``unexpected duplicates``: ids finished twice that were not pending under a victim (must
  be 0);
* ``elapsed``: from the first publish until the stream was empty with nothing pending.

Exits 1 when something was lost, a duplicate was unexpected, or duplicates exceed the bound.

    PYTHONPATH=. .venv/bin/python benchmarks/crash_load.py [--messages 50000] [--workers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from streamflow.client import SyncClient
from streamflow.keys import GROUP, Keys
from streamflow.ops.server import RedisServer
from tests.apps import read_trace

REPO_ROOT = Path(__file__).resolve().parent.parent
ROLE = "work"
APP = "tests.apps:app"


# -- helpers shared with adoption.py ------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)


@dataclass
class CliWorker:
    """One ``streamflow worker`` process; stderr goes to ``log``."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited early:\n{self.stderr()[-3000:]}")
        return " serving " in self.stderr()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


class CliWorkers:
    """Starts worker processes of ``tests.apps:app``; :meth:`close` ends every one."""

    def __init__(self, url: str, namespace: str, directory: Path, record: Path) -> None:
        self._connection = ["--redis-url", url, "--namespace", namespace]
        self._dir = directory
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["SFTEST_RECORD"] = str(record)
        self._env = env
        self.started: list[CliWorker] = []

    def start(self, name: str, options: Sequence[str]) -> CliWorker:
        log = self._dir / f"worker-{name}.log"
        command = [sys.executable, "-m", "streamflow", "worker", "--app", APP, "--role", ROLE]
        command += ["--consumer-name", name, *self._connection]
        with open(log, "wb") as err:
            process = subprocess.Popen(
                [*command, *options],
                cwd=REPO_ROOT,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        worker = CliWorker(name, process, log)
        self.started.append(worker)
        return worker

    def close(self) -> None:
        """SIGTERM the workers still running, then SIGKILL what is left after a few seconds."""
        running = [w for w in self.started if w.process.poll() is None]
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for worker in running:
            try:
                worker.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


def pending(client: redis.Redis, stream: str, consumer: str | None = None) -> list[dict[str, Any]]:
    """XPENDING rows of ``stream`` (for one consumer when given)."""
    if not client.exists(stream):
        return []
    rows: Any = client.xpending_range(stream, GROUP, "-", "+", 1_000_000, consumername=consumer)
    return list(rows)


@contextlib.contextmanager
def redis_for(url: str | None) -> Iterator[str]:
    """``url``, or the URL of a private redis-server started for the duration."""
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


# -- the crash load ------------------------------------------------------------------------------


@dataclass
class Kill:
    victim: str
    at_done: int
    pending_entries: set[str] = field(default_factory=set)


@dataclass
class Result:
    messages: int
    workers: int
    concurrency: int
    kills: list[Kill]
    elapsed: float
    lost: int
    duplicates: int
    unexpected: int
    dead_letters: int

    @property
    def bound(self) -> int:
        return len(self.kills) * self.concurrency

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.unexpected == 0 and self.duplicates <= self.bound


def run(args: argparse.Namespace, url: str) -> Result:
    namespace = "crash" + uuid.uuid4().hex[:8]
    keys = Keys(namespace)
    stream = keys.role_stream(ROLE)
    options = [
        "--concurrency",
        str(args.concurrency),
        "--lease-ttl",
        str(args.lease_ttl),
        "--reclaim-interval",
        str(args.reclaim_interval),
        "--block-ms",
        "200",
    ]
    client = redis.Redis.from_url(url)
    with tempfile.TemporaryDirectory(prefix="crash-load-") as tmp:
        directory = Path(tmp)
        record = directory / "record.txt"
        workers = CliWorkers(url, namespace, directory, record)
        try:
            slots = [workers.start(f"w{i}-0", options) for i in range(args.workers)]
            wait_for(lambda: all(w.ready() for w in slots), 60, "workers ready", 0.05)

            started = time.monotonic()
            with SyncClient(url, namespace=namespace) as publisher:
                ids = publisher.publish_many(ROLE, [{} for _ in range(args.messages)])

            def done() -> int:
                return int(args.messages) - int(client.xlen(stream))

            def reached(threshold: int) -> Callable[[], bool]:
                return lambda: done() >= threshold

            kills: list[Kill] = []
            for k in range(args.kills):
                threshold = args.messages * (k + 1) // (args.kills + 1)
                wait_for(reached(threshold), 600, f"{threshold} done", 0.01)
                index = k % len(slots)
                victim = slots[index]
                victim.kill()
                kill = Kill(victim.name, done())
                kill.pending_entries = {
                    row["message_id"].decode() for row in pending(client, stream, victim.name)
                }
                kills.append(kill)
                print(
                    f"kill {k + 1}: SIGKILL {victim.name} at {kill.at_done} done, "
                    f"{len(kill.pending_entries)} entries pending under it",
                    flush=True,
                )
                slots[index] = workers.start(f"w{index}-{k + 1}", options)

            wait_for(
                lambda: client.xlen(stream) == 0 and not pending(client, stream),
                max(120.0, args.messages / 200),
                "the stream drained",
                0.05,
            )
            elapsed = time.monotonic() - started
            dead_letters = int(client.xlen(keys.dead_letters(ROLE)))
        finally:
            workers.close()
            client.close()
        lines = read_trace(record)

    completions = Counter(line.message_id for line in lines if line.event == "DONE")
    lost = sum(1 for message_id in ids if completions[message_id] == 0)
    duplicates = sum(n - 1 for n in completions.values() if n > 1)
    allowed = {
        line.message_id
        for kill in kills
        for line in lines
        if line.event == "START"
        and line.consumer == kill.victim
        and line.entry_id in kill.pending_entries
    }
    unexpected = sum(1 for m, n in completions.items() if n > 1 and m not in allowed)
    return Result(
        messages=args.messages,
        workers=args.workers,
        concurrency=args.concurrency,
        kills=kills,
        elapsed=elapsed,
        lost=lost,
        duplicates=duplicates,
        unexpected=unexpected,
        dead_letters=dead_letters,
    )


def report(result: Result) -> None:
    rate = result.messages / result.elapsed if result.elapsed else 0.0
    print(f"messages = {result.messages}")
    print(f"workers = {result.workers} (concurrency {result.concurrency})")
    print(f"kills = {len(result.kills)}")
    print(f"elapsed = {result.elapsed:.2f} s ({rate:,.0f} msgs/s including kills and restarts)")
    print(f"lost = {result.lost}")
    print(f"duplicates = {result.duplicates}")
    at_kills = [len(k.pending_entries) for k in result.kills]
    print(
        f"bound = {result.bound} (kills x concurrency); pending under each victim at its kill: "
        f"{at_kills}"
    )
    print(f"unexpected duplicates = {result.unexpected}")
    print(f"dead letters = {result.dead_letters}")
    print("verdict = " + ("ok" if result.ok else "FAILED"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument("--reclaim-interval", type=float, default=0.5)
    parser.add_argument("--redis-url", help="use this Redis instead of a private redis-server")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.workers < 1 or args.kills < 0 or args.concurrency < 1:
        parser.error("--messages, --workers and --concurrency must be positive, --kills >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with redis_for(args.redis_url) as url:
        result = run(args, url)
    report(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
