"""Everything read back from Redis is untrusted: forged keys never crash or redirect a worker.

Anyone with write access to the namespace (a publisher or worker ACL user) can write a key of
any type where streamflow expects a batch, a cancel marker, the cancel index or the signals
stream, and put hostile text into what ends up in logs and terminals. Workers run as OS
processes here where the issue saw them exit; what they handled is recorded in a file.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import anyio
import orjson
import pytest
import redis as redis_sync
from pydantic import BaseModel
from redis.asyncio import Redis

from streamflow import (
    App,
    Client,
    Context,
    Fatal,
    Outcome,
    RetryPolicy,
    Worker,
    connect,
    partitions,
    registry,
    signals,
    streams,
)
from streamflow.dag.graph import Graph, GraphError
from streamflow.dag.store import TaskStore
from streamflow.errors import ConfigError, InputError, NoCoordinatorWarning, UnknownRoleWarning
from streamflow.keys import GROUP, Keys
from streamflow.ops.exporter import Exporter
from streamflow.ops.inspect import inspect_roles
from streamflow.ops.server import RedisServer
from streamflow.protocol import DeadLetterReason, encode, encode_job_fields
from streamflow.records import CancelSignal, decode_dead_letter
from streamflow.registry import live_workers
from streamflow.scripts import Scripts
from tests.dag.helpers import system as task_system
from tests.helpers import (
    CLI,
    ROOT,
    clean_env,
    free_port,
    recorded,
    running,
    scrape,
    wait_for,
    wait_for_query,
    wait_until,
)
from tests.processes import Process, Workers

pytestmark = pytest.mark.redis

#: Generous for a shared 2-core machine: these wait for outcomes, never for a duration.
DEADLINE = 30.0


@pytest.fixture
def record_path(tmp_path: Path) -> Path:
    return tmp_path / "record.txt"


@pytest.fixture
def workers(tmp_path: Path, redis_url: str, namespace: str, record_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path, redis_url, namespace, record_path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def node_job(message_id: str, role: str, **fields: Any) -> bytes:
    """A task node's job envelope written by hand, as a publisher could XADD it."""
    doc = {
        "protocol": 1,
        "kind": "job",
        "id": message_id,
        "role": role,
        "payload": {"n": 1},
        "created_at_ms": 1,
        "task_id": "t1",
        "node_id": "n1",
        "invocation": 0,
        **fields,
    }
    return orjson.dumps(doc)


def plain_job(message_id: str, role: str, payload: Any = None) -> bytes:
    return encode_job_fields(message_id=message_id, role=role, payload=payload, created_at_ms=1)


def dead_letters(client: redis_sync.Redis, keys: Keys, role: str) -> dict[str, Any]:
    """The role's dead letters by message id."""
    out = {}
    for _, fields in client.xrange(keys.dead_letters(role)):
        letter, _ = decode_dead_letter(fields)
        out[letter.message_id or "?"] = letter
    return out


def wait_serving(worker: Process, predicate: Any, what: str) -> None:
    """Wait for ``predicate`` while the worker stays up (fail at once if it exits)."""

    def check() -> bool:
        if not worker.alive():
            raise AssertionError(f"worker {worker.name} exited:\n{worker.stderr()}")
        return bool(predicate())

    wait_for(check, DEADLINE, what)


# -- item 1: input batches named by a job or a task's output list -------------------------------


@pytest.mark.slow
def test_forged_input_refs_are_dead_lettered_and_the_worker_keeps_serving(
    workers: Workers, sync_redis: redis_sync.Redis, namespace: str, record_path: Path
) -> None:
    keys = Keys(namespace)
    stream = keys.role_stream("record")
    hashed = keys.batch("p-role", "t1", "p", 0, 1)
    sync_redis.hset(hashed, "a", "b")
    garbage = keys.batch("p-role", "t1", "p", 0, 2)
    sync_redis.set(garbage, b"\xff not json")
    an_object = keys.batch("p-role", "t1", "p", 0, 3)
    sync_redis.set(an_object, b'{"a": 1}')
    other_task = keys.batch("p-role", "t2", "p", 0, 0)
    sync_redis.set(other_task, b"[1, 2]")
    forged = {
        "x1": stream,  # the XADD: the role stream itself (WRONGTYPE)
        "x2": garbage,
        "x3": other_task,  # a real batch, of another task
        "x4": hashed,
        "x5": an_object,
        "x6": f"{namespace}:{{role:p-role}}:batch:t1:p:00:0",  # not as the builder writes it
        "x7": keys.batch("p-role", "t1", "other-node", 0, 0),  # not the ref's node
    }
    for n, (message_id, ref) in enumerate(forged.items()):
        sync_redis.xadd(stream, {"message": plain_job(f"g{n}", "record")})
        entry = node_job(message_id, "record", input={"node": "p", "index": 0, "ref": ref})
        sync_redis.xadd(stream, {"message": entry})
    # A node fed by its parents' whole output reads the keys a task's output list names.
    good = keys.batch("p-role", "t1", "p", 0, 0)
    sync_redis.set(good, b"[1]")
    sync_redis.rpush(keys.task_output("t1", "p"), good, stream)
    sync_redis.hset(keys.task_output("t1", "q"), "a", "b")
    gather = keys.role_stream("gather")
    sync_redis.xadd(gather, {"message": node_job("y1", "gather", inputs={"p": 2})})
    sync_redis.xadd(gather, {"message": node_job("y2", "gather", inputs={"q": 1})})
    sync_redis.xadd(gather, {"message": plain_job("g-gather", "gather")})

    worker = workers.start("untrusted-1", roles=("record", "gather"))
    worker.wait_ready()
    expected = {*forged, "y1", "y2"}
    wait_serving(
        worker,
        lambda: (
            set(dead_letters(sync_redis, keys, "record"))
            | set(dead_letters(sync_redis, keys, "gather"))
            >= expected
        ),
        "every forged job dead-lettered",
    )
    wait_serving(worker, lambda: len(recorded(record_path)) >= len(forged) + 1, "neighbours run")

    letters = {
        **dead_letters(sync_redis, keys, "record"),
        **dead_letters(sync_redis, keys, "gather"),
    }
    assert set(letters) == expected
    for message_id in expected:
        assert letters[message_id].reason == "invalid_input", letters[message_id]
    assert "is not a batch key of task 't1', node 'p'" in letters["x1"].detail
    assert "WRONGTYPE" in letters["x4"].detail
    assert "not JSON" in letters["x2"].detail
    assert "not a JSON array" in letters["x5"].detail
    assert sorted(recorded(record_path)) == sorted(
        [f"g{n}" for n in range(len(forged))] + ["g-gather"]
    )
    assert worker.alive()
    worker.assert_clean_log()


