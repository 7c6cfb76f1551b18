"""Coarse positive-cell masks from brightfield IHC (haematoxylin counterstain + DAB).

StainDiffuser (arXiv 2403.11340) trains an auxiliary branch on coarse masks of the stained cells.
They are made as in the paper: the DAB channel by colour deconvolution (Ruifrok & Johnston,
:func:`skimage.color.rgb2hed`), a threshold, then morphological clean-up. For CD3 the threshold is
``mean + 2 * std`` of the DAB values over the whole slide, not per tile, so :func:`dab_statistics`
streams over a (reduced) slide level and :func:`iter_coarse_masks` applies one threshold to every
tile. See ``docs/masks.md`` for the presets, the threshold rules and numbers on a real image.

Units: "DAB" values are the third channel of :func:`skimage.color.rgb2hed`, i.e. the DAB optical
density divided by ``ln(1e6)`` (about 13.8), clipped at 0; they lie in ``[0, DAB_MAX]``.

Tiling guarantee (:func:`iter_coarse_masks`): with ``halo >= preset.required_halo`` (the default)
the stitched mask is bit-identical to :func:`coarse_mask` on the whole image with the same
threshold, for any tile size. With a smaller halo, holes and objects that reach a window edge
may be decided differently.

Pure numpy/scipy/scikit-image; dask arrays are used by duck typing (never imported).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb, rgb2hed
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from .events import Progress

#: Largest value :func:`dab_channel` can return (pure yellow, ``rgb = (1, 1, 0)``).
DAB_MAX = float(np.clip(hed_from_rgb[:, 2], 0, None).sum())
#: Fixed bins of the streamed DAB histogram over ``[0, DAB_MAX]`` (bin width ~3.8e-4).
HIST_BINS = 4096
#: Default tissue criterion: mean optical density over R, G, B (``-ln(I / 255)``) above this.
#: 0.1 is a geometric-mean intensity below ~231 of 255; glass is typically 235-250.
TISSUE_OD_THRESHOLD = 0.1

_FG_STRUCT = np.ones((3, 3), dtype=bool)  # objects (foreground): 8-connected
_BG_STRUCT = ndi.generate_binary_structure(2, 1)  # holes (background): 4-connected


class ThresholdRule(str, enum.Enum):
    """How the DAB threshold is chosen (see :func:`threshold_value`)."""

    MEAN_STD = "mean+2std"  #: ``mean + k_std * std`` of the (whole-slide) DAB values
    OTSU = "otsu"  #: Otsu's threshold of the (whole-slide) DAB histogram
    FIXED = "fixed"  #: ``MaskPreset.fixed_threshold``, in rgb2hed DAB units


@dataclass(frozen=True)
class MaskPreset:
    """Threshold rule and clean-up for one stain.

    Clean-up order (:func:`clean_mask`): closing, hole filling, opening, small-object removal.
    Objects are 8-connected, holes 4-connected. Sizes are in pixels at ``mpp`` micrometres per
    pixel; :meth:`at_mpp` rescales them for another resolution.

    Attributes
    ----------
    name : str
        Stain name, e.g. ``"CD3"``.
    rule : ThresholdRule
        Threshold rule (a plain string such as ``"otsu"`` is converted).
    k_std : float
        ``k`` in ``mean + k * std`` for ``ThresholdRule.MEAN_STD``.
    fixed_threshold : float or None
        DAB threshold for ``ThresholdRule.FIXED`` (required there, ignored otherwise).
    closing_radius : int
        Disk radius (px) of the binary closing; joins membrane rims into cells. 0 = none.
    fill_holes : bool
        Fill enclosed background components (holes) of area <= ``max_hole_size``.
    max_hole_size : int or None
        Largest hole area (px) that is filled. Holes touching the image border are never filled.
        None fills holes of any size (exact only untiled; see ``required_halo``).
    opening_radius : int
        Disk radius (px) of the binary opening; removes specks and thin strands. 0 = none.
    min_object_size : int
        Objects with area (px) below this are removed. 0 or 1 = none.
    mpp : float
        Resolution (micrometres per pixel) the pixel sizes refer to.
    description : str
        One line for the GUI.
    """

    name: str
    rule: ThresholdRule
    k_std: float = 2.0
    fixed_threshold: float | None = None
    opening_radius: int = 1
    closing_radius: int = 1
    fill_holes: bool = True
    max_hole_size: int | None = 64
    min_object_size: int = 20
    mpp: float = 0.5
    description: str = ""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "rule", ThresholdRule(self.rule))
        except ValueError:
            known = [r.value for r in ThresholdRule]
            raise ValueError(f"rule: expected one of {known}; got {self.rule!r}") from None
        if self.rule is ThresholdRule.FIXED and self.fixed_threshold is None:
            raise ValueError("rule 'fixed' needs fixed_threshold (a float); got None")
        if not math.isfinite(self.k_std):
            raise ValueError(f"k_std: expected a finite float; got {self.k_std!r}")
        for field in ("opening_radius", "closing_radius", "min_object_size", "max_hole_size"):
            v = getattr(self, field)
            if (v is not None or field != "max_hole_size") and (int(v) != v or v < 0):
                raise ValueError(f"{field}: expected an integer >= 0; got {v!r}")
        if not self.mpp > 0:
            raise ValueError(f"mpp: expected a positive float; got {self.mpp!r}")

    @property
    def required_halo(self) -> int | None:
        """Smallest halo (px) for which tiled masks equal the untiled mask bit for bit.

        ``2 * closing_radius + max_hole_size + 2 * opening_radius + (min_object_size - 1)``
        (terms of disabled steps are 0): each step widens by its reach the band along a window
        edge that may differ from the untiled result; a hole (4-connected) or object
        (8-connected) of area ``a`` spans at most ``a - 1`` pixels. None when holes of any size
        are filled (``max_hole_size=None``), which no finite halo reproduces.
        """
        holes = 0
        if self.fill_holes:
            if self.max_hole_size is None:
                return None
            holes = int(self.max_hole_size)
        objects = max(int(self.min_object_size) - 1, 0)
        return 2 * int(self.closing_radius) + holes + 2 * int(self.opening_radius) + objects

    def at_mpp(self, mpp: float) -> MaskPreset:
        """The same preset for images at ``mpp`` micrometres per pixel.

        Radii scale with ``self.mpp / mpp`` and areas with its square (rounded).
        """
        if not mpp > 0:
            raise ValueError(f"mpp: expected a positive float; got {mpp!r}")
        f = self.mpp / mpp
        hole = None if self.max_hole_size is None else round(self.max_hole_size * f * f)
        return replace(
            self,
            opening_radius=round(self.opening_radius * f),
            closing_radius=round(self.closing_radius * f),
            max_hole_size=hole,
            min_object_size=round(self.min_object_size * f * f),
            mpp=float(mpp),
        )


PRESETS: dict[str, MaskPreset] = {
    "CD3": MaskPreset(
        name="CD3",
        rule=ThresholdRule.MEAN_STD,
        k_std=2.0,
        closing_radius=2,
        fill_holes=True,
        max_hole_size=150,  # interior of a ~7 um lymphocyte at 0.5 um/px
        opening_radius=1,
        min_object_size=30,  # ~3 um disk: smaller fragments are noise
        description="T cells: whole-slide mean+2std, rims closed into filled small cells",
    ),
    "CK8/18": MaskPreset(
        name="CK8/18",
        rule=ThresholdRule.OTSU,
        closing_radius=2,
        fill_holes=True,
        max_hole_size=200,  # DAB-negative nuclei inside the stained cytoplasm
        opening_radius=2,
        min_object_size=150,  # epithelial areas are large; drop isolated specks
        description="Epithelium: whole-slide Otsu, nuclei filled, large areas only",
    ),
}


def get_preset(stain: str) -> MaskPreset:
    """The preset for ``stain`` (case-insensitive, e.g. ``"CD3"``, ``"ck8/18"``).

    Raises
    ------
    ValueError
        Unknown stain; the message lists the known ones.
    """
    if isinstance(stain, MaskPreset):
        return stain
    for key, preset in PRESETS.items():
        if isinstance(stain, str) and key.lower() == stain.strip().lower():
            return preset
    raise ValueError(f"unknown stain {stain!r}: expected one of {sorted(PRESETS)}")


# --------------------------------------------------------------------------- input checks


def _check_rgb_meta(shape: tuple[int, ...], dtype: Any) -> None:
    if len(shape) != 3 or shape[-1] not in (3, 4):
        raise ValueError(
            f"expected an (H, W, 3) RGB or (H, W, 4) RGBA image; got shape {tuple(shape)}"
        )
    dt = np.dtype(dtype)
    if dt != np.uint8 and dt.kind != "f":
        raise ValueError(f"expected dtype uint8 (0..255) or float (0..1); got {dt}")


def _to_float_rgb(rgb: Any) -> np.ndarray:
    """Validate and convert to (H, W, 3) float64 in [0, 1]; RGBA is composited over white."""
    a = np.asarray(rgb)
    _check_rgb_meta(a.shape, a.dtype)
    if a.dtype == np.uint8:
        f = a.astype(np.float64) / 255.0
    else:
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ValueError("expected finite float RGB values in [0, 1]; got NaN or inf")
        if f.size and (f.min() < 0.0 or f.max() > 1.0):
            raise ValueError(
                f"expected float RGB values in [0, 1]; got range [{f.min():g}, {f.max():g}]"
                " (pass uint8 for 0..255 data)"
            )
    if f.shape[-1] == 4:  # transparent = glass (OpenSlide leaves unscanned areas transparent)
        alpha = f[..., 3:]
        f = f[..., :3] * alpha + (1.0 - alpha)
    return f


def dab_channel(rgb: np.ndarray) -> np.ndarray:
    """DAB optical density by colour deconvolution (:func:`skimage.color.rgb2hed`).

    Parameters
    ----------
    rgb : ndarray, (H, W, 3) or (H, W, 4)
        uint8 in 0..255 or float in [0, 1], finite. An alpha channel is composited over white
        (fully transparent pixels read as glass, DAB 0).

    Returns
    -------
    ndarray, (H, W) float32
        DAB channel of rgb2hed (optical density / ln(1e6)), in ``[0, DAB_MAX]``.

    Raises
    ------
    ValueError
        Wrong shape or dtype, non-finite or out-of-range floats (message: expected vs got).
    """
    return rgb2hed(_to_float_rgb(rgb))[..., 2].astype(np.float32)


def _tissue_pixels(f: np.ndarray, od_threshold: float) -> np.ndarray:
    """Pixelwise tissue criterion on float RGB in [0, 1]: mean OD over channels > threshold."""
    od = -np.log(np.maximum(f, 1.0 / 255.0))
    return od.mean(axis=-1) > od_threshold


def tissue_mask(
    rgb: np.ndarray,
    *,
    od_threshold: float = TISSUE_OD_THRESHOLD,
    min_size: int = 256,
    max_hole_size: int = 1024,
    closing_radius: int = 2,
) -> np.ndarray:
    """Tissue versus glass.

    A pixel is tissue when its mean optical density over R, G, B (``-ln(max(I, 1/255))`` with
    ``I`` in [0, 1]) exceeds ``od_threshold``; then closing (disk ``closing_radius``), holes of
    area <= ``max_hole_size`` filled, and objects below ``min_size`` px removed. With
    ``min_size=0, max_hole_size=0, closing_radius=0`` it is the pixelwise criterion that
    :func:`dab_statistics` uses.

    Parameters
    ----------
    rgb : ndarray, (H, W, 3|4) uint8 or float in [0, 1]
    od_threshold : float
        Mean-OD threshold (default 0.1, geometric-mean intensity below ~231/255).
    min_size, max_hole_size, closing_radius : int
        Clean-up in pixels; 0 disables a step.

    Returns
    -------
    ndarray, (H, W) bool
    """
    m = _tissue_pixels(_to_float_rgb(rgb), od_threshold)
    m = _closing(m, closing_radius)
    if max_hole_size > 0:
        m = _fill_holes(m, max_hole_size)
    if min_size > 1:
        m = _remove_small(m, min_size)
    return m


#: below this tissue fraction a region counts as empty (staining it is refused)
MIN_TISSUE_FRACTION = 0.005
#: regions with a side under this many pixels are refused (a cell is ~8 px at 1 µm/px)
MIN_REGION_PX = 16


def check_region_size(box: tuple[int, int, int, int], what: str = "stain") -> None:
    """A ValueError when ``box`` = (y, x, h, w) has a side under :data:`MIN_REGION_PX`."""
    h, w = box[2], box[3]
    if min(h, w) < MIN_REGION_PX:
        raise ValueError(
            f"region of {h} x {w} px is too small to {what}: expected at least {MIN_REGION_PX} "
            "px a side"
        )


def tissue_fraction(image, box: tuple[int, int, int, int], max_pixels: int = 1_000_000) -> float:
    """Fraction of ``box`` = (y, x, h, w) of ``image`` (numpy, dask or zarr RGB) that is tissue.

    Reads the box with a stride so at most about ``max_pixels`` pixels are looked at.
    """
    y, x, h, w = box
    step = max(1, int(np.sqrt(h * w / max_pixels)))
    view = image[y : y + h : step, x : x + w : step]
    view = np.asarray(view.compute() if hasattr(view, "compute") else view)
    return float(tissue_mask(view).mean()) if view.size else 0.0


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class DabStats:
    """Statistics of the DAB values (rgb2hed units) of a slide.

    Attributes
    ----------
    mean, std : float
        Mean and population standard deviation (ddof 0), float64 streaming sums.
    otsu : float
        Otsu's threshold of the histogram (``HIST_BINS`` bins over ``[0, DAB_MAX]``): a bin
        centre, as :func:`skimage.filters.threshold_otsu` returns.
    n : int
        Number of pixels used (NaN statistics when 0).
    """

    mean: float
    std: float
    otsu: float
    n: int


def _is_dask(a: Any) -> bool:
    return hasattr(a, "blocks") and hasattr(a, "chunks") and hasattr(a, "compute")


def _materialise(a: Any) -> np.ndarray:
    return np.asarray(a.compute() if hasattr(a, "compute") else a)


def _iter_blocks(arr: Any, max_pixels: int = 1 << 20) -> Iterator[np.ndarray]:
    """Numpy blocks covering ``arr`` once: dask chunks, otherwise bands of rows."""
    if _is_dask(arr):
        if arr.numblocks[2] != 1:
            arr = arr.rechunk({2: -1})
        for i in range(arr.numblocks[0]):
            for j in range(arr.numblocks[1]):
                yield _materialise(arr.blocks[i, j])
    else:
        h, w = arr.shape[:2]
        band = max(1, max_pixels // max(w, 1))
        for y in range(0, h, band):
            yield _materialise(arr[y : y + band])


def dab_statistics(
    rgb_or_dask: Any,
    *,
    tissue_only: bool = True,
    max_pixels: int = 4_000_000,
    od_threshold: float = TISSUE_OD_THRESHOLD,
) -> DabStats:
    """Whole-slide statistics of the DAB channel, in bounded memory.

    Parameters
    ----------
    rgb_or_dask : array-like, (H, W, 3|4) uint8 or float in [0, 1]
        numpy, dask (any chunking) or another sliceable array, e.g. a reduced pyramid level.
        Dask is processed chunk by chunk, anything else in bands of rows.
    tissue_only : bool
        Use only tissue pixels (the pixelwise :func:`tissue_mask` criterion, no clean-up, so
        the result does not depend on the chunking); glass would pull mean and std down.
    max_pixels : int
        If ``H * W`` is larger, every ``s``-th row and column is used with
        ``s = ceil(sqrt(H * W / max_pixels))`` (strided sampling keeps the per-pixel
        distribution; averaging would shrink the std).
    od_threshold : float
        Tissue criterion, as in :func:`tissue_mask`.

    Returns
    -------
    DabStats
        Mean/std from float64 per-block (count, mean, M2) merged exactly (Chan et al.), Otsu
        from a streamed histogram of ``HIST_BINS`` fixed bins over ``[0, DAB_MAX]``.
    """
    shape = tuple(rgb_or_dask.shape)
    _check_rgb_meta(shape, rgb_or_dask.dtype)
    arr = rgb_or_dask
    if shape[0] * shape[1] > max_pixels:
        s = math.ceil(math.sqrt(shape[0] * shape[1] / max_pixels))
        arr = arr[::s, ::s]
    n, mean, m2 = 0, 0.0, 0.0
    hist = np.zeros(HIST_BINS, dtype=np.int64)
    for block in _iter_blocks(arr):
        f = _to_float_rgb(block)
        v = rgb2hed(f)[..., 2]
        if tissue_only:
            v = v[_tissue_pixels(f, od_threshold)]
        v = v.ravel()
        if v.size == 0:
            continue
        nb, mb = v.size, float(v.mean())
        m2b = float(np.square(v - mb).sum())
        tot = n + nb
        delta = mb - mean
        mean += delta * nb / tot
        m2 += m2b + delta * delta * n * nb / tot
        n = tot
        hist += np.histogram(v, bins=HIST_BINS, range=(0.0, DAB_MAX))[0]
    if n == 0:
        return DabStats(mean=math.nan, std=math.nan, otsu=math.nan, n=0)
    edges = np.linspace(0.0, DAB_MAX, HIST_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    nonzero = np.flatnonzero(hist)
    if nonzero.size == 1:
        otsu = float(centres[nonzero[0]])
    else:
        otsu = float(threshold_otsu(hist=(hist, centres)))
    return DabStats(mean=mean, std=math.sqrt(m2 / n), otsu=otsu, n=n)


def threshold_value(stats: DabStats, preset: MaskPreset | str) -> float:
    """The DAB threshold of ``preset`` for ``stats`` (pixels with DAB > threshold are positive).

    Raises
    ------
    ValueError
        The rule needs statistics but ``stats.n == 0`` (no tissue).
    """
    preset = get_preset(preset)
    if preset.rule is ThresholdRule.FIXED:
        return float(preset.fixed_threshold)  # type: ignore[arg-type]
    if stats.n == 0:
        raise ValueError(
            "no tissue pixels to compute a threshold from: expected stats with n > 0; got n=0"
            " (pass whole-slide stats= or threshold=)"
        )
    if preset.rule is ThresholdRule.MEAN_STD:
        return float(stats.mean + preset.k_std * stats.std)
    return float(stats.otsu)


# --------------------------------------------------------------------------- morphology


def _closing(m: np.ndarray, r: int) -> np.ndarray:
    # dilation with outside = 0, erosion with outside = 1: the image border does not erode
    if r <= 0:
        return m
    fp = disk(r).astype(bool)
    d = ndi.binary_dilation(m, structure=fp, border_value=0)
    return ndi.binary_erosion(d, structure=fp, border_value=1)


def _opening(m: np.ndarray, r: int) -> np.ndarray:
    if r <= 0:
        return m
    fp = disk(r).astype(bool)
    e = ndi.binary_erosion(m, structure=fp, border_value=1)
    return ndi.binary_dilation(e, structure=fp, border_value=0)


def _fill_holes(m: np.ndarray, max_size: int | None) -> np.ndarray:
    """Fill 4-connected background components not touching the border, area <= max_size."""
    lab, n = ndi.label(~m, structure=_BG_STRUCT)
    if n == 0:
        return m
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    fill = np.ones(n + 1, dtype=bool) if max_size is None else sizes <= max_size
    fill[0] = False
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    fill[border] = False
    return m | fill[lab]


def _remove_small(m: np.ndarray, min_size: int) -> np.ndarray:
    """Remove 8-connected objects with area < min_size."""
    lab, n = ndi.label(m, structure=_FG_STRUCT)
    if n == 0:
        return m
    keep = np.bincount(lab.ravel(), minlength=n + 1) >= min_size
    keep[0] = False
    return keep[lab]


def clean_mask(mask: np.ndarray, preset: MaskPreset | str) -> np.ndarray:
    """Morphological clean-up of a thresholded mask.

    Closing (disk ``closing_radius``), hole filling (4-connected holes of area <=
    ``max_hole_size`` not touching the border), opening (disk ``opening_radius``), removal of
    8-connected objects smaller than ``min_object_size``. At the image border, erosions treat
    the outside as foreground and dilations as background, so objects are not eaten from the
    border.

    Parameters
    ----------
    mask : ndarray, (H, W) bool
    preset : MaskPreset or str

    Returns
    -------
    ndarray, (H, W) bool
    """
    preset = get_preset(preset)
    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype != bool:
        raise ValueError(f"expected an (H, W) bool mask; got shape {m.shape} dtype {m.dtype}")
    m = _closing(m, int(preset.closing_radius))
    if preset.fill_holes and (preset.max_hole_size is None or preset.max_hole_size > 0):
        m = _fill_holes(m, preset.max_hole_size)
    m = _opening(m, int(preset.opening_radius))
    if preset.min_object_size > 1:
        m = _remove_small(m, int(preset.min_object_size))
    return m


def _resolve_threshold(
    rgb: Any, preset: MaskPreset, threshold: float | None, stats: DabStats | None
) -> float:
    if threshold is not None:
        t = float(threshold)
        if not math.isfinite(t):
            raise ValueError(f"threshold: expected a finite float; got {threshold!r}")
        return t
    if preset.rule is ThresholdRule.FIXED:
        return float(preset.fixed_threshold)  # type: ignore[arg-type]
    return threshold_value(dab_statistics(rgb) if stats is None else stats, preset)


def coarse_mask(
    rgb: np.ndarray,
    preset: MaskPreset | str,
    *,
    threshold: float | None = None,
    stats: DabStats | None = None,
) -> np.ndarray:
    """Coarse positive-cell mask: ``dab_channel(rgb) > threshold``, then :func:`clean_mask`.

    Parameters
    ----------
    rgb : ndarray, (H, W, 3|4) uint8 or float in [0, 1]
    preset : MaskPreset or str
    threshold : float, optional
        Explicit DAB threshold (rgb2hed units); wins over ``stats``.
    stats : DabStats, optional
        Whole-slide statistics; without either, this image's own :func:`dab_statistics`.

    Returns
    -------
    ndarray, (H, W) bool

    Raises
    ------
    ValueError
        Bad input (see :func:`dab_channel`), or no tissue to take statistics from.
    """
    preset = get_preset(preset)
    rgb = _materialise(rgb)
    t = _resolve_threshold(rgb, preset, threshold, stats)
    return clean_mask(dab_channel(rgb) > t, preset)


# --------------------------------------------------------------------------- tiling


@dataclass(frozen=True)
class MaskTile:
    """Core of one tile of a whole-slide mask: ``mask`` belongs at ``[y:y+h, x:x+w]``.

    Attributes
    ----------
    y, x : int
        Top-left corner in the full image.
    mask : ndarray, (h, w) bool
    """

    y: int
    x: int
    mask: np.ndarray


def iter_coarse_masks(
    rgb_dask_or_numpy: Any,
    preset: MaskPreset | str,
    *,
    stats: DabStats | None = None,
    tile: int = 1024,
    halo: int | None = None,
    threshold: float | None = None,
    stats_from: Any = None,
) -> Iterator[Progress | MaskTile]:
    """Whole-slide coarse mask, tile by tile in bounded memory.

    One threshold for all tiles: ``threshold``, else from ``stats``, else from
    :func:`dab_statistics` of ``stats_from`` (e.g. a reduced pyramid level), else of the input
    itself (strided to ``max_pixels``). Each tile is read with ``halo`` pixels of context on
    every side (clipped at the image border), masked and cleaned, and its core yielded.

    Guarantee: with ``halo >= preset.required_halo`` (the default) the stitched cores equal
    ``coarse_mask(rgb, preset, threshold=t)`` bit for bit, whatever the tile size. With a
    smaller halo, holes and objects that reach a window edge may be decided differently
    (``2 * (closing_radius + opening_radius)`` suffices when neither step is enabled).

    Parameters
    ----------
    rgb_dask_or_numpy : array-like, (H, W, 3|4) uint8 or float in [0, 1]
    preset : MaskPreset or str
    stats : DabStats, optional
    tile : int
        Core tile size (px); the last row/column of tiles may be smaller.
    halo : int, optional
        Context (px) per side; default ``preset.required_halo``. Required when the preset fills
        holes of any size (``max_hole_size=None``).
    threshold : float, optional
        Explicit threshold; wins over ``stats``.
    stats_from : array-like, optional
        Array to compute the whole-slide statistics on when ``stats`` is not given.

    Yields
    ------
    Progress
        ``Progress(done, total, stage="masks", eta_s)``, once before the first tile and after
        each tile.
    MaskTile
        Core of each tile, row-major, before its Progress.
    """
    preset = get_preset(preset)
    arr = rgb_dask_or_numpy
    shape = tuple(arr.shape)
    _check_rgb_meta(shape, arr.dtype)
    if int(tile) != tile or tile < 1:
        raise ValueError(f"tile: expected an integer >= 1; got {tile!r}")
    if halo is None:
        halo = preset.required_halo
        if halo is None:
            raise ValueError(
                f"preset {preset.name!r} fills holes of any size (max_hole_size=None), which "
                "tiles cannot reproduce: expected an explicit halo= or a finite max_hole_size"
            )
    if int(halo) != halo or halo < 0:
        raise ValueError(f"halo: expected an integer >= 0; got {halo!r}")
    tile, halo = int(tile), int(halo)
    if threshold is None and stats is None and preset.rule is not ThresholdRule.FIXED:
        stats = dab_statistics(arr if stats_from is None else stats_from)
    t = _resolve_threshold(None, preset, threshold, stats)

    h, w = shape[:2]
    ys, xs = range(0, h, tile), range(0, w, tile)
    total = len(ys) * len(xs)
    yield Progress(0, total, stage="masks", eta_s=None)
    t0, done = time.perf_counter(), 0
    for y in ys:
        for x in xs:
            y1, x1 = min(y + tile, h), min(x + tile, w)
            wy0, wx0 = max(0, y - halo), max(0, x - halo)
            wy1, wx1 = min(h, y1 + halo), min(w, x1 + halo)
            window = _materialise(arr[wy0:wy1, wx0:wx1])
            m = clean_mask(dab_channel(window) > t, preset)
            yield MaskTile(y, x, m[y - wy0 : y1 - wy0, x - wx0 : x1 - wx0].copy())
            done += 1
            elapsed = time.perf_counter() - t0
            yield Progress(done, total, stage="masks", eta_s=elapsed / done * (total - done))


def compute_coarse_mask(rgb: Any, preset: MaskPreset | str, **kw: Any) -> np.ndarray:
    """Drain :func:`iter_coarse_masks` into one (H, W) bool array (small images, tests)."""
    out = np.zeros(tuple(rgb.shape[:2]), dtype=bool)
    for ev in iter_coarse_masks(rgb, preset, **kw):
        if isinstance(ev, MaskTile):
            out[ev.y : ev.y + ev.mask.shape[0], ev.x : ev.x + ev.mask.shape[1]] = ev.mask
    return out


# --------------------------------------------------------------------------- distance targets


def distance_target(mask: np.ndarray, max_distance: float = 8.0) -> np.ndarray:
    """Signed, clipped distance map for training the auxiliary branch.

    ``-1`` on background; ``2 * min(edt, D) / D - 1`` inside objects, where ``edt`` is the
    Euclidean distance to the nearest background pixel of the same image
    (:func:`scipy.ndimage.distance_transform_edt`; the image border is not background) and
    ``D = max_distance``. Object pixels have ``edt >= 1``, so they are ``>= 2 / D - 1``. An
    image without background is ``1`` everywhere.

    Parameters
    ----------
    mask : ndarray, (H, W) or (N, H, W), bool or integer (non-zero = object)
    max_distance : float
        Clip distance ``D`` in pixels, ``>= 1``.

    Returns
    -------
    ndarray, same shape, float32 in [-1, 1]
    """
    m = np.asarray(mask)
    if m.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (N, H, W) mask; got shape {m.shape}")
    if m.dtype != bool and m.dtype.kind not in "iu":
        raise ValueError(f"expected a bool or integer mask; got dtype {m.dtype}")
    if not (math.isfinite(max_distance) and max_distance >= 1.0):
        raise ValueError(f"max_distance: expected a finite float >= 1; got {max_distance!r}")
    m = m.astype(bool)
    batch = m if m.ndim == 3 else m[None]
    out = np.empty(batch.shape, dtype=np.float32)
    for i, mi in enumerate(batch):
        if mi.all():
            out[i] = 1.0
            continue
        edt = ndi.distance_transform_edt(mi)
        out[i] = 2.0 * np.minimum(edt, max_distance) / max_distance - 1.0
    return out if m.ndim == 3 else out[0]


def distance_to_mask(target: np.ndarray, max_distance: float = 8.0) -> np.ndarray:
    """Inverse of :func:`distance_target`: pixels whose decoded distance is >= 0.5 px.

    The decoded distance is ``(target + 1) * D / 2``, so the cut is ``target >= 1 / D - 1``,
    midway between background (-1) and object edge pixels (``2 / D - 1``). Contract:
    ``distance_to_mask(distance_target(m, D), D) == m`` exactly for every mask ``m`` (single
    pixels included) and every ``D >= 1``. NaN decodes to background.

    Parameters
    ----------
    target : ndarray, (H, W) or (N, H, W) float (e.g. the model's prediction)
    max_distance : float
        The ``D`` used for the target, ``>= 1``.

    Returns
    -------
    ndarray, same shape, bool
    """
    t = np.asarray(target)
    if t.ndim not in (2, 3) or t.dtype.kind != "f":
        raise ValueError(
            f"expected an (H, W) or (N, H, W) float array; got shape {t.shape} dtype {t.dtype}"
        )
    if not (math.isfinite(max_distance) and max_distance >= 1.0):
        raise ValueError(f"max_distance: expected a finite float >= 1; got {max_distance!r}")
    return (t.astype(np.float64) + 1.0) * (max_distance / 2.0) >= 0.5
