"""OpenTelemetry (streamflow.otel): one trace from the publisher through handlers, follow-ups,
retries, dead letters and every node of a task, in-process and across OS processes; trace ids
in log lines; the extra; the documented example.

Spans go to the SDK's in-memory exporter (in-process) or to a file (a worker subprocess, see
tests/otel_apps.py). On a real redis-server.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import streamflow
from streamflow import logs
from streamflow.connect import connect
from streamflow.dag.coordinator import Coordinator
from streamflow.dag.outbox import JobItem, decode_item, encode_item, node_job_id
from streamflow.dag.tracing import Causes, carrier_of
from streamflow.errors import MissingExtraError
from streamflow.followups import child_task_id
from streamflow.otel import OpenTelemetry, trace_headers
from streamflow.protocol import Job, encode
from streamflow.records import TaskEvent
from streamflow.testing import Harness
from tests.helpers import CLI, ROOT, clean_env, wait_for
from tests.otel_apps import describe, fulfilment, read_spans, traced_app

DOCS = ROOT / "docs" / "concepts.md"


class Traced:
    """An in-memory exporter, its provider, and a tracing middleware writing to it."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracing = OpenTelemetry(tracer_provider=self.provider)
        self.tracer = self.provider.get_tracer("tests")

    def spans(self) -> list[dict[str, Any]]:
        return [describe(span) for span in self.exporter.get_finished_spans()]

    def named(self) -> dict[str, dict[str, Any]]:
        """The finished spans by name (each name once)."""
        spans = self.spans()
        by_name = {span["name"]: span for span in spans}
        assert len(by_name) == len(spans), [span["name"] for span in spans]
        return by_name


@pytest.fixture
def traced() -> Iterator[Traced]:
    traced = Traced()
    yield traced
    traced.provider.shutdown()


def assert_chain(spans: dict[str, dict[str, Any]], chain: list[str]) -> None:
    """Each span of ``chain`` is the child of the one before it, all in one trace."""
    for parent, child in itertools.pairwise(chain):
        assert spans[child]["parent"] == spans[parent]["span_id"], (parent, child)
    assert {spans[name]["trace_id"] for name in chain} == {spans[chain[0]]["trace_id"]}


@pytest.mark.anyio
async def test_publish_handler_follow_up_and_its_handler_form_one_trace(
    redis_url: str, traced: Traced
) -> None:
    async with Harness(traced_app(traced.tracing), redis_url=redis_url) as h:
        h.client.add_middleware(traced.tracing)
        with traced.tracer.start_as_current_span("request"):
            message_id = await h.publish("first", 1)
        with anyio.fail_after(20):
            await h.drain()
    spans = traced.named()
    chain = ["request", "send first", "process first", "send second", "process second"]
    assert sorted(spans) == sorted(chain)
    assert_chain(spans, chain)
    assert [spans[name]["kind"] for name in chain] == [
        "INTERNAL",
        "PRODUCER",
        "CONSUMER",
        "PRODUCER",
        "CONSUMER",
    ]
    send, process = spans["send first"]["attributes"], spans["process first"]["attributes"]
    assert send == {
        "messaging.system": "streamflow",
        "messaging.destination.name": "first",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.message.id": message_id,
    }
    assert process["messaging.message.id"] == message_id
    assert process["messaging.destination.name"] == "first"
    assert process["messaging.operation.type"] == "process"
    assert process["streamflow.attempt"] == 1
    assert "streamflow.task_id" not in process


@pytest.mark.anyio
async def test_publish_many_and_a_sync_client_send_each_job_in_a_producer_span(
    redis_url: str, traced: Traced
) -> None:
    async with Harness(traced_app(traced.tracing), redis_url=redis_url) as h:
        h.client.add_middleware(traced.tracing)
        with traced.tracer.start_as_current_span("request"):
            ids = await h.client.publish_many("second", [1, 2])
            with streamflow.SyncClient(redis_url, namespace=h.namespace) as sync:
                sync.add_middleware(traced.tracing)
                ids.append(sync.publish("second", 3))
                ids += sync.publish_many("second", [4])
        with anyio.fail_after(20):
            await h.drain()
    spans = traced.spans()
    [request] = [span for span in spans if span["name"] == "request"]
    sends = {
        span["attributes"]["messaging.message.id"]: span
        for span in spans
        if span["name"] == "send second"
    }
    runs = {
        span["attributes"]["messaging.message.id"]: span
        for span in spans
        if span["name"] == "process second"
    }
    assert sorted(sends) == sorted(runs) == sorted(ids)
    for message_id in ids:
        assert sends[message_id]["kind"] == "PRODUCER"
        assert sends[message_id]["parent"] == request["span_id"]
        assert runs[message_id]["parent"] == sends[message_id]["span_id"]
    assert len({span["trace_id"] for span in spans}) == 1


