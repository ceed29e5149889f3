"""Middleware (streamflow.middleware): around handlers and publishes, told of retries and dead
letters; its order, its failures, the metrics built on it, and the documented example.

In-process workers and harnesses on a real redis-server.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

import streamflow
from streamflow import App, Client, ConfigError, Context, RetryPolicy, Worker
from streamflow.delivery import Outcome
from streamflow.middleware import (
    CallNext,
    DeadLettered,
    Middleware,
    Publish,
    PublishNext,
    Retrying,
    compose,
)
from streamflow.testing import Harness
from tests.helpers import ROOT, running, wait_until

pytestmark = pytest.mark.anyio

DOCS = ROOT / "docs" / "concepts.md"


class Recorder(Middleware):
    """Writes what it sees into a shared journal, under its name."""

    def __init__(self, name: str, journal: list[str]) -> None:
        self.name = name
        self.journal = journal
        self.retries: list[Retrying] = []
        self.dead: list[DeadLettered] = []

    async def handle(self, ctx: Context, payload: Any, call_next: CallNext) -> Any:
        self.journal.append(f"{self.name} before {ctx.role} {payload}")
        try:
            result = await call_next(ctx, payload)
        except Exception as exc:
            self.journal.append(f"{self.name} error {type(exc).__name__}: {exc}")
            raise
        self.journal.append(f"{self.name} after {result}")
        return result

    async def publish(self, message: Publish, call_next: PublishNext) -> str:
        self.journal.append(f"{self.name} publish {message.role}")
        message.headers[f"seen-by-{self.name}"] = "yes"
        return await call_next(message)

    async def on_retry(self, event: Retrying) -> None:
        self.journal.append(f"{self.name} retry")
        self.retries.append(event)

    async def on_dead_letter(self, event: DeadLettered) -> None:
        self.journal.append(f"{self.name} dead {event.reason}")
        self.dead.append(event)


def recorded_app(journal: list[str], *middleware: Middleware) -> App:
    """An async and a plain role that double their payload; a role that fails below zero."""
    app = App()
    app.add_middleware(*middleware)

    @app.role("double")
    async def double(ctx: Context, n: int) -> int:
        journal.append(f"handler {n}")
        return n * 2

    @app.role("double_sync")
    def double_sync(ctx: Context, n: int) -> int:
        journal.append(f"sync handler {n}")
        return n * 2

    @app.role("fail", retry=RetryPolicy(max_attempts=2, backoff=0))
    async def fail(ctx: Context, n: int) -> None:
        raise ValueError(f"no {n}")

    return app


@pytest.mark.slow
@pytest.mark.parametrize("role", ["double", "double_sync"])
async def test_the_first_middleware_added_is_the_outermost(
    redis: Redis, namespace: str, role: str
) -> None:
    journal: list[str] = []
    app = recorded_app(journal, Recorder("a", journal), Recorder("b", journal))
    outcomes: list[Outcome] = []
    worker = Worker(app, redis, roles=[role], namespace=namespace, on_outcome=outcomes.append)
    with anyio.fail_after(20):
        async with running(worker):
            await Client(redis, namespace=namespace).publish(role, 3)
            await wait_until(lambda: len(outcomes) == 1)
    handler = "handler 3" if role == "double" else "sync handler 3"
    assert journal == [
        f"a before {role} 3",
        f"b before {role} 3",
        handler,
        "b after 6",
        "a after 6",
    ]
    assert outcomes[0].status == "acked"


async def test_errors_retries_and_dead_letters_reach_each_middleware_in_order(
    redis_url: str,
) -> None:
    journal: list[str] = []
    a, b = Recorder("a", journal), Recorder("b", journal)
    app = recorded_app(journal, a, b)
    async with Harness(app, redis_url=redis_url) as h:
        message_id = await h.publish("fail", 7)
        await h.drain(["fail"])
    assert journal == [
        "a before fail 7",
        "b before fail 7",
        "b error ValueError: no 7",
        "a error ValueError: no 7",
        "a retry",
        "b retry",
        "a before fail 7",
        "b before fail 7",
        "b error ValueError: no 7",
        "a error ValueError: no 7",
        "a dead failed",
        "b dead failed",
    ]
    [retry] = a.retries
    assert retry is b.retries[0]  # one event, told to each
    assert (retry.context.message_id, retry.context.attempt) == (message_id, 1)
    assert retry.error is not None and retry.error.type == "ValueError"
    assert retry.detail == "no 7" and retry.delay <= 0
    [dead] = a.dead
    assert (dead.role, dead.message_id, dead.reason) == ("fail", message_id, "failed")
    assert dead.context is not None and dead.context.attempt == 2
    assert dead.error is not None and dead.error.message == "no 7"
    assert dead.detail == "attempt 2 of 2 failed: no 7"
    assert [o.status for o in h.outcomes] == ["retried", "dead_lettered"]


async def test_a_malformed_message_is_told_as_a_dead_letter_without_a_context(
    redis_url: str,
) -> None:
    journal: list[str] = []
    recorder = Recorder("a", journal)
    app = recorded_app(journal, recorder)
    async with Harness(app, redis_url=redis_url) as h:
        message_id = await h.publish("double", "not a number")
        await h.drain(["double"])
    [dead] = recorder.dead
    assert (dead.reason, dead.message_id, dead.context) == ("invalid_payload", message_id, None)
    assert journal == ["a dead invalid_payload"]  # the handler never ran, nor its middleware


async def test_a_publish_middleware_sets_headers_the_handler_reads(redis_url: str) -> None:
    journal: list[str] = []
    seen: list[dict[str, str]] = []
    app = App()

    @app.role("echo")
    async def echo(ctx: Context, payload: Any) -> None:
        seen.append(dict(ctx.headers))

    async with Harness(app, redis_url=redis_url) as h:
        h.client.add_middleware(Recorder("outer", journal), Recorder("inner", journal))
        await h.publish("echo", 1, headers={"correlation-id": "c-1"})
        await h.publish("echo", 2, key="k", message_id="m-2")  # no headers of its own
        await h.drain()
    assert journal == ["outer publish echo", "inner publish echo"] * 2
    both = {"seen-by-outer": "yes", "seen-by-inner": "yes"}
    assert sorted(seen, key=len) == [both, {"correlation-id": "c-1", **both}]
    assert "m-2" in h.acked  # the other options went through


class Refuse(Middleware):
    """Refuses to publish to one role, or to run one role's handler."""

    async def publish(self, message: Publish, call_next: PublishNext) -> str:
        if message.role == "double":
            raise PermissionError("not from here")
        return await call_next(message)

    async def handle(self, ctx: Context, payload: Any, call_next: CallNext) -> Any:
        if ctx.role == "fail":
            raise PermissionError(f"refused attempt {ctx.attempt}")
        return await call_next(ctx, payload)


