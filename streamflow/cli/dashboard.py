"""The ``streamflow dashboard`` command: serve the web dashboard (the ``dashboard`` extra).

The pages themselves are in :mod:`streamflow.dashboard`; this module checks that the bind is
safe (loopback, or a token), connects, and runs uvicorn.
"""

from __future__ import annotations

import click

from streamflow import config, extras
from streamflow.cli.options import connect_redis, connection_options, errors_to_exit, logger
from streamflow.dashboard.settings import DashboardSettings
from streamflow.errors import ConfigError
from streamflow.logs import echo


@click.command("dashboard")
@connection_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8200, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token",
    envvar="STREAMFLOW_DASHBOARD_TOKEN",
    default=None,
    help="Require this token (a bearer header, or the login form). Needed off loopback.",
)
@click.option("--read-only", is_flag=True, help="Hide and refuse every action.")
@click.option(
    "--root-path",
    default="",
    help="The path prefix a reverse proxy serves the dashboard under, e.g. /streamflow.",
)
@errors_to_exit
def dashboard(
    redis_url: str,
    namespace: str,
    host: str,
    port: int,
    token: str | None,
    read_only: bool,
    root_path: str,
) -> None:
    """Serve the web dashboard: roles, workers, jobs, task graphs, dead letters.

    It binds 127.0.0.1 by default; any other address needs --token (or
    STREAMFLOW_DASHBOARD_TOKEN). See docs/dashboard.md for running it behind a proxy.
    """
    settings = config.build(config.ConnectionSettings, redis_url=redis_url, namespace=namespace)
    options = DashboardSettings(
        host=host, port=port, token=token or None, read_only=read_only, root_path=root_path
    )
    # Checked before the extra is imported: an unsafe bind is refused even without it.
    problem = options.problem()
    if problem is not None:
        raise ConfigError(problem)
    extras.require("dashboard", "streamflow dashboard")
    from streamflow.dashboard.server import serve

    redis = connect_redis(settings, name="streamflow-dashboard")
    logger.info("dashboard on %s", options.url())
    echo(f"dashboard: {options.url()}", err=True)
    serve(redis, settings.namespace, options)
