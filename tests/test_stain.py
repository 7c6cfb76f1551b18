"""Tests of napari_staindiffuser.stain: DAB masks, whole-slide statistics, tiling, distance maps."""

from __future__ import annotations

import dataclasses
import math

import dask.array as da
import numpy as np
import pytest
from skimage import data
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

from napari_staindiffuser import stain
from napari_staindiffuser.events import Progress
from napari_staindiffuser.stain import (
    DAB_MAX,
    HIST_BINS,
    PRESETS,
    DabStats,
    MaskPreset,
    MaskTile,
    ThresholdRule,
    clean_mask,
    coarse_mask,
    compute_coarse_mask,
    dab_channel,
    dab_statistics,
    distance_target,
    distance_to_mask,
    get_preset,
    iter_coarse_masks,
    threshold_value,
    tissue_mask,
)


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    return data.immunohistochemistry()  # (512, 512, 3) uint8, haematoxylin + DAB, colon


@pytest.fixture(scope="module")
def ihc_values(ihc) -> np.ndarray:
    """DAB values of the tissue pixels, recomputed independently of the module."""
    dab = rgb2hed(ihc)[..., 2]
    od = -np.log(np.maximum(ihc, 1) / 255.0)
    return dab[od.mean(-1) > 0.1]


@pytest.fixture(scope="module")
def ihc_stats(ihc) -> DabStats:
    return dab_statistics(ihc)


# --------------------------------------------------------------------------- real IHC image


def test_dab_channel_matches_rgb2hed(ihc):
    d = dab_channel(ihc)
    assert d.shape == (512, 512) and d.dtype == np.float32
    np.testing.assert_allclose(d, rgb2hed(ihc)[..., 2], rtol=1e-6, atol=1e-7)
    assert d.min() >= 0.0 and d.max() <= DAB_MAX + 1e-6
    # float input in [0, 1] gives the same channel
    np.testing.assert_allclose(dab_channel(ihc / 255.0), d, rtol=1e-6, atol=1e-7)


def test_statistics_match_numpy(ihc_stats, ihc_values):
    v = ihc_values
    assert ihc_stats.n == v.size == 245622
    assert ihc_stats.mean == pytest.approx(v.mean(), rel=1e-9)
    assert ihc_stats.std == pytest.approx(v.std(), rel=1e-9)
    t = threshold_value(ihc_stats, "CD3")
    assert t == pytest.approx(v.mean() + 2 * v.std(), rel=1e-9)
    # Otsu from the streamed histogram vs skimage on the values: within the two bin widths
    tol = (v.max() - v.min()) / 256 + DAB_MAX / HIST_BINS
    assert abs(ihc_stats.otsu - threshold_otsu(v)) <= tol
    fine = threshold_otsu(v, nbins=HIST_BINS)
    assert abs(ihc_stats.otsu - fine) <= 2 * DAB_MAX / HIST_BINS
    assert threshold_value(ihc_stats, "CK8/18") == ihc_stats.otsu


def test_tissue_only_excludes_glass(ihc):
    all_px = dab_statistics(ihc, tissue_only=False)
    d = rgb2hed(ihc)[..., 2]
    assert all_px.n == d.size
    assert all_px.mean == pytest.approx(d.mean(), rel=1e-9)
    assert all_px.std == pytest.approx(d.std(), rel=1e-9)
    assert dab_statistics(ihc).mean > all_px.mean  # glass (DAB ~ 0) left out


@pytest.mark.parametrize(
    ("stain_name", "frac_range", "ratio_min"),
    [("CD3", (0.005, 0.10), 3.0), ("CK8/18", (0.25, 0.70), 4.0)],
)
def test_mask_on_real_image(ihc, stain_name, frac_range, ratio_min):
    d = dab_channel(ihc)
    m = coarse_mask(ihc, stain_name)
    assert m.shape == (512, 512) and m.dtype == bool
    frac = m.mean()
    assert frac_range[0] < frac < frac_range[1], frac
    inside, outside = float(d[m].mean()), float(d[~m].mean())
    assert inside > ratio_min * outside and inside - outside > 0.07, (inside, outside)


