"""Metrics, health checks and JSON logs of worker and coordinator processes, over HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import redis

from streamflow import connect, streams
from streamflow.client import SyncClient
from streamflow.dag.coordinator import Coordinator
from streamflow.keys import COORDINATORS, Keys
from streamflow.ops.server import RedisServer
from tests.apps import read_trace
from tests.helpers import (
    CLI,
    LEASE_ARGS,
    ROOT,
    clean_env,
    free_port,
    kill_tree,
    run_cli,
    scrape,
    status,
    wait_for,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def start_worker(
    redis_url: str, namespace: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], int]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        name: str, *extra: str, url: str = redis_url, metrics: bool = True
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        args = [*CLI, "--log-format", "json", "worker", "--app", "tests.apps:app"]
        args += ["--role", "work", "--consumer-name", name, *LEASE_ARGS, *extra]
        args += ["--redis-url", url, "--namespace", namespace]
        if metrics:
            args += ["--metrics-port", str(port)]
        env = clean_env(SFTEST_RECORD=str(tmp_path / "record"))
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=log)
        log.close()
        procs.append(proc)
        if metrics:
            wait_for(lambda: status(port, "/readyz") == 200, 20, f"{name} ready")
        return proc, port

    yield start
    for proc in procs:
        kill_tree(proc)


def test_worker_counts_every_outcome_exactly(
    start_worker: Callable[..., tuple[subprocess.Popen[bytes], int]],
    redis_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    _, port = start_worker("metered")
    keys = Keys(namespace)
    with SyncClient(redis_url, namespace=namespace) as client:
        for _ in range(5):
            client.publish("work", {})
        for _ in range(2):
            client.publish("work", {"fail_attempts": 3, "retry_delay": 0})
        long_id = client.publish("work", {"seconds": 30})
    plain = redis.Redis.from_url(redis_url)
    plain.xadd(keys.role_stream("work"), {"message": b"{broken"})

    def started_long() -> bool:
        return any(line.message_id == long_id for line in read_trace(tmp_path / "record"))

    wait_for(started_long, 20, "the long job started")
    conn = ("--redis-url", redis_url, "--namespace", namespace)
    assert run_cli("cancel", long_id, "--message", *conn).returncode == 0

    def settled() -> bool:
        return plain.xlen(keys.role_stream("work")) == 0 and plain.zcard(keys.delayed("work")) == 0

    wait_for(settled, 20, "every job settled")
    samples = scrape(port)
    role = (("role", "work"),)

    def outcome(name: str) -> float:
        return samples.get(("streamflow_messages_total", (("outcome", name), *role)), 0.0)

    assert {
        name: outcome(name)
        for name in ("acked", "retried", "dead_lettered", "rejected", "cancelled")
    } == {
        "acked": 5,
        "retried": 4,
        "dead_lettered": 2,
        "rejected": 1,
        "cancelled": 1,
    }
    assert samples[("streamflow_dead_letters_total", (("reason", "failed"), *role))] == 2
    assert samples[("streamflow_dead_letters_total", (("reason", "invalid_json"), *role))] == 1
    # Every handler run is timed: 5 + 2 x 3 attempts + the cancelled one.
    assert samples[("streamflow_handler_duration_seconds_count", role)] == 12
    assert samples[("streamflow_cancel_signals_total", ())] == 1
    assert samples[("streamflow_cancel_latency_seconds_count", ())] == 1
    assert samples[("streamflow_in_flight_entries", ())] == 0
    assert samples[("streamflow_concurrency_limit", ())] == 64
    assert plain.xlen(keys.dead_letters("work")) == 3
    plain.close()


def test_adopted_entries_count_as_reclaims_and_redeliveries(
    start_worker: Callable[..., tuple[subprocess.Popen[bytes], int]],
    redis_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    doomed, _ = start_worker("doomed", metrics=False)
    with SyncClient(redis_url, namespace=namespace) as client:
        message_id = client.publish("work", {"seconds_by_consumer": {"doomed": 60}})

    def started() -> bool:
        return any(line.message_id == message_id for line in read_trace(tmp_path / "record"))

    wait_for(started, 20, "the job started on the doomed worker")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    _, port = start_worker("heir")
    wait_for(
        lambda: (
            scrape(port).get(
                ("streamflow_messages_total", (("outcome", "acked"), ("role", "work")))
            )
            == 1
        ),
        20,
        "adopted and acked",
    )
    samples = scrape(port)
    assert samples[("streamflow_reclaims_total", (("role", "work"),))] == 1
    assert samples[("streamflow_redeliveries_total", (("role", "work"),))] == 1


def test_work_trimmed_while_pending_is_counted_and_the_dead_name_deleted(
    start_worker: Callable[..., tuple[subprocess.Popen[bytes], int]],
    redis_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    stream = Keys(namespace).role_stream("work")
    doomed, _ = start_worker("doomed", metrics=False)
    with SyncClient(redis_url, namespace=namespace) as client:
        ids = client.publish_many("work", [{"seconds_by_consumer": {"doomed": 60}}] * 2)

    def started() -> bool:
        return {line.message_id for line in read_trace(tmp_path / "record")} >= set(ids)

    wait_for(started, 20, "both jobs started on the doomed worker")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    plain = redis.Redis.from_url(redis_url)
    try:
        [first, _] = plain.xpending_range(stream, "workers", "-", "+", 10)  # type: ignore[misc]
        plain.xdel(stream, first["message_id"])  # trimmed while pending: that work is lost
        _, port = start_worker("heir")
        role = (("role", "work"),)
        wait_for(
            lambda: scrape(port).get(("streamflow_trimmed_pending_entries_total", role)) == 1,
            20,
            "the trimmed entry counted",
        )
        wait_for(
            lambda: scrape(port).get(("streamflow_consumers_deleted_total", ())) == 1,
            20,
            "the dead name deleted",
        )
        samples = scrape(port)
        assert samples[("streamflow_reclaims_total", role)] == 1  # the other one was adopted
        names = {c["name"] for c in plain.xinfo_consumers(stream, "workers")}  # type: ignore[union-attr]
        assert names == {b"heir"}
    finally:
        plain.close()


def test_readyz_follows_redis_and_logs_are_json(
    start_worker: Callable[..., tuple[subprocess.Popen[bytes], int]],
    private_redis: Callable[..., RedisServer],
    tmp_path: Path,
) -> None:
    server = private_redis(appendonly=False)
    _, port = start_worker("probe", url=server.url)
    assert status(port, "/healthz") == 200
    assert run_cli("check", "--url", f"http://127.0.0.1:{port}/readyz").returncode == 0
    server.kill()
    wait_for(lambda: status(port, "/readyz") == 503, 20, "unready without Redis")
    assert status(port, "/healthz") == 200  # alive all the same
    assert run_cli("check", "--url", f"http://127.0.0.1:{port}/readyz").returncode == 1
    server.start()
    wait_for(lambda: status(port, "/readyz") == 200, 30, "ready again")
    lines = (tmp_path / "probe.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any("Redis unavailable" in r["message"] for r in records)


def test_check_pings_redis(redis_url: str) -> None:
    assert run_cli("check", "--redis-url", redis_url).returncode == 0
    down = f"redis://127.0.0.1:{free_port()}/0"
    done = run_cli("check", "--redis-url", down, "--timeout", "2")
    assert done.returncode == 1
    assert done.stdout.startswith("not ok: ")


def test_coordinator_metrics(redis_url: str, namespace: str, tmp_path: Path) -> None:
    port = free_port()
    conn = ["--redis-url", redis_url, "--namespace", namespace]
    worker = subprocess.Popen(
        [*CLI, "worker", "--app", "tests.dag.helpers:app", "--block-ms", "200", *conn],
        cwd=ROOT,
        env=clean_env(),
        stderr=subprocess.DEVNULL,
    )
    coordinator = subprocess.Popen(
        [*CLI, "coordinator", "--block-ms", "200", "--metrics-port", str(port), *conn],
        cwd=ROOT,
        env=clean_env(),
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: status(port, "/readyz") == 200, 20, "coordinator ready")
        plain = redis.Redis.from_url(redis_url)
        wait_for(lambda: plain.scard(Keys(namespace).known_roles()) > 0, 20, "worker up")
        graph = tmp_path / "graph.json"
        graph.write_text(
            json.dumps(
                {
                    "params": {"n": 6, "size": 2},
                    "nodes": [{"id": "source", "role": "source"}, {"id": "e", "role": "enrich"}],
                    "edges": [{"from": "source", "to": "e", "on": "batch"}],
                }
            )
        )
        done = run_cli("submit", str(graph), "--wait", "--timeout", "30", *conn)
        assert done.returncode == 0, done.stderr
        finished = ("streamflow_coordinator_tasks_finished_total", (("state", "succeeded"),))
        wait_for(lambda: scrape(port).get(finished) == 1, 10, "the task counted")
        samples = scrape(port)
        # source: accepted, 3 batches, done; e: 3 runs x (accepted, batch, done).
        assert samples[("streamflow_coordinator_events_total", ())] == 14
        assert samples[("streamflow_coordinator_dispatches_total", ())] == 4
        assert samples[("streamflow_coordinator_batch_to_dispatch_seconds_count", ())] == 6
        plain.xadd(Keys(namespace).task_submissions(), {"id": "bad-1", "submission": "{nope"})
        rejected = ("streamflow_coordinator_submissions_total", (("outcome", "rejected"),))
        wait_for(lambda: scrape(port).get(rejected) == 1, 10, "the rejected submission counted")
        plain.close()
    finally:
        kill_tree(worker)
        kill_tree(coordinator)


def test_exporter_gauges_match_redis(redis_url: str, namespace: str) -> None:
    keys = Keys(namespace)
    plain = redis.Redis.from_url(redis_url)
    stream = keys.role_stream("work")
    for n in range(5):
        plain.xadd(stream, {"message": f"{{{n}}}"})
    plain.xgroup_create(stream, "workers", id="0")
    [[_, held]] = plain.xreadgroup("workers", "holder", {stream: ">"}, count=2)  # type: ignore[misc]
    # The second held entry went unrenewed for 7 s (its holder froze or died).
    plain.xclaim(stream, "workers", "holder", 0, [held[1][0]], idle=7000, justid=True)
    plain.zadd(keys.delayed("work"), {"a": 1, "b": 2, "c": 3})
    plain.xadd(keys.dead_letters("work"), {"dead_letter": "{}"})
    plain.xadd(keys.role_stream("emial"), {"message": "{}"})
    port = free_port()
    conn = ("--redis-url", redis_url, "--namespace", namespace)
    exporter = subprocess.Popen(
        [*CLI, "exporter", "--metrics-port", str(port), "--interval", "0.2", *conn],
        cwd=ROOT,
        env=clean_env(),
        stderr=subprocess.DEVNULL,
    )
    try:
        length = ("streamflow_stream_length", (("role", "work"),))
        wait_for(lambda: status(port, "/readyz") == 200 and length in scrape(port), 20, "up")
        samples = scrape(port)
        group = (("group", "workers"), ("role", "work"))
        [info] = plain.xinfo_groups(stream)
        assert samples[length] == plain.xlen(stream) == 5
        assert samples[("streamflow_pending_entries", group)] == info["pending"] == 2
        assert samples[("streamflow_group_lag", group)] == info["lag"] == 3
        assert samples[("streamflow_delayed_jobs", (("role", "work"),))] == 3
        assert samples[("streamflow_dead_letter_depth", (("role", "work"),))] == 1
        assert samples[("streamflow_consumers", group)] == 1
        assert samples[("streamflow_oldest_pending_age_seconds", group)] >= 0
        assert 7 <= samples[("streamflow_oldest_pending_idle_seconds", group)] < 60
        assert samples[("streamflow_live_workers", ())] == 0
        assert samples[("streamflow_role_consumer_groups", (("role", "work"),))] == 1
        # A role nobody serves (a misspelt one): its stream has no consumer group.
        assert samples[("streamflow_role_consumer_groups", (("role", "emial"),))] == 0
    finally:
        kill_tree(exporter)
        plain.close()


@pytest.mark.anyio
async def test_coordinator_counts_task_events_trimmed_while_pending(
    redis_url: str, namespace: str
) -> None:
    client = connect.connect(redis_url)
    keys = Keys(namespace)
    control = keys.tasks_control()
    try:
        await streams.ensure_group(client, control, COORDINATORS)
        await client.xadd(control, {"task": "x", "type": "submitted"})
        # Read by a coordinator that then died, and deleted before anyone applied it.
        [[_, [(entry_id, _)]]] = await client.xreadgroup(
            COORDINATORS, "coord-dead", {control: ">"}, count=1
        )
        await client.xdel(control, entry_id)
        coordinator = Coordinator(client, namespace=namespace, lease_ttl=0.3, block_ms=100)
        registry = coordinator.enable_metrics()
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(coordinator.run)
                while not registry.get_sample_value("streamflow_coordinator_trimmed_events_total"):
                    await anyio.sleep(0.05)
                coordinator.stop()
        assert registry.get_sample_value("streamflow_coordinator_trimmed_events_total") == 1
    finally:
        await client.aclose()


def _listening_on(proc: subprocess.Popen[bytes], port: int) -> set[str]:
    """The addresses the process listens on at ``port``."""
    import psutil

    found = psutil.Process(proc.pid).net_connections(kind="tcp")
    return {c.laddr.ip for c in found if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_metrics_server_listens_on_loopback_serves_only_metrics_and_no_created_series(
    start_worker: Callable[..., tuple[subprocess.Popen[bytes], int]],
    redis_url: str,
    namespace: str,
    tmp_path: Path,
) -> None:
    proc, port = start_worker("loopback")
    assert _listening_on(proc, port) == {"127.0.0.1"}
    assert status(port, "/") == 404
    assert status(port, "/anything") == 404
    assert status(port, "/metrics") == 200
    assert status(port, "/healthz") == 200
    with SyncClient(redis_url, namespace=namespace) as client:
        done = client.publish("work", {})
    wait_for(
        lambda: any(line.event == "DONE" for line in read_trace(tmp_path / "record")), 20, "done"
    )
    duration = ("streamflow_handler_duration_seconds_count", (("role", "work"),))
    wait_for(lambda: scrape(port).get(duration) == 1, 20, f"{done} timed")
    samples = scrape(port)
    assert not [name for name, _ in samples if name.endswith("_created")]

    exposed, exposed_port = start_worker("exposed", "--metrics-host", "0.0.0.0")
    assert _listening_on(exposed, exposed_port) == {"0.0.0.0"}
