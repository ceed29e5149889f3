"""MkDocs hook: the option tables of the CLI reference (mkdocs-click, ``:style: table``).

mkdocs-click 0.9 writes each option's raw ``default`` attribute, which since click 8.3 is a
sentinel (``Sentinel.UNSET``) for options without one, and copies help texts into the Markdown
table unescaped, so ``sf-<part>`` loses ``<part>`` as an unknown HTML tag. This hook replaces
its table writer with one that asks click what ``--help`` shows (``Option.get_help_extra``),
escapes the help text, and adds the option's environment variable. The CLI's root group
imports a command's module only when the command is used (streamflow/cli/__init__.py); mkdocs-click
reads its ``commands`` as they are, so the hook imports them all first.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from typing import Any

import click
from mkdocs_click import _docs


def cell(text: str) -> str:
    """``text`` safe in a Markdown table cell: HTML and pipes escaped outside code spans."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside backticks
        parts[i] = html.escape(parts[i], quote=False).replace("|", "\\|")
    return "`".join(parts)


def option_row(ctx: click.Context, option: click.Option) -> str:
    """One table row: names, type, help, default and environment variable."""
    names = ", ".join(f"`{opt}`" for opt in option.opts)
    if option.secondary_opts:
        names += " / " + ", ".join(f"`{opt}`" for opt in option.secondary_opts)
    extra = option.get_help_extra(ctx)
    default = f"`{extra['default']}`" if "default" in extra else ""
    if option.required:
        default = "required"
    envvars = [option.envvar] if isinstance(option.envvar, str) else list(option.envvar or [])
    variable = ", ".join(f"`{name}`" for name in envvars)
    kind = _docs._format_table_option_type(option)
    return f"| {names} | {kind} | {cell(option.help or '')} | {default} | {variable} |"


def table_options(ctx: click.Context, show_hidden: bool = False) -> Iterator[str]:
    """The options of ``ctx.command`` as a Markdown table."""
    options = [p for p in ctx.command.get_params(ctx) if isinstance(p, click.Option)]
    options = [option for option in options if show_hidden or not option.hidden]
    if not options:
        return
    yield "**Options:**"
    yield ""
    yield "| Name | Type | Description | Default | Environment variable |"
    yield "| ---- | ---- | ----------- | ------- | -------------------- |"
    for option in options:
        yield option_row(ctx, option)
    yield ""


def on_config(config: Any, **kwargs: Any) -> Any:
    """Install the table writer before any page is rendered."""
    _docs._make_table_options = table_options
    from streamflow.cli import main

    main.load_all()
    return config
