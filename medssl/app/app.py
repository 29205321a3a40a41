"""The clinician app (Streamlit): a reading station for attention maps over the scan. Started by `medssl app
[RUN_DIR ...] [--port N] [--data-root DIR ...]`, which runs `streamlit run` on this file with
`-- --run DIR --data-root DIR`.

Layout and widgets only. The images are drawn in the browser by the reading viewport (NiiVue in a components-v2
custom component, `medssl/app/viewport/`): wheel slicing, zoom, pan, width/level and distance run there; a click
comes back as component state and moves the crosshair the statistics are read at. Everything else is a plain
function: `session` (data folders, cases, uploads, exports, review table), `grounding` (the one door to the
grounding model), `viewport` (NIfTI bytes for the browser, trust cues), `signals`, `review`, `paths`, and the
display library `medssl.display`. Every user error is shown as its one-line text, with the data folders
written by name, and the app goes on. Settings of a map (window, threshold, colours) are kept per (case,
model, phrase) in `S.displays`, outside widget state.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from medssl.app import session, viewport
from medssl.app.grounding import CONTROL, Grounding
from medssl.app.review import VERDICTS
from medssl.display.overlay import provenance_from_sidecar, render_views_png
from medssl.display.slicing import CONVENTIONS, mm_to_voxel, three_planes, voxel_to_mm
from medssl.display.windowing import CT_PRESETS, MR_PERCENTILE_PRESETS, Window, preset_for_phrase
from medssl.errors import UserError, one_line

LOG = logging.getLogger("medssl.app")
VERDICT_LABELS = {"right": "right", "wrong_region": "wrong region",
                  "should_not_be_groundable": "should not be groundable"}
SECOND = ("none", "another phrase", "another checkpoint", "prior study (follow-up)")
PAGE_CSS = """<style>
header[data-testid='stHeader'] {height: 0; min-height: 0; visibility: hidden}
[data-testid='stMainBlockContainer'] {padding: 0.6rem 1rem 1rem 1rem; max-width: 100%}
[data-testid='stSidebarCollapsedControl'], [data-testid='stExpandSidebarButton'] {visibility: visible; top: 0.2rem}
div[data-testid='stVerticalBlock'] {gap: 0.45rem}
</style>"""
S = st.session_state


# ----------------------------------------------------------------------------------------------- errors


@contextlib.contextmanager
def shown_errors(what: str) -> Iterator[None]:
    """A UserError becomes its one line in st.error (data folders written by name, upload folder as "upload");
    anything else a one-line st.error too (logged with its traceback on the server)."""
    try:
        yield
    except UserError as err:
        st.error(shown(one_line(err)))
    except Exception as err:  # noqa: BLE001 - the app must keep working; the traceback goes to the log
        LOG.exception("%s failed", what)
        st.error(shown(f"{what}: unexpected {type(err).__name__}: {one_line(err)}"))


def shown(text: str) -> str:
    library = S.get("library")
    if library is not None:
        text = library.shown(text)
    if S.get("upload_dir"):
        text = text.replace(str(Path(S.upload_dir).resolve()), "upload").replace(S.upload_dir, "upload")
    return text


def attempt(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), or None after showing the error."""
    with shown_errors(what):
        return fn(*args, **kwargs)
    return None


# ----------------------------------------------------------------------------------------------- caches


def _mtime(path: Path | str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner=False)
def library_for(runs: tuple[str, ...], roots: tuple[str, ...]) -> session.Library:
    return session.discover([Path(r) for r in runs], [Path(r) for r in roots])


@st.cache_resource(show_spinner=False)
def viewport_component() -> Callable[..., Any]:
    viewport.check_bundle()
    return st.components.v2.component(viewport.COMPONENT, js="viewport.js")


@st.cache_resource(show_spinner="Reading the volume ...", max_entries=8)
def view_volume(path: str, mtime: float) -> session.ViewVolume:
    return session.load_view_volume(Path(path))


@st.cache_resource(show_spinner="Loading the grounding model ...", max_entries=4)
def grounder_for(path: str, mtime: float, control: bool) -> Any:
    from medssl.app import grounding

    return grounding.load_grounder(path, control)


@st.cache_resource(show_spinner="Preparing the volume for the model ...", max_entries=8)
def prepared_for(checkpoint: str, ckpt_mtime: float, control: bool, image: str, image_mtime: float,
                 modality: str | None) -> Any:
    from medssl.app import grounding

    return grounding.prepare(grounder_for(checkpoint, ckpt_mtime, control), image, modality)


@st.cache_resource(show_spinner="Grounding ...", max_entries=64)
def grounding_for(checkpoint: str, ckpt_mtime: float, control: bool, image: str, image_mtime: float,
                  modality: str | None, phrase: str) -> Grounding:
    from medssl.app import grounding

    grounder = grounder_for(checkpoint, ckpt_mtime, control)
    prepared = prepared_for(checkpoint, ckpt_mtime, control, image, image_mtime, modality)
    return grounding.ground_phrase(grounder, prepared, phrase)


@st.cache_resource(show_spinner=False, max_entries=64)
def stored_for(row_key: str, _row: dict, image: str, image_mtime: float) -> Grounding:
    from medssl.app import grounding

    return grounding.stored_grounding(_row, view_volume(image, image_mtime).volume)


@st.cache_resource(show_spinner="Anatomy regions ...", max_entries=8)
def anatomy_regions(checkpoint: str, ckpt_mtime: float, image: str, image_mtime: float,
                  modality: str | None) -> dict[str, np.ndarray]:
    from medssl.app import grounding

    grounder = grounder_for(checkpoint, ckpt_mtime, False)
    return grounding.region_masks(grounder, prepared_for(checkpoint, ckpt_mtime, False, image, image_mtime, modality))


@st.cache_resource(show_spinner=False, max_entries=16)
def label_masks(path: str, mtime: float, image: str, image_mtime: float, names: tuple[tuple[int, str], ...],
                what: str) -> dict[str, np.ndarray]:
    return session.label_masks(Path(path), view_volume(image, image_mtime), dict(names), what)


