"""Crash tests: worker processes killed with real signals while they hold work.

Every worker is a separate ``python -m streamflow worker`` process serving the ``work`` (or
``poison``) role of ``tests.apps``; its handler appends START / DONE / FAIL / CANCELLED lines to
a record file outside the worker (see ``tests/apps.py``), and Redis itself is inspected with
XPENDING, XLEN and ZCARD. Workers are killed with SIGKILL, frozen with SIGSTOP/SIGCONT and
stopped with SIGTERM. Leases are short (about a second) so that the whole file runs in well
under a minute and a half on two cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from streamflow.client import SyncClient
from streamflow.keys import GROUP, Keys

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "streamflow"]
ROLE = "work"
TTL = 1.0
RECLAIM = 0.2
#: Lease options of most tests: adoption after ~1 s, a renewal every third of it.
FAST_LEASE = ("--lease-ttl", str(TTL), "--reclaim-interval", str(RECLAIM), "--block-ms", "200")
#: Slack for scheduling on a shared 2-core machine (process start-up is not included).
MARGIN = 1.0


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str = "condition", every: float = 0.02
) -> None:
    """Poll ``predicate`` every ``every`` seconds until it is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(every)


def clean_env(**extra: str) -> dict[str, str]:
    """The inherited environment without any STREAMFLOW_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env.update(extra)
    return env


# -- the external record ----------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line a ``work`` handler traced (see ``tests/apps.py``)."""

    event: str
    message_id: str
    entry_id: str
    attempt: int
    pid: int
    consumer: str
    at: float


class Record:
    """The record file the handlers of every worker of a test append to."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[Line]:
        if not self.path.exists():
            return []
        out = []
        # A line is written with one write(); a reader may still catch the last one half
        # written, so only lines ending in a newline count.
        for raw in self.path.read_text().split("\n")[:-1]:
            event, message_id, entry_id, attempt, pid, consumer, at = raw.split(" ")
            out.append(
                Line(event, message_id, entry_id, int(attempt), int(pid), consumer, float(at))
            )
        return out

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


# -- Redis, as the tests see it -----------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    entry_id: str
    consumer: str
    deliveries: int


class Store:
    """Read-only views of one namespace's keys, for assertions."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.keys = Keys(namespace)

    def pending(self, role: str = ROLE, consumer: str | None = None) -> list[Pending]:
        stream = self.keys.role_stream(role)
        if not self.client.exists(stream):
            return []
        rows: Any = self.client.xpending_range(
            stream, GROUP, "-", "+", 100_000, consumername=consumer
        )
        return [
            Pending(r["message_id"].decode(), r["consumer"].decode(), int(r["times_delivered"]))
            for r in rows
        ]

    def stream_length(self, role: str = ROLE) -> int:
        return int(self.client.xlen(self.keys.role_stream(role)))

    def scheduled(self, role: str = ROLE) -> int:
        return int(self.client.zcard(self.keys.delayed(role)))

    def dead_letters(self, role: str = ROLE) -> list[dict[bytes, bytes]]:
        reply: Any = self.client.xrange(self.keys.dead_letters(role))
        return [fields for _, fields in reply]

    def settled(self, role: str = ROLE) -> bool:
        """Nothing left anywhere: stream empty (delete on ack), nothing pending or scheduled."""
        return not self.pending(role) and self.stream_length(role) == 0 and not self.scheduled(role)


