"""The security commands of the ``streamflow`` CLI: ``acl``.

The rules themselves are data in :mod:`streamflow.ops.acl`; this module prints them as
``ACL SETUSER`` lines ready to pipe into ``redis-cli``, with notes on stderr.
"""

from __future__ import annotations

import os

import click

from streamflow.cli.options import errors_to_exit
from streamflow.errors import ConfigError
from streamflow.ops import acl


@click.command("acl")
@click.option(
    "--namespace",
    envvar="STREAMFLOW_NAMESPACE",
    default="sf",
    show_default=True,
    help="The namespace whose keys the user may touch.",
)
@click.option(
    "--for",
    "part",
    type=click.Choice(acl.PARTS),
    required=True,
    help="The part the user runs: worker, coordinator, publisher (also submits tasks), "
    "operator (inspect, workers, dlq, cancel, tasks, status, result, exporter) or dashboard "
    "(streamflow dashboard: the operator's reads and its pages' actions only).",
)
@click.option("--user", help="The ACL user name. [default: sf-<part>]")
@click.option(
    "--password-env",
    metavar="VAR",
    help="The environment variable holding the password: when it is set, the line carries "
    "its SHA-256 (#<hex>); else the placeholder >${VAR}, to fill in with envsubst. "
    "[default: SF_<PART>_PASSWORD]",
)
@errors_to_exit
def acl_command(namespace: str, part: acl.Part, user: str | None, password_env: str | None) -> None:
    """Print the ACL SETUSER line that gives one part exactly the rights it needs.

    Pipe it into redis-cli as an admin user, then connect that part with
    redis://USER:PASSWORD@host:port/0. The password is never printed.
    """
    var = password_env or acl.default_password_env(part)
    try:
        password, hashed = acl.password_word(var, os.environ)
    except ValueError as exc:
        raise ConfigError(f"--password-env: {exc}") from None
    words = acl.rules(namespace, part, user, password=password)
    click.echo(f"# {words[2]}: {acl.TABLES[part].summary}", err=True)
    if hashed:
        click.echo(f"# the password is given as the SHA-256 of ${var}", err=True)
    else:
        click.echo(
            f"# ${var} is not set: the line holds the placeholder >${{{var}}}; fill it in "
            "before piping, e.g. | envsubst | redis-cli (or set it and run this again to get "
            "its SHA-256 instead)",
            err=True,
        )
    click.echo(acl.line(words))
