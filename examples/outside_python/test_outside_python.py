"""publish.sh and publish.mjs against a streamflow worker running in this process.

Run with ``pytest examples/outside_python``. The tests need redis-server (the suite's private
server), redis-cli, and Node.js 18+ with npm. A missing tool skips its test on a developer's
machine and fails it on CI (``CI`` set), where .ci/run installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import streamflow
from examples.outside_python.app import app, greeted, greeted_headers
from streamflow import Client, Coordinator, Outcome, Worker

pytestmark = [pytest.mark.redis, pytest.mark.slow]

HERE = Path(__file__).parent
CANCEL_LUA = Path(streamflow.__file__).parent / "lua" / "cancel.lua"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def require(tool: str, hint: str) -> str:
    """The path of ``tool``; skip the test without it, or fail it on CI."""
    path = shutil.which(tool)
    if path is not None:
        return path
    message = f"{tool} is not on PATH; {hint}"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


def require_node() -> str:
    """The node executable (18 or newer) after ``npm ci`` here, if node_modules is stale."""
    hint = "install Node.js 18+ and npm: apt-get install nodejs npm (Debian/Ubuntu)"
    node = require("node", hint)
    npm = require("npm", hint)
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < 18:
        if os.environ.get("CI"):
            pytest.fail(f"node {version.stdout.strip()} is too old; {hint}", pytrace=False)
        pytest.skip(f"node {version.stdout.strip()} is too old; {hint}")
    installed = HERE / "node_modules" / ".package-lock.json"
    lock = HERE / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True, timeout=180)
    return node


@pytest.fixture
def node() -> str:
    return require_node()


@pytest.fixture
def redis_cli() -> str:
    return require("redis-cli", "install it with: apt-get install redis-tools (Debian/Ubuntu)")


async def wait_until(predicate: Callable[[], Any]) -> None:
    """Poll ``predicate`` until it holds (every caller runs under ``anyio.fail_after``)."""
    while not predicate():  # noqa: ASYNC110 - the state is plain data other tasks change
        await anyio.sleep(0.005)


@asynccontextmanager
async def running_worker(redis_url: str, namespace: str) -> AsyncIterator[list[Outcome]]:
    """A worker for the app's roles in the background; yields its outcomes as they come."""
    outcomes: list[Outcome] = []
    async with Client.from_url(redis_url, namespace=namespace) as client:
        worker = Worker(
            app, client.redis, namespace=namespace, block_ms=100, on_outcome=outcomes.append
        )
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            try:
                yield outcomes
            finally:
                worker.stop()


async def run_script(command: list[str], outcomes: list[Outcome]) -> dict[str, str]:
    """Run a publishing script; returns the ids it printed by role, once their jobs ended."""
    done = await anyio.run_process(command, cwd=HERE, check=False)
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    ids = dict(re.findall(r"^published (\w+) ([0-9a-f]{32})", done.stdout.decode(), re.M))
    assert set(ids) == {"greet", "slow"}, output
    assert f"cancelled slow {ids['slow']}" in output
    await wait_until(lambda: len(outcomes) == 2)
    return ids


def test_publish_mjs_embeds_the_cancel_script_verbatim() -> None:
    source = (HERE / "publish.mjs").read_text()
    embedded = re.search(r"const CANCEL_LUA = `(.*?)`;", source, re.S)
    assert embedded is not None
    assert embedded.group(1) == CANCEL_LUA.read_text()


@pytest.mark.anyio
async def test_publish_sh_publishes_with_redis_cli_and_cancels_a_running_job(
    redis_url: str, namespace: str, redis_cli: str
) -> None:
    with anyio.fail_after(60):  # the scripts give up after 30 s of waiting
        async with running_worker(redis_url, namespace) as outcomes:
            ids = await run_script(["sh", "publish.sh", redis_url, namespace], outcomes)

    assert greeted[ids["greet"]] == "shell"
    assert greeted_headers[ids["greet"]] == {
        "traceparent": TRACEPARENT,
        "correlation-id": "shell-1",
    }
    statuses = {o.message_id: o.status for o in outcomes}
    assert statuses == {ids["greet"]: "acked", ids["slow"]: "cancelled"}


@pytest.mark.anyio
async def test_publish_mjs_publishes_with_node_redis_and_cancels_a_running_job(
    redis_url: str, namespace: str, node: str
) -> None:
    with anyio.fail_after(60):  # the scripts give up after 30 s of waiting
        async with running_worker(redis_url, namespace) as outcomes:
            ids = await run_script([node, "publish.mjs", redis_url, namespace], outcomes)

    assert greeted[ids["greet"]] == "node"
    assert greeted_headers[ids["greet"]] == {"traceparent": TRACEPARENT, "correlation-id": "node-1"}
    statuses = {o.message_id: o.status for o in outcomes}
    assert statuses == {ids["greet"]: "acked", ids["slow"]: "cancelled"}


@pytest.mark.anyio
async def test_submit_mjs_submits_a_task_that_runs_and_reads_a_rejection_by_id(
    redis_url: str, namespace: str, node: str
) -> None:
    with anyio.fail_after(60):  # the script gives up after 30 s of waiting
        async with (
            running_worker(redis_url, namespace),
            Client.from_url(redis_url, namespace=namespace) as client,
            anyio.create_task_group() as tg,
        ):
            coordinator = Coordinator(client.redis, namespace=namespace, block_ms=100)
            await tg.start(coordinator.run)
            done = await anyio.run_process(
                [node, "submit.mjs", redis_url, namespace], cwd=HERE, check=False
            )
            coordinator.stop()
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    task_id = re.findall(r"^accepted (greetings-[0-9a-f]{16})$", output, re.M)[0]
    assert f"task {task_id} succeeded" in output
    assert re.search(r"^rejected invalid-[0-9a-f]{16}$", output, re.M), output
    problems = re.findall(r"^  problem: (.*)$", output, re.M)
    assert any("nobody-serves-this" in p for p in problems), output
    assert any("ghost" in p for p in problems), output
    assert sorted(v for v in greeted.values() if v.startswith("node task")) == [
        "node task",
        "node task, again",
    ]
