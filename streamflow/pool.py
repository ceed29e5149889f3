"""The consumer tasks: a worker's deliveries queued, handled and settled.

``concurrency`` consumers take deliveries from one shared queue. An idle consumer waits on a
future of its own (an event loop future, not an anyio event: the hand-off from the reader to a
consumer is on the path of an idle worker's every message) and is woken one at a time: a woken
consumer that finds more queued wakes the next, so slow handlers fan out over every consumer
while a burst of fast ones is drained by one or two consumers without a task switch per entry.
Each consumer runs decode -> preflight -> execute (:mod:`streamflow.runner`) inside its cancel
scope and applies the decision through :mod:`streamflow.settle`. The worker
(:mod:`streamflow.worker`) wires this and runs it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

from streamflow import decisions
from streamflow.app import Role
from streamflow.decisions import ACK
from streamflow.delivery import Decision, Delivery, InFlight
from streamflow.intake import ReadAhead
from streamflow.protocol import now_ms
from streamflow.runner import Runner
from streamflow.settle import Settler
from streamflow.signals import StopReporter
from streamflow.streams import Entry


class ConsumerPool:
    """Runs a worker's handlers on ``concurrency`` consumer tasks fed from one queue.

    Args:
        runner: Takes each delivery from entry to decision.
        settler: Applies every decision.
        cancels: Reports the handlers that a cancel stopped.
        held: The worker's held deliveries (a dispatched one is held until it is settled).
        read_ahead: The reader's capacity, freed as handling ends.
        stopping: Set when the worker is asked to stop.
        concurrency: How many consumer tasks run.
        unsafe_after: Seconds after a lease confirmation past which a delivery's lease is
            checked again before its handler starts.
    """

    def __init__(
        self,
        runner: Runner,
        settler: Settler,
        cancels: StopReporter,
        held: InFlight,
        read_ahead: ReadAhead,
        stopping: anyio.Event,
        *,
        concurrency: int,
        unsafe_after: float,
    ) -> None:
        self._runner = runner
        self._settler = settler
        self._cancels = cancels
        self._held = held
        self._read_ahead = read_ahead
        self._stopping = stopping
        self._concurrency = concurrency
        self._unsafe_after = unsafe_after
        self._queue: deque[Delivery] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._waking = 0
        self._queue_closed = False
        #: Called with the seconds from a cancel's creation to its handler stopping, or None.
        self.on_cancel_latency: Callable[[float], None] | None = None

    async def run(self, feed: Callable[[], Awaitable[None]]) -> None:
        """Run the consumers while ``feed`` dispatches; return once they handled the rest."""
        self._queue_closed = False
        async with anyio.create_task_group() as consumers:
            for _ in range(self._concurrency):
                consumers.start_soon(self._consume)
            try:
                await feed()
            finally:
                # No more entries: consumers finish what is queued, then return.
                self._queue_closed = True
                while self._idle:
                    self._waking += 1
                    _wake(self._idle.popleft())

    def dispatch(
        self,
        role: Role,
        shard: str,
        stream: str,
        entries: list[Entry],
        confirmed_at: float,
    ) -> None:
        """Hold and queue entries whose leases were confirmed at ``confirmed_at`` (monotonic)."""
        self._read_ahead.took(entries)
        self._settler.stats.received += len(entries)
        deliveries = [Delivery(role, shard, stream, entry, confirmed_at) for entry in entries]
        self._held.add_many(stream, deliveries)
        self._queue.extend(deliveries)
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        """Wake one idle consumer, unless one is already on its way.

        A woken consumer that finds more queued wakes the next one, so slow handlers fan out
        over every consumer while a burst of fast ones is drained by one or two consumers
        without a task switch per entry.
        """
        if self._waking == 0 and self._idle:
            self._waking += 1
            _wake(self._idle.popleft())

    async def _consume(self) -> None:
        # Handlers run inside one cancel scope per consumer, not one per message (a scope costs
        # about 5 us). Stopping one handler (hard cancel, lost lease, shutdown) cancels its
        # consumer's scope; the consumer then settles that delivery from its flags and opens a
        # new scope.
        while True:
            stopped: list[Delivery] = []
            with anyio.CancelScope() as scope:
                if await self._consume_in(scope, stopped):
                    return
            for delivery in stopped:
                await self._finish(delivery, decisions.stopped(delivery))

    async def _consume_in(self, scope: anyio.CancelScope, stopped: list[Delivery]) -> bool:
        """Handle queued deliveries until the queue closes (True) or ``scope`` is cancelled."""
        queue = self._queue
        process = self._runner.process
        while True:
            if not queue:
                if self._queue_closed:
                    return True
                await self._wait_woken()
                continue
            delivery = queue.popleft()
            if queue:
                self._wake_consumer()
            if (
                self._stopping.is_set()
                or time.monotonic() - delivery.confirmed_at > self._unsafe_after
            ):
                ending = await self._runner.before_start(delivery)
                if ending is not None:
                    await self._finish(delivery, ending)
                    continue
            stopped.append(delivery)
            step = process(delivery, scope)
            decision = step if isinstance(step, Decision) else await step
            stopped.clear()
            if scope.cancel_called:
                # Stopped after the handler's last checkpoint: settle it outside this scope.
                stopped.append(delivery)
                return False
            if decision is ACK and delivery.node is None:
                # The hot path, without a coroutine: queue the ack for the acker's next batch.
                self._settler.ack_nowait(delivery, decision)
                self._finished(delivery)
            else:
                await self._finish(delivery, decision)
            if self._read_ahead.reader_woken and queue and self._read_ahead.room_to_read_ahead():
                # Fast handlers never yield: let the woken reader (and the acker) send their
                # requests now, so that the replies come back while this consumer handles what
                # is still queued, instead of after the queue ran dry.
                await anyio.lowlevel.cancel_shielded_checkpoint()

    async def _wait_woken(self) -> None:
        """Wait idle until :meth:`_wake_consumer` (or the queue's end) wakes this consumer."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(woken)
        try:
            await woken
        except BaseException:
            # Cancelled while idle: out of the line, or, if it was being woken, the wake goes on.
            if woken in self._idle:
                self._idle.remove(woken)
            else:
                self._waking -= 1
                self._wake_consumer()
            raise
        self._waking -= 1

    async def _finish(self, delivery: Delivery, decision: Decision) -> None:
        try:
            await self._settler.apply(delivery, decision)
            if decision.signal_id is not None:
                if self.on_cancel_latency is not None and delivery.cancel is not None:
                    waited = now_ms() - delivery.cancel.created_at_ms
                    self.on_cancel_latency(max(waited, 0) / 1000)
                await self._cancels.stopped(decision.signal_id, delivery)
        finally:
            self._finished(delivery)

    def _finished(self, delivery: Delivery) -> None:
        """A delivery's handling ended (its outcome is applied or queued): free its slot."""
        # Nothing reads the context of a finished handler: let it go now rather than when the
        # batch is acknowledged (fewer objects live on into the garbage collector's old
        # generations).
        delivery.context = None
        self._read_ahead.finished()
        if delivery.finished is not None:
            delivery.finished.set()


def _wake(woken: asyncio.Future[None]) -> None:
    """Wake an idle consumer (one cancelled meanwhile has its future done already)."""
    if not woken.done():
        woken.set_result(None)
