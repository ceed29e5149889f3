"""Helpers shared by the benchmark scripts: the worker subprocess, Redis figures, formatting."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from redis.asyncio import Redis

import streamflow
from streamflow.ops.server import RedisServer

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORKER_SCRIPT = BENCH_DIR / "_worker.py"
ROLE = "bench"
#: The stdout of a worker process is read line by line; the latency report is one long line.
_LINE_LIMIT = 1 << 24
_STOP_TIMEOUT = 10.0
R = TypeVar("R")


class WorkerProcessError(RuntimeError):
    """The worker subprocess exited early or did not report in time."""


class WorkerProcess:
    """``benchmarks/_worker.py`` in a subprocess, read as JSON lines; always reaped on exit.

    Args:
        mode: ``drain``, ``latency`` or ``soak`` (see ``_worker.py``).
        url: The Redis URL.
        namespace: The streamflow namespace.
        options: More ``--name value`` options for the worker script.
        profile: Run the worker under cProfile and write the stats to this file.
        script: The worker script (``_worker.py``; ``peers/`` has one for the other queues).
        pythonpath: A directory to import first (a snapshot of another commit's streamflow).
    """

    def __init__(
        self,
        mode: str,
        url: str,
        namespace: str,
        options: Mapping[str, object] | None = None,
        *,
        profile: Path | None = None,
        script: Path = WORKER_SCRIPT,
        pythonpath: str | None = None,
    ) -> None:
        argv = [str(script), mode, "--url", url, "--namespace", namespace]
        for name, value in (options or {}).items():
            if value is not None:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
        self.argv = [sys.executable, *prefix, *argv]
        self._process: asyncio.subprocess.Process | None = None
        self._pythonpath = pythonpath

    async def __aenter__(self) -> Self:
        env = dict(os.environ)
        # The caller's PYTHONPATH comes first, so that the worker imports the same streamflow
        # as this process (e.g. a snapshot of one commit instead of the work tree).
        first = [self._pythonpath, env.get("PYTHONPATH"), str(REPO_ROOT)]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, first))
        self._process = await asyncio.create_subprocess_exec(
            *self.argv,
            # Not the repo root: `python -m cProfile` puts the cwd first on sys.path, and the
            # worker must import streamflow the way PYTHONPATH says.
            cwd=BENCH_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def pid(self) -> int:
        return self._require().pid

    def _require(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise WorkerProcessError("the worker process was not started")
        return self._process

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The JSON objects the worker prints, until its stdout closes."""
        process = self._require()
        assert process.stdout is not None
        while line := await process.stdout.readline():
            with contextlib.suppress(ValueError):
                yield json.loads(line)

    async def wait_event(self, name: str) -> dict[str, Any]:
        """The next event called ``name``; raises if the worker exits first.

        Bound the wait with ``asyncio.timeout()``.
        """
        async for event in self.events():
            if event.get("event") == name:
                return event
        code = await self._require().wait()
        raise WorkerProcessError(f"worker exited with code {code} before reporting {name!r}")

    async def wait(self) -> int:
        """Wait for the worker to exit on its own; its exit code (bound it with a timeout)."""
        return await self._require().wait()

    async def close(self) -> None:
        """Stop the worker if it still runs: SIGTERM (graceful), then SIGKILL."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise


@contextlib.contextmanager
def redis_url(url: str | None) -> Iterator[str]:
    """``url`` as it is, or the URL of a private redis-server started for the duration."""
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


async def redis_cpu_seconds(redis: Redis) -> float:
    """CPU time (user + system) the redis-server process has used so far."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def pending_count(redis: Redis, stream: str, group: str) -> int:
    """How many entries of ``stream`` are delivered to ``group`` but not acknowledged."""
    summary = await redis.xpending(stream, group)
    return int(summary["pending"])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


def print_tables(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> None:
    """Print ``rows`` as a text table, then (``markdown``) as a markdown table too."""
    print(text_table(header, rows))
    if markdown:
        print()
        print(markdown_table(header, rows))


def git_revision() -> str:
    """Which streamflow was measured: the work tree's commit (``+dirty`` with local changes to
    streamflow/), or the directory it was imported from when that is outside the work tree."""
    package = Path(streamflow.__file__).resolve().parent
    if package != REPO_ROOT / "streamflow":
        return f"imported from {package.parent} (not the work tree)"
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "streamflow")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def replace_section(path: Path, heading: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace the ``heading`` section of a markdown file (up to the next ``## ``) with ``body``.

    ``body`` starts with the heading itself. The file is created, and the section appended,
    when missing.
    """
    text = path.read_text() if path.exists() else f"{title}\n"
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        new = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = lines[end:]
        new = "\n".join([*lines[:start], body.rstrip("\n"), *(["", *tail] if tail else [])])
        new = new.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def run_date() -> str:
    """Now, as the benchmark pages stamp a run (``2026-12-07 15:40 CET``)."""
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def print_section(markdown: str, doc: Path, section: str, *, write: bool) -> None:
    """Print a run's markdown section; with ``write``, also replace it in ``doc``."""
    print(markdown)
    if write:
        replace_section(doc, section, markdown)
        print(f"\nwrote {section!r} to {doc}", file=sys.stderr)


def run_rounds(
    argv: list[str] | None,
    doc: Path,
    section: str,
    sizes: tuple[int, int],
    one_round: Callable[[str, int], Coroutine[Any, Any, R]],
    summary: Callable[[R], str],
    render: Callable[[list[R], int, str], str],
    description: str | None,
) -> None:
    """A benchmark of ``--rounds`` rounds of ``one_round`` whose markdown goes into ``section``.

    ``sizes``: the messages of a round by default and with ``--quick``; ``summary`` is the
    stderr line of a round.
    """
    default, quick = sizes
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--messages", type=int)
    parser.add_argument("--quick", action="store_true", help=f"N = {quick:,}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--write", action="store_true", help=f"replace '{section}' in {doc}")
    args = parser.parse_args(argv)
    n = args.messages or (quick if args.quick else default)
    date = run_date()
    rounds: list[R] = []
    with redis_url(args.redis_url) as url:
        for i in range(args.rounds):
            rounds.append(asyncio.run(one_round(url, n)))
            print(f"round {i + 1}: {summary(rounds[-1])}", file=sys.stderr)
    print_section(render(rounds, n, date), doc, section, write=args.write)


async def redis_version(url: str) -> str:
    """The server's ``redis_version``."""
    admin = Redis.from_url(url)
    try:
        return str((await admin.info("server"))["redis_version"])
    finally:
        await admin.aclose()
