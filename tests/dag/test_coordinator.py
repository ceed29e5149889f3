"""DAG tasks end to end on a real redis-server: workers and a coordinator in this process.

Crash scenarios (SIGKILLed workers and coordinators) are in tests/test_task_crash.py; the state
machine's rules alone are in tests/dag/test_tasks.py.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
import pytest
from redis.asyncio import Redis

import streamflow
from streamflow import Client, Coordinator, Graph, GraphError, Worker, connect, streams
from streamflow.dag import coordinator as coordinator_module
from streamflow.dag import store as taskstore
from streamflow.dag.graph import RetrySpec
from streamflow.dag.outbox import Outbox, WithCommit
from streamflow.delivery import Outcome
from streamflow.keys import Keys
from streamflow.protocol import PROTOCOL_VERSION, encode, now_ms
from streamflow.records import TaskEvent
from tests.dag.helpers import app, chain, gates, seen, started, system
from tests.helpers import pending_count, wait_for_query, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.mark.slow
async def test_five_node_streaming_graph(redis_url: str, namespace: str) -> None:
    async with system(redis_url, namespace) as (client, _, _):
        task_id = await client.submit(chain(60, 6, pause=0.05, gate=True))
        task = await client.wait(task_id, timeout=30)
        result = await client.result(task_id)
    assert task.state == "succeeded", task.error
    expected_ocr = sum((x + 1) * 2 for x in range(60))
    assert result == {
        "analyze": [
            {"parent": "merge", "count": 120, "sum": sum(range(60)) + sum(range(1, 61))},
            {"parent": "ocr", "count": 60, "sum": expected_ocr},
        ]
    }
    nodes = task.nodes
    assert (nodes["source"].batches_out, nodes["enrich"].batches_in) == (10, 10)
    assert nodes["enrich"].dispatched == nodes["enrich"].completed == 10
    assert nodes["ocr"].batches_out == 10 and nodes["merge"].batches_out == 1
    # Streaming: each per-batch child started while its parent was still running. The gates
    # prove it: source waits after its first batch until enrich has started, and the first
    # enrich job until ocr has started, so without per-batch fan-out the task never ends. (Not
    # the node timestamps: a finish is stamped when a coordinator applies it.)
    assert started("enrich", task_id).is_set() and started("ocr", task_id).is_set()
    # Each parent batch reached the child once, in order.
    assert seen[f"enrich:{task_id}"] == [("source", i) for i in range(10)]


@pytest.mark.slow
async def test_fan_in_all_any_count_and_done_waits(redis_url: str, namespace: str) -> None:
    graph = Graph("fan-in", params={"size": 2})
    for name, n in (("a", 2), ("b", 4), ("c", 6)):
        graph.node(name, role="source", params={"n": n, "pause": 0.02 * n})
    graph.node("all", role="parents").node("any", role="parents", fan_in="any")
    graph.node("two", role="parents", fan_in=2)
    graph.node("per-batch", role="enrich").node("whole", role="analyze")
    for parent in ("a", "b", "c"):
        for child in ("all", "any", "two"):
            graph.edge(parent, child)
    graph.edge("c", "per-batch", on="batch").edge("c", "whole")
    async with system(redis_url, namespace) as (client, _, _):
        task_id = await client.submit(graph)
        task = await client.wait(task_id, timeout=30)
        result = await client.result(task_id)
    assert task.state == "succeeded", task.error
    assert result["all"] == ["a", "b", "c"]
    assert len(result["any"]) == 1 and len(result["two"]) == 2
    assert result["per-batch"] == [x + 1 for x in range(6)]
    assert result["whole"] == [{"parent": "c", "count": 6, "sum": 15}]
    nodes = task.nodes
    # on: done waits for the whole parent; one parent feeds a per-batch and a done child.
    assert nodes["whole"].started_at_ms >= nodes["c"].finished_at_ms  # type: ignore[operator]
    assert nodes["per-batch"].dispatched == 3
    assert nodes["all"].started_at_ms >= max(  # type: ignore[operator]
        nodes[p].finished_at_ms
        for p in "abc"  # type: ignore[type-var]
    )


async def test_permanent_failure_cascades(redis_url: str, namespace: str) -> None:
    graph = Graph("cascade", params={"n": 4, "size": 2})
    graph.node("source", role="source").node("fail", role="fail")
    graph.node("after", role="enrich").node("sibling", role="slow")
    graph.edge("source", "fail", on="batch").edge("fail", "after", on="batch")
    async with system(redis_url, namespace) as (client, _, _):
        task_id = await client.submit(graph)
        task = await client.wait(task_id, timeout=30)
        await wait_until(lambda: ("cancelled", "sibling") in seen.get(f"slow:{task_id}", []))
        letters = await client.dead_letters("fail")
    assert task.state == "failed"
    assert "node 'fail' failed" in (task.error or "")
    assert task.nodes["fail"].state == "failed"
    assert task.nodes["after"].state == "cancelled"
    assert task.nodes["after"].started_at_ms is None  # downstream never started
    assert task.nodes["sibling"].state == "cancelled"  # the running one got the cancel
    assert letters and letters[0].letter.reason == "failed"


async def test_on_failure_runs_only_on_failure(redis_url: str, namespace: str) -> None:
    broken = Graph("remedy", params={"n": 2, "size": 2})
    broken.node("source", role="source").node("fail", role="fail").node("fix", role="fix")
    broken.edge("source", "fail", on="batch").edge("fail", "fix", on="failure")
    fine = Graph("fine", params={"n": 2, "size": 2})
    fine.node("source", role="source").node("ok", role="enrich").node("fix", role="fix")
    fine.edge("source", "ok", on="batch").edge("ok", "fix", on="failure")
    async with system(redis_url, namespace) as (client, _, _):
        broken_id = await client.submit(broken)
        fine_id = await client.submit(fine)
        broken_task = await client.wait(broken_id, timeout=30)
        fine_task = await client.wait(fine_id, timeout=30)
        remedy = await client.result(broken_id, "fix")
    assert broken_task.state == "succeeded", broken_task.error
    assert broken_task.nodes["fail"].state == "failed"
    assert broken_task.nodes["fix"].state == "succeeded"
    assert remedy["fix"][0]["fail"].startswith("failed: attempt 1 of 1 failed")
    assert fine_task.state == "succeeded"
    assert fine_task.nodes["fix"].state == "skipped"
    assert fine_task.nodes["fix"].dispatched == 0


async def test_cancel_mid_task(redis_url: str, namespace: str) -> None:
    graph = Graph("cancel-mid", params={"n": 4, "size": 1})
    graph.node("source", role="source").node("slow", role="slow").node("after", role="enrich")
    graph.edge("source", "slow", on="batch").edge("slow", "after", on="batch")
    async with system(redis_url, namespace) as (client, _, _):
        task_id = await client.submit(graph)
        await wait_until(lambda: len(seen.get(f"slow:{task_id}", [])) >= 2)
        await client.cancel(task_id, target="task", reason="changed my mind")
        task = await client.wait(task_id, timeout=10)
        await wait_until(
            lambda: (
                sum(1 for e in seen[f"slow:{task_id}"] if e[0] == "cancelled")
                == sum(1 for e in seen[f"slow:{task_id}"] if e[0] == "start")
            )
        )
    assert task.state == "cancelled"
    assert task.error == "changed my mind"
    assert all(n.state == "cancelled" for i, n in task.nodes.items() if i != "source")
    assert task.nodes["after"].started_at_ms is None


async def test_cancel_before_any_node_starts(redis_url: str, namespace: str) -> None:
    graph = Graph("cancel-early", params={"n": 4, "size": 2})
    graph.node("source", role="source").node("next", role="enrich")
    graph.edge("source", "next", on="batch")
    async with system(redis_url, namespace, workers=False) as (client, _, _):
        await client.redis.sadd(Keys(namespace).known_roles(), "source", "enrich")
        task_id = await client.submit(graph)
        await client.cancel(task_id, target="task")
        task = await client.wait(task_id, timeout=10)
    assert task.state == "cancelled"
    # Now workers run: the source job, if it was dispatched before the cancel, is dropped as
    # cancelled, never started.
    stream = Keys(namespace).role_stream("source")
    async with system(redis_url, namespace) as (client, _, outcomes):
        await wait_for_query(lambda: _drained(client.redis, stream))
        task = await client.wait(task_id, timeout=10)
    assert all((o.role, o.status) == ("source", "cancelled") for o in outcomes)
    assert task.nodes["source"].started_at_ms is None
    assert task.nodes["next"].dispatched == 0


async def _drained(redis: Redis, stream: str) -> bool:
    return await redis.xlen(stream) == 0 and await pending_count(redis, stream) == 0


@pytest.mark.slow
async def test_cancel_while_a_node_waits_for_a_retry(redis_url: str, namespace: str) -> None:
    graph = Graph("cancel-retry", params={"delay": 1.0})
    graph.node("flaky", role="flaky", retry=RetrySpec(max_attempts=5))
    async with system(redis_url, namespace) as (client, _, outcomes):
        task_id = await client.submit(graph)
        await wait_until(lambda: any(o.status == "retried" for o in outcomes))
        await client.cancel(task_id, target="task")
        task = await client.wait(task_id, timeout=10)
        # The retry comes due, and is dropped as cancelled instead of run.
        await wait_until(lambda: any(o.status == "cancelled" for o in outcomes))
    assert task.state == "cancelled"
    assert seen[f"flaky:{task_id}"] == [1]


async def test_concurrent_tasks_with_the_same_node_ids(redis_url: str, namespace: str) -> None:
    async with system(redis_url, namespace) as (client, _, _):
        first = await client.submit(chain(30, 5))
        second = await client.submit(chain(12, 4))
        one, two = await client.wait(first, timeout=30), await client.wait(second, timeout=30)
        results = [await client.result(first), await client.result(second)]
    assert one.state == two.state == "succeeded"
    counts = [{r["parent"]: r["count"] for r in res["analyze"]} for res in results]
    assert counts == [{"merge": 60, "ocr": 30}, {"merge": 24, "ocr": 12}]


async def test_empty_source_finishes_with_count_zero(redis_url: str, namespace: str) -> None:
    graph = Graph("empty", params={"n": 0, "size": 5})
    graph.node("source", role="source").node("enrich", role="enrich")
    graph.node("total", function="metrics.aggregate")
    graph.edge("source", "enrich", on="batch").edge("enrich", "total", on="batch")
    async with system(redis_url, namespace) as (client, _, _):
        task_id = await client.submit(graph)
        task = await client.wait(task_id, timeout=10)
        result = await client.result(task_id)
    assert task.state == "succeeded"
    assert task.nodes["enrich"].dispatched == 0
    assert result == {"total": [{"count": 0, "sum": 0, "sums": {}}]}


def _intervals(tasks: list[streamflow.TaskState], role_nodes: set[str]) -> list[tuple[int, int]]:
    return sorted(
        (n.started_at_ms, n.finished_at_ms)  # type: ignore[misc]
        for t in tasks
        for i, n in t.nodes.items()
        if i in role_nodes
    )


@pytest.mark.slow
async def test_task_and_role_limits_hold(redis_url: str, namespace: str) -> None:
    per_task = Graph("limited", params={"seconds": 0.2}, max_running_nodes=1)
    for name in ("a", "b", "c"):
        per_task.node(name, role="slow")
    per_role = Graph("role-limited", params={"n": 1, "size": 1, "seconds": 0.2})
    per_role.node("x", role="slow").node("y", role="slow")
    async with system(redis_url, namespace, role_limits={"slow": 2}) as (client, _, _):
        limited = await client.submit(per_task)
        others = [await client.submit(per_role) for _ in range(3)]
        done = [await client.wait(t, timeout=30) for t in [limited, *others]]
    assert all(t.state == "succeeded" for t in done)
    runs = _intervals(done[:1], {"a", "b", "c"})
    # One node of the limited task at a time: each starts after the previous finished.
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(runs))
    # At most two 'slow' nodes at once across all tasks.
    every = _intervals(done, {"a", "b", "c", "x", "y"})
    for start, _ in every:
        assert sum(1 for s, f in every if s <= start < f) <= 2


@pytest.mark.slow
async def test_the_sweep_frees_leaked_role_slots_and_keeps_those_of_running_nodes(
    redis_url: str, namespace: str
) -> None:
    """Slots of nodes that ended, of unknown tasks or of states that do not read are freed."""
    keys = Keys(namespace)
    graph = Graph("holds-a-slot").node("long", role="slow", params={"seconds": 120})
    async with system(redis_url, namespace, role_limits={"slow": 5}) as (client, _, _):
        task_id = await client.submit(graph)
        await wait_until(lambda: seen.get(f"slow:{task_id}") == [("start", "long")], timeout=20)
        done = await client.submit(Graph("short").node("only", role="noop"))
        await client.wait(done, timeout=20)
        await client.redis.hset(keys.task_state("garbled"), mapping={"v": "1", "task": "[1"})
        held = f"{task_id}/long"
        leaked = [f"{done}/only", "gone/x", "garbled/x", f"{task_id}/no-such-node"]
        await client.redis.sadd(keys.role_slots("slow"), *leaked)
        await wait_for_query(
            lambda: _members_are(client.redis, keys.role_slots("slow"), {held}), timeout=20
        )
        await client.cancel(task_id, target="task")
        await client.wait(task_id, timeout=20)


async def test_a_wrong_type_active_set_does_not_stop_the_coordinator(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys(namespace)
    async with system(redis_url, namespace) as (client, _, _):
        await client.redis.set(keys.tasks_active(), "not a set")
        await wait_until(lambda: "sweeping tasks: Redis refused: WRONGTYPE" in caplog.text)
        await client.redis.delete(keys.tasks_active())
        task_id = await client.submit(Graph("after").node("only", role="noop"))
        assert (await client.wait(task_id, timeout=20)).state == "succeeded"
    assert caplog.text.count("sweeping tasks: Redis refused") == 1


async def _members_are(redis: Redis, key: str, expected: set[str]) -> bool:
    return {streams.text(m) for m in await redis.smembers(key)} == expected


async def test_invalid_graph_is_rejected_and_nothing_written(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    graph = Graph("bad")
    graph.node("a", role="source").node("a", role="nope").node("b", function="no.such")
    graph.edge("a", "b").edge("b", "a").edge("a", "ghost")
    client = Client(redis, namespace=namespace)
    with pytest.raises(GraphError) as caught:
        await client.submit(graph, roles=["source"])
    problems = "\n".join(caught.value.problems)
    for part in ("duplicate node id 'a'", "unknown role 'nope'", "unknown function", "cycle"):
        assert part in problems
    assert "unknown node 'ghost'" in problems
    assert [k async for k in redis.scan_iter(match=f"{namespace}:*")] == []


def _event(task_id: str, type_: str, invocation: int = 0, **fields: Any) -> dict[bytes, bytes]:
    event = TaskEvent(
        protocol=PROTOCOL_VERSION,
        kind="event",
        type=type_,  # type: ignore[arg-type]
        task_id=task_id,
        node_id="source",
        invocation=invocation,
        at_ms=now_ms(),
        **fields,
    )
    return {b"event": encode(event)}


@pytest.mark.slow
async def test_duplicated_late_and_out_of_order_events(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    """Batch events written by hand, each twice, shuffled, 'done' first: counts stay exact."""
    graph = Graph("by-hand")
    graph.node("source", role="manual").node("enrich", role="enrich")
    graph.node("total", function="metrics.aggregate")
    graph.edge("source", "enrich", on="batch").edge("enrich", "total", on="batch")
    keys = Keys(namespace)
    async with system(redis_url, namespace) as (client, _, outcomes):
        task_id = await client.submit(graph, roles=["manual", "enrich"])
        events = [_event(task_id, "done", total=20)]
        for seq in range(20):
            ref = keys.batch("manual", task_id, "source", 0, seq)
            await redis.set(ref, f"[{seq}, {seq + 100}]")
            events += [_event(task_id, "batch", seq=seq, ref=ref, items=2)] * 2
        random.Random(7).shuffle(events)
        for fields in events:
            await redis.xadd(keys.events("manual"), fields)  # type: ignore[arg-type]
        task = await client.wait(task_id, timeout=20)
        result = await client.result(task_id)
    assert task.state == "succeeded"
    assert task.nodes["source"].batches_out == 20
    assert task.nodes["enrich"].dispatched == task.nodes["enrich"].completed == 20
    assert len([o for o in outcomes if o.role == "enrich"]) == 20  # no duplicate dispatch
    expected = sum(seq + 1 + seq + 101 for seq in range(20))
    assert result == {"total": [{"count": 40, "sum": expected, "sums": {}}]}


async def test_malformed_event_is_dead_lettered(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    keys = Keys(namespace)
    await redis.sadd(keys.known_roles(), "source")
    async with system(redis_url, namespace) as (client, _, _):
        await redis.xadd(keys.events("source"), {"event": b"{not json"})
        await wait_for_query(lambda: redis.xlen(keys.dead_letters("source")))
        # The coordinator keeps serving.
        graph = Graph("after", params={"n": 2, "size": 2}).node("source", role="source")
        task = await client.wait(await client.submit(graph), timeout=10)
    assert task.state == "succeeded"
    [(_, fields)] = await redis.xrange(keys.dead_letters("source"))
    assert fields[b"invalid_event"].startswith(b"invalid_json")
    assert fields[b"raw:event"] == b"{not json"


async def test_finished_tasks_expire_after_the_retention(
    redis_url: str, namespace: str, redis: Redis
) -> None:
    graph = Graph("short-lived", params={"n": 6, "size": 2})
    graph.node("source", role="source").node("enrich", role="enrich")
    graph.edge("source", "enrich", on="batch")
    async with system(redis_url, namespace, retention=60) as (client, _, _):
        task_id = await client.submit(graph)
        await client.wait(task_id, timeout=10)
    keys = Keys(namespace)
    refs = [*await redis.lrange(keys.task_output(task_id, "source"), 0, -1)]
    refs += await redis.lrange(keys.task_output(task_id, "enrich"), 0, -1)
    assert len(refs) == 6
    for key in [keys.task_state(task_id), keys.task_output(task_id, "enrich"), *refs]:
        assert 0 < await redis.pttl(key) <= 60_000, key


@pytest.mark.slow
async def test_node_timeout_and_retry_override_the_role(redis_url: str, namespace: str) -> None:
    graph = Graph("timeout", params={"seconds": 30})
    graph.node("slow", role="slow", timeout=0.2, retry={"max_attempts": 2, "backoff": 0})
    async with system(redis_url, namespace) as (client, _, outcomes):
        task_id = await client.submit(graph)
        task = await client.wait(task_id, timeout=15)
    assert task.state == "failed"
    assert task.nodes["slow"].attempts == 2
    assert "timed out after 0.2s" in (task.nodes["slow"].error or "")
    assert [o.status for o in outcomes] == ["retried", "dead_lettered"]


# -- scale: a step costs what its events touch, not what the graph holds --------------------


@pytest.mark.slow
async def test_a_step_looks_only_at_the_nodes_its_events_touch(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph is indexed once per task, and a step evaluates the touched nodes only.

    Before, every step recomputed the graph's order and evaluated every node at least once:
    a chain of n nodes cost n evaluations per step, n * steps in all.
    """
    length = 40
    builds: list[int] = []
    evaluated: list[str] = []
    real_build = streamflow.dag.graph.GraphIndex.build.__func__  # type: ignore[attr-defined]
    real_settle = streamflow.dag.tasks._Machine._settle_node

    def build(cls: type[Any], spec: Any) -> Any:
        builds.append(len(spec.nodes))
        return real_build(cls, spec)

    def settle_node(machine: Any, node_id: str, *args: Any) -> bool:
        evaluated.append(node_id)
        return real_settle(machine, node_id, *args)

    written: list[int] = []
    real_encode = taskstore.encode_state

    def encode_state(task: Any, nodes: Any) -> Any:
        nodes = list(nodes)
        written.append(len(nodes))
        return real_encode(task, nodes)

    monkeypatch.setattr(streamflow.dag.graph.GraphIndex, "build", classmethod(build))
    monkeypatch.setattr(streamflow.dag.tasks._Machine, "_settle_node", settle_node)
    monkeypatch.setattr(taskstore, "encode_state", encode_state)
    graph = Graph("long-chain")
    for i in range(length):
        graph.node(f"n{i}", role="noop")
        if i:
            graph.edge(f"n{i - 1}", f"n{i}")
    # No sweep during the task: its ticks evaluate every node, once a minute by default.
    async with system(redis_url, namespace, sweep_interval=3600) as (client, coordinator, _):
        task_id = await client.submit(graph)
        task = await client.wait(task_id, timeout=60)
    assert task.state == "succeeded"
    assert all(n.state == "succeeded" for n in task.nodes.values())
    # One index for the client's check of the graph, one for the coordinator's copy of it:
    # not one per step.
    assert builds == [length, length]
    assert coordinator.commits >= length
    # The first step (submit) looks at every node; each later one at a node and its child.
    assert len(evaluated) <= length + 4 * coordinator.commits
    assert len(evaluated) < length * coordinator.commits / 4
    # Each commit stores the nodes its step touched, not the whole task: the first (submit)
    # writes every node, the steps after it a node or two each.
    assert written[0] == length
    assert sum(written[1:]) <= 4 * coordinator.commits


