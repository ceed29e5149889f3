"""How long a partition's jobs stall while ``redis-cli --cluster reshard`` moves its slot.

Starts a private Redis Cluster (3 masters, a replica each, as tests/test_cluster_ops.py does),
puts M dedup markers in the slot of the first partition of a 3-partition role, starts two
``streamflow worker`` processes and a publisher that publishes jobs one by one with a dedup key
each (retrying on ``RedisUnavailable``), then reshards that slot R times back and forth
between two masters with ``redis-cli --cluster reshard``, each time after putting a backlog of
jobs on that partition. For each reshard it reports how long redis-cli took, the worker's
stall (the longest time during the reshard in which no job of the backlog finished, from the
handlers' record, see tests/apps.py) and the stall of the publishes with a dedup key to that
partition. It ends by checking that every acknowledged job was handled. Writes the section
"Resharding stall" of docs/benchmarks.md with --write.

    PYTHONPATH=. .venv/bin/python benchmarks/reshard_stall.py [--markers 20000] [--repeats 6]
        [--backlog 3000] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import REPO_ROOT, git_revision, markdown_table, replace_section
from streamflow import Client
from streamflow.ops.server import RedisServer
from streamflow.partitions import partition_of
from tests.cluster import local_cluster
from tests.helpers import wait_for
from tests.test_cluster_ops import (
    ROLE,
    SLOT,
    Load,
    fill_markers,
    master_of_slot,
    reshard_through,
)

HEADING = "## Resharding stall"


def gap(times: list[float], start: float, end: float) -> float:
    """The longest time in [start, end] without one of ``times``."""
    inside = sorted(t for t in times if start <= t <= end)
    return max(b - a for a, b in itertools.pairwise([start, *inside, end]))


async def publish_backlog(url: str, namespace: str, count: int) -> set[str]:
    """``count`` 10 ms jobs on the first partition (no dedup key); their message ids."""
    async with Client.from_url(url, namespace=namespace) as client:
        key = next(k for k in (f"k{i}" for i in range(100)) if partition_of(k, 3) == 0)
        # 10 ms each: the 2 workers' 8 handler slots take several seconds over the backlog.
        jobs = [{"seconds": 0.01}] * count
        return set(await client.publish_many(ROLE, jobs, keys=[key] * count))


@dataclass
class Reshard:
    seconds: float
    publish_stall: float
    worker_stall: float


def one_reshard(load: Load, to: RedisServer, backlog: int) -> Reshard:
    """Reshard the partition's slot to ``to`` while the workers drain a backlog on it."""
    ids = anyio.run(publish_backlog, load.cluster.url, load.namespace, backlog)
    began = time.time()
    seconds = reshard_through(load.cluster, SLOT, to)
    ended = began + seconds
    wait_for(lambda: ids <= load.record.ids("DONE"), 60, "the backlog drained")
    done = {line.message_id: line.at for line in load.record.events("DONE")}
    backlog_times = [at for message_id, at in done.items() if message_id in ids]
    if max(backlog_times, default=0.0) < ended:
        raise RuntimeError("the backlog was drained before the reshard ended: make it larger")
    published = [
        at
        for message_id, at in done.items()
        if message_id not in ids and partition_of(message_id, 3) == 0
    ]
    return Reshard(
        seconds,
        gap(published, began - 0.1, ended + 0.1),
        gap(backlog_times, began - 0.1, ended + 0.1),
    )


def measure(markers: int, repeats: int, backlog: int) -> list[Reshard]:
    """One :class:`Reshard` per reshard, back and forth."""
    out = []
    with (
        local_cluster(replicas=1, node_timeout_ms=2000) as cluster,
        tempfile.TemporaryDirectory(prefix="reshard-stall-") as tmp,
    ):
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        home = master_of_slot(cluster, SLOT)
        other = next(m for m in cluster.masters() if m is not home)
        fill_markers(home, namespace, ROLE, markers)
        load = Load(cluster, namespace, Path(tmp))
        try:
            load.start()
            for repeat in range(repeats):
                out.append(one_reshard(load, other if repeat % 2 == 0 else home, backlog))
                print(f"reshard {repeat + 1}: {out[-1]}", flush=True)
            outcome = load.finish(time.monotonic())
        finally:
            load.close()
        if outcome.lost:
            raise RuntimeError(f"{len(outcome.lost)} acknowledged jobs never handled")
        print(f"published {outcome.published}, run twice {sum(outcome.duplicated.values())}")
    return out


def report(results: list[Reshard], args: argparse.Namespace) -> str:
    rows = []
    for what, values in (
        ("redis-cli reshard", [r.seconds for r in results]),
        ("worker stall on the partition's backlog", [r.worker_stall for r in results]),
        ("dedup publishes to the partition stalled", [r.publish_stall for r in results]),
    ):
        rows.append([what, f"{statistics.median(values):.2f} s", f"{max(values):.2f} s"])
    table = markdown_table(["", "p50", "max"], rows)
    print(table)
    return (
        f"{HEADING}\n\n"
        f"`benchmarks/reshard_stall.py --markers {args.markers} --repeats {args.repeats} "
        f"--backlog {args.backlog}` on {time.strftime('%Y-%m-%d')}, streamflow "
        f"{git_revision()}, Python {platform.python_version()}: a private cluster of 3 masters "
        f"with a replica each on loopback, {args.markers:,} dedup markers in the slot of the "
        "first partition of a 3-partition role, 2 `streamflow worker` processes and a "
        "publisher publishing one job at a time with a dedup key; before each reshard "
        f"{args.backlog:,} more jobs are put on that partition, and `redis-cli --cluster "
        f"reshard` moves its slot (back and forth, {args.repeats} times) while the workers "
        "drain them. **Machine: 2 cores, shared and noisy.**\n\n"
        f"{table}\n\n"
        "The worker stall is the longest time during the reshard in which no job of the "
        "backlog finished; the publish stall the same for the jobs published one by one with "
        "a dedup key, whose script is refused (`TRYAGAIN`, then `RedisUnavailable` and a "
        "retry) from the first key of the slot moved to the last. Nothing was lost or run "
        "twice.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markers", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    section = report(measure(args.markers, args.repeats, args.backlog), args)
    if args.write:
        replace_section(REPO_ROOT / "docs" / "benchmarks.md", HEADING, section)


if __name__ == "__main__":
    main()
