"""Drain rate and worker CPU of several streamflow snapshots against the bare loop, one run.

Each round drains N messages with the bare redis-py loop, then with one worker process per
snapshot (order reversed every other round), all against ONE private redis-server, so the
ratios to the bare loop of the same run compare like with like on a shared machine. A snapshot
is a directory holding a ``streamflow`` package, e.g. of an older commit::

    git archive 074ce1c streamflow | (mkdir -p /tmp/sf-074ce1c && tar -x -C /tmp/sf-074ce1c)
    PYTHONPATH=. .venv/bin/python benchmarks/compare_drain.py /tmp/sf-074ce1c .

The worker process imports the snapshot first on its ``PYTHONPATH`` (``.`` is the work tree);
publishing and the bare loop use this process's streamflow. It prints, per snapshot, the median
drain rate, its ratio to the bare loop's median, the median worker CPU per message (user +
system time of the worker process during the drain) and Redis CPU per message (publish +
drain), with every round's rate; ``--markdown`` also prints the table as markdown.
``--metrics`` has the workers time their handlers (``enable_metrics()``, nothing scraped).
``--profile FILE`` drains once more per snapshot with the worker under cProfile
(``FILE.<snapshot directory name>``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from _common import print_tables, redis_url
from throughput import Drain, bare_loop, on_loop, worker_drain

HEADER = ["drain", "msgs/s (median)", "of bare", "worker CPU us/msg", "Redis CPU us/msg", "runs"]


def drain_with(
    snapshot: str, url: str, n: int, profile: Path | None = None, metrics: str | None = None
) -> Drain:
    """One default-settings worker drain with ``snapshot`` first on the worker's path."""
    os.environ["PYTHONPATH"] = str(Path(snapshot).resolve())
    return on_loop("asyncio", worker_drain, url, n, snapshot, profile=profile, metrics=metrics)


def rows(runs: dict[str, list[Drain]]) -> list[list[str]]:
    bare = statistics.median(d.rate for d in runs["bare"])
    out = []
    for label, drains in runs.items():
        rate = statistics.median(d.rate for d in drains)
        cpu = statistics.median(d.consumer_cpu_us or 0.0 for d in drains)
        redis_cpu = statistics.median(d.redis_cpu_us for d in drains)
        every = ", ".join(f"{d.rate:,.0f}" for d in drains)
        name = "bare redis-py loop" if label == "bare" else f"worker, {label}"
        out.append(
            [name, f"{rate:,.0f}", f"{rate / bare:.0%}", f"{cpu:.2f}", f"{redis_cpu:.2f}", every]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("snapshots", nargs="+", help="directories holding a streamflow package")
    parser.add_argument("--messages", type=int, default=100_000, help="N per drain (100,000)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (4)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--profile", type=Path, metavar="FILE", help="cProfile stats prefix")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument(
        "--metrics", action="store_true", help="workers time handlers (enable_metrics())"
    )
    args = parser.parse_args()
    metrics = "on" if args.metrics else None
    runs: dict[str, list[Drain]] = {"bare": []} | {s: [] for s in args.snapshots}
    with redis_url(args.redis_url) as url:
        for i in range(args.rounds):
            runs["bare"].append(on_loop("asyncio", bare_loop, url, args.messages))
            for snapshot in args.snapshots if i % 2 == 0 else args.snapshots[::-1]:
                runs[snapshot].append(drain_with(snapshot, url, args.messages, metrics=metrics))
            done = ", ".join(f"{k} {v[-1].rate:,.0f}" for k, v in runs.items())
            print(f"round {i + 1}: {done} msgs/s", file=sys.stderr, flush=True)
        for snapshot in args.snapshots if args.profile else ():
            name = Path(snapshot).resolve().name
            out = args.profile.with_name(f"{args.profile.name}.{name}")
            drain_with(snapshot, url, args.messages, profile=out)
            print(f"cProfile stats of the worker ({snapshot}) written to {out}", file=sys.stderr)
    table = rows(runs)
    print_tables(HEADER, table, args.markdown)


if __name__ == "__main__":
    main()