@st.cache_resource(show_spinner=False, max_entries=16)
def label_array(path: str, mtime: float) -> np.ndarray:
    from medssl.data.io import read_volume

    return read_volume(path, label=True).array


@st.cache_resource(show_spinner="Preparing the volume for the browser ...", max_entries=8)
def image_bytes(path: str, mtime: float) -> tuple[bytes, str | None]:
    view = view_volume(path, mtime)
    steps = viewport.display_steps(view.volume.array.shape, view.volume.spacing)
    return (viewport.nifti_bytes(view.volume.array, view.volume.affine, steps),
            viewport.thinning_note(view.volume.array.shape, steps))


@st.cache_resource(show_spinner=False, max_entries=16)
def labels_bytes(path: str, mtime: float, image: str, image_mtime: float) -> bytes:
    view = view_volume(image, image_mtime)
    steps = viewport.display_steps(view.volume.array.shape, view.volume.spacing)
    labels = label_array(path, mtime)
    return viewport.nifti_bytes(labels, view.volume.affine, steps, kind="labels", crop=True)


@st.cache_resource(show_spinner=False, max_entries=32)
def map_bytes(key: tuple, _result: Grounding, image: str, image_mtime: float) -> bytes:
    view = view_volume(image, image_mtime)
    steps = viewport.display_steps(view.volume.array.shape, view.volume.spacing)
    return viewport.map_nifti(_result, view.volume.affine, steps)


@st.cache_resource(show_spinner="Loading the time-series model ...", max_entries=4)
def ts_model(path: str, mtime: float) -> Any:
    from medssl.app.signals import load_timeseries_model

    return load_timeseries_model(path)


@st.cache_data(show_spinner="Signal saliency ...", max_entries=32)
def ts_saliency(checkpoint: str, mtime: float, signal: str, fmt: str, method: str, target: int | None) -> tuple:
    from medssl.app.signals import read_for_model, saliency

    model = ts_model(checkpoint, mtime)
    recording = read_for_model(model, signal, fmt)
    return recording, saliency(model, recording, method=method, target=target)


@st.cache_data(show_spinner=False, max_entries=32)
def signal_picture(checkpoint: str, mtime: float, signal: str, fmt: str, method: str, target: int | None,
                   start: float) -> np.ndarray:
    from medssl.app.signals import signal_figure

    recording, result = ts_saliency(checkpoint, mtime, signal, fmt, method, target)
    return signal_figure(recording, result, start=start, seconds=10.0)


@st.cache_data(show_spinner=False, max_entries=16)
def waveform_picture(signal: str, mtime: float, fmt: str) -> np.ndarray:
    from medssl.app.signals import signal_figure
    from medssl.data.io import read_signal

    return signal_figure(read_signal(signal, fmt), None, seconds=10.0)


@st.cache_data(show_spinner=False, max_entries=16)
def manifest_cases(_library: session.Library, library_key: tuple, manifest: str, mtime: float
                   ) -> tuple[list[session.Case], list[str]]:
    return session.cases_from_manifest(_library, Path(manifest))


def served(data: bytes, slot: str) -> str:
    """A URL of the app's own server for `data` (Streamlit's in-memory media files): the only way volumes and
    maps reach the browser; the browser cannot name a file itself."""
    from streamlit import runtime

    return runtime.get_instance().media_file_mgr.add(data, "application/octet-stream", f"medssl-viewport-{slot}")


# ----------------------------------------------------------------------------------------------- state


def bump_view() -> None:
    """Python moved the view (a new case, phrase, jump): the viewport applies `view` once more."""
    S.view_seq = S.get("view_seq", 0) + 1


def set_crosshair_voxel(voxel: tuple[int, int, int], view: session.ViewVolume) -> None:
    S.crosshair = view.grid.check_voxel(tuple(int(v) for v in voxel))
    bump_view()


def set_cursor_b(voxel: tuple[int, int, int], view_b: session.ViewVolume) -> None:
    """Unlink the cursors and put B's on `voxel` of B's volume (a finding of the prior study)."""
    S.cursor_b = [float(v) for v in voxel_to_mm(view_b.volume.affine, view_b.grid.check_voxel(voxel))]
    bump_view()


def set_phrase(phrase: str, slot: str = "phrase") -> None:
    S[slot] = phrase.strip() or None
    S.phrase_problem = None
    bump_view()


def phrase_from_box(box: str, slot: str) -> None:
    problem = session.phrase_problem(S.get(box, ""))
    S.phrase_problem = problem
    if problem is None:
        S[slot] = S[box].strip()
        bump_view()


def display_key(case: session.Case, checkpoint: Path | None, phrase: str | None) -> str:
    return f"{case.key}|{checkpoint}|{phrase}"


def take_viewport_state(value: Any, view: session.ViewVolume, key: str) -> None:
    """A click (crosshair), a display change or a measurement reported by the viewport. A click in pane A, or in
    pane B while the cursors are linked (the same RAS point), moves the crosshair the statistics are read at; a
    click in pane B with the cursors unlinked places B's own cursor (`S.cursor_b`, mm), so that the two cursors
    can sit on one finding in the prior and the current study and their distance be read. Measurements are kept
    per pane."""
    if not value:
        return
    click = value.get("click")
    if isinstance(click, dict) and click.get("seq") != S.get("last_click") and click.get("pane") in ("A", "B"):
        S.last_click = click.get("seq")
        with shown_errors("click"):
            mm = [float(v) for v in click["mm"][:3]]
            follow = S.get("follow")
            if click["pane"] == "B" and not click.get("linked", True):
                S.cursor_b = mm
            else:
                if click["pane"] == "B" and follow and follow.get("how") == "anatomy":  # B's point in A
                    mm = list(session.matched_point(Path(follow["b"]), Path(follow["a"]), mm)[0])
                S.crosshair = mm_to_voxel(view.volume.affine, mm, view.volume.array.shape)
                S.clicked = True
                if click.get("linked", True):
                    S.cursor_b = None
    measurement = value.get("measurement")
    if isinstance(measurement, dict) and measurement.get("pane") in ("A", "B"):
        S.setdefault("measurements", {})[measurement["pane"]] = measurement
    display = value.get("display")
    if isinstance(display, dict) and display.get("view_seq") == S.get("view_seq"):
        S.displays[key] = {"window": display.get("window"), "map": display.get("map"), "hero": display.get("hero")}


