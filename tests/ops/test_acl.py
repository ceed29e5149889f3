"""Least privilege: every part works as a Redis user holding only the rules `streamflow acl` prints.

A private redis-server per test; the users are created by running the printed ``ACL SETUSER``
lines. Each scenario ends by checking that Redis refused nothing (``ACL LOG`` is empty), so a
refusal that some code path swallowed would still fail the test.
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import json
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote

import anyio
import pytest
import redis as redis_sync
from click.testing import CliRunner
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

import streamflow
from streamflow import (
    Client,
    Coordinator,
    Graph,
    SyncClient,
    connect,
    scheduler,
)
from streamflow.cli.security import acl_command
from streamflow.dag import submissions
from streamflow.delivery import Outcome
from streamflow.keys import (
    COORDINATOR_REGISTRY,
    COORDINATORS,
    GROUP,
    KINDS,
    LIFECYCLE,
    SCHEDULER_REGISTRY,
    Keys,
)
from streamflow.ops import acl, guard
from streamflow.ops.exporter import Exporter
from streamflow.ops.server import RedisServer
from streamflow.protocol import now_ms
from streamflow.scheduler import Scheduler
from streamflow.schedules import Schedule
from streamflow.scripts import Scripts
from tests.helpers import (
    CLI,
    CLI_TIMEOUT,
    ROOT,
    clean_env,
    kill_tree,
    make_worker,
    statuses,
    wait_for,
    wait_for_query,
    wait_until,
)

NS = "acl"
KEYS = Keys(NS)
PASSWORD_VAR = "SFTEST_ACL_PASSWORD"

app = streamflow.App()
#: Message ids of the ``slow`` jobs whose handler started.
started: set[str] = set()


@app.role("echo")
async def echo(ctx: streamflow.Context, payload: Any) -> None:
    pass


@app.role("flaky", retry=streamflow.RetryPolicy(max_attempts=2, backoff=0.05))
async def flaky(ctx: streamflow.Context, payload: Any) -> None:
    raise RuntimeError("fails every time")


@app.role("slow")
async def slow(ctx: streamflow.Context, payload: Any) -> None:
    """Report progress, then run until cancelled."""
    await ctx.progress(1, message="waiting")  # its latest progress: SET PX, DEL at the end
    started.add(ctx.message_id)
    await ctx.cancel.wait_cancelled()
    ctx.cancel.raise_if_cancelled()


@app.role("source")
async def source(ctx: streamflow.Context, params: dict[str, Any]) -> Any:
    for start in range(0, params["n"], params["size"]):
        yield list(range(start, min(start + params["size"], params["n"])))


@app.role("enrich")
async def enrich(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    assert ctx.batch is not None
    await ctx.emit([x + 1 for x in ctx.batch.items])


@app.role("analyze")
async def analyze(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    items = [x async for batch in ctx.inputs() for x in batch.items]
    await ctx.emit([{"count": len(items), "sum": sum(items)}])


@app.role("boom")
async def boom(ctx: streamflow.Context, params: dict[str, Any]) -> None:
    raise streamflow.Fatal("broken on purpose")


JOB_ROLES = ["echo", "flaky", "slow"]
TASK_ROLES = ["source", "enrich", "analyze", "boom"]


# -- the rules as data ----------------------------------------------------------------------


#: The parts that run each Lua script.
SCRIPT_USERS: dict[str, tuple[acl.Part, ...]] = {
    "alive.lua": ("worker",),
    "forget.lua": ("worker", "coordinator"),
    "claim.lua": ("worker", "coordinator"),
    "dead_letter.lua": ("worker",),
    "emit.lua": ("worker",),
    "events.lua": ("worker", "coordinator"),
    "finish.lua": ("worker",),
    "promote.lua": ("worker",),
    "release.lua": ("worker",),
    "renew.lua": ("worker",),
    "retry.lua": ("worker",),
    "settle.lua": ("worker",),
    "result.lua": ("worker",),
    "publish_dedup.lua": ("publisher", "coordinator"),
    "publish_committed.lua": ("coordinator",),
    "publish_many.lua": ("publisher",),
    "task_commit.lua": ("publisher", "coordinator"),
    "cancel.lua": ("operator", "coordinator", "dashboard"),
    "mark_cancel.lua": ("worker", "coordinator"),
    "replay.lua": ("operator", "dashboard"),
    "slot.lua": ("coordinator",),
    "limit.lua": ("worker",),
    "read_levels.lua": ("worker",),
    "key_limit.lua": ("worker",),
    "park.lua": ("worker",),
    "unpark.lua": ("worker",),
}


#: Commands of a script that a part never reaches: Redis checks a command only when it runs.
NEVER_REACHED: dict[tuple[acl.Part, str], set[str]] = {
    # Submit creates the task (version -1, no outputs, no retention).
    ("publisher", "task_commit.lua"): {"rpush", "pexpire"},
    # Dispatches are published now (due 0), never scheduled.
    ("coordinator", "publish_dedup.lua"): {"zadd"},
    ("coordinator", "publish_committed.lua"): {"zadd"},
}


def test_every_lua_script_is_covered_by_the_parts_that_run_it() -> None:
    lua = Path(streamflow.__file__).parent / "lua"
    # fence.lua is a prelude, not a script: its commands count for each script it is put into.
    assert {path.name for path in lua.glob("*.lua")} == set(SCRIPT_USERS) | {"fence.lua"}
    for name, parts in SCRIPT_USERS.items():
        called = {
            # XGROUP and XINFO are granted by subcommand: xgroup|delconsumer.
            (f"{command}|{sub}" if command in ("XGROUP", "XINFO") else command).lower()
            for command, sub in re.findall(
                r"redis\.p?call\('([A-Z]+)'(?:, '([A-Z]+)')?", Scripts.source(name)
            )
        }
        assert called, name
        for part in parts:
            missing = called - acl.granted(part) - NEVER_REACHED.get((part, name), set())
            assert not missing, f"{part} runs {name} but may not send {sorted(missing)}"


@pytest.mark.parametrize("part", acl.PARTS)
def test_rules_stay_inside_the_namespace_and_grant_no_categories(part: acl.Part) -> None:
    words = acl.rules("ns1", part)
    assert words[:5] == ["ACL", "SETUSER", f"sf-{part}", "reset", "on"]
    assert "resetchannels" in words and "-@all" in words
    assert words.index("-@all") < min(i for i, w in enumerate(words) if w.startswith("+"))
    patterns = [w for w in words if w.startswith("~")]
    patterns += [p for w in words if w.startswith("(") for p in w[1:-1].split() if p[0] == "~"]
    assert patterns and all(p.startswith("~ns1:{") for p in patterns)
    flat = " ".join(words)
    for broad in ("allkeys", "allcommands", "allchannels", "nopass", "+@", "~*", "&"):
        assert broad not in flat
    forbidden = {"eval", "keys", "flushdb", "flushall", "config|get", "config|set", "acl|getuser"}
    assert not forbidden & acl.granted(part)


def test_publisher_cannot_read_jobs_or_delete() -> None:
    granted = acl.granted("publisher")
    reads = {"xread", "xreadgroup", "xrange", "xrevrange", "xlen", "lrange", "hgetall", "scan"}
    deletes = {"del", "unlink", "xdel", "xtrim", "zrem", "srem", "hdel", "pexpire", "expire"}
    # Its one read: HGETALL of the coordinator registry (submit warns when none runs), in a
    # selector on that key only.
    (registry,) = [
        n for n in acl.PUBLISHER.narrow if "hgetall" in n.commands and len(n.commands) == 1
    ]
    assert registry.keys == (COORDINATOR_REGISTRY,) and set(registry.commands) == {"hgetall"}
    # And the scheduler's reads of the schedules, in a selector on the schedule keys only.
    (schedules,) = [n for n in acl.PUBLISHER.narrow if "zrange" in n.commands]
    assert {k.slot for k in schedules.keys} == {"schedules"}
    assert "hgetall" not in acl.PUBLISHER.commands
    # And submit --wait follows the lifecycle events, in a selector on that stream only.
    (events,) = [n for n in acl.PUBLISHER.narrow if "xread" in n.commands]
    assert events.keys == (LIFECYCLE,) and set(events.commands) == {"xread", "xrevrange"}
    assert not {"xread", "xrevrange"} & set(acl.PUBLISHER.commands)
    # And the scheduler's registry entry: its only HDEL, in a selector on that hash only.
    (beat,) = [n for n in acl.PUBLISHER.narrow if "hdel" in n.commands]
    assert beat.keys == (SCHEDULER_REGISTRY,) and set(beat.commands) == {"hset", "hgetall", "hdel"}
    assert "hdel" not in acl.PUBLISHER.commands
    assert not (granted - {"hgetall", "hdel", "xread", "xrevrange"}) & (reads | deletes)


ALL_PARTS = acl.PARTS

#: A key of each kind the package builds (a ``Keys`` method, sample arguments), with the parts
#: whose code touches it.
KEY_USERS: list[tuple[str, tuple[Any, ...], tuple[acl.Part, ...]]] = [
    ("role_config", ("r",), ALL_PARTS),
    ("role_stream", ("r#2.7",), ALL_PARTS),
    ("dead_letters", ("r",), ("worker", "coordinator", "operator", "dashboard")),
    ("delayed", ("r",), ALL_PARTS),
    ("role_stream", ("r#2.7", 2), ("publisher", "worker", "operator", "dashboard")),
    ("delayed", ("r", 4), ("publisher", "worker", "operator", "dashboard")),
    ("starts", ("r", "1-0"), ("worker",)),
    ("dedup", ("r", "any key"), ("publisher", "coordinator")),
    ("events", ("r",), ("worker", "coordinator", "operator")),
    ("batch", ("r", "t", "n", 0, 1), ("worker", "coordinator", "operator", "dashboard")),
    ("role_slots", ("r",), ("coordinator",)),
    ("result", ("r#2.7", "m-1:x"), ("worker", "publisher", "operator", "dashboard")),
    ("consumer_mark", (KEYS.role_stream("r"), "w"), ("worker",)),
    ("consumer_mark", (KEYS.events("r"), "c"), ("coordinator",)),
    ("consumer_mark", (KEYS.tasks_control(), "c"), ("coordinator",)),
    ("consumer_alive", ("w",), ("worker", "operator", "dashboard")),
    ("consumer_info", ("w",), ("worker", "operator", "dashboard")),
    ("signals", (), ("worker", "coordinator", "operator", "dashboard")),
    ("cancel_marker", ("task", "t"), ALL_PARTS),
    ("cancel_index", (), ("worker", "coordinator", "operator", "dashboard")),
    ("cancel_report", ("s",), ("worker", "operator")),
    ("task_state", ("t",), ("publisher", "coordinator", "operator", "dashboard")),
    ("task_outbox", ("t",), ("publisher", "coordinator")),
    ("task_output", ("t", "n"), ("worker", "coordinator", "operator", "dashboard")),
    ("task_partials", ("t", "n"), ("coordinator",)),
    ("task_result", ("t", "n"), ("worker", "coordinator", "operator", "dashboard")),
    ("tasks_index", (), ("publisher", "coordinator", "operator", "dashboard")),
    ("tasks_active", (), ("publisher", "coordinator", "operator")),
    ("tasks_control", (), ("publisher", "coordinator")),
    ("known_roles", (), ALL_PARTS),
    ("coordinators", (), ALL_PARTS[1:]),
    ("known_functions", (), ("publisher", "coordinator")),
    ("task_submissions", (), ("publisher", "coordinator")),
    ("submission", ("t",), ("publisher", "coordinator")),
    ("lifecycle", (), ALL_PARTS),
    ("job_progress", ("m-1:x",), ("worker", "operator", "dashboard")),
    # The scheduler runs as the publisher; the schedule commands as the operator.
    ("schedules", (), ("publisher", "operator", "dashboard")),
    ("schedules_paused", (), ("publisher", "operator", "dashboard")),
    ("schedule_ticks", (), ("publisher", "operator", "dashboard")),
    ("schedule_runs", (), ("publisher", "operator", "dashboard")),
    ("schedulers", (), ("publisher", "operator", "dashboard")),
    ("flow_control", ("r",), ("worker", "operator", "dashboard")),
    ("flow_rate", ("r",), ("worker",)),
    ("flow_running", ("r",), ("worker", "operator", "dashboard")),
    ("flow_key_slots", ("r", "cust-1"), ("worker",)),
    ("flow_key_rate", ("r", "cust-1"), ("worker",)),
    ("flow_keys", ("r",), ("worker", "operator", "dashboard")),
    ("flow_waiting", ("r",), ("worker",)),
    ("parked", ("r",), ("worker", "operator", "dashboard")),
    ("park", ("r", "cust-1"), ("worker",)),
]

#: ``Keys`` methods that build no key of their own: SCAN patterns, parsers of keys, and ``task``,
#: the generic builder the ``task_*`` methods stand for.
NOT_KEYS = {
    "consumer_info_pattern",
    "consumer_alive_pattern",
    "role_pattern",
    "delayed_pattern",
    "level_patterns",
    "level_of_stream",
    "level_streams",
    "task_pattern",
    "role_of_stream",
    "consumer_of_alive_key",
    "parse_batch",
    "is_batch_of",
    "task",
}


def built_keys() -> list[tuple[str, tuple[acl.Part, ...]]]:
    """Each key of :data:`KEY_USERS`, built, with its parts."""
    return [(getattr(KEYS, name)(*args), parts) for name, args, parts in KEY_USERS]


def acl_patterns(part: acl.Part) -> list[str]:
    """Every key pattern of ``part``'s printed rules: its own and its selectors'."""
    words = acl.rules(NS, part)
    inner = [word for w in words if w.startswith("(") for word in w[1:-1].split()]
    return [w[1:] for w in words + inner if w.startswith("~")]


def test_every_key_builder_is_listed_with_the_parts_that_touch_its_keys() -> None:
    methods = {
        name for name, _ in inspect.getmembers(Keys, inspect.isfunction) if not name.startswith("_")
    }
    assert methods == {name for name, _, _ in KEY_USERS} | NOT_KEYS


def test_every_key_is_allowed_to_every_part_that_touches_it() -> None:
    for key, parts in built_keys():
        for part in parts:
            assert any(fnmatch.fnmatchcase(key, p) for p in acl_patterns(part)), (part, key)


@pytest.mark.parametrize("part", acl.PARTS)
def test_every_rule_pattern_is_a_key_kind_its_part_touches(part: acl.Part) -> None:
    table = acl.TABLES[part]
    kinds = [*table.keys, *(kind for narrow in table.narrow for kind in narrow.keys)]
    assert set(kinds) <= set(KINDS)
    touched = [key for key, parts in built_keys() if part in parts]
    for pattern in acl_patterns(part):
        assert any(fnmatch.fnmatchcase(key, pattern) for key in touched), (part, pattern)


def test_each_key_is_of_exactly_one_kind_and_each_kind_is_built() -> None:
    patterns = {kind: f"{NS}:{kind.pattern}" for kind in KINDS}
    built = {key for key, _ in built_keys()}
    for key in built:
        assert len([p for p in patterns.values() if fnmatch.fnmatchcase(key, p)]) == 1, key
    for kind, pattern in patterns.items():
        assert any(fnmatch.fnmatchcase(key, pattern) for key in built), kind


def documented_patterns(part: acl.Part) -> set[str]:
    """The key patterns of ``part``'s table in docs/operations.md.

    A bare word after a pattern shares its tag: ``{task:*}:state``, ``outbox`` names
    ``{task:*}:outbox``.
    """
    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split(f"\n**{part}**:", 1)[1].split("\n\n", 2)[1]
    found: set[str] = set()
    for row in table.splitlines()[2:]:
        tag = ""
        for word in re.findall(r"`([^`]+)`", row.split(" | ", 1)[0]):
            tag = word[: word.find("}") + 1] if word.startswith("{") else tag
            found.add(word if word.startswith("{") else f"{tag}:{word}")
    return found


@pytest.mark.parametrize("part", acl.PARTS)
def test_the_operations_guide_names_exactly_the_key_families_of_each_part(part: acl.Part) -> None:
    assert documented_patterns(part) == {p.removeprefix(f"{NS}:") for p in acl_patterns(part)}


def test_a_line_splits_back_into_its_words() -> None:
    words = acl.rules("ns1", "worker", password=">pa ss\"wo\\rd'")
    assert shlex.split(acl.line(words)) == words
    assert acl.line(["a", "(~x +y)"]) == 'a "(~x +y)"'
    with pytest.raises(ValueError, match="64 hex digits"):
        acl.rules("ns1", "worker", password="#abc")


def run_acl(*args: str, env: dict[str, str | None] | None = None, var: str | None = None) -> Any:
    """``streamflow acl ARGS`` in this process (with ``--password-env var``); the result."""
    words = [*args, "--password-env", var] if var else list(args)
    return CliRunner().invoke(acl_command, words, env=env, catch_exceptions=False)


def test_acl_prints_the_sha256_of_the_password_never_the_password() -> None:
    secret = "Canary pass/word#?"
    done = run_acl("--namespace", NS, "--for", "worker", "--password-env", "PW", env={"PW": secret})
    assert done.exit_code == 0, done.output
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert done.stdout.startswith(f"ACL SETUSER sf-worker reset on #{digest} ")
    assert len(done.stdout.splitlines()) == 1
    assert "Canary" not in done.stdout + done.stderr
    assert "SHA-256 of $PW" in done.stderr


def test_acl_prints_a_placeholder_when_the_variable_is_unset() -> None:
    done = run_acl("--for", "publisher", "--user", "pub-1", env={"SF_PUBLISHER_PASSWORD": None})
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("ACL SETUSER pub-1 reset on >${SF_PUBLISHER_PASSWORD} ")
    assert "~sf:{role:*}:stream" in done.stdout
    assert "envsubst" in done.stderr


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (["--namespace", "a:b"], {}, "invalid namespace"),
        (["--user", "two words"], {}, "invalid user name"),
        (["--password-env", "STREAMFLOW_PW"], {}, "outside STREAMFLOW_*"),
        (["--password-env", "1PW"], {}, "not an environment variable name"),
        (["--password-env", "PW"], {"PW": ""}, "set but empty"),
    ],
)
def test_acl_refuses_bad_input(args: list[str], env: dict[str, str], error: str) -> None:
    done = run_acl("--for", "operator", *args, env=env)
    assert done.exit_code == 2
    assert error in done.stderr
    assert done.stdout == ""


# -- users on a real Redis ------------------------------------------------------------------


@dataclass
class Users:
    """A private server with one user per part; ``urls`` log in as them."""

    server: RedisServer
    admin: Redis
    urls: dict[acl.Part, str]

    def env(self, part: acl.Part) -> dict[str, str]:
        """A subprocess environment that connects as ``part``."""
        return clean_env(STREAMFLOW_REDIS_URL=self.urls[part], STREAMFLOW_NAMESPACE=NS)

    async def refusals(self) -> list[dict[bytes, Any]]:
        """What Redis refused so far (ACL LOG), as the admin sees it."""
        entries: list[dict[bytes, Any]] = await self.admin.execute_command("ACL", "LOG", 1000)
        return entries


@pytest.fixture
async def users(private_redis: Callable[..., RedisServer]) -> AsyncIterator[Users]:
    """A private server where every part has its user, made from `streamflow acl` output."""
    server = private_redis()
    admin = connect.connect(server.url, socket_timeout=5.0, name="test-admin")
    urls: dict[acl.Part, str] = {}
    for part in acl.PARTS:
        password = f"{part} pass/word:{id(server)}"  # URL-unsafe and spaced on purpose
        done = run_acl(
            "--namespace", NS, "--for", part, env={PASSWORD_VAR: password}, var=PASSWORD_VAR
        )
        assert done.exit_code == 0, done.output
        assert await admin.execute_command(*shlex.split(done.stdout)) in (b"OK", "OK", True)
        urls[part] = f"redis://sf-{part}:{quote(password, safe='')}@127.0.0.1:{server.port}/0"
    try:
        yield Users(server, admin, urls)
    finally:
        await admin.aclose()


async def cli(users: Users, part: acl.Part, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``streamflow ARGS`` connected as ``part``; returns it with text output."""
    with anyio.fail_after(CLI_TIMEOUT):
        done = await anyio.run_process([*CLI, *args], cwd=ROOT, env=users.env(part), check=False)
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def ok(users: Users, part: acl.Part, *args: str) -> str:
    """Run ``streamflow ARGS`` as ``part``, require exit 0, return its stdout."""
    done = await cli(users, part, *args)
    assert done.returncode == 0, f"streamflow {' '.join(args)}: {done.stderr}"
    return done.stdout


