"""streamflow: a broker-and-worker toolkit on Redis Streams.

Declare roles on an :class:`App`, run them with ``streamflow worker``, publish with
:class:`Client` (or :class:`SyncClient`, the CLI, or a plain XADD from any language), and run
DAG tasks (:class:`Graph`) with ``streamflow coordinator``.
"""

from streamflow.app import App, RetryPolicy
from streamflow.client import Client, SyncClient
from streamflow.context import (
    Batch,
    Cancelled,
    CancelToken,
    Context,
    Fatal,
    Retry,
    ShuttingDown,
)
from streamflow.coordinator import Coordinator
from streamflow.errors import (
    ConfigError,
    InvalidNameError,
    MissingExtraError,
    PayloadError,
    ProtocolError,
    RedisUnavailable,
    StreamflowError,
)
from streamflow.graph import Graph, GraphError
from streamflow.leases import LeaseSettings
from streamflow.settle import Outcome
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
    "RedisUnavailable",
    "Retry",
    "RetryPolicy",
    "ShuttingDown",
    "StreamflowError",
    "SyncClient",
    "TaskState",
    "Worker",
    "__version__",
]