# ----------------------------------------------------------------------------------------------- sidebar


def _short(path: Path, library: session.Library) -> str:
    return library.shown(str(path))


def _upload_folder() -> Path:
    if "upload_dir" not in S:
        S.upload_dir = tempfile.mkdtemp(prefix="medssl-app-")
    return Path(S.upload_dir)


def pick_case(library: session.Library) -> tuple[session.Case | None, list[session.Case]]:
    sources = []
    if library.manifests:
        sources.append("cases of a manifest")
    if library.infer_outputs:
        sources.append("maps of a ground infer output")
    sources += ["upload a volume", "file under the data folders"]
    source = st.sidebar.radio("Case from", sources, key="source")
    if source == "cases of a manifest":
        manifest = st.sidebar.selectbox("Manifest", library.manifests, format_func=lambda p: _short(p, library),
                                        key="manifest")
        listed = attempt("manifest", manifest_cases, library, (tuple(library.root_paths),), str(manifest),
                         _mtime(manifest))
        if listed is None:
            return None, []
        cases, problems = listed
        for problem in problems:
            st.sidebar.warning(shown(problem))
        if not cases:
            st.sidebar.error(shown(f"{manifest}: no entry with an image"))
            return None, []
        default = next((i for i, c in enumerate(cases) if "(test)" in c.title and c.lesion_names), 0)
        titles = {(c.title if [d.title for d in cases].count(c.title) == 1 else f"{c.title} #{n}"): c
                  for n, c in enumerate(cases)}
        chosen = st.sidebar.selectbox("Case (patient / study)", list(titles), index=default, key=f"case::{manifest}")
        return titles[chosen], cases
    if source == "maps of a ground infer output":
        output = st.sidebar.selectbox("Output folder", library.infer_outputs,
                                      format_func=lambda o: _short(o.folder, library), key="infer_output")
        return attempt("ground infer output", session.case_from_infer_output, library, output), []
    if source == "upload a volume":
        return upload_case(), []
    typed = st.sidebar.text_input("Path (relative to a data folder, or absolute under one)", key="typed_path")
    if not typed.strip():
        return None, []
    path = attempt("path", library.resolve, typed)
    return (session.case_from_file(path, "file") if path is not None else None), []


def upload_case() -> session.Case | None:
    """An uploaded volume. A refused upload is said in the page and taken out of the uploader."""
    nonce = S.setdefault("upload_nonce", 0)
    upload = st.sidebar.file_uploader("NIfTI (.nii, .nii.gz), NRRD, MHA, or a zipped DICOM series (.zip)",
                                      key=f"upload_{nonce}")
    if S.get("upload_refused"):
        st.sidebar.error(S.upload_refused)
    if upload is None:
        st.sidebar.caption(f"Limit {session.UPLOAD_LIMIT_MB} MiB.")
        return None
    saved = None
    with shown_errors("upload"):
        saved = session.save_upload(upload.name, upload.getvalue(), _upload_folder())
        S.upload_refused = None
    if saved is None:
        S.upload_refused = f"refused: {upload.name} (see the message above); choose a volume file"
        st.sidebar.error(S.upload_refused)
        S.upload_nonce = nonce + 1  # a fresh, empty uploader on the next run
        return None
    return session.case_from_file(saved, "upload")


def pick_checkpoint(library: session.Library, case: session.Case | None) -> Path | None:
    options = list(library.checkpoints)
    if case is not None and case.checkpoint is not None and case.checkpoint.resolve() not in options:
        resolved = attempt("checkpoint", library.resolve, str(case.checkpoint))
        if resolved is not None:
            options.append(resolved)
    if not options:
        st.sidebar.info("No grounding model (grounding.pt) under the data folders: stored maps only.")
        return None
    default = 0
    if case is not None and case.checkpoint is not None:
        default = next((i for i, p in enumerate(options) if p == case.checkpoint.resolve()), 0)
    return st.sidebar.selectbox("Grounding model", options, index=default, format_func=lambda p: _short(p, library),
                                key="checkpoint")


def presets_for(view: session.ViewVolume) -> list[dict[str, Any]]:
    """The window buttons of the viewport, with their numbers."""
    if view.modality == "CT":
        return [{"name": name, "label": f"{name} {w.label}", "width": w.width, "level": w.level}
                for name, w in CT_PRESETS.items()]
    presets = [{"name": name, "label": f"MR {name}", **dict(zip(("width", "level"), session.window_for(view, name)))}
               for name in MR_PERCENTILE_PRESETS]
    return presets


def opening_window(view: session.ViewVolume, phrase: str | None) -> Window:
    """The window a phrase opens in (CT: lung findings in the lung window, ...; MR: its default)."""
    return CT_PRESETS[preset_for_phrase(phrase)] if view.modality == "CT" else view.default_window


# ----------------------------------------------------------------------------------------------- results


def grounding(case: session.Case, view: session.ViewVolume, checkpoint: Path | None, phrase: str | None,
              modality: str | None, control: bool = False) -> Grounding | None:
    """The phrase's result: a stored one of the case's `ground infer` output, else grounded with the model."""
    if not phrase:
        return None
    image = str(case.image)
    if not control:
        for n, row in enumerate(case.rows):
            if row.get("phrase") == phrase and (checkpoint is None or case.checkpoint is None
                                                or Path(checkpoint) == case.checkpoint.resolve()):
                return attempt("stored map", stored_for, f"{case.key}#{n}", row, image, _mtime(image))
    if checkpoint is None:
        st.error("no grounding model under the data folders: only the stored maps can be shown")
        return None
    return attempt("grounding", grounding_for, str(checkpoint), _mtime(checkpoint), control, image, _mtime(image),
                   modality, phrase)


