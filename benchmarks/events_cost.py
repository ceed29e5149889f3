"""What lifecycle events cost a draining worker when nobody subscribes: events on vs off.

One invocation, one private redis-server, rounds alternating the bare redis-py loop, a worker
with its role's events off and one with them on (the default), so that the ratios compare like
with like on a shared machine. Each figure is the median of the rounds; ``Redis CPU`` is the
server's CPU per message (publish and drain); the worker writes two events per job,
``started`` and ``succeeded`` (as ``lifecycle_jobs`` items: one per millisecond of starts, one
per acknowledged batch), up to 100 to a stream entry, in one round trip per 50 ms.

    PYTHONPATH=. .venv/bin/python benchmarks/events_cost.py [--quick] [--rounds 3] [--write]
"""

from __future__ import annotations

import statistics

from _common import REPO_ROOT, run_rounds
from throughput import DEFAULT_MESSAGES, QUICK_MESSAGES, Drain, bare_loop, worker_drain

DOC = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Lifecycle events (cost when nobody subscribes)"


async def one_round(url: str, n: int) -> tuple[Drain, Drain, Drain]:
    bare = await bare_loop(url, n)
    off = await worker_drain(url, n, "events off", events="off")
    on = await worker_drain(url, n, "events on", events="on")
    return bare, off, on


def median(drains: list[Drain], what: str) -> float:
    return statistics.median(float(getattr(d, what)) for d in drains)


def render(rounds: list[tuple[Drain, Drain, Drain]], n: int, date: str) -> str:
    bare, off, on = ([r[i] for r in rounds] for i in range(3))
    off_ratio = statistics.median(o.rate / b.rate for b, o, _ in rounds)
    on_ratio = statistics.median(o.rate / b.rate for b, _, o in rounds)
    ratios = [on_.rate / off_.rate for _, off_, on_ in rounds]
    on_vs_off = statistics.median(ratios)
    worker_cost = median(on, "consumer_cpu_us") - median(off, "consumer_cpu_us")
    redis_cost = median(on, "redis_cpu_us") - median(off, "redis_cpu_us")
    lines = [
        SECTION,
        "",
        f"_{date}; {n:,} messages per drain, {len(rounds)} rounds alternating bare / off / on; "
        "medians; no subscriber. Reproduce: `PYTHONPATH=. .venv/bin/python "
        "benchmarks/events_cost.py --write`._",
        "",
        "| | msgs/s | of bare | Redis CPU µs/msg | worker CPU µs/msg |",
        "|---|---:|---:|---:|---:|",
        f"| bare redis-py loop | {median(bare, 'rate'):,.0f} | 100% | "
        f"{median(bare, 'redis_cpu_us'):.1f} | {median(bare, 'consumer_cpu_us'):.1f} |",
        f"| worker, events off | {median(off, 'rate'):,.0f} | {off_ratio:.0%} | "
        f"{median(off, 'redis_cpu_us'):.1f} | {median(off, 'consumer_cpu_us'):.1f} |",
        f"| worker, events on (default) | {median(on, 'rate'):,.0f} | {on_ratio:.0%} | "
        f"{median(on, 'redis_cpu_us'):.1f} | {median(on, 'consumer_cpu_us'):.1f} |",
        "",
        f"Events on drain at {on_vs_off:.0%} of events off (median of the rounds' ratios; the "
        f"rounds ranged {min(ratios):.0%} to {max(ratios):.0%} on this shared machine). The "
        f"CPU figures are steadier: events cost the worker {worker_cost:+.1f} µs and Redis "
        f"{redis_cost:+.1f} µs per message (two events per job, `started` and `succeeded`, as "
        "`lifecycle_jobs` items, up to 100 events to a stream entry, one round trip per 50 ms).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run_rounds(
        argv,
        DOC,
        SECTION,
        (DEFAULT_MESSAGES, QUICK_MESSAGES),
        one_round,
        lambda r: f"bare {r[0].rate:,.0f}, off {r[1].rate:,.0f}, on {r[2].rate:,.0f}",
        render,
        __doc__.splitlines()[0] if __doc__ else None,
    )


if __name__ == "__main__":
    main()
