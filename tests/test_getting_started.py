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

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from streamflow.ops.server import RedisServer
from tests.processes import Command, Shell

pytestmark = pytest.mark.slow

PAGE = Path(__file__).resolve().parent.parent / "docs" / "getting-started.md"
BLOCK = re.compile(r"(?:<!-- file: (\S+) -->\n)?```(\w+)\n(.*?)```", re.S)
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


def test_the_page_walks_the_whole_first_week() -> None:
    commands = [c.line for s in steps(PAGE.read_text()) for c in s.commands]
    missing = [what for what in FIRST_WEEK if not any(c.startswith(what) for c in commands)]
    assert not missing


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
