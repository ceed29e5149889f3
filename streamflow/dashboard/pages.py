"""The dashboard's pages and actions: each reads through the public API and renders a template.

Actions are POSTs that need the CSRF token of the page's form and a same-origin ``Origin``;
in read-only mode the pages hide them and these routes refuse them (403).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import jinja2
import orjson
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from streamflow.client import Client
from streamflow.dag.graph import GraphSpec
from streamflow.dag.store import TaskStore
from streamflow.dag.tasks import TaskState
from streamflow.dashboard import graph
from streamflow.dashboard.activity import Rates, Timeline
from streamflow.dashboard.overview import overview, role_row, role_rows, running_by_consumer
from streamflow.dashboard.poller import Poller
from streamflow.dashboard.security import SESSION_COOKIE, read_fields, read_form, same_origin
from streamflow.dashboard.settings import DashboardSettings
from streamflow.errors import RedisUnavailable
from streamflow.keys import NAME_PATTERN
from streamflow.ops.inspect import delayed_jobs, inspect_role
from streamflow.registry import WarnOnce

if TYPE_CHECKING:
    from streamflow.dashboard.security import Guard

#: Renders what the poller read into one event: ``parts`` (HTML fragments by element id),
#: ``ended`` (the task ended: its actions are off) and ``done`` (the last event); None ends it.
Render = Callable[[Any], Awaitable[dict[str, Any] | None]]
#: The poller's keys: the overview, and a task by id.
OVERVIEW_KEY = "overview"
TASK_KEY = "task:"
#: The longest payload preview of a dead letter, in characters.
PREVIEW = 500
#: The longest task result shown, in characters.
PREVIEW_RESULT = 4000
#: The most dead letters one form replays (a page shows 50).
MAX_REPLAYED = 100
#: Clock skew allowed between a task's submitter and Redis, in ms.
SKEW_MS = 5000
#: The task states the Tasks page filters by.
TASK_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


@dataclass(slots=True)
class LiveTask:
    """A task that live pages watch: its timeline, and how many reads found it ended."""

    timeline: Timeline
    terminal_reads: int = 0


#: A live task page's fragments: element id -> template.
TASK_PARTS = {
    "graph": "graph",
    "timeline-rows": "timeline_rows",
    "timeline-note": "timeline_note",
    "result": "result",
}


@dataclass(frozen=True, slots=True)
class TaskView:
    """What a task page shows: the task's state, its result, its events."""

    state: TaskState
    result: str
    timeline: Timeline
    #: Whether its live page has seen all: its end and the events written just after.
    done: bool

    def context(self, spec: GraphSpec) -> dict[str, Any]:
        """The templates' context (the events as of now)."""
        return {
            "task": self.state,
            "drawing": graph.draw(spec, self.state.nodes),
            "result": self.result,
            "events": list(self.timeline.events),
            "cut": self.timeline.cut,
        }


