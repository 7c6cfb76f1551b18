"""Output assembly for :func:`inference.iter_stain` (and ``cluster.iter_stain_distributed``).

The tiling's ``Stitcher`` hands over stitched rows on the model's working grid, in order; the
:class:`_Assembler` resamples them, band by band, onto the input's pixel grid (as
``skimage.transform.resize`` would, see :class:`_Axis`) and writes them to a sink: the arrays of
an in-memory result (:class:`_MemoryOutputs`) or the temporary files of a run streamed to disk
(``ome_tiff.StreamedStainOutputs``). Only the rows still needed are kept, so memory does not
grow with the region. Masks of stains without an auxiliary branch need the whole virtual IHC and
are made at the end (:func:`_dab_masks`).

No torch, no napari, no Qt (scipy and ``stain`` are imported when needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Geometry:
    """A region of the input (y, x, h, w in input px), its working size (model px) and the
    output µm/px (the input's, else the model's)."""

    ry: int
    rx: int
    rh: int
    rw: int
    wh: int
    ww: int
    out_mpp: float

    @property
    def sy(self) -> float:  # exact input px per working px along y
        return self.rh / self.wh

    @property
    def sx(self) -> float:
        return self.rw / self.ww


class _Axis:
    """Resampling of one axis from ``n_in`` working pixels to ``n_out`` input pixels, as
    ``skimage.transform.resize`` does it (pixel centres aligned, ``grid_mode``): Gaussian
    anti-aliasing with sigma ``max(0, (n_in / n_out - 1) / 2)`` (mirror mode, truncated at
    4 sigma, radius ``r``), then linear interpolation between ``j0`` and ``j1`` (mirrored into
    the axis) with weights ``w0, w1``; nearest neighbour ``jn`` for masks. Every index and weight
    comes from the global pixel position, so a band of output pixels is computed the same way
    whatever band it is in."""

    def __init__(self, n_in: int, n_out: int):
        f = n_in / n_out
        self.sigma = max(0.0, (f - 1) / 2)
        self.r = int(4.0 * self.sigma + 0.5) if self.sigma > 0 else 0  # scipy's kernel radius
        i = np.arange(n_out, dtype=np.float64)
        c = (i + 0.5) * f - 0.5
        j0 = np.floor(c)
        t = c - j0
        j = j0.astype(np.int64)
        self.j0, self.j1 = self._mirror(j, n_in), self._mirror(j + 1, n_in)
        self.w0, self.w1 = (1.0 - t).astype(np.float32), t.astype(np.float32)
        self.jn = np.clip(np.floor((i + 0.5) * f).astype(np.int64), 0, n_in - 1)
        lo = np.minimum(np.minimum(self.j0, self.j1), self.jn)
        hi = np.maximum(np.maximum(self.j0, self.j1), self.jn)
        self.hi_cummax = np.maximum.accumulate(hi)  # output i is ready once rows <= this exist
        self.lo_sufmin = np.minimum.accumulate(lo[::-1])[::-1]  # rows outputs >= i still need

    @staticmethod
    def _mirror(j: np.ndarray, n: int) -> np.ndarray:
        if n == 1:
            return np.zeros_like(j)
        p = 2 * (n - 1)
        j = np.abs(j) % p
        return np.where(j >= n, p - j, j)

    def blur(self, a: np.ndarray, axis: int) -> np.ndarray:
        if self.r == 0:
            return a
        from scipy import ndimage

        return ndimage.gaussian_filter1d(a, self.sigma, axis=axis, mode="mirror", truncate=4.0)


class _Assembler:
    """The Stitcher's ``out``: takes the stitched working-grid rows (``self[y0:y1] = rows``, in
    order, as the Stitcher flushes them) and turns them, band by band, into the outputs on the
    input's pixel grid, handed to ``sink.write(kind, stain, y0, rows)`` with kind "image"
    (uint8 RGB), "mask" (bool), "score" (float32) or "uncertainty" (float32 std).

    Working grid == input grid: the rows pass straight through. Otherwise float channels are
    resampled as by ``skimage.transform.resize`` (order 1, anti-aliased; see :class:`_Axis`)
    and masks are ``decode_mask`` of the working-grid score, then nearest neighbour. Only the
    rows still needed are kept (a band plus the blur and interpolation reach), so memory does
    not grow with the region, and the numbers do not depend on the band sizes. Masks of
    ``dab_stains`` (no auxiliary branch) need the whole virtual IHC: the caller makes them
    afterwards (:func:`_dab_masks`). ``decode_mask`` must be pixelwise.
    """

    CHUNK = 16  #: rows resampled at a time

    def __init__(self, model, stains: list[str], geo: _Geometry, samples: int, sink):
        n = len(stains)
        self.shape = (geo.wh, geo.ww, n * (4 + (1 if samples > 1 else 0)))
        self.stains, self.samples, self.sink, self.model = stains, samples, sink, model
        self.dab_stains: frozenset[str] = frozenset()  # set by the caller before rows arrive
        self._same = (geo.wh, geo.ww) == (geo.rh, geo.rw)
        self._got = 0  # working rows received
        if not self._same:
            self._ay, self._ax = _Axis(geo.wh, geo.rh), _Axis(geo.ww, geo.rw)
            self._raw = np.zeros((0, geo.ww, self.shape[2]), np.float32)  # working rows
            self._raw0 = 0  # working row of self._raw[0]
            self._filt = np.zeros((0, geo.rw, self.shape[2]), np.float32)  # blurred, x-resampled
            self._filt0 = 0
            self._f1 = 0  # blurred working rows done
            self._o1 = 0  # output rows done

    def __setitem__(self, key: slice, rows: np.ndarray) -> None:
        y0, y1 = key.start, key.stop
        if y0 != self._got or y1 - y0 != len(rows):
            raise ValueError(f"internal error: rows {y0}:{y1} out of order (next: {self._got})")
        for c in range(0, len(rows), self.CHUNK):  # a few rows at a time: small buffers
            piece = rows[c : c + self.CHUNK]
            self._got = y0 + c + len(piece)
            if self._same:
                self._emit(y0 + c, piece, piece)
            else:
                self._raw = np.concatenate([self._raw, piece])
                self._advance()

    def close(self) -> None:
        """Check that every working row arrived (all output rows are then written)."""
        if self._got != self.shape[0]:
            raise ValueError(f"internal error: {self._got} of {self.shape[0]} rows stitched")

    def _advance(self) -> None:
        ay, ax, wh, r = self._ay, self._ax, self.shape[0], self._ay.r
        # 1. blur (y then x) the working rows whose blur reach has arrived; resample along x
        f2 = wh if self._got == wh else max(self._f1, self._got - r)
        if f2 > self._f1:
            s0 = max(0, self._f1 - r)  # the slab: the rows [f1, f2) and their reach
            slab = self._raw[s0 - self._raw0 : min(wh, f2 + r) - self._raw0]
            b = ax.blur(ay.blur(slab, 0)[self._f1 - s0 : f2 - s0], 1)
            b = b[:, ax.j0] * ax.w0[:, None] + b[:, ax.j1] * ax.w1[:, None]
            self._filt = np.concatenate([self._filt, b])
            self._f1 = f2
        # 2. output rows whose interpolation rows are all blurred
        o2 = int(np.searchsorted(ay.hi_cummax, self._f1, side="left"))
        if o2 > self._o1:
            i = slice(self._o1, o2)
            j0, j1 = ay.j0[i] - self._filt0, ay.j1[i] - self._filt0
            out = self._filt[j0] * ay.w0[i, None, None] + self._filt[j1] * ay.w1[i, None, None]
            raw = self._raw[ay.jn[i] - self._raw0][:, ax.jn]  # nearest, for the masks
            self._emit(self._o1, out, raw)
            self._o1 = o2
        # 3. forget the rows no later output needs
        need = int(ay.lo_sufmin[self._o1]) if self._o1 < len(ay.lo_sufmin) else wh
        keep_f = min(need, self._f1)
        self._filt, self._filt0 = self._filt[keep_f - self._filt0 :], keep_f
        keep_r = max(0, min(need, self._f1 - r))
        self._raw, self._raw0 = self._raw[keep_r - self._raw0 :], keep_r

    def _emit(self, y0: int, rows: np.ndarray, raw: np.ndarray) -> None:
        """Output rows from ``y0``: ``rows`` (k, W, C) float on the input grid, ``raw`` the
        nearest working-grid pixels (k, W, C) for the masks."""
        n, write = len(self.stains), self.sink.write
        for k, st in enumerate(self.stains):
            write("image", st, y0, _to_uint8(rows[..., 3 * k : 3 * k + 3]))
            write("score", st, y0, np.array(rows[..., 3 * n + k], dtype=np.float32))
            if st not in self.dab_stains:
                sc = np.array(raw[..., 3 * n + k], dtype=np.float32)
                write("mask", st, y0, np.asarray(self.model.decode_mask(st, sc), dtype=bool))
            if self.samples > 1:
                write("uncertainty", st, y0, np.array(rows[..., 4 * n + k], dtype=np.float32))


class _MemoryOutputs:
    """The sink of an in-memory run: the StainResult's arrays, filled band by band."""

    def __init__(self, shape: tuple[int, int], stains: list[str], samples: int):
        h, w = shape
        self.images = {st: np.zeros((h, w, 3), np.uint8) for st in stains}
        self.masks = {st: np.zeros((h, w), bool) for st in stains}
        self.scores = {st: np.zeros((h, w), np.float32) for st in stains}
        self.uncertainty = {st: np.zeros((h, w), np.float32) for st in stains if samples > 1}

    def write(self, kind: str, stain: str, y0: int, rows: np.ndarray) -> None:
        field = {"image": self.images, "mask": self.masks, "score": self.scores}.get(kind)
        (self.uncertainty if field is None else field)[stain][y0 : y0 + len(rows)] = rows


