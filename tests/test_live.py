"""Stain as you pan, core (no Qt): the live grid, the cache, the scheduler and the layer data."""

from __future__ import annotations

import numpy as np
import pytest

from napari_staindiffuser.events import SampleStep
from napari_staindiffuser.inference import TileOutput
from napari_staindiffuser.live import (
    LiveGrid,
    LiveLevel,
    LiveStainer,
    LiveTile,
    TileCache,
    TileKey,
    live_levels,
)

from conftest import untrained_model


class FakeModel:
    """A TileModel whose output is the input (so geometry is visible), with hooks per step."""

    stains = ("A", "B")
    tile = 16
    multiple_of = 8
    mpp = 1.0

    def __init__(self, steps: int = 3, on_step=None):
        self.steps, self.on_step, self.calls = steps, on_step, []

    def run(self, tiles, seeds, stains):
        self.calls.append((len(tiles), list(seeds)))
        for i in range(self.steps):
            if self.on_step is not None:
                self.on_step(i)
            yield SampleStep(step=i + 1, total=self.steps, timestep=0)
        x = tiles.astype(np.float32) / 255.0
        yield TileOutput(images={s: x for s in stains}, scores={})


def _image(h=80, w=96, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _stainer(image, model, grid, cache=None, **kw):
    return LiveStainer(
        image,
        model,
        grid,
        stains=kw.pop("stains", ["A"]),
        seed=kw.pop("seed", 3),
        cache=cache if cache is not None else TileCache(),
        model_id="abc",
        sampler="ddim",
        steps=2,
        skip_background=kw.pop("skip_background", False),
        **kw,
    )


def test_grid_geometry_and_seeds():
    g = LiveGrid.for_model((80, 96), level=1, model_tile=16, model_mpp=1.0, level_mpp=0.5)
    assert (g.halo, g.core, g.scale) == (2, 12, 2.0)
    # 80 x 96 px at 0.5 µm/px is 40 x 48 model px: 4 x 4 tiles of 12
    assert (g.n_rows, g.n_cols) == (4, 4)
    assert g.window(1, 2) == ((12 - 2) * 2, (24 - 2) * 2, 32, 32)
    assert g.core_box(1, 2) == (24, 48, 24, 24)
    # the seed depends on (seed, level, position) only
    assert g.seed(0, 1, 2) == g.seed(0, 1, 2) != g.seed(0, 2, 1)
    g2 = LiveGrid.for_model((80, 96), level=2, model_tile=16, model_mpp=1.0, level_mpp=0.5)
    assert g.seed(0, 1, 2) != g2.seed(0, 1, 2) and g.seed(0, 1, 2) != g.seed(1, 1, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        LiveGrid.for_model((8, 8), level=0, model_tile=20, model_mpp=1.0, level_mpp=1.0)
    with pytest.raises(ValueError, match="halo"):
        LiveGrid((8, 8), 0, 1.0, 16, 8)


def test_visible_tiles_are_those_in_view_nearest_the_centre_first():
    g = LiveGrid((200, 200), 0, 1.0, 16, 2, downsample=(2.0, 2.0))  # core 12 read px = 24 L0 px
    tiles = g.visible_tiles((100, 100, 60, 60))  # level-0 px: read px 50..80 -> tiles 4..6
    assert sorted(tiles) == [(r, c) for r in range(4, 7) for c in range(4, 7)]
    assert tiles[0] == (5, 5)  # holds the centre (130, 130) L0 = 65 read px
    d = [max(abs(r + 0.5 - 130 / 24), abs(c + 0.5 - 130 / 24)) for r, c in tiles]
    assert d == sorted(d)
    assert g.visible_tiles((100, 100, 60, 60), max_tiles=4) == tiles[:4]
    assert len(g.visible_tiles((100, 100, 60, 60), margin=1)) == 25
    assert g.visible_tiles((0, 0, 0, 10)) == []
    assert g.visible_tiles((10_000, 0, 5, 5)) == []  # past the image


def test_cache_keys_and_lru_eviction():
    k = [TileKey("m", "ddim", 2, 0, 0, 0, i, "A") for i in range(4)]
    a = np.zeros((4, 4, 4), np.uint8)  # 64 bytes
    cache = TileCache(max_bytes=3 * 64)
    for key in k[:3]:
        cache.put(key, a)
    assert cache.get(k[0]) is not None  # touch 0: 1 is now the oldest
    cache.put(k[3], a)
    assert k[1] not in cache and all(x in cache for x in (k[0], k[2], k[3]))
    assert cache.nbytes == 3 * 64 and cache.evicted == 1
    cache.put(k[0], np.zeros((100, 100, 4), np.uint8))  # larger than the budget: dropped
    assert k[0] not in cache and cache.nbytes == 2 * 64
    # every setting is part of the key
    assert (
        len(
            {
                TileKey("m", "ddim", 2, 0, 0, 0, 0, "A"),
                TileKey("m", "ddim", 3, 0, 0, 0, 0, "A"),
                TileKey("m", "ddpm", 2, 0, 0, 0, 0, "A"),
                TileKey("n", "ddim", 2, 0, 0, 0, 0, "A"),
                TileKey("m", "ddim", 2, 1, 0, 0, 0, "A"),
                TileKey("m", "ddim", 2, 0, 1, 0, 0, "A"),
                TileKey("m", "ddim", 2, 0, 0, 0, 0, "B"),
            }
        )
        == 7
    )
    with pytest.raises(ValueError, match="max_bytes"):
        TileCache(-1)


def test_tiles_are_the_cropped_windows_and_reused_from_the_cache():
    img = _image()
    g = LiveGrid.for_model((80, 96), level=0, model_tile=16, model_mpp=1.0, level_mpp=1.0)
    model = FakeModel()
    cache = TileCache()
    st = _stainer(img, model, g, cache, stains=["A", "B"], batch=3)
    st.set_view([(1, 1), (0, 0), (2, 3)])
    events = list(st.run(until_idle=True))
    tiles = [(e.row, e.col) for e in events if isinstance(e, LiveTile)]
    assert tiles == [(1, 1), (0, 0), (2, 3)]  # in the order asked
    # the first batch of a view is its central tile alone, then batches of 3
    assert [c[0] for c in model.calls] == [1, 2]
    seeds = model.calls[0][1] + model.calls[1][1]
    assert seeds == [g.seed(3, 1, 1), g.seed(3, 0, 0), g.seed(3, 2, 3)]
    # halo cropped: the core of tile (1, 1) is exactly the image under it (identity model)
    core = cache.get(st.key(1, 1, "A"))
    assert core.shape == (12, 12, 4) and (core[..., 3] == 255).all()
    np.testing.assert_array_equal(core[..., :3], img[12:24, 12:24])
    np.testing.assert_array_equal(cache.get(st.key(1, 1, "B")), core)
    # tile (0, 0): its halo reaches outside the image (reflected), its core does not
    np.testing.assert_array_equal(cache.get(st.key(0, 0, "A"))[..., :3], img[:12, :12])
    # unchanged settings: nothing is recomputed
    st2 = _stainer(img, model, g, cache, stains=["A", "B"])
    st2.set_view([(0, 0), (1, 1)])
    list(st2.run(until_idle=True))
    assert len(model.calls) == 2 and st2.stats.computed == 0
    # another seed: recomputed
    st3 = _stainer(img, model, g, cache, stains=["A"], seed=4)
    st3.set_view([(0, 0)])
    list(st3.run(until_idle=True))
    assert len(model.calls) == 3 and st3.stats.computed == 1


def test_out_of_view_tiles_are_dropped_and_running_ones_cancelled():
    img = _image()
    g = LiveGrid.for_model((80, 96), level=0, model_tile=16, model_mpp=1.0, level_mpp=1.0)
    holder = {}

    def on_step(i):  # the user pans away while the first batch is sampling
        if i == 1 and not holder.get("panned"):
            holder["panned"] = True
            holder["st"].set_view([(3, 3)])

    model = FakeModel(steps=4, on_step=on_step)
    st = _stainer(img, model, g, batch=2)
    holder["st"] = st
    st.set_view([(0, 0), (0, 1), (1, 0), (1, 1)])
    assert st.queue() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    events = list(st.run(until_idle=True))
    steps = [e for e in events if isinstance(e, SampleStep)]
    done = [(e.row, e.col) for e in events if isinstance(e, LiveTile)]
    assert done == [(3, 3)]  # the first batch was abandoned, the rest never started
    assert st.stats.cancelled == 1 and st.stats.dropped == 3
    assert len(steps) == 1 + 4  # stopped after the pan's step (on_step(1)), then (3, 3)
    assert not any(st.is_cached(t) for t in [(0, 0), (0, 1), (1, 0), (1, 1)])
    assert st.status().queued == 0 and st.status().computed == 1


def test_stop_ends_run_while_idle_and_between_steps():
    img = _image()
    g = LiveGrid.for_model((80, 96), level=0, model_tile=16, model_mpp=1.0, level_mpp=1.0)
    st = _stainer(img, FakeModel(steps=5, on_step=lambda i: i == 2 and st.stop()), g)
    st.set_view([(0, 0)])
    events = list(st.run())  # not until_idle: only stop() ends it
    assert sum(isinstance(e, SampleStep) for e in events) == 2
    assert not any(isinstance(e, LiveTile) for e in events) and st.stats.cancelled == 1


def test_background_tiles_are_skipped():
    img = np.full((80, 96, 3), 245, np.uint8)  # glass
    img[:24, :24] = _image(24, 24) // 2  # tissue-ish dark pixels in tiles (0..1, 0..1)
    g = LiveGrid.for_model((80, 96), level=0, model_tile=16, model_mpp=1.0, level_mpp=1.0)
    model = FakeModel()
    st = _stainer(img, model, g, skip_background=True)
    st.set_view([(0, 0), (5, 6)])
    events = [e for e in st.run(until_idle=True) if isinstance(e, LiveTile)]
    assert [(e.row, e.col, e.blank) for e in events] == [(0, 0, False), (5, 6, True)]
    assert sum(c[0] for c in model.calls) == 1


def test_level_arrays_render_the_cache_at_every_level():
    img = _image(80, 96)
    g = LiveGrid.for_model(
        (40, 48), level=1, model_tile=16, model_mpp=1.0, level_mpp=1.0, downsample=2.0
    )  # read level 1 (40 x 48) of an 80 x 96 level 0, level 1 at the model's µm/px
    lvl1 = img[::2, ::2].copy()
    cache = TileCache()
    st = _stainer(lvl1, FakeModel(), g, cache)
    st.set_view([(r, c) for r in range(g.n_rows) for c in range(g.n_cols)])
    list(st.run(until_idle=True))
    src = lambda: (cache, lambda r, c: st.key(r, c, "A"))  # noqa: E731
    levels = live_levels([(80, 96), (40, 48), (20, 24)], g, src, canvas_max_px=0)
    assert [lv.shape for lv in levels] == [(80, 96, 4), (40, 48, 4), (20, 24, 4)]
    # the read level is the identity; level 0 is its 2x nearest upsampling; level 2 every other
    np.testing.assert_array_equal(levels[1][:, :, :3], lvl1)
    np.testing.assert_array_equal(levels[0][:, :, :3], np.repeat(np.repeat(lvl1, 2, 0), 2, 1))
    np.testing.assert_array_equal(levels[2][:, :, :3], lvl1[1::2, 1::2])
    # napari-style access: a window, a step, integer indices, __array__
    np.testing.assert_array_equal(levels[1][5:17, 30:41], levels[1][:, :][5:17, 30:41])
    np.testing.assert_array_equal(levels[1][::3, ::2], np.asarray(levels[1])[::3, ::2])
    assert levels[1][3, 4].shape == (4,) and levels[1][3].shape == (48, 4)
    np.testing.assert_array_equal(levels[1][-1, -1, :3], lvl1[-1, -1])
    # painted canvases (coarse levels) draw the same, and follow tiles that arrive later
    painted = live_levels([(80, 96), (40, 48), (20, 24)], g, src)
    assert all(lv.use_canvas for lv in painted)
    for a, b in zip(levels, painted, strict=True):
        np.testing.assert_array_equal(a[:, :], b[:, :])
    cache.put(st.key(0, 0, "A"), np.full((g.core, g.core, 4), 7, np.uint8))
    for a, b in zip(levels, painted, strict=True):
        np.testing.assert_array_equal(a[3:30, 2:40], b[3:30, 2:40])
    assert (painted[1][:12, :12] == 7).all()
    # a tile that is not cached is transparent
    cache.clear()
    assert not levels[0][:, :].any()
    assert not live_levels([(80, 96)], g, src)[0][:, :].any()
    # a single big level gets halved levels added, so napari's thumbnail level stays small
    shapes = [lv.shape[:2] for lv in live_levels([(2000, 900)], g, lambda: None)]
    assert shapes == [(2000, 900), (1000, 450), (500, 225)]
    none = LiveLevel((10, 10), g, (1.0, 1.0), lambda: None)
    assert none[:, :].shape == (10, 10, 4) and not none[:, :].any()


def test_live_tile_equals_iter_stain_on_its_window():
    """A live tile is what the normal path (iter_stain over the tile's window, one tile) makes
    with the same noise seed, cropped to the core. iter_stain seeds a tile by its position in
    *its* region (here (0, 0)), the live tile by its position in the slide, so the test hands
    iter_stain the live seed through a thin TileModel wrapper; everything else is the normal
    path. They differ by at most 1/255: iter_stain divides by its blending weight."""
    from napari_staindiffuser.inference import DiffusionTileModel, stain_region

    model = untrained_model(32)
    tm = DiffusionTileModel(model, sampler="dpmsolver++", steps=2)
    img = _image(96, 96, seed=5)
    g = LiveGrid.for_model((96, 96), level=0, model_tile=32, model_mpp=1.0, level_mpp=1.0)
    cache = TileCache()
    st = _stainer(img, tm, g, cache, stains=["CD3", "CK8/18"], seed=11)
    st.set_view([(1, 1)])
    list(st.run(until_idle=True))
    y, x, h, w = (int(v) for v in g.window(1, 1))
    live_seed = g.seed(11, 1, 1)

    class WithSeed:
        def __init__(self, inner):
            self.__dict__.update(inner.__dict__)
            self.inner = inner

        def run(self, tiles, seeds, stains):
            return self.inner.run(tiles, [live_seed] * len(seeds), stains)

        def decode_mask(self, stain, score):
            return self.inner.decode_mask(stain, score)

        def describe(self):
            return self.inner.describe()

    ref = stain_region(img, WithSeed(tm), region=(y, x, h, w), image_mpp=1.0, seed=0)
    for s in ("CD3", "CK8/18"):
        core = cache.get(st.key(1, 1, s))[..., :3].astype(int)
        want = ref.images[s][g.halo : g.halo + g.core, g.halo : g.halo + g.core].astype(int)
        assert np.abs(core - want).max() <= 1
    assert ref.images["CD3"].std() > 1  # not a constant picture


def test_bad_inputs():
    g = LiveGrid((80, 96), 0, 1.0, 16, 2)
    with pytest.raises(ValueError, match="uint8"):
        _stainer(np.zeros((80, 96, 3), np.float32), FakeModel(), g)
    with pytest.raises(ValueError, match="grid is for"):
        _stainer(_image(40, 40), FakeModel(), g)
    with pytest.raises(ValueError, match="at least one stain"):
        _stainer(_image(), FakeModel(), g, stains=[])
