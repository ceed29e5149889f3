"""The ``streamflow`` commands worker, publish, cancel, dlq, check, schema and demo.

The root group is :mod:`streamflow.cli` (it imports this module when one of these commands
is run); the task commands are in :mod:`streamflow.cli.tasks`, the observability commands in
:mod:`streamflow.cli.inspect` and ``acl`` in :mod:`streamflow.cli.security`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from typing import IO, Any, TypeVar

import anyio
import click
import orjson
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import config, connect, logs
from streamflow.cli import main as main  # re-exported: the command modules register on it
from streamflow.client import CancelResult, Client
from streamflow.deadletters import DeadLetterEntry, ReplayResult
from streamflow.errors import ConfigError, StreamflowError
from streamflow.logs import echo, shown
from streamflow.metrics import Health, MetricsServer
from streamflow.ops import guard
from streamflow.protocol import json_schemas
from streamflow.worker import Worker, tune_garbage_collector

logger = logging.getLogger("streamflow")
F = TypeVar("F", bound=Callable[..., Any])


def _errors_to_exit(func: F) -> F:
    """Report a streamflow error as one line on stderr and exit 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StreamflowError as exc:
            echo(f"error: {_bounded(exc)}", err=True)
            sys.exit(2)
        except ResponseError as exc:
            # E.g. WRONGTYPE: someone wrote another type of key at one of ours. One line too.
            echo(f"error: Redis refused a command: {_bounded(exc)}", err=True)
            sys.exit(2)
        except BaseExceptionGroup as group:
            # Raised inside a task group (e.g. a worker's start-up check): the same one line.
            ours, rest = group.split(StreamflowError)
            if ours is None or rest is not None:
                raise
            echo(f"error: {_bounded(_leaves(ours)[0])}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def _bounded(exc: BaseException, limit: int = 4000) -> str:
    """An error's text, cut to ``limit`` characters (it may echo rejected input)."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + logs.ELISION


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


#: Where the --tls-* options of the running command are kept (in ``click.Context.meta``).
_TLS_META = "streamflow.tls"


def _remember_tls(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None and param.name is not None:
        ctx.meta.setdefault(_TLS_META, {})[param.name] = value


def _tls_options() -> dict[str, str]:
    """The --tls-* options given to the running command (or their STREAMFLOW_TLS_* variables)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(_TLS_META, {})) if ctx is not None else {}


def _connection_options(func: F) -> F:
    """Add --redis-url, --namespace and the --tls-* options to a command.

    The TLS options are not passed to the command function: they are kept on the click context
    and applied by :func:`_connect` (and so :func:`_client`), so every command that connects
    takes them without a parameter of its own. Commands that build their own settings (worker,
    coordinator) put :func:`_tls_options` in them, and so validate them at start-up.
    """
    for option, envvar, text in reversed(_TLS_OPTIONS):
        func = click.option(
            option,
            envvar=envvar,
            expose_value=False,
            callback=_remember_tls,
            metavar="FILE",
            help=text,
        )(func)
    func = click.option(
        "--namespace",
        envvar="STREAMFLOW_NAMESPACE",
        default="sf",
        show_default=True,
        help="Prefix of every key.",
    )(func)
    return click.option(
        "--redis-url",
        envvar="STREAMFLOW_REDIS_URL",
        default=config.DEFAULT_REDIS_URL,
        show_default=True,
        help="redis://, rediss://, unix://, redis+cluster://, rediss+cluster:// or "
        "redis+sentinel:// URL, with optional user and password.",
    )(func)


_TLS_OPTIONS = (
    (
        "--tls-ca-file",
        "STREAMFLOW_TLS_CA_FILE",
        "rediss://: CA certificates (PEM) that signed the server's (default: the system's).",
    ),
    (
        "--tls-cert-file",
        "STREAMFLOW_TLS_CERT_FILE",
        "rediss://: client certificate (PEM), for servers with tls-auth-clients.",
    ),
    (
        "--tls-key-file",
        "STREAMFLOW_TLS_KEY_FILE",
        "rediss://: the client certificate's private key (PEM, unencrypted).",
    ),
)


