"""Task state and the rules that move it: a pure state machine, no I/O.

The coordinator loads a task's state, calls :func:`advance` with the events it read, and
commits the resulting :class:`Step` in one version-checked script: new state, new outputs and
the dispatches the events justify (into the task's outbox) together. Applying the same events
twice changes nothing the second time, so a coordinator that crashed mid-way can be replaced by
another that simply processes the same events again.

States only move forward: a task goes ``queued -> running -> succeeded | failed | cancelled``;
a node goes ``queued -> running -> succeeded | failed | cancelled | skipped`` (``skipped``: a
remediation node whose parents all succeeded; a node that can never run because a parent
failed, even a remediated one, is ``cancelled``).

Past the ~600 lines of the house rule on purpose: the records (``TaskState``, ``NodeState``,
``Invocation``, ``Step``) and the rules that move them (``_Machine``) are one state machine.
Every rule reads and writes these records, and what makes a step safe to apply twice (states
only move forward, invocations record each batch once, older runs are fenced) is seen only
with both on one page; split, the records' invariants would sit away from the rules that rely
on them.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from streamflow.dag.graph import FanInCount, GraphSpec, NodeSpec
from streamflow.records import TaskEvent

TaskStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
NodeStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "skipped"]
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "skipped"})
_ORDER = {"queued": 0, "running": 1}


class NodeState(BaseModel):
    """One node's state.

    Attributes:
        state: ``queued``, ``running``, ``succeeded``, ``failed``, ``cancelled`` or
            ``skipped``.
        dispatched: Invocations dispatched (a node fed per batch has one per parent batch).
        completed: Invocations finished successfully.
        batches_in: Parent batches it was given.
        batches_out: Batches it produced.
        items_out: Items in those batches.
        fed: Per parent fed ``on: batch``, how many of the parent's batches were dispatched.
        attempts: The highest attempt seen.
        slot: Whether it holds one of its role's node slots (per-role limit).
        reducing: A coordinator function node whose final result is being computed.
        waiting: Why a ready node has not started (a concurrency limit), or None.
        error: Why it failed or was cancelled.
        dispatched_at_ms: First dispatch.
        started_at_ms: First time a worker (or the coordinator) started it.
        finished_at_ms: When it reached its final state.
    """

    state: NodeStatus = "queued"
    dispatched: int = 0
    completed: int = 0
    batches_in: int = 0
    batches_out: int = 0
    items_out: int = 0
    fed: dict[str, int] = Field(default_factory=dict)
    attempts: int = 0
    slot: bool = False
    reducing: bool = False
    waiting: str | None = None
    error: str | None = None
    dispatched_at_ms: int | None = None
    started_at_ms: int | None = None
    finished_at_ms: int | None = None

    @property
    def terminal(self) -> bool:
        """Whether the node reached a final state."""
        return self.state in TERMINAL

    @property
    def active(self) -> bool:
        """Whether the node counts against concurrency limits: started, not finished."""
        return self.dispatched > 0 and not self.terminal


class TaskState(BaseModel):
    """A task's state: its own and every node's.

    Attributes:
        id: The task id.
        name: The graph's name.
        state: ``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled``.
        nodes: Node states by node id.
        error: Why it failed or was cancelled.
        created_at_ms: When it was submitted.
        started_at_ms: When its first node started.
        finished_at_ms: When it reached its final state.
    """

    id: str
    name: str = "task"
    state: TaskStatus = "queued"
    nodes: dict[str, NodeState]
    error: str | None = None
    created_at_ms: int
    started_at_ms: int | None = None
    finished_at_ms: int | None = None

    @property
    def terminal(self) -> bool:
        """Whether the task reached a final state."""
        return self.state in TERMINAL

    @classmethod
    def new(cls, task_id: str, spec: GraphSpec, now: int) -> TaskState:
        """The state of a task just submitted."""
        nodes = {node.id: NodeState() for node in spec.nodes}
        return cls(id=task_id, name=spec.name, nodes=nodes, created_at_ms=now)


class Invocation(BaseModel):
    """What the coordinator knows of one invocation of a node.

    Attributes:
        attempt: The attempt of the newest run seen (runs of lower attempt or delivery are
            fenced).
        delivery: The delivery count of the newest run seen.
        upto: Batches ``0 .. upto - 1`` were recorded.
        extra: Batch numbers past ``upto`` recorded out of order.
        total: How many batches the invocation emitted, once its ``done`` arrived.
        state: ``pending``, ``done``, ``failed`` or ``cancelled``.
        counted: Whether its completion was counted in the node's ``completed``.
    """

    attempt: int = 0
    delivery: int = 0
    upto: int = 0
    extra: list[int] = Field(default_factory=list)
    total: int | None = None
    state: Literal["pending", "done", "failed", "cancelled"] = "pending"
    counted: bool = False

    def snapshot(self) -> tuple[Any, ...]:
        """Every field, cheaply comparable (a deep copy per event costs more than the event)."""
        return (
            self.attempt,
            self.delivery,
            self.upto,
            tuple(self.extra),
            self.total,
            self.state,
            self.counted,
        )

    def seen(self, seq: int) -> bool:
        """Whether batch ``seq`` was already recorded."""
        return seq < self.upto or seq in self.extra

    def record(self, seq: int) -> None:
        """Record batch ``seq``."""
        self.extra.append(seq)
        self.extra.sort()
        while self.extra and self.extra[0] == self.upto:
            self.extra.pop(0)
            self.upto += 1

    @property
    def complete(self) -> bool:
        """Done, and every batch it emitted recorded."""
        return self.state == "done" and self.total is not None and self.upto >= self.total


@dataclass(frozen=True, slots=True)
class Internal:
    """An event the coordinator makes itself (not read from a stream).

    ``tick`` re-evaluates the task; ``cancel`` cancels it; ``function_done`` records a
    coordinator function invocation's partial result; ``function_failed`` fails its node (the
    function raised); ``reduced`` records a function node's final batch (``ref`` None when it
    produced nothing).
    """

    type: Literal["tick", "cancel", "function_done", "function_failed", "reduced"]
    node_id: str = ""
    invocation: int = 0
    reason: str = ""
    ref: str | None = None
    items: int = 0
    at_ms: int = 0
    #: The trace context of the coordinator function's span that made it, when traced.
    trace: dict[str, str] | None = field(default=None, compare=False)


Event = TaskEvent | Internal


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Work the step decided to start: one invocation of a node.

    Attributes:
        node_id: The node.
        invocation: Its invocation number.
        batch: For a node fed per batch: (parent, parent batch index).
        inputs: For a node fed when parents are done: batches per parent.
        failures: For a remediation node: the error of each failed parent.
    """

    node_id: str
    invocation: int
    batch: tuple[str, int] | None = None
    inputs: dict[str, int] | None = None
    failures: dict[str, str] | None = None

    @property
    def key(self) -> str:
        """The dispatch's id within the task: ``node:invocation``."""
        return f"{self.node_id}:{self.invocation}"


