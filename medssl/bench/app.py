"""`medssl bench app`: the reading station's aims (issue #18) measured in a real headless Chromium.

1. Writes a synthetic CT (default 512 x 512 x 300, int16 Hounsfield units, .nii.gz: air, body, lungs, liver, spine,
   a 30 mm liver lesion, noise) and a finding's probability map around its lesion as a `medssl ground infer` output
   (`results.json`, map + sidecar with raw_scale "probability") in a temporary data folder (`--work` keeps it).
2. Starts `medssl app` on that folder and times, at `--window` (1366 x 768), from the page's navigation to the
   viewport showing the image with its map: first in the freshly started app (the files read from disk), then on
   reloads (the app's caches warm).
3. Reads the main plane on the page: its share of the window, whether it lies inside it without scrolling, and its
   screen pixels per voxel.
4. Times in the page wheel slicing, ctrl+wheel zoom, middle-drag pan and right-drag width/level: from the event to
   the end of NiiVue's handler (it issues its WebGL draw synchronously), to that frame drawn on the GPU (a 1-pixel
   readPixels waits for it) and to the next animation frame, beside the page's frame time with no event; and the
   wheel from DevTools' input to the next frame (the protocol's round trip included).
5. Times real clicks on the main plane until Python's read-out under the viewport names the clicked voxel.

Medians and maxima are printed against the aims, with the machine (CPUs, load average, Chromium, WebGL renderer).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from medssl.bench.browser import FRAME, VIEWER, AppServer, Browser, find_chromium
from medssl.errors import UserError

LESION_MM = 30.0
PHRASE = "A 30 mm hypodense lesion in the liver."
MEANING = ("synthetic: a ball around the lesion written by medssl bench app (1 at its centre, 0.5 at its edge, 0 "
           "beyond 1.5 radii)")
AIMS = {"share": 0.5, "px_per_voxel": 1.0, "interaction_ms": 50.0, "click_ms": 300.0, "open_s": 5.0}
READOUT = "(document.body.innerText.match(/Crosshair \\([^)]*\\) mm RAS · voxel \\([0-9, ]+\\)/) || [''])[0]"
HAS_MAP = (f"(() => {{ const v = {VIEWER}; const p = v && v.panes && v.panes.get('A'); return !!p && "
           "v.frame.dataset.ready !== undefined && p.nv.volumes.some(x => x.layerKind === 'map'); })()")
HERO_TILE = (f"(() => {{ const v = {VIEWER}; const nv = v.panes.get('A').nv; return v.pagePoint('A', "
             "Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3)).tile; })()")
RENDERER = ("(() => { const gl = document.createElement('canvas').getContext('webgl2'); if (!gl) return 'no WebGL2';"
            " const d = gl.getExtension('WEBGL_debug_renderer_info');"
            " return gl.getParameter(d ? d.UNMASKED_RENDERER_WEBGL : gl.RENDERER); })()")

# In the page: each interaction n times; per event the time until NiiVue's handler has returned (it issues its WebGL
# draw synchronously), until that draw has finished on the (software) GPU (a 1-pixel readPixels waits for it: Chrome's
# gl.finish does not), and until the next
# animation frame after it. Returns {kind: {handled: [ms], finished: [ms], frame: [ms]}, changed: {kind: whether it
# changed what it should}}.
INTERACT = """(async (n) => {
  const v = __VIEWER__; const nv = v.panes.get('A').nv; const c = nv.canvas;
  const hero = v.pagePoint('A', Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3)).tile;
  const x = hero.x + hero.width * 0.45, y = hero.y + hero.height * 0.45;
  const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
  const at = (dx, dy, extra) => ({ clientX: x + dx, clientY: y + dy, bubbles: true, cancelable: true, view: window,
    ...extra });
  const out = { changed: {} }, pixel = new Uint8Array(4);
  const timed = async (kind, fn) => {
    out[kind] = out[kind] || { handled: [], finished: [], frame: [] };
    const t = performance.now(); fn(); out[kind].handled.push(performance.now() - t);
    nv.gl.readPixels(0, 0, 1, 1, nv.gl.RGBA, nv.gl.UNSIGNED_BYTE, pixel);
    out[kind].finished.push(performance.now() - t);
    await frame(); out[kind].frame.push(performance.now() - t);
  };
  out.idle = { frame: [] }; // the page's own frame time, no event: what every interaction below waits for too
  for (let i = 0; i < n; i++) {
    const t = performance.now(); await frame(); out.idle.frame.push(performance.now() - t);
  }
  const slice = () => nv.scene.crosshairPos.join(',');
  const zoom = () => nv.scene.pan2Dxyzmm[3];
  for (const [kind, state, extra] of [['wheel', slice, {}], ['zoom', zoom, { ctrlKey: true }]]) {
    for (let i = 0; i < n; i++) {
      const before = state();
      const deltaY = i % 2 ? 100 : -100;
      await timed(kind, () => c.dispatchEvent(new WheelEvent('wheel', at(0, 0, { deltaY, ...extra }))));
      if (i === 0) out.changed[kind] = state() !== before;
    }
  }
  const image = () => nv.volumes.find((x) => x.layerKind === 'image');
  for (const [kind, button, buttons] of [['pan', 1, 4], ['wl', 2, 2]]) {
    const start = JSON.stringify([nv.scene.pan2Dxyzmm, image().cal_min, image().cal_max]);
    c.dispatchEvent(new MouseEvent('mousedown', at(0, 0, { button, buttons })));
    for (let i = 1; i <= n; i++) {
      const d = 3 * (i <= n / 2 ? i : n - i + 1);
      await timed(kind, () => c.dispatchEvent(new MouseEvent('mousemove', at(d, d, { button, buttons }))));
    }
    out.changed[kind] = JSON.stringify([nv.scene.pan2Dxyzmm, image().cal_min, image().cal_max]) !== start;
    c.dispatchEvent(new MouseEvent('mouseup', at(0, 0, { button, buttons: 0 })));
    await frame();
  }
  nv.scene.pan2Dxyzmm = [0, 0, 0, 1];
  nv.drawScene();
  return JSON.stringify(out);
})""".replace("__VIEWER__", VIEWER)


def check_options(size: tuple[int, int, int], window: str, repeats: int, reloads: int) -> tuple[int, int]:
    """The window as (width, height); UserError (one line) for options that cannot be measured."""
    if len(size) != 3 or any(n < 16 or n > 1024 for n in size):
        raise UserError(f"--size: three voxel counts between 16 and 1024 expected, got {' '.join(map(str, size))}")
    try:
        width, height = (int(v) for v in window.lower().split("x"))
    except ValueError:
        raise UserError(f"--window: WIDTHxHEIGHT in CSS pixels expected (e.g. 1366x768), got {window!r}") from None
    if not (320 <= width <= 7680 and 240 <= height <= 4320):
        raise UserError(f"--window: {width}x{height} is outside 320x240 - 7680x4320")
    if repeats < 1 or reloads < 0:
        raise UserError(f"--repeats must be >= 1 and --reloads >= 0, got {repeats} and {reloads}")
    return width, height


# ----------------------------------------------------------------------------------------------- the case


def synthetic_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A CT-like volume (X, Y, Z) int16 in Hounsfield units, its RAS affine and the lesion's centre (voxels):
    air -1000, an elliptic body 40 with lungs -850 above the liver, a liver 60 with a 30 mm lesion 10, a spine
    700, noise sd 12. Built slice by slice (a 512 x 512 x 300 CT needs no more than its own 150 MB)."""
    nx, ny, nz = shape
    sx, sy, sz = spacing
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    xx, yy = np.meshgrid(x, y, indexing="ij")
    half_x, half_y = 0.42 * nx * sx, 0.33 * ny * sy
    body = (xx / half_x) ** 2 + (yy / half_y) ** 2 <= 1
    spine = (xx ** 2 + (yy + 0.65 * half_y) ** 2) <= (0.12 * half_y) ** 2
    lungs = (((np.abs(xx) - 0.45 * half_x) / (0.32 * half_x)) ** 2 + (yy / (0.6 * half_y)) ** 2) <= 1
    liver_xy = ((xx + 0.35 * half_x) / (0.45 * half_x)) ** 2 + ((yy - 0.05 * half_y) / (0.6 * half_y)) ** 2
    lesion_mm = np.array([-0.35 * half_x, 0.05 * half_y, -0.15 * nz * sz])
    rng = np.random.default_rng(seed)
    ct = np.empty(shape, dtype=np.int16)
    for k in range(nz):
        plane = np.where(body, 40.0, -1000.0)
        liver = body & (liver_xy <= 1) & (z[k] < 0.1 * nz * sz)
        plane[lungs & body & (z[k] >= 0.1 * nz * sz)] = -850.0
        plane[liver] = 60.0
        lesion = ((xx - lesion_mm[0]) ** 2 + (yy - lesion_mm[1]) ** 2 + (z[k] - lesion_mm[2]) ** 2) <= (
            LESION_MM / 2) ** 2
        plane[lesion & liver] = 10.0
        plane[spine & body] = 700.0
        plane += rng.normal(0.0, 12.0, plane.shape)
        ct[:, :, k] = np.round(plane)
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz]
    centre = tuple(float(v) for v in (lesion_mm - affine[:3, 3]) / np.array(spacing))
    return ct, affine, centre


