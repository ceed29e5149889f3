"""The dashboard runs as the least-privilege ``dashboard`` user that ``streamflow acl`` prints:
every page loads and every action works, and Redis refuses nothing (its ACL LOG stays empty)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from streamflow import Client, Graph, scheduler
from streamflow.keys import Keys
from streamflow.ops.server import RedisServer
from streamflow.schedules import Schedule
from tests.dashboard.conftest import Procs
from tests.dashboard.http import csrf_of, request
from tests.helpers import clean_env, run_cli, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_the_dashboard_needs_no_more_than_the_dashboard_user(
    private_redis: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = private_redis()
    admin = redis.Redis(port=server.port)
    password = "dashboard pass/word"
    printed = run_cli(
        "acl",
        "--namespace",
        "dash",
        "--for",
        "dashboard",
        "--password-env",
        "SFTEST_PW",
        env=clean_env(SFTEST_PW=password),
    )
    assert printed.returncode == 0, printed.stderr
    admin.execute_command(*shlex.split(printed.stdout))
    dashboard_url = f"redis://sf-dashboard:{quote(password, safe='')}@127.0.0.1:{server.port}/0"
    admin_side = Procs(tmp_path, server.url, "dash", tmp_path / "record.txt")
    try:
        admin_side.worker("w1", "tests.apps:app", "forge", "sleepy")

        async def seed(client: Client) -> str:
            # A running job with its latest progress, for the Jobs page.
            await client.publish("sleepy", {"seconds": 600, "progress": 1}, message_id="busy")
            await client.publish("forge", {"text": "dead"})
            await client.publish("forge", {"text": "dead too"})
            await client.limit("forge", rate="5/s")
            hourly = Schedule(id="hourly", role="forge", every=3600)
            await scheduler.add(client.redis, client.keys, hourly)
            graph = Graph("acl")
            graph.node("a", function="merge.generic")
            return await client.submit(graph)

        task_id = admin_side.query(seed)
        dead = Keys("dash").dead_letters("forge")
        wait_for(lambda: admin.xlen(dead) == 2, 20, "two dead letters")
        progress = Keys("dash").job_progress("busy")
        wait_for(lambda: admin.exists(progress), 20, "the running job's progress")
        as_dashboard = Procs(tmp_path, dashboard_url, "dash", tmp_path / "record.txt")
        as_dashboard.started = admin_side.started  # all killed in the finally below
        base = as_dashboard.dashboard()
        for path in (
            "/",
            "/workers",
            "/tasks",
            f"/tasks/{task_id}",
            "/deadletters",
            "/deadletters/forge",
            "/deadletters/forge/purge",
            "/deadletters/forge/replay-all",
            "/roles/forge",
            "/schedules",
            "/jobs?id=abc",
        ):
            assert request(base + path)[0] == 200, path
        assert 'id="job-progress"' in request(base + "/jobs?id=busy")[1]
        page = request(base + "/deadletters/forge")[1]
        dead_id = re.search(r'data-id="([^"]+)"', page)
        assert dead_id is not None
        form = f"id={dead_id.group(1)}&csrf={csrf_of(page)}".encode()
        assert request(base + "/deadletters/forge/replay", data=form)[0] == 303
        form = f"csrf={csrf_of(page)}".encode()
        for action in (
            f"/tasks/{task_id}/cancel",
            "/roles/forge/pause",
            "/roles/forge/resume",
            "/schedules/hourly/pause",
            "/schedules/hourly/resume",
            "/schedules/hourly/run",
            "/deadletters/forge/replay-all",
        ):
            assert request(base + action, data=form)[0] == 303, action
        wait_for(lambda: admin.xlen(dead) == 3, 20, "the two replayed and the run-now job dead")
        assert request(base + "/deadletters/forge/purge", data=form + b"&confirm=forge")[0] == 303
        assert admin.xlen(dead) == 0
        assert request(base + "/")[0] == 200  # the sparklines, after events were written
        assert admin.execute_command("ACL", "LOG") == []
    finally:
        admin_side.kill_all()
        admin.close()