async def test_a_failing_middleware_fails_the_publish_or_the_attempt(redis_url: str) -> None:
    journal: list[str] = []
    recorder = Recorder("outer", journal)
    app = recorded_app(journal, recorder, Refuse())
    async with Harness(app, redis_url=redis_url) as h:
        h.client.add_middleware(Refuse())
        with pytest.raises(PermissionError, match="not from here"):
            await h.publish("double", 1)
        assert await h.queued("double") == 0  # nothing written
        await h.publish("fail", 4)
        await h.drain(["fail"])
    # The refusal is the attempt's error: retried, then dead-lettered, the handler never ran.
    assert [o.status for o in h.outcomes] == ["retried", "dead_lettered"]
    [dead] = recorder.dead
    assert dead.detail == "attempt 2 of 2 failed: refused attempt 2"
    assert dead.error is not None and dead.error.type == "PermissionError"
    assert "outer error PermissionError: refused attempt 1" in journal


class Gatekeeper(Middleware):
    """Refuses payload 3; after each send, notes how many jobs the stream holds."""

    def __init__(self, redis: Redis, stream: str) -> None:
        self.redis = redis
        self.stream = stream
        self.seen_after: list[int] = []

    async def publish(self, message: Publish, call_next: PublishNext) -> str:
        if message.payload == 3:
            raise PermissionError("not 3")
        await anyio.lowlevel.checkpoint()  # an async client's middleware may truly wait
        message_id = await call_next(message)
        self.seen_after.append(int(await self.redis.xlen(self.stream)))
        return message_id


