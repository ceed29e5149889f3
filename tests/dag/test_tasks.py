"""Unit tests of the task state machine, ``streamflow.dag.tasks.advance`` (pure, no Redis).

A small driver plays the coordinator: it keeps the task state and invocation records between
steps (as the task store would), feeds events, and collects outputs and dispatches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import pytest

from streamflow.dag.graph import Graph, GraphSpec, validated
from streamflow.dag.tasks import Dispatch, Event, Internal, Invocation, Step, TaskState, advance
from streamflow.records import EventType, TaskEvent

TASK = "t1"
START_MS = 1_700_000_000_000


class Run:
    """One task driven step by step, its committed state kept between steps."""

    def __init__(self, graph: Graph | GraphSpec, *, limited_roles: Iterable[str] = ()) -> None:
        self.spec = validated(graph)
        self.limited_roles = frozenset(limited_roles)
        self.now = START_MS
        self.task = TaskState.new(TASK, self.spec, self.now)
        self.invocations: dict[str, Invocation] = {}
        self.outputs: dict[str, list[str]] = {}
        self.dispatches: list[Dispatch] = []
        self.steps: list[Step] = []

    def preview(
        self,
        *events: Event,
        granted: Iterable[str] = (),
        partials: dict[tuple[str, int], Any] | None = None,
    ) -> Step:
        """The step the events would make, without committing it."""
        return advance(
            self.spec,
            self.task,
            # Fresh copies, as the task store loads them: nothing leaks between steps but
            # what the step says changed.
            {key: inv.model_copy(deep=True) for key, inv in self.invocations.items()},
            list(events),
            now=self.now + 1,
            limited_roles=self.limited_roles,
            granted=frozenset(granted),
            partials=partials,
        )

    def feed(
        self,
        *events: Event,
        granted: Iterable[str] = (),
        partials: dict[tuple[str, int], Any] | None = None,
    ) -> Step:
        """Apply the events and commit the step."""
        step = self.preview(*events, granted=granted, partials=partials)
        self.now += 1
        self.task = step.task
        for key, inv in step.invocations.items():
            self.invocations[key] = inv.model_copy(deep=True)
        for node_id, refs in step.outputs.items():
            self.outputs.setdefault(node_id, []).extend(refs)
        self.dispatches += step.dispatches
        self.steps.append(step)
        return step

    def status(self) -> str:
        """The task's state (a call, so that type checkers do not narrow it across steps)."""
        return self.task.state

    def state(self, node_id: str) -> str:
        return self.task.nodes[node_id].state

    def states(self) -> dict[str, str]:
        return {node_id: node.state for node_id, node in self.task.nodes.items()}

    def dispatched(self, node_id: str) -> list[Dispatch]:
        return [d for d in self.dispatches if d.node_id == node_id]


def event(
    type: EventType,
    node_id: str,
    invocation: int = 0,
    *,
    attempt: int = 1,
    delivery: int = 1,
    **fields: Any,
) -> TaskEvent:
    return TaskEvent(
        protocol=1,
        kind="event",
        type=type,
        task_id=TASK,
        node_id=node_id,
        invocation=invocation,
        attempt=attempt,
        delivery=delivery,
        at_ms=START_MS + 500,
        **fields,
    )


def accepted(node_id: str, invocation: int = 0, **run: int) -> TaskEvent:
    return event("accepted", node_id, invocation, **run)


def batch(node_id: str, invocation: int, seq: int, items: int = 10, **run: int) -> TaskEvent:
    ref = f"{node_id}/{invocation}/{seq}/a{run.get('attempt', 1)}"
    return event("batch", node_id, invocation, seq=seq, ref=ref, items=items, **run)


def done(node_id: str, invocation: int = 0, total: int = 0, **run: int) -> TaskEvent:
    return event("done", node_id, invocation, total=total, **run)


def failed(node_id: str, invocation: int = 0, error: str = "boom") -> TaskEvent:
    return event("failed", node_id, invocation, error=error)


def run_of(node_id: str, invocation: int = 0, batches: int = 0, items: int = 10) -> list[Event]:
    """Every event of one successful run that emits ``batches`` batches."""
    return [
        accepted(node_id, invocation),
        *(batch(node_id, invocation, seq, items) for seq in range(batches)),
        done(node_id, invocation, batches),
    ]


def ref(node_id: str, invocation: int, seq: int, attempt: int = 1) -> str:
    return f"{node_id}/{invocation}/{seq}/a{attempt}"


def tick() -> Internal:
    return Internal("tick")