def lesion_map(shape: tuple[int, int, int], spacing: tuple[float, float, float], centre: tuple[float, float, float]
               ) -> np.ndarray:
    """The finding's probability map (float32, X, Y, Z): 1 at the lesion's centre, 0.5 at its edge, 0 beyond 1.5
    radii (what a grounding map is: 0 outside a small region)."""
    radius = LESION_MM / 2
    reach = [int(np.ceil(1.5 * radius / s)) + 1 for s in spacing]
    box = tuple(slice(max(0, int(c) - r), min(n, int(c) + r + 1)) for c, r, n in zip(centre, reach, shape))
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - c) * s for b, c, s in zip(box, centre, spacing)],
                        indexing="ij")
    distance = np.sqrt(sum(g ** 2 for g in grids)) / radius
    values = np.where(distance <= 1.5, 1.0 - distance / 2.0, 0.0).clip(0.0, 1.0)
    out = np.zeros(shape, dtype=np.float32)
    out[box] = values
    return out


def write_case(folder: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float] = (0.7, 0.7, 1.0)
               ) -> Path:
    """The synthetic CT and its map as a `ground infer` output in folder/output (reused when it has `shape`)."""
    import nibabel as nib

    from medssl.atomic import atomic_dir, write_json
    from medssl.explain.maps import MapSidecar, peak, write_map

    out = folder / "output"
    image_path = folder / "synthetic_ct.nii.gz"
    if (out / "results.json").is_file() and image_path.is_file() and nib.load(image_path).shape == tuple(shape):
        return out
    folder.mkdir(parents=True, exist_ok=True)
    ct, affine, centre = synthetic_ct(shape, spacing)
    image = nib.Nifti1Image(ct, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    partial = image_path.with_name(image_path.name + ".part.nii.gz")
    nib.save(image, partial)
    os.replace(partial, image_path)
    del ct, image
    map01 = lesion_map(shape, spacing, centre)
    voxel, mm = peak(map01, affine)
    score, threshold = 0.83, 0.5
    sidecar = MapSidecar(kind="grounding", image=str(image_path.resolve()), checkpoint="none (medssl bench app)",
                         phrase=PHRASE, raw_scale={"name": "probability", "meaning": MEANING},
                         rescaling={"name": "linear", "from": [0.0, 1.0]}, groundable=True, score=score,
                         score_threshold=threshold, peak_voxel=voxel, peak_mm=mm, preprocessing={},
                         extra={"statement_kind": "finding", "organ": "liver", "warnings": []})
    with atomic_dir(out) as tmp:
        write_map(tmp / "01_lesion", map01, affine, sidecar)
        write_json(tmp / "results.json", {
            "image": str(image_path.resolve()), "checkpoint": str((folder / "no_model" / "grounding.pt").resolve()),
            "threshold": threshold, "warnings": [],
            "results": [{"phrase": PHRASE, "kind": "finding", "groundable": True, "score": score,
                         "threshold": threshold, "reason": "", "organ": "liver", "query": None, "peak_mm": list(mm),
                         "map": "01_lesion.nii.gz", "sidecar": "01_lesion.json"}]})
    return out


# ----------------------------------------------------------------------------------------------- the measures


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1), "n": len(values)}


