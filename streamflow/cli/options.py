"""What the ``streamflow`` command modules share: options, connecting, errors, output.

Every command module imports these by their public names and nothing else from a sibling: the
``--redis-url``/``--namespace``/``--tls-*`` options (:func:`connection_options`) and the
clients built from them (:func:`connect_redis`, :func:`open_client`), the one-line error exit
(:func:`errors_to_exit`), the start-up wait of long-running commands (:func:`wait_ready`),
the metrics server (:func:`serving_metrics`, :data:`metrics_host_option`), options spelled
from a settings field (:func:`setting_option`), JSON output (:func:`echo_json`) and the
logging set-up the root group runs before any command (:func:`configure`). It imports no
command module, so no command module can be imported back through it.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import anyio
import click
import orjson
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamflow import config, connect, logs
from streamflow.client import Client
from streamflow.errors import ConfigError, StreamflowError
from streamflow.logs import echo
from streamflow.metrics import Health, MetricsServer
from streamflow.ops import guard

logger = logging.getLogger("streamflow")
F = TypeVar("F", bound=Callable[..., Any])

#: The exit code of a command that had nothing to do: a publish dropped by its dedup key, a
#: replay that found nothing to replay.
EXIT_NOTHING_DONE = 3


def errors_to_exit(func: F) -> F:
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


@errors_to_exit
def configure(log_level: str, log_format: str) -> None:
    """What the root group does before any command: check the environment, set up logging."""
    config.check_environment()
    logs.configure(log_level, log_format)


def echo_json(doc: Any, *, indent: bool = False) -> None:
    """Print ``doc`` as JSON: one line, or (``indent``) indented by two spaces."""
    echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2 if indent else None).decode())


#: Where the --tls-* options of the running command are kept (in ``click.Context.meta``).
_TLS_META = "streamflow.tls"


def _remember_tls(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None and param.name is not None:
        ctx.meta.setdefault(_TLS_META, {})[param.name] = value


def tls_options() -> dict[str, str]:
    """The --tls-* options given to the running command (or their STREAMFLOW_TLS_* variables)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(_TLS_META, {})) if ctx is not None else {}


def connection_options(func: F) -> F:
    """Add --redis-url, --namespace and the --tls-* options to a command.

    The TLS options are not passed to the command function: they are kept on the click context
    and applied by :func:`connect_redis` (and so :func:`open_client`), so every command that
    connects takes them without a parameter of its own. Commands that build their own settings
    (worker, coordinator) put :func:`tls_options` in them, and so validate them at start-up.
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


def connect_redis(
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
    given = tls_options()
    if given and not settings.tls:
        settings = config.build(type(settings), **{**dict(settings), **given})
    return connect.connect(
        settings.url,
        socket_timeout=socket_timeout,
        name=name,
        max_connections=max_connections,
        **settings.tls,
    )


@asynccontextmanager
async def open_client(settings: config.ConnectionSettings) -> AsyncIterator[Client]:
    """A :class:`Client` of the Redis of ``settings``, which answered a PING, for the block."""
    redis = connect_redis(settings, name="streamflow-cli")
    try:
        await connect.ping(redis, settings.url)
        yield Client(redis, namespace=settings.namespace)
    finally:
        await redis.aclose()


async def _check_server(redis: Redis, url: str, *, strict: bool) -> None:
    """The start-up checks: warn once each, or (``strict``) refuse in one line listing them."""
    warnings = await guard.check_server(redis, url, log=not strict)
    guard.enforce(warnings, strict=strict, url=url)


async def wait_ready(redis: Redis, url: str, *, checks: bool, strict: bool) -> bool:
    """:func:`wait_for_server`, closing the client unless it is to be used (True)."""
    try:
        up = await wait_for_server(redis, url, checks=checks, strict=strict)
    except BaseException:
        await redis.aclose()
        raise
    if not up:
        await redis.aclose()
    return up


async def wait_for_server(redis: Redis, url: str, *, checks: bool, strict: bool) -> bool:
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


def setting_option(
    name: str, model: type[config.ConnectionSettings] = config.WorkerSettings, **attrs: Any
) -> Callable[[F], F]:
    """A click option for field ``name`` of ``model``, spelled from the field.

    Its name (``--read-count``), its ``STREAMFLOW_*`` variable and its default (shown in
    ``--help``) are the field's; ``attrs`` add the type and help text.
    """
    field = model.model_fields[name]
    if not field.is_required() and field.default is not None and not attrs.get("is_flag"):
        attrs = {"default": field.default, "show_default": True, **attrs}
    return click.option(config.option_name(name), name, envvar=config.env_var(name), **attrs)


#: ``--metrics-host`` of every command that serves metrics (worker, coordinator, exporter).
metrics_host_option = setting_option(
    "metrics_host",
    help="The address the metrics and health server listens on: loopback by default; "
    "0.0.0.0 to be scraped from other hosts or from outside a container.",
)


@contextmanager
def serving_metrics(
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
