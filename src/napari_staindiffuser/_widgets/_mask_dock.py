"""The "Coarse masks" dock: DAB threshold and clean-up tuned live, whole-image masks on request.

An annotator picks an IHC layer and a stain preset, adjusts the threshold rule and the clean-up
sizes (in µm, converted with the layer's µm/px) and sees a preview of the coarse mask over the
part of the slide in view. "Compute" then makes the mask of the whole image at one pyramid level,
tile by tile (:func:`~napari_staindiffuser.stain.iter_coarse_masks`), with the DAB channel next to
it. The threshold always comes from whole-slide statistics, taken once per layer on a reduced
level, as ``staindiffuser masks`` does. See ``docs/mask-dock.md``.

Threads: statistics, previews and the whole-image run are ``thread_worker`` jobs that get arrays
(numpy or dask slices) and a :class:`~napari_staindiffuser.stain.MaskPreset`, never layers; the
main thread only places finished arrays into layers.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import asdict, replace
from types import SimpleNamespace
from typing import Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
)
from napari.qt.threading import thread_worker
from qtpy.QtCore import QTimer

from napari_staindiffuser.commands import stats_level
from napari_staindiffuser.events import Progress
from napari_staindiffuser.stain import (
    PRESETS,
    DabStats,
    MaskPreset,
    ThresholdRule,
    threshold_value,
)

from ._common import (
    add_or_replace,
    camera,
    format_seconds,
    image_levels,
    is_layer,
    layer_choices,
    layer_mpp,
    level_box,
    level_downsample,
    notify_error,
    placed_like,
    visible_box,
)
from ._lifetime import DockLifetime, while_open
from ._mask_worker import compute_job, preview_job, stats_job, threshold_for

__all__ = ["CoarseMaskWidget"]

#: the preview never masks more than this many pixels (coarser level, then strided rows/cols)
PREVIEW_MAX_PIXELS = 2_000_000
#: "auto" computes at level 0 up to this size, else at the finest level below it
AUTO_MAX_PIXELS = 64_000_000
#: largest level Compute accepts (mask + DAB in memory: 5 bytes per pixel, ~1.3 GB)
MAX_COMPUTE_PIXELS = 256_000_000
#: core tile of the whole-image run; the abort request is checked between tiles
TILE = 512
#: debounce of the live preview (ms)
DEBOUNCE_MS = 150


# --------------------------------------------------------------------------- helpers


def _make_worker(fn: Any, *args: Any, errored: Any) -> Any:
    """A not yet started ``thread_worker`` of ``fn(*args)`` whose ``errored`` goes to
    ``errored`` (connected at creation, so nothing re-raises in the Qt event loop)."""
    return thread_worker(fn, connect={"errored": errored}, start_thread=False)(*args)


def _preset_dict(preset: MaskPreset) -> dict[str, Any]:
    d = asdict(preset)
    d["rule"] = preset.rule.value
    return d


def _rule_text(preset: MaskPreset) -> str:
    if preset.rule is ThresholdRule.MEAN_STD:
        return f"mean+{preset.k_std:g}std of whole-slide DAB"
    if preset.rule is ThresholdRule.OTSU:
        return "Otsu of whole-slide DAB"
    return "fixed"


def _guarded(action: str) -> Any:
    """Decorator for slots that run on the main thread: an exception becomes a notification
    (``notify_error``) instead of reaching the Qt event loop."""

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def slot(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                notify_error(exc, action)
                return None

        return slot

    return wrap


def _is_rgb_image(layer: Any) -> bool:
    return is_layer(layer, "image") and bool(getattr(layer, "rgb", False))


class CoarseMaskWidget(Container):
    """Dock that makes coarse positive-cell masks from an IHC layer.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Passed by napari (npe2) under this name.

    Attributes
    ----------
    running : bool
        A whole-image run is in progress.
    last_result : dict or None
        After a successful run: ``mask`` (uint8 0/1), ``dab`` (float32), ``threshold``,
        ``stats``, ``preset`` (at the level's µm/px), ``level``, ``mpp``, ``layers``.
    worker, preview_worker, stats_worker
        The latest thread workers of each kind (None before the first).
    lifetime : DockLifetime
        ``lifetime.closed``: napari closed the dock; its workers were asked to stop and what
        they still send is ignored.
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.worker: Any = None
        self.preview_worker: Any = None
        self.stats_worker: Any = None
        self.last_result: dict[str, Any] | None = None
        self._running = False
        self._cancelled: Any = None  # the compute worker that was asked to stop
        self._errored = False  # the current compute worker failed
        self._pbar: Any = None
        self._preview_gen = 0
        self._resetting = False
        # id(layer) -> (weakref to layer, key, DabStats); key = shapes of level 0 and stats level
        self._stats: dict[int, tuple[Any, tuple, DabStats]] = {}
        self._stats_pending: set[tuple] = set()
        self._stats_failed: dict[tuple, str] = {}
        self._last_notice: str | None = None

        self._ihc = ComboBox(label="IHC layer", choices=self._layer_choices)
        self._stain = ComboBox(label="stain preset", choices=list(PRESETS))
        self._rule = ComboBox(label="threshold rule", choices=[r.value for r in ThresholdRule])
        self._k = FloatSlider(label="k (mean + k·std)", min=0.5, max=5.0, step=0.1, value=2.0)
        self._fixed = FloatSlider(
            label="fixed DAB threshold", min=0.0, max=0.3, step=0.001, value=0.15
        )
        self._min_size = FloatSlider(label="min object (µm²)", min=0.0, max=200.0, step=0.25)
        self._closing = FloatSlider(label="closing radius (µm)", min=0.0, max=10.0, step=0.5)
        self._threshold_label = Label(label="threshold", value="")
        self._live = CheckBox(text="Live preview", value=True)
        self._level = ComboBox(label="compute at", choices=self._level_choices)
        self._compute_btn = PushButton(text="Compute")
        self._cancel_btn = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self._status = Label(label="status", value="")
        self.extend(
            [
                self._ihc,
                self._stain,
                self._rule,
                self._k,
                self._fixed,
                self._min_size,
                self._closing,
                self._threshold_label,
                self._live,
                self._level,
                self._compute_btn,
                self._cancel_btn,
                self._progress,
                self._status,
            ]
        )

        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self._run_preview)

        self._apply_preset_values()
        self._ihc.changed.connect(self._on_layer_changed)
        self._stain.changed.connect(self._on_stain_changed)
        self._rule.changed.connect(self._on_rule_changed)
        for w in (self._k, self._fixed, self._min_size, self._closing, self._level):
            w.changed.connect(self._on_param_changed)
        self._live.changed.connect(self._on_live_changed)
        self._compute_btn.changed.connect(self.compute)
        self._cancel_btn.changed.connect(self.cancel)

        layers = napari_viewer.layers
        layers.events.inserted.connect(self._on_layers_changed)
        layers.events.removed.connect(self._on_layers_changed)
        cam = camera(napari_viewer)
        cam.events.center.connect(self._on_camera)
        cam.events.zoom.connect(self._on_camera)
        self._on_layer_changed()
        self.lifetime = DockLifetime(self, napari_viewer, self._on_dock_closed)

    def _on_dock_closed(self) -> None:
        """napari closed the dock (``_lifetime.py``): stop every worker (the whole-image run
        after its current tile; nothing of it is kept) and let go of the viewer's events. Flags
        only: the Qt widgets may be being deleted."""
        self._preview_gen += 1  # previews still on their way are dropped
        self._cancelled = self.worker
        for w in (self.worker, self.preview_worker, self.stats_worker):
            if w is not None:
                w.quit()
        layers = self.viewer.layers.events
        layers.inserted.disconnect(self._on_layers_changed)
        layers.removed.disconnect(self._on_layers_changed)
        cam = camera(self.viewer)
        cam.events.center.disconnect(self._on_camera)
        cam.events.zoom.disconnect(self._on_camera)

    # ----------------------------------------------------------------- public API

    @property
    def running(self) -> bool:
        """A whole-image run is in progress."""
        return self._running

    def preset(self, mpp: float | None = None) -> MaskPreset:
        """The effective preset: the chosen stain's preset with the dock's rule, k, fixed
        threshold, min object size and closing radius; sizes in pixels at the preset's µm/px,
        or at ``mpp`` when given (:meth:`MaskPreset.at_mpp`)."""
        base = PRESETS[self._stain.value]
        rule = ThresholdRule(self._rule.value)
        p = replace(
            base,
            rule=rule,
            k_std=float(self._k.value),
            fixed_threshold=float(self._fixed.value) if rule is ThresholdRule.FIXED else None,
            min_object_size=round(float(self._min_size.value) / base.mpp**2),
            closing_radius=round(float(self._closing.value) / base.mpp),
        )
        return p if mpp is None else p.at_mpp(mpp)

    def compute(self, *_: Any) -> Any:
        """Start the whole-image run; returns its worker (None when it could not start)."""
        if self._running:
            return self.worker
        try:
            layer = self._require_layer()
            level = self._compute_level(layer)
            levels = image_levels(layer)
            arr = levels[level]
            h, w = arr.shape[:2]
            if h * w > MAX_COMPUTE_PIXELS:
                raise ValueError(
                    f"level {level} of '{layer.name}' has {h * w / 1e6:.0f} million pixels, more "
                    f"than the dock holds in memory ({MAX_COMPUTE_PIXELS / 1e6:.0f} million): "
                    "choose a coarser level, or use `staindiffuser masks` for full resolution"
                )
            mpp, assumed = self._level_mpp(layer, level)
            preset = self.preset(mpp)
            halo = preset.required_halo
            if halo is None:  # not reachable with the built-in presets
                raise ValueError("the preset fills holes of any size; tiles cannot reproduce it")
            stats = self._cached_stats(layer)
            stats_source = stats_level(SimpleNamespace(levels=levels))
            placement = placed_like(layer, level, (0, 0, h, w))
            context = {
                "layer_name": layer.name,
                "level": level,
                "mpp": mpp,
                "mpp_assumed": assumed,
                "preset": preset,
                "halo": halo,
                "placement": placement,
                "layer_ref": weakref.ref(layer),
            }
        except Exception as exc:
            notify_error(exc, "Coarse mask")
            return None

        worker = _make_worker(
            compute_job,
            arr,
            stats_source,
            stats,
            preset,
            TILE,
            halo,
            errored=self._on_compute_errored,
        )
        worker.yielded.connect(lambda ev: self._on_compute_event(worker, context, ev))
        worker.returned.connect(lambda res: self._on_compute_returned(worker, context, res))
        worker.finished.connect(lambda: self._on_compute_finished(worker))
        self.worker = worker
        self._cancelled = None
        self._errored = False
        self._running = True
        self._compute_btn.enabled = False
        self._cancel_btn.enabled = True
        self._progress.max, self._progress.value = 1, 0
        self._status.value = f"computing {preset.name} mask of '{layer.name}' (level {level})"
        worker.start()
        return worker

    def cancel(self, *_: Any) -> None:
        """Stop the whole-image run after the current tile; nothing of it is kept."""
        if not self._running or self.worker is None:
            return
        self._cancelled = self.worker
        self.worker.quit()
        self._status.value = "cancelling…"

    # ----------------------------------------------------------------- layers and levels

    def _layer_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return layer_choices(self.viewer, "image", rgb=True)

    def _layer(self) -> Any:
        layer = self._ihc.value
        return layer if layer is not None and layer in self.viewer.layers else None

    def _require_layer(self) -> Any:
        layer = self._layer()
        if layer is None:
            raise ValueError(
                "no RGB image layer to make a mask from: open an IHC slide (File > Open) and "
                "choose it as 'IHC layer'"
            )
        if not _is_rgb_image(layer):
            raise ValueError(f"'{layer.name}' is not an RGB image layer")
        return layer

    def _level_mpp(self, layer: Any, level: int) -> tuple[float, bool]:
        """µm/px of ``level`` and whether it is assumed (layer without a pixel size)."""
        mpp0 = layer_mpp(layer)
        assumed = mpp0 is None
        if assumed:
            mpp0 = PRESETS[self._stain.value].mpp
        dy, dx = level_downsample(layer, level)
        return float(mpp0) * (dy + dx) / 2.0, assumed

    def _auto_level(self, layer: Any) -> int:
        levels = image_levels(layer)
        for k, lv in enumerate(levels):
            if lv.shape[0] * lv.shape[1] <= AUTO_MAX_PIXELS:
                return k
        return len(levels) - 1

    def _compute_level(self, layer: Any) -> int:
        value = self._level.value
        n = len(image_levels(layer))
        if isinstance(value, int) and 0 <= value < n:
            return value
        return self._auto_level(layer)

    def _level_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        layer = self._layer()
        if layer is None:
            return [("auto", "auto")]
        out: list[tuple[str, Any]] = [(f"auto (level {self._auto_level(layer)})", "auto")]
        for k, lv in enumerate(image_levels(layer)):
            mpp, assumed = self._level_mpp(layer, k)
            unit = "µm/px (assumed)" if assumed else "µm/px"
            out.append((f"level {k}: {mpp:.3g} {unit}, {lv.shape[1]} x {lv.shape[0]} px", k))
        return out

    # ----------------------------------------------------------------- statistics

    def _stats_key(self, layer: Any) -> tuple:
        levels = image_levels(layer)
        src = stats_level(SimpleNamespace(levels=levels))
        return (id(layer), tuple(levels[0].shape), tuple(src.shape))

    def _cached_stats(self, layer: Any) -> DabStats | None:
        entry = self._stats.get(id(layer))
        if entry is None:
            return None
        ref, key, stats = entry
        if ref() is not layer or key != self._stats_key(layer):
            return None
        return stats

    def _ensure_stats(self, layer: Any) -> None:
        """Start the statistics worker for ``layer`` unless cached, running or failed."""
        if self._cached_stats(layer) is not None:
            return
        key = self._stats_key(layer)
        if key in self._stats_pending or key in self._stats_failed:
            return
        src = stats_level(SimpleNamespace(levels=image_levels(layer)))
        ref = weakref.ref(layer)
        worker = _make_worker(stats_job, src, errored=lambda exc: self._on_stats_error(key, exc))
        worker.returned.connect(lambda st: self._on_stats(ref, key, st))
        worker.finished.connect(lambda: self._stats_pending.discard(key))
        self._stats_pending.add(key)
        self.stats_worker = worker
        self._threshold_label.value = "computing whole-slide DAB statistics…"
        worker.start()

    def _store_stats(self, layer: Any, stats: DabStats) -> None:
        self._stats[id(layer)] = (weakref.ref(layer), self._stats_key(layer), stats)

    @_guarded("Whole-slide DAB statistics")
    @while_open
    def _on_stats(self, ref: Any, key: tuple, stats: DabStats) -> None:
        layer = ref()
        if layer is None or layer not in self.viewer.layers:
            return
        self._stats[id(layer)] = (ref, key, stats)
        self._update_threshold_label()
        self._request_preview()

    @while_open
    def _on_stats_error(self, key: tuple, exc: BaseException) -> None:
        self._stats_failed[key] = str(exc)
        self._threshold_label.value = "no statistics (see the notification)"
        notify_error(exc, "Whole-slide DAB statistics")

    def _update_threshold_label(self) -> None:
        layer = self._layer()
        if layer is None:
            self._threshold_label.value = ""
            return
        preset = self.preset()
        stats = self._cached_stats(layer)
        if stats is None and preset.rule is not ThresholdRule.FIXED:
            failed = self._stats_failed.get(self._stats_key(layer))
            self._threshold_label.value = (
                "no statistics (see the notification)"
                if failed
                else "computing whole-slide DAB statistics…"
            )
            return
        try:
            t = threshold_for(stats, preset)
        except ValueError:
            self._threshold_label.value = "no threshold: no tissue in the statistics"
            return
        self._threshold_label.value = f"threshold {t:.3f} ({_rule_text(preset)})"

    # ----------------------------------------------------------------- control events

    def _apply_preset_values(self) -> None:
        base = PRESETS[self._stain.value]
        self._resetting = True
        try:
            self._min_size.step = base.mpp**2
            self._closing.step = base.mpp
            self._rule.value = base.rule.value
            self._k.value = base.k_std
            if base.fixed_threshold is not None:
                self._fixed.value = base.fixed_threshold
            self._min_size.value = base.min_object_size * base.mpp**2
            self._closing.value = base.closing_radius * base.mpp
        finally:
            self._resetting = False
        self._update_rule_enabled()

    def _update_rule_enabled(self) -> None:
        rule = ThresholdRule(self._rule.value)
        self._k.enabled = rule is ThresholdRule.MEAN_STD
        self._fixed.enabled = rule is ThresholdRule.FIXED

    def _on_layers_changed(self, *_: Any) -> None:
        try:
            self.reset_choices()
        except RuntimeError:  # the dock's Qt widgets are gone
            return

    def _on_layer_changed(self, *_: Any) -> None:
        self._level.reset_choices()
        layer = self._layer()
        self._last_notice = None
        if layer is not None:
            if layer_mpp(layer) is None:
                mpp = PRESETS[self._stain.value].mpp
                self._status.value = (
                    f"'{layer.name}' has no pixel size: µm sizes assume {mpp:g} µm/px "
                    "(set the layer's scale in µm)"
                )
            self._ensure_stats(layer)
        self._update_threshold_label()
        self._request_preview()

    def _on_stain_changed(self, *_: Any) -> None:
        self._apply_preset_values()
        self._update_threshold_label()
        self._request_preview()

    def _on_rule_changed(self, *_: Any) -> None:
        self._update_rule_enabled()
        if not self._resetting and ThresholdRule(self._rule.value) is ThresholdRule.FIXED:
            # start the fixed threshold from the automatic one of the preset
            layer = self._layer()
            stats = self._cached_stats(layer) if layer is not None else None
            base = PRESETS[self._stain.value]
            if stats is not None and stats.n > 0:
                t = threshold_value(stats, base)
                self._fixed.value = min(max(round(t, 3), self._fixed.min), self._fixed.max)
        self._on_param_changed()

    def _on_param_changed(self, *_: Any) -> None:
        if self._resetting:
            return
        self._update_threshold_label()
        self._request_preview()

    def _on_live_changed(self, value: bool) -> None:
        if value:
            self._request_preview()
        else:
            self._timer.stop()
            self._preview_gen += 1  # results still on their way are dropped
            if self.preview_worker is not None:
                self.preview_worker.quit()

    def _on_camera(self, *_: Any) -> None:
        self._request_preview()

    # ----------------------------------------------------------------- live preview

    def _request_preview(self) -> None:
        try:
            if self._live.value:
                self._timer.start()
        except RuntimeError:  # the dock's Qt widgets are gone
            return

    def _notify_once(self, exc: BaseException, action: str) -> None:
        """Notify, unless the same message was the last one (panning would repeat it)."""
        msg = f"{action}: {exc}"
        self._status.value = str(exc)
        if msg != self._last_notice:
            self._last_notice = msg
            notify_error(exc, action)

    @_guarded("Mask preview")
    @while_open
    def _run_preview(self) -> None:
        layer = self._layer()
        if layer is None or not self._live.value:
            return
        preset0 = self.preset()
        stats = self._cached_stats(layer)
        if stats is None and preset0.rule is not ThresholdRule.FIXED:
            self._ensure_stats(layer)  # the preview is requested again when they arrive
            return
        try:
            box0 = visible_box(self.viewer, layer)
            levels = image_levels(layer)
            start = int(getattr(layer, "data_level", 0)) if layer.multiscale else 0
            level = min(max(start, 0), len(levels) - 1)
            box = level_box(box0, layer, level)
            while box[2] * box[3] > PREVIEW_MAX_PIXELS and level < len(levels) - 1:
                level += 1
                box = level_box(box0, layer, level)
            y, x, h, w = box
            if h == 0 or w == 0:
                raise ValueError(f"'{layer.name}' is not in the field of view")
            s = max(1, math.ceil(math.sqrt(h * w / PREVIEW_MAX_PIXELS)))
            mpp, _ = self._level_mpp(layer, level)
            preset = self.preset(mpp * s)
            t = threshold_for(stats, preset)
            region = levels[level][y : y + h : s, x : x + w : s]
            placement = placed_like(layer, level, box)
            placement["scale"] = tuple(float(v) * s for v in placement["scale"])
        except Exception as exc:
            self._notify_once(exc, "Mask preview")
            return

        self._preview_gen += 1
        gen = self._preview_gen
        if self.preview_worker is not None:
            self.preview_worker.quit()
        name = f"mask preview ({layer.name})"
        meta = {"stain": preset.name, "threshold": t, "level": level, "stride": s, "mpp": mpp * s}
        worker = _make_worker(
            preview_job, region, preset, t, errored=lambda exc: self._on_preview_error(gen, exc)
        )
        worker.returned.connect(lambda m: self._on_preview(gen, name, m, meta, placement))
        self.preview_worker = worker
        worker.start()

    @_guarded("Mask preview")
    @while_open
    def _on_preview(
        self, gen: int, name: str, mask: np.ndarray, meta: dict, placement: dict
    ) -> None:
        if gen != self._preview_gen or not self._live.value:
            return  # a newer request superseded this one
        add_or_replace(self.viewer, mask, "labels", name, metadata=meta, opacity=0.5, **placement)
        self._last_notice = None
        self._status.value = f"preview: level {meta['level']}, threshold {meta['threshold']:.3f}"

    @while_open
    def _on_preview_error(self, gen: int, exc: BaseException) -> None:
        if gen == self._preview_gen:
            self._notify_once(exc, "Mask preview")

    # ----------------------------------------------------------------- whole-image run

    @while_open
    def _on_compute_event(self, worker: Any, ctx: dict, ev: Any) -> None:
        if worker is not self.worker or not self._running:
            return
        if isinstance(ev, DabStats):
            layer = ctx["layer_ref"]()
            if layer is not None and layer in self.viewer.layers:
                self._store_stats(layer, ev)
                self._update_threshold_label()
            return
        if not isinstance(ev, Progress):
            return
        if ev.stage == "statistics":
            self._status.value = "computing whole-slide DAB statistics…"
            return
        from napari.utils import progress

        desc = (
            f"coarse {ctx['preset'].name} mask: {ev.done}/{ev.total} tiles, "
            f"ETA {format_seconds(ev.eta_s)}"
        )
        self._progress.max = max(ev.total, 1)
        self._progress.value = ev.done
        self._status.value = desc
        pbar = self._pbar
        if pbar is None:
            pbar = self._pbar = progress(total=ev.total)
        pbar.set_description(desc)
        # may process Qt events, so the run can finish (and close the bar) inside this call
        pbar.update(ev.done - pbar.n)

    @_guarded("Coarse mask")
    @while_open
    def _on_compute_returned(self, worker: Any, ctx: dict, res: dict) -> None:
        if worker is not self.worker or self._cancelled is worker:
            return  # cancelled: _on_compute_finished says so
        preset: MaskPreset = ctx["preset"]
        name = ctx["layer_name"]
        mpp = ctx["mpp"]
        prov = {
            "content": f"coarse {preset.name} mask (1 = positive)",
            "preset": _preset_dict(preset),
            "rule": preset.rule.value,
            "threshold": res["threshold"],
            "k": preset.k_std,
            "source": name,
            "level": ctx["level"],
            "mpp": mpp,
            "mpp_assumed": ctx["mpp_assumed"],
            "tile": TILE,
            "halo": ctx["halo"],
        }
        st = res["stats"]
        if st is not None:
            prov["dab_stats"] = {"mean": st.mean, "std": st.std, "otsu": st.otsu, "n": st.n}
        meta_mpp = None if ctx["mpp_assumed"] else mpp
        mask_layer = add_or_replace(
            self.viewer,
            res["mask"],
            "labels",
            f"coarse mask {preset.name} ({name})",
            metadata={"stain": preset.name, "provenance": prov, "mpp": meta_mpp},
            **ctx["placement"],
        )
        dab_prov = {**prov, "content": "DAB optical density / ln(1e6) (skimage rgb2hed)"}
        dab_layer = add_or_replace(
            self.viewer,
            res["dab"],
            "image",
            f"DAB ({name})",
            metadata={"stain": preset.name, "provenance": dab_prov, "mpp": meta_mpp},
            colormap="viridis",
            contrast_limits=res["contrast_limits"],
            **ctx["placement"],
        )
        self.last_result = {
            "mask": res["mask"],
            "dab": res["dab"],
            "threshold": res["threshold"],
            "stats": st,
            "preset": preset,
            "level": ctx["level"],
            "mpp": mpp,
            "layers": (mask_layer, dab_layer),
        }
        self._progress.value = self._progress.max
        self._status.value = (
            f"done: {res['positive']:.2%} positive at threshold {res['threshold']:.3f}"
        )

    def _close_pbar(self) -> None:
        if self._pbar is not None:
            with contextlib.suppress(RuntimeError):  # the viewer's activity dock may be gone
                self._pbar.close()
            self._pbar = None

    @while_open
    def _on_compute_errored(self, exc: BaseException) -> None:
        self._errored = True
        self._status.value = "failed (see the notification)"
        notify_error(exc, "Coarse mask")

    def _on_compute_finished(self, worker: Any) -> None:
        if worker is not self.worker:
            return
        self._running = False
        if self.lifetime.closed:
            self._close_pbar()
            return
        if self._cancelled is worker and not self._errored:
            from napari.utils.notifications import show_info

            self._status.value = "cancelled: no layer was added"
            show_info("Coarse mask cancelled: no layer was added or changed.")
        self._cancelled = None
        self._close_pbar()
        try:
            self._compute_btn.enabled = True
            self._cancel_btn.enabled = False
        except RuntimeError:  # the dock's Qt widgets are gone
            pass