def chain(*, limit: int | None = None) -> Graph:
    """``src`` feeds ``each`` per batch."""
    graph = Graph("chain", max_running_nodes=limit)
    graph.node("src", role="extract").node("each", role="transform")
    return graph.edge("src", "each", on="batch")


# -- per-batch children --------------------------------------------------------------------


def test_a_source_is_dispatched_once_and_starts_on_accepted() -> None:
    run = Run(chain())

    first = run.feed(tick())

    assert first.dispatches == [Dispatch("src", 0)]
    assert run.status() == "queued"
    assert run.task.nodes["src"].dispatched == 1
    assert run.task.nodes["src"].dispatched_at_ms == START_MS + 1
    assert run.feed(tick()).dispatches == []

    run.feed(accepted("src"))

    assert run.states() == {"src": "running", "each": "queued"}
    assert run.status() == "running"
    assert run.task.started_at_ms == START_MS + 500
    assert run.task.nodes["src"].started_at_ms == START_MS + 500


def test_each_parent_batch_dispatches_one_child_invocation_in_order() -> None:
    run = Run(chain())
    run.feed(tick())
    run.feed(accepted("src"))

    for seq in range(3):
        step = run.feed(batch("src", 0, seq, items=seq + 1))
        assert step.outputs == {"src": [ref("src", 0, seq)]}
        assert step.dispatches == [Dispatch("each", seq, batch=("src", seq))]
    # The child started while its parent is still running.
    assert run.states() == {"src": "running", "each": "queued"}
    run.feed(accepted("each", 0))
    assert run.states() == {"src": "running", "each": "running"}

    step = run.feed(done("src", 0, 3))

    assert step.dispatches == []
    assert run.states() == {"src": "succeeded", "each": "running"}
    src = run.task.nodes["src"]
    assert (src.batches_out, src.items_out, src.completed) == (3, 6, 1)
    each = run.task.nodes["each"]
    assert (each.dispatched, each.batches_in, each.fed) == (3, 3, {"src": 3})

    run.feed(*run_of("each", 0, batches=1), *run_of("each", 1, batches=2))
    assert run.state("each") == "running"  # invocation 2 is still out
    run.feed(*run_of("each", 2, batches=0))

    assert run.states() == {"src": "succeeded", "each": "succeeded"}
    assert run.status() == "succeeded"
    assert run.task.finished_at_ms == run.now
    assert run.outputs == {
        "src": [ref("src", 0, 0), ref("src", 0, 1), ref("src", 0, 2)],
        "each": [ref("each", 0, 0), ref("each", 1, 0), ref("each", 1, 1)],
    }
    assert [d.batch for d in run.dispatched("each")] == [("src", 0), ("src", 1), ("src", 2)]
    assert run.task.nodes["each"].batches_out == 3


def test_several_batches_in_one_step_dispatch_in_order() -> None:
    run = Run(chain())
    run.feed(tick())

    step = run.feed(accepted("src"), batch("src", 0, 0), batch("src", 0, 1), batch("src", 0, 2))

    assert step.dispatches == [
        Dispatch("each", 0, batch=("src", 0)),
        Dispatch("each", 1, batch=("src", 1)),
        Dispatch("each", 2, batch=("src", 2)),
    ]


def test_done_child_waits_for_the_whole_parent() -> None:
    graph = Graph().node("src", role="extract").node("each", role="transform")
    graph.node("summary", role="report")
    graph.edge("src", "each", on="batch").edge("src", "summary", on="done")
    run = Run(graph)
    run.feed(tick())
    run.feed(accepted("src"))

    for seq in range(4):
        run.feed(batch("src", 0, seq))
    assert len(run.dispatched("each")) == 4
    assert run.dispatched("summary") == []

    step = run.feed(done("src", 0, 4))

    assert step.dispatches == [Dispatch("summary", 0, inputs={"src": 4})]
    assert run.task.nodes["summary"].batches_in == 4
    run.feed(*(e for i in range(4) for e in run_of("each", i, batches=1)))
    assert run.states() == {"src": "succeeded", "each": "succeeded", "summary": "queued"}
    assert run.status() == "running"
    run.feed(*run_of("summary", 0, batches=1))
    assert run.status() == "succeeded"
    assert run.dispatched("summary") == [Dispatch("summary", 0, inputs={"src": 4})]


