"""The dashboard in a real browser (headless chromium), on a real Redis with real workers and a
coordinator: what an operator sees and clicks."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from streamflow import Client, Graph, scheduler
from streamflow.protocol import now_ms
from streamflow.schedules import Schedule
from tests.dashboard.browser import Browser, png_facts
from tests.dashboard.conftest import TOKEN, Procs
from tests.helpers import recorded, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

#: Script tags, event-handler attributes and control characters, as a publisher may send them.
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">\x07\x1b[31m'
NO_SCRIPT_RAN = "window.__xss === undefined"


def gated_graph(gate: Path) -> Graph:
    """src emits 4 batches, waiting for ``gate`` after the first; step doubles each batch."""
    graph = Graph("dashboard", params={"n": 4, "size": 3, "gate_after": 1, "gate": str(gate)})
    graph.node("src", role="src")
    graph.node("step", role="step")
    graph.edge("src", "step", on="batch")
    return graph


def submit(procs: Procs, graph: Graph) -> str:
    async def send(client: Client) -> str:
        return await client.submit(graph)

    return procs.query(send)


def task_state(procs: Procs, task_id: str) -> str:
    async def read(client: Client) -> str:
        found = await client.task(task_id)
        return found.state if found is not None else "unknown"

    return procs.query(read)


def row(browser: Browser, role: str, name: str) -> Any:
    return browser.evaluate(
        f"(document.querySelector('tr[data-role={json.dumps(role)}] [data-field={name}]')"
        " || {}).textContent"
    )


def test_the_overview_shows_a_roles_counts_after_publishing(
    procs: Procs, browser: Browser, artefacts: Path
) -> None:
    async def publish(client: Client) -> None:
        for n in range(3):
            await client.publish("record", {"n": n})

    procs.query(publish)
    base = procs.dashboard()
    browser.goto(base + "/")
    assert (row(browser, "record", "length"), row(browser, "record", "pending")) == ("3", "0")
    assert row(browser, "record", "consumers") == "0"
    browser.evaluate("window.__same_page = true")  # a reload would lose it
    procs.worker("w1", "tests.apps:app", "record")
    wait_for(lambda: len(recorded(procs.record)) == 3, 20, "the worker ran the three jobs")
    # The page follows by itself (server-sent events from the shared poller).
    browser.wait_for(
        "document.querySelector('tr[data-role=record] [data-field=consumers]').textContent == '1'"
        " && document.body.innerText.includes('w1')"
    )
    assert row(browser, "record", "pending") == "0"
    assert browser.evaluate("window.__same_page") is True
    screenshots(browser, artefacts, "overview")


def test_a_running_dag_is_drawn_live_until_every_node_succeeded(
    procs: Procs, browser: Browser, tmp_path: Path, artefacts: Path
) -> None:
    procs.worker("w1", "tests.task_apps:app", "src", "step")
    procs.coordinator("c1")
    gate = tmp_path / "gate"
    task_id = submit(procs, gated_graph(gate))
    browser.goto(f"{procs.dashboard()}/tasks/{task_id}")
    browser.wait_for("document.querySelector('g.node[data-node=src][data-state=running]')")
    browser.evaluate("window.__same_page = true")  # a reload would lose it
    rows = "document.querySelectorAll('#timeline-rows tr[data-type]')"
    before = browser.wait_for(f"{rows}.length")  # src started, before the gate
    gate.touch()
    browser.wait_for(
        "[...document.querySelectorAll('g.node')].map(n => n.dataset.state).join() =="
        " 'succeeded,succeeded'",
        timeout=30,
    )
    # The events timeline follows too: the task's own end is listed, without a reload.
    browser.wait_for("document.getElementById('timeline').innerText.includes('task: succeeded')")
    assert browser.evaluate(f"{rows}.length") > before
    times = browser.evaluate(f"[...{rows}].map(r => Number(r.dataset.at))")
    assert times == sorted(times)
    assert browser.evaluate("window.__same_page") is True
    assert browser.evaluate("document.getElementById('task-state').textContent") == "succeeded"
    assert "in 4 · out 4 · 12 items" in browser.text()  # step: 4 batches in, 4 out, 12 items
    shown = browser.wait_for("(document.getElementById('task-result') || {}).textContent")
    result = json.loads(shown)  # batches may end in any order
    assert list(result) == ["step"] and sorted(result["step"]) == [2 * n for n in range(12)]
    screenshots(browser, artefacts, "task")


def screenshots(browser: Browser, where: Path, name: str) -> None:
    """Keep the page at 1280 and 390 px, light and dark, in ``where`` (build/test-artefacts/);
    each is checked for emptiness, not pixels."""
    for scheme in ("light", "dark"):
        browser.color_scheme(scheme)
        for width in (1280, 390):
            shot = where / f"{name}-{width}-{scheme}.png"
            browser.screenshot(shot, width)
            shot_width, height, values = png_facts(shot.read_bytes())
            assert (shot_width, values > 32) == (width, True), f"{shot} looks empty"
            assert height >= 300
            # No horizontal scroll of the page: wide tables scroll in their own box.
            assert browser.evaluate(f"document.documentElement.scrollWidth <= {width}") is True
    assert browser.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(17, 21, 28)"
    browser.color_scheme("light")
    assert browser.evaluate("getComputedStyle(document.body).backgroundColor") != "rgb(17, 21, 28)"


def test_cancelling_from_the_task_page_cancels_the_task(
    procs: Procs, browser: Browser, tmp_path: Path
) -> None:
    procs.worker("w1", "tests.task_apps:app", "src", "step")
    procs.coordinator("c1")
    task_id = submit(procs, gated_graph(tmp_path / "never"))
    browser.goto(f"{procs.dashboard()}/tasks/{task_id}")
    browser.wait_for("document.querySelector('g.node[data-node=src][data-state=running]')")
    browser.click("#cancel-task")
    wait_for(lambda: task_state(procs, task_id) == "cancelled", 20, "the task is cancelled")
    browser.wait_for("document.getElementById('task-state').textContent == 'cancelled'")


def test_replaying_a_dead_letter_from_the_page_runs_the_job_once(
    procs: Procs, browser: Browser
) -> None:
    procs.worker("w1", "tests.apps:app", "work")

    async def publish(client: Client) -> str:
        return await client.publish("work", {"end_by_consumer": {"w1": "fatal"}})

    message_id = procs.query(publish)
    base = procs.dashboard()
    browser.goto(f"{base}/deadletters/work")
    browser.wait_for(f"document.body.innerText.includes({json.dumps(message_id)})")
    procs.kill_all()  # w1 (and the dashboard): w2 runs the replayed job, which w1 would fail
    procs.started.clear()
    base = procs.dashboard()
    procs.worker("w2", "tests.apps:app", "work")
    browser.goto(f"{base}/deadletters/work")
    browser.click("button.replay")
    browser.wait_for("document.body.innerText.includes('No dead letter.')")

    def done_by_w2() -> list[str]:
        return [
            line
            for line in recorded(procs.record)
            if line.startswith("DONE ") and message_id in line
        ]

    wait_for(lambda: done_by_w2(), 20, "w2 ran the replayed job")
    browser.goto(f"{base}/jobs?id={message_id}")
    assert len(done_by_w2()) == 1 and " w2 " in done_by_w2()[0]


def test_an_xss_payload_in_a_dead_letter_and_a_role_name_renders_as_text(
    procs: Procs, browser: Browser
) -> None:
    procs.worker("w1", "tests.apps:app", "forge")

    async def forge(client: Client) -> None:
        await client.publish("forge", {"text": XSS})
        # A registry entry is written by anyone with access to the namespace: a role name too.
        entry = {
            "consumer": "intruder",
            "host": XSS,
            "pid": 1,
            "roles": [XSS],
            "version": "0",
            "concurrency": 1,
            "started_at_ms": 0,
            "in_flight": 0,
            "processed": 0,
            "updated_at_ms": 0,
        }
        await client.redis.set(client.keys.consumer_info("intruder"), json.dumps(entry), ex=60)

    procs.query(forge)
    base = procs.dashboard()
    for path in ("/deadletters/forge", "/workers"):
        browser.goto(base + path)
        browser.wait_for("document.body.innerText.includes('<script>window.__xss=1</script>')")
        text = browser.text()
        assert 'onerror="window.__xss=2"' in text
        assert "\x07" not in text and "\x1b" not in text  # shown escaped, as \x07 and \x1b
        assert "\\x07" in text
        assert browser.evaluate(NO_SCRIPT_RAN) is True
        assert browser.evaluate("document.querySelectorAll('main script, main img').length") == 0
    assert browser.dialogs == []


def test_a_token_and_a_root_path_sign_in_through_the_form(procs: Procs, browser: Browser) -> None:
    base = procs.dashboard("--token", TOKEN, "--root-path", "/sf/")
    browser.goto(base + "/sf/tasks")
    browser.wait_for("location.pathname == '/sf/login'")
    browser.fill("input[name=token]", "wrong-token-wrong-token")
    browser.click("button[type=submit]")
    browser.wait_for("document.body.innerText.includes('not the dashboard')")
    browser.fill("input[name=token]", TOKEN)
    browser.click("button[type=submit]")
    browser.wait_for("location.pathname == '/sf/' && document.getElementById('roles')")
    browser.click("a[href='/sf/tasks']")
    browser.wait_for("location.pathname == '/sf/tasks' && document.getElementById('tasks')")
    assert browser.evaluate("getComputedStyle(document.body).margin") == "0px"  # the CSS loaded


def test_read_only_hides_the_actions(procs: Procs, browser: Browser) -> None:
    procs.worker("w1", "tests.apps:app", "forge")

    async def forge(client: Client) -> None:
        await client.publish("forge", {"text": "no"})

    procs.query(forge)
    browser.goto(procs.dashboard("--read-only") + "/deadletters/forge")
    browser.wait_for("document.querySelector('article.letter')")
    assert "read-only" in browser.text()
    assert (
        browser.evaluate("document.querySelectorAll('form[method=post], #purge-link').length") == 0
    )


def test_a_job_is_looked_up_and_cancelled_from_the_jobs_page(
    procs: Procs, browser: Browser
) -> None:
    procs.worker("w1", "tests.apps:app", "sleepy")

    async def publish(client: Client) -> str:
        return await client.publish("sleepy", {"seconds": 600})  # records once it slept

    message_id = procs.query(publish)

    def state() -> str:
        async def read(client: Client) -> str:
            return (await client.job(message_id)).state

        return procs.query(read)

    wait_for(lambda: state() == "running", 20, "w1 runs the job")
    base = procs.dashboard()
    browser.goto(base + "/")
    browser.click("a[href='/roles/sleepy']")
    browser.wait_for("document.querySelector('#running tbody td:nth-child(2)')")
    assert (
        browser.evaluate("document.querySelector('#running tbody td:nth-child(2)').textContent")
        == "w1"
    )
    browser.goto(base + "/jobs")
    browser.fill("input[name=id]", message_id)
    browser.click("form.inline button")
    browser.wait_for("document.getElementById('job-state').textContent == 'running'")
    browser.click("#cancel-job")

    wait_for(lambda: state() == "cancelled", 20, "the job is cancelled")
    browser.evaluate("location.reload()")
    browser.wait_for("document.getElementById('job-state').textContent == 'cancelled'")
    assert recorded(procs.record) == []  # stopped in its sleep: it never finished


def test_the_overview_shows_a_scheduler_live_and_skips_a_hostile_registry_entry(
    procs: Procs, browser: Browser
) -> None:
    """A scheduler process appears on the open overview with its health and schedules, and
    leaves it when stopped; a forged entry renders as text, a malformed one is skipped with one
    warning in the dashboard's log however many refreshes read it."""

    async def seed(client: Client) -> None:
        hourly = Schedule(id="hourly", role="record", every=3600)
        await scheduler.add(client.redis, client.keys, hourly)
        forged = {
            "consumer": "intruder",
            "host": XSS,
            "pid": 1,
            "version": XSS,
            "started_at_ms": 0,
            "updated_at_ms": now_ms(),
            "schedules": 0,
            "paused": 0,
            "sent": 0,
            "last_pass_ms": None,
            "late_ms": 0,
        }
        entries = {"intruder": json.dumps(forged), "garbage": "[1]", b"\xff": b"{"}
        await client.redis.hset(client.keys.schedulers(), mapping=entries)

    procs.query(seed)
    base = procs.dashboard()
    browser.goto(base + "/")
    browser.evaluate("window.__same_page = true")  # a reload would lose it
    assert "<script>window.__xss=1</script>" in browser.text()
    assert browser.evaluate(NO_SCRIPT_RAN) is True
    assert browser.evaluate("document.querySelectorAll('#schedulers tbody tr').length") == 1
    process, log = procs.start(
        "sched-1", "scheduler", *procs.connection(), "--name", "sched-1", "--poll", "0.1"
    )
    row = "document.querySelector('tr[data-scheduler=\"sched-1\"] [data-field=%s]')"
    browser.wait_for(f"({row % 'health'} || {{}}).textContent == 'live'", timeout=30)
    assert browser.evaluate(f"{row % 'schedules'}.textContent") == "1"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, log.read_text()
    browser.wait_for("!document.querySelector('tr[data-scheduler=\"sched-1\"]')")
    assert browser.evaluate("window.__same_page") is True
    assert browser.evaluate(NO_SCRIPT_RAN) is True
    dashboard_log = procs.tmp / f"dashboard-{base.rsplit(':', 1)[1]}.log"
    warned = dashboard_log.read_text()
    assert warned.count("skipping the malformed scheduler entry garbage") == 1, warned
    assert warned.count("skipping the malformed scheduler entry \\xff") == 1, warned
