"""Leases: keep in-flight entries owned, hand entries back on shutdown.

A delivered entry is leased to the consumer that holds it in the group's pending list. While a
worker lives it renews the entries it is running (owner-checked, one round trip per stream per
tick); any worker adopts entries idle past the lease TTL (:mod:`streamflow.intake`: one bounded
XAUTOCLAIM per stream per tick, following its cursor). A renewal that finds the entry gone or
owned by another consumer means the lease is lost: the handler is cancelled and nothing is
applied for it.

Every held delivery remembers when its lease was last confirmed (read, adopted or renewed: the
time the request was sent). A worker that resumes from a freeze holds entries whose leases may
have expired and been adopted elsewhere; before such an entry starts, the worker renews everything
it holds in one round trip per stream (:meth:`LeaseKeeper.renew_held`) and starts only what it
still owns.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import anyio
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from streamflow import connect, scripts, streams
from streamflow.delivery import Delivery, InFlight
from streamflow.errors import ConfigError
from streamflow.keys import Keys
from streamflow.scripts import Scripts

logger = logging.getLogger(__name__)

RELEASE_IDLE_MS = scripts.RELEASE_IDLE_MS

#: Where a lost lease was found: ``renewal`` (its handler was running: cancelled),
#: ``settle`` (its handler had run: an owner-checked write was refused), ``unstarted`` (found
#: before its handler started here: nothing ran twice).
LossFound = Literal["renewal", "settle", "unstarted"]


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Lease timing.

    Attributes:
        ttl: Seconds an entry may go unrenewed before any worker may adopt it.
        renew_interval: Seconds between renewals; at most a third of ``ttl`` (default).
        reclaim_interval: Seconds between adoption steps (one bounded XAUTOCLAIM per role).
        reclaim_count: The most entries one adoption step looks at is ten times this.
    """

    ttl: float = 30.0
    renew_interval: float | None = None
    reclaim_interval: float = 2.0
    reclaim_count: int = 100

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.reclaim_interval <= 0:
            raise ConfigError("lease TTL and reclaim interval must be positive")
        if self.renew_interval is not None and not 0 < self.renew_interval <= self.ttl / 3:
            raise ConfigError(
                f"renew interval {self.renew_interval}s must be positive and at most a third "
                f"of the lease TTL ({self.ttl}s)"
            )

    @property
    def renew_every(self) -> float:
        """The renewal period in seconds."""
        return self.renew_interval if self.renew_interval is not None else self.ttl / 3

    @property
    def unsafe_after(self) -> float:
        """Seconds after which a read entry may lose its lease before its first renewal.

        A read that returned later than this after it was sent is confirmed before its entries
        start.
        """
        return max(self.ttl - self.renew_every, 0.0)

    @property
    def ttl_ms(self) -> int:
        """The lease TTL in milliseconds."""
        return int(self.ttl * 1000)