def test_a_chain_of_per_batch_nodes_streams_through() -> None:
    graph = chain().node("again", role="transform").edge("each", "again", on="batch")
    run = Run(graph)
    run.feed(tick())
    run.feed(accepted("src"), batch("src", 0, 0))

    step = run.feed(accepted("each", 0), batch("each", 0, 0), batch("each", 0, 1))

    assert step.dispatches == [
        Dispatch("again", 0, batch=("each", 0)),
        Dispatch("again", 1, batch=("each", 1)),
    ]
    assert run.states() == {"src": "running", "each": "running", "again": "queued"}


# -- fan-in --------------------------------------------------------------------------------


def fan_in_graph(fan_in: Any) -> Graph:
    graph = Graph().node("a", role="r").node("b", role="r").node("c", role="r")
    graph.node("join", role="j", fan_in=fan_in)
    return graph.edge("a", "join").edge("b", "join").edge("c", "join")


@pytest.mark.parametrize(
    ("fan_in", "ready_after", "inputs"),
    [
        ("all", "c", {"a": 1, "b": 2, "c": 0}),
        ("any", "a", {"a": 1}),
        (1, "a", {"a": 1}),
        (2, "b", {"a": 1, "b": 2}),
        (3, "c", {"a": 1, "b": 2, "c": 0}),
    ],
)
def test_fan_in_dispatches_once_enough_parents_succeeded(
    fan_in: Any, ready_after: str, inputs: dict[str, int]
) -> None:
    run = Run(fan_in_graph(fan_in))
    assert run.feed(tick()).dispatches == [Dispatch("a", 0), Dispatch("b", 0), Dispatch("c", 0)]

    for parent, batches in (("a", 1), ("b", 2), ("c", 0)):
        step = run.feed(*run_of(parent, 0, batches=batches))
        expected = [Dispatch("join", 0, inputs=inputs)] if parent == ready_after else []
        assert step.dispatches == expected, parent

    assert run.dispatched("join") == [Dispatch("join", 0, inputs=inputs)]
    run.feed(*run_of("join", 0, batches=1))
    assert run.status() == "succeeded"
    assert set(run.states().values()) == {"succeeded"}


@pytest.mark.parametrize("fan_in", ["all", 3])
def test_unsatisfiable_fan_in_is_cancelled_when_a_parent_fails_remediated(fan_in: Any) -> None:
    graph = fan_in_graph(fan_in).node("fix", role="fix").edge("b", "fix", on="failure")
    run = Run(graph)
    run.feed(tick())
    run.feed(*run_of("a", 0, batches=1))

    step = run.feed(accepted("b"), failed("b", error="disk full"))

    assert step.dispatches == [Dispatch("fix", 0, inputs={"b": 0}, failures={"b": "disk full"})]
    assert step.cancel is None
    assert run.states() == {
        "a": "succeeded",
        "b": "failed",
        "c": "queued",
        "join": "cancelled",
        "fix": "queued",
    }
    assert run.task.nodes["join"].error == "a parent it needs did not succeed"
    assert run.task.nodes["b"].error == "disk full"
    run.feed(*run_of("c", 0, batches=1), *run_of("fix", 0))
    assert run.status() == "succeeded"
    assert run.dispatched("join") == []


def test_fan_in_count_stays_satisfiable_while_enough_parents_can_succeed() -> None:
    graph = fan_in_graph(2).node("fix", role="fix").edge("b", "fix", on="failure")
    run = Run(graph)
    run.feed(tick())

    run.feed(accepted("b"), failed("b"))
    assert run.state("join") == "queued"
    run.feed(*run_of("a", 0, batches=1))
    assert run.dispatched("join") == []
    step = run.feed(*run_of("c", 0, batches=3))

    assert step.dispatches == [Dispatch("join", 0, inputs={"a": 1, "c": 3})]


def test_fan_in_any_ignores_later_parents() -> None:
    run = Run(fan_in_graph("any"))
    run.feed(tick())
    run.feed(*run_of("b", 0, batches=2))
    run.feed(*run_of("join", 0, batches=1))
    assert run.state("join") == "succeeded"
    assert run.status() == "running"  # a and c still run

    run.feed(*run_of("a", 0, batches=1), *run_of("c", 0, batches=1))

    assert run.status() == "succeeded"
    assert run.dispatched("join") == [Dispatch("join", 0, inputs={"b": 2})]


# -- duplicates, reordering, fencing -------------------------------------------------------