@pytest.mark.anyio
async def test_a_retry_and_a_dead_letter_are_children_of_the_failed_runs(
    redis_url: str, traced: Traced
) -> None:
    async with Harness(traced_app(traced.tracing), redis_url=redis_url) as h:
        h.client.add_middleware(traced.tracing)
        await h.publish("fail", 3)
        with anyio.fail_after(20):
            await h.drain()
    spans = traced.spans()
    runs = [span for span in spans if span["name"] == "process fail"]
    [retry] = [span for span in spans if span["name"] == "retry fail"]
    [dead] = [span for span in spans if span["name"] == "dead_letter fail"]
    first, second = sorted(runs, key=lambda span: span["attributes"]["streamflow.attempt"])
    assert retry["parent"] == first["span_id"]
    assert dead["parent"] == second["span_id"]
    assert retry["attributes"]["streamflow.retry.delay"] == 0
    assert dead["attributes"]["streamflow.dead_letter.reason"] == "failed"
    assert dead["attributes"]["streamflow.detail"] == "attempt 2 of 2 failed: no 3"
    assert len({span["trace_id"] for span in spans}) == 1
    [error] = traced.exporter.get_finished_spans()[1].events  # the first run's, recorded
    assert error.name == "exception"


def by_node(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Spans by name and node (``"process step@pick"``; a step's with its event type,
    ``"step pick@pick:done"``), each once; others by name."""
    out: dict[str, dict[str, Any]] = {}
    for span in spans:
        attributes = span["attributes"]
        node = attributes.get("streamflow.node_id")
        name = f"{span['name']}@{node}" if node else span["name"]
        if "streamflow.event.type" in attributes:
            name += ":" + attributes["streamflow.event.type"]
        assert name not in out, name
        out[name] = span
    return out


#: The fulfilment task's chain (tests/otel_apps.py): each span the child of the one before.
FULFILMENT = [
    "dispatch step@pick",
    "process step@pick",
    "step pick@pick:batch",
    "dispatch step@pack",
    "process step@pack",
    "step pack@pack:done",
    "dispatch step@ship",
    "process step@ship",
]


def check_fulfilment(spans: dict[str, dict[str, Any]], task_id: str) -> None:
    """The coordinator's spans of the fulfilment task, and the runs they lead to."""
    assert [spans[name]["kind"] for name in FULFILMENT[:3]] == ["PRODUCER", "CONSUMER", "INTERNAL"]
    step = spans["step pick@pick:batch"]["attributes"]
    assert step["streamflow.batch.seq"] == 0 and step["streamflow.task_id"] == task_id
    assert spans["step pick@pick:done"]["parent"] == spans["process step@pick"]["span_id"]
    dispatch = spans["dispatch step@ship"]["attributes"]
    assert dispatch["messaging.destination.name"] == "step"
    assert dispatch["messaging.message.id"] == f"{task_id}.ship.0"
    assert spans["process step@ship"]["attributes"]["messaging.message.id"] == f"{task_id}.ship.0"


@pytest.mark.anyio
async def test_a_tasks_successors_hang_from_the_coordinators_step_and_dispatch_spans(
    redis_url: str, traced: Traced
) -> None:
    async with Harness(traced_app(traced.tracing), redis_url=redis_url) as h:
        h.client.add_middleware(traced.tracing)  # the submit too
        with traced.tracer.start_as_current_span("request"), anyio.fail_after(30):
            run = await h.run_task(fulfilment(), headers={"tenant": "t-1"})
    assert run.state.state == "succeeded"
    spans = by_node(traced.spans())
    assert_chain(spans, ["request", "submit fulfil", *FULFILMENT])
    check_fulfilment(spans, run.task_id)
    assert spans["submit fulfil"]["attributes"]["streamflow.task_id"] == run.task_id
    assert len({span["trace_id"] for span in spans.values()}) == 1


@pytest.mark.anyio
async def test_a_task_submitted_with_trace_headers_continues_the_callers_span(
    redis_url: str, traced: Traced
) -> None:
    async with Harness(traced_app(traced.tracing), redis_url=redis_url) as h:
        # No client middleware: the task's headers carry the request's context.
        with traced.tracer.start_as_current_span("request"), anyio.fail_after(30):
            run = await h.run_task(fulfilment(), headers=trace_headers({"tenant": "t-1"}))
    assert run.state.state == "succeeded"
    spans = by_node(traced.spans())
    assert_chain(spans, ["request", *FULFILMENT])


async def run_until_done(h: Harness, coordinator: Coordinator, task_id: str) -> None:
    """Workers and the coordinator take turns until the task exists and has ended."""
    while True:
        await h.drain()
        await coordinator.drain()
        task = await h.client.task(task_id)
        if task is not None and task.terminal:
            assert task.state == "succeeded"
            return
        await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_a_task_a_handler_submits_is_the_child_of_the_handlers_span(
    redis_url: str, traced: Traced
) -> None:
    app = traced_app(traced.tracing)
    async with Harness(app, redis_url=redis_url) as h:
        h.client.add_middleware(traced.tracing)
        coordinator = Coordinator(h.redis, app=app, namespace=h.namespace)
        with traced.tracer.start_as_current_span("request"):
            message_id = await h.publish("order", 7)
        task_id = child_task_id(message_id, "submit#0")  # ctx.submit's first call
        with anyio.fail_after(30):
            await run_until_done(h, coordinator, task_id)
    spans = by_node(traced.spans())
    chain = ["request", "send order", "process order", "submit fulfil", *FULFILMENT]
    assert_chain(spans, chain)
    check_fulfilment(spans, task_id)


@pytest.mark.anyio
async def test_a_coordinator_without_the_middleware_passes_the_tasks_context_on(
    redis_url: str, traced: Traced
) -> None:
    async with Harness(traced_app(traced.tracing), redis_url=redis_url) as h:
        h.client.add_middleware(traced.tracing)
        untraced = Coordinator(h.redis, namespace=h.namespace)  # no app: no tracing
        with traced.tracer.start_as_current_span("request"):
            task_id = await h.client.submit(fulfilment(), roles=["step"], functions=[])
        with anyio.fail_after(30):
            await run_until_done(h, untraced, task_id)
    spans = by_node(traced.spans())
    runs = [name for name in spans if name.startswith("process step@")]
    assert sorted(runs) == ["process step@pack", "process step@pick", "process step@ship"]
    for name in runs:
        assert spans[name]["parent"] == spans["submit fulfil"]["span_id"]
    assert not [name for name in spans if name.startswith(("step ", "dispatch "))]


def test_an_item_continues_the_report_that_caused_it() -> None:
    spec = fulfilment().spec()
    pick_batch, pick_done, pack_done = ({"traceparent": f"00-{n}"} for n in "abc")
    causes = Causes(
        spec,
        [("pick", "batch-key-0", pick_batch), ("pick", None, pick_done), ("pack", None, pack_done)],
    )
    assert causes.of("pack", "batch-key-0") == pick_batch  # the batch that feeds it
    # Else the latest report of a parent, or of the node itself (a retry, a remediation).
    assert causes.of("pack", "another-key") == pack_done
    assert causes.of("ship") == pack_done
    assert causes.of("pick") == pick_done
    assert Causes(spec, [("pick", None, pick_done)]).of("pack", "another-key") == pick_done
    assert Causes(spec, [("pack", None, pack_done)]).of("pick") == pack_done  # the step's latest
    assert not Causes(spec, []) and Causes(spec, []).of("pick") is None


def test_a_trace_context_read_back_keeps_only_well_formed_trace_fields() -> None:
    parent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    assert carrier_of({"traceparent": parent, "tracestate": "a=b", "tenant": "t"}) == {
        "traceparent": parent,
        "tracestate": "a=b",
    }
    for garbage in (None, "x", [parent], {"traceparent": ""}, {"traceparent": "x" * 513}):
        assert carrier_of(garbage) is None, garbage


@pytest.mark.anyio
async def test_a_dispatch_read_back_from_the_outbox_continues_the_step_stored_with_it(
    redis_url: str, traced: Traced
) -> None:
    """As a coordinator does for a dispatch that another, crashed, committed and never sent."""
    app = traced_app(traced.tracing)
    async with Harness(app, redis_url=redis_url) as h:
        h.client.add_middleware(traced.tracing)  # the task's own dispatch of pick: a span too
        task_id = await h.client.submit(fulfilment(), roles=["step"], functions=[])
        with traced.tracer.start_as_current_span("an earlier step"):
            stored_context = trace_headers()
        job = Job(
            protocol=1,
            kind="job",
            id=node_job_id(task_id, "pick", 0),
            role="step",
            payload={},
            created_at_ms=1,
            task_id=task_id,
            node_id="pick",
            invocation=0,
        )
        left = JobItem("step", None, job.id, encode(job).decode(), stored_context)
        outbox = h.keys.task_outbox(task_id)
        await h.redis.hset(outbox, "000000000000.000000", encode_item(left))
        with anyio.fail_after(30):
            await run_until_done(h, Coordinator(h.redis, app=app, namespace=h.namespace), task_id)
    spans = traced.spans()

    def named(name: str, node: str | None = None) -> list[dict[str, Any]]:
        return [
            span
            for span in spans
            if span["name"] == name and span["attributes"].get("streamflow.node_id") == node
        ]

    [earlier], [submit], [run] = (
        named("an earlier step"),
        named("submit fulfil"),
        named("process step", "pick"),
    )
    dispatches = named("dispatch step", "pick")
    # Two dispatches of the one job: the coordinator's own (a child of the submit) and the
    # stored item's, which continues the step stored with it. Whichever went first sent it
    # (on a single Redis the coordinator's commit usually publishes in its round trip, before
    # a tick reads the stored item back); the other says it was a duplicate.
    assert sorted(span["parent"] for span in dispatches) == sorted(
        [submit["span_id"], earlier["span_id"]]
    )
    [sent] = [s for s in dispatches if "streamflow.dispatch.duplicate" not in s["attributes"]]
    [again] = [s for s in dispatches if s is not sent]
    assert again["attributes"]["streamflow.dispatch.duplicate"] is True
    assert run["parent"] == sent["span_id"]


def test_a_garbage_trace_context_in_an_outbox_item_is_dropped() -> None:
    item = JobItem("step", None, "t.pick.0", "{}", {"traceparent": "00-xyz"})
    assert decode_item(encode_item(item)) == item  # a string: kept, the tracer judges it
    for garbage in ([1, 2], {"traceparent": 7}, "00-ab", {"tracestate": "a=b"}):
        raw = orjson.loads(encode_item(item))
        raw["trace"] = garbage
        decoded = decode_item(orjson.dumps(raw))
        assert isinstance(decoded, JobItem) and decoded.trace is None, garbage


@pytest.mark.anyio
async def test_a_garbage_trace_context_is_ignored_by_the_coordinator(
    redis_url: str, traced: Traced
) -> None:
    bad = {"traceparent": "00-00000000000000000000000000000000-0000000000000000-01"}
    async with Harness(traced_app(traced.tracing), redis_url=redis_url) as h:
        with anyio.fail_after(30):
            run = await h.run_task(fulfilment(), headers={**bad, "tracestate": "\u202e=x"})
    assert run.state.state == "succeeded"
    spans = traced.spans()  # the runs start traces of their own; the coordinator none for them
    assert not [span for span in spans if span["name"] == "dispatch step" and not span["parent"]]
    assert {span["name"] for span in spans if span["parent"] is None} == {"process step"}


@pytest.mark.anyio
async def test_a_report_with_a_garbage_trace_context_is_applied_without_a_span(
    redis_url: str, traced: Traced
) -> None:
    app = traced_app(traced.tracing)
    async with Harness(app, redis_url=redis_url) as h:
        coordinator = Coordinator(h.redis, app=app, namespace=h.namespace)
        task_id = await h.client.submit(fulfilment(), roles=["step"], functions=[])
        await coordinator.drain()  # pick dispatched
        done = TaskEvent(
            protocol=1,
            kind="event",
            type="done",
            task_id=task_id,
            node_id="pick",
            invocation=0,
            at_ms=1,
            total=0,
            trace={"traceparent": "00-not-a-trace-context", "tracestate": "x"},
        )
        await coordinator.process(task_id, [done])
        task = await h.client.task(task_id)
    assert task is not None and task.nodes["pick"].state == "succeeded"
    assert traced.spans() == []  # neither a step nor a dispatch (nothing was traced before)


@contextmanager
def processes_recording_spans(commands: list[tuple[list[str], Path]], log: Path) -> Iterator[None]:
    """Runs each command, its spans written to its file and its stderr to ``log``; kills them."""
    with open(log, "wb") as err:
        processes = [
            subprocess.Popen(command, cwd=ROOT, env=clean_env(SFTEST_SPANS=str(spans)), stderr=err)
            for command, spans in commands
        ]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)


