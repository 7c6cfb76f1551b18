"""The "Virtual staining" dock: stain the field of view, rectangles or the whole H&E.

The dock gathers arrays and numbers from the viewer (the H&E level, the region boxes, the
model path), then runs two background jobs (``_stain_worker``): ``prepare`` loads the model
and times one sampler step to estimate the run, and ``stain_job`` drains ``iter_stain``
region by region. Finished tiles are pasted into the output layers as they arrive; the final,
blended result then replaces them. The workers never see a layer.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    Table,
)
from psygnal import Signal

from ._common import (
    choose_level,
    format_seconds,
    image_levels,
    layer_choices,
    layer_mpp,
    level_box,
    level_downsample,
    notify_error,
    shape_boxes,
    visible_box,
)
from ._lifetime import DockLifetime, while_open
from ._live import LiveController
from ._stain_layers import (
    COUNT_COLUMNS,
    counts_table,
    counts_tsv,
    create_layers,
    finish_region,
    mark_partial,
    paste_tile,
)
from ._stain_worker import Job, RegionDone, RegionStart, prepare, stain_job

__all__ = ["StainWidget", "model_list", "remember_model"]

REGION_FOV, REGION_SHAPES, REGION_WHOLE = "field of view", "shapes", "whole image"
SAMPLERS = ("ddim", "dpmsolver++", "ddpm")
#: sampling.DEFAULT_SAMPLER and DEFAULT_STEPS (not imported: that module imports torch)
DEFAULT_SAMPLER, DEFAULT_STEPS = "ddim", 10
DEVICES = ("auto", "cuda", "mps", "cpu")
#: largest region (level pixels) held as in-memory layers; larger runs go through the CLI
MAX_REGION_PX = 256 * 1024 * 1024


class _ModelList:
    """Process-wide: emits ``changed`` when a model is added (e.g. by the training dock), so
    every open staining dock refreshes its list."""

    changed = Signal()


model_list = _ModelList()


def remember_model(path: str | Path) -> None:
    """Add a checkpoint to the recent models and refresh every staining dock's model list."""
    from napari_staindiffuser.settings import add_recent_model

    add_recent_model(path)
    model_list.changed.emit()


# --------------------------------------------------------------------------- the dock


