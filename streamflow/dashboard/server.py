"""The dashboard's ASGI app: routes, templates, the shared poller's lifespan; and serving it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import jinja2
import uvicorn
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from streamflow import logs
from streamflow.client import Client
from streamflow.dashboard.controls import Controls
from streamflow.dashboard.pages import Pages
from streamflow.dashboard.security import Guard
from streamflow.dashboard.settings import DashboardSettings
from streamflow.errors import StreamflowError
from streamflow.schedules import iso

HERE = Path(__file__).parent
#: The longest text one template variable shows (longer ones are cut with an ellipsis).
MAX_SHOWN = 5000


def _shown(value: object) -> object:
    """Every value a template prints: control characters escaped, bounded (then autoescaped)."""
    if value is None or isinstance(value, int | float):
        return "" if value is None else value
    if isinstance(value, jinja2.runtime.Undefined):
        return value
    if hasattr(value, "__html__"):  # markup the templates built themselves
        return value
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + logs.ELISION
    # Line breaks stay (a result, a traceback); every other control character is escaped.
    return "\n".join(logs.printable(line, MAX_SHOWN) for line in text.split("\n"))


def age(ms: int | None) -> str:
    """A duration in ms for people: ``850 ms``, ``12.5 s``, ``3 min``, ``2.1 h``, ``4.0 d``."""
    if ms is None:
        return "-"
    if abs(ms) < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    for limit, unit, size in ((60, "s", 1), (3600, "min", 60), (86400, "h", 3600)):
        if abs(seconds) < limit:
            return f"{seconds / size:.1f} {unit}" if unit != "min" else f"{seconds // 60:.0f} min"
    return f"{seconds / 86400:.1f} d"


def environment() -> jinja2.Environment:
    """The templates, with autoescaping on for every one and :func:`_shown` on every value."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        finalize=_shown,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["age"] = age
    env.filters["iso"] = iso
    return env


def create_app(client: Client, settings: DashboardSettings) -> Guard:
    """The dashboard app on ``client``, guarded by token and prefix handling."""
    pages = Pages(client, settings, environment())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pages.poller.run)
            yield
            tg.cancel_scope.cancel()

    routes = [
        *pages.routes(),
        *Controls(pages).routes(),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={StreamflowError: pages.error},
    )
    guard = Guard(app, settings)
    pages.guard = guard
    return guard


def serve(redis: Redis, namespace: str, settings: DashboardSettings) -> None:
    """Serve the dashboard until interrupted (SIGINT or SIGTERM)."""
    app = create_app(Client(redis, namespace=namespace), settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        # Open event streams end at shutdown instead of holding it.
        timeout_graceful_shutdown=2,
        server_header=False,
    )
    uvicorn.Server(config).run()