# -- item 2 and the index of item 6: cancel markers ---------------------------------------------


def cancel_signal(target: str, target_id: str) -> bytes:
    return encode(
        CancelSignal(
            protocol=1,
            kind="cancel",
            id=f"sig-{target_id}",
            target=target,  # type: ignore[arg-type]
            target_id=target_id,
            created_at_ms=1,
        )
    )


@pytest.mark.slow
def test_bad_cancel_markers_are_skipped_counted_and_a_marker_means_what_its_key_says(
    workers: Workers, sync_redis: redis_sync.Redis, namespace: str, record_path: Path
) -> None:
    keys = Keys(namespace)
    # Spelt out, as docs/protocol.md gives them (and so that this test runs on older code).
    index = f"{namespace}:{{signals}}:cancels"
    far = 10**13  # expiry scores far in the future
    bad = {
        ("task", "x"): lambda key: sync_redis.hset(key, "a", "b"),
        ("task", "y"): lambda key: sync_redis.xadd(key, {"a": "b"}),
        ("any", "z"): lambda key: sync_redis.rpush(key, "a"),
        ("message", "garbage"): lambda key: sync_redis.set(key, b"not json"),
    }
    for target, write in bad.items():
        write(keys.cancel_marker(*target))
        sync_redis.zadd(index, {":".join(target): far})
    # A marker whose signal names another target: it cancels what its key says, nothing else.
    sync_redis.set(keys.cancel_marker("task", "victim"), cancel_signal("message", "innocent"))
    sync_redis.zadd(index, {"task:victim": far, "bogus": far})
    stream = keys.role_stream("record")
    sync_redis.xadd(stream, {"message": plain_job("innocent", "record")})
    victim = encode_job_fields(
        message_id="v1", role="record", payload=None, created_at_ms=1, task_id="victim"
    )
    sync_redis.xadd(stream, {"message": victim})
    sync_redis.xadd(stream, {"message": plain_job("plain", "record")})

    port = free_port()
    worker = workers.start("markers-1", "--metrics-port", str(port), roles=("record",))
    worker.wait_ready()
    wait_serving(
        worker,
        lambda: sync_redis.xlen(stream) == 0 and len(recorded(record_path)) >= 2,
        "the three jobs settled",
    )
    assert sorted(recorded(record_path)) == ["innocent", "plain"]
    samples = scrape(port)
    assert samples[("streamflow_bad_records_total", (("kind", "cancel_marker"),))] == 6
    warnings = [line for line in worker.stderr().splitlines() if "malformed cancel markers" in line]
    assert len(warnings) == 1 and "skipped 6 malformed cancel markers" in warnings[0], warnings
    worker.assert_clean_log()


# -- item 3: log and terminal injection ---------------------------------------------------------

