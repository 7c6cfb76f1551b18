"""The worker side of the "Coarse masks" dock: jobs that run in a ``thread_worker``.

They get arrays (numpy or dask slices) and a :class:`~napari_staindiffuser.stain.MaskPreset`,
never layers, and import nothing of napari or Qt.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from napari_staindiffuser.events import Progress
from napari_staindiffuser.stain import (
    DabStats,
    MaskPreset,
    MaskTile,
    ThresholdRule,
    coarse_mask,
    dab_channel,
    dab_statistics,
    iter_coarse_masks,
    threshold_value,
)

__all__ = ["compute_job", "preview_job", "stats_job", "threshold_for"]


def _as_numpy(a: Any) -> np.ndarray:
    return np.asarray(a.compute() if hasattr(a, "compute") else a)


def threshold_for(stats: DabStats | None, preset: MaskPreset) -> float:
    """DAB threshold of ``preset``; ``stats`` may be None for the fixed rule."""
    if preset.rule is ThresholdRule.FIXED:
        return float(preset.fixed_threshold)  # type: ignore[arg-type]
    if stats is None:
        raise ValueError("whole-slide DAB statistics are not available yet")
    return threshold_value(stats, preset)


def stats_job(level: Any) -> DabStats:
    """Whole-slide DAB statistics of one (reduced) level."""
    return dab_statistics(level)


def preview_job(region: Any, preset: MaskPreset, threshold: float):
    """Coarse mask of a region; yields once after reading it, so a newer request can abort."""
    rgb = _as_numpy(region)
    yield None
    return coarse_mask(rgb, preset, threshold=threshold).astype(np.uint8)


def compute_job(
    level: Any,
    stats_source: Any,
    stats: DabStats | None,
    preset: MaskPreset,
    tile: int,
    halo: int,
):
    """Whole-level mask and DAB channel, tile by tile.

    Yields ``DabStats`` (when they had to be computed here) and ``Progress``; returns a dict with
    ``mask`` (uint8 0/1), ``dab`` (float32), ``threshold``, ``stats``, ``positive`` (fraction) and
    ``contrast_limits`` for the DAB layer.
    """
    if stats is None and preset.rule is not ThresholdRule.FIXED:
        yield Progress(0, 1, stage="statistics")
        stats = dab_statistics(stats_source)
        yield stats
    t = threshold_for(stats, preset)
    h, w = level.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    dab = np.zeros((h, w), np.float32)
    for ev in iter_coarse_masks(level, preset, threshold=t, tile=tile, halo=halo):
        if isinstance(ev, MaskTile):
            th, tw = ev.mask.shape
            mask[ev.y : ev.y + th, ev.x : ev.x + tw] = ev.mask
            core = _as_numpy(level[ev.y : ev.y + th, ev.x : ev.x + tw])
            dab[ev.y : ev.y + th, ev.x : ev.x + tw] = dab_channel(core)
        else:
            yield ev
    s = max(1, math.ceil(math.sqrt(h * w / 1_000_000)))
    hi = float(np.percentile(dab[::s, ::s], 99.5)) if dab.size else 0.0
    return {
        "mask": mask,
        "dab": dab,
        "threshold": t,
        "stats": stats,
        "positive": float(mask.mean()) if mask.size else 0.0,
        "contrast_limits": (0.0, max(hi, 2.0 * t, 1e-3)),
    }
