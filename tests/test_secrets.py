"""A canary password never shows: not in logs, errors, command output, metrics or --help."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from streamflow.ops.server import RedisServer
from tests.helpers import CLI, ROOT, clean_env, free_port, kill_tree, run_cli, status, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CANARY = "Canary-S3cret-7f1d"


def test_a_password_never_shows_anywhere(
    private_redis: Callable[..., RedisServer], tmp_path: Path
) -> None:
    # A password-protected ACL user beside the default one (which start-up polls).
    server = private_redis(extra_args=["--user", "app", "on", f">{CANARY}", "~*", "&*", "+@all"])
    url = f"redis://app:{CANARY}@127.0.0.1:{server.port}/0"
    conn = ["--redis-url", url, "--namespace", "canary"]
    seen: list[str] = []
    port = free_port()
    log = tmp_path / "worker.log"
    worker_args = ["--app", "tests.apps:app", "--role", "work", "--metrics-port", str(port), *conn]
    env = clean_env(SFTEST_RECORD=str(tmp_path / "record"))
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [*CLI, "--log-format", "json", "--log-level", "DEBUG", "worker", *worker_args],
            cwd=ROOT,
            env=env,
            stderr=out,
            stdout=out,
        )
    try:
        wait_for(lambda: status(port, "/readyz") == 200, 20, "worker ready")
        for payload in ("{}", '{"fail_attempts": 9, "retry_delay": 0}'):
            done = run_cli("publish", "work", "--json", payload, *conn)
            seen += [done.stdout, done.stderr]
        plain = redis.Redis.from_url(url)
        wait_for(lambda: plain.xlen("canary:{role:work}:dead") == 1, 20, "dead-lettered")
        plain.close()
        for args in (
            ["inspect", "--json"],
            ["inspect", "work"],
            ["workers", "--json"],
            ["dlq", "list", "work"],
            ["tasks"],
            ["check"],
            ["worker", "--help"],
        ):
            done = run_cli(*args, *conn)
            seen += [done.stdout, done.stderr]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            seen.append(reply.read().decode())
        # Errors: a wrong password, a bad URL, an unreachable server.
        for bad in (
            url.replace(CANARY, CANARY + "x"),
            f"redis://app:{CANARY}@127.0.0.1:{free_port()}/0",
            f"redis+bogus://app:{CANARY}@127.0.0.1/0",
        ):
            done = run_cli("publish", "work", "--json", "{}", "--redis-url", bad)
            assert done.returncode == 2
            seen += [done.stdout, done.stderr]
        env_help = run_cli("worker", "--help", env=clean_env(STREAMFLOW_REDIS_URL=url))
        seen += [env_help.stdout, env_help.stderr]
    finally:
        kill_tree(worker)
    seen.append(log.read_text())
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any("retrying" in r["message"] for r in records)  # the logs did say things
    leaks = [text for text in seen if CANARY in text]
    assert leaks == []
