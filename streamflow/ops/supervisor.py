"""``streamflow worker --processes N``: run N worker processes under one parent.

The parent forwards SIGTERM/SIGINT to every child (a second signal kills them), and restarts a
child that dies, with a capped backoff so a child that crashes at start-up does not spin.
Children run in their own session, so a Ctrl-C in the terminal reaches them only through the
parent, once.

Children die with their parent, however it ends (SIGKILL, OOM killer, crash): each child holds
the read end of a pipe whose only write end the parent holds, so the child reads EOF the moment
the parent is gone (every POSIX system), and on Linux it also asks the kernel for SIGTERM when its
parent dies (``PR_SET_PDEATHSIG``). Either way it stops as on SIGTERM: in-flight handlers get the
shutdown grace and unfinished entries are released for another worker. Without this, the children
of a SIGKILLed supervisor kept serving with no one to stop or restart them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

import anyio

from streamflow import config
from streamflow.config import WorkerSettings
from streamflow.errors import ConfigError
from streamflow.ops.server import set_parent_death_signal

logger = logging.getLogger(__name__)

#: A child that lived at least this long is considered healthy: its restart backoff resets.
HEALTHY_AFTER = 10.0
MAX_RESTART_DELAY = 30.0


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_delay: float = 0.5
    restart_at: float = 0.0
    # The parent's end of the child's lifeline pipe: closed when the parent dies, however.
    lifeline: int | None = None


def child_settings(settings: WorkerSettings, index: int, lifeline: int) -> WorkerSettings:
    """The settings of child ``index``, whose end of the lifeline pipe is fd ``lifeline``.

    One process each, with its own consumer name and metrics port, and no start-up checks: the
    parent ran them once for all children.

    Raises:
        ConfigError: The child's metrics port is past 65535.
    """
    update: dict[str, object] = {
        "processes": 1,
        "server_checks": False,
        "parent_pid": os.getpid(),
        "parent_fd": lifeline,
    }
    if settings.consumer_name:
        update["consumer_name"] = f"{settings.consumer_name}-{index}"
    if settings.metrics_port:  # 0: each child picks a free port
        update["metrics_port"] = port = settings.metrics_port + index
        if port > 65_535:
            raise ConfigError(f"--metrics-port {settings.metrics_port} + {index} is past 65535")
    child = config.build(WorkerSettings, **{**dict(settings), **update})
    assert isinstance(child, WorkerSettings)
    return child


def child_command(settings: WorkerSettings) -> list[str]:
    """The command line of a child (the Redis URL and TLS files go in its environment)."""
    return [sys.executable, "-m", "streamflow", "worker", *config.command_line(settings)]


def supervise(settings: WorkerSettings) -> int:
    """Run ``settings.processes`` workers until a signal stops them; returns the exit code."""
    env = dict(os.environ)
    env.pop("STREAMFLOW_PROCESSES", None)
    env.update(settings.environment())  # the URL, namespace and TLS files
    children = [_Child(i) for i in range(settings.processes)]
    signals: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _loop(settings, env, children, signals)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.kill()
                child.process.wait()
            _cut_lifeline(child)


def _loop(
    settings: WorkerSettings, env: dict[str, str], children: list[_Child], signals: list[int]
) -> int:
    forwarded = 0
    while True:
        if len(signals) > forwarded:
            forwarded = len(signals)
            _forward(children, signal.SIGTERM if forwarded == 1 else signal.SIGKILL)
        if forwarded:
            if all(c.process is None or c.process.poll() is not None for c in children):
                logger.info("all %d worker processes stopped", len(children))
                return 0
        else:
            for child in children:
                _keep_alive(settings, env, child)
        time.sleep(0.1)


def _forward(children: list[_Child], signum: signal.Signals) -> None:
    logger.info("sending %s to %d worker processes", signum.name, len(children))
    for child in children:
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signum)


def _keep_alive(settings: WorkerSettings, env: dict[str, str], child: _Child) -> None:
    now = time.monotonic()
    if child.process is None:
        if now >= child.restart_at:
            _spawn(settings, env, child)
            child.started = now
        return
    code = child.process.poll()
    if code is None:
        return
    _cut_lifeline(child)
    lived = now - child.started
    child.restart_delay = (
        0.5 if lived >= HEALTHY_AFTER else min(child.restart_delay * 2, MAX_RESTART_DELAY)
    )
    child.restart_at = now + child.restart_delay
    child.process = None
    logger.warning(
        "worker process %d exited with %s after %.1fs; restarting in %.1fs",
        child.index,
        code,
        lived,
        child.restart_delay,
    )


def _spawn(settings: WorkerSettings, env: dict[str, str], child: _Child) -> None:
    """Start child ``child.index`` with a lifeline: the read end of a pipe only we write to."""
    # os.pipe() fds are not inherited (O_CLOEXEC): every child gets its own read end only, so
    # no child holds another's write end open past the parent's death.
    read_end, write_end = os.pipe()
    try:
        command = child_command(child_settings(settings, child.index, read_end))
        child.process = subprocess.Popen(
            command, env=env, start_new_session=True, pass_fds=(read_end,)
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    child.lifeline = write_end
    logger.info("worker process %d started (pid %d)", child.index, child.process.pid)


def _cut_lifeline(child: _Child) -> None:
    if child.lifeline is not None:
        os.close(child.lifeline)
        child.lifeline = None


# -- in the child ---------------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> bool:
    """In a child of ``--processes N``: have SIGTERM sent when the parent dies (Linux).

    Returns False when the parent is already gone (it died before the request took effect:
    the kernel will not signal for a death that already happened), so the caller exits.

    Args:
        parent_pid: The supervising parent's pid, as it gave it.
    """
    set_parent_death_signal(signal.SIGTERM)
    return os.getppid() == parent_pid


async def wait_parent_gone(fd: int) -> None:
    """Return once the parent's end of the lifeline pipe ``fd`` is closed (the parent died).

    The portable way to notice the parent's death: it needs no ``prctl`` and no polling.
    """
    os.set_blocking(fd, False)
    os.set_inheritable(fd, False)  # not into the handlers' own child processes
    try:
        while True:
            await anyio.wait_readable(fd)
            try:
                if not os.read(fd, 512):
                    return  # EOF: no process holds the write end any more
            except BlockingIOError:
                continue
    finally:
        os.close(fd)
