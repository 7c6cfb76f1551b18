"""The worker side of the "Training" dock: registration checks, patch extraction, training.

Nothing here touches napari or Qt. The dock gathers arrays, boxes and settings into a
:class:`TrainJob`; :func:`train_job` (run in a ``thread_worker``) cuts the paired patches,
prepares the starting checkpoint and drains :func:`~napari_staindiffuser.training.iter_train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..events import Event, Progress

__all__ = ["SCRATCH_PREFIX", "DataReady", "TrainJob", "check_registration", "train_job"]

SCRATCH_PREFIX = "scratch: "
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class TrainJob:
    he: Any  # (H, W, 3) uint8, level 0 of the H&E
    ihc: Any  # (H, W, 3) uint8, level 0 of the IHC, same (H, W)
    stain: str
    masks: Any  # (H, W) labels (nonzero = positive) or None: computed with the stain preset
    train_boxes: list[Box]
    val_boxes: list[Box]
    shifts: dict[int, tuple[float, float]]  # region index (train then val) -> IHC shift
    start: str  # a checkpoint path, or "scratch: <preset>"
    config_changes: dict[str, Any]  # ModelConfig fields for the run (lambdas, aux target, size)
    train_config: Any  # TrainConfig
    out: Path
    device: str = "auto"
    mpp: float | None = None  # µm/px of level 0, None when unknown
    preview_box: Box | None = None
    resume: bool = False
    ihc_levels: list = field(default_factory=list)  # for whole-slide DAB statistics


@dataclass(frozen=True)
class DataReady(Event):
    """Patches are cut: ``n_train`` and ``n_val`` pairs of ``patch_px`` input pixels."""

    n_train: int
    n_val: int
    patch_px: int
    stains: tuple[str, ...]
    preview_he: Any = None
    preview_ihc: Any = None


def check_registration(he: Any, ihc: Any, boxes: list[Box], mpp: float | None) -> list:
    """The :func:`~napari_staindiffuser.patches.estimate_shift` of each region (worker)."""
    from ..patches import estimate_shift

    out = []
    for y, x, h, w in boxes:
        out.append(estimate_shift(he[y : y + h, x : x + w], ihc[y : y + h, x : x + w], mpp=mpp))
    return out


def _start_config(job: TrainJob):
    """(model_config, init path) for iter_train: scratch, or a derived checkpoint."""
    from ..checkpoint_meta import read_config
    from ..config import preset

    changes = dict(job.config_changes)
    if job.start.startswith(SCRATCH_PREFIX):
        name = job.start[len(SCRATCH_PREFIX) :]
        stains = (job.stain,)
        n = len(stains)
        changes.setdefault("lambda_gen", (1.0,) * n)
        changes.setdefault("lambda_aux", (1.0,) * n)
        mpp = {"mpp": job.mpp} if job.mpp else {}
        return preset(name, stains=stains, **mpp, **changes), None
    from ..model.checkpoint import derive_checkpoint

    cfg, _ = read_config(job.start)
    add = [] if job.stain in cfg.stains else [job.stain]
    for key in ("lambda_gen", "lambda_aux"):
        if key in changes and len(changes[key]) != len(cfg.stains) + len(add):
            raise ValueError(f"{key} needs one weight per stain of the model and the new stain")
    init = job.out.with_name(job.out.stem + ".start.safetensors")
    derive_checkpoint(job.start, init, add_stains=add, **changes)
    return None, init


def _pairs(job: TrainJob, boxes: list[Box], offset: int, patch_px: int, masks: tuple, what: str):
    """Patch pairs of ``boxes`` (masks from ``job.masks``, else ``masks`` = (stats, preset))."""
    from ..pairs import InMemoryPairs
    from ..patches import PatchSpec, iter_patch_pairs

    samples = []
    spec = PatchSpec(patch=patch_px, min_tissue=0.5)
    for i, box in enumerate(boxes):
        if box[2] < patch_px or box[3] < patch_px:
            raise ValueError(
                f"{what} region {i + 1} ({box[3]} x {box[2]} px) is smaller than one training "
                f"patch ({patch_px} px at this pixel size): draw it larger or lower the patch "
                "size"
            )
        for ev in iter_patch_pairs(
            job.he,
            job.ihc,
            job.stain,
            regions=[box],
            spec=spec,
            masks=job.masks,
            stats=masks[0],
            preset=masks[1],
            mpp=job.mpp,
            shift=job.shifts.get(offset + i),
        ):
            if not isinstance(ev, Progress):
                samples.append(ev)
        yield Progress(i + 1, len(boxes), stage=f"{what} patches")
    return InMemoryPairs(samples, description=f"{len(samples)} {job.stain} {what} patches")


def _preview_truth(job: TrainJob, he: np.ndarray, ihc: np.ndarray, masks: tuple):
    """The preview crop's real IHC and positive cells (the masks layer, else the coarse mask
    the training patches get), for the validation scores (PSNR, SSIM, Dice)."""
    from ..pairs import PairSample
    from ..stain import coarse_mask

    y, x, h, w = job.preview_box
    if job.masks is not None:
        mask = np.asarray(job.masks[y : y + h, x : x + w]) > 0
    else:
        stats, preset = masks
        mask = coarse_mask(ihc, preset.at_mpp(job.mpp) if job.mpp else preset, stats=stats)
    return PairSample(he=he, ihc=ihc, stain=job.stain, mask=mask)


def train_job(job: TrainJob, control: Any):
    """Cut patches, prepare the start, train (worker thread). Yields Progress, DataReady and
    iter_train's events."""
    from ..checkpoint_meta import read_config
    from ..commands import stats_level
    from ..stain import MaskPreset, ThresholdRule, dab_statistics, get_preset
    from ..training import iter_train

    if job.resume:
        cfg, _ = read_config(job.out)
        model_config, init = None, None
    else:
        model_config, init = _start_config(job)
        cfg = model_config or read_config(init)[0]
    scale = cfg.mpp / job.mpp if job.mpp else 1.0  # input px per model px
    patch_px = max(cfg.image_size, round(cfg.image_size * scale))
    stats = preset = None
    if job.masks is None:
        try:
            preset = get_preset(job.stain)
        except ValueError:  # a new stain: Otsu on the whole-slide DAB, default clean-up
            preset = MaskPreset(name=job.stain, rule=ThresholdRule.OTSU)
        if preset.rule is not ThresholdRule.FIXED:
            levels = job.ihc_levels or [job.ihc]
            stats = dab_statistics(stats_level(SimpleNamespace(levels=levels)))
    n_train = len(job.train_boxes)
    masks = (stats, preset)
    train = yield from _pairs(job, job.train_boxes, 0, patch_px, masks, "training")
    val = yield from _pairs(job, job.val_boxes, n_train, patch_px, masks, "validation")
    if len(train) == 0:
        raise ValueError(
            "no tissue in any training region (no patch has half its area on tissue): draw "
            "the rectangles over tissue"
        )
    preview_he = preview_ihc = preview_truth = None
    if job.preview_box is not None:
        y, x, h, w = job.preview_box
        preview_he = np.asarray(job.he[y : y + h, x : x + w])
        preview_ihc = np.asarray(job.ihc[y : y + h, x : x + w])
        preview_truth = _preview_truth(job, preview_he, preview_ihc, masks)
    yield DataReady(len(train), len(val), patch_px, cfg.stains, preview_he, preview_ihc)
    kwargs: dict[str, Any] = {"model_config": model_config, "init": init}
    if job.resume:
        kwargs = {"resume": job.out}
    try:
        yield from iter_train(
            job.train_config,
            train,
            val_source=val if len(val) else None,
            out=job.out,
            device=job.device,
            control=control,
            provenance={"stain": job.stain, "regions": len(job.train_boxes)},
            preview_he=preview_he,
            preview_mpp=job.mpp,
            preview_truth=preview_truth,
            **kwargs,
        )
    finally:
        if init is not None:
            Path(init).unlink(missing_ok=True)
