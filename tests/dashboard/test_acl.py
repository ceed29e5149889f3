"""The dashboard runs as the least-privilege ``operator`` user that ``streamflow acl`` prints:
every page loads and its actions work, and Redis refuses nothing (its ACL LOG stays empty)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from streamflow import Client, Graph
from streamflow.keys import Keys
from streamflow.ops.server import RedisServer
from tests.dashboard.conftest import Procs
from tests.dashboard.http import csrf_of, request
from tests.helpers import clean_env, run_cli, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_the_dashboard_needs_no_more_than_the_operator_user(
    private_redis: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = private_redis()
    admin = redis.Redis(port=server.port)
    password = "operator pass/word"
    printed = run_cli(
        "acl",
        "--namespace",
        "dash",
        "--for",
        "operator",
        "--password-env",
        "SFTEST_PW",
        env=clean_env(SFTEST_PW=password),
    )
    assert printed.returncode == 0, printed.stderr
    admin.execute_command(*shlex.split(printed.stdout))
    operator_url = f"redis://sf-operator:{quote(password, safe='')}@127.0.0.1:{server.port}/0"
    admin_side = Procs(tmp_path, server.url, "dash", tmp_path / "record.txt")
    try:
        admin_side.worker("w1", "tests.apps:app", "forge")

        async def seed(client: Client) -> str:
            await client.publish("forge", {"text": "dead"})
            graph = Graph("acl")
            graph.node("a", function="merge.generic")
            return await client.submit(graph)

        task_id = admin_side.query(seed)
        dead = Keys("dash").dead_letters("forge")
        wait_for(lambda: admin.xlen(dead) == 1, 20, "a dead letter")
        as_operator = Procs(tmp_path, operator_url, "dash", tmp_path / "record.txt")
        as_operator.started = admin_side.started  # all killed in the finally below
        base = as_operator.dashboard()
        for path in (
            "/",
            "/workers",
            "/tasks",
            f"/tasks/{task_id}",
            "/deadletters",
            "/deadletters/forge",
            "/deadletters/forge/purge",
            "/roles/forge",
            "/jobs?id=abc",
        ):
            assert request(base + path)[0] == 200, path
        page = request(base + "/deadletters/forge")[1]
        dead_id = re.search(r'data-id="([^"]+)"', page)
        assert dead_id is not None
        form = f"id={dead_id.group(1)}&csrf={csrf_of(page)}".encode()
        assert request(base + "/deadletters/forge/replay", data=form)[0] == 303
        form = f"csrf={csrf_of(page)}".encode()
        assert request(f"{base}/tasks/{task_id}/cancel", data=form)[0] == 303
        assert admin.execute_command("ACL", "LOG") == []
    finally:
        admin_side.kill_all()
        admin.close()
