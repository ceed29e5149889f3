"""The dashboard's control pages and actions: schedules, pausing roles, replaying many.

Each action is a POST through :meth:`Pages.action` (CSRF, same origin, refused when read-only)
and goes through the same public functions as the CLI (``streamflow schedule``,
``streamflow pause``, ``streamflow dlq replay``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from streamflow import scheduler
from streamflow.keys import NAME_PATTERN
from streamflow.protocol import now_ms

if TYPE_CHECKING:
    from streamflow.dashboard.pages import Pages


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """One schedule's line on the Schedules page (an invalid one has only id and error)."""

    id: str
    valid: bool
    error: str = ""
    target: str = ""
    rule: str = ""
    paused: bool = False
    next_run_ms: int | None = None
    last_tick_ms: int | None = None
    last_run_ms: int | None = None


def schedule_rows(stored: scheduler.Stored, now: int) -> list[ScheduleRow]:
    """Every schedule, valid or not, by id, with when it runs next (None while paused)."""
    rows = []
    for sid in sorted({*stored.schedules, *stored.invalid}):
        found = stored.schedules.get(sid)
        if found is None:
            rows.append(ScheduleRow(sid, False, error=stored.invalid[sid]))
            continue
        paused = sid in stored.paused
        last = stored.last.get(sid)
        rows.append(
            ScheduleRow(
                sid,
                True,
                target=found.target,
                rule=found.describe(),
                paused=paused,
                next_run_ms=None if paused else scheduler.next_run(found, last, now),
                last_tick_ms=last,
                last_run_ms=stored.runs.get(sid),
            )
        )
    return rows


class Controls:
    """The control routes, rendering through the pages they extend."""

    def __init__(self, pages: Pages) -> None:
        self.pages = pages
        self.client = pages.client

    def routes(self) -> list[Route]:
        """The schedules page and every control action."""
        get, post = ["GET"], ["POST"]
        return [
            Route("/schedules", self.schedules, methods=get),
            Route("/schedules/{sid}/pause", self.pause_schedule, methods=post),
            Route("/schedules/{sid}/resume", self.resume_schedule, methods=post),
            Route("/schedules/{sid}/run", self.run_schedule, methods=post),
            Route("/roles/{role}/pause", self.pause_role, methods=post),
            Route("/roles/{role}/resume", self.resume_role, methods=post),
            Route("/deadletters/{role}/replay-all", self.replay_all_form, methods=get),
            Route("/deadletters/{role}/replay-all", self.replay_all, methods=post),
        ]

    # -- schedules ------------------------------------------------------------------------

    async def schedules(self, request: Request) -> Response:
        """Every schedule: its rule, next run, last run; pause, resume, run now."""
        stored = await scheduler.load(self.client.redis, self.client.keys)
        return self.pages.render("schedules.html", schedules=schedule_rows(stored, now_ms()))

    async def _schedule(self, request: Request) -> tuple[str, scheduler.Stored] | Response:
        """The schedule an action names, if it is a valid one, or the refusal."""
        form = await self.pages.action(request)
        if isinstance(form, Response):
            return form
        sid = request.path_params["sid"]
        stored = await scheduler.load(self.client.redis, self.client.keys)
        if not NAME_PATTERN.fullmatch(sid) or sid not in stored.schedules:
            return self.pages.message("No such schedule (or its definition is invalid).", 404)
        return sid, stored

    async def pause_schedule(self, request: Request) -> Response:
        """Pause a schedule: its ticks pass without firing."""
        found = await self._schedule(request)
        if isinstance(found, Response):
            return found
        await scheduler.pause(self.client.redis, self.client.keys, found[0])
        return self.pages.back("/schedules")

    async def resume_schedule(self, request: Request) -> Response:
        """Resume a schedule from its next tick."""
        found = await self._schedule(request)
        if isinstance(found, Response):
            return found
        await scheduler.pause(self.client.redis, self.client.keys, found[0], paused=False)
        return self.pages.back("/schedules")

    async def run_schedule(self, request: Request) -> Response:
        """Publish one run of a schedule now, outside its ticks; show the job (or task)."""
        found = await self._schedule(request)
        if isinstance(found, Response):
            return found
        sid, stored = found
        schedule = stored.schedules[sid]
        if schedule.role is None:
            # Submitting a task needs the publisher's rights, which the dashboard's user lacks.
            return self.pages.message("A task's schedule runs now with the CLI only.", 409)
        run = await scheduler.run_now(self.client, schedule)
        return self.pages.back(f"/jobs?id={quote(run, safe='')}")

    # -- roles ----------------------------------------------------------------------------

    async def _role(self, request: Request) -> str | Response:
        form = await self.pages.action(request)
        if isinstance(form, Response):
            return form
        role: str = request.path_params["role"]
        if not NAME_PATTERN.fullmatch(role):
            return self.pages.message("Not a role name.", 404)
        return role

    async def pause_role(self, request: Request) -> Response:
        """Pause a role: workers start no new jobs of it."""
        role = await self._role(request)
        if isinstance(role, Response):
            return role
        await self.client.pause(role)
        return self.pages.back(f"/roles/{role}")

    async def resume_role(self, request: Request) -> Response:
        """Resume a paused role."""
        role = await self._role(request)
        if isinstance(role, Response):
            return role
        await self.client.resume(role)
        return self.pages.back(f"/roles/{role}")

    # -- dead letters ---------------------------------------------------------------------

    async def replay_all_form(self, request: Request) -> Response:
        """The confirmation page of replaying every dead letter of a role."""
        role = request.path_params["role"]
        if not NAME_PATTERN.fullmatch(role):
            return self.pages.message("Not a role name.", 404)
        total = await self.client.dead_letter_count(role)
        return self.pages.render("replay_all.html", role=role, total=total)

    async def replay_all(self, request: Request) -> Response:
        """Send every dead letter of a role back to its stream."""
        role = await self._role(request)
        if isinstance(role, Response):
            return role
        result = await self.client.replay(role)
        if result.skipped:
            text = f"Replayed {len(result.replayed)}; not replayed: {len(result.skipped)}."
            return self.pages.message(text, 409)
        return self.pages.back(f"/deadletters/{role}")
