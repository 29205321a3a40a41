"""Drive the app in a real headless Chromium (Debian's `chromium`) over the DevTools protocol: for `medssl bench
app` (the reading station's measured aims), the end-to-end test (`tests/test_app_browser.py`) and the
screenshots in docs/ (`docs/make_screenshots.py`). A harness for measuring and testing; the app never imports it.

`AppServer` starts `medssl app ...` on a free port of 127.0.0.1 and waits for Streamlit's health check;
`Browser` starts Chromium headless with a fresh profile and no background networking, and offers what
the tests need: open a page, wait for a text or a JavaScript condition, click a button by its text or a
point of the page (a real mouse event), drag, open the sidebar, choose in a selectbox, read the page, save a
PNG screenshot; `VIEWER` is the reading viewport's JavaScript object in the page. The DevTools connection is
a plain websocket (`websockets`, which Streamlit itself depends on).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# WebGL2 for the NiiVue viewport through Chromium's software renderer (SwiftShader); no GPU needed
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--ignore-gpu-blocklist", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--disable-extensions")
# JavaScript: true while Streamlit is running the script (its status widget shows "Running...")
APP_BUSY = ("!!document.querySelector('[data-testid=\"stStatusWidget\"]') || "
            "!document.querySelector('[data-testid=\"stApp\"]')")


# JavaScript: the reading viewport's `.mv` element (inside the component's shadow root) and its Viewer object
FRAME = ("(() => { const h = document.querySelector('[data-testid=\"stBidiComponentIsolated\"]');"
         " return h && h.shadowRoot ? h.shadowRoot.querySelector('.mv') : null; })()")
VIEWER = f"({FRAME} || {{}}).viewer"


def find_chromium() -> str | None:
    """The path of a Chromium/Chrome binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
        return response.read().decode("utf-8")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class AppServer:
    """`medssl app RUN_DIR ... --data-root DIR ... --port P` in its own process group, on 127.0.0.1."""

    def __init__(self, runs: Sequence[os.PathLike], data_roots: Sequence[os.PathLike] = (), *,
                 port: int | None = None, log: os.PathLike | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "medssl.cli", "app", *(str(r) for r in runs), "--port", str(self.port)]
        for root in data_roots:
            command += ["--data-root", str(root)]
        self.command = command
        self.log = Path(log) if log else Path(tempfile.mkstemp(prefix="medssl-app-", suffix=".log")[1])
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> AppServer:
        handle = open(self.log, "w", encoding="utf-8")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(self.command, stdout=handle, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log.read_text(encoding="utf-8")[-2000:]
                raise RuntimeError(f"medssl app exited with {self.process.returncode}: {log}")
            try:
                if _get(f"{self.url}/_stcore/health").strip() == "ok":
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        self.__exit__()
        log = self.log.read_text(encoding="utf-8")[-2000:]
        raise RuntimeError(f"medssl app did not answer on {self.url} within 90 s: {log}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            _stop(self.process)


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary: str | None = None, *, width: int = 1600, height: int = 1200):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise RuntimeError("no chromium on PATH (apt-get install chromium)")
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="medssl-chromium-")
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._ids = itertools.count(1)
        self._ws: Any = None

    def __enter__(self) -> Browser:
        self.process = subprocess.Popen(
            [self.binary, *CHROMIUM_FLAGS, f"--remote-debugging-port={self.port}",
             "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                pages = [t for t in json.loads(_get(f"http://127.0.0.1:{self.port}/json/list")) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        self._ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=2**28, open_timeout=10)
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                  mobile=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ws is not None:
            self._ws.close()
        if self.process is not None:
            _stop(self.process)
        shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method: str, *, timeout: float = 60.0, **params: Any) -> dict:
        """One DevTools command; returns its result (events received meanwhile are dropped); TimeoutError after
        `timeout` seconds without it."""
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=timeout))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """The value of a JavaScript expression in the page (a promise: its result)."""
        result = self.send("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"javascript: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def wait(self, condition: str, timeout: float = 60.0, what: str = "") -> None:
        """Until the JavaScript `condition` is true."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(condition):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:g} s for {what or condition}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_text(self, text: str, timeout: float = 60.0) -> None:
        self.wait(f"!!document.body && document.body.innerText.includes({json.dumps(text)})", timeout, repr(text))

    def wait_idle(self, timeout: float = 60.0, settle: float = 0.3) -> None:
        """Until the app's script run is over (and `settle` seconds more, for images to paint)."""
        time.sleep(0.15)
        self.wait(f"!({APP_BUSY})", timeout, "the app to finish running")
        time.sleep(settle)

    def click_text(self, text: str, nth: int = 0, selector: str = "button, [role='tab'], label") -> None:
        """Click the `nth` element (a button, tab or radio/checkbox label by default) whose text is `text` (or, when
        none is, that contains it: an icon's name is part of a button's text), with a real mouse event."""
        box = self.evaluate(f"""(() => {{
            const all = [...document.querySelectorAll({json.dumps(selector)})], t = {json.dumps(text)};
            const exact = all.filter(b => b.innerText.trim() === t);
            const found = exact.length ? exact : all.filter(b => b.innerText.includes(t));
            const b = found[{nth}]; if (!b) return null; b.scrollIntoView({{block: 'center'}});
            const r = b.getBoundingClientRect(); return [r.x + Math.min(r.width / 2, 40), r.y + r.height / 2]; }})()""")
        if box is None:
            raise RuntimeError(f"nothing to click with the text {text!r} on the page")
        self.click(*box)

    def click(self, x: float, y: float) -> None:
        """A left click at page coordinates (CSS pixels of the viewport)."""
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def drag(self, start: Sequence[float], end: Sequence[float], *, button: str = "left", modifiers: int = 0,
             steps: int = 8) -> None:
        """A real mouse drag from `start` to `end` (page coordinates) with `button` held (modifiers: 2 = ctrl,
        8 = shift)."""
        buttons = {"left": 1, "right": 2, "middle": 4}[button]
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=start[0], y=start[1], modifiers=modifiers)
        self.send("Input.dispatchMouseEvent", type="mousePressed", x=start[0], y=start[1], button=button,
                  buttons=buttons, clickCount=1, modifiers=modifiers)
        for n in range(1, steps + 1):
            x = start[0] + (end[0] - start[0]) * n / steps
            y = start[1] + (end[1] - start[1]) * n / steps
            self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button=button, buttons=buttons,
                      modifiers=modifiers)
        self.send("Input.dispatchMouseEvent", type="mouseReleased", x=end[0], y=end[1], button=button, buttons=0,
                  clickCount=1, modifiers=modifiers)

    def frames_drawn(self, frames: int = 2) -> None:
        """Until the page has drawn `frames` more frames: headless Chromium moves CSS transitions (the sidebar's)
        and the layout after them only as it draws frames."""
        self.evaluate(f"new Promise(r => {{ let n = {int(frames)}; "
                      "const f = () => (--n > 0 ? requestAnimationFrame(f) : r()); requestAnimationFrame(f); })")

    def sidebar(self, open_: bool) -> None:
        """Open or close Streamlit's sidebar (the app starts with it collapsed)."""
        state = ("(() => { const s = document.querySelector('[data-testid=\"stSidebar\"]');"
                 " return !!s && s.getBoundingClientRect().width > 50 && s.getBoundingClientRect().x >= 0; })()")
        if self.evaluate(state) == open_:
            return
        button = ("[data-testid='stExpandSidebarButton']" if open_ else
                  "[data-testid='stSidebar'] [data-testid='stSidebarCollapseButton'] button, "
                  "[data-testid='stSidebarCollapseButton'] button, [data-testid='stSidebarHeader'] button")
        box = self.evaluate(f"""(() => {{ const b = document.querySelector({json.dumps(button)}); if (!b) return null;
            b.scrollIntoView({{block: 'nearest'}}); const r = b.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        if box is None:
            raise RuntimeError(f"no button to {'open' if open_ else 'close'} the sidebar")
        self.frames_drawn()
        self.click(*box)
        deadline = time.monotonic() + 10
        while self.evaluate(state) != open_:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sidebar did not {'open' if open_ else 'close'}")
            self.frames_drawn()
        self.frames_drawn(20)  # the transition's end and the page's layout after it

    def select(self, label: str, option: str) -> None:
        """Choose `option` in the selectbox labelled `label` as a keyboard user does: focus it, type the option's
        text (Streamlit's selectboxes filter as one types), Enter."""
        found = self.evaluate(f"""(() => {{ const i = document.querySelector('input[aria-label={json.dumps(label)}]');
            if (!i) return false; i.focus(); return true; }})()""")
        if not found:
            raise RuntimeError(f"no selectbox labelled {label!r}")
        self.send("Input.insertText", text=option)
        self.frames_drawn()
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def scroll_to(self, y: float) -> None:
        self.evaluate(f"(() => {{ const m = document.querySelector('[data-testid=\"stMain\"]') || "
                      f"document.scrollingElement; m.scrollTo(0, {float(y)}); window.scrollTo(0, {float(y)}); }})()")

    def screenshot(self, path: os.PathLike) -> Path:
        """A PNG of the viewport."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
