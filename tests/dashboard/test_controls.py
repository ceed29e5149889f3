"""The dashboard's controls (streamflow/dashboard/controls.py) in chromium and over HTTP, on a
real Redis with real workers: schedules, pausing a role, replaying many dead letters."""

from __future__ import annotations

import json
import re

import pytest

from streamflow import Client, Graph
from streamflow import scheduler as runner
from streamflow.schedules import Schedule
from tests.dashboard.browser import Browser, BrowserError
from tests.dashboard.conftest import Procs
from tests.dashboard.http import csrf_of, request
from tests.helpers import recorded, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: Script tags, event-handler attributes and control characters, as a writer of Redis may send.
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">\x07'


def test_a_schedule_is_listed_paused_resumed_and_run_now_from_the_page(
    procs: Procs, browser: Browser
) -> None:
    async def seed(client: Client) -> None:
        hourly = Schedule(id="hourly", role="record", every=3600)
        await runner.add(client.redis, client.keys, hourly)
        # Anyone who may write the namespace may store a definition under a hostile name.
        await client.redis.hset(client.keys.schedules(), XSS, XSS.encode())

    procs.query(seed)
    procs.worker("w1", "tests.apps:app", "record")
    browser.goto(procs.dashboard() + "/")
    browser.click("a[href='/schedules']")
    browser.wait_for("document.querySelector('tr[data-schedule=hourly]')")
    state = "document.querySelector('tr[data-schedule=hourly] [data-field=state]').textContent"
    assert browser.evaluate(state) == "active"
    upcoming = browser.evaluate(
        "document.querySelector('tr[data-schedule=hourly] [data-field=next]').textContent"
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00:00\.000Z \(in [\d.]+ (min|s)\)", upcoming)
    text = browser.text()
    assert "<script>window.__xss=1</script>" in text and "invalid" in text and "\\x07" in text
    assert browser.evaluate("window.__xss === undefined") is True
    assert browser.evaluate("document.querySelectorAll('main script, main img').length") == 0

    browser.click("tr[data-schedule=hourly] button.pause")
    browser.wait_for(f"{state} == 'paused'")
    next_run = "document.querySelector('tr[data-schedule=hourly] [data-field=next]').textContent"
    assert browser.evaluate(next_run) == "-"
    browser.click("tr[data-schedule=hourly] button.resume")
    browser.wait_for(f"{state} == 'active'")

    browser.click("tr[data-schedule=hourly] button.run-now")
    browser.wait_for("document.getElementById('job-state')")
    message_id = browser.evaluate("new URLSearchParams(location.search).get('id')")
    wait_for(lambda: recorded(procs.record) == [message_id], 20, "w1 ran the run-now job")
    browser.goto(browser.evaluate("location.origin") + "/schedules")
    browser.wait_for(
        "document.querySelector('tr[data-schedule=hourly] [data-field=last]').textContent"
        " == 'never'"  # a run-now is outside the ticks: not the schedule's last run
    )


def test_a_role_is_paused_and_resumed_from_its_page_and_its_flow_shows_on_the_overview(
    procs: Procs, browser: Browser
) -> None:
    async def seed(client: Client) -> None:
        await client.publish("record", {"n": 0})
        await client.limit("record", rate="10/s", concurrency=2)

    procs.query(seed)
    base = procs.dashboard()
    browser.goto(base + "/roles/record")
    assert browser.evaluate("document.getElementById('flow').textContent") == (
        "running rate 10/s · 0/2 at once"
    )
    browser.click("#pause-role")
    browser.wait_for("document.getElementById('flow').textContent.startsWith('paused')")

    async def paused(client: Client) -> dict[str, int]:
        return await client.paused(["record"])

    assert list(procs.query(paused)) == ["record"]
    browser.goto(base + "/")
    flow = "document.querySelector('tr[data-role=record] [data-field=flow]').textContent"
    assert browser.evaluate(flow) == "paused rate 10/s · 0/2 at once"
    procs.worker("w1", "tests.apps:app", "record")
    browser.evaluate("window.__same_page = true")
    browser.goto(base + "/roles/record")
    assert recorded(procs.record) == []  # paused: w1 started nothing
    browser.click("#resume-role")
    browser.wait_for("document.getElementById('flow').textContent.startsWith('running')")
    wait_for(lambda: len(recorded(procs.record)) == 1, 20, "w1 ran the job once resumed")
    assert procs.query(paused) == {}


def _dead_letters(procs: Procs, count: int) -> list[str]:
    procs.worker("w1", "tests.apps:app", "forge")

    async def publish(client: Client) -> list[str]:
        return [await client.publish("forge", {"text": f"dead {n}"}) for n in range(count)]

    async def dead(client: Client) -> int:
        return await client.dead_letter_count("forge")

    ids = procs.query(publish)
    wait_for(lambda: procs.query(dead) == count, 20, "the dead letters")
    procs.kill_all()  # no worker: a replayed job waits in the stream, where it can be counted
    procs.started.clear()
    return ids


def _counts(procs: Procs) -> tuple[int, int]:
    async def read(client: Client) -> tuple[int, int]:
        dead = await client.dead_letter_count("forge")
        return dead, await client.redis.xlen(client.keys.role_stream("forge"))

    return procs.query(read)


def test_ticked_dead_letters_are_replayed_and_then_all_after_a_confirmation(
    procs: Procs, browser: Browser
) -> None:
    _dead_letters(procs, 3)
    length = _counts(procs)[1]
    base = procs.dashboard()
    browser.goto(f"{base}/deadletters/forge")
    browser.wait_for("document.querySelectorAll('input.select').length == 3")
    # By keyboard: Tab to each of the first two boxes, Space ticks it; Space on the button.
    boxes = "[...document.querySelectorAll('input.select')]"
    for index in range(2):
        browser.tab_to(f"document.activeElement === {boxes}[{index}]")
        browser.press(" ")
    assert browser.evaluate(f"{boxes}.map(b => b.checked).join()") == "true,true,false"
    browser.tab_to("document.activeElement.id == 'replay-selected-button'")
    browser.press(" ")  # Space presses a focused button
    browser.wait_for("document.querySelectorAll('article.letter').length == 1")
    assert _counts(procs) == (1, length + 2)
    browser.click("#replay-all-link")
    browser.wait_for("document.getElementById('replay-all')")
    assert "all 1 of them" in browser.text()
    browser.click("#replay-all")
    browser.wait_for("document.body.innerText.includes('No dead letter.')")
    assert _counts(procs) == (0, length + 3)


def test_the_control_actions_need_csrf_and_are_refused_when_read_only(procs: Procs) -> None:
    async def seed(client: Client) -> None:
        await runner.add(client.redis, client.keys, Schedule(id="s1", role="record", every=60))
        await client.publish("record", {})

    procs.query(seed)
    writable = procs.dashboard()
    token = csrf_of(request(writable + "/schedules")[1])
    read_only = procs.dashboard("--read-only")
    page = request(read_only + "/schedules")[1]
    assert 'method="post"' not in page and "s1" in page
    assert 'method="post"' not in request(read_only + "/roles/record")[1]
    actions = [
        "/schedules/s1/pause",
        "/schedules/s1/resume",
        "/schedules/s1/run",
        "/roles/record/pause",
        "/roles/record/resume",
        "/deadletters/record/replay-all",
    ]
    for path in actions:
        refused = request(read_only + path, data=f"csrf={token}".encode())
        assert refused[0] == 403 and "read-only" in refused[1], path
        assert request(writable + path, data=b"csrf=0123")[0] == 403, path
    assert request(writable + "/schedules/nope/run", data=f"csrf={token}".encode())[0] == 404
    assert request(writable + "/roles/a%20b/pause", data=f"csrf={token}".encode())[0] == 404
    assert request(writable + "/schedules/s1/pause", data=f"csrf={token}".encode())[0] == 303

    async def state(client: Client) -> tuple[set[str], dict[str, int], int]:
        stored = await runner.load(client.redis, client.keys)
        paused = await client.paused(["record"])
        return stored.paused, paused, await client.redis.xlen(client.keys.role_stream("record"))

    assert procs.query(state) == ({"s1"}, {}, 1)  # only the last one went through


def test_a_definition_that_names_another_id_is_listed_as_invalid(procs: Procs) -> None:
    async def seed(client: Client) -> None:
        other = Schedule(id="other", role="record", every=60).model_dump(mode="json")
        await client.redis.hset(client.keys.schedules(), "mine", json.dumps(other))

    procs.query(seed)
    found = request(procs.dashboard() + "/schedules")
    assert found[0] == 200 and 'data-invalid="1"' in found[1]
    assert "stored under &#39;mine&#39; but names itself &#39;other&#39;" in found[1]


def test_a_tasks_schedule_offers_no_run_now(procs: Procs) -> None:
    graph = Graph("nightly")
    graph.node("a", function="merge.generic")

    async def seed(client: Client) -> None:
        nightly = Schedule(id="nightly", graph=json.loads(graph.spec().to_json()), every=86400)
        await runner.add(client.redis, client.keys, nightly)

    procs.query(seed)
    base = procs.dashboard()
    page = request(base + "/schedules")[1]
    assert 'data-schedule="nightly"' in page and "run-now" not in page and "a task" in page
    refused = request(base + "/schedules/nightly/run", data=f"csrf={csrf_of(page)}".encode())
    assert refused[0] == 409 and "with the CLI only" in refused[1]


def test_the_jobs_page_shows_a_running_jobs_progress_and_headers_as_text(
    procs: Procs, browser: Browser
) -> None:
    procs.worker("w1", "tests.apps:app", "sleepy")

    async def publish(client: Client) -> str:
        payload = {"seconds": 600, "progress": {"done": 3, "of": 7}, "message": XSS}
        return await client.publish("sleepy", payload, headers={"x-team": XSS[:60]})

    message_id = procs.query(publish)
    browser.goto(f"{procs.dashboard()}/jobs?id={message_id}")

    state = "(document.getElementById('job-state') || {}).textContent"
    progress = "(document.getElementById('job-progress') || {}).textContent"

    def running_with_progress() -> bool:
        # The page is read once: reload until the worker has written its progress.
        try:
            if browser.evaluate(f"{state} == 'running' && !!{progress}"):
                return True
            browser.evaluate("location.reload()")
        except BrowserError:  # between two documents
            pass
        return False

    wait_for(running_with_progress, 20, "the page shows the running job's progress")
    shown = browser.evaluate(progress)
    assert shown.startswith('{"done":3,"of":7} · <script>window.__xss=1</script>'), shown
    headers = browser.evaluate("document.getElementById('job-headers').innerText")
    assert "x-team" in headers and "<script>" in headers
    assert browser.evaluate("window.__xss === undefined") is True
    assert browser.evaluate("document.querySelectorAll('main script, main img').length") == 0


def test_a_roles_page_lists_its_delayed_jobs_soonest_first_and_skips_what_is_not_a_job(
    procs: Procs,
) -> None:
    async def publish(client: Client) -> list[str]:
        later = await client.publish("later", {"n": 1}, delay=3600)
        sooner = await client.publish("later", {"n": 2}, delay=600)
        # Anyone who may write the namespace may add members: neither is a job to list.
        schedule = client.keys.delayed("later")
        await client.redis.zadd(schedule, {XSS: 1, b'{"not": "a job"}': float("inf")})
        return [sooner, later]

    sooner, later = procs.query(publish)
    status, page = request(procs.dashboard() + "/roles/later")
    assert status == 200, page
    table = page.split('<table id="delayed">', 1)[1].split("</table>", 1)[0]
    assert re.findall(r"jobs\?id=([0-9a-f]+)", table) == [sooner, later]
    assert "<script>" not in table and "not a job" not in table
    assert "No delayed job." not in table
    assert "soonest of" not in page  # said only when more than the 50 shown wait


def test_dead_letters_page_oldest_first_and_the_next_page_holds_the_newer_ones(
    procs: Procs,
) -> None:
    async def forge(client: Client) -> list[str]:
        stream = client.keys.dead_letters("paged")
        return [await client.redis.xadd(stream, {"x": str(n)}) for n in range(51)]

    ids = [entry.decode() for entry in procs.query(forge)]
    base = procs.dashboard()
    page = request(base + "/deadletters/paged")[1]
    assert re.findall(r'<article class="letter" data-id="([0-9-]+)"', page) == ids[:50]
    link = re.search(r'<a href="(/deadletters/paged\?after=[^"]+)">([^<]+)</a>', page)
    assert link is not None and link.group(2) == "Newer…"
    page = request(base + link.group(1).replace("&amp;", "&"))[1]
    assert re.findall(r'<article class="letter" data-id="([0-9-]+)"', page) == ids[50:]


def test_the_workers_page_lists_each_workers_running_jobs_with_their_age_and_lease_age(
    procs: Procs,
) -> None:
    procs.worker("w1", "tests.apps:app", "sleepy")

    async def publish(client: Client) -> str:
        return await client.publish("sleepy", {"seconds": 600})

    message_id = procs.query(publish)

    async def state(client: Client) -> str:
        return (await client.job(message_id)).state

    wait_for(lambda: procs.query(state) == "running", 20, "w1 runs the job")
    page = request(procs.dashboard() + "/workers")[1]
    table = page.split('<table id="in-flight">', 1)[1].split("</table>", 1)[0]
    row = r'<tr data-consumer="([^"]+)"><td>[^<]*</td><td><a href="/roles/(\w+)">'
    rows = re.findall(row, table)
    assert rows == [("w1", "sleepy")], table
    assert "Nothing running." not in table
    assert re.search(r'<td class="num">\d+(\.\d)? (ms|s)</td>', table), table  # an age
