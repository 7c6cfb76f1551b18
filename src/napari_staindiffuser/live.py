"""Stain as you pan: virtual IHC computed lazily, tile by tile, for the part of a slide in view.

A :class:`LiveGrid` fixes one tile grid over the whole image, in *model pixels* (the model's
µm/px) anchored at the image's top-left corner. Tile ``(row, col)`` owns the core
``[row * core, (row + 1) * core) x [col * core, (col + 1) * core)`` model px; the model sees the
core plus a ``halo`` of context on every side (``core + 2 * halo == tile``, the model's patch), read
from one pyramid level (the *read level*) and resampled exactly as :func:`inference.iter_stain`
reads its tiles (``inference._read_window``); the halo is cropped away from the output. The tile's
noise comes from ``tiling.tile_rng_seed(seed, tile, level)`` with the core's position, so a tile
is always the same, whatever the view, the order or the batch.

:class:`LiveStainer` is the scheduler: the GUI (any thread) says "the view is now these tiles"
(:meth:`LiveStainer.set_view`, ordered nearest the view's centre first by
:meth:`LiveGrid.visible_tiles`); :meth:`LiveStainer.run` (a generator, for a worker thread) computes
the wanted tiles that are not cached yet, in small batches, through the same
:class:`inference.TileModel` path as ``iter_stain``, drops queued tiles that left the view, and
abandons a batch between two sampler steps as soon as none of its tiles is wanted any more.
Finished cores go to a :class:`TileCache` (bounded LRU, bytes budget) keyed by
:class:`TileKey` = (model SHA-256, sampler, steps, seed, read level, row, col, stain).

:class:`LiveLevel` is a read-only array-like (``shape``, ``dtype``, ``ndim``, ``__getitem__``
returning numpy) over the cache for one pyramid level of the H&E: RGBA uint8, transparent where
no tile is cached. napari displays a list of them as a multiscale image; every display level is
rendered from the same model-pixel tiles by nearest-neighbour sampling, so the stain lines up with
the H&E at every zoom.

No torch, napari or Qt at import; see ``docs/user-guide.md`` ("Stain as you pan").
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .events import Event
from .tiling import Tile, tile_rng_seed

__all__ = ["LiveGrid", "LiveLevel", "LiveStainer", "LiveStatus", "LiveTile", "TileCache"]
__all__ += ["TileKey", "live_levels"]

TileIndex = tuple[int, int]  # (row, col)
Box = tuple[float, float, float, float]  # (y, x, h, w)

#: below this tissue fraction a tile's window is background: it is cached as transparent
MIN_TISSUE_FRACTION = 0.005


class TileKey(NamedTuple):
    """What makes a live tile: the same key always gives the same pixels."""

    model: str  # SHA-256 (prefix) of the checkpoint
    sampler: str
    steps: int
    seed: int
    level: int  # pyramid level the H&E is read from
    row: int
    col: int
    stain: str


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class LiveGrid:
    """A fixed grid of tiles over a whole image, in model pixels.

    Parameters
    ----------
    shape : (H, W)
        Size of the read level, in its pixels.
    level : int
        Index of the read level in the pyramid (part of the cache key and the seed).
    scale : float
        Read-level pixels per model pixel (``model_mpp / level_mpp``; 1 when the pixel size is
        unknown and the level is assumed to be at the model's µm/px).
    tile : int
        The model's input side (model px), a multiple of ``multiple_of``.
    halo : int
        Context on each side (model px), cropped from the output; ``0 <= 2 * halo < tile``.
    downsample : (float, float)
        Level-0 pixels per read-level pixel along y and x (to map level-0 boxes onto the grid).
    """

    shape: tuple[int, int]
    level: int
    scale: float
    tile: int
    halo: int
    downsample: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if not (self.tile >= 1 and 0 <= 2 * self.halo < self.tile):
            raise ValueError(
                f"expected tile >= 1 and 0 <= 2 * halo < tile; got tile={self.tile}, "
                f"halo={self.halo}"
            )
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number; got {self.scale!r}")
        ds = tuple(float(d) for d in np.broadcast_to(self.downsample, (2,)))
        if not all(math.isfinite(d) and d > 0 for d in ds):
            raise ValueError(f"downsample must be positive numbers (dy, dx); got {ds!r}")
        object.__setattr__(self, "downsample", ds)
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise ValueError(f"shape must be (H, W) with H, W >= 1; got {self.shape!r}")

    @classmethod
    def for_model(
        cls,
        shape: Sequence[int],
        *,
        level: int,
        model_tile: int,
        model_mpp: float,
        level_mpp: float | None,
        downsample: float | Sequence[float] = 1.0,
        halo: int | None = None,
        multiple_of: int = 8,
    ) -> LiveGrid:
        """The grid for a model with patch ``model_tile`` at ``model_mpp`` over a level of
        ``shape`` at ``level_mpp`` (None: assume the model's µm/px). The halo defaults to an eighth
        of the tile on each side (the core is then three quarters of it)."""
        if model_tile % multiple_of:
            raise ValueError(f"model_tile must be a multiple of {multiple_of}; got {model_tile}")
        if level_mpp is not None and not (math.isfinite(level_mpp) and level_mpp > 0):
            raise ValueError(f"level_mpp must be a positive number of µm/px; got {level_mpp!r}")
        if halo is None:
            halo = model_tile // 8
        scale = 1.0 if level_mpp is None else model_mpp / level_mpp
        ds = tuple(float(d) for d in np.broadcast_to(downsample, (2,)))
        return cls((int(shape[0]), int(shape[1])), level, scale, model_tile, halo, ds)

    @property
    def core(self) -> int:
        """Side of a tile's core (model px): what the tile contributes to the picture."""
        return self.tile - 2 * self.halo

    @property
    def model_shape(self) -> tuple[float, float]:
        """The image's size in model pixels (fractional)."""
        return self.shape[0] / self.scale, self.shape[1] / self.scale

    @property
    def n_rows(self) -> int:
        return max(1, math.ceil(self.model_shape[0] / self.core - 1e-9))

    @property
    def n_cols(self) -> int:
        return max(1, math.ceil(self.model_shape[1] / self.core - 1e-9))

    def tile_at(self, row: int, col: int) -> Tile:
        """The tile's core as a :class:`tiling.Tile` (model px, for its seed)."""
        c = self.core
        return Tile(row * self.n_cols + col, row, col, row * c, col * c, self.tile)

    def seed(self, seed: int, row: int, col: int) -> int:
        """The tile's noise seed: ``tile_rng_seed(seed, core position, level)``."""
        return tile_rng_seed(seed, self.tile_at(row, col), level=self.level)

    def window(self, row: int, col: int) -> tuple[float, float, float, float]:
        """The model's input window ``(y, x, h, w)`` in read-level px (core plus halo; may reach
        outside the image, where it is reflected)."""
        q = self.scale
        y = (row * self.core - self.halo) * q
        x = (col * self.core - self.halo) * q
        return y, x, self.tile * q, self.tile * q

    def core_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """The core ``(y, x, h, w)`` in read-level px (fractional; may pass the image edge)."""
        q, c = self.scale, self.core
        return row * c * q, col * c * q, c * q, c * q

    def visible_tiles(
        self, box0: Box, *, max_tiles: int | None = None, margin: int = 0
    ) -> list[TileIndex]:
        """Tiles whose core meets ``box0`` (level-0 px ``(y, x, h, w)``), nearest the box's
        centre first (max-norm distance from the tile's centre, then Euclidean, then row-major),
        at most ``max_tiles`` of them. ``margin`` adds that many rings of tiles around the box
        (staining just outside the view before the user pans there)."""
        y, x, h, w = (float(v) for v in box0)
        if h <= 0 or w <= 0:
            return []
        fy, fx = (1.0 / (d * self.scale * self.core) for d in self.downsample)  # tiles per px
        r0 = max(0, math.floor(y * fy) - margin)
        c0 = max(0, math.floor(x * fx) - margin)
        r1 = min(self.n_rows, math.ceil((y + h) * fy) + margin)
        c1 = min(self.n_cols, math.ceil((x + w) * fx) + margin)
        if r1 <= r0 or c1 <= c0:
            return []
        cy, cx = (y + h / 2) * fy, (x + w / 2) * fx  # view centre, in tiles
        rows = np.arange(r0, r1)
        cols = np.arange(c0, c1)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        dy, dx = np.abs(rr + 0.5 - cy), np.abs(cc + 0.5 - cx)
        order = np.lexsort(
            ((rr * self.n_cols + cc).ravel(), np.hypot(dy, dx).ravel(), np.maximum(dy, dx).ravel())
        )
        out = [(int(rr.flat[i]), int(cc.flat[i])) for i in order]
        return out if max_tiles is None else out[:max_tiles]


# --------------------------------------------------------------------------- cache


class TileCache:
    """A thread-safe LRU cache of tile images, bounded by bytes.

    ``get`` marks an entry as recently used; ``put`` evicts the least recently used entries
    until the total is within ``max_bytes`` (an entry larger than the budget is not kept).
    """

    def __init__(self, max_bytes: int = 256 << 20):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0; got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._data: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted = 0
        self.puts: list[Any] = []  #: every key put, in order (append-only: readers follow it)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Any) -> bool:
        return key in self._data

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Any) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def peek(self, key: Any) -> np.ndarray | None:
        """Like :meth:`get` without touching the LRU order (for drawing)."""
        return self._data.get(key)

    def put(self, key: Any, value: np.ndarray) -> None:
        value = np.asarray(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if value.nbytes > self.max_bytes:
                return
            self._data[key] = value
            self._bytes += value.nbytes
            self.puts.append(key)
            while self._bytes > self.max_bytes:
                _, gone = self._data.popitem(last=False)
                self._bytes -= gone.nbytes
                self.evicted += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def items(self) -> list[tuple[Any, np.ndarray]]:
        with self._lock:
            return list(self._data.items())


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class LiveTile(Event):
    """Tile ``(row, col)`` is in the cache for ``stains`` (``blank``: background, not stained)."""

    row: int
    col: int
    stains: tuple[str, ...]
    blank: bool = False


@dataclass(frozen=True)
class LiveStatus(Event):
    """Counters of a :class:`LiveStainer` (for a status line)."""

    computed: int  # tiles stained by the model in this run
    queued: int  # wanted tiles not cached yet
    cached: int  # entries in the cache
    cancelled: int  # tiles abandoned mid-sampling because they left the view
    dropped: int  # queued tiles dropped because they left the view before they started
    tiles_per_s: float | None  # model tiles per second of sampling in this run
    visible: int = 0  # tiles wanted for the current view (after the cap)
    capped: int = 0  # tiles in view beyond the cap (not stained: zoom in)


# --------------------------------------------------------------------------- scheduler


@dataclass
class _Stats:
    computed: int = 0
    cancelled: int = 0
    dropped: int = 0
    blank: int = 0
    busy_s: float = 0.0
    first_tile_after_view_s: list[float] = field(default_factory=list)


class LiveStainer:
    """Computes the tiles in view, nearest the centre first, into a :class:`TileCache`.

    Parameters
    ----------
    image : numpy or dask array (H, W, 3) uint8
        The read level of the H&E (``grid.shape == (H, W)``).
    model : TileModel or callable returning one
        E.g. :class:`inference.DiffusionTileModel`; a callable is called once, in :meth:`run`
        (so the model loads in the worker thread).
    grid : LiveGrid
    stains : sequence of str
    seed : int
    cache : TileCache
    model_id, sampler, steps : for the cache key (the model's SHA-256, its sampler and steps).
    batch : int
        Tiles per network call (small: a batch is the unit that a view change can abandon).
        The first batch after a view change holds only the most central tile.
    skip_background : bool
        Tiles whose window has under 0.5 % tissue (``stain.tissue_mask``) are cached as
        transparent without running the model.

    ``set_view`` and ``stop`` may be called from any thread while ``run`` runs in another.
    """

    def __init__(
        self,
        image: Any,
        model: Any,
        grid: LiveGrid,
        *,
        stains: Sequence[str],
        seed: int,
        cache: TileCache,
        model_id: str,
        sampler: str,
        steps: int,
        batch: int = 4,
        skip_background: bool = True,
    ):
        shape = getattr(image, "shape", None)
        if shape is None or len(shape) != 3 or shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 H&E level; got {getattr(image, 'dtype', None)} "
                f"{shape}"
            )
        if tuple(shape[:2]) != tuple(grid.shape):
            raise ValueError(f"the grid is for {grid.shape} px; the image is {tuple(shape[:2])}")
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1; got {batch!r}")
        if not stains:
            raise ValueError("ask for at least one stain")
        self.image, self.grid, self.cache = image, grid, cache
        self.stains = tuple(stains)
        self.seed, self.batch, self.skip_background = int(seed), batch, skip_background
        self.key_base = (str(model_id), str(sampler), int(steps), int(seed), int(grid.level))
        self._model = model
        self._cond = threading.Condition()
        self._wanted: list[TileIndex] = []
        self._wanted_set: set[TileIndex] = set()
        self._capped = 0
        self._in_flight: set[TileIndex] = set()
        self._stop = False
        self._view_t: float | None = None
        self.stats = _Stats()

    # -- keys ---------------------------------------------------------------

    def key(self, row: int, col: int, stain: str) -> TileKey:
        return TileKey(*self.key_base, row, col, stain)

    def is_cached(self, t: TileIndex) -> bool:
        return all(self.key(*t, st) in self.cache for st in self.stains)

    # -- control (any thread) -----------------------------------------------

    def set_view(self, tiles: Iterable[TileIndex], capped: int = 0) -> None:
        """The tiles to stain now, most urgent first; queued tiles not in it are dropped."""
        tiles = [(int(r), int(c)) for r, c in tiles]
        with self._cond:
            if tiles == self._wanted and capped == self._capped:
                return  # the same view (a small pan within the same tiles)
            new = set(tiles)
            self.stats.dropped += sum(
                1
                for t in self._wanted
                if t not in new and t not in self._in_flight and not self.is_cached(t)
            )
            self._wanted, self._wanted_set, self._capped = tiles, new, capped
            self._view_t = time.perf_counter()
            self._cond.notify_all()

    def stop(self) -> None:
        """Make :meth:`run` return at its next check (between sampler steps at the latest)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stop

    def queue(self) -> list[TileIndex]:
        """Wanted tiles that are not cached yet, in order."""
        with self._cond:
            wanted = list(self._wanted)
        return [t for t in wanted if not self.is_cached(t)]

    def status(self) -> LiveStatus:
        s = self.stats
        return LiveStatus(
            computed=s.computed,
            queued=len(self.queue()),
            cached=len(self.cache),
            cancelled=s.cancelled,
            dropped=s.dropped,
            tiles_per_s=s.computed / s.busy_s if s.busy_s > 0 and s.computed else None,
            visible=len(self._wanted),
            capped=self._capped,
        )

    # -- work (worker thread) -----------------------------------------------

    def _still_wanted(self, batch: Sequence[TileIndex]) -> bool:
        return not self._stop and any(t in self._wanted_set for t in batch)

    def _is_background(self, row: int, col: int) -> bool:
        from .stain import tissue_mask

        y, x, h, w = self.grid.core_box(row, col)
        H, W = self.grid.shape
        y0, x0 = max(0, math.floor(y)), max(0, math.floor(x))
        y1, x1 = min(H, math.ceil(y + h)), min(W, math.ceil(x + w))
        if y1 <= y0 or x1 <= x0:
            return True
        step = max(1, (y1 - y0) // 32)
        win = self.image[y0:y1:step, x0:x1:step]
        win = np.asarray(win.compute() if hasattr(win, "compute") else win)
        pixels = tissue_mask(win, min_size=0, max_hole_size=0, closing_radius=0)  # pixelwise
        return float(pixels.mean()) < MIN_TISSUE_FRACTION

    def compute_batch(self, batch: Sequence[TileIndex]) -> Iterator[Event]:
        """Stain ``batch`` through the tile model; yields its events (SampleStep ...), then caches
        each core and yields a :class:`LiveTile` per tile. Abandons the batch (nothing cached)
        when none of its tiles is wanted any more (checked between sampler steps)."""
        from .inference import TileOutput, _read_window, _to_uint8

        model = self.model
        g = self.grid
        rgb = np.stack([_read_window(self.image, *g.window(r, c), g.tile) for r, c in batch])
        seeds = [g.seed(self.seed, r, c) for r, c in batch]
        t0 = time.perf_counter()
        res = None
        run = model.run(rgb, seeds, list(self.stains))
        try:
            for ev in run:
                if isinstance(ev, TileOutput):
                    res = ev
                    continue
                if not self._still_wanted(batch):
                    self.stats.cancelled += len(batch)
                    self.stats.busy_s += time.perf_counter() - t0
                    return
                yield ev
        finally:
            run.close()
        self.stats.busy_s += time.perf_counter() - t0
        if res is None:
            raise RuntimeError("the tile model ended without a TileOutput")
        h, c = g.halo, g.core
        for i, (r, col) in enumerate(batch):
            for st in self.stains:
                core = _to_uint8(res.images[st][i, h : h + c, h : h + c])
                rgba = np.empty((c, c, 4), np.uint8)
                rgba[..., :3], rgba[..., 3] = core, 255
                self.cache.put(self.key(r, col, st), rgba)
            self.stats.computed += 1
            if self._view_t is not None and (r, col) in self._wanted_set:
                self.stats.first_tile_after_view_s.append(time.perf_counter() - self._view_t)
                self._view_t = None
            yield LiveTile(r, col, self.stains)

    @property
    def model(self) -> Any:
        if callable(self._model) and not hasattr(self._model, "run"):
            self._model = self._model()
        return self._model

    def _next_batch(self) -> list[TileIndex]:
        """The next wanted tiles that are not cached; just one (the most central) while no tile
        of a new view has been delivered yet, so the first new tile comes as soon as possible."""
        size = 1 if self._view_t is not None else self.batch
        out: list[TileIndex] = []
        for t in self._wanted:
            if not self.is_cached(t):
                out.append(t)
                if len(out) == size:
                    break
        return out

    def run(self, *, idle_s: float | None = 0.25, until_idle: bool = False) -> Iterator[Event]:
        """Stain wanted tiles until :meth:`stop` (or, with ``until_idle``, until none is left).

        Yields the tile model's events, a :class:`LiveTile` per finished (or background) tile
        and a :class:`LiveStatus` after every batch and every ``idle_s`` seconds of waiting
        (so a thread worker can be quit while idle).
        """
        _ = self.model  # load it before the first view request arrives
        while not self._stop:
            with self._cond:
                batch = self._next_batch()
                if not batch:
                    if until_idle:
                        break
                    self._cond.wait(idle_s)
                    if not self._next_batch() and not self._stop:
                        yield self.status()
                    continue
            blank = [t for t in batch if self.skip_background and self._is_background(*t)]
            for r, c in blank:
                for st in self.stains:
                    self.cache.put(self.key(r, c, st), _BLANK)
                self.stats.blank += 1
                yield LiveTile(r, c, self.stains, blank=True)
            todo = [t for t in batch if t not in blank]
            if todo:
                self._in_flight = set(todo)
                try:
                    yield from self.compute_batch(todo)
                finally:
                    self._in_flight = set()
            yield self.status()


#: levels up to this many pixels keep a painted canvas (see LiveLevel)
CANVAS_MAX_PX = 2048 * 2048

_BLANK = np.zeros((1, 1, 4), np.uint8)  # a background tile: transparent (any size)
_BLANK.setflags(write=False)


# --------------------------------------------------------------------------- the layer's data


class LiveLevel:
    """One pyramid level of the live stain, as a read-only RGBA uint8 array-like.

    ``__getitem__`` renders the requested region from the cached tile cores (nearest neighbour
    from model px onto this level's pixel grid); where no tile is cached it is transparent.

    Parameters
    ----------
    shape : (H, W)
        This level's size (the H&E's level of the same index).
    grid : LiveGrid
    downsample : float
        Level-0 px per pixel of this level.
    source : callable () -> (TileCache, key function (row, col) -> TileKey) or None
        Read at every render.
    canvas_max_px : int
        A level of at most this many pixels keeps an RGBA canvas that every new tile is painted
        into once (followed through ``TileCache.puts``), so drawing it is one slice: coarse
        levels, where a view spans thousands of tiles. Larger (finer) levels draw the tiles under
        the requested region at every call. Tiles evicted from the cache stay on the canvas.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(
        self,
        shape: Sequence[int],
        grid: LiveGrid,
        downsample: Sequence[float],
        source,
        *,
        canvas_max_px: int = CANVAS_MAX_PX,
    ):
        self.shape = (int(shape[0]), int(shape[1]), 4)
        self.grid, self.source = grid, source
        self.downsample = (float(downsample[0]), float(downsample[1]))
        self.size = int(np.prod(self.shape))
        self.use_canvas = self.shape[0] * self.shape[1] <= canvas_max_px
        self._canvas: np.ndarray | None = None
        self._seen = 0  # entries of cache.puts already painted

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LiveLevel(shape={self.shape}, downsample={self.downsample})"

    def __array__(self, dtype=None, copy=None):
        out = self[:, :, :]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (3 - len(key))
        ky, kx, kc = key
        if not isinstance(ky, slice):
            ky = int(ky) % self.shape[0]
        if not isinstance(kx, slice):
            kx = int(kx) % self.shape[1]
        ys = ky if isinstance(ky, slice) else slice(ky, ky + 1)
        xs = kx if isinstance(kx, slice) else slice(kx, kx + 1)
        y0, y1, sy = ys.indices(self.shape[0])
        x0, x1, sx = xs.indices(self.shape[1])
        if sy < 1 or sx < 1:
            raise IndexError("LiveLevel supports positive steps only")
        block = self.render(y0, max(y0, y1), x0, max(x0, x1))
        return block[
            slice(None, None, sy) if isinstance(ky, slice) else 0,
            slice(None, None, sx) if isinstance(kx, slice) else 0,
            kc,
        ]

    def _model_px_per_px(self, axis: int) -> float:
        g = self.grid
        return self.downsample[axis] / (g.downsample[axis] * g.scale)

    def _owned(self, t: int, axis: int) -> tuple[int, int, np.ndarray]:
        """This level's pixels [lo, hi) along ``axis`` whose centres fall in tile ``t``'s core,
        and their offsets in the core (as :meth:`_pixel_to_tile` maps them)."""
        f, c = self._model_px_per_px(axis), self.grid.core
        n = self.shape[axis]
        lo = min(n, max(0, math.ceil(t * c / f - 0.5)))
        hi = min(n, max(lo, math.ceil((t + 1) * c / f - 0.5)))
        u = np.floor((np.arange(lo, hi) + 0.5) * f).astype(np.int64) - t * c
        return lo, hi, np.clip(u, 0, c - 1)

    def paint(self, row: int, col: int, tile: np.ndarray) -> None:
        """Paint one tile core (c, c, 4) onto the canvas (canvas levels only)."""
        if self._canvas is None or tile.shape[0] == 1:
            return
        y0, y1, oy = self._owned(row, 0)
        x0, x1, ox = self._owned(col, 1)
        if y1 > y0 and x1 > x0:
            self._canvas[y0:y1, x0:x1] = tile.take(oy, axis=0).take(ox, axis=1)

    def _update_canvas(self, cache: TileCache, key_of) -> None:
        """Paint the tiles put into ``cache`` since the last call (all cached ones the first
        time)."""
        if self._canvas is None:
            self._canvas = np.zeros(self.shape, np.uint8)
            self._seen = len(cache.puts)
            todo = [(k, v) for k, v in cache.items()]
        else:
            n = len(cache.puts)
            keys, self._seen = cache.puts[self._seen : n], n
            todo = [(k, cache.peek(k)) for k in keys]
        for k, tile in todo:
            if tile is not None and isinstance(k, TileKey) and k == key_of(k.row, k.col):
                self.paint(k.row, k.col, tile)

    def _pixel_to_tile(self, lo: int, hi: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
        """For this level's pixels lo..hi-1 along ``axis``: the tile index and the offset inside
        the tile's core (model px of the pixel's centre)."""
        f = self._model_px_per_px(axis)
        u = np.floor((np.arange(lo, hi) + 0.5) * f).astype(np.int64)
        return u // self.grid.core, u % self.grid.core

    def render(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        src = self.source()
        if src is None or y1 <= y0 or x1 <= x0:
            return np.zeros((max(0, y1 - y0), max(0, x1 - x0), 4), np.uint8)
        cache, key_of = src
        if self.use_canvas:
            self._update_canvas(cache, key_of)
            return self._canvas[y0:y1, x0:x1].copy()
        out = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
        ty, oy = self._pixel_to_tile(y0, y1, 0)
        tx, ox = self._pixel_to_tile(x0, x1, 1)
        # runs of equal tile index (monotonic, so each tile is one contiguous run)
        ry = np.flatnonzero(np.diff(ty)) + 1
        rx = np.flatnonzero(np.diff(tx)) + 1
        yb, xb = np.r_[0, ry, len(ty)], np.r_[0, rx, len(tx)]

        def index(o: np.ndarray, a: int, b: int) -> Any:  # a slice where o is a plain run
            return slice(int(o[a]), int(o[b - 1]) + 1) if o[b - 1] - o[a] == b - a - 1 else o[a:b]

        cols = [(c, d, int(tx[c]), index(ox, c, d)) for c, d in itertools.pairwise(xb)]
        for a, b in itertools.pairwise(yb):
            row, iy = int(ty[a]), index(oy, a, b)
            for c, d, col, ix in cols:
                tile = cache.peek(key_of(row, col))
                if tile is None or tile.shape[0] == 1:  # missing or background
                    continue
                rows_ = tile[iy] if isinstance(iy, slice) else tile.take(iy, axis=0)
                out[a:b, c:d] = rows_[:, ix] if isinstance(ix, slice) else rows_.take(ix, axis=1)
        return out


def live_levels(
    level_shapes: Sequence[Sequence[int]],
    grid: LiveGrid,
    source: Callable[[], Any],
    *,
    coarsest: int = 512,
    canvas_max_px: int = CANVAS_MAX_PX,
) -> list[LiveLevel]:
    """One :class:`LiveLevel` per level of the H&E (``level_shapes``, level 0 first), then
    halved levels until the longest side is at most ``coarsest`` px: napari draws its thumbnail
    from the last level, which must stay small (the H&E may have a single level)."""
    shapes = [tuple(int(v) for v in s[:2]) for s in level_shapes]
    while max(shapes[-1]) > coarsest and min(shapes[-1]) > 1:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    h0, w0 = shapes[0]
    return [
        LiveLevel(s, grid, (h0 / s[0], w0 / s[1]), source, canvas_max_px=canvas_max_px)
        for s in shapes
    ]
