"""Redis round trips written once for the asyncio and the blocking client.

redis-py gives both clients the same commands: the asyncio client's return a coroutine, the
blocking client's the reply. So an operation is written once as a generator (the sans-I/O
style): it calls the client it was given, yields what the call returned, and is sent the
reply back. :func:`run` awaits each yielded coroutine, :func:`run_blocking` passes the blocking
client's reply straight back; an error from Redis is raised where the call was written, in
both cases. :class:`~streamflow.Client` and :class:`~streamflow.SyncClient` publish through the
same operations this way (see :mod:`streamflow.publishing`).

A step must not hold a lock or a ``finally`` that talks to Redis across a ``yield``: a cancelled
:func:`run` leaves the generator suspended, and it is only closed.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

_T = TypeVar("_T")

#: An operation: yields each pending call (a coroutine, or a blocking client's reply), is sent
#: its reply, and returns its result.
Steps = Generator[Any, Any, _T]


async def run(steps: Steps[_T]) -> _T:
    """Run ``steps`` on an asyncio client: await each call it yields."""
    reply: Any = None
    failure: Exception | None = None
    try:
        while True:
            try:
                pending = steps.send(reply) if failure is None else steps.throw(failure)
            except StopIteration as done:
                result: _T = done.value
                return result
            try:
                reply, failure = await pending, None
            except Exception as exc:  # raised in the step, where the call was written
                reply, failure = None, exc
    finally:
        steps.close()


def run_blocking(steps: Steps[_T]) -> _T:
    """Run ``steps`` on a blocking client: each call it yields has run already."""
    reply: Any = None
    try:
        while True:
            try:
                reply = steps.send(reply)
            except StopIteration as done:
                result: _T = done.value
                return result
    finally:
        steps.close()
