"""Worker instructions per message (valgrind), for several streamflow snapshots and the bare loop.

CPU time on a shared 2-core machine swings by ±30% between runs, too much to show a 5-10%
change. An instruction count does not depend on the load: valgrind runs the draining process
on its synthetic CPU and counts the instructions it executes (``Ir``), the same total whatever
else the machine does. Each variant is counted twice, draining ``--base`` messages (2,000) and
``--messages`` N (20,000), and the figure is the difference over the extra messages::

    instructions per message = (Ir(N) - Ir(base)) / (N - base)

so that interpreter start-up, imports, connecting, the first batches' warm-up and shutdown
(all the same in both runs) cancel out. The variants, on ONE private redis-server (whose own
speed does not matter: only the worker process is counted):

* ``bare``: the bare redis-py loop of ``throughput.py`` (``bare_drain``: XREADGROUP COUNT 100,
  each batch's XACK pipelined with the next read) in its own process, messages XADDed like
  there; the reference of the ratio column.
* each snapshot given: a directory holding a ``streamflow`` package (``.`` is the work tree,
  or a ``git archive <commit> streamflow | tar -x -C DIR`` snapshot, see compare_drain.py),
  first on the worker's ``PYTHONPATH``; N no-op jobs published with ``Client.publish_many``
  (this process's streamflow), then ``_worker.py drain`` (``Worker.drain()``, defaults).

    PYTHONPATH=. .venv/bin/python benchmarks/instructions.py /tmp/sf-before . [--markdown]

The default tool is cachegrind without cache simulation, the cheapest that counts every
instruction (about twice as fast as callgrind); ``--tool callgrind`` gives the same totals and
a per-function profile (``--keep DIR`` keeps the output files: ``callgrind_annotate FILE``).
``PYTHONHASHSEED`` is fixed, so that hashing and set order are the same in every run. A figure
counts only the draining process; it is not a time (a cache miss or a system call counts as
one instruction), but it moves with the Python work done per message.

Counting is exact, but the worker's work is not quite the same from run to run: how many
entries each read and each settle call takes depends on when Redis's replies arrive against
the worker's event loop (the table gives XREADGROUP and EVALSHA calls per 1,000 messages
beside each figure), so repeats differ by a few per cent (the bare loop's batches are fixed:
within ~1%). ``--repeats R`` counts every variant R times (the table gives the median and each
figure). And under valgrind the worker runs ~50 times slower while its timers (the event log's
50 ms linger, retry polls, renewals) follow the clock: ``--time-scale`` (50) slows the worker's
event-loop clock as much (``_worker.py --time-scale``), so that they fire about as often per
message as natively, and a loaded machine (a longer run) adds few. ``--events off`` counts the
role without lifecycle events. About a minute per variant and repeat with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from _common import (
    BENCH_DIR,
    REPO_ROOT,
    WorkerProcess,
    pending_count,
    print_tables,
    redis_url,
)
from redis.asyncio import Redis
from throughput import PUBLISH_CHUNK, bare_drain, sample_body

from streamflow import Client
from streamflow.errors import UnknownRoleWarning
from streamflow.keys import GROUP, Keys

BARE = "bare"
#: XREADGROUP and EVALSHA calls of a drain.
Calls = tuple[int, int]
SCRIPT = Path(__file__).resolve()
HEADER = [
    "consumer",
    "instructions/msg",
    "of bare",
    "fixed Ir (M)",
    "reads/1k msgs",
    "scripts/1k msgs",
    "runs",
]
#: Valgrind slows the process ~50-100 times: minutes, not seconds, per drain.
TIMEOUT_S = 300.0
TIMEOUT_PER_MSG_S = 0.01
#: About valgrind's slowdown: the worker's timers fire about as often per message as natively.
TIME_SCALE = 50.0


@dataclass
class Count:
    """One variant's counts at the two sizes."""

    base: int
    messages: int
    ir_base: int
    ir_messages: int
    #: XREADGROUP and EVALSHA calls of the big run's drain per 1,000 messages (its batching).
    reads_per_1k: float
    scripts_per_1k: float

    @property
    def per_message(self) -> float:
        return (self.ir_messages - self.ir_base) / (self.messages - self.base)

    @property
    def fixed(self) -> float:
        """What the run costs besides its messages: start-up, imports, shutdown."""
        return self.ir_base - self.base * self.per_message


