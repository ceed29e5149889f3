"""streamflow: a broker-and-worker toolkit on Redis Streams.

Declare roles on an :class:`App`, run them with ``streamflow worker``, publish with
:class:`Client` (or :class:`SyncClient`, the CLI, or a plain XADD from any language), and run
DAG tasks (:class:`Graph`) with ``streamflow coordinator``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from streamflow.dag.coordinator import Coordinator
    from streamflow.dag.graph import Graph, GraphError
    from streamflow.dag.tasks import NodeState, TaskState
    from streamflow.delivery import Outcome
    from streamflow.errors import (
        ConfigError,
        InvalidNameError,
        JobCancelledError,
        JobDeadLetteredError,
        JobExpiredError,
        JobFailedError,
        MissingExtraError,
        PayloadError,
        ProtocolError,
        RedisCommandError,
        RedisUnavailable,
        ResultTimeoutError,
        StartupError,
        StreamflowError,
    )
    from streamflow.leases import LeaseSettings
    from streamflow.lifecycle import Resources
    from streamflow.middleware import Middleware
    from streamflow.worker import Worker

#: Where each public name lives. ``import streamflow`` (which every ``streamflow`` command does,
#: as a package) imports none of them: each is imported on first use (PEP 562), so that
#: ``streamflow --version`` does not pay for redis, pydantic and prometheus-client.
_EXPORTS = {
    "App": "streamflow.app",
    "RetryPolicy": "streamflow.app",
    "Client": "streamflow.client",
    "SyncClient": "streamflow.client",
    "Batch": "streamflow.context",
    "Cancelled": "streamflow.context",
    "CancelToken": "streamflow.context",
    "Context": "streamflow.context",
    "Fatal": "streamflow.context",
    "Retry": "streamflow.context",
    "ShuttingDown": "streamflow.context",
    "Coordinator": "streamflow.dag.coordinator",
    "ConfigError": "streamflow.errors",
    "InvalidNameError": "streamflow.errors",
    "JobCancelledError": "streamflow.errors",
    "JobDeadLetteredError": "streamflow.errors",
    "JobExpiredError": "streamflow.errors",
    "JobFailedError": "streamflow.errors",
    "ResultTimeoutError": "streamflow.errors",
    "MissingExtraError": "streamflow.errors",
    "PayloadError": "streamflow.errors",
    "ProtocolError": "streamflow.errors",
    "RedisCommandError": "streamflow.errors",
    "RedisUnavailable": "streamflow.errors",
    "StartupError": "streamflow.errors",
    "StreamflowError": "streamflow.errors",
    "Graph": "streamflow.dag.graph",
    "GraphError": "streamflow.dag.graph",
    "LeaseSettings": "streamflow.leases",
    "Resources": "streamflow.lifecycle",
    "Middleware": "streamflow.middleware",
    "Outcome": "streamflow.delivery",
    "NodeState": "streamflow.dag.tasks",
    "TaskState": "streamflow.dag.tasks",
    "Worker": "streamflow.worker",
}

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
    "JobCancelledError",
    "JobDeadLetteredError",
    "JobExpiredError",
    "JobFailedError",
    "LeaseSettings",
    "Middleware",
    "MissingExtraError",
    "NodeState",
    "Outcome",
    "PayloadError",
    "ProtocolError",
    "RedisCommandError",
    "RedisUnavailable",
    "Resources",
    "ResultTimeoutError",
    "Retry",
    "RetryPolicy",
    "ShuttingDown",
    "StartupError",
    "StreamflowError",
    "SyncClient",
    "TaskState",
    "Worker",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
