"""The core round trip on a real 3-master Redis Cluster, through a ``redis+cluster://`` URL."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as redis_sync
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from streamflow import (
    App,
    Client,
    Context,
    Coordinator,
    Graph,
    RetryPolicy,
    SyncClient,
    Worker,
    connect,
    partitions,
    streams,
)
from streamflow.delivery import Outcome
from streamflow.errors import ConfigError, RedisUnavailable
from streamflow.keys import Keys
from streamflow.ops import acl, guard
from streamflow.ops.exporter import Exporter
from streamflow.ops.inspect import inspect_roles
from streamflow.ops.server import RedisServer
from streamflow.records import decode_dead_letter
from tests.cluster import LocalCluster, local_cluster, require_cluster_tools
from tests.helpers import make_worker, pending_count, running, wait_for, wait_until
from tests.processes import Record, Workers, assert_none_lost_and_duplicates_allowed, unique

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A 3-master cluster for this module (about 3 s to start), torn down after it."""
    require_cluster_tools()
    with local_cluster() as running_cluster:
        yield running_cluster


@pytest.fixture
async def cluster_redis(cluster: LocalCluster) -> AsyncIterator[Redis]:
    """A streamflow client of the cluster, built from its ``redis+cluster://`` URL."""
    client = connect.connect(cluster.url)
    yield client
    await client.aclose()


def master_of(cluster: LocalCluster, key: str) -> str:
    """The ``host:port`` of the master that owns ``key`` (CLUSTER KEYSLOT, then CLUSTER SLOTS)."""
    first = cluster.servers[0]
    with redis_sync.Redis(host=first.host, port=first.port) as node:
        slot = int(node.execute_command("CLUSTER KEYSLOT", key))
    return cluster.node_of_slot(slot)


# -- the URL ---------------------------------------------------------------------------------


def test_cluster_urls_are_validated_and_redacted() -> None:
    url = "redis+cluster://app:s3cr/t@10.0.0.1:7000,10.0.0.2:7001"
    assert connect.validate_url(url) == url
    assert connect.cluster_nodes(url) == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert connect.redact_url(url) == "redis+cluster://app:***@10.0.0.1:7000,10.0.0.2:7001"
    for bad in (
        "redis+cluster://",
        "redis+cluster://host",
        "redis+cluster://host:port",
        "redis+cluster://h:7000,",
        "redis+cluster://h:70000",
        "redis+cluster://h:7000/0",
        "redis+cluster://h:7000?password=x",
    ):
        with pytest.raises(ConfigError, match="invalid Redis URL"):
            connect.validate_url(bad)


def test_tls_files_need_a_tls_cluster_url(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="TLS files need a rediss:// or rediss\\+cluster://"):
        connect.connect("redis+cluster://127.0.0.1:7000", tls_ca_file=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match=r"TLS CA file .* does not exist"):
        connect.connect("rediss+cluster://127.0.0.1:7000", tls_ca_file=tmp_path / "ca.pem")


# -- against the cluster ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_cluster_url_gives_a_cluster_client_without_retries(cluster_redis: Any) -> None:
    await connect.ping(cluster_redis)
    assert isinstance(cluster_redis, RedisCluster)
    assert cluster_redis.retry.get_retries() == 0


