"""Priority levels: in which order a worker reads a role's levels, without I/O.

A role declared with ``priorities=N`` has N levels, 0 (the default, lowest) to N - 1 (highest),
each one more stream in every partition's key family (see :meth:`streamflow.keys.Keys.role_stream`).
A worker's reader serves the levels in the order :class:`LevelOrder` gives for each read: the
highest first, except that one read in every :data:`GUARD_EVERY` puts a lower level first, the
lower levels taking that place in turn (N - 2, N - 3, ..., 0, then again). So while a lower
level has entries, it is served first at least once in every ``GUARD_EVERY * (N - 1)`` reads of
its partition, whatever the higher levels hold: a backlog at the top slows the lower levels
down to that share, never to nothing.
"""

from __future__ import annotations

#: One read in this many serves a lower level first (the anti-starvation guard); the others
#: serve the levels from the highest down. Fixed, so that the bound is the same everywhere.
GUARD_EVERY = 4


def guard_bound(levels: int, every: int = GUARD_EVERY) -> int:
    """The most reads of a partition between two reads that serve a given lower level first."""
    return every * max(levels - 1, 1)


class LevelOrder:
    """The order in which one reader serves a role's levels, read after read.

    Args:
        levels: How many levels the role has (at least 2).
        every: One read in this many serves a lower level first.
    """

    def __init__(self, levels: int, every: int = GUARD_EVERY) -> None:
        if levels < 2 or every < 2:
            raise ValueError("a level order needs at least 2 levels and every >= 2")
        self.levels = levels
        self.every = every
        self._reads = 0
        self._turn = 0
        self._top_first = tuple(range(levels - 1, -1, -1))

    def next(self) -> tuple[int, ...]:
        """The levels, in the order the next read serves them (highest first, or a guard read)."""
        self._reads += 1
        if self._reads % self.every:
            return self._top_first
        # A guard read: the next lower level in turn first, then the others from the top.
        first = self.levels - 2 - self._turn % (self.levels - 1)
        self._turn += 1
        return (first, *(level for level in self._top_first if level != first))
