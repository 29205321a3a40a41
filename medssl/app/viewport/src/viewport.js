// The reading viewport of the clinician app: NiiVue (WebGL2) inside a Streamlit components-v2 custom component.
//
// Python (medssl/app/app.py, `show_viewport`) mounts it with `data`: one or two panes (the case, or prior and
// current side by side), each a list of NIfTI layers served by the app (image, map, label masks), the window
// presets, the map's scale (name and stated meaning, for the colour bar) and a `view` block (crosshair in mm,
// window, map settings, main plane, convention) that is applied when its `seq` changes. Everything a reader
// does with the mouse runs here without a Python round trip: wheel slicing, ctrl+wheel zoom, middle-drag (or
// shift-drag, or pan mode) pan, right-drag (or W/L mode) width/level, ctrl-drag (or distance mode) distance,
// preset buttons, opacity / threshold. Outlines (the map's threshold border, organ and lesion masks) and the map's peak are
// drawn on a 2D canvas over NiiVue's, 2 screen pixels wide whatever the zoom (`Outline`).
// Python hears of what it needs as component state (each a rerun of the app):
//   click:       {pane, mm, seq, linked}    a crosshair set by a click (the statistics follow it)
//   display:     {window, map, hero, view_seq}  settings to keep per case/model/phrase (debounced)
//   measurement: {pane, start_mm, end_mm, distance_mm}
// Streamlit calls the default export again with the same parentElement whenever `data` changes; the
// viewer lives on in VIEWERS and only applies what changed. The viewer is also the `.mv` element's `viewer`
// property (tests and docs/make_screenshots.py measure through it).
import { Niivue, SLICE_TYPE, DRAG_MODE, SHOW_RENDER } from "@niivue/niivue";

const VIEWERS = new WeakMap();
// what NiiVue's 3D textures were last rendered with (`Viewer.refreshGL` re-renders only when it changes)
const glState = (nv) => JSON.stringify([nv.opts.isRadiologicalConvention,
  nv.volumes.map((v) => [v.cal_min, v.cal_max, v.opacity, v.colormap])]);