def test_duplicated_and_shuffled_events_count_exactly_once() -> None:
    run = Run(chain())
    run.feed(tick())
    items = [3, 1, 4, 1, 5, 9]
    batches = [batch("src", 0, seq, n) for seq, n in enumerate(items)]
    random.Random(20240611).shuffle(batches)
    # Late and out of order: done (and its duplicate) arrive before any batch.
    source_events = [done("src", 0, 6)] * 2 + [accepted("src")] * 2
    for b in batches:
        source_events += [b, b]

    seen: set[int] = set()
    started = False
    for e in source_events:
        run.feed(e)
        # An 'accepted' after the invocation's 'done' is old news: the first batch starts it.
        started |= e.type == "batch"
        if e.type == "batch":
            assert e.seq is not None
            seen.add(e.seq)
        expected = "succeeded" if len(seen) == 6 else "running" if started else "queued"
        assert run.state("src") == expected, seen

    src = run.task.nodes["src"]
    assert (src.batches_out, src.items_out, src.completed) == (6, sum(items), 1)
    assert sorted(run.outputs["src"]) == sorted(ref("src", 0, seq) for seq in range(6))
    assert run.invocations["src:0"] == Invocation(
        attempt=1, delivery=1, upto=6, total=6, state="done", counted=True
    )
    assert run.dispatched("each") == [Dispatch("each", i, batch=("src", i)) for i in range(6)]

    child_events = [e for i in range(6) for e in run_of("each", i, batches=2, items=7)] * 2
    random.Random(7).shuffle(child_events)
    for child_event in child_events:
        run.feed(child_event)

    each = run.task.nodes["each"]
    assert (each.dispatched, each.completed, each.batches_out, each.items_out) == (6, 6, 12, 84)
    assert len(run.outputs["each"]) == len(set(run.outputs["each"])) == 12
    assert run.status() == "succeeded"
    assert len(run.dispatches) == 7


def test_applying_the_same_events_again_changes_nothing() -> None:
    run = Run(chain())
    history: list[Event] = [tick(), *run_of("src", 0, batches=2), *run_of("each", 0, batches=1)]
    for e in history:
        run.feed(e)
    before = run.task

    again = run.feed(*history)

    assert again.changed is False
    assert (again.dispatches, again.outputs, again.invocations) == ([], {}, {})
    assert run.task == before


def test_events_of_an_older_run_are_fenced() -> None:
    run = Run(chain())
    run.feed(tick())
    run.feed(accepted("src"), batch("src", 0, 0, items=2))
    # The lease expired; another worker adopted the entry (delivery 2).
    run.feed(accepted("src", delivery=2), batch("src", 0, 0, items=2, delivery=2))
    run.feed(batch("src", 0, 1, items=3, delivery=2))

    stale = run.feed(
        batch("src", 0, 2, items=50), done("src", 0, 3), failed("src", error="stale worker")
    )

    assert stale.changed is False
    assert stale.outputs == {}
    assert run.state("src") == "running"
    run.feed(done("src", 0, 2, delivery=2))
    src = run.task.nodes["src"]
    assert (src.state, src.batches_out, src.items_out) == ("succeeded", 2, 5)
    assert run.outputs["src"] == [ref("src", 0, 0), ref("src", 0, 1)]
    assert run.invocations["src:0"].delivery == 2
    assert len(run.dispatched("each")) == 2


def test_a_retry_re_emitting_seen_batches_does_not_duplicate_outputs() -> None:
    run = Run(chain())
    run.feed(tick())
    run.feed(accepted("src"), batch("src", 0, 0, items=4), batch("src", 0, 1, items=4))
    # Attempt 1 failed with attempts left: no event; attempt 2 emits the same batches again.
    retry = {"attempt": 2}
    run.feed(accepted("src", **retry))
    step = run.feed(batch("src", 0, 0, 4, **retry), batch("src", 0, 1, 4, **retry))
    assert step.outputs == {}
    assert step.dispatches == []

    step = run.feed(batch("src", 0, 2, items=1, **retry), done("src", 0, 3, **retry))

    assert step.outputs == {"src": [ref("src", 0, 2, attempt=2)]}
    assert step.dispatches == [Dispatch("each", 2, batch=("src", 2))]
    src = run.task.nodes["src"]
    assert (src.state, src.batches_out, src.items_out, src.attempts) == ("succeeded", 3, 9, 2)
    assert run.outputs["src"] == [ref("src", 0, 0), ref("src", 0, 1), ref("src", 0, 2, 2)]
    late = run.feed(batch("src", 0, 3, items=1))  # attempt 1 still talking
    assert late.changed is False


