"""A throwaway Redis Cluster on free loopback ports, for the cluster tests.

Three masters by default, optionally with replicas (``replicas=1``: one per master, for the
failover tests), and the operator's tools around it: ``redis-cli --cluster`` commands, a new
master added to the running cluster, the role and replica of each node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from streamflow.ops.server import RedisServer

#: How long the cluster may take to agree on its slots (it takes about 2 s on loopback).
READY_TIMEOUT = 30.0


@dataclass
class LocalCluster:
    """The running cluster: its nodes and the ``redis+cluster://`` URL naming all of them.

    ``servers`` lists every node started (masters and replicas; nodes added later by
    :meth:`add_master` at the end).
    """

    servers: tuple[RedisServer, ...]
    tls: bool = False
    _stack: ExitStack | None = field(default=None, repr=False)
    _node_timeout_ms: int = 5000

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``redis-cli`` with ``args``; the completed process (output captured as text)."""
        return subprocess.run(
            [_redis_cli(), *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def address(self, server: RedisServer) -> str:
        """The ``host:port`` of a node."""
        return f"{server.host}:{server.port}"

    def server_at(self, address: str) -> RedisServer:
        """The node listening at ``host:port``."""
        return next(s for s in self.servers if self.address(s) == address)

    def node_id(self, server: RedisServer) -> str:
        """The cluster node id of ``server`` (CLUSTER MYID)."""
        with _client(server) as client:
            return str(client.execute_command("CLUSTER MYID"), "utf-8")

    def masters(self) -> list[RedisServer]:
        """The running nodes that are masters now (ROLE of each)."""
        return [s for s in self.servers if s.running and _role(s) == "master"]

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A running replica of ``master`` whose link to it is up."""
        wanted = self.node_id(master)
        for server in self.servers:
            if server.running and server is not master and _replicates(server) == wanted:
                return server
        raise AssertionError(f"{self.address(master)} has no replica")

    def add_master(self) -> RedisServer:
        """Start a new empty node and join it as a master (``redis-cli --cluster add-node``)."""
        assert self._stack is not None
        server = _start_node(self._stack, self._node_timeout_ms, None, appendonly=False)
        self.servers = (*self.servers, server)
        done = self.cli(
            "--cluster", "add-node", self.address(server), self.address(self.servers[0])
        )
        if done.returncode != 0:
            raise RuntimeError(f"add-node failed:\n{done.stdout}\n{done.stderr}")
        wait_ok(self)
        return server

    @property
    def url(self) -> str:
        """A cluster URL with every node as a seed (``rediss+cluster://`` for a TLS cluster)."""
        if self.tls:
            return "rediss+cluster://" + ",".join(f"{s.host}:{s.tls_port}" for s in self.servers)
        return "redis+cluster://" + ",".join(f"{s.host}:{s.port}" for s in self.servers)

    def node_of_slot(self, slot: int) -> str:
        """The ``host:port`` of the master serving ``slot`` (CLUSTER SLOTS of the first node
        still running)."""
        first = next(s for s in self.servers if s.running)
        with redis.Redis(host=first.host, port=first.port) as client:
            ranges = client.execute_command("CLUSTER SLOTS")
        for start, end, master, *_ in ranges:
            if int(start) <= slot <= int(end):
                host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
                host = host or first.host  # a lone node that met no other knows no own IP
                return f"{host}:{int(master[1])}"
        raise AssertionError(f"slot {slot} is not served by any master")


def require_cluster_tools() -> None:
    """Skip the test without redis-server or redis-cli (fail it on CI, where both must be)."""
    if RedisServer.available() and shutil.which("redis-cli") is not None:
        return
    message = "redis-server and redis-cli are needed for the cluster tests"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_cli() -> str:
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("redis-cli is not on PATH")
    return cli


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=server.host, port=server.port, socket_timeout=5)


def _role(server: RedisServer) -> str:
    with _client(server) as client:
        return str(client.execute_command("ROLE")[0], "utf-8")


def _replicates(server: RedisServer) -> str | None:
    """The node id that ``server`` replicates with its link up, or None."""
    with _client(server) as client:
        info = client.info("replication")
        if info.get("role") != "slave" or info.get("master_link_status") != "up":
            return None
        myself = [n for n in client.cluster("NODES").values() if "myself" in n["flags"]]
    return str(myself[0]["master_id"]) if myself else None


def _cluster_ok(server: RedisServer, nodes: int) -> bool:
    with _client(server) as client:
        info = client.cluster("INFO")  # redis-py parses it into a dict of str
    return bool(info.get("cluster_state") == "ok" and int(info["cluster_known_nodes"]) == nodes)


def wait_ok(cluster: LocalCluster, timeout: float = READY_TIMEOUT) -> None:
    """Wait until every running node sees the cluster ok with every running node in it, and
    every replica's link to its master is up."""
    deadline = time.monotonic() + timeout
    while True:
        running = [s for s in cluster.servers if s.running]
        if all(_cluster_ok(s, len(running)) for s in running) and all(
            _role(s) == "master" or _replicates(s) is not None for s in running
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster not ok within {timeout:g} s")
        time.sleep(0.05)


@dataclass(frozen=True)
class ClusterTLS:
    """PEM files of a TLS cluster: each node serves ``cert`` and joins the cluster bus (and
    nothing else) with ``client_cert``; clients need a certificate signed by ``ca``."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def _start_node(
    stack: ExitStack, node_timeout_ms: int, tls: ClusterTLS | None, *, appendonly: bool
) -> RedisServer:
    extra: tuple[str, ...] = ()
    if tls is not None:
        # The bus and the announced client ports are TLS; the plain port stays open on
        # loopback for start-up polling and redis-cli.
        extra = (
            "--tls-cluster", "yes",
            "--tls-client-cert-file", str(tls.client_cert),
            "--tls-client-key-file", str(tls.client_key),
        )  # fmt: skip
    server = RedisServer(
        extra_args=(
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # The bus defaults to port + 10000, impossible above 55535: pick one.
            "--cluster-port", str(_free_port()),
            # A replica catches up at once (no 5 s wait for more replicas to join).
            "--repl-diskless-sync-delay", "0",
            *extra,
        ),
        tls_cert_file=None if tls is None else tls.cert,
        tls_key_file=None if tls is None else tls.key,
        tls_ca_file=None if tls is None else tls.ca,
        appendonly=appendonly,
        appendfsync="always",
    )  # fmt: skip
    stack.enter_context(server)
    return server


@contextmanager
def local_cluster(
    masters: int = 3,
    tls: ClusterTLS | None = None,
    node_timeout_ms: int = 5000,
    appendonly: bool = False,
    replicas: int = 0,
) -> Iterator[LocalCluster]:
    """Start ``masters`` cluster-enabled redis-servers (and ``replicas`` replicas of each),
    join them, wait for ``cluster_state:ok`` and every replica in sync. One master without
    replicas is a cluster too (the benchmarks compare it with three).

    Every server is stopped (and its directory removed) on the way out, also when start-up
    fails half way.
    """
    cli = _redis_cli()
    with ExitStack() as stack:
        servers = tuple(
            _start_node(stack, node_timeout_ms, tls, appendonly=appendonly)
            for _ in range(masters * (1 + replicas))
        )
        if masters == 1 and replicas == 0:
            # redis-cli creates clusters of 3 masters or more: one node takes every slot.
            with _client(servers[0]) as client:
                client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
        else:
            subprocess.run(
                [cli, "--cluster", "create", *(f"{s.host}:{s.port}" for s in servers),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=READY_TIMEOUT,
            )  # fmt: skip
        cluster = LocalCluster(servers, tls=tls is not None, _stack=stack)
        cluster._node_timeout_ms = node_timeout_ms
        wait_ok(cluster)
        yield cluster
