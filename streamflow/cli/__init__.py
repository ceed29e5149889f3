"""The root of the ``streamflow`` command line: a group that imports a command's module on use.

Every CLI call used to import the whole package (redis, pydantic, prometheus-client, the worker,
the coordinator) before parsing its arguments: about half a second of CPU for
``streamflow --version``. The root group here knows each command by name, module and one-line
help (:data:`COMMANDS`), so ``--version`` and ``--help`` import none of them, and
``streamflow publish`` imports only the module that defines ``publish`` (and what that module
needs).

Registration is explicit and one way: a command module defines its commands with plain
``@click.command()`` and imports nothing from here; this group imports the module that
:data:`COMMANDS` names and adds the command of that name. The command modules share their
options and helpers through :mod:`streamflow.cli.options` only, so no two of them import each
other and none imports this root.
"""

from __future__ import annotations

import importlib

import click

#: Every command: the module that defines it, and its short help for the command list (the
#: first paragraph of the command's docstring; tests/cli/test_root.py checks they agree).
COMMANDS: dict[str, tuple[str, str]] = {
    "acl": (
        "streamflow.cli.security",
        "Print the ACL SETUSER line that gives one part exactly the rights it needs.",
    ),
    "cancel": (
        "streamflow.cli.publish",
        "Cancel a task (all its messages) or one message by id, on every worker.",
    ),
    "check": (
        "streamflow.cli.worker",
        "Probe: exit 0 when healthy, 1 when not (for container health checks).",
    ),
    "coordinator": (
        "streamflow.cli.tasks",
        "Drive DAG tasks: turn workers' events into task state and fan out work.",
    ),
    "dashboard": (
        "streamflow.cli.dashboard",
        "Serve the web dashboard: roles, workers, jobs, task graphs, dead letters.",
    ),
    "demo": (
        "streamflow.cli.demo",
        "Run a streaming DAG task end to end, on a Redis the demo starts (and stops) itself.",
    ),
    "dlq": ("streamflow.cli.dlq", "Dead letters: list, show, replay, purge."),
    "events": (
        "streamflow.cli.events",
        "Follow lifecycle events live: jobs started, progress, retried, ended; task and node "
        "states.",
    ),
    "exporter": (
        "streamflow.cli.inspect",
        "Serve the namespace's queue gauges (run one per namespace, beside the workers).",
    ),
    "inspect": (
        "streamflow.cli.inspect",
        "Show every role (or ROLE in detail): stream, groups, consumers, pending, lag, retries.",
    ),
    "job": (
        "streamflow.cli.jobs",
        "Show where a job is: queued, delayed, running, retrying, ended, or unknown.",
    ),
    "limit": (
        "streamflow.cli.flow",
        "Set or show ROLE's start rate and concurrency limits across all workers.",
    ),
    "pause": (
        "streamflow.cli.flow",
        "Pause ROLE: workers start no new jobs of it until resumed; running ones finish.",
    ),
    "publish": ("streamflow.cli.publish", "Publish jobs to ROLE; prints one message id per line."),
    "resume": (
        "streamflow.cli.flow",
        "Resume a paused ROLE: its workers start its jobs again within a second.",
    ),
    "result": ("streamflow.cli.tasks", "Print a task's results as JSON: {node: [items...]}."),
    "schedule": (
        "streamflow.cli.schedules",
        "Schedules: list, add, remove, pause, resume, run-now.",
    ),
    "scheduler": (
        "streamflow.cli.schedules",
        "Fire the namespace's schedules; run two or more for availability (each tick fires once).",
    ),
    "schema": (
        "streamflow.cli.publish",
        "Print the JSON Schema of every message kind of the wire protocol.",
    ),
    "status": ("streamflow.cli.tasks", "Show a task's state and every node's."),
    "submit": (
        "streamflow.cli.tasks",
        "Submit the task graph in GRAPH_FILE (JSON, or YAML by extension; - for stdin).",
    ),
    "tasks": ("streamflow.cli.tasks", "List tasks, newest first."),
    "worker": (
        "streamflow.cli.worker",
        "Serve roles of an app: streamflow worker --app pkg.module:app --role ROLE.",
    ),
    "workers": (
        "streamflow.cli.inspect",
        "List the live workers, coordinators and schedulers of the namespace, with their health.",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands are imported when one is run, or its own help is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, imported or not."""
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing its module first if need be."""
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.add_command(_load(cmd_name))
        return self.commands.get(cmd_name)

    def load_all(self) -> None:
        """Add every command (for tools that read ``commands``, e.g. mkdocs-click)."""
        for name in COMMANDS:
            if name not in self.commands:
                self.add_command(_load(name))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``streamflow --help``, from COMMANDS: it imports nothing."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, _short_help(self, name, limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _load(name: str) -> click.Command:
    """The command ``name``, from the module :data:`COMMANDS` names for it."""
    module = importlib.import_module(COMMANDS[name][0])
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, click.Command) and value.name == name
    ]
    if len(found) != 1:
        raise LookupError(f"{module.__name__} defines {len(found)} commands named {name!r}")
    return found[0]


def _short_help(group: LazyGroup, name: str, limit: int) -> str:
    # A command already imported speaks for itself; the others are cut as click cuts them.
    command = group.commands.get(name) or click.Command(name, help=COMMANDS[name][1])
    return command.get_short_help_str(limit)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    envvar="STREAMFLOW_LOG_LEVEL",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--log-format",
    envvar="STREAMFLOW_LOG_FORMAT",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one object per line, with role, message, task and node ids as fields.",
)
@click.version_option(package_name="streamflow")
def main(log_level: str, log_format: str) -> None:
    """streamflow: workers and publishers on Redis Streams."""
    # Imported here, not above: --version and --help end before this runs and need none of it.
    from streamflow.cli.options import configure

    configure(log_level, log_format)