# -- tasks the coordinator cannot run, and cancels it did not see ------------------------------


def forged_graph(*, cyclic: bool = False) -> bytes:
    """Node a feeding b (and b feeding a when ``cyclic``: a cycle, which submit refuses)."""
    edges = [{"from": "a", "to": "b"}] + ([{"from": "b", "to": "a"}] if cyclic else [])
    nodes = [{"id": "a", "role": "noop"}, {"id": "b", "role": "noop"}]
    return orjson.dumps({"nodes": nodes, "edges": edges})


def forged_state(task_id: str) -> dict[str, Any]:
    """The task's own state, queued, and its two nodes', as the store writes them."""
    task = orjson.dumps({"id": task_id, "nodes": {}, "created_at_ms": now_ms()})
    return {"task": task, "node:a": b"{}", "node:b": b"{}"}


FORGERIES: dict[str, tuple[dict[str, Any], str]] = {
    "cyclic": ({"spec": forged_graph(cyclic=True)}, "its graph is invalid: cycle: a -> b -> a"),
    "over-the-node-limit": (
        {"spec": orjson.dumps({"nodes": [{"id": f"n{i}", "role": "noop"} for i in range(10_001)]})},
        "its graph is invalid: the graph has 10,001 nodes; at most 10,000 are allowed",
    ),
    "garbage-spec": ({"spec": b"\\x00not json"}, "its graph does not parse"),
    "hostile-key": (
        {"spec": b'{"nodes": [], "x\\r\\nERROR forged\\u202e": 1}'},
        "its graph does not parse (1 errors; first: x\\r\\nERROR forged\\u202e: Extra inputs",
    ),
    "garbage-state": ({"task": b"[1, 2"}, "its state does not parse"),
    "state-of-other-nodes": (
        {"spec": orjson.dumps({"nodes": [{"id": "z", "role": "noop"}]})},
        "its state has no record of node 'z'",
    ),
    "garbage-node": ({"node:a": b'{"state": "dancing"}'}, "its record of node 'a' does not parse"),
    "garbage-version": ({"v": b"x1"}, "its version is not a number"),
    "missing-graph": ({"spec": None}, "its stored state is incomplete"),
}


