"""What ``streamflow dashboard`` was told, and whether it is safe to serve (no extra needed)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

#: Host names that reach the local machine only.
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the dashboard to this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to anything
        return False


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """The dashboard's options.

    Attributes:
        host: The address to bind.
        port: The port to bind (0: any free port).
        token: The token every request must carry, or None (loopback only).
        read_only: Hide and refuse every action.
        root_path: The prefix a reverse proxy serves it under (``/sf``), or empty.
        refresh: Seconds between two reads of the shared poller.
    """

    host: str = "127.0.0.1"
    port: int = 8200
    token: str | None = None
    read_only: bool = False
    root_path: str = ""
    refresh: float = 1.0

    @property
    def prefix(self) -> str:
        """The root path, normalised: empty, or ``/part`` without a trailing slash."""
        stripped = self.root_path.strip("/")
        return f"/{stripped}" if stripped else ""

    def problem(self) -> str | None:
        """Why these options must not be served, or None."""
        if self.token is None and not is_loopback(self.host):
            return (
                f"refusing to bind {self.host} without a token: anyone who reaches it could "
                "replay, purge and cancel; pass --token (or STREAMFLOW_DASHBOARD_TOKEN), "
                "or bind 127.0.0.1"
            )
        if self.token is not None and len(self.token) < 16:
            return "the dashboard token is too short: use at least 16 characters"
        if any(c in self.prefix for c in "?#<>\"' "):
            return f"invalid --root-path {self.root_path!r}"
        return None

    def url(self) -> str:
        """Where it listens, for the start-up line."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.prefix}/"