def result_block(result: Grounding, label: str = "") -> None:
    """The result with its score against the threshold, what the model read in the phrase and the organ it
    searched (with its volume), the trust cues, and every note on the phrase and on the image's preparation."""
    prefix = f"**{label}** " if label else ""
    phrase = result.phrase if len(result.phrase) <= 120 else result.phrase[:117] + "..."
    if not result.groundable:
        st.warning(f"{prefix}“{phrase}”: **not groundable** ({result.reason or 'below the threshold'}); "
                   f"score {result.score:.3f}, threshold {result.threshold:.3f}. No map is shown.")
    else:
        peak = result.sidecar.peak_mm
        where = f"; peak at ({peak[0]:.1f}, {peak[1]:.1f}, {peak[2]:.1f}) mm" if peak else ""
        st.success(f"{prefix}“{phrase}”: groundable, score {result.score:.3f} (threshold "
                   f"{result.threshold:.3f}){where}")
    for cue in viewport.result_cues(result):
        st.warning(cue)
    for line in viewport.query_lines(result):
        st.caption(line)
    for note in viewport.phrase_notes(result):
        st.caption(f"note: {shown(note)}")
    for note in result.preprocessing:
        st.caption(f"preprocessing note: {shown(note)}")


def report_rows(case: session.Case) -> None:
    statements = session.report_statements(case.report)
    st.markdown("**Report** — click a statement to ground it")
    if not statements:
        st.caption("This case has no report.")
    for n, statement in enumerate(statements):
        active = S.get("phrase") == statement.text
        st.button(f"{statement.text}  ·  _{statement.kind}_", key=f"ground_{n}", on_click=set_phrase,
                  args=(statement.text,), type="primary" if active else "secondary", width="stretch")
    box, go = st.columns([4, 1], vertical_alignment="bottom")
    box.text_input("Any phrase", key="free_phrase", placeholder="e.g. a hypodense lesion in the spleen",
                   max_chars=None)
    go.button("Ground", key="ground_free", on_click=phrase_from_box, args=("free_phrase", "phrase"), width="stretch")
    if S.get("phrase_problem"):
        st.error(S.phrase_problem)


# ----------------------------------------------------------------------------------------------- viewport


def pane_layers(case: session.Case, view: session.ViewVolume, result: Grounding | None, slot: str,
                show_organs: bool, show_lesions: bool) -> tuple[dict[str, Any], list[str]]:
    """One pane of the viewport: the image, the map (raw values), organ and lesion outlines with names."""
    image = str(case.image)
    data, note = image_bytes(image, _mtime(image))
    layers = [{"url": served(data, f"{slot}-image"), "name": "image.nii", "kind": "image"}]
    legend: list = []
    notes = [note] if note else []
    peak_mm = None
    if result is not None and result.map01 is not None:
        key = (result.checkpoint, result.phrase, image, _mtime(image))
        layers.append({"url": served(map_bytes(key, result, image, _mtime(image)), f"{slot}-map"), "name": "map.nii",
                       "kind": "map", "colormap": S.get("cmap", "hot"), "opacity": 0.6})
        peak_mm = list(result.sidecar.peak_mm) if result.sidecar.peak_mm else None
    if show_organs and case.label is not None:
        masks = attempt("label map", label_masks, str(case.label), _mtime(case.label), image, _mtime(image),
                        tuple(case.label_names.items()), "label")
        if masks is not None:
            names = {v: n for v, n in case.label_names.items() if n not in session.CONTAINER_LABELS}
            lut, entries = viewport.label_table(names)
            layers.append({"url": served(labels_bytes(str(case.label), _mtime(case.label), image, _mtime(image)),
                                         f"{slot}-organs"), "name": "organs.nii", "kind": "labels", "lut": lut,
                           "opacity": 1})
            legend += entries
    if show_lesions and case.lesion_mask is not None:
        masks = attempt("lesion mask", label_masks, str(case.lesion_mask), _mtime(case.lesion_mask), image,
                        _mtime(image), tuple(case.lesion_names.items()), "lesion")
        if masks is not None:
            lut, entries = viewport.label_table(case.lesion_names or {1: "lesion"}, colour=viewport.LESION_RGB)
            layers.append({"url": served(labels_bytes(str(case.lesion_mask), _mtime(case.lesion_mask), image,
                                                      _mtime(image)), f"{slot}-lesions"),
                           "name": "lesions.nii", "kind": "labels", "lut": lut, "opacity": 1})
            legend += entries
    return {"layers": layers, "legend": legend, "peak_mm": peak_mm}, notes


def map_scale(result: Grounding | None) -> dict[str, str] | None:
    """What the colour bar states: the map's raw scale and its meaning (None without a map)."""
    if result is None or result.map01 is None:
        return None
    return {"name": result.sidecar.raw_scale.name, "meaning": result.meaning}


def show_viewport(panes: list[dict[str, Any]], view: session.ViewVolume, display: dict[str, Any],
                  notes: list[str], link: str, linked: dict[str, list[float]], scale: dict[str, str] | None) -> None:
    component = attempt("viewer", viewport_component)
    if component is None:
        return
    crosshair_mm = list(voxel_to_mm(view.volume.affine, S.crosshair))
    data = {"panes": panes, "presets": presets_for(view), "has_map": any(len(p["layers"]) > 1 and
                                                                           p["layers"][1]["kind"] == "map"
                                                                           for p in panes),
            "view": {"seq": S.view_seq, "crosshair_mm": crosshair_mm, "window": display["window"],
                     "map": display["map"], "hero": display["hero"], "convention": S.get("convention", "radiological"),
                     "linked": S.get("cursor_b") is None},
            "notes": notes, "link": link, "linked": linked, "map_scale": scale}
    component(key="viewport", data=data, default={"click": None, "display": None, "measurement": None},
              on_click_change=lambda: None, on_display_change=lambda: None, on_measurement_change=lambda: None,
              height="content")


