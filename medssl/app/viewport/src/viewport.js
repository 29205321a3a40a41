// The reading viewport of the clinician app: NiiVue (WebGL2) inside a Streamlit components-v2 custom component.
//
// Python (medssl/app/viewport.py) mounts it with `data` (see VIEWPORT_DATA there): one or two panes (the case,
// or prior and current side by side), each a list of NIfTI layers served by the app (image, map, label
// outlines, marks), the window presets, and a `view` block (crosshair in mm, window, map settings, main
// plane, convention) that is applied when its `seq` changes. Everything a reader does with the mouse runs
// here without a Python round trip: wheel slicing, ctrl+wheel zoom, middle-drag (or pan mode) pan, right-drag
// (or W/L mode) width/level, shift-drag (or measure mode) distance, preset buttons, opacity / threshold.
// Python hears of what it needs as component state (each a rerun of the app's fragment):
//   click:       {pane, mm, seq}            a crosshair set by a click (the statistics follow it)
//   display:     {window, map, hero, convention}  settings to keep per case/model/phrase (debounced)
//   measurement: {pane, start_mm, end_mm, distance_mm}
// Streamlit calls the default export again with the same parentElement whenever `data` changes; the
// viewer lives on in VIEWERS and only applies what changed.
import { Niivue, SLICE_TYPE, DRAG_MODE, SHOW_RENDER } from "@niivue/niivue";

const VIEWERS = new WeakMap();
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
.mv-map { position: absolute; z-index: 3; left: 4px; bottom: 86px; background: rgba(14, 17, 23, 0.8);
  padding: 3px 6px; border-radius: 3px; font-size: 13px; }