def _connect(
    settings: config.ConnectionSettings,
    *,
    name: str,
    socket_timeout: float | None = 10.0,
    max_connections: int = 64,
) -> Redis:
    """A client of the Redis of ``settings``, over TLS with the command's --tls-* options.

    Raises:
        ConfigError: A TLS file is missing or unreadable, or does not fit the URL.
    """
    given = _tls_options()
    if given and not settings.tls:
        settings = config.build(type(settings), **{**dict(settings), **given})
    return connect.connect(
        settings.url,
        socket_timeout=socket_timeout,
        name=name,
        max_connections=max_connections,
        **settings.tls,
    )


async def _check_server(redis: Redis, url: str, *, strict: bool) -> None:
    """The start-up checks: warn once each, or (``strict``) refuse in one line listing them."""
    warnings = await guard.check_server(redis, url, log=not strict)
    guard.enforce(warnings, strict=strict, url=url)


#: ``--metrics-host`` of every command that serves metrics (worker, coordinator, exporter).
metrics_host_option = click.option(
    "--metrics-host",
    envvar="STREAMFLOW_METRICS_HOST",
    default="127.0.0.1",
    show_default=True,
    help="The address the metrics and health server listens on: loopback by default; "
    "0.0.0.0 to be scraped from other hosts or from outside a container.",
)


async def _ready(redis: Redis, url: str, *, checks: bool, strict: bool) -> bool:
    """:func:`_wait_for_server`, closing the client unless it is to be used (True)."""
    try:
        up = await _wait_for_server(redis, url, checks=checks, strict=strict)
    except BaseException:
        await redis.aclose()
        raise
    if not up:
        await redis.aclose()
    return up


async def _wait_for_server(redis: Redis, url: str, *, checks: bool, strict: bool) -> bool:
    """Start-up of a long-running command: wait for Redis, then run the checks.

    Redis down, restarting or loading is an outage: logged once and retried with backoff, so
    that a deploy may start workers before Redis or during a failover. SIGTERM or SIGINT
    while waiting returns False (nothing was started, nothing to finish).

    Raises:
        RedisUnavailable: A failure that waiting cannot cure (credentials, TLS).
        ConfigError: The checks refuse (``strict``, or a refuse-level warning).
    """
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_on_signal, tg.cancel_scope)
        await connect.wait_until_up(redis, url)
        if checks:
            await connect.retry_outages(
                lambda: _check_server(redis, url, strict=strict), "running the start-up checks"
            )
        tg.cancel_scope.cancel()
        return True
    logger.info("stopped while waiting for Redis")
    return False


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


@_errors_to_exit
def configure(log_level: str, log_format: str) -> None:
    """What the root group does before any command: check the environment, set up logging."""
    config.check_environment()
    logs.configure(log_level, log_format)


