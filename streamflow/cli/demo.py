"""The ``streamflow demo`` command: its options, then :mod:`streamflow.cli.demo_runner` runs it.

The runner (a redis-server, a worker and a coordinator, the task and its figures) is imported
only once the options are checked: ``streamflow demo --help`` and a refused option need none of
it, and a Ctrl-C while it loads ends the command as one during the run does.
"""

from __future__ import annotations

import signal
import sys

import click

from streamflow import connect
from streamflow.cli.options import errors_to_exit
from streamflow.errors import ConfigError
from streamflow.logs import echo


@click.command()
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
@errors_to_exit
def demo(redis_url: str | None, batches: int, keep: bool) -> None:
    """Run a streaming DAG task end to end, on a Redis the demo starts (and stops) itself."""
    if redis_url is not None:
        connect.validate_url(redis_url)
    try:
        from streamflow.cli import demo_runner
        from streamflow.ops.server import RedisServer

        if keep and redis_url is None and not RedisServer.available():
            raise ConfigError(
                "--keep needs a real Redis: put redis-server on PATH or use --redis-url"
            )
        code = demo_runner.main(
            redis_url, batches=batches, keep=keep, echo=click.echo, live=sys.stdout.isatty()
        )
    except KeyboardInterrupt:  # before the demo listens for signals itself
        code = 128 + signal.SIGINT
    if code > 128:
        echo("interrupted: the demo stopped everything it started", err=True)
    sys.exit(code)
