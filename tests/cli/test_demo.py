"""``streamflow demo``: the streaming sensor task end to end, run as a real subprocess.

Each run is checked for what it leaves behind: every process it started (sampled with psutil
while it runs) is gone after it exits, and the private redis-server's directory is removed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import redis

from streamflow import Client, config
from streamflow.dag import demo as demo_app
from streamflow.testing import Harness
from tests.helpers import CLI, ROOT, clean_env, wait_for

pytestmark = pytest.mark.slow

#: Deadline of one whole demo run of 20 batches (it takes about 3 s).
RUN_TIMEOUT = 30.0
#: How long the demo may take to exit after SIGINT.
EXIT_DEADLINE = 5.0
NODES = ("readings", "clean", "enrich", "totals", "report")
FIGURES = ("batches: ", "first downstream start: ", "end to end: ", "throughput: ")


@dataclass
class Demo:
    """A ``streamflow demo`` subprocess; its output goes to ``log``."""

    process: subprocess.Popen[bytes]
    log: Path
    seen: dict[int, str] = field(default_factory=dict)  # descendants: pid -> name

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def sample(self) -> None:
        """Remember every descendant alive now."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                # The latest name: a child sampled between fork and exec is still "python".
                self.seen[child.pid] = child.name()
            except psutil.NoSuchProcess:
                continue

    def wait_output(self, pattern: str, count: int = 1, timeout: float = RUN_TIMEOUT) -> str:
        """Wait until the output has ``count`` lines matching ``pattern`` (a regex), sampling
        children meanwhile; fail at once if the demo exits first. Returns the output."""

        def shown() -> bool:
            self.sample()
            if len(re.findall(pattern, self.output(), re.M)) >= count:
                return True
            if self.process.poll() is not None:
                raise AssertionError(f"demo exited before {pattern!r}:\n{self.output()}")
            return False

        wait_for(shown, timeout, f"demo prints {pattern!r}")
        return self.output()

    def wait_exit(self, timeout: float = RUN_TIMEOUT) -> int:
        """Wait for the demo to exit, sampling its children meanwhile; returns its exit code."""

        def exited() -> bool:
            self.sample()
            return self.process.poll() is not None

        wait_for(exited, timeout, "demo exits")
        return self.process.returncode

    def assert_left_nothing(self) -> None:
        """No process the demo started still runs, and its redis-server directory is gone."""
        alive = {pid: name for pid, name in self.seen.items() if _alive(pid)}
        assert not alive, f"left running: {alive}"
        match = re.search(r"data in (\S+)\)", self.output())
        if match:
            assert not Path(match.group(1)).exists(), f"{match.group(1)} was not removed"


def find(pattern: str, text: str) -> str:
    """The first group of the first match of ``pattern`` (multiline) in ``text``."""
    match = re.search(pattern, text, re.M)
    assert match is not None, (pattern, text)
    return match.group(1)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


