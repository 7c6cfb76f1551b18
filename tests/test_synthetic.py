"""Tests of the procedural paired H&E / IHC tissue (napari_staindiffuser.synthetic)."""

from __future__ import annotations

import dataclasses
import pickle
import time

import numpy as np
import pytest
from scipy import ndimage
from skimage.color import rgb2hed, rgb_from_hed

from napari_staindiffuser.synthetic import (
    NUCLEUS_TYPES,
    STAINS,
    SlideStyle,
    SyntheticRegion,
    SyntheticSlide,
    synthetic_patches,
)

# A region of slide 0 with glands, an aggregate (B and T cells), plasma cells and some glass.
REGION = (512, 1536, 512, 1024)


@pytest.fixture(scope="module")
def slide() -> SyntheticSlide:
    return SyntheticSlide(0, shape=(4096, 4096), mpp=0.5, chunk=512)


@pytest.fixture(scope="module")
def region(slide) -> SyntheticRegion:
    return slide.render(*REGION)


@pytest.fixture(scope="module")
def kinds(slide, region) -> np.ndarray:
    return slide.nucleus_types(*REGION)


def _dab(rgb: np.ndarray) -> np.ndarray:
    return rgb2hed(rgb)[..., 2]


def test_stains_and_types():
    assert STAINS == ("CD3", "CK8/18")
    assert set(NUCLEUS_TYPES) == {0, 1, 2, 3, 4, 5}


def test_shapes_and_dtypes(region, slide):
    h, w = REGION[2:]
    assert region.he.shape == (h, w, 3) and region.he.dtype == np.uint8
    assert region.tissue.shape == (h, w) and region.tissue.dtype == bool
    assert set(region.ihc) == set(STAINS) and set(region.masks) == set(STAINS)
    for s in STAINS:
        assert region.ihc[s].shape == (h, w, 3) and region.ihc[s].dtype == np.uint8
        assert region.masks[s].shape == (h, w) and region.masks[s].dtype == bool
    small = slide.render(0, 0, 1, 3)
    assert small.he.shape == (1, 3, 3)
    assert slide.nucleus_types(0, 0, 5, 7).shape == (5, 7)
    assert slide.mpp == 0.5 and slide.shape == (4096, 4096) and slide.seed == 0
    assert isinstance(slide.style, SlideStyle)


def test_region_has_all_content(region, kinds):
    # the fixture region must exercise every layer, otherwise the other tests prove little
    counts = np.bincount(kinds.ravel(), minlength=6)
    assert np.all(counts[1:] > 300), counts
    assert 0.5 < region.tissue.mean() < 0.99


def test_deterministic_and_seed_dependent():
    a = SyntheticSlide(5, shape=(2048, 2048)).render(300, 400, 128, 160)
    b = SyntheticSlide(5, shape=(2048, 2048)).render(300, 400, 128, 160)
    c = SyntheticSlide(6, shape=(2048, 2048)).render(300, 400, 128, 160)
    np.testing.assert_array_equal(a.he, b.he)
    for s in STAINS:
        np.testing.assert_array_equal(a.ihc[s], b.ihc[s])
        np.testing.assert_array_equal(a.masks[s], b.masks[s])
    assert np.mean(a.he != c.he) > 0.3
    assert SlideStyle.from_seed(5) == SlideStyle.from_seed(5) != SlideStyle.from_seed(6)


@pytest.mark.parametrize("tile", [64, 97])
def test_seamless_tiling(slide, tile):
    y, x, h, w = 600, 1700, 200, 230  # glands, T cells and the tissue edge nearby
    whole = slide._render(y, x, h, w)[0]
    he = np.zeros((h, w, 3), np.uint8)
    ihc = {s: np.zeros((h, w, 3), np.uint8) for s in STAINS}
    masks = {s: np.zeros((h, w), bool) for s in STAINS}
    tissue = np.zeros((h, w), bool)
    for ty in range(y, y + h, tile):
        for tx in range(x, x + w, tile):
            th, tw = min(tile, y + h - ty), min(tile, x + w - tx)
            r = slide._render(ty, tx, th, tw)[0]
            sl = (slice(ty - y, ty - y + th), slice(tx - x, tx - x + tw))
            he[sl], tissue[sl] = r.he, r.tissue
            for s in STAINS:
                ihc[s][sl], masks[s][sl] = r.ihc[s], r.masks[s]
    assert all(whole.masks[s].any() for s in STAINS)
    np.testing.assert_array_equal(he, whole.he)
    np.testing.assert_array_equal(tissue, whole.tissue)
    for s in STAINS:
        np.testing.assert_array_equal(ihc[s], whole.ihc[s])
        np.testing.assert_array_equal(masks[s], whole.masks[s])


