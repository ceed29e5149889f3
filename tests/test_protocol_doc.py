"""docs/protocol.md's raw XADD examples, run against a real worker: each has its documented effect.

A console block of the page preceded by ``<!-- protocol-example: ID=OUTCOME ... -->`` holds
``$ redis-cli XADD ...`` lines; OUTCOME is ``handled:N`` (the handler ran, the last time at
attempt N) or ``dead:REASON`` (dead-lettered with that reason). Every raw XADD of a job on the
page must be in such a block, so an example cannot drift from what a worker does.

A console block preceded by ``<!-- protocol-submission-example: ID=OUTCOME ... -->`` holds
``$ redis-cli XADD 'sf:{tasks}:submissions' ...`` lines; OUTCOME is ``accepted`` (the task then
succeeds) or ``rejected``, and the outcomes the page prints are those a coordinator writes.

A console block preceded by ``<!-- protocol-cancel-example: TARGET ID -->`` sends a cancel by
hand: its commands run as one bash script (with ``redis-cli`` pointed at the test's server, from
the repository root), then each command followed by output lines runs again until it prints
them. A message cancelled while its handler runs is stopped and reported; a task cancelled
before its job is read never starts it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_sync

from streamflow.ops.server import RedisServer
from streamflow.records import LifecycleEvent, decode_lifecycle
from tests.helpers import ROOT, clean_env, recorded, wait_for
from tests.processes import Command, Shell

pytestmark = pytest.mark.slow

PAGE = ROOT / "docs" / "protocol.md"
MARKER = re.compile(r"<!-- protocol-example: (.+?) -->\n```console\n(.*?)```", re.S)
#: A raw publish of a job: XADD to a role stream.
XADD = re.compile(r"\$ redis-cli XADD 'sf:\{role:[^}]+\}:stream' ")
SUBMISSION = re.compile(r"<!-- protocol-submission-example: (.+?) -->\n```console\n(.*?)```", re.S)
#: A raw task submission: XADD to the submissions stream.
SUBMIT = re.compile(r"\$ redis-cli XADD 'sf:\{tasks\}:submissions' ")
#: An outcome the page prints: the GET and the JSON it shows.
OUTCOME = re.compile(r"^\$ redis-cli --raw GET 'sf:\{tasks\}:submission:([^']+)'\n(.*)$", re.M)
#: A console block of the page that reads the lifecycle events: ``ID=TYPE,TYPE,...``.
EVENTS = re.compile(r"<!-- protocol-events-example: (\S+)=(\S+) -->\n```console\n(.*?)```", re.S)
CANCEL = re.compile(
    r"<!-- protocol-cancel-example: (task|message) (\S+) -->\n```console\n(.*?)```", re.S
)


@dataclass(frozen=True)
class Example:
    """One marked block: the redis-cli commands and the outcome expected per message id."""

    commands: list[list[str]]
    outcomes: dict[str, str]


def examples(text: str) -> list[Example]:
    found = []
    for marker, block in MARKER.findall(text):
        outcomes = dict(item.split("=", 1) for item in marker.split())
        lines = [line for line in block.splitlines() if XADD.match(line)]
        found.append(Example([shlex.split(line)[2:] for line in lines], outcomes))
    return found


def submission_examples(text: str) -> list[Example]:
    found = []
    for marker, block in SUBMISSION.findall(text):
        outcomes = dict(item.split("=", 1) for item in marker.split())
        lines = [line for line in block.splitlines() if SUBMIT.match(line)]
        found.append(Example([shlex.split(line)[2:] for line in lines], outcomes))
    return found


def test_every_raw_submission_on_the_page_is_a_checked_example() -> None:
    text = PAGE.read_text()
    marked = sum(len(e.commands) for e in submission_examples(text))
    assert marked == sum(bool(SUBMIT.match(line)) for line in text.splitlines())
    assert marked >= 2
    assert {i for i, _ in OUTCOME.findall(text)} == {
        i for e in submission_examples(text) for i in e.outcomes
    }


def console_commands(block: str) -> list[Command]:
    """The ``$`` commands of a console block (``\\`` continues a line) and their output lines."""
    commands: list[Command] = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("$ "):
            commands.append(Command(" ".join(line[2:].split(" ")).strip()))
        elif commands:
            commands[-1].shown.append(line)
    return commands


def test_every_raw_xadd_of_a_job_on_the_page_is_a_checked_example() -> None:
    text = PAGE.read_text()
    marked = sum(len(e.commands) for e in examples(text))
    assert marked == sum(bool(XADD.match(line)) for line in text.splitlines())
    assert marked >= 4


def code_lines(script: str) -> list[str]:
    """A Lua script without its comments, blank lines and ``#!lua`` line."""
    lines = (line.rstrip() for line in script.splitlines())
    return [x for x in lines if x and x != "#!lua" and not x.lstrip().startswith("--")]