def echo_app() -> tuple[App, list[tuple[int, dict[str, str]]]]:
    """An app whose role ``echo`` records each payload (an int) with the job's headers."""
    app, seen = App(), list[tuple[int, dict[str, str]]]()

    @app.role("echo")
    async def echo(ctx: Context, n: int) -> None:
        seen.append((n, dict(ctx.headers)))

    return app, seen


async def test_publish_many_passes_each_job_through_the_middleware_and_sends_them_together(
    redis_url: str,
) -> None:
    journal: list[str] = []
    app, seen = echo_app()
    async with Harness(app, redis_url=redis_url) as h:
        gate = Gatekeeper(h.redis, h.keys.role_stream("echo"))
        h.client.add_middleware(Recorder("outer", journal), gate)
        ids = await h.client.publish_many("echo", [1, 2], headers={"batch": "b-1"})
        assert gate.seen_after == [2, 2]  # each chain resumed once both jobs were sent
        with pytest.raises(PermissionError, match="not 3"):
            await h.client.publish_many("echo", [3, 4, 5], chunk_size=2)
        # 4 went with 3's chunk (3 refused), and the next chunk (5) not, as without middleware.
        assert await h.queued("echo") == 3
        await h.drain()
    assert len(set(ids)) == 2 and set(ids) <= set(h.acked)
    assert journal == ["outer publish echo"] * 4
    headers = {"seen-by-outer": "yes"}
    assert sorted(seen) == [
        (1, {"batch": "b-1", **headers}),
        (2, {"batch": "b-1", **headers}),
        (4, headers),
    ]


class Suspends(Middleware):
    """Awaits the event loop before publishing (which a SyncClient has not)."""

    async def publish(self, message: Publish, call_next: PublishNext) -> str:
        await anyio.lowlevel.checkpoint()
        return await call_next(message)


async def test_a_sync_client_runs_its_publish_middleware_without_an_event_loop(
    redis_url: str,
) -> None:
    journal: list[str] = []
    app, seen = echo_app()
    async with Harness(app, redis_url=redis_url) as h:
        with streamflow.SyncClient(redis_url, namespace=h.namespace) as sync:
            sync.add_middleware(Recorder("outer", journal), Recorder("inner", journal))
            first = sync.publish("echo", 1, headers={"correlation-id": "c-1"})
            many = sync.publish_many("echo", [2, 3])
        with streamflow.SyncClient(redis_url, namespace=h.namespace) as suspending:
            suspending.add_middleware(Suspends())
            with pytest.raises(RuntimeError, match="a SyncClient has none"):
                suspending.publish("echo", 4)
            with pytest.raises(RuntimeError, match="a SyncClient has none"):
                suspending.publish_many("echo", [5, 6])
        assert await h.queued("echo") == 3  # nothing of the suspending one
        await h.drain()
    assert {first, *many} == set(h.acked)
    assert journal == ["outer publish echo", "inner publish echo"] * 3
    both = {"seen-by-outer": "yes", "seen-by-inner": "yes"}
    assert sorted(seen) == [(1, {"correlation-id": "c-1", **both}), (2, both), (3, both)]