@pytest.fixture
def record(tmp_path: Path) -> Record:
    return Record(tmp_path / "record.txt")


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, namespace: str, record: Record) -> Iterator[Workers]:
    started = Workers(tmp_path, redis_url, namespace, record.path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture
def store(redis_url: str, namespace: str) -> Iterator[Store]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield Store(client, namespace)
    finally:
        client.close()


Publish = Callable[..., list[str]]


@pytest.fixture
def publish(redis_url: str, namespace: str) -> Iterator[Publish]:
    """``publish(payloads, role="work")``: publish jobs and return their message ids in order."""
    with SyncClient(redis_url, namespace=namespace) as client:

        def send(payloads: Sequence[Any], role: str = ROLE) -> list[str]:
            return client.publish_many(role, payloads)

        yield send


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def assert_none_lost_and_duplicates_allowed(
    record: Record, published: Sequence[str], may_repeat: set[str]
) -> Counter[str]:
    """Every published id finished at least once; only ``may_repeat`` ids more than once (and
    those at most twice). Returns the DONE counts."""
    done = record.counts("DONE")
    lost = [message_id for message_id in published if done[message_id] == 0]
    assert not lost, f"{len(lost)} of {len(published)} messages never finished: {lost[:10]}"
    repeated = {message_id: n for message_id, n in done.items() if n > 1}
    assert set(repeated) <= may_repeat, (
        f"processed more than once without having been in flight at a kill: "
        f"{sorted(set(repeated) - may_repeat)[:10]}"
    )
    assert all(n == 2 for n in repeated.values()), repeated
    assert set(done) <= set(published), "a message nobody published was processed"
    return done


# -- 1. SIGKILL with in-flight messages ----------------------------------------------------------


def test_sigkilled_worker_in_flight_messages_are_adopted_within_lease_ttl_and_finished_once(
    workers: Workers, store: Store, publish: Publish, record: Record
) -> None:
    a_name, b_name = unique("a"), unique("b")
    # The victim alone first, so that it takes these jobs. (A SIGSTOPped second worker would
    # not do: Redis still serves the XREADGROUP it was blocked in when it was stopped.)
    victim = workers.start(a_name, concurrency=4)
    victim.wait_ready()
    quick = publish([{"seconds": 0.05}] * 4)
    # Slow on the victim (it is killed long before), quick on whoever adopts them.
    slow = publish([{"seconds_by_consumer": {a_name: 60, b_name: 0.5}}] * 4)
    wait_for(lambda: set(slow) <= record.ids("START", a_name), 10, "the victim starts 4 slow")
    survivor = workers.start(b_name, concurrency=16)
    survivor.wait_ready()
    # The survivor gets work of its own; the victim is full (concurrency 4) and reads nothing.
    other = publish([{"seconds": 0.5}] * 6)
    wait_for(lambda: set(other) <= record.ids("START", b_name), 10, "the survivor starts its 6")

    victim.kill()
    killed_at, killed_wall = time.monotonic(), time.time()
    in_pel = {p.entry_id for p in store.pending(consumer=a_name)}
    started = record.events("START", a_name)
    in_flight = {line.message_id for line in started} - record.ids("DONE", a_name)
    assert in_flight == set(slow)
    assert {line.entry_id for line in started if line.message_id in in_flight} <= in_pel

    wait_for(lambda: not store.pending(consumer=a_name), 10, "the victim's entries adopted")
    adopted_after = time.monotonic() - killed_at
    wait_for(lambda: set(slow) <= record.ids("DONE", b_name), 10, "the adopted entries finished")
    finished_after = max(line.at for line in record.events("DONE") if line.message_id in slow)
    finished_after -= killed_wall
    wait_for(store.settled, 5, "every entry acknowledged")
    print(f"kill -> adopted {adopted_after:.2f}s, -> finished {finished_after:.2f}s (TTL {TTL}s)")

    renew_every = TTL / 3
    # Not before the lease could have expired (last renewal at most one period before the kill)
    assert adopted_after >= TTL - renew_every - 0.1, adopted_after
    # and within one TTL plus one reclaim step (plus scheduling slack).
    assert adopted_after <= TTL + RECLAIM + MARGIN, (
        f"adopted {adopted_after:.2f}s after the kill (TTL {TTL}s, reclaim {RECLAIM}s)"
    )
    assert finished_after <= TTL + RECLAIM + 0.5 + MARGIN, (
        f"finished {finished_after:.2f}s after the kill (TTL {TTL}s, reclaim {RECLAIM}s, "
        "handler 0.5s)"
    )
    assert_none_lost_and_duplicates_allowed(record, quick + slow + other, in_flight)
    # An adoption after a crash is not a failed attempt.
    assert {line.attempt for line in record.events("START", b_name)} == {1}
    assert not store.dead_letters()
    survivor.assert_clean_log()


# -- 2. a long handler on a live worker ---------------------------------------------------------


def test_handler_running_five_times_the_lease_ttl_on_a_live_worker_runs_exactly_once(
    workers: Workers, store: Store, publish: Publish, record: Record
) -> None:
    running = [workers.start(unique("a")), workers.start(unique("b"))]
    for worker in running:
        worker.wait_ready()
    [message_id] = publish([{"seconds": 5 * TTL}])
    wait_for(lambda: message_id in record.ids("START"), 10, "the handler starts")
    [start] = record.events("START")

    def finished_while_renewed() -> bool:
        # While it runs it stays with its first consumer and its first delivery.
        for pending in store.pending():
            assert (pending.consumer, pending.deliveries) == (start.consumer, 1), pending
        return message_id in record.ids("DONE")

    wait_for(finished_while_renewed, 5 * TTL + 10, "the handler finishes")
    wait_for(store.settled, 5, "the entry acknowledged")

    assert [line.event for line in record.lines()] == ["START", "DONE"]
    [done] = record.events("DONE")
    assert done.consumer == start.consumer
    assert done.at - start.at >= 5 * TTL
    assert not store.dead_letters()
    for worker in running:
        assert worker.alive()
        assert "adopted" not in worker.stderr() and "lost" not in worker.stderr()
        worker.assert_clean_log()


# -- 3. fencing: a frozen worker comes back after its entry was adopted --------------------------


@pytest.mark.parametrize(
    ("behaviour", "a_event"),
    [
        ("renewal_cancels_the_handler", "CANCELLED"),
        ("late_ack_is_refused", "DONE"),
        ("late_retry_is_refused", "FAIL"),
        ("late_dead_letter_is_refused", "FAIL"),
    ],
)
def test_frozen_worker_resumed_after_adoption_applies_no_outcome(
    workers: Workers, store: Store, publish: Publish, record: Record, behaviour: str, a_event: str
) -> None:
    a_name, b_name = unique("a"), unique("b")
    lease = (*FAST_LEASE, "--renew-interval", "0.2")
    frozen = workers.start(a_name, lease=lease)
    frozen.wait_ready()
    payload: dict[str, Any] = {"seconds_by_consumer": {a_name: 8.0, b_name: 0.3}}
    if behaviour != "renewal_cancels_the_handler":
        # The handler ignores cancellation: A finishes it after the resume and tries to settle.
        payload = {"seconds_by_consumer": {a_name: 2.5, b_name: 0.3}, "shield": True}
        if behaviour == "late_retry_is_refused":
            payload["end_by_consumer"] = {a_name: "retry"}
        elif behaviour == "late_dead_letter_is_refused":
            payload["end_by_consumer"] = {a_name: "fatal"}

    [message_id] = publish([payload])
    wait_for(lambda: message_id in record.ids("START", a_name), 10, "A starts the message")
    frozen.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    adopter = workers.start(b_name, lease=lease)

    wait_for(lambda: message_id in record.ids("DONE", b_name), 10, "B adopts and finishes it")
    wait_for(store.settled, 5, "B's ack")
    assert time.monotonic() - frozen_at > TTL
    frozen.signal(signal.SIGCONT)

    wait_for(lambda: message_id in record.ids(a_event, a_name), 10, f"A traces {a_event}")
    wait_for(
        lambda: "its outcome was not applied" in frozen.stderr(), 10, "A reports the lost lease"
    )
    # Nothing A did after the resume reached Redis: no re-queue, no schedule, no dead letter.
    assert store.settled()
    assert not store.dead_letters()
    assert record.ids("START", b_name) == record.ids("DONE", b_name) == {message_id}
    assert record.counts("START")[message_id] == 2  # A's first run and B's adoption, no third
    assert [line.consumer for line in record.events("DONE") if line.consumer != a_name] == [b_name]
    assert frozen.alive() and adopter.alive()
    frozen.assert_clean_log()
    adopter.assert_clean_log()


def blocked_in_read(store: Store, consumer: str) -> bool:
    """Whether a connection of worker ``consumer`` is blocked in XREADGROUP right now."""
    clients: Any = store.client.client_list()
    return any(
        c.get("name") == f"streamflow-worker-{consumer}"
        and c.get("cmd") == "xreadgroup"
        and "b" in c.get("flags", "")
        for c in clients
    )


def test_entry_delivered_to_a_frozen_worker_and_adopted_elsewhere_is_not_started_on_resume(
    workers: Workers, store: Store, publish: Publish, record: Record
) -> None:
    """Redis serves the XREADGROUP a worker was blocked in when it froze: the entry becomes
    pending under the frozen worker, is adopted by a live one after the TTL, and the reply
    still waits in the frozen worker's socket. On resume it must not start that entry: the
    live worker holds its lease and is running it."""
    a_name, b_name = unique("a"), unique("b")
    slow_reader = (*FAST_LEASE[:-2], "--block-ms", "10000")
    frozen = workers.start(b_name, lease=slow_reader)
    frozen.wait_ready()
    wait_for(lambda: blocked_in_read(store, b_name), 10, "B blocks in XREADGROUP")
    frozen.signal(signal.SIGSTOP)
    assert blocked_in_read(store, b_name)
    [message_id] = publish([{"seconds": 3.0}])
    wait_for(lambda: bool(store.pending(consumer=b_name)), 5, "Redis delivers it to frozen B")

    adopter = workers.start(a_name)
    wait_for(lambda: message_id in record.ids("START", a_name), 15, "A adopts and starts it")
    frozen.signal(signal.SIGCONT)
    # Time must pass here: A's handler runs 3 s, many of B's renewal periods.
    wait_for(lambda: message_id in record.ids("DONE", a_name), 10, "A finishes it")
    wait_for(store.settled, 5, "A's ack")

    assert record.ids("START", b_name) == set(), (
        "B started an entry whose lease A held (it ran both at once):\n"
        + "\n".join(f"{line.event} {line.consumer} {line.at:.3f}" for line in record.lines())
    )
    assert record.counts("DONE")[message_id] == 1
    assert frozen.alive() and adopter.alive()


# -- 4. poison: a message that kills its worker --------------------------------------------------


def test_message_that_sigkills_its_worker_is_dead_lettered_after_max_deliveries(
    workers: Workers, store: Store, publish: Publish, record: Record
) -> None:
    max_deliveries = 3  # of the role "poison"
    normal = publish([{"seconds": 0.05}] * 20)
    [poison] = publish([{"kill": True}], role="poison")
    deaths = 0
    worker = workers.start(unique("w0"), roles=("poison", ROLE))
    while not store.dead_letters("poison"):
        wait_for(
            lambda w=worker: not w.alive() or bool(store.dead_letters("poison")),
            TTL + 20,
            "the worker dies or the poison is dead-lettered",
        )
        if not worker.alive():
            assert worker.process.returncode == -signal.SIGKILL, worker.stderr()
            deaths += 1
            assert deaths <= max_deliveries, "the poison message was started too many times"
            # A fresh worker (fresh consumer name) adopts the entry after the lease TTL.
            worker = workers.start(unique(f"w{deaths}"), roles=("poison", ROLE))

    wait_for(lambda: set(normal) <= record.ids("DONE"), 15, "the normal messages finish")
    wait_for(lambda: store.settled("poison") and store.settled(ROLE), 5, "everything settled")

    assert deaths == max_deliveries
    assert record.counts("START")[poison] == max_deliveries
    [letter] = store.dead_letters("poison")
    doc = orjson.loads(letter[b"dead_letter"])
    assert doc["reason"] == "max_deliveries", doc
    assert doc["message_id"] == poison
    assert worker.alive()
    worker.assert_clean_log()
    assert not store.dead_letters(ROLE)
    # Normal messages in flight at a crash may run again; none is lost.
    crashed = {line.consumer for line in record.events("START") if line.message_id == poison}
    may_repeat = {line.message_id for line in record.events("START") if line.consumer in crashed}
    assert_none_lost_and_duplicates_allowed(record, normal, may_repeat)


# -- 5. delayed retries survive a restart of every worker ----------------------------------------


def test_scheduled_retry_runs_after_every_worker_was_sigkilled_and_a_new_one_started(
    workers: Workers, store: Store, publish: Publish, record: Record
) -> None:
    first = [workers.start(unique("a")), workers.start(unique("b"))]
    for worker in first:
        worker.wait_ready()
    [message_id] = publish([{"fail_attempts": 1, "retry_delay": 2.0}])
    wait_for(lambda: message_id in record.ids("FAIL"), 10, "attempt 1 fails")
    wait_for(
        lambda: store.scheduled() == 1 and not store.pending() and store.stream_length() == 0,
        5,
        "the retry is scheduled and the entry settled",
    )
    for worker in first:
        worker.kill()
    assert store.scheduled() == 1

    fresh = workers.start(unique("c"))
    wait_for(lambda: message_id in record.ids("DONE"), 20, "attempt 2 runs after the restart")
    wait_for(store.settled, 5, "everything settled")

    [fail] = record.events("FAIL")
    [done] = record.events("DONE")
    assert [(line.event, line.attempt) for line in record.lines()] == [
        ("START", 1),
        ("FAIL", 1),
        ("START", 2),
        ("DONE", 2),
    ]
    assert done.consumer == fresh.name
    [second_start] = [line for line in record.events("START") if line.attempt == 2]
    assert second_start.at - fail.at >= 2.0 - 0.1, "the retry ran before its delay"
    assert not store.dead_letters()
    fresh.assert_clean_log()


# -- 6. SIGTERM releases unfinished entries ------------------------------------------------------


def test_sigterm_releases_unfinished_entries_for_prompt_adoption_without_burning_an_attempt(
    workers: Workers, store: Store, publish: Publish, record: Record
) -> None:
    ttl, grace = 20.0, 0.5
    lease = ("--lease-ttl", str(ttl), "--reclaim-interval", str(RECLAIM), "--block-ms", "200")
    a_name, b_name = unique("a"), unique("b")
    leaving = workers.start(a_name, "--shutdown-grace", str(grace), lease=lease)
    leaving.wait_ready()
    ids = publish([{"seconds_by_consumer": {a_name: 60, b_name: 1.0}}] * 4)
    wait_for(lambda: set(ids) <= record.ids("START", a_name), 10, "A starts all 4")
    staying = workers.start(b_name, lease=lease)
    staying.wait_ready()
    before = store.pending(consumer=a_name)
    assert len(before) == 4 and {p.deliveries for p in before} == {1}

    leaving.signal(signal.SIGTERM)
    terminated_at = time.monotonic()
    assert leaving.process.wait(timeout=grace + 10) == 0, leaving.stderr()
    exited_after = time.monotonic() - terminated_at
    assert exited_after <= grace + 3.0, f"A took {exited_after:.2f}s to exit"
    assert record.ids("CANCELLED", a_name) == set(ids)

    adopted: dict[str, Pending] = {}

    def all_adopted() -> bool:
        adopted.update({p.entry_id: p for p in store.pending(consumer=b_name)})
        return len(adopted) == 4

    wait_for(all_adopted, ttl / 2, "B adopts the released entries")
    adopted_after = time.monotonic() - terminated_at
    # The release did not count as a delivery: the adoption brought the count back to 1.
    assert {p.deliveries for p in adopted.values()} == {1}, adopted
    assert set(adopted) == {p.entry_id for p in before}
    wait_for(lambda: set(ids) <= record.ids("DONE", b_name), 10, "B finishes them")
    wait_for(store.settled, 5, "everything settled")

    print(f"SIGTERM -> exit {exited_after:.2f}s, -> adopted {adopted_after:.2f}s (TTL {ttl}s)")
    assert adopted_after < ttl / 4, f"adopted {adopted_after:.2f}s after SIGTERM (TTL {ttl}s)"
    assert {line.attempt for line in record.events("START", b_name)} == {1}
    assert_none_lost_and_duplicates_allowed(record, ids, set())
    assert not store.dead_letters()
    leaving.assert_clean_log()
    staying.assert_clean_log()


# -- 7. load with kills and restarts -------------------------------------------------------------


def test_load_with_a_worker_sigkilled_and_restarted_twice_loses_nothing(
    workers: Workers, store: Store, publish: Publish, record: Record
) -> None:
    messages, concurrency = 3000, 8
    lease = ("--lease-ttl", "1.5", "--reclaim-interval", str(RECLAIM), "--block-ms", "200")

    def start(name: str) -> WorkerProcess:
        return workers.start(name, concurrency=concurrency, lease=lease)

    steady = [start(unique(f"s{i}")) for i in range(3)]
    target = start(unique("k0"))
    for worker in [*steady, target]:
        worker.wait_ready()
    ids = publish([{"seconds": 0.05}] * messages)

    may_repeat: set[str] = set()
    in_pel_at_kills: list[int] = []
    for kill in range(2):
        if kill == 0:
            wait_for(lambda: len(record.ids("DONE")) >= messages // 20, 30, "5% done", 0.05)
        else:
            target.wait_ready()
            wait_for(
                lambda n=target.name: len(record.ids("DONE", n)) >= 20, 30, "restart works", 0.05
            )
        assert len(record.ids("DONE")) < messages, "the run ended before the kill"
        target.kill()
        entries = {p.entry_id for p in store.pending(consumer=target.name)}
        in_pel_at_kills.append(len(entries))
        may_repeat |= {
            line.message_id
            for line in record.events("START", target.name)
            if line.entry_id in entries
        }
        target = start(unique(f"k{kill + 1}"))

    wait_for(lambda: set(ids) <= record.ids("DONE"), 60, "every message finished", 0.2)
    wait_for(store.settled, 10, "everything settled")

    done = assert_none_lost_and_duplicates_allowed(record, ids, may_repeat)
    duplicates = sum(n - 1 for n in done.values())
    print(f"duplicates {duplicates}; pending under the victim at each kill: {in_pel_at_kills}")
    assert duplicates <= 2 * concurrency, (
        f"{duplicates} duplicates after 2 kills at concurrency {concurrency} "
        f"(entries pending under the victim at each kill: {in_pel_at_kills})"
    )
    assert not store.dead_letters()
    for worker in [*steady, target]:
        assert worker.alive()
        worker.assert_clean_log()
