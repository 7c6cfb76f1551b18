"""Registration check and paired-patch extraction (patches.py) on synthetic registered slides."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_staindiffuser import stain
from napari_staindiffuser.events import Progress
from napari_staindiffuser.pairs import PairSample
from napari_staindiffuser.patches import (
    PatchSpec,
    Registration,
    correct_shift,
    estimate_shift,
    extract_patch_pairs,
    haematoxylin_channel,
    iter_patch_pairs,
)
from napari_staindiffuser.synthetic import SyntheticSlide

P = 256
GLASS = (256, 256, 256, 512)  # a glass-only region of the `partial` pair


@pytest.fixture(scope="module")
def slide():
    return SyntheticSlide(3, (8192, 8192), mpp=0.5)


@pytest.fixture(scope="module")
def tissue(slide):
    """512 x 512, all tissue: (H&E, CD3 IHC)."""
    r = slide.render(7168, 5120, 512, 512)
    return r.he, r.ihc["CD3"]


@pytest.fixture(scope="module")
def partial(slide):
    """768 x 768: 4 of the 9 grid patches have >= 50% tissue, 2 are glass."""
    r = slide.render(2816, 4352, 768, 768)
    return r.he, r.ihc["CD3"]


def _subpixel(img, shift):
    planes = [
        ndi.shift(img[..., c].astype(np.float32), shift, order=1, mode="nearest") for c in (0, 1, 2)
    ]
    return np.clip(np.rint(np.stack(planes, -1)), 0, 255).astype(np.uint8)


def _interior_diff(a, b, m=16):
    return np.abs(a[m:-m, m:-m].astype(float) - b[m:-m, m:-m]).mean()


# --------------------------------------------------------------------------- registration


def test_haematoxylin_channel(tissue):
    h = haematoxylin_channel(tissue[0])
    assert h.shape == (512, 512) and h.dtype == np.float32
    glass = haematoxylin_channel(np.full((4, 4, 3), 250, np.uint8))
    assert h.mean() > glass.mean() + 0.01


def test_integer_shift_recovered_and_corrected(tissue):
    he, ihc = tissue
    moved = np.roll(ihc, (5, -3), axis=(0, 1))  # IHC content 5 px down, 3 px left
    reg = estimate_shift(he, moved, mpp=0.5)
    assert abs(reg.dy - -5) < 0.2 and abs(reg.dx - 3) < 0.2, reg
    fixed = correct_shift(moved, reg)
    assert _interior_diff(fixed, ihc) < 1.0
    assert _interior_diff(correct_shift(moved, (-reg.dy, -reg.dx)), ihc) > 10  # sign matters
    assert reg.magnitude_px == pytest.approx(np.hypot(5, 3), abs=0.2)
    assert reg.magnitude_um == pytest.approx(reg.magnitude_px * 0.5)
    assert reg.threshold_px == pytest.approx(4.0)  # 2 µm at 0.5 µm/px
    assert not reg.ok
    msg = reg.message()
    assert "5.8 px" in msg and "2.9 µm" in msg and "above the 4.0 px (2.0 µm)" in msg
    loose = estimate_shift(he, moved, mpp=0.5, threshold_px=10)
    assert loose.ok and "within" in loose.message()
    assert "µm" not in estimate_shift(he, moved).message()


def test_subpixel_shift_recovered(tissue):
    he, ihc = tissue
    moved = _subpixel(ihc, (2.5, 0))
    reg = estimate_shift(he, moved)
    assert abs(reg.dy - -2.5) < 0.2 and abs(reg.dx) < 0.2, reg
    assert reg.threshold_px == 4.0 and reg.ok  # no mpp: 4 px
    assert _interior_diff(correct_shift(moved, reg), ihc) < _interior_diff(moved, ihc) / 2


@pytest.mark.parametrize("shift", [(5, -3), (-12, 7)])
def test_non_circular_shift_recovered(slide, shift):
    """A real offset (two crops of the slide, not a roll): new tissue enters at the edges."""
    big = slide.render(2816 - 20, 4352 - 20, 552, 552)
    he = big.he[20:532, 20:532]
    sy, sx = shift
    ihc = big.ihc["CD3"][20 - sy : 532 - sy, 20 - sx : 532 - sx]  # content moved by (sy, sx)
    reg = estimate_shift(he, ihc, mpp=0.5)
    assert abs(reg.dy + sy) < 0.2 and abs(reg.dx + sx) < 0.2, reg
    assert _interior_diff(correct_shift(ihc, reg), big.ihc["CD3"][20:532, 20:532], m=16) < 1.0


@pytest.mark.parametrize("which", ["tissue", "partial"])
def test_registered_pair_has_no_shift(which, request):
    he, ihc = request.getfixturevalue(which)
    reg = estimate_shift(he, ihc, mpp=0.5)
    assert reg.magnitude_px < 0.5 and reg.ok, reg
    assert 0.0 <= reg.error < 0.9


def test_downsampled_and_dask_estimates_agree(tissue):
    da = pytest.importorskip("dask.array")
    he, ihc = tissue
    moved = np.roll(ihc, (5, -3), axis=(0, 1))
    full = estimate_shift(he, moved)
    small = estimate_shift(he, moved, max_side=200)  # factor 3
    assert abs(small.dy - full.dy) < 0.5 and abs(small.dx - full.dx) < 0.5, (small, full)
    lazy = estimate_shift(
        da.from_array(he, chunks=100), da.from_array(moved, chunks=150), max_side=200
    )
    assert lazy.dy == pytest.approx(small.dy, abs=1e-6) and lazy.dx == pytest.approx(
        small.dx, abs=1e-6
    )


def test_size_mismatch_names_both_sizes(tissue):
    he, ihc = tissue
    with pytest.raises(ValueError, match=r"512x512.*500x512"):
        estimate_shift(he, ihc[:500])
    with pytest.raises(ValueError, match=r"512x512.*512x400"):
        extract_patch_pairs(he, ihc[:, :400], "CD3")


def test_correct_shift_semantics():
    a = np.arange(6 * 7 * 3, dtype=np.uint8).reshape(6, 7, 3)
    out = correct_shift(a, (2, -1), fill=7)
    assert out.dtype == np.uint8 and out.shape == a.shape
    np.testing.assert_array_equal(out[2:, :-1], a[:-2, 1:])  # out[y, x] = a[y - 2, x + 1]
    assert (out[:2] == 7).all() and (out[:, -1] == 7).all()
    reg = Registration(0.5, 0.0, 0.0, 0.5, None, 4.0)
    half = correct_shift(a, reg)
    expect = (a[1:, 2:-2].astype(float) + a[:-1, 2:-2]) / 2
    assert np.abs(half[1:, 2:-2] - expect).max() <= 0.5
    np.testing.assert_array_equal(correct_shift(a, (0, 0)), a)
    assert (correct_shift(a, (10, 0)) == 255).all()


# --------------------------------------------------------------------------- patches


def _grid_windows(img):
    return {
        (y, x): img[y : y + P, x : x + P]
        for y in range(0, img.shape[0] - P + 1, P)
        for x in range(0, img.shape[1] - P + 1, P)
    }


def _where(sample, he):
    hits = [k for k, w in _grid_windows(he).items() if np.array_equal(w, sample.he)]
    assert len(hits) == 1
    return hits[0]


def test_patches_have_tissue_and_coarse_masks(partial):
    he, ihc = partial
    stats = stain.dab_statistics(ihc)
    events = list(iter_patch_pairs(he, ihc, "CD3", stats=stats))
    samples = [e for e in events if isinstance(e, PairSample)]
    progress = [e for e in events if isinstance(e, Progress)]
    assert len(samples) == 4
    assert progress[0] == Progress(0, 9, "patches", None) and progress[-1].done == 9
    assert all(p.stage == "patches" and p.total == 9 for p in progress)
    preset = stain.get_preset("CD3")
    for s in samples:
        y, x = _where(s, he)
        assert s.he.shape == s.ihc.shape == (P, P, 3) and s.mask.shape == (P, P)
        assert s.stain == "CD3" and s.mask.dtype == bool
        assert stain.tissue_mask(s.he).mean() >= 0.5
        np.testing.assert_array_equal(s.ihc, ihc[y : y + P, x : x + P])
        np.testing.assert_array_equal(s.mask, stain.coarse_mask(s.ihc, preset, stats=stats))
    assert any(s.mask.any() for s in samples)
    rejected = [w for k, w in _grid_windows(he).items() if stain.tissue_mask(w).mean() < 0.5]
    assert len(rejected) == 5  # the filter is doing something


def test_preset_rescaled_with_mpp(partial):
    he, ihc = partial
    stats = stain.dab_statistics(ihc)
    pairs = extract_patch_pairs(
        he, ihc, "CD3", stats=stats, mpp=0.25, spec=PatchSpec(max_patches=1)
    )
    expect = stain.coarse_mask(pairs[0].ihc, stain.get_preset("CD3").at_mpp(0.25), stats=stats)
    np.testing.assert_array_equal(pairs[0].mask, expect)


def test_user_masks_used_verbatim(partial):
    he, ihc = partial
    labels = np.random.default_rng(0).integers(0, 3, he.shape[:2]).astype(np.int32)
    pairs = extract_patch_pairs(he, ihc, "anything", masks=labels)  # no preset needed
    assert len(pairs) == 4
    for s in pairs:
        y, x = _where(s, he)
        np.testing.assert_array_equal(s.mask, labels[y : y + P, x : x + P] != 0)
    with pytest.raises(ValueError, match="masks"):
        extract_patch_pairs(he, ihc, "CD3", masks=labels[:10])


def test_glass_region_yields_nothing(partial):
    he, ihc = partial
    events = list(iter_patch_pairs(he, ihc, "CD3", regions=[GLASS]))
    assert not any(isinstance(e, PairSample) for e in events)
    with pytest.raises(ValueError, match=r"no patch has >= 50% tissue in the given regions"):
        extract_patch_pairs(he, ihc, "CD3", regions=[GLASS])


@pytest.mark.parametrize(
    ("region", "match"),
    [
        ((600, 0, 256, 256), r"region 1 .*outside the 768x768 image"),
        ((-1, 0, 256, 256), r"region 1 .*outside the 768x768 image"),
        ((0, 0, 255, 300), r"region 1 .*smaller than one 256x256 patch"),
    ],
)
def test_bad_regions(partial, region, match):
    he, ihc = partial
    with pytest.raises(ValueError, match=match):
        extract_patch_pairs(he, ihc, "CD3", regions=[(0, 0, 256, 256), region])


def test_regions_stride_and_subset_are_deterministic(partial):
    he, ihc = partial
    stats = stain.dab_statistics(ihc)
    region = [(0, 0, 512, 768)]
    full = extract_patch_pairs(
        he, ihc, "CD3", regions=region, stats=stats, spec=PatchSpec(stride=128)
    )
    keys = {s.he.tobytes() for s in full}
    spec = PatchSpec(stride=128, max_patches=3, seed=1)
    a = extract_patch_pairs(he, ihc, "CD3", regions=region, stats=stats, spec=spec)
    b = extract_patch_pairs(he, ihc, "CD3", regions=region, stats=stats, spec=spec)
    assert len(full) > 3 and len(a) == 3
    assert [s.he.tobytes() for s in a] == [s.he.tobytes() for s in b]
    assert {s.he.tobytes() for s in a} <= keys
    seeds = {
        tuple(
            s.he.tobytes()
            for s in extract_patch_pairs(
                he,
                ihc,
                "CD3",
                regions=region,
                stats=stats,
                spec=PatchSpec(stride=128, max_patches=3, seed=k),
            )
        )
        for k in range(4)
    }
    assert len(seeds) > 1  # the seed changes the subset


def test_dask_reads_only_the_windows(partial):
    da = pytest.importorskip("dask.array")
    he, ihc = partial
    seen: dict[str, set] = {"he": set(), "ihc": set()}

    def recorder(name):
        def f(block, block_info=None):
            seen[name].add(tuple(block_info[0]["chunk-location"][:2]))
            return block

        return f

    def lazy(a, name):
        d = da.from_array(a, chunks=(128, 128, 3))
        return d.map_blocks(recorder(name), dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))

    stats = stain.dab_statistics(ihc)
    region = [(0, 256, 256, 512)]  # patches (0, 256) and (0, 512); only the first has tissue
    pairs = extract_patch_pairs(
        lazy(he, "he"), lazy(ihc, "ihc"), "CD3", regions=region, stats=stats
    )
    assert len(pairs) == 1
    np.testing.assert_array_equal(pairs[0].ihc, ihc[:P, P : 2 * P])
    assert seen["he"] == {(i, j) for i in (0, 1) for j in (2, 3, 4, 5)}  # of 6 x 6 blocks
    assert seen["ihc"] == {(i, j) for i in (0, 1) for j in (2, 3)}


def test_stats_computed_once(partial, monkeypatch):
    he, ihc = partial
    calls = []
    real = stain.dab_statistics

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(stain, "dab_statistics", counting)
    pairs = extract_patch_pairs(he, ihc, "CD3")
    assert len(pairs) == 4 and len(calls) == 1
    np.testing.assert_array_equal(
        pairs[0].mask, stain.coarse_mask(pairs[0].ihc, "CD3", stats=real(ihc))
    )
    calls.clear()
    extract_patch_pairs(he, ihc, "CD3", masks=np.ones(he.shape[:2], bool))
    assert calls == []


@pytest.mark.parametrize("shift", [(-5, 3), (1.5, -2.25)])
def test_shift_is_applied_per_window(partial, shift):
    he, ihc = partial
    stats = stain.dab_statistics(ihc)
    whole = correct_shift(ihc, shift)
    pairs = extract_patch_pairs(he, ihc, "CD3", stats=stats, shift=shift)
    assert len(pairs) == 4
    for s in pairs:
        y, x = _where(s, he)
        np.testing.assert_array_equal(s.ihc, whole[y : y + P, x : x + P])


def test_patch_spec_validation():
    with pytest.raises(ValueError, match="min_tissue"):
        PatchSpec(min_tissue=1.5)
    with pytest.raises(ValueError, match="stride"):
        PatchSpec(stride=0)
    with pytest.raises(ValueError, match="max_patches"):
        PatchSpec(max_patches=0)
