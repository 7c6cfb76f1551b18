"""Tests of napari_staindiffuser.tiling: grid, blend window, bounded-memory seamless stitching."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from napari_staindiffuser.tiling import (
    WINDOW_FLOOR,
    Stitcher,
    Tile,
    TileGrid,
    blend_window,
    read_tile,
    stitch,
    tile_rng_seed,
)

# (height, width, tile, overlap): tile/stride do not divide the image; last one is padded
CASES = [(100, 77, 32, 8), (50, 130, 16, 4), (20, 20, 32, 8)]


def _image(h, w, c=3, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (h, w, c)).astype(np.float32)


def _run(img, grid, model, *, order=None, **kw):
    st = Stitcher(grid, img.shape[2], **kw)
    for t in grid.tiles if order is None else order:
        st.add(t, model(read_tile(img, t, grid)))
    return st.finish()


def _box(a):
    return ndimage.uniform_filter(a, size=(3, 3, 1), mode="mirror")


# --------------------------------------------------------------------------- grid


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [*CASES, (64, 64, 32, 0), (1, 300, 8, 2)])
def test_grid_layout(h, w, tile, overlap):
    g = TileGrid.create(h, w, tile, overlap, multiple_of=8 if tile % 8 == 0 else 1)
    ph, pw = g.padded_shape
    assert (ph, pw) == (max(h, tile), max(w, tile))
    assert g.stride == tile - overlap
    tiles = g.tiles
    assert len(tiles) == len(g) == g.n_rows * g.n_cols
    assert [t.index for t in tiles] == list(range(len(g)))
    assert [(t.row, t.col) for t in tiles] == [divmod(i, g.n_cols) for i in range(len(g))]
    for starts, n in ((g.row_starts, ph), (g.col_starts, pw)):
        assert starts[0] == 0 and starts[-1] + tile == n  # last one ends exactly at the edge
        assert all(0 < b - a <= g.stride for a, b in itertools.pairwise(starts))
    cover = np.zeros((ph, pw), int)
    for t in tiles:
        assert t.size == tile and 0 <= t.y <= ph - tile and 0 <= t.x <= pw - tile
        cover[t.y : t.y + tile, t.x : t.x + tile] += 1
    assert cover.min() >= 1


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        ((100, 100, 36, 8), {"multiple_of": 8}, r"multiple of 8; got 36"),
        ((100, 100, 32, 32), {}, r"overlap < tile \(32\); got 32"),
        ((100, 100, 32, 40), {}, r"overlap < tile"),
        ((100, 100, 32, 7), {}, r"even .*got 7"),
        ((100, 100, 32, -2), {}, r"overlap: expected an integer >= 0; got -2"),
        ((0, 100, 32, 8), {}, r"height: expected an integer >= 1; got 0"),
        ((100, -5, 32, 8), {}, r"width: expected .* got -5"),
        ((100, 100, 0, 0), {}, r"tile: expected an integer >= 1; got 0"),
        ((100, 100, 32.5, 8), {}, r"tile: expected an integer"),
        ((100, 100, 32, 8), {"multiple_of": 0}, r"multiple_of: expected"),
    ],
)
def test_grid_validation(args, kw, match):
    with pytest.raises(ValueError, match=match):
        TileGrid.create(*args, **kw)


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="even"):
        TileGrid(10, 10, 8, 3)
    assert TileGrid(10, 10, np.int64(8), 2) == TileGrid.create(10, 10, 8, 2)


# --------------------------------------------------------------------------- window


@pytest.mark.parametrize(("size", "overlap"), [(32, 8), (16, 4), (32, 16), (8, 2), (128, 64)])
def test_blend_window_partition_of_unity(size, overlap):
    w = blend_window(size, overlap)
    assert w.shape == (size, size) and w.dtype == np.float32
    assert w.min() >= WINDOW_FLOOR and np.array_equal(w, w.T) and np.array_equal(w, w[::-1])
    assert np.all(w[overlap : size - overlap, overlap : size - overlap] == 1)
    i = int(np.argmax(np.diag(w)))
    prof = w[i] / np.sqrt(np.float64(w[i, i]))  # the 1-D profile (the window is separable)
    stride, n = size - overlap, 5
    total = np.zeros(stride * (n - 1) + size)
    for k in range(n):
        total[k * stride : k * stride + size] += prof
    assert np.allclose(total[overlap : total.size - overlap], 1, atol=1e-5)  # exact unity


@pytest.mark.parametrize(("size", "overlap"), [(32, 24), (16, 14), (32, 0), (1, 0), (8, 2)])
def test_blend_window_normalises_constant(size, overlap):
    w = blend_window(size, overlap)
    assert w.min() > 0
    stride, n = size - overlap, 6
    num, den = np.zeros(stride * (n - 1) + size), np.zeros(stride * (n - 1) + size)
    for k in range(n):
        num[k * stride : k * stride + size] += 3.25 * w[size // 2]
        den[k * stride : k * stride + size] += w[size // 2]
    assert den.min() > 0
    np.testing.assert_allclose(num / den, 3.25, rtol=1e-7)
    if overlap == 0:
        assert np.all(w == 1)


def test_blend_window_validation():
    with pytest.raises(ValueError, match=r"overlap < size \(8\); got 8"):
        blend_window(8, 8)
    with pytest.raises(ValueError, match="size: expected"):
        blend_window(0, 0)


# --------------------------------------------------------------------------- tiled == untiled


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), CASES)
@pytest.mark.parametrize("ordered", [True, False])
def test_pointwise_tiled_equals_untiled(h, w, tile, overlap, ordered):
    img = _image(h, w, 2, seed=h)
    grid = TileGrid.create(h, w, tile, overlap)
    order = sorted(grid.tiles, key=lambda t: (t.row, -t.col))  # ordered: any order in a row
    if not ordered:
        np.random.default_rng(1).shuffle(order)
    out = _run(img, grid, lambda a: np.tanh(2 * a), order=order, ordered=ordered)
    assert out.shape == img.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, np.tanh(2 * img), rtol=0, atol=1e-6)
    pairs = ((t, np.tanh(2 * read_tile(img, t, grid))) for t in order)
    np.testing.assert_allclose(stitch(grid, pairs, 2), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), CASES)
def test_box_filter_exact_off_tile_edges_bounded_on_them(h, w, tile, overlap):
    img = _image(h, w, 1, seed=3)
    grid = TileGrid.create(h, w, tile, overlap)
    err = np.abs(_run(img, grid, _box) - _box(img))[..., 0]
    ph, pw = grid.padded_shape
    edge = np.zeros((ph, pw), bool)  # pixels on an inner tile edge: the tile's filter differs
    for t in grid.tiles:
        e = t.size - 1
        for r in (t.y, t.y + e):
            if 0 < r < ph - 1:
                edge[r, t.x : t.x + t.size] = True
        for c in (t.x, t.x + e):
            if 0 < c < pw - 1:
                edge[t.y : t.y + t.size, c] = True
    edge = edge[:h, :w]
    assert err[~edge].max() <= 1e-6
    if edge.any():
        # an edge pixel is interior to a neighbour of weight ~1 and carries its own edge
        # weight ramp[0] = sin²(pi/(4 overlap)) at most; equal weights would give ~0.5 here
        ramp0 = np.sin(np.pi / (4 * overlap)) ** 2
        worst = np.abs(np.diff(img, axis=0)).max() * 2  # bound on |tile filter - filter|
        assert 0 < err[edge].max() <= ramp0 * worst


# --------------------------------------------------------------------------- seams


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [(100, 77, 32, 8), (90, 130, 16, 4)])
def test_no_seams_with_per_tile_offsets(h, w, tile, overlap):
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    img = (0.01 * yy + 0.02 * xx)[..., None]
    offset = 1.0

    def result(grid):
        st = Stitcher(grid, 1)
        for t in grid.tiles:  # checkerboard of offsets: the worst case for neighbours
            st.add(t, read_tile(img, t, grid) + offset * ((t.row + t.col) % 2))
        return st.finish()[..., 0] - img[..., 0]

    blended = result(TileGrid.create(h, w, tile, overlap))
    steps = max(np.abs(np.diff(blended, axis=a)).max() for a in (0, 1))
    assert steps <= 2 * offset / overlap
    hard = result(TileGrid.create(h, w, tile, 0))  # the metric does see seams
    assert max(np.abs(np.diff(hard, axis=a)).max() for a in (0, 1)) > 0.99 * offset


# --------------------------------------------------------------------------- streaming


def test_bounded_memory_and_progressive_flush(tmp_path):
    h, w, tile, overlap = 2000, 64, 32, 8
    grid = TileGrid.create(h, w, tile, overlap, multiple_of=8)
    img = _image(h, w, 2, seed=5)
    out = np.memmap(tmp_path / "out.f32", np.float32, "w+", shape=(h, w, 2))
    st = Stitcher(grid, 2, out=out)
    assert st.buffer_shape == (tile, w, 2)  # O(tile) rows, not O(height)
    done, first_flush = [], None
    for t in grid.tiles:
        got = st.add(t, np.tanh(2 * read_tile(img, t, grid)))
        if got and first_flush is None:
            first_flush = t.index
        for y0, y1 in got:
            assert y1 - y0 <= (grid.stride if y1 < h else tile)
            assert y0 == (done[-1][1] if done else 0)  # contiguous, increasing
            done.append((y0, y1))
        assert (done[-1][1] if done else 0) == grid.rows_done_after(t.index)
        assert st.buffer_shape == (tile, w, 2)
    assert first_flush == grid.n_cols - 1  # right after the first tile row
    assert len(done) == grid.n_rows and done[-1][1] == h
    assert st.finish() is out
    np.testing.assert_allclose(out, np.tanh(2 * img), atol=1e-6)


class _Recorder:
    """A zarr-like output: slice assignment only; remembers what was written when."""

    def __init__(self, shape):
        self.shape, self.dtype = shape, np.float32
        self.data = np.full(shape, np.nan, np.float32)
        self.writes = []

    def __setitem__(self, key, value):
        assert isinstance(key, slice) and key.step is None
        assert np.isnan(self.data[key]).all(), "a row was written twice"
        self.data[key] = value
        self.writes.append((key.start, key.stop, np.array(value, np.float32)))


@pytest.mark.parametrize(
    ("h", "ordered", "order"),
    # h=87: row starts 0, 24, 48, 55: tile row 1 reaches one pixel into the last band
    [(100, True, "grid"), (100, False, "center"), (87, False, "reversed")],
)
def test_flushed_rows_are_final(h, ordered, order):
    w = 77
    grid = TileGrid.create(h, w, 32, 8)
    img = _image(h, w, 3, seed=7)
    rec = _Recorder((h, w, 3))
    order = {
        "grid": grid.tiles,
        "center": grid.order_from_center(60, 30),
        "reversed": grid.tiles[::-1],
    }[order]
    st = Stitcher(grid, 3, out=rec, ordered=ordered)
    returned, n_before_last = [], 0
    for t in order:
        n_before_last = len(returned)
        returned += st.add(t, _box(read_tile(img, t, grid)))
    assert n_before_last > 0  # rows were flushed before the last tile, in both modes
    assert st.finish() is rec and not np.isnan(rec.data).any()
    covered, written = np.zeros(h, int), np.zeros(h, int)
    for y0, y1 in returned:
        covered[y0:y1] += 1
    for y0, y1, _ in rec.writes:
        written[y0:y1] += 1
    assert np.all(covered == 1) and np.all(written == 1)
    for y0, y1, snapshot in rec.writes:
        assert np.array_equal(snapshot, rec.data[y0:y1])
    ref = _run(img, grid, _box, ordered=False)
    np.testing.assert_allclose(rec.data, ref, atol=1e-6)


def test_stitcher_errors():
    grid = TileGrid.create(100, 77, 32, 8)
    t = grid.tiles
    st = Stitcher(grid, 1)
    with pytest.raises(ValueError, match=r"expected a tile of tile row 0; got tile row 1"):
        st.add(t[grid.n_cols], np.zeros((32, 32, 1)))
    st.add(t[1], np.zeros((32, 32, 1)))  # any order within a row is fine
    with pytest.raises(ValueError, match="each tile once"):
        st.add(t[1], np.zeros((32, 32, 1)))
    with pytest.raises(ValueError, match=r"values: expected shape \(32, 32, 1\); got \(32, 32\)"):
        st.add(t[0], np.zeros((32, 32)))
    with pytest.raises(ValueError, match="expected a tile of"):
        st.add(Tile(0, 0, 0, 0, 0, 16), np.zeros((16, 16, 1)))
    with pytest.raises(ValueError, match=rf"expected all {len(grid)} tiles added; got 1"):
        st.finish()
    with pytest.raises(ValueError, match=r"out: expected shape \(100, 77, 2\)"):
        Stitcher(grid, 2, out=np.zeros((100, 77, 1)))
    with pytest.raises(ValueError, match="tile_index"):
        grid.rows_done_after(len(grid))


# --------------------------------------------------------------------------- reading


def test_read_tile_dask_computes_only_the_window():
    computed = []

    def block(a, block_info=None):
        computed.append(block_info[None]["chunk-location"])
        return a + np.float32(block_info[None]["chunk-location"][0])

    base = da.zeros((256, 256, 3), chunks=(64, 64, 3), dtype=np.float32)
    lazy = base.map_blocks(block, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    grid = TileGrid.create(256, 256, 32, 8)
    tile = next(t for t in grid.tiles if (t.y, t.x) == (72, 0))  # inside chunk (1, 0)
    got = read_tile(lazy, tile, grid)
    assert computed == [(1, 0, 0)]
    assert got.shape == (32, 32, 3) and isinstance(got, np.ndarray) and np.all(got == 1)
    computed.clear()
    tile = next(t for t in grid.tiles if (t.y, t.x) == (48, 48))  # straddles 4 chunks
    read_tile(lazy, tile, grid)
    assert sorted(computed) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_read_tile_reflect_pads_small_regions():
    img = np.arange(20 * 5 * 2, dtype=np.uint8).reshape(20, 5, 2)
    grid = TileGrid.create(20, 5, 8, 2)
    t = grid.tiles[0]
    got = read_tile(img, t, grid)
    assert got.shape == (8, 8, 2) and got.dtype == np.uint8
    assert np.array_equal(got, np.pad(img[:8], ((0, 0), (0, 3), (0, 0)), mode="reflect"))
    one = np.full((1, 1, 3), 7.0)
    g1 = TileGrid.create(1, 1, 16, 2)
    assert len(g1) == 1 and np.all(read_tile(one, g1.tiles[0], g1) == 7)
    with pytest.raises(ValueError, match=r"image: expected shape \(1, 1, ...\); got \(20, 5, 2\)"):
        read_tile(img, g1.tiles[0], g1)


# --------------------------------------------------------------------------- order and seeds


def test_order_from_center_puts_the_containing_tile_first():
    grid = TileGrid.create(100, 77, 32, 8)
    for cy in range(0, 100, 3):
        for cx in range(0, 77, 4):
            order = grid.order_from_center(cy, cx)
            first = order[0]
            assert first.y <= cy < first.y + 32 and first.x <= cx < first.x + 32
    assert sorted(t.index for t in order) == list(range(len(grid)))
    order = grid.order_from_center(0, 0)
    assert order[0].index == 0 and order[-1].index == len(grid) - 1
    small = TileGrid.create(20, 20, 32, 8)
    assert small.order_from_center(10, 10) == small.tiles


def test_tile_rng_seed_is_positional_distinct_and_stable():
    grid = TileGrid.create(100, 77, 32, 8)
    seeds = {
        tile_rng_seed(s, t, level, sample)
        for s in (0, 1)
        for t in grid.tiles
        for level in (0, 2)
        for sample in (0, 1, 2)
    }
    assert len(seeds) == 2 * len(grid) * 2 * 3
    assert all(0 <= v < 2**63 for v in seeds)
    t = grid.tiles[5]
    # same position, different index/grid: same seed (position, not batch slot or order)
    other = Tile(index=0, row=0, col=0, y=t.y, x=t.x, size=64)
    assert tile_rng_seed(42, t, 1, 3) == tile_rng_seed(42, other, 1, 3)
    assert tile_rng_seed(42, Tile(0, 0, 0, 24, 48, 32)) == 7242651700860576781
    with pytest.raises(ValueError, match="seed: expected an integer >= 0; got -1"):
        tile_rng_seed(-1, t)
