"""``streamflow inspect`` and ``streamflow workers``: subprocesses against known Redis state."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis.asyncio import Redis

from streamflow import App, Client, Context, SyncClient, Worker
from streamflow.keys import GROUP, Keys
from streamflow.ops.inspect import inspect_role, inspect_roles, longest_idle
from tests.helpers import (
    CLI,
    ROOT,
    clean_env,
    kill_tree,
    run_cli,
    running,
    wait_for,
    wait_for_query,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: Volatile fields are checked for range, then blanked before exact comparison.
MAX_AGE_MS = 60_000


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A plain blocking client for building state by hand."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def group_doc(
    name: str,
    consumers: Sequence[tuple[str, int, bool]],
    pending: int,
    *,
    lag: int,
    last: str,
    oldest: str | None,
) -> dict[str, Any]:
    """What ``inspect --json`` reports of a group, volatile fields blanked (``"*"``).

    ``consumers`` are (name, pending, alive); ``oldest`` is the oldest pending entry's id.
    """
    return {
        "name": name,
        "consumers": [
            {"name": consumer, "pending": held, "idle_ms": "*", "alive": alive}
            for consumer, held, alive in consumers
        ],
        "pending": pending,
        "lag": lag,
        "last_delivered_id": last,
        "oldest_pending_id": oldest,
        "oldest_pending_age_ms": None if oldest is None else "*",
        "oldest_pending_idle_ms": None if oldest is None else "*",
    }


def role_doc(
    role: str,
    *,
    length: int = 0,
    groups: Sequence[dict[str, Any]] = (),
    delayed: int = 0,
    dead_letters: int = 0,
) -> dict[str, Any]:
    """What ``inspect --json`` reports of a one-partition role never paused or limited."""
    return {
        "role": role,
        "length": length,
        "groups": list(groups),
        "delayed": delayed,
        "dead_letters": dead_letters,
        "partitions": 1,
        "paused": False,
        "paused_at_ms": None,
        "rate_limit": None,
        "concurrency_limit": None,
        "running_slots": 0,
        "key_rate_limit": None,
        "key_concurrency": None,
        "busy_keys": 0,
        "parked_keys": 0,
        "levels": None,
    }


def conn(redis_url: str, namespace: str) -> list[str]:
    return ["--redis-url", redis_url, "--namespace", namespace]


def inspect_json(redis_url: str, namespace: str, *args: str) -> Any:
    result = run_cli("inspect", *args, "--json", *conn(redis_url, namespace))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def read_ids(
    r: redis.Redis, stream: str, consumer: str, count: int, group: str = GROUP
) -> list[str]:
    """XREADGROUP ``count`` new entries as ``consumer``: they become pending under it."""
    [[_, entries]] = r.xreadgroup(group, consumer, {stream: ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in entries]


def blank_volatile(doc: Any) -> Any:
    """``doc`` with idle and age fields checked to be plausible and replaced by ``"*"``."""
    if isinstance(doc, list):
        return [blank_volatile(item) for item in doc]
    if not isinstance(doc, dict):
        return doc
    out = {}
    for name, value in doc.items():
        volatile = ("idle_ms", "age_ms", "oldest_pending_age_ms", "oldest_pending_idle_ms")
        if name in volatile and value is not None:
            assert 0 <= value < MAX_AGE_MS, (name, value)
            value = "*"
        out[name] = blank_volatile(value)
    return out


def server_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


# -- inspect --------------------------------------------------------------------------------


def test_inspect_json_reports_every_role_with_groups_consumers_pending_delayed_and_dead(
    r: redis.Redis, redis_url: str, namespace: str
) -> None:
    keys = Keys(namespace)
    with SyncClient(redis_url, namespace=namespace) as client:
        client.publish_many("alpha", [{"n": n} for n in range(4)])
        client.publish("alpha", {"later": True}, delay=600)
        client.publish("gamma", {"n": 0})
    alpha, gamma = keys.role_stream("alpha"), keys.role_stream("gamma")
    r.xgroup_create(alpha, GROUP, id="0")
    w1 = read_ids(r, alpha, "w-1", 2)
    w2 = read_ids(r, alpha, "w-2", 1)
    r.xadd(keys.dead_letters("alpha"), {"reason": "failed"})
    r.xadd(keys.dead_letters("alpha"), {"reason": "expired"})
    r.sadd(keys.known_roles(), "beta")  # named by a task, never served
    r.xgroup_create(gamma, GROUP, id="0")
    r.xgroup_create(gamma, "audit", id="0")
    audit = read_ids(r, gamma, "a-2", 1, group="audit")
    r.xgroup_createconsumer(gamma, "audit", "a-1")  # holds nothing
    r.set(keys.consumer_alive("w-1"), "token")  # w-1 is alive; this key is not a role either

    doc = blank_volatile(inspect_json(redis_url, namespace))

    consumers_alpha = [("w-1", 2, True), ("w-2", 1, False)]
    workers_alpha = group_doc(GROUP, consumers_alpha, 3, lag=1, last=w2[0], oldest=w1[0])
    consumers_audit = [("a-1", 0, False), ("a-2", 1, False)]
    audit_gamma = group_doc("audit", consumers_audit, 1, lag=0, last=audit[0], oldest=audit[0])
    workers_gamma = group_doc(GROUP, [], 0, lag=1, last="0-0", oldest=None)
    assert doc == {
        "namespace": namespace,
        "roles": [
            role_doc("alpha", length=4, groups=[workers_alpha], delayed=1, dead_letters=2),
            role_doc("beta"),
            role_doc("gamma", length=1, groups=[audit_gamma, workers_gamma]),
        ],
    }

    text = run_cli("inspect", *conn(redis_url, namespace))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "role alpha: 4 in stream, 1 delayed, 2 dead letters"
    assert lines[1].startswith("  group workers: 3 pending, lag 1, oldest pending ")
    assert lines[2].split()[:3] + lines[2].split()[-1:] == ["w-1", "2", "pending", "alive"]
    assert lines[3].split()[:3] + lines[3].split()[-1:] == ["w-2", "1", "pending", "stopped"]
    assert lines[4:6] == [
        "role beta: 0 in stream, 0 delayed, 0 dead letters",
        "  no consumer group (no worker has served this role)",
    ]
    audit_line = "  group audit: 1 pending, lag 0, oldest pending "
    at = next(i for i, line in enumerate(lines) if line.startswith(audit_line))
    assert lines[at + 1].split()[:3] == ["a-2", "1", "pending"]
    assert lines[at + 2 :] == [
        "    and 1 stopped consumer holding nothing",
        "  group workers: 0 pending, lag 1",
        "    no consumers",
    ]


def test_inspect_role_lists_oldest_pending_entries_with_holder_idle_and_deliveries(
    r: redis.Redis, redis_url: str, namespace: str
) -> None:
    stream = Keys(namespace).role_stream("delta")
    # Ids 5 s in the past: the age of a pending entry is read from its id.
    past = server_ms(r) - 5000
    ids = [f"{past}-0", f"{past}-1", f"{past + 1000}-0"]
    for entry_id in ids:
        r.xadd(stream, {"message": b"{}"}, id=entry_id)
    r.xadd(stream, {"message": b"{}"})
    r.xgroup_create(stream, GROUP, id="0")
    assert read_ids(r, stream, "w-1", 2) == ids[:2]
    assert read_ids(r, stream, "w-2", 1) == ids[2:]
    r.xclaim(stream, GROUP, "w-2", 0, [ids[1]])  # adopted: w-2 holds it, delivered twice

    doc = inspect_json(redis_url, namespace, "delta", "--count", "2")

    role = doc["role"]
    assert doc["namespace"] == namespace
    assert (role["role"], role["length"], role["delayed"], role["dead_letters"]) == (
        "delta",
        4,
        0,
        0,
    )
    [group] = role["groups"]
    assert (group["pending"], group["lag"], group["oldest_pending_id"]) == (3, 1, ids[0])
    assert [(c["name"], c["pending"]) for c in group["consumers"]] == [("w-1", 1), ("w-2", 2)]
    assert 5000 <= group["oldest_pending_age_ms"] < 5000 + MAX_AGE_MS
    held = [(e["id"], e["group"], e["consumer"], e["deliveries"]) for e in role["oldest_pending"]]
    assert held == [(ids[0], GROUP, "w-1", 1), (ids[1], GROUP, "w-2", 2)]
    for entry in role["oldest_pending"]:
        assert 5000 <= entry["age_ms"] < 5000 + MAX_AGE_MS
        assert 0 <= entry["idle_ms"] < entry["age_ms"]

    text = run_cli("inspect", "delta", *conn(redis_url, namespace))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    at = lines.index("oldest pending entries (3 of 3):")
    assert lines[at + 1].split() == ["ID", "GROUP", "CONSUMER", "IDLE", "DELIVERIES", "AGE"]
    rows = [line.split() for line in lines[at + 2 :]]
    assert [(row[0], row[2], row[4]) for row in rows] == [
        (ids[0], "w-1", "1"),
        (ids[1], "w-2", "2"),
        (ids[2], "w-2", "1"),
    ]


def test_inspect_of_an_empty_namespace_says_so(redis_url: str, namespace: str) -> None:
    text = run_cli("inspect", *conn(redis_url, namespace))
    assert (text.returncode, text.stdout) == (0, f"no roles in namespace {namespace}\n")
    assert inspect_json(redis_url, namespace) == {"namespace": namespace, "roles": []}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "error: unknown role 'nope' in namespace "),
        (["no*pe"], "error: invalid role 'no*pe'"),
        (["--count", "3"], "error: --count applies to 'streamflow inspect ROLE' only"),
    ],
    ids=["unknown", "invalid", "count-without-role"],
)
def test_inspect_of_an_unknown_role_exits_2_with_one_line(
    r: redis.Redis, redis_url: str, namespace: str, args: list[str], message: str
) -> None:
    r.sadd(Keys(namespace).known_roles(), "known")
    result = run_cli("inspect", *args, *conn(redis_url, namespace))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message)


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_inspect_watch_redraws_until_sigint_then_exits_0(
    r: redis.Redis, tmp_path: Path, redis_url: str, namespace: str, as_json: bool
) -> None:
    r.sadd(Keys(namespace).known_roles(), "watched")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    args = [
        "inspect",
        "--watch",
        "0.1",
        *(["--json"] if as_json else []),
        *conn(redis_url, namespace),
    ]
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(
            [*CLI, *args], cwd=ROOT, env=clean_env(), stdout=stdout, stderr=stderr
        )
    try:
        marker = '"role":"watched"' if as_json else "role watched: 0 in stream"
        wait_for(lambda: out.read_text().count(marker) >= 3, 15, "three views drawn")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        kill_tree(process)
    assert err.read_text() == ""
    if as_json:
        views = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(view["roles"][0]["role"] == "watched" for view in views)
    else:
        assert f"streamflow inspect (namespace {namespace}) at " in out.read_text()


@pytest.mark.anyio
async def test_inspect_shows_what_an_in_process_worker_holds(redis: Redis, namespace: str) -> None:
    app = App()
    release = anyio.Event()

    @app.role("hold")
    async def hold(ctx: Context, payload: Any) -> None:
        await release.wait()

    keys = Keys(namespace)
    stream = keys.role_stream("hold")
    worker = Worker(app, redis, namespace=namespace, concurrency=2, block_ms=100)
    with anyio.fail_after(15):
        async with running(worker):
            await Client(redis, namespace=namespace).publish_many("hold", [1, 2, 3])

            async def two_pending() -> bool:
                return int((await redis.xpending(stream, GROUP))["pending"]) == 2

            await wait_for_query(two_pending)
            [info] = await inspect_roles(redis, keys)
            [group] = info.groups
            assert (info.role, info.length, group.pending, group.lag) == ("hold", 3, 2, 1)
            consumers = [(c.name, c.pending, c.alive) for c in group.consumers]
            assert consumers == [(worker.consumer, 2, True)]
            detail = await inspect_role(redis, keys, "hold", count=5)
            assert detail is not None
            assert [(e.consumer, e.deliveries) for e in detail.oldest_pending] == [
                (worker.consumer, 1),
                (worker.consumer, 1),
            ]
            release.set()

            async def all_settled() -> bool:
                return await redis.xlen(stream) == 0

            await wait_for_query(all_settled)
        [info] = await inspect_roles(redis, keys)
        assert (info.length, info.groups[0].pending, info.groups[0].lag) == (0, 0, 0)
        assert await inspect_role(redis, keys, "nope") is None


# -- workers --------------------------------------------------------------------------------


def live(redis_url: str, namespace: str) -> list[dict[str, Any]]:
    result = run_cli("workers", "--json", *conn(redis_url, namespace))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_workers_lists_a_live_worker_until_it_is_killed_and_its_ttl_passes(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    empty = run_cli("workers", *conn(redis_url, namespace))
    assert (empty.returncode, empty.stdout) == (
        0,
        f"no live workers in namespace {namespace}\n"
        f"no coordinator in namespace {namespace}: tasks stay queued\n"
        f"no scheduler in namespace {namespace}: schedules do not fire\n",
    )
    options = [
        "--role",
        "record",
        "--lease-ttl",
        "1",
        "--reclaim-interval",
        "0.2",
        "--block-ms",
        "200",
    ]
    process = subprocess.Popen(
        [*CLI, "worker", "--app", "tests.apps:app", *options, *conn(redis_url, namespace)],
        cwd=ROOT,
        env=clean_env(SFTEST_RECORD=str(tmp_path / "record.txt")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        found: list[dict[str, Any]] = []

        def listed() -> bool:
            found[:] = live(redis_url, namespace)
            return bool(found)

        wait_for(listed, 15, "the worker is listed", every=0.1)
        [info] = found
        assert (info["pid"], info["roles"], info["in_flight"]) == (process.pid, ["record"], 0)
        assert info["consumer"] and info["host"] and info["version"]
        text = run_cli("workers", *conn(redis_url, namespace))
        assert text.returncode == 0, text.stderr
        header, row, no_coordinator, no_scheduler = text.stdout.splitlines()
        assert no_coordinator.startswith("no coordinator in namespace")
        assert no_scheduler.startswith("no scheduler in namespace")
        assert header.split()[:4] == ["CONSUMER", "HOST", "PID", "ROLES"]
        assert row.split()[0] == info["consumer"] and str(process.pid) in row.split()

        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        wait_for(lambda: not live(redis_url, namespace), 5, "the killed worker is gone", every=0.1)
    finally:
        kill_tree(process)


@pytest.mark.anyio
async def test_inspect_reports_the_longest_idle_pending_entry_wherever_it_sits(
    redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys(namespace)
    stream = keys.role_stream("idle")
    for _ in range(40):
        await redis.xadd(stream, {"message": b"{}"})
    await redis.xgroup_create(stream, GROUP, id="0")
    [[_, entries]] = await redis.xreadgroup(GROUP, "w-1", {stream: ">"}, count=40)
    ids = [entry_id for entry_id, _ in entries]

    async def set_idle(idle_by_index: dict[int, int]) -> None:
        for index, idle in idle_by_index.items():
            await redis.xclaim(stream, GROUP, "w-1", 0, [ids[index]], idle=idle, justid=True)

    # The idlest entry sits neither first nor last, behind a less idle older one.
    await set_idle({3: 20_000, 17: 90_000, 30: 50_000})
    with anyio.fail_after(10):
        detail = await inspect_role(redis, keys, "idle")
    assert detail is not None
    [group] = detail.groups
    assert group.oldest_pending_idle_ms is not None
    assert 90_000 <= group.oldest_pending_idle_ms < 90_000 + MAX_AGE_MS

    # Ordered against the search (each entry idler than every older one): the answer stays
    # within a factor of 2, in a bounded number of steps.
    await set_idle({i: 1_000 * (i + 1) for i in range(40)})
    with anyio.fail_after(10):
        [info] = [role for role in await inspect_roles(redis, keys) if role.role == "idle"]
    idle = info.groups[0].oldest_pending_idle_ms
    assert idle is not None and 20_000 <= idle < 40_000 + MAX_AGE_MS

    # Renewed together (one idle time for all), one entry left behind at the end: found in a
    # few round trips, not one per entry, although idle times grow while the steps run.
    await set_idle({i: 10_000 for i in range(39)} | {39: 60_000})
    steps = 0
    pipeline = redis.pipeline

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        steps += 1
        return pipeline(*args, **kwargs)

    monkeypatch.setattr(redis, "pipeline", counting)
    with anyio.fail_after(10):
        [found] = await longest_idle(redis, [(stream, GROUP)])
    assert found is not None and 60_000 <= found < 60_000 + MAX_AGE_MS
    assert steps <= 4, steps

    # Nothing pending: no idle time.
    await redis.xack(stream, GROUP, *ids)
    with anyio.fail_after(10):
        detail = await inspect_role(redis, keys, "idle")
    assert detail is not None and detail.groups[0].oldest_pending_idle_ms is None
