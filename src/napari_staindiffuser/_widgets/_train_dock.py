"""The "Training" dock: fine-tune StainDiffuser on paired H&E / IHC regions the user marks.

The dock checks the setup on the main thread (cheap: shapes, sizes, stains), then runs
``_train_worker.train_job`` in a ``thread_worker``: patches are cut from the rectangles, the
start checkpoint is prepared, and ``iter_train`` streams its events back. Stop asks the run to
save a checkpoint first (atomically); Resume continues that checkpoint's step count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)

from ._common import (
    add_or_replace,
    format_seconds,
    image_levels,
    layer_choices,
    layer_mpp,
    notify_error,
    placed_like,
)
from ._lifetime import DockLifetime, while_open
from ._train_worker import SCRATCH_PREFIX, DataReady, TrainJob, check_registration, train_job

__all__ = ["TrainWidget"]

NEW_STAIN = "new stain…"
MASK_AUTO = "compute with the stain preset"
SPLITS = ("'split' feature of the shapes", "last rectangle is validation", "no validation")
SCRATCH = tuple(f"{SCRATCH_PREFIX}{p}" for p in ("tiny", "small", "paper"))
PREVIEW_MAX = 256  # px, side of the validation preview crop


class TrainWidget(Container):
    """Dock: fine-tune on marked regions. Test hooks: ``start()``, ``stop()``, ``resume()``,
    ``running``, ``worker``, ``plot`` (LossPlot), ``registrations``, ``events``, and
    ``lifetime.closed`` (napari closed the dock: a run was asked to stop, saving a checkpoint,
    as Stop does)."""

    def __init__(self, napari_viewer):
        super().__init__(scrollable=True)
        from ._plot import LossPlot

        self.viewer = napari_viewer
        self.worker = None
        self.running = False
        self.control = None
        self.registrations: list = []
        self.events: list = []
        self._last_job: TrainJob | None = None

        img = self._rgb_choices
        self._he = ComboBox(label="H&E", choices=img, nullable=True)
        self._ihc = ComboBox(label="IHC", choices=img, nullable=True)
        self._stain = ComboBox(label="IHC stain", choices=self._stain_choices)
        self._new_stain = LineEdit(label="New stain", value="")
        self._masks = ComboBox(label="Masks", choices=self._mask_choices)
        self._shapes = ComboBox(label="Regions", choices=self._shape_choices, nullable=True)
        self._split = ComboBox(label="Validation", choices=list(SPLITS), value=SPLITS[1])
        self._check = PushButton(text="Check registration")
        self._reg_label = Label(value="")
        self._start_from = ComboBox(label="Start from", choices=self._start_choices)
        self._steps = SpinBox(label="Steps", min=1, max=1_000_000, value=500)
        self._lr = FloatSpinBox(label="Learning rate", min=1e-7, max=1e-2, step=1e-5, value=1e-4)
        self._batch = SpinBox(label="Batch", min=1, max=256, value=8)
        self._lgen = FloatSpinBox(label="λ generation", min=0.0, max=100.0, step=0.1, value=1.0)
        self._laux = FloatSpinBox(label="λ auxiliary", min=0.0, max=100.0, step=0.1, value=1.0)
        self._aux = ComboBox(label="Aux target", choices=["mask", "distance"], value="mask")
        self._size = ComboBox(label="Patch size", choices=[32, 64, 128, 256], value=64)
        self._val_every = SpinBox(label="Validate every", min=0, max=100_000, value=50)
        self._ckpt_every = SpinBox(label="Save every", min=0, max=100_000, value=100)
        out = Path.home() / "staindiffuser" / "finetuned.safetensors"
        self._out = FileEdit(label="Checkpoint", mode="w", filter="*.safetensors", value=out)
        self._device = ComboBox(label="Device", choices=["auto", "cuda", "mps", "cpu"])
        self._go = PushButton(text="Train")
        self._stop = PushButton(text="Stop", enabled=False)
        self._resume = PushButton(text="Resume")
        self._progress = ProgressBar(value=0, min=0, max=1, label="Progress")
        self._status = Label(value="")
        self._val_scores = Label(value="")  # PSNR, SSIM, Dice of the validation preview
        self.plot = LossPlot()

        tips = {
            self._stain: "Which stain the IHC layer shows. A new name adds a branch to the model.",
            self._masks: "Positive-cell masks: a Labels layer checked in the Coarse masks dock, "
            "or computed from the IHC with the stain's preset.",
            self._shapes: "A Shapes layer whose rectangles are the training regions.",
            self._split: "Which rectangles validate: a 'split' feature (train/val) per shape, "
            "the last one, or none.",
            self._start_from: "The bundled model, a checkpoint, or a new model (preset).",
            self._steps: "Total optimisation steps (Resume continues up to this number).",
            self._lr: "AdamW learning rate; 1e-4 suits fine-tuning.",
            self._batch: "Patches per step.",
            self._lgen: "Loss weight of the generation branch of this stain.",
            self._laux: "Loss weight of the auxiliary (segmentation) branch of this stain.",
            self._aux: "What the auxiliary branch learns: the mask or its distance transform.",
            self._size: "Model patch side in pixels (at the model's µm/px).",
            self._val_every: "Validation loss and preview every N steps (0: never).",
            self._ckpt_every: "Save a checkpoint every N steps (0: only at the end and on Stop).",
            self._out: "Where the fine-tuned checkpoint is written (atomically).",
        }
        for w, tip in tips.items():
            w.tooltip = tip
        self.extend(
            [
                self._he, self._ihc, self._stain, self._new_stain, self._masks, self._shapes,
                self._split, self._check, self._reg_label, self._start_from, self._steps,
                self._lr, self._batch, self._lgen, self._laux, self._aux, self._size,
                self._val_every, self._ckpt_every, self._out, self._device,
                Container(
                    widgets=[self._go, self._stop, self._resume], layout="horizontal", labels=False
                ),
                self._progress, self._status, self._val_scores,
            ]
        )  # fmt: skip
        self.native.layout().addWidget(self.plot)
        self._val_scores.tooltip = (
            "The validation preview (EMA weights) against the real IHC of the same crop: "
            "PSNR, SSIM and the Dice of DAB-thresholded positive cells (see docs/evaluation.md)"
        )
        for label in (self._reg_label, self._status, self._val_scores):
            label.native.setWordWrap(True)  # long messages wrap instead of widening the dock
        self._new_stain.visible = False
        self._stain.changed.connect(lambda v: setattr(self._new_stain, "visible", v == NEW_STAIN))
        self._start_from.changed.connect(self._on_start_changed)
        self._check.changed.connect(lambda _=None: self.check_registration())
        self._go.changed.connect(lambda _=None: self.start())
        self._stop.changed.connect(lambda _=None: self.stop())
        self._resume.changed.connect(lambda _=None: self.resume())
        ev = napari_viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._on_start_changed(self._start_from.value)
        self.lifetime = DockLifetime(self, napari_viewer, self._on_dock_closed)

    def _on_dock_closed(self) -> None:
        """napari closed the dock (``_lifetime.py``): stop a run as Stop does (after this
        step, saving a checkpoint first: the training done so far is kept) and let go of the
        viewer's events. Flags only: the Qt widgets may be being deleted."""
        if self.control is not None:
            self.control.request_stop()
        ev = self.viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.reordered):
            e.disconnect(self._on_layers_changed)

    # ----------------------------------------------------------------------- choices

    def _rgb_choices(self, _w=None) -> list:
        return layer_choices(self.viewer, "image", rgb=True)

    def _shape_choices(self, _w=None) -> list:
        return layer_choices(self.viewer, "shapes")

    def _mask_choices(self, _w=None) -> list:
        return [(MASK_AUTO, None), *layer_choices(self.viewer, "labels")]

    def _start_choices(self, _w=None) -> list:
        from napari_staindiffuser.checkpoint_meta import bundled_model_path
        from napari_staindiffuser.settings import recent_models

        out = [("bundled demo model", str(bundled_model_path()))]
        out += [(f"{p.name} ({p.parent})", str(p)) for p in recent_models()]
        return out + [(s, s) for s in SCRATCH]

    def _stain_choices(self, _w=None) -> list:
        stains = list(self._start_stains()) if hasattr(self, "_start_from") else ["CD3"]
        return [*stains, NEW_STAIN]

    def _start_stains(self) -> tuple[str, ...]:
        from napari_staindiffuser.checkpoint_meta import read_config

        start = self._start_from.value
        if start is None or start.startswith(SCRATCH_PREFIX):
            return ("CD3", "CK8/18")
        try:
            return read_config(start)[0].stains
        except (ValueError, OSError):
            return ()

    def _on_layers_changed(self, _event=None) -> None:
        for combo in (self._he, self._ihc, self._shapes, self._masks):
            combo.reset_choices()
        rgb = [c for c in self._he.choices if c is not None]
        if self._he.value is None and rgb:
            self._he.value = rgb[0]
        if self._ihc.value is None and len(rgb) > 1:
            self._ihc.value = rgb[1]
        shapes = [c for c in self._shapes.choices if c is not None]
        if self._shapes.value is None and shapes:
            self._shapes.value = shapes[0]

    def _on_start_changed(self, start: str | None) -> None:
        from napari_staindiffuser.checkpoint_meta import read_config

        self._stain.reset_choices()
        if start and not start.startswith(SCRATCH_PREFIX):
            try:
                cfg = read_config(start)[0]
            except (ValueError, OSError) as exc:
                notify_error(exc, "Reading the start checkpoint")
                return
            if cfg.image_size in self._size.choices:
                self._size.value = cfg.image_size
            self._aux.value = "distance" if cfg.aux_target.value == "distance" else "mask"

    def set_start(self, path: str | Path) -> None:
        """Start from a checkpoint file (remembered in the recent models)."""
        from ._stain_dock import remember_model

        remember_model(path)
        self._start_from.reset_choices()
        self._start_from.value = str(Path(path).expanduser().resolve())

    def stain(self) -> str:
        if self._stain.value == NEW_STAIN:
            return self._new_stain.value.strip()
        return self._stain.value

    # ----------------------------------------------------------------------- the setup

    def _regions(self) -> tuple[list, list]:
        """(train boxes, val boxes) in level-0 pixels of the H&E; ValueError when unusable."""
        he, shapes = self._he.value, self._shapes.value
        if shapes is None:
            raise ValueError("no Shapes layer: add one and draw rectangles over paired tissue")
        h, w = image_levels(he)[0].shape[:2]
        boxes, split = [], []
        feats = getattr(shapes, "features", None)
        use_feature = self._split.value == SPLITS[0]
        if use_feature and (feats is None or "split" not in getattr(feats, "columns", [])):
            raise ValueError(
                "the Shapes layer has no 'split' feature: set one (train/val) per shape, or "
                "pick another validation rule"
            )
        for i, verts in enumerate(shapes.data):
            world = np.array([shapes.data_to_world(v) for v in np.asarray(verts, float)])
            pts = np.array([he.world_to_data(p) for p in world])[:, -2:]
            lo, hi = pts.min(0), pts.max(0)
            if lo[0] < -0.5 or lo[1] < -0.5 or hi[0] > h + 0.5 or hi[1] > w + 0.5:
                raise ValueError(
                    f"rectangle {i + 1} of '{shapes.name}' lies (partly) outside the "
                    f"{w} x {h} px image: move it inside"
                )
            boxes.append(shape_boxes_one(lo, hi, h, w))
            split.append(str(feats["split"].iloc[i]).lower() if use_feature else "train")
        if not boxes:
            raise ValueError(f"no regions: draw rectangles on '{shapes.name}' first")
        if self._split.value == SPLITS[1] and len(boxes) > 1:
            split[-1] = "val"
        train = [b for b, s in zip(boxes, split, strict=True) if s != "val"]
        val = [b for b, s in zip(boxes, split, strict=True) if s == "val"]
        if not train:
            raise ValueError("every region is marked for validation: mark one for training")
        return train, val

    def _pair(self) -> tuple[Any, Any, Any, Any]:
        he, ihc = self._he.value, self._ihc.value
        if he is None or ihc is None:
            raise ValueError("pick the H&E layer and the paired IHC layer")
        if he is ihc:
            raise ValueError("the H&E and the IHC must be two different layers")
        a, b = image_levels(he)[0], image_levels(ihc)[0]
        if a.shape[:2] != b.shape[:2]:
            raise ValueError(
                f"the H&E ({a.shape[1]} x {a.shape[0]} px) and the IHC ({b.shape[1]} x "
                f"{b.shape[0]} px) differ in size: register them first (same pixel grid)"
            )
        for name, arr in (("H&E", a), ("IHC", b)):
            if arr.dtype != np.uint8 or arr.shape[2] not in (3, 4):
                raise ValueError(f"the {name} must be 8-bit RGB; got {arr.dtype} {arr.shape}")
        masks = self._masks.value
        m = None
        if masks is not None:
            m = image_levels(masks)[0]
            if m.shape[:2] != a.shape[:2]:
                raise ValueError(
                    f"the masks '{masks.name}' ({m.shape[1]} x {m.shape[0]}) do not match the "
                    "H&E's size"
                )
        return he, a[..., :3], b[..., :3], m

    def _make_job(self, resume: bool = False) -> TrainJob:
        from napari_staindiffuser.checkpoint_meta import read_config
        from napari_staindiffuser.config import TrainConfig

        he, a, b, m = self._pair()
        train, val = self._regions()
        stain = self.stain()
        if not stain:
            raise ValueError("type the name of the new stain")
        start = self._start_from.value
        if start is None:
            raise ValueError("pick where training starts from")
        changes: dict[str, Any] = {"image_size": int(self._size.value)}
        changes["aux_target"] = self._aux.value
        if not start.startswith(SCRATCH_PREFIX):
            cfg = read_config(start)[0]
            if stain not in cfg.stains and cfg.variant.value != "multitask":
                raise ValueError(
                    f"the start model ({cfg.variant.value}) cannot grow a branch for the "
                    f"unknown stain {stain!r}; it knows {list(cfg.stains)}. Start from a "
                    "multitask model or from scratch"
                )
            stains = cfg.stains + (() if stain in cfg.stains else (stain,))
            lg = list(cfg.lambda_gen) + [1.0] * (len(stains) - len(cfg.stains))
            la = list(cfg.lambda_aux) + [1.0] * (len(stains) - len(cfg.stains))
            k = stains.index(stain)
            lg[k], la[k] = float(self._lgen.value), float(self._laux.value)
            changes.update(lambda_gen=tuple(lg), lambda_aux=tuple(la))
        else:
            changes.update(lambda_gen=(self._lgen.value,), lambda_aux=(self._laux.value,))
        out = Path(self._out.value).expanduser()
        if not out.name.endswith(".safetensors"):
            raise ValueError(f"the checkpoint name must end in .safetensors; got {out.name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tc = TrainConfig(
            steps=int(self._steps.value),
            batch_size=int(self._batch.value),
            lr=float(self._lr.value),
            warmup_steps=min(100, int(self._steps.value) // 10),
            val_every=int(self._val_every.value) if val else 0,
            checkpoint_every=int(self._ckpt_every.value),
        )
        pbox = None
        if val or train:
            y, x, h, w = (val or train)[0]
            ph, pw = min(h, PREVIEW_MAX), min(w, PREVIEW_MAX)
            pbox = (y + (h - ph) // 2, x + (w - pw) // 2, ph, pw)
        shifts = {}
        for i, reg in enumerate(self.registrations):
            if reg is not None and getattr(reg, "correct", False):
                shifts[i] = (reg.dy, reg.dx)
        return TrainJob(
            he=a, ihc=b, stain=stain, masks=m, train_boxes=train, val_boxes=val, shifts=shifts,
            start=start, config_changes=changes, train_config=tc, out=out,
            device=self._device.value, mpp=layer_mpp(he), preview_box=pbox, resume=resume,
            ihc_levels=[lv[..., :3] for lv in image_levels(self._ihc.value)],
        )  # fmt: skip

    # ----------------------------------------------------------------------- registration

    def check_registration(self):
        """Measure the H&E / IHC shift of every region (background); returns the worker."""
        from napari.qt.threading import create_worker

        try:
            _, a, b, _ = self._pair()
            train, val = self._regions()
        except ValueError as exc:
            notify_error(exc, "Registration check")
            return None
        he = self._he.value
        self._reg_label.value = "measuring…"
        worker = create_worker(
            check_registration, a, b, train + val, layer_mpp(he),
            _connect={"errored": self._on_registration_error},
        )  # fmt: skip
        worker.returned.connect(self._on_registration)
        return worker

    @while_open
    def _on_registration_error(self, exc: BaseException) -> None:
        notify_error(exc, "Registration check")

    @while_open
    def _on_registration(self, regs: list) -> None:
        from napari.utils.notifications import show_warning

        self.registrations = [_Reg(r) for r in regs]
        lines, bad = [], []
        for i, r in enumerate(regs):
            lines.append(f"region {i + 1}: {r.message()}")
            if not r.ok:
                bad.append(i + 1)
        self._reg_label.value = "\n".join(lines)
        if bad:
            show_warning(f"regions {bad}: the IHC is offset from the H&E (see the dock)")
            answer = self.ask_correct(bad)
            for i in bad:
                self.registrations[i - 1].correct = answer
            if answer:
                self._reg_label.value += "\nthe shifts will be corrected when patches are cut"

    def ask_correct(self, regions: list[int]) -> bool:
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self.native,
            "Registration",
            f"The IHC is offset from the H&E in regions {regions}. Correct the shift when "
            "cutting the training patches?",
        )
        return answer == QMessageBox.StandardButton.Yes

    # ----------------------------------------------------------------------- running

    def start(self, resume: bool = False):
        """Check the setup and start training (returns the worker, or None on a bad setup)."""
        from napari.qt.threading import create_worker

        from napari_staindiffuser.training import TrainControl

        if self.running:
            return None
        try:
            job = self._make_job(resume=resume)
            if resume and not job.out.is_file():
                raise ValueError(f"nothing to resume: {job.out} does not exist yet")
        except (ValueError, TypeError, OSError) as exc:
            notify_error(exc, "Training")
            return None
        self._last_job = job
        self.control = TrainControl()
        if not resume:
            self.plot.clear()
            self._val_scores.value = ""
        self.events = []
        self._set_running(True, "cutting patches…")
        worker = create_worker(
            train_job, job, self.control, _start_thread=False,
            _connect={"errored": self._on_error},
        )  # fmt: skip
        worker.yielded.connect(self._on_event)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()
        return worker

    def resume(self):
        return self.start(resume=True)

    def stop(self) -> None:
        """Ask the run to stop after this step; it saves a checkpoint first."""
        if self.control is not None:
            self.control.request_stop()
            self._status.value = "stopping: saving a checkpoint…"

    def _set_running(self, running: bool, status: str = "") -> None:
        self.running = running
        self._go.enabled = self._resume.enabled = not running
        self._stop.enabled = running
        if status:
            self._status.value = status

    def _on_event(self, ev: Any) -> None:
        from napari_staindiffuser.events import (
            CheckpointSaved,
            Finished,
            Progress,
            TrainStep,
            Validation,
        )

        self.events.append(ev)
        if self.lifetime.closed:  # no widget to update; the checkpoint still joins the models
            if isinstance(ev, Finished):
                from ._stain_dock import remember_model

                remember_model(self._last_job.out)
            return
        if isinstance(ev, Progress):
            self._status.value = f"{ev.stage}: {ev.done} / {ev.total}"
        elif isinstance(ev, DataReady):
            self._status.value = (
                f"{ev.n_train} training / {ev.n_val} validation patches of {ev.patch_px} px"
            )
            if ev.preview_ihc is not None:
                self._show_preview(f"preview real {self._last_job.stain} IHC", ev.preview_ihc)
        elif isinstance(ev, TrainStep):
            for k, v in ev.losses.items():
                self.plot.add(k, ev.step, v)
            self._progress.max = ev.total_steps
            self._progress.value = ev.step
            dev = self._device_name()
            self._status.value = (
                f"step {ev.step} / {ev.total_steps} · {ev.it_per_s:.2f} it/s · "
                f"ETA {format_seconds(ev.eta_s)} · {dev} · "
                f"loss {ev.losses.get('total', np.nan):.4f}"
            )
        elif isinstance(ev, Validation):
            for k, v in ev.losses.items():
                self.plot.add(f"val {k}", ev.step, v)
            for st, img in ev.previews.items():
                self._show_preview(f"preview virtual {st} (step)", img, step=ev.step)
            if ev.scores:
                self._val_scores.value = format_scores(ev.step, ev.scores)
        elif isinstance(ev, CheckpointSaved):
            self._status.value = f"checkpoint saved at step {ev.step}: {ev.path}"
        elif isinstance(ev, Finished):
            from ._stain_dock import remember_model

            remember_model(self._last_job.out)  # the staining dock lists it at once
            word = "stopped" if ev.stopped else "finished"
            summary = ev.summary
            self._status.value = f"{word} at step {summary['steps']}: {summary['checkpoint']}"

    def _device_name(self) -> str:
        from napari_staindiffuser.training import resolve_device

        try:
            return str(resolve_device(self._device.value))
        except ValueError:
            return self._device.value

    def _show_preview(self, name: str, image: np.ndarray, step: int | None = None) -> None:
        job = self._last_job
        he = self._he.value
        if job is None or job.preview_box is None or he is None:
            return
        name = name.replace("(step)", f"({he.name})")
        meta = {"provenance": {"content": name, "step": step, "region": list(job.preview_box)}}
        add_or_replace(
            self.viewer, np.asarray(image), "image", name, rgb=True, metadata=meta,
            **placed_like(he, 0, job.preview_box),
        )  # fmt: skip

    @while_open
    def _on_error(self, exc: BaseException) -> None:
        notify_error(exc, "Training")
        self._status.value = f"failed: {exc}"

    def _on_finished(self) -> None:
        self.control = None
        if self.lifetime.closed:
            self.running = False
            return
        self._set_running(False)


def format_scores(step: int, scores: dict) -> str:
    """One line per stain: the validation preview's PSNR, SSIM and Dice at ``step``."""
    lines = [
        f"validation preview, step {step}: {st} PSNR {s['psnr']:.2f} dB · SSIM "
        f"{s['ssim']:.3f} · Dice {s['dice']:.3f}"
        for st, s in scores.items()
    ]
    return "\n".join(lines)


def shape_boxes_one(lo, hi, h: int, w: int) -> tuple[int, int, int, int]:
    """A rectangle's data-pixel bounds as a whole-pixel box clipped to the image."""
    import math

    y0, x0 = max(0, math.floor(lo[0] + 0.5)), max(0, math.floor(lo[1] + 0.5))
    y1, x1 = min(h, math.floor(hi[0] + 0.5)), min(w, math.floor(hi[1] + 0.5))
    return y0, x0, max(0, y1 - y0), max(0, x1 - x0)


class _Reg:
    """A Registration plus the user's choice to correct it."""

    def __init__(self, reg: Any):
        self.reg, self.correct = reg, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reg, name)
