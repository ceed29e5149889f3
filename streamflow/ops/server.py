"""Start and stop a private redis-server for demos and tests."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["RedisServer", "RedisServerError", "RedisServerNotFound"]

_HOST = "127.0.0.1"
_INSTALL_HINT = (
    "install it with: apt-get install redis-server (Debian/Ubuntu) or brew install redis (macOS)"
)
_FSYNC_POLICIES = frozenset({"always", "everysec", "no"})
_TLS_AUTH_CLIENTS = frozenset({"yes", "no", "optional"})
_START_TIMEOUT = 10.0
_BIND_RETRY_TIMEOUT = 5.0
_STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.02
_LOG_NAME = "redis.log"
_STDERR_NAME = "redis.stderr"
_SENTINEL_CONFIG_NAME = "sentinel.conf"
_ADDRESS_IN_USE = "Address already in use"

# Servers whose process is alive. A strong reference keeps a forgotten server from being
# garbage-collected with its process still running; the atexit hook kills what is left.
_RUNNING: set[RedisServer] = set()


class RedisServerError(RuntimeError):
    """A private redis-server could not be started or controlled."""


class RedisServerNotFound(RedisServerError):
    """No redis-server executable was found."""


class RedisServer:
    """A redis-server child process on a loopback port, for demos and tests.

    The server listens on 127.0.0.1 only, never saves RDB snapshots, and keeps its data
    directory across `kill()` and `restart()` so that an AOF can be reloaded.

    Example:
        ```python
        with RedisServer() as server:
            client = redis.Redis.from_url(server.url)
        ```
    """

    def __init__(
        self,
        *,
        executable: str | None = None,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        directory: str | Path | None = None,
        tls_cert_file: str | Path | None = None,
        tls_key_file: str | Path | None = None,
        tls_ca_file: str | Path | None = None,
        tls_auth_clients: str = "yes",
        sentinel: Sequence[str] | None = None,
    ) -> None:
        """Describe a server; nothing is started until `start()`.

        Args:
            executable: Path or name of redis-server; defaults to the one on PATH.
            port: Loopback port to listen on; a free one is picked when omitted.
            appendonly: Turn the append-only file on.
            appendfsync: AOF fsync policy: "always", "everysec" or "no".
            extra_args: More command-line arguments passed to redis-server as they are.
            directory: Data directory; a temporary one (removed by `stop()`) when omitted.
            tls_cert_file: With `tls_key_file`: also listen for TLS on a second free port
                (`tls_port`, `tls_url`) with this server certificate (PEM). The plain port
                stays open on loopback (start-up polls it).
            tls_key_file: The server certificate's key (PEM).
            tls_ca_file: CA certificates (PEM) that client certificates must chain to.
            tls_auth_clients: "yes" (clients need a certificate), "optional" or "no".
            sentinel: Run a Redis Sentinel (``redis-server sentinel.conf --sentinel``) instead
                of a data server, configured by these ``sentinel ...`` directives without the
                leading word, e.g. ``"monitor mymaster 127.0.0.1 6380 1"``. They are written
                to ``sentinel.conf`` in the directory, which the sentinel rewrites with what it
                learns (kept across `kill()` and `restart()`).

        Raises:
            RedisServerNotFound: redis-server cannot be found.
            ValueError: `appendfsync`, `port` or the TLS options are not valid.
        """
        self._executable = _find_executable(executable)
        if appendfsync not in _FSYNC_POLICIES:
            raise ValueError(f"appendfsync must be one of {sorted(_FSYNC_POLICIES)}")
        if (tls_cert_file is None) != (tls_key_file is None):
            raise ValueError("give tls_cert_file and tls_key_file together")
        if tls_auth_clients not in _TLS_AUTH_CLIENTS:
            raise ValueError(f"tls_auth_clients must be one of {sorted(_TLS_AUTH_CLIENTS)}")
        self._tls_args: tuple[str, ...] = ()
        if tls_cert_file is not None and tls_key_file is not None:
            self._tls_args = (
                "--tls-cert-file", str(tls_cert_file),
                "--tls-key-file", str(tls_key_file),
                "--tls-auth-clients", tls_auth_clients,
            )  # fmt: skip
            if tls_ca_file is not None:
                self._tls_args += ("--tls-ca-cert-file", str(tls_ca_file))
        self._tls_port: int | None = None
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        self._port = port
        self._port_given = port is not None
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._extra_args = tuple(extra_args)
        self._sentinel = None if sentinel is None else tuple(sentinel)
        if self._sentinel is not None and any("\n" in line for line in self._sentinel):
            raise ValueError("sentinel directives must be single lines")
        self._directory = Path(directory) if directory is not None else None
        self._owns_directory = False
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {_HOST}:{self._port} {state}>"

    @staticmethod
    def available() -> bool:
        """Return whether a redis-server executable is on PATH."""
        return shutil.which("redis-server") is not None

    @property
    def host(self) -> str:
        """The address the server listens on (always loopback)."""
        return _HOST

    @property
    def port(self) -> int:
        """The TCP port; known once the server has been started or if one was given."""
        if self._port is None:
            raise RedisServerError("the server has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        """A redis:// URL for database 0 of this server."""
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def tls_port(self) -> int:
        """The TLS port; known once a server with TLS files has been started."""
        if self._tls_port is None:
            raise RedisServerError("no TLS port: give TLS files and call start() first")
        return self._tls_port

    @property
    def tls_url(self) -> str:
        """A rediss:// URL for database 0 of this server's TLS port."""
        return f"rediss://{_HOST}:{self.tls_port}/0"

    @property
    def pid(self) -> int | None:
        """The process id of the running server, or None when it is not running."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def directory(self) -> Path:
        """The data directory (holds the log and the AOF)."""
        if self._directory is None:
            raise RedisServerError("the server has no directory yet: call start() first")
        return self._directory

    @property
    def running(self) -> bool:
        """Whether the server process is alive (a paused server is alive)."""
        return self._process is not None and self._process.poll() is None

    @property
    def paused(self) -> bool:
        """Whether the server is stopped by `pause()`."""
        return self.running and self._paused

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        After `kill()` this starts again on the same port and directory, like `restart()`.

        Raises:
            RedisServerError: It is already running, or did not answer within 10 s.
        """
        if self.running:
            raise RedisServerError(f"{self!r} is already running")
        fresh = self._directory is None
        self._prepare_directory()
        try:
            self._launch_until_bound()
        except BaseException:
            if fresh:
                self._discard_directory()
            raise

    def restart(self) -> None:
        """Start the server again on the same port and directory.

        A running server is shut down first (its directory is kept). If the port is still
        held by the old process's sockets, binding is retried for up to 5 s.
        """
        if self.running:
            self._terminate()
        self.start()

    def stop(self) -> None:
        """Shut the server down and remove its directory if it is a temporary one.

        Sends SIGTERM and waits; sends SIGKILL after 5 s. Calling it again does nothing.
        """
        self._terminate()
        self._discard_directory()

    def kill(self) -> None:
        """Kill the server with SIGKILL and wait for it; the directory is kept for a restart."""
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        self._forget_process()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP; clients see it hang, not fail.

        Raises:
            RedisServerError: The server is not running.
        """
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused server run again with SIGCONT.

        Raises:
            RedisServerError: The server is not running.
        """
        self._signal(signal.SIGCONT)
        self._paused = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _prepare_directory(self) -> None:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="streamflow-redis-"))
            self._owns_directory = True
        else:
            self._directory.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = _free_port()
        if self._tls_args and self._tls_port is None:
            self._tls_port = _free_port(other_than=self._port)
        config = self._directory / _SENTINEL_CONFIG_NAME
        if self._sentinel is not None and not config.exists():
            # Sentinel insists on a config file it may rewrite (its state lives there).
            config.write_text("".join(f"sentinel {line}\n" for line in self._sentinel))

    def _discard_directory(self) -> None:
        """Remove the directory if it is our temporary one, and forget a port we picked."""
        if self._owns_directory and self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
            self._owns_directory = False
        if not self._port_given:
            self._port = None
            self._tls_port = None

    def _command(self) -> list[str]:
        directory = str(self.directory)
        sentinel_mode = (
            (str(self.directory / _SENTINEL_CONFIG_NAME), "--sentinel")
            if self._sentinel is not None
            else ()
        )
        return [
            self._executable,
            *sentinel_mode,
            "--port", str(self.port),
            "--bind", _HOST,
            "--save", "",
            "--appendonly", "yes" if self._appendonly else "no",
            "--appendfsync", self._appendfsync,
            "--dir", directory,
            "--logfile", os.path.join(directory, _LOG_NAME),
            "--enable-debug-command", "local",
            "--protected-mode", "no",
            *(("--tls-port", str(self._tls_port), *self._tls_args) if self._tls_args else ()),
            *self._extra_args,
        ]  # fmt: skip

    def _launch_until_bound(self) -> None:
        # The port may still be held for a moment after a kill, or (if we picked it) taken by
        # someone else between our probe and redis-server's bind: retry instead of failing.
        bind_deadline = time.monotonic() + _BIND_RETRY_TIMEOUT
        while True:
            log_offsets = self._log_offsets()
            process = self._spawn()
            failure = self._wait_ready(process, log_offsets)
            if failure is None:
                self._process = process
                self._paused = False
                _RUNNING.add(self)
                return
            if _ADDRESS_IN_USE not in failure or time.monotonic() > bind_deadline:
                raise RedisServerError(
                    f"redis-server on port {self.port} did not start: {failure}\n"
                    f"{self._log_tail(log_offsets)}"
                )
            if not self._port_given:
                self._port = _free_port()
                if self._tls_args:
                    self._tls_port = _free_port(other_than=self._port)
            time.sleep(0.05)

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Errors in the arguments are printed before the logfile is opened: keep stderr too.
        with open(self.directory / _STDERR_NAME, "ab") as stderr:
            return subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )

    def _wait_ready(
        self, process: subprocess.Popen[bytes], log_offsets: dict[str, int]
    ) -> str | None:
        """Poll PING until it answers; return None when ready, else why it is not."""
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                new_log = self._log_tail(log_offsets)
                reason = _ADDRESS_IN_USE if _ADDRESS_IN_USE in new_log else "it exited"
                return f"{reason} (exit code {process.returncode})"
            if _ping(self.port):
                return None
            time.sleep(_POLL_INTERVAL)
        process.kill()
        process.wait()
        return f"no answer to PING within {_START_TIMEOUT:g} s"

    def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
            # A paused server only handles SIGTERM once it runs again.
            process.send_signal(signal.SIGCONT)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._forget_process()

    def _forget_process(self) -> None:
        self._process = None
        self._paused = False
        _RUNNING.discard(self)

    def _signal(self, signum: signal.Signals) -> None:
        if self._process is None or not self.running:
            raise RedisServerError(f"{self!r} is not running")
        self._process.send_signal(signum)

    def _log_offsets(self) -> dict[str, int]:
        offsets = dict.fromkeys((_LOG_NAME, _STDERR_NAME), 0)
        for name in offsets:
            with contextlib.suppress(OSError):
                offsets[name] = (self.directory / name).stat().st_size
        return offsets

    def _log_tail(self, offsets: dict[str, int], lines: int = 20) -> str:
        """Return the last lines each log file got since the given offsets."""
        parts: list[str] = []
        for name, offset in offsets.items():
            try:
                with open(self.directory / name, "rb") as handle:
                    handle.seek(offset)
                    text = handle.read().decode("utf-8", "replace")
            except OSError:
                continue
            tail = text.strip().splitlines()[-lines:]
            if tail:
                parts.append(f"--- {name} ---\n" + "\n".join(tail))
        return "\n".join(parts) or "(redis-server wrote nothing)"


