"""Overlapping tiles over a region of any size, and seamless stitching in bounded memory.

Tile outputs are joined with a smooth window normalised by the summed weights (no seams);
:class:`Stitcher` accumulates into a rolling band of ``tile`` rows and writes finished rows to a
caller-given array. numpy only (dask/zarr read by duck typing). See ``docs/tiling.md``.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

__all__ = ["WINDOW_FLOOR", "Stitcher", "Tile", "TileGrid", "blend_window", "read_tile"]
__all__ += ["stitch", "tile_rng_seed"]
WINDOW_FLOOR = 1e-6  #: smallest weight of :func:`blend_window`: every pixel has weight > 0


def _int(name: str, value: Any, lo: int) -> int:
    v = None
    if not isinstance(value, bool) and hasattr(type(value), "__index__"):
        v = operator.index(value)
    if v is None or v < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}; got {value!r}")
    return v


def _starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # last tile shifted back to end exactly at the edge
    return tuple(starts)


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileGrid`; it lies fully inside the padded region.

    ``index`` is the position in grid order (row-major), ``(row, col)`` the grid coordinates,
    ``(y, x)`` the top-left corner in region coordinates (``>= 0``), ``size`` the side (px).
    """

    index: int
    row: int
    col: int
    y: int
    x: int
    size: int