@main.command()
@click.option(
    "--app",
    "app_path",
    envvar="STREAMFLOW_APP",
    required=True,
    help="The App to load, as package.module:attribute.",
)
@click.option(
    "--role",
    "roles",
    envvar="STREAMFLOW_ROLES",
    multiple=True,
    help="A role to serve; repeat for several. Default: every role of the app.",
)
@click.option(
    "--concurrency",
    envvar="STREAMFLOW_CONCURRENCY",
    type=int,
    default=64,
    show_default=True,
    help="Handlers run at once per process.",
)
@click.option(
    "--consumer-name",
    envvar="STREAMFLOW_CONSUMER_NAME",
    help="Stable consumer name (default: host-pid-random). Unique per process.",
)
@click.option(
    "--processes",
    envvar="STREAMFLOW_PROCESSES",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes under one supervising parent.",
)
@click.option(
    "--read-count",
    envvar="STREAMFLOW_READ_COUNT",
    type=int,
    default=1000,
    show_default=True,
    help="The most entries one read fetches.",
)
@click.option(
    "--prefetch",
    envvar="STREAMFLOW_PREFETCH",
    default="auto",
    show_default=True,
    help="Entries read ahead of free handler slots: 'auto' (what the worker starts in about "
    "50 ms, at most --read-count and about 16 MiB) or a number (0: none).",
)
@click.option(
    "--block-ms",
    envvar="STREAMFLOW_BLOCK_MS",
    type=int,
    default=1000,
    show_default=True,
    help="How long an idle read blocks.",
)
@click.option(
    "--max-message-bytes",
    envvar="STREAMFLOW_MAX_MESSAGE_BYTES",
    type=int,
    default=1024 * 1024,
    show_default=True,
    help="Larger messages are dead-lettered.",
)
@click.option(
    "--shutdown-grace",
    envvar="STREAMFLOW_SHUTDOWN_GRACE",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds in-flight handlers get to finish on SIGTERM.",
)
@click.option(
    "--dead-letter-max-len",
    envvar="STREAMFLOW_DEAD_LETTER_MAX_LEN",
    type=int,
    default=100_000,
    show_default=True,
    help="Each dead-letter stream is capped near this many entries (oldest go first).",
)
@click.option(
    "--lease-ttl",
    envvar="STREAMFLOW_LEASE_TTL",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds an entry may go unrenewed before another worker adopts it.",
)
@click.option(
    "--renew-interval",
    envvar="STREAMFLOW_RENEW_INTERVAL",
    type=float,
    help="Seconds between lease renewals (default: a third of --lease-ttl).",
)
@click.option(
    "--reclaim-interval",
    envvar="STREAMFLOW_RECLAIM_INTERVAL",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds between adoption steps for entries idle past the lease TTL.",
)
@click.option(
    "--metrics-port",
    envvar="STREAMFLOW_METRICS_PORT",
    type=click.IntRange(0, 65_535),
    help="Serve /metrics, /healthz and /readyz on this port (with --processes N, child i "
    "uses PORT+i).",
)
@metrics_host_option
@click.option(
    "--strict",
    envvar="STREAMFLOW_STRICT",
    is_flag=True,
    help="Refuse to start when the start-up checks of Redis warn (no AOF, an evicting "
    "maxmemory-policy, the password-less default user, plaintext to another host).",
)
# Children of --processes N skip the checks: their parent ran them once for all.
@click.option(
    "--no-server-checks", "server_checks", is_flag=True, flag_value=False, default=True, hidden=True
)
# Children of --processes N die with their parent: its pid, and the pipe whose EOF means it died.
@click.option("--parent-pid", type=int, hidden=True)
@click.option("--parent-fd", type=int, hidden=True)
@_connection_options
@_errors_to_exit
def worker(app_path: str, roles: tuple[str, ...], **options: Any) -> None:
    """Serve roles of an app: streamflow worker --app pkg.module:app --role ROLE."""
    settings = config.build(
        config.WorkerSettings, app=app_path, roles=roles, **options, **_tls_options()
    )
    assert isinstance(settings, config.WorkerSettings)
    if settings.parent_fd is not None and not _is_open(settings.parent_fd):
        raise ConfigError(f"--parent-fd {settings.parent_fd} is not an open file descriptor")
    if settings.parent_pid is not None:
        from streamflow.ops.supervisor import die_with_parent

        if not die_with_parent(settings.parent_pid):
            logger.warning("supervising process %d is gone; not starting", settings.parent_pid)
            sys.exit(0)
    app = config.load_app(settings.app)
    for role in settings.roles:
        app.get_role(role)
    if not app.roles:
        raise ConfigError(f"app {settings.app!r} has no roles")
    if settings.processes > 1:
        from streamflow.ops.supervisor import supervise

        if settings.server_checks:
            anyio.run(_check_once, settings)
        sys.exit(supervise(settings))
    anyio.run(_serve, settings, app)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def _check_once(settings: config.WorkerSettings) -> None:
    """The start-up checks in the parent of --processes N, once for all its children."""
    redis = _connect(settings, name="streamflow-supervisor")
    try:
        if not await _wait_for_server(redis, settings.url, checks=True, strict=settings.strict):
            sys.exit(0)
    finally:
        await redis.aclose()


