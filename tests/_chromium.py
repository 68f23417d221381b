"""A small DevTools-protocol client for headless Chromium (Debian package ``chromium``): load a file:// page, wait
until it says it is ready, collect console errors / uncaught exceptions / failed loads, take a screenshot.

Flags: headless, no sandbox (root in CI), software WebGL (SwiftShader through ANGLE), no background networking or
component updates (the CI machine has no network), a fresh profile folder.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


@dataclass
class PageResult:
    png: bytes
    errors: list[str] = field(default_factory=list)
    ready: Any = None
    value: Any = None


def _flags(profile: str) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--use-gl=angle",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "--window-size=1400,1100",
    ]


class _Session:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout=60.0):
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            data = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if data.get("id") == self.next_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
            self.events.append(data)
        raise TimeoutError(method)


def load_page(
    url: str, *, ready_js: str, timeout: float = 90.0, value_js: str | None = None, before_shot_js: str | None = None
) -> PageResult:
    """Open ``url``, wait until ``ready_js`` evaluates truthy (or ``timeout``), screenshot the viewport.

    Errors collected: ``console.error``/``console.assert`` calls, uncaught exceptions, and error-level log entries
    (failed resource loads, security/CORS refusals).
    """
    from websockets.sync.client import connect

    exe = chromium_path()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    profile = tempfile.mkdtemp(prefix="medcam-chromium-")
    proc = subprocess.Popen(
        [exe, *_flags(profile), "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        ws_url = None
        end = time.monotonic() + 60
        while time.monotonic() < end and ws_url is None:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError("chromium exited before the DevTools endpoint was up")
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                ws_url = m.group(1)
        if ws_url is None:
            raise RuntimeError("no DevTools endpoint from chromium")
        with connect(ws_url, max_size=None, open_timeout=30) as ws:
            s = _Session(ws)
            target = s.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = s.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                s.call(domain, session=sid)
            s.call("Page.navigate", {"url": url}, session=sid)
            ready = None
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                r = s.call(  # the page's main thread may be busy decoding volumes: wait for it
                    "Runtime.evaluate",
                    {"expression": ready_js, "returnByValue": True},
                    session=sid,
                    timeout=max(1.0, end - time.monotonic()),
                )
                ready = r.get("result", {}).get("value")
                if ready:
                    break
                time.sleep(0.5)
            time.sleep(1.0)  # let the last frame render
            value = None
            if value_js:
                value = s.call("Runtime.evaluate", {"expression": value_js, "returnByValue": True}, session=sid)
                value = value.get("result", {}).get("value")
            if before_shot_js:
                s.call("Runtime.evaluate", {"expression": before_shot_js}, session=sid)
                time.sleep(1.0)
            shot = s.call("Page.captureScreenshot", {"format": "png"}, session=sid)
            errors = []
            for ev in s.events:
                meth, p = ev.get("method"), ev.get("params", {})
                if meth == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    errors.append(
                        "console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                    )
                elif meth == "Runtime.exceptionThrown":
                    d = p.get("exceptionDetails", {})
                    errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
                elif meth == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                    errors.append("log: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
            return PageResult(base64.b64decode(shot["data"]), errors, ready, value)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def file_url(path: Path) -> str:
    return Path(path).resolve().as_uri()