def valgrind_argv(tool: str, out: Path) -> list[str]:
    """The valgrind prefix that counts every instruction of the process into ``out``."""
    options = ["--cache-sim=no"] if tool == "cachegrind" else []
    return ["valgrind", "-q", f"--tool={tool}", *options, f"--{tool}-out-file={out}"]


def total_ir(out: Path) -> int:
    """The ``summary:`` line of a cachegrind or callgrind output file (events: Ir first)."""
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary line in {out}")


async def drain_calls(admin: Redis) -> Calls:
    """XREADGROUP and EVALSHA calls Redis served since the last ``CONFIG RESETSTAT``."""
    stats = await admin.info("commandstats")
    reads, scripts = (
        stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("xreadgroup", "evalsha")
    )
    return int(reads), int(scripts)


async def count_worker(
    url: str, n: int, prefix: list[str], out: Path, args: argparse.Namespace
) -> tuple[int, Calls]:
    """Publish n jobs, drain them with one worker process under valgrind; its Ir."""
    warnings.simplefilter("ignore", UnknownRoleWarning)  # the worker starts after publishing
    namespace = f"instr-{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    stream = keys.role_stream("bench")
    admin = Redis.from_url(url)
    client = Client.from_url(url, namespace=namespace)
    try:
        await client.publish_many("bench", [{"i": i} for i in range(n)])
        await admin.config_resetstat()
        options = {"events": args.events, "time_scale": args.time_scale}
        worker = WorkerProcess("drain", url, namespace, options)
        worker.argv = [*prefix, *worker.argv]  # before it starts: valgrind runs the worker
        async with worker:
            async with asyncio.timeout(TIMEOUT_S + n * TIMEOUT_PER_MSG_S):
                report = await worker.wait_event("drained")
                code = await worker.wait()
        left, pending = await admin.xlen(stream), await pending_count(admin, stream, GROUP)
        if report["acked"] != n or left or pending or code:
            raise RuntimeError(f"worker: acked {report['acked']}/{n}, {left=}, {pending=}, {code=}")
        return total_ir(out), await drain_calls(admin)
    finally:
        await admin.delete(stream, keys.dead_letters("bench"), keys.lifecycle())
        await admin.aclose()
        await client.aclose()


async def count_bare(url: str, n: int, prefix: list[str], out: Path) -> tuple[int, Calls]:
    """XADD n messages (as throughput.py's bare loop), drain them under valgrind; its Ir."""
    key = f"instr-bare-{uuid.uuid4().hex[:8]}:stream"
    admin = Redis.from_url(url)
    try:
        await admin.xgroup_create(key, "g", id="0", mkstream=True)
        body = sample_body(0)
        for start in range(0, n, PUBLISH_CHUNK):
            pipe = admin.pipeline(transaction=False)
            for _ in range(min(PUBLISH_CHUNK, n - start)):
                pipe.xadd(key, {b"message": body})
            await pipe.execute()
        await admin.config_resetstat()
        argv = [*prefix, sys.executable, str(SCRIPT), "--bare", url, key]
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=BENCH_DIR,
            # The work tree's throughput.py and streamflow, whatever snapshot was counted before.
            env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(TIMEOUT_S + n * TIMEOUT_PER_MSG_S):
            stdout, _ = await process.communicate()
        handled = json.loads(stdout.splitlines()[-1])["handled"] if stdout else 0
        pending = await pending_count(admin, key, "g")
        if handled != n or pending or process.returncode:
            raise RuntimeError(f"bare: handled {handled}/{n}, {pending=}, {process.returncode=}")
        return total_ir(out), await drain_calls(admin)
    finally:
        await admin.delete(key)
        await admin.aclose()


async def bare_process(url: str, key: str) -> None:
    """The bare loop's process: drain ``key`` and print how many entries it handled."""
    redis = Redis.from_url(url)
    try:
        print(json.dumps({"handled": await bare_drain(redis, key)}), flush=True)
    finally:
        await redis.aclose()