async def _serve(settings: config.WorkerSettings, app: Any) -> None:
    redis = _connect(
        settings,
        socket_timeout=settings.block_ms / 1000 + 10,
        name=f"streamflow-worker-{settings.consumer_name or ''}".rstrip("-"),
        # A blocking reader per role partition and the signal listener hold one connection
        # each (on a cluster, per node: this bounds every node's share).
        max_connections=sum(app.get_role(name).partitions for name in settings.roles or app.roles)
        + 32,
    )
    if not await _ready(redis, settings.url, checks=settings.server_checks, strict=settings.strict):
        return
    worker = Worker.from_settings(app, settings, redis)
    roles = ", ".join(settings.roles or tuple(app.roles))
    health = Health(redis)
    tune_garbage_collector()  # this process is the worker's alone
    try:
        with _serving_metrics(
            worker.enable_metrics if settings.metrics_port is not None else None,
            health,
            settings.metrics_port,
            settings.metrics_host,
        ):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, worker, tg.cancel_scope)
                if settings.parent_fd is not None:
                    tg.start_soon(_watch_parent, worker, settings.parent_fd)
                tg.start_soon(health.run)
                await tg.start(worker.run)
                health.started = True
                logger.info(
                    "worker %s serving %s on %s (namespace %s, concurrency %d)",
                    worker.consumer,
                    roles,
                    settings.safe_url,
                    settings.namespace,
                    worker.concurrency,
                )
                await worker.wait_stopped()
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await redis.aclose()
    logger.info("worker %s stopped", worker.consumer)


@contextmanager
def _serving_metrics(
    make_registry: Callable[[], CollectorRegistry] | None,
    health: Health,
    port: int | None,
    host: str = "127.0.0.1",
) -> Iterator[None]:
    """Serve metrics and health checks for the block, when a port is given."""
    if make_registry is None or port is None:
        yield
        return
    try:
        server = MetricsServer(make_registry(), health, port=port, host=host)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host} port {port}: {exc.strerror or exc}"
        ) from None
    with server:
        shown_host = f"[{host}]" if ":" in host else host
        logger.info("metrics on http://%s:%d/metrics (/healthz, /readyz)", shown_host, server.port)
        yield


async def _watch_signals(worker: Worker, scope: anyio.CancelScope) -> None:
    received = 0
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            # Counted here, not read from worker.stopping: a stop that came another way (the
            # supervisor's death, then its SIGTERM from the kernel) still gets its grace.
            received += 1
            if received == 1:
                name = signal.Signals(signum).name
                logger.info("%s: finishing in-flight work (signal again to exit now)", name)
                worker.stop()
            else:
                logger.warning("second signal: exiting now; unfinished entries stay pending")
                scope.cancel()
                return


async def _watch_parent(worker: Worker, fd: int) -> None:
    from streamflow.ops.supervisor import wait_parent_gone

    await wait_parent_gone(fd)
    if not worker.stopping:
        logger.warning(
            "supervising process is gone: stopping (in-flight work gets the shutdown grace, "
            "the rest is released)"
        )
        worker.stop()