def _find_executable(executable: str | None) -> str:
    found = shutil.which(executable or "redis-server")
    if found is None:
        wanted = executable or "redis-server"
        raise RedisServerNotFound(f"{wanted} not found; {_INSTALL_HINT}")
    return found


def _free_port(other_than: int | None = None) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((_HOST, 0))
            port: int = probe.getsockname()[1]
        if port != other_than:
            return port


def _ping(port: int) -> bool:
    """Return whether a Redis on the port answers PING with PONG (not LOADING or an error)."""
    try:
        with socket.create_connection((_HOST, port), timeout=0.5) as conn:
            conn.sendall(b"*1\r\n$4\r\nPING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent(parent_pid: int) -> None:
    """In the child, before exec: on Linux, ask for SIGTERM when the parent dies.

    The atexit hook covers a normal exit; this covers a parent killed outright (SIGKILL, or a
    SIGTERM that skips atexit), so a crashed demo or test run never leaves a server behind. A
    parent that died before the request took effect sends nothing: then the child exits now.
    """
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)


def set_parent_death_signal(signum: int) -> bool:
    """On Linux, have the kernel send ``signum`` to this process when its parent dies.

    ``prctl(PR_SET_PDEATHSIG)``. It does not fire for a parent that is already gone: check
    ``os.getppid()`` afterwards. Returns False where there is no such call.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return bool(prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0)


_PR_SET_PDEATHSIG = 1


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.kill()
            server._discard_directory()