def test_threshold_sources(ihc, ihc_stats):
    p = get_preset("CD3")
    t = threshold_value(ihc_stats, p)
    own = coarse_mask(ihc, p)
    assert np.array_equal(own, coarse_mask(ihc, p, stats=ihc_stats))
    assert np.array_equal(own, coarse_mask(ihc, p, threshold=t))
    assert np.array_equal(own, clean_mask(dab_channel(ihc) > t, p))
    # explicit threshold wins over stats
    assert np.array_equal(coarse_mask(ihc, p, threshold=10.0, stats=ihc_stats), np.zeros_like(own))
    # a crop thresholded with the whole-slide stats differs from its own stats (glass-rich crop)
    crop = ihc[250:450, :200]
    assert dab_statistics(crop).mean != pytest.approx(ihc_stats.mean, rel=1e-3)
    assert not np.array_equal(coarse_mask(crop, p), coarse_mask(crop, p, stats=ihc_stats))


def test_tissue_mask(ihc):
    t = tissue_mask(ihc)
    raw = tissue_mask(ihc, min_size=0, max_hole_size=0, closing_radius=0)
    assert t.dtype == bool and t.shape == (512, 512)
    assert 0.90 < raw.mean() < 0.96 and 0.95 < t.mean() < 0.99
    assert not t[335:385, 0:15].any()  # glass on the left edge
    assert t[100:200, 50:150].all()  # epithelium
    white = np.full((64, 64, 3), 245, np.uint8)
    assert not tissue_mask(white).any()
    assert dab_statistics(white).n == 0
    with pytest.raises(ValueError, match="no tissue"):
        coarse_mask(white, "CD3")
    assert not coarse_mask(white, "CD3", threshold=0.1).any()


# --------------------------------------------------------------------------- streaming / dask


def test_statistics_dask_uneven_chunks(ihc, ihc_stats):
    arr = da.from_array(ihc, chunks=((100, 212, 200), (77, 300, 135), (2, 1)))
    st = dab_statistics(arr)
    assert st.n == ihc_stats.n
    assert st.mean == pytest.approx(ihc_stats.mean, rel=1e-12)
    assert st.std == pytest.approx(ihc_stats.std, rel=1e-12)
    assert st.otsu == ihc_stats.otsu  # same values -> same histogram


def test_statistics_strided(ihc):
    big = np.tile(ihc, (3, 3, 1))[:1500, :1400]
    st = dab_statistics(big, max_pixels=600_000)  # s = ceil(sqrt(2.1e6 / 6e5)) = 2
    ref = dab_statistics(np.ascontiguousarray(big[::2, ::2]), max_pixels=10**9)
    assert st == ref
    st_dask = dab_statistics(da.from_array(big, chunks=(333, 512, 3)), max_pixels=600_000)
    assert st_dask.n == ref.n and st_dask.otsu == ref.otsu
    assert st_dask.mean == pytest.approx(ref.mean, rel=1e-12)


# --------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("tile", [100, 128, 200])
@pytest.mark.parametrize("stain_name", ["CD3", "CK8/18"])
def test_tiled_equals_untiled(ihc, ihc_stats, tile, stain_name):
    p = get_preset(stain_name)
    ref = coarse_mask(ihc, p)
    assert np.array_equal(compute_coarse_mask(ihc, p, tile=tile), ref)
    if tile == 128:  # dask input, whole-slide stats given
        arr = da.from_array(ihc, chunks=(200, 300, 3))
        assert np.array_equal(compute_coarse_mask(arr, p, tile=tile, stats=ihc_stats), ref)


def test_iter_events(ihc):
    events = list(iter_coarse_masks(ihc, "CD3", tile=200))
    prog = [e for e in events if isinstance(e, Progress)]
    tiles = [e for e in events if isinstance(e, MaskTile)]
    assert len(tiles) == 9 and len(prog) == 10
    assert prog[0].done == 0 and prog[-1].done == prog[-1].total == 9
    assert all(e.stage == "masks" for e in prog) and prog[-1].eta_s == 0.0
    assert [(t.y, t.x) for t in tiles][:4] == [(0, 0), (0, 200), (0, 400), (200, 0)]
    assert tiles[-1].mask.shape == (112, 112) and tiles[-1].mask.dtype == bool
    assert isinstance(events[1], MaskTile) and isinstance(events[2], Progress)


def test_stats_from_reduced_level(ihc):
    level = ihc[::2, ::2]
    st = dab_statistics(level)
    p = get_preset("CD3")
    got = compute_coarse_mask(ihc, p, tile=256, stats_from=level)
    assert np.array_equal(got, coarse_mask(ihc, p, stats=st))


def _line_image(fg: np.ndarray) -> np.ndarray:
    """RGB with brown (DAB) where fg, white glass elsewhere."""
    rgb = np.full((*fg.shape, 3), 250, np.uint8)
    rgb[fg] = (120, 80, 40)
    return rgb


