"""Start-up checks of the Redis server: warnings once each, refusal with --strict, ACL limits.

Two private servers: a risky one (no AOF, no RDB, ``allkeys-lru``, the password-less default
user) and a safe one (AOF, ``noeviction``, an ACL user with a password). The password is a
canary that must never show in any output.
"""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
import redis
from redis.asyncio import Redis

from streamflow import connect
from streamflow.errors import ConfigError
from streamflow.ops import guard
from streamflow.ops.guard import ServerFacts
from streamflow.ops.server import RedisServer
from tests.helpers import CLI, ROOT, clean_env, kill_tree, wait_for

pytestmark = pytest.mark.redis

CANARY = "Canary-S3cret-XYZ"
RISKS = ("persistence", "eviction", "default-user")
#: One distinctive phrase of each warning's message.
PHRASES = {
    "persistence": "persistence is off",
    "eviction": "maxmemory-policy is allkeys-lru",
    "default-user": "connected as the default user",
}


def _server(**kwargs: object) -> RedisServer:
    if not RedisServer.available():
        pytest.skip("redis-server is not on PATH")
    return RedisServer(**kwargs)


@pytest.fixture(scope="module")
def risky() -> Iterator[RedisServer]:
    """No AOF, no RDB snapshots, allkeys-lru, and the default user without a password."""
    with _server(appendonly=False, extra_args=["--maxmemory-policy", "allkeys-lru"]) as server:
        with redis.Redis.from_url(server.url) as admin:
            # Users limited by ACL: no CONFIG; and nothing but the commands a worker needs.
            admin.execute_command("ACL", "SETUSER", "noconfig", "on", f">{CANARY}", "~*", "&*")
            admin.execute_command("ACL", "SETUSER", "noconfig", "+@all", "-config")
            admin.execute_command("ACL", "SETUSER", "bare", "on", f">{CANARY}", "~*", "&*")
            admin.execute_command("ACL", "SETUSER", "bare", "+@all", "-config", "-info", "-acl")
        yield server


@pytest.fixture(scope="module")
def safe() -> Iterator[RedisServer]:
    """AOF on, noeviction, and an ACL user ``sf`` with the canary password."""
    with _server(appendonly=True, extra_args=["--maxmemory-policy", "noeviction"]) as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.execute_command("ACL", "SETUSER", "sf", "on", f">{CANARY}", "~*", "&*", "+@all")
        yield server


def url_of(server: RedisServer, user: str | None = None) -> str:
    """The server's URL, as ``user`` with the canary password when a user is given."""
    auth = f"{user}:{CANARY}@" if user else ""
    return f"redis://{auth}127.0.0.1:{server.port}/0"


@asynccontextmanager
async def client_of(url: str) -> AsyncIterator[Redis]:
    client = connect.connect(url)
    try:
        yield client
    finally:
        await client.aclose()


def guard_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "streamflow.ops.guard"]


# -- check_server against real servers --------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("user", [None, "default"], ids=["no-auth", "any-password"])
async def test_risky_server_gives_each_warning_once_in_one_line(
    risky: RedisServer, user: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamflow")
    url = url_of(risky, user)  # the nopass default user takes any password
    async with client_of(url) as client:
        with anyio.fail_after(10):
            warnings = await guard.check_server(client, url)
    assert [w.code for w in warnings] == list(RISKS)
    assert not any(w.refuse for w in warnings)
    assert "no RDB snapshots" in warnings[0].message
    records = guard_records(caplog)
    assert all(r.levelno == logging.WARNING for r in records)
    for code in RISKS:
        assert sum(PHRASES[code] in r.getMessage() for r in records) == 1, code
    assert len(records) == len(RISKS)
    assert all("\n" not in r.getMessage() for r in records)
    assert CANARY not in caplog.text


@pytest.mark.anyio
async def test_safe_server_gives_no_warning(
    safe: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="streamflow")
    url = url_of(safe, "sf")
    async with client_of(url) as client:
        with anyio.fail_after(10):
            assert await guard.check_server(client, url) == []
    assert guard_records(caplog) == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("user", "codes", "refused"),
    [
        # INFO still shows the policy and AOF; CONFIG alone gave the RDB schedule.
        ("noconfig", ["persistence", "eviction"], ["CONFIG GET refused"]),
        ("bare", [], ["INFO refused", "CONFIG GET refused"]),
    ],
)
async def test_commands_refused_by_acl_are_said_once_and_skip_only_their_checks(
    risky: RedisServer,
    user: str,
    codes: list[str],
    refused: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="streamflow")
    url = url_of(risky, user)
    async with client_of(url) as client:
        with anyio.fail_after(10):
            warnings = await guard.check_server(client, url)
    assert [w.code for w in warnings] == codes
    if "persistence" in codes:
        assert "RDB snapshots only" in warnings[0].message  # the schedule is unknown
    notes = [r for r in guard_records(caplog) if r.levelno == logging.INFO]
    assert len(notes) == 1, caplog.text
    for text in refused:
        assert text in notes[0].getMessage()
    assert CANARY not in caplog.text


# -- verdicts, without a server ---------------------------------------------------------------


SAFE = ServerFacts(
    version="7.0.15",
    aof=True,
    rdb_save="3600 1",
    eviction_policy="noeviction",
    user="sf",
    authenticated=True,
    transport="tcp",
    host="127.0.0.1",
)