#: tile side (px) of the masks of stains without an auxiliary branch when streamed to disk
DAB_MASK_TILE = 512


def _dab_masks(sink, dab_stains, mpp: float) -> None:
    """Masks of the stains without an auxiliary branch, from the finished virtual IHC (the
    statistics of the whole image, see :func:`_dab_mask`). In memory: at once. On disk
    (``ome_tiff.StreamedStainOutputs``): in tiles with the preset's halo
    (``stain.iter_coarse_masks``), which equals the untiled mask bit for bit."""
    from .stain import MaskPreset, MaskTile, ThresholdRule, get_preset, iter_coarse_masks

    for st in dab_stains:
        rgb, masks = sink.images[st], sink.masks[st]
        if isinstance(rgb, np.ndarray):
            masks[:] = _dab_mask(rgb, st, mpp)
            continue
        try:
            preset = get_preset(st)
        except ValueError:
            preset = MaskPreset(name=st, rule=ThresholdRule.OTSU)
        preset = preset.at_mpp(mpp)
        w = masks.shape[1]
        row = None
        for ev in iter_coarse_masks(rgb, preset, tile=DAB_MASK_TILE):
            if isinstance(ev, MaskTile):
                if ev.x == 0:
                    row = np.zeros((ev.mask.shape[0], w), bool)
                row[:, ev.x : ev.x + ev.mask.shape[1]] = ev.mask
                if ev.x + ev.mask.shape[1] == w:
                    masks[ev.y : ev.y + len(row)] = row


def _dab_mask(rgb: np.ndarray, stain: str, mpp: float) -> np.ndarray:
    """Positive cells from the DAB of a virtual IHC (models without an auxiliary branch): the
    stain's coarse-mask preset (Otsu for stains without one), statistics of this image."""
    from .stain import MaskPreset, ThresholdRule, coarse_mask, get_preset

    try:
        preset = get_preset(stain)
    except ValueError:
        preset = MaskPreset(name=stain, rule=ThresholdRule.OTSU)
    return coarse_mask(rgb, preset.at_mpp(mpp))


def _to_uint8(a: np.ndarray, rows: int = 256) -> np.ndarray:
    """[0, 1] floats (numpy or memmap) -> uint8, ``rows`` at a time so that no full-size float
    temporary is made."""
    out = np.empty(a.shape, np.uint8)
    for i in range(0, a.shape[0], rows):
        out[i : i + rows] = np.clip(np.rint(np.asarray(a[i : i + rows]) * 255.0), 0, 255)
    return out