@main.command()
@click.argument("role")
@click.option("--json", "json_text", help="The payload, as one JSON document.")
@click.option(
    "--file",
    "file",
    type=click.File("rb"),
    help="Read one JSON payload per line from a file ('-' for stdin).",
)
@click.option(
    "--key",
    help="A partitioned role: jobs with the same key go to the same partition, in order.",
)
@click.option("--id", "message_id", help="The message id (single publish only).")
@click.option("--dedup-key", help="Publish at most once per key within the dedup window.")
@click.option("--delay", type=float, help="Start no earlier than this many seconds from now.")
@click.option(
    "--at",
    "at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"]),
    help="Start no earlier than this time (ISO 8601; local time without an offset).",
)
@click.option(
    "--deadline",
    help="Do not start it after this: seconds from now (e.g. 300), or a time (ISO 8601; local "
    "time without an offset). Past it the job is dead-lettered as expired.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse (exit 2) a role that no worker ever served, instead of a warning naming the "
    "known roles.",
)
@_connection_options
@_errors_to_exit
def publish(
    role: str,
    json_text: str | None,
    file: IO[bytes] | None,
    key: str | None,
    message_id: str | None,
    dedup_key: str | None,
    delay: float | None,
    at: datetime | None,
    deadline: str | None,
    strict: bool,
    redis_url: str,
    namespace: str,
) -> None:
    """Publish jobs to ROLE; prints one message id per line.

    A publish dropped by --dedup-key (the key was used within the dedup window) prints the
    first message's id, says so on stderr and exits 3: nothing was published.
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    if (json_text is None) == (file is None):
        raise ConfigError("give exactly one of --json or --file")
    single = (message_id, dedup_key, delay, at, deadline)
    if file is not None and any(option is not None for option in single):
        raise ConfigError(
            "--id, --dedup-key, --delay, --at and --deadline apply to a single --json publish"
        )
    if delay is not None and at is not None:
        raise ConfigError("give --delay or --at, not both")
    if json_text is not None:
        payloads = [_parse_json(json_text.encode(), "--json")]
    else:
        assert file is not None
        payloads = list(_read_lines(file))
    when = at if at is not None else delay
    from streamflow.protocol import new_message_id

    # With a dedup key the id is chosen here: getting another one back means a dedup hit.
    sent_id = message_id or (new_message_id() if dedup_key else None)
    options = (key, sent_id, dedup_key, when, _deadline(deadline), strict)
    ids = anyio.run(_publish, settings, role, payloads, options)
    for one in ids:
        echo(one)
    if dedup_key and ids != [sent_id]:
        echo(
            f"deduplicated: dedup key already used by message {ids[0]}; nothing published", err=True
        )
        sys.exit(EXIT_NOTHING_DONE)


#: The exit code of a command that had nothing to do: a publish dropped by its dedup key, a
#: replay that found nothing to replay.
EXIT_NOTHING_DONE = 3


def _deadline(text: str | None) -> datetime | timedelta | None:
    """``--deadline``: seconds from now, or an ISO 8601 time."""
    if text is None:
        return None
    try:
        return timedelta(seconds=float(text))
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--deadline {text!r}: give seconds from now or an ISO 8601 time"
        ) from None


def _parse_json(raw: bytes, where: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{where}: invalid JSON: {exc}") from None


def _read_lines(file: IO[bytes]) -> Iterator[Any]:
    for number, line in enumerate(file, start=1):
        if line.strip():
            yield _parse_json(line, f"line {number}")


async def _publish(
    settings: config.ConnectionSettings,
    role: str,
    payloads: list[Any],
    options: tuple[str | None, str | None, str | None, Any, Any, bool],
) -> list[str]:
    key, message_id, dedup_key, when, deadline, strict = options
    async with _client(settings) as client:
        if len(payloads) == 1:
            one = await client.publish(
                role,
                payloads[0],
                key=key,
                message_id=message_id,
                dedup_key=dedup_key,
                delay=when,
                deadline=deadline,
                strict=strict,
            )
            return [one]
        keys = None if key is None else [key] * len(payloads)
        return await client.publish_many(role, payloads, keys=keys, strict=strict)


@asynccontextmanager
async def _client(settings: config.ConnectionSettings) -> AsyncIterator[Client]:
    redis = _connect(settings, name="streamflow-cli")
    try:
        await connect.ping(redis, settings.url)
        yield Client(redis, namespace=settings.namespace)
    finally:
        await redis.aclose()


@main.command()
@click.option("--kind", type=click.Choice(sorted(json_schemas())), help="Only this kind.")
def schema(kind: str | None) -> None:
    """Print the JSON Schema of every message kind of the wire protocol."""
    schemas = json_schemas()
    out = schemas[kind] if kind else schemas
    echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())


@main.command()
@click.option(
    "--redis-url",
    envvar="STREAMFLOW_REDIS_URL",
    default=None,
    help="Use this Redis (in a fresh namespace) instead of starting a private redis-server.",
)
@click.option(
    "--batches",
    type=click.IntRange(1, 100_000),
    default=20,
    show_default=True,
    help="Batches of 100 readings the source emits.",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Leave Redis, the worker and the coordinator running until Ctrl-C, and print "
    "commands to try on them.",
)
@_errors_to_exit
def demo(redis_url: str | None, batches: int, keep: bool) -> None:
    """Run a streaming DAG task end to end, on a Redis the demo starts (and stops) itself."""
    if redis_url is not None:
        connect.validate_url(redis_url)
    try:
        from streamflow.cli import demo as demo_module
        from streamflow.ops.server import RedisServer

        if keep and redis_url is None and not RedisServer.available():
            raise ConfigError(
                "--keep needs a real Redis: put redis-server on PATH or use --redis-url"
            )
        code = demo_module.main(
            redis_url, batches=batches, keep=keep, echo=click.echo, live=sys.stdout.isatty()
        )
    except KeyboardInterrupt:  # before the demo listens for signals itself
        code = 128 + signal.SIGINT
    if code > 128:
        echo("interrupted: the demo stopped everything it started", err=True)
    sys.exit(code)


@main.command()
@click.option(
    "--url",
    help="A health URL of a worker or coordinator, e.g. http://127.0.0.1:9100/readyz. "
    "Without it, check that Redis answers.",
)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds.")
@_connection_options
@_errors_to_exit
def check(url: str | None, timeout: float, redis_url: str, namespace: str) -> None:
    """Probe: exit 0 when healthy, 1 when not (for container health checks)."""
    if url is not None:
        ok, detail = _probe_url(url, timeout)
    else:
        settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
        ok, detail = anyio.run(_probe_redis, settings, timeout)
    echo(("ok: " if ok else "not ok: ") + detail)
    sys.exit(0 if ok else 1)


def _probe_url(url: str, timeout: float) -> tuple[bool, str]:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be an http:// or https:// URL, not {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return True, reply.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        return False, f"{exc.code}: {exc.read().decode(errors='replace').strip()}"
    except OSError as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"


async def _probe_redis(
    settings: config.ConnectionSettings,
    timeout: float,  # noqa: ASYNC109 - the --timeout option
) -> tuple[bool, str]:
    redis = _connect(settings, socket_timeout=timeout, name="streamflow-check")
    try:
        with anyio.fail_after(timeout):
            await redis.ping()
    except (*connect.TRANSIENT_ERRORS, TimeoutError) as exc:
        return False, f"Redis at {settings.safe_url} does not answer: {exc}"
    finally:
        await redis.aclose()
    return True, f"Redis at {settings.safe_url} answers"


@main.group()
def dlq() -> None:
    """Dead letters: list, show, replay, purge."""


@dlq.command("list")
@click.argument("role")
@click.option("--count", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document per line.")
@_connection_options
@_errors_to_exit
def dlq_list(role: str, count: int, as_json: bool, redis_url: str, namespace: str) -> None:
    """List the oldest dead letters of ROLE."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    total, entries = anyio.run(_dlq_list, settings, role, count)
    for entry in entries:
        letter = entry.letter
        if letter is None:
            if as_json:
                echo(orjson.dumps({"id": entry.id, "problem": entry.problem}).decode())
            else:
                echo(f"{entry.id}  unreadable: {shown(entry.problem)}")
            continue
        if as_json:
            echo(orjson.dumps({"id": entry.id, **letter.model_dump(mode="json")}).decode())
        else:
            when = datetime.fromtimestamp(letter.dead_at_ms / 1000).isoformat(timespec="seconds")
            # Every field was written by whoever could write the stream: one line each.
            echo(
                f"{entry.id}  {when}  {letter.reason:<19} message={shown(letter.message_id or '-')}"
                f" attempts={letter.attempts}  {shown(letter.detail, 100)}"
            )
    if not as_json:
        echo(
            f"{total} dead letters in {role!r}"
            + (f" (showing {len(entries)})" if total > len(entries) else "")
        )


