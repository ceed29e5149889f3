"""The core round trip on a real 3-master Redis Cluster, through a ``redis+cluster://`` URL."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
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
    LeaseSettings,
    RetryPolicy,
    SyncClient,
    Worker,
    streams,
)
from streamflow.errors import ConfigError
from streamflow.keys import Keys
from streamflow.protocol import decode_dead_letter
from streamflow.server import RedisServer
from streamflow.settle import Outcome
from tests.cluster import LocalCluster, local_cluster
from tests.helpers import pending_count, running, wait_until


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A 3-master cluster for this module (about 3 s to start), torn down after it."""
    if not RedisServer.available() or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed for the cluster tests")
    with local_cluster() as running_cluster:
        yield running_cluster


@pytest.fixture
async def cluster_redis(cluster: LocalCluster) -> AsyncIterator[Redis]:
    """A streamflow client of the cluster, built from its ``redis+cluster://`` URL."""
    client = streams.connect(cluster.url)
    yield client
    await client.aclose()


def worker(app: App, redis: Redis, namespace: str, outcomes: list[Outcome]) -> Worker:
    return Worker(
        app,
        redis,
        namespace=namespace,
        block_ms=100,
        on_outcome=outcomes.append,
        lease=LeaseSettings(ttl=1.0, reclaim_interval=0.1),
    )


def master_of(cluster: LocalCluster, key: str) -> str:
    """The ``host:port`` of the master that owns ``key`` (CLUSTER KEYSLOT, then CLUSTER SLOTS)."""
    first = cluster.servers[0]
    with redis_sync.Redis(host=first.host, port=first.port) as node:
        slot = int(node.execute_command("CLUSTER KEYSLOT", key))
    return cluster.node_of_slot(slot)


# -- the URL ---------------------------------------------------------------------------------


def test_cluster_urls_are_validated_and_redacted() -> None:
    url = "redis+cluster://app:s3cr/t@10.0.0.1:7000,10.0.0.2:7001"
    assert streams.validate_url(url) == url
    assert streams.cluster_nodes(url) == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert streams.redact_url(url) == "redis+cluster://app:***@10.0.0.1:7000,10.0.0.2:7001"
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
            streams.validate_url(bad)


def test_tls_files_with_a_cluster_url_are_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="TLS is not supported with redis\\+cluster"):
        streams.connect("redis+cluster://127.0.0.1:7000", tls_ca_file=tmp_path / "ca.pem")


# -- against the cluster ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_cluster_url_gives_a_cluster_client_without_retries(cluster_redis: Any) -> None:
    await streams.ping(cluster_redis)
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
        async with running(worker(app, cluster_redis, namespace, outcomes)):
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
        async with running(worker(app, cluster_redis, namespace, outcomes)):
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
        async with running(worker(app, cluster_redis, namespace, outcomes)):
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
