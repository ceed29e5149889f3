"""Two workers and a coordinator under honcho, on the test's redis-server.

Run with ``pytest examples/supervised``. honcho comes with the test extras
(``pip install -e '.[test]'``); the processes are the real ``streamflow`` commands of the
Procfile, configured through STREAMFLOW_REDIS_URL and STREAMFLOW_NAMESPACE.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import psutil
import pytest

from examples.supervised.app import graph
from streamflow import Client
from streamflow.dag.graph import load
from streamflow.registry import live_workers

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = Path(__file__).parent / "Procfile"


@dataclass
class Honcho:
    """A running ``honcho start`` and every process it started."""

    process: subprocess.Popen[bytes]
    log: Path
    children: list[psutil.Process] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        """Every process honcho started, and theirs (none once honcho has exited)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def streamflow_children(self) -> list[psutil.Process]:
        """The ``streamflow`` processes among honcho's descendants."""
        found = []
        for child in self.descendants():
            try:
                if any(part.endswith("streamflow") for part in child.cmdline()[:2]):
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found


def gone(process: psutil.Process) -> bool:
    """Whether ``process`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def find_honcho() -> str:
    """honcho from this interpreter's environment (the test extras), else from PATH."""
    here = Path(sys.executable).parent / "honcho"
    found = str(here) if here.exists() else shutil.which("honcho")
    if found is not None:
        return found
    message = "honcho is not installed; pip install -e '.[test]'"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


def test_the_yaml_file_is_the_python_graph() -> None:
    path = Path(__file__).parent / "squares.yaml"
    assert load(path.read_text(), filename=path.name) == graph.spec()


@pytest.fixture
def honcho(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Honcho]:
    """``honcho start`` with two workers and a coordinator; everything killed at teardown."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env["STREAMFLOW_REDIS_URL"] = redis_url
    env["STREAMFLOW_NAMESPACE"] = namespace
    # The Procfile runs `streamflow`: the one installed next to this Python.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = tmp_path / "honcho.log"
    command = [find_honcho(), "start", "-f", str(PROCFILE), "-c", "worker=2"]
    # -e /dev/null: no .env file from the working directory overrides the variables above.
    command += ["-e", os.devnull, "--no-colour"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    running = Honcho(process, log)
    try:
        yield running
    finally:
        leftovers = running.children + running.descendants()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        for child in leftovers:
            if not gone(child):
                child.kill()


@pytest.mark.anyio
@pytest.mark.slow
async def test_honcho_runs_the_procfile_and_stops_every_process_on_sigterm(
    honcho: Honcho, redis_url: str, namespace: str
) -> None:
    with anyio.fail_after(40):
        async with Client.from_url(redis_url, namespace=namespace) as client:
            with anyio.fail_after(20):  # three Python processes starting on a small machine
                while True:
                    assert honcho.process.poll() is None, honcho.output()
                    workers = await live_workers(client.redis, client.keys)
                    pids = {child.pid for child in honcho.streamflow_children()}
                    if len(workers) == 2 and len(pids) == 3:
                        break
                    await anyio.sleep(0.05)
            assert {w.pid for w in workers} < pids  # the workers are honcho's children
            # Every process honcho started: its own helpers and the streamflow processes.
            honcho.children = honcho.descendants()

            task_id = await client.submit(graph)
            state = await client.wait(task_id, timeout=20, poll=0.05)
            assert state.state == "succeeded", state.error
            assert await client.result(task_id) == {
                "total": [{"count": 10, "sum": 285, "sums": {}}]
            }

            honcho.process.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(honcho.process.wait, 15)
            # A clean stop gives up the consumer names: no worker is left registered.
            assert await live_workers(client.redis, client.keys) == []

    output = honcho.output()
    assert [child for child in honcho.children if not gone(child)] == [], output
    assert "SIGKILL" not in output, output  # everything stopped within honcho's 5 s
    for name in ("worker.1", "worker.2", "coordinator.1"):
        assert f"{name} stopped (rc=0)" in output, output
