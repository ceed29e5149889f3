"""Crash tests of DAG tasks: workers and coordinators SIGKILLed while a task runs.

Every worker is a ``python -m streamflow worker --app tests.task_apps:app`` process and every
coordinator a ``python -m streamflow coordinator`` process. The task is always the same chain:

    src (40 batches of 5 ints, 0.1 s apart) --batch--> step (x2, 0.3 s per batch)
        --batch--> total (metrics.aggregate, in the coordinator)

Handlers append START / DONE lines to a record file outside the processes (see
``tests/task_apps.py``); Redis is inspected directly: the task's state hash, the role streams'
``entries-added`` (every job ever published to a role, deleted or not), pending lists and the
outbox. Coordinators are killed at chosen moments (holding published jobs not yet cleared,
holding unacknowledged events): the moment is polled for, the process
frozen with SIGSTOP, the moment checked again, then SIGKILL (:meth:`Process.kill_when`).
Leases are about a second so that the file runs in well under a minute on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import wait_for
from tests.processes import unique
from tests.task_processes import (
    BATCHES,
    Processes,
    Record,
    Store,
    assert_task_exact,
    submit,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def record(tmp_path: Path) -> Record:
    return Record(tmp_path / "record.txt")


@pytest.fixture
def processes(
    tmp_path: Path, redis_url: str, namespace: str, record: Record
) -> Iterator[Processes]:
    started = Processes(tmp_path, redis_url, namespace, record.path)
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


# -- 1. a worker killed mid-node ----------------------------------------------------------------


def test_worker_sigkilled_mid_node_is_adopted_and_the_task_counts_every_item_once(
    processes: Processes,
    store: Store,
    record: Record,
    redis_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    """Two workers; the one running the source is SIGKILLed while it also runs step
    invocations. The other adopts the source (which emits every batch again: the numbers
    already recorded are dropped) and the interrupted step runs. The source waits at a gate
    after half its batches, and the steps of the second quarter before they emit, until the
    kill: the source is still emitting and steps are in flight then, however slowly any
    process runs on a busy machine."""
    coordinator = processes.coordinator(unique("c"))
    workers = [processes.worker(unique("a")), processes.worker(unique("b"))]
    for process in [coordinator, *workers]:
        process.wait_ready()
    gate = tmp_path / "gate"
    task_id = submit(redis_url, namespace, gate)

    wait_for(lambda: bool(record.lines("START", "src")), 10, "the source starts")
    [src_run] = record.lines("START", "src")
    [victim] = [w for w in workers if w.pid == src_run.pid]
    [survivor] = [w for w in workers if w is not victim]

    def mid_node() -> bool:
        # The victim runs a step invocation while its source is still emitting, and a few
        # invocations finished already.
        return bool(record.in_flight("step", victim.pid)) and len(record.lines("DONE")) >= 3

    wait_for(mid_node, 60, "the victim runs step while its source emits")
    victim.kill()
    assert not record.lines("DONE", "src"), "the source finished before the kill"
    interrupted = record.in_flight("step", victim.pid)
    assert interrupted, "the kill did not land mid-node"
    at_kill = store.task(task_id).nodes
    assert at_kill["src"].batches_out < BATCHES and at_kill["step"].dispatched < BATCHES
    gate.touch()  # the survivor's rerun of the source goes through

    assert_task_exact(
        redis_url,
        namespace,
        store,
        record,
        task_id,
        killed={victim.pid},
        survivors=[coordinator, survivor],
    )
    # The survivor adopted the source and the victim's unfinished step runs, and ran them again.
    rerun = {line.invocation for line in record.lines("DONE", "step") if line.pid == survivor.pid}
    assert interrupted <= rerun, (interrupted, rerun)
    assert [line.pid for line in record.lines("DONE", "src")] == [survivor.pid]


# -- 2. a coordinator killed mid fan-out, then a new one -----------------------------------------


def test_coordinators_sigkilled_mid_fan_out_are_replaced_without_duplicate_dispatch(
    processes: Processes, store: Store, record: Record, redis_url: str, namespace: str
) -> None:
    """Two kills with step jobs published and not yet cleared from the outbox (their events not
    acknowledged either: both go with the coordinator's next read): first sampled mid-stream,
    then with events piled up. Each time a new coordinator takes over and must not publish them
    again. (On a single Redis a step's jobs are published in its commit's round trip, so there
    is no moment with jobs committed and not published to kill in: a coordinator dying there,
    as it can on a cluster, is tests/dag/test_coordinator.py's
    ``test_jobs_committed_and_never_published_are_published_once_by_another_coordinator``.)"""
    worker = processes.worker(unique("w"), concurrency=8)
    first = processes.coordinator(unique("c1"))
    for process in (worker, first):
        process.wait_ready()
    task_id = submit(redis_url, namespace)
    wait_for(
        lambda: store.task(task_id).nodes["step"].dispatched >= 8, 15, "8 step jobs dispatched"
    )

    def sent_not_cleared() -> set[int]:
        outbox, in_stream = store.outbox_and_stream(task_id, "step")
        return outbox & (in_stream | {line.invocation for line in record.lines("START", "step")})

    def piled_up() -> bool:
        # Source batches and step results waiting: the next step fans out jobs and runs
        # functions (reading their inputs) between publishing and clearing its outbox.
        return store.unread_events("src") >= 3 and store.unread_events("step") >= 3

    first.kill_when(
        lambda: bool(sent_not_cleared()) and not record.lines("DONE", "src"),
        10,
        "the outbox holds published step jobs while the source emits",
        sample=True,
    )
    at_first_kill = store.task(task_id).nodes["step"].dispatched
    assert sent_not_cleared() and at_first_kill < BATCHES, at_first_kill

    # Events pile up meanwhile: the new coordinator's first steps fan out many jobs at once.
    second = processes.coordinator(unique("c2"))
    second.kill_when(
        lambda: bool(sent_not_cleared()),
        20,
        "the outbox holds step jobs already published",
        while_frozen=piled_up,
    )
    at_second_kill = store.task(task_id).nodes["step"].dispatched
    assert sent_not_cleared() and at_second_kill < BATCHES, at_second_kill
    print(f"killed at {at_first_kill} and {at_second_kill} of {BATCHES} step jobs dispatched")

    third = processes.coordinator(unique("c3"))
    third.wait_ready()
    assert_task_exact(
        redis_url, namespace, store, record, task_id, killed=set(), survivors=[worker, third]
    )


# -- 3. two coordinators, one killed ------------------------------------------------------------


def test_one_of_two_coordinators_sigkilled_mid_task_the_other_finishes_it_exactly(
    processes: Processes, store: Store, record: Record, redis_url: str, namespace: str
) -> None:
    """Both coordinators share the events from the start; one is SIGKILLed holding events it
    read and did not acknowledge. The other adopts them after the lease TTL."""
    worker = processes.worker(unique("w"), concurrency=8)
    coordinators = [processes.coordinator(unique("c1")), processes.coordinator(unique("c2"))]
    for process in (worker, *coordinators):
        process.wait_ready()
    task_id = submit(redis_url, namespace)

    wait_for(
        lambda: store.task(task_id).nodes["step"].dispatched >= 8, 15, "8 step jobs dispatched"
    )
    victim = coordinators[0]

    def handling_events() -> bool:
        # The victim read task events and has not acknowledged them; more batches to come.
        return store.events_held(victim.name) > 0 and not record.lines("DONE", "src")

    victim.kill_when(handling_events, 10, "the victim holds task events while the source emits")
    held, at_kill = store.events_held(victim.name), store.task(task_id).nodes["step"]
    assert held and at_kill.dispatched < BATCHES, (held, at_kill)
    print(f"killed at {at_kill.dispatched} dispatched, holding {held} events")

    assert_task_exact(
        redis_url,
        namespace,
        store,
        record,
        task_id,
        killed=set(),
        survivors=[worker, coordinators[1]],
    )