def test_events_for_unknown_nodes_or_undispatched_invocations_are_ignored() -> None:
    run = Run(chain())
    run.feed(tick())

    step = run.feed(
        event("accepted", "nope", 0),
        accepted("src", 1),
        accepted("each", 0),
        batch("src", 5, 0),
    )

    assert step.changed is False
    assert run.states() == {"src": "queued", "each": "queued"}


# -- failure and remediation ---------------------------------------------------------------


def test_permanent_failure_fails_the_task_and_cancels_the_rest() -> None:
    graph = chain().node("total", role="sum").edge("each", "total")
    run = Run(graph)
    run.feed(tick())
    run.feed(accepted("src"), batch("src", 0, 0))
    run.feed(accepted("each", 0))

    step = run.feed(failed("src", error="disk full"))

    assert run.status() == "failed"
    assert run.task.error == "node 'src' failed: disk full"
    assert step.cancel == "node 'src' failed: disk full"
    assert run.states() == {"src": "failed", "each": "cancelled", "total": "cancelled"}
    assert run.task.nodes["src"].error == "disk full"
    assert run.task.nodes["each"].error == "node 'src' failed: disk full"
    assert step.dispatches == []
    assert run.task.finished_at_ms == run.now

    late = run.feed(*run_of("each", 0, batches=1), tick())

    assert late.changed is False
    assert run.states() == {"src": "failed", "each": "cancelled", "total": "cancelled"}
    assert run.dispatched("total") == []


def test_failure_edge_dispatches_remediation_with_the_errors() -> None:
    graph = Graph().node("src", role="extract").node("next", role="load")
    graph.node("fix", role="fix").edge("src", "next").edge("src", "fix", on="failure")
    run = Run(graph)
    run.feed(tick())
    run.feed(accepted("src"), batch("src", 0, 0))

    step = run.feed(failed("src", error="bad row"))

    assert step.dispatches == [Dispatch("fix", 0, inputs={"src": 1}, failures={"src": "bad row"})]
    assert step.cancel is None
    assert run.status() == "running"
    assert run.states() == {"src": "failed", "next": "cancelled", "fix": "queued"}

    run.feed(*run_of("fix", 0, batches=1))

    assert run.states() == {"src": "failed", "next": "cancelled", "fix": "succeeded"}
    assert run.status() == "succeeded"
    assert run.task.error is None


def test_remediation_is_skipped_when_its_parent_succeeds() -> None:
    graph = Graph().node("src", role="extract").node("next", role="load")
    graph.node("fix", role="fix").edge("src", "next").edge("src", "fix", on="failure")
    run = Run(graph)
    run.feed(tick())

    step = run.feed(*run_of("src", 0, batches=2))

    assert step.dispatches == [Dispatch("next", 0, inputs={"src": 2})]
    assert run.states() == {"src": "succeeded", "next": "queued", "fix": "skipped"}
    assert run.task.nodes["fix"].error is None
    run.feed(*run_of("next", 0))
    assert run.status() == "succeeded"
    assert run.dispatched("fix") == []


def test_a_failing_remediation_fails_the_task() -> None:
    graph = Graph().node("src", role="extract").node("fix", role="fix")
    graph.edge("src", "fix", on="failure")
    run = Run(graph)
    run.feed(tick())
    run.feed(accepted("src"), failed("src"))

    step = run.feed(accepted("fix"), failed("fix", error="still broken"))

    assert run.status() == "failed"
    assert step.cancel == "node 'fix' failed: still broken"
    assert run.states() == {"src": "failed", "fix": "failed"}


def test_a_cancelled_event_cancels_the_task() -> None:
    run = Run(chain())
    run.feed(tick())
    run.feed(accepted("src"))

    step = run.feed(event("cancelled", "src", 0))

    assert run.status() == "cancelled"
    assert step.cancel == "node 'src' was cancelled"
    assert run.states() == {"src": "cancelled", "each": "cancelled"}


# -- cancel --------------------------------------------------------------------------------


def test_cancel_stops_the_task_and_nothing_starts_afterwards() -> None:
    graph = chain().node("summary", role="report").edge("src", "summary")
    run = Run(graph)
    run.feed(tick())
    run.feed(accepted("src"), batch("src", 0, 0))

    step = run.feed(Internal("cancel", reason="user asked"))

    assert run.status() == "cancelled"
    assert run.task.error == "user asked"
    assert step.cancel == "user asked"
    assert step.dispatches == []
    assert run.states() == {"src": "cancelled", "each": "cancelled", "summary": "cancelled"}
    assert run.task.nodes["summary"].error == "user asked"
    cancelled = run.task

    late = run.feed(
        accepted("each", 0),
        batch("src", 0, 1),
        done("src", 0, 2),
        Internal("function_done", "summary", 0),
        Internal("cancel", reason="again"),
        tick(),
    )

    assert late.changed is False
    assert late.dispatches == []
    assert late.cancel is None
    assert run.task == cancelled
    assert run.dispatched("summary") == []
    assert [d.node_id for d in run.dispatches] == ["src", "each"]


