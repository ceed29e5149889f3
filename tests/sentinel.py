"""A throwaway Sentinel group on free loopback ports: 1 master, 1 replica, 1 to 3 sentinels.

The sentinels declare the master down after :data:`DOWN_AFTER_MS` and fail over within a few
seconds (about 2.3 to 3 s from a SIGKILL to the promoted replica on loopback).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import redis

from streamflow.ops.server import RedisServer

#: The service name the sentinels monitor.
SERVICE = "sfmaster"
#: How long a silent master takes to be subjectively down.
DOWN_AFTER_MS = 1000
#: Sentinel's failover timeout; a failed leader election is retried after twice this.
FAILOVER_TIMEOUT_MS = 3000
#: How long start-up (replica online, sentinels knowing each other) may take.
READY_TIMEOUT = 20.0


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, socket_timeout=2)


@dataclass(frozen=True)
class LocalSentinel:
    """The running group. ``master`` is the server that was master at start-up."""

    master: RedisServer
    replica: RedisServer
    sentinels: tuple[RedisServer, ...]

    @property
    def url(self) -> str:
        """A ``redis+sentinel://`` URL naming every sentinel."""
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def master_port(self) -> int | None:
        """The master's port according to the first sentinel that answers (None: none does)."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            try:
                with _client(sentinel) as client:
                    address = client.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def failed_over(self) -> bool:
        """Whether every running sentinel names the replica as the master."""
        return all(self._names_replica(s) for s in self.sentinels if s.running)

    def _names_replica(self, sentinel: RedisServer) -> bool:
        with _client(sentinel) as client:
            address = client.sentinel_get_master_addr_by_name(SERVICE)
        return bool(address) and int(address[1]) == self.replica.port

    def ready(self) -> bool:
        """Whether every sentinel sees a healthy master and replica and all its peers.

        Sentinels find each other through hello messages every 2 s; until then a quorum
        above 1 cannot be reached.
        """
        return all(self._sentinel_ready(s) for s in self.sentinels)

    def _sentinel_ready(self, sentinel: RedisServer) -> bool:
        with _client(sentinel) as client:
            state = client.sentinel_master(SERVICE)
            replicas = client.sentinel_slaves(SERVICE)
        return (
            int(state["port"]) == self.master.port
            and not state["is_sdown"]
            and int(state["num-other-sentinels"]) == len(self.sentinels) - 1
            and any(int(r["port"]) == self.replica.port and not r["is_sdown"] for r in replicas)
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until :meth:`ready`, or raise ``RuntimeError`` after ``timeout`` s."""
        _poll(self.ready, timeout, "sentinels ready")

    def replication_lag(self) -> tuple[int, int]:
        """(bytes the replica has not acknowledged, seconds since its last ack) per the master.

        The replica acknowledges once a second, so a few hundred bytes and 0 to 1 s are normal
        under load; the bytes are an upper bound of what it has not received.
        """
        with _client(self.master) as client:
            info = client.info("replication")
        replica = info["slave0"]
        return int(info["master_repl_offset"]) - int(replica["offset"]), int(replica["lag"])


def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)


def _replica_online(master: RedisServer) -> bool:
    """Whether the master streams writes to its replica and the replica acknowledges them.

    After a diskless full sync the master keeps the replica's stream until the replica's first
    REPLCONF ACK (sent once a second): writes made meanwhile are not on the replica yet, and a
    master killed then loses them. ``WAIT 1`` returns once the replica has acknowledged.
    """
    with _client(master) as client:
        client.set("sentinel-fixture:probe", "1")
        return bool(client.execute_command("WAIT", 1, 1000) >= 1)


@contextmanager
def local_sentinel(
    sentinels: int = 3, quorum: int = 2, *, wait: bool = True
) -> Iterator[LocalSentinel]:
    """Start a master, its replica and ``sentinels`` sentinels; stop them all on the way out.

    With ``wait=False`` it returns once the replica is online and the sentinels are running;
    call :meth:`LocalSentinel.wait_ready` before failing the master over (starting workers
    meanwhile saves the ~2 s the sentinels need to find each other).
    """
    with ExitStack() as stack:
        master = RedisServer(
            extra_args=("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
        )
        stack.enter_context(master)
        replica = RedisServer(extra_args=("--replicaof", master.host, str(master.port)))
        stack.enter_context(replica)
        _poll(lambda: _replica_online(master), READY_TIMEOUT, "replica online")
        group = []
        for _ in range(sentinels):
            sentinel = RedisServer(
                sentinel=(
                    f"monitor {SERVICE} {master.host} {master.port} {quorum}",
                    f"down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
                    f"failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
                    f"parallel-syncs {SERVICE} 1",
                )
            )
            stack.enter_context(sentinel)
            group.append(sentinel)
        running = LocalSentinel(master, replica, tuple(group))
        if wait:
            running.wait_ready()
        yield running
