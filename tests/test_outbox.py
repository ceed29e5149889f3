"""The coordinator's outbox: typed items in the stored format, carried out from memory.

Also the scripts the DAG side runs through ``scripts`` (``slot.lua``, ``task_commit.lua``,
``publish_dedup.lua`` pipelined).
"""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from redis.asyncio import Redis

import streamflow
from streamflow import Client, Coordinator, Graph, Worker, connect, scripts, streams
from streamflow.dag.outbox import (
    CancelItem,
    FunctionItem,
    Item,
    JobItem,
    ReduceItem,
    ReleaseItem,
    decode_item,
    encode_item,
)
from streamflow.dag.store import TaskStore
from streamflow.dag.tasks import Internal
from streamflow.keys import Keys
from streamflow.protocol import now_ms
from streamflow.records import TaskEvent
from tests.helpers import running

#: Each kind of item, and its stored JSON as coordinators have always written it.
STORED: list[tuple[Item, dict[str, Any]]] = [
    (
        JobItem("ocr", "ocr#1", "t.n.0", '{"id":"t.n.0"}'),
        {"kind": "job", "role": "ocr", "shard": "ocr#1", "id": "t.n.0", "job": '{"id":"t.n.0"}'},
    ),
    (
        FunctionItem("merge", 2, batch=("src", 3, "sf:batch")),
        {"kind": "function", "node": "merge", "invocation": 2, "batch": ["src", 3, "sf:batch"]},
    ),
    (
        FunctionItem("merge", 0, inputs={"a": 2}),
        {"kind": "function", "node": "merge", "invocation": 0, "inputs": {"a": 2}},
    ),
    (
        FunctionItem("merge", 0),
        {"kind": "function", "node": "merge", "invocation": 0, "inputs": None},
    ),
    (ReduceItem("merge"), {"kind": "reduce", "node": "merge"}),
    (ReleaseItem("ocr", "n"), {"kind": "release", "role": "ocr", "node": "n"}),
    (CancelItem("failed: x"), {"kind": "cancel", "reason": "failed: x"}),
]


@pytest.mark.parametrize(("item", "stored"), STORED)
def test_items_keep_the_stored_format_and_read_back_as_written(
    item: Item, stored: dict[str, Any]
) -> None:
    assert orjson.loads(encode_item(item)) == stored
    assert decode_item(encode_item(item)) == item


def test_a_job_item_written_before_partitions_goes_to_the_roles_first() -> None:
    old = orjson.dumps({"kind": "job", "role": "ocr", "id": "t.n.0", "job": "{}"})
    assert decode_item(old) == JobItem("ocr", None, "t.n.0", "{}")


def test_an_item_of_an_unknown_kind_reads_as_none() -> None:
    assert decode_item(b'{"kind": "from-the-future", "node": "x"}') is None


app = streamflow.App()


