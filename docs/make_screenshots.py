"""Screenshots of the clinician app for docs/, and the measured redraw time, in a real headless Chromium.

    python docs/make_screenshots.py RUN_DIR [--data-root DIR ...] [-o docs] [--phrase TEXT] [--moves 10]

Starts `medssl app RUN_DIR --data-root ...` on a free port of 127.0.0.1, opens it in Debian's `chromium`
(apt-get install chromium) and writes:
- app_overview.png: the case as it opens (report, the three planes with the crosshair, the signals panel);
- app_grounded_lesion.png: the first finding of the report that names a lesion grounded, the crosshair on
  the case's lesion mask (outlined in magenta; on the map's peak when the case has no mask), region
  statistics below;
- app_comparison.png: the same phrase from the checkpoint and from its randomised control, one crosshair.
Then it moves the axial slider and clicks on the coronal plane `--moves` times each and prints the time from
the key press / click to the new picture being shown (median and maximum). Regenerate the screenshots
with the final model by pointing it at that run directory.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from browser import AppServer, Browser, find_chromium

LESION_WORDS = re.compile(r"lesion|nodule|cyst|mass", re.IGNORECASE)
IMAGE_SRC = """(() => { const f = [...document.querySelectorAll('iframe')]
    .filter(f => (f.title || '').includes('streamlit_image_coordinates'))[%d];
    const img = f && f.contentDocument && f.contentDocument.getElementById('image');
    return img && img.complete ? img.src.length + ':' + img.src.slice(-64) : null; })()"""


def _finding(browser: Browser) -> str:
    texts = browser.evaluate("[...document.querySelectorAll('button')].map(b => b.innerText.trim())")
    for text in texts:
        if not text.startswith("my_location"):  # report rows carry the location icon
            continue
        text = text.replace("my_location", "").strip()
        if LESION_WORDS.search(text) and not re.search(r"\bno\b", text, re.IGNORECASE):
            return text
    raise SystemExit("no report row names a lesion on the opening case; pass --phrase")


def _src(browser: Browser, index: int) -> str | None:
    return browser.evaluate(IMAGE_SRC % index)


def _wait_new(browser: Browser, index: int, before: str | None, timeout: float = 30.0) -> float:
    start = time.perf_counter()
    while True:
        now = _src(browser, index)
        if now is not None and now != before:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the plane did not change")
        time.sleep(0.01)


def measure(browser: Browser, moves: int) -> dict[str, list[float]]:
    """Seconds from an input to the changed picture in the browser: slider key presses and plane clicks."""
    slider = "document.querySelector('input[type=range][aria-label=\"axial slice\"]').focus()"
    times: dict[str, list[float]] = {"slider": [], "click": []}
    for n in range(moves):
        browser.wait_idle(settle=0.2)
        browser.evaluate(slider)
        before = _src(browser, 0)
        key = "ArrowRight" if n % 2 == 0 else "ArrowLeft"
        start = time.perf_counter()
        for kind in ("keyDown", "keyUp"):
            browser.send("Input.dispatchKeyEvent", type=kind, key=key, code=key,
                         windowsVirtualKeyCode=39 if key == "ArrowRight" else 37)
        _wait_new(browser, 0, before)
        times["slider"].append(time.perf_counter() - start)
    frames = browser.frames()
    for n in range(moves):
        browser.wait_idle(settle=0.2)
        box = frames[1]
        before = _src(browser, 0)
        start = time.perf_counter()
        browser.click(box["x"] + box["width"] * (0.35 + 0.03 * n), box["y"] + box["height"] * (0.3 + 0.04 * n))
        _wait_new(browser, 0, before)
        times["click"].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="grounding run directories (or ground infer outputs)")
    parser.add_argument("--data-root", action="append", default=[], type=Path)
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--phrase", help="report row to ground (default: the first that names a lesion)")
    parser.add_argument("--moves", type=int, default=10, help="slider moves and clicks to time (0: none)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    with AppServer(args.runs, args.data_root) as server, Browser(width=args.width, height=args.height) as browser:
        browser.open(server.url)
        browser.wait_text("Report")
        browser.wait_idle(settle=1.0)
        browser.click_text("Signals")
        browser.wait_idle(settle=1.0)
        browser.send("Emulation.setDeviceMetricsOverride", width=args.width, height=args.height + 250,
                     deviceScaleFactor=1, mobile=False)  # tall enough for the signal panel
        time.sleep(1.0)
        browser.screenshot(args.out / "app_overview.png")
        browser.send("Emulation.setDeviceMetricsOverride", width=args.width, height=args.height, deviceScaleFactor=1,
                     mobile=False)
        phrase = args.phrase or _finding(browser)
        browser.click_text(phrase)
        browser.wait_text("groundable, score", timeout=180)
        browser.wait_idle()
        centre = browser.evaluate("[...document.querySelectorAll('button')].map(b => b.innerText.trim())"
                                  ".find(t => t.startsWith('Centre on lesion')) || null")
        browser.click_text(centre or "Jump to peak")  # the case's lesion mask (outlined) when it has one
        browser.wait_idle()
        browser.click_text("Region statistics")
        browser.wait_idle(settle=1.0)
        browser.scroll_to(0)
        time.sleep(0.5)
        browser.screenshot(args.out / "app_grounded_lesion.png")
        times = measure(browser, args.moves) if args.moves else {}
        browser.wait_idle(settle=0.5)
        browser.click_text("Jump to peak")
        browser.wait_idle()
        browser.click_text("another checkpoint")
        browser.wait_text("B:", timeout=180)
        browser.wait_idle(settle=1.5)
        browser.evaluate("document.querySelector('[data-testid=\"stSidebar\"]') && window.scrollTo(0, 0)")
        browser.scroll_to(330)
        time.sleep(0.5)
        browser.screenshot(args.out / "app_comparison.png")
    for name in ("app_overview.png", "app_grounded_lesion.png", "app_comparison.png"):
        print(f"wrote {args.out / name}")
    summary = {kind: {"median_s": round(statistics.median(values), 3), "max_s": round(max(values), 3), "n": len(values)}
               for kind, values in times.items() if values}
    if summary:
        print("redraw in the browser (input -> new picture shown): " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
