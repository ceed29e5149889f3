"""Test your handlers: publish, run a worker until idle, look at what happened.

The harness runs a real :class:`~streamflow.worker.Worker` in-process, on an in-process fake
Redis (fakeredis) by default or on a real Redis URL. It drains in burst mode (reads never block),
so it does not spin on fakeredis, whose blocking reads return at once.

Example:
    ```python
    async def test_echo():
        async with Harness(app) as h:
            await h.publish("echo", {"text": "hi"})
            await h.drain()
            assert h.acked == [...]
    ```

The app's lifecycle hooks run once per harness: startup hooks on entering ``async with``,
shutdown hooks on leaving it. A test replaces a resource by pinning its own object,
``Harness(app, resources={Pool: FakePool()})``: the handlers get the fake, whatever the hooks
store (see :class:`~streamflow.lifecycle.Resources`).

It also runs whole DAG tasks (:meth:`Harness.run_task`): workers for the app's roles and a
coordinator, in turns, until the task ends.

fakeredis is fine for handler logic; lease, claim and blocking-read behaviour must be tested on
a real redis-server (pass ``redis_url``). The fake Redis comes with the ``testing`` extra
(``pip install 'streamflow[testing]'``); a harness on a real Redis URL does not need it.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from redis.asyncio import Redis

from streamflow import connect, extras, partitions, scripts, streams
from streamflow.app import App
from streamflow.client import Client
from streamflow.dag.coordinator import Coordinator
from streamflow.dag.graph import Graph, GraphSpec
from streamflow.dag.tasks import TaskState
from streamflow.delivery import Outcome
from streamflow.errors import NoCoordinatorWarning
from streamflow.keys import Keys
from streamflow.lifecycle import Resources
from streamflow.records import DeadLetter, decode_dead_letter
from streamflow.scripts import Scripts
from streamflow.worker import Worker


@dataclass(slots=True)
class TaskRun:
    """How a task run by :meth:`Harness.run_task` ended.

    Attributes:
        task_id: The task id.
        state: Its final state, with every node's.
        results: The items of each node without children (of every node with ``all_nodes``).
    """

    task_id: str
    state: TaskState
    results: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        """Whether the task succeeded."""
        return self.state.state == "succeeded"


class Harness:
    """Runs an app's handlers against a fake or real Redis for tests.

    Args:
        app: The application under test.
        redis_url: A real Redis to use; an in-process fakeredis when None (that needs the
            ``testing`` extra: :class:`~streamflow.errors.MissingExtraError` otherwise).
        namespace: The key namespace; a fresh random one by default, so tests never collide.
        concurrency: Handlers run at once.
        resources: Objects the handlers get instead of what the startup hooks store, by type
            (test doubles; see :class:`~streamflow.lifecycle.Resources`).
        **worker_options: More keyword arguments for :class:`~streamflow.worker.Worker`.
    """

    def __init__(
        self,
        app: App,
        *,
        redis_url: str | None = None,
        namespace: str | None = None,
        concurrency: int = 8,
        resources: Mapping[type[Any], Any] | None = None,
        **worker_options: Any,
    ) -> None:
        self.app = app
        self.namespace = namespace or f"test-{uuid.uuid4().hex[:8]}"
        self.keys = Keys(self.namespace)
        self._url = redis_url
        self._concurrency = concurrency
        self._worker_options = worker_options
        self._redis: Redis | None = None
        self._client: Client | None = None
        self.outcomes: list[Outcome] = []
        #: What the app's startup hooks stored (and the pinned test doubles).
        self.resources = Resources(resources)
        self._hooks = AsyncExitStack()

    async def __aenter__(self) -> Self:
        if self._url is None:
            fakeredis = extras.require("testing", "streamflow.testing without a redis_url")
            self._redis = fakeredis.FakeAsyncRedis()
        else:
            self._redis = connect.connect(self._url, name="streamflow-testing")
            await connect.ping(self._redis, self._url)
        self._client = Client(self._redis, namespace=self.namespace)
        grace = float(self._worker_options.get("shutdown_grace", 30.0))
        try:
            # A role with priorities exists from the start, as a deployed one would: a test
            # may publish at a level before the first drain (which would create it).
            for role in self.app.roles.values():
                if role.priorities > 1:
                    await partitions.ensure(
                        self._redis, self.keys, role.name, role.partitions, role.priorities
                    )
            await self._hooks.enter_async_context(
                self.app.lifecycle(self.resources).running(lambda: grace)
            )
        except BaseException:
            await self._redis.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._hooks.aclose()  # the shutdown hooks
        finally:
            if self._redis is not None:
                await self._redis.aclose()

    @property
    def redis(self) -> Redis:
        """The Redis client the harness uses."""
        if self._redis is None:
            raise RuntimeError("use the Harness in 'async with'")
        return self._redis

    @property
    def client(self) -> Client:
        """A :class:`~streamflow.client.Client` on the harness's namespace."""
        if self._client is None:
            raise RuntimeError("use the Harness in 'async with'")
        return self._client

    async def publish(self, role: str, payload: Any = None, **options: Any) -> str:
        """Publish one job (see :meth:`Client.publish`); returns its message id."""
        return await self.client.publish(role, payload, **options)

    async def drain(
        self, roles: list[str] | None = None, *, run_scheduled: bool = True
    ) -> list[Outcome]:
        """Run a worker until every queued job is settled; returns this drain's outcomes.

        Args:
            roles: The roles to run; all of the app's by default.
            run_scheduled: Treat retries (and delayed publishes) as due at once, so a drain
                runs every attempt to its end without waiting out the backoff.
        """
        seen: list[Outcome] = []
        worker = Worker(
            self.app,
            self.redis,
            roles=roles,
            namespace=self.namespace,
            concurrency=self._concurrency,
            on_outcome=seen.append,
            resources=self.resources,
            **self._worker_options,
        )
        names = roles if roles is not None else list(self.app.roles)
        while True:
            await worker.drain()
            if not run_scheduled or not await self._fast_forward(names):
                break
        self.outcomes += seen
        return seen

    async def _fast_forward(self, roles: list[str]) -> int:
        registered = Scripts(self.redis)
        moved = 0
        for role in roles:
            for shard, level in await self._places(role):
                count, _ = await scripts.promote(
                    registered,
                    self.redis,
                    self.keys.role_stream(shard, level),
                    self.keys.delayed(shard, level),
                    horizon="+inf",
                )
                moved += count
        return moved

    async def _shards(self, role: str) -> tuple[str, ...]:
        layout = await partitions.load(self.redis, self.keys, role)
        return layout.shards if layout is not None else (role,)

    async def _places(self, role: str) -> list[tuple[str, int]]:
        """Each (partition, priority level) of ``role``."""
        layout = await partitions.load(self.redis, self.keys, role)
        if layout is None:
            return [(role, 0)]
        return [(shard, level) for shard in layout.shards for level in range(layout.levels)]

    async def run_task(
        self,
        graph: Graph | GraphSpec | dict[str, Any],
        *,
        params: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        all_nodes: bool = False,
        max_rounds: int = 1000,
        **coordinator_options: Any,
    ) -> TaskRun:
        """Submit a task and run it to its end in-process; returns its state and results.

        Workers for every role of the app and a coordinator (with the app's functions) take
        turns until the task ends. Retries run at once (see :meth:`drain`). ``headers`` are
        the task's (every node job carries them; see :meth:`Client.submit`).

        Raises:
            GraphError: The graph is invalid (e.g. a role the app lacks).
            RuntimeError: The task stopped making progress.
        """
        coordinator = Coordinator(
            self.redis, app=self.app, namespace=self.namespace, **coordinator_options
        )
        with warnings.catch_warnings():
            # Its coordinator is this in-process one, which runs below.
            warnings.simplefilter("ignore", NoCoordinatorWarning)
            task_id = await self.client.submit(
                graph,
                params=params,
                headers=headers,
                roles=self.app.roles,
                functions=self.app.functions,
            )
        for _ in range(max_rounds):
            handled = len(await self.drain())
            handled += await coordinator.drain()
            state = await self.client.task(task_id)
            assert state is not None
            if state.terminal:
                results: dict[str, list[Any]] = {}
                if state.state == "succeeded":
                    nodes = list(state.nodes) if all_nodes else None
                    if nodes is None:
                        results = await self.client.result(task_id)
                    else:
                        for node in nodes:
                            results.update(await self.client.result(task_id, node))
                return TaskRun(task_id, state, results)
            if handled == 0:
                raise RuntimeError(f"task {task_id} stopped making progress: {state}")
        raise RuntimeError(f"task {task_id} did not finish in {max_rounds} rounds")

    @property
    def retried(self) -> list[Outcome]:
        """Outcomes that scheduled another attempt."""
        return [o for o in self.outcomes if o.status == "retried"]

    @property
    def acked(self) -> list[str]:
        """Message ids acknowledged so far, in order."""
        return [o.message_id or "" for o in self.outcomes if o.status == "acked"]

    @property
    def dead_lettered(self) -> list[Outcome]:
        """Outcomes that went to a dead-letter stream."""
        return [o for o in self.outcomes if o.status == "dead_lettered"]

    async def dead_letters(self, role: str) -> list[DeadLetter]:
        """The entries of a role's dead-letter streams, oldest first (partition by partition)."""
        letters = []
        for shard in await self._shards(role):
            entries = await streams.read_range(self.redis, self.keys.dead_letters(shard))
            letters += [decode_dead_letter(entry.fields)[0] for entry in entries]
        return letters

    async def queued(self, role: str) -> int:
        """How many entries the role's streams hold (not yet acknowledged or never read)."""
        total = 0
        for shard, level in await self._places(role):
            total += int(await self.redis.xlen(self.keys.role_stream(shard, level)))
        return total