@pytest.mark.anyio
async def test_jobs_of_two_roles_on_different_masters_are_handled_acked_and_deleted(
    cluster: LocalCluster, cluster_redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    # Pick a second role whose stream is served by another master than "echo"'s, and prove it.
    home = master_of(cluster, keys.role_stream("echo"))
    other = next(
        role
        for role in (f"r{i}" for i in range(100))
        if master_of(cluster, keys.role_stream(role)) != home
    )
    assert master_of(cluster, keys.role_stream(other)) != home

    app = App()
    seen: list[tuple[str, Any]] = []

    @app.role("echo")
    async def echo(ctx: Context, payload: Any) -> None:
        seen.append(("echo", payload))

    @app.role(other)
    async def second(ctx: Context, payload: Any) -> None:
        seen.append((other, payload))

    client = Client(cluster_redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(30):
        async with running(make_worker(app, cluster_redis, namespace, outcomes)):
            first = await client.publish("echo", {"n": -1})
            ids = await client.publish_many("echo", ({"n": i} for i in range(200)))
            ids += await client.publish_many(other, ({"n": i} for i in range(200)))
            deduped = await client.publish(other, {"n": "d"}, dedup_key="order-42")
            again = await client.publish(other, {"n": "again"}, dedup_key="order-42")
            await wait_until(lambda: len(outcomes) == 402, timeout=20)
    assert again == deduped
    assert {o.message_id for o in outcomes} == {first, deduped, *ids}
    assert {o.status for o in outcomes} == {"acked"}
    assert sorted(p["n"] for r, p in seen if r == "echo") == list(range(-1, 200))
    assert len([p for r, p in seen if r == other]) == 201
    for role in ("echo", other):
        stream = keys.role_stream(role)
        assert await cluster_redis.xlen(stream) == 0
        assert await pending_count(cluster_redis, stream) == 0


@pytest.mark.anyio
async def test_a_failing_job_is_retried_then_dead_lettered(
    cluster_redis: Redis, namespace: str
) -> None:
    app = App()
    attempts: list[int] = []

    @app.role("flaky", retry=RetryPolicy(max_attempts=2, backoff=0))
    async def flaky(ctx: Context, payload: Any) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("always fails")

    client = Client(cluster_redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(20):
        async with running(make_worker(app, cluster_redis, namespace, outcomes)):
            message_id = await client.publish("flaky", {"x": 1})
            await wait_until(lambda: any(o.status == "dead_lettered" for o in outcomes))
    assert attempts == [1, 2]
    assert [o.status for o in outcomes] == ["retried", "dead_lettered"]
    keys = Keys(namespace)
    (letter,) = [
        decode_dead_letter(f)[0] for _, f in await cluster_redis.xrange(keys.dead_letters("flaky"))
    ]
    assert letter.job is not None and letter.job.id == message_id and letter.attempts == 2
    assert await cluster_redis.xlen(keys.role_stream("flaky")) == 0
    assert await pending_count(cluster_redis, keys.role_stream("flaky")) == 0


@pytest.mark.anyio
async def test_a_cancel_stops_a_running_handler(cluster_redis: Redis, namespace: str) -> None:
    app = App()
    started, cleaned = anyio.Event(), []

    @app.role("long")
    async def long(ctx: Context, payload: Any) -> None:
        started.set()
        try:
            await ctx.cancel.wait_cancelled()
            ctx.cancel.raise_if_cancelled()
        finally:
            cleaned.append(ctx.cancel.reason)

    client = Client(cluster_redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(15):
        async with running(make_worker(app, cluster_redis, namespace, outcomes)):
            message_id = await client.publish("long", task_id="t1")
            await started.wait()
            await client.cancel("t1", target="task", reason="user asked")
            await wait_until(lambda: outcomes)
    assert cleaned == ["user asked"]
    assert {o.message_id: o.status for o in outcomes} == {message_id: "cancelled"}
    stream = Keys(namespace).role_stream("long")
    assert await cluster_redis.xlen(stream) == 0
    assert await pending_count(cluster_redis, stream) == 0


@pytest.mark.anyio
async def test_start_counts_and_dead_letter_purges_work_on_the_cluster(
    cluster_redis: Redis, namespace: str
) -> None:
    """Both use MULTI on a single node and a plain pipeline on a cluster, where redis-py's
    asyncio transactions leave a connection that closing the client cannot close."""
    key = f"{namespace}:{{role:echo}}:starts:1-0"
    assert await streams.count_start(cluster_redis, key) == 0
    assert await streams.count_start(cluster_redis, key) == 1
    assert 0 < await cluster_redis.pttl(key) <= streams.START_COUNT_TTL_MS
    client = Client(cluster_redis, namespace=namespace)
    dead = Keys(namespace).dead_letters("echo")
    await cluster_redis.xadd(dead, {b"dead_letter": b"{}"})
    assert await client.purge_dead_letters("echo") == 1
    assert await cluster_redis.exists(dead) == 0


def test_the_sync_client_refuses_a_cluster_url_clearly() -> None:
    with pytest.raises(ConfigError, match="SyncClient does not support redis\\+cluster"):
        SyncClient("redis+cluster://127.0.0.1:7000")


@pytest.mark.anyio
async def test_scan_keys_finds_keys_on_every_master(
    cluster: LocalCluster, cluster_redis: Redis, namespace: str
) -> None:
    """Cancel markers and liveness keys are found by SCAN: it must visit every primary."""
    keys = [f"{namespace}:{{consumer:c{i}}}:alive" for i in range(30)]
    assert len({master_of(cluster, key) for key in keys}) == 3
    for key in keys:
        await cluster_redis.set(key, b"1")
    found = await streams.scan_keys(cluster_redis, f"{namespace}:*")
    assert sorted(found) == sorted(keys)
    assert await streams.get_many(cluster_redis, keys) == [b"1"] * len(keys)


# -- partitioned roles -----------------------------------------------------------------------


async def _layout(redis: Redis, namespace: str, role: str) -> partitions.Layout:
    layout = await partitions.load(redis, Keys(namespace), role)
    assert layout is not None, f"role {role} was not created"
    return layout


def _added(cluster: LocalCluster, stream: str) -> int:
    """How many entries were ever added to ``stream`` (XINFO STREAM entries-added)."""
    host, port = master_of(cluster, stream).rsplit(":", 1)
    with redis_sync.Redis(host=host, port=int(port)) as node:
        return int(node.xinfo_stream(stream)["entries-added"])


@pytest.mark.anyio
async def test_a_partitioned_role_spreads_over_every_master_and_keeps_each_keys_order(
    cluster: LocalCluster, cluster_redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    app = App()
    started: list[Any] = []

    @app.role("hot", partitions=3)
    async def hot(ctx: Context, payload: Any) -> None:
        started.append(payload)  # first, before any await: the order handlers started in
        await anyio.sleep(0.001)

    client = Client(cluster_redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(30):
        async with running(make_worker(app, cluster_redis, namespace, outcomes)):
            layout = await _layout(cluster_redis, namespace, "hot")
            shards = layout.shards
            # Each partition's keys live on their own master: all three masters are used.
            homes = [master_of(cluster, keys.role_stream(shard)) for shard in shards]
            assert len(set(homes)) == 3, homes
            await client.publish_many("hot", ({"n": i} for i in range(300)))
            for i in range(20):
                for key in ("alpha", "beta", "gamma", "delta"):
                    await client.publish("hot", {"key": key, "i": i}, key=key)
            await wait_until(lambda: len(outcomes) == 380, timeout=20)
            await wait_until(lambda: all(o.status == "acked" for o in outcomes), timeout=5)

    # Round-robin: 100 each; keyed: 20 per key on the key's partition.
    per_key = {key: partitions.partition_of(key, 3) for key in ("alpha", "beta", "gamma", "delta")}
    for index, shard in enumerate(shards):
        keyed = 20 * sum(1 for p in per_key.values() if p == index)
        assert _added(cluster, keys.role_stream(shard)) == 100 + keyed
    for key in per_key:
        order = [p["i"] for p in started if isinstance(p, dict) and p.get("key") == key]
        assert order == list(range(20)), (key, order)
    assert sorted(p["n"] for p in started if "n" in p) == list(range(300))
    for shard in shards:
        assert await cluster_redis.xlen(keys.role_stream(shard)) == 0
        assert await pending_count(cluster_redis, keys.role_stream(shard)) == 0


@pytest.mark.anyio
async def test_retries_dead_letters_replay_and_cancel_work_per_partition(
    cluster: LocalCluster, cluster_redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    app = App()
    attempts: dict[int, int] = {}
    fixed = anyio.Event()
    running_now: dict[str, anyio.Event] = {}
    cancelled: list[str] = []

    @app.role("flaky", partitions=3, retry=RetryPolicy(max_attempts=2, backoff=0.05))
    async def flaky(ctx: Context, payload: Any) -> None:
        n = payload["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if payload.get("hang"):
            running_now.setdefault(ctx.message_id, anyio.Event()).set()
            await ctx.cancel.wait_cancelled()
            cancelled.append(ctx.message_id)
            ctx.cancel.raise_if_cancelled()
        if not fixed.is_set():
            raise RuntimeError(f"broken {n}")

    client = Client(cluster_redis, namespace=namespace)
    outcomes: list[Outcome] = []
    with anyio.fail_after(40):
        async with running(make_worker(app, cluster_redis, namespace, outcomes)):
            layout = await _layout(cluster_redis, namespace, "flaky")
            # One failing job on each partition: retried there, then dead-lettered there.
            keys_by_partition = {}
            for i in range(100):
                keys_by_partition.setdefault(partitions.partition_of(f"k{i}", 3), f"k{i}")
            for n, key in sorted(keys_by_partition.items()):
                await client.publish("flaky", {"n": n}, key=key)
            await wait_until(lambda: sum(o.status == "dead_lettered" for o in outcomes) == 3, 20)
            assert attempts == {0: 2, 1: 2, 2: 2}
            for shard in layout.shards:
                assert await cluster_redis.xlen(keys.dead_letters(shard)) == 1
            assert await client.dead_letter_count("flaky") == 3
            letters = await client.dead_letters("flaky")
            assert sorted(e.id.split(":")[0] for e in letters) == ["0", "1", "2"]
            page = await client.dead_letters("flaky", count=2)
            rest = await client.dead_letters("flaky", after=page[-1].id)
            assert [e.id for e in page + rest] == [e.id for e in letters]
            one = await client.dead_letter("flaky", letters[1].id)
            assert one is not None and one.letter is not None
            assert one.letter.reason == "failed"
            # Replayed, each goes back to its own partition and now succeeds.
            fixed.set()
            result = await client.replay("flaky")
            assert len(result.replayed) == 3 and not result.skipped
            await wait_until(lambda: sum(o.status == "acked" for o in outcomes) == 3, 20)
            for shard in layout.shards:
                # publish, its retry (promoted from the schedule) and the replay, all on it
                assert _added(cluster, keys.role_stream(shard)) == 3
            assert await client.dead_letter_count("flaky") == 0
            # Cancel reaches a handler whatever partition its job is on.
            hung = [
                await client.publish("flaky", {"n": 10 + n, "hang": True}, key=key)
                for n, key in sorted(keys_by_partition.items())
            ]
            await wait_until(lambda: set(hung) <= set(running_now), 10)
            for message_id in hung:
                await client.cancel(message_id, target="message", reason="test")
            await wait_until(lambda: sorted(cancelled) == sorted(hung), 10)


def _fan_out_app(order: list[tuple[str, str | None]]) -> App:
    """``emit`` sends its first batch and waits for ``double`` to start on it (per task).

    ``order`` records, as they happen, each ``double`` start and each ``emit`` end.
    """
    app = App()
    child_started: dict[str | None, anyio.Event] = {}

    @app.role("emit", partitions=3)
    async def emit(ctx: Context, params: Any) -> None:
        await ctx.emit([0, 1])
        # The child starts on the first batch, before this node finishes (per-batch fan-out).
        await child_started.setdefault(ctx.task_id, anyio.Event()).wait()
        for start in range(2, params["n"], 2):
            await ctx.emit([start, start + 1])
        order.append(("emit ended", ctx.task_id))

    @app.role("double", partitions=3)
    async def double(ctx: Context, params: Any) -> None:
        assert ctx.batch is not None
        order.append(("double started", ctx.task_id))
        child_started.setdefault(ctx.task_id, anyio.Event()).set()
        await ctx.emit([x * 2 for x in ctx.batch.items])

    return app


def _tasks_on_every_master(cluster: LocalCluster, keys: Keys) -> list[str]:
    """Three task ids whose state keys are served by three different masters."""
    found: dict[str, str] = {}
    for i in range(200):
        found.setdefault(master_of(cluster, keys.task_state(f"t{i}")), f"t{i}")
        if len(found) == 3:
            break
    return list(found.values())


@pytest.mark.anyio
async def test_a_dag_with_per_batch_fan_out_runs_on_partitioned_roles_with_two_coordinators(
    cluster: LocalCluster, cluster_redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    order: list[tuple[str, str | None]] = []
    app = _fan_out_app(order)
    graph = Graph("fan-out", params={"n": 10})
    graph.node("emit", role="emit").node("double", role="double")
    graph.node("total", function="merge.generic")
    graph.edge("emit", "double", on="batch").edge("double", "total")

    # Task ids whose state lives on three different masters.
    task_ids = _tasks_on_every_master(cluster, keys)
    assert len({master_of(cluster, keys.task_state(t)) for t in task_ids}) == 3

    outcomes: list[Outcome] = []
    coordinators = [
        Coordinator(cluster_redis, namespace=namespace, block_ms=100, sweep_interval=0.2)
        for _ in range(2)
    ]
    client = Client(cluster_redis, namespace=namespace)
    with anyio.fail_after(60):
        async with (
            running(make_worker(app, cluster_redis, namespace, outcomes)),
            anyio.create_task_group() as tg,
        ):
            for coordinator in coordinators:
                await tg.start(coordinator.run)
            for task_id in task_ids:
                await client.submit(graph, task_id=task_id)
            states = [await client.wait(t, timeout=40) for t in task_ids]
            results = [await client.result(t) for t in task_ids]
            for coordinator in coordinators:
                coordinator.stop()
    for state in states:
        assert state.state == "succeeded", state.error
        nodes = state.nodes
        assert nodes["emit"].batches_out == 5 and nodes["double"].dispatched == 5
    # Per-batch fan-out: each task's double started while its emit still ran. Read from what the
    # handlers recorded, not from the task's timestamps, which say when a coordinator applied
    # an event (a loaded coordinator may apply double's start after emit's end).
    for task_id in task_ids:
        mine = [what for what, task in order if task == task_id]
        assert mine.index("double started") < mine.index("emit ended"), mine
    for result in results:
        assert sorted(result["total"]) == [x * 2 for x in range(10)]
    # Each task's jobs went to one partition of each role (chosen by task id).
    for role in ("emit", "double"):
        layout = await _layout(cluster_redis, namespace, role)
        for task_id in task_ids:
            home = layout.for_key(task_id)
            assert _added(cluster, keys.role_stream(home)) >= 1
    assert sum(c.events_processed for c in coordinators) > 0


def test_a_sigkilled_workers_jobs_on_every_partition_are_adopted_by_another_process(
    cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    """Worker processes on the cluster: one is SIGKILLed holding jobs of all three partitions
    (on three masters); the other adopts each of them after the lease TTL and finishes it."""
    record = Record(tmp_path / "record.txt")
    workers = Workers(tmp_path, cluster.url, namespace, record.path)
    victim_name, survivor_name = unique("victim"), unique("survivor")
    try:
        victim = workers.start(victim_name, roles=["work3"], concurrency=6)
        victim.wait_ready()
        with_client = anyio.run(_layout_via_url, cluster.url, namespace, "work3")
        shards = with_client.shards
        assert len({master_of(cluster, Keys(namespace).role_stream(s)) for s in shards}) == 3
        slow = {victim_name: 60, survivor_name: 0.2}
        ids = anyio.run(
            _publish_via_url, cluster.url, namespace, [{"seconds_by_consumer": slow}] * 6
        )
        wait_for(lambda: set(ids) <= record.ids("START", victim_name), 20, "the victim starts 6")
        # The victim holds two jobs on each partition (published round-robin).
        pending = _pending_by_consumer(cluster, namespace, shards)
        assert [pending[s].get(victim_name, 0) for s in shards] == [2, 2, 2], pending
        survivor = workers.start(survivor_name, roles=["work3"], concurrency=8)
        survivor.wait_ready()
        victim.kill()
        more = anyio.run(_publish_via_url, cluster.url, namespace, [{"seconds": 0.05}] * 6)
        wait_for(lambda: set(ids) <= record.ids("DONE", survivor_name), 30, "all 6 adopted, done")
        wait_for(lambda: set(more) <= record.ids("DONE", survivor_name), 10, "the later 6 done")
        wait_for(
            lambda: not any(_pending_by_consumer(cluster, namespace, shards).values()),
            10,
            "nothing left pending on any partition",
        )
    finally:
        workers.kill_all()
    assert_none_lost_and_duplicates_allowed(record, ids + more, set(ids))
    assert not record.ids("DONE", victim_name)
    survivor.assert_clean_log()


async def _layout_via_url(url: str, namespace: str, role: str) -> partitions.Layout:
    redis = connect.connect(url)
    try:
        return await _layout(redis, namespace, role)
    finally:
        await redis.aclose()


async def _publish_via_url(url: str, namespace: str, payloads: list[Any]) -> list[str]:
    async with Client.from_url(url, namespace=namespace) as client:
        return await client.publish_many("work3", payloads)


def _pending_by_consumer(
    cluster: LocalCluster, namespace: str, shards: tuple[str, ...]
) -> dict[str, dict[str, int]]:
    """Per partition: consumer name -> pending entries (XPENDING summary on its master)."""
    out = {}
    for shard in shards:
        stream = Keys(namespace).role_stream(shard)
        host, port = master_of(cluster, stream).rsplit(":", 1)
        with redis_sync.Redis(host=host, port=int(port)) as node:
            summary = node.xpending(stream, "workers")
        out[shard] = {c["name"].decode(): int(c["pending"]) for c in summary["consumers"] or []}
    return out


@pytest.mark.anyio
async def test_the_start_up_checks_run_on_a_cluster(
    cluster: LocalCluster, cluster_redis: Redis
) -> None:
    facts = await guard.gather(cluster_redis)
    assert facts.transport == "tcp" and facts.host == "127.0.0.1"
    assert facts.version is not None and facts.user == "default"
    # The test cluster has no password and no AOF: both are reported, nothing else.
    assert {w.code for w in guard.assess(facts)} == {"default-user", "persistence"}


@pytest.mark.anyio
async def test_inspect_and_the_exporter_report_a_partitioned_role_on_the_cluster(
    cluster_redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    app = App()

    @app.role("wide", partitions=3)
    async def wide(ctx: Context, payload: Any) -> None:
        pass

    await Worker(app, cluster_redis, namespace=namespace).drain()
    await Client(cluster_redis, namespace=namespace).publish_many("wide", [{}] * 7)
    [info] = [r for r in await inspect_roles(cluster_redis, keys) if r.role == "wide"]
    assert (info.partitions, info.length, info.groups[0].lag) == (3, 7, 7)
    snapshot = await Exporter(cluster_redis, namespace=namespace).refresh()
    assert [(r.role, r.partitions, r.length) for r in snapshot.roles] == [("wide", 3, 7)]
    assert snapshot.events_backlog == {"wide": 0}


@pytest.mark.anyio
async def test_least_privilege_users_work_on_the_cluster(
    cluster: LocalCluster, namespace: str
) -> None:
    """The ``streamflow acl`` rules of a worker and a publisher, set on every node, are
    enough for a partitioned role on the cluster: nothing lands in any node's ACL LOG."""
    for server in cluster.servers:
        with redis_sync.Redis(host=server.host, port=server.port) as node:
            node.execute_command("ACL", "LOG", "RESET")
            for part in ("worker", "publisher"):
                node.execute_command(*acl.rules(namespace, part, password=">pw-" + part))
    seeds = ",".join(f"{s.host}:{s.port}" for s in cluster.servers)
    app = App()
    seen: list[Any] = []

    @app.role("guarded", partitions=3)
    async def guarded(ctx: Context, payload: Any) -> None:
        seen.append(payload)

    worker_redis = connect.connect(f"redis+cluster://sf-worker:pw-worker@{seeds}")
    try:
        async with Client.from_url(
            f"redis+cluster://sf-publisher:pw-publisher@{seeds}", namespace=namespace
        ) as client:
            await Worker(app, worker_redis, namespace=namespace).drain()
            await client.publish_many("guarded", ({"n": i} for i in range(9)))
            await client.publish("guarded", {"n": 9}, key="k", dedup_key="d")
            await Worker(app, worker_redis, namespace=namespace).drain()
    finally:
        await worker_redis.aclose()
    assert sorted(p["n"] for p in seen) == list(range(10))
    for server in cluster.servers:
        with redis_sync.Redis(host=server.host, port=server.port) as node:
            log = node.execute_command("ACL", "LOG")
        assert not log, log


@pytest.mark.anyio
async def test_a_worker_rides_out_a_master_lost_and_back_while_the_cluster_is_down(
    namespace: str,
) -> None:
    """A master of a replica-less cluster is killed: its slots are lost, every node answers
    CLUSTERDOWN. The worker backs off instead of crashing, and once the master is back it
    handles what is published then, on every partition. Then every node is killed at once
    (no node answers the client's slot-map reload) and restarted: the same again."""
    if not RedisServer.available() or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed")
    app = App()
    seen: list[Any] = []

    @app.role("steady", partitions=3)
    async def steady(ctx: Context, payload: Any) -> None:
        seen.append(payload["n"])

    # A short node timeout: the cluster notices the lost master (and its return) sooner. An
    # AOF synced on every write: the killed nodes come back with their data.
    with local_cluster(node_timeout_ms=1000, appendonly=True) as down_cluster:
        redis = connect.connect(down_cluster.url)
        outcomes: list[Outcome] = []
        client = Client(redis, namespace=namespace)
        try:
            with anyio.fail_after(60):
                async with running(make_worker(app, redis, namespace, outcomes)):
                    await client.publish_many("steady", ({"n": i} for i in range(6)))
                    await wait_until(lambda: len(seen) == 6, timeout=10)
                    layout = await _layout(redis, namespace, "steady")
                    victim = down_cluster.servers[-1]
                    victim.kill()
                    other = down_cluster.servers[0]
                    await wait_until(lambda: not _cluster_ok_on(other), timeout=20)
                    victim.restart()
                    await wait_until(
                        lambda: all(_cluster_ok_on(s) for s in down_cluster.servers), timeout=20
                    )
                    await _publish_retrying(client, layout, range(6, 12))
                    await wait_until(lambda: len(seen) >= 12, timeout=20)
                    # Then every node at once: no node answers the client's slot-map reload.
                    for server in down_cluster.servers:
                        server.kill()
                    # The first publish loses its connection; the next ones find no node to
                    # reload the slot map from: an outage too, not a crash.
                    for _ in range(3):
                        with pytest.raises(RedisUnavailable):
                            await client.publish("steady", {"n": -1})
                    for server in down_cluster.servers:
                        server.restart()
                    await wait_until(
                        lambda: all(_cluster_ok_on(s) for s in down_cluster.servers), timeout=20
                    )
                    await _publish_retrying(client, layout, range(12, 18))
                    await wait_until(lambda: len(seen) >= 18, timeout=20)
        finally:
            await redis.aclose()
    assert sorted(set(seen)) == list(range(18))


def _cluster_ok_on(server: RedisServer) -> bool:
    with redis_sync.Redis(host=server.host, port=server.port, socket_timeout=2) as node:
        return bool(node.cluster("INFO").get("cluster_state") == "ok")


async def _publish_retrying(client: Client, layout: partitions.Layout, numbers: range) -> None:
    """Publish one job per number, each by a key on a partition in turn; retry (with its dedup
    key) while the client still reconnects to the restarted master."""
    for n in numbers:
        key = next(
            k for k in (f"k{i}" for i in range(100)) if layout.for_key(k) == layout.shards[n % 3]
        )
        with anyio.fail_after(20):
            while True:
                try:
                    await client.publish("steady", {"n": n}, key=key, dedup_key=f"n{n}")
                    break
                except RedisUnavailable:  # also CLUSTERDOWN until every node agrees
                    await anyio.sleep(0.1)


@pytest.mark.anyio
async def test_per_key_limits_hold_on_a_partitioned_role_across_masters(
    cluster_redis: Redis, namespace: str
) -> None:
    """The role's {flow} slot counts every partition's jobs; each partition parks next to it."""
    app = App()
    running_now: dict[str, int] = {}
    most: dict[str, int] = {}
    done: list[str] = []

    @app.role("keyed3", partitions=3, key_concurrency=1)
    async def keyed(ctx: Context, payload: Any) -> None:
        key = ctx.headers["streamflow-limit-key"]
        running_now[key] = running_now.get(key, 0) + 1
        most[key] = max(most.get(key, 0), running_now[key])
        await anyio.sleep(0.02)
        running_now[key] -= 1
        done.append(ctx.message_id)

    client = Client(cluster_redis, namespace=namespace)
    workers = [make_worker(app, cluster_redis, namespace, concurrency=8) for _ in range(2)]
    with anyio.fail_after(60):
        async with running(*workers):
            ids = [
                await client.publish("keyed3", {"i": i}, limit_key=f"k{i % 3}") for i in range(60)
            ]
            await wait_until(lambda: set(ids) <= set(done), timeout=40)
    assert most == {"k0": 1, "k1": 1, "k2": 1}
    assert sorted(done) == sorted(ids)
    assert sum(w.statistics().key_parks.get("keyed3", 0) for w in workers) > 0
