"""The figures of the Overview and Workers pages, read through the ops modules.

A role's flow control (paused since when, limits set at run time, running slots) comes with
its figures: ``streamflow inspect`` reads it for every role in the same round trips.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from streamflow import flow
from streamflow.client import Client
from streamflow.keys import NAME_PATTERN
from streamflow.ops.inspect import PendingEntry, RoleInfo, inspect_role, inspect_roles
from streamflow.registry import Warn, coordinators, live_workers, schedulers


@dataclass(frozen=True, slots=True)
class RoleRow:
    """One role's line: its stream and its groups' figures, summed over groups."""

    role: str
    length: int
    pending: int
    lag: int | None
    oldest_pending_age_ms: int | None
    delayed: int
    dead_letters: int
    consumers: int
    partitions: int
    paused_since_ms: int | None = None
    limits: flow.Limits = field(default_factory=flow.Limits)

    @property
    def limited(self) -> str:
        """The run-time limits in words (``10/s · 5 at once``), empty when none is set."""
        parts = []
        if self.limits.rate is not None:
            parts.append(f"rate {self.limits.rate}")
        if self.limits.concurrency:
            parts.append(f"{self.limits.running}/{self.limits.concurrency} at once")
        return " · ".join(parts)


def role_row(info: RoleInfo) -> RoleRow:
    """The line of one role, with its flow control."""
    lags = [group.lag for group in info.groups if group.lag is not None]
    ages = [g.oldest_pending_age_ms for g in info.groups if g.oldest_pending_age_ms is not None]
    return RoleRow(
        role=info.role,
        length=info.length,
        pending=sum(group.pending for group in info.groups),
        lag=sum(lags) if lags else None,
        oldest_pending_age_ms=max(ages) if ages else None,
        delayed=info.delayed,
        dead_letters=info.dead_letters,
        consumers=sum(1 for g in info.groups for c in g.consumers if c.alive),
        partitions=info.partitions,
        # A garbled pause reads as paused since 0, as the workers obey it.
        paused_since_ms=(info.paused_at_ms or 0) if info.paused else None,
        limits=flow.Limits(info.rate_limit, info.concurrency_limit, info.running_slots),
    )


async def role_rows(client: Client) -> list[RoleRow]:
    """Every role's line, by name."""
    return [role_row(info) for info in await inspect_roles(client.redis, client.keys)]


async def overview(client: Client, warn: Warn) -> dict[str, Any]:
    """Roles, live workers, coordinators and schedulers (with whether each is live).

    Registry entries are untrusted: a malformed one is skipped and told to ``warn`` (a
    :class:`~streamflow.registry.WarnOnce`, as the page is read again every interval).
    """
    redis, keys = client.redis, client.keys
    found = await coordinators(redis, keys, warn=warn)
    beating = await schedulers(redis, keys, warn=warn)
    now = int(time.time() * 1000)
    return {
        "roles": await role_rows(client),
        "workers": await live_workers(redis, keys),
        "coordinators": [(c, c.live(now)) for c in found],
        "schedulers": [(s, s.live(now)) for s in beating],
    }


#: The most roles whose running jobs the Workers page reads (a few round trips each).
MAX_RUNNING_ROLES = 50
#: The most running jobs it reads of each role, oldest first.
MAX_RUNNING_JOBS = 50


async def running_by_consumer(
    client: Client, roles: set[str]
) -> dict[str, list[tuple[str, PendingEntry]]]:
    """The oldest running jobs of these roles, (role, entry) by the consumer that holds them.

    Role names come from the workers' registry entries, which anyone who may write the
    namespace may write: a name that is not one is left out.
    """
    held: dict[str, list[tuple[str, PendingEntry]]] = {}
    names = sorted(role for role in roles if NAME_PATTERN.fullmatch(role))
    for role in names[:MAX_RUNNING_ROLES]:
        detail = await inspect_role(client.redis, client.keys, role, count=MAX_RUNNING_JOBS)
        for entry in detail.oldest_pending if detail is not None else []:
            held.setdefault(entry.consumer, []).append((role, entry))
    return held