def crosshair_readout(view: session.ViewVolume, results: list[tuple[str, Grounding | None]],
                      families: dict[str, dict[str, np.ndarray]]) -> None:
    voxel = tuple(S.crosshair)
    mm = voxel_to_mm(view.volume.affine, voxel)
    st.markdown(f"**Crosshair** ({mm[0]:.1f}, {mm[1]:.1f}, {mm[2]:.1f}) mm RAS · voxel {voxel} · image "
                f"{float(view.volume.array[voxel]):.1f}")
    lines = []
    for label, result in results:
        if result is not None and result.map01 is not None:
            value = float(result.map01[voxel])
            lines.append(f"map {label}{float(result.raw(value)):.3f} raw ({value:.3f} on [0, 1])")
    inside = session.regions_at(families, voxel)
    for family, names in inside.items():
        lines.append(f"{family}: {', '.join(names) if names else '—'}")
    st.caption(" · ".join(lines) or "no map and no region masks")


def distance_readout(view: session.ViewVolume, titles: dict[str, str]) -> None:
    """The distance tool's read-out: each pane's last measurement (shift-drag or "distance" mode) and, with two
    panes, their difference (a finding's growth between the prior and the current study); with the cursors
    unlinked, where B's cursor is and how far it lies from A's (both RAS mm)."""
    def at(mm: Any) -> str:
        return "(" + ", ".join(f"{float(v):.1f}" for v in mm[:3]) + ")"

    measured = {pane: m for pane, m in (S.get("measurements") or {}).items() if pane in titles}
    lines = [f"distance {titles[pane]}: **{float(m['distance_mm']):.1f} mm** from {at(m['start_mm'])} to "
             f"{at(m['end_mm'])}" for pane, m in sorted(measured.items())]
    if len(measured) == 2:
        change = float(measured["A"]["distance_mm"]) - float(measured["B"]["distance_mm"])
        lines.append(f"{titles['A']} − {titles['B']}: **{change:+.1f} mm**")
    cursor_b = S.get("cursor_b")
    if cursor_b is not None and "B" in titles:
        a = np.asarray(voxel_to_mm(view.volume.affine, S.crosshair), dtype=float)
        delta = np.asarray(cursor_b, dtype=float) - a
        lines.append(f"cursors unlinked: {titles['A']} at {at(a)} mm, {titles['B']} at {at(cursor_b)} mm: "
                     f"**{float(np.linalg.norm(delta)):.1f} mm apart** (R {delta[0]:+.1f}, A {delta[1]:+.1f}, "
                     f"S {delta[2]:+.1f})")
    for line in lines:
        st.markdown(line)


# ----------------------------------------------------------------------------------------------- tabs


def families_for(case: session.Case, checkpoint: Path | None, modality: str | None, anatomy: bool
                 ) -> dict[str, dict[str, np.ndarray]]:
    """The region masks statistics and the read-out use: the organ head's organs and parts ("anatomy", when
    `anatomy`), the case's label map ("organs") and lesion mask ("lesions")."""
    families: dict[str, dict[str, np.ndarray]] = {}
    image = str(case.image)
    if checkpoint is not None and anatomy:
        regions = attempt("anatomy regions", anatomy_regions, str(checkpoint), _mtime(checkpoint), image, _mtime(image),
                          modality)
        if regions:
            families["anatomy"] = regions
    if case.label is not None:
        families["organs"] = attempt("label map", label_masks, str(case.label), _mtime(case.label), image,
                                     _mtime(image), tuple(case.label_names.items()), "label") or {}
    if case.lesion_mask is not None:
        families["lesions"] = attempt("lesion mask", label_masks, str(case.lesion_mask), _mtime(case.lesion_mask),
                                      image, _mtime(image), tuple(case.lesion_names.items()), "lesion") or {}
    return families


def anatomy_wanted(case: session.Case, view: session.ViewVolume, checkpoint: Path | None) -> bool:
    """Whether to run the organ head over the case for its organ / part regions: by default only on volumes of
    at most `session.ANATOMY_AUTO_VOXELS` voxels (a 512 x 512 x 300 CT takes minutes on a CPU, and the case must
    open in seconds); a sidebar switch per case says so and turns it on."""
    if checkpoint is None:
        return False
    voxels = int(np.prod(view.volume.array.shape))
    small = voxels <= session.ANATOMY_AUTO_VOXELS
    wanted = st.sidebar.checkbox("organ head regions (organs and their parts)", value=small,
                                 key=f"anatomy::{case.key}", help="runs the grounding model's organ head over this "
                                 "volume for the read-out and the region statistics")
    if not small and not wanted:
        st.sidebar.caption(f"organ head regions off for this volume ({voxels / 1e6:.1f} M voxels, more than "
                           f"{session.ANATOMY_AUTO_VOXELS / 1e6:.1f} M): tick to compute them")
    return wanted


def stats_tab(view: session.ViewVolume, result: Grounding | None, display: dict[str, Any],
              families: dict[str, dict[str, np.ndarray]]) -> None:
    if result is None or result.map01 is None:
        st.info("Ground a finding to see where its map lies.")
        return
    threshold = viewport.to_map01(result, float(display["map"]["threshold"]))
    above = st.checkbox(f"count only the map above the display threshold ({display['map']['threshold']:g} raw)",
                        value=True, key="stats_above")
    counted = session.stats_map(result.map01, threshold, above)
    if counted.max() <= 0:
        st.warning("no voxel of the map is above the threshold: lower it to see region statistics")
        return
    peak, voxel = result.sidecar.peak_mm, tuple(result.sidecar.peak_voxel)
    st.markdown(f"Peak of the map: ({peak[0]:.1f}, {peak[1]:.1f}, {peak[2]:.1f}) mm RAS, voxel {voxel}, raw "
                f"{float(result.raw(result.map01[voxel])):.3f}")
    if not families:
        st.caption("No region masks for this case (no anatomy regions, label map or lesion mask).")
        return
    report = attempt("region statistics", session.region_report, counted, view.volume.affine, families)
    if report is None:
        return
    rows, summary = report
    st.markdown("Top region per family (signed CNR of the map inside it against the rest)")
    st.table(summary)
    st.dataframe(rows, hide_index=True, width="stretch")