FORGED = "boom\r\nERROR forged line\x1b[31m red \x1b[0m\u202eevil\u2066\x85"
RAW_CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def run_cli(redis_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--redis-url", redis_url, "--namespace", namespace],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_hostile_text_never_forges_a_log_line_or_reaches_a_terminal_raw(
    workers: Workers,
    sync_redis: redis_sync.Redis,
    namespace: str,
    redis_url: str,
) -> None:
    keys = Keys(namespace)
    sync_redis.xadd(
        keys.role_stream("forge"), {"message": plain_job("f1", "forge", {"text": FORGED})}
    )
    # A dead letter written by hand: every field is text from outside.
    letter = {
        "protocol": 1,
        "kind": "dead_letter",
        "reason": "fatal",
        "detail": "line one\nERROR forged dlq line\x1b]0;title\x07\u202e",
        "role": "forge",
        "entry_id": "1-1\r\nERROR forged",
        "message_id": "m\x1b[2J",
        "consumer": "c\u2067",
        "dead_at_ms": 1,
    }
    sync_redis.xadd(keys.dead_letters("forge"), {"dead_letter": orjson.dumps(letter)})

    worker = workers.start("forge-1", roles=("forge",))
    worker.wait_ready()
    wait_serving(worker, lambda: sync_redis.xlen(keys.dead_letters("forge")) == 2, "dead letter")
    worker.signal(signal.SIGTERM)
    worker.process.wait(timeout=DEADLINE)
    log = worker.stderr()
    assert "ERROR forged line" in log  # the text is there, escaped, on its record's line
    assert not [line for line in log.splitlines() if line.startswith("ERROR forged")]
    assert not RAW_CONTROLS.search(log.replace("\n", "")), repr(log)

    listed = run_cli(redis_url, namespace, "dlq", "list", "forge")
    assert listed.returncode == 0, listed.stderr
    assert "fatal" in listed.stdout and "forged dlq line" in listed.stdout
    assert not [line for line in listed.stdout.splitlines() if "forged" in line.split("  ")[0]]
    assert not [line for line in listed.stdout.splitlines() if line.startswith("ERROR")]
    assert not RAW_CONTROLS.search(listed.stdout.replace("\n", "")), repr(listed.stdout)
    as_json = run_cli(redis_url, namespace, "dlq", "list", "forge", "--json")
    docs = [orjson.loads(line) for line in as_json.stdout.splitlines()]
    assert {doc["detail"] for doc in docs} >= {letter["detail"]}  # JSON stays exact JSON
    assert not RAW_CONTROLS.search(as_json.stdout.replace("\n", "")), repr(as_json.stdout)

    huge = "r" * 10_000 + "\x1b[2J"
    refused = run_cli(redis_url, namespace, "dlq", "list", huge)
    assert refused.returncode == 2
    assert "invalid role" in refused.stderr and len(refused.stderr) < 1000, len(refused.stderr)
    assert "\x1b" not in refused.stderr