def test_a_node_whose_runs_all_finished_stays_succeeded_when_cancelled_in_the_same_step() -> None:
    graph = Graph("pair").node("a", role="work").node("b", role="work").node("c", role="work")
    graph.edge("a", "c")
    run = Run(graph)
    run.feed(tick())

    # What a coordinator that was down finds: a's run finished, b's handler was stopped by the
    # cancel (its report says so), and the cancel itself.
    run.feed(
        *run_of("a", batches=1),
        accepted("b"),
        event("cancelled", "b"),
        Internal("cancel", reason="operator: stop now"),
    )

    assert run.status() == "cancelled"
    assert run.task.error == "operator: stop now"
    assert run.states() == {"a": "succeeded", "b": "cancelled", "c": "cancelled"}
    assert run.task.nodes["a"].error is None
    assert run.task.nodes["b"].error == "operator: stop now"
    assert run.dispatched("c") == []


def test_states_only_move_forward() -> None:
    run = Run(chain())
    run.feed(tick())
    run.feed(*run_of("src", 0, batches=1))
    run.feed(accepted("each", 0), batch("each", 0, 0), done("each", 0, 1))
    assert run.status() == "succeeded"

    late = run.feed(accepted("src"), accepted("each", 0, attempt=5))

    assert late.changed is False
    assert run.states() == {"src": "succeeded", "each": "succeeded"}


def test_a_late_accepted_does_not_move_a_running_node_back() -> None:
    run = Run(chain())
    run.feed(tick())
    run.feed(accepted("src"), batch("src", 0, 0))

    step = run.feed(accepted("src"))

    assert step.changed is False
    assert run.state("src") == "running"


# -- empty sources and coordinator functions -----------------------------------------------


def aggregate_graph() -> Graph:
    graph = chain().node("total", function="metrics.aggregate")
    return graph.edge("each", "total", on="batch")


def test_an_empty_source_completes_its_per_batch_children_without_running_them() -> None:
    run = Run(aggregate_graph())
    run.feed(tick())

    step = run.feed(accepted("src"), done("src", 0, total=0))

    # 'total' was never dispatched: it is computed (reducing) without having started.
    assert run.states() == {"src": "succeeded", "each": "succeeded", "total": "queued"}
    assert run.task.nodes["each"].dispatched == 0
    assert run.task.nodes["total"].dispatched == 0
    assert run.task.nodes["total"].reducing is True
    assert step.reduce == ["total"]
    assert step.dispatches == []

    step = run.feed(Internal("reduced", "total", ref=None))

    assert step.outputs == {}
    assert run.state("total") == "succeeded"
    assert run.task.nodes["total"].batches_out == 0
    assert run.status() == "succeeded"


def test_function_nodes_collect_partials_then_reduce() -> None:
    run = Run(aggregate_graph())
    run.feed(tick())
    run.feed(*run_of("src", 0, batches=2))
    step = run.feed(*run_of("each", 0, batches=1), *run_of("each", 1, batches=1))

    assert step.dispatches == [
        Dispatch("total", 0, batch=("each", 0)),
        Dispatch("total", 1, batch=("each", 1)),
    ]
    assert run.state("total") == "running"  # coordinator functions start when dispatched
    assert run.task.nodes["total"].started_at_ms == run.now

    partials = {("total", 0): {"count": 10}, ("total", 1): {"count": 7}}
    step = run.feed(Internal("function_done", "total", 0), partials=partials)
    assert step.partials == {("total", 0): {"count": 10}}
    assert step.reduce == []
    again = run.feed(Internal("function_done", "total", 0), partials=partials)
    assert again.partials == {}
    assert again.changed is False

    step = run.feed(Internal("function_done", "total", 1), partials=partials)

    assert step.partials == {("total", 1): {"count": 7}}
    assert step.reduce == ["total"]
    total = run.task.nodes["total"]
    assert (total.reducing, total.completed, total.state) == (True, 2, "running")
    assert run.status() == "running"
    assert run.feed(tick()).reduce == []  # asked once

    step = run.feed(Internal("reduced", "total", ref="result:total", items=1))

    assert step.outputs == {"total": ["result:total"]}
    total = run.task.nodes["total"]
    assert (total.state, total.reducing, total.batches_out, total.items_out) == (
        "succeeded",
        False,
        1,
        1,
    )
    assert run.status() == "succeeded"


