"""Tiled virtual staining of regions of any size: ``iter_stain``.

The region is cut into overlapping square tiles at the model's pixel size, the tiles are
stained in batches by the diffusion model (``sampling.iter_sample``), and the outputs are joined
with a smooth blending window (``tiling.Stitcher``) so there are no seams. Each tile's noise is
seeded from the run's seed and the tile's *position* (``tiling.tile_rng_seed``), so the result
does not depend on the batch size or the processing order.

Scale: the model works at the µm/px it was trained at. Each tile's window is read from the input
at the matching size (``tile * model_mpp / image_mpp`` input pixels) and resampled to the model's
tile; the stitched output is mapped back onto the input's pixel grid, so the virtual stain lines
up with the H&E pixel for pixel (up to the resampling, well under one input pixel).

Memory is bounded by the batch and the blending band, not by the region: only ``batch`` tiles are
in flight, the stitcher keeps one tile-row band, and its finished rows are resampled onto the
input grid band by band (``assemble._Assembler``) into the result: arrays in memory, or, with
``out_path``, temporary files that become the OME-TIFFs (slide-scale regions).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .assemble import _Assembler, _dab_mask, _dab_masks, _Geometry, _MemoryOutputs, _to_uint8
from .events import Event, Progress
from .tiling import Stitcher, Tile, TileGrid, tile_rng_seed


@dataclass(frozen=True)
class TileStained(Event):
    """One tile is done (raw model output, before blending with its neighbours).

    Attributes
    ----------
    done, total : int
        Tiles finished so far and in all.
    box : (y, x, h, w)
        Where the tile lies in the output, in input pixels relative to the region's corner.
    images : dict[str, ndarray]
        Stain -> uint8 (h, w, 3) virtual IHC of this tile.
    masks : dict[str, ndarray]
        Stain -> bool (h, w) positive cells of this tile.
    eta_s : float or None
    """

    done: int
    total: int
    box: tuple[int, int, int, int]
    images: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    eta_s: float | None = None


@dataclass(frozen=True)
class StainResult(Event):
    """The stitched result of :func:`iter_stain`, on the input's pixel grid.

    Attributes
    ----------
    images : stain -> uint8 (H, W, 3) virtual IHC (mean over samples).
    masks : stain -> bool (H, W) positive cells.
    scores : stain -> float32 (H, W) in [0, 1]: the auxiliary branch's score (mask probability or
        normalised distance), or the DAB optical density of the virtual IHC when the model has no
        auxiliary branch.
    uncertainty : stain -> float32 (H, W): per-pixel standard deviation across samples of the
        virtual IHC (0-255 scale, mean over RGB); empty when ``samples == 1``.
    region : (y, x, h, w) in input pixels.
    provenance : dict: model, sampler, steps, seed, region, scale, ... (for layer metadata and
        OME-TIFF provenance).

    A run streamed to disk (``iter_stain(out_path=...)``) holds ``images`` and ``masks`` as
    lazy dask arrays over the OME-TIFFs it wrote, no scores or uncertainty, and the files in
    ``provenance["files"]`` (stain -> kind -> path).
    """

    images: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    uncertainty: dict[str, np.ndarray]
    region: tuple[int, int, int, int]
    provenance: dict[str, Any]


@dataclass(frozen=True)
class TileOutput:
    """What a tile model returns for a batch of tiles (working resolution)."""

    images: dict[str, np.ndarray]  # stain -> float32 (B, S, S, 3) in [0, 1]
    scores: dict[str, np.ndarray]  # stain -> float32 (B, S, S) in [0, 1]


class TileModel(Protocol):
    """The interface ``iter_stain`` needs; :class:`DiffusionTileModel` is the real one."""

    stains: tuple[str, ...]
    tile: int  # default tile side (the model's patch size)
    multiple_of: int  # tiles must be multiples of this
    mpp: float  # µm/px the model works at

    def run(
        self, tiles: np.ndarray, seeds: Sequence[int], stains: Sequence[str]
    ) -> Iterator[Event | TileOutput]: ...

    def decode_mask(self, stain: str, score: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


class DiffusionTileModel:
    """A StainDiffuser with a sampler, as a :class:`TileModel`."""

    def __init__(
        self,
        model,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        aux: bool = True,
        eta: float = 0.0,
        name: str = "",
        precision: str = "fp32",
        compile: bool = False,
        channels_last: bool | None = None,
    ):
        """``precision``: the network's autocast ("auto", "fp32", "bf16", "fp16";
        ``runtime.resolve_precision``). ``compile``: ``torch.compile`` the network (falls back to
        eager with a warning if that fails). ``channels_last``: convert the model's weights to
        the channels-last memory format (in place; None: off, as it measured slower on an H200
        for the paper preset under bf16, 95 vs 125 TFLOP/s: docs/performance.md)."""
        import torch

        from .runtime import CompiledModel, resolve_precision
        from .sampling import resolve_sampling, resolve_spacing

        sampler, steps = resolve_sampling(model, sampler, steps)  # None: the model's own
        self.spacing = resolve_spacing(model, sampler, steps)
        self.model = model
        cfg = model.config
        self.stains = cfg.stains
        self.tile = cfg.image_size
        self.multiple_of = cfg.downsample_factor
        self.mpp = cfg.mpp
        self.sampler, self.steps, self.aux, self.eta, self.name = sampler, steps, aux, eta, name
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._net = CompiledModel(model) if compile else model

    @property
    def has_aux(self) -> bool:
        return self.aux and self.model.aux is not None

    def run(self, tiles, seeds, stains):
        import torch

        from .sampling import SampleResult, from_uint8_rgb, iter_sample

        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        device = next(self.model.parameters()).device
        for ev in iter_sample(
            self._net,
            from_uint8_rgb(tiles).to(device),
            stains=stains,
            sampler=self.sampler,
            steps=self.steps,
            generators=gens,
            aux=self.has_aux,
            eta=self.eta,
            spacing=self.spacing,
            precision=self.precision,
        ):
            if isinstance(ev, SampleResult):
                images = {
                    s: (np.transpose(x, (0, 2, 3, 1)) + 1.0) / 2.0 for s, x in ev.images.items()
                }
                yield TileOutput(images=images, scores=dict(ev.aux_score))
            else:
                yield ev

    def decode_mask(self, stain: str, score: np.ndarray) -> np.ndarray:
        from .config import AuxTarget

        cfg = self.model.config
        if cfg.aux_target is AuxTarget.DISTANCE:
            from .stain import distance_to_mask

            return distance_to_mask(score * 2.0 - 1.0, cfg.distance_max)
        return score > 0.5

    def describe(self) -> dict[str, Any]:
        grid = {}
        if self.spacing == "custom":  # a distilled model's own grid: record it
            from .sampling import model_timesteps

            grid["timesteps"] = model_timesteps(self.model, str(self.sampler), self.steps)
        return {
            **grid,
            "model": self.name,
            "sampler": str(getattr(self.sampler, "value", self.sampler)),
            "steps": self.steps,
            "spacing": self.spacing,
            "model_mpp": self.mpp,
            "prediction_type": self.model.config.schedule.prediction_type.value,
            "precision": self.precision,
            "compiled": bool(getattr(self._net, "active", False)),
            "channels_last": self.channels_last,
            "device": str(self.device),
        }


def _check_image(image) -> tuple[int, int]:
    shape = getattr(image, "shape", None)
    dtype = getattr(image, "dtype", None)
    if shape is None or len(shape) != 3 or shape[2] != 3:
        raise ValueError(
            f"expected an RGB H&E image of shape (H, W, 3); got shape {shape} "
            "(convert RGBA, grayscale or other channel counts first: io.as_rgb_uint8)"
        )
    if dtype != np.uint8:
        raise ValueError(f"expected an 8-bit (uint8) RGB image; got dtype {dtype}")
    return int(shape[0]), int(shape[1])


def _read_window(image, y: float, x: float, hy: float, wx: float, out_size: int) -> np.ndarray:
    """The input window [y, y + hy) x [x, x + wx) (input px, fractional) sampled on an
    ``out_size`` x ``out_size`` grid of pixel centres, as ``skimage.transform.resize`` would map
    it (same anti-aliasing), so tiles agree with each other and with the mapping back.

    Parts outside the image are reflected (as at the image border in the untiled case).
    """
    from scipy import ndimage

    h, w = image.shape[:2]
    sy, sx = hy / out_size, wx / out_size  # input px per output px
    pad = 2 + math.ceil(2 * max(sy, sx))  # room for the interpolation and anti-aliasing kernels
    y0, x0 = math.floor(y) - pad, math.floor(x) - pad
    y1, x1 = math.ceil(y + hy) + pad, math.ceil(x + wx) + pad
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    win = image[cy0:cy1, cx0:cx1]
    win = np.asarray(win.compute() if hasattr(win, "compute") else win)
    pads = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0))
    if any(p for pair in pads for p in pair):
        win = np.pad(win, pads, mode="symmetric")
    if sy == 1.0 and sx == 1.0 and float(y).is_integer() and float(x).is_integer():
        o = pad
        return win[o : o + out_size, o : o + out_size]
    f = win.astype(np.float32)
    sigma = (max(0.0, (sy - 1) / 2), max(0.0, (sx - 1) / 2), 0.0)  # skimage's anti-aliasing
    if sigma[0] or sigma[1]:
        f = ndimage.gaussian_filter(f, sigma, mode="mirror")
    k = np.arange(out_size) + 0.5
    ry = y + k * sy - 0.5 - y0  # pixel-centre coordinates inside the window
    rx = x + k * sx - 0.5 - x0
    out = np.empty((out_size, out_size, f.shape[2]), np.float32)
    for c in range(f.shape[2]):
        out[..., c] = ndimage.map_coordinates(
            f[..., c], np.meshgrid(ry, rx, indexing="ij"), order=1, mode="mirror"
        )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _resize_to(a: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    if a.shape[:2] == shape:
        return a
    from skimage.transform import resize

    return resize(a, shape, order=order, anti_aliasing=order > 0, preserve_range=True).astype(
        a.dtype
    )


#: regions smaller than this many model pixels a side are refused (a cell is ~8 px at 1 um/px)
MIN_REGION_MODEL_PX = 16


def plan_grid(
    region_hw: tuple[int, int],
    *,
    model_tile: int,
    multiple_of: int,
    model_mpp: float,
    image_mpp: float | None,
    tile: int | None = None,
    overlap: int | None = None,
) -> tuple[TileGrid, float]:
    """The tile grid :func:`iter_stain` uses for a region of ``region_hw`` input pixels.

    Returns the grid (in model pixels) and the scale (input px per model px; 1 when
    ``image_mpp`` is None, i.e. the image is assumed to be at the model's pixel size).
    """
    if image_mpp is not None and not (math.isfinite(image_mpp) and image_mpp > 0):
        raise ValueError(f"image_mpp must be a positive number of µm/px; got {image_mpp!r}")
    scale = 1.0 if image_mpp is None else model_mpp / image_mpp
    tile = tile or model_tile
    overlap = tile // 4 // 2 * 2 if overlap is None else overlap
    rh, rw = region_hw
    wh, ww = max(1, round(rh / scale)), max(1, round(rw / scale))
    return TileGrid.create(wh, ww, tile, overlap, multiple_of=multiple_of), scale


def time_batch(
    model,
    *,
    batch: int,
    stains: Sequence[str] | None = None,
    sampler: str | None = None,
    aux: bool = True,
    precision: str = "fp32",
) -> float:
    """Seconds one sampler step takes for a batch of ``batch`` tiles on the model's device
    (one warm-up call, then one timed call), for estimating the length of a run:
    ``ceil(tiles / batch) * steps * samples * time_batch(...)``."""
    tm = (
        model
        if hasattr(model, "run")
        else DiffusionTileModel(model, sampler=sampler, aux=aux, precision=precision)
    )
    old_steps = getattr(tm, "steps", None)
    if old_steps is not None:
        tm.steps = 1
    stains = list(stains) if stains is not None else list(tm.stains)
    rgb = np.full((batch, tm.tile, tm.tile, 3), 200, np.uint8)
    try:
        for _ in tm.run(rgb[:1], [0], stains):  # warm-up (allocator, lazy init)
            pass
        t0 = time.perf_counter()
        for _ in tm.run(rgb, list(range(batch)), stains):
            pass
        return time.perf_counter() - t0
    finally:
        if old_steps is not None:
            tm.steps = old_steps


#: tiles per network call for ``batch="auto"`` off the GPU (bigger batches gain little on a CPU)
AUTO_BATCH_CPU = 8
#: the largest batch ``batch="auto"`` probes on a GPU
AUTO_BATCH_MAX = 256


def auto_batch(model, stains: Sequence[str], total: int, *, probe: bool | None = None) -> int:
    """Tiles per network call for ``batch="auto"``.

    With ``probe`` (default: when the model is on a CUDA device) one sampler step is run at
    batch 1, 2, 4, ... up to :data:`AUTO_BATCH_MAX` (or the first power of two >= ``total``):
    the largest that does not run out of memory is used. Otherwise :data:`AUTO_BATCH_CPU`.
    """
    from .runtime import free_accelerator_memory, is_out_of_memory

    if probe is None:
        probe = getattr(getattr(model, "device", None), "type", "cpu") == "cuda"
    if not probe:
        return AUTO_BATCH_CPU
    cap = min(AUTO_BATCH_MAX, 1 << max(0, math.ceil(math.log2(max(1, total)))))
    old_steps = getattr(model, "steps", None)
    if old_steps is not None:
        model.steps = 1
    best, b = 0, 1
    try:
        while b <= cap:
            rgb = np.full((b, model.tile, model.tile, 3), 200, np.uint8)
            try:
                for _ in model.run(rgb, list(range(b)), list(stains)):
                    pass
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                free_accelerator_memory()
                break
            best, b = b, 2 * b
    finally:
        if old_steps is not None:
            model.steps = old_steps
    if best == 0:
        raise MemoryError("out of memory at batch 1: one tile does not fit on the device")
    return best


def _halve_batch(batch: int, exc: Exception) -> int:
    """The batch to retry with after ``exc``: half of ``batch`` if ``exc`` is an out-of-memory
    error (else ``exc`` is re-raised); at batch 1 a MemoryError says that one tile does not fit."""
    from .runtime import free_accelerator_memory, is_out_of_memory

    if not is_out_of_memory(exc):
        raise exc
    free_accelerator_memory()
    if batch <= 1:
        raise MemoryError(
            "out of memory at batch 1: one tile does not fit on the device; use a smaller "
            "tile, precision 'bf16', or the CPU"
        ) from exc
    return batch // 2


def iter_stain(
    image,
    model,
    *,
    region: tuple[int, int, int, int] | None = None,
    stains: Sequence[str] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    tile: int | None = None,
    overlap: int | None = None,
    batch: int | str = 8,
    device: str = "auto",
    samples: int = 1,
    image_mpp: float | None = None,
    aux: bool = True,
    precision: str = "fp32",
    compile: bool = False,
    threads: int | None = None,
    out_path: str | os.PathLike | None = None,
    stem: str = "image",
    metadata: dict[str, Any] | None = None,
) -> Iterator[Event]:
    """Stain a region of an H&E image tile by tile, yielding progress and every finished tile.

    Parameters
    ----------
    image : numpy or dask array (H, W, 3) uint8
        The H&E (e.g. a level of :func:`io.open_slide`); nothing outside the region is read.
    model : StainDiffuser or TileModel
        A StainDiffuser is wrapped in :class:`DiffusionTileModel` with ``sampler``/``steps``
        (None: the model's own, see :func:`sampling.resolve_sampling`).
    region : (y, x, h, w), optional
        In input pixels; the whole image by default. Must lie inside the image.
    stains : sequence of str, optional
        Stains to make (all of the model's by default).
    seed : int
        Noise for tile t and sample s comes from ``tile_rng_seed(seed, t, sample=s)``.
    tile, overlap : int, optional
        Tile side in model pixels (a multiple of the model's downsampling; default its patch
        size) and overlap (even; default a quarter of the tile).
    batch : int or "auto"
        Tiles per network call. On CUDA out-of-memory the batch halves and the same tiles are
        redone (finished tiles are kept); at batch 1 the error is raised. "auto": the largest
        power of two that fits on a GPU (probed), :data:`AUTO_BATCH_CPU` elsewhere.
    samples : int
        Samples per tile; > 1 adds a per-pixel uncertainty (spread across samples).
    image_mpp : float, optional
        µm/px of ``image``. None: assume the model's own pixel size (said in the provenance).
    precision, compile : StainDiffuser only
        Network precision ("fp32", "auto", "bf16", "fp16") and ``torch.compile``; see
        :class:`DiffusionTileModel`. The provenance records the precision used.
    threads : int, optional
        Set torch's CPU threads (``runtime.configure_threads``) before staining; None leaves
        them as they are.
    out_path : path, optional
        A folder: stream the result to disk instead of memory (slide-scale regions). Finished
        rows go, band by band in grid order, to temporary files in a hidden folder inside
        ``out_path``; at the end they are written as the pyramidal OME-TIFFs of
        ``ome_tiff.write_stain_outputs`` (``<stem>_virtual-<stain>.ome.tif``, ``_mask-``,
        ``_uncertainty-``; each atomic) and the temporary folder is removed (also on an error
        or when the generator is closed early, which writes nothing). The pixels equal the
        in-memory result's bit for bit. The StainResult then holds ``images`` and ``masks``
        as lazy dask arrays over the written files, no scores or uncertainty (read the
        files), and ``provenance["files"]``.
    stem, metadata : with ``out_path``
        File name stem, and extra provenance (merged into the result's and the files').

    Yields
    ------
    Progress during sampling, TileStained after every batch tile, then one StainResult.
    """
    from .training import resolve_device

    h_img, w_img = _check_image(image)
    if batch != "auto" and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be an integer >= 1 or 'auto'; got {batch!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1; got {samples!r}")
    ry, rx, rh, rw = region if region is not None else (0, 0, h_img, w_img)
    if rh < 1 or rw < 1 or ry < 0 or rx < 0 or ry + rh > h_img or rx + rw > w_img:
        raise ValueError(
            f"region (y={ry}, x={rx}, h={rh}, w={rw}) must be non-empty and lie inside the "
            f"image of {h_img} x {w_img} px"
        )
    if threads is not None:
        from .runtime import configure_threads

        configure_threads(threads)
    if not hasattr(model, "run"):
        model.to(resolve_device(device))
        model = DiffusionTileModel(
            model, sampler=sampler, steps=steps, aux=aux, precision=precision, compile=compile
        )
    elif precision != "fp32" or compile:
        raise ValueError(
            "precision and compile apply when model is a StainDiffuser; for a TileModel, set "
            f"them on it (e.g. DiffusionTileModel(..., precision={precision!r}))"
        )
    stains = list(stains) if stains is not None else list(model.stains)
    unknown = [s for s in stains if s not in model.stains]
    if unknown or not stains:
        raise ValueError(f"unknown stains {unknown}: the model makes {list(model.stains)}")
    mpp_assumed = image_mpp is None
    grid, scale = plan_grid(
        (rh, rw),
        model_tile=model.tile,
        multiple_of=model.multiple_of,
        model_mpp=model.mpp,
        image_mpp=image_mpp,
        tile=tile,
        overlap=overlap,
    )
    tile, overlap, wh, ww = grid.tile, grid.overlap, grid.height, grid.width
    if min(wh, ww) < MIN_REGION_MODEL_PX:
        raise ValueError(
            f"region of {rh} x {rw} px is {wh} x {ww} px at the model's {model.mpp:g} um/px: too "
            f"small to stain; expected at least {MIN_REGION_MODEL_PX} px a side "
            f"({MIN_REGION_MODEL_PX * model.mpp:g} um)"
        )
    geo = _Geometry(ry, rx, rh, rw, wh, ww, image_mpp or model.mpp)

    out_dir = _prepare_out(out_path)  # a read-only or full disk fails now, not at the end
    tiles = grid.tiles
    total = len(tiles)
    done = 0
    t0 = time.perf_counter()
    sink = _open_outputs(out_dir, geo, stains, samples)
    try:
        asm = _Assembler(model, stains, geo, samples, sink)
        stitcher = Stitcher(grid, asm.shape[2], out=asm)
        batch_asked = batch
        if batch == "auto":
            batch = auto_batch(model, stains, total)
        b0 = 0
        while b0 < total:
            chunk = tiles[b0 : b0 + batch]
            finished = None
            try:
                for ev in _iter_batch(image, model, chunk, geo, stains, seed, samples):
                    if isinstance(ev, _BatchDone):
                        finished = ev
                    else:
                        eta = _eta(t0, done, total)
                        yield Progress(done, total, stage="sampling", eta_s=eta)
            except Exception as exc:  # out of memory: halve the batch, redo the same tiles
                batch = _halve_batch(batch, exc)
                stage = f"out of memory: batch reduced to {batch}"
                yield Progress(done, total, stage=stage, eta_s=_eta(t0, done, total))
                continue
            b0 += len(chunk)
            asm.dab_stains = finished.dab_stains
            yield from _stitch(stitcher, finished, done, total, lambda d: _eta(t0, d, total))
            done += len(finished.tiles)
        stitcher.finish()
        provenance = {
            **model.describe(),
            "stains": stains,
            "seed": seed,
            "region": [ry, rx, rh, rw],
            "tile": tile,
            "overlap": overlap,
            "samples": samples,
            "image_mpp": image_mpp,
            "mpp_assumed": mpp_assumed,
            "scale_input_px_per_model_px": scale,
            "tiles": total,
            "batch": batch,
            "batch_requested": batch_asked,
            "seconds": round(time.perf_counter() - t0, 3),
            **(metadata or {}),
        }
        yield _finish(asm, sink, geo, provenance, stem, image_mpp)
    finally:
        if out_dir is not None:
            sink.close()


# Per-batch pieces of iter_stain, shared with cluster.py (whose dask workers run _iter_batch), so
# that both compute the same numbers for the same tiles and seed.


@dataclass(frozen=True)
class _TileDone:
    """One tile's stitcher input ``values`` (S, S, C) float32 and its TileStained parts."""

    tile: Tile
    values: np.ndarray
    box: tuple[int, int, int, int]
    images: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]


@dataclass(frozen=True)
class _BatchDone:
    tiles: list[_TileDone]
    dab_stains: frozenset[str]  # stains whose score is the DAB density (no auxiliary branch)


def _iter_batch(
    image, model, chunk: list[Tile], geo: _Geometry, stains: list[str], seed: int, samples: int
) -> Iterator[Event | _BatchDone]:
    """Read and stain one batch of tiles: the model's progress events, then one _BatchDone."""
    sy, sx = geo.sy, geo.sx
    rgb = np.stack(
        [
            _read_window(
                image, geo.ry + t.y * sy, geo.rx + t.x * sx, t.size * sy, t.size * sx, t.size
            )
            for t in chunk
        ]
    )
    n = len(stains)
    mean = var = score = None
    for s in range(samples):
        seeds = [tile_rng_seed(seed, t, sample=s) for t in chunk]
        res = None
        for ev in model.run(rgb, seeds, stains):
            if isinstance(ev, TileOutput):
                res = ev
            else:
                yield ev
        imgs = np.stack([res.images[st] for st in stains], 1)  # (B, n, S, S, 3)
        dab_stains = frozenset(st for st in stains if st not in res.scores)
        sc = np.stack(
            [_dab_score(res.images[st]) if st in dab_stains else res.scores[st] for st in stains],
            1,
        )
        if mean is None:
            mean, var, score = imgs, np.zeros_like(imgs), sc
        else:  # Welford running mean and variance over samples
            delta = imgs - mean
            mean = mean + delta / (s + 1)
            var = var + delta * (imgs - mean)
            score = score + (sc - score) / (s + 1)
    done = []
    for i, t in enumerate(chunk):
        parts = [mean[i, k] for k in range(n)] + [score[i, :, :, :, None][k] for k in range(n)]
        if samples > 1:
            std = np.sqrt(var[i] / (samples - 1)).mean(-1) * 255.0  # (n, S, S)
            parts += [std[k][..., None] for k in range(n)]
        box = _box(t, sy, sx, geo.rh, geo.rw)
        th, tw = box[2], box[3]
        ch, cw = min(t.size, geo.wh - t.y), min(t.size, geo.ww - t.x)  # the tile inside the grid
        tile_imgs = {
            st: _to_uint8(_resize_to(mean[i, k, :ch, :cw], (th, tw))) for k, st in enumerate(stains)
        }
        masks = {
            st: _dab_mask(tile_imgs[st], st, geo.out_mpp)
            if st in dab_stains
            else _resize_to(model.decode_mask(st, score[i, k, :ch, :cw]), (th, tw), order=0)
            for k, st in enumerate(stains)
        }
        done.append(_TileDone(t, np.concatenate(parts, -1), box, tile_imgs, masks))
    yield _BatchDone(done, dab_stains)


def _prepare_out(out_path) -> Path | None:
    if out_path is None:
        return None
    from .outputs import prepare_output_dir

    return prepare_output_dir(out_path)


def _open_outputs(out_dir: Path | None, geo: _Geometry, stains: list[str], samples: int):
    """Where the outputs go: the StainResult's arrays, or temporary files in ``out_dir``."""
    if out_dir is None:
        return _MemoryOutputs((geo.rh, geo.rw), stains, samples)
    from .ome_tiff import StreamedStainOutputs

    return StreamedStainOutputs(out_dir, (geo.rh, geo.rw), stains, samples > 1)


def _finish(asm: _Assembler, sink, geo: _Geometry, provenance: dict, stem: str, file_mpp):
    """The StainResult once every row is stitched: masks of stains without an auxiliary branch,
    then, for a streamed run, the OME-TIFFs (``provenance["files"]``; result arrays: lazy views
    of the files)."""
    asm.close()
    _dab_masks(sink, asm.dab_stains, geo.out_mpp)
    region = (geo.ry, geo.rx, geo.rh, geo.rw)
    if isinstance(sink, _MemoryOutputs):
        return StainResult(sink.images, sink.masks, sink.scores, sink.uncertainty, region,
                           provenance)  # fmt: skip
    from .ome_tiff import open_level0

    files = provenance["files"] = sink.write_files(stem, file_mpp, provenance)
    images = {st: open_level0(f["virtual"]) for st, f in files.items()}
    masks = {st: open_level0(f["mask"]).astype(bool) for st, f in files.items()}
    return StainResult(images, masks, {}, {}, region, provenance)


def _stitch(stitcher, batch: _BatchDone, done: int, total: int, eta) -> Iterator[TileStained]:
    """Add a finished batch's tiles to ``stitcher`` in order, yielding a TileStained for each
    (``done`` tiles before it; ``eta(done)``: the seconds left)."""
    for td in batch.tiles:
        stitcher.add(td.tile, td.values)
        done += 1
        yield TileStained(done=done, total=total, box=td.box, images=td.images, masks=td.masks,
                          eta_s=eta(done))  # fmt: skip


def _eta(t0: float, done: int, total: int) -> float | None:
    if done == 0:
        return None
    return (time.perf_counter() - t0) / done * (total - done)


def _box(t: Tile, sy: float, sx: float, rh: int, rw: int) -> tuple[int, int, int, int]:
    y0, x0 = round(t.y * sy), round(t.x * sx)
    y1, x1 = min(rh, round((t.y + t.size) * sy)), min(rw, round((t.x + t.size) * sx))
    return y0, x0, max(0, y1 - y0), max(0, x1 - x0)


def _dab_score(images: np.ndarray) -> np.ndarray:
    """DAB optical density of virtual IHC tiles (B, S, S, 3) in [0, 1], scaled to [0, 1]."""
    from .stain import DAB_MAX, dab_channel

    return np.stack([np.clip(dab_channel(x) / DAB_MAX, 0, 1) for x in images]).astype(np.float32)


def stain_region(image, model, **kwargs) -> StainResult:
    """Run :func:`iter_stain` to the end and return its :class:`StainResult`."""
    result = None
    for ev in iter_stain(image, model, **kwargs):
        result = ev
    assert isinstance(result, StainResult)
    return result
