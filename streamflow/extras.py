"""Optional dependencies: import one on first use, or say which extra installs it.

A production worker installs neither the fake Redis of :mod:`streamflow.testing` nor a YAML
parser; the features that need them import them through :func:`require`, so that a missing one
is one clear :class:`~streamflow.errors.MissingExtraError` instead of a ``ModuleNotFoundError``
from deep inside.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from streamflow.errors import MissingExtraError

#: The modules each extra provides (pyproject.toml, [project.optional-dependencies]): the one
#: :func:`require` returns, then those it needs.
EXTRAS: dict[str, tuple[str, ...]] = {
    # fakeredis runs Lua scripts with lupa; without it every script call fails at run time.
    "testing": ("fakeredis", "lupa"),
    "yaml": ("yaml",),
    # Cron expressions of schedules (streamflow.schedules); interval schedules need nothing.
    "schedules": ("cronsim",),
    # `streamflow dashboard`: the ASGI app, its server and its templates.
    "dashboard": ("starlette", "uvicorn", "jinja2"),
    # streamflow.otel: OpenTelemetry's API (the application brings the SDK).
    "otel": ("opentelemetry.trace", "opentelemetry.propagate"),
}


def require(extra: str, feature: str) -> ModuleType:
    """Import the modules of ``extra``; returns the first one.

    The modules it needs are imported before it: fakeredis, imported without lupa, replaces
    its scripting commands with stubs for good, even once lupa is installed.

    Args:
        extra: A key of :data:`EXTRAS`.
        feature: What needs it, for the error message (e.g. ``"a YAML task graph"``).

    Raises:
        MissingExtraError: One of the extra's modules is not installed.
    """
    modules = []
    for name in reversed(EXTRAS[extra]):
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            # Only the module itself missing means the extra is missing; a module that is
            # there but fails to import its own dependency is a broken install: let it show.
            if exc.name != name:
                raise
            raise MissingExtraError(extra, feature) from None
    return modules[-1]
