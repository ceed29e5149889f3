"""Fixtures of the dashboard tests: the dashboard, workers and a coordinator as processes, and
a headless chromium (tests/dashboard/browser.py)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from streamflow import Client
from tests.dashboard.browser import Browser
from tests.helpers import CLI, ROOT, clean_env, free_port, kill_tree, status, wait_for

T = TypeVar("T")
#: A token long enough for the dashboard (16 characters at least).
TOKEN = "s3cret-token-for-tests"
#: Where the browser tests keep their screenshots (gitignored build/; SFTEST_ARTEFACTS moves it).
ARTEFACTS = Path(os.environ.get("SFTEST_ARTEFACTS", ROOT / "build" / "test-artefacts"))


@dataclass
class Procs:
    """Processes started by a test (dashboard, workers, coordinator); all killed at teardown."""

    tmp: Path
    redis_url: str
    namespace: str
    record: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def connection(self) -> list[str]:
        return ["--redis-url", self.redis_url, "--namespace", self.namespace]

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as err:
            process = subprocess.Popen(
                [*CLI, *args],
                cwd=ROOT,
                env=clean_env(SFTEST_RECORD=str(self.record)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.started.append(process)
        return process, log

    def dashboard(self, *options: str) -> str:
        """Start a dashboard; its base URL once it answers."""
        port = free_port()
        process, log = self.start(
            f"dashboard-{port}", "dashboard", *self.connection(), "--port", str(port), *options
        )

        def up() -> bool:
            assert process.poll() is None, log.read_text()
            return status(port, "/static/style.css") == 200

        wait_for(up, 30, "the dashboard answers")
        return f"http://127.0.0.1:{port}"

    def worker(self, name: str, app: str, *roles: str) -> None:
        """Start a worker of ``app`` serving ``roles``; return once it serves."""
        role_args = [arg for role in roles for arg in ("--role", role)]
        process, log = self.start(
            name,
            "worker",
            "--app",
            app,
            *self.connection(),
            *role_args,
            "--consumer-name",
            name,
            "--block-ms",
            "200",
        )
        self._ready(process, log, " serving ")

    def coordinator(self, name: str) -> None:
        process, log = self.start(
            name, "coordinator", *self.connection(), "--consumer-name", name, "--block-ms", "200"
        )
        self._ready(process, log, f" coordinator {name} on ")

    def _ready(self, process: subprocess.Popen[bytes], log: Path, line: str) -> None:
        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            return line in log.read_text()

        wait_for(ready, 30, f"{log.name} logs {line!r}")

    def query(self, use: Callable[[Client], Awaitable[T]]) -> T:
        """Run ``use`` with a client of the test's namespace."""

        async def run() -> T:
            async with Client.from_url(self.redis_url, namespace=self.namespace) as client:
                return await use(client)

        return anyio.run(run)

    def kill_all(self) -> None:
        for process in self.started:
            kill_tree(process)


@pytest.fixture
def procs(tmp_path: Path, redis_url: str, namespace: str) -> Iterator[Procs]:
    found = Procs(tmp_path, redis_url, namespace, tmp_path / "record.txt")
    try:
        yield found
    finally:
        found.kill_all()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    found = Browser(tmp_path / "profile")
    try:
        yield found
    finally:
        found.close()


@pytest.fixture
def artefacts(request: pytest.FixtureRequest) -> Path:
    """This test's directory of kept screenshots, emptied first (kept after the run)."""
    where = ARTEFACTS / "dashboard" / re.sub(r"[^\w.-]", "_", request.node.name)
    where.mkdir(parents=True, exist_ok=True)
    for old in where.glob("*.png"):
        old.unlink()
    return where