def open_times(server: AppServer, browser: Browser, reloads: int, timeout: float = 300.0) -> list[float]:
    """Seconds from navigation to the viewport showing the image with its map: the first open, then reloads."""
    times, mounted, loaded = [], [], []
    for _ in range(1 + reloads):
        browser.open("about:blank")
        time.sleep(0.5)
        start = time.perf_counter()
        browser.open(server.url)
        while not browser.evaluate(HAS_MAP):
            if not len(mounted) > len(times) and browser.evaluate(f"!!{FRAME}"):
                mounted.append(time.perf_counter() - start)
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"the case did not open with its map within {timeout:g} s ({server.log})")
            time.sleep(0.02)
        times.append(time.perf_counter() - start)
        loaded.append(float(browser.evaluate(f"{FRAME}.dataset.loadMs") or "nan") / 1000)
        browser.wait_idle(timeout=timeout, settle=1.0)
    return {"open_s": times, "viewport_mounted_s": mounted, "niivue_load_s": loaded}


def geometry(browser: Browser) -> dict:
    """The main plane on the page: its tile, its share of the window, screen pixels per voxel."""
    found = json.loads(browser.evaluate(f"""(() => {{ const v = {VIEWER}; const nv = v.panes.get('A').nv;
        const mm = Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3);
        const image = nv.volumes.find((x) => x.layerKind === 'image');
        const canvas = nv.canvas.getBoundingClientRect();
        return JSON.stringify({{ point: v.pagePoint('A', mm), dims: Array.from(image.hdr.dims.slice(1, 4)),
          pixdim: Array.from(image.hdr.pixDims.slice(1, 4)), canvas: [canvas.x, canvas.y, canvas.width, canvas.height],
          window: [window.innerWidth, window.innerHeight],
          scrolled: (document.querySelector('[data-testid="stMain"]') || document.scrollingElement).scrollTop }});
        }})()"""))
    tile, window, canvas = found["point"]["tile"], found["window"], found["canvas"]
    area = window[0] * window[1]
    return {"window": window, "canvas": [round(v) for v in canvas[2:]],
            "canvas_share": round(canvas[2] * canvas[3] / area, 3),
            "main_plane": [round(tile["width"]), round(tile["height"])],
            "main_plane_share": round(tile["width"] * tile["height"] / area, 3),
            "on_screen_unscrolled": bool(found["scrolled"] == 0 and canvas[1] >= 0
                                         and canvas[1] + canvas[3] <= window[1] + 0.5),
            "shown_voxels": found["dims"],
            "screen_px_per_voxel": round(found["pixdim"][0] / found["point"]["mm_per_px"], 2)}