class StainWidget(Container):
    """Dock: virtual IHC of an H&E layer with a StainDiffuser model.

    Test hooks: :meth:`run` starts a run and returns the preparation worker, ``worker`` is the
    staining worker once it starts, ``running`` says whether a run is in progress,
    ``confirm`` (callable taking the question, returning bool) asks before long runs,
    ``confirm_above_s`` sets how long a run must be to ask, and ``lifetime.closed`` says whether
    napari closed the dock (the run and live mode were then asked to stop).
    """

    def __init__(self, napari_viewer):
        super().__init__(scrollable=False)
        self.viewer = napari_viewer
        self.confirm = self._ask
        self.confirm_above_s = 60.0
        self.worker = None
        self.prepare_worker = None
        self.running = False
        self.tiles_seen = 0
        self._layers: dict[tuple[int, str], dict[str, Any]] = {}
        self._rows: list[dict[str, Any]] = []
        self._pbar = None
        self._last_refresh = 0.0
        self._config = None
        self._ctx: dict[str, Any] = {}
        self._cancelled = False
        self._own_sampling = False  # sampler/steps were set from a distilled model

        self._he = ComboBox(label="H&E", choices=self._he_choices, nullable=True)
        self._region = ComboBox(
            label="Region", choices=[REGION_FOV, REGION_SHAPES, REGION_WHOLE], value=REGION_FOV
        )
        self._shapes = ComboBox(label="Shapes", choices=self._shape_choices, nullable=True)
        self._level = ComboBox(label="Level", choices=self._level_choices)
        self._model = ComboBox(label="Model", choices=self._model_choices)
        self._browse = PushButton(text="Open checkpoint…")
        self._summary = Label(value="")
        self._stains = Container(layout="horizontal", labels=False, label="Stains")
        self._sampler = ComboBox(label="Sampler", choices=list(SAMPLERS), value=DEFAULT_SAMPLER)
        self._steps = SpinBox(label="Steps", min=1, max=4000, value=DEFAULT_STEPS)
        self._timing = Label(value="")  # steps versus time, once a run has been estimated
        self._seconds_per_step: tuple[float, str] | None = None
        self._seed = SpinBox(label="Seed", min=0, max=2**31 - 1, value=0)
        self._samples = SpinBox(label="Samples", min=1, max=32, value=1)
        self._batch = SpinBox(label="Batch", min=1, max=256, value=8)
        self._device = ComboBox(label="Device", choices=list(DEVICES), value="auto")
        self._device_used = Label(value="using: (not loaded yet)")
        self._run = PushButton(text="Run")
        self._live = CheckBox(text="Stain as you pan", value=False)
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(value=0, min=0, max=1, label="Progress")
        self._status = Label(value="")
        self._table = Table(
            value={"data": [], "index": [], "columns": list(COUNT_COLUMNS)}, label="Counts"
        )
        self._copy = PushButton(text="Copy counts")

        tips = {
            self._he: "The H&E image layer to stain (RGB, 8-bit; multiscale works).",
            self._region: "What to stain: what you see, the rectangles of a Shapes layer, or "
            "the whole image (estimated first, and asked before a long run).",
            self._level: "Pyramid level to stain. auto: the coarsest level that is not coarser "
            "than the model's µm/px.",
            self._sampler: "DPM-Solver++ and DDIM work with few steps; DDPM needs many.",
            self._steps: "Network evaluations per tile and branch: more is slower and closer "
            "to the model's best.",
            self._seed: "Noise seed: the same seed gives the same stain.",
            self._samples: "Samples per tile; more than 1 adds an uncertainty layer.",
            self._batch: "Tiles per network call (lower it when memory runs out).",
            self._device: "auto: CUDA, then Apple MPS, then the CPU.",
        }
        for w, tip in tips.items():
            w.tooltip = tip
        self.extend(
            [
                self._he,
                self._region,
                self._shapes,
                self._level,
                self._model,
                self._browse,
                self._summary,
                self._stains,
                self._sampler,
                self._steps,
                self._timing,
                self._seed,
                self._samples,
                self._batch,
                self._device,
                self._device_used,
                Container(
                    widgets=[self._run, self._cancel, self._live],
                    layout="horizontal",
                    labels=False,
                ),
                self._progress,
                self._status,
                self._table,
                self._copy,
            ]
        )
        self._shapes.visible = False
        for label in (self._summary, self._status):
            label.native.setWordWrap(True)
        self._region.changed.connect(self._on_region_mode)
        self._model.changed.connect(self._on_model)
        self._he.changed.connect(lambda _: self._level.reset_choices())
        self._browse.changed.connect(self._on_browse)
        self._run.changed.connect(lambda _=None: self.run())
        self._cancel.changed.connect(lambda _=None: self.cancel())
        self._copy.changed.connect(lambda _=None: self._copy_counts())
        layers = napari_viewer.layers.events
        for ev in (layers.inserted, layers.removed, layers.reordered):
            ev.connect(self._on_layers_changed)
        model_list.changed.connect(self._on_models_changed)
        self._on_layers_changed()
        self._on_model(self._model.value)
        self.live = LiveController(self)  # "Stain as you pan" (_live.py)
        self._live.tooltip = (
            "Stain what you see while you pan and zoom: only the tiles in view, in the "
            "background, nearest the centre first; cached for these settings."
        )
        self._live.changed.connect(self._on_live)
        self._steps.changed.connect(self._show_timing)
        for w in (self._he, self._level, self._model, self._sampler, self._steps, self._seed):
            w.changed.connect(self.live.restart_if_on)
        self._device.changed.connect(self.live.restart_if_on)
        self.lifetime = DockLifetime(self, napari_viewer, self._on_dock_closed)

    def _on_dock_closed(self) -> None:
        """napari closed the dock (``_lifetime.py``): stop the run and live mode, and let go of
        the viewer's events. Flags only: the Qt widgets may be being deleted."""
        self._cancelled = True
        for w in (self.worker, self.prepare_worker):
            if w is not None:
                w.quit()
        self.live.stop()
        layers = self.viewer.layers.events
        for ev in (layers.inserted, layers.removed, layers.reordered):
            ev.disconnect(self._on_layers_changed)
        model_list.changed.disconnect(self._on_models_changed)

    # ----------------------------------------------------------------------- choices

    def _he_choices(self, _w=None) -> list:
        return layer_choices(self.viewer, "image", rgb=True, ours=False)  # not our own stains

    def _shape_choices(self, _w=None) -> list:
        return layer_choices(self.viewer, "shapes")

    def _level_choices(self, _w=None) -> list:
        layer = getattr(self, "_he", None) and self._he.value
        out: list = [("auto (model µm/px)", -1)]
        if layer is None:
            return out
        mpp0 = layer_mpp(layer)
        for k, lv in enumerate(image_levels(layer)):
            h, w = lv.shape[:2]
            res = f", {mpp0 * max(level_downsample(layer, k)):.3g} µm/px" if mpp0 else ""
            out.append((f"level {k}: {w} x {h} px{res}", k))
        return out

    def _model_choices(self, _w=None) -> list:
        from napari_staindiffuser.checkpoint_meta import bundled_model_path
        from napari_staindiffuser.settings import recent_models

        out = []  # the first is the default: the distilled model (4 steps at parity)
        names = ("bundled demo model, distilled", "bundled demo model")
        for name, distilled in zip(names, (True, False), strict=True):
            with contextlib.suppress(FileNotFoundError):
                out.append((name, bundled_model_path(distilled=distilled)))
        bundled = {p for _, p in out}
        for p in recent_models():
            if p not in bundled:
                out.append((f"{p.name} ({p.parent})", p))
        return out

    def _on_layers_changed(self, _event=None) -> None:
        for combo in (self._he, self._shapes):
            combo.reset_choices()
            layers = [c for c in combo.choices if c is not None]
            if combo.value is None and layers:  # pick the first one rather than nothing
                combo.value = layers[0]
        self._level.reset_choices()

    def _on_models_changed(self) -> None:
        try:
            value = self._model.value
        except RuntimeError:  # the dock was closed: its Qt widgets are gone
            model_list.changed.disconnect(self._on_models_changed)
            return
        self._model.reset_choices()
        if value in [c for c in self._model.choices]:
            self._model.value = value

    def _on_region_mode(self, mode: str) -> None:
        self._shapes.visible = mode == REGION_SHAPES

    def _on_browse(self, _=None) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(
            self.native, "Open a StainDiffuser checkpoint", "", "Checkpoints (*.safetensors)"
        )
        if path:
            self.set_model(path)

    def set_model(self, path: str | Path) -> bool:
        """Select a checkpoint file (validated, remembered in the recent models)."""
        from napari_staindiffuser.checkpoint_meta import read_config

        path = Path(path).expanduser().resolve()
        try:
            read_config(path)
        except (ValueError, OSError) as exc:
            notify_error(exc, f"Opening the model {path.name}")
            return False
        remember_model(path)
        self._model.value = path
        return True

    def _on_model(self, path: Path | None) -> None:
        from napari_staindiffuser.checkpoint_meta import read_config

        self._config = None
        self._stains.clear()
        if path is None:
            self._summary.value = "no model"
            return
        try:
            cfg, prov = read_config(path)
        except (ValueError, OSError) as exc:
            self._summary.value = "unreadable checkpoint"
            notify_error(exc, f"Reading the model {Path(path).name}")
            return
        self._config = cfg
        for st in cfg.stains:
            box = CheckBox(text=st, value=True, name=f"stain_{st}")
            box.changed.connect(self._on_stain_ticked)
            self._stains.append(box)
        trained = prov.get("steps", "?")
        self._summary.value = (
            f"{', '.join(cfg.stains)} · {cfg.mpp:g} µm/px · {cfg.image_size} px tiles\n"
            f"{cfg.variant.value}, aux {cfg.aux_target.value}, "
            f"{cfg.schedule.prediction_type.value.removesuffix('_prediction')}-prediction, "
            f"trained {trained} steps"
        )
        own = prov.get("sampling")  # a distilled model: its own sampler and steps by default
        if isinstance(own, dict) and own.get("sampler") in SAMPLERS:
            self._summary.value += f"\ndistilled for {own['sampler']}, {own['steps']} steps"
            self._sampler.value, self._steps.value = own["sampler"], int(own["steps"])
            self._own_sampling = True
        elif self._own_sampling:  # back from a distilled model to an ordinary one
            self._sampler.value, self._steps.value = DEFAULT_SAMPLER, DEFAULT_STEPS
            self._own_sampling = False
        self._summary.tooltip = str(prov.get("data", ""))
        self._level.reset_choices()

    # ----------------------------------------------------------------------- running

    def selected_stains(self) -> list[str]:
        return [w.text for w in self._stains if isinstance(w, CheckBox) and w.value]

    def checked_input(self) -> tuple[Any, list[str], int, Any]:
        """The H&E layer, the ticked stains, the pyramid level (resolved) and its RGB(A) array,
        for a run or live mode; a ValueError that says what to do when something is missing."""
        layer = self._he.value
        if layer is None:
            raise ValueError("no H&E layer: open an H&E slide (File > Open) or a sample first")
        if self._config is None or self._model.value is None:
            raise ValueError("no usable model: pick the bundled model or open a checkpoint")
        stains = self.selected_stains()
        if not stains:
            raise ValueError("no stain selected: tick at least one stain")
        level = self._level.value if self._level.value is not None else -1
        if level < 0:
            level = choose_level(layer, self._config.mpp)
        data = image_levels(layer)[level]
        if data.ndim != 3 or data.shape[2] not in (3, 4):
            raise ValueError(f"'{layer.name}' is not an RGB image (shape {tuple(data.shape)})")
        return layer, stains, level, data

    def _make_job(self) -> tuple[Job, dict[str, Any]]:
        layer, stains, level, data = self.checked_input()
        if data.dtype != np.uint8:
            if hasattr(data, "compute"):
                raise ValueError(
                    f"'{layer.name}' is {data.dtype}; the model needs 8-bit RGB. Convert it, "
                    "or open the slide with the napari-staindiffuser reader"
                )
            from napari_staindiffuser.io import as_rgb_uint8

            data = as_rgb_uint8(data)
        image = data[..., :3] if data.shape[2] == 4 else data
        mode = self._region.value
        if mode == REGION_FOV:
            boxes0 = [visible_box(self.viewer, layer)]
        elif mode == REGION_SHAPES:
            if self._shapes.value is None:
                raise ValueError("no Shapes layer: add one and draw rectangles over the regions")
            boxes0 = shape_boxes(self._shapes.value, layer)
        else:
            h0, w0 = image_levels(layer)[0].shape[:2]
            boxes0 = [(0, 0, h0, w0)]
        boxes = [level_box(b, layer, level) for b in boxes0]
        boxes = [b for b in boxes if b[2] > 0 and b[3] > 0]
        if not boxes:
            raise ValueError("the region is empty at this level: zoom in or pick a finer level")
        for b in boxes:
            if b[2] * b[3] > MAX_REGION_PX:
                raise ValueError(
                    f"a region of {b[3]} x {b[2]} px is too large to hold as layers: pick a "
                    "coarser level or smaller regions, or run `staindiffuser stain` to write "
                    "an OME-TIFF"
                )
        mpp0 = layer_mpp(layer)
        image_mpp = mpp0 * max(level_downsample(layer, level)) if mpp0 else None
        job = Job(
            image=image,
            boxes=boxes,
            model_path=Path(self._model.value),
            device=self._device.value,
            stains=stains,
            sampler=self._sampler.value,
            steps=int(self._steps.value),
            seed=int(self._seed.value),
            samples=int(self._samples.value),
            batch=int(self._batch.value),
            image_mpp=image_mpp,
        )
        ctx = {"layer": layer, "level": level, "boxes0": boxes0, "mode": mode}
        return job, ctx

    def run(self):
        """Start a run (returns the preparation worker, or None when the input is bad)."""
        from napari.qt.threading import create_worker

        if self.running:
            return None
        try:
            job, ctx = self._make_job()
        except (ValueError, TypeError) as exc:
            notify_error(exc, "Virtual staining")
            return None
        if job.image_mpp is None:
            from napari.utils.notifications import show_warning

            show_warning(
                f"'{ctx['layer'].name}' has no pixel size: assuming the model's "
                f"{self._config.mpp:g} µm/px. Set the layer's scale in µm for correct sizes."
            )
        self._cancelled = False
        self._set_running(True, "loading the model and estimating…")
        worker = create_worker(
            prepare, job, _start_thread=False, _connect={"errored": self._on_prepare_error}
        )
        worker.returned.connect(lambda info: self._on_prepared(job, ctx, info))
        self.prepare_worker = worker
        worker.start()
        return worker

    def _ask(self, question: str) -> bool:
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(self.native, "Virtual staining", question)
        return answer == QMessageBox.StandardButton.Yes

    @while_open
    def _on_prepared(self, job: Job, ctx: dict, info: dict) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._device_used.value = f"using: {info['device']}"
        if self._cancelled:
            self._set_running(False, "cancelled before it started")
            return
        est, total = info["estimate_s"], sum(info["tiles"])
        self._seconds_per_step = (est / max(1, job.steps), info["device"])
        self._show_timing()
        if est > self.confirm_above_s and not self.confirm(
            f"Staining {total} tiles ({len(job.boxes)} region(s)) will take about "
            f"{format_seconds(est)} on {info['device']}. Go ahead?"
        ):
            self._set_running(False, f"not started (estimated {format_seconds(est)})")
            return
        self._ctx = {**ctx, "job": job, "total": total, "done_before": 0, "region_total": 0}
        self._ctx["stained"] = info["stained"]
        skipped = [str(i + 1) for i, ok in enumerate(self._ctx["stained"]) if not ok]
        if skipped:
            from napari.utils.notifications import show_warning

            show_warning(f"no tissue in region(s) {', '.join(skipped)}: skipped")
        self._rows = [r for r in self._rows if r.get("_layer") != ctx["layer"].name]
        self._show_counts()  # drop this layer's rows of the previous run from the table too
        self._pbar = progress(total=total, desc="virtual staining")
        self._progress.max = max(total, 1)
        self._progress.value = 0
        self._status.value = f"0 / {total} tiles · estimated {format_seconds(est)}"
        self._create_layers()
        worker = create_worker(
            stain_job,
            job,
            info["tissue"],
            _start_thread=False,
            _connect={"errored": self._on_error},
        )
        worker.yielded.connect(self._on_event)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()

    def cancel(self) -> None:
        """Stop the run at the next sampler step; finished tiles stay in the layers."""
        self._cancelled = True
        for w in (self.worker, self.prepare_worker):
            if w is not None and w.is_running:
                w.quit()
        self._status.value = "cancelling…"

    def _on_stain_ticked(self, _=None) -> None:
        live = getattr(self, "live", None)  # not there yet while the dock is being built
        if live is not None:
            live.restart_if_on()

    def _on_live(self, on: bool) -> None:
        """Stain as you pan on/off: Run and the region are replaced by the live layers."""
        if on and self.running:
            from napari.utils.notifications import show_info

            show_info("Stain as you pan starts once the run ends (or is cancelled).")
            self._live.value = False
            return
        started = on and self.live.start()
        if on and not started:
            self._live.value = False
            return
        if not on:
            self.live.stop()
            self._status.value = "stain as you pan: off"
        self._run.enabled = not started and not self.running
        self._region.enabled = not started

    def _set_running(self, running: bool, status: str = "") -> None:
        self.running = running
        self._run.enabled = not running
        self._cancel.enabled = running
        if status:
            self._status.value = status

    # ----------------------------------------------------------------------- events

    @while_open
    def _on_event(self, ev: Any) -> None:
        from napari_staindiffuser.events import Progress
        from napari_staindiffuser.inference import TileStained

        if isinstance(ev, TileStained):
            self._on_tile(ev)
        elif isinstance(ev, Progress):
            done = self._ctx["done_before"] + ev.done
            eta = f" · ETA {format_seconds(ev.eta_s)}" if ev.eta_s is not None else ""
            self._status.value = f"{done} / {self._ctx['total']} tiles{eta}"
        elif isinstance(ev, RegionStart):
            self._start_region(ev)
        elif isinstance(ev, RegionDone):
            self._finish_region(ev)

    def _create_layers(self) -> None:
        c = self._ctx
        self._layers = create_layers(self.viewer, c["job"], c["layer"], c["level"], c["stained"])

    def _start_region(self, ev: RegionStart) -> None:
        self._ctx["region"] = ev.index
        self._ctx["dirty"] = set()

    def _on_tile(self, ev) -> None:
        self._ctx["dirty"] |= paste_tile(self._layers, self._ctx.get("region", 0), ev)
        self.tiles_seen += 1
        done = self._ctx["done_before"] + ev.done
        self._ctx["region_total"] = ev.total
        now = time.perf_counter()
        if now - self._last_refresh < 0.25 and ev.done < ev.total:
            return  # at most 4 redraws a second: progress bars repaint (and process events)
        self._last_refresh = now
        eta = f" · ETA {format_seconds(ev.eta_s)}" if ev.eta_s is not None else ""
        self._status.value = f"{done} / {self._ctx['total']} tiles{eta}"
        self._progress.value = done
        pbar = self._pbar
        if pbar is not None:
            pbar.n = done
            eta = f" (ETA {format_seconds(ev.eta_s)})" if ev.eta_s is not None else ""
            pbar.set_description(f"virtual staining{eta}")  # also redraws the bar
        for layer in self._ctx["dirty"]:
            layer.refresh()
        self._ctx["dirty"] = set()

    def _finish_region(self, ev: RegionDone) -> None:
        layer = self._ctx["layer"]
        prov = {**ev.provenance, "he_layer": layer.name, "level": self._ctx["level"]}
        prov["region_level0_px"] = [round(v, 2) for v in self._ctx["boxes0"][ev.index]]
        prov["status"] = "complete"
        finish_region(self._layers, ev, prov, self._ctx["job"].image_mpp)
        for row in ev.counts:
            self._rows.append({**row, "_layer": layer.name})
        self._ctx["done_before"] += self._ctx["region_total"]
        self._show_counts()

    def _show_counts(self) -> None:
        self._table.value = counts_table(self._rows)

    def counts_tsv(self) -> str:
        """The counts table as tab-separated text (what "Copy counts" puts on the clipboard)."""
        return counts_tsv(self._rows)

    def _copy_counts(self) -> None:
        from qtpy.QtWidgets import QApplication

        QApplication.clipboard().setText(self.counts_tsv())

    @while_open
    def _on_error(self, exc: BaseException) -> None:
        notify_error(exc, "Virtual staining")
        self._mark_partial("failed")

    @while_open
    def _on_prepare_error(self, exc: BaseException) -> None:
        notify_error(exc, "Virtual staining")
        self._set_running(False, "failed")

    @while_open
    def _on_aborted(self) -> None:
        from napari.utils.notifications import show_info

        kept = self._mark_partial("cancelled")
        self._status.value = f"cancelled: {kept} of {self._ctx.get('total', '?')} tiles kept"
        show_info(f"Virtual staining cancelled: {kept} finished tiles kept in the layers.")

    def _mark_partial(self, status: str) -> int:
        """Flag the layers of an unfinished region; returns the tiles they hold."""
        mark_partial(self._layers, status)
        return self._progress.value

    def _show_timing(self, *_: Any) -> None:
        """Steps versus time for the last estimated region (the sampler's time is linear in the
        steps: every step is one network evaluation per tile and branch)."""
        if self._seconds_per_step is None:
            return
        per_step, device = self._seconds_per_step
        now = int(self._steps.value)
        parts = [
            f"[{n} steps: {format_seconds(n * per_step)}]"
            if n == now
            else f"{n}: {format_seconds(n * per_step)}"
            for n in sorted({4, 10, 20, 50, now})
        ]
        self._timing.value = f"time for this region on {device}: " + " · ".join(parts)

    def _on_finished(self) -> None:
        if self._pbar is not None:
            with contextlib.suppress(RuntimeError):  # the viewer's activity dock may be gone
                self._pbar.close()
            self._pbar = None
        if self.lifetime.closed:  # the layers left in the viewer say the run did not finish
            self.running = False
            with contextlib.suppress(RuntimeError):
                mark_partial(self._layers, "cancelled")
            return
        status = self._status.value
        if self._progress.value >= self._progress.max:
            status = f"done: {self._progress.value} tiles"
        self._set_running(False, status)