@pytest.mark.slow
@pytest.mark.parametrize("forgery", list(FORGERIES))
async def test_a_forged_task_the_coordinator_cannot_run_ends_failed_with_the_reason(
    redis_url: str, namespace: str, forgery: str
) -> None:
    """Written by raw HSET/SADD/XADD (any worker ACL user can): never left queued for ever."""
    keys = Keys(namespace)
    task_id = f"forged-{forgery}"
    changes, reason = FORGERIES[forgery]
    fields: dict[str, Any] = {"v": b"0", "spec": forged_graph()}
    fields.update(forged_state(task_id))
    fields.update(changes)
    async with system(redis_url, namespace) as (client, _, _):
        await client.redis.hset(
            keys.task_state(task_id), mapping={k: v for k, v in fields.items() if v is not None}
        )
        await client.redis.sadd(keys.tasks_active(), task_id)
        await client.redis.xadd(keys.tasks_control(), {"task": task_id, "type": "submitted"})
        # Until the coordinator replaces it, a forged state may not even parse.
        await wait_for_query(lambda: _has_ended(client, task_id), timeout=20)
        task = await client.wait(task_id, timeout=1)
        # The coordinator goes on with other tasks.
        good = await client.submit(Graph("after").node("only", role="noop"))
        assert (await client.wait(good, timeout=20)).state == "succeeded"
        assert not await client.redis.sismember(keys.tasks_active(), task_id)
    assert task.state == "failed"
    assert task.error is not None
    assert task.error.startswith(f"the coordinator cannot run this task: {reason}")
    assert all(n.state == "cancelled" for n in task.nodes.values())