def measure(variant: str, url: str, sizes: tuple[int, int], args: argparse.Namespace) -> Count:
    """Count ``variant`` (``bare`` or a snapshot directory) at both sizes."""
    if variant != BARE:
        # Byte-compiled first: a fresh snapshot's first worker would count compiling it.
        compile_all = [sys.executable, "-m", "compileall", "-q", str(Path(variant) / "streamflow")]
        subprocess.run(compile_all, check=True, stdout=subprocess.DEVNULL)
    counts = []
    for n in sizes:
        name = "bare" if variant == BARE else Path(variant).resolve().name
        out = args.keep / f"{args.tool}.{name}.{n}.{uuid.uuid4().hex[:6]}.out"
        prefix = valgrind_argv(args.tool, out)
        if variant == BARE:
            counts.append(asyncio.run(count_bare(url, n, prefix, out)))
        else:
            # The snapshot first on the worker's path (WorkerProcess appends the repo root).
            os.environ["PYTHONPATH"] = str(Path(variant).resolve())
            counts.append(asyncio.run(count_worker(url, n, prefix, out, args)))
    (ir_base, _), (ir_messages, (reads, scripts)) = counts
    per_1k = 1000 / sizes[1]
    return Count(*sizes, ir_base, ir_messages, reads * per_1k, scripts * per_1k)


def rows(counts: dict[str, list[Count]]) -> list[list[str]]:
    bare = statistics.median(c.per_message for c in counts[BARE])
    out = []
    for variant, runs in counts.items():
        per = statistics.median(c.per_message for c in runs)
        name = "bare redis-py loop" if variant == BARE else f"worker, {variant}"
        out.append(
            [
                name,
                f"{per:,.0f}",
                f"{per / bare:.2f}x",
                f"{statistics.median(c.fixed for c in runs) / 1e6:,.0f}",
                f"{statistics.median(c.reads_per_1k for c in runs):.1f}",
                f"{statistics.median(c.scripts_per_1k for c in runs):.1f}",
                ", ".join(f"{c.per_message:,.0f}" for c in runs),
            ]
        )
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("snapshots", nargs="*", help="directories holding a streamflow package")
    parser.add_argument("--messages", type=int, default=20_000, help="N of the big run (20,000)")
    parser.add_argument("--base", type=int, default=2_000, help="N of the small run (2,000)")
    parser.add_argument("--repeats", type=int, default=1, help="count each variant R times (1)")
    parser.add_argument("--tool", choices=["cachegrind", "callgrind"], default="cachegrind")
    parser.add_argument(
        "--events",
        choices=["on", "off"],
        default="on",
        help="the role's lifecycle events (on, the default role's; off: no flush every 50 ms)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=TIME_SCALE,
        help=f"the worker's event-loop clock this many times slower ({TIME_SCALE:g})",
    )
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep valgrind's output files")
    parser.add_argument("--redis-url", help="use this Redis instead of starting a private one")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument("--bare", nargs=2, metavar=("URL", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.bare and not 0 < args.base < args.messages:
        parser.error("need 0 < --base < --messages")
    return args


def run(args: argparse.Namespace) -> dict[str, list[Count]]:
    # The same hash seed in every process: dict and set order, so the counts, repeat exactly.
    os.environ["PYTHONHASHSEED"] = "0"
    counts: dict[str, list[Count]] = {v: [] for v in [BARE, *args.snapshots]}
    sizes = (args.base, args.messages)
    with redis_url(args.redis_url) as url:
        for i in range(args.repeats):
            for variant in counts:
                counts[variant].append(measure(variant, url, sizes, args))
                per = counts[variant][-1].per_message
                print(f"repeat {i + 1}: {variant}: {per:,.0f} Ir/msg", file=sys.stderr, flush=True)
    return counts


def main() -> None:
    args = parse_args()
    if args.bare:
        asyncio.run(bare_process(*args.bare))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found (apt-get install valgrind)")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        counts = run(args)
    else:
        with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
            args.keep = Path(tmp)
            counts = run(args)
    table = rows(counts)
    print(f"instructions per message = (Ir({args.messages}) - Ir({args.base})) / difference")
    print_tables(HEADER, table, args.markdown)


if __name__ == "__main__":
    main()