@dataclass
class Step:
    """What :func:`advance` decided; the coordinator commits it in one script.

    Attributes:
        task: The new task state.
        invocations: Changed invocation records, by ``node:invocation``.
        outputs: Batch keys appended to each node's output list, in index order.
        dispatches: Invocations to start.
        reduce: Function nodes whose final result is now to be computed.
        partials: Function invocation partial results to store, by (node, invocation).
        cancel: A reason to send the task a cancel signal (it failed or was cancelled).
        wants_slot: Ready nodes of a limited role that need a role slot to start.
        released: Nodes that hold a role slot and just finished.
        touched: Nodes whose state the step copied: only these may have changed.
        changed: Whether anything changed.
    """

    task: TaskState
    invocations: dict[str, Invocation] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    dispatches: list[Dispatch] = field(default_factory=list)
    reduce: list[str] = field(default_factory=list)
    partials: dict[tuple[str, int], Any] = field(default_factory=dict)
    cancel: str | None = None
    wants_slot: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)
    changed: bool = False


def advance(
    spec: GraphSpec,
    task: TaskState,
    invocations: dict[str, Invocation],
    events: list[Event],
    *,
    now: int,
    limited_roles: frozenset[str] = frozenset(),
    granted: frozenset[str] = frozenset(),
    partials: dict[tuple[str, int], Any] | None = None,
) -> Step:
    """Apply ``events`` to a task and decide what to start next.

    Args:
        spec: The task's graph.
        task: Its state (not modified: the step holds a copy).
        invocations: The invocation records the events refer to, by ``node:invocation``
            (missing ones start empty; not modified).
        events: Events to apply, in order; duplicates and stale runs are ignored.
        now: The time, ms since the epoch.
        limited_roles: Roles with a per-role node limit.
        granted: Nodes that were just granted a role slot.
        partials: Partial results of ``function_done`` events, by (node, invocation).
    """
    # Its one mutable field copied by hand: a deep copy costs several times as much.
    copies = {
        key: inv.model_copy(update={"extra": list(inv.extra)}) for key, inv in invocations.items()
    }
    # Nodes are copied when the step first touches them (see _Machine.node), not all up front:
    # a step costs what its events touch, not what the graph holds.
    shallow = task.model_copy(update={"nodes": dict(task.nodes)})
    machine = _Machine(spec, shallow, copies, now)
    machine.cancel_reason = next(
        (e.reason or "cancelled" for e in events if isinstance(e, Internal) and e.type == "cancel"),
        None,
    )
    for event in events:
        machine.apply(event, partials or {})
    machine.settle(limited_roles, granted)
    return machine.step


