"""Screenshots of every dashboard page for the docs site (docs/assets/dashboard/*.png).

Starts a private redis-server, the demo's workload (two workers of ``streamflow.dag.demo``, a
coordinator, a scheduler), some plain jobs, dead letters and schedules, and the dashboard; then
captures each page in headless chromium (the tests' DevTools-pipe driver,
tests/dashboard/browser.py) at 1280 px and at a phone's 390 px, light and dark. The task page
is taken while its DAG streams. Each PNG is checked for emptiness; with ``pngquant`` on PATH
(Debian: ``apt-get install pngquant``) they are reduced to 256 colours, about a third the size.

    PYTHONPATH=. .venv/bin/python tools/dashboard_screenshots.py [--out docs/assets/dashboard]

About a minute. Nothing is left running: every process it started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.dashboard.browser, and streamflow from this tree

from streamflow import Client  # noqa: E402
from streamflow.dag import demo  # noqa: E402
from streamflow.ops.server import RedisServer  # noqa: E402
from tests.dashboard.browser import Browser, png_facts  # noqa: E402
from tests.helpers import clean_env, free_port, kill_tree, status, wait_for  # noqa: E402

NAMESPACE = "sf-demo"
WIDTHS = {"desktop": 1280, "phone": 390}
SCHEMES = ("light", "dark")
#: The tallest screenshot, in CSS pixels (a long page is cut: the docs show its top).
MAX_HEIGHT = 1400


class Processes:
    """The processes the script starts; all stopped on exit."""

    def __init__(self, url: str, logs: Path) -> None:
        self.url = url
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str, ready: str | None = None) -> None:
        """Run ``streamflow args``; wait for ``ready`` in its log when given."""
        log = self.logs / f"{name}.log"
        with open(log, "wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "streamflow", *args],
                cwd=ROOT,
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.started.append(process)
        if ready is not None:

            def up() -> bool:
                assert process.poll() is None, log.read_text()
                return ready in log.read_text()

            wait_for(up, 30, f"{name} logs {ready!r}")

    def cli(self, *args: str) -> None:
        """Run one ``streamflow`` command to its end."""
        subprocess.run(
            [sys.executable, "-m", "streamflow", *args, *self.connection()],
            cwd=ROOT,
            env=clean_env(),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def connection(self) -> list[str]:
        """The connection options of every command."""
        return ["--redis-url", self.url, "--namespace", NAMESPACE]

    def stop(self) -> None:
        """Stop every process started (and its children)."""
        for process in self.started:
            kill_tree(process)


def start_workload(procs: Processes) -> str:
    """Workers, a coordinator, a scheduler and the dashboard; the dashboard's base URL."""
    app = ["--app", "streamflow.dag.demo:app", "--block-ms", "200"]
    for name, roles in (
        ("worker-1", ["demo.readings", "demo.clean", "demo.enrich", "demo.report"]),
        ("worker-2", ["demo.clean", "demo.enrich", "demo.alert"]),
    ):
        role_args = [arg for role in roles for arg in ("--role", role)]
        procs.start(
            name,
            "worker",
            *app,
            *procs.connection(),
            *role_args,
            "--consumer-name",
            name,
            ready=" serving ",
        )
    procs.start(
        "coordinator-1",
        "coordinator",
        *procs.connection(),
        "--consumer-name",
        "coordinator-1",
        ready=" coordinator coordinator-1 on ",
    )
    procs.start("scheduler", "scheduler", *procs.connection())
    port = free_port()
    procs.start("dashboard", "dashboard", *procs.connection(), "--port", str(port))
    wait_for(lambda: status(port, "/static/style.css") == 200, 30, "the dashboard answers")
    return f"http://127.0.0.1:{port}"


def add_schedules(procs: Processes) -> None:
    """Three schedules: one every minute, one nightly (paused), one that ran once (run now)."""
    alert = '{"sensor": "s7", "celsius": 31.5}'
    procs.cli("schedule", "add", "sensor-check", "--role", "demo.alert", "--every", "60",
              "--payload", alert)  # fmt: skip
    procs.cli("schedule", "add", "nightly-report", "--role", "demo.alert", "--cron", "30 2 * * *",
              "--timezone", "Europe/Berlin", "--payload", alert)  # fmt: skip
    procs.cli("schedule", "add", "weekly-audit", "--role", "demo.alert", "--cron", "0 6 * * 1",
              "--payload", alert)  # fmt: skip
    procs.cli("schedule", "pause", "nightly-report")
    procs.cli("schedule", "run-now", "weekly-audit")


