"""streamflow: a broker-and-worker toolkit on Redis Streams.

Declare roles on an :class:`App`, run them with ``streamflow worker``, publish with
:class:`Client` (or :class:`SyncClient`, the CLI, or a plain XADD from any language).
"""

from streamflow.app import App
from streamflow.client import Client, SyncClient
from streamflow.context import Cancelled, CancelToken, Context
from streamflow.errors import (
    ConfigError,
    InvalidNameError,
    PayloadError,
    ProtocolError,
    RedisUnavailable,
    StreamflowError,
)
from streamflow.worker import Outcome, Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "CancelToken",
    "Cancelled",
    "Client",
    "ConfigError",
    "Context",
    "InvalidNameError",
    "Outcome",
    "PayloadError",
    "ProtocolError",
    "RedisUnavailable",
    "StreamflowError",
    "SyncClient",
    "Worker",
    "__version__",
]