class _Machine:
    def __init__(
        self, spec: GraphSpec, task: TaskState, invocations: dict[str, Invocation], now: int
    ) -> None:
        self.spec = spec
        self.now = now
        self.invocations = invocations
        self.step = Step(task)
        self.index = spec.index  # built once per spec, not per step
        self.cancel_reason: str | None = None  # a cancel of the whole task among the events
        self.full = False  # a tick: evaluate every node, not only those the events touched
        self.touched = self.step.touched  # nodes copied (and perhaps changed) by this step
        self._running: int | None = None  # active nodes, counted when the task limit needs it

    @property
    def task(self) -> TaskState:
        return self.step.task

    def node(self, node_id: str) -> NodeState:
        """The node's state, copied on first use: the caller's task is never modified."""
        node = self.task.nodes[node_id]
        if node_id not in self.touched:
            # Its one mutable field copied by hand: a deep copy costs ten times as much.
            node = node.model_copy(update={"fed": dict(node.fed)})
            self.task.nodes[node_id] = node
            self.touched.add(node_id)
        return node

    # -- events -------------------------------------------------------------------------

    def apply(self, event: Event, partials: dict[tuple[str, int], Any]) -> None:
        if isinstance(event, Internal):
            self._internal(event, partials)
            return
        if self.task.terminal or event.node_id not in self.task.nodes:
            return
        node = self.node(event.node_id)
        if node.terminal or event.invocation >= node.dispatched:
            return  # late news of a finished node, or of no invocation we dispatched
        key = f"{event.node_id}:{event.invocation}"
        inv = self.invocations.get(key) or Invocation()
        if (event.attempt, event.delivery) < (inv.attempt, inv.delivery):
            return  # a superseded run: fenced
        if inv.state != "pending" and event.type != "batch":
            return  # already decided
        before = inv.snapshot()
        inv.attempt, inv.delivery = event.attempt, event.delivery
        node.attempts = max(node.attempts, event.attempt)
        self._record(event, node, inv)
        self._keep(key, inv, before)

    def _record(self, event: TaskEvent, node: NodeState, inv: Invocation) -> None:
        if event.type == "accepted":
            self._started(node, event.at_ms)
        elif event.type == "batch":
            if event.seq is None or event.ref is None or inv.seen(event.seq):
                return  # a duplicate, or a batch an earlier run already gave
            inv.record(event.seq)
            self._started(node, event.at_ms)
            node.batches_out += 1
            node.items_out += event.items or 0
            self.step.outputs.setdefault(event.node_id, []).append(event.ref)
        elif event.type == "done":
            inv.state, inv.total = "done", event.total or 0
        elif event.type == "failed":
            inv.state = "failed"
            self._fail(event.node_id, event.error or "failed")
        else:  # cancelled by a signal that named this node's message
            inv.state = "cancelled"
            # The echo of the task's own cancel, when that is among the events, keeps its reason.
            self._cancel_task(self.cancel_reason or f"node {event.node_id!r} was cancelled")

    def _keep(self, key: str, inv: Invocation, before: tuple[Any, ...]) -> None:
        if inv.complete and not inv.counted:
            inv.counted = True
            self.node(key.rsplit(":", 1)[0]).completed += 1
        self.invocations[key] = inv
        if inv.snapshot() != before:
            self.step.invocations[key] = inv
            self.step.changed = True

    def _internal(self, event: Internal, partials: dict[tuple[str, int], Any]) -> None:
        if event.type == "tick":
            self.full = True
            return
        if event.type == "cancel":
            self._cancel_task(event.reason or "cancelled")
            return
        if self.task.terminal or event.node_id not in self.task.nodes:
            return
        node = self.node(event.node_id)
        if node.terminal:
            return
        if event.type == "function_done":
            key = f"{event.node_id}:{event.invocation}"
            inv = self.invocations.get(key) or Invocation()
            if inv.state != "pending" or event.invocation >= node.dispatched:
                return
            before = inv.snapshot()
            inv.state, inv.total = "done", 0
            self.step.partials[(event.node_id, event.invocation)] = partials.get(
                (event.node_id, event.invocation)
            )
            self._keep(key, inv, before)
        elif event.type == "function_failed":
            self._fail(event.node_id, event.reason or "the function failed")
        elif event.type == "reduced" and node.reducing:
            if event.ref is not None:
                node.batches_out += 1
                node.items_out += event.items
                self.step.outputs.setdefault(event.node_id, []).append(event.ref)
            self._finish(event.node_id, "succeeded")

    def _started(self, node: NodeState, at_ms: int) -> None:
        if node.started_at_ms is None:
            node.started_at_ms = at_ms or self.now
            self.step.changed = True
        self._move(node, "running")
        if self.task.state == "queued":
            self.task.state = "running"
            self.task.started_at_ms = node.started_at_ms

    # -- decisions ------------------------------------------------------------------------

    def settle(self, limited_roles: frozenset[str], granted: frozenset[str]) -> None:
        """Complete what can complete, cascade failures, dispatch what is ready.

        Only the nodes the events touched, those granted a slot and, as they change, their
        children are looked at, parents first (every node on a tick). A node that frees a
        place under the task limit brings in the nodes waiting for one.
        """
        rank = self.index.rank
        if self.full:
            queue = [(rank[n], n) for n in self.index.order]
        else:
            # A node the events changed (a batch out, a run done) may feed its children.
            seeds = set(self.touched) | {
                e.target for n in self.touched for e in self.index.children.get(n, ())
            }
            # Nodes held back by a limit are looked at again on every step, as a place may
            # have come free (a node that ended, a slot another task released).
            seeds |= self._waiting(limited_roles)
            queue = sorted((rank[n], n) for n in (seeds | granted) & rank.keys())
        queued = {n for _, n in queue}
        while queue and not self.task.terminal:
            _, node_id = heapq.heappop(queue)
            queued.discard(node_id)
            if not self._settle_node(node_id, limited_roles, granted):
                continue
            following = [e.target for e in self.index.children.get(node_id, ())]
            if self.task.nodes[node_id].terminal:
                following += self._waiting(limited_roles)
            for child in following:
                if child in rank and child not in queued:
                    queued.add(child)
                    heapq.heappush(queue, (rank[child], child))
        self._finish_task()

    def _waiting(self, limited_roles: frozenset[str]) -> set[str]:
        """Nodes held back by a limit (none looked for when the task is under no limit)."""
        if self.spec.max_running_nodes is None and not self.index.roles & limited_roles:
            return set()
        return {n for n, state in self.task.nodes.items() if state.waiting is not None}

    def _finish_task(self) -> None:
        nodes = self.task.nodes
        # Children first: a task that has not ended usually has a last node that has not, so
        # the look stops at once instead of passing every node that ended.
        if not self.task.terminal and all(nodes[n].terminal for n in reversed(self.index.order)):
            failed = [
                i
                for i, n in self.task.nodes.items()
                if n.state == "failed" and not self._remediated(i)
            ]
            self._end("failed" if failed else "succeeded", None)

    def _settle_node(
        self, node_id: str, limited_roles: frozenset[str], granted: frozenset[str]
    ) -> bool:
        # Read without a copy; copied (and so written back) only once something changes: a
        # tick passes over ended nodes and nodes still waiting for their parents for free.
        peeked = self._peek(node_id)
        if peeked.terminal or peeked.reducing or self.task.terminal:
            return False
        spec, kind = self.index.nodes[node_id], self.spec.input_kind(node_id)
        # A node fed per batch whose parents produced nothing completes without running.
        if (peeked.dispatched or kind == "batch") and self._complete(node_id, peeked, kind):
            if spec.function is not None:
                self.node(node_id).reducing = True  # its result is computed, then it succeeds
                self.step.reduce.append(node_id)
            else:
                self._finish(node_id, "succeeded")
            self.step.changed = True
            return True
        work = self._ready_work(node_id, peeked, kind, spec)
        if isinstance(work, str):  # can never run
            self._finish(node_id, "skipped" if kind == "failure" or work == "" else "cancelled")
            self.node(node_id).error = work or None
            return True
        if not work:
            return False
        node = self.node(node_id)
        if node.dispatched == 0 and not self._start(node_id, node, spec, limited_roles, granted):
            return False
        self._dispatch(node, work)
        return True

    def _start(
        self,
        node_id: str,
        node: NodeState,
        spec: NodeSpec,
        limited_roles: frozenset[str],
        granted: frozenset[str],
    ) -> bool:
        """Whether the node may start now (limits); records why not, or its start."""
        blocked = self._blocked(node_id, node, spec, limited_roles, granted)
        if blocked:
            if node.waiting != blocked:
                node.waiting = blocked
                self.step.changed = True
            return False
        node.waiting = None
        node.dispatched_at_ms = self.now
        if self._running is not None:
            self._running += 1  # it is dispatched next: active from now on
        if spec.role is not None and spec.role in limited_roles:
            node.slot = True
        if spec.function is not None:
            self._started(node, self.now)
        return True

    def _dispatch(self, node: NodeState, work: list[Dispatch]) -> None:
        for dispatch in work:
            node.dispatched += 1
            if dispatch.batch is not None:
                node.batches_in += 1
                parent = dispatch.batch[0]
                node.fed[parent] = node.fed.get(parent, 0) + 1
            elif dispatch.inputs is not None:
                node.batches_in += sum(dispatch.inputs.values())
            self.step.dispatches.append(dispatch)
        self.step.changed = True

    def _ready_work(
        self, node_id: str, node: NodeState, kind: str | None, spec: NodeSpec
    ) -> list[Dispatch] | str | None:
        """The dispatches the node may take now; a reason string when it can never run."""
        states = {e.source: self._peek(e.source) for e in self.index.parents.get(node_id, ())}
        if kind == "batch":
            return self._batch_work(node_id, node, states)
        if node.dispatched:
            return None  # sources and nodes fed when parents are done run once
        if kind is None:
            return [Dispatch(node_id, 0)]
        if kind == "failure":
            failed = {p: n.error or "failed" for p, n in states.items() if n.state == "failed"}
            if failed:
                inputs = {p: states[p].batches_out for p in failed}
                return [Dispatch(node_id, 0, inputs=inputs, failures=failed)]
            if all(n.terminal for n in states.values()):
                return ""  # nothing failed: the remediation is not needed
            return None
        done = [p for p, n in states.items() if n.state == "succeeded"]
        possible = [p for p, n in states.items() if not n.terminal or n.state == "succeeded"]
        need = _needed(spec, len(states))
        if len(done) >= need:
            inputs = {p: states[p].batches_out for p in done}
            return [Dispatch(node_id, 0, inputs=inputs)]
        if len(possible) < need:
            return "a parent it needs did not succeed"
        return None

    def _batch_work(
        self, node_id: str, node: NodeState, states: dict[str, NodeState]
    ) -> list[Dispatch] | str:
        """One invocation per parent batch not yet dispatched, in parent order."""
        broken = [p for p, n in states.items() if n.terminal and n.state != "succeeded"]
        if broken:
            return f"parent {broken[0]!r} did not succeed"
        work = []
        number = node.dispatched
        for parent, state in states.items():
            for index in range(node.fed.get(parent, 0), state.batches_out):
                work.append(Dispatch(node_id, number, batch=(parent, index)))
                number += 1
        return work

    def _complete(self, node_id: str, node: NodeState, kind: str | None) -> bool:
        if node.completed < node.dispatched:
            return False
        if kind != "batch":
            return True
        return all(
            self._peek(e.source).state == "succeeded"
            and node.fed.get(e.source, 0) == self._peek(e.source).batches_out
            for e in self.index.parents.get(node_id, ())
        )

    def _blocked(
        self,
        node_id: str,
        node: NodeState,
        spec: NodeSpec,
        limited_roles: frozenset[str],
        granted: frozenset[str],
    ) -> str | None:
        limit = self.spec.max_running_nodes
        if limit is not None:
            # Nodes asking for a role slot in this step count as running: a node the task
            # limit would hold back must not take a slot another task could use.
            if self._running is None:
                self._running = sum(1 for n in self.task.nodes.values() if n.active)
            running = self._running + len(self.step.wants_slot - {node_id})
            if running >= limit:
                return f"task limit: {running} of {limit} nodes running"
        limited = spec.role is not None and spec.role in limited_roles
        if limited and not node.slot and node_id not in granted:
            self.step.wants_slot.add(node_id)
            return f"role limit of {spec.role!r}"
        return None

    def _peek(self, node_id: str) -> NodeState:
        """A node's state to read only (a parent's): not copied, not counted as touched."""
        return self.task.nodes[node_id]

    def _remediated(self, node_id: str) -> bool:
        return any(e.on == "failure" for e in self.index.children.get(node_id, ()))

    def _fail(self, node_id: str, error: str) -> None:
        node = self.node(node_id)
        self._finish(node_id, "failed")
        node.error = error
        if not self._remediated(node_id):
            self._end("failed", f"node {node_id!r} failed: {error}")

    def _cancel_task(self, reason: str) -> None:
        if not self.task.terminal:
            self._end("cancelled", reason)

    def _end(self, state: TaskStatus, error: str | None) -> None:
        self.task.state = state
        self.task.error = error
        self.task.finished_at_ms = self.now
        for node_id in self.index.order:  # parents first: a node's completion reads theirs
            if self.task.nodes[node_id].terminal:
                continue
            node = self.node(node_id)
            if self._work_done(node_id, node):
                self._finish(node_id, "succeeded")  # its work all finished: not cancelled
            else:
                self._finish(node_id, "cancelled")
                node.error = node.error or error
        if state != "succeeded":
            self.step.cancel = error or state
        self.step.changed = True

    def _work_done(self, node_id: str, node: NodeState) -> bool:
        """Whether a worker node ran and every invocation finished (its events are in)."""
        if not node.dispatched or self.index.nodes[node_id].function is not None:
            return False  # a function node's result is computed at its end: never got there
        return self._complete(node_id, node, self.spec.input_kind(node_id))

    def _finish(self, node_id: str, state: NodeStatus) -> None:
        node = self.node(node_id)
        if self._running is not None and node.active:
            self._running -= 1
        self._move(node, state)
        node.finished_at_ms = self.now
        node.waiting = None
        node.reducing = False
        if node.slot:
            self.step.released.add(node_id)
        self.step.changed = True

    def _move(self, node: NodeState, state: NodeStatus) -> None:
        """Move a node's state forward; a backward move is ignored."""
        if node.terminal:
            return
        if state in TERMINAL or _ORDER[state] > _ORDER[node.state]:
            node.state = state
            self.step.changed = True


def failed_state(task: TaskState, reason: str, now: int) -> TaskState:
    """``task`` ended ``failed`` with ``reason``, as it cannot be run at all.

    For a stored graph or state that is invalid: nodes that ended keep their state, the others
    are cancelled.
    """
    nodes = {
        node_id: node
        if node.terminal
        else node.model_copy(update={"state": "cancelled", "error": reason, "finished_at_ms": now})
        for node_id, node in task.nodes.items()
    }
    update = {"state": "failed", "error": reason, "finished_at_ms": now, "nodes": nodes}
    return task.model_copy(update=update)


def _needed(spec: NodeSpec, parents: int) -> int:
    if isinstance(spec.fan_in, FanInCount):
        return spec.fan_in.count
    return 1 if spec.fan_in == "any" else parents
