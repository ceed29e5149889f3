"""The ``streamflow worker`` command (serve the roles of an app) and ``check`` (a health probe).

``worker --processes N`` hands over to :mod:`streamflow.ops.supervisor`, whose children run this
same command with the hidden ``--parent-pid``/``--parent-fd`` options.
"""

from __future__ import annotations

import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import anyio
import click

from streamflow import config, connect
from streamflow.cli.options import (
    connect_redis,
    connection_options,
    errors_to_exit,
    logger,
    metrics_host_option,
    serving_metrics,
    setting_option,
    tls_options,
    wait_for_server,
    wait_ready,
)
from streamflow.errors import ConfigError
from streamflow.logs import echo
from streamflow.metrics import Health
from streamflow.worker import Worker, tune_garbage_collector


@click.command()
@setting_option("app", required=True, help="The App to load, as package.module:attribute.")
@setting_option(
    "roles",
    multiple=True,
    help="A role to serve; repeat for several. Default: every role of the app.",
)
@setting_option("concurrency", type=int, help="Handlers run at once per process.")
@setting_option(
    "consumer_name", help="Stable consumer name (default: host-pid-random). Unique per process."
)
@setting_option("processes", type=int, help="Worker processes under one supervising parent.")
@setting_option("read_count", type=int, help="The most entries one read fetches.")
@setting_option(
    "prefetch",
    help="Entries read ahead of free handler slots: 'auto' (what the worker starts in about "
    "50 ms, at most --read-count and about 16 MiB) or a number (0: none).",
)
@setting_option("block_ms", type=int, help="How long an idle read blocks.")
@setting_option("max_message_bytes", type=int, help="Larger messages are dead-lettered.")
@setting_option(
    "shutdown_grace", type=float, help="Seconds in-flight handlers get to finish on SIGTERM."
)
@setting_option(
    "dead_letter_max_len",
    type=int,
    help="Each dead-letter stream is capped near this many entries (oldest go first).",
)
@setting_option(
    "lease_ttl",
    type=float,
    help="Seconds an entry may go unrenewed before another worker adopts it.",
)
@setting_option(
    "renew_interval",
    type=float,
    help="Seconds between lease renewals (default: a third of --lease-ttl).",
)
@setting_option(
    "reclaim_interval",
    type=float,
    help="Seconds between adoption steps for entries idle past the lease TTL.",
)
@setting_option(
    "metrics_port",
    type=click.IntRange(0, 65_535),
    help="Serve /metrics, /healthz and /readyz on this port (with --processes N, child i "
    "uses PORT+i).",
)
@metrics_host_option
@setting_option(
    "strict",
    is_flag=True,
    help="Refuse to start when the start-up checks of Redis warn (no AOF, an evicting "
    "maxmemory-policy, the password-less default user, plaintext to another host).",
)
# Children of --processes N skip the checks: their parent ran them once for all.
@click.option(
    "--no-server-checks", "server_checks", is_flag=True, flag_value=False, default=True, hidden=True
)
# Children of --processes N die with their parent: its pid, and the pipe whose EOF means it died.
@setting_option("parent_pid", type=int, hidden=True)
@setting_option("parent_fd", type=int, hidden=True)
@connection_options
@errors_to_exit
def worker(**options: Any) -> None:
    """Serve roles of an app: streamflow worker --app pkg.module:app --role ROLE."""
    settings = worker_settings(options)
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


def worker_settings(options: Mapping[str, Any]) -> config.WorkerSettings:
    """The settings the options of ``streamflow worker`` give (with its --tls-* options).

    Raises:
        ConfigError: An option is invalid, or contradicts another.
    """
    settings = config.build(config.WorkerSettings, **options, **tls_options())
    assert isinstance(settings, config.WorkerSettings)
    return settings


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def _check_once(settings: config.WorkerSettings) -> None:
    """The start-up checks in the parent of --processes N, once for all its children."""
    redis = connect_redis(settings, name="streamflow-supervisor")
    try:
        if not await wait_for_server(redis, settings.url, checks=True, strict=settings.strict):
            sys.exit(0)
    finally:
        await redis.aclose()


async def _serve(settings: config.WorkerSettings, app: Any) -> None:
    redis = connect_redis(
        settings,
        socket_timeout=settings.block_ms / 1000 + 10,
        name=f"streamflow-worker-{settings.consumer_name or ''}".rstrip("-"),
        # A blocking reader per role partition and the signal listener hold one connection
        # each (on a cluster, per node: this bounds every node's share).
        max_connections=sum(app.get_role(name).partitions for name in settings.roles or app.roles)
        + 32,
    )
    if not await wait_ready(
        redis, settings.url, checks=settings.server_checks, strict=settings.strict
    ):
        return
    worker = Worker.from_settings(app, settings, redis)
    roles = ", ".join(settings.roles or tuple(app.roles))
    health = Health(redis)
    tune_garbage_collector()  # this process is the worker's alone
    try:
        with serving_metrics(
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


@click.command()
@click.option(
    "--url",
    help="A health URL of a worker or coordinator, e.g. http://127.0.0.1:9100/readyz. "
    "Without it, check that Redis answers.",
)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds.")
@connection_options
@errors_to_exit
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
    redis = connect_redis(settings, socket_timeout=timeout, name="streamflow-check")
    try:
        with anyio.fail_after(timeout):
            await redis.ping()
    except (*connect.TRANSIENT_ERRORS, TimeoutError) as exc:
        return False, f"Redis at {settings.safe_url} does not answer: {exc}"
    finally:
        await redis.aclose()
    return True, f"Redis at {settings.safe_url} answers"