def signals_tab(library: session.Library, case: session.Case) -> None:
    if not case.signals:
        st.info("No ECG/PPG recordings for this patient in the manifest.")
        return
    columns = st.columns([1, 1.5, 0.9, 0.7, 1.2])
    trial = columns[0].selectbox("Recording", case.signals, format_func=lambda s: f"{s.trial_id} ({s.path.name})",
                                 key=f"signal_trial::{case.key}")
    if not library.timeseries:
        st.info("No time-series checkpoint (pretrain-timeseries or eval runs with checkpoints/last.pt) under the "
                "data folders: the waveform alone; give one with --data-root to see a saliency.")
        image = attempt("signal figure", waveform_picture, str(trial.path), _mtime(trial.path.with_suffix(".hea")),
                        trial.format)
        if image is not None:
            st.image(image, output_format="PNG", caption=f"patient {case.patient_id}, trial {trial.trial_id}")
        return
    checkpoint, kind = columns[1].selectbox("Time-series model", library.timeseries,
                                            format_func=lambda c: f"{_short(c[0], library)} ({c[1]})",
                                            key="ts_checkpoint")
    method = columns[2].radio("Attribution", ("gradient", "occlusion"), horizontal=True, key="ts_method",
                              help="gradient: |gradient x input|; occlusion: change when 0.1 s is replaced by the "
                                   "window mean")
    model = attempt("time-series model", ts_model, str(checkpoint), _mtime(checkpoint))
    if model is None:
        return
    target = None
    if model.classes:
        choice = columns[3].selectbox("Class", ["predicted"] + list(range(model.classes)), key="ts_class")
        target = None if choice == "predicted" else int(choice)
    computed = attempt("signal saliency", ts_saliency, str(checkpoint), _mtime(checkpoint), str(trial.path),
                       trial.format, method, target)
    if computed is None:
        return
    recording, result = computed
    start = 0.0
    if recording.duration > 10.0:
        start = columns[4].slider("Shown from (s), 10 s", 0.0, max(0.0, recording.duration - 10.0), 0.0, 0.5,
                                  key="ts_start")
    st.caption(f"Attribution: **{result.method}** of the **{result.target}** ({model.kind} "
               f"{_short(checkpoint, library)}), {result.windows} window(s) of {model.prep.window_seconds:g} s at "
               f"{model.prep.fs:g} Hz; patient {case.patient_id}, trial {trial.trial_id}.")
    image = attempt("signal figure", signal_picture, str(checkpoint), _mtime(checkpoint), str(trial.path),
                    trial.format, method, target, float(start))
    if image is not None:
        st.image(image, output_format="PNG", caption=f"patient {case.patient_id}, trial {trial.trial_id}")


def export_tab(library: session.Library, case: session.Case, view: session.ViewVolume, display: dict[str, Any],
               results: list[tuple[str, Grounding | None]], checkpoint: Path | None) -> None:
    maps = [(label, r) for label, r in results if r is not None and r.map01 is not None
            and r.map01.shape == view.volume.array.shape]
    if not maps:
        st.info("Ground a finding first: the export holds the views with the map and the map itself.")
        return
    folder = library.review_folder(checkpoint)
    if folder is None:
        st.info("Start the app with a run directory to export (files go to RUN_DIR/exports/).")
        return
    st.caption(f"Writes PNG (three planes at the crosshair, overlay, colour bar; provenance in PNG text chunks) and "
               f"NIfTI + JSON sidecar (provenance also in the NIfTI header) to "
               f"{library.shown(str(folder / session.EXPORT_FOLDER))}.")
    if not st.button("Export PNG and NIfTI", key="export"):
        return
    convention = S.get("convention", CONVENTIONS[0])
    window = Window(float(display["window"]["width"]), float(display["window"]["level"]))
    for label, result in maps:
        style = display["map"]
        threshold = viewport.to_map01(result, float(style["threshold"]))
        vmax = max(viewport.to_map01(result, float(style["vmax"])), threshold + 1e-3)
        settings = {"threshold_raw": style["threshold"], "vmax_raw": style["vmax"], "threshold": threshold,
                    "vmax": vmax, "opacity": style["opacity"], "cmap": style["cmap"], "mode": style["mode"],
                    "window": list(window), "convention": convention}

        def write(result: Grounding = result, label: str = label) -> list[Path]:
            stem = session.export_stem(folder, case.title, result.phrase, label.strip(": ").lower())
            views = three_planes(view.volume, S.crosshair, convention, view.grid)
            map_views = three_planes((result.map01, view.volume.affine), S.crosshair, convention, view.grid)
            png = render_views_png(stem.with_name(stem.name + ".png"), views, map_views, window=window,
                                   provenance=provenance_from_sidecar(result.sidecar, threshold),
                                   cmap=style["cmap"], opacity=float(style["opacity"]), threshold=threshold,
                                   vmin=threshold, vmax=vmax, mode=style["mode"], sidecar=result.sidecar)
            nifti, sidecar = session.export_map(stem, result.map01, view.volume.affine, result.sidecar, settings)
            return [png, nifti, sidecar]

        written = attempt("export", write)
        if written:
            st.success("wrote " + ", ".join(library.shown(str(p)) for p in written))
            for path in written:
                st.download_button(f"download {path.name}", path.read_bytes(), file_name=path.name,
                                   key=f"download_{path.name}")


