"""A synchronous Django view that publishes a job with one ``SyncClient`` per process.

The client is created on first use, not at import: a server that forks its workers after
importing the app (gunicorn ``--preload``) must not share one Redis connection between
processes. It is thread-safe, so every thread of the process shares it, and it is closed at
exit. The job is published with a dedup key, so a form submitted twice (a double click, a
retried request) publishes one job.
"""

from __future__ import annotations

import atexit
import json
import threading

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from streamflow import RedisUnavailable, SyncClient

# --8<-- [start:client]
_client: SyncClient | None = None
_lock = threading.Lock()


def streamflow_client() -> SyncClient:
    """This process's client, created on first use and closed at exit."""
    global _client
    with _lock:
        if _client is None:
            _client = SyncClient(
                settings.STREAMFLOW_REDIS_URL, namespace=settings.STREAMFLOW_NAMESPACE
            )
            atexit.register(close_client)
        return _client


def close_client() -> None:
    """Close this process's client (at exit; the next use opens a new one)."""
    global _client
    with _lock:
        if _client is not None:
            _client.close()
            _client = None
    # --8<-- [end:client]


# --8<-- [start:view]
@require_POST
def place_order(request: HttpRequest) -> JsonResponse:
    """Queue the order's invoice; answer at once with the job's message id."""
    order = json.loads(request.body)
    try:
        message_id = streamflow_client().publish(
            "invoice",
            {"order_id": order["order_id"], "email": order["email"]},
            dedup_key=f"order-{order['order_id']}",  # the same order twice: one job
        )
    except RedisUnavailable:  # maybe queued, maybe not: a retry is safe (the dedup key)
        return JsonResponse({"error": "queue unavailable, try again"}, status=503)
    return JsonResponse({"message_id": message_id}, status=202)
    # --8<-- [end:view]
