"""One step of one task: load its state, apply events, commit, carry out its outbox.

The coordinator (:mod:`streamflow.dag.coordinator`) reads events, groups them by task and
hands each task's to :meth:`Stepper.process`, which:

1. loads the task's state (one HMGET, see :mod:`streamflow.dag.store`; none when this
   coordinator committed every step since it last read it) and applies the events
   with the pure state machine of :mod:`streamflow.dag.tasks`, taking role slots for the
   nodes that want one;
2. commits the new state with the step's decisions as outbox items (see
   :mod:`streamflow.dag.outbox`), version-checked: a concurrent commit by another coordinator
   makes it load again;
3. carries out the items it committed, and those that coordinator functions' results commit in
   turn. A tick of the task reads the outbox back from Redis instead, which finishes one left
   behind by a crashed coordinator.

Steps of one task in one process are serialized by a lock per task; across processes, by the
version check.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

import anyio
from redis.asyncio import Redis

from streamflow.dag.outbox import Item, Items, JobItem, Outbox, encode_item
from streamflow.dag.store import Loaded, TaskStore, UnrunnableTask
from streamflow.dag.tasks import Event, Internal, Step, TaskState, advance
from streamflow.dag.tracing import Carrier, Causes, TaskTracing, carrier_of, span_attributes
from streamflow.events import EventLog
from streamflow.keys import Keys
from streamflow.protocol import now_ms
from streamflow.records import TaskEvent
from streamflow.signals import CancelBook

logger = logging.getLogger(__name__)

#: Commits retried after losing a race with another coordinator, before giving up for now.
COMMIT_ATTEMPTS = 50
#: Outbox items carried out but not yet removed: (task id, item names).
Clears = list[tuple[str, list[str]]]
#: Rounds of carrying out items that coordinator functions' results committed, at most.
CARRY_OUT_ROUNDS = 100
#: The span context of each traced event's step span, by the event's identity.
StepSpans = dict[int, Carrier]


class Stepper:
    """Steps tasks for one coordinator.

    Args:
        redis: The client.
        keys: Key names.
        store: The coordinator's task store.
        outbox: The coordinator's outbox.
        book: The cancels heard so far (a cancelled task's step cancels it).
        limited: The roles with a limit on running nodes.

    Attributes:
        commits: Steps committed.
        conflicts: Commits lost to another coordinator's (then loaded and tried again).
        finished: Tasks ended, by state.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        store: TaskStore,
        outbox: Outbox,
        book: CancelBook,
        *,
        limited: frozenset[str],
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._store = store
        self._outbox = outbox
        self._book = book
        self._limited = limited
        self._locks: dict[str, anyio.Lock] = {}
        self.commits = 0
        self.conflicts = 0
        self.finished: dict[str, int] = {}
        #: Where the task's and its nodes' state changes are told, or None.
        self.events: EventLog | None = None
        #: What traces steps (see :mod:`streamflow.dag.tracing`), or None.
        self.tracing: TaskTracing | None = None

    async def process(
        self,
        task_id: str,
        events: list[Event],
        partials: dict[tuple[str, int], Any] | None = None,
        *,
        clears: Clears | None = None,
    ) -> None:
        """Apply events to one task, commit, and carry out its outbox.

        With ``clears``, the names of job items published are added to it instead of removed
        from the outbox at once: the caller removes them with its next writes (the coordinator,
        with the events' acknowledgement), a round trip fewer per step. Until then a tick
        would publish them again, which their dedup markers make harmless.
        """
        lock = self._locks.setdefault(task_id, anyio.Lock())
        try:
            async with lock:
                with ExitStack() as spans:
                    steps = self._step_spans(task_id, events, spans)
                    await self._step(task_id, events, partials, clears, steps)
        finally:
            if not lock.locked():
                self._locks.pop(task_id, None)

    async def _step(
        self,
        task_id: str,
        events: list[Event],
        partials: dict[tuple[str, int], Any] | None,
        clears: Clears | None,
        steps: StepSpans,
    ) -> None:
        items = await self._apply(task_id, events, partials, steps)
        if any(isinstance(e, Internal) and e.type == "tick" for e in events):
            # A tick also finishes an outbox that a crashed coordinator left behind:
            # read back, with what this step just wrote.
            items = await self._outbox.stored(task_id)
        # Function runs commit new steps, whose items are carried out in turn.
        for _ in range(CARRY_OUT_ROUNDS):
            if not items:
                break
            items = await self._carry_out(task_id, items, clears)

    def _step_spans(self, task_id: str, events: list[Event], spans: ExitStack) -> StepSpans:
        """A ``step <node>`` span per traced event, open until the step is carried out.

        Returns each traced event's span context, by the event's identity.
        """
        if self.tracing is None:
            return {}
        steps: StepSpans = {}
        for event in events:
            parent = carrier_of(event.trace) if isinstance(event, TaskEvent) else None
            if parent is None or not isinstance(event, TaskEvent):
                continue
            more: dict[str, str | int | bool | None] = {
                "streamflow.event.type": event.type,
                "streamflow.invocation": event.invocation,
                "streamflow.attempt": event.attempt,
                "streamflow.batch.seq": event.seq,
            }
            span = spans.enter_context(
                self.tracing.coordinator_span(
                    f"step {event.node_id}",
                    parent,
                    producer=False,
                    attributes=span_attributes(task_id, event.node_id, more),
                )
            )
            if span is not None:
                steps[id(event)] = span.carrier
        return steps

    async def _carry_out(self, task_id: str, items: Items, clears: Clears | None) -> Items:
        """Carry out outbox items; returns the items that function results committed."""
        carried = await self._outbox.carry_out(task_id, items)
        committed: Items = []
        if carried.events:
            # Function results are recorded first: their items go only once that is committed.
            committed = await self._apply(task_id, carried.events, carried.partials, {})
        if clears is not None and all(isinstance(item, JobItem) for _, item in items):
            clears.append((task_id, carried.done))  # only jobs: publishing again is harmless
        else:
            await self._store.clear_outbox(task_id, carried.done)
        return committed

    async def _apply(
        self,
        task_id: str,
        events: list[Event],
        partials: dict[tuple[str, int], Any] | None,
        steps: StepSpans,
    ) -> Items:
        """Apply events and commit; returns the outbox items the commit wrote, in order."""
        wanted = sorted(
            {f"{e.node_id}:{e.invocation}" for e in events if e.node_id and e.type != "tick"}
        )
        # A tick reads the state (it is what notices changes made elsewhere); other steps may
        # start from the state this coordinator committed last, which their commit confirms.
        verify = any(isinstance(e, Internal) and e.type == "tick" for e in events)
        for _ in range(COMMIT_ATTEMPTS):
            try:
                loaded = await self._store.load(task_id, wanted, verify=verify)
            except UnrunnableTask as exc:
                if await self._give_up(task_id, exc):
                    return []
                continue  # the state changed under us: look again
            if loaded is None:
                return []  # unknown or expired: nothing to do
            if loaded.task.terminal:
                await self._redis.srem(self._keys.tasks_active(), task_id)
                return []
            step = await self._decide(loaded, events, partials)
            if not step.changed and not verify:
                # Nothing to commit, so nothing confirms the state kept: read it and decide
                # again (events acknowledged as changing nothing must truly change nothing).
                verify = True
                continue
            if not step.changed:
                return []
            causes = self._causes(loaded, events, steps) if self.tracing is not None else None
            items = await self._outbox.items_of(loaded, step, causes)
            stored = {name: encode_item(item) for name, item in items.items()}
            version = await self._store.commit(loaded, step, stored, retention=step.task.terminal)
            if version is not None:
                return await self._committed(loaded, step, items)
            self.conflicts += 1
        # Its events stay pending (see Coordinator._handle), tried again after the lease TTL.
        raise RuntimeError(f"task {task_id}: lost {COMMIT_ATTEMPTS} commit races in a row")

    @staticmethod
    def _causes(loaded: Loaded, events: list[Event], steps: StepSpans) -> Causes:
        """The traced events among ``events``: their step span's context, or a function's."""
        traced: list[tuple[str, str | None, Carrier]] = []
        for event in events:
            carrier = steps.get(id(event)) if isinstance(event, TaskEvent) else event.trace
            if carrier is not None:
                traced.append((event.node_id, event.ref, carrier))
        return Causes(loaded.spec, traced)

    async def _committed(self, loaded: Loaded, step: Step, items: dict[str, Item]) -> Items:
        """After a commit: count it, tell its changes, end the task if it ended; its items."""
        self.commits += 1
        if self.events is not None:
            tell_changes(self.events, loaded.task, step)
        if step.task.terminal:
            await self._ended(loaded, step)
        return sorted(items.items(), key=lambda named: named[0])

    async def _decide(
        self, loaded: Loaded, events: list[Event], partials: dict[tuple[str, int], Any] | None
    ) -> Step:
        """The step the events (and a cancel of the task, if any) justify, slots taken."""
        task_id = loaded.task.id
        todo = list(events)
        cancel = self._book.for_task(task_id)
        if cancel is not None:
            todo.append(Internal("cancel", reason=cancel.reason or "cancelled"))
        step = self._advance(loaded, todo, partials, frozenset())
        if step.wants_slot:
            granted = await self._outbox.take_slots(task_id, loaded.spec, step.wants_slot)
            if granted:
                step = self._advance(loaded, todo, partials, granted)
        return step

    async def _ended(self, loaded: Loaded, step: Step) -> None:
        task_id, state = step.task.id, step.task.state
        await self._redis.srem(self._keys.tasks_active(), task_id)
        await self._store.expire_batches(loaded.spec, task_id)
        self.finished[state] = self.finished.get(state, 0) + 1
        logger.info("task %s %s", task_id, state)

    async def _give_up(self, task_id: str, exc: UnrunnableTask) -> bool:
        """End a task that cannot be run ``failed`` with the reason; False on a commit race."""
        reason = f"the coordinator cannot run this task: {exc.reason}"
        outcome = await self._store.fail(task_id, reason, now_ms()) if exc.writable else "failed"
        if outcome == "raced":
            return False
        await self._redis.srem(self._keys.tasks_active(), task_id)
        if outcome == "ended":
            return True  # failed by an earlier look (or ended before it was damaged)
        if self.events is not None:
            self.events.add(
                "task",
                task_id=task_id,
                state="failed",
                detail=reason,
                consumer=self.events.consumer,
            )
        logger.warning("task %s cannot run: %s", task_id, exc.reason)
        # Whatever it had dispatched (if its state was damaged mid-way) is cancelled too.
        await self._outbox.cancel_task(task_id, reason)
        self.finished["failed"] = self.finished.get("failed", 0) + 1
        return True

    def _advance(
        self,
        loaded: Loaded,
        events: list[Event],
        partials: dict[tuple[str, int], Any] | None,
        granted: frozenset[str],
    ) -> Step:
        return advance(
            loaded.spec,
            loaded.task,
            dict(loaded.invocations),
            events,
            now=now_ms(),
            limited_roles=self._limited,
            granted=granted,
            partials=partials,
        )


def tell_changes(events: EventLog, before: TaskState, step: Step) -> None:
    """Tell the state changes of a committed step: its nodes' first, then the task's."""
    after, consumer = step.task, events.consumer
    for node_id in sorted(step.touched):
        old, new = before.nodes.get(node_id), after.nodes.get(node_id)
        if new is not None and (old is None or old.state != new.state):
            events.add(
                "node",
                task_id=after.id,
                node_id=node_id,
                state=new.state,
                previous=old.state if old is not None else None,
                consumer=consumer,
            )
    if before.state != after.state:
        events.add(
            "task",
            task_id=after.id,
            state=after.state,
            previous=before.state,
            detail=after.error,
            consumer=consumer,
        )