async def seed(url: str) -> dict[str, str]:
    """Plain jobs (some dead-lettered, one delayed), a finished task and a streaming one."""
    async with Client.from_url(url, namespace=NAMESPACE) as client:
        for n in range(24):
            await client.publish("demo.alert", {"sensor": f"s{n % 6}", "celsius": 30 + n / 4})
        dead = [  # invalid payloads: dead letters
            await client.publish("demo.alert", bad)
            for bad in ({"sensor": "s4", "celsius": "hot"}, {"sensor": "s9"}, "<b>not json</b>")
        ]
        await client.publish("demo.alert", {"sensor": "s2", "celsius": 33.0}, delay=3600)
        finished = await client.submit(demo.graph(batches=8, pause=0.01))
        for _ in range(300):
            state = await client.task(finished)
            if state is not None and state.terminal:
                break
            await asyncio.sleep(0.1)
        streaming = await client.submit(demo.graph(batches=400, pause=0.25))
        return {"dead": dead[0], "task": streaming}


def capture(browser: Browser, out: Path, name: str, squeeze: Callable[[Path], None]) -> None:
    """The page open in ``browser`` at each width and scheme, into ``out/name-width-scheme.png``."""
    for scheme in SCHEMES:
        browser.color_scheme(scheme)
        for label, width in WIDTHS.items():
            shot = out / f"{name}-{label}-{scheme}.png"
            browser.screenshot(shot, width, max_height=MAX_HEIGHT)
            squeeze(shot)
            shot_width, _, values = png_facts(shot.read_bytes())
            if shot_width != width or values <= 32:
                raise SystemExit(f"{shot}: looks empty ({shot_width} px wide, {values} values)")
            print(f"{shot.relative_to(ROOT)}: {shot.stat().st_size // 1024} KiB")
    browser.color_scheme("light")


def squeezer() -> Callable[[Path], None]:
    """Pngquant (256 colours, in place) when it is installed; else leave the PNGs as they are."""
    found = shutil.which("pngquant")
    if found is None:
        print("pngquant not found: the PNGs are kept at full colour (larger)")
        return lambda path: None

    def squeeze(path: Path) -> None:
        subprocess.run(
            [found, "--force", "--skip-if-larger", "--strip", "--ext", ".png", "256", str(path)],
            check=False,
        )

    return squeeze


def shoot(browser: Browser, base: str, ids: dict[str, str], out: Path) -> None:
    """Every page, the streaming task first (while it streams)."""
    squeeze = squeezer()
    browser.goto(f"{base}/tasks/{ids['task']}")
    wait_for(
        lambda: browser.evaluate(
            "document.querySelectorAll('g.node[data-state=succeeded], g.node[data-state=running]')"
            ".length >= 3 && document.querySelectorAll('#timeline-rows tr').length > 12"
        ),
        60,
        "the task streams through several nodes",
    )
    capture(browser, out, "task", squeeze)
    pages = {
        "overview": "/",
        "workers": "/workers",
        "role": "/roles/demo.readings",  # the task's source job runs
        "job": f"/jobs?id={ids['dead']}",
        "tasks": "/tasks",
        "deadletters": "/deadletters/demo.alert",
        "schedules": "/schedules",
    }
    for name, path in pages.items():
        browser.goto(base + path)
        if name == "overview":  # the sparklines once the first live update came
            time.sleep(1.5)
        capture(browser, out, name, squeeze)


@contextlib.contextmanager
def everything(logs: Path) -> Iterator[tuple[Processes, Browser, str, dict[str, str]]]:
    """Redis, the workload, the seeded data and a browser; all stopped on exit."""
    with RedisServer() as server:
        procs = Processes(server.url, logs)
        browser: Browser | None = None
        try:
            base = start_workload(procs)
            add_schedules(procs)
            ids = asyncio.run(seed(server.url))
            browser = Browser(logs / "profile")
            yield procs, browser, base, ids
        finally:
            if browser is not None:
                browser.close()
            procs.stop()


def main() -> None:
    """Take the screenshots; on failure, print the tail of every process's log."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "assets" / "dashboard")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sf-shots-") as tmp:
        try:
            with everything(Path(tmp)) as (_, browser, base, ids):
                shoot(browser, base, ids, out)
        except BaseException:
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
            raise


if __name__ == "__main__":
    main()