@pytest.mark.parametrize(
    ("changes", "codes"),
    [
        ({}, []),
        ({"host": "redis.internal"}, ["plaintext"]),
        ({"host": "10.0.0.5"}, ["plaintext"]),
        ({"host": "redis.internal", "transport": "tls"}, []),
        ({"host": "localhost"}, []),
        ({"host": "::1"}, []),
        ({"host": None, "transport": "unix"}, []),
        ({"version": "6.2.14"}, ["version"]),
        ({"version": None, "aof": None, "eviction_policy": None}, []),
        ({"eviction_policy": "volatile-lru"}, ["eviction"]),
        ({"aof": False}, ["persistence"]),
        ({"user": "default", "authenticated": True, "default_nopass": False}, []),
        ({"user": "default", "authenticated": True, "default_nopass": None}, []),
        ({"user": "default", "authenticated": True, "default_nopass": True}, ["default-user"]),
        ({"user": "default", "authenticated": False}, ["default-user"]),
    ],
)
def test_assess_warns_exactly_for_the_risky_facts(
    changes: dict[str, object], codes: list[str]
) -> None:
    facts = ServerFacts(**{**_fields(SAFE), **changes})
    assert [w.code for w in guard.assess(facts)] == codes


def _fields(facts: ServerFacts) -> dict[str, object]:
    return {name: getattr(facts, name) for name in ServerFacts.__slots__}


def test_an_old_redis_is_refused_even_without_strict() -> None:
    warnings = guard.assess(ServerFacts(**{**_fields(SAFE), "version": "6.2.14", "aof": False}))
    assert [(w.code, w.refuse) for w in warnings] == [("version", True), ("persistence", False)]
    with pytest.raises(ConfigError) as caught:
        guard.enforce(warnings, strict=False, url=f"redis://u:{CANARY}@h/0")
    message = str(caught.value)
    assert "Redis 6.2.14 is older than 7.0" in message and "persistence" not in message
    assert CANARY not in message and "u:***@h" in message
    guard.enforce(warnings[1:], strict=False)  # a plain warning does not stop a start


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture
def cli_process(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"cli-{len(started)}.log"
        with open(log, "wb") as err:
            process = subprocess.Popen(
                [*CLI, *args],
                cwd=ROOT,
                env=clean_env(SFTEST_RECORD=str(tmp_path / "record.txt"), **env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        started.append(process)
        return process, log

    yield start
    for process in started:
        kill_tree(process)


def wait_serving(process: subprocess.Popen[bytes], log: Path, count: int = 1) -> str:
    def serving() -> bool:
        assert process.poll() is None, log.read_text()
        return log.read_text().count(" serving ") >= count

    wait_for(serving, 15, "the worker serves")
    return log.read_text()


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


def worker_args(namespace: str) -> list[str]:
    return ["worker", "--app", "tests.apps:app", "--role", "record", "--namespace", namespace]


@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.slow
def test_worker_on_a_risky_server_logs_each_warning_once_and_serves(
    risky: RedisServer,
    namespace: str,
    processes: str,
    cli_process: Callable[..., tuple[subprocess.Popen[bytes], Path]],
) -> None:
    url = url_of(risky, "default")
    process, log = cli_process(
        *worker_args(namespace), "--processes", processes, STREAMFLOW_REDIS_URL=url
    )
    wait_serving(process, log, count=int(processes))
    stop(process)
    text = log.read_text()
    for code in RISKS:
        assert text.count(PHRASES[code]) == 1, (code, text)
    assert text.count(" WARNING streamflow.ops.guard: ") == len(RISKS), text
    assert CANARY not in text and "Traceback" not in text


@pytest.mark.slow
def test_worker_on_a_safe_server_logs_no_warning(
    safe: RedisServer,
    namespace: str,
    cli_process: Callable[..., tuple[subprocess.Popen[bytes], Path]],
) -> None:
    url = url_of(safe, "sf")
    process, log = cli_process(*worker_args(namespace), "--strict", "--redis-url", url)
    wait_serving(process, log)
    stop(process)
    text = log.read_text()
    assert "streamflow.ops.guard" not in text and " WARNING " not in text, text
    assert CANARY not in text


@pytest.mark.parametrize(
    ("command", "strict_by"),
    [
        ("worker", "option"),
        ("worker", "environment"),
        ("worker-processes", "option"),
        ("coordinator", "option"),
    ],
)
@pytest.mark.slow
def test_strict_refuses_to_start_with_one_line_listing_every_problem(
    risky: RedisServer, namespace: str, command: str, strict_by: str
) -> None:
    url = url_of(risky, "default")
    args = {
        "worker": worker_args(namespace),
        "worker-processes": [*worker_args(namespace), "--processes", "2"],
        "coordinator": ["coordinator", "--namespace", namespace],
    }[command]
    env = clean_env(STREAMFLOW_REDIS_URL=url)
    if strict_by == "option":
        args = [*args, "--strict"]
    else:
        env["STREAMFLOW_STRICT"] = "1"
    result = subprocess.run(
        [*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=20
    )
    assert CANARY not in result.stdout + result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(
        f"error: refusing to start on Redis at redis://default:***@127.0.0.1:{risky.port}/0 "
        "(--strict): "
    ), line
    for code in RISKS:
        assert f"[{code}] {PHRASES[code]}" in line, (code, line)
