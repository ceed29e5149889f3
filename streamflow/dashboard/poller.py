"""One shared reader per dashboard process, for every live page.

Each live page subscribes to what it shows (a key: a task, the overview); every ``interval``
the poller reads each watched key once and wakes every subscriber. So the dashboard's Redis
load is one read per watched key per interval, however many browser tabs show it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from streamflow.errors import StreamflowError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PollerStatistics:
    """What the poller did.

    Attributes:
        ticks: Intervals completed.
        reads: Keys read from Redis, in all.
        watched: Keys watched now.
        subscribers: Subscriptions open now (about one per open live page).
    """

    ticks: int
    reads: int
    watched: int
    subscribers: int


class Poller:
    """Reads the watched keys once per interval and wakes their subscribers.

    Args:
        read: Reads what a key names (a streamflow error counts as an outage).
        interval: Seconds between two reads.
    """

    def __init__(self, read: Callable[[str], Awaitable[Any]], interval: float) -> None:
        self._read = read
        self._interval = interval
        self._watched: Counter[str] = Counter()
        self._states: dict[str, Any] = {}
        self._tick = 0
        self._reads = 0
        self._woken = anyio.Event()

    def statistics(self) -> PollerStatistics:
        """A snapshot of what it did and who watches."""
        return PollerStatistics(
            ticks=self._tick,
            reads=self._reads,
            watched=len(self._watched),
            subscribers=sum(self._watched.values()),
        )

    def watched(self) -> frozenset[str]:
        """The keys some page watches now."""
        return frozenset(self._watched)

    @contextmanager
    def watching(self, key: str) -> Iterator[None]:
        """Subscribe to ``key`` for the block."""
        self._watched[key] += 1
        try:
            yield
        finally:
            self._watched[key] -= 1
            if self._watched[key] <= 0:
                del self._watched[key]
                self._states.pop(key, None)

    async def wait_state(self, key: str, seen: int) -> tuple[int, Any]:
        """What the first read after tick ``seen`` found: (its tick, the value)."""
        while self._tick <= seen or key not in self._states:
            await self._woken.wait()
        return self._tick, self._states[key]

    async def run(self) -> None:
        """Read and wake, every interval, until cancelled."""
        while True:
            for key in list(self._watched):
                try:
                    value = await self._read(key)
                except StreamflowError as exc:  # an outage: the pages keep their last state
                    logger.warning("dashboard: cannot read %s: %s", key, exc)
                    continue
                self._reads += 1
                if key in self._watched:
                    self._states[key] = value
            self._tick += 1
            woken, self._woken = self._woken, anyio.Event()
            woken.set()
            await anyio.sleep(self._interval)