const PLANES = { axial: SLICE_TYPE.AXIAL, coronal: SLICE_TYPE.CORONAL, sagittal: SLICE_TYPE.SAGITTAL };
const MODES = {
  crosshair: DRAG_MODE.crosshair, windowing: DRAG_MODE.windowing, pan: DRAG_MODE.pan,
  measurement: DRAG_MODE.measurement,
};
const CSS = `
.mv { position: relative; display: flex; flex-direction: column; gap: 3px; font: 13px/1.3 system-ui, sans-serif;
  color: #e8e8e8; }
.mv-bar { display: flex; flex-wrap: wrap; gap: 3px 12px; align-items: center; font-size: 12px; }
.mv-bar .grp, .mv-map { display: flex; gap: 3px; align-items: center; }
.mv button { background: #262730; color: #e8e8e8; border: 1px solid #555; border-radius: 4px; padding: 1px 5px;
  font: inherit; cursor: pointer; }
.mv button.on { background: #ff4b4b; border-color: #ff4b4b; color: #fff; }
.mv-map input[type=range] { width: 90px; }
.mv label { color: #c0c0c0; }
.mv-panes { display: flex; gap: 6px; }
.mv-pane { flex: 1 1 0; min-width: 0; position: relative; background: #000; }
.mv-canvas { position: relative; width: 100%; }
.mv-canvas canvas { position: absolute; inset: 0; width: 100%; height: 100%; outline: none; }
.mv-canvas canvas.mv-outlines { pointer-events: none; }
.mv-title, .mv-read, .mv-legend, .mv-bar2 { position: absolute; z-index: 2; background: rgba(14, 17, 23, 0.72);
  padding: 1px 6px; border-radius: 3px; pointer-events: none; }
.mv-title { top: 2px; left: 2px; font-weight: 600; max-width: calc(100% - 250px); white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.mv-read { bottom: 2px; left: 2px; font-family: ui-monospace, monospace; font-size: 12px; color: #e0e0e0;
  max-width: 75%; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.mv-legend { bottom: 24px; left: 2px; display: flex; flex-direction: column; font-size: 12px; }
.mv-cbar { position: absolute; z-index: 2; top: 2px; right: 2px; background: rgba(14, 17, 23, 0.8);
  padding: 3px 6px; border-radius: 3px; font-size: 12px; pointer-events: none; }
.mv-cbar .ramp { width: 220px; height: 12px; border: 1px solid #888; margin: 2px 0; }
.mv-cbar .ticks { display: flex; justify-content: space-between; width: 222px; }
.mv-scale { color: #d0d0d0; font-size: 12px; line-height: 1.3; }
.mv-panes.two .mv-read, .mv-panes.two .mv-legend { position: static; max-width: none; border-radius: 0; }
.mv-panes.two .mv-read { min-height: 16px; }
.mv-legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; border: 1px solid #000; }
.mv-note { color: #f0c36d; font-size: 12px; }
`;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function absolute(url) {
  return new URL(url.replace(/^\//, ""), document.baseURI).href;
}

function round(values, digits = 1) {
  return Array.from(values).slice(0, 3).map((v) => Number(v.toFixed(digits)));
}

// ------------------------------------------------------------------------------------------ outlines

const OUTLINE_PX = 2; // CSS pixels, whatever the zoom
const MAP_OUTLINE = "#00e5ff"; // the map's threshold border: cyan reads on grey, black lung and the hot colours
const PEAK_COLOUR = "#00e5ff";

// A layer's voxel grid: voxel (i, j, k) of the file -> RAS mm through its header's affine, and back.
function grid(volume) {
  const a = volume.hdr.affine;
  const m = [[a[0][0], a[0][1], a[0][2]], [a[1][0], a[1][1], a[1][2]], [a[2][0], a[2][1], a[2][2]]];
  const t = [a[0][3], a[1][3], a[2][3]];
  const det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
    + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
  const inv = [
    [(m[1][1] * m[2][2] - m[1][2] * m[2][1]) / det, (m[0][2] * m[2][1] - m[0][1] * m[2][2]) / det,
      (m[0][1] * m[1][2] - m[0][2] * m[1][1]) / det],
    [(m[1][2] * m[2][0] - m[1][0] * m[2][2]) / det, (m[0][0] * m[2][2] - m[0][2] * m[2][0]) / det,
      (m[0][2] * m[1][0] - m[0][0] * m[1][2]) / det],
    [(m[1][0] * m[2][1] - m[1][1] * m[2][0]) / det, (m[0][1] * m[2][0] - m[0][0] * m[2][1]) / det,
      (m[0][0] * m[1][1] - m[0][1] * m[1][0]) / det],
  ];
  const dims = volume.hdr.dims.slice(1, 4);
  return {
    dims,
    toMM: (v) => [0, 1, 2].map((r) => m[r][0] * v[0] + m[r][1] * v[1] + m[r][2] * v[2] + t[r]),
    toVox: (mm) => {
      const d = [mm[0] - t[0], mm[1] - t[1], mm[2] - t[2]];
      return [0, 1, 2].map((r) => inv[r][0] * d[0] + inv[r][1] * d[1] + inv[r][2] * d[2]);
    },
    // the voxel axis that runs along RAS axis `ras` (the slice axis of a plane whose normal is `ras`)
    along: (ras) => [0, 1, 2].reduce((best, c) => (Math.abs(m[ras][c]) > Math.abs(m[ras][best]) ? c : best), 0),
  };
}

// RAS mm -> canvas pixel of one 2D tile of NiiVue (its screenSlices entry), as NiiVue's own frac2canvasPos.
function tileXY(tile, mm) {
  let x = mm[0];
  let y = mm[1];
  if (tile.axCorSag === SLICE_TYPE.CORONAL) y = mm[2];
  if (tile.axCorSag === SLICE_TYPE.SAGITTAL) { x = mm[1]; y = mm[2]; }
  let fx = (x - tile.leftTopMM[0]) / tile.fovMM[0];
  const fy = (y - tile.leftTopMM[1]) / tile.fovMM[1];
  const ltwh = tile.leftTopWidthHeight.slice();
  if (ltwh[2] < 0) { ltwh[0] += ltwh[2]; ltwh[2] = -ltwh[2]; fx = 1 - fx; }
  return [ltwh[0] + fx * ltwh[2], ltwh[1] + (1 - fy) * ltwh[3]];
}

// The outlines of one layer: `value(i)` of voxel index i (a map: 1 above the threshold, else 0; labels: the
// label) and `colour(v)`; segments along the faces between voxels of different values, cached per plane and
// slice, so that a redraw (wheel, zoom, pan) only projects them.
class Outline {
  constructor(volume, value, colour) {
    this.grid = grid(volume);
    this.value = value;
    this.colour = colour;
    this.cache = new Map();
    const [nx, ny, nz] = this.grid.dims;
    const lo = [nx, ny, nz];
    const hi = [-1, -1, -1];
    for (let k = 0, i = 0; k < nz; k++) {
      for (let j = 0; j < ny; j++) {
        for (let x = 0; x < nx; x++, i++) {
          if (!value(i)) continue;
          if (x < lo[0]) lo[0] = x;
          if (x > hi[0]) hi[0] = x;
          if (j < lo[1]) lo[1] = j;
          if (j > hi[1]) hi[1] = j;
          if (k < lo[2]) lo[2] = k;
          if (k > hi[2]) hi[2] = k;
        }
      }
    }
    this.box = hi[0] < 0 ? null : [lo, hi];
  }

  // {colour: [[u0, v0, u1, v1] in voxel units of the slice's in-plane axes]} for slice `s` along voxel axis `axis`
  segments(axis, s) {
    const key = `${axis}:${s}`;
    if (this.cache.has(key)) return this.cache.get(key);
    const out = new Map();
    if (this.box && s >= this.box[0][axis] && s <= this.box[1][axis]) {
      const [ua, va] = [0, 1, 2].filter((a) => a !== axis);
      const dims = this.grid.dims;
      const stride = [1, dims[0], dims[0] * dims[1]];
      const at = (u, v) => {
        if (u < 0 || v < 0 || u >= dims[ua] || v >= dims[va]) return 0;
        return this.value(u * stride[ua] + v * stride[va] + s * stride[axis]);
      };
      const add = (a, b, seg) => {
        const colour = this.colour(a || b);
        if (!out.has(colour)) out.set(colour, []);
        out.get(colour).push(seg);
      };
      for (let u = this.box[0][ua] - 1; u <= this.box[1][ua]; u++) {
        for (let v = this.box[0][va] - 1; v <= this.box[1][va]; v++) {
          const here = at(u, v);
          const right = at(u + 1, v);
          const up = at(u, v + 1);
          if (here !== right) add(here, right, [u + 0.5, v - 0.5, u + 0.5, v + 0.5]);
          if (here !== up) add(here, up, [u - 0.5, v + 0.5, u + 0.5, v + 0.5]);
        }
      }
    }
    this.cache.set(key, out);
    if (this.cache.size > 64) this.cache.delete(this.cache.keys().next().value);
    return out;
  }

  // stroke this layer's outline on every 2D tile at the crosshair `mm`
  draw(ctx, tiles, mm) {
    const planeAxis = { [SLICE_TYPE.AXIAL]: 2, [SLICE_TYPE.CORONAL]: 1, [SLICE_TYPE.SAGITTAL]: 0 };
    const vox = this.grid.toVox(mm);
    for (const tile of tiles) {
      const axis = this.grid.along(planeAxis[tile.axCorSag]);
      const s = Math.round(vox[axis]);
      if (s < 0 || s >= this.grid.dims[axis]) continue;
      const [ua, va] = [0, 1, 2].filter((a) => a !== axis);
      const point = (u, v) => {
        const p = [0, 0, 0];
        p[axis] = s;
        p[ua] = u;
        p[va] = v;
        return tileXY(tile, this.grid.toMM(p));
      };
      for (const [colour, segments] of this.segments(axis, s)) {
        ctx.strokeStyle = colour;
        ctx.beginPath();
        for (const [u0, v0, u1, v1] of segments) {
          const a = point(u0, v0);
          const b = point(u1, v1);
          ctx.moveTo(a[0], a[1]);
          ctx.lineTo(b[0], b[1]);
        }
        ctx.stroke();
      }
    }
  }
}

function layerValue(volume) {
  const img = volume.img;
  const slope = volume.hdr.scl_slope || 1;
  const inter = volume.hdr.scl_inter || 0;
  return (i) => img[i] * slope + inter;
}

class Viewer {
  constructor(root) {
    this.root = root;
    this.panes = new Map(); // key -> {nv, box, title, read, legend, layersKey}
    this.viewSeq = null;
    this.data = null;
    this.clickSeq = 0;
    this.mode = "crosshair";
    this.linked = true; // the panes' cursors follow each other (in mm, or by Python's matcher)
    this.syncing = false;
    this.state = { display: null };
    this.timers = {};
    const style = el("style");
    style.textContent = CSS;
    this.frame = el("div", "mv");
    this.bar = el("div", "mv-bar");
    this.paneRow = el("div", "mv-panes");
    this.scale = el("div", "mv-scale"); // what the map's values mean (the sidecar's words), once for all panes
    this.notes = el("div", "mv-note");
    this.frame.append(this.bar, this.paneRow, this.scale, this.notes);
    this.frame.viewer = this;
    root.append(style, this.frame);
    this.onResize = () => this.resize();
    window.addEventListener("resize", this.onResize);
    this.observer = new ResizeObserver(() => this.resize()); // the toolbar wraps once fonts and width settle
    this.observer.observe(this.bar);
  }

  destroy() {
    window.removeEventListener("resize", this.onResize);
    this.observer.disconnect();
    for (const pane of this.panes.values()) pane.nv.canvas?.remove();
    this.panes.clear();
    this.frame.remove();
  }

  report(name, value, delay = 0) {
    clearTimeout(this.timers[name]);
    const send = () => this.setStateValue(name, value);
    if (delay) this.timers[name] = setTimeout(send, delay);
    else send();
  }

  // ------------------------------------------------------------------------------------------ toolbar

  buildBar(data) {
    const key = JSON.stringify([data.presets, data.panes.map((p) => p.key), !!data.has_map]);
    if (this.barKey === key) return;
    this.barKey = key;
    this.bar.replaceChildren();
    const presets = el("div", "grp");
    presets.title = "window presets (width/level); right-drag on the image changes width/level";
    for (const preset of data.presets) {
      const button = el("button", "", preset.label);
      button.title = `width ${preset.width}, level ${preset.level}`;
      button.dataset.preset = preset.name;
      button.onclick = () => { this.setWindow(preset.width, preset.level); this.reportDisplay(); };
      presets.append(button);
    }
    this.windowText = el("span", "mv-wl");
    presets.append(this.windowText);
    const modes = el("div", "grp");
    modes.title = "what a left drag does (ctrl-drag: distance, middle- or shift-drag: pan, right-drag: W/L, "
      + "ctrl+wheel: zoom, wheel: slices)";
    for (const [mode, title] of [["crosshair", "crosshair"], ["windowing", "W/L"], ["pan", "pan/zoom"],
      ["measurement", "distance"]]) {
      const button = el("button", mode === this.mode ? "on" : "", title);
      button.dataset.mode = mode;
      button.onclick = () => this.setMode(mode);
      modes.append(button);
    }
    const hero = el("div", "grp");
    hero.title = "the plane shown large";
    for (const plane of Object.keys(PLANES)) {
      const button = el("button", "", plane);
      button.dataset.hero = plane;
      button.onclick = () => { this.setHero(plane); this.reportDisplay(); };
      hero.append(button);
    }
    const reset = el("button", "", "reset");
    reset.title = "reset zoom and pan";
    reset.onclick = () => this.eachNv((nv) => { nv.scene.pan2Dxyzmm = [0, 0, 0, 1]; nv.drawScene(); });
    hero.append(reset);
    this.bar.append(presets, modes, hero);
    if (data.panes.length > 1) {
      const link = el("button", this.linked ? "on" : "", "link cursors");
      link.dataset.link = "1";
      link.title = "on: a click in either pane moves both cursors to the same point; off: each pane keeps its own "
        + "cursor (put both on one finding to read their distance)";
      link.onclick = () => this.setLinked(!this.linked);
      this.bar.append(link);
    }
    this.mapCtl?.remove();
    this.mapCtl = null;
    this.threshold = null;
    if (data.has_map) {
      const map = el("div", "mv-map");
      this.mapCtl = map;
      this.opacity = this.slider(map, "opacity", 0, 1, 0.05);
      this.threshold = this.slider(map, "threshold", 0, 1, 0.001);
      const mode = el("button", "", "outline only");
      mode.title = "the map's threshold border alone (2 px), without the colour fill";
      mode.dataset.mapmode = "1";
      mode.onclick = () => {
        this.mapSettings.mode = this.mapSettings.mode === "outline" ? "fill" : "outline";
        this.applyMap();
        this.reportDisplay();
      };
      map.append(mode);
      this.bar.append(map);
    }
  }

  slider(parent, name, min, max, step) {
    const label = el("label", "", name);
    const input = el("input");
    Object.assign(input, { type: "range", min, max, step });
    input.dataset.setting = name;
    input.oninput = () => {
      this.mapSettings[name] = Number(input.value);
      this.applyMap();
    };
    input.onchange = () => this.reportDisplay();
    parent.append(label, input);
    return input;
  }

  refreshBar() {
    const win = this.window;
    if (this.windowText && win) this.windowText.textContent = `${Math.round(win.width)}/${Math.round(win.level)}`;
    for (const button of this.bar.querySelectorAll("button[data-preset]")) {
      const preset = this.data.presets.find((p) => p.name === button.dataset.preset);
      button.classList.toggle("on", !!win && Math.abs(preset.width - win.width) < 0.5 &&
        Math.abs(preset.level - win.level) < 0.5);
    }
    for (const button of this.bar.querySelectorAll("button[data-mode]")) {
      button.classList.toggle("on", button.dataset.mode === this.mode);
    }
    for (const button of this.bar.querySelectorAll("button[data-hero]")) {
      button.classList.toggle("on", button.dataset.hero === this.hero);
    }
    const outline = this.bar.querySelector("button[data-mapmode]");
    if (outline) outline.classList.toggle("on", this.mapSettings?.mode === "outline");
    const link = this.bar.querySelector("button[data-link]");
    if (link) link.classList.toggle("on", this.linked);
    if (this.mapSettings && this.threshold) {
      const { lo, hi } = this.mapRange();
      Object.assign(this.threshold, { min: lo, max: hi, step: (hi - lo) / 500 || 0.001 });
      this.threshold.value = this.mapSettings.threshold;
      this.opacity.value = this.mapSettings.opacity;
    }
  }

  // ------------------------------------------------------------------------------------------ panes

  pane(spec) {
    let pane = this.panes.get(spec.key);
    if (pane) return pane;
    const box = el("div", "mv-pane");
    box.dataset.pane = spec.key;
    const title = el("div", "mv-title");
    const holder = el("div", "mv-canvas");
    const canvas = el("canvas");
    canvas.tabIndex = 0;
    const overlay = el("canvas", "mv-outlines");
    holder.append(canvas, overlay);
    const read = el("div", "mv-read");
    const legend = el("div", "mv-legend");
    const cbar = el("div", "mv-cbar");
    cbar.hidden = true;
    box.append(holder, title, legend, cbar, read);
    this.paneRow.append(box);
    const nv = new Niivue({
      backColor: [0, 0, 0, 1], crosshairColor: [0.1, 1, 0.3, 0.9], crosshairWidth: 0.12,
      crosshairWidthUnit: "percent", isColorbar: false,
      isRadiologicalConvention: true, multiplanarShowRender: SHOW_RENDER.NEVER, heroImageFraction: 0.78,
      heroSliceType: SLICE_TYPE.AXIAL, sliceType: SLICE_TYPE.MULTIPLANAR, isOrientationTextVisible: true,
      showAllOrientationMarkers: true, textHeight: 0.045, dragAndDropEnabled: false, isResizeCanvas: true,
      logLevel: "warn", loadingText: "loading ...", showMeasureUnits: true, atlasOutline: 1,
      isNearestInterpolation: false, measureTextColor: [1, 1, 0, 1], measureLineColor: [1, 1, 0, 1],
    });
    nv.opts.withoutGradient = true; // no 3D render here: no gradient texture (build.mjs)
    nv.attachToCanvas(canvas);
    // NiiVue fills every new RGBA 3D texture with zeros it uploads from a typed array (`isInit`); WebGL already
    // hands out textures zeroed, and for a 512 x 512 x 150 volume that upload is seconds on a software renderer
    const rgbaTex = nv.rgbaTex.bind(nv);
    nv.rgbaTex = (texture, unit, dims) => rgbaTex(texture, unit, dims, false);
    nv.opts.mouseEventConfig = {
      // NiiVue takes shift + left as the middle button (it pans whatever the mode): shift-drag pans, ctrl-drag measures
      leftButton: { primary: MODES[this.mode], withShift: DRAG_MODE.pan, withCtrl: DRAG_MODE.measurement },
      rightButton: DRAG_MODE.windowing, centerButton: DRAG_MODE.pan,
    };
    pane = { key: spec.key, nv, box, title, read, legend, cbar, overlay, layersKey: null, outlines: [],
      mapOutline: null };
    const draw = nv.drawScene.bind(nv);
    nv.drawScene = () => { // NiiVue draws synchronously (it ends with gl.finish): the outlines follow each frame
      const drawn = draw();
      this.drawOutlines(pane);
      return drawn;
    };
    nv.onLocationChange = (location) => this.located(pane, location);
    nv.onMouseUp = () => this.clicked(pane);
    nv.onDragRelease = () => this.dragged(pane);
    nv.onMeasurementCompleted = (m) => this.report("measurement", { seq: `${this.viewSeq}:${++this.clickSeq}`,
      pane: pane.key, start_mm: round(m.startMM), end_mm: round(m.endMM), distance_mm: Number(m.distance.toFixed(1)),
    });
    canvas.addEventListener("wheel", (event) => this.zoomWheel(pane, event), { capture: true, passive: false });
    this.panes.set(spec.key, pane);
    return pane;
  }

  eachNv(fn) {
    for (const pane of this.panes.values()) fn(pane.nv, pane);
  }

  zoomWheel(pane, event) {
    if (!event.ctrlKey && !event.metaKey) return; // plain wheel: NiiVue moves the slice
    event.preventDefault();
    event.stopImmediatePropagation();
    const nv = pane.nv;
    const zoom = Math.min(8, Math.max(0.5, nv.scene.pan2Dxyzmm[3] * (event.deltaY < 0 ? 1.1 : 1 / 1.1)));
    this.eachNv((other) => { other.scene.pan2Dxyzmm[3] = zoom; other.drawScene(); });
  }

  async load(pane, spec) {
    const key = JSON.stringify(spec.layers.map((l) => [l.url, l.kind]));
    pane.title.textContent = spec.title || "";
    if (pane.layersKey === key) return;
    pane.layersKey = key;
    pane.mapOutline = null;
    const started = performance.now();
    // loaded with the window and map settings they will be shown with: NiiVue renders them once, as they are
    const { window, map } = this.loadAs || {};
    const volumes = spec.layers.map((layer) => {
      const volume = { url: absolute(layer.url), name: layer.name, colormap: layer.colormap || "hot",
        opacity: layer.opacity ?? 1 };
      if (layer.kind === "image") {
        Object.assign(volume, { colormap: "gray", opacity: 1 });
        if (window) Object.assign(volume, { cal_min: window.level - window.width / 2,
          cal_max: window.level + window.width / 2 });
      } else if (layer.kind === "labels" && layer.lut) {
        volume.opacity = 0; // drawn as 2-px outlines in their own colours, not by NiiVue
      } else if (layer.kind === "map" && map) {
        Object.assign(volume, { cal_min: map.threshold, cal_max: Math.max(map.vmax, map.threshold + 1e-6),
          opacity: map.mode === "outline" ? 0 : map.opacity, colormap: map.cmap || volume.colormap });
      }
      return volume;
    });
    await pane.nv.loadVolumes(volumes);
    pane.outlines = [];
    spec.layers.forEach((layer, index) => {
      const volume = pane.nv.volumes[index];
      if (!volume) return;
      volume.layerKind = layer.kind;
      volume.colorbarVisible = false;
      if (layer.kind === "labels" && layer.lut) {
        const { R, G, B } = layer.lut;
        pane.outlines.push(new Outline(volume, layerValue(volume), (v) => `rgb(${R[v]},${G[v]},${B[v]})`));
      }
    });
    pane.legend.replaceChildren(...(spec.legend || []).map(([name, rgb]) => {
      const item = el("span");
      const swatch = el("i");
      swatch.style.background = `rgb(${rgb.join(",")})`;
      item.append(swatch, name);
      return item;
    }));
    pane.glKey = glState(pane.nv);
    pane.loadedMs = performance.now() - started;
    this.frame.dataset.loaded = String((Number(this.frame.dataset.loaded) || 0) + 1);
    this.frame.dataset.loadMs = pane.loadedMs.toFixed(0);
  }

  // ------------------------------------------------------------------------------------------ view

  async apply(data) {
    this.data = data;
    this.buildBar(data);
    const wanted = new Set(data.panes.map((p) => p.key));
    for (const [key, pane] of this.panes) {
      if (!wanted.has(key)) { pane.box.remove(); this.panes.delete(key); }
    }
    const panes = data.panes.map((spec) => this.pane(spec));
    // two panes side by side are tall and narrow: NiiVue's lower planes reach the canvas' bottom, so the legend and
    // the read-out go below the canvas instead of over it
    this.paneRow.classList.toggle("two", panes.length > 1);
    const fresh = data.view.seq !== this.viewSeq;
    this.loadAs = { window: fresh ? data.view.window : this.window, map: fresh ? data.view.map : this.mapSettings };
    if (fresh) {
      for (const pane of panes) pane.nv.opts.isRadiologicalConvention = data.view.convention !== "neurological";
    }
    this.resize();
    await Promise.all(panes.map((pane, i) => this.load(pane, data.panes[i])));
    this.resize();
    for (const delay of [300, 1500]) setTimeout(() => this.resize(), delay); // after the page around settles
    this.notes.textContent = (data.notes || []).join(" · ");
    this.scale.textContent = data.map_scale ? `map values (${data.map_scale.name}): ${data.map_scale.meaning}` : "";
    this.resize();
    const view = data.view;
    if (view.seq !== this.viewSeq) {
      this.viewSeq = view.seq;
      this.window = { ...view.window };
      this.mapSettings = { ...view.map };
      this.hero = view.hero;
      this.linked = view.linked !== false;
      this.eachNv((nv) => { nv.opts.isRadiologicalConvention = view.convention !== "neurological"; });
      this.setHero(view.hero);
      if (view.crosshair_mm) this.moveTo(data.panes[0].key, view.crosshair_mm, true);
    }
    for (const [key, mm] of Object.entries(data.linked || {})) this.moveTo(key, mm, false);
    this.setWindow(this.window.width, this.window.level, false);
    this.applyMap(false);
    this.refreshGL();
    this.frame.dataset.ready = String(view.seq);
    this.frame.dataset.crosshair = JSON.stringify(this.panes.get(data.panes[0].key)?.mm || null);
  }

  // Page (CSS pixel) coordinates of RAS `mm` on pane `key`'s largest tile of `plane` (default: the main plane), or
  // null; with `hero` (that tile's box on the page, its mm per CSS pixel). For tests and measurements.
  pagePoint(key, mm, plane = this.hero) {
    const pane = this.panes.get(key);
    const tiles = (pane?.nv.screenSlices || []).filter((t) => t.axCorSag === PLANES[plane] && t.fovMM?.length);
    if (!tiles.length) return null;
    const tile = tiles.reduce((a, b) => (Math.abs(b.leftTopWidthHeight[2]) > Math.abs(a.leftTopWidthHeight[2]) ? b : a));
    const rect = pane.nv.canvas.getBoundingClientRect();
    const ratio = pane.nv.canvas.width / rect.width;
    const [x, y] = tileXY(tile, mm);
    const [l, t, w, h] = tile.leftTopWidthHeight;
    const left = Math.min(l, l + w);
    return { x: rect.x + x / ratio, y: rect.y + y / ratio,
      tile: { x: rect.x + left / ratio, y: rect.y + t / ratio, width: Math.abs(w) / ratio, height: h / ratio },
      mm_per_px: Math.abs(tile.fovMM[0]) / (Math.abs(w) / ratio) };
  }

  setMode(mode) {
    this.mode = mode;
    this.eachNv((nv) => { nv.opts.mouseEventConfig.leftButton.primary = MODES[mode]; });
    this.refreshBar();
  }

  setHero(plane) {
    this.hero = plane;
    this.eachNv((nv) => { nv.opts.heroSliceType = PLANES[plane]; nv.setSliceType(SLICE_TYPE.MULTIPLANAR); });
    this.refreshBar();
  }

  setWindow(width, level, refresh = true) {
    this.window = { width, level };
    this.eachNv((nv) => {
      for (const volume of nv.volumes) {
        if (volume.layerKind !== "image") continue;
        volume.cal_min = level - width / 2;
        volume.cal_max = level + width / 2;
      }
    });
    if (refresh) this.refreshGL();
    this.refreshBar();
  }

  // NiiVue's updateGLVolume re-renders every layer into its 3D texture (and the image's gradient): seconds for a
  // 512 x 512 x 150 volume on a software renderer. Done only for a pane whose convention, window or map settings
  // changed since its last refresh (a rerun of the app that changes none of them costs nothing here).
  refreshGL() {
    this.eachNv((nv, pane) => {
      const drawn = glState(nv);
      if (pane.glKey === drawn) return;
      pane.glKey = drawn;
      nv.updateGLVolume();
    });
  }

  mapRange() {
    return { lo: this.mapSettings?.range?.[0] ?? 0, hi: this.mapSettings?.range?.[1] ?? 1 };
  }

  applyMap(refresh = true) {
    if (!this.mapSettings) return;
    const { threshold, vmax, opacity, mode, cmap } = this.mapSettings;
    this.eachNv((nv, pane) => {
      const map = nv.volumes.find((v) => v.layerKind === "map");
      if (map) {
        map.cal_min = threshold;
        map.cal_max = Math.max(vmax, threshold + 1e-6);
        map.opacity = mode === "outline" ? 0 : opacity;
        if (cmap && map.colormap !== cmap) map.colormap = cmap;
        if (pane.mapOutline?.threshold !== threshold || pane.mapOutline?.volume !== map) {
          const value = layerValue(map);
          pane.mapOutline = new Outline(map, (i) => (value(i) > threshold ? 1 : 0), () => MAP_OUTLINE);
          Object.assign(pane.mapOutline, { threshold, volume: map });
        }
      } else {
        pane.mapOutline = null;
      }
      this.colourBar(pane, nv);
    });
    if (refresh) this.refreshGL();
    this.refreshBar();
  }

  // The outlines of the pane's label layers and of the map's threshold, and the map's peak, on the 2D canvas over
  // NiiVue's (same pixel grid), at the crosshair's slices; called after every NiiVue frame.
  drawOutlines(pane) {
    const gl = pane.nv.canvas;
    const canvas = pane.overlay;
    if (!gl || !canvas) return;
    if (canvas.width !== gl.width || canvas.height !== gl.height) {
      canvas.width = gl.width;
      canvas.height = gl.height;
    } else {
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    }
    const ctx = canvas.getContext("2d");
    const tiles = (pane.nv.screenSlices || []).filter((t) => t.axCorSag <= SLICE_TYPE.SAGITTAL && t.fovMM?.length);
    const crosshair = pane.nv.volumes.length ? pane.nv.frac2mm(pane.nv.scene.crosshairPos) : null;
    if (!tiles.length || !crosshair) return;
    const ratio = window.devicePixelRatio || 1;
    ctx.lineWidth = OUTLINE_PX * ratio;
    ctx.lineCap = "square";
    for (const outline of pane.outlines) outline.draw(ctx, tiles, crosshair);
    if (pane.mapOutline) pane.mapOutline.draw(ctx, tiles, crosshair);
    const peak = this.data?.panes.find((p) => p.key === pane.key)?.peak_mm;
    if (peak && pane.mapOutline) this.drawPeak(ctx, tiles, pane.mapOutline.grid, peak, crosshair, ratio);
  }

  // A ring with four ticks around the map's peak, on each tile whose slice holds it (within half a voxel).
  drawPeak(ctx, tiles, mapGrid, peak, crosshair, ratio) {
    const planeAxis = { [SLICE_TYPE.AXIAL]: 2, [SLICE_TYPE.CORONAL]: 1, [SLICE_TYPE.SAGITTAL]: 0 };
    const at = mapGrid.toVox(peak);
    const here = mapGrid.toVox(crosshair);
    const r = 7 * ratio;
    for (const tile of tiles) {
      const axis = mapGrid.along(planeAxis[tile.axCorSag]);
      if (Math.abs(Math.round(here[axis]) - at[axis]) > 0.5) continue;
      const [x, y] = tileXY(tile, peak);
      for (const [colour, width] of [["#000", ctx.lineWidth + 2 * ratio], [PEAK_COLOUR, ctx.lineWidth]]) {
        ctx.strokeStyle = colour;
        ctx.lineWidth = width;
        ctx.beginPath();
        ctx.arc(x, y, r, 0, 2 * Math.PI);
        for (const [dx, dy] of [[1, 0], [-1, 0], [0, 1], [0, -1]]) {
          ctx.moveTo(x + dx * r, y + dy * r);
          ctx.lineTo(x + dx * 2 * r, y + dy * 2 * r);
        }
        ctx.stroke();
      }
      ctx.lineWidth = OUTLINE_PX * ratio;
    }
  }

  colourBar(pane, nv) {
    const map = nv.volumes.find((v) => v.layerKind === "map");
    pane.cbar.hidden = !map;
    if (!map) return;
    const { threshold, vmax, cmap } = this.mapSettings;
    const stops = (nv.colormap(cmap) || []);
    let gradient = "linear-gradient(90deg, #000, #fff)";
    if (stops.length >= 4) {
      const parts = [];
      for (let i = 0; i < 256; i += 32) parts.push(`rgb(${stops[i * 4]},${stops[i * 4 + 1]},${stops[i * 4 + 2]})`);
      parts.push(`rgb(${stops[1020]},${stops[1021]},${stops[1022]})`);
      gradient = `linear-gradient(90deg, ${parts.join(",")})`;
    }
    const scale = this.data?.map_scale || { name: "map", meaning: "" };
    pane.cbar.replaceChildren();
    const head = el("div", "", `${scale.name} (meaning below the image)`);
    const cut = el("div", "", `≤ ${threshold.toFixed(3)}: transparent, cyan border`);
    const ramp = el("div", "ramp");
    ramp.style.background = gradient;
    const ticks = el("div", "ticks");
    ticks.append(el("span", "", threshold.toFixed(3)), el("span", "", ((threshold + vmax) / 2).toFixed(3)),
      el("span", "", vmax.toFixed(3)));
    pane.cbar.append(head, ramp, ticks, cut);
  }

  moveTo(key, mm, link) {
    const pane = this.panes.get(key);
    if (!pane || !pane.nv.volumes.length) return;
    pane.nv.scene.crosshairPos = pane.nv.mm2frac(mm);
    pane.nv.drawScene();
    pane.nv.createOnLocationChange();
    if (link) this.follow(pane, mm);
  }

  setLinked(linked) {
    this.linked = linked;
    this.refreshBar();
    const a = this.panes.get(this.data?.panes[0].key);
    if (linked && a?.mm) { // B comes back to A's point, and Python hears that the cursors are one again
      this.follow(a, a.mm);
      this.clickSeq += 1;
      this.report("click", { pane: a.key, mm: a.mm, seq: `${this.viewSeq}:${this.clickSeq}`, linked: true });
    }
  }

  follow(source, mm) {
    if (this.syncing || !this.linked || this.data?.link !== "mm") return;
    this.syncing = true;
    for (const pane of this.panes.values()) {
      if (pane === source || !pane.nv.volumes.length) continue;
      pane.nv.scene.crosshairPos = pane.nv.mm2frac(mm);
      pane.nv.drawScene();
      pane.nv.createOnLocationChange();
    }
    this.syncing = false;
  }

  located(pane, location) {
    pane.mm = round(location.mm);
    const values = (location.values || []).map((v, i) => {
      const kind = pane.nv.volumes[i]?.layerKind;
      if (kind === "image") return `image ${Number(v.value).toFixed(0)}`;
      if (kind === "map") return `map ${Number(v.value).toFixed(3)} ${this.data?.map_scale?.name || ""}`;
      return "";
    }).filter(Boolean);
    pane.read.textContent = `(${pane.mm.join(", ")}) mm RAS · voxel (${round(location.vox, 0).join(", ")}) · `
      + values.join(" · ");
    if (!this.syncing) this.follow(pane, location.mm);
  }

  clicked(pane) {
    if (this.mode !== "crosshair" || !pane.mm) return;
    this.clickSeq += 1;
    this.report("click", { pane: pane.key, mm: pane.mm, seq: `${this.viewSeq}:${this.clickSeq}`,
      linked: this.linked });
  }

  dragged(pane) {
    const image = pane.nv.volumes.find((v) => v.layerKind === "image");
    if (!image) return;
    const width = image.cal_max - image.cal_min;
    const level = (image.cal_max + image.cal_min) / 2;
    if (Math.abs(width - this.window.width) > 0.5 || Math.abs(level - this.window.level) > 0.5) {
      this.setWindow(width, level);
      this.reportDisplay();
    }
  }

  reportDisplay() {
    this.report("display", {
      window: this.window, map: this.mapSettings, hero: this.hero, view_seq: this.viewSeq,
    }, 400);
  }

  resize() {
    // the panes' top on the page, scrolled or not (a button clicked lower down scrolls Streamlit's main block)
    const main = document.querySelector("[data-testid='stMain']");
    const top = this.paneRow.getBoundingClientRect().top + (main ? main.scrollTop : 0) + window.scrollY;
    const fixed = this.data?.height;
    const strip = this.paneRow.classList.contains("two") ? Math.max(0, ...[...this.panes.values()].map((pane) =>
      pane.legend.getBoundingClientRect().height + pane.read.getBoundingClientRect().height)) : 0;
    const below = this.scale.getBoundingClientRect().height + this.notes.getBoundingClientRect().height + strip;
    const height = fixed || Math.max(360, Math.floor(window.innerHeight - Math.max(0, top) - below - 12));
    for (const pane of this.panes.values()) { // NiiVue redraws on a resize: only when the pane's size changed
      const holder = pane.box.querySelector(".mv-canvas");
      holder.style.height = `${height}px`;
      const size = `${holder.clientWidth}x${height}x${window.devicePixelRatio}`;
      if (pane.size === size) continue;
      pane.size = size;
      pane.nv.resizeListener?.();
    }
  }
}

export default function viewport(component) {
  const { parentElement, data, setStateValue } = component;
  let viewer = VIEWERS.get(parentElement);
  if (!viewer) {
    viewer = new Viewer(parentElement);
    VIEWERS.set(parentElement, viewer);
  }
  viewer.setStateValue = setStateValue;
  viewer.pending = (viewer.pending || Promise.resolve()).then(() => viewer.apply(data)).catch((error) => {
    viewer.notes.textContent = `viewer error: ${error.message || error}`;
    viewer.frame.dataset.error = String(error.message || error);
  });
  return () => {
    VIEWERS.delete(parentElement);
    viewer.destroy();
  };
}
