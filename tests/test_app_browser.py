"""End to end in a real headless Chromium (Debian's `chromium`, WebGL2 through its SwiftShader software renderer;
`make test` installs it where apt-get can): `medssl app` on a free port of 127.0.0.1, the demo-like case opened
in the NiiVue viewport, the mouse wheel moving the slice in the browser, a real click moving the crosshair that
Python's read-out follows, a finding grounded, screenshots at 1366x768 and 1920x1080, and every file the page
fetched coming from the app's own server (requests that try to leave it are refused)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from test_app import LESION, AppData, app_data  # noqa: F401 - the session fixture, trained once for both files

from medssl.app import viewport
from medssl.bench.browser import FRAME, AppServer, Browser, find_chromium

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(find_chromium() is None,
                                 reason="Debian's chromium is not installed and could not be (make test runs "
                                        "'apt-get install chromium' where it is root with apt-get)")]

STATE = f"(() => {{ const f = {FRAME}; return f ? JSON.stringify(f.dataset) : null; }})()"
HERO = (f"(() => {{ const f = {FRAME}; const c = f && f.querySelector('canvas');"
        " if (!c) return null; const r = c.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()")
READ = f"(() => {{ const f = {FRAME}; const r = f && f.querySelector('.mv-read'); return r ? r.textContent : ''; }})()"
PYTHON_READOUT = "(document.body.innerText.match(/voxel \\([0-9, ]+\\) · image/) || [''])[0]"


def test_the_viewport_bundle_is_built() -> None:
    """The web bundle `make install` builds from npm; without it the app cannot show an image."""
    assert viewport.check_bundle().stat().st_size > 1_000_000  # NiiVue inside


def wait_state(browser: Browser, key: str, value: str | None = None, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(browser.evaluate(STATE) or "{}")
        if "error" in state:
            raise AssertionError(f"viewer error: {state['error']}")
        if key in state and (value is None or state[key] == value):
            return state
        time.sleep(0.2)
    raise TimeoutError(f"the viewer did not report {key}={value}: {browser.evaluate(STATE)}")


def test_the_reading_station_in_a_real_browser(app_data: AppData, tmp_path) -> None:  # noqa: F811
    with AppServer([app_data.run], [app_data.signals], log=tmp_path / "app.log") as server, \
            Browser(width=1366, height=768) as browser:
        browser.open(server.url)
        browser.wait_text("P007 / S2 (test)", timeout=120)
        browser.wait_idle()
        wait_state(browser, "loaded")
        x, y, width, height = browser.evaluate(HERO)
        assert width * height >= 0.4 * 1366 * 768 and y + height <= 768  # a large viewport, no scrolling
        # the wheel over the main plane moves the slice in the browser (no Python round trip)
        before = browser.evaluate(READ)
        browser.send("Input.dispatchMouseEvent", type="mouseWheel", x=x + width * 0.3, y=y + height * 0.5,
                     deltaX=0, deltaY=120)
        browser.wait(f"{READ} !== {json.dumps(before)}", timeout=10, what="the wheel to move the slice")
        # a real click moves the crosshair; Python's read-out follows
        python_before = browser.evaluate(PYTHON_READOUT)
        for kind in ("mousePressed", "mouseReleased"):
            browser.send("Input.dispatchMouseEvent", type=kind, x=x + width * 0.25, y=y + height * 0.3,
                         button="left", clickCount=1)
        browser.wait(f"{PYTHON_READOUT} !== {json.dumps(python_before)}", timeout=30, what="Python's read-out")
        browser.screenshot(tmp_path / "opened_1366x768.png")
        browser.click_text(LESION)
        browser.wait_text("groundable, score", timeout=120)
        browser.wait_idle(settle=0.5)
        wait_state(browser, "loaded", "2")
        time.sleep(1.0)
        text = browser.text()
        assert "Traceback" not in text and "viewer error" not in text
        shot = browser.screenshot(tmp_path / "grounded_1366x768.png")
        browser.send("Emulation.setDeviceMetricsOverride", width=1920, height=1080, deviceScaleFactor=1, mobile=False)
        time.sleep(1.5)
        wide = browser.screenshot(tmp_path / "grounded_1920x1080.png")
        fetched = browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
        only_own_files(server.url, fetched, app_data)
    for path, size in ((shot, (768, 1366)), (wide, (1080, 1920))):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape[:2] == size and pixels.std() > 20
        warm = (pixels[..., 0].astype(int) - pixels[..., 2].astype(int)) > 80  # the map's hot colours
        assert warm.mean() > 0.0005, path


def only_own_files(origin: str, fetched: list[str], app_data: AppData) -> None:  # noqa: F811
    """Every file the page fetched came from the app's server, the volumes through its media URLs; URLs that
    try to leave the server's folders are refused."""
    assert fetched and all(url.startswith(origin) for url in fetched), [u for u in fetched if not u.startswith(origin)]
    volumes = [url for url in fetched if "/media/" in url]
    assert len(volumes) >= 3  # image, lesion mask, map: all through the app's own media URLs
    for escape in ("/media/../../../../etc/passwd", "/media/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                   "/_stcore/bidi-components/medssl.viewport/../../../../../../etc/passwd",
                   "/_stcore/bidi-components/medssl.viewport/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                   f"/media/{app_data.manifest.parent}/vol/P007_S2.nii.gz"):
        try:
            with urllib.request.urlopen(origin + escape, timeout=10) as response:  # noqa: S310 - loopback only
                body = response.read()
        except urllib.error.HTTPError as err:
            assert err.code in (400, 403, 404), escape
            continue
        assert b"root:" not in body and not body.startswith(b"\x1f\x8b"), escape