async def test_a_submit_passes_through_the_publish_middleware_as_a_task(redis_url: str) -> None:
    journal: list[str] = []
    kinds: list[tuple[str, Any]] = []
    seen: list[dict[str, str]] = []

    class Kinds(Middleware):
        async def publish(self, message: Publish, call_next: PublishNext) -> str:
            kinds.append((message.kind, type(message.payload).__name__))
            task_id = await call_next(message)
            kinds.append(("returned", task_id))
            return task_id

    app = App()

    @app.role("node")
    async def node(ctx: Context, params: dict[str, Any]) -> None:
        seen.append(dict(ctx.headers))

    graph = streamflow.Graph("orders").node("a", role="node").node("b", role="node")
    async with Harness(app, redis_url=redis_url) as h:
        h.client.add_middleware(Recorder("outer", journal), Kinds())
        with anyio.fail_after(30):
            run = await h.run_task(graph.edge("a", "b"), headers={"tenant": "t-1"})
    assert run.succeeded
    assert journal == ["outer publish orders"]  # the graph's name
    assert kinds == [("task", "GraphSpec"), ("returned", run.task_id)]
    assert seen == [{"tenant": "t-1", "seen-by-outer": "yes"}] * 2  # every node job


class Broken(Middleware):
    """Fails in both outcome hooks."""

    async def on_retry(self, event: Retrying) -> None:
        raise RuntimeError("retry hook broke")

    async def on_dead_letter(self, event: DeadLettered) -> None:
        raise RuntimeError("dead-letter hook broke")