def cdp_wheel(browser: Browser, n: int) -> list[float]:
    """Milliseconds from DevTools' wheel input to the next frame drawn after it."""
    tile = browser.evaluate(HERO_TILE)
    x, y = tile["x"] + tile["width"] * 0.45, tile["y"] + tile["height"] * 0.45
    times = []
    for i in range(n):
        start = time.perf_counter()
        browser.send("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=100 if i % 2 else -100)
        browser.frames_drawn(1)
        times.append(1000 * (time.perf_counter() - start))
    return times


def click_times(browser: Browser, n: int) -> list[float]:
    """Milliseconds from a real click on the main plane to Python's read-out naming the new crosshair."""
    tile = browser.evaluate(HERO_TILE)
    times = []
    for i in range(n):
        browser.wait_idle(timeout=120, settle=0.3)
        before = browser.evaluate(READOUT)
        x = tile["x"] + tile["width"] * (0.35 + (0.03 * i) % 0.3)
        y = tile["y"] + tile["height"] * (0.40 + 0.02 * (i % 5))
        start = time.perf_counter()
        browser.click(x, y)
        while browser.evaluate(READOUT) == before:
            if time.perf_counter() - start > 60:
                raise TimeoutError("Python's read-out did not follow the click within 60 s")
            time.sleep(0.005)
        times.append(1000 * (time.perf_counter() - start))
    return times


def machine(browser: Browser) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    version = browser.send("Browser.getVersion").get("product", "")
    return {"cpus": os.cpu_count(), "cpu": model, "browser": version, "webgl": browser.evaluate(RENDERER)}


def measure(case: Path, width: int, height: int, repeats: int, reloads: int) -> dict:
    figures: dict = {"load_average_before": [round(v, 2) for v in os.getloadavg()]}
    started = time.perf_counter()
    with AppServer([case]) as server, Browser(width=width, height=height) as browser:
        figures["app_start_s"] = round(time.perf_counter() - started, 1)
        figures["machine"] = machine(browser)
        figures.update({k: [round(t, 2) for t in v] for k, v in open_times(server, browser, reloads).items()})
        browser.scroll_to(0)
        browser.frames_drawn(5)
        figures["geometry"] = geometry(browser)
        interact = json.loads(browser.evaluate(f"{INTERACT}({repeats})", timeout=1800))
        figures["changed"] = interact.pop("changed")
        figures["in_page_ms"] = {kind: {part: summary(v) for part, v in parts.items()}
                                 for kind, parts in interact.items()}
        figures["devtools_wheel_to_frame_ms"] = summary(cdp_wheel(browser, repeats))
        figures["click_to_python_ms"] = summary(click_times(browser, max(3, repeats // 3)))
    figures["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return figures


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(figures: dict, shape: tuple[int, int, int]) -> list[str]:
    """The printed lines: the machine, then each aim with its figure."""
    m, g = figures["machine"], figures["geometry"]
    size = "x".join(map(str, shape))
    lines = [(f"machine: {m['cpus']} CPUs ({m['cpu']}), load average {figures['load_average_before']} before, "
              f"{figures['load_average_after']} after; {m['browser']} headless; WebGL: {m['webgl']}"),
             (f"case: synthetic {size} CT (int16 .nii.gz) with a probability map, as a ground infer output; app "
              f"started in {figures['app_start_s']} s (not counted)"),
             (f"window {g['window'][0]} x {g['window'][1]}: viewport {g['canvas'][0]} x {g['canvas'][1]} px "
              f"({g['canvas_share']:.0%} of the window), main plane {g['main_plane'][0]} x {g['main_plane'][1]} px "
              f"({g['main_plane_share']:.0%}), inside the window unscrolled: {g['on_screen_unscrolled']}  -> "
              f"aim >= {AIMS['share']:.0%} without scrolling: "
              f"{verdict(g['canvas_share'] >= AIMS['share'] and g['on_screen_unscrolled'])}"),
             (f"slice of {g['shown_voxels'][0]} x {g['shown_voxels'][1]} voxels shown at {g['screen_px_per_voxel']} "
              f"screen px per voxel  -> aim >= {AIMS['px_per_voxel']:g}: "
              f"{verdict(g['screen_px_per_voxel'] >= AIMS['px_per_voxel'])}")]
    names = {"wheel": "wheel slicing", "zoom": "ctrl+wheel zoom", "pan": "middle-drag pan", "wl": "right-drag W/L"}
    idle = figures["in_page_ms"]["idle"]["frame"]
    lines.append(f"the page's next animation frame with no event (the floor under every figure below): median "
                 f"{idle['median']} ms (max {idle['max']}, n={idle['n']})")
    for kind, name in names.items():
        parts = figures["in_page_ms"][kind]
        done, frame = parts["finished"], parts["frame"]
        lines.append(f"{name}: event to the frame drawn on the GPU (readPixels) median {done['median']} ms (max "
                     f"{done['max']}; handler {parts['handled']['median']} ms), to the next animation frame median "
                     f"{frame['median']} ms (max {frame['max']}), n={done['n']}, changed the view: "
                     f"{figures['changed'].get(kind)}  -> aim <= {AIMS['interaction_ms']:g} ms: "
                     f"{verdict(done['median'] <= AIMS['interaction_ms'] and figures['changed'].get(kind))} (drawn), "
                     f"{verdict(frame['median'] <= AIMS['interaction_ms'])} (next frame)")
    wheel = figures["devtools_wheel_to_frame_ms"]
    lines.append(f"wheel from DevTools input to the next frame (protocol round trip included): median "
                 f"{wheel['median']} ms (max {wheel['max']}, n={wheel['n']})")
    click = figures["click_to_python_ms"]
    lines.append(f"click on the main plane to Python's read-out: median {click['median']} ms (max {click['max']}, "
                 f"n={click['n']})  -> aim <= {AIMS['click_ms']:g} ms: {verdict(click['median'] <= AIMS['click_ms'])}")
    opened = figures["open_s"]
    warm = f", reloads {opened[1:]} s (median {statistics.median(opened[1:]):.2f})" if len(opened) > 1 else ""
    lines.append(f"open the case with its map (navigation to image + map shown): fresh app {opened[0]:.2f} s{warm}  "
                 f"-> aim <= {AIMS['open_s']:g} s: {verdict(opened[0] <= AIMS['open_s'])} (fresh)")
    lines.append(f"  of which: Python until the viewport is mounted {figures['viewport_mounted_s']} s, NiiVue's load "
                 f"(fetch, parse, textures) {figures['niivue_load_s']} s")
    return lines


def bench_app(*, size: tuple[int, int, int] = (512, 512, 300), window: str = "1366x768", repeats: int = 30,
              reloads: int = 3, work: Path | None = None, output: Path | None = None) -> dict:
    """Measure the aims on a synthetic CT of `size` (see the module's docstring); prints the lines of `report`
    and returns the figures (also written to `output` as JSON when given)."""
    width, height = check_options(size, window, repeats, reloads)
    if find_chromium() is None:
        raise UserError("bench app: no chromium on PATH (apt-get install chromium)")
    from medssl.app.viewport import check_bundle

    check_bundle()
    folder = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="medssl-bench-app-"))
    try:
        started = time.perf_counter()
        case = write_case(folder, tuple(size))
        print(f"case {case} ready in {time.perf_counter() - started:.0f} s", flush=True)
        figures = measure(case, width, height, repeats, reloads)
    finally:
        if work is None:
            shutil.rmtree(folder, ignore_errors=True)
    figures["size"] = list(size)
    for line in report(figures, tuple(size)):
        print(line)
    if output is not None:
        from medssl.atomic import write_json

        write_json(output, figures)
    return figures
