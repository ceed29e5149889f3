"""A long job that works in steps, stops cleanly on cancel and resumes where it left off.

Run a worker and start a job:

    streamflow worker --app examples.long_jobs.app:app
    streamflow publish crunch --json '{"steps": 20, "work_seconds": 2}'
    streamflow cancel MESSAGE_ID --message --wait     # stops it between two steps

Each step is some work followed by a save of its result. The handler

* checks ``ctx.cancel`` between steps, so a cancel stops it at a step boundary;
* wraps the work in ``ctx.cancellable(...)``, so a cancel abandons the work in progress (the
  step is redone by whoever runs the job again, if anyone);
* saves inside ``ctx.shield()``, so even the hard cancel that follows ``cancel_grace`` waits
  for the save to finish: no step is ever half-saved;
* starts from the first step not yet saved, so a job adopted by another worker (after a
  crash, or released by a worker shutting down) does not redo finished steps;
* on shutdown (``ctx.shutting_down``, which is not a cancel) hands the job over after the step
  it is saving, so another worker resumes it at once.
"""

from __future__ import annotations

from collections import defaultdict

import anyio
from pydantic import BaseModel

import streamflow

app = streamflow.App()


class LongJob(BaseModel):
    """How much work the job does: ``steps`` steps of work, each followed by a save."""

    steps: int = 10
    work_seconds: float = 1.0
    save_seconds: float = 0.1


class Progress:
    """The steps each job has saved, by message id, and a journal of what happened.

    This one lives in the worker's memory, which is enough for one process (the tests and the
    adoption demo run both workers in one process). A real job saves its progress where every
    worker can read it, such as a database row or a Redis hash, keyed on ``ctx.message_id``:
    that id stays the same across retries, adoptions and replays.
    """

    def __init__(self) -> None:
        self.journal: defaultdict[str, list[tuple[str, int, str]]] = defaultdict(list)

    def next_step(self, message_id: str) -> int:
        """The first step the job has not saved yet."""
        saved = [step for event, step, _ in self.journal[message_id] if event == "saved"]
        return max(saved, default=-1) + 1

    def note(self, message_id: str, event: str, step: int, consumer: str) -> None:
        """Record ``event`` of ``step`` as seen by worker ``consumer``."""
        self.journal[message_id].append((event, step, consumer))

    async def save(self, message_id: str, step: int, consumer: str, seconds: float) -> None:
        """Save one step's result: a write that takes ``seconds`` and must not be cut short."""
        self.note(message_id, "save", step, consumer)
        await anyio.sleep(seconds)  # stands in for a slow write (a transaction, an upload)
        self.note(message_id, "saved", step, consumer)


progress = Progress()


async def work(step: int, seconds: float) -> int:
    """One step's work: something slow that may be abandoned halfway."""
    await anyio.sleep(seconds)
    return step * step


# cancel_grace is short for the demo: a real job gets as long as its longest save takes, or
# the hard cancel waits for the save anyway (see the README).
@app.role("crunch", cancel_grace=1.0)
async def crunch(ctx: streamflow.Context, job: LongJob) -> None:
    """Run the job's steps from the first one not saved yet."""
    for step in range(progress.next_step(ctx.message_id), job.steps):
        ctx.cancel.raise_if_cancelled()  # a cancel stops the job here, between two steps
        progress.note(ctx.message_id, "work", step, ctx.consumer)
        await ctx.cancellable(work(step, job.work_seconds))  # or abandons the work at once
        with ctx.shield():  # the hard cancel after cancel_grace waits for this section
            await progress.save(ctx.message_id, step, ctx.consumer, job.save_seconds)
        ctx.log.info("step %d of %d saved", step + 1, job.steps)
        # A deploy is not a cancel: ctx.cancel stays unset. This job can resume anywhere, so on
        # shutdown it hands itself over at the step boundary instead of using up the grace.
        ctx.raise_if_shutting_down()