async def test_a_failing_outcome_hook_is_logged_and_the_next_is_still_told(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    journal: list[str] = []
    app = recorded_app(journal, Broken(), Recorder("after", journal))
    with caplog.at_level(logging.ERROR, logger="streamflow.worker"):
        async with Harness(app, redis_url=redis_url) as h:
            await h.publish("fail", 1)
            await h.drain(["fail"])
    assert [o.status for o in h.outcomes] == ["retried", "dead_lettered"]
    assert journal[-1] == "after dead failed" and "after retry" in journal
    failures = [r for r in caplog.records if "middleware" in r.getMessage()]
    assert [re.sub(r"<.*>", "<m>", r.getMessage()) for r in failures] == [
        "middleware <m> failed in on_retry (ignored)",
        "middleware <m> failed in on_dead_letter (ignored)",
    ]
    assert all(r.exc_info is not None for r in failures)


class Slow(Middleware):
    """Takes its time before the handler."""

    async def handle(self, ctx: Context, payload: Any, call_next: CallNext) -> Any:
        await anyio.sleep(0.3)
        return await call_next(ctx, payload)


@pytest.mark.slow
async def test_a_role_timeout_bounds_the_handler_not_its_middleware(redis_url: str) -> None:
    app = App()
    app.add_middleware(Slow())

    @app.role("quick", timeout=0.2)
    async def quick(ctx: Context, payload: Any) -> str:
        return "done"

    @app.role("stuck", timeout=0.2, retry=RetryPolicy(max_attempts=1))
    async def stuck(ctx: Context, payload: Any) -> None:
        await anyio.sleep(5)

    async with Harness(app, redis_url=redis_url) as h:
        await h.publish("quick")
        await h.publish("stuck")
        with anyio.fail_after(10):
            await h.drain()
    assert sorted((o.role, o.status) for o in h.outcomes) == [
        ("quick", "acked"),
        ("stuck", "dead_lettered"),
    ]


@pytest.mark.slow
async def test_a_task_nodes_own_timeout_runs_through_every_middleware(redis_url: str) -> None:
    journal: list[str] = []
    app = App()
    app.add_middleware(Recorder("a", journal), Slow(), Recorder("b", journal))

    @app.role("step")
    async def step(ctx: Context, params: dict[str, Any]) -> None:
        journal.append(f"step {ctx.node_id}")
        if params.get("hang"):
            await anyio.sleep(5)
        await ctx.emit([1])

    graph = streamflow.Graph("timed")
    graph.node("quick", role="step", timeout=0.2)
    graph.node("hung", role="step", params={"hang": True}, timeout=0.2, retry={"max_attempts": 1})
    async with Harness(app, redis_url=redis_url) as h:
        with anyio.fail_after(20):
            run = await h.run_task(graph)
    # The quick node ran 0.3 s of middleware (Slow) under a 0.2 s limit: the limit is its own.
    assert run.state.nodes["quick"].state == "succeeded"
    assert run.state.nodes["hung"].error == "failed: attempt 1 of 1 failed: timed out after 0.2s"
    assert sorted(journal) == sorted(
        [
            *("a before step {}", "b before step {}", "step quick", "b after None", "a after None"),
            *("a before step {'hang': True}", "b before step {'hang': True}", "step hung"),
            *("b error TimeoutError: ", "a error TimeoutError: "),  # the node's limit, inside b
            *("a dead failed", "b dead failed"),
        ]
    )


def test_middleware_that_does_not_wrap_handlers_leaves_the_handler_bare() -> None:
    async def handler(ctx: Context, payload: Any) -> None:
        return None

    class OnlyOutcomes(Middleware):
        async def on_retry(self, event: Retrying) -> None:
            return None

    assert compose([Middleware(), OnlyOutcomes()], handler) is handler
    assert compose([Recorder("a", [])], handler) is not handler


def test_only_middleware_instances_are_added() -> None:
    with pytest.raises(ConfigError, match=r"not a streamflow\.Middleware"):
        App().add_middleware(Recorder)  # type: ignore[arg-type]  # the class, not an instance
    with pytest.raises(ConfigError, match=r"not a streamflow\.Middleware"):
        Client(Redis()).add_middleware(object())  # type: ignore[arg-type]
    assert streamflow.Middleware is Middleware


def histogram(registry: CollectorRegistry, role: str) -> tuple[float, float, float]:
    """The handler-duration histogram of ``role``: count, sum, and the count under 0.1 s."""
    sample = registry.get_sample_value
    labels = {"role": role}
    count = sample("streamflow_handler_duration_seconds_count", labels)
    total = sample("streamflow_handler_duration_seconds_sum", labels)
    fast = sample("streamflow_handler_duration_seconds_bucket", {**labels, "le": "0.1"})
    assert count is not None and total is not None and fast is not None
    return count, total, fast


@pytest.mark.slow
async def test_metrics_time_the_handler_alone_inside_the_apps_middleware(
    redis: Redis, namespace: str
) -> None:
    journal: list[str] = []
    app = recorded_app(journal, Slow())
    outcomes: list[Outcome] = []
    worker = Worker(app, redis, namespace=namespace, on_outcome=outcomes.append)
    registry = worker.enable_metrics()
    started = time.perf_counter()
    with anyio.fail_after(20):
        async with running(worker):
            client = Client(redis, namespace=namespace)
            for n in range(3):
                await client.publish("double", n)
            await client.publish("double_sync", 9)
            await wait_until(lambda: len(outcomes) == 4)
    elapsed = time.perf_counter() - started
    count, total, fast = histogram(registry, "double")
    # Three runs, each well under the 0.3 s the middleware slept before it.
    assert (count, fast) == (3, 3) and 0 < total < 0.3
    count, total, fast = histogram(registry, "double_sync")
    assert (count, fast) == (1, 1) and total < elapsed
    assert sorted(journal) == ["handler 0", "handler 1", "handler 2", "sync handler 9"]


# -- the documented example -----------------------------------------------------------------------


def doc_block(marker: str) -> str:
    """The Python block after ``<!-- example: MARKER -->`` in docs/concepts.md."""
    found = re.search(rf"<!-- example: {marker} -->\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert found is not None, marker
    return found.group(1)


async def test_the_documented_middleware_example_runs(redis_url: str) -> None:
    scope: dict[str, Any] = {"__name__": "middleware_example"}
    exec(compile(doc_block("middleware"), "concepts.md:middleware", "exec"), scope)
    exec(compile(doc_block("middleware-test"), "concepts.md:middleware-test", "exec"), scope)
    with anyio.fail_after(20):
        await scope["test_the_audit_sees_every_charge"]()  # on fakeredis, as the page shows
        # Again on a real redis-server.
        scope["audit"].seen.clear()
        app: App = scope["app"]
        async with Harness(app, redis_url=redis_url) as h:
            h.client.add_middleware(scope["audit"])
            await h.publish("charge", 100)
            await h.drain()
    assert scope["audit"].seen == ["ran charge for billing"]
