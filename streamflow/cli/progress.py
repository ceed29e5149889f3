"""How the ``streamflow`` CLI shows a DAG task: its progress table, summary and outcome.

Shared by the task commands (:mod:`streamflow.cli.tasks`: ``submit --wait``, ``status``,
``tasks``) and the demo (:mod:`streamflow.cli.demo_runner`), which follow a task the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import anyio
import click
import orjson

from streamflow import events as lifecycle
from streamflow import jobs
from streamflow.client import Client
from streamflow.dag.outbox import node_job_id
from streamflow.dag.tasks import TaskState
from streamflow.errors import ConfigError
from streamflow.logs import printable
from streamflow.records import LifecycleEvent


async def follow(
    client: Client,
    task_id: str,
    *,
    echo: Callable[[str], None] = click.echo,
    live: bool | None = None,
    every: float = 0.0,
    poll: float = 1.0,
) -> TaskState:
    """Show per-node progress until the task ends; returns its final state.

    Args:
        client: The client.
        task_id: The task.
        echo: Where lines go.
        live: Redraw the table in place (default: when stdout is a terminal); otherwise print
            each node's line when it changed, at most every ``every`` seconds.
        every: The least time between two printed updates, when not live.
        poll: The task state is read again when a lifecycle event of the task (its own, its
            nodes' or their jobs') says it changed, and at the latest after this many seconds
            (events are best effort; a batch emitted mid-run writes none).

    Raises:
        ConfigError: The task disappeared (it expired).
    """
    async with lifecycle.watching(client.redis, client.keys, task_id=task_id) as news:
        return await _follow(client, task_id, news, echo, live, every, poll)


async def _follow(
    client: Client,
    task_id: str,
    news: lifecycle.Waker,
    echo: Callable[[str], None],
    live: bool | None,
    every: float,
    poll: float,
) -> TaskState:
    live = sys.stdout.isatty() if live is None else live
    drawn = 0
    shown: dict[str, str] = {}
    last_print = float("-inf")
    while True:
        task = await client.task(task_id)
        if task is None:
            raise ConfigError(f"task {task_id} disappeared (expired?)")
        lines = progress_lines(task, news.progress)
        if live:
            echo((f"\x1b[{drawn}F\x1b[J" if drawn else "") + "\n".join(lines))
            drawn = len(lines)
        elif task.terminal or anyio.current_time() - last_print >= every:
            last_print = anyio.current_time()
            for line in lines if not shown else lines[1:]:
                key = line.split()[0]
                if shown.get(key) != line:
                    shown[key] = line
                    echo(line)
        if task.terminal:
            return task
        await news.wait(poll)


#: The order node states are counted in by :func:`task_summary`.
_NODE_STATES = ("succeeded", "running", "queued", "failed", "cancelled", "skipped")


def task_summary(task: TaskState) -> str:
    """The task's state and its nodes' by state: ``cancelled (4 nodes: 2 succeeded, 2 cancelled)``.

    Not ``done/total``: a cancelled task's cancelled nodes are finished, not done.
    """
    counts = {state: 0 for state in _NODE_STATES}
    for node in task.nodes.values():
        counts[node.state] = counts.get(node.state, 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    count = len(task.nodes)
    return f"{task.state} ({count} node{'' if count == 1 else 's'}: {parts})"


def why_line(task: TaskState) -> str | None:
    """Why the task ended as it did: ``reason:`` of a cancel, ``error:`` of a failure."""
    if task.state == "cancelled":
        return f"reason: {_cancel_reason(task)}"
    if task.error:
        return f"error: {task.error}"
    return None


def outcome_text(task: TaskState) -> str:
    """The final state with its cause: ``failed: <error>``, ``cancelled (reason: ...)``."""
    if task.state == "cancelled":
        return f"cancelled (reason: {_cancel_reason(task)})"
    return f"{task.state}: {task.error}" if task.error else task.state


#: The latest invocations of a running node whose progress :func:`node_progress` reads.
NODE_RUNS = 64


async def node_progress(client: Client, task: TaskState) -> dict[str, LifecycleEvent]:
    """The latest progress kept for each running node's jobs (see :meth:`Keys.job_progress`).

    Reads its latest :data:`NODE_RUNS` invocations' progress in one ``MGET`` for all nodes.
    """
    ids: dict[str, str] = {}
    for node_id, node in task.nodes.items():
        if node.state == "running":
            for invocation in range(max(0, node.dispatched - NODE_RUNS), node.dispatched):
                ids[node_job_id(task.id, node_id, invocation)] = node_id
    found = await jobs.latest_progresses(client.redis, client.keys, list(ids))
    latest: dict[str, LifecycleEvent] = {}
    for message_id, event in found.items():
        node_id = ids[message_id]
        if node_id not in latest or event.at_ms > latest[node_id].at_ms:
            latest[node_id] = event
    return latest


def _progress_text(state: str, event: LifecycleEvent | None) -> str:
    """``  [progress 40 copying]`` for a running node that reported progress, else nothing."""
    if event is None or state != "running":
        return ""
    text = orjson.dumps(event.progress).decode()
    return f"  [progress {text}{' ' + event.message if event.message else ''}]"


def _cancel_reason(task: TaskState) -> str:
    # "cancelled" is the default reason of a cancel: it says nothing more than the state.
    return "none given" if task.error in (None, "", "cancelled") else str(task.error)


def progress_lines(
    task: TaskState, progress: Mapping[str, LifecycleEvent] | None = None
) -> list[str]:
    """A header and one line per node: state, runs done/dispatched, batches in/out, items.

    ``progress``: the latest ``ctx.progress()`` of running nodes, shown after their line.
    """
    width = max(len(n) for n in task.nodes)
    head = f"{'node':<{width}}  {'state':<9} {'runs':>11} {'in':>7} {'out':>7} {'items':>9}"
    lines = [head]
    for node_id, node in task.nodes.items():
        runs = f"{node.completed}/{node.dispatched}"
        lines.append(
            f"{node_id:<{width}}  {node.state:<9} {runs:>11} {node.batches_in:>7} "
            f"{node.batches_out:>7} {node.items_out:>9}"
            + (f"  ({node.waiting})" if node.waiting else "")
            + _progress_text(node.state, (progress or {}).get(node_id))
        )
    # Read back from Redis: no value may add a line or a terminal control of its own.
    return [printable(line) for line in lines]
