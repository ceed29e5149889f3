"""Prometheus metrics, health checks and the HTTP server that serves them.

Each worker and coordinator process has its own registry. Most figures are counters the
process keeps anyway (the settler's outcomes, the lease keeper's renewals, the coordinator's
events): a collector reads them at scrape time, so metrics cost the hot path nothing but the
handler-duration histogram, which is a middleware (:class:`HandlerTiming`, see
:mod:`streamflow.middleware`). Queue-level gauges (stream length, lag, pending, ...) are per role,
not per process: ``streamflow exporter`` serves them once for the namespace, so that they are
not counted once per worker (see docs/metrics.md).

The server runs in a thread (prometheus-client's WSGI app behind ``wsgiref``), so a scrape never
waits for the event loop; ``/healthz`` reports whether the loop still turns, ``/readyz`` whether
the process reaches Redis and has set up its streams.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from streamflow import connect
from streamflow.context import Context
from streamflow.middleware import CallNext, Middleware

if TYPE_CHECKING:
    from streamflow.dag.coordinator import Coordinator
    from streamflow.worker import Worker

#: Handler duration buckets (seconds): from sub-millisecond handlers to ten-minute jobs.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    600.0,
)
#: Latency buckets (seconds) for cancel and batch-to-dispatch latencies.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Health:
    """Liveness and readiness of one process, for ``/healthz`` and ``/readyz``.

    Args:
        redis: The client whose connection is checked.
        interval: Seconds between heartbeats and Redis pings.
        stale_after: A heartbeat or successful ping older than this fails the check.
    """

    def __init__(self, redis: Redis, *, interval: float = 1.0, stale_after: float = 5.0) -> None:
        self._redis = redis
        self._interval = interval
        self._stale = stale_after
        self._beat = time.monotonic()
        self._redis_ok: float | None = None
        self.started = False  # set once the process set up its streams and groups

    async def run(self) -> None:
        """Beat and ping forever (run it in the process's task group)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._beat_forever)
            await self._ping_forever()

    async def _beat_forever(self) -> None:
        # Apart from the pings: a hung Redis must not look like a stuck event loop.
        while True:
            self._beat = time.monotonic()
            await anyio.sleep(self._interval)

    async def _ping_forever(self) -> None:
        while True:
            try:
                with anyio.fail_after(self._stale):
                    await self._redis.ping()
            except (*connect.TRANSIENT_ERRORS, TimeoutError):
                self._redis_ok = None
            else:
                self._redis_ok = time.monotonic()
            await anyio.sleep(self._interval)

    def live(self) -> tuple[bool, str]:
        """Whether the event loop still turns."""
        age = time.monotonic() - self._beat
        return age < self._stale + self._interval, f"event loop heartbeat {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        """Whether the process is set up and Redis answers."""
        if not self.started:
            return False, "starting"
        if self._redis_ok is None or time.monotonic() - self._redis_ok > self._stale:
            return False, "Redis does not answer"
        return True, "ready"


class WorkerCollector(Collector):
    """The metrics of one worker, read from its counters at scrape time."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        """Yield the worker's metric families."""
        worker = self._worker
        stats = worker.statistics()
        messages = CounterMetricFamily(
            "streamflow_messages",
            "Deliveries by how they ended: acked, retried, dead_lettered (handler failures, "
            "poison, expired), rejected (malformed input, dead-lettered), cancelled, released "
            "(handed back on shutdown), lost (the lease was lost), parked (held back by its "
            "limit key; it runs later as a new entry).",
            labels=["role", "outcome"],
        )
        for (role, outcome), count in sorted(stats.by_role.items()):
            messages.add_metric([role, outcome], count)
        yield messages
        dead = CounterMetricFamily(
            "streamflow_dead_letters",
            "Dead-lettered deliveries by reason.",
            labels=["role", "reason"],
        )
        for (role, reason), count in sorted(stats.dead_by_role.items()):
            dead.add_metric([role, reason], count)
        yield dead
        yield _per_role(
            "streamflow_redeliveries",
            "Deliveries of entries delivered before (adopted from a dead worker, or resumed).",
            stats.redeliveries,
        )
        yield _per_role(
            "streamflow_reclaims",
            "Entries this worker adopted after their lease expired.",
            stats.reclaims,
        )
        yield _counter("streamflow_lease_renewals", "Entry leases renewed.", stats.renewals)
        losses = CounterMetricFamily(
            "streamflow_lease_losses",
            "Leases found lost (another worker owns the entry, or it is gone), by where: "
            "renewal (the handler was running: cancelled), settle (the handler had run: its "
            "outcome was refused), unstarted (found before the handler started here). "
            "renewal and settle may mean a handler ran twice.",
            labels=["found"],
        )
        for found in ("renewal", "settle", "unstarted"):
            losses.add_metric([found], stats.lease_losses.get(found, 0))
        yield losses
        yield _counter(
            "streamflow_ack_replies_lost",
            "Acknowledgements whose reply was lost and whose entries were then no longer "
            "pending: taken as applied.",
            stats.ack_replies_lost,
        )
        yield _labelled(
            CounterMetricFamily,
            "streamflow_loop_stalls",
            "Times the event loop did not run for longer than the stall threshold: blocked "
            "(code on the loop, usually a handler, did not yield) or frozen (the whole process "
            "was paused).",
            "kind",
            {kind: stats.loop_stalls.get(kind, 0) for kind in ("blocked", "frozen")},
        )
        yield _counter(
            "streamflow_cancel_signals",
            "Cancel signals this worker received.",
            stats.cancel_signals,
        )
        yield _bad_records(stats.bad_records)
        yield from _redis_outages()
        yield _gauge(
            "streamflow_in_flight_entries",
            "Entries held: running or queued for a slot.",
            stats.in_flight,
        )
        yield _gauge(
            "streamflow_concurrency_limit", "Handlers this worker runs at once.", worker.concurrency
        )
        yield _labelled(
            GaugeMetricFamily,
            "streamflow_role_paused",
            "1 while a role this worker serves is paused (streamflow pause): no new jobs of it "
            "start here; else 0.",
            "role",
            {role: 1 if is_paused else 0 for role, is_paused in stats.paused.items()},
        )
        yield _per_role(
            "streamflow_limit_waits",
            "Reads of a limited role held back by its rate or concurrency limit (streamflow "
            "limit): the reader waited for the next start or a free running slot.",
            stats.limit_waits,
        )
        yield _labelled(
            GaugeMetricFamily,
            "streamflow_limit_slots",
            "Running slots of a concurrency-limited role this worker holds (its jobs held).",
            "role",
            stats.limit_slots,
        )
        yield _per_role(
            "streamflow_key_limit_parks",
            "Jobs this worker parked because their limit key was at its per-key concurrency or "
            "rate (key_concurrency, key_rate_limit): moved out of the stream until woken.",
            stats.key_parks,
        )
        yield _per_role(
            "streamflow_key_limit_wakes",
            "Parked jobs this worker woke (moved back to the stream) when a slot of their key "
            "freed or their key's wake time came.",
            stats.key_wakes,
        )
        yield _labelled(
            GaugeMetricFamily,
            "streamflow_key_limit_slots",
            "Per-key running slots this worker holds (its jobs of key-limited roles).",
            "role",
            stats.key_slots,
        )


class HygieneCollector(Collector):
    """A worker's counts of work lost to trimming and of dead consumer names it deleted."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        """Yield the families."""
        stats = self._worker.statistics()
        yield _per_role(
            "streamflow_trimmed_pending_entries",
            "Pending entries found deleted from the stream (trimmed, XDEL) before they were "
            "settled: lost work, reported by XAUTOCLAIM when adopting.",
            stats.trimmed,
        )
        yield _consumers_deleted(stats.consumers_deleted)


class CoordinatorCollector(Collector):
    """The metrics of one coordinator, read from its counters at scrape time."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        """Yield the coordinator's metric families."""
        coord = self._coordinator
        yield _counter(
            "streamflow_coordinator_events", "Task events processed.", coord.events_processed
        )
        yield _counter(
            "streamflow_coordinator_dispatches", "Node jobs published.", coord.dispatches
        )
        yield _counter("streamflow_coordinator_commits", "Task steps committed.", coord.commits)
        yield _counter(
            "streamflow_coordinator_commit_conflicts",
            "Commits that lost a race with another coordinator (and were retried).",
            coord.conflicts,
        )
        yield _consumers_deleted(coord.consumers_deleted)
        yield _counter(
            "streamflow_coordinator_trimmed_events",
            "Pending task events found deleted from their stream before they were applied.",
            coord.trimmed_events,
        )
        yield _labelled(
            CounterMetricFamily,
            "streamflow_coordinator_tasks_finished",
            "Tasks this coordinator finished, by final state.",
            "state",
            coord.finished,
        )
        yield _labelled(
            CounterMetricFamily,
            "streamflow_coordinator_submissions",
            "Entries of the task submissions stream this coordinator took, by outcome.",
            "outcome",
            coord.submissions,
        )
        yield _bad_records(coord.bad_records())
        yield from _redis_outages()


def worker_registry(worker: Worker) -> tuple[CollectorRegistry, Middleware]:
    """A registry with the worker's metrics, and the middleware that times its handlers."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(WorkerCollector(worker))
    registry.register(HygieneCollector(worker))
    durations = Durations()
    registry.register(durations)
    cancel = Histogram(
        "streamflow_cancel_latency_seconds",
        "From a cancel signal's creation to the handler it matched stopping.",
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    worker.observe_cancel_latency(cancel.observe)
    renewals = Histogram(
        "streamflow_lease_renewal_seconds",
        "How long one lease renewal round took (the consumer name and every held entry, one "
        "script call per stream). Leases expire if rounds take longer than the TTL minus the "
        "renewal period.",
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    worker.observe_renewals(renewals.observe)
    return registry, HandlerTiming(durations.observe)


class HandlerTiming(Middleware):
    """The middleware that times each handler call for ``streamflow_handler_duration_seconds``.

    Args:
        observe: Called with the role and the seconds the call took, however it ended.
    """

    def __init__(self, observe: Callable[[str, float], None]) -> None:
        self._observe = observe

    async def handle(self, ctx: Context, payload: Any, call_next: CallNext) -> Any:
        """Time the rest of the chain (the handler: this one is installed innermost)."""
        started = time.perf_counter()
        try:
            return await call_next(ctx, payload)
        finally:
            self._observe(ctx.role, time.perf_counter() - started)


class Durations(Collector):
    """The handler-duration histogram, by role, kept as plain counts.

    prometheus-client's ``Histogram.observe`` takes locks and scans every bucket (about 0.7 us,
    5% of a short job's cost in the worker); here one observe is a bisect and two additions on
    the event loop's thread, and a scrape (another thread) reads the counts as they are.
    """

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self._bounds = buckets
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def observe(self, role: str, seconds: float) -> None:
        """Count one handler run of ``role`` that took ``seconds``."""
        counts = self._counts.get(role)
        if counts is None:
            counts = self._counts[role] = [0] * (len(self._bounds) + 1)
            self._sums[role] = 0.0
        counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self._sums[role] += seconds

    def collect(self) -> Iterator[Metric]:
        """Yield the histogram family."""
        family = HistogramMetricFamily(
            "streamflow_handler_duration_seconds",
            "Handler run time, by role (successes and failures).",
            labels=["role"],
        )
        for role, counts in sorted(self._counts.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self._bounds, float("inf")), list(counts), strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            family.add_metric([role], buckets, sum_value=self._sums[role])
        yield family


def coordinator_registry(coordinator: Coordinator) -> CollectorRegistry:
    """A registry with the coordinator's metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(CoordinatorCollector(coordinator))
    latency = Histogram(
        "streamflow_coordinator_batch_to_dispatch_seconds",
        "From a batch's report to the end of the step it caused (its children dispatched).",
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    coordinator.observe_dispatch = latency.observe
    return registry


#: Where the metrics server listens unless told otherwise: loopback only.
DEFAULT_HOST = "127.0.0.1"


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` from a thread; 404 for any other path.

    Counters and histograms are served without their ``_created`` series (a timestamp per
    series that no dashboard reads, doubling what is scraped): serving turns them off for the
    whole process (:func:`prometheus_client.disable_created_metrics`).

    Args:
        registry: The metrics to serve.
        health: The process's health.
        port: The TCP port (0: any free one; see :attr:`port`).
        host: The address to listen on: loopback by default; ``0.0.0.0`` (or ``::``) to be
            scraped from other hosts or from outside a container.
    """

    def __init__(
        self, registry: CollectorRegistry, health: Health, *, port: int, host: str = DEFAULT_HOST
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        metrics_app = make_wsgi_app(registry)
        self._health = health

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path in ("/healthz", "/readyz"):
                ok, detail = health.live() if path == "/healthz" else health.ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
                return [detail.encode() + b"\n"]
            if path != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
                return [b"not found: metrics are on /metrics, health on /healthz and /readyz\n"]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        self._server: WSGIServer = make_server(host, port, app, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="streamflow-metrics", daemon=True
        )

    def __enter__(self) -> MetricsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one line per scrape would drown the process's logs)."""


_Family = TypeVar("_Family", CounterMetricFamily, GaugeMetricFamily)


def _labelled(
    family_type: type[_Family],
    name: str,
    documentation: str,
    label: str,
    values: Mapping[str, float],
) -> _Family:
    """A family with one ``label`` and a sample per entry of ``values``, sorted by label."""
    family = family_type(name, documentation, labels=[label])
    for value_label, value in sorted(values.items()):
        family.add_metric([value_label], value)
    return family


def _bad_records(counts: dict[str, int]) -> CounterMetricFamily:
    return _labelled(
        CounterMetricFamily,
        "streamflow_bad_records",
        "Malformed records read back from Redis and skipped (a cancel marker, the cancel "
        "index, the signals stream, a signal, the known roles, a role's flow control), by kind.",
        "kind",
        counts,
    )


def _consumers_deleted(count: int) -> CounterMetricFamily:
    return _counter(
        "streamflow_consumers_deleted",
        "Consumer names of stopped processes this process deleted (they held nothing).",
        count,
    )


def _redis_outages() -> Iterator[Metric]:
    """The process's Redis outage counters (every Redis loop of the process counts in them)."""
    yield _counter(
        "streamflow_redis_reconnects",
        "Recoveries from a Redis outage, counted by each Redis loop of the process.",
        connect.Backoff.recoveries,
    )
    yield _counter(
        "streamflow_redis_outages",
        "Redis outages met (lost connection, OOM, READONLY, LOADING, ...), counted by each "
        "Redis loop of the process when the outage starts.",
        connect.Backoff.outages,
    )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _per_role(name: str, documentation: str, counts: dict[str, int]) -> CounterMetricFamily:
    return _labelled(CounterMetricFamily, name, documentation, "role", counts)
