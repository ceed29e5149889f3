"""TLS: rediss:// with a CA file and a client certificate, for the library and every command.

A test CA, a server certificate (for ``localhost`` and ``127.0.0.1``) and a client certificate
are made with openssl once per module; a redis-server requiring client certificates listens
for TLS on a free loopback port.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from streamflow import App, Client, Context, SyncClient, Worker, config, connect
from streamflow.errors import ConfigError, RedisUnavailable
from streamflow.keys import Keys
from streamflow.ops import guard
from streamflow.ops.server import RedisServer
from tests.cluster import ClusterTLS, LocalCluster, local_cluster
from tests.helpers import (
    CLI,
    ROOT,
    clean_env,
    recorded,
    run_cli,
    running,
    wait_for,
    wait_until,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CANARY = "Canary-S3cret-XYZ"


# -- certificates and servers ----------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """PEM files: ``ca`` signed ``server`` and ``client``; ``wrong_ca`` signed nothing we use."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path
    other_host_cert: Path
    encrypted_key: Path

    def options(self, *, ca: Path | None = None) -> list[str]:
        """The --tls-* options of a command trusting ``ca`` (the right CA by default)."""
        return [
            "--tls-ca-file",
            str(ca or self.ca),
            "--tls-cert-file",
            str(self.client_cert),
            "--tls-key-file",
            str(self.client_key),
        ]

    def files(self, *, ca: Path | None = None) -> dict[str, Path]:
        """The same as keyword arguments of ``connect.connect`` and the clients."""
        return {
            "tls_ca_file": ca or self.ca,
            "tls_cert_file": self.client_cert,
            "tls_key_file": self.client_key,
        }


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=20
    )


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _make_leaf(directory: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}.{s}" for s in ("key", "csr", "crt"))
    extfile = directory / f"{name}.ext"
    extfile.write_text(
        "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
        f"authorityKeyIdentifier=keyid\n{ext}\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1],
        "-set_serial", "0x" + name.encode().hex(), "-days", "2", "-out", cert, "-extfile", extfile,
        cwd=directory,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("tls")
    ca = _make_ca(directory, "test-ca")
    wrong_ca, _ = _make_ca(directory, "wrong-ca")
    server = _make_leaf(
        directory,
        "server",
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )
    client = _make_leaf(directory, "client", ca, "extendedKeyUsage=clientAuth")
    other, _ = _make_leaf(
        directory, "other", ca, "subjectAltName=DNS:redis.example.com\nextendedKeyUsage=serverAuth"
    )
    encrypted = directory / "encrypted.key"
    _openssl(
        "pkey", "-in", client[1], "-aes256", "-passout", "pass:x", "-out", encrypted, cwd=directory
    )
    return Certs(ca[0], server[0], server[1], client[0], client[1], wrong_ca, other, encrypted)


@pytest.fixture(scope="module")
def tls_server(certs: Certs) -> Iterator[RedisServer]:
    """A redis-server that requires a client certificate signed by the test CA.

    It has an ACL user ``sf`` whose password is the canary: it must never show in any output.
    """
    if not RedisServer.available():
        pytest.skip("redis-server is not on PATH")
    with RedisServer(
        tls_cert_file=certs.server_cert, tls_key_file=certs.server_key, tls_ca_file=certs.ca
    ) as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.acl_setuser(
                "sf", enabled=True, passwords=[f"+{CANARY}"], keys="*", commands=["+@all"]
            )
            admin.execute_command("ACL", "SETUSER", "sf", "&*")
        yield server


def tls_url(server: RedisServer) -> str:
    """The server's rediss:// URL, as user ``sf`` with the canary password."""
    return f"rediss://sf:{CANARY}@127.0.0.1:{server.tls_port}/0"


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit code 2, one ``error:`` line on stderr, no traceback, and never the canary."""
    assert CANARY not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# -- the library -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_client_publishes_and_worker_handles_over_tls_with_a_client_certificate(
    tls_server: RedisServer, certs: Certs, namespace: str
) -> None:
    app = App()
    seen: list[Any] = []

    @app.role("echo")
    async def echo(ctx: Context, payload: Any) -> None:
        seen.append(payload)

    url = tls_url(tls_server)
    worker_redis = connect.connect(url, name="tls-worker", **certs.files())
    client = Client.from_url(url, namespace=namespace, **certs.files())
    try:
        with anyio.fail_after(15):
            await connect.ping(worker_redis, url)
            async with running(Worker(app, worker_redis, namespace=namespace)):
                await client.publish("echo", {"n": 1})
                with SyncClient(url, namespace=namespace, **certs.files()) as sync:
                    sync.publish("echo", {"n": 2})
                await wait_until(lambda: len(seen) == 2)
        assert sorted(p["n"] for p in seen) == [1, 2]
        ssl_conn = worker_redis.connection_pool.connection_kwargs
        assert ssl_conn["ssl_cert_reqs"] == "required" and ssl_conn["ssl_check_hostname"] is True
    finally:
        await client.aclose()
        await worker_redis.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("host", "files", "expected"),
    [
        ("127.0.0.1", {"ca": "wrong"}, "certificate verify failed: "),
        ("localhost", {"ca": "wrong"}, "certificate verify failed: "),
        ("127.0.0.1", {"key": "encrypted"}, "the TLS key file is encrypted"),
        ("127.0.0.1", {"cert": None}, "require a client certificate"),
    ],
    ids=["wrong-ca-ip", "wrong-ca-name", "encrypted-key", "no-client-cert"],
)
async def test_tls_failures_are_one_line_reasons_naming_the_server(
    tls_server: RedisServer, certs: Certs, host: str, files: dict[str, str | None], expected: str
) -> None:
    kwargs: dict[str, Path | None] = dict(certs.files())
    if files.get("ca") == "wrong":
        kwargs["tls_ca_file"] = certs.wrong_ca
    if files.get("key") == "encrypted":
        kwargs["tls_key_file"] = certs.encrypted_key
    if "cert" in files:
        kwargs["tls_cert_file"] = kwargs["tls_key_file"] = None
    url = f"rediss://sf:{CANARY}@{host}:{tls_server.tls_port}/0"
    client = connect.connect(url, **kwargs)
    try:
        with anyio.fail_after(10), pytest.raises(RedisUnavailable) as caught:
            await connect.ping(client, url)
    finally:
        await client.aclose()
    message = str(caught.value)
    assert "\n" not in message and CANARY not in message
    assert expected in message, message
    assert f"{host}:{tls_server.tls_port}" in message


@pytest.fixture(scope="module")
def other_host_server(certs: Certs) -> Iterator[RedisServer]:
    """A TLS redis-server whose certificate names only redis.example.com."""
    if not RedisServer.available():
        pytest.skip("redis-server is not on PATH")
    with RedisServer(
        tls_cert_file=certs.other_host_cert,
        tls_key_file=certs.other_host_cert.with_suffix(".key"),
        tls_auth_clients="no",
    ) as server:
        yield server


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_certificate_for_another_host_name_is_refused(
    other_host_server: RedisServer, certs: Certs, host: str
) -> None:
    url = f"rediss://{host}:{other_host_server.tls_port}/0"
    client = connect.connect(url, tls_ca_file=certs.ca)
    try:
        with (
            anyio.fail_after(10),
            pytest.raises(RedisUnavailable) as caught,
        ):
            await connect.ping(client, url)
    finally:
        await client.aclose()
    mismatch = "IP address mismatch" if host[0].isdigit() else "Hostname mismatch"
    assert str(caught.value) == (
        f"TLS handshake with {host}:{other_host_server.tls_port} failed: certificate verify "
        f"failed: {mismatch}, certificate is not valid for '{host}'."
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"redis_url": "redis://h/0", "tls_ca_file": "CA"}, "TLS files need a rediss:// or"),
        (
            {"tls_ca_file": "/no/such/ca.pem"},
            "--tls-ca-file: file '/no/such/ca.pem' does not exist",
        ),
        ({"tls_key_file": "KEY"}, "needs its certificate file (--tls-cert-file)"),
        ({"tls_cert_file": "/"}, "--tls-cert-file: file '/' is not a file"),
        ({"redis_url": "rediss://h/0?ssl_cert_reqs=none"}, "not ssl_* URL parameters"),
    ],
)
def test_tls_settings_are_checked_at_start_up(
    certs: Certs, values: dict[str, str], expected: str
) -> None:
    names = {"CA": str(certs.ca), "KEY": str(certs.client_key)}
    values = {k: names.get(v, v) for k, v in values.items()}
    values.setdefault("redis_url", "rediss://h/0")
    with pytest.raises(ConfigError) as caught:
        config.build(config.ConnectionSettings, **values)
    assert expected in str(caught.value)


def test_tls_settings_keep_paths_only_and_hand_them_to_worker_processes(certs: Certs) -> None:
    settings = config.build(
        config.WorkerSettings,
        app="tests.apps:app",
        redis_url=f"rediss://sf:{CANARY}@h/0",
        tls_cert_file=str(certs.client_cert),
        tls_key_file=str(certs.client_key),
    )
    assert settings.tls == {"tls_cert_file": certs.client_cert, "tls_key_file": certs.client_key}
    assert CANARY not in repr(settings) and "PRIVATE KEY" not in repr(settings)
    env = settings.environment()
    assert env["STREAMFLOW_TLS_KEY_FILE"] == str(certs.client_key)
    assert "STREAMFLOW_TLS_CA_FILE" not in env
    assert set(env) <= config.ENV_VARS


# -- the command line ------------------------------------------------------------------------


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
        with open(log, "wb") as err:
            process = subprocess.Popen(
                [*CLI, "worker", "--app", "tests.apps:app", *args],
                cwd=ROOT,
                env=clean_env(**env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_cli_publish_and_worker_round_trip_over_tls(
    tls_server: RedisServer,
    certs: Certs,
    namespace: str,
    tmp_path: Path,
    worker_process: Callable[..., subprocess.Popen[bytes]],
) -> None:
    record, log = tmp_path / "record.txt", tmp_path / "worker.log"
    # The worker takes its TLS files from the environment, publish from options.
    worker = worker_process(
        log,
        "--role",
        "record",
        "--namespace",
        namespace,
        SFTEST_RECORD=str(record),
        STREAMFLOW_REDIS_URL=tls_url(tls_server),
        STREAMFLOW_TLS_CA_FILE=str(certs.ca),
        STREAMFLOW_TLS_CERT_FILE=str(certs.client_cert),
        STREAMFLOW_TLS_KEY_FILE=str(certs.client_key),
    )

    def serving() -> bool:
        assert worker.poll() is None, log.read_text()
        return " serving " in log.read_text()

    wait_for(serving, 15, "the worker serves")
    published = run_cli(
        "publish", "record", "--json", '{"n": 1}', "--namespace", namespace,
        "--redis-url", tls_url(tls_server), *certs.options(),
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    [message_id] = published.stdout.split()
    wait_for(lambda: message_id in recorded(record), 10, "the job is handled")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    output = log.read_text() + published.stdout + published.stderr
    assert "Traceback" not in output and CANARY not in output
    assert f"rediss://sf:***@127.0.0.1:{tls_server.tls_port}/0" in log.read_text()
    with redis.Redis.from_url(tls_server.url) as admin:
        assert admin.xlen(Keys(namespace).role_stream("record")) == 0


@pytest.mark.parametrize("command", ["publish", "worker", "coordinator", "inspect", "check"])
def test_cli_with_the_wrong_ca_exits_2_with_one_line_naming_the_tls_failure(
    tls_server: RedisServer, certs: Certs, command: str
) -> None:
    args = {
        "publish": ["publish", "record", "--json", "1"],
        "worker": ["worker", "--app", "tests.apps:app"],
        "coordinator": ["coordinator"],
        "inspect": ["inspect"],
        "check": ["check"],
    }[command]
    result = run_cli(*args, "--redis-url", tls_url(tls_server), *certs.options(ca=certs.wrong_ca))
    if command == "check":  # a health probe: "not ok" and exit 1, by design
        assert result.returncode == 1 and "certificate verify failed" in result.stdout
        assert CANARY not in result.stdout + result.stderr
        return
    line = one_error_line(result)
    assert line.startswith(
        f"error: TLS handshake with 127.0.0.1:{tls_server.tls_port} failed: "
        "certificate verify failed: "
    ), line


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--tls-ca-file", "/no/such/ca.pem"],
            "--tls-ca-file: file '/no/such/ca.pem' does not exist",
        ),
        (
            ["--redis-url", "redis://127.0.0.1:1/0", "--tls-ca-file", "CA"],
            "need a rediss:// or rediss+cluster:// URL",
        ),
    ],
)
@pytest.mark.parametrize("command", ["publish", "worker"])
def test_cli_tls_option_errors_are_one_line(
    certs: Certs, command: str, extra: list[str], expected: str
) -> None:
    args = (
        ["publish", "record", "--json", "1"]
        if command == "publish"
        else ["worker", "--app", "tests.apps:app"]
    )
    extra = [str(certs.ca) if a == "CA" else a for a in extra]
    if "--redis-url" not in extra:
        extra += ["--redis-url", f"rediss://sf:{CANARY}@127.0.0.1:1/0"]
    line = one_error_line(run_cli(*args, *extra))
    assert expected in line, line


# -- a TLS cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(certs: Certs) -> Iterator[LocalCluster]:
    """A 3-master cluster whose nodes speak TLS to clients and to each other."""
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is needed for the cluster tests", pytrace=False)
    files = ClusterTLS(
        certs.ca, certs.server_cert, certs.server_key, certs.client_cert, certs.client_key
    )
    with local_cluster(tls=files) as cluster:
        yield cluster


@pytest.mark.anyio
async def test_a_tls_cluster_url_runs_a_partitioned_role_over_tls_on_every_master(
    tls_cluster: LocalCluster, certs: Certs, namespace: str
) -> None:
    app = App()
    seen: list[Any] = []

    @app.role("echo", partitions=3)
    async def echo(ctx: Context, payload: Any) -> None:
        seen.append(payload)

    url = tls_cluster.url
    assert url.startswith("rediss+cluster://")
    worker_redis = connect.connect(url, name="tls-worker", **certs.files())
    try:
        with anyio.fail_after(20):
            async with (
                running(Worker(app, worker_redis, namespace=namespace)),
                Client.from_url(url, namespace=namespace, **certs.files()) as client,
            ):
                await client.publish_many("echo", ({"n": i} for i in range(30)))
                await wait_until(lambda: len(seen) == 30)
            facts = await guard.gather(worker_redis)
        assert sorted(p["n"] for p in seen) == list(range(30))
        assert (facts.transport, facts.host) == ("tls", "127.0.0.1")
        # Every master served one partition, over TLS.
        for node in worker_redis.get_nodes():  # type: ignore[attr-defined]
            assert node.connection_kwargs["ssl_cert_reqs"] == "required"
            assert node.connection_kwargs["ssl_check_hostname"] is True
    finally:
        await worker_redis.aclose()


@pytest.mark.anyio
async def test_a_tls_cluster_refuses_a_wrong_ca_and_an_encrypted_key_in_one_line(
    tls_cluster: LocalCluster, certs: Certs
) -> None:
    wrong = connect.connect(tls_cluster.url, **certs.files(ca=certs.wrong_ca))
    try:
        with pytest.raises(RedisUnavailable, match="certificate verify failed"):
            await connect.ping(wrong, tls_cluster.url)
    finally:
        await wrong.aclose()
    with pytest.raises(ConfigError, match=r"the TLS key file .* is encrypted"):
        connect.connect(
            tls_cluster.url,
            tls_ca_file=certs.ca,
            tls_cert_file=certs.client_cert,
            tls_key_file=certs.encrypted_key,
        )
    with pytest.raises(ConfigError, match="TLS files need a rediss:// or rediss\\+cluster://"):
        connect.connect(tls_cluster.url.replace("rediss+", "redis+"), **certs.files())
