"""The CLI's root group imports a command's module only when needed (streamflow/cli/__init__.py).

Structure, not time: which modules ``streamflow --version`` and ``--help`` import, and that the
root's table of commands (name, module, short help) says what the command modules define.
benchmarks/cli_startup.py measures the CPU time.
"""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

import streamflow
from streamflow.cli import COMMANDS, main
from tests.helpers import clean_env

#: Runs ``python -m streamflow ARGS`` in-process and prints the top-level packages it imported.
_IMPORTED = """
import runpy, sys
sys.argv = ["streamflow", *sys.argv[1:]]
try:
    runpy.run_module("streamflow", run_name="__main__")
except SystemExit:
    pass
print("IMPORTED", *sorted({name for name in sys.modules}))
"""

#: Modules that cost most of a CLI call's start-up; none is needed to print a version or help.
HEAVY = (
    "redis",
    "pydantic",
    "prometheus_client",
    "anyio",
    "streamflow.client",
    "streamflow.worker",
)


def imported_by(*args: str) -> set[str]:
    """The modules a ``streamflow ARGS`` process has imported when it ends."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTED, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("IMPORTED "))
    return set(line.split()[1:])


@pytest.mark.parametrize("args", [("--version",), ("--help",), ()])
@pytest.mark.slow
def test_version_and_help_import_no_redis_pydantic_or_prometheus(args: tuple[str, ...]) -> None:
    modules = imported_by(*args)
    assert "streamflow.cli" in modules  # the root group did run
    assert not {module for module, _ in COMMANDS.values()} & modules
    assert "streamflow.cli.options" not in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == []


@pytest.mark.slow
def test_a_command_imports_its_own_module_only() -> None:
    modules = imported_by("acl", "--help")
    assert "streamflow.cli.security" in modules
    assert (
        not {"streamflow.cli.tasks", "streamflow.cli.inspect", "streamflow.dag.coordinator"}
        & modules
    )


def test_the_command_table_names_every_command_with_its_module_and_help() -> None:
    main.load_all()
    assert sorted(main.commands) == sorted(COMMANDS)
    for name, command in main.commands.items():
        module, short = COMMANDS[name]
        assert command.callback is not None and command.callback.__module__ == module, name
        # The same words at every width `--help` may cut them to.
        for limit in (20, 45, 60, 80, 200):
            lazy = click.Command(name, help=short).get_short_help_str(limit)
            assert lazy == command.get_short_help_str(limit), (name, limit)


def help_text(*, load_all: bool) -> str:
    """What ``streamflow --help`` prints, with the command modules imported first or not."""
    code = "from streamflow.cli import main\n"
    code += "main.load_all()\n" if load_all else ""
    code += "main(['--help'], prog_name='streamflow')"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(COLUMNS="80"),
        check=True,
    ).stdout


@pytest.mark.slow
def test_help_lists_the_commands_as_click_would_with_every_module_imported() -> None:
    lazy = help_text(load_all=False)
    assert lazy == help_text(load_all=True)  # then every row comes from the command itself
    assert all(f"  {name} " in lazy for name in COMMANDS)


def test_public_names_resolve_on_first_use() -> None:
    names = [n for n in streamflow.__all__ if n != "__version__"]
    assert sorted(names) == sorted(streamflow._EXPORTS)
    for name in names:
        value = getattr(streamflow, name)
        assert value.__name__ == name
    assert set(streamflow.__all__) <= set(dir(streamflow))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = streamflow.Nope  # type: ignore[attr-defined]
