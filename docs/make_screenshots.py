"""Screenshots of the clinician app (the reading station) for the README, in a real headless Chromium.

    python docs/make_screenshots.py RUN_DIR [--data-root DIR ...] [-o docs] [--case TITLE] [--phrase TEXT]

Starts `medssl app RUN_DIR --data-root ...` on a free port of 127.0.0.1, opens it in Debian's `chromium` (WebGL
through SwiftShader) at 1366 x 768 and drives it as a reader would (`medssl/bench/browser.py`): chooses the case
(default: the first test case whose report has a finding the model grounds), grounds the finding (`--phrase`,
default: the first report row of kind finding), jumps to the map's peak and writes
- app_reading_1366x768.png and app_reading_1920x1080.png: the case with the map;
- app_followup_1366x768.png: the patient's other study side by side (the same phrase grounded in both), each
  pane's cursor on its own study's lesion (when the case has a lesion mask) and the lesion measured in both with
  the distance tool (a ctrl-drag across it), the read-out giving both lengths and their difference;
- app_control_1366x768.png: the same phrase from the model and from its control (the untrained scorer).
It prints what the pages said (the case, the phrase, the score, the read-out at the peak, which names the lesion
it lies in, the measured lengths), for the README's captions. Regenerate them with the final model by pointing it at that run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from medssl.app import session
from medssl.bench.browser import VIEWER, AppServer, Browser, find_chromium
from medssl.display.slicing import voxel_to_mm

SIZES = ((1366, 768), (1920, 1080))


def viewer_state(browser: Browser) -> dict:
    return json.loads(browser.evaluate(f"JSON.stringify(({VIEWER} || {{}}).frame?.dataset || {{}})") or "{}")


def settle(browser: Browser, loaded: int | None = None, timeout: float = 180.0) -> None:
    """Until the app has finished its run and the viewport has loaded (at least `loaded` times) and applied it."""
    browser.wait_idle(timeout=timeout, settle=0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = viewer_state(browser)
        if "error" in state:
            raise SystemExit(f"viewer error: {state['error']}")
        if "ready" in state and (loaded is None or int(state.get("loaded", 0)) >= loaded):
            time.sleep(1.0)
            return
        time.sleep(0.2)
    raise TimeoutError("the viewport did not load")


def lesion_line(case: session.Case, phrase: str) -> tuple[str, list[float], list[float]] | None:
    """The case's lesion that `phrase` describes best (the most words of its name in the phrase) and a right-left
    line across it through its centre, on the voxels' outer faces (what a reader measures): (name, start mm,
    end mm); None without a lesion mask."""
    if case.lesion_mask is None:
        return None
    view = session.load_view_volume(case.image)
    masks = session.label_masks(case.lesion_mask, view, case.lesion_names, "lesion")
    words = set(phrase.lower().replace(".", " ").split())
    name = max(masks, key=lambda n: len(words & set(n.lower().replace("(", " ").replace(")", " ").split())))
    x, y, z = session.mask_centre(masks[name])
    row = np.flatnonzero(masks[name][:, y, z])
    return (name, list(voxel_to_mm(view.volume.affine, (row.min() - 0.5, y, z))),
            list(voxel_to_mm(view.volume.affine, (row.max() + 0.5, y, z))))


def shot(browser: Browser, path: Path) -> Path:
    """A screenshot of the page scrolled to its top (clicking a button scrolls it into view)."""
    browser.scroll_to(0)
    browser.frames_drawn(10)
    time.sleep(0.5)
    return browser.screenshot(path)


def sidebar_choice(browser: Browser, label: str) -> None:
    """Click a radio option of the sidebar by its label and close the sidebar again."""
    browser.sidebar(True)
    browser.click_text(label)
    browser.wait_idle(timeout=300)
    browser.sidebar(False)


def measure_across(browser: Browser, pane: str, start: list[float], end: list[float]) -> None:
    """A ctrl-drag with the distance tool from `start` to `end` (RAS mm) on pane `pane`'s main plane."""
    browser.scroll_to(0)  # clicking a button scrolled it into view
    browser.frames_drawn(5)
    a = browser.evaluate(f"{VIEWER}.pagePoint({json.dumps(pane)}, {json.dumps(start)})")
    b = browser.evaluate(f"{VIEWER}.pagePoint({json.dumps(pane)}, {json.dumps(end)})")
    browser.drag((a["x"], a["y"]), (b["x"], b["y"]), modifiers=2)
    time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="grounding run directories (or ground infer outputs)")
    parser.add_argument("--data-root", action="append", default=[], type=Path)
    parser.add_argument("-o", "--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--case", help="case title as the app lists it, e.g. 'P002 / S2 (test)'")
    parser.add_argument("--phrase", help="report row to ground (default: the case's first finding)")
    args = parser.parse_args(argv)
    if find_chromium() is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    library = session.discover(args.runs, args.data_root)
    if not library.manifests:
        print("no manifest under the run's data folders: the screenshots need a case with a report", file=sys.stderr)
        return 2
    cases, _ = session.cases_from_manifest(library, library.manifests[0])
    case = next((c for c in cases if c.title == args.case), None) if args.case else next(
        c for c in cases if "(test)" in c.title and c.lesion_names and session.other_studies(cases, c))
    phrase = args.phrase or next(s.text for s in session.report_statements(case.report) if s.kind == "finding")
    prior = session.other_studies(cases, case)[0] if session.other_studies(cases, case) else None
    args.out.mkdir(parents=True, exist_ok=True)
    follow_up = ""
    written = []
    with AppServer(args.runs, args.data_root) as server, Browser(width=1366, height=768) as browser:
        browser.open(server.url)
        browser.wait_text("Report", timeout=180)
        settle(browser)
        browser.sidebar(True)
        browser.select("Case (patient / study)", case.title)
        browser.sidebar(False)
        browser.wait_text(f"{case.title} · ", timeout=180)
        settle(browser)
        browser.click_text(phrase)
        browser.wait_text("groundable", timeout=300)
        settle(browser)
        if "Jump to peak" in browser.text():
            browser.click_text("Jump to peak")
            settle(browser)
        reading = browser.text()  # the read-out at the peak names the lesion it lies in, if any
        for width, height in SIZES:
            browser.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                         mobile=False)
            browser.frames_drawn(10)
            time.sleep(1.5)
            written.append(shot(browser, args.out / f"app_reading_{width}x{height}.png"))
        browser.send("Emulation.setDeviceMetricsOverride", width=1366, height=768, deviceScaleFactor=1, mobile=False)
        time.sleep(1.0)
        if prior is not None:
            sidebar_choice(browser, "prior study (follow-up)")
            browser.wait_text(f"{prior.title}:", timeout=300)
            settle(browser)
            line, line_b = lesion_line(case, phrase), lesion_line(prior, phrase)
            if line and line_b:
                browser.click_text(f"Centre on {line[0]}")
                settle(browser)
                browser.click_text(f"Centre {prior.title} on {line_b[0]}")
                settle(browser)
                measure_across(browser, "A", line[1], line[2])
                settle(browser)
                measure_across(browser, "B", line_b[1], line_b[2])
                settle(browser)
            written.append(shot(browser, args.out / "app_followup_1366x768.png"))
            follow_up = browser.text()
            sidebar_choice(browser, "none")
            settle(browser)
        sidebar_choice(browser, "another checkpoint")
        browser.wait_text("untrained scorer", timeout=300)
        settle(browser)
        written.append(shot(browser, args.out / "app_control_1366x768.png"))
        page = "\n".join((reading, follow_up, browser.text()))
    for path in written:
        print(f"wrote {path}")
    print(f"case {case.title}, phrase {phrase!r}; prior {prior.title if prior else None}")
    for line in page.splitlines():
        if any(key in line for key in ("groundable", "organ searched", "read as", "distance", "close call", "−",
                                       "lesions:", "Crosshair")):
            print("  " + line.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