def test_halo_guarantee_is_tight():
    # a 1-px line hole of area A and a 1-px line object of area S, starting at the tile seam
    a, s_ = 12, 9
    p = MaskPreset(
        "t",
        "fixed",
        fixed_threshold=0.1,
        opening_radius=0,
        closing_radius=0,
        max_hole_size=a,
        min_object_size=s_,
    )
    fg = np.zeros((60, 80), bool)
    fg[5:15, :] = True
    fg[10, 39 : 39 + a] = False  # hole x in [39, 39 + a): starts in the last core column
    fg[30, 39 : 39 + s_] = True  # object of exactly S px: kept
    rgb = _line_image(fg)
    ref = coarse_mask(rgb, p)
    assert ref[10, 39:51].all() and ref[30, 39:48].all()
    assert p.required_halo == a + s_ - 1
    assert np.array_equal(compute_coarse_mask(rgb, p, tile=40), ref)
    hole_only = dataclasses.replace(p, min_object_size=0)
    assert np.array_equal(compute_coarse_mask(rgb, hole_only, tile=40, halo=a), ref)
    bad = compute_coarse_mask(rgb, hole_only, tile=40, halo=a - 1)
    assert not bad[10, 39]  # hole touches the window edge -> left open
    obj_only = dataclasses.replace(p, fill_holes=False)
    ref2 = coarse_mask(rgb, obj_only)
    assert np.array_equal(compute_coarse_mask(rgb, obj_only, tile=40, halo=s_ - 1), ref2)
    bad2 = compute_coarse_mask(rgb, obj_only, tile=40, halo=s_ - 2)
    assert not bad2[30, 39]  # only S-1 px visible -> removed


def test_tiling_random_masks():
    rng = np.random.default_rng(0)
    noise = rng.random((150, 170))
    from scipy import ndimage as ndi

    fg = ndi.gaussian_filter(noise, 2.0) > 0.5
    rgb = _line_image(fg)
    for rc, ro, a, s_ in [(1, 1, 10, 5), (2, 0, 25, 0), (0, 2, 0, 15), (3, 1, 40, 30)]:
        p = MaskPreset(
            "r",
            "fixed",
            fixed_threshold=0.1,
            closing_radius=rc,
            opening_radius=ro,
            fill_holes=a > 0,
            max_hole_size=a,
            min_object_size=s_,
        )
        ref = coarse_mask(rgb, p)
        for tile in (23, 64):
            assert np.array_equal(compute_coarse_mask(rgb, p, tile=tile), ref), (p, tile)
    # a halo that only covers the morphology is not enough for holes/objects
    p = dataclasses.replace(p, max_hole_size=200, min_object_size=200)
    got = compute_coarse_mask(rgb, p, tile=23, halo=8)
    assert not np.array_equal(got, coarse_mask(rgb, p))


def test_unbounded_holes_need_explicit_halo(ihc):
    p = dataclasses.replace(get_preset("CK8/18"), max_hole_size=None)
    assert p.required_halo is None
    with pytest.raises(ValueError, match="halo"):
        next(iter_coarse_masks(ihc, p, tile=128))
    assert compute_coarse_mask(ihc, p, tile=256, halo=64).shape == (512, 512)


# --------------------------------------------------------------------------- distance maps


def test_distance_target_values():
    m = np.zeros((20, 20), bool)
    m[2, 2] = True  # single pixel: edt 1
    m[8:13, 8:13] = True  # 5x5 square: centre edt 3
    t = distance_target(m, max_distance=8.0)
    assert t.dtype == np.float32 and t.shape == m.shape
    assert np.all(t[~m] == -1.0)
    assert t[2, 2] == pytest.approx(2 / 8 - 1)
    assert t[10, 10] == pytest.approx(2 * 3 / 8 - 1)
    assert t[8, 10] == pytest.approx(2 / 8 - 1)
    big = np.zeros((60, 60), bool)
    big[5:55, 5:55] = True
    tb = distance_target(big, 8.0)
    assert tb[30, 30] == 1.0 and tb.min() == -1.0 and tb.max() == 1.0
    assert np.all(distance_target(np.ones((5, 5), bool)) == 1.0)
    assert np.all(distance_target(np.zeros((5, 5), bool)) == -1.0)