def publish_in_a_span(
    redis_url: str, namespace: str, traced: Traced, role: str, payload: Any
) -> str:
    """Publishes ``payload`` to ``role`` inside a ``request`` span, with the tracing middleware."""

    async def publish() -> str:
        connection = connect(redis_url)
        try:
            publisher = streamflow.Client(connection, namespace=namespace)
            publisher.add_middleware(traced.tracing)
            with traced.tracer.start_as_current_span("request"):
                return await publisher.publish(role, payload)
        finally:
            await connection.aclose()

    return anyio.run(publish)


@pytest.mark.slow
def test_a_worker_process_continues_the_publishers_trace(
    redis_url: str, namespace: str, tmp_path: Path, traced: Traced
) -> None:
    spans_file = tmp_path / "spans.jsonl"
    log = tmp_path / "worker.log"
    command = [*CLI, "worker", "--app", "tests.otel_apps:app", "--redis-url", redis_url]
    command += ["--namespace", namespace, "--role", "first", "--role", "second"]

    with processes_recording_spans([(command, spans_file)], log):
        message_id = publish_in_a_span(redis_url, namespace, traced, "first", 1)

        def both_ran() -> bool:
            return sum(s["name"].startswith("process") for s in read_spans(spans_file)) == 2

        wait_for(both_ran, 30, "the worker's two handler spans")
    publisher = traced.named()
    worker_spans = {span["name"]: span for span in read_spans(spans_file)}
    spans = {**publisher, **worker_spans}
    assert sorted(worker_spans) == ["process first", "process second", "send second"]
    chain = ["request", "send first", "process first", "send second", "process second"]
    assert_chain(spans, chain)
    assert worker_spans["process first"]["attributes"]["messaging.message.id"] == message_id
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_a_task_across_processes_is_one_trace_through_the_coordinators_spans(
    redis_url: str, namespace: str, tmp_path: Path, traced: Traced
) -> None:
    """publish -> worker (ctx.submit) -> coordinator -> nodes -> successor, three processes."""
    worker_spans, coordinator_spans = tmp_path / "worker.jsonl", tmp_path / "coordinator.jsonl"
    log = tmp_path / "processes.log"
    common = ["--app", "tests.otel_apps:app", "--redis-url", redis_url, "--namespace", namespace]
    commands = [
        ([*CLI, "worker", *common, "--role", "order", "--role", "step"], worker_spans),
        ([*CLI, "coordinator", *common], coordinator_spans),
    ]

    with processes_recording_spans(commands, log):
        message_id = publish_in_a_span(redis_url, namespace, traced, "order", 7)

        def shipped() -> bool:
            return any(
                s["name"] == "process step" and s["attributes"]["streamflow.node_id"] == "ship"
                for s in read_spans(worker_spans)
            )

        wait_for(shipped, 60, "the successor's run in the worker process")
    recorded = [*traced.spans(), *read_spans(worker_spans), *read_spans(coordinator_spans)]
    spans = by_node(recorded)
    chain = ["request", "send order", "process order", "submit fulfil", *FULFILMENT]
    assert_chain(spans, chain)
    check_fulfilment(spans, child_task_id(message_id, "submit#0"))
    coordinator = {span["name"].split()[0] for span in read_spans(coordinator_spans)}
    assert coordinator == {"step", "dispatch"}
    assert len({span["trace_id"] for span in recorded}) == 1
    assert "Traceback" not in log.read_text()