async def _dlq_list(
    settings: config.ConnectionSettings, role: str, count: int
) -> tuple[int, list[DeadLetterEntry]]:
    async with _client(settings) as client:
        return await client.dead_letter_count(role), await client.dead_letters(role, count=count)


@dlq.command("show")
@click.argument("role")
@click.argument("dead_id")
@_connection_options
@_errors_to_exit
def dlq_show(role: str, dead_id: str, redis_url: str, namespace: str) -> None:
    """Show one dead letter of ROLE in full, with its original fields."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    _check_entry_ids([dead_id])
    entry = anyio.run(_dlq_show, settings, role, dead_id)
    if entry is None:
        raise ConfigError(f"no dead letter {dead_id!r} in role {role!r}")
    doc = {
        "id": entry.id,
        **(entry.letter.model_dump(mode="json") if entry.letter else {"problem": entry.problem}),
        "raw": {k: v.decode(errors="backslashreplace") for k, v in entry.raw.items()},
    }
    echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


def _check_entry_ids(ids: Sequence[str]) -> None:
    for entry_id in ids:
        # A partitioned role's dead letters are <partition>:<entry id>.
        if not re.fullmatch(r"(\d+:)?\d+-\d+", entry_id):
            raise ConfigError(
                f"{entry_id!r} is not a dead letter id (like 1718000000000-0, or 2:1718000000000-0 "
                "for a partitioned role)"
            )


async def _dlq_show(
    settings: config.ConnectionSettings, role: str, dead_id: str
) -> DeadLetterEntry | None:
    async with _client(settings) as client:
        return await client.dead_letter(role, dead_id)


@dlq.command("replay")
@click.argument("role")
@click.argument("dead_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter of ROLE.")
@_connection_options
@_errors_to_exit
def dlq_replay(
    role: str, dead_ids: tuple[str, ...], replay_all: bool, redis_url: str, namespace: str
) -> None:
    """Send dead letters back to ROLE's stream, attempts reset (each exactly once).

    Exits 3 when nothing was replayed (no dead letters, or every one skipped).
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    if bool(dead_ids) == replay_all:
        raise ConfigError("give dead-letter ids or --all")
    _check_entry_ids(dead_ids)
    result = anyio.run(_dlq_replay, settings, role, None if replay_all else list(dead_ids))
    for dead_id, new_id in result.replayed:
        echo(f"replayed {dead_id} -> {new_id}")
    for dead_id, why in result.skipped:
        echo(f"skipped {dead_id}: {why}", err=True)
    echo(f"{len(result.replayed)} replayed, {len(result.skipped)} skipped")
    if not result.replayed:
        sys.exit(EXIT_NOTHING_DONE)


