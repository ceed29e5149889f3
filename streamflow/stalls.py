"""The loop-stall watchdog: notices while a worker's event loop does not run, and says why.

Everything a worker does for its leases runs on its event loop: renewals, reads,
acknowledgements. A handler that blocks the loop (a blocking call in an ``async def`` handler)
stops all of it; past the lease TTL another worker takes the entry over and runs it again, and
after ``max_deliveries`` such runs it is dead-lettered. A thread outside the loop notices the
stall while it lasts and names the handler running on the loop at that moment, so the log says
what to fix. A pause of the whole process (SIGSTOP, a VM or container pause) stops that thread
too; it is told apart by the thread's own late wake-up.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Literal

import anyio

logger = logging.getLogger("streamflow.worker")

StallKind = Literal["blocked", "frozen"]


class LoopWatchdog:
    """Counts and reports event-loop stalls longer than ``threshold`` seconds.

    Args:
        threshold: A loop that has not run for longer than this is stalled.
        describe: Given the loop thread's current frame (None if unknown), says what runs on
            the loop: called from the watchdog's thread while the loop is stalled.
        lease_ttl: The lease TTL, quoted in the warning.
    """

    def __init__(
        self,
        threshold: float,
        describe: Callable[[FrameType | None], str],
        *,
        lease_ttl: float,
    ) -> None:
        if threshold <= 0:
            raise ValueError("the stall threshold must be positive")
        self.threshold = threshold
        self._describe = describe
        self._ttl = lease_ttl
        self._interval = threshold / 4
        self._beat = time.monotonic()
        self._stalls: dict[str, int] = {}
        self._stop = threading.Event()

    def stalls(self) -> dict[str, int]:
        """Stalls so far, by kind: ``blocked`` (the loop) or ``frozen`` (the whole process)."""
        return dict(self._stalls)

    async def beat_forever(self) -> None:
        """Mark the loop as running, forever (run it in the worker's task group)."""
        while True:
            self._beat = time.monotonic()
            await anyio.sleep(self._interval)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Watch the calling thread's event loop from a thread for the block."""
        self._beat = time.monotonic()
        self._stop.clear()
        thread = threading.Thread(
            target=self._watch,
            args=(threading.get_ident(),),
            name="streamflow-stall-watchdog",
            daemon=True,
        )
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(timeout=5)

    def _watch(self, loop_thread: int) -> None:
        last = time.monotonic()
        stalled = False
        since = 0.0  # the loop's last beat before a blocked stall
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            paused, last = now - last, now
            if paused > self.threshold:
                # This thread did not run either: the whole process was paused.
                stalled, since = True, 0.0
                self._count("frozen")
                logger.warning(
                    "this worker process did not run for %.1f s (frozen: SIGSTOP, a VM or "
                    "container pause, swapping; lease TTL %.1f s): entries it holds are "
                    "confirmed as still its own before they start",
                    paused,
                    self._ttl,
                )
                continue
            blocked = now - self._beat
            if blocked > self.threshold and not stalled:
                stalled, since = True, self._beat
                self._count("blocked")
                frame = sys._current_frames().get(loop_thread)
                logger.warning(
                    "event loop blocked for %.1f s so far (lease TTL %.1f s) by %s: nothing "
                    "else runs meanwhile, leases are not renewed, and past the TTL another "
                    "worker takes its entries over and runs them again. Do not block in an "
                    "async def handler: make it a plain def (it runs in a thread) or move the "
                    "blocking call to anyio.to_thread.run_sync",
                    blocked,
                    self._ttl,
                    self._describe(frame),
                )
            elif blocked <= self.threshold and stalled:
                stalled = False
                if since:
                    logger.warning("event loop ran again after %.1f s", self._beat - since)
                    since = 0.0

    def _count(self, kind: StallKind) -> None:
        self._stalls[kind] = self._stalls.get(kind, 0) + 1