def test_reduced_before_the_node_is_reducing_is_ignored() -> None:
    run = Run(aggregate_graph())
    run.feed(tick())

    step = run.feed(Internal("reduced", "total", ref="early", items=1))

    assert step.changed is False
    assert run.state("total") == "queued"


def test_a_function_node_fed_when_its_parents_are_done() -> None:
    graph = Graph().node("a", role="r").node("b", role="r").node("m", function="merge.generic")
    graph.edge("a", "m").edge("b", "m")
    run = Run(graph)
    run.feed(tick())
    run.feed(*run_of("a", 0, batches=1))

    step = run.feed(*run_of("b", 0, batches=2))

    assert step.dispatches == [Dispatch("m", 0, inputs={"a": 1, "b": 2})]
    step = run.feed(Internal("function_done", "m", 0), partials={("m", 0): [1, 2, 3]})
    assert step.partials == {("m", 0): [1, 2, 3]}
    assert step.reduce == ["m"]
    run.feed(Internal("reduced", "m", ref="result:m", items=3))
    assert run.task.nodes["m"].items_out == 3
    assert run.status() == "succeeded"


# -- concurrency limits --------------------------------------------------------------------


def test_max_running_nodes_limits_active_nodes() -> None:
    graph = Graph(max_running_nodes=1).node("a", role="r").node("b", role="r").node("c", role="r")
    run = Run(graph)

    step = run.feed(tick())

    assert step.dispatches == [Dispatch("a", 0)]
    assert run.task.nodes["b"].waiting == "task limit: 1 of 1 nodes running"
    assert run.task.nodes["c"].waiting == "task limit: 1 of 1 nodes running"
    assert run.feed(accepted("a"), batch("a", 0, 0)).dispatches == []

    step = run.feed(done("a", 0, 1))

    assert step.dispatches == [Dispatch("b", 0)]
    assert run.task.nodes["b"].waiting is None
    assert run.task.nodes["c"].waiting == "task limit: 1 of 1 nodes running"
    assert run.feed(*run_of("b", 0)).dispatches == [Dispatch("c", 0)]
    run.feed(*run_of("c", 0))
    assert run.status() == "succeeded"


def test_a_place_freed_under_the_task_limit_by_a_function_node_is_taken_in_the_same_step() -> None:
    graph = Graph("limited", max_running_nodes=1)
    graph.node("m", function="merge.generic").node("y", role="work")
    run = Run(graph)
    run.feed(tick())
    assert [d.node_id for d in run.dispatches] == ["m"]
    assert run.task.nodes["y"].waiting == "task limit: 1 of 1 nodes running"
    run.feed(Internal("function_done", "m", 0), partials={("m", 0): None})

    step = run.feed(Internal("reduced", "m"))  # m ends in the event itself, not in settling

    assert run.state("m") == "succeeded"
    assert [d.node_id for d in step.dispatches] == ["y"]


def test_max_running_nodes_holds_a_per_batch_child_until_its_parent_finishes() -> None:
    run = Run(chain(limit=1))
    run.feed(tick())

    step = run.feed(accepted("src"), batch("src", 0, 0), batch("src", 0, 1))

    assert step.dispatches == []
    assert run.task.nodes["each"].waiting == "task limit: 1 of 1 nodes running"
    step = run.feed(done("src", 0, 2))
    assert step.dispatches == [
        Dispatch("each", 0, batch=("src", 0)),
        Dispatch("each", 1, batch=("src", 1)),
    ]
    # At most one node was ever active at once.
    assert max(sum(n.active for n in s.task.nodes.values()) for s in run.steps) == 1