def test_dask_arrays_are_lazy_and_match_render():
    t0 = time.perf_counter()
    big = SyntheticSlide(1, shape=(50_000, 50_000), chunk=512)
    he, ihc, mask = big.he, big.ihc("CD3"), big.mask("CK8/18")
    assert time.perf_counter() - t0 < 2.0
    assert he.shape == (50_000, 50_000, 3) and he.dtype == np.uint8
    assert ihc.shape == (50_000, 50_000, 3) and mask.shape == (50_000, 50_000)
    assert mask.dtype == bool and he.chunksize == (512, 512, 3)
    assert big.tissue.shape == (50_000, 50_000)
    # a slice straddling a chunk corner equals a direct render of it
    sl = (slice(30_700, 30_760), slice(20_450, 20_520))
    ref = big.render(30_700, 20_450, 60, 70)
    np.testing.assert_array_equal(he[sl].compute(), ref.he)
    np.testing.assert_array_equal(ihc[sl].compute(), ref.ihc["CD3"])
    np.testing.assert_array_equal(mask[sl].compute(), ref.masks["CK8/18"])
    # last, ragged chunk
    edge = big.he[-5:, -3:].compute()
    np.testing.assert_array_equal(edge, big.render(49_995, 49_997, 5, 3).he)


def test_dab_marks_positive_cells(region):
    for s in STAINS:
        dab, m = _dab(region.ihc[s]), region.masks[s]
        ratio = dab[m].mean() / dab[~m].mean()
        assert ratio > 3.0, (s, ratio)
        strong = dab > 0.5 * dab[m].mean()
        # strong DAB lies on positive cells (1 px of blur tolerance) ...
        near = np.zeros_like(m)
        near[1:-1, 1:-1] = m[1:-1, 1:-1] | m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]
        assert (strong & near).sum() / strong.sum() > 0.95
        # ... and covers most of them
        assert (strong & m).sum() / m.sum() > 0.5
    other = region.masks["CK8/18"] & ~region.masks["CD3"]
    assert _dab(region.ihc["CD3"])[other].mean() < 0.3 * _dab(region.ihc["CK8/18"])[other].mean()


def test_he_has_no_dab_and_glass_is_bright(region):
    he_dab = _dab(region.he)[region.tissue].mean()
    pos = _dab(region.ihc["CK8/18"])[region.masks["CK8/18"]].mean()
    assert he_dab < 0.1 * pos
    glass = ~region.tissue
    assert region.he[glass].mean() > 225 and region.he[glass].std() < 10
    for s in STAINS:
        assert region.ihc[s][glass].mean() > 225
    # tissue is darker than glass, nuclei darker still
    assert region.he[region.tissue].mean() < region.he[glass].mean() - 15


def test_ihc_has_no_eosin(region):
    hed_he, hed_ihc = rgb2hed(region.he), rgb2hed(region.ihc["CD3"])
    t = region.tissue
    assert hed_ihc[..., 1][t].mean() < 0.5 * hed_he[..., 1][t].mean()
    # counterstain is lighter than the H&E haematoxylin on the nuclei
    assert hed_ihc[..., 0][t].mean() < hed_he[..., 0][t].mean()


def test_masks_inside_tissue_and_plausible_fractions(region):
    t = region.tissue
    for s in STAINS:
        assert not (region.masks[s] & ~t).any()
    fr = [region.masks[s].sum() / t.sum() for s in STAINS]
    assert 0.003 < fr[0] < 0.2 and 0.02 < fr[1] < 0.5
    # over 0.8 x 0.8 mm of several slides, the epithelium covers more tissue than the T cells
    tot = np.zeros(3)
    for seed in range(20, 24):
        r = SyntheticSlide(seed, (400, 400), mpp=2.0).render(0, 0, 400, 400)
        tot += [r.tissue.sum(), r.masks["CD3"].sum(), r.masks["CK8/18"].sum()]
    cd3, ck = tot[1:] / tot[0]
    assert 0.005 < cd3 < 0.1 and 0.02 < ck < 0.3 and ck > 1.3 * cd3, (cd3, ck)


def test_cd3_follows_cell_type(region, kinds):
    m = region.masks["CD3"]
    assert m[kinds == 3].mean() > 0.99  # every T nucleus pixel is positive
    for k in (1, 2, 4, 5):  # other nuclei essentially never
        assert m[kinds == k].mean() < 0.05, k
    assert region.masks["CK8/18"][kinds == 1].mean() > 0.99
    assert region.masks["CK8/18"][np.isin(kinds, [3, 4, 5])].mean() < 0.05