StartDemo = Callable[..., Demo]


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[StartDemo]:
    """Start ``python -m streamflow demo ARGS``; each one is killed (tree and all) at teardown."""
    started: list[Demo] = []

    def start(*args: str, **env: str) -> Demo:
        log = tmp_path / f"demo-{len(started)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [*CLI, "demo", *args],
                cwd=ROOT,
                env=clean_env(PYTHONUNBUFFERED="1", **env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        demo = Demo(process, log)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        for pid in [demo.process.pid, *demo.seen]:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                continue
        demo.process.wait(timeout=10)


def assert_ran_the_task(out: str) -> None:
    """Progress lines for every node, the task's success, its result and the figures."""
    for node in NODES:
        assert re.search(rf"^{node} +succeeded ", out, re.M), (node, out)
    assert re.search(r"^readings +running ", out, re.M), out  # progress while it ran
    assert re.search(r"^task \w+ succeeded$", out, re.M), out
    assert '"report":[{"readings":1980,"alerts":387,"mean_celsius":25.46}]' in out, out
    for figure in FIGURES:
        assert figure in out, (figure, out)
    assert "Traceback" not in out, out


# -- a private redis-server -----------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.usefixtures("redis_server")  # skips (or fails on CI) without redis-server
def test_demo_streams_the_task_on_a_private_server_and_leaves_nothing_behind(
    start_demo: StartDemo,
) -> None:
    demo = start_demo("--batches", "20")
    started = time.monotonic()
    assert demo.wait_exit() == 0, demo.output()
    elapsed = time.monotonic() - started
    out = demo.output()
    assert_ran_the_task(out)
    assert "started a private redis-server" in out
    assert "redis-server" in demo.seen.values(), demo.seen  # the sampling saw it
    demo.assert_left_nothing()
    lead = int(find(r"first downstream start: (\d+) ms", out))
    source = float(find(r"source emitted for ([\d.]+) s", out))
    # Streaming: enrichment began long before the 20 batches (0.1 s apart) were all emitted.
    assert lead < source * 1000 / 2, out
    assert elapsed < RUN_TIMEOUT


@pytest.mark.redis
@pytest.mark.usefixtures("redis_server")
def test_sigint_mid_run_stops_the_demo_promptly_with_130_and_leaves_nothing_behind(
    start_demo: StartDemo,
) -> None:
    demo = start_demo("--batches", "2000")  # 200 s of source batches: it is mid-run for sure
    demo.wait_output(r"^readings +running ")
    demo.process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert demo.wait_exit(EXIT_DEADLINE) == 130, demo.output()
    assert time.monotonic() - sent < EXIT_DEADLINE
    out = demo.output()
    assert "SIGINT: stopping the demo" in out
    assert "interrupted: the demo stopped everything it started" in out
    assert "Traceback" not in out, out
    demo.assert_left_nothing()


# -- the fake Redis -------------------------------------------------------------------------


def test_without_redis_server_on_path_the_demo_runs_on_the_fake_redis_and_says_so(
    start_demo: StartDemo, tmp_path: Path
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    demo = start_demo("--batches", "20", PATH=str(empty))  # python itself is an absolute path
    assert demo.wait_exit() == 0, demo.output()
    out = demo.output()
    assert_ran_the_task(out)
    assert "redis-server is not on PATH" in out and "fake Redis" in out
    assert "apt-get install redis-server" in out
    assert "redis-server" not in demo.seen.values()
    demo.assert_left_nothing()


def test_keep_needs_a_real_redis(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "demo", "--keep"],
        cwd=ROOT,
        env=clean_env(PATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: --keep needs a real Redis"), result.stderr


# -- a given Redis --------------------------------------------------------------------------


@pytest.mark.redis
def test_redis_url_runs_in_a_fresh_namespace_and_leaves_the_task_finished(
    start_demo: StartDemo, redis_url: str
) -> None:
    with redis.Redis.from_url(redis_url) as client:
        before = set(client.keys("*"))
    demo = start_demo("--batches", "20", "--redis-url", redis_url)
    assert demo.wait_exit() == 0, demo.output()
    out = demo.output()
    assert_ran_the_task(out)
    assert "started a private redis-server" not in out
    assert not demo.seen, demo.seen  # no process of its own
    namespace = find(r"namespace (sf-demo-[0-9a-f]+)", out)
    task_id = find(r"^task (\w+) succeeded$", out)
    with redis.Redis.from_url(redis_url) as client:
        added = {key.decode() for key in set(client.keys("*")) - before}
    assert added and all(key.startswith(f"{namespace}:") for key in added), added
    state = anyio.run(_task_state, redis_url, namespace, task_id)
    assert state is not None and state.state == "succeeded", state
    assert all(node.state == "succeeded" for node in state.nodes.values()), state


async def _task_state(url: str, namespace: str, task_id: str) -> Any:
    async with Client.from_url(url, namespace=namespace) as client:
        return await client.task(task_id)


# -- --keep ---------------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.usefixtures("redis_server")
def test_keep_stays_up_with_metrics_commands_and_dashboard_until_ctrl_c(
    start_demo: StartDemo,
) -> None:
    demo = start_demo("--batches", "3", "--keep")
    out = demo.wait_output(r"^dashboard: http")  # the last line before it waits
    exports = re.search(r"export STREAMFLOW_REDIS_URL=(\S+) STREAMFLOW_NAMESPACE=(\S+)", out)
    assert exports is not None, out
    task_id = find(r"^task (\w+) succeeded$", out)
    for command in (f"status {task_id}", "publish demo.alert --json", "cancel TASK_ID --task"):
        assert command in out, (command, out)
    ports = re.findall(r"curl -s http://127.0.0.1:(\d+)/metrics", out)
    assert len(ports) == 2, out
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert b"streamflow_" in reply.read()
    # The printed URL and namespace reach the task it ran.
    env = clean_env(STREAMFLOW_REDIS_URL=exports.group(1), STREAMFLOW_NAMESPACE=exports.group(2))
    status = subprocess.run(
        [*CLI, "status", task_id], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert status.returncode == 0 and "succeeded" in status.stdout, status
    # The dashboard extra is installed here: the demo serves it, on the demo's namespace.
    dashboard = find(r"^dashboard: (http://127\.0\.0\.1:\d+/)$", out)
    with urllib.request.urlopen(f"{dashboard}tasks/{task_id}", timeout=5) as reply:
        assert "succeeded" in reply.read().decode()
    assert demo.process.poll() is None  # still up
    demo.sample()
    demo.process.send_signal(signal.SIGINT)
    assert demo.wait_exit(EXIT_DEADLINE) == 130, demo.output()
    assert "redis-server" in demo.seen.values(), demo.seen
    demo.assert_left_nothing()


# -- the app, without the CLI ---------------------------------------------------------------


async def _run_demo_graph() -> Any:
    async with Harness(demo_app.app) as harness:
        return await harness.run_task(demo_app.graph(5, pause=0), all_nodes=True)


def test_demo_app_loads_like_any_app_and_its_graph_runs_in_the_harness() -> None:
    app = config.load_app("streamflow.dag.demo:app")
    assert {"demo.readings", "demo.clean", "demo.enrich", "demo.report"} <= set(app.roles)
    run = anyio.run(_run_demo_graph)
    assert run.succeeded, run.state
    assert len(run.results["readings"]) == 500
    assert len(run.results["clean"]) == 495  # one glitch in 97 readings dropped
    assert run.results["report"] == [{"readings": 495, "alerts": 99, "mean_celsius": 25.48}]
