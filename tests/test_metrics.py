"""metrics.py: texture scores against scikit-image, masks and counts on hand-made masks, the
distribution metrics on feature sets with known answers, and the real Inception features."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import linalg

from napari_staindiffuser import metrics

needs_torchmetrics = pytest.mark.skipif(
    metrics._find("torchmetrics") is None, reason="the [metrics] extra is not installed"
)


def _noisy_pair(seed=0, shape=(48, 40, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = _noisy_pair()
    s = metrics.image_scores(b, a)
    assert s["psnr"] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    assert s["ssim"] == pytest.approx(
        structural_similarity(a, b, channel_axis=-1, data_range=255), abs=1e-12
    )
    fa, fb = a / 255.0, b / 255.0  # float images: data range 1 by default
    assert metrics.psnr(fb, fa) == pytest.approx(s["psnr"], abs=1e-9)
    assert metrics.ssim(fb, fa) == pytest.approx(s["ssim"], abs=1e-9)
    assert metrics.psnr(a, a) == math.inf and metrics.ssim(a, a) == pytest.approx(1.0)
    mean = metrics.mean_image_scores([b, a], [a, a])
    assert mean["ssim"] == pytest.approx((s["ssim"] + 1.0) / 2)


def test_image_scores_refuse_mismatched_inputs():
    a, b = _noisy_pair()
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a[:10], b)
    with pytest.raises(TypeError, match="same dtype"):
        metrics.ssim(a, b / 255.0)
    with pytest.raises(ValueError, match="no image pairs"):
        metrics.mean_image_scores([], [])


@needs_torchmetrics
def test_psnr_and_ssim_agree_with_torchmetrics():
    import torch
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    a, b = _noisy_pair(1)
    ta, tb = (torch.from_numpy(x.transpose(2, 0, 1)[None]).double() for x in (a, b))
    assert metrics.psnr(b, a) == pytest.approx(float(peak_signal_noise_ratio(tb, ta, 255.0)))
    # torchmetrics uses the population covariance and pads the borders: close, not equal
    tm = structural_similarity_index_measure(
        tb, ta, gaussian_kernel=False, kernel_size=7, data_range=255.0
    )
    assert metrics.ssim(b, a) == pytest.approx(float(tm), abs=5e-3)


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_dice_iou_and_counts_on_hand_made_masks():
    truth = np.zeros((10, 10), bool)
    truth[:, :4] = True  # 40 px
    pred = np.zeros((10, 10), bool)
    pred[:, 2:6] = True  # 40 px, 20 shared
    assert metrics.dice(pred, truth) == pytest.approx(0.5)
    assert metrics.iou(pred, truth) == pytest.approx(20 / 60)
    empty = np.zeros((4, 4), bool)
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    assert metrics.dice(~empty, empty) == 0.0

    shape = (64, 64)
    cells = _disk(shape, 10, 10, 4) | _disk(shape, 40, 40, 4) | _disk(shape, 10, 50, 4)
    speck = np.zeros(shape, bool)
    speck[60, 60] = speck[60, 61] = True  # 2 px: below the minimum area
    # at 0.5 µm/px, 7.5 µm² is 30 px: a 4 px radius disk (49 px) counts, the speck does not
    assert metrics.min_cell_pixels(0.5) == 30
    assert metrics.count_cells(cells | speck, 0.5) == 3
    assert metrics.count_cells(cells | speck, 0.5, min_area_um2=0) == 4
    diag = np.zeros(shape, bool)
    diag[0, 0] = diag[1, 1] = True  # 8-connected: one object
    assert metrics.count_cells(diag, 1.0, min_area_um2=0) == 1
    pred = _disk(shape, 10, 10, 4) | _disk(shape, 40, 40, 4)
    e = metrics.count_error(pred, cells, 0.5)
    assert (e["count_pred"], e["count_true"], e["count_error"]) == (2, 3, -1)
    assert e["count_abs_error"] == 1 and e["count_rel_error"] == pytest.approx(1 / 3)
    s = metrics.mask_scores([pred, cells], [cells, cells], 0.5)
    assert s["dice"] == pytest.approx(
        metrics.dice(np.stack([pred, cells]), np.stack([cells, cells]))
    )
    assert s["iou"] == pytest.approx(metrics.iou(np.stack([pred, cells]), np.stack([cells] * 2)))
    assert s["count_error"] == pytest.approx(-0.5) and s["count_abs_error"] == pytest.approx(0.5)
    assert s["count_rel_error"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="mpp"):
        metrics.count_cells(cells, 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dice(cells, cells[:10])


def test_positive_mask_is_the_products_dab_mask():
    from napari_staindiffuser.inference import _dab_mask

    rgb = np.empty((64, 64, 3), np.uint8)
    rgb[:] = (235, 230, 225)
    rgb[_disk((64, 64), 20, 20, 6)] = (150, 90, 40)  # DAB brown
    rgb[_disk((64, 64), 45, 40, 5)] = (120, 130, 190)  # haematoxylin blue
    m = metrics.positive_mask(rgb, "CD3", 0.5)
    np.testing.assert_array_equal(m, _dab_mask(rgb, "CD3", 0.5))
    assert m[20, 20] and not m[45, 40] and metrics.count_cells(m, 0.5) == 1
    glass = np.full((16, 16, 3), 250, np.uint8)
    assert not metrics.positive_mask(glass, "CD3", 0.5).any()


def test_positive_masks_take_one_threshold_for_the_whole_set():
    from napari_staindiffuser.stain import coarse_mask, dab_statistics

    pale = np.empty((48, 48, 3), np.uint8)
    pale[:] = (205, 190, 200)  # tissue, no DAB
    pale[_disk((48, 48), 30, 30, 6)] = (200, 170, 160)  # a faintly brown cell
    positive = pale.copy()
    positive[_disk((48, 48), 12, 12, 6)] = (150, 90, 40)  # a strongly DAB-stained cell
    negative = pale.copy()
    alone = metrics.positive_mask(negative, "CD3", 0.5)  # its own mean + 2 std
    masks = metrics.positive_masks([positive, negative], "CD3", 0.5)
    assert alone.any() and not masks[1].any()  # one threshold: the negative patch stays empty
    assert masks[0][12, 12] and metrics.count_cells(masks[0], 0.5) == 1
    stats = dab_statistics(np.concatenate([positive, negative]))
    np.testing.assert_array_equal(masks[0], coarse_mask(positive, "CD3", stats=stats))
    assert metrics.mask_preset("Ki67", 0.5).rule.value == "otsu"
    glass = np.full((8, 8, 3), 250, np.uint8)
    assert not any(m.any() for m in metrics.positive_masks([glass, glass], "CD3", 0.5))


# --------------------------------------------------------------------------- distribution


def _fid_reference(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_of_gaussian_sets_has_the_closed_form():
    rng = np.random.default_rng(0)
    d, n = 8, 4000
    mu1, mu2 = np.zeros(d), np.linspace(-1, 1, d)
    var2 = np.linspace(0.5, 2.0, d)
    a = rng.normal(mu1, 1.0, (n, d))
    b = rng.normal(mu2, np.sqrt(var2), (n, d))
    got = metrics.fid(a, b)
    assert got == pytest.approx(_fid_reference(a, b), rel=1e-6)  # the sample statistics
    closed = ((mu1 - mu2) ** 2).sum() + (1 + var2 - 2 * np.sqrt(var2)).sum()
    assert got == pytest.approx(closed, rel=0.05)  # the population values
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    # small sets take the other (low-rank) path: same value as the reference
    assert metrics.fid(a[:3], b[:4]) == pytest.approx(_fid_reference(a[:3], b[:4]), rel=1e-6)


@needs_torchmetrics
@pytest.mark.parametrize("n", [5, 40])
def test_fid_agrees_with_torchmetrics(n):
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Given(torch.nn.Module):
        num_features = 16

        def forward(self, x):
            return x

    rng = np.random.default_rng(n)
    a = np.abs(rng.normal(0, 1, (n, 16)))
    b = np.abs(rng.normal(0.3, 1.2, (n + 3, 16)))
    ref = FrechetInceptionDistance(feature=Given())
    ref.update(torch.from_numpy(a), real=True)
    ref.update(torch.from_numpy(b), real=False)
    assert metrics.fid(a, b) == pytest.approx(float(ref.compute()), rel=1e-6)


def _mmd_unbiased(x, y, degree=3):
    d = x.shape[1]
    k = lambda u, v: (u @ v.T / d + 1.0) ** degree  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda a: (a.sum() - np.trace(a)) / (m * (m - 1))  # noqa: E731
    return off(kxx) + off(kyy) - 2 * kxy.mean()


@needs_torchmetrics
def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 1, (200, 16))
    b = rng.normal(0.5, 1, (200, 16))
    mean, std = metrics.kid(a, b, subsets=3)  # subsets of all 200: every subset is the whole set
    assert mean == pytest.approx(_mmd_unbiased(a, b), rel=1e-6) and std == pytest.approx(0.0)
    # two samples of one distribution: about 0; the very same samples on both sides: slightly
    # negative (the estimator takes the sets as independent), O(1/N)
    other = rng.normal(0, 1, (200, 16))
    assert abs(metrics.kid(a, other, subsets=1)[0]) < 0.02 * mean
    same, _ = metrics.kid(a, a, subsets=1)
    assert same == pytest.approx(_mmd_unbiased(a, a), rel=1e-6) and -0.1 * mean < same < 0
    sub = metrics.kid(a, b, subsets=20, subset_size=50, seed=3)
    assert sub == metrics.kid(a, b, subsets=20, subset_size=50, seed=3)  # seeded subsets
    assert sub[1] > 0 and sub[0] == pytest.approx(mean, rel=0.5)


def _pr_reference(real, fake, k=3):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def cover(points, centres, r):
        d = np.linalg.norm(points[:, None] - centres[None], axis=-1)
        return float((d <= r[None]).any(1).mean())

    return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


def test_precision_recall_known_cases():
    rng = np.random.default_rng(2)
    a = rng.normal(0, 1, (150, 10))
    assert metrics.precision_recall(a, a.copy()) == (1.0, 1.0)
    far = rng.normal(100, 1, (120, 10))
    assert metrics.precision_recall(a, far) == (0.0, 0.0)
    # partly overlapping sets: same as a brute-force reference; chunking changes nothing
    b = np.concatenate([rng.normal(0, 1, (60, 10)), rng.normal(3, 1, (60, 10))])
    want = _pr_reference(a, b)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    assert metrics.precision_recall(a, b) == pytest.approx(want, abs=1e-12)
    assert metrics.precision_recall(a, b, chunk=7) == pytest.approx(want, abs=1e-12)
    # a narrow fake set inside the real one: precise, but it misses most of the real set
    narrow = rng.normal(0, 0.1, (100, 10))
    p, r = metrics.precision_recall(a, narrow)
    assert p > 0.9 and r < 0.2
    with pytest.raises(ValueError, match="N >= 4"):
        metrics.precision_recall(a, a[:3])


def test_distribution_metrics_without_the_extra_name_it(monkeypatch):
    monkeypatch.setattr(metrics, "_find", lambda name: None)
    why = metrics.distribution_unavailable()
    assert why and metrics.METRICS_INSTALL_HINT in why and "torchmetrics" in why
    feats = np.random.default_rng(0).normal(size=(10, 4))
    for call in (lambda: metrics.kid(feats, feats), metrics.inception_weights_path):
        with pytest.raises(ImportError, match=r"napari-staindiffuser\[metrics\]"):
            call()
    # everything else still works
    assert metrics.dice(np.ones(3, bool), np.ones(3, bool)) == 1.0
    assert metrics.fid(feats, feats) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.skipif(
    metrics.distribution_unavailable() is not None, reason="the [metrics] extra is not installed"
)
def test_real_inception_features():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert metrics.inception_weights_path().name == "default_1.pt"
    net = metrics.load_inception()
    feats = metrics.inception_features(images, net, batch=3)
    assert feats.shape == (4, 2048) and np.isfinite(feats).all() and (feats >= 0).all()
    assert not np.allclose(feats[0], feats[1])
    again = metrics.inception_features(images[1:2], net)  # no batch effects
    np.testing.assert_allclose(again[0], feats[1], rtol=1e-4, atol=1e-5)
    s = metrics.distribution_scores(feats, feats)
    assert s["fid"] == pytest.approx(0.0, abs=1e-3)
    assert (s["precision"], s["recall"]) == (1.0, 1.0)