class Pages:
    """The route handlers, sharing the client, the templates and the poller."""

    def __init__(
        self,
        client: Client,
        settings: DashboardSettings,
        env: jinja2.Environment,
    ) -> None:
        self.client = client
        self.settings = settings
        self.env = env
        self.poller = Poller(self.read, settings.refresh)
        self.tasks = TaskStore(client.redis, client.keys)
        self.rates = Rates(client.redis, client.keys)
        #: One timeline per task a live page shows, followed by the poller.
        self.timelines: dict[str, LiveTask] = {}
        self.guard: Guard | None = None
        #: Malformed registry entries are warned of once, not at every refresh.
        self.registry_warnings = WarnOnce()

    def routes(self) -> list[Route]:
        """Every page and action."""
        get, post = ["GET"], ["POST"]
        return [
            Route("/", self.overview, methods=get),
            Route("/live/overview", self.overview_live, methods=get),
            Route("/roles/{role}", self.role, methods=get),
            Route("/workers", self.workers, methods=get),
            Route("/jobs", self.job, methods=get),
            Route("/jobs/cancel", self.cancel_job, methods=post),
            Route("/tasks", self.task_list, methods=get),
            Route("/tasks/{task_id}", self.task, methods=get),
            Route("/tasks/{task_id}/live", self.task_live, methods=get),
            Route("/tasks/{task_id}/cancel", self.cancel_task, methods=post),
            Route("/deadletters", self.dead_roles, methods=get),
            Route("/deadletters/{role}", self.dead_letters, methods=get),
            Route("/deadletters/{role}/replay", self.replay, methods=post),
            Route("/deadletters/{role}/purge", self.purge_form, methods=get),
            Route("/deadletters/{role}/purge", self.purge, methods=post),
            Route("/login", self.login_form, methods=get),
            Route("/login", self.login, methods=post),
        ]

    # -- rendering ------------------------------------------------------------------------

    def render(self, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        """Template ``name`` with the context every page has."""
        csrf = self.guard.csrf if self.guard is not None else ""
        page = self.env.get_template(name).render(
            root=self.settings.prefix,
            read_only=self.settings.read_only,
            csrf=csrf,
            auth=self.settings.token is not None,
            now_ms=_now_ms(),
            **context,
        )
        return HTMLResponse(page, status_code=code)

    def message(self, text: str, status: int) -> HTMLResponse:
        """A page that says one thing (an error, a refusal)."""
        return self.render("message.html", code=status, text=text)

    async def action(self, request: Request) -> dict[str, str] | Response:
        """The form of an allowed action (the first value of each field), or the refusal."""
        fields = await self.action_fields(request)
        if isinstance(fields, Response):
            return fields
        return {name: values[0] for name, values in fields.items()}

    async def action_fields(self, request: Request) -> dict[str, list[str]] | Response:
        """The form of an allowed action with every value of each field, or the refusal."""
        if self.settings.read_only:
            return self.message("The dashboard is read-only: actions are turned off.", 403)
        fields = await read_fields(request)
        if not same_origin(request) or fields.get("csrf", [""])[0] != self.csrf():
            return self.message("This form expired or came from another site.", 403)
        return fields

    def csrf(self) -> str:
        """This process's CSRF token."""
        return self.guard.csrf if self.guard is not None else ""

    def back(self, path: str) -> RedirectResponse:
        """See-other to ``path`` under the prefix."""
        return RedirectResponse(self.settings.prefix + path, status_code=303)

    async def error(self, request: Request, exc: Exception) -> Response:
        """A streamflow error (Redis down, an unknown id, a refused name) as a page."""
        return self.message(f"{type(exc).__name__}: {exc}", 503 if _outage(exc) else 409)

    # -- pages ----------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        """Roles with their queue figures; coordinators and workers."""
        return self.render("overview.html", **await self.overview_view())

    async def role(self, request: Request) -> Response:
        """One role: its figures, consumers, oldest running and soonest delayed jobs."""
        role = request.path_params["role"]
        if not NAME_PATTERN.fullmatch(role):
            return self.message("Not a role name.", 404)
        redis, keys = self.client.redis, self.client.keys
        detail = await inspect_role(redis, keys, role, count=50)
        if detail is None:
            return self.message("No such role.", 404)
        delayed = await delayed_jobs(redis, keys, role, count=50)
        return self.render("role.html", detail=detail, row=role_row(detail), delayed=delayed)

    async def workers(self, request: Request) -> Response:
        """Every live worker and every coordinator, and the jobs each worker is running."""
        view = await overview(self.client, self.registry_warnings)
        roles = {role for worker in view["workers"] for role in worker.roles}
        running = await running_by_consumer(self.client, roles)
        return self.render("workers.html", running=running, **view)

    async def job(self, request: Request) -> Response:
        """Look a job up by its message id."""
        message_id = request.query_params.get("id", "").strip()
        found = await self.client.job(message_id) if message_id else None
        shown = orjson.dumps(found.result, option=orjson.OPT_INDENT_2).decode() if found else ""
        progress = orjson.dumps(found.progress).decode() if found else ""
        return self.render(
            "job.html", message_id=message_id, status=found, result=shown, progress=progress
        )

    async def cancel_job(self, request: Request) -> Response:
        """Cancel one job by message id."""
        form = await self.action(request)
        if isinstance(form, Response):
            return form
        message_id = form.get("id", "")
        await self.client.cancel(message_id, target="message", requested_by="dashboard")
        return self.back(f"/jobs?id={_quoted(message_id)}")

    async def task_list(self, request: Request) -> Response:
        """The newest tasks, optionally of one state."""
        state = request.query_params.get("state") or None
        if state not in (None, *TASK_STATES):
            return self.message("Unknown task state.", 400)
        found = await self.client.tasks(state=state, limit=100)  # type: ignore[arg-type]
        return self.render("tasks.html", tasks=found, state=state or "", states=TASK_STATES)

    async def task(self, request: Request) -> Response:
        """One task: its graph drawn with every node's state, and cancel."""
        task_id = request.path_params["task_id"]
        if not NAME_PATTERN.fullmatch(task_id):
            return self.message("Not a task id.", 404)
        state = await self.client.task(task_id)
        spec = await self.tasks.spec(task_id)
        if state is None or spec is None:
            return self.message("No such task (or it expired).", 404)
        timeline = self.timeline(task_id, state)
        view = TaskView(state, await self.result_text(state), timeline, state.terminal)
        await view.timeline.update()
        return self.render("task.html", **view.context(spec))

    def timeline(self, task_id: str, state: TaskState) -> Timeline:
        """A new timeline of the task, from its creation on."""
        # Stream ids follow Redis's clock, created_at the submitter's: allow for skew.
        since = state.created_at_ms - SKEW_MS
        return Timeline(self.client.redis, self.client.keys, task_id, since)

    async def result_text(self, state: TaskState) -> str:
        """A succeeded task's items by node, as JSON cut to :data:`PREVIEW_RESULT` characters."""
        if state.state != "succeeded":
            return ""
        try:
            items = await self.client.task_result(state.id)
        except LookupError:
            return "(expired)"
        text = orjson.dumps(items).decode("utf-8", "replace")
        return text if len(text) <= PREVIEW_RESULT else text[:PREVIEW_RESULT] + "…"

    async def task_live(self, request: Request) -> Response:
        """Server-sent events: the task's drawing each time the shared poller reads it."""
        task_id = request.path_params["task_id"]
        spec = await self.tasks.spec(task_id) if NAME_PATTERN.fullmatch(task_id) else None
        if spec is None:
            return PlainTextResponse("no such task", status_code=404)

        async def render(view: TaskView | None) -> dict[str, Any] | None:
            if view is None:  # expired while watched
                return None
            context = view.context(spec)
            parts = {
                part: self.env.get_template(f"{template}.html").render(**context)
                for part, template in TASK_PARTS.items()
            }
            return {"parts": parts, "ended": view.state.terminal, "done": view.done}

        return self.stream(f"{TASK_KEY}{task_id}", render)

    async def overview_live(self, request: Request) -> Response:
        """Server-sent events: the overview's tables each time the shared poller reads them."""

        async def render(view: dict[str, Any]) -> dict[str, Any]:
            page = self.env.get_template("overview_body.html")
            html = page.render(root=self.settings.prefix, now_ms=_now_ms(), **view)
            return {"parts": {"overview-body": html}, "ended": False, "done": False}

        return self.stream(OVERVIEW_KEY, render)

    def stream(self, key: str, render: Render) -> Response:
        """An event stream of ``key``'s fragment, one event per read of the shared poller."""

        async def events() -> AsyncIterator[bytes]:
            seen = -1
            with self.poller.watching(key):
                while True:
                    seen, value = await self.poller.wait_state(key, seen)
                    doc = await render(value)
                    if doc is None:
                        return
                    yield b"data: " + orjson.dumps(doc) + b"\n\n"
                    if doc["done"]:
                        return

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def read(self, key: str) -> Any:
        """What the shared poller reads for ``key``: the overview, or a task's view."""
        if key == OVERVIEW_KEY:
            return await self.overview_view()
        return await self.task_view(key.removeprefix(TASK_KEY))

    async def task_view(self, task_id: str) -> TaskView | None:
        """A watched task's state, result and timeline (followed from where it was last read)."""
        watched = self.poller.watched()
        for gone in [t for t in self.timelines if TASK_KEY + t not in watched]:
            del self.timelines[gone]  # no page shows it any more
        state = await self.client.task(task_id)
        if state is None:
            return None
        live = self.timelines.get(task_id) or LiveTask(self.timeline(task_id, state))
        self.timelines[task_id] = live
        await live.timeline.update()
        # The events of its end are written just after its state: one more read catches them.
        live.terminal_reads += state.terminal
        done = live.terminal_reads > 1
        return TaskView(state, await self.result_text(state), live.timeline, done)

    async def overview_view(self) -> dict[str, Any]:
        """The overview's figures, with each role's sparkline of the last minutes."""
        view = await overview(self.client, self.registry_warnings)
        now = _now_ms()
        await self.rates.update(now)
        view["sparks"] = self.rates.sparks([row.role for row in view["roles"]], now)
        return view

    async def cancel_task(self, request: Request) -> Response:
        """Cancel every message of a task."""
        form = await self.action(request)
        if isinstance(form, Response):
            return form
        task_id = request.path_params["task_id"]
        await self.client.cancel(task_id, target="task", requested_by="dashboard")
        return self.back(f"/tasks/{_quoted(task_id)}")

    async def dead_roles(self, request: Request) -> Response:
        """Every role with its dead-letter depth."""
        roles = await role_rows(self.client)
        return self.render("deadroles.html", roles=roles)

    async def dead_letters(self, request: Request) -> Response:
        """The oldest dead letters of a role, with replay and purge."""
        role = request.path_params["role"]
        if not NAME_PATTERN.fullmatch(role):
            return self.message("Not a role name.", 404)
        after = request.query_params.get("after", "-")
        entries = await self.client.dead_letters(role, count=50, after=after)
        rows = [_dead_row(entry) for entry in entries]
        total = await self.client.dead_letter_count(role)
        return self.render("deadletters.html", role=role, rows=rows, total=total)

    async def replay(self, request: Request) -> Response:
        """Replay the dead letters a form names: one (its button) or the ticked ones."""
        fields = await self.action_fields(request)
        if isinstance(fields, Response):
            return fields
        role = request.path_params["role"]
        ids = fields.get("id", [])[:MAX_REPLAYED]
        if not ids:
            return self.message("Nothing replayed: no dead letter was ticked.", 400)
        result = await self.client.replay(role, ids)
        if result.skipped:
            why = "; ".join(f"{dead_id}: {reason}" for dead_id, reason in result.skipped[:5])
            return self.message(f"Replayed {len(result.replayed)}. Not replayed: {why}.", 409)
        return self.back(f"/deadletters/{_quoted(role)}")

    async def purge_form(self, request: Request) -> Response:
        """The confirmation page of a purge."""
        role = request.path_params["role"]
        if not NAME_PATTERN.fullmatch(role):
            return self.message("Not a role name.", 404)
        total = await self.client.dead_letter_count(role)
        return self.render("purge.html", role=role, total=total)

    async def purge(self, request: Request) -> Response:
        """Delete every dead letter of a role, once its name was typed to confirm."""
        form = await self.action(request)
        if isinstance(form, Response):
            return form
        role = request.path_params["role"]
        if form.get("confirm") != role:
            return self.message("Not purged: type the role's name to confirm.", 400)
        await self.client.purge_dead_letters(role)
        return self.back(f"/deadletters/{_quoted(role)}")

    async def login_form(self, request: Request) -> Response:
        """The token form."""
        return self.render("login.html", failed=False)

    async def login(self, request: Request) -> Response:
        """Check the token and set the session cookie."""
        form = await read_form(request)
        guard = self.guard
        ok = guard is not None and form.get("csrf") == guard.csrf and same_origin(request)
        token = self.settings.token
        if (
            not ok
            or token is None
            or not hmac.compare_digest(form.get("token", "").encode(), token.encode())
        ):
            return self.render("login.html", code=403, failed=True)
        response = self.back("/")
        response.set_cookie(
            SESSION_COOKIE,
            guard.session() if guard is not None else "",
            path=self.settings.prefix or "/",
            httponly=True,
            samesite="strict",
        )
        return response


def _now_ms() -> int:
    return int(time.time() * 1000)


def _quoted(value: str) -> str:
    return quote(value, safe="")


def _outage(exc: Exception) -> bool:
    return isinstance(exc, RedisUnavailable)


def _dead_row(entry: Any) -> dict[str, Any]:
    """What the dead-letter table shows of one entry (the payload bounded)."""
    letter = entry.letter
    if letter is None:
        return {"id": entry.id, "problem": entry.problem, "letter": None, "preview": ""}
    payload = letter.job.payload if letter.job is not None else None
    preview = orjson.dumps(payload).decode("utf-8", "replace") if letter.job else ""
    if len(preview) > PREVIEW:
        preview = preview[:PREVIEW] + "…"
    return {"id": entry.id, "problem": None, "letter": letter, "preview": preview}
