"""Headless Chromium (Debian's package) driven over the DevTools protocol, for page tests.

Loopback only: the debugging port binds 127.0.0.1, and Chromium's own background networking is off.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from websockets.sync.client import connect

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,2000",
]


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("Chromium is not installed (scripts/test installs Debian's `chromium` package)")


@dataclass
class PageLoad:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    screenshot: bytes = b""
    viewport_width: int = 0
    page_width: int = 0  # the document's scroll width: wider than the viewport means a sideways scrollbar
    past_right_edge: list[str] = field(default_factory=list)  # images and tables that end past the viewport


# Elements a reader would have to scroll sideways to see (their right edge beyond the window's).
LAYOUT_PROBE = """JSON.stringify({
  viewport: window.innerWidth,
  page: document.documentElement.scrollWidth,
  past: [...document.querySelectorAll('img, table')]
    .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
    .map(e => e.tagName.toLowerCase() + ' ' + (e.id || e.getAttribute('alt') || ''))
})"""


def load_page(url: str, settle_seconds: float = 1.0, timeout: float = 60.0) -> PageLoad:
    profile = Path(tempfile.mkdtemp(prefix="fiqa-chromium-"))
    process = subprocess.Popen(
        [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("Chromium did not start")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        # DevTools may answer before the first tab exists (a slow start): wait for the page target
        socket_url = None
        while socket_url is None:
            targets = json.loads(
                urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout).read()
            )
            socket_url = next((t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"), None)
            if socket_url is None:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("Chromium started without a page")
                time.sleep(0.1)
        result = PageLoad()
        with connect(socket_url, max_size=None, open_timeout=timeout) as socket:
            counter = 0

            def send(method: str, **params) -> int:
                nonlocal counter
                counter += 1
                socket.send(json.dumps({"id": counter, "method": method, "params": params}))
                return counter

            def handle(message: dict) -> None:
                method, params = message.get("method"), message.get("params", {})
                if method == "Runtime.exceptionThrown":
                    result.console_errors.append(params["exceptionDetails"].get("text", "exception"))
                elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    result.console_errors.append(str(params.get("args")))
                elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                    result.console_errors.append(params["entry"].get("text", ""))
                elif method == "Network.requestWillBeSent":
                    result.requests.append(params["request"]["url"])
                elif method == "Page.javascriptDialogOpening":
                    result.dialogs.append(params.get("message", ""))

            def wait_for(predicate, seconds: float) -> dict | None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    try:
                        message = json.loads(socket.recv(timeout=max(0.01, end - time.monotonic())))
                    except TimeoutError:
                        return None
                    handle(message)
                    if predicate(message):
                        return message
                return None

            for method in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"):
                request = send(method)
                wait_for(lambda m, request=request: m.get("id") == request, timeout)
            send("Page.navigate", url=url)
            if wait_for(lambda m: m.get("method") == "Page.loadEventFired", timeout) is None:
                raise RuntimeError(f"{url} did not load")
            wait_for(lambda m: False, settle_seconds)  # late console messages and requests
            request = send("Runtime.evaluate", expression=LAYOUT_PROBE, returnByValue=True)
            reply = wait_for(lambda m: m.get("id") == request, timeout)
            if reply is None:
                raise RuntimeError(f"no layout of {url} within {timeout:g} s")
            layout = json.loads(reply["result"]["result"]["value"])
            result.viewport_width, result.page_width = layout["viewport"], layout["page"]
            result.past_right_edge = layout["past"]
            request = send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            reply = wait_for(lambda m: m.get("id") == request, timeout)
            if reply is None:
                raise RuntimeError(f"no screenshot of {url} within {timeout:g} s")
            result.screenshot = base64.b64decode(reply["result"]["data"])
        return result
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)
