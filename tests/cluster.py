"""A throwaway 3-master Redis Cluster on free loopback ports, for the cluster tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from streamflow.server import RedisServer

#: How long the cluster may take to agree on its slots (it takes about 2 s on loopback).
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class LocalCluster:
    """The running cluster: its nodes and the ``redis+cluster://`` URL naming all of them."""

    servers: tuple[RedisServer, ...]
    tls: bool = False

    @property
    def url(self) -> str:
        """A cluster URL with every node as a seed (``rediss+cluster://`` for a TLS cluster)."""
        if self.tls:
            return "rediss+cluster://" + ",".join(f"{s.host}:{s.tls_port}" for s in self.servers)
        return "redis+cluster://" + ",".join(f"{s.host}:{s.port}" for s in self.servers)

    def node_of_slot(self, slot: int) -> str:
        """The ``host:port`` of the master serving ``slot`` (CLUSTER SLOTS of the first node)."""
        with redis.Redis(host=self.servers[0].host, port=self.servers[0].port) as client:
            ranges = client.execute_command("CLUSTER SLOTS")
        for start, end, master, *_ in ranges:
            if int(start) <= slot <= int(end):
                host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
                return f"{host}:{int(master[1])}"
        raise AssertionError(f"slot {slot} is not served by any master")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_ok(server: RedisServer, masters: int) -> bool:
    with redis.Redis(host=server.host, port=server.port, socket_timeout=2) as client:
        info = client.cluster("INFO")  # redis-py parses it into a dict of str
    return bool(info.get("cluster_state") == "ok" and int(info["cluster_known_nodes"]) == masters)


@dataclass(frozen=True)
class ClusterTLS:
    """PEM files of a TLS cluster: each node serves ``cert`` and joins the cluster bus (and
    nothing else) with ``client_cert``; clients need a certificate signed by ``ca``."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


@contextmanager
def local_cluster(
    masters: int = 3,
    tls: ClusterTLS | None = None,
    node_timeout_ms: int = 5000,
    appendonly: bool = False,
) -> Iterator[LocalCluster]:
    """Start ``masters`` cluster-enabled redis-servers, join them, wait for ``cluster_state:ok``.

    Every server is stopped (and its directory removed) on the way out, also when start-up
    fails half way.
    """
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("redis-cli is not on PATH")
    with ExitStack() as stack:
        servers = []
        for _ in range(masters):
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
                    *extra,
                ),
                tls_cert_file=None if tls is None else tls.cert,
                tls_key_file=None if tls is None else tls.key,
                tls_ca_file=None if tls is None else tls.ca,
                appendonly=appendonly,
                appendfsync="always",
            )  # fmt: skip
            stack.enter_context(server)
            servers.append(server)
        subprocess.run(
            [cli, "--cluster", "create", *(f"{s.host}:{s.port}" for s in servers),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=READY_TIMEOUT,
        )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(_cluster_ok(s, masters) for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {READY_TIMEOUT:g} s")
            time.sleep(0.05)
        yield LocalCluster(tuple(servers), tls=tls is not None)