def review_tab(library: session.Library, case: session.Case, view: session.ViewVolume,
               results: list[tuple[str, Grounding | None]], checkpoint: Path | None) -> None:
    folder = library.review_folder(checkpoint)
    if folder is None:
        st.info("Start the app with a run directory to keep a review table (RUN_DIR/review.csv).")
        return
    judged = [(label, r) for label, r in results if r is not None]
    if judged:
        crosshair = voxel_to_mm(view.volume.affine, S.crosshair)
        with st.form("review", clear_on_submit=False):
            names = [f"{label}{r.phrase}" for label, r in judged]
            which = st.radio("Map", names, key="review_which") if len(judged) > 1 else names[0]
            verdict = st.radio("Verdict (none chosen until you choose)", VERDICTS, index=None,
                               format_func=VERDICT_LABELS.get, horizontal=True, key="review_verdict")
            reviewer = st.text_input("Reviewer (your name or initials)", key="review_reviewer")
            mark = st.checkbox(f"The finding really is at the crosshair ({crosshair[0]:.1f}, {crosshair[1]:.1f}, "
                               f"{crosshair[2]:.1f}) mm — click it in the viewer first", key="review_mark")
            comment = st.text_input("Comment (optional)", key="review_comment")
            if st.form_submit_button("Save review"):
                if verdict is None or not reviewer.strip():
                    st.error("review: choose a verdict and give the reviewer's name; nothing was saved")
                else:
                    result = next(r for label, r in judged if f"{label}{r.phrase}" == which)
                    row = attempt("review", session.add_review, folder, checkpoint=result.checkpoint,
                                  image=str(case.image), phrase=result.phrase, verdict=verdict, comment=comment,
                                  reviewer=reviewer.strip(), true_mm=crosshair if mark else None)
                    if row is not None:
                        st.success(f"saved: {VERDICT_LABELS[row.verdict]} for “{row.phrase}” by {row.reviewer} in "
                                   f"{library.shown(str(session.review_csv(folder)))}")
    else:
        st.info("Ground a finding to review its map.")
    table = attempt("review table", session.review_table, folder)
    if table:
        st.markdown(f"Review summary per checkpoint ({library.shown(str(session.review_csv(folder)))})")
        st.dataframe(table, hide_index=True, width="stretch")


# ----------------------------------------------------------------------------------------------- page


def second_view(library: session.Library, case: session.Case, cases: list[session.Case], view: session.ViewVolume,
                checkpoint: Path | None, modality: str | None
                ) -> tuple[str, session.Case | None, Grounding | None, str]:
    """The second pane: (mode, its case, its result, its title)."""
    mode = st.sidebar.radio("Second view", SECOND, key="second")
    if mode == "another phrase":
        st.sidebar.text_input("Phrase B", key="phrase_b_box", on_change=phrase_from_box,
                              args=("phrase_b_box", "phrase_b"))
        return mode, case, grounding(case, view, checkpoint, S.get("phrase_b"), modality), f"B: {S.get('phrase_b')}"
    if mode == "another checkpoint":
        others = [p for p in library.checkpoints if p != checkpoint] + ([CONTROL] if checkpoint else [])
        other = st.sidebar.selectbox("Checkpoint B", others, key="checkpoint_b",
                                     format_func=lambda p: p if isinstance(p, str) else _short(p, library))
        name = other if isinstance(other, str) else _short(other, library)
        if other == CONTROL:
            return mode, case, grounding(case, view, checkpoint, S.get("phrase"), modality, control=True), f"B: {name}"
        if other is not None:
            return mode, case, grounding(case, view, other, S.get("phrase"), modality), f"B: {name}"
        return mode, None, None, ""
    if mode == "prior study (follow-up)":
        studies = session.other_studies(cases, case)
        if not studies:
            st.sidebar.info("No other study of this patient in the manifest.")
            return mode, None, None, ""
        prior = st.sidebar.selectbox("Other study", studies, format_func=lambda c: c.title, key="other_study")
        other_view = attempt("volume", view_volume, str(prior.image), _mtime(prior.image))
        if other_view is None:
            return mode, None, None, ""
        return mode, prior, grounding(prior, other_view, checkpoint, S.get("phrase"), modality), f"{prior.title}"
    return mode, None, None, ""


