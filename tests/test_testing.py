"""streamflow.testing: the harness users test their handlers with, on fakeredis and real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import streamflow
from streamflow import App, Context
from streamflow.testing import Harness

pytestmark = pytest.mark.anyio


class Resize(BaseModel):
    width: int


def make_app(sizes: list[int]) -> App:
    app = App()

    @app.role("resize")
    async def resize(ctx: Context, job: Resize) -> None:
        if job.width > 10_000:
            raise ValueError("too wide")
        sizes.append(job.width)

    @app.role("notify")
    def notify(ctx: Context, payload: str) -> None:  # a plain function: runs in a thread
        sizes.append(len(payload))

    return app


@pytest.fixture(params=["fakeredis", "real"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "fakeredis":
        return None
    server = request.getfixturevalue("redis_server")
    return str(server.url)


async def test_harness_runs_handlers_until_idle_and_reports_outcomes(
    redis_url: str | None,
) -> None:
    sizes: list[int] = []
    async with Harness(make_app(sizes), redis_url=redis_url) as h:
        ok = [await h.publish("resize", {"width": w}) for w in (100, 200)]
        too_wide = await h.publish("resize", {"width": 20_000})
        bad = await h.publish("resize", {"width": "wide"})
        note = await h.publish("notify", "hello")
        await h.drain()
        assert sorted(h.acked) == sorted([*ok, note])
        assert {(o.message_id, o.reason) for o in h.dead_lettered} == {
            (too_wide, "failed"),
            (bad, "invalid_payload"),
        }
        # The failing one was tried 3 times (the default policy), then dead-lettered.
        assert [o.message_id for o in h.retried] == [too_wide, too_wide]
        letters = await h.dead_letters("resize")
        assert {letter.message_id for letter in letters} == {too_wide, bad}
        assert await h.queued("resize") == 0
        assert await h.drain() == []  # idle: nothing more happens
    assert sorted(sizes) == [5, 100, 200]


async def test_run_task_in_process_on_fakeredis() -> None:
    app = streamflow.App()

    @app.role("lines")
    async def lines(ctx: streamflow.Context, params: dict[str, Any]) -> Any:
        for start in range(0, params["n"], 4):
            yield [{"n": i} for i in range(start, min(start + 4, params["n"]))]

    @app.role("square")
    async def square(ctx: streamflow.Context, params: dict[str, Any]) -> None:
        assert ctx.batch is not None
        await ctx.emit([{"n": item["n"] ** 2} for item in ctx.batch.items])

    graph = streamflow.Graph("squares", params={"n": 10})
    graph.node("lines", role="lines").node("square", role="square")
    graph.node("sum", function="metrics.aggregate")
    graph.edge("lines", "square", on="batch").edge("square", "sum", on="batch")
    async with Harness(app) as h:
        run = await h.run_task(graph)
    assert run.succeeded
    assert run.results == {"sum": [{"count": 10, "sum": 0, "sums": {"n": 285}}]}
    assert run.state.nodes["square"].dispatched == 3


async def test_user_coordinator_function_with_reduce() -> None:
    app = streamflow.App()

    @app.role("words")
    async def words(ctx: streamflow.Context, params: dict[str, Any]) -> Any:
        yield ["a", "bb"]
        yield ["ccc"]

    def longest(params: dict[str, Any], partials: Any) -> list[Any]:
        return [max((w for part in partials for w in part), key=len)]

    @app.function("text.longest", reduce=longest)
    def lengths(params: dict[str, Any], batches: Any) -> list[str]:
        return [word for batch in batches for word in batch.items]

    graph = streamflow.Graph("words").node("words", role="words")
    graph.node("longest", function="text.longest").edge("words", "longest", on="batch")
    async with Harness(app) as h:
        run = await h.run_task(graph)
    assert run.results == {"longest": ["ccc"]}
    assert run.state.nodes["longest"].dispatched == 2


def test_function_names_are_checked() -> None:
    app = streamflow.App()
    with pytest.raises(streamflow.ConfigError):
        app.function("merge.generic")  # taken by a built-in
    with pytest.raises(streamflow.ConfigError):
        app.function("bad name")


async def test_a_failing_function_fails_its_node_not_the_coordinator() -> None:
    app = streamflow.App()

    @app.role("one")
    async def one(ctx: streamflow.Context, params: dict[str, Any]) -> None:
        await ctx.emit([1])

    @app.function("broken.fn")
    def broken(params: dict[str, Any], batches: Any) -> Any:
        raise ValueError("cannot")

    graph = streamflow.Graph("fn-fails").node("one", role="one")
    graph.node("fn", function="broken.fn").edge("one", "fn", on="batch")
    async with Harness(app) as h:
        run = await h.run_task(graph)
    assert run.state.state == "failed"
    assert run.state.nodes["fn"].error == "ValueError: cannot"
