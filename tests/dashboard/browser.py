"""A headless chromium driven over the Chrome DevTools Protocol on a pipe (no driver, no download).

``--remote-debugging-pipe`` makes chromium read commands from fd 3 and write replies to fd 4,
NUL-terminated JSON; a shell maps our stdin/stdout pipes onto them. One page, one session.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

#: Seconds one protocol command may take.
COMMAND_TIMEOUT = 30.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_facts(data: bytes) -> tuple[int, int, int]:
    """A PNG's width, height and how many different byte values its decoded scanlines hold.

    A blank page (one colour) decodes to a handful of values; a page with text, lines and
    colours to well over a hundred. Enough to tell an empty screenshot, without pixel checks.
    """
    assert data.startswith(PNG_SIGNATURE), "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    position, compressed = 8, b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            compressed += data[position + 8 : position + 8 + length]
        position += 12 + length
    return width, height, len(set(zlib.decompress(compressed)))


class BrowserError(AssertionError):
    """The browser answered a command with an error, or not in time."""


class Browser:
    """One headless chromium with one page."""

    def __init__(self, profile: Path) -> None:
        found = shutil.which("chromium") or shutil.which("chromium-browser")
        assert found is not None, "chromium is needed (apt-get install chromium; .ci/run does)"
        args = [
            found,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            ["sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "sh", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._next = 0
        self._buffer = b""
        self.dialogs: list[str] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)

    def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = False
    ) -> Any:
        """Run one protocol command; its result."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\0")
        self.process.stdin.flush()
        return self._reply(self._next, method)

    def _reply(self, wanted: int, method: str) -> Any:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                doc = json.loads(raw)
                if doc.get("method") == "Page.javascriptDialogOpening":
                    self.dialogs.append(doc["params"].get("message", ""))
                if doc.get("id") == wanted:
                    if "error" in doc:
                        raise BrowserError(f"{method}: {doc['error']}")
                    return doc.get("result", {})
            self._buffer += self._read(deadline, method)

    def _read(self, deadline: float, method: str) -> bytes:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BrowserError(f"{method}: no reply in {COMMAND_TIMEOUT} s")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise BrowserError(f"{method}: the browser exited")
        return chunk

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            session=True,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        """Open ``url`` and wait until its document has loaded."""
        self.send("Page.navigate", {"url": url}, session=True)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                # A DOM node comes back as {} (falsy here): found is what counts.
                value = self.evaluate(f"(v => v instanceof Node || v)({expression})")
            except BrowserError:  # the page is navigating: its context is gone for a moment
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {expression}\n{self.text()}")
            time.sleep(0.1)

    def click(self, selector: str) -> None:
        """Click the element ``selector`` finds (it must exist)."""
        found = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return false; e.click(); return true; })()"
        )
        assert found, f"nothing matches {selector}:\n{self.text()}"

    def fill(self, selector: str, value: str) -> None:
        """Set the value of the input ``selector`` finds."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).value = {json.dumps(value)}")

    def press(self, key: str) -> None:
        """Press and release one key: ``Tab``, or ``" "`` (space), as a keyboard user does."""
        codes = {"Tab": ("Tab", 9, ""), " ": ("Space", 32, " ")}
        code, number, text = codes[key]
        for kind in ("keyDown", "keyUp"):
            params = {"type": kind, "key": key, "code": code, "windowsVirtualKeyCode": number}
            if kind == "keyDown" and text:
                params["text"] = text
            self.send("Input.dispatchKeyEvent", params, session=True)

    def tab_to(self, expression: str, limit: int = 40) -> None:
        """Press Tab until ``expression`` (about ``document.activeElement``) is true."""
        for _ in range(limit):
            self.press("Tab")
            if self.evaluate(expression):
                return
        raise AssertionError(f"{limit} tabs never reached: {expression}")

    def text(self) -> str:
        """The page's visible text (empty while it navigates)."""
        try:
            return str(self.evaluate("document.body ? document.body.innerText : ''"))
        except BrowserError:
            return ""

    def screenshot(self, path: Path, width: int, *, max_height: int = 4000) -> None:
        """Save a PNG of the page at ``width`` CSS pixels: all of it, up to ``max_height``."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 700},
            session=True,
        )
        # Laid out again at the new width before its height is measured.
        height = self.evaluate(
            "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() =>"
            " r(document.body.scrollHeight))))"
        )
        clip = {"x": 0, "y": 0, "width": width, "height": min(height, max_height), "scale": 1}
        shot = self.send(
            "Page.captureScreenshot",
            {"captureBeyondViewport": True, "clip": clip},
            session=True,
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def color_scheme(self, scheme: str) -> None:
        """Emulate ``prefers-color-scheme: scheme`` (``light`` or ``dark``)."""
        features = [{"name": "prefers-color-scheme", "value": scheme}]
        self.send("Emulation.setEmulatedMedia", {"features": features}, session=True)

    def close(self) -> None:
        """End the browser."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