@app.role("noop")
async def noop(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    """Nothing."""


@pytest.mark.anyio
@pytest.mark.redis
async def test_the_coordinator_carries_out_its_own_commits_without_reading_them_back(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    real_outbox = TaskStore.outbox

    async def outbox(store: TaskStore, task_id: str) -> list[tuple[str, bytes]]:
        reads.append(task_id)
        return await real_outbox(store, task_id)

    monkeypatch.setattr(TaskStore, "outbox", outbox)
    graph = Graph("chain")
    for name in ("a", "b", "c", "d"):
        graph.node(name, role="noop")
    graph.edge("a", "b").edge("b", "c").edge("c", "d")
    redis = connect.connect(redis_url)
    worker = Worker(app, redis, namespace=namespace, block_ms=100, shutdown_grace=1)
    # No sweep during the task: only the submit's control entry ticks it.
    coordinator = Coordinator(redis, namespace=namespace, block_ms=100, sweep_interval=3600)
    try:
        async with running(worker), anyio.create_task_group() as tg:
            await tg.start(coordinator.run)
            client = Client(redis, namespace=namespace)
            task = await client.wait(await client.submit(graph), timeout=30)
            coordinator.stop()
    finally:
        await redis.aclose()
    assert task.state == "succeeded", task.error
    assert coordinator.dispatches == 4
    # Four steps dispatched a job each; the outbox was read back only for the submit's tick.
    assert reads == [task.id]


@pytest.mark.anyio
@pytest.mark.redis
async def test_take_slot_holds_at_most_the_limit_and_is_idempotent_per_member(
    redis: Redis, namespace: str
) -> None:
    registered, slots = scripts.Scripts(redis), Keys(namespace).role_slots("ocr")
    assert await scripts.take_slot(registered, redis, slots, "t/a", 1)
    assert await scripts.take_slot(registered, redis, slots, "t/a", 1)  # already held
    assert not await scripts.take_slot(registered, redis, slots, "t/b", 1)
    assert await redis.smembers(slots) == {b"t/a"}


@pytest.mark.anyio
@pytest.mark.redis
async def test_commit_task_writes_only_on_the_expected_version(
    redis: Redis, namespace: str
) -> None:
    keys, registered = Keys(namespace), scripts.Scripts(redis)
    state, outbox = keys.task_state("t"), keys.task_outbox("t")
    output, partials = keys.task_output("t", "n"), keys.task_partials("t", "n")

    async def commit(version: int, value: bytes) -> int | None:
        return await scripts.commit_task(
            registered,
            redis,
            state=state,
            outbox=outbox,
            version=version,
            fields={"task": value},
            items={"1.000000": value},
            appends=[(output, "ref-" + value.decode())],
            partials=[(partials, "0", value)],
        )

    assert await commit(-1, b"one") == 0  # a new task: no version yet
    assert await commit(-1, b"two") is None  # the task exists: nothing written
    assert await commit(0, b"three") == 1
    assert await redis.hget(state, "task") == b"three"
    assert await redis.hgetall(outbox) == {b"1.000000": b"three"}
    assert await redis.lrange(output, 0, -1) == [b"ref-one", b"ref-three"]
    assert await redis.hgetall(partials) == {b"0": b"three"}


def dedup_publishes(keys: Keys, count: int) -> list[scripts.DedupPublish]:
    """``count`` dispatches of role ``ocr``: message n has id n and dedup key ``dispatch:n``."""
    return [
        scripts.DedupPublish(
            stream=keys.role_stream("ocr"),
            marker=keys.dedup("ocr", f"dispatch:{n}"),
            schedule=keys.delayed("ocr"),
            message_id=str(n),
            message=f"message {n}".encode(),
            window_ms=60_000,
        )
        for n in range(count)
    ]


@pytest.mark.anyio
@pytest.mark.redis
async def test_publish_dedup_many_publishes_each_message_once(redis: Redis, namespace: str) -> None:
    keys, registered = Keys(namespace), scripts.Scripts(redis)
    publishes = dedup_publishes(keys, 3)
    assert await scripts.publish_dedup_many(registered, redis, publishes[:2]) == [True, True]
    assert await scripts.publish_dedup_many(registered, redis, publishes) == [False, False, True]
    assert await scripts.publish_dedup_many(registered, redis, []) == []
    entries = await streams.read_range(redis, keys.role_stream("ocr"))
    assert [e.fields[b"message"] for e in entries] == [b"message 0", b"message 1", b"message 2"]


@pytest.mark.anyio
@pytest.mark.redis
async def test_publish_dedup_many_loads_the_script_when_redis_lost_it(
    redis: Redis, namespace: str
) -> None:
    keys, registered = Keys(namespace), scripts.Scripts(redis)
    publishes = dedup_publishes(keys, 2)
    await redis.script_flush()  # as after a restart: EVALSHA is refused until it is loaded
    assert await scripts.publish_dedup_many(registered, redis, publishes) == [True, True]
    await redis.script_flush()
    assert await scripts.publish_dedup_many(registered, redis, publishes) == [False, False]
    assert await redis.xlen(keys.role_stream("noop")) == 0
    assert await redis.xlen(keys.role_stream("ocr")) == 2


def _event(task_id: str, kind: str, node_id: str) -> TaskEvent:
    return TaskEvent(
        protocol=1,
        kind="event",
        type=kind,
        task_id=task_id,
        node_id=node_id,
        invocation=0,
        at_ms=now_ms(),
        total=0 if kind == "done" else None,
    )


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_step_from_the_state_kept_is_checked_when_another_coordinator_committed(
    redis: Redis, namespace: str
) -> None:
    # A coordinator steps a task from the state it committed last, without reading it; when
    # another one committed in between, the version check (a change) or a read (no change
    # on the state kept) makes it apply the events to the state as it is.
    graph = Graph("pair")
    graph.node("a", role="noop").node("b", role="noop").edge("a", "b")
    first = Coordinator(redis, namespace=namespace)
    second = Coordinator(redis, namespace=namespace)
    task_id = await Client(redis, namespace=namespace).submit(graph, roles=["noop"])
    await first.process(task_id, [Internal("tick")])  # dispatches a; kept by first
    await second.process(task_id, [_event(task_id, "done", "a")])  # a done, b dispatched
    # On the state first kept, b was never dispatched: its start would be ignored.
    await first.process(task_id, [_event(task_id, "accepted", "b")])
    await first.process(task_id, [_event(task_id, "accepted", "a")])  # news of a: no change
    await first.process(task_id, [_event(task_id, "done", "b")])
    task = await Client(redis, namespace=namespace).task(task_id)
    assert task is not None
    assert task.state == "succeeded", task.error
    assert task.nodes["b"].started_at_ms is not None
    assert (first.commits, second.commits) == (3, 1)
    assert first.dispatches + second.dispatches == 2


def committed_publishes(keys: Keys, count: int, item: bytes) -> list[scripts.CommittedPublish]:
    """The dispatches of :func:`dedup_publishes` as items ``1.00000n`` of task ``t``'s outbox."""
    return [
        scripts.CommittedPublish(publish, keys.task_outbox("t"), f"1.{n:06d}", item)
        for n, publish in enumerate(dedup_publishes(keys, count))
    ]


async def _commit_and_publish(
    registered: scripts.Scripts,
    redis: Redis,
    keys: Keys,
    publishes: list[scripts.CommittedPublish],
    version: int,
    item: bytes,
) -> tuple[int | None, list[bool | None]]:
    return await scripts.commit_and_publish(
        registered,
        redis,
        publishes,
        state=keys.task_state("t"),
        outbox=keys.task_outbox("t"),
        version=version,
        fields={"task": b"state"},
        items={p.name: item for p in publishes},
    )


async def _first_commit_and_publish(
    redis: Redis, namespace: str
) -> tuple[Keys, scripts.Scripts, list[scripts.CommittedPublish]]:
    """Task ``t``'s first commit with two dispatches, which it publishes both."""
    keys, registered = Keys(namespace), scripts.Scripts(redis)
    publishes = committed_publishes(keys, 2, b"item")
    assert await _commit_and_publish(registered, redis, keys, publishes, -1, b"item") == (
        0,
        [True, True],
    )
    return keys, registered, publishes


@pytest.mark.anyio
@pytest.mark.redis
async def test_commit_and_publish_publishes_only_what_its_commit_wrote(
    redis: Redis, namespace: str
) -> None:
    keys, registered, publishes = await _first_commit_and_publish(redis, namespace)
    # Again: the markers are there. Then a commit that loses its race publishes nothing,
    # although items of those names are in the outbox (with other contents).
    assert await _commit_and_publish(registered, redis, keys, publishes, 0, b"item") == (
        1,
        [False, False],
    )
    others = committed_publishes(keys, 3, b"another item")
    assert await _commit_and_publish(registered, redis, keys, others, 0, b"another item") == (
        None,
        [None, None, None],
    )
    entries = await streams.read_range(redis, keys.role_stream("ocr"))
    assert [e.fields[b"message"] for e in entries] == [b"message 0", b"message 1"]
    assert await redis.hget(keys.task_state("t"), "v") == b"1"


@pytest.mark.anyio
@pytest.mark.redis
async def test_commit_and_publish_loads_the_scripts_when_redis_lost_them(
    redis: Redis, namespace: str
) -> None:
    """The commit refused with the publishes: they find no item, it is sent again alone."""
    keys, registered, _ = await _first_commit_and_publish(redis, namespace)
    await redis.script_flush()
    await registered.publish_committed(  # only this one loaded again
        keys=[keys.role_stream("x"), keys.dedup("x", "k"), keys.delayed("x"), "absent"],
        args=["id", 1000, b"m", 0, "name", b"item"],
        client=redis,
    )
    later = committed_publishes(keys, 3, b"later")[2:]
    assert await _commit_and_publish(registered, redis, keys, later, 0, b"later") == (1, [None])
    assert await redis.xlen(keys.role_stream("ocr")) == 2  # the caller publishes it as usual
    await redis.script_flush()
    assert await _commit_and_publish(registered, redis, keys, [], 1, b"") == (2, [])