class LeaseKeeper:
    """Renews and releases entries for one worker process.

    Args:
        redis: The client.
        scripts: The registered Lua scripts.
        keys: Key names.
        consumer: This process's consumer name.
        in_flight: The registry of entries this process holds.
        settings: Lease timing.
        on_name_lost: Called when another process took this consumer name (this one was
            frozen past the name's TTL): the worker must stop, or two would share a name.
        describe: Returns this worker's registry entry, written with the liveness key.
        on_renewal: Called with the seconds each renewal round took (for the metrics).
    """

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        consumer: str,
        in_flight: InFlight,
        settings: LeaseSettings,
        *,
        on_name_lost: Callable[[], None] | None = None,
        describe: Callable[[], bytes] | None = None,
        on_renewal: Callable[[float], None] | None = None,
    ) -> None:
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self._consumer = consumer
        self._in_flight = in_flight
        self.settings = settings
        self._on_name_lost = on_name_lost
        self._describe = describe
        self.on_renewal = on_renewal
        self._token = uuid.uuid4().hex
        self.renewals = 0
        #: Leases found lost, by where (see :data:`LossFound`).
        self.losses: dict[str, int] = {}

    # -- the consumer name is ours alone ----------------------------------------------------

    async def acquire_name(self) -> None:
        """Take the consumer name's liveness key, or refuse to start.

        Raises:
            ConfigError: Another live process uses this consumer name.
        """
        key = self._keys.consumer_alive(self._consumer)
        try:
            taken = await scripts.liveness(
                self._scripts, self._redis, key, "acquire", self._token, self._name_ttl_ms
            )
            await self._register()
        except OutOfMemoryError:
            # A full Redis refuses the key's SET; a worker started to drain it must not wait
            # for memory it is there to free. A live holder still refuses it (GET is a read);
            # otherwise the first renewal Redis accepts takes the name.
            holder = await self._redis.get(key)
            taken = holder is None or streams.text(holder) == self._token
            if taken:
                logger.warning(
                    "Redis is full (OOM): starting without the liveness key of consumer name %s; "
                    "it is taken at the first renewal Redis accepts",
                    self._consumer,
                )
        if not taken:
            raise ConfigError(
                f"consumer name {self._consumer!r} is in use by another live worker; "
                "give each process its own --consumer-name (or, if none runs, its liveness "
                f"key {key} holds something else: delete it)"
            )

    async def release_name(self) -> None:
        """Give the consumer name up (on a clean stop)."""
        key = self._keys.consumer_alive(self._consumer)
        await scripts.liveness(self._scripts, self._redis, key, "release", self._token, 0)
        await self._redis.delete(self._keys.consumer_info(self._consumer))

    async def _register(self) -> None:
        if self._describe is not None:
            key = self._keys.consumer_info(self._consumer)
            await self._redis.set(key, self._describe(), px=self._name_ttl_ms)

    @property
    def _name_ttl_ms(self) -> int:
        return max(self.settings.ttl_ms, 1000)

    # -- renewal ----------------------------------------------------------------------------

    async def renew_forever(self) -> None:
        """Renew every held entry (and the consumer name) each renewal period."""
        backoff = connect.Backoff("renewing leases")
        while True:
            await anyio.sleep(self.settings.renew_every)
            try:
                await self.renew_once()
            except connect.TRANSIENT_ERRORS as exc:
                backoff.note(exc)  # logged and counted once per outage; retried next tick
            else:
                backoff.succeeded()

    async def renew_once(self) -> None:
        """One renewal round: held entries (one script call per stream), then the name.

        Entries first: their script runs when Redis is full (``allow-oom``), the name's
        ``SET`` does not, and a full Redis must not cost the entries their leases.
        """
        started = time.monotonic()
        await self.renew_held()
        await self._renew_name()
        if self.on_renewal is not None:
            self.on_renewal(time.monotonic() - started)

    async def _renew_name(self) -> None:
        key = self._keys.consumer_alive(self._consumer)
        if not await scripts.liveness(
            self._scripts, self._redis, key, "refresh", self._token, self._name_ttl_ms
        ):
            logger.error(
                "consumer name %r was taken by another process while this one was frozen or "
                "its event loop blocked; stopping this worker",
                self._consumer,
            )
            if self._on_name_lost is not None:
                self._on_name_lost()
        else:
            await self._register()

    async def renew_held(self) -> None:
        """Renew every held entry (owner-checked, one script call per stream); lose the rest.

        Each renewed entry's lease counts as confirmed when its call was sent.
        """
        for stream, held in self._in_flight.by_stream():
            ids = [d.entry.id for d in held]
            sent = time.monotonic()
            lost = set(await scripts.renew(self._scripts, self._redis, stream, self._consumer, ids))
            self.renewals += len(ids) - len(lost)
            unstarted = 0
            for delivery in held:
                if delivery.entry.id not in lost:
                    delivery.confirmed_at = max(delivery.confirmed_at, sent)
                # An entry whose ack is on its way was likely just acknowledged, not lost.
                elif not delivery.settling and not delivery.lost:
                    unstarted += not delivery.started
                    self._lose(delivery)
            if unstarted:
                logger.warning(
                    "%d entries of %s that this worker held but had not started are owned by "
                    "another worker now (this worker was frozen or its event loop blocked past "
                    "the lease TTL): not starting them",
                    unstarted,
                    stream,
                )

    def count_loss(self, found: LossFound, count: int = 1) -> None:
        """Count leases found lost (see :data:`LossFound`)."""
        self.losses[found] = self.losses.get(found, 0) + count

    def _lose(self, delivery: Delivery) -> None:
        if not delivery.started:
            delivery.stop("lease_lost", "lease lost", hard=False)
            self.count_loss("unstarted")
            return
        self.count_loss("renewal")
        logger.warning(
            "lease lost on %s entry %s while its handler ran (another worker owns it now, or it "
            "is gone): cancelling the handler; it may have run twice",
            delivery.role.name,
            delivery.entry.id.decode(),
        )
        delivery.stop("lease_lost", "lease lost", hard=True)

    async def confirm(self, stream: str, entries: list[streams.Entry]) -> list[streams.Entry]:
        """Renew freshly read entries at once; return those still owned (the rest are lost).

        For a read that returned long after it was sent (this process froze): another worker
        may have adopted its entries meanwhile, and both would run them.
        """
        ids = [entry.id for entry in entries]
        try:
            lost = set(await scripts.renew(self._scripts, self._redis, stream, self._consumer, ids))
        except connect.TRANSIENT_ERRORS:
            return []  # still pending under this consumer: resumed or adopted later
        if lost:
            self.count_loss("unstarted", len(lost))
            logger.warning(
                "%d entries of %s were adopted elsewhere before this worker could start them "
                "(it was frozen in its read): not starting them",
                len(lost),
                stream,
            )
        return [entry for entry in entries if entry.id not in lost]

    # -- release ----------------------------------------------------------------------------

    async def release(self, delivery: Delivery) -> bool:
        """Hand an entry back for immediate adoption elsewhere; False if it was not ours."""
        released = await scripts.release(
            self._scripts,
            self._redis,
            delivery.stream,
            self._consumer,
            [delivery.entry.id],
            idle_ms=RELEASE_IDLE_MS,
        )
        return released == 1