def test_cd3_not_separable_by_he_colour(region, kinds):
    he = region.he.astype(np.float64)
    t_cells = he[kinds == 3].mean(0)
    others = he[np.isin(kinds, [4, 5])].mean(0)  # CD3- lymphocyte-like cells
    stroma = he[(kinds == 0) & region.tissue].mean(0)
    gap = np.abs(t_cells - others).max()
    assert gap < 12.0, (t_cells, others)
    assert gap < 0.1 * np.abs(stroma - others).max()
    # but the two populations do differ in morphology: T nuclei are smaller on average
    sizes = {}
    for k in (3, 4):
        lab, _ = ndimage.label(kinds == k)
        area = np.bincount(lab.ravel())[1:]
        sizes[k] = np.median(area[area > 10])
    assert sizes[3] < sizes[4]


def test_style_and_vectors():
    st = SlideStyle.from_seed(3)
    he, base = np.asarray(st.he_vectors), np.asarray(rgb_from_hed)
    assert he.shape == (3, 3) and np.allclose(
        np.linalg.norm(he, axis=1), np.linalg.norm(base, axis=1)
    )
    assert np.abs(he - base).max() < 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.noise_std = 0.0  # type: ignore[misc]
    quiet = dataclasses.replace(st, noise_std=0.0, blur_sigma_um=0.0)
    r = SyntheticSlide(3, (512, 512), style=quiet).render(0, 0, 64, 64)
    assert r.he.shape == (64, 64, 3)


def test_physical_scale_is_resolution_independent():
    fine = SyntheticSlide(0, (4096, 4096), mpp=0.5).render(512, 1536, 256, 512)
    coarse = SyntheticSlide(0, (2048, 2048), mpp=1.0).render(256, 768, 128, 256)

    def down(a):
        return a.reshape(128, 2, 256, 2).mean((1, 3)) > 0.5

    assert np.mean(down(fine.tissue) == coarse.tissue) > 0.98
    ck_f, ck_c = down(fine.masks["CK8/18"]), coarse.masks["CK8/18"]
    assert (ck_f & ck_c).sum() / (ck_f | ck_c).sum() > 0.8


def test_synthetic_patches():
    a = list(synthetic_patches(7, 4, 96, min_tissue=0.8))
    b = list(synthetic_patches(7, 4, 96, min_tissue=0.8))
    assert len(a) == 4
    for p, q in zip(a, b, strict=True):
        assert p.he.shape == (96, 96, 3) and p.tissue.mean() >= 0.8
        np.testing.assert_array_equal(p.he, q.he)
    assert not np.array_equal(a[0].he, a[1].he)
    # patches come from different slides: their styles (mean stroma colour) differ
    assert len({tuple(np.round(p.he.reshape(-1, 3).mean(0))) for p in a}) == 4
    assert list(synthetic_patches(7, 0)) == []
    full = next(synthetic_patches(8, 1, 64, min_tissue=1.0))
    assert full.tissue.all()


def test_errors(slide):
    with pytest.raises(ValueError, match="CD3, CK8/18"):
        slide.ihc("Ki67")
    with pytest.raises(ValueError, match="valid stains"):
        slide.mask("cd3")
    for bad in [(0, 0, 0, 10), (0, 0, 10, -1), (-1, 0, 5, 5), (4090, 0, 10, 10), (0, 0, 1.5, 2)]:
        with pytest.raises(ValueError):
            slide.render(*bad)
    for kw in [dict(shape=(0, 10)), dict(shape=(10,)), dict(mpp=0.0), dict(mpp="x"), dict(chunk=0)]:
        with pytest.raises(ValueError):
            SyntheticSlide(0, **kw)
    with pytest.raises(ValueError):
        next(synthetic_patches(0, 1, size=0))
    with pytest.raises(ValueError):
        next(synthetic_patches(0, -1))
    with pytest.raises(ValueError):
        next(synthetic_patches(0, 1, min_tissue=1.5))


def test_pickle_roundtrip(slide):
    clone = pickle.loads(pickle.dumps(slide))
    np.testing.assert_array_equal(
        clone.render(100, 100, 32, 32).he, slide.render(100, 100, 32, 32).he
    )


def test_returned_arrays_do_not_alias_the_cache():
    s = SyntheticSlide(2, (1024, 1024), chunk=256)
    first = s.render(10, 10, 40, 40)
    ref = first.he.copy()
    first.he[:] = 0
    first.masks["CD3"][:] = True
    again = s.render(10, 10, 40, 40)
    np.testing.assert_array_equal(again.he, ref)
    assert not again.masks["CD3"].all()
    block = s.he[:256, :256].compute()
    block[:] = 0
    assert s.he[:256, :256].compute().any()
