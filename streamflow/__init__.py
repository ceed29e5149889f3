"""streamflow: a broker-and-worker toolkit on Redis Streams.

Declare roles on an :class:`App`, run them with ``streamflow worker``, publish with
:class:`Client` (or :class:`SyncClient`, the CLI, or a plain XADD from any language).
"""

from streamflow.app import App, RetryPolicy
from streamflow.client import Client, SyncClient
from streamflow.context import Cancelled, CancelToken, Context, Fatal, Retry
from streamflow.errors import (
    ConfigError,
    InvalidNameError,
    PayloadError,
    ProtocolError,
    RedisUnavailable,
    StreamflowError,
)
from streamflow.leases import LeaseSettings
from streamflow.settle import Outcome
from streamflow.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "CancelToken",
    "Cancelled",
    "Client",
    "ConfigError",
    "Context",
    "Fatal",
    "InvalidNameError",
    "LeaseSettings",
    "Outcome",
    "PayloadError",
    "ProtocolError",
    "RedisUnavailable",
    "Retry",
    "RetryPolicy",
    "StreamflowError",
    "SyncClient",
    "Worker",
    "__version__",
]
