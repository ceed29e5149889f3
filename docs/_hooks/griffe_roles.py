"""Griffe extension: show the docstrings' Sphinx roles (``:class:`X```) as code on API pages.

The docstrings are Google style but name other objects with Sphinx roles, which Markdown would
print as they are. ``:meth:`Client.publish``` becomes ```Client.publish```, and
``:class:`~streamflow.worker.Worker``` becomes ```Worker``` (the ``~`` keeps the last part only,
as Sphinx does).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):`(~?)([^`]+)`")


def as_code(match: re.Match[str]) -> str:
    """The role's target as inline code."""
    target = match.group(2)
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRolesAsCode(griffe.Extension):
    """Rewrites every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Replace the roles in ``obj``'s docstring."""
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(as_code, obj.docstring.value)