def test_every_script_listed_on_the_page_is_the_one_that_ships() -> None:
    """Each listing is a whole shipped script, or a whole function of the fence prelude."""
    lua = ROOT / "streamflow" / "lua"
    shipped = [code_lines(p.read_text()) for p in lua.glob("*.lua") if p.name != "fence.lua"]
    fence = code_lines((lua / "fence.lua").read_text())
    listed = re.findall(r"```lua\n(.*?)```", PAGE.read_text(), re.S)
    assert len(listed) >= 5
    for script in listed:
        lines = code_lines(script)
        assert lines in shipped or _function_of(lines, fence), script


def _function_of(lines: list[str], fence: list[str]) -> bool:
    """Whether ``lines`` is one whole ``local function`` of the fence, as it ships."""
    if not lines or not lines[0].startswith("local function "):
        return False
    start = fence.index(lines[0]) if lines[0] in fence else -1
    return start >= 0 and fence[start : start + len(lines)] == lines and lines[-1] == "end"


def test_both_ways_of_sending_a_cancel_are_checked_examples() -> None:
    assert [(t, i) for t, i, _ in CANCEL.findall(PAGE.read_text())] == [
        ("task", "report-7"),
        ("message", "slow-2"),
    ]


@pytest.fixture
def worker(
    private_redis: Callable[..., RedisServer], tmp_path: Path
) -> Iterator[tuple[redis_sync.Redis, Path, Callable[[], None]]]:
    """A private Redis (namespace ``sf``, as on the page), and a starter of the page's worker."""
    server = private_redis()
    record = tmp_path / "record.txt"
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        argv = [sys.executable, "-m", "streamflow", "worker", "--app", "tests.doc_apps:app"]
        argv += ["--redis-url", server.url, "--namespace", "sf", "--consumer-name", "worker-1"]
        log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed with the process
        processes.append(
            subprocess.Popen(argv, cwd=ROOT, env=clean_env(SFTEST_RECORD=str(record)), stderr=log)
        )
        log.close()

    client = redis_sync.Redis.from_url(server.url)
    yield client, record, start
    for process in processes:
        process.kill()
        process.wait(timeout=30)
    client.close()