.mv-map input[type=range] { width: 110px; }
.mv label { color: #c0c0c0; }
.mv-panes { display: flex; gap: 6px; }
.mv-pane { flex: 1 1 0; min-width: 0; position: relative; background: #000; }
.mv-canvas { position: relative; width: 100%; }
.mv-canvas canvas { position: absolute; inset: 0; width: 100%; height: 100%; outline: none; }
.mv-title, .mv-read, .mv-legend, .mv-bar2 { position: absolute; z-index: 2; background: rgba(14, 17, 23, 0.72);
  padding: 1px 6px; border-radius: 3px; pointer-events: none; }
.mv-title { top: 2px; left: 2px; font-weight: 600; max-width: 60%; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
.mv-read { bottom: 2px; left: 2px; font-family: ui-monospace, monospace; font-size: 12px; color: #e0e0e0;
  max-width: 75%; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.mv-legend { top: 24px; left: 2px; display: flex; flex-direction: column; font-size: 12px; }
.mv-cbar { position: absolute; z-index: 2; bottom: 24px; left: 2px; background: rgba(14, 17, 23, 0.8);
  padding: 3px 6px; border-radius: 3px; font-size: 13px; pointer-events: none; }
.mv-cbar .ramp { width: 220px; height: 12px; border: 1px solid #888; margin: 2px 0; }
.mv-cbar .ticks { display: flex; justify-content: space-between; width: 222px; }
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

// The map's outline (value 1: voxels on either side of the threshold's border, 2 voxels thick) and the peak
// marker (value 2: a 3D cross of 2 voxels' reach) drawn from the map's own voxels, so that a threshold
// change needs no Python round trip.
function annotate(map, threshold, peakMm, outline) {
  const marks = map.clone();
  const [nx, ny, nz] = map.hdr.dims.slice(1, 4);
  const src = map.img;
  const out = new Float32Array(nx * ny * nz);
  const slope = map.hdr.scl_slope || 1;
  const inter = map.hdr.scl_inter || 0;
  if (outline) {
    const above = new Uint8Array(nx * ny * nz);
    for (let i = 0; i < above.length; i++) above[i] = src[i] * slope + inter > threshold ? 1 : 0;
    const steps = [1, nx, nx * ny];
    for (let z = 0; z < nz; z++) {
      for (let y = 0; y < ny; y++) {
        for (let x = 0; x < nx; x++) {
          const i = x + nx * (y + ny * z);
          const at = [x, y, z];
          const dims = [nx, ny, nz];
          for (let a = 0; a < 3 && !out[i]; a++) {
            if (at[a] > 0 && above[i - steps[a]] !== above[i]) out[i] = 1;
            if (at[a] < dims[a] - 1 && above[i + steps[a]] !== above[i]) out[i] = 1;
          }
        }
      }
    }
  }
  if (peakMm) {
    const [px, py, pz] = map.mm2vox(peakMm).map(Math.round);
    for (let d = -2; d <= 2; d++) {
      for (const [x, y, z] of [[px + d, py, pz], [px, py + d, pz], [px, py, pz + d]]) {
        if (x >= 0 && y >= 0 && z >= 0 && x < nx && y < ny && z < nz) out[x + nx * (y + ny * z)] = 2;
      }
    }
  }
  marks.img = out;
  marks.hdr.datatypeCode = 16;
  marks.hdr.scl_slope = 1;
  marks.hdr.scl_inter = 0;
  marks.name = "marks";
  marks.layerKind = "marks";
  marks.colormapLabel = null;
  marks.colormap = "mvmarks";
  marks.cal_min = 0.5;
  marks.cal_max = 2;
  marks.opacity = 1;
  marks.colorbarVisible = false;
  return marks;
}

const MARKS_COLORMAP = { R: [0, 0, 0, 255, 255], G: [0, 255, 255, 255, 255], B: [0, 255, 255, 0, 0],
  A: [0, 255, 255, 255, 255], I: [0, 1, 120, 136, 255] };

function round(values, digits = 1) {
  return Array.from(values).slice(0, 3).map((v) => Number(v.toFixed(digits)));
}

class Viewer {
  constructor(root) {
    this.root = root;
    this.panes = new Map(); // key -> {nv, box, title, read, legend, layersKey}
    this.viewSeq = null;
    this.data = null;
    this.clickSeq = 0;
    this.mode = "crosshair";
    this.syncing = false;
    this.state = { display: null };
    this.timers = {};
    const style = el("style");
    style.textContent = CSS;
    this.frame = el("div", "mv");
    this.bar = el("div", "mv-bar");
    this.paneRow = el("div", "mv-panes");
    this.notes = el("div", "mv-note");
    this.frame.append(this.bar, this.paneRow, this.notes);
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
    modes.title = "what a left drag does (shift-drag: distance, middle-drag: pan, ctrl+wheel: zoom, wheel: slices)";
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
    this.mapCtl?.remove();
    this.mapCtl = null;
    this.threshold = null;
    if (data.has_map) {
      const map = el("div", "mv-map");
      this.mapCtl = map;
      this.opacity = this.slider(map, "opacity", 0, 1, 0.05);
      this.threshold = this.slider(map, "threshold", 0, 1, 0.001);
      const mode = el("button", "", "outline");
      mode.dataset.mapmode = "1";
      mode.onclick = () => {
        this.mapSettings.mode = this.mapSettings.mode === "outline" ? "fill" : "outline";
        this.applyMap();
        this.reportDisplay();
      };
      map.append(mode);
      this.frame.append(map);
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
    holder.append(canvas);
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
    nv.attachToCanvas(canvas);
    nv.addColormap("mvmarks", MARKS_COLORMAP);
    nv.opts.mouseEventConfig = {
      leftButton: { primary: MODES[this.mode], withShift: DRAG_MODE.measurement, withCtrl: DRAG_MODE.pan },
      rightButton: DRAG_MODE.windowing, centerButton: DRAG_MODE.pan,
    };
    pane = { key: spec.key, nv, box, title, read, legend, cbar, layersKey: null, loading: null };
    nv.onLocationChange = (location) => this.located(pane, location);
    nv.onMouseUp = () => this.clicked(pane);
    nv.onDragRelease = () => this.dragged(pane);
    nv.onMeasurementCompleted = (m) => this.report("measurement", {
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
    pane.marksKey = null;
    const started = performance.now();
    const volumes = spec.layers.map((layer) => ({
      url: absolute(layer.url), name: layer.name, colormap: layer.kind === "image" ? "gray" : (layer.colormap || "hot"),
      opacity: layer.kind === "image" ? 1 : (layer.opacity ?? 1),
    }));
    await pane.nv.loadVolumes(volumes);
    spec.layers.forEach((layer, index) => {
      const volume = pane.nv.volumes[index];
      if (!volume) return;
      volume.layerKind = layer.kind;
      volume.colorbarVisible = false;
      if (layer.lut) volume.setColormapLabel(layer.lut);
    });
    pane.legend.replaceChildren(...(spec.legend || []).map(([name, rgb]) => {
      const item = el("span");
      const swatch = el("i");
      swatch.style.background = `rgb(${rgb.join(",")})`;
      item.append(swatch, name);
      return item;
    }));
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
    this.resize();
    await Promise.all(panes.map((pane, i) => this.load(pane, data.panes[i])));
    this.resize();
    for (const delay of [300, 1500]) setTimeout(() => this.resize(), delay); // after the page around settles
    this.notes.textContent = (data.notes || []).join(" · ");
    const view = data.view;
    if (view.seq !== this.viewSeq) {
      this.viewSeq = view.seq;
      this.window = { ...view.window };
      this.mapSettings = { ...view.map };
      this.hero = view.hero;
      this.eachNv((nv) => nv.setRadiologicalConvention(view.convention !== "neurological"));
      this.setHero(view.hero);
      if (view.crosshair_mm) this.moveTo(data.panes[0].key, view.crosshair_mm, true);
    }
    for (const [key, mm] of Object.entries(data.linked || {})) this.moveTo(key, mm, false);
    this.setWindow(this.window.width, this.window.level);
    this.applyMap();
    this.frame.dataset.ready = String(view.seq);
    this.frame.dataset.crosshair = JSON.stringify(this.panes.get(data.panes[0].key)?.mm || null);
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

  setWindow(width, level) {
    this.window = { width, level };
    this.eachNv((nv) => {
      for (const volume of nv.volumes) {
        if (volume.layerKind !== "image") continue;
        volume.cal_min = level - width / 2;
        volume.cal_max = level + width / 2;
      }
      nv.updateGLVolume();
    });
    this.refreshBar();
  }

  mapRange() {
    return { lo: this.mapSettings?.range?.[0] ?? 0, hi: this.mapSettings?.range?.[1] ?? 1 };
  }

  applyMap() {
    if (!this.mapSettings) return;
    const { threshold, vmax, opacity, mode, cmap } = this.mapSettings;
    this.eachNv((nv, pane) => {
      for (const volume of nv.volumes) {
        if (volume.layerKind === "map") {
          volume.cal_min = threshold;
          volume.cal_max = Math.max(vmax, threshold + 1e-6);
          volume.opacity = mode === "outline" ? 0 : opacity;
          if (cmap && volume.colormap !== cmap) volume.colormap = cmap;
        }
      }
      this.mark(nv, pane, threshold, mode === "outline");
      this.colourBar(pane, nv);
      nv.updateGLVolume();
    });
    this.refreshBar();
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
    const unit = this.data?.map_unit ? `raw ${this.data.map_unit}` : "raw";
    pane.cbar.replaceChildren();
    const label = el("div", "", `map (${unit}); transparent at or below ${threshold.toFixed(3)}`);
    const ramp = el("div", "ramp");
    ramp.style.background = gradient;
    const ticks = el("div", "ticks");
    ticks.append(el("span", "", threshold.toFixed(3)), el("span", "", ((threshold + vmax) / 2).toFixed(3)),
      el("span", "", vmax.toFixed(3)));
    pane.cbar.append(label, ramp, ticks);
  }

  mark(nv, pane, threshold, outline) {
    const map = nv.volumes.find((v) => v.layerKind === "map");
    const old = nv.volumes.find((v) => v.layerKind === "marks");
    const key = `${threshold}:${outline}:${pane.layersKey}`;
    if (!map || pane.marksKey === key) return;
    pane.marksKey = key;
    if (old) nv.removeVolume(old);
    const spec = this.data.panes.find((p) => p.key === pane.key);
    nv.addVolume(annotate(map, threshold, spec?.peak_mm, outline));
  }

  moveTo(key, mm, link) {
    const pane = this.panes.get(key);
    if (!pane || !pane.nv.volumes.length) return;
    pane.nv.scene.crosshairPos = pane.nv.mm2frac(mm);
    pane.nv.drawScene();
    pane.nv.createOnLocationChange();
    if (link) this.follow(pane, mm);
  }

  follow(source, mm) {
    if (this.syncing || this.data?.link !== "mm") return;
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
      if (kind === "map") return `map ${Number(v.value).toFixed(3)} ${this.data?.map_unit || ""}`;
      return "";
    }).filter(Boolean);
    pane.read.textContent = `(${pane.mm.join(", ")}) mm RAS · voxel (${round(location.vox, 0).join(", ")}) · `
      + values.join(" · ");
    if (!this.syncing) this.follow(pane, location.mm);
  }

  clicked(pane) {
    if (this.mode !== "crosshair" || !pane.mm) return;
    this.clickSeq += 1;
    this.report("click", { pane: pane.key, mm: pane.mm, seq: `${this.viewSeq}:${this.clickSeq}` });
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
    const top = this.paneRow.getBoundingClientRect().top;
    const fixed = this.data?.height;
    const height = fixed || Math.max(360, Math.floor(window.innerHeight - Math.max(0, top) - 12));
    for (const pane of this.panes.values()) {
      pane.box.querySelector(".mv-canvas").style.height = `${height}px`;
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