class Lines(logging.Handler):
    """Formats each record as it is logged (in the logging thread and context)."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.anyio
async def test_handler_log_lines_carry_the_trace_and_span_ids(
    redis_url: str, traced: Traced, caplog: pytest.LogCaptureFixture
) -> None:
    as_json, as_text = Lines(logs.JsonFormatter()), Lines(logs.TextFormatter())
    handler_logger = logging.getLogger("streamflow.handler")
    handler_logger.addHandler(as_json)
    handler_logger.addHandler(as_text)
    caplog.set_level(logging.INFO, logger="streamflow.handler")
    try:
        async with Harness(traced_app(traced.tracing), redis_url=redis_url) as h:
            await h.publish("first", 1)  # no trace context: the run starts its own trace
            with traced.tracer.start_as_current_span("ambient"), anyio.fail_after(20):
                await h.drain(["first"])
    finally:
        handler_logger.removeHandler(as_json)
        handler_logger.removeHandler(as_text)
    process = traced.named()["process first"]
    assert process["parent"] is None  # not the drain's ambient span
    [line] = [orjson.loads(line) for line in as_json.lines]
    assert (line["trace_id"], line["span_id"]) == (process["trace_id"], process["span_id"])
    assert line["message"] == "first got 1" and line["role"] == "first"
    [text] = as_text.lines
    assert re.search(rf"trace_id={process['trace_id']} span_id={process['span_id']}\]$", text)


def test_a_line_logged_outside_any_span_has_no_trace_ids() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain", None, None)
    assert "trace_id" not in orjson.loads(logs.JsonFormatter().format(record))
    assert logs.TextFormatter().format(record).endswith("x: plain")


def test_streamflow_otel_without_the_otel_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.propagate", None)
    monkeypatch.delitem(sys.modules, "streamflow.otel")
    with pytest.raises(MissingExtraError, match=r"pip install 'streamflow\[otel\]'"):
        importlib.import_module("streamflow.otel")


def doc_block(marker: str) -> str:
    """The Python block after ``<!-- example: MARKER -->`` in docs/concepts.md."""
    found = re.search(rf"<!-- example: {marker} -->\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert found is not None, marker
    return found.group(1)


@pytest.mark.anyio
async def test_the_documented_tracing_example_runs() -> None:
    scope: dict[str, Any] = {"__name__": "tracing_example"}
    exec(compile(doc_block("tracing"), "concepts.md:tracing", "exec"), scope)
    exec(compile(doc_block("tracing-test"), "concepts.md:tracing-test", "exec"), scope)
    with anyio.fail_after(20):
        await scope["test_one_trace_from_the_request_to_the_invoice"]()  # on fakeredis
    scope["provider"].shutdown()


def label(span: dict[str, Any]) -> str:
    """One span as a line of the documented trace: its name and what tells it apart."""
    attributes = span["attributes"]
    name, words = span["name"], []
    if name.startswith("step "):
        words.append(attributes["streamflow.event.type"])
        if "streamflow.batch.seq" in attributes:
            words.append(f"seq={attributes['streamflow.batch.seq']}")
    elif name.startswith("function "):
        words.append(attributes["streamflow.function.step"])
    elif name.startswith("process ") and "streamflow.node_id" in attributes:
        words.append(f"attempt={attributes['streamflow.attempt']}")
    if "streamflow.node_id" in attributes and not name.startswith(("step ", "function ")):
        words.insert(0, f"node={attributes['streamflow.node_id']}")
    return f"{name:<24}{' '.join(words)}".rstrip()


def render(spans: list[dict[str, Any]], order: list[str]) -> str:
    """The spans as an indented tree: roots by node (in ``order``), siblings by their text.

    Sorting siblings by their rendered subtrees makes the picture independent of the order
    spans ended in (two batches' runs of one node look alike).
    """
    children: dict[str | None, list[dict[str, Any]]] = {}
    for span in spans:
        children.setdefault(span["parent"], []).append(span)

    def block(span: dict[str, Any], depth: int) -> list[str]:
        below = [block(child, depth + 1) for child in children.get(span["span_id"], [])]
        below.sort(key=lambda lines: (lines[0].strip(), lines))
        return ["  " * depth + label(span), *(line for lines in below for line in lines)]

    def rank(span: dict[str, Any]) -> int:
        node = span["attributes"].get("streamflow.node_id")
        return order.index(node) if node in order else -1

    blocks = [(rank(span), block(span, 0)) for span in children.get(None, [])]
    return "\n".join(line for _, lines in sorted(blocks) for line in lines) + "\n"


@pytest.mark.anyio
async def test_the_documented_trace_of_the_demo_task_is_what_it_records(traced: Traced) -> None:
    from streamflow.dag import demo

    app = streamflow.App()
    app.add_middleware(traced.tracing)
    for role in demo.app.roles.values():  # the demo's roles, in an app of this test's
        app.role(role.name, payload=role.payload_type)(role.handler)
    graph = demo.graph(2, pause=0)
    async with Harness(app) as h:
        h.client.add_middleware(traced.tracing)  # the submit's span
        with traced.tracer.start_as_current_span("POST /reports"), anyio.fail_after(30):
            run = await h.run_task(graph)
    assert run.state.state == "succeeded"
    shown = re.search(r"<!-- trace: demo -->\n```text\n(.*?)```", DOCS.read_text(), re.S)
    assert shown is not None
    assert render(traced.spans(), [node.id for node in graph.spec().nodes]) == shown.group(1)