def test_the_pages_xadd_examples_have_their_documented_effect(
    worker: tuple[redis_sync.Redis, Path, Callable[[], None]],
) -> None:
    client, record, start = worker
    expected: dict[str, str] = {}
    for example in examples(PAGE.read_text()):
        for command in example.commands:
            client.execute_command(*command)
        expected.update(example.outcomes)
    start()
    handled = {k: v.split(":")[1] for k, v in expected.items() if v.startswith("handled:")}
    dead = {k: v.split(":")[1] for k, v in expected.items() if v.startswith("dead:")}

    def settled() -> bool:
        done = {line.split()[0]: line.split()[1] for line in recorded(record)}
        return (
            all(done.get(k) == n for k, n in handled.items())
            and client.xlen("sf:{role:resize}:dead") >= len(dead)
            and client.xlen("sf:{role:resize}:stream") == 0
            and client.zcard("sf:{role:resize}:delayed") == 0
        )

    wait_for(settled, 120, "every example settled")
    letters = {}
    for _, fields in client.xrange("sf:{role:resize}:dead"):
        letter = orjson.loads(fields[b"dead_letter"])
        # A job that did not decode has no message_id: its id is read from the raw copy.
        raw_id = re.search(rb'"id":"([^"]+)"', fields[b"raw:message"])
        letters[letter.get("message_id") or (raw_id and raw_id[1].decode())] = letter
    assert {k: v["reason"] for k, v in letters.items()} == dead
    assert client.xpending("sf:{role:resize}:stream", "workers")["pending"] == 0
    assert "has the key 'width' twice" in letters["dup-1"]["detail"]
    assert "headers.correlation id.[key]" in letters["badheader-1"]["detail"]
    # A handled example's headers reached the handler (ctx.headers), as the page sent them.
    sent = {
        doc["id"]: doc["headers"]
        for example in examples(PAGE.read_text())
        for doc in (orjson.loads(command[-1]) for command in example.commands)
        if "headers" in doc and doc["id"] in handled
    }
    assert sent
    got = {line.split()[0]: line.split()[2] for line in recorded(record) if len(line.split()) > 2}
    assert {k: orjson.loads(got[k]) for k in sent} == sent
    # The dead letter the page prints is the one the worker writes (but for times and ids).
    shown = orjson.loads(re.findall(r"^dead_letter\n(.*)$", PAGE.read_text(), re.M)[0])
    written = letters[shown["message_id"]]
    volatile = {"entry_id", "dead_at_ms"}
    assert {k: v for k, v in written.items() if k not in volatile} == {
        k: v for k, v in shown.items() if k not in volatile
    }


def job(message_id: str, image: str, task_id: str | None = None) -> str:
    """A job's JSON, as the page writes them."""
    doc = {"protocol": 1, "kind": "job", "id": message_id, "role": "resize"}
    doc |= {"payload": {"image": image, "width": 1}, "created_at_ms": 1795327855701}
    return orjson.dumps(doc | ({"task_id": task_id} if task_id else {})).decode()


def test_the_pages_cancels_stop_a_running_job_and_refuse_a_later_one(
    worker: tuple[redis_sync.Redis, Path, Callable[[], None]], tmp_path: Path
) -> None:
    client, record, start = worker
    shell = Shell(ROOT, tmp_path, _url(client))
    examples = {(t, i): block for t, i, block in CANCEL.findall(PAGE.read_text())}
    stream = "sf:{role:resize}:stream"

    # A task cancelled before any worker runs: the worker that starts later finds the marker
    # through the index (the signal was sent before it listened) and never starts the job.
    run_block(shell, examples[("task", "report-7")])
    client.xadd(stream, {"message": job("report-7.a", "cat.png", task_id="report-7")})
    client.xadd(stream, {"message": job("after", "cat.png")})  # runs: the worker went past
    start()
    wait_for(lambda: "after 1" in recorded(record), 60, "the job after it runs")
    wait_for(lambda: client.xlen(stream) == 0, 60, "everything settled")
    assert not any(line.startswith("report-7.a") for line in recorded(record))

    # A message cancelled while its handler runs: stopped, reported, acknowledged as cancelled.
    client.xadd(stream, {"message": job("slow-2", "slow.png")})
    wait_for(lambda: "slow-2 1" in recorded(record), 60, "slow-2 starts")
    run_block(shell, examples[("message", "slow-2")])
    wait_for(lambda: "slow-2 end" in recorded(record), 60, "slow-2 stops")
    wait_for(lambda: client.xlen(stream) == 0, 60, "slow-2 settled")
    assert client.xlen("sf:{role:resize}:dead") == 0  # cancelled, not dead-lettered


def _url(client: redis_sync.Redis) -> str:
    kwargs = client.get_connection_kwargs()
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


def run_block(shell: Shell, block: str) -> None:
    """All of a block's commands as one script, then each one that shows output until it does."""
    commands = console_commands(block)
    shell.run(Command("\n".join(c.line for c in commands)), once=True)
    for command in commands:
        if command.shown:
            shell.run(command)


def test_the_pages_submissions_are_answered_as_shown_and_the_accepted_one_runs(
    worker: tuple[redis_sync.Redis, Path, Callable[[], None]], tmp_path: Path
) -> None:
    client, _, start = worker
    start()  # the graph check needs the role registered: the worker does it as it starts
    wait_for(lambda: client.sismember("sf:{tasks}:roles", "resize"), 60, "role resize registered")
    argv = [sys.executable, "-m", "streamflow", "coordinator", "--redis-url", _url(client)]
    argv += ["--namespace", "sf", "--consumer-name", "coord-1", "--block-ms", "200"]
    with open(tmp_path / "coordinator.log", "wb") as log:
        coordinator = subprocess.Popen(argv, cwd=ROOT, env=clean_env(), stderr=log)
    try:
        expected: dict[str, str] = {}
        for example in submission_examples(PAGE.read_text()):
            for command in example.commands:
                client.execute_command(*command)
            expected.update(example.outcomes)
        written = {}
        for submission_id, state in expected.items():
            key = f"sf:{{tasks}}:submission:{submission_id}"
            wait_for(lambda key=key: client.exists(key), 60, f"the outcome of {submission_id}")
            written[submission_id] = orjson.loads(client.get(key))  # type: ignore[arg-type]
            assert written[submission_id]["state"] == state
            if state == "accepted":
                task = f"sf:{{task:{submission_id}}}:state"

                def succeeded(task: str = task) -> bool:
                    raw: Any = client.hget(task, "task")
                    return raw is not None and orjson.loads(raw)["state"] == "succeeded"

                wait_for(succeeded, 60, f"task {submission_id} succeeds")
        volatile = {"entry_id", "at_ms"}
        for submission_id, raw in OUTCOME.findall(PAGE.read_text()):
            shown = orjson.loads(raw)
            assert {k: v for k, v in shown.items() if k not in volatile} == {
                k: v for k, v in written[submission_id].items() if k not in volatile
            }
    finally:
        coordinator.kill()
        coordinator.wait(timeout=30)


def test_the_pages_xread_of_lifecycle_events_shows_the_jobs_events(
    worker: tuple[redis_sync.Redis, Path, Callable[[], None]],
) -> None:
    """The page's XREAD, run as written after its job ran, returns that job's events."""
    client, record, start = worker
    ((message_id, types, block),) = EVENTS.findall(PAGE.read_text())
    (publish,) = [e for e in examples(PAGE.read_text()) if message_id in e.outcomes]
    for command in publish.commands:
        client.execute_command(*command)
    start()
    wait_for(lambda: f"{message_id} 1" in recorded(record), 60, "the job runs")
    (xread,) = [shlex.split(c.line)[1:] for c in console_commands(block)]
    assert xread[0] == "XREAD"

    def seen() -> list[LifecycleEvent]:
        reply = client.execute_command(*xread) or []
        # RESP2 replies per stream: [name, [[id, fields], ...]] (fields a dict or a flat list).
        entries = [entry for _, stream_entries in reply for entry in stream_entries]
        found = []
        for _, fields in entries:
            flat = (
                fields
                if isinstance(fields, dict)
                else dict(zip(fields[::2], fields[1::2], strict=True))
            )
            events, problems = decode_lifecycle(flat)  # one or more events per entry
            assert not problems
            for event in events:
                if event.message_id == message_id:
                    found.append(event)
        return found

    wait_for(lambda: len(seen()) >= len(types.split(",")), 30, "the job's events")
    assert [e.type for e in seen()] == types.split(",")
    assert {e.role for e in seen()} == {"resize"} and seen()[0].consumer == "worker-1"
