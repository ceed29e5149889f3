"""Tasks submitted by XADD (streamflow.dag.submissions): checked, created once, answered by id.

The process tests run a worker and two coordinators as ``streamflow`` subprocesses on a real
redis-server and submit with ``redis-cli``, as a service in another language would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis as redis_sync

from streamflow import Client, connect, streams
from streamflow.dag import graph as graphs
from streamflow.dag import submissions
from streamflow.dag.graph import MAX_DOCUMENT_BYTES
from streamflow.dag.store import TaskStore
from streamflow.dag.submissions import SubmissionResult
from streamflow.dag.tasks import TaskState
from streamflow.functions import BUILTINS
from streamflow.keys import Keys
from streamflow.scripts import Scripts
from tests.helpers import CLI, ROOT, clean_env, wait_for

TASK_APP = "tests.task_apps:app"
LEASE = ("--lease-ttl", "1", "--block-ms", "200")
#: A two-node task of tests.task_apps: ``src`` emits 3 batches of 2, ``step`` doubles each.
GRAPH: dict[str, Any] = {
    "name": "from-cli",
    "nodes": [
        {"id": "src", "role": "src", "params": {"n": 3, "size": 2}},
        {"id": "step", "role": "step"},
    ],
    "edges": [{"from": "src", "to": "step", "on": "batch"}],
}


def submission(graph: Any, **extra: Any) -> str:
    return json.dumps({"protocol": 1, "kind": "submission", "graph": graph, **extra})


# -- parsing, no Redis ------------------------------------------------------------------------


def test_a_valid_submission_parses_with_its_params() -> None:
    parsed, problems = submissions.parse(submission(GRAPH, params={"n": 1}).encode())
    assert problems == []
    assert parsed is not None and parsed.params == {"n": 1}
    assert [n.id for n in parsed.graph.nodes] == ["src", "step"]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (None, "the entry has no 'submission' field"),
        (b"{not json", "not valid JSON"),
        (b'{"protocol":1,"protocol":1}', "has the key 'protocol' twice"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "a submission is a JSON object"),
        (b'{"protocol":1,"kind":"submission"}', "graph: Field required"),
        (b"x" * (MAX_DOCUMENT_BYTES + 70_000), "over"),
    ],
)
def test_malformed_submissions_are_refused_with_a_problem(raw: bytes | None, problem: str) -> None:
    parsed, problems = submissions.parse(raw)
    assert parsed is None
    assert len(problems) == 1 and problem in problems[0], problems


def test_a_graph_past_the_array_limit_of_untrusted_json_is_refused_before_it_is_read() -> None:
    edges = [{"from": "a", "to": "b"}] * 10_001
    parsed, problems = submissions.parse(submission({"nodes": [], "edges": edges}).encode())
    assert parsed is None
    assert problems == ["the submission holds a list of 10001 items, limit 10000"]


def test_every_problem_of_the_envelope_and_the_graph_is_listed() -> None:
    doc = submission(
        {"nodes": [{"id": "a b", "role": "src"}], "extra": 1},
        protocol=2,
        kind="job",
        params=[1],
        id="x",
    )
    parsed, problems = submissions.parse(doc.encode())
    assert parsed is None
    text = "\n".join(problems)
    for part in ("protocol", "kind", "params", "id: Extra inputs", "graph: node 'a b'.id"):
        assert part in text, problems
    assert "graph: extra" in text, problems


def test_the_schema_lists_the_submission_and_its_result() -> None:
    schemas = submissions.json_schemas()
    assert schemas["submission"]["required"] == ["protocol", "kind", "graph"]
    assert schemas["submission"]["additionalProperties"] is False
    assert set(schemas["submission_result"]["properties"]["state"]["enum"]) == {
        "accepted",
        "rejected",
    }


# -- processes ---------------------------------------------------------------------------------


@dataclass
class System:
    """A worker and two coordinators of one namespace, and a way to XADD with redis-cli."""

    redis_url: str
    namespace: str
    logs: list[Path]
    redis: redis_sync.Redis

    def xadd(self, *fields: str) -> str:
        """XADD to the submissions stream with redis-cli; returns the entry id."""
        stream = f"{self.namespace}:{{tasks}}:submissions"
        done = subprocess.run(
            ["redis-cli", "-u", self.redis_url, "XADD", stream, "*", *fields],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert done.stdout.strip() and "ERR" not in done.stdout, done.stdout
        return done.stdout.strip()

    def result(self, submission_id: str, timeout: float = 30) -> SubmissionResult:
        key = Keys(self.namespace).submission(submission_id)
        wait_for(lambda: self.redis.exists(key), timeout, f"the outcome of {submission_id}")
        return submissions.decode_result(self.redis.get(key))  # type: ignore[arg-type]

    def task_state(self, task_id: str) -> str:
        raw: Any = self.redis.hget(Keys(self.namespace).task_state(task_id), "task")
        return str(orjson.loads(raw)["state"]) if raw else "unknown"

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs)


@pytest.fixture
def system(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[System]:
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is not on PATH (apt-get install redis-tools)")
    connection = ["--redis-url", redis_url, "--namespace", namespace]
    env = clean_env(SFTEST_RECORD=str(tmp_path / "record.txt"))
    commands = {
        "worker": [*CLI, "worker", "--app", TASK_APP, *connection, "--consumer-name", "w1"],
        "coord-a": [*CLI, "coordinator", *connection, "--consumer-name", "coord-a"],
        "coord-b": [*CLI, "coordinator", *connection, "--consumer-name", "coord-b"],
    }
    processes, logs = [], []
    for name, command in commands.items():
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as err:
            processes.append(
                subprocess.Popen(
                    [*command, *LEASE], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err
                )
            )
        logs.append(log)
    client = redis_sync.Redis.from_url(redis_url)
    # The graph check needs the roles registered: the worker registers them as it starts.
    roles = Keys(namespace).known_roles()
    wait_for(lambda: client.sismember(roles, "step"), 30, "the worker registers its roles")
    try:
        yield System(redis_url, namespace, logs, client)
    finally:
        for process in processes:
            alive = process.poll() is None
            process.kill()
            process.wait(timeout=10)
            assert alive, "a process exited before the end of the test"
        client.close()
        assert "Traceback" not in "".join(p.read_text(errors="replace") for p in logs)


def lifecycle(system: System) -> list[dict[str, Any]]:
    """Every lifecycle event the stream holds (after a wait for the buffered ones)."""
    stream = Keys(system.namespace).lifecycle()
    wait_for(lambda: system.redis.xlen(stream) > 0, 10, "lifecycle events written")
    entries: Any = system.redis.xrange(stream)
    return [event for _, fields in entries for event in orjson.loads(fields[b"events"])]


def src_runs(system: System, task_id: str) -> int:
    record = Path(system.logs[0]).parent / "record.txt"
    lines = record.read_text().splitlines() if record.exists() else []
    return sum(1 for line in lines if line.split()[:3] == ["START", task_id, "src"])


@pytest.mark.slow
@pytest.mark.redis
def test_a_task_submitted_with_redis_cli_runs_once_even_when_the_xadd_is_repeated(
    system: System,
) -> None:
    first = system.xadd("id", "cli-1", "submission", submission(GRAPH))
    # A retried XADD (its reply was lost): the other coordinator may well take this one.
    system.xadd("id", "cli-1", "submission", submission(GRAPH))
    result = system.result("cli-1")
    assert (result.state, result.problems, result.id) == ("accepted", [], "cli-1")
    wait_for(lambda: system.task_state("cli-1") == "succeeded", 30, "the task succeeds")
    assert src_runs(system, "cli-1") == 1
    told = [e for e in lifecycle(system) if e["type"] == "task" and e["state"] == "queued"]
    # Told at least once (the coordinator that lost a race to create it may tell it too).
    assert {e["task_id"] for e in told} == {"cli-1"}
    # The first outcome stands: answered once, about the entry that created the task.
    wait_for(lambda: system.redis.xlen(f"{system.namespace}:{{tasks}}:submissions") == 0, 10, "")
    assert system.result("cli-1").entry_id in (first, result.entry_id)
    assert system.result("cli-1") == result
    assert system.redis.zcard(Keys(system.namespace).tasks_index()) == 1


@pytest.mark.slow
@pytest.mark.redis
def test_an_invalid_submission_is_rejected_with_every_problem_readable_by_id(
    system: System,
) -> None:
    graph = {
        "nodes": [
            {"id": "src", "role": "src"},
            {"id": "loop", "role": "nobody-serves-this"},
            {"id": "fn", "function": "no.such.function"},
        ],
        "edges": [
            {"from": "src", "to": "loop"},
            {"from": "loop", "to": "src"},
            {"from": "src", "to": "ghost"},
        ],
    }
    system.xadd("id", "bad-1", "submission", submission(graph))
    system.xadd("id", "bad-json", "submission", "{nope")
    result = system.result("bad-1")
    assert result.state == "rejected"
    text = "\n".join(result.problems)
    for part in ("nobody-serves-this", "no.such.function", "ghost", "cycle"):
        assert part in text, result.problems
    assert "not valid JSON" in system.result("bad-json").problems[0]
    assert system.task_state("bad-1") == "unknown"  # nothing was created
    # Also told to subscribers of the lifecycle events, with the problems.
    told = {e["task_id"]: e for e in lifecycle(system) if e["type"] == "task"}
    assert told["bad-1"]["state"] == "rejected" and "ghost" in told["bad-1"]["detail"]
    assert system.redis.zcard(Keys(system.namespace).tasks_index()) == 0


@pytest.mark.slow
@pytest.mark.redis
def test_hostile_entries_never_forge_a_log_line_nor_stop_a_coordinator(system: System) -> None:
    system.xadd("id", "x\nFORGED by the id", "submission", submission(GRAPH))
    system.xadd("submission", submission(GRAPH))  # no id at all
    hostile = {"nodes": [{"id": "ok", "role": "src\nFORGED by a role"}]}
    system.xadd("id", "hostile-1", "submission", submission(hostile))
    assert system.result("hostile-1").state == "rejected"
    # Still serving: a valid one after them runs.
    system.xadd("id", "after-1", "submission", submission(GRAPH))
    assert system.result("after-1").state == "accepted"
    wait_for(lambda: system.task_state("after-1") == "succeeded", 30, "the task succeeds")
    wait_for(lambda: "no valid 'id' field" in system.log_text(), 10, "the dropped entries logged")
    assert not any(line.startswith("FORGED") for line in system.log_text().splitlines())


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.anyio
async def test_an_id_in_use_is_refused_and_a_first_outcome_stands(
    system: System, redis_url: str, namespace: str
) -> None:
    async with Client.from_url(redis_url, namespace=namespace) as client:
        await client.submit(GRAPH, task_id="py-1")
        assert await client.submission("py-1") is None  # submitted from Python: no outcome
        other = {**GRAPH, "name": "another"}
        system.xadd("id", "py-1", "submission", submission(other))
        refused = system.result("py-1")
        assert refused.state == "rejected"
        assert refused.problems == ["task id 'py-1' is in use by another task"]
        # Accepted, then the id sent again with an invalid graph: the acceptance stands.
        system.xadd("id", "twice", "submission", submission(GRAPH))
        accepted = system.result("twice")
        system.xadd("id", "twice", "submission", "{nope")
        stream = f"{namespace}:{{tasks}}:submissions"
        wait_for(lambda: system.redis.xlen(stream) == 0, 10, "every entry taken")
        assert await client.submission("twice") == accepted
        assert (await client.wait("twice", timeout=30)).state == "succeeded"


# -- two coordinators, in this process ---------------------------------------------------------


def taker(redis: Any, namespace: str, name: str) -> submissions.Submissions:
    """The submissions side of one coordinator (its own store and caches)."""
    keys = Keys(namespace)
    store = TaskStore(redis, keys, Scripts(redis))
    return submissions.Submissions(redis, keys, store, functions=set(BUILTINS), consumer=name)


def entry(entry_id: str, submission_id: str, document: str) -> streams.Entry:
    return streams.Entry(
        entry_id.encode(), {b"id": submission_id.encode(), b"submission": document.encode()}
    )


@pytest.mark.redis
@pytest.mark.anyio
async def test_two_coordinators_taking_one_id_at_once_create_the_task_once(
    redis_url: str, namespace: str
) -> None:
    redis = connect.connect(redis_url)
    try:
        await redis.sadd(Keys(namespace).known_roles(), "src", "step")
        a, b = taker(redis, namespace, "coord-a"), taker(redis, namespace, "coord-b")
        for round_ in range(5):
            task_id = f"race-{round_}"
            other = submission({**GRAPH, "name": "other"})
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.take, entry("1-0", task_id, submission(GRAPH)))
                tg.start_soon(b.take, entry("2-0", task_id, other))
            raw = await redis.get(Keys(namespace).submission(task_id))
            result = submissions.decode_result(raw)
            task = await Client(redis, namespace=namespace).task(task_id)
            assert result.state == "accepted", result
            # The outcome names the entry whose graph the task holds.
            assert task is not None
            assert task.name == ("from-cli" if result.entry_id == "1-0" else "other")
        assert await redis.zcard(Keys(namespace).tasks_index()) == 5
        counts = [a.statistics(), b.statistics()]
        assert sum(c["accepted"] for c in counts) >= 5
        assert sum(c["rejected"] + c["accepted"] + c["duplicate"] for c in counts) >= 10
    finally:
        await redis.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_take_cut_short_after_creating_the_task_is_answered_when_taken_again(
    redis_url: str, namespace: str
) -> None:
    redis = connect.connect(redis_url)
    try:
        await redis.sadd(Keys(namespace).known_roles(), "src", "step")
        spec = graphs.parse(GRAPH)
        # The first coordinator created the task and died before it wrote the outcome.
        store = TaskStore(redis, Keys(namespace), Scripts(redis))
        await store.create(spec, TaskState.new("cut-1", spec, 1))
        await taker(redis, namespace, "coord-b").take(entry("1-0", "cut-1", submission(GRAPH)))
        result = submissions.decode_result(await redis.get(Keys(namespace).submission("cut-1")))
        assert (result.state, result.coordinator) == ("accepted", "coord-b")
        assert await redis.zcard(Keys(namespace).tasks_index()) == 1
    finally:
        await redis.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_submission_that_fails_in_redis_is_rejected_and_the_next_one_is_taken(
    redis_url: str, namespace: str
) -> None:
    redis = connect.connect(redis_url)
    keys = Keys(namespace)
    try:
        await redis.sadd(keys.known_roles(), "src", "step")
        # Written by hand: a string where the task's state hash would go.
        await redis.set(keys.task_state("wrong-1"), "not a hash")
        coordinator = taker(redis, namespace, "coord-a")
        await coordinator.take(entry("1-0", "wrong-1", submission(GRAPH)))
        await coordinator.take(entry("2-0", "fine-1", submission(GRAPH)))
        failed = submissions.decode_result(await redis.get(keys.submission("wrong-1")))
        assert failed.state == "rejected"
        assert failed.problems[0].startswith("the coordinator failed:"), failed.problems
        fine = submissions.decode_result(await redis.get(keys.submission("fine-1")))
        assert fine.state == "accepted"
    finally:
        await redis.aclose()