@dataclass(frozen=True)
class TileGrid:
    """Overlapping square tiles covering a ``height x width`` region.

    Tiles start every ``stride = tile - overlap`` px; the last row/column is shifted back so
    that it ends exactly at the region edge (it then overlaps its neighbour by more than
    ``overlap``). A dimension smaller than ``tile`` is reflect-padded to ``tile``
    (:attr:`padded_shape`, :func:`read_tile`) and the output cropped back.

    ``height, width``: region size (``>= 1``); ``tile``: tile side (``>= 1``); ``overlap``:
    pixels shared by neighbouring tiles, even, ``0 <= overlap < tile``. Validated on
    construction (``ValueError`` giving expected vs got).
    """

    height: int
    width: int
    tile: int
    overlap: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("height", 1), ("width", 1), ("tile", 1), ("overlap", 0)):
            object.__setattr__(self, name, _int(name, getattr(self, name), lo))
        o = self.overlap
        if o >= self.tile:
            raise ValueError(f"overlap: expected 0 <= overlap < tile ({self.tile}); got {o}")
        if o % 2:
            raise ValueError(f"overlap: expected an even number of pixels; got {o}")

    @classmethod
    def create(
        cls, height: int, width: int, tile: int, overlap: int = 0, *, multiple_of: int = 1
    ) -> TileGrid:
        """Validated grid; ``tile`` must also be a multiple of ``multiple_of`` (8 for the model).

        Raises ``ValueError`` (expected vs got) for non-integer or non-positive sizes,
        ``tile % multiple_of != 0``, odd overlap or ``overlap >= tile``.
        """
        m = _int("multiple_of", multiple_of, 1)
        t = _int("tile", tile, 1)
        if t % m:
            raise ValueError(f"tile: expected a multiple of {m}; got {t}")
        return cls(height, width, t, overlap)

    @property
    def stride(self) -> int:
        """Distance between the starts of neighbouring tiles (except the last one), px."""
        return self.tile - self.overlap

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(max(height, tile), max(width, tile))``: the region the tiles cover."""
        return max(self.height, self.tile), max(self.width, self.tile)

    @cached_property
    def row_starts(self) -> tuple[int, ...]:
        """``y`` of each tile row, increasing."""
        return _starts(self.padded_shape[0], self.tile, self.stride)

    @cached_property
    def col_starts(self) -> tuple[int, ...]:
        """``x`` of each tile column, increasing."""
        return _starts(self.padded_shape[1], self.tile, self.stride)

    @property
    def n_rows(self) -> int:
        return len(self.row_starts)

    @property
    def n_cols(self) -> int:
        return len(self.col_starts)

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    @cached_property
    def _tiles(self) -> tuple[Tile, ...]:
        nc, t = self.n_cols, self.tile
        return tuple(
            Tile(r * nc + c, r, c, y, x, t)
            for r, y in enumerate(self.row_starts)
            for c, x in enumerate(self.col_starts)
        )

    @property
    def tiles(self) -> list[Tile]:
        """All tiles in grid order (row-major); ``tiles[i].index == i``."""
        return list(self._tiles)

    def order_from_center(self, cy: float, cx: float) -> list[Tile]:
        """All tiles, sorted by distance of their centre to the pixel ``(cy, cx)``.

        The key is the Chebyshev (max-norm) distance, then the Euclidean one, then the index,
        with tile centres at ``y + (size - 1) / 2``. This guarantees that the first tile
        contains the pixel whenever it lies in the padded region.
        """
        half = (self.tile - 1) / 2

        def key(t: Tile) -> tuple[float, float, int]:
            dy, dx = abs(t.y + half - cy), abs(t.x + half - cx)
            return max(dy, dx), dy * dy + dx * dx, t.index

        return sorted(self._tiles, key=key)

    def rows_done_after(self, tile_index: int) -> int:
        """Region rows (from the top) final once tiles ``0..tile_index`` (grid order) are added.

        Rows above tile row ``r`` are final once tile row ``r - 1`` is complete, all of them
        after the last tile: the flushes of an ordered :class:`Stitcher`.
        """
        i = _int("tile_index", tile_index, 0)
        if i >= len(self):
            raise ValueError(f"tile_index: expected 0 <= tile_index < {len(self)}; got {i}")
        r, c = divmod(i, self.n_cols)
        if c < self.n_cols - 1:
            return self.row_starts[r]
        return self.row_starts[r + 1] if r + 1 < self.n_rows else self.height


def read_tile(image: Any, tile: Tile, grid: TileGrid) -> np.ndarray:
    """Read one tile's window of a region.

    Parameters
    ----------
    image : ndarray, dask or zarr-like array, (H, W, C) (or (H, W)), any dtype
        The region; ``(H, W) == (grid.height, grid.width)``. Only the tile's window is sliced
        and, for a dask array, computed.
    tile : Tile
    grid : TileGrid

    Returns
    -------
    ndarray, (size, size, C), image dtype
        Reflect-padded (``np.pad(mode="reflect")``) where the region is smaller than a tile.
    """
    shape = tuple(image.shape)
    if shape[:2] != (grid.height, grid.width):
        raise ValueError(f"image: expected shape ({grid.height}, {grid.width}, ...); got {shape}")
    y0, x0, s = tile.y, tile.x, tile.size
    y1, x1 = min(y0 + s, grid.height), min(x0 + s, grid.width)
    window = image[y0:y1, x0:x1]
    window = np.asarray(window.compute() if hasattr(window, "compute") else window)
    pad = [(0, s - (y1 - y0)), (0, s - (x1 - x0))] + [(0, 0)] * (window.ndim - 2)
    if pad[0][1] or pad[1][1]:
        window = np.pad(window, pad, mode="reflect")
    return window


def blend_window(size: int, overlap: int) -> np.ndarray:
    """Blending weights of one tile.

    The 1-D profile is 1 in the interior with a raised-cosine (Hann) ramp
    ``sin(pi/2 * (i + 0.5) / overlap) ** 2``, ``i < overlap``, on each side (the minimum of
    both ramps where they cross, for ``overlap > size / 2``); the window is its outer product,
    floored at :data:`WINDOW_FLOOR`. For ``overlap <= size / 2`` windows shifted by
    ``size - overlap`` sum to 1 (up to the floor) wherever two ramps meet.

    Parameters
    ----------
    size, overlap : int
        Tile side ``>= 1``; ramp width ``0 <= overlap < size`` (0 gives all ones).

    Returns
    -------
    ndarray, (size, size) float32, strictly positive, symmetric
    """
    size, overlap = _int("size", size, 1), _int("overlap", overlap, 0)
    if overlap >= size:
        raise ValueError(f"overlap: expected 0 <= overlap < size ({size}); got {overlap}")
    w = np.ones(size, np.float64)
    if overlap:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        w[:overlap] = ramp
        w[size - overlap :] = np.minimum(w[size - overlap :], ramp[::-1])
    return np.maximum(np.outer(w, w), WINDOW_FLOOR).astype(np.float32)


class Stitcher:
    """Weighted accumulation of tile outputs into a caller-given array; normalises on flush.

    Each tile adds ``values * window`` and ``window``; a row is normalised (divided by the
    summed window) and written to ``out`` once no future tile touches it, and never again.

    ``ordered=True`` (default, bounded memory): tiles must come tile row by tile row in grid
    order (any order *within* a tile row, e.g. by batch). The accumulators are a rolling band
    of ``tile`` rows: ``(tile, W', C)`` plus ``(tile, W')`` float32, independent of the region
    height; a tile from another row raises ``ValueError``. ``ordered=False``: any order, with
    full-size ``(H', W', C)`` accumulators; rows are still flushed as soon as every tile
    touching them has been added.

    Parameters
    ----------
    grid : TileGrid
    channels : int
        C, the number of output channels (e.g. RGB + mask probability).
    out : array, (H, W, C), optional
        Receives the result by slice assignment ``out[y0:y1] = block`` (numpy, np.memmap,
        zarr...). Default: ``np.zeros((H, W, C), dtype)``.
    dtype : numpy dtype
    ordered : bool
    """

    def __init__(
        self,
        grid: TileGrid,
        channels: int,
        *,
        out: Any = None,
        dtype: Any = np.float32,
        ordered: bool = True,
    ) -> None:
        self.grid = grid
        self.channels = _int("channels", channels, 1)
        shape = (grid.height, grid.width, self.channels)
        if out is None:
            out = np.zeros(shape, dtype)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out: expected shape {shape}; got {tuple(out.shape)}")
        self._out = out
        self.ordered = bool(ordered)
        ph, pw = grid.padded_shape
        rows = grid.tile if self.ordered else ph
        self._acc = np.zeros((rows, pw, self.channels), np.float32)
        self._wsum = np.zeros((rows, pw), np.float32)
        self._base = self._row = 0  # region row of buffer row 0; the open tile row (ordered)
        self._window = blend_window(grid.tile, grid.overlap)
        self._added = np.zeros(len(grid), bool)
        self._left = [grid.n_cols] * grid.n_rows
        ys = grid.row_starts
        # band r = padded rows [ys[r], ys[r+1]): touched by tile rows first[r]..r only
        self._bands = [(y, ys[r + 1] if r + 1 < len(ys) else ph) for r, y in enumerate(ys)]
        self._first = [bisect.bisect_right(ys, y - grid.tile) for y in ys]

    @property
    def out(self) -> Any:
        """The output array, (H, W, C); rows are final once returned by :meth:`add`."""
        return self._out

    @property
    def buffer_shape(self) -> tuple[int, int, int]:
        """Shape of the value accumulator: ``(tile, W', C)`` when ordered, else ``(H', W', C)``."""
        return tuple(self._acc.shape)

    def add(self, tile: Tile, values: Any) -> list[tuple[int, int]]:
        """Accumulate one tile's output.

        Parameters
        ----------
        tile : Tile
            A tile of ``grid``, not added before.
        values : array, (size, size, C) float
            The model output for the tile (padded region included).

        Returns
        -------
        list of (int, int)
            Region row ranges ``[y0, y1)`` normalised and written to ``out`` by this call,
            increasing, merged when adjacent; usually empty.
        """
        g = self.grid
        if not (0 <= tile.index < len(g)) or g._tiles[tile.index] != tile:
            raise ValueError(f"tile: expected a tile of {g}; got {tile}")
        if self._added[tile.index]:
            raise ValueError(f"tile: expected each tile once; got tile {tile.index} again")
        s = tile.size
        v = np.asarray(values)
        if v.shape != (s, s, self.channels):
            raise ValueError(f"values: expected shape {(s, s, self.channels)}; got {v.shape}")
        if self.ordered and tile.row != self._row:
            msg = f"expected a tile of tile row {self._row}; got tile row {tile.row}"
            raise ValueError(f"tile {tile.index}: {msg} (use ordered=False for any order)")
        a = tile.y - self._base
        self._acc[a : a + s, tile.x : tile.x + s] += v * self._window[..., None]
        self._wsum[a : a + s, tile.x : tile.x + s] += self._window
        self._added[tile.index] = True
        self._left[tile.row] -= 1
        return [] if self._left[tile.row] else self._close_row(tile.row)

    def _close_row(self, r: int) -> list[tuple[int, int]]:
        if self.ordered:
            lo, hi = self._bands[r]
            done = [self._flush(lo, hi)]
            if r + 1 < self.grid.n_rows:  # roll the band down to the next tile row
                d = hi - self._base
                keep = self._acc.shape[0] - d
                for buf in (self._acc, self._wsum):
                    buf[:keep], buf[keep:] = buf[d:], 0
                self._base, self._row = hi, r + 1
            return done
        done: list[tuple[int, int]] = []
        for j in range(r, self.grid.n_rows):
            if self._first[j] > r:
                break
            if not any(self._left[self._first[j] : j + 1]):
                y0, y1 = self._flush(*self._bands[j])
                if done and done[-1][1] == y0:
                    y0 = done.pop()[0]
                done.append((y0, y1))
        return done

    def _flush(self, lo: int, hi: int) -> tuple[int, int]:
        y1 = min(hi, self.grid.height)  # lo < height always: only the last band is cropped
        a, b, w = lo - self._base, y1 - self._base, self.grid.width
        self._out[lo:y1] = self._acc[a:b, :w] / self._wsum[a:b, :w, None]
        return lo, y1

    def finish(self) -> Any:
        """Return ``out``, (H, W, C), fully written (each row by the :meth:`add` completing it).

        Raises ``ValueError`` if tiles are missing: their rows would have no weight.
        """
        n, got = len(self.grid), int(self._added.sum())
        if got != n:
            first = int(np.argmin(self._added))
            raise ValueError(
                f"finish: expected all {n} tiles added; got {got} (first missing: {first})"
            )
        return self._out


def stitch(grid: TileGrid, tiles_values: Iterable[tuple[Tile, Any]], channels: int) -> np.ndarray:
    """Stitch ``(tile, values)`` pairs given in any order: ndarray, (H, W, channels) float32."""
    st = Stitcher(grid, channels, ordered=False)
    for tile, values in tiles_values:
        st.add(tile, values)
    return st.finish()


def tile_rng_seed(seed: int, tile: Tile, level: int = 0, sample: int = 0) -> int:
    """Deterministic 63-bit seed from ``(seed, level, tile.y, tile.x, sample)``.

    Derived with ``np.random.SeedSequence(seed, spawn_key=(level, y, x, sample))``, so noise
    depends on the tile's position, not on its batch slot, processing order or grid.

    Returns
    -------
    int
        In ``[0, 2**63)``.
    """
    key = [_int(n, v, 0) for n, v in (("level", level), ("y", tile.y), ("x", tile.x))]
    ss = np.random.SeedSequence(_int("seed", seed, 0), spawn_key=(*key, _int("sample", sample, 0)))
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))
