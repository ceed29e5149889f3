"""One held connection per client for one-call publishes, with concurrent calls coalesced.

Checking a connection out of redis-py's pool and back costs about as much as the XADD's own
round trip (locks, a condition, observability hooks), so a client keeps one connection for its
one-call publishes and writes the packed commands to it directly. On the asyncio client, calls
that arrive while a batch is on the wire wait for it and then go out together as the next
pipeline: one call alone is sent at once (no added latency), a hundred concurrent calls share
one round trip. Each call's commands stay in order and next to each other, and each call gets
its own replies: an error reply fails only the call it answers. A lost connection fails every
call of the batch (each may or may not have run, as for a single command).

A caller cancelled while it waits in the queue is taken out and nothing of it is sent. A batch
of several callers' commands runs as a task of its own (shielded from the caller that started
it: cancelling that caller never fails the others, and the next batch starts only when this
one's replies are all read); a caller that sends only its own commands runs them itself, and
when it is cancelled the connection, whose state is then unknown, is reconnected.

The blocking client (:class:`HeldConnection`) cannot coalesce for one thread; it only skips the
pool, and a second thread that finds the held connection busy goes through the pool instead.

:class:`Held` is the asyncio held connection itself (kept, packed writes, reconnected when a
use failed or was cancelled half-way, closed rather than given back dirty): the publish lane
above sends on one, a worker's group reader reads on one per stream
(:func:`streamflow.streams.read_group`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis as redis_sync
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamflow.sentinel import MasterPool

#: One command: its name and arguments, as redis-py packs them.
Command = tuple[Any, ...]
#: One call's replies, in the order of its commands; an error reply as the exception.
Replies = list[Any]


@dataclass(slots=True)
class _Call:
    commands: Sequence[Command]
    done: asyncio.Future[Replies]
    #: Set when the call was handed the job of sending the next batch.
    lead: bool = field(default=False)


class AutoPipeline:
    """Sends each call's commands on one held connection, coalescing concurrent calls.

    redis-py's asyncio client ties the client to asyncio, so the queue uses asyncio futures
    (the cheapest wait there is); cancellation comes through anyio or asyncio alike.

    Args:
        redis: A single-node or Sentinel asyncio client (not a cluster: its commands go to the
            node of their slot).
    """

    def __init__(self, redis: Redis) -> None:
        self._held = Held(redis.connection_pool)
        self._queue: list[_Call] = []
        #: A batch is on the wire, or a waiting call was handed the next one.
        self._sending = False
        #: The batch sent for several callers, while it runs (a reference keeps it alive).
        self._flight: asyncio.Future[None] | None = None

    async def call(self, commands: Sequence[Command]) -> Replies:
        """Run ``commands`` in order in the next pipeline; their replies.

        Raises:
            redis.exceptions.ConnectionError: The connection was lost (or another outage).
        """
        loop = asyncio.get_running_loop()
        call = _Call(commands, loop.create_future())
        self._queue.append(call)
        if self._sending:
            try:
                await call.done
            except asyncio.CancelledError:
                self._abandon(call)
                raise
            if not call.lead:
                return call.done.result()
            call.lead, call.done = False, loop.create_future()
        return await self._lead(call)

    async def _lead(self, own: _Call) -> Replies:
        """Send the queue (``own`` among it) as one pipeline, then hand on the next one."""
        self._sending = True
        # A call whose caller was cancelled meanwhile has its future cancelled: not sent.
        batch = [call for call in self._queue if not call.done.done()]
        self._queue = []
        if len(batch) == 1:
            try:
                await self._send(batch, own)
            finally:
                self._hand_on()
            return own.done.result()
        # The others' replies are read whatever happens to this caller: the batch runs as a
        # task of its own that an anyio or asyncio cancellation of the caller leaves alone.
        self._flight = asyncio.ensure_future(self._send_then_hand_on(batch, own))
        try:
            await asyncio.shield(self._flight)
        except asyncio.CancelledError:
            if not own.done.done():
                own.done.cancel()  # its reply, when it comes, is nobody's
            elif not own.done.cancelled():
                own.done.exception()  # read, so that asyncio does not log it as lost
            raise
        return own.done.result()

    async def _send_then_hand_on(self, batch: list[_Call], own: _Call) -> None:
        try:
            await self._send(batch, own)
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        """Make the first call that arrived meanwhile send the next batch, or stop sending."""
        self._queue = [call for call in self._queue if not call.done.done()]
        if not self._queue:
            self._sending = False
            return
        first = self._queue[0]
        first.lead = True
        first.done.set_result([])

    def _abandon(self, call: _Call) -> None:
        """A cancelled waiter: out of the queue; if it was to send the next batch, hand on."""
        if call in self._queue:
            self._queue.remove(call)
        if call.lead:
            self._hand_on()

    async def _send(self, batch: list[_Call], own: _Call) -> None:
        """Write the batch's commands at once, then route each reply to its call.

        A failure is each call's (a lost connection fails the whole batch); a cancellation of
        ``own`` is raised, and the others fail as if the connection was lost.
        """
        try:
            connection = await self._held.begin()
            commands = [command for call in batch for command in call.commands]
            await _write(connection, _pack(connection, commands))
            for call in batch:
                replies = await _read(connection, len(call.commands))
                if not call.done.done():
                    call.done.set_result(replies)
            self._held.end()
        except Exception as exc:
            _fail(batch, exc)
        except BaseException:
            own.done.cancel()
            _fail(batch, RedisConnectionError("publishing cancelled half-way: batch dropped"))
            raise

    async def aclose(self) -> None:
        """Give the held connection back to the pool."""
        await self._held.aclose()


class Held:
    """One connection taken out of a pool and kept, for a user that sends one thing at a time.

    Checking a connection out of redis-py's pool and back costs about as much as a short
    command's round trip (locks, a condition, observability hooks, the connect-and-retry
    wrapper): a user that sends all the time (the publish lane, a worker's reader) keeps one.
    It marks the connection in use (:meth:`begin`) before it writes and clean (:meth:`end`)
    once every reply is read. A connection left in use (a failure, or a cancellation half-way:
    a reply may still come) is reconnected before its next use and closed before it goes back
    to the pool, so no command ever reads another one's reply.

    On a Sentinel client the pool is asked (at most once a
    :data:`~streamflow.sentinel.MASTER_CHECK_INTERVAL`) whether the master moved, and a held
    connection opened to a former master is reconnected, as the pool does with the
    connections it hands out (see :class:`~streamflow.sentinel.MasterPool`).

    Args:
        pool: A single-node or Sentinel client's connection pool (not a cluster's: a cluster
            client sends each command to the node of its slot).
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._connection: Any = None
        #: The held connection may hold unread replies (a use failed or was cancelled).
        self._dirty = False
        #: A use is under way (a second user of the same Held goes through the pool).
        self.busy = False
        self._follow = pool.keep_current if isinstance(pool, MasterPool) else None

    async def begin(self) -> Any:
        """The connection, connected and clean, marked in use until :meth:`end`."""
        connection = await self._ready()
        self._dirty = True
        return connection

    def end(self) -> None:
        """Every reply of this use was read: the connection is clean again."""
        self._dirty = False

    async def execute(self, command: Command) -> Any:
        """Send one command and read its raw reply (no reply callback).

        Raises:
            redis.exceptions.ResponseError: Redis refused the command (its reply was read:
                the connection stays clean).
            redis.exceptions.ConnectionError: The connection was lost (or another outage).
        """
        self.busy = True
        try:
            connection = await self.begin()
            await _write(connection, _pack(connection, (command,)))
            try:
                reply = await connection.read_response()
            except ResponseError:
                self._dirty = False
                raise
            self._dirty = False
            return reply
        finally:
            self.busy = False

    async def _ready(self) -> Any:
        """The held connection, connected and clean (reconnected after Redis went away)."""
        connection = self._connection
        if connection is None:
            connection = self._connection = await self._pool.get_connection()
        elif self._dirty:
            await connection.disconnect()
        elif (self._follow is None or await self._follow(connection)) and await _clean(connection):
            return connection  # the usual case, without the pool's connect-and-retry wrapper
        await self._pool.ensure_connection(connection)
        return connection

    async def aclose(self) -> None:
        """Give the held connection back to the pool (closed first if it may hold a reply)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._dirty:
            self._dirty = False
            await connection.disconnect(nowait=True)
        await self._pool.release(connection)


def _fail(batch: list[_Call], exc: Exception) -> None:
    for call in batch:
        if not call.done.done():
            call.done.set_exception(exc)


async def _clean(connection: Any) -> bool:
    """Whether a held connection is connected with nothing unread on it (no I/O).

    False sends the caller through the pool's own check, which reconnects a connection that
    Redis closed or that holds data (or applies the push notifications it holds).
    """
    if not connection.is_connected:
        return False
    try:
        return not await connection.can_read()
    except (RedisConnectionError, OSError):
        return False  # closed by Redis meanwhile: the pool's check reconnects it


def _pack(connection: Any, commands: Sequence[Command]) -> list[bytes]:
    """The commands in the Redis protocol, packed here when every argument is bytes, str or int.

    redis-py's ``pack_commands`` costs about 2 us per argument (its encoder's checks); the
    commands of a publish are names, counts and bodies. Anything else (a float, a value the
    encoder refuses) is left to ``pack_commands``, which encodes or refuses it as usual.
    """
    encoder = connection.encoder
    encoding, errors = encoder.encoding, encoder.encoding_errors
    pieces: list[bytes] = []
    for command in commands:
        pieces.append(b"*%d\r\n" % len(command))
        for arg in command:
            if type(arg) is str:
                arg = arg.encode(encoding, errors)
            elif type(arg) is int:  # not a bool: the encoder refuses those
                arg = b"%d" % arg
            elif type(arg) is not bytes:
                return connection.pack_commands(commands)  # type: ignore[no-any-return]
            pieces += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return [b"".join(pieces)]


async def _write(connection: Any, packed: list[bytes]) -> None:
    """Write packed commands: ``send_packed_command`` without its ``asyncio.wait_for``.

    On Python 3.11 that runs every write as a task of its own, a good part of a publish's
    time on the client. The time limit is the connection's socket timeout, as there, and it
    applies only when the write has to wait (the kernel did not take it all): arming a timer
    for a write that cannot wait costs more than packing the XADD. A connection that fails is
    marked dirty by the caller and reconnected before its next use.
    """
    writer = getattr(connection, "_writer", None)
    if (
        writer is None
        or getattr(connection, "_send_packed_command", None) is None
        # fakeredis's transport (streamflow.testing's harness) has no write buffer to ask.
        or not hasattr(writer.transport, "get_write_buffer_size")
    ):
        await connection.send_packed_command(packed, False)  # another redis-py: the public way
        return
    try:
        if writer.transport.is_closing():
            raise RedisConnectionError("Connection closed by the server before write")
        writer.writelines(packed)
        if writer.transport.get_write_buffer_size():  # it has to wait: bounded, as before
            async with asyncio.timeout(connection.socket_timeout):
                await writer.drain()
    except TimeoutError:
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as exc:
        raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
    except (AttributeError, TypeError) as exc:  # a torn-down transport (see streamflow.outage)
        raise RedisConnectionError(f"connection lost while writing ({exc!r})") from exc


async def _read(connection: Any, count: int) -> Replies:
    replies: Replies = []
    for _ in range(count):
        try:
            replies.append(await connection.read_response())
        except ResponseError as exc:  # this command's refusal, the connection is fine
            replies.append(exc)
    return replies


class HeldConnection:
    """The blocking client's connection for one-call publishes, held instead of checked out.

    Args:
        redis: A blocking single-node client.
    """

    def __init__(self, redis: redis_sync.Redis) -> None:
        self._redis = redis
        self._pool: Any = redis.connection_pool
        self._connection: Any = None
        self._lock = threading.Lock()

    def call(self, commands: Sequence[Command]) -> Replies:
        """Run ``commands`` in order in one round trip; their replies (errors as exceptions).

        A thread that finds the held connection in use runs them through the pool.

        Raises:
            redis.exceptions.ConnectionError: The connection was lost (or another outage).
        """
        if not self._lock.acquire(blocking=False):
            return self._through_pool(commands)
        try:
            connection = self._ready()
            try:
                connection.send_packed_command(_pack(connection, commands), False)
                return _read_sync(connection, len(commands))
            except BaseException:
                self._drop()
                raise
        finally:
            self._lock.release()

    def _through_pool(self, commands: Sequence[Command]) -> Replies:
        pipe: Any = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))

    def _ready(self) -> Any:
        if self._connection is None:
            self._connection = self._pool.get_connection()
        self._pool.ensure_connection(self._connection)
        return self._connection

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.disconnect()
            self._pool.release(connection)

    def close(self) -> None:
        """Give the held connection back to the pool."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                self._pool.release(connection)


def _read_sync(connection: Any, count: int) -> Replies:
    replies: Replies = []
    for _ in range(count):
        try:
            replies.append(connection.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies
