"""CPU time of one CLI call: ``--version``, ``--help`` and ``publish`` against ``python -c pass``.

Each call is a child process; its CPU time (user + system) is read with
``resource.getrusage(RUSAGE_CHILDREN)`` before and after, so the time other processes of a busy
machine take does not count (wall time would). The calls alternate, round after round, and the
table shows medians and the excess over the bare interpreter of the same round. ``publish``
runs against a private redis-server this script starts.

``--before DIR`` also measures another checkout of streamflow (e.g. made with
``git worktree add /tmp/old <commit>``) in the same rounds, with the same interpreter, by
putting DIR first on PYTHONPATH: the two sets of figures see the same machine load.

    python benchmarks/cli_startup.py --rounds 15 [--before /tmp/old] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _common import REPO_ROOT, git_revision, markdown_table, redis_url, replace_section, text_table

HEADING = "## CLI start-up"


def child_cpu_seconds(argv: Sequence[str], env: dict[str, str]) -> float:
    """CPU time (user + system) one child process used, from start to exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def environment(pythonpath: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMFLOW_")}
    env.update(PYTHONPATH=str(pythonpath), STREAMFLOW_REDIS_URL=url)
    return env


def calls(role: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "streamflow"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "streamflow --version": [*cli, "--version"],
        "streamflow --help": [*cli, "--help"],
        "streamflow publish": [*cli, "publish", role, "--json", '{"n": 1}'],
    }


def measure(trees: dict[str, Path], url: str, rounds: int) -> dict[tuple[str, str], list[float]]:
    """CPU seconds per (tree, call) and round; the bare interpreter runs in every round."""
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for tree, path in trees.items():
            env = environment(path, url)
            for call, argv in calls("bench").items():
                samples.setdefault((tree, call), []).append(child_cpu_seconds(argv, env))
    return samples


def rows(samples: dict[tuple[str, str], list[float]], trees: Sequence[str]) -> list[list[str]]:
    out = []
    for tree in trees:
        bare = samples[(tree, "python -c pass")]
        for (name, call), values in samples.items():
            if name != tree:
                continue
            excess = [v - b for v, b in zip(values, bare, strict=True)]
            out.append(
                [
                    tree,
                    f"`{call}`",
                    f"{statistics.median(values):.3f}",
                    "" if call == "python -c pass" else f"{statistics.median(excess):+.3f}",
                ]
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--before", type=Path, help="Another streamflow checkout to measure too.")
    parser.add_argument("--redis-url", help="Default: a private redis-server.")
    parser.add_argument("--write", action="store_true", help="Update docs/benchmarks.md.")
    args = parser.parse_args()
    trees = {"after": REPO_ROOT} if args.before is None else {}
    if args.before is not None:
        trees = {f"before ({args.before.name})": args.before, "after": REPO_ROOT}
    with redis_url(args.redis_url) as url:
        samples = measure(trees, url, args.rounds)
    header = ["streamflow", "call", "CPU s (median)", "over `python -c pass`"]
    table = rows(samples, list(trees))
    print(text_table(header, table))
    if args.write:
        write(args, markdown_table(header, table))


def revision(tree: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or str(tree)


def write(args: argparse.Namespace, table: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    before = f"; before: streamflow {revision(args.before)}" if args.before else ""
    body = (
        f"{HEADING}\n\n"
        f"Measured {stamp} by `benchmarks/cli_startup.py --rounds {args.rounds}"
        f"{' --before DIR' if args.before else ''} --write`; machine: {os.cpu_count()} cores, "
        f"shared with other engineers' test runs; streamflow {git_revision()}{before}; "
        f"Python {platform.python_version()}; private redis-server. CPU time (user + system) "
        "of each child process, median of the rounds; the last column is the median excess over "
        "the bare interpreter of the same round. Each call is `python -m streamflow ...` (the "
        "`streamflow` script does the same import).\n\n"
        f"{table}\n\n"
        "The target is at most 0.15 s over the bare interpreter for `--version` and `--help`: "
        "the root group (streamflow/cli/__init__.py) imports a command's module only when that "
        "command runs, and `import streamflow` imports its public names on first use. "
        "`publish` still imports redis, pydantic and the client with its DAG modules: most of "
        "what is left is the cost of those libraries, not of the CLI.\n"
    )
    replace_section(REPO_ROOT / "docs" / "benchmarks.md", HEADING, body)


if __name__ == "__main__":
    main()
