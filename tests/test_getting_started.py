"""docs/getting-started.md, run as a reader would: every file it shows, every command, in order.

The page's blocks are read in order. A block preceded by ``<!-- file: NAME -->`` is written to
NAME in an empty directory. A ``console`` block is run there: each ``$ COMMAND`` line through
bash, with the venv's ``bin`` first on the PATH, ``STREAMFLOW_REDIS_URL`` naming a private
redis-server and ``redis-cli`` pointed at it; a command ending in ``&`` runs in the background
until the test ends. The lines after a command are what it prints: each must match a line of
its output (stdout and stderr), in order, ``...`` standing for any text. A command that only
reads (not publish, submit, cancel, replay, purge, XADD...) is run again until its output
matches or a deadline passes: it waits on what the background workers do, never on their speed.

The only change made to the page's commands: the metrics port 9100 becomes a free one.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streamflow.ops.server import RedisServer
from tests.helpers import clean_env, free_port

pytestmark = pytest.mark.slow

PAGE = Path(__file__).resolve().parent.parent / "docs" / "getting-started.md"
BLOCK = re.compile(r"(?:<!-- file: (\S+) -->\n)?```(\w+)\n(.*?)```", re.S)
#: Redirects the page's ``redis-cli`` to the test's server (the page assumes the default one).
PRELUDE = 'redis-cli() { command redis-cli -u "$STREAMFLOW_REDIS_URL" "$@"; }\n'
#: Commands that change something: run once, never again to wait for an output.
MUTATING = (
    "streamflow publish",
    "streamflow submit",
    "streamflow cancel",
    "streamflow dlq replay",
    "streamflow dlq purge",
    "redis-cli XADD",
    "mkdir",
    "python publish.py",
)
#: What the first week must cover: each is the start of at least one command on the page.
FIRST_WEEK = (
    "streamflow worker",
    "streamflow publish",
    "python publish.py",
    "redis-cli XADD",
    "python -m pytest",
    "streamflow coordinator",
    "streamflow submit",
    "streamflow cancel",
    "streamflow dlq list",
    "streamflow dlq replay",
    "curl",
)
DEADLINE = 120.0


@dataclass
class Command:
    """One ``$`` line of a console block and the output lines shown after it."""

    line: str
    shown: list[str] = field(default_factory=list)


@dataclass
class Step:
    """A file to write (``name`` set) or a console block's commands, in page order."""

    name: str | None = None
    text: str = ""
    commands: list[Command] = field(default_factory=list)


def steps(page: str) -> list[Step]:
    out = []
    for name, lang, text in BLOCK.findall(page):
        if name:
            out.append(Step(name=name, text=text))
        elif lang == "console":
            commands: list[Command] = []
            for line in text.splitlines():
                if line.startswith("$ "):
                    commands.append(Command(line[2:]))
                elif commands:
                    commands[-1].shown.append(line)
            out.append(Step(commands=commands))
    return out


def pattern(shown: str) -> re.Pattern[str]:
    """A shown output line as a regex: ``...`` is any text, runs of spaces any white space."""
    parts = [r"\s+".join(map(re.escape, p.split())) for p in shown.strip().split("...")]
    return re.compile(r"\s*" + ".*".join(parts) + r"\s*")


def matches(shown: list[str], output: str) -> bool:
    """Each shown line matches a line of ``output``, in order (other lines may come between)."""
    lines = iter(output.splitlines())
    wanted = [pattern(s) for s in shown if s.strip() not in ("", "...")]
    return all(any(p.fullmatch(line) for line in lines) for p in wanted)


def test_the_page_walks_the_whole_first_week() -> None:
    commands = [c.line for s in steps(PAGE.read_text()) for c in s.commands]
    missing = [what for what in FIRST_WEEK if not any(c.startswith(what) for c in commands)]
    assert not missing


class Shell:
    """Runs the page's commands in one working directory; background ones until :meth:`close`."""

    def __init__(self, workdir: Path, logs: Path, redis_url: str) -> None:
        self.workdir = workdir
        self._logs = logs
        self._env = clean_env(STREAMFLOW_REDIS_URL=redis_url)
        self._env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self._env['PATH']}"
        self._port = str(free_port())
        self._background: list[subprocess.Popen[bytes]] = []

    def run(self, command: Command, *, once: bool = False) -> None:
        """Run ``command``; fail unless it exits 0 and prints what the page shows.

        A command that only reads is run again until it does (not with ``once``).
        """
        line = re.sub(r"(?<![0-9])9100(?![0-9])", self._port, command.line)
        if line.endswith("&"):
            self._start(line[:-1])
            return
        again = not once and not command.line.startswith(MUTATING)
        deadline = time.monotonic() + DEADLINE
        while True:
            done = subprocess.run(
                ["bash", "-c", PRELUDE + line],
                cwd=self.workdir,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=DEADLINE,
            )
            ok = done.returncode == 0 and matches(command.shown, done.stdout)
            if ok or not again or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # polling for a condition, not waiting for a process to be fast
        context = f"{line}\nexpected {command.shown}\ngot:\n{done.stdout}\n{self.background_logs()}"
        assert done.returncode == 0 and ok, context

    def _start(self, line: str) -> None:
        with open(self._logs / f"background-{len(self._background)}.log", "wb") as log:
            self._background.append(
                subprocess.Popen(
                    ["bash", "-c", PRELUDE + "exec " + line],
                    cwd=self.workdir,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group: the whole tree is stopped at close
                )
            )

    def background_logs(self) -> str:
        """The last lines the background commands wrote."""
        logs = sorted(self._logs.glob("background-*.log"))
        return "-- background:\n" + "\n".join(p.read_text()[-2000:] for p in logs)

    def close(self) -> None:
        """Stop every background command (SIGTERM, then SIGKILL after 30 s)."""
        for process in self._background:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._background:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


@pytest.fixture
def shell(private_redis: Callable[..., RedisServer], tmp_path: Path) -> Iterator[Shell]:
    workdir = tmp_path / "week"
    workdir.mkdir()
    shell = Shell(workdir, tmp_path, private_redis().url)
    yield shell
    shell.close()


def test_every_command_of_the_page_prints_what_the_page_shows(shell: Shell) -> None:
    for step in steps(PAGE.read_text()):
        if step.name is not None:
            (shell.workdir / step.name).write_text(step.text)
        for command in step.commands:
            shell.run(command)
