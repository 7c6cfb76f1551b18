"""Procedural building blocks of the synthetic tissue (``synthetic.py`` re-exports SlideStyle).

Hashes and value noise evaluated at absolute coordinates (so a region renders to the same pixels
whole or tile by tile), seeded generators, the blob geometry of glands and aggregates, and the
per-slide stain style and tissue layout drawn from the slide seed. numpy and skimage only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from skimage.color import rgb_from_hed

_S_STYLE, _S_LAYOUT = 1, 2  # salts of the style and layout streams (see synthetic.py)

_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_GOLD, _S33 = np.uint64(0x9E3779B97F4A7C15), np.uint64(33)


def _mix(h: np.ndarray) -> np.ndarray:
    h = (h ^ (h >> _S33)) * _M1
    h = (h ^ (h >> _S33)) * _M2
    return h ^ (h >> _S33)


def _hash(*keys) -> np.ndarray:
    """uint64 hash of broadcast integer keys (Python ints or int arrays, may be negative)."""
    with np.errstate(over="ignore"):
        h = np.full((1,), _GOLD, np.uint64)
        for k in keys:
            if isinstance(k, (int, np.integer)):
                k = np.full((1,), int(k) & 0xFFFFFFFFFFFFFFFF, np.uint64)
            else:
                k = np.asarray(k).astype(np.int64).view(np.uint64)
            h = _mix(h ^ (k + _GOLD + (h << np.uint64(6)) + (h >> np.uint64(2))))
    return h


def _uniform(*keys) -> np.ndarray:
    """Uniform float64 in [0, 1) from a hash of the keys."""
    return (_hash(*keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _smooth(t):
    return t * t * (3.0 - 2.0 * t)


def _noise_grid(ys, xs, scale, *keys) -> np.ndarray:
    """Value noise in [0, 1] on the grid ``ys x xs`` (absolute µm), lattice step ``scale``."""
    fy, fx = ys / scale, xs / scale
    iy, ix = np.floor(fy), np.floor(fx)
    sy, sx = _smooth(fy - iy), _smooth(fx - ix)
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    y0, x0 = int(iy.min()), int(ix.min())
    lat = _uniform(*keys, np.arange(y0, iy.max() + 2)[:, None], np.arange(x0, ix.max() + 2))
    jx, jy = ix - x0, iy - y0
    a = lat[:, jx] * (1.0 - sx) + lat[:, jx + 1] * sx  # per-element ops: tiling-invariant
    return a[jy] * (1.0 - sy)[:, None] + a[jy + 1] * sy[:, None]


def _noise_pts(py, px, scale, *keys) -> np.ndarray:
    """The value noise of :func:`_noise_grid` evaluated at points."""
    fy, fx = py / scale, px / scale
    iy, ix = np.floor(fy), np.floor(fx)
    sy, sx = _smooth(fy - iy), _smooth(fx - ix)
    iy, ix = iy.astype(np.int64), ix.astype(np.int64)
    a = _uniform(*keys, iy, ix) * (1.0 - sx) + _uniform(*keys, iy, ix + 1) * sx
    b = _uniform(*keys, iy + 1, ix) * (1.0 - sx) + _uniform(*keys, iy + 1, ix + 1) * sx
    return a * (1.0 - sy) + b * sy


def _fbm_grid(ys, xs, scale, octaves, *keys) -> np.ndarray:
    out, amp, tot = 0.0, 1.0, 0.0
    for o in range(octaves):
        out = out + amp * _noise_grid(ys, xs, scale / 2**o, *keys, o)
        tot, amp = tot + amp, amp * 0.5
    return out / tot


def _rng(salt: int, seed: int) -> np.random.Generator:
    s = int(seed)
    return np.random.default_rng([salt, s & 0xFFFFFFFF, (s >> 32) & 0xFFFFFFFF])


def _perturb(rng: np.random.Generator, row, sd: float) -> tuple[float, float, float]:
    row = np.asarray(row, np.float64)
    v = row * np.exp(rng.normal(0.0, sd, 3))
    v *= np.linalg.norm(row) / np.linalg.norm(v)
    return (float(v[0]), float(v[1]), float(v[2]))


def _shape_dist(dy, dx, g: dict):
    """Normalised radius, signed outline distance (µm) and angle of offsets to a blob ``g``."""
    c, s = np.cos(g["phi"]), np.sin(g["phi"])
    u, v = c * dx + s * dy, (c * dy - s * dx) / g["e"]
    rho, th = np.hypot(u, v), np.arctan2(v, u)
    rth = 1.0 + g["a2"] * np.cos(2 * th + g["p2"]) + g["a3"] * np.cos(3 * th + g["p3"])
    rth = g["r0"] * (rth + g["a4"] * np.cos(4 * th + g["p4"]))
    return rho / rth, rho - rth, th


def _grid(lo: float, hi: float, step: float, margin: float) -> np.ndarray:
    return np.arange(math.floor((lo - margin) / step), math.floor((hi + margin) / step) + 1)


def _take(o: dict, keep) -> dict:
    return {k: v[keep] for k, v in o.items()}


def _nearest(py, px, o: dict):
    """(min normalised radius, outline distance µm, index) of the nearest blob of ``o``."""
    n = len(py)
    if len(o["cy"]) == 0:
        return np.full(n, np.inf), np.full(n, np.inf), np.zeros(n, np.int64)
    r, d, _ = _shape_dist(py[:, None] - o["cy"], px[:, None] - o["cx"], o)
    j = np.argmin(d, axis=1)
    return r.min(axis=1), d[np.arange(n), j], j


@dataclass(frozen=True)
class SlideStyle:
    """Per-slide staining/scanning style (consistent within one slide).

    Attributes
    ----------
    he_vectors, ihc_vectors : tuple of 3 (R, G, B) tuples of float
        Optical-density stain vectors, rows haematoxylin, eosin, DAB (skimage's ``rgb_from_hed``
        perturbed in hue). H&E uses rows 0-1, IHC rows 0 (counterstain) and 2.
    he_hematoxylin, he_eosin, ihc_hematoxylin, ihc_dab : float
        Concentration multipliers (the IHC counterstain is lighter, about 0.4-0.6).
    background_od : tuple of 3 float
        Optical density of glass + mountant (near white, slight tint).
    blur_sigma_um : float
        Gaussian optical blur sigma in µm (scaled to pixels by ``mpp``).
    noise_std : float
        Standard deviation of the additive per-pixel noise, in 8-bit levels.
    """

    he_vectors: tuple[tuple[float, float, float], ...]
    ihc_vectors: tuple[tuple[float, float, float], ...]
    he_hematoxylin: float = 1.0
    he_eosin: float = 1.0
    ihc_hematoxylin: float = 0.5
    ihc_dab: float = 1.0
    background_od: tuple[float, float, float] = (0.03, 0.03, 0.03)
    blur_sigma_um: float = 0.3
    noise_std: float = 1.5

    @classmethod
    def from_seed(cls, seed: int) -> SlideStyle:
        """Draw a style deterministically from ``seed`` (any Python int)."""
        rng, base = _rng(_S_STYLE, seed), rgb_from_hed
        he = (_perturb(rng, base[0], 0.08), _perturb(rng, base[1], 0.08), _perturb(rng, base[2], 0))
        ihc = (
            _perturb(rng, base[0], 0.08),
            _perturb(rng, base[1], 0),
            _perturb(rng, base[2], 0.05),
        )
        tint = np.clip(rng.uniform(0.015, 0.05) + rng.normal(0.0, 0.006, 3), 0.005, 0.08)
        return cls(
            he_vectors=he,
            ihc_vectors=ihc,
            he_hematoxylin=float(rng.uniform(0.75, 1.2)),
            he_eosin=float(rng.uniform(0.7, 1.25)),
            ihc_hematoxylin=float(rng.uniform(0.4, 0.6)),
            ihc_dab=float(rng.uniform(0.8, 1.2)),
            background_od=(float(tint[0]), float(tint[1]), float(tint[2])),
            blur_sigma_um=float(rng.uniform(0.15, 0.55)),
            noise_std=float(rng.uniform(0.5, 3.0)),
        )


@dataclass(frozen=True)
class _Layout:
    """Tissue-layout parameters of one slide (drawn from the slide seed)."""

    tissue_thr: float
    tissue_scale: float
    gland_p: float
    agg_p: float
    lymph_scatter: float
    lymph_peri: float
    plasma_frac: float
    stroma_p: float
    fibre_angle: float
    fibre_period: float

    @classmethod
    def from_seed(cls, seed: int) -> _Layout:
        r = _rng(_S_LAYOUT, seed)
        lims = [(0.4, 0.56), (700, 1400), (0.6, 1.0), (0.1, 0.35), (0.015, 0.05), (0.08, 0.25)]
        lims += [(0.3, 0.6), (0.2, 0.45), (0.0, math.pi), (5.0, 9.0)]
        return cls(*(float(r.uniform(lo, hi)) for lo, hi in lims))
