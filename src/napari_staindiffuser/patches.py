"""Paired training patches from an H&E / IHC image pair, with a registration check.

StainDiffuser (arXiv 2403.11340) trains on 256-px patches with >= 50% tissue from registered H&E
and IHC, with coarse positive-cell masks from the IHC. :func:`estimate_shift` measures the
translation between the two images' haematoxylin channels (phase correlation) and warns above a
tolerance; :func:`correct_shift` applies a pure translation to the IHC. :func:`iter_patch_pairs`
scans a grid of windows inside user regions, keeps those with enough H&E tissue and attaches the
IHC window and its coarse mask (one whole-slide DAB statistic for all patches: the paper's
mean + 2 std CD3 rule). Patches stay 256 px; training downsamples them to the model's size.

Sign convention: ``Registration.dy, dx`` is the shift to APPLY to the IHC so that it lands on the
H&E, as in :func:`scipy.ndimage.shift`: ``corrected[y, x] = ihc[y - dy, x - dx]``. IHC content
5 px lower and 3 px further left than in the H&E (``np.roll(ihc, (5, -3), axis=(0, 1))``) gives
``dy = -5, dx = +3``. Inputs may be numpy or dask (duck typed); patch extraction reads only the
windows it needs. numpy, scipy and scikit-image only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import window
from skimage.registration import phase_cross_correlation

from . import stain as _stain
from .events import Progress
from .pairs import InMemoryPairs, PairSample

__all__ = ["PatchSpec", "Registration", "correct_shift", "estimate_shift"]
__all__ += ["extract_patch_pairs", "haematoxylin_channel", "iter_patch_pairs"]


@dataclass(frozen=True)
class Registration:
    """Estimated translation between an H&E and an IHC image (see :func:`estimate_shift`).

    Attributes
    ----------
    dy, dx : float
        Shift (px) to apply to the IHC to align it with the H&E:
        ``correct_shift(ihc, reg)[y, x] == ihc[y - dy, x - dx]``. IHC content displaced by
        ``(+a, +b)`` relative to the H&E gives ``dy = -a, dx = -b``.
    error : float
        Normalised RMS error of :func:`skimage.registration.phase_cross_correlation` (0 = the
        same image up to the shift, near 1 = unrelated).
    magnitude_px, magnitude_um : float, float or None
        ``hypot(dy, dx)``, and that times ``mpp`` when the pixel size is known.
    threshold_px : float
        Tolerance in pixels.
    mpp : float or None
        µm per pixel of the estimate (for the µm figures of :meth:`message`).
    """

    dy: float
    dx: float
    error: float
    magnitude_px: float
    magnitude_um: float | None
    threshold_px: float
    mpp: float | None = None

    @property
    def ok(self) -> bool:
        """True when the offset is within the tolerance (``magnitude_px <= threshold_px``)."""
        return self.magnitude_px <= self.threshold_px

    def message(self) -> str:
        """One human sentence: the offset, the tolerance and what to do."""
        um, tol = "", f"{self.threshold_px:.1f} px"
        if self.mpp is not None:
            um = f" ({self.magnitude_px * self.mpp:.1f} µm)"
            tol += f" ({self.threshold_px * self.mpp:.1f} µm)"
        head = f"IHC is offset by {self.magnitude_px:.1f} px{um} from the H&E"
        move = f"shift the IHC by dy={self.dy:+.1f}, dx={self.dx:+.1f} px to align"
        if self.ok:
            return f"{head}: within the {tol} tolerance ({move})"
        return f"{head}: above the {tol} tolerance; correct the translation ({move}) or re-register"


def _materialise(a: Any) -> np.ndarray:
    return np.asarray(a.compute() if hasattr(a, "compute") else a)


def _check_pair(he: Any, ihc: Any, *, uint8: bool) -> tuple[int, int]:
    """Validate an (H, W, 3|4) pair of the same size; return (H, W)."""
    for name, a in (("H&E", he), ("IHC", ihc)):
        shape = tuple(getattr(a, "shape", ()))
        if len(shape) != 3 or shape[2] not in (3, 4):
            raise ValueError(f"{name}: expected an (H, W, 3) RGB image; got shape {shape}")
        if np.dtype(a.dtype) != np.uint8 and (uint8 or np.dtype(a.dtype).kind != "f"):
            raise ValueError(f"{name}: expected dtype uint8; got {a.dtype}")
    (h, w), (h2, w2) = he.shape[:2], ihc.shape[:2]
    if (h, w) != (h2, w2):
        raise ValueError(f"H&E and IHC must have the same size; got H&E {h}x{w} and IHC {h2}x{w2}")
    return int(h), int(w)


def _rgb(a: np.ndarray) -> np.ndarray:
    """Drop alpha by compositing over white (transparent = glass); keeps the dtype."""
    if a.shape[-1] != 4:
        return a
    top = 255.0 if a.dtype == np.uint8 else 1.0
    alpha = a[..., 3:].astype(np.float32) / top
    out = a[..., :3].astype(np.float32) * alpha + top * (1.0 - alpha)
    return np.rint(out).astype(np.uint8) if a.dtype == np.uint8 else out.astype(a.dtype)


def haematoxylin_channel(rgb: Any) -> np.ndarray:
    """Haematoxylin channel (0) of :func:`skimage.color.rgb2hed`, (H, W) float32.

    ``rgb`` is (H, W, 3|4), uint8 or float in [0, 1], numpy or dask; alpha is composited over
    white (transparent = glass).
    """
    a = _materialise(rgb)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image; got shape {a.shape}")
    return rgb2hed(_rgb(a))[..., 0].astype(np.float32)


def _haem_reduced(a: Any, f: int) -> np.ndarray:
    """Haematoxylin channel block-averaged by ``f`` (trailing rows/columns < f px dropped)."""
    h, w = int(a.shape[0]) // f * f, int(a.shape[1]) // f * f
    if hasattr(a, "map_blocks") and hasattr(a, "numblocks"):  # dask
        if a.numblocks[2] != 1:
            a = a.rechunk({2: -1})
        hd = a[:h, :w].map_blocks(haematoxylin_channel, drop_axis=2, dtype=np.float32)
        if f > 1:
            import dask.array as da  # only reached with a dask input

            hd = da.coarsen(np.mean, hd, {0: f, 1: f}, trim_excess=True)
        return np.asarray(hd.compute(), dtype=np.float32)
    out = np.empty((h // f, w // f), np.float32)
    band = f * max(1, (1 << 22) // max(w * f, 1))
    for y in range(0, h, band):
        hb = haematoxylin_channel(a[y : min(y + band, h), :w])
        out[y // f : (y + hb.shape[0]) // f] = hb.reshape(-1, f, w // f, f).mean(axis=(1, 3))
    return out


def estimate_shift(
    he: Any,
    ihc: Any,
    *,
    mpp: float | None = None,
    threshold_um: float = 2.0,
    threshold_px: float | None = None,
    max_side: int = 2048,
    upsample: int = 10,
) -> Registration:
    """Estimate the translation between the H&E and the IHC by phase correlation.

    Both haematoxylin channels (the IHC counterstain is haematoxylin too) are block-averaged by
    the smallest integer factor ``f`` that brings the longer side to ``<= max_side``, centred,
    multiplied by a Hann window (no wrap-around edge) and registered with
    :func:`skimage.registration.phase_cross_correlation` (``upsample_factor=upsample``,
    ``normalization=None``: the peak is carried by the tissue architecture rather than by
    single nuclei, and the error is informative). The shift is scaled back by ``f``; its
    resolution is ``f / upsample`` px.

    Parameters
    ----------
    he, ihc : array-like, (H, W, 3|4)
        numpy or dask (read once, chunk by chunk), uint8 or float in [0, 1], same (H, W).
    mpp : float, optional
        µm per pixel, for the µm figures and ``threshold_um``.
    threshold_um, threshold_px : float
        Tolerance: ``threshold_px`` if given, else ``threshold_um / mpp``, else 4 px.
    max_side : int
        Longest side (px) of the images the correlation runs on.
    upsample : int
        Subpixel refinement factor.

    Returns
    -------
    Registration
        ``dy, dx``: the shift to apply to the IHC (see :class:`Registration`).

    Raises
    ------
    ValueError
        Different sizes (both are named), wrong shape or dtype, or bad parameters.
    """
    h, w = _check_pair(he, ihc, uint8=False)
    mpp = None if mpp is None else float(mpp)
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp: expected a positive number of µm per pixel; got {mpp!r}")
    for name, v, lo in (("max_side", max_side, 16), ("upsample", upsample, 1)):
        if int(v) != v or v < lo:
            raise ValueError(f"{name}: expected an integer >= {lo}; got {v!r}")
    thr = 4.0 if mpp is None else threshold_um / mpp
    thr = float(thr if threshold_px is None else threshold_px)
    if not (math.isfinite(thr) and thr > 0):
        raise ValueError(f"threshold_px, threshold_um: expected positive numbers; got {thr!r} px")
    f = max(1, math.ceil(max(h, w) / int(max_side)))
    ref, mov = _haem_reduced(he, f), _haem_reduced(ihc, f)
    win = window("hann", ref.shape).astype(np.float32)
    ref, mov = (ref - ref.mean()) * win, (mov - mov.mean()) * win
    shift, error, _ = phase_cross_correlation(
        ref, mov, upsample_factor=int(upsample), normalization=None
    )
    dy, dx = float(shift[0]) * f, float(shift[1]) * f
    mag = math.hypot(dy, dx)
    return Registration(dy, dx, float(error), mag, None if mpp is None else mag * mpp, thr, mpp)


def _as_shift(reg: Registration | tuple[float, float]) -> tuple[float, float]:
    dy, dx = (reg.dy, reg.dx) if isinstance(reg, Registration) else reg
    dy, dx = float(dy), float(dx)
    if not (math.isfinite(dy) and math.isfinite(dx)):
        raise ValueError(f"shift: expected finite (dy, dx); got ({dy!r}, {dx!r})")
    return dy, dx


def correct_shift(
    ihc: Any, reg: Registration | tuple[float, float], *, fill: int = 255
) -> np.ndarray:
    """Translate the IHC by ``(dy, dx)``: ``out[y, x] = ihc[y - dy, x - dx]``.

    Integral shifts are exact (slicing). Subpixel shifts are bilinear
    (:func:`scipy.ndimage.shift`, ``order=1`` per channel, ``mode="grid-constant"``: the
    uncovered border blends into ``fill``), rounded back to the input dtype.

    Parameters
    ----------
    ihc : array-like, (H, W, C) or (H, W)
        numpy or dask (materialised).
    reg : Registration or (dy, dx)
        Shift to apply, e.g. from :func:`estimate_shift`.
    fill : int
        Value of uncovered pixels (255 = white glass).

    Returns
    -------
    ndarray, same shape and dtype as ``ihc``
    """
    a = _materialise(ihc)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W, C) or (H, W) image; got shape {a.shape}")
    dy, dx = _as_shift(reg)
    h, w = a.shape[:2]
    if dy == round(dy) and dx == round(dx):
        iy, ix = round(dy), round(dx)
        out = np.full_like(a, fill)
        if abs(iy) < h and abs(ix) < w:
            src = a[max(0, -iy) : h - max(0, iy), max(0, -ix) : w - max(0, ix)]
            out[max(0, iy) : h - max(0, -iy), max(0, ix) : w - max(0, -ix)] = src
        return out
    planes = np.atleast_3d(a)
    out = np.empty(planes.shape, np.float32)
    for c in range(planes.shape[2]):
        src = planes[..., c].astype(np.float32)
        out[..., c] = ndi.shift(src, (dy, dx), order=1, mode="grid-constant", cval=float(fill))
    if a.dtype.kind in "ui":
        out = np.clip(np.rint(out), np.iinfo(a.dtype).min, np.iinfo(a.dtype).max)
    return out.astype(a.dtype).reshape(a.shape)


@dataclass(frozen=True)
class PatchSpec:
    """How patches are cut.

    Attributes
    ----------
    patch, stride : int, int or None
        Patch side in px (the paper's 256) and grid step (None = ``patch``, no overlap).
    min_tissue : float
        Least tissue fraction of the H&E patch (:func:`stain.tissue_mask`), in [0, 1].
    max_patches, seed : int or None, int
        Keep at most ``max_patches`` qualifying patches: a random subset drawn with ``seed``.
    """

    patch: int = 256
    stride: int | None = None
    min_tissue: float = 0.5
    max_patches: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("patch", "stride", "max_patches"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise ValueError(f"{name}: expected an integer >= 1; got {v!r}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue: expected a value in [0, 1]; got {self.min_tissue!r}")


def _check_regions(regions: Sequence | None, h: int, w: int, p: int) -> list[tuple]:
    out = []
    for i, r in enumerate([(0, 0, h, w)] if regions is None else regions):
        if len(r) != 4:
            raise ValueError(f"region {i}: expected (y, x, h, w); got {tuple(r)!r}")
        y, x, rh, rw = (round(float(v)) for v in r)
        desc = f"region {i} (y={y}, x={x}, h={rh}, w={rw})"
        if y < 0 or x < 0 or y + rh > h or x + rw > w:
            raise ValueError(f"{desc} lies outside the {h}x{w} image")
        if rh < p or rw < p:
            raise ValueError(f"{desc} is smaller than one {p}x{p} patch (image {h}x{w})")
        out.append((y, x, rh, rw))
    return out


def _window(a: Any, y: int, x: int, p: int) -> np.ndarray:
    return _materialise(a[y : y + p, x : x + p])


def _shifted_window(ihc: Any, y: int, x: int, p: int, d: tuple[float, float]) -> np.ndarray:
    """``correct_shift(ihc, d)[y:y+p, x:x+p]``, reading only a margin around the window."""
    my, mx = math.ceil(abs(d[0])) + 1, math.ceil(abs(d[1])) + 1
    y0, y1, x0, x1 = max(y - my, 0), min(y + p + my, ihc.shape[0]), max(x - mx, 0), x + p + mx
    x1 = min(x1, ihc.shape[1])  # the window always overlaps the image: it contains the patch
    pad = ((y0 - y + my, y + p + my - y1), (x0 - x + mx, x + p + mx - x1), (0, 0))
    src = np.pad(_materialise(ihc[y0:y1, x0:x1]), pad, constant_values=255)
    return correct_shift(src, d, fill=255)[my : my + p, mx : mx + p]


def iter_patch_pairs(
    he: Any,
    ihc: Any,
    stain: str,
    *,
    regions: Sequence[tuple[int, int, int, int]] | None = None,
    spec: PatchSpec | None = None,
    preset: _stain.MaskPreset | str | None = None,
    masks: Any = None,
    stats: _stain.DabStats | None = None,
    mpp: float | None = None,
    shift: Registration | tuple[float, float] | None = None,
) -> Iterator[Progress | PairSample]:
    """Cut paired H&E / IHC patches with >= ``spec.min_tissue`` tissue and their masks.

    Candidates: the windows of a grid (step ``spec.stride``) inside each region, row-major,
    each position once. Kept when the tissue fraction of the H&E window
    (:func:`stain.tissue_mask`) is ``>= spec.min_tissue``. With ``spec.max_patches`` the
    candidates are visited in a random order drawn from ``spec.seed`` and the scan stops after
    ``max_patches`` kept: a uniformly random, deterministic subset, yielded in that order.

    Mask: the window of ``masks`` (nonzero = positive, H&E frame) used as is when given; else
    ``stain.coarse_mask(ihc_window, preset, stats=stats)`` with ``preset`` defaulting to
    ``stain.get_preset(stain)`` (``.at_mpp(mpp)`` when ``mpp`` is given) and ``stats`` to
    ``stain.dab_statistics(ihc)`` over the whole IHC, computed once, when first needed (the
    paper's whole-slide threshold). Dask inputs: only the windows are read, except by that
    default ``stats`` (pass ``stats``, e.g. from a reduced pyramid level, to avoid it).

    Parameters
    ----------
    he, ihc : array-like, (H, W, 3|4) uint8
        numpy or dask, same (H, W); alpha is composited over white.
    stain : str
        Name of the IHC stain, stored in each :class:`PairSample` as given.
    regions : sequence of (y, x, h, w), optional
        Rectangles in px (rounded to whole px); default the whole image.
    spec : PatchSpec, optional
        Patch size, stride, tissue threshold, subset; default ``PatchSpec()``.
    preset, masks, stats : MaskPreset or str, (H, W) bool or labels, DabStats; optional
    mpp : float, optional
        µm per pixel of the images, to rescale the preset's pixel sizes.
    shift : Registration or (dy, dx), optional
        Translation to apply to the IHC first (:func:`correct_shift` of a margin around each
        window: the same pixels as correcting the whole image; uncovered pixels white).

    Yields
    ------
    Progress or PairSample
        ``Progress(done, total, stage="patches")`` counts candidates examined (first 0, last
        ``done == total``); ``PairSample``: ``he``, ``ihc`` (p, p, 3) uint8, ``mask`` (p, p).

    Raises
    ------
    ValueError
        Different sizes, wrong shape or dtype, a region outside the image or smaller than a
        patch, masks of the wrong shape, an unknown stain without ``preset`` or ``masks``.
    """
    spec = spec or PatchSpec()
    (h, w), p = _check_pair(he, ihc, uint8=True), int(spec.patch)
    stride, rects = int(spec.stride or p), _check_regions(regions, h, w, p)
    if masks is not None and tuple(getattr(masks, "shape", ())) != (h, w):
        raise ValueError(f"masks: expected an (H, W) = ({h}, {w}) array; got {np.shape(masks)}")
    elif masks is None:
        preset = _stain.get_preset(stain if preset is None else preset)
        if mpp is not None:
            preset = preset.at_mpp(mpp)
    d = None if shift is None else _as_shift(shift)
    cands: dict[tuple[int, int], None] = {}
    for y0, x0, rh, rw in rects:
        for y in range(y0, y0 + rh - p + 1, stride):
            for x in range(x0, x0 + rw - p + 1, stride):
                cands[(y, x)] = None
    order = list(cands)
    if spec.max_patches is not None:
        perm = np.random.default_rng(int(spec.seed)).permutation(len(order))
        order = [order[i] for i in perm]
    total, kept, t0 = len(order), 0, time.perf_counter()
    yield Progress(0, total, stage="patches", eta_s=None)
    for done, (y, x) in enumerate(order, start=1):
        he_win = _rgb(_window(he, y, x, p))
        if _stain.tissue_mask(he_win).mean() >= spec.min_tissue:
            if d is None:
                ihc_win = _rgb(_window(ihc, y, x, p))
            else:
                ihc_win = _rgb(_shifted_window(ihc, y, x, p, d))
            if masks is not None:
                mask = _window(masks, y, x, p) != 0
            else:
                if stats is None and preset.rule is not _stain.ThresholdRule.FIXED:
                    stats = _stain.dab_statistics(ihc)
                mask = _stain.coarse_mask(ihc_win, preset, stats=stats)
            yield PairSample(he=he_win, ihc=ihc_win, stain=stain, mask=mask)
            kept += 1
        if spec.max_patches is not None and kept >= spec.max_patches:
            done = total  # the subset is complete: report the scan as finished
        yield Progress(done, total, "patches", (time.perf_counter() - t0) / done * (total - done))
        if done == total:
            return


def extract_patch_pairs(he: Any, ihc: Any, stain: str, **kwargs: Any) -> InMemoryPairs:
    """Drain :func:`iter_patch_pairs` (same keyword arguments) into an :class:`InMemoryPairs`.

    Raises
    ------
    ValueError
        No candidate qualifies (the message gives the threshold and the number of candidates),
        or any error of :func:`iter_patch_pairs`.
    """
    spec, regions = kwargs.get("spec") or PatchSpec(), kwargs.get("regions")
    samples, total = [], 0
    for ev in iter_patch_pairs(he, ihc, stain, **kwargs):
        if isinstance(ev, PairSample):
            samples.append(ev)
        else:
            total = ev.total
    size = f"{he.shape[0]}x{he.shape[1]}"
    if not samples:
        where = "the whole image" if regions is None else f"{len(regions)} region(s)"
        raise ValueError(
            f"no patch has >= {spec.min_tissue:.0%} tissue in the given regions ({total} "
            f"candidate {spec.patch}-px patches in {where} of a {size} image; tissue is "
            "detected on the H&E): choose regions with more tissue or lower "
            "PatchSpec.min_tissue"
        )
    desc = f"{len(samples)} {stain} patch pairs of {spec.patch} px from a {size} H&E/IHC pair"
    return InMemoryPairs(samples, description=desc)