def acl_worker(
    redis: Redis, name: str, roles: list[str], outcomes: list[Outcome]
) -> streamflow.Worker:
    """A worker of this file's app in namespace ``NS``, as consumer ``name``."""
    return make_worker(app, redis, NS, outcomes, roles=roles, consumer=name, shutdown_grace=0.2)


@pytest.mark.redis
@pytest.mark.slow
def test_printed_lines_pipe_into_redis_cli(private_redis: Callable[..., RedisServer]) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not on PATH")
    server = private_redis()
    env = clean_env(SF_OPERATOR_PASSWORD="op secret")
    env.pop("SF_WORKER_PASSWORD", None)
    hashed = subprocess.run(
        [*CLI, "acl", "--namespace", NS, "--for", "operator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=True,
    )
    placeholder = subprocess.run(
        [*CLI, "acl", "--namespace", NS, "--for", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=True,
    )
    assert "op secret" not in hashed.stdout + hashed.stderr
    assert ">${SF_WORKER_PASSWORD}" in placeholder.stdout
    # What `| envsubst | redis-cli` does.
    filled = Template(placeholder.stdout).substitute(SF_WORKER_PASSWORD="w-secret")
    loaded = subprocess.run(
        ["redis-cli", "-p", str(server.port)],
        input=hashed.stdout + filled,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert loaded.stdout.split() == ["OK", "OK"], loaded.stdout + loaded.stderr
    admin = redis_sync.Redis(port=server.port)
    for user, password, selectors in (
        ("sf-operator", "op secret", 4),
        ("sf-worker", "w-secret", 4),
    ):
        client = redis_sync.Redis(port=server.port, username=user, password=password)
        try:
            assert client.ping()
            assert len(admin.acl_getuser(user)["selectors"]) == selectors
        finally:
            client.close()
    admin.close()


@pytest.mark.redis
@pytest.mark.anyio
async def test_publisher_publishes_and_submits(users: Users) -> None:
    async with Client.from_url(users.urls["publisher"], namespace=NS) as publisher:
        with anyio.fail_after(20):
            first = await publisher.publish("echo", {"n": 1})
            many = await publisher.publish_many("echo", [{"n": i} for i in range(5)])
            dedup = await publisher.publish("echo", {"n": 2}, dedup_key="k1")
            again = await publisher.publish("echo", {"n": 3}, dedup_key="k1")
            later = await publisher.publish("echo", {"n": 4}, delay=60)
            later_dedup = await publisher.publish("echo", {"n": 5}, delay=60, dedup_key="k2")
            # Submitting checks the graph against the registered roles (a worker's SADD).
            await users.admin.sadd(KEYS.known_roles(), "echo")
            task_id = await publisher.submit(Graph("one").node("e", role="echo"))
            task = await publisher.task(task_id)  # what submit --wait polls
    assert again == dedup and later and later_dedup and first and len(many) == 5
    assert task is not None and task.state == "queued"

    def sync_publish() -> list[str]:
        with SyncClient(users.urls["publisher"], namespace=NS) as client:
            return [
                client.publish("echo", {"n": 6}),
                client.publish("echo", {"n": 7}, dedup_key="k3"),
                client.publish("echo", {"n": 8}, delay=60),
                *client.publish_many("echo", [{"n": 9}, {"n": 10}]),
            ]

    assert len(await anyio.to_thread.run_sync(sync_publish)) == 5
    admin = users.admin
    assert await admin.xlen(KEYS.role_stream("echo")) == 1 + 5 + 1 + 1 + 1 + 2
    assert await admin.zcard(KEYS.delayed("echo")) == 3
    assert await admin.xlen(KEYS.tasks_control()) == 1
    assert await users.refusals() == []


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.slow
async def test_the_scheduler_runs_as_the_publisher_and_schedules_are_managed_as_the_operator(
    users: Users,
) -> None:
    await users.admin.sadd(KEYS.known_roles(), "echo")
    declared = Schedule(id="tick", role="echo", every=1)
    async with (
        Client.from_url(users.urls["publisher"], namespace=NS) as publisher,
        Client.from_url(users.urls["operator"], namespace=NS) as operator,
    ):
        with anyio.fail_after(20):
            running = Scheduler(publisher, [declared])
            async with anyio.create_task_group() as tg:
                await tg.start(running.run)  # HSET of the declared schedule
                running.stop()
            await running.step()  # a new schedule: ZADD NX of its first tick
            await users.admin.zadd(KEYS.schedule_ticks(), {"tick": now_ms() - 2000})
            await running.step()  # publishes with a dedup key, ZADD GT
            other = Schedule(id="other", role="echo", cron="0 3 * * *")
            await scheduler.add(operator.redis, operator.keys, other)
            await scheduler.pause(operator.redis, operator.keys, "other")
            await scheduler.pause(operator.redis, operator.keys, "other", paused=False)
            stored = await scheduler.load(operator.redis, operator.keys)
            await scheduler.run_now(operator, other)
            assert await scheduler.remove(operator.redis, operator.keys, "other")
    assert set(stored.schedules) == {"tick", "other"} and "tick" in stored.runs
    assert await users.admin.xlen(KEYS.role_stream("echo")) == 2
    assert await users.refusals() == []


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.slow
async def test_worker_settles_retries_dead_letters_and_obeys_the_operator(users: Users) -> None:
    admin, stream = users.admin, KEYS.role_stream("echo")
    started.clear()
    publisher = Client.from_url(users.urls["publisher"], namespace=NS)
    operator = Client.from_url(users.urls["operator"], namespace=NS)
    worker_redis = connect.connect(users.urls["worker"], socket_timeout=5.0, name="w")
    outcomes: list[Outcome] = []
    try:
        # A job held by a consumer that died: the worker adopts it after the lease TTL and runs
        # it as a suspect (start counts in a MULTI).
        await admin.xgroup_create(stream, GROUP, id="0", mkstream=True)
        ghost = await publisher.publish("echo", {"n": -1})
        [[_, [(ghost_entry, _)]]] = await admin.xreadgroup(GROUP, "ghost", {stream: ">"}, count=1)
        echoes = await publisher.publish_many("echo", [{"n": i} for i in range(3)])
        failing = await publisher.publish("flaky", {})
        w1 = acl_worker(worker_redis, "w1", JOB_ROLES, outcomes)
        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                await tg.start(w1.run)
                await publisher.publish("slow", None, message_id="slow-1")
                await wait_until(lambda: all(statuses(outcomes, m) for m in [ghost, *echoes]))
                await wait_until(lambda: "dead_lettered" in statuses(outcomes, failing))
                await wait_until(lambda: "slow-1" in started and w1.statistics().renewals > 0)
                await wait_for_query(lambda: admin.exists(KEYS.job_progress("slow-1")))
                status = json.loads(await ok(users, "operator", "job", "slow-1", "--json"))
                assert (status["state"], status["progress"]) == ("running", 1)

                done = await ok(users, "operator", "cancel", "slow-1", "--message", "--wait")
                assert "stopped slow-1 on w1" in done
                await wait_until(lambda: statuses(outcomes, "slow-1") == ["cancelled"])
                await operator_views(users, failing)
                # A pause: the operator writes it, the worker reads it (every half second).
                assert "paused" in await ok(users, "operator", "pause", "echo")
                await wait_until(lambda: w1.statistics().paused["echo"])
                assert "resumed" in await ok(users, "operator", "resume", "echo")
                await wait_until(lambda: not w1.statistics().paused["echo"])

                # The dead consumer's name is deleted once its entry was adopted.
                async def ghost_gone() -> bool:
                    found = await admin.xinfo_consumers(stream, GROUP)
                    return b"ghost" not in {c["name"] for c in found}

                await wait_for_query(ghost_gone, 10)

                # Replayed once, dead-lettered again; then purged.
                assert "1 replayed" in await ok(
                    users, "operator", "dlq", "replay", "flaky", "--all"
                )
                await wait_until(lambda: statuses(outcomes, failing).count("dead_lettered") == 2)
                assert "purged 1" in await ok(users, "operator", "dlq", "purge", "flaky", "--yes")

                # Released on shutdown, cancelled while no worker ran, refused by the next one.
                await publisher.publish("slow", None, message_id="slow-2")
                await wait_until(lambda: "slow-2" in started)
                w1.stop()
            assert statuses(outcomes, "slow-2") == ["released"]
            await operator.cancel("slow-2", target="message")
            w2 = acl_worker(worker_redis, "w2", JOB_ROLES, outcomes)
            async with anyio.create_task_group() as tg:
                await tg.start(w2.run)
                await wait_until(lambda: statuses(outcomes, "slow-2") == ["released", "cancelled"])
                w2.stop()
        assert statuses(outcomes, ghost) == ["acked"]
        assert await admin.exists(KEYS.starts("echo", ghost_entry.decode()))  # ran as a suspect
        assert statuses(outcomes, failing) == ["retried", "dead_lettered"] * 2
        assert "lost" not in [o.status for o in outcomes]
        assert await admin.xlen(stream) == 0
        assert await users.refusals() == []
    finally:
        for client in (publisher, operator):
            await client.aclose()
        await worker_redis.aclose()


async def operator_views(users: Users, dead_message: str) -> None:
    """The operator's read commands while worker w1 runs."""
    listed = await ok(users, "operator", "workers", "--json")
    [registered] = [json.loads(line) for line in listed.splitlines()]
    assert registered["consumer"] == "w1"
    view = json.loads(await ok(users, "operator", "inspect", "--json"))
    assert {r["role"] for r in view["roles"]} == set(JOB_ROLES)
    assert "alive" in await ok(users, "operator", "inspect", "echo")
    dead = await ok(users, "operator", "dlq", "list", "flaky", "--json")
    [letter] = [json.loads(line) for line in dead.splitlines()]
    assert letter["message_id"] == dead_message
    shown = json.loads(await ok(users, "operator", "dlq", "show", "flaky", letter["id"]))
    assert shown["reason"] == "failed"


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.slow
async def test_tasks_run_with_coordinator_worker_and_publisher_users(users: Users) -> None:
    admin = users.admin
    publisher = Client.from_url(users.urls["publisher"], namespace=NS)
    worker_redis = connect.connect(users.urls["worker"], socket_timeout=5.0, name="w")
    coord_redis = connect.connect(users.urls["coordinator"], socket_timeout=5.0, name="c")
    operator_redis = connect.connect(users.urls["operator"], socket_timeout=5.0, name="o")
    worker = acl_worker(worker_redis, "tw", TASK_ROLES, [])
    coordinator = Coordinator(
        coord_redis,
        namespace=NS,
        role_limits={"enrich": 1},
        lease_ttl=0.6,
        block_ms=100,
        sweep_interval=0.1,
    )
    graph = Graph("acl", params={"n": 6, "size": 3})
    graph.node("source", role="source").node("enrich", role="enrich")
    graph.node("merge", function="merge.generic").node("analyze", role="analyze")
    graph.edge("source", "enrich", on="batch").edge("enrich", "merge").edge("merge", "analyze")
    # A coordinator that died holding nothing: the live one deletes its name.
    control = KEYS.tasks_control()
    await admin.xgroup_create(control, COORDINATORS, id="0", mkstream=True)
    await admin.xgroup_createconsumer(control, COORDINATORS, "coord-ghost")
    try:
        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                await tg.start(coordinator.run)
                task_id = await publisher.submit(graph)
                failing = await publisher.submit(Graph("boom").node("boom", role="boom"))
                task = await publisher.wait(task_id, timeout=30)
                failed = await publisher.wait(failing, timeout=30)
                # A submission from another language, as the publisher user, and its outcome.
                for wire_id, document in (
                    ("wire-1", submissions.encode_submission(graph)),
                    ("wire-bad", b"{nope"),
                ):
                    await publisher.redis.xadd(
                        KEYS.task_submissions(), {"id": wire_id, "submission": document}
                    )
                await wait_for_query(lambda: _answered(publisher, "wire-bad"))
                rejected = await publisher.submission("wire-bad")
                wired = await publisher.wait("wire-1", timeout=30)
                # A malformed event goes to the role's dead letters, written by the coordinator.
                await admin.xadd(KEYS.events("source"), {b"event": b"not json"})
                dead = KEYS.dead_letters("source")
                await wait_for_query(lambda: _has_entries(admin, dead))
                snapshot = await Exporter(operator_redis, namespace=NS).refresh()

                async def ghost_gone() -> bool:
                    found = await admin.xinfo_consumers(control, COORDINATORS)
                    return b"coord-ghost" not in {c["name"] for c in found}

                await wait_for_query(ghost_gone, 10)
                worker.stop()
                coordinator.stop()
        assert task.state == "succeeded", task.error
        assert failed.state == "failed"
        assert wired.state == "succeeded", wired.error
        assert rejected is not None and rejected.state == "rejected"
        assert snapshot.workers == 1
        result = json.loads(await ok(users, "operator", "result", task_id))
        assert result == {"analyze": [{"count": 6, "sum": 21}]}
        status = json.loads(await ok(users, "operator", "status", task_id, "--json"))
        assert status["state"] == "succeeded"
        listed = await ok(users, "operator", "tasks", "--json")
        ids = {json.loads(line)["id"] for line in listed.splitlines()}
        assert ids == {task_id, failing, "wire-1"}
        assert await users.refusals() == []
    finally:
        await publisher.aclose()
        for client in (worker_redis, coord_redis, operator_redis):
            await client.aclose()


async def _has_entries(redis: Redis, stream: str) -> bool:
    return int(await redis.xlen(stream)) > 0


async def _answered(client: Client, submission_id: str) -> bool:
    return await client.submission(submission_id) is not None


#: Commands each part must be refused, as (part, command words).
REFUSED: list[tuple[acl.Part, tuple[str, ...]]] = [
    ("publisher", ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", KEYS.role_stream("echo"), ">")),
    ("publisher", ("XRANGE", KEYS.role_stream("echo"), "-", "+")),
    ("publisher", ("XDEL", KEYS.role_stream("echo"), "1-0")),
    ("publisher", ("DEL", KEYS.role_stream("echo"))),
    ("publisher", ("SET", KEYS.role_stream("echo"), "x")),
    ("publisher", ("GET", KEYS.cancel_marker("task", "t1"))),
    ("publisher", ("EVAL", "return 1", "0")),
    ("publisher", ("SET", KEYS.submission("t1"), "{}")),  # an outcome cannot be forged
    ("worker", ("FLUSHDB",)),
    ("worker", ("XGROUP", "DESTROY", KEYS.role_stream("echo"), GROUP)),
    ("worker", ("KEYS", "*")),
    ("worker", ("CONFIG", "GET", "maxmemory-policy")),
    ("worker", ("DEL", KEYS.role_stream("echo"))),
    ("worker", ("PEXPIRE", KEYS.role_stream("echo"), "1")),
    ("worker", ("XDEL", KEYS.dead_letters("echo"), "1-0")),
    ("worker", ("XREADGROUP", "GROUP", "coordinators", "c", "STREAMS", KEYS.events("e"), ">")),
    ("worker", ("HGET", KEYS.task_state("t1"), "task")),
    ("coordinator", ("FLUSHDB",)),
    ("coordinator", ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", KEYS.role_stream("e"), ">")),
    ("coordinator", ("XACK", KEYS.role_stream("echo"), GROUP, "1-0")),
    ("coordinator", ("DEL", KEYS.task_state("t1"))),
    ("operator", ("FLUSHDB",)),
    ("operator", ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", KEYS.role_stream("e"), ">")),
    ("operator", ("XDEL", KEYS.role_stream("echo"), "1-0")),
    ("operator", ("DEL", KEYS.role_stream("echo"))),
    ("operator", ("SET", KEYS.role_stream("echo"), "x")),
    ("operator", ("CONFIG", "GET", "maxmemory-policy")),
] + [(part, ("XADD", "other:{role:x}:stream", "*", "message", "{}")) for part in acl.PARTS]


@pytest.mark.redis
@pytest.mark.anyio
async def test_each_user_is_refused_outside_its_part(users: Users) -> None:
    clients = {part: connect.connect(url, socket_timeout=5.0) for part, url in users.urls.items()}
    try:
        with anyio.fail_after(20):
            for part, words in REFUSED:
                with pytest.raises(NoPermissionError):
                    await clients[part].execute_command(*words)
                    pytest.fail(f"{part} may send {' '.join(words)}")
            # A script runs with its caller's rights: loading one's own gains nothing.
            publisher = clients["publisher"]
            sha = await publisher.script_load("return redis.call('XRANGE', KEYS[1], '-', '+')")
            with pytest.raises(ResponseError, match="can't run this command"):
                await publisher.evalsha(sha, 1, KEYS.role_stream("echo"))
            # The narrow grants: a worker may delete its liveness key, not a stream.
            worker = clients["worker"]
            assert await worker.execute_command("DEL", KEYS.consumer_alive("w9")) == 0
            assert await worker.execute_command("XADD", KEYS.dead_letters("e"), "*", "a", "1")
        logged = {entry[b"username"].decode() for entry in await users.refusals()}
        assert logged == {acl.default_user(part) for part in acl.PARTS}
    finally:
        for client in clients.values():
            await client.aclose()


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.parametrize("part", ["worker", "coordinator"])
async def test_start_up_checks_work_without_config_get(users: Users, part: acl.Part) -> None:
    redis = connect.connect(users.urls[part], socket_timeout=5.0)
    try:
        with anyio.fail_after(10):
            facts = await guard.gather(redis)
    finally:
        await redis.aclose()
    assert facts.user == acl.default_user(part)
    assert facts.version is not None and facts.aof is not None
    assert facts.eviction_policy is not None
    [skipped] = facts.skipped
    assert skipped.startswith("CONFIG GET refused")
    assert [e[b"object"] for e in await users.refusals()] == [b"config|get"]


@pytest.mark.redis
@pytest.mark.slow
def test_worker_command_runs_as_the_worker_user(private_redis: Callable[..., RedisServer]) -> None:
    server = private_redis()
    admin = redis_sync.Redis(port=server.port)
    urls = {}
    for part in ("worker", "publisher"):
        done = run_acl("--namespace", NS, "--for", part, env={"SF_PW": "pw"}, var="SF_PW")
        admin.execute_command(*shlex.split(done.stdout))
        urls[part] = f"redis://sf-{part}:pw@127.0.0.1:{server.port}/0"
    env = clean_env(STREAMFLOW_REDIS_URL=urls["worker"], STREAMFLOW_NAMESPACE=NS)
    args = ["worker", "--app", "tests.ops.test_acl:app", "--role", "echo", "--block-ms", "100"]
    proc = subprocess.Popen([*CLI, *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        with SyncClient(urls["publisher"], namespace=NS) as publisher:
            wait_for(lambda: admin.sismember(KEYS.known_roles(), "echo"), 20, "worker started")
            publisher.publish_many("echo", [{"n": i} for i in range(3)])
        wait_for(lambda: admin.xlen(KEYS.role_stream("echo")) == 0, 20, "jobs settled")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, stderr
    assert "CONFIG GET refused" in stderr  # the start-up checks skip what they may not ask
    assert [e[b"object"] for e in admin.execute_command("ACL", "LOG", 1000)] == [b"config|get"]
    admin.close()