def test_a_limited_role_waits_for_a_slot_and_releases_it() -> None:
    run = Run(chain(), limited_roles={"transform"})
    run.feed(tick())
    run.feed(accepted("src"))
    events = (batch("src", 0, 0), batch("src", 0, 1))

    wanting = run.feed(*events)

    assert wanting.wants_slot == {"each"}
    assert wanting.dispatches == []
    assert run.task.nodes["each"].waiting == "role limit of 'transform'"
    assert run.task.nodes["each"].slot is False

    step = run.feed(tick(), granted={"each"})

    assert step.wants_slot == set()
    assert step.dispatches == [
        Dispatch("each", 0, batch=("src", 0)),
        Dispatch("each", 1, batch=("src", 1)),
    ]
    each = run.task.nodes["each"]
    assert (each.slot, each.waiting) == (True, None)
    # Holding the slot, later batches need no new grant.
    step = run.feed(batch("src", 0, 2), done("src", 0, 3))
    assert step.dispatches == [Dispatch("each", 2, batch=("src", 2))]
    assert step.wants_slot == set()
    assert run.feed(*run_of("each", 0), *run_of("each", 1)).released == set()

    step = run.feed(*run_of("each", 2))

    assert step.released == {"each"}
    assert run.status() == "succeeded"


def test_a_node_waiting_for_a_role_slot_asks_again_on_any_later_step() -> None:
    graph = Graph("two").node("a", role="work").node("b", role="work").node("c", role="other")
    run = Run(graph, limited_roles={"work"})
    first = run.feed(tick(), granted={"a"})
    assert first.wants_slot == {"b"}
    assert run.task.nodes["b"].waiting == "role limit of 'work'"

    # News of another node only: b is not its child, yet it asks for a slot again, as a slot
    # may have come free since (the coordinator takes slots for the nodes that ask).
    step = run.preview(accepted("c"))

    assert step.wants_slot == {"b"}
    assert [d.node_id for d in run.preview(accepted("c"), granted={"b"}).dispatches] == ["b"]


def test_a_granted_slot_is_released_when_the_task_is_cancelled() -> None:
    run = Run(chain(), limited_roles={"transform"})
    run.feed(tick())
    run.feed(accepted("src"), batch("src", 0, 0), granted={"each"})
    assert run.task.nodes["each"].slot is True

    step = run.feed(Internal("cancel"))

    assert step.released == {"each"}
    assert step.cancel == "cancelled"


def test_an_unlimited_role_never_asks_for_a_slot() -> None:
    run = Run(chain(), limited_roles={"other"})
    run.feed(tick())

    step = run.feed(accepted("src"), batch("src", 0, 0))

    assert step.wants_slot == set()
    assert step.dispatches == [Dispatch("each", 0, batch=("src", 0))]
    assert run.task.nodes["each"].slot is False


def test_advance_twice_on_the_same_load_gives_the_same_step() -> None:
    # advance() must not update the records it is given. The coordinator advances, takes the
    # wanted slots, and advances again with them, on shallow copies of the same loaded records.
    run = Run(chain(), limited_roles={"transform"})
    run.feed(tick())
    run.feed(accepted("src"))
    loaded = dict(run.invocations)
    events: list[Event] = [batch("src", 0, 0)]
    first = advance(
        run.spec, run.task, dict(loaded), events, now=run.now, limited_roles=run.limited_roles
    )
    assert first.wants_slot == {"each"}

    second = advance(
        run.spec,
        run.task,
        dict(loaded),
        events,
        now=run.now,
        limited_roles=run.limited_roles,
        granted=frozenset({"each"}),
    )

    assert second.outputs == {"src": [ref("src", 0, 0)]}
    assert second.dispatches == [Dispatch("each", 0, batch=("src", 0))]
    assert second.task.nodes["src"].batches_out == 1
    assert loaded["src:0"] == Invocation(attempt=1, delivery=1)


def test_nodes_held_back_by_the_task_limit_do_not_ask_for_a_role_slot() -> None:
    graph = Graph(max_running_nodes=2).node("a", role="free").node("b", role="r")
    run = Run(graph.node("c", role="r"), limited_roles={"r"})

    step = run.feed(tick())

    assert step.dispatches == [Dispatch("a", 0)]
    assert step.wants_slot == {"b"}
    assert run.task.nodes["c"].waiting == "task limit: 2 of 2 nodes running"

    step = run.feed(tick(), granted={"b"})

    assert step.dispatches == [Dispatch("b", 0)]
    assert step.wants_slot == set()
    assert run.task.nodes["c"].waiting == "task limit: 2 of 2 nodes running"
    step = run.feed(*run_of("b", 0))
    assert step.released == {"b"}
    assert step.wants_slot == {"c"}


def test_a_node_asking_for_a_role_slot_says_it_waits_for_the_role() -> None:
    graph = Graph(max_running_nodes=2).node("a", role="free").node("b", role="r")
    run = Run(graph, limited_roles={"r"})

    step = run.feed(tick())

    assert step.wants_slot == {"b"}
    assert run.task.nodes["b"].waiting == "role limit of 'r'"
