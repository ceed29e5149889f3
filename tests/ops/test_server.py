"""streamflow.ops.server.RedisServer: private redis-server processes for tests and the demo.

Start, stop, kill, restart on the same port, pause and resume, and no leftover process or
directory whatever happens to the parent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis

from streamflow.ops import server as server_module
from streamflow.ops.server import RedisServer, RedisServerError, RedisServerNotFound
from tests.helpers import ROOT, wait_for

pytestmark = pytest.mark.redis

StartRedis = Callable[..., RedisServer]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def pid_gone(pid: int) -> bool:
    if not psutil.pid_exists(pid):
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def send_ping(port: int, timeout: float = 2.0) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.sendall(b"*1\r\n$4\r\nPING\r\n")
    return conn


def test_session_server_answers_ping_on_a_private_port(redis_server: RedisServer) -> None:
    assert redis_server.port != 6379
    assert redis_server.host == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.ping() is True


def test_server_starts_with_debug_command_and_no_aof(private_redis: StartRedis) -> None:
    server = private_redis()
    with redis.Redis.from_url(server.url) as client:
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("save") == {"save": ""}
        assert client.execute_command("DEBUG", "SLEEP", "0") in (b"OK", "OK", True)


def test_killed_server_restarts_on_same_port_and_keeps_aof_data(
    private_redis: StartRedis,
) -> None:
    server = private_redis(appendonly=True, appendfsync="always")
    port, directory, pid = server.port, server.directory, server.pid
    assert pid is not None
    with redis.Redis.from_url(server.url) as client:
        client.set("survivor", "yes")

    server.kill()
    assert not server.running
    assert server.pid is None
    assert pid_gone(pid)
    assert directory.is_dir()

    server.restart()
    assert server.port == port
    assert server.directory == directory
    assert server.pid not in (None, pid)
    with redis.Redis.from_url(server.url) as client:
        assert client.get("survivor") == b"yes"


def test_restart_of_a_running_server_keeps_port_without_aof_loses_data(
    private_redis: StartRedis,
) -> None:
    server = private_redis()
    port = server.port
    with redis.Redis.from_url(server.url) as client:
        client.set("volatile", "1")
    server.restart()
    assert server.port == port
    with redis.Redis.from_url(server.url) as client:
        assert client.get("volatile") is None


def test_stop_leaves_no_process_and_removes_temp_dir() -> None:
    server = RedisServer()
    server.start()
    pid, directory = server.pid, server.directory
    assert pid is not None
    server.stop()
    assert pid_gone(pid)
    assert not directory.exists()
    assert not server.running
    server.stop()  # idempotent


def test_stop_keeps_a_directory_it_did_not_create(tmp_path: Path) -> None:
    with RedisServer(directory=tmp_path / "data") as server:
        pid = server.pid
        assert pid is not None
    assert pid_gone(pid)
    assert (tmp_path / "data" / "redis.log").is_file()


@pytest.mark.slow
def test_paused_server_hangs_and_answers_after_resume(private_redis: StartRedis) -> None:
    server = private_redis()
    server.pause()
    assert server.paused
    with send_ping(server.port, timeout=0.2) as conn:
        with pytest.raises(TimeoutError):
            conn.recv(64)
        server.resume()
        assert not server.paused
        conn.settimeout(5.0)
        assert conn.recv(64).startswith(b"+PONG")


def test_stop_of_a_paused_server_completes(private_redis: StartRedis) -> None:
    server = private_redis()
    pid = server.pid
    assert pid is not None
    server.pause()
    server.stop()
    wait_until(lambda: pid_gone(pid))


def test_start_failure_reports_the_log_and_cleans_up() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "1"])
    with pytest.raises(RedisServerError, match="no-such-directive"):
        server.start()
    assert not server.running
    with pytest.raises(RedisServerError):
        _ = server.directory


def test_missing_executable_raises_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module.shutil, "which", lambda _name: None)
    with pytest.raises(RedisServerNotFound, match="apt-get install redis-server"):
        RedisServer()
    assert not RedisServer.available()
    assert issubclass(RedisServerNotFound, RuntimeError)


def test_invalid_appendfsync_is_rejected() -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        RedisServer(appendfsync="sometimes")


def test_pause_of_a_stopped_server_is_an_error() -> None:
    server = RedisServer()
    with pytest.raises(RedisServerError, match="not running"):
        server.pause()


def test_atexit_hook_kills_leftover_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisServer()
    server.start()
    pid, directory = server.pid, server.directory
    assert pid is not None
    # Only this server: the hook must not kill the session server the other tests use.
    monkeypatch.setattr(server_module, "_RUNNING", {server})
    server_module._kill_leftovers()
    assert pid_gone(pid)
    assert not server.running
    assert not directory.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_server_dies_with_a_parent_that_is_killed_outright() -> None:
    code = (
        "from streamflow.ops.server import RedisServer\n"
        "server = RedisServer()\nserver.start()\nprint(server.pid, flush=True)\n"
        "import time\ntime.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no atexit hook runs
    parent.wait()
    parent.stdout.close()
    try:
        wait_for(lambda: pid_gone(pid), 5, "redis-server to exit")
    finally:
        if not pid_gone(pid):
            os.kill(pid, signal.SIGKILL)
