"""Lifecycle hooks and the resources they create: one database pool or HTTP client per process.

``@app.on_startup`` hooks run once per process that runs the app's code (a worker, a
coordinator with the app's functions, a :class:`~streamflow.testing.Harness`), in the order they
were registered, before it serves; ``@app.on_shutdown`` hooks run in the same order after it
drained. Each hook takes the process's :class:`Resources` and may be ``async def`` or a plain
``def`` (run in a daemon thread, so that the loop and the shutdown grace keep their hold). Resources
are keyed by their type, so ``ctx.resources[Pool]`` is a ``Pool`` to a type checker too.

Failure mode: a startup hook that raises stops the process. Its traceback goes to the log,
:class:`~streamflow.errors.StartupError` names it (the CLI prints it as one ``error:`` line and
exits non-zero), and the shutdown hooks still run, every one of them (they find what startup
created with :meth:`Resources.get`). A shutdown hook that raises is logged; the next ones run.
Shutdown hooks run shielded from cancellation, within a time limit (the worker's shutdown
grace).

This is the one lifecycle later seams hang on: a middleware chain (issue 22, item 2) is built
when :meth:`Lifecycle.running` starts and can keep its state in :class:`Resources`;
OpenTelemetry's tracer provider is set up by a startup hook and flushed by a shutdown hook, so
spans ended during the drain are exported before the process exits.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import anyio
import anyio.from_thread
import anyio.lowlevel

from streamflow.errors import StartupError

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: A lifecycle hook: ``async def hook(resources)`` or a plain ``def hook(resources)``.
Hook = Callable[["Resources"], Awaitable[None]] | Callable[["Resources"], None]


class Resources:
    """The objects a process's startup hooks created, keyed by their type.

    Startup hooks store them (``resources[Pool] = await Pool.connect(...)``); handlers read them
    (``ctx.resources[Pool]``), typed as the key says. Once the process serves they are read-only.
    Objects pinned by a test (``Harness(app, resources={Pool: fake})``) win: a hook's assignment
    to a pinned type is ignored, so the hook needs no test switch (it may skip the real
    connection with ``if Pool not in resources``).

    Args:
        pinned: Objects to use whatever the hooks store (test doubles; not type-checked).
    """

    __slots__ = ("_frozen", "_items", "_pinned")

    def __init__(self, pinned: Mapping[type[Any], Any] | None = None) -> None:
        self._pinned = dict(pinned or {})
        self._items: dict[type[Any], Any] = dict(self._pinned)
        self._frozen = False

    def __getitem__(self, kind: type[T]) -> T:
        """The object stored under ``kind``.

        Raises:
            KeyError: No startup hook stored one (the message names the known types).
        """
        try:
            return cast(T, self._items[kind])
        except KeyError:
            known = ", ".join(sorted(k.__qualname__ for k in self._items)) or "none"
            raise KeyError(
                f"no resource of type {kind.__qualname__} (have: {known}); "
                "store it in an @app.on_startup hook"
            ) from None

    def __setitem__(self, kind: type[T], value: T) -> None:
        """Store ``value`` under ``kind`` (in a startup hook).

        Raises:
            TypeError: ``value`` is not a ``kind``.
            RuntimeError: The process already serves (resources are read-only then).
        """
        if self._frozen:
            raise RuntimeError("resources are read-only once the process serves")
        if kind in self._pinned:
            logger.debug("resource %s is pinned by the test: keeping it", kind.__qualname__)
            return
        if not isinstance(value, kind):
            raise TypeError(f"resource {kind.__qualname__} given a {type(value).__qualname__}")
        self._items[kind] = value

    def get(self, kind: type[T]) -> T | None:
        """The object stored under ``kind``, or None (e.g. in a shutdown hook after a failure)."""
        return cast(T | None, self._items.get(kind))

    def __contains__(self, kind: object) -> bool:
        return kind in self._items

    def __repr__(self) -> str:
        return f"Resources({', '.join(k.__qualname__ for k in self._items)})"

    def _reset(self) -> None:
        """Forget what earlier hooks stored (a process that starts again runs them again)."""
        self._items = dict(self._pinned)
        self._frozen = False


#: What handlers see when no lifecycle filled resources (e.g. a Context built by hand).
NO_RESOURCES = Resources()
NO_RESOURCES._frozen = True


class Lifecycle:
    """Runs startup hooks, then, however serving ends, the shutdown hooks.

    Args:
        startup: Hooks run in order before serving.
        shutdown: Hooks run in order after serving.
        resources: What the hooks fill and the handlers read.
    """

    def __init__(
        self, startup: Sequence[Hook], shutdown: Sequence[Hook], resources: Resources
    ) -> None:
        self._startup = list(startup)
        self._shutdown = list(shutdown)
        self.resources = resources

    @asynccontextmanager
    async def running(self, grace: Callable[[], float]) -> AsyncIterator[Resources]:
        """Run the startup hooks, yield while serving, then run the shutdown hooks.

        Args:
            grace: Called when serving ended: the seconds the shutdown hooks get in all.

        Raises:
            StartupError: A startup hook raised (after the shutdown hooks ran).
        """
        self.resources._reset()
        try:
            await self._start()
            self.resources._frozen = True
            yield self.resources
        finally:
            await self._stop(grace())

    async def _start(self) -> None:
        for hook in self._startup:
            try:
                await _call(hook, self.resources)
            except Exception as exc:
                name = _name(hook)
                logger.error("startup hook %s failed", name, exc_info=True)
                raise StartupError(f"startup hook {name} failed: {exc!r}") from exc

    async def _stop(self, grace: float) -> None:
        if not self._shutdown:
            return
        with anyio.move_on_after(grace, shield=True) as scope:
            for hook in self._shutdown:
                try:
                    await _call(hook, self.resources)
                except Exception:  # the rest still run: each frees its own resource
                    logger.error("shutdown hook %s failed", _name(hook), exc_info=True)
        if scope.cancelled_caught:
            logger.warning("shutdown hooks did not finish within %.1fs: given up", grace)


async def _call(hook: Hook, resources: Resources) -> None:
    if inspect.iscoroutinefunction(hook):
        await hook(resources)
    else:
        await _in_daemon_thread(cast(Callable[[Resources], None], hook), resources)


async def _in_daemon_thread(hook: Callable[[Resources], None], resources: Resources) -> None:
    """Run a plain hook in a thread of its own that never holds the process up.

    Not anyio's worker threads: the interpreter waits for those at exit, so a plain shutdown
    hook stuck past the grace (a pool's close() on a hung database) would keep the process
    alive. A daemon thread is abandoned with the loop instead.
    """
    done = anyio.Event()
    token = anyio.lowlevel.current_token()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            hook(resources)
        except BaseException as exc:  # handed to the loop, raised there
            failure.append(exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            anyio.from_thread.run_sync(done.set, token=token)

    threading.Thread(target=target, name=f"hook {_name(hook)}", daemon=True).start()
    await done.wait()
    if failure:
        raise failure[0]


def _name(hook: Hook) -> str:
    return f"{getattr(hook, '__module__', '?')}.{getattr(hook, '__qualname__', repr(hook))}"
