"""One shared reader of task states per dashboard process, for every open task page.

Each open task page subscribes to its task; every ``interval`` the poller reads each watched
task once and wakes every subscriber. So the dashboard's Redis load is one read per watched
task per interval, however many browser tabs show it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio

from streamflow.client import Client
from streamflow.dag.tasks import TaskState
from streamflow.errors import StreamflowError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PollerStatistics:
    """What the poller did.

    Attributes:
        ticks: Intervals completed.
        reads: Task states read from Redis, in all.
        watched: Tasks watched now.
        subscribers: Subscriptions open now (about one per open task page).
    """

    ticks: int
    reads: int
    watched: int
    subscribers: int


class Poller:
    """Reads the watched tasks once per interval and wakes their subscribers.

    Args:
        client: The client to read with.
        interval: Seconds between two reads.
    """

    def __init__(self, client: Client, interval: float) -> None:
        self._client = client
        self._interval = interval
        self._watched: Counter[str] = Counter()
        self._states: dict[str, TaskState | None] = {}
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

    @contextmanager
    def watching(self, task_id: str) -> Iterator[None]:
        """Subscribe to ``task_id`` for the block."""
        self._watched[task_id] += 1
        try:
            yield
        finally:
            self._watched[task_id] -= 1
            if self._watched[task_id] <= 0:
                del self._watched[task_id]
                self._states.pop(task_id, None)

    async def wait_state(self, task_id: str, seen: int) -> tuple[int, TaskState | None]:
        """The state of the first read after tick ``seen``: (its tick, the state)."""
        while self._tick <= seen or task_id not in self._states:
            await self._woken.wait()
        return self._tick, self._states[task_id]

    async def run(self) -> None:
        """Read and wake, every interval, until cancelled."""
        while True:
            for task_id in list(self._watched):
                try:
                    state = await self._client.task(task_id)
                except StreamflowError as exc:  # an outage: the pages keep their last state
                    logger.warning("dashboard: cannot read task %s: %s", task_id, exc)
                    continue
                self._reads += 1
                if task_id in self._watched:
                    self._states[task_id] = state
            self._tick += 1
            woken, self._woken = self._woken, anyio.Event()
            woken.set()
            await anyio.sleep(self._interval)
