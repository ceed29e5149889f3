"""streamflow: a broker-and-worker toolkit on Redis Streams.

Declare roles on an :class:`App`, run them with ``streamflow worker``, publish with
:class:`Client` (or :class:`SyncClient`, the CLI, or a plain XADD from any language), and run
DAG tasks (:class:`Graph`) with ``streamflow coordinator``.
"""

from streamflow.app import App, RetryPolicy
from streamflow.client import Client, SyncClient
from streamflow.context import Batch, Cancelled, CancelToken, Context, Fatal, Retry
from streamflow.coordinator import Coordinator
from streamflow.delivery import Outcome
from streamflow.errors import (
    ConfigError,
    InvalidNameError,
    MissingExtraError,
    PayloadError,
    ProtocolError,
    RedisCommandError,
    RedisUnavailable,
    StreamflowError,
)
from streamflow.graph import Graph, GraphError
from streamflow.leases import LeaseSettings
from streamflow.tasks import NodeState, TaskState
from streamflow.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "App",
    "Batch",
    "CancelToken",
    "Cancelled",
    "Client",
    "ConfigError",
    "Context",
    "Coordinator",
    "Fatal",
    "Graph",
    "GraphError",
    "InvalidNameError",
    "LeaseSettings",
    "MissingExtraError",
    "NodeState",
    "Outcome",
    "PayloadError",
    "ProtocolError",
    "RedisCommandError",
    "RedisUnavailable",
    "Retry",
    "RetryPolicy",
    "StreamflowError",
    "SyncClient",
    "TaskState",
    "Worker",
    "__version__",
]