async def _dlq_replay(
    settings: config.ConnectionSettings, role: str, dead_ids: list[str] | None
) -> ReplayResult:
    async with _client(settings) as client:
        return await client.replay(role, dead_ids)


@dlq.command("purge")
@click.argument("role")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_connection_options
@_errors_to_exit
def dlq_purge(role: str, yes: bool, redis_url: str, namespace: str) -> None:
    """Delete every dead letter of ROLE."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    if not yes:
        click.confirm(f"delete every dead letter of {role!r}?", abort=True)
    count = anyio.run(_dlq_purge, settings, role)
    echo(f"purged {count} dead letters from {role!r}")


async def _dlq_purge(settings: config.ConnectionSettings, role: str) -> int:
    async with _client(settings) as client:
        return await client.purge_dead_letters(role)


@main.command()
@click.argument("target_id")
@click.option("--task", "target", flag_value="task", help="TARGET_ID is a task id.")
@click.option("--message", "target", flag_value="message", help="TARGET_ID is a message id.")
@click.option("--reason", default="cancelled", show_default=True, help="Shown to handlers.")
@click.option("--requested-by", default="cli", show_default=True, help="Who asks, for logs.")
@click.option(
    "--wait",
    is_flag=True,
    help="Return once something matching was stopped and nothing matching still runs "
    "(a cancel of work not yet started stays in force, but --wait then times out).",
)
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="With --wait: give up after this many seconds (exit 1).",
)
@click.option(
    "--preemptive",
    is_flag=True,
    help="Cancel the id even if it names no known task and no queued, delayed or running "
    "message: what is submitted or published under it within 7 days is refused at once. "
    "Without it such an id is an error (exit 2).",
)
@_connection_options
@_errors_to_exit
def cancel(
    target_id: str,
    target: str | None,
    reason: str,
    requested_by: str,
    wait: bool,
    timeout: float,
    preemptive: bool,
    redis_url: str,
    namespace: str,
) -> None:
    """Cancel a task (all its messages) or one message by id, on every worker."""
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    try:
        result = anyio.run(
            _cancel,
            settings,
            target_id,
            target or "any",
            reason,
            requested_by,
            (wait, timeout, preemptive),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    echo(f"cancel {result.signal_id} sent for {target or 'task or message'} {target_id}")
    for consumer, message_id in result.stopped:
        echo(f"stopped {shown(message_id)} on {shown(consumer)}")
    if wait and not result.complete:
        if result.stopped:
            why = f"still running on {shown(', '.join(result.running_on), 1000)}"
        else:
            why = f"nothing matching {target_id!r} was stopped (unknown id, or not picked up yet)"
        echo(f"error: timed out after {timeout:g}s: {why}", err=True)
        sys.exit(1)


async def _cancel(
    settings: config.ConnectionSettings,
    target_id: str,
    target: Any,
    reason: str,
    requested_by: str,
    how: tuple[bool, float, bool],
) -> CancelResult:
    wait, timeout, preemptive = how
    async with _client(settings) as client:
        return await client.cancel(
            target_id,
            target=target,
            reason=reason,
            requested_by=requested_by,
            wait=wait,
            timeout=timeout,
            preemptive=preemptive,
        )