@pytest.mark.slow
async def test_a_task_whose_state_key_is_not_a_hash_is_dropped_and_others_run(
    redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    async with system(redis_url, namespace) as (client, _, _):
        await client.redis.rpush(keys.task_state("wrong-type"), "x")
        await client.redis.sadd(keys.tasks_active(), "wrong-type", "not a {task} id")
        await client.redis.xadd(keys.tasks_control(), {"task": "wrong-type", "type": "submitted"})
        await wait_for_query(lambda: _none_active(client.redis, keys.tasks_active()), timeout=20)
        good = await client.submit(Graph("after").node("only", role="noop"))
        assert (await client.wait(good, timeout=20)).state == "succeeded"


async def _has_ended(client: Client, task_id: str) -> bool:
    try:
        task = await client.task(task_id)
    except ValueError:  # pydantic's ValidationError
        return False
    return task is not None and task.terminal


async def _none_active(redis: Redis, key: str) -> bool:
    return await redis.scard(key) == 0


async def test_a_cancel_sent_while_no_coordinator_runs_keeps_its_reason_and_finished_nodes(
    redis_url: str, namespace: str
) -> None:
    """A node that finished before the cancel stays succeeded; the task keeps the reason.

    Both news reach the coordinator in one step once it runs again: the finished node's events
    and the cancelled node's report (whose own wording must not replace the sender's reason).
    """
    graph = Graph("cancel-offline").node("first", role="gate")
    graph.node("long", role="slow", params={"seconds": 120})
    redis = connect.connect(redis_url)
    client = Client(redis, namespace=namespace)
    outcomes: list[Outcome] = []
    worker = Worker(
        app, redis, namespace=namespace, block_ms=100, shutdown_grace=1, on_outcome=outcomes.append
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            async with coordinating(redis, namespace):
                task_id = await client.submit(graph)
                await wait_until(lambda: seen.get(f"gate:{task_id}") == ["start"], timeout=20)
                await wait_until(lambda: seen.get(f"slow:{task_id}") == [("start", "long")])
            # No coordinator runs now: the first node finishes, then the task is cancelled.
            gates.setdefault(task_id, anyio.Event()).set()
            await wait_until(lambda: ("gate", "acked") in {(o.role, o.status) for o in outcomes})
            await client.cancel(task_id, target="task", reason="operator: stop now")
            await wait_until(
                lambda: ("slow", "cancelled") in {(o.role, o.status) for o in outcomes}
            )
            assert not (await client.task(task_id)).terminal  # type: ignore[union-attr]
            async with coordinating(redis, namespace):
                task = await client.wait(task_id, timeout=20)
            worker.stop()
    finally:
        await redis.aclose()
    assert task.state == "cancelled"
    assert task.error == "operator: stop now"
    assert task.nodes["first"].state == "succeeded"
    assert task.nodes["first"].batches_out == 1
    assert task.nodes["long"].state == "cancelled"
    assert task.nodes["long"].error == "operator: stop now"


@asynccontextmanager
async def coordinating(redis: Redis, namespace: str) -> AsyncIterator[Coordinator]:
    """A coordinator running in the background until the block ends."""
    coordinator = Coordinator(redis, namespace=namespace, block_ms=100, sweep_interval=0.1)
    async with anyio.create_task_group() as tg:
        await tg.start(coordinator.run)
        yield coordinator
        coordinator.stop()


async def test_the_store_keeps_a_bounded_number_of_tasks_and_nodes_in_memory(
    redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(taskstore, "SPEC_CACHE_NODES", 100)
    monkeypatch.setattr(taskstore, "SPEC_CACHE_SIZE", 3)
    store = taskstore.TaskStore(redis, Keys(namespace))
    small = Graph("small").node("only", role="noop").spec()
    wide = Graph("wide")
    for i in range(60):
        wide.node(f"n{i}", role="noop")
    tasks = {**{f"s{i}": small for i in range(1, 5)}, "w1": wide.spec(), "w2": wide.spec()}
    kept = []
    for task_id, spec in tasks.items():
        await store.create(spec, streamflow.TaskState.new(task_id, spec, now_ms()))
        assert await store.load(task_id) is not None
        kept.append((list(store._cache), store._cached_nodes))

    # At most 3 tasks, the least recently used dropped first; then at most 100 nodes in all.
    assert kept == [
        (["s1"], 1),
        (["s1", "s2"], 2),
        (["s1", "s2", "s3"], 3),
        (["s2", "s3", "s4"], 3),
        (["s3", "s4", "w1"], 62),
        (["w2"], 60),
    ]
    # A task dropped is read again, whole.
    loaded = await store.load("w1")
    assert loaded is not None and len(loaded.task.nodes) == 60
    assert list(store._cache) == ["w1"]


async def _dispatched_by_hand(client: Client, redis: Redis, namespace: str) -> tuple[str, int]:
    """A one-node task of a role no worker serves, dispatched; its id and state version."""
    task_id = await client.submit(Graph("by-hand").node("source", role="manual"), roles=["manual"])
    keys = Keys(namespace)
    await wait_for_query(lambda: redis.xlen(keys.role_stream("manual")))
    await wait_for_query(lambda: _settled_version(redis, keys, task_id))
    return task_id, await _settled_version(redis, keys, task_id)


async def _settled_version(redis: Redis, keys: Keys, task_id: str) -> int:
    """The task's state version once its outbox is empty (0 while an item is left)."""
    return await _version(redis, keys, task_id) if await _outbox_empty(redis, keys, task_id) else 0


async def _version(redis: Redis, keys: Keys, task_id: str) -> int:
    """The task's state version (0: none)."""
    return int(await redis.hget(keys.task_state(task_id), "v") or 0)


async def _report(
    redis: Redis, keys: Keys, task_id: str, type_: str, **fields: Any
) -> dict[bytes, bytes]:
    """Adds the first run's ``type_`` event of the task's node to the events stream."""
    event = _event(task_id, type_, attempt=1, delivery=1, **fields)
    await redis.xadd(keys.events("manual"), event)  # type: ignore[arg-type]
    return event


async def test_an_accepted_event_alone_waits_for_the_runs_next_event_one_commit_for_both(
    redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held far longer than the test: ``accepted`` then ``done`` are committed in one step."""
    monkeypatch.setattr(coordinator_module, "ACCEPTED_HOLD", 60.0)
    keys, client = Keys(namespace), Client(redis, namespace=namespace)
    async with coordinating(redis, namespace) as coordinator:
        task_id, version = await _dispatched_by_hand(client, redis, namespace)
        accepted = await _report(redis, keys, task_id, "accepted")
        await wait_until(lambda: coordinator._held_since)
        assert await pending_count_of(redis, keys.events("manual")) == 1  # held: not acked
        await _report(redis, keys, task_id, "done", total=0)
        task = await client.wait(task_id, timeout=10)
        await wait_for_query(lambda: _nothing_pending(redis, keys.events("manual")))
    assert task.state == "succeeded"
    assert task.nodes["source"].started_at_ms == orjson.loads(accepted[b"event"])["at_ms"]
    assert await _version(redis, keys, task_id) == version + 1
    assert await redis.xlen(keys.events("manual")) == 0  # acknowledged and deleted


async def test_an_accepted_event_alone_is_committed_after_the_hold(
    redis: Redis, namespace: str
) -> None:
    keys, client = Keys(namespace), Client(redis, namespace=namespace)
    async with coordinating(redis, namespace) as coordinator:
        task_id, version = await _dispatched_by_hand(client, redis, namespace)
        await _report(redis, keys, task_id, "accepted")
        await wait_for_query(lambda: _node_state(client, task_id, "running"))
        # Its acknowledgement went with the coordinator's next read.
        await wait_for_query(lambda: _nothing_pending(redis, keys.events("manual")))
        assert not coordinator._held and not coordinator._held_since
    assert await _version(redis, keys, task_id) == version + 1
    assert await redis.xlen(keys.events("manual")) == 0


async def _node_state(client: Client, task_id: str, state: str) -> bool:
    task = await client.task(task_id)
    return task is not None and task.nodes["source"].state == state


async def _nothing_pending(redis: Redis, stream: str) -> bool:
    return await pending_count_of(redis, stream) == 0


async def pending_count_of(redis: Redis, stream: str) -> int:
    """Events of ``stream`` read by a coordinator and not yet acknowledged."""
    info = await redis.xpending(stream, "coordinators")
    return int(info["pending"])


async def test_jobs_committed_and_never_published_are_published_once_by_another_coordinator(
    redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator that dies between a commit and its jobs' publish (possible on a cluster,
    where they are two round trips): the outbox it leaves is finished by another's tick."""
    keys, client = Keys(namespace), Client(redis, namespace=namespace)
    carried: list[str] = []

    async def dies_before_publishing(
        outbox: Outbox, task_id: str, items: Any, sent: frozenset[str] = frozenset()
    ) -> Any:
        carried.append(task_id)
        raise anyio.get_cancelled_exc_class()  # as if killed: nothing after the commit runs

    with monkeypatch.context() as patched:
        # Two round trips, as on a cluster.
        patched.setattr(Outbox, "with_commit", lambda *_: WithCommit())
        patched.setattr(Outbox, "carry_out", dies_before_publishing)
        first = Coordinator(redis, namespace=namespace, block_ms=100, sweep_interval=3600)
        task_id = await client.submit(Graph("left").node("source", role="manual"), roles=["manual"])
        with pytest.raises(anyio.get_cancelled_exc_class()):
            await first.drain()
    assert carried == [task_id]
    assert await redis.hlen(keys.task_outbox(task_id)) == 1  # committed ...
    assert await redis.xlen(keys.role_stream("manual")) == 0  # ... and never published

    async with coordinating(redis, namespace) as second:  # sweeps every 0.1 s: ticks
        await wait_for_query(lambda: _outbox_empty(redis, keys, task_id))
    third = Coordinator(redis, namespace=namespace)
    await third.drain()  # sweeps: a tick of the task reads its outbox back, finds it empty
    assert await redis.xlen(keys.role_stream("manual")) == 1
    assert (second.dispatches, third.dispatches) == (1, 0)


async def _outbox_empty(redis: Redis, keys: Keys, task_id: str) -> bool:
    return not await redis.hlen(keys.task_outbox(task_id))


async def test_a_coordinator_stopping_steps_the_accepted_events_it_holds(
    redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "ACCEPTED_HOLD", 60.0)
    keys, client = Keys(namespace), Client(redis, namespace=namespace)
    async with coordinating(redis, namespace) as coordinator:
        task_id, version = await _dispatched_by_hand(client, redis, namespace)
        await _report(redis, keys, task_id, "accepted")
        await wait_until(lambda: coordinator._held)
    assert await _node_state(client, task_id, "running")
    assert await _version(redis, keys, task_id) == version + 1
    assert await pending_count_of(redis, keys.events("manual")) == 0
    assert await redis.xlen(keys.events("manual")) == 0


async def test_an_events_group_lost_under_the_read_that_carries_the_acknowledgement_is_recreated(
    redis: Redis, namespace: str
) -> None:
    keys, client = Keys(namespace), Client(redis, namespace=namespace)
    async with coordinating(redis, namespace):
        task_id, _ = await _dispatched_by_hand(client, redis, namespace)
        await wait_for_query(lambda: redis.exists(keys.events("manual")))  # the group made
        # Gone while the coordinator's blocking read (with the last acknowledgement) waits.
        await redis.xgroup_destroy(keys.events("manual"), "coordinators")
        await _report(redis, keys, task_id, "accepted")
        await _report(redis, keys, task_id, "done", total=0)
        task = await client.wait(task_id, timeout=10)
    assert task.state == "succeeded"


@pytest.mark.parametrize("options", [{"read_count": 0}, {"role_limits": {"echo": 0}}])
async def test_settings_that_cannot_work_are_refused_at_construction(
    redis: Redis, options: dict[str, Any]
) -> None:
    # read_count 0 would reach Redis as COUNT 0: no limit, the whole stream in one read.
    with pytest.raises(ValueError, match="must be at least 1"):
        Coordinator(redis, **options)
