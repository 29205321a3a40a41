"""The clinician app (Streamlit): attention maps over the scan. Started by `medssl app [RUN_DIR ...]
[--port N] [--data-root DIR ...]`, which runs `streamlit run` on this file with `-- --run DIR --data-root DIR`.

Layout and widgets only: reading, slicing, windowing, compositing, statistics, exports and the review
table are plain functions of `medssl.viewer` (`session`, `render`, `signals`, `slicing`, `overlay`,
`stats`, `review`, `paths`). Every user error is shown as its one-line text (`st.error`) and the app goes
on. Models and prepared volumes are cached with `st.cache_resource`, maps with `st.cache_data`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from medssl.errors import UserError, one_line
from medssl.viewer import render, session
from medssl.viewer.overlay import colorbar_image, provenance_from_sidecar, render_views_png
from medssl.viewer.review import VERDICTS
from medssl.viewer.slicing import CONVENTIONS, PLANES, three_planes, voxel_to_mm
from medssl.viewer.windowing import CT_PRESETS, MR_PERCENTILE_PRESETS, Window

try:  # click-to-set crosshair; without it the planes are plain images and the sliders move the crosshair
    from streamlit_image_coordinates import streamlit_image_coordinates
except ImportError:  # pragma: no cover - a dependency of medssl
    streamlit_image_coordinates = None

LOG = logging.getLogger("medssl.app")
CMAPS = ("turbo", "jet", "hot", "inferno", "viridis")
CONTROL = "untrained scorer"
VERDICT_LABELS = {"right": "right", "wrong_region": "wrong region",
                  "should_not_be_groundable": "should not be groundable"}
S = st.session_state


# ----------------------------------------------------------------------------------------------- errors


@contextlib.contextmanager
def shown_errors(what: str) -> Iterator[None]:
    """A UserError becomes its one line in st.error; anything else a one-line st.error too (logged with its
    traceback on the server), so the page never shows a stack trace and the rest of it still runs."""
    try:
        yield
    except UserError as err:
        st.error(one_line(err))
    except Exception as err:  # noqa: BLE001 - the app must keep working; the traceback goes to the log
        LOG.exception("%s failed", what)
        st.error(f"{what}: unexpected {type(err).__name__}: {one_line(err)}")


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


@st.cache_resource(show_spinner="Reading the volume ...", max_entries=8)
def view_volume(path: str, mtime: float) -> session.ViewVolume:
    return session.load_view_volume(Path(path))


@st.cache_resource(show_spinner="Loading the grounding model ...", max_entries=4)
def grounder_for(path: str, mtime: float, control: bool) -> Any:
    from medssl.downstream.grounding.infer import Grounder

    grounder = Grounder.load(path)
    return grounder.untrained() if control else grounder


@st.cache_resource(show_spinner="Preparing the volume for the model ...", max_entries=8)
def grounded_for(checkpoint: str, ckpt_mtime: float, control: bool, image: str, image_mtime: float,
                 modality: str | None) -> Any:
    return grounder_for(checkpoint, ckpt_mtime, control).prepare(image, modality=modality)


@st.cache_data(show_spinner="Grounding ...", max_entries=64)
def grounding_for(checkpoint: str, ckpt_mtime: float, control: bool, image: str, image_mtime: float,
                  modality: str | None, phrase: str) -> session.Grounding:
    grounder = grounder_for(checkpoint, ckpt_mtime, control)
    return session.ground_phrase(grounder, grounded_for(checkpoint, ckpt_mtime, control, image, image_mtime, modality),
                                 phrase)


@st.cache_data(show_spinner=False, max_entries=64)
def stored_for(row: dict, image: str, image_mtime: float) -> session.Grounding:
    return session.stored_grounding(row, view_volume(image, image_mtime))


@st.cache_resource(show_spinner="Organs and their parts ...", max_entries=8)
def anatomy_regions(checkpoint: str, ckpt_mtime: float, image: str, image_mtime: float,
                  modality: str | None) -> dict[str, np.ndarray]:
    grounder = grounder_for(checkpoint, ckpt_mtime, False)
    return grounder.region_masks(grounded_for(checkpoint, ckpt_mtime, False, image, image_mtime, modality))


@st.cache_resource(show_spinner=False, max_entries=16)
def label_masks(path: str, mtime: float, image: str, image_mtime: float, names: tuple[tuple[int, str], ...],
                what: str) -> dict[str, np.ndarray]:
    return session.label_masks(Path(path), view_volume(image, image_mtime), dict(names), what)


@st.cache_resource(show_spinner="Loading the time-series model ...", max_entries=4)
def ts_model(path: str, mtime: float) -> Any:
    from medssl.viewer.signals import load_timeseries_model

    return load_timeseries_model(path)


@st.cache_data(show_spinner="Signal saliency ...", max_entries=32)
def ts_saliency(checkpoint: str, mtime: float, signal: str, fmt: str, method: str, target: int | None) -> tuple:
    from medssl.viewer.signals import read_for_model, saliency

    model = ts_model(checkpoint, mtime)
    recording = read_for_model(model, signal, fmt)
    return recording, saliency(model, recording, method=method, target=target)


@st.cache_data(show_spinner=False, max_entries=64)
def colour_bar(style: render.MapStyle, sidecar_json: str) -> np.ndarray:
    from medssl.explain.maps import MapSidecar

    sidecar = MapSidecar.model_validate_json(sidecar_json)
    return colorbar_image(cmap=style.cmap, vmin=style.vmin, vmax=style.vmax, threshold=style.threshold, sidecar=sidecar,
                          height_px=render.DISPLAY_PX)


@st.cache_data(show_spinner=False, max_entries=32)
def signal_picture(checkpoint: str, mtime: float, signal: str, fmt: str, method: str, target: int | None,
                   start: float) -> np.ndarray:
    from medssl.viewer.signals import signal_figure

    recording, result = ts_saliency(checkpoint, mtime, signal, fmt, method, target)
    return signal_figure(recording, result, start=start, seconds=10.0)


@st.cache_data(show_spinner=False, max_entries=16)
def waveform_picture(signal: str, mtime: float, fmt: str) -> np.ndarray:
    from medssl.data.io import read_signal
    from medssl.viewer.signals import signal_figure

    return signal_figure(read_signal(signal, fmt), None, seconds=10.0)


@st.cache_data(show_spinner=False, max_entries=16)
def manifest_cases(_library: session.Library, library_key: tuple, manifest: str, mtime: float
                   ) -> tuple[list[session.Case], list[str]]:
    return session.cases_from_manifest(_library, Path(manifest))


# ----------------------------------------------------------------------------------------------- state


def reset_case(case: session.Case, view: session.ViewVolume) -> None:
    """A new case: crosshair at the centre, no phrase."""
    S.case_key = case.key
    S.crosshair = view.centre
    S.phrase = None
    S.phrase_b = None
    S.last_click = {plane: (S.get(f"click_{plane}") or {}).get("unix_time") for plane in PLANES}  # old clicks
    S.panels = {}
    sync_sliders(view)


def sync_sliders(view: session.ViewVolume) -> None:
    for plane in PLANES:
        S[f"slice_{plane}"] = view.grid.slice_position(S.crosshair, plane)


def move_slice(plane: str, view: session.ViewVolume) -> None:
    S.crosshair = view.grid.with_slice(S.crosshair, plane, S[f"slice_{plane}"])


def set_crosshair(voxel: tuple[int, int, int], view: session.ViewVolume) -> None:
    S.crosshair = view.grid.check_voxel(voxel)
    sync_sliders(view)


def take_click(plane: str, view: session.ViewVolume) -> None:
    """A new click on a plane (its component value has a time not seen yet) moves the crosshair there."""
    value = S.get(f"click_{plane}")
    panel = S.get("panels", {}).get(plane)
    if not isinstance(value, dict) or panel is None or S.last_click.get(plane) == value.get("unix_time"):
        return
    S.last_click[plane] = value.get("unix_time")
    with shown_errors("click"):
        set_crosshair(panel.voxel_at(value["x"], value["y"], value.get("width"), value.get("height")), view)


def set_phrase(phrase: str, slot: str = "phrase") -> None:
    S[slot] = phrase.strip() or None


def phrase_from_box(box: str, slot: str) -> None:
    set_phrase(S.get(box, ""), slot)


# ----------------------------------------------------------------------------------------------- sidebar


def _short(path: Path, library: session.Library) -> str:
    for root in library.roots:
        if path == root.path or path.is_relative_to(root.path):
            return f"{root.path.name}/{path.relative_to(root.path)}" if path != root.path else root.path.name
    return str(path)


def _upload_folder() -> Path:
    if "upload_dir" not in S:
        S.upload_dir = tempfile.mkdtemp(prefix="medssl-app-")
    return Path(S.upload_dir)


def pick_case(library: session.Library) -> session.Case | None:
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
            return None
        cases, problems = listed
        for problem in problems:
            st.sidebar.warning(problem)
        if not cases:
            st.sidebar.error(f"{manifest}: no entry with an image")
            return None
        default = next((i for i, c in enumerate(cases) if "(test)" in c.title and c.lesion_names), 0)
        titles = {(c.title if [d.title for d in cases].count(c.title) == 1 else f"{c.title} #{n}"): c
                  for n, c in enumerate(cases)}
        chosen = st.sidebar.selectbox("Case (patient / study)", list(titles), index=default, key=f"case::{manifest}")
        return titles[chosen]
    if source == "maps of a ground infer output":
        output = st.sidebar.selectbox("Output folder", library.infer_outputs,
                                      format_func=lambda o: _short(o.folder, library), key="infer_output")
        return attempt("ground infer output", session.case_from_infer_output, library, output)
    if source == "upload a volume":
        upload = st.sidebar.file_uploader("NIfTI, NRRD, MHA, or a zipped DICOM series",
                                          type=["nii", "gz", "nrrd", "mha", "zip"], key="upload")
        if upload is None:
            st.sidebar.caption(f"Limit {session.UPLOAD_LIMIT_MB} MiB.")
            return None
        saved = attempt("upload", session.save_upload, upload.name, upload.getvalue(), _upload_folder())
        return session.case_from_file(saved, "upload") if saved is not None else None
    typed = st.sidebar.text_input("Path (relative to a data folder, or absolute under one)", key="typed_path")
    if not typed.strip():
        return None
    path = attempt("path", library.resolve, typed)
    return session.case_from_file(path, "file") if path is not None else None


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


def window_controls(view: session.ViewVolume) -> Window:
    labels = {f"default ({view.default_window.label})": "default"}
    labels.update({f"CT {name} {w.label}": name for name, w in CT_PRESETS.items()})
    labels.update({f"MR {name}": name for name in MR_PERCENTILE_PRESETS})
    labels["free width / level"] = "free"
    choice = st.sidebar.selectbox("Window (width/level)", list(labels), key="window_preset")
    if labels[choice] != "free":
        window = session.window_for(view, labels[choice])
        st.sidebar.caption(f"window {window.label} (width/level): {window.low:g} to {window.high:g}")
        return window
    width = st.sidebar.number_input("width", min_value=1.0, value=float(view.default_window.width), key="free_width")
    level = st.sidebar.number_input("level", value=float(view.default_window.level), key="free_level")
    return Window(float(width), float(level))


def style_controls(grounding: session.Grounding | None) -> render.MapStyle:
    """The overlay settings; a new map gets its default threshold and colour scale (`session.default_display`)."""
    S.setdefault("threshold", 0.5)
    S.setdefault("colour_range", (0.0, 1.0))
    S.setdefault("opacity", 0.6)
    if grounding is not None and grounding.map01 is not None and S.get("style_key") != (grounding.checkpoint,
                                                                                          grounding.phrase):
        threshold, vmin, vmax = session.default_display(grounding.map01)
        S.threshold, S.colour_range = threshold, (vmin, vmax)
        S.style_key = (grounding.checkpoint, grounding.phrase)
    st.sidebar.subheader("Map overlay")
    cmap = st.sidebar.selectbox("Colour map", CMAPS, key="cmap")
    opacity = st.sidebar.slider("Opacity", 0.0, 1.0, step=0.05, key="opacity")
    threshold = st.sidebar.slider("Threshold (transparent at or below)", 0.0, 1.0, step=0.005, key="threshold",
                                  help="Map values at or below it are not drawn. Default for a new map: its top 5 % "
                                       "inside the body.")
    vmin, vmax = st.sidebar.slider("Colour scale (map value range)", 0.0, 1.0, step=0.005, key="colour_range")
    if vmax <= vmin:
        vmax = min(1.0, vmin + 0.005)
        vmin = vmax - 0.005
    mode = st.sidebar.radio("Display", ("fill", "outline"), horizontal=True, key="mode",
                            help="outline: only the border of the region above the threshold; the anatomy stays "
                                 "visible")
    return render.MapStyle(cmap, float(opacity), float(threshold), float(vmin), float(vmax), mode)


# ----------------------------------------------------------------------------------------------- main parts


def case_header(case: session.Case, view: session.ViewVolume) -> None:
    volume = view.volume
    spacing = " x ".join(f"{s:.3g}" for s in volume.spacing)
    st.markdown(f"### {case.title}")
    st.caption(f"{case.image} · {volume.array.shape[0]} x {volume.array.shape[1]} x {volume.array.shape[2]} voxels "
               f"of {spacing} mm · stored {volume.orientation} · looks like {view.modality}")
    if view.grid.note:
        st.warning(view.grid.note)


def report_rows(case: session.Case) -> None:
    statements = session.report_statements(case.report)
    st.markdown("**Report** — one row per statement of the findings; click one to ground it, or type any phrase")
    if not statements:
        st.caption("This case has no report.")
    for n, statement in enumerate(statements):
        kind_col, text_col = st.columns([1.1, 10], vertical_alignment="center", gap="small")
        active = S.get("phrase") == statement.text
        kind_col.caption(statement.kind)
        text_col.button(statement.text, key=f"ground_{n}", on_click=set_phrase, args=(statement.text,),
                        type="primary" if active else "tertiary", icon=":material/my_location:")
    box_col, go_col = st.columns([9.4, 1.2], vertical_alignment="bottom")
    box_col.text_input("Any phrase", key="free_phrase", placeholder="e.g. a hypodense lesion in the spleen")
    go_col.button("Ground", key="ground_free", on_click=phrase_from_box, args=("free_phrase", "phrase"),
                  width="stretch")


def grounding(case: session.Case, view: session.ViewVolume, checkpoint: Path | None, phrase: str | None,
              modality: str | None, control: bool = False) -> session.Grounding | None:
    """The phrase's result: a stored one of the case's `ground infer` output, else grounded with the model."""
    if not phrase:
        return None
    image = str(case.image)
    if not control:
        for row in case.rows:
            if row.get("phrase") == phrase and (checkpoint is None or case.checkpoint is None
                                                or Path(checkpoint) == case.checkpoint.resolve()):
                return attempt("stored map", stored_for, row, image, _mtime(image))
    if checkpoint is None:
        st.error("no grounding model under the data folders: only the stored maps can be shown")
        return None
    return attempt("grounding", grounding_for, str(checkpoint), _mtime(checkpoint), control, image, _mtime(image),
                   modality, phrase)


def result_line(result: session.Grounding, label: str = "") -> None:
    prefix = f"**{label}** " if label else ""
    if not result.groundable:
        st.warning(f"{prefix}“{result.phrase}”: **not groundable** ({result.reason or 'below the threshold'}); score "
                   f"{result.score:.3f}, threshold {result.threshold:.3f}. No map is shown.")
        return
    peak = result.sidecar.peak_mm
    st.success(f"{prefix}“{result.phrase}”: groundable, score {result.score:.3f} (threshold {result.threshold:.3f}); "
               f"peak at ({peak[0]:.1f}, {peak[1]:.1f}, {peak[2]:.1f}) mm")
    for note in result.warnings:
        st.caption(f"note: {note}")


def outlines(case: session.Case, view: session.ViewVolume) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """(mask (X, Y, Z), colour) to draw as thin outlines."""
    out = []
    image = str(case.image)
    if case.lesion_mask is not None and S.get("show_lesions", True):
        masks = attempt("lesion mask", label_masks, str(case.lesion_mask), _mtime(case.lesion_mask), image,
                        _mtime(image), tuple(case.lesion_names.items()), "lesion")
        for mask in (masks or {}).values():
            out.append((mask, render.LESION_RGB))
    if case.label is not None and S.get("show_organs", False):
        masks = attempt("label map", label_masks, str(case.label), _mtime(case.label), image, _mtime(image),
                        tuple(case.label_names.items()), "label")
        for name, mask in (masks or {}).items():
            if name not in session.CONTAINER_LABELS:
                out.append((mask, render.ORGAN_RGB))
    return out


def plane_row(view: session.ViewVolume, window: Window, result: session.Grounding | None, style: render.MapStyle,
              masks: list, *, row: str, clickable: bool) -> None:
    convention = S.get("convention", CONVENTIONS[0])
    views = three_planes(view.volume, S.crosshair, convention, view.grid)
    map_views = None
    if result is not None and result.map01 is not None:
        map_views = three_planes((result.map01, view.volume.affine), S.crosshair, convention, view.grid)
    mask_views = [(three_planes((mask.astype(np.uint8), view.volume.affine), S.crosshair, convention, view.grid), c)
                  for mask, c in masks]
    columns = st.columns([1, 1, 1, 0.62])
    for column, plane in zip(columns, PLANES):
        panel = render.render_panel(views[plane], window, map_view=map_views[plane] if map_views else None,
                                    style=style, outlines=[(mv[plane], c) for mv, c in mask_views])
        with column:
            axis = {"axial": (2, "S"), "coronal": (1, "A"), "sagittal": (0, "R")}[plane]
            position = voxel_to_mm(view.volume.affine, S.crosshair)[axis[0]]
            st.caption(f"{row}{plane} · slice {view.grid.slice_position(S.crosshair, plane)} "
                       f"(0-{view.grid.slice_count(plane) - 1}) · {axis[1]} {position:.1f} mm")
            if clickable:
                S.panels[plane] = panel
            if clickable and streamlit_image_coordinates is not None:
                streamlit_image_coordinates(panel.rgb, key=f"click_{plane}", on_click=partial(take_click, plane, view),
                                            png_compression_level=1, cursor="crosshair", width="stretch")
            else:
                st.image(panel.rgb, output_format="PNG", width="stretch")
            if clickable:
                st.slider(f"{plane} slice", 0, view.grid.slice_count(plane) - 1, key=f"slice_{plane}",
                          on_change=move_slice, args=(plane, view), label_visibility="collapsed")
    with columns[3]:
        if result is not None and result.map01 is not None:
            st.image(colour_bar(style, result.sidecar.model_dump_json(by_alias=True)), output_format="PNG",
                     caption=f"{row}colour scale" if row else "colour scale")
        elif result is not None:
            st.caption("not groundable: no map")


@st.fragment
def viewer(view: session.ViewVolume, window: Window, results: list[tuple[str, session.Grounding | None]],
           style: render.MapStyle, masks: list) -> None:
    """The planes (row A clickable, with the sliders; row B when comparing) and the read-out. A fragment: moving
    the crosshair reruns only this part of the page."""
    with shown_errors("views"):
        (label_a, result_a), (label_b, result_b) = results
        plane_row(view, window, result_a, style, masks, row=label_a, clickable=True)
        if result_b is not None:
            plane_row(view, window, result_b, style, masks, row=label_b, clickable=False)
    readout(view, results)


def readout(view: session.ViewVolume, results: list[tuple[str, session.Grounding | None]]) -> None:
    voxel = S.crosshair
    mm = voxel_to_mm(view.volume.affine, voxel)
    parts = [f"{S.get('convention', CONVENTIONS[0])} convention",
             f"crosshair voxel ({voxel[0]}, {voxel[1]}, {voxel[2]})",
             f"({mm[0]:.1f}, {mm[1]:.1f}, {mm[2]:.1f}) mm RAS", f"image {float(view.volume.array[voxel]):.1f}"]
    for label, result in results:
        if result is not None and result.map01 is not None:
            from medssl.explain.maps import raw_values

            value = float(result.map01[voxel])
            raw = float(raw_values(result.sidecar.rescaling, value))
            parts.append(f"map {label}{value:.3f} (raw {raw:.3f})")
    st.caption(" · ".join(parts))


def stats_tab(case: session.Case, view: session.ViewVolume, checkpoint: Path | None, modality: str | None,
              result: session.Grounding | None, style: render.MapStyle) -> None:
    if result is None or result.map01 is None:
        st.info("Ground a finding to see where its map lies.")
        return
    above = st.checkbox(f"count only the map above the display threshold ({style.threshold:g})", value=True,
                        key="stats_above")
    counted = session.stats_map(result.map01, style.threshold, above)
    if counted.max() <= 0:
        st.warning("no voxel of the map is above the threshold: lower it to see region statistics")
        return
    families: dict[str, dict[str, np.ndarray]] = {}
    image = str(case.image)
    if checkpoint is not None:
        regions = attempt("anatomy", anatomy_regions, str(checkpoint), _mtime(checkpoint), image, _mtime(image),
                          modality)
        if regions:
            families["anatomy (organ head)"] = regions
    if case.label is not None:
        families["organs"] = attempt("label map", label_masks, str(case.label), _mtime(case.label), image,
                                     _mtime(image), tuple(case.label_names.items()), "label") or {}
    if case.lesion_mask is not None:
        families["lesions"] = attempt("lesion mask", label_masks, str(case.lesion_mask), _mtime(case.lesion_mask),
                                      image, _mtime(image), tuple(case.lesion_names.items()), "lesion") or {}
    peak, voxel = result.sidecar.peak_mm, tuple(result.sidecar.peak_voxel)
    st.markdown(f"Peak of the map: ({peak[0]:.1f}, {peak[1]:.1f}, {peak[2]:.1f}) mm RAS, voxel {voxel}, value "
                f"{float(result.map01[voxel]):.3f}")
    if not families:
        st.caption("No region masks for this case (no organ found, label map or lesion mask).")
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
    duration = recording.duration
    start = 0.0
    if duration > 10.0:
        start = columns[4].slider("Shown from (s), 10 s", 0.0, max(0.0, duration - 10.0), 0.0, 0.5, key="ts_start")
    st.caption(f"Attribution: **{result.method}** of the **{result.target}** ({model.kind} {checkpoint}), "
               f"{result.windows} window(s) of {model.prep.window_seconds:g} s at {model.prep.fs:g} Hz; patient "
               f"{case.patient_id}, trial {trial.trial_id}.")
    image = attempt("signal figure", signal_picture, str(checkpoint), _mtime(checkpoint), str(trial.path),
                    trial.format, method, target, float(start))
    if image is not None:
        st.image(image, output_format="PNG", caption=f"patient {case.patient_id}, trial {trial.trial_id}")


def export_tab(library: session.Library, case: session.Case, view: session.ViewVolume, window: Window,
               style: render.MapStyle, results: list[tuple[str, session.Grounding | None]],
               checkpoint: Path | None) -> None:
    maps = [(label, r) for label, r in results if r is not None and r.map01 is not None]
    if not maps:
        st.info("Ground a finding first: the export holds the views with the map and the map itself.")
        return
    folder = library.review_folder(checkpoint)
    if folder is None:
        st.info("Start the app with a run directory to export (files go to RUN_DIR/exports/).")
        return
    st.caption(f"Writes PNG (views, overlay, colour bar; provenance in PNG text chunks) and NIfTI + JSON sidecar "
               f"(provenance also in the NIfTI header) to {folder / session.EXPORT_FOLDER}.")
    if not st.button("Export PNG and NIfTI", key="export"):
        return
    convention = S.get("convention", CONVENTIONS[0])
    display = {"threshold": style.threshold, "vmin": style.vmin, "vmax": style.vmax, "opacity": style.opacity,
               "cmap": style.cmap, "mode": style.mode, "window": list(window), "convention": convention}
    for label, result in maps:
        def write(result: session.Grounding = result, label: str = label) -> list[Path]:
            stem = session.export_stem(folder, case.title, result.phrase, label.strip(": ").lower())
            views = three_planes(view.volume, S.crosshair, convention, view.grid)
            map_views = three_planes((result.map01, view.volume.affine), S.crosshair, convention, view.grid)
            png = render_views_png(stem.with_name(stem.name + ".png"), views, map_views, window=window,
                                   provenance=provenance_from_sidecar(result.sidecar, style.threshold),
                                   cmap=style.cmap, opacity=style.opacity, threshold=style.threshold, vmin=style.vmin,
                                   vmax=style.vmax, mode=style.mode, sidecar=result.sidecar)
            nifti, sidecar = session.export_map(stem, result.map01, view.volume.affine, result.sidecar, display)
            return [png, nifti, sidecar]

        written = attempt("export", write)
        if written:
            st.success("wrote " + ", ".join(str(p) for p in written))
            for path in written:
                st.download_button(f"download {path.name}", path.read_bytes(), file_name=path.name,
                                   key=f"download_{path.name}")


def review_tab(library: session.Library, case: session.Case,
               results: list[tuple[str, session.Grounding | None]], checkpoint: Path | None) -> None:
    folder = library.review_folder(checkpoint)
    if folder is None:
        st.info("Start the app with a run directory to keep a review table (RUN_DIR/review.csv).")
        return
    judged = [(label, r) for label, r in results if r is not None]
    if judged:
        with st.form("review", clear_on_submit=True):
            which = st.radio("Map", [f"{label}{r.phrase}" for label, r in judged], key="review_which") if len(
                judged) > 1 else f"{judged[0][0]}{judged[0][1].phrase}"
            verdict = st.radio("Verdict", VERDICTS, format_func=VERDICT_LABELS.get, horizontal=True,
                               key="review_verdict")
            comment = st.text_input("Comment (optional)", key="review_comment")
            if st.form_submit_button("Save review"):
                result = next(r for label, r in judged if f"{label}{r.phrase}" == which)
                row = attempt("review", session.add_review, folder, checkpoint=result.checkpoint,
                              image=str(case.image), phrase=result.phrase, verdict=verdict, comment=comment)
                if row is not None:
                    st.success(f"saved: {VERDICT_LABELS[row.verdict]} for “{row.phrase}” in "
                               f"{session.review_csv(folder)}")
    else:
        st.info("Ground a finding to review its map.")
    table = attempt("review table", session.review_table, folder)
    if table:
        st.markdown(f"Review summary per checkpoint ({session.review_csv(folder)})")
        st.dataframe(table, hide_index=True, width="stretch")


# ----------------------------------------------------------------------------------------------- page


def main() -> None:
    st.set_page_config(page_title="medssl attention viewer", layout="wide")
    st.markdown("<style>[data-testid='stMainBlockContainer'] {padding-top: 2rem; padding-bottom: 2rem}</style>",
                unsafe_allow_html=True)
    args = attempt("app arguments", session.parse_app_args, sys.argv[1:])
    if args is None:
        return
    runs, roots = args
    library = library_for(tuple(str(r) for r in runs), tuple(str(r) for r in roots))
    st.sidebar.title("medssl attention viewer")
    if st.sidebar.button("Rescan the data folders", key="rescan"):
        library_for.clear()
        library = library_for(tuple(str(r) for r in runs), tuple(str(r) for r in roots))
    with st.sidebar.expander("Data folders (the only places read)"):
        for root in library.roots:
            st.caption(f"{root.path} — {root.why}")
    for problem in library.problems:
        st.sidebar.error(problem)
    if not library.roots:
        st.error("no data folder to read: start with medssl app RUN_DIR or --data-root DIR")
        return
    case = pick_case(library)
    checkpoint = pick_checkpoint(library, case)
    modality_choice = st.sidebar.selectbox("Intensities for the model", ("as trained", "CT", "MR"), key="modality")
    modality = None if modality_choice == "as trained" else modality_choice
    if case is None:
        st.info("Choose a case in the sidebar.")
        return
    view = attempt("volume", view_volume, str(case.image), _mtime(case.image))
    if view is None:
        return
    if S.get("case_key") != case.key:
        reset_case(case, view)
    for plane in PLANES:
        take_click(plane, view)
    st.sidebar.radio("Convention", CONVENTIONS, key="convention", horizontal=True,
                     help="radiological: the patient's right on the screen's left; neurological: the patient's left "
                          "on the left")
    window = window_controls(view)

    case_header(case, view)
    report_rows(case)
    result = grounding(case, view, checkpoint, S.get("phrase"), modality)
    st.sidebar.subheader("Compare")
    compare = st.sidebar.radio("Second map", ("none", "another phrase", "another checkpoint"), key="compare")
    result_b, label_b = None, ""
    if compare == "another phrase":
        st.sidebar.text_input("Phrase B", key="phrase_b_box", on_change=phrase_from_box,
                              args=("phrase_b_box", "phrase_b"))
        result_b, label_b = grounding(case, view, checkpoint, S.get("phrase_b"), modality), "B: "
    elif compare == "another checkpoint":
        others = [p for p in library.checkpoints if p != checkpoint] + ([CONTROL] if checkpoint else [])
        other = st.sidebar.selectbox("Checkpoint B", others, key="checkpoint_b",
                                     format_func=lambda p: p if isinstance(p, str) else _short(p, library))
        label_b = "B: "
        S.b_name = other if isinstance(other, str) else _short(other, library)
        if other == CONTROL:
            result_b = grounding(case, view, checkpoint, S.get("phrase"), modality, control=True)
        elif other is not None:
            result_b = grounding(case, view, other, S.get("phrase"), modality)
    style = style_controls(result)
    st.sidebar.subheader("Outlines")
    st.sidebar.checkbox("lesion masks (magenta)", value=True, key="show_lesions", disabled=case.lesion_mask is None)
    st.sidebar.checkbox("organ labels (white)", value=False, key="show_organs", disabled=case.label is None)
    if case.lesion_mask is not None:
        lesions = attempt("lesion mask", label_masks, str(case.lesion_mask), _mtime(case.lesion_mask), str(case.image),
                          _mtime(case.image), tuple(case.lesion_names.items()), "lesion") or {}
        for n, (name, mask) in enumerate(lesions.items()):
            st.sidebar.button(f"Centre on {name}", key=f"centre_lesion_{n}", on_click=set_crosshair,
                              args=(session.mask_centre(mask), view), width="stretch")

    if result is not None:
        col_text, col_jump = st.columns([9.4, 1.2], vertical_alignment="center")
        with col_text:
            result_line(result, "A:" if result_b is not None else "")
        if result.groundable:
            col_jump.button("Jump to peak", key="jump", on_click=set_crosshair,
                            args=(tuple(result.sidecar.peak_voxel), view), width="stretch")
    if result_b is not None:
        result_line(result_b, f"B ({S.b_name}):" if compare == "another checkpoint" else "B:")
        st.caption("B is drawn with A's threshold and colour scale, so that the two maps compare.")
    results = [("A: " if result_b is not None else "", result), (label_b, result_b)]
    viewer(view, window, results, style, outlines(case, view))
    tabs = st.tabs(["Region statistics", "Signals", "Export", "Review"])
    with tabs[0], shown_errors("region statistics"):
        stats_tab(case, view, checkpoint, modality, result, style)
    with tabs[1], shown_errors("signals"):
        signals_tab(library, case)
    with tabs[2], shown_errors("export"):
        export_tab(library, case, view, window, style, results, checkpoint)
    with tabs[3], shown_errors("review"):
        review_tab(library, case, results, checkpoint)


main()