def main() -> None:
    st.set_page_config(page_title="medssl reading station", layout="wide", initial_sidebar_state="collapsed")
    st.markdown(PAGE_CSS, unsafe_allow_html=True)
    args = attempt("app arguments", session.parse_app_args, sys.argv[1:])
    if args is None:
        return
    runs, roots = args
    library = library_for(tuple(str(r) for r in runs), tuple(str(r) for r in roots))
    S.library = library
    S.setdefault("displays", {})
    S.setdefault("view_seq", 0)
    st.sidebar.title("medssl reading station")
    if st.sidebar.button("Rescan the data folders", key="rescan"):
        library_for.clear()
        library = S.library = library_for(tuple(str(r) for r in runs), tuple(str(r) for r in roots))
    with st.sidebar.expander("Data folders (the only places read)"):
        for root in library.roots:
            st.caption(f"{root.path} — {root.why}")
    for problem in library.problems:
        st.sidebar.error(shown(problem))
    if not library.roots:
        st.error("no data folder to read: start with medssl app RUN_DIR or --data-root DIR")
        return
    case, cases = pick_case(library)
    checkpoint = pick_checkpoint(library, case)
    modality_choice = st.sidebar.selectbox("Intensities for the model", ("as trained", "CT", "MR"), key="modality")
    modality = None if modality_choice == "as trained" else modality_choice
    if case is None:
        st.info("Choose a case in the sidebar (the arrow at the top left).")
        return
    view = attempt("volume", view_volume, str(case.image), _mtime(case.image))
    if view is None:
        return
    if S.get("case_key") != case.key:
        S.case_key, S.crosshair, S.phrase, S.phrase_b = case.key, view.centre, session.first_map(case), None
        S.measurements, S.cursor_b, S.follow, S.pane_b_is = {}, None, None, None
        bump_view()
    st.sidebar.radio("Convention", CONVENTIONS, key="convention", horizontal=True, on_change=bump_view,
                     help="radiological: the patient's right on the screen's left; neurological: the patient's left "
                          "on the left")
    st.sidebar.selectbox("Map colours", viewport.MAP_CMAPS, key="cmap", on_change=bump_view)
    show_lesions = st.sidebar.checkbox("lesion masks (magenta outline)", value=True, key="show_lesions",
                                       disabled=case.lesion_mask is None)
    show_organs = st.sidebar.checkbox("organ outlines (own colours, named)", value=False, key="show_organs",
                                      disabled=case.label is None)
    take_viewport_state(S.get("viewport"), view, display_key(case, checkpoint, S.get("phrase")))
    mode, case_b, result_b, title_b = second_view(library, case, cases, view, checkpoint, modality)

    left, right = st.columns([0.68, 0.32], gap="small")
    with right:
        st.markdown(f"**{case.title}** · {view.volume.array.shape[0]} x {view.volume.array.shape[1]} x "
                    f"{view.volume.array.shape[2]} voxels · {view.modality}")
        if view.grid.note:
            st.caption(view.grid.note)
        report_rows(case)
        result = grounding(case, view, checkpoint, S.get("phrase"), modality)
        key = display_key(case, checkpoint, S.get("phrase"))
        if key not in S.displays:
            S.displays[key] = {"window": dict(zip(("width", "level"), opening_window(view, S.get("phrase")))),
                               "map": None, "hero": "axial"}
        display = S.displays[key]
        if result is not None and result.map01 is not None and not display.get("map"):
            display["map"] = viewport.default_display(result, cmap=S.get("cmap", "hot")).to_dict()
        if display.get("map") is not None:
            display["map"]["cmap"] = S.get("cmap", "hot")
        if result is not None:
            result_block(result, "A:" if result_b is not None else "")
            buttons = st.columns(2)
            if result.groundable and result.sidecar.peak_voxel:
                buttons[0].button("Jump to peak", key="jump", on_click=set_crosshair_voxel,
                                  args=(tuple(result.sidecar.peak_voxel), view), width="stretch")
        if result_b is not None:
            result_block(result_b, f"{title_b}:" if mode != "prior study (follow-up)" else f"{title_b}:")
            if mode in ("another phrase", "another checkpoint") and result is not None:
                cue = viewport.correlation_cue(viewport.map_correlation(result.map01, result_b.map01))
                if cue:
                    st.warning(cue)
        if case.lesion_mask is not None:
            lesions = attempt("lesion mask", label_masks, str(case.lesion_mask), _mtime(case.lesion_mask),
                              str(case.image), _mtime(case.image), tuple(case.lesion_names.items()), "lesion") or {}
            for n, (name, mask) in enumerate(lesions.items()):
                st.button(f"Centre on {name}", key=f"centre_lesion_{n}", on_click=set_crosshair_voxel,
                          args=(session.mask_centre(mask), view), width="stretch")
        if mode == "prior study (follow-up)" and case_b is not None and case_b.lesion_mask is not None:
            view_b = view_volume(str(case_b.image), _mtime(case_b.image))  # read (or cached) by second_view
            lesions_b = attempt("lesion mask", label_masks, str(case_b.lesion_mask), _mtime(case_b.lesion_mask),
                                str(case_b.image), _mtime(case_b.image), tuple(case_b.lesion_names.items()),
                                "lesion") or {}
            for n, (name, mask) in enumerate(lesions_b.items()):
                st.button(f"Centre {case_b.title} on {name}", key=f"centre_lesion_b_{n}", on_click=set_cursor_b,
                          args=(session.mask_centre(mask), view_b), width="stretch",
                          help="unlinks the cursors: each study keeps its own")
        families = families_for(case, checkpoint, modality, anatomy_wanted(case, view, checkpoint))
    with left:
        empty_map = {"threshold": 0.0, "vmax": 1.0, "range": [0.0, 1.0], "opacity": 0.6, "cmap": "hot", "mode": "fill"}
        shown_display = {**display, "map": display.get("map") or empty_map}
        pane_a, notes = pane_layers(case, view, result, "A", show_organs, show_lesions)
        panes = [{"key": "A", "title": f"{case.title}" + (f" · {S.phrase}" if S.get("phrase") else ""), **pane_a}]
        linked: dict[str, list[float]] = {}
        link = "mm"
        titles = {"A": case.title}
        S.follow = None  # how pane B's points map to pane A's (read by the next click)
        if case_b is not None and (result_b is not None or mode == "prior study (follow-up)"):
            view_b = view_volume(str(case_b.image), _mtime(case_b.image))
            pane_b, notes_b = pane_layers(case_b, view_b, result_b, "B", show_organs, show_lesions)
            panes.append({"key": "B", "title": title_b, **pane_b})
            notes += notes_b
            titles["B"] = title_b.removeprefix("B: ") if case_b is case else case_b.title
            if case_b is not case:
                point, how = session.matched_point(case.image, case_b.image, voxel_to_mm(view.volume.affine,
                                                                                         S.crosshair))
                link = "mm" if how == "mm" else "python"
                if how != "mm":
                    linked["B"] = list(point)
                S.follow = {"a": str(case.image), "b": str(case_b.image), "how": how}
        pane_b_is = (titles.get("B"), str(case_b.image) if "B" in titles else None)
        if S.get("pane_b_is") != pane_b_is:  # another pane B: its own cursor and measurement go, the cursors link
            S.pane_b_is, S.cursor_b = pane_b_is, None
            S.measurements = {k: v for k, v in (S.get("measurements") or {}).items() if k == "A"}
            bump_view()
        if S.get("cursor_b") is not None:
            linked["B"] = list(S.cursor_b)
        if S.follow is not None:
            notes.append("cursors unlinked: each study has its own (the distance between them is below)"
                         if S.get("cursor_b") is not None else
                         f"cursors linked by {'anatomy' if S.follow['how'] == 'anatomy' else 'mm (RAS coordinates)'}")
        show_viewport(panes, view, shown_display, notes, link, linked, map_scale(result))
        crosshair_readout(view, [("A " if result_b is not None else "", result),
                                 ("B " if case_b is case else "", result_b if case_b is case else None)], families)
        distance_readout(view, titles)
    results = [("A: " if result_b is not None else "", result),
               ("B: ", result_b if case_b is case else None)]
    tabs = st.tabs(["Region statistics", "Signals", "Export", "Review"])
    with tabs[0], shown_errors("region statistics"):
        stats_tab(view, result, shown_display, families)
    with tabs[1], shown_errors("signals"):
        signals_tab(library, case)
    with tabs[2], shown_errors("export"):
        export_tab(library, case, view, shown_display, results, checkpoint)
    with tabs[3], shown_errors("review"):
        review_tab(library, case, view, results, checkpoint)


main()