@pytest.mark.anyio
@pytest.mark.slow
async def test_hostile_entries_and_ids_are_echoed_bounded(
    redis: Redis, namespace: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Text from outside is quoted at most MAX_ECHO characters in a detail, an error or a log
    line, and a dead letter's detail at most MAX_DETAIL: a hostile entry's version, kind or key,
    a handler's huge exception text, a 10 KB id given to the CLI."""
    keys = Keys(namespace)
    stream = keys.role_stream("forge")
    huge = "v" * 50_000 + "\r\nERROR forged"
    base = {"protocol": 1, "kind": "job", "role": "forge", "payload": None, "created_at_ms": 1}
    for doc in (
        {**base, "id": "h1", "protocol": huge},
        {**base, "id": "h2", "kind": huge},
        {**base, "id": "h3", huge: 1},
    ):
        await redis.xadd(stream, {"message": orjson.dumps(doc)})
    await redis.xadd(stream, {"message": plain_job("h4", "forge", {"text": huge})})
    outcomes: list[Outcome] = []
    app = App()

    @app.role("forge")
    async def forge(ctx: Context, payload: Any) -> None:
        raise Fatal(payload["text"])

    caplog.set_level("WARNING", logger="streamflow")
    worker = Worker(app, redis, namespace=namespace, on_outcome=outcomes.append)
    with anyio.fail_after(DEADLINE):
        async with running(worker):
            await wait_until(lambda: len(outcomes) == 4, DEADLINE)
    letters = [decode_dead_letter(f)[0] for _, f in await redis.xrange(keys.dead_letters("forge"))]
    assert sorted(d.reason for d in letters) == [
        "fatal",
        "invalid_message",
        "unknown_kind",
        "unsupported_version",
    ]
    for letter in letters:
        limit = 4000 if letter.reason == "fatal" else 400  # MAX_DETAIL; MAX_ECHO and the words
        assert len(letter.detail) <= limit, (letter.reason, len(letter.detail))
    lines = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(lines) == 4 and max(map(len, lines)) < 4200, [len(line) for line in lines]

    # A dead letter written by hand with a key of its own: its problem quotes the key, escaped.
    letter = {"protocol": 1, "kind": "dead_letter", "reason": "fatal", "detail": "d"}
    letter |= {"role": "forged", "entry_id": "1-1", "consumer": "c", "dead_at_ms": 1}
    hostile_key = {"x\nERROR forged" + "k" * 10_000: 1}
    await redis.xadd(
        keys.dead_letters("forged"), {"dead_letter": orjson.dumps(letter | hostile_key)}
    )
    replayed = run_cli(redis_url, namespace, "dlq", "replay", "forged", "--all")
    assert replayed.returncode == 3 and "unreadable dead letter" in replayed.stderr
    assert not [line for line in replayed.stderr.splitlines() if line.startswith("ERROR")]
    assert len(replayed.stderr) < 1000, len(replayed.stderr)

    for command in ("job", "cancel"):
        refused = run_cli(redis_url, namespace, command, "r" * 10_000)
        assert refused.returncode == 2, (command, refused.stderr[:300])
        assert "invalid message id" in refused.stderr and len(refused.stderr) < 1000, command
    with pytest.raises(ValueError, match="invalid message id") as info:
        await Client(redis, namespace=namespace).publish("forge", None, message_id="r" * 10_000)
    assert len(str(info.value)) < 1000


# -- the cancel index (item 6): start-up reads one key, whatever else the database holds --------


def collecting_app(handled: list[str]) -> App:
    app = App()

    @app.role("echo")
    async def echo(ctx: Context, payload: Any) -> None:
        handled.append(ctx.message_id)

    return app


async def publish(redis: Redis, keys: Keys, message_id: str, task_id: str | None = None) -> None:
    message = encode_job_fields(
        message_id=message_id, role="echo", payload=None, created_at_ms=1, task_id=task_id
    )
    await redis.xadd(keys.role_stream("echo"), {"message": message})


async def cancel(redis: Redis, keys: Keys, target: str, target_id: str) -> None:
    await signals.send_cancel(
        redis,
        Scripts(redis),
        keys,
        target=target,
        target_id=target_id,
        reason="test",
        requested_by="test",
    )


@pytest.mark.anyio
@pytest.mark.slow
async def test_start_up_loads_cancels_from_the_index_and_never_scans(
    private_redis: Callable[..., RedisServer], namespace: str
) -> None:
    server = private_redis()
    redis = connect.connect(server.url)
    try:
        keys = Keys(namespace)
        pipe = redis.pipeline(transaction=False)
        for n in range(20_000):  # unrelated keys: start-up must not look at them
            pipe.set(f"unrelated:{n}", b"x")
        await pipe.execute()
        await cancel(redis, keys, "task", "t9")
        await publish(redis, keys, "in-t9", task_id="t9")
        await publish(redis, keys, "plain")
        await redis.config_resetstat()
        handled: list[str] = []
        outcomes: list[Outcome] = []
        worker = Worker(
            collecting_app(handled), redis, namespace=namespace, on_outcome=outcomes.append
        )
        with anyio.fail_after(DEADLINE):
            async with running(worker):
                await wait_until(lambda: len(outcomes) == 2, DEADLINE)
        stats = await redis.info("commandstats")
    finally:
        await redis.aclose()
    assert handled == ["plain"]
    assert {o.message_id: o.status for o in outcomes}["in-t9"] == "cancelled"
    assert "cmdstat_scan" not in stats, stats.get("cmdstat_scan")
    assert stats["cmdstat_zrange"]["calls"] >= 1


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_marker_less_signal_is_indexed_for_later_workers_and_expired_entries_go(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    index = keys.cancel_index()
    handled: list[str] = []
    first = Worker(collecting_app(handled), redis, namespace=namespace, consumer=f"{namespace}-1")
    with anyio.fail_after(DEADLINE):
        async with running(first):
            # A plain XADD of a signal, as a service without the script may send it.
            await redis.xadd(keys.signals(), {"signal": cancel_signal("message", "m-late")})
            await wait_for_query(lambda: redis.zscore(index, "message:m-late"), DEADLINE)
    assert await redis.get(keys.cancel_marker("message", "m-late")) is not None
    expiry = await redis.zscore(index, "message:m-late")
    assert expiry is not None and expiry > time.time() * 1000 + 6 * 24 * 3600 * 1000

    outcomes: list[Outcome] = []
    later = Worker(
        collecting_app(handled),
        redis,
        namespace=namespace,
        consumer=f"{namespace}-2",
        on_outcome=outcomes.append,
    )
    await publish(redis, keys, "m-late")
    await publish(redis, keys, "m-other")
    with anyio.fail_after(DEADLINE):
        async with running(later):
            await wait_until(lambda: len(outcomes) == 2, DEADLINE)
    assert handled == ["m-other"]

    await redis.zadd(index, {"task:long-gone": 1})  # expired long ago
    await cancel(redis, keys, "task", "t-new")
    assert await redis.zscore(index, "task:long-gone") is None
    assert await redis.zscore(index, "task:t-new") is not None


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_wrong_type_index_or_signals_stream_is_counted_and_cancels_still_work(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await redis.hset(keys.cancel_index(), "a", "b")
    await cancel(redis, keys, "task", "t-before")  # the marker is set; the index is skipped
    handled: list[str] = []
    worker = Worker(collecting_app(handled), redis, namespace=namespace)
    await publish(redis, keys, "ok-1")
    with anyio.fail_after(DEADLINE):
        async with running(worker):
            await wait_until(lambda: handled == ["ok-1"], DEADLINE)
            assert worker.statistics().bad_records == {"cancel_index": 1}
            await cancel(redis, keys, "task", "t-live")  # reaches it by the broadcast
            await wait_until(lambda: worker._cancels.book.for_task("t-live") is not None)

    other = Keys(namespace + "b")
    await redis.hset(other.signals(), "a", "b")
    worker = Worker(collecting_app(handled), redis, namespace=other.namespace)
    await publish(redis, other, "ok-2")
    with anyio.fail_after(DEADLINE):
        async with running(worker):
            await wait_until(lambda: "ok-2" in handled, DEADLINE)
            assert worker.statistics().bad_records == {"signals_stream": 1}


# -- item 1, as a class: the other values workers and tools read back -------------------------


@pytest.mark.anyio
@pytest.mark.slow
async def test_other_values_read_back_are_refused_clearly_without_a_crash(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    stream = keys.role_stream("echo")
    consumer = f"{namespace}-w"
    # A redelivered entry whose start counter is not a counter: dead-lettered, not run.
    await streams.ensure_group(redis, stream)
    await publish(redis, keys, "suspect")
    await redis.xreadgroup(GROUP, consumer, {stream: ">"})  # pending: resumed as a redelivery
    entry_id = (await redis.xrange(stream))[0][0].decode()
    await redis.hset(keys.starts("echo", entry_id), "a", "b")
    # Registry entries, cancel reports and a role's config written by someone else.
    await redis.set(keys.consumer_info("bogus"), b"\x1b[2J not json")
    await redis.hset(keys.cancel_report("sig-x"), mapping={"w1": b"garbage"})
    await redis.set(keys.role_config("other"), b"not a hash")
    await redis.xadd(keys.role_stream("other"), {"message": b"x"})

    handled: list[str] = []
    outcomes: list[Outcome] = []
    worker = Worker(
        collecting_app(handled),
        redis,
        namespace=namespace,
        consumer=consumer,
        on_outcome=outcomes.append,
    )
    await publish(redis, keys, "after")
    with anyio.fail_after(DEADLINE):
        async with running(worker):
            await wait_until(lambda: len(outcomes) == 2, DEADLINE)
            assert [w.consumer for w in await live_workers(redis, keys)] == [consumer]
    assert handled == ["after"]
    letters = [decode_dead_letter(f)[0] for _, f in await redis.xrange(keys.dead_letters("echo"))]
    assert [(d.message_id, d.reason) for d in letters] == [("suspect", "max_deliveries")]
    assert "is not a counter" in letters[0].detail
    assert await signals.read_reports(redis, keys, "sig-x") == {}
    with pytest.raises(ConfigError, match="is not a hash"):
        await partitions.load(redis, keys, "other")
    assert [info.role for info in await inspect_roles(redis, keys)] == ["echo", "other"]


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_wrong_type_known_roles_or_flow_control_key_does_not_stop_a_worker(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 2's shape in the keys every worker reads at start and while it runs: the known
    roles (a publisher may HSET there) and a role's flow control (a worker may ZADD there)."""
    keys = Keys(namespace)
    await redis.hset(keys.known_roles(), "a", "b")
    await redis.zadd(keys.flow_control("echo"), {"a": 1})
    with pytest.warns(UnknownRoleWarning, match="never been served"):  # not a WRONGTYPE error
        assert await Client(redis, namespace=namespace).publish("fresh", None)
    await publish(redis, keys, "first")
    handled: list[str] = []
    outcomes: list[Outcome] = []
    worker = Worker(collecting_app(handled), redis, namespace=namespace, on_outcome=outcomes.append)
    caplog.set_level("WARNING", logger="streamflow")
    with anyio.fail_after(DEADLINE):
        async with running(worker):
            await wait_until(lambda: len(outcomes) == 1, DEADLINE)
            await publish(redis, keys, "second")  # after more refreshes of the flow control
            await wait_until(lambda: len(outcomes) == 2, DEADLINE)
            bad = worker.statistics().bad_records
    assert handled == ["first", "second"]
    assert bad == {"known_roles": 1, "flow_control": 1}
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "flow control of role echo" in m]) == 1, messages
    assert len([m for m in messages if "not registered for task graphs" in m]) == 1, messages


@pytest.mark.anyio
@pytest.mark.slow
async def test_limit_keys_of_another_type_leave_the_role_served_without_its_limits(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A limited role's running slots or rate state of another type (the worker user may HSET
    there): the role is served unlimited with one warning, rather than the worker stopping."""
    keys = Keys(namespace)
    await redis.hset(keys.flow_running("capped"), "a", "b")
    await redis.hset(keys.flow_rate("paced"), "a", "b")
    app = App()
    handled: list[str] = []

    @app.role("capped", concurrency_limit=1)
    async def capped(ctx: Context, payload: Any) -> None:
        handled.append(ctx.message_id)

    @app.role("paced", rate_limit="100/s")
    async def paced(ctx: Context, payload: Any) -> None:
        handled.append(ctx.message_id)

    for role in ("capped", "paced"):
        for n in range(2):
            await redis.xadd(keys.role_stream(role), {"message": plain_job(f"{role}{n}", role)})
    caplog.set_level("WARNING", logger="streamflow")
    worker = Worker(app, redis, namespace=namespace, block_ms=100)
    with anyio.fail_after(DEADLINE):
        async with running(worker):
            await wait_until(lambda: len(handled) == 4, DEADLINE)
            bad = worker.statistics().bad_records
    assert sorted(handled) == ["capped0", "capped1", "paced0", "paced1"]
    assert bad == {"flow_limits": 2}
    warned = [r.getMessage() for r in caplog.records if "cannot be applied" in r.getMessage()]
    assert sorted(m.split()[4] for m in warned) == ["capped", "paced"], warned


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_wrong_type_schedule_or_dead_letter_stream_never_stops_a_worker(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The delayed schedule (a publisher may HSET there) and the dead letters (a worker may):
    the role's new jobs are served, and what cannot be dead-lettered stays pending, not lost."""
    keys = Keys(namespace)
    await redis.hset(keys.delayed("later"), "a", "b")
    await redis.hset(keys.dead_letters("doomed"), "a", "b")
    app = App()
    handled: list[str] = []

    @app.role("later")
    async def later(ctx: Context, payload: Any) -> None:
        handled.append(ctx.message_id)

    @app.role("doomed")
    async def doomed(ctx: Context, payload: Any) -> None:
        handled.append(ctx.message_id)
        raise Fatal("no place to put it")

    await redis.xadd(keys.role_stream("later"), {"message": plain_job("now", "later")})
    await redis.xadd(keys.role_stream("doomed"), {"message": plain_job("fatal", "doomed")})
    caplog.set_level("WARNING", logger="streamflow")
    worker = Worker(app, redis, namespace=namespace, block_ms=100)
    with anyio.fail_after(DEADLINE):
        async with running(worker):
            await wait_until(lambda: len(handled) == 2, DEADLINE)
            await wait_until(lambda: any("could not settle" in r.message for r in caplog.records))
            await redis.xadd(keys.role_stream("later"), {"message": plain_job("then", "later")})
            await wait_until(lambda: len(handled) == 3, DEADLINE)
            bad = worker.statistics().bad_records
    assert sorted(handled) == ["fatal", "now", "then"]
    assert bad == {"delayed": 1}
    pending: Any = await redis.xpending(keys.role_stream("doomed"), GROUP)
    assert pending["pending"] == 1  # not acknowledged: run again after the lease TTL
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot promote" in m]) == 1, messages
    [refused] = [m for m in messages if "could not settle" in m]
    assert "WRONGTYPE" in refused and "stays pending" in refused


# -- item 4: every documented dead-letter reason, from a real worker ----------------------------


class Size(BaseModel):
    width: int


def documented_reasons() -> list[str]:
    """The reasons listed in docs/protocol.md's table of reasons, in order."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("### Reasons", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)


def test_the_documented_reasons_are_exactly_the_code_s() -> None:
    coded = {reason for part in get_args(DeadLetterReason) for reason in get_args(part)}
    documented = documented_reasons()
    assert len(documented) == len(set(documented))
    assert set(documented) == coded


def reason_cases(keys: Keys) -> dict[str, dict[bytes, bytes]]:
    """For each documented reason, the fields of an entry that a worker dead-letters for it."""

    def job(message_id: str, **fields: Any) -> dict[bytes, bytes]:
        doc = {
            "protocol": 1,
            "kind": "job",
            "id": message_id,
            "role": "typed",
            "payload": {"width": 5},
            "created_at_ms": 1,
            **fields,
        }
        return {b"message": orjson.dumps(doc)}

    node = {"task_id": "t1", "node_id": "n1", "invocation": 0}
    ref = {"node": "p", "index": 0}
    missing = keys.batch("parent", "t1", "p", 0, 0)  # a batch key, of nothing
    forged = keys.role_stream("typed")  # not a batch key at all
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    return {
        "too_large": job("too_large", payload="x" * 70_000),
        "invalid_json": {b"message": b'{"protocol": 1, "kind": "job", "id": "invalid_json"'},
        "too_complex": job(
            "too_complex", payload=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
        ),
        "unsupported_version": job("unsupported_version", protocol=1.0),
        "unknown_kind": job("unknown_kind", kind="signal"),
        "invalid_message": job("invalid_message", attempt="1"),
        "wrong_role": job("wrong_role", role="elsewhere"),
        "invalid_payload": job("invalid_payload", payload={"width": "wide"}),
        "fatal": job("fatal", payload={"width": 0}),
        "failed": job("failed", payload={"width": 1}),
        "expired": job("expired", deadline_ms=1),
        "missing_input": job("missing_input", **node, input={**ref, "ref": missing}),
        "invalid_input": job("invalid_input", **node, input={**ref, "ref": forged}),
        "max_deliveries": job("max_deliveries"),  # see below: it was started too often
        # Its outcome kept, the handler returns too much, or a set (see the handler below).
        "result_too_large": job("result_too_large", payload={"width": 2}, keep_result_ms=60_000),
        "invalid_result": job("invalid_result", payload={"width": 3}, keep_result_ms=60_000),
    }


@pytest.mark.anyio
@pytest.mark.slow
async def test_every_documented_reason_is_what_a_real_worker_dead_letters_with(
    redis: Redis, namespace: str
) -> None:
    app = App()

    @app.role("typed", retry=RetryPolicy(max_attempts=1))
    async def typed(ctx: Context, payload: Size) -> Any:
        if payload.width == 0:
            raise Fatal("fatal as asked")
        if payload.width == 1:
            raise ValueError("failing as asked")
        if payload.width == 2:
            return "x" * 70_000  # over the worker's 64 KiB limit, as a result too
        return {1, 2} if payload.width == 3 else None

    keys = Keys(namespace)
    stream = keys.role_stream("typed")
    consumer = f"{namespace}-w"
    cases = reason_cases(keys)
    assert set(cases) == set(documented_reasons())
    await streams.ensure_group(redis, stream)
    poison = await redis.xadd(stream, cases["max_deliveries"])
    await redis.xreadgroup(GROUP, consumer, {stream: ">"})  # resumed at start: a redelivery
    await redis.set(keys.starts("typed", poison.decode()), 10)  # restarted 10 times already
    entry_reason = {poison: "max_deliveries"}
    for reason, fields in cases.items():
        if reason != "max_deliveries":
            entry_reason[await redis.xadd(stream, fields)] = reason
    outcomes: list[Outcome] = []
    worker = Worker(
        app,
        redis,
        namespace=namespace,
        consumer=consumer,
        max_message_bytes=64 * 1024,
        on_outcome=outcomes.append,
    )
    with anyio.fail_after(DEADLINE):
        async with running(worker):
            await wait_until(lambda: len(outcomes) == len(cases), DEADLINE)
    got = {}
    for _, fields in await redis.xrange(keys.dead_letters("typed")):
        letter, _ = decode_dead_letter(fields)
        got[entry_reason[letter.entry_id.encode()]] = letter.reason
    assert got == {reason: reason for reason in cases}


@pytest.mark.anyio
async def test_a_task_s_forged_output_refs_are_never_read_or_expired_as_batches(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    store = TaskStore(redis, keys)
    graph = Graph("g")
    graph.node("p", role="r")
    graph.node("c", role="r")
    graph.edge("p", "c")
    stream = keys.role_stream("r")
    await redis.xadd(stream, {"message": b"precious"})
    good = keys.batch("r", "t1", "p", 0, 0)
    await redis.set(good, b"[1, 2]")
    await redis.rpush(keys.task_output("t1", "p"), good, stream)
    # A finished task's batches get its retention: never the role stream a forged ref names.
    await store.expire_batches(graph.spec(), "t1")
    assert await redis.pttl(good) > 0
    assert await redis.pttl(stream) == -1
    with pytest.raises(InputError, match="is not a batch key of node 'p'"):
        await store.output("t1", "p")
    # Another type or garbage at a batch key, or at the list's key: an InputError, not a crash.
    bad = keys.batch("r", "t2", "p", 0, 0)
    await redis.hset(bad, "a", "b")
    await redis.rpush(keys.task_output("t2", "p"), bad)
    with pytest.raises(InputError, match="WRONGTYPE"):
        await store.output("t2", "p")
    await redis.hset(keys.task_output("t3", "p"), "a", "b")
    with pytest.raises(InputError, match="cannot be read"):
        await store.output("t3", "p")


@pytest.mark.slow
def test_a_wrong_type_liveness_key_refuses_the_name_with_one_error_line(
    workers: Workers, sync_redis: redis_sync.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    sync_redis.hset(keys.consumer_alive("victim"), "a", "b")
    worker = workers.start("victim", roles=("record",))
    assert worker.process.wait(timeout=DEADLINE) == 2, worker.stderr()
    assert "error: consumer name 'victim' is in use" in worker.stderr()
    assert keys.consumer_alive("victim") in worker.stderr()
    worker.assert_clean_log()
    assert sync_redis.type(keys.consumer_alive("victim")) == b"hash"  # never overwritten


@pytest.mark.slow
def test_a_wrong_type_role_stream_refuses_the_start_with_one_error_line(
    workers: Workers, sync_redis: redis_sync.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    sync_redis.hset(keys.role_stream("record"), "a", "b")
    worker = workers.start("stream-1", roles=("record",))
    assert worker.process.wait(timeout=DEADLINE) == 2, worker.stderr()
    assert f"error: {keys.role_stream('record')} is not a stream" in worker.stderr()
    worker.assert_clean_log()


@pytest.mark.anyio
async def test_a_wrong_type_events_stream_is_skipped_and_the_coordinator_runs_tasks(
    redis_url: str, redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    # A role that someone registered, whose events stream is something else.
    await redis.sadd(keys.known_roles(), "ghost")
    await redis.hset(keys.events("ghost"), "a", "b")
    graph = Graph("one")
    graph.node("source", role="source")
    async with task_system(redis_url, namespace) as (client, _, _):
        task_id = await client.submit(graph, params={"n": 3, "size": 2})
        task = await client.wait(task_id, timeout=DEADLINE)
    assert task.state == "succeeded", task.error


@pytest.mark.anyio
@pytest.mark.slow
async def test_registry_sets_of_another_type_do_not_stop_a_coordinator(
    redis_url: str, redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The known roles and functions (a publisher may HSET at both names) are skipped with one
    warning each and counted; the coordinator follows the roles once the key is a set again."""
    keys = Keys(namespace)
    await redis.hset(keys.known_roles(), "a", "b")
    await redis.hset(keys.known_functions(), "a", "b")
    graph = Graph("one")
    graph.node("source", role="source")
    caplog.set_level("WARNING", logger="streamflow")
    expected = {"known_roles": 1, "known_functions": 1}
    async with task_system(redis_url, namespace) as (client, coordinator, _):
        await wait_until(lambda: coordinator.bad_records() == expected, DEADLINE)
        await redis.delete(keys.known_roles())
        await redis.sadd(keys.known_roles(), "source")  # as a restarted worker of it does
        task_id = await client.submit(graph, params={"n": 3, "size": 2}, functions=[])
        task = await client.wait(task_id, timeout=DEADLINE)
        assert task.state == "succeeded", task.error
        assert coordinator.bad_records() == expected
    warned = [r.getMessage() for r in caplog.records if r.name == "streamflow.dag.coordinator"]
    assert len([m for m in warned if keys.known_functions() in m]) == 1, warned
    assert len([m for m in warned if keys.known_roles() in m]) == 1, warned


@pytest.mark.anyio
async def test_a_wrong_type_dedup_marker_is_replaced_not_a_publish_error(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    marker = keys.dedup("echo", "k1")
    await redis.hset(marker, "a", "b")  # e.g. at the name of a coordinator's next dispatch
    async with Client(redis, namespace=namespace) as client:
        first = await client.publish("echo", {}, dedup_key="k1")
        again = await client.publish("echo", {}, dedup_key="k1")
    assert again == first
    assert await redis.xlen(keys.role_stream("echo")) == 1
    assert await redis.get(marker) == first.encode()


@pytest.mark.anyio
async def test_the_exporter_reads_past_forged_task_ids_and_states(
    redis: Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    await redis.sadd(keys.tasks_active(), "bad:name\x1b", b"\xff\xfe", "garbled", "hashed")
    await redis.hset(keys.task_state("garbled"), "task", b"not json")
    await redis.set(keys.task_state("hashed"), b"a string, not a hash")
    snapshot = await Exporter(redis, namespace=namespace).refresh()
    assert snapshot.tasks == {}


@pytest.mark.anyio
async def test_inspect_and_the_exporter_read_past_role_keys_of_another_type(
    redis: Redis, namespace: str
) -> None:
    """One wrong-type key made every figure of every role fail (inspect: an error, the
    exporter: every refresh): now that key's figure reads as empty, the others are exact."""
    keys = Keys(namespace)
    for role in ("bad", "good"):
        await redis.xadd(keys.role_stream(role), {"message": plain_job(f"{role}-1", role)})
    await redis.hset(keys.delayed("bad"), "a", "b")
    await redis.hset(keys.dead_letters("bad"), "a", "b")
    await redis.zadd(keys.flow_control("bad"), {"a": 1})
    await redis.hset(keys.known_roles(), "a", "b")
    infos = {info.role: info for info in await inspect_roles(redis, keys)}
    assert set(infos) == {"bad", "good"}
    assert (infos["bad"].length, infos["bad"].delayed, infos["bad"].dead_letters) == (1, 0, 0)
    assert infos["good"].length == 1 and not infos["bad"].paused
    snapshot = await Exporter(redis, namespace=namespace).refresh()
    assert {info.role for info in snapshot.roles} == {"bad", "good"}


@pytest.mark.anyio
@pytest.mark.slow
async def test_forged_coordinator_registry_entries_are_skipped_and_coordinators_still_run(
    redis_url: str, redis: Redis, namespace: str
) -> None:
    """Fields of the coordinator registry may be written by anyone: a name that is not UTF-8
    and values that are not entries are skipped (the coordinator runs, is listed, tasks run);
    another type at the registry's name lists nothing and stops nothing."""
    keys = Keys(namespace)
    await redis.hset(keys.coordinators(), mapping={b"\xff\xfe": b"{", "forged": "[1]"})
    graph = Graph("one")
    graph.node("source", role="source")
    async with task_system(redis_url, namespace) as (client, coordinator, _):
        await wait_for_query(lambda: registry.live_coordinator(redis, keys))
        listed = await registry.coordinators(redis, keys)
        assert [info.consumer for info in listed] == [coordinator.consumer]
        task_id = await client.submit(graph, params={"n": 3, "size": 2})
        task = await client.wait(task_id, timeout=DEADLINE)
        assert task.state == "succeeded", task.error
    await redis.delete(keys.coordinators())
    await redis.set(keys.coordinators(), "not a hash")
    assert await registry.coordinators(redis, keys) == []
    async with task_system(redis_url, namespace) as (client, _, _):
        task_id = await client.submit(graph, params={"n": 3, "size": 2})
        task = await client.wait(task_id, timeout=DEADLINE)
        assert task.state == "succeeded", task.error


@pytest.mark.anyio
async def test_client_submit_reads_registry_keys_of_another_type_as_empty(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The known roles, known functions and coordinators (anyone with a worker's rights may
    write another type there) made submit raise WRONGTYPE: now each is read as empty, warned
    of once and counted once, and the task is submitted."""
    keys = Keys(namespace)
    for key in (keys.known_roles(), keys.known_functions(), keys.coordinators()):
        await redis.set(key, "not a set or hash")
    graph = Graph("one")
    graph.node("source", role="source")
    caplog.set_level("WARNING", logger="streamflow")
    async with Client(redis, namespace=namespace) as client:
        for _ in range(2):
            with pytest.warns(NoCoordinatorWarning):
                task_id = await client.submit(graph, roles=["source"])
            assert await client.task(task_id) is not None
        with pytest.raises(GraphError, match="source"):  # no role is known: read as empty
            await client.submit(graph, registration_wait=0.5)
        assert client.bad_records == {"known_roles": 1, "known_functions": 1, "coordinators": 1}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for key in (keys.known_roles(), keys.known_functions(), keys.coordinators()):
        assert len([m for m in warned if key in m]) == 1, warned


@pytest.mark.anyio
async def test_job_and_result_lookups_read_a_known_roles_key_of_another_type_as_no_role(
    redis: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A lookup without a role reads the known roles set: another type of key there made
    ``Client.job`` and ``Client.result`` fail with WRONGTYPE; now no role is read, with a
    warning, and the job is simply not found."""
    keys = Keys(namespace)
    await redis.hset(keys.known_roles(), "a", "b")
    caplog.set_level("WARNING", logger="streamflow")
    async with Client(redis, namespace=namespace) as client:
        status = await client.job("nosuchjob")
        assert status.state == "unknown"
        with pytest.raises(TimeoutError):
            await client.result("nosuchjob", timeout=0.2)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(keys.known_roles() in m and "another type" in m for m in warned), warned
