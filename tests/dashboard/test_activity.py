"""What the dashboard draws from the lifecycle events stream (streamflow/dashboard/activity.py):
a task's timeline on its page, and each role's recent rates on the overview, in chromium."""

from __future__ import annotations

import orjson
import pytest

from streamflow import Client, Graph
from streamflow.dashboard.activity import BUCKET_MS, TIMELINE_EVENTS, Rates, Timeline
from tests.dashboard.browser import Browser, BrowserError
from tests.dashboard.conftest import Procs
from tests.helpers import recorded, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def test_a_finished_tasks_page_lists_its_events_in_order(procs: Procs, browser: Browser) -> None:
    procs.worker("w1", "tests.task_apps:app", "src", "step")
    procs.coordinator("c1")
    graph = Graph("timeline", params={"n": 2, "size": 1})
    graph.node("src", role="src")
    graph.node("step", role="step")
    graph.edge("src", "step", on="batch")

    async def submit(client: Client) -> str:
        return await client.submit(graph)

    async def state(client: Client) -> str:
        found = await client.task(task_id)
        return found.state if found is not None else "gone"

    task_id = procs.query(submit)
    wait_for(lambda: procs.query(state) == "succeeded", 30, "the task succeeded")
    browser.goto(f"{procs.dashboard()}/tasks/{task_id}")
    rows = "[...document.querySelectorAll('#timeline tbody tr')]"
    text = "(document.getElementById('timeline') || {}).innerText"

    def complete() -> bool:
        # Events are buffered: the last ones may land a moment after the task's state.
        try:
            shown = browser.evaluate(text) or ""
            done = browser.evaluate(f"{rows}.filter(r => r.dataset.type == 'succeeded').length")
            if "task: succeeded" in shown and done == 3:  # src, and step for each batch
                return True
            browser.evaluate("location.reload()")
        except BrowserError:  # between two documents
            pass
        return False

    wait_for(complete, 20, "every event of the task is listed")
    types = browser.evaluate(f"{rows}.map(r => r.dataset.type)")
    assert types.count("started") == 3  # src once, step once per batch
    times = browser.evaluate(f"{rows}.map(r => Number(r.dataset.at))")
    assert times == sorted(times) and len(times) == len(types)
    assert "w1" in browser.evaluate(text) and "c1" in browser.evaluate(text)


def test_the_overview_draws_each_roles_successes_and_failures_of_the_last_minutes(
    procs: Procs, browser: Browser
) -> None:
    procs.worker("w1", "tests.apps:app", "record", "forge")

    async def publish(client: Client) -> None:
        for n in range(4):
            await client.publish("record", {"n": n})
        await client.publish("forge", {"text": "no"})

    procs.query(publish)
    wait_for(lambda: len(recorded(procs.record)) == 4, 20, "w1 ran the four jobs")
    browser.goto(procs.dashboard() + "/")
    figures = "(document.querySelector('tr[data-role={}] .spark-figures') || {{dataset: {{}}}})"
    browser.wait_for(f"{figures.format('record')}.dataset.ok == '4'")
    browser.wait_for(f"{figures.format('forge')}.dataset.failed == '1'")
    assert "100% failed" in browser.evaluate(f"{figures.format('forge')}.textContent")
    assert (
        browser.evaluate(
            "document.querySelectorAll('tr[data-role=record] svg.spark polyline').length"
        )
        == 2
    )
    # The page follows: one more success shows without a reload.
    browser.evaluate("window.__same_page = true")

    async def one_more(client: Client) -> None:
        await client.publish("record", {"n": 4})

    procs.query(one_more)
    browser.wait_for(f"{figures.format('record')}.dataset.ok == '5'")
    assert browser.evaluate("window.__same_page") is True


@pytest.mark.anyio
async def test_rates_count_each_event_once_and_forget_the_past(
    redis_url: str, namespace: str
) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        stream = client.keys.lifecycle()
        now = int((await client.redis.time())[0]) * 1000

        async def write(*types: str) -> None:
            items = [
                {"protocol": 1, "kind": "lifecycle", "type": t, "at_ms": now, "role": "r"}
                for t in types
            ]
            await client.redis.xadd(stream, {"events": orjson.dumps(items)})

        await client.redis.xadd(stream, {"events": b"not json"})  # skipped, not fatal
        await write("succeeded", "succeeded", "failed")
        rates = Rates(client.redis, client.keys)
        await rates.update(now)
        await rates.update(now)  # nothing new: nothing counted twice
        await write("dead_lettered", "started", "progress")
        await rates.update(now)
        spark = rates.sparks(["r", "idle"], now)
        assert (sum(spark["r"].succeeded), sum(spark["r"].failed)) == (2, 2)
        assert spark["r"].failure_rate == 0.5 and spark["idle"].failure_rate is None
        later = now + 31 * BUCKET_MS
        await rates.update(later)
        assert sum(rates.sparks(["r"], later)["r"].succeeded) == 0


@pytest.mark.anyio
async def test_a_followed_timeline_reads_only_new_entries_in_time_order_up_to_its_bound(
    redis_url: str, namespace: str
) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        stream = client.keys.lifecycle()
        now = int((await client.redis.time())[0]) * 1000

        async def write(task_id: str, *times: int) -> None:
            items = [
                {"protocol": 1, "kind": "lifecycle", "type": "started", "at_ms": at,
                 "task_id": task_id}
                for at in times
            ]  # fmt: skip
            await client.redis.xadd(stream, {"events": orjson.dumps(items)})

        await write("t1", now + 5)
        await write("other", now + 1)  # not the task's: not listed
        timeline = Timeline(client.redis, client.keys, "t1", now - 1000)
        await timeline.update()
        assert [e.at_ms for e in timeline.events] == [now + 5] and not timeline.cut
        await timeline.update()  # nothing new: nothing listed twice
        # Buffered by another process: written later, it happened earlier.
        await write("t1", now + 2, now + 9)
        await timeline.update()
        assert [e.at_ms for e in timeline.events] == [now + 2, now + 5, now + 9]
        await write("t1", *range(now + 10, now + 10 + TIMELINE_EVENTS))
        await timeline.update()
        assert len(timeline.events) == TIMELINE_EVENTS and timeline.cut
        assert timeline.events[-1].at_ms == now + 10 + TIMELINE_EVENTS - 4
        calls = (await client.redis.info("commandstats")).get("cmdstat_xrange", {}).get("calls")
        await timeline.update()  # full: the page shows the first events, reads no more
        after = (await client.redis.info("commandstats")).get("cmdstat_xrange", {}).get("calls")
        assert after == calls
