"""End to end in a real headless Chromium (Debian's `chromium`; `make test` installs it where apt-get can):
`medssl app` on a free port of 127.0.0.1, the demo-like case opened, a finding grounded, a real click on a
plane moving the crosshair, a screenshot saved."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_app import LESION, AppData, app_data  # noqa: F401 - the session fixture, trained once for both files

from browser import AppServer, Browser, find_chromium

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(find_chromium() is None,
                                 reason="Debian's chromium is not installed and could not be (make test runs "
                                        "'apt-get install chromium' where it is root with apt-get)")]

AXIAL_SRC = """(() => { const f = [...document.querySelectorAll('iframe')]
    .filter(f => (f.title || '').includes('streamlit_image_coordinates'))[0];
    const img = f && f.contentDocument && f.contentDocument.getElementById('image');
    return img && img.complete ? img.src : null; })()"""
READOUT = "(document.body.innerText.match(/crosshair voxel \\([0-9, ]+\\)/) || [''])[0]"


def test_the_app_in_a_real_browser(app_data: AppData, tmp_path) -> None:  # noqa: F811
    with AppServer([app_data.run], [app_data.signals], log=tmp_path / "app.log") as server, \
            Browser(width=1600, height=1300) as browser:
        assert server.url.startswith("http://127.0.0.1:")
        browser.open(server.url)
        browser.wait_text("P007 / S2 (test)", timeout=120)
        browser.wait_idle()
        assert len(browser.frames()) == 3  # three clickable planes
        before = browser.evaluate(READOUT)
        _click_until_the_crosshair_moves(browser, before)
        browser.click_text(LESION)
        browser.wait_text("groundable, score", timeout=120)
        browser.wait_idle()
        browser.click_text("Jump to peak")
        browser.wait_idle(settle=1.0)
        with_map = browser.evaluate(AXIAL_SRC)
        text = browser.text()
        assert "Traceback" not in text and not browser.evaluate(
            "document.querySelectorAll('[data-testid=\"stException\"], [data-testid=\"stAlertContentError\"]').length")
        shot = browser.screenshot(tmp_path / "app_grounded.png")
        browser.click_text("Heart: no focal lesion.")  # not groundable: the same slice without a map
        browser.wait_text("not groundable", timeout=60)
        browser.wait_idle(settle=1.0)
        assert browser.evaluate(AXIAL_SRC) != with_map
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (1300, 1600, 3) and pixels.std() > 20
    colour = np.abs(pixels[..., 0].astype(int) - pixels[..., 2].astype(int)) > 60  # overlay, letters, controls
    assert colour.mean() > 0.001
    print(f"screenshot: {shot}")


def _click_until_the_crosshair_moves(browser: Browser, before: str, tries: int = 4) -> None:
    """A real mouse click on the coronal plane, lower right quarter. The component's iframe can report the
    image loaded before its click handler is attached (seen 1 run in 3 on a loaded CPU), so a click that
    moves nothing within 20 s is repeated; the crosshair must move within `tries` clicks."""
    for attempt in range(tries):
        box = browser.frames()[1]
        browser.click(box["x"] + 0.8 * box["width"], box["y"] + 0.8 * box["height"])
        try:
            browser.wait(f"{READOUT} !== {before!r}", timeout=20, what="the crosshair to move")
            return
        except TimeoutError:
            if attempt == tries - 1:
                raise
