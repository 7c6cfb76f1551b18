"""The worker side of the "Virtual staining" dock: jobs that run in a ``thread_worker``.

Nothing here touches napari or Qt: a :class:`Job` holds the arrays and numbers the dock
gathered, :func:`prepare` loads the model and estimates the run, and :func:`stain_job` drains
:func:`~napari_staindiffuser.inference.iter_stain` region by region, adding region events that
carry the finished, labelled results and counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PRECISION", "Job", "RegionDone", "RegionStart"]
__all__ += ["prepare", "stain_job"]

#: the network's precision in the dock: bf16 where the GPU or CPU supports it natively (about 1.9x
#: faster on such CPUs, under half a grey level from fp32 on average), else fp32
PRECISION = "auto"


@dataclass(frozen=True)
class Job:
    image: Any  # (H, W, 3) uint8 numpy or dask: one level of the H&E
    boxes: list[tuple[int, int, int, int]]  # regions, pixels of that level
    model_path: Path
    device: str
    stains: list[str]
    sampler: str
    steps: int
    seed: int
    samples: int
    batch: int
    image_mpp: float | None  # µm/px of that level, None when unknown


@dataclass(frozen=True)
class RegionStart:
    index: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class RegionDone:
    index: int
    images: dict[str, np.ndarray]  # stain -> (h, w, 3) uint8
    labels: dict[str, np.ndarray]  # stain -> (h, w) int32 connected components
    uncertainty: dict[str, np.ndarray]
    counts: list[dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)


_MODEL_CACHE: dict[tuple, Any] = {}


def _load_model(path: Path, device: str) -> tuple[Any, str]:
    """The model on ``device`` (cached per file version and device) and the device's name."""
    from napari_staindiffuser.model.checkpoint import load_checkpoint
    from napari_staindiffuser.training import resolve_device

    dev = resolve_device(device)
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size, str(dev))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model at a time: they can be large
        _MODEL_CACHE[key] = load_checkpoint(path, map_location=dev).model
    return _MODEL_CACHE[key], str(dev)


def prepare(job: Job) -> dict[str, Any]:
    """Check the regions for tissue, load the model, count the tiles and estimate the run's
    seconds (worker thread). Regions without tissue get 0 tiles; none with tissue is an error."""
    from napari_staindiffuser.inference import plan_grid, time_batch
    from napari_staindiffuser.stain import MIN_TISSUE_FRACTION, check_region_size, tissue_fraction

    for b in job.boxes:
        check_region_size(b)
    fractions = [tissue_fraction(job.image, b) for b in job.boxes]
    if all(f < MIN_TISSUE_FRACTION for f in fractions):
        raise ValueError(
            "no tissue in the selected region(s) (under 0.5 % of the pixels): pan to tissue, or "
            "draw the rectangles over tissue"
        )
    model, device = _load_model(job.model_path, job.device)
    cfg = model.config
    tiles = []
    for (_, _, h, w), frac in zip(job.boxes, fractions, strict=True):
        if frac < MIN_TISSUE_FRACTION:
            tiles.append(0)
            continue
        grid, _ = plan_grid(
            (h, w),
            model_tile=cfg.image_size,
            multiple_of=cfg.downsample_factor,
            model_mpp=cfg.mpp,
            image_mpp=job.image_mpp,
        )
        tiles.append(len(grid.tiles))
    batch = max(1, min(job.batch, max(tiles)))
    per_step = time_batch(
        model, batch=batch, stains=job.stains, sampler=job.sampler, precision=PRECISION
    )
    batches = sum(math.ceil(t / job.batch) for t in tiles)
    estimate = batches * job.steps * job.samples * per_step
    stained = [f >= MIN_TISSUE_FRACTION for f in fractions]
    return {"device": device, "tiles": tiles, "estimate_s": estimate, "tissue": fractions,
            "stained": stained}  # fmt: skip


def _counts(index: int, stain: str, labels: np.ndarray, tissue: float, mpp: float) -> dict:
    n = int(labels.max()) if labels.size else 0
    px_mm2 = (mpp or 0.0) ** 2 / 1e6
    tissue_mm2 = tissue * labels.size * px_mm2
    return {
        "region": index + 1,
        "stain": stain,
        "positive objects": n,
        "positive area %": round(100.0 * float((labels > 0).mean()), 2),
        "tissue mm²": round(tissue_mm2, 4),
        "objects per mm² tissue": round(n / tissue_mm2, 1) if tissue_mm2 > 0 else None,
        "µm/px": mpp,
    }


def stain_job(job: Job, tissue: list[float]):
    """Stain each region with tissue (``tissue``: the fractions :func:`prepare` measured) in
    turn (worker thread); yields iter_stain's events and our own."""
    from skimage.measure import label

    from napari_staindiffuser.checkpoint_meta import model_hash
    from napari_staindiffuser.inference import StainResult, iter_stain
    from napari_staindiffuser.stain import MIN_TISSUE_FRACTION

    model, device = _load_model(job.model_path, job.device)
    model_sha = model_hash(job.model_path)
    for i, (box, frac) in enumerate(zip(job.boxes, tissue, strict=True)):
        if frac < MIN_TISSUE_FRACTION:
            continue
        yield RegionStart(i, box)
        for ev in iter_stain(
            job.image,
            model,
            region=box,
            stains=job.stains,
            sampler=job.sampler,
            steps=job.steps,
            seed=job.seed,
            batch=job.batch,
            device=device,
            samples=job.samples,
            image_mpp=job.image_mpp,
            precision=PRECISION,
        ):
            if not isinstance(ev, StainResult):
                yield ev
                continue
            labels = {st: label(m, connectivity=2).astype(np.int32) for st, m in ev.masks.items()}
            mpp = job.image_mpp if job.image_mpp is not None else model.config.mpp
            counts = [_counts(i, st, lab, frac, mpp) for st, lab in labels.items()]
            prov = {
                **ev.provenance,
                "model_path": str(job.model_path),
                "model_sha256": model_sha,
                "device": device,
                "tissue_fraction": round(frac, 4),
            }
            yield RegionDone(i, ev.images, labels, ev.uncertainty, counts, prov)