def test_distance_batched_and_round_trip():
    rng = np.random.default_rng(1)
    masks = rng.random((4, 32, 40)) > 0.6  # many single pixels and thin objects
    masks[3] = False
    for d in (1.0, 2.5, 8.0):
        t = distance_target(masks, d)
        assert t.shape == masks.shape and t.dtype == np.float32
        assert t.min() >= -1.0 and t.max() <= 1.0
        for i in range(4):
            assert np.array_equal(t[i], distance_target(masks[i], d))
        assert np.array_equal(distance_to_mask(t, d), masks)
        assert np.array_equal(distance_to_mask(t[0], d), masks[0])
    # the cut sits midway between background and edge pixels
    cut = 1 / 8 - 1
    vals = np.array([[cut - 1e-4, cut, -1.0, np.nan]], np.float32)
    assert distance_to_mask(vals, 8.0).tolist() == [[False, True, False, False]]
    labels = (masks[0] * 3).astype(np.int32)
    assert np.array_equal(distance_target(labels), distance_target(masks[0]))


def test_distance_bad_inputs():
    with pytest.raises(ValueError, match="expected a bool or integer"):
        distance_target(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="got shape"):
        distance_target(np.zeros(4, bool))
    with pytest.raises(ValueError, match="max_distance"):
        distance_target(np.zeros((4, 4), bool), 0.5)
    with pytest.raises(ValueError, match="float array"):
        distance_to_mask(np.zeros((4, 4), bool))


# --------------------------------------------------------------------------- bad inputs, presets


@pytest.mark.parametrize(
    ("arr", "match"),
    [
        (np.zeros((8, 8), np.uint8), r"expected an \(H, W, 3\).*got shape \(8, 8\)"),
        (np.zeros((8, 8, 2), np.uint8), r"got shape \(8, 8, 2\)"),
        (np.zeros((8, 8, 3), np.uint16), "expected dtype uint8.*got uint16"),
        (np.zeros((8, 8, 3), np.int64), "got int64"),
        (np.full((8, 8, 3), np.nan), "finite.*got NaN"),
        (np.full((8, 8, 3), 200.0), r"\[0, 1\]; got range \[200, 200\]"),
    ],
)
def test_bad_rgb(arr, match):
    calls = (
        dab_channel,
        tissue_mask,
        dab_statistics,
        lambda a: coarse_mask(a, "CD3"),
        lambda a: next(iter_coarse_masks(a, "CD3")),
        lambda a: dab_statistics(da.from_array(a, chunks=4)),
    )
    for fn in calls:
        with pytest.raises(ValueError, match=match):
            fn(arr)


def test_rgba_composited_over_white(ihc):
    rgba = np.concatenate([ihc, np.full((512, 512, 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(dab_channel(rgba), dab_channel(ihc))
    assert np.array_equal(coarse_mask(rgba, "CD3"), coarse_mask(ihc, "CD3"))
    rgba[:100, :, 3] = 0  # transparent (e.g. unscanned area, stored as black)
    rgba[:100, :, :3] = 0
    assert np.all(dab_channel(rgba)[:100] == 0.0)
    assert not tissue_mask(rgba)[:100].any()


def test_presets():
    assert set(PRESETS) == {"CD3", "CK8/18"}
    assert get_preset("cd3") is PRESETS["CD3"] and get_preset("ck8/18") is PRESETS["CK8/18"]
    assert PRESETS["CD3"].rule is ThresholdRule.MEAN_STD and PRESETS["CD3"].k_std == 2.0
    with pytest.raises(
        ValueError, match=r"unknown stain 'Ki67': expected one of \['CD3', 'CK8/18'"
    ):
        get_preset("Ki67")
    with pytest.raises(ValueError, match="unknown stain"):
        coarse_mask(np.zeros((8, 8, 3), np.uint8), "HER2")
    with pytest.raises(ValueError, match="fixed_threshold"):
        MaskPreset("x", ThresholdRule.FIXED)
    with pytest.raises(ValueError, match="rule: expected one of"):
        MaskPreset("x", "median")
    with pytest.raises(ValueError, match="opening_radius"):
        MaskPreset("x", "otsu", opening_radius=-1)
    p = PRESETS["CD3"]
    assert p.required_halo == 2 * 2 + 150 + 2 * 1 + 29
    q = p.at_mpp(0.25)
    assert (q.closing_radius, q.opening_radius, q.max_hole_size, q.min_object_size) == (
        4,
        2,
        600,
        120,
    )
    assert q.mpp == 0.25 and q.rule is p.rule
    fixed = MaskPreset("f", "fixed", fixed_threshold=0.2)
    assert threshold_value(DabStats(math.nan, math.nan, math.nan, 0), fixed) == 0.2
    with pytest.raises(ValueError, match="n > 0"):
        threshold_value(DabStats(math.nan, math.nan, math.nan, 0), p)
    assert stain.ThresholdRule("mean+2std") is ThresholdRule.MEAN_STD
