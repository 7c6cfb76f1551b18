"""Procedural paired H&E / IHC tissue (SYNTHETIC, not real tissue) for training demos and tests.

A :class:`SyntheticSlide` is an infinite, position-deterministic tissue plane cut to ``shape``:
glands (CK8/18-positive epithelium around a lumen), lymphocyte-like cells (a CD3-positive subset),
spindle stromal cells and wavy collagen. Each slide is rendered as H&E and as CD3 and CK8/18 IHC of
the same, pixel-aligned tissue, with a ground-truth positive-cell mask per stain. Colours follow
Beer–Lambert with scikit-image's stain conventions (``rgb_from_hed``; natural-log optical density,
``I = 255 * exp(-OD)``), so ``skimage.color.rgb2hed`` recovers the concentrations up to a scale.

All sizes are physical (micrometres); ``mpp`` only sets the resolution. Objects live on coarse
grids seeded from ``(slide seed, layer, gy, gx)`` and every field is evaluated at absolute
coordinates, so a region renders to the same pixels whether drawn whole or tile by tile. See
``docs/synthetic.md`` for the tissue model and the CD3 rule.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import ndimage

from ._procedural import (
    SlideStyle,
    _fbm_grid,
    _grid,
    _hash,
    _Layout,
    _mix,
    _nearest,
    _noise_grid,
    _noise_pts,
    _shape_dist,
    _smooth,
    _take,
    _uniform,
)

__all__ = ["NUCLEUS_TYPES", "STAINS", "SlideStyle", "SyntheticRegion", "SyntheticSlide"]
__all__ += ["synthetic_patches"]

STAINS: tuple[str, ...] = ("CD3", "CK8/18")
#: Codes of :meth:`SyntheticSlide.nucleus_types`.
NUCLEUS_TYPES: dict[int, str] = {
    0: "none",
    1: "epithelial",
    2: "stromal",
    3: "T lymphocyte (CD3+)",
    4: "B lymphocyte",
    5: "plasma cell",
}

# Salts separating the random streams of the layers.
_S_TISSUE, _S_GLAND, _S_GDENS, _S_EPI = 10, 20, 21, 22  # 1, 2: style, layout
_S_AGG, _S_LYMPH, _S_LDENS, _S_STROMA, _S_SDENS, _S_FIBRE, _S_CHROM, _S_NOISE = range(30, 38)
# Object grids and extents (µm). An object never reaches further than its extent from its centre.
_GLAND_GRID, _GLAND_RMAX, _GLAND_GAP = 160.0, 74.0, 12.0  # 2 * RMAX + GAP <= GRID
_AGG_GRID, _AGG_RMAX = 450.0, 160.0
_LYMPH_GRID, _STROMA_GRID, _CELL_RMAX = 8.0, 13.0, 10.0
_PERI = 30.0  # periglandular zone (µm) whose lymphocytes are T cells
_CORE = 0.6  # aggregate core (normalised radius) whose lymphocytes are B cells
_CACHE_SIZE = 6
_TAU = 2.0 * math.pi


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _check_stain(stain: str) -> str:
    if stain not in STAINS:
        raise ValueError(f"unknown stain {stain!r}; valid stains are {', '.join(STAINS)}")
    return stain


@dataclass(frozen=True, eq=False)
class SyntheticRegion:
    """One rendered region of a synthetic slide (all arrays pixel-aligned).

    Attributes
    ----------
    he : ndarray, shape (H, W, 3), uint8
        H&E RGB, 0-255.
    ihc : dict of str to ndarray, shape (H, W, 3), uint8
        IHC RGB (haematoxylin counterstain + DAB) per stain of :data:`STAINS`.
    masks : dict of str to ndarray, shape (H, W), bool
        Ground-truth positive cells per stain (always inside ``tissue``).
    tissue : ndarray, shape (H, W), bool
        Tissue (True) versus glass.
    """

    he: np.ndarray
    ihc: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    tissue: np.ndarray


class SyntheticSlide:
    """A lazily rendered synthetic slide: H&E, CD3 and CK8/18 IHC and masks of the same tissue.

    Parameters
    ----------
    seed : int
        Slide seed; fixes the tissue layout and the :class:`SlideStyle`.
    shape : tuple of int
        ``(H, W)`` in pixels.
    mpp : float
        Microns per pixel, in [0.05, 20]; the tissue is physical, ``mpp`` only sets resolution.
    chunk : int
        Dask chunk edge in pixels (>= 16).
    style : SlideStyle, optional
        Override of ``SlideStyle.from_seed(seed)``.
    """

    def __init__(
        self,
        seed: int = 0,
        shape: tuple[int, int] = (4096, 4096),
        mpp: float = 0.5,
        chunk: int = 1024,
        *,
        style: SlideStyle | None = None,
    ):
        if len(tuple(shape)) != 2:
            raise ValueError(f"shape must be (H, W), got {shape!r}")
        self.shape = (_check_int("shape[0]", shape[0]), _check_int("shape[1]", shape[1]))
        try:
            ok = 0.05 <= float(mpp) <= 20.0
        except (TypeError, ValueError):
            ok = False
        if not ok or isinstance(mpp, bool):
            raise ValueError(f"mpp must be a number in [0.05, 20], got {mpp!r}")
        self.seed, self.mpp = int(seed), float(mpp)
        self.chunk = _check_int("chunk", chunk, 16)
        self.style = style if style is not None else SlideStyle.from_seed(self.seed)
        self._lay = _Layout.from_seed(self.seed)
        self.__setstate__(None)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_lock", "_busy")}

    def __setstate__(self, state):
        self.__dict__.update(state or {})
        self._cache, self._lock, self._busy = OrderedDict(), threading.Lock(), {}

    def __repr__(self) -> str:
        return f"SyntheticSlide(seed={self.seed}, shape={self.shape}, mpp={self.mpp})"

    # ------------------------------------------------------------------ objects (µm)
    def _blobs(self, salt, grid, margin, box, r0, e, amps) -> tuple[dict, tuple]:
        """Harmonic-ellipse proposals, one per grid cell over ``box``; 2-D arrays + uniforms."""
        gy, gx = np.meshgrid(
            *(_grid(box[i], box[i + 1], grid, margin) for i in (0, 2)), indexing="ij"
        )

        def u(k):
            return _uniform(self.seed, salt, gy, gx, k)

        r0, e = r0[0] + r0[1] * u(2) ** r0[2], e + (1 - e) * u(10)
        o = dict(cy=(gy + u(0)) * grid, cx=(gx + u(1)) * grid, r0=r0, e=e, phi=u(3) * math.pi)
        for i, a in enumerate(amps):
            o[f"a{i + 2}"], o[f"p{i + 2}"] = a * (2 * u(4 + i) - 1), u(7 + i) * _TAU
        o["rmax"] = r0 * (1 + np.abs(o["a2"]) + np.abs(o["a3"]) + np.abs(o["a4"]))
        return o, (gy, gx, u)

    def _aggregates(self, box) -> dict:
        o, (_, _, u) = self._blobs(
            _S_AGG, _AGG_GRID, _AGG_RMAX, box, (55, 85, 1), 0.65, (0.08, 0.05, 0)
        )
        return _take(o, u(11) < self._lay.agg_p)

    def _glands(self, box) -> dict:
        m = _GLAND_RMAX + _GLAND_GRID  # one extra ring of grid cells for the thinning
        o, (gy, gx, u) = self._blobs(
            _S_GLAND, _GLAND_GRID, m, box, (25, 36, 1.2), 0.55, (0.1, 0.06, 0.04)
        )
        r0 = o["r0"]
        o["t"] = np.clip(0.36 * r0, 11.0, 24.0) * (0.9 + 0.2 * u(11))  # epithelium height
        o["n"] = np.maximum(8, np.round(_TAU * (r0 - o["t"] / 2) / (6.5 + 1.5 * u(12))))
        o["off"], o["uid"], o["prio"] = u(13), _hash(self.seed, gy, gx), u(14)
        o["sec"] = np.where(u(15) < 0.3, 0.1 + 0.25 * u(16), 0.0)  # luminal secretion
        o["fold"], o["k"] = np.where(u(18) < 0.4, 0.3 * u(19), 0.0), np.floor(4 + 4 * u(20))
        dens = _noise_pts(o["cy"], o["cx"], 600.0, self.seed, _S_GDENS)
        ok = u(17) < self._lay.gland_p * np.clip((dens - 0.1) / 0.3, 0, 1)
        mg = _AGG_RMAX + _GLAND_RMAX
        ag = self._aggregates(
            (o["cy"].min() - mg, o["cy"].max() + mg, o["cx"].min() - mg, o["cx"].max() + mg)
        )
        if len(ag["cy"]):  # no gland in the middle of a lymphoid aggregate
            d = np.hypot(o["cy"][..., None] - ag["cy"], o["cx"][..., None] - ag["cx"])
            ok &= ~np.any(d < 0.55 * ag["r0"] + 0.6 * r0[..., None], axis=-1)
        # deterministic thinning: drop a gland overlapping a higher-priority neighbour
        inner, keep = (slice(1, -1), slice(1, -1)), ok[1:-1, 1:-1].copy()
        for dy, dx in [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b]:
            nb = (slice(1 + dy, ok.shape[0] - 1 + dy), slice(1 + dx, ok.shape[1] - 1 + dx))
            dist = np.hypot(o["cy"][inner] - o["cy"][nb], o["cx"][inner] - o["cx"][nb])
            hit = dist < o["rmax"][inner] + o["rmax"][nb] + _GLAND_GAP
            keep &= ~(ok[nb] & hit & (o["prio"][nb] > o["prio"][inner]))
        return {k: v[inner][keep] for k, v in o.items()}

    def _cells(self, box, glands: dict, aggs: dict) -> dict:
        """Lymphocyte-like and stromal cells whose stamps may reach ``box`` (µm)."""
        lay, seed, out = self._lay, self.seed, []
        for salt, step in ((_S_LYMPH, _LYMPH_GRID), (_S_STROMA, _STROMA_GRID)):
            gy, gx = np.meshgrid(
                *(_grid(box[i], box[i + 1], step, _CELL_RMAX) for i in (0, 2)), indexing="ij"
            )
            gy, gx = gy.ravel(), gx.ravel()

            def u(k, gy=gy, gx=gx, salt=salt):
                return _uniform(seed, salt, gy, gx, k)

            jit = 0.6 if salt == _S_LYMPH else 1.0
            cy, cx = (gy + 0.5 + jit * (u(0) - 0.5)) * step, (gx + 0.5 + jit * (u(1) - 0.5)) * step
            a_r, (_, d_g, j), n = _nearest(cy, cx, aggs)[0], _nearest(cy, cx, glands), len(cy)
            z = np.zeros(n)
            if salt == _S_LYMPH:
                scatter = lay.lymph_scatter * (
                    0.3 + 1.4 * _noise_pts(cy, cx, 250.0, seed, _S_LDENS)
                )
                peri = lay.lymph_peri * np.clip(1 - d_g / _PERI, 0, 1)
                p = np.maximum(np.maximum(scatter, peri), 0.92 * np.clip((1 - a_r) / 0.1, 0, 1))
                ok = (u(2) < p) & (d_g > 6.0)
                # the CD3 rule: aggregate mantle, periglandular and T-like scattered cells are T
                kind = np.where(d_g < _PERI, 3, np.where(u(3) < lay.plasma_frac, 5, 3))
                kind = np.where(a_r < 1, np.where(a_r < _CORE, 4, 3), kind)
                t, b, pl = kind == 3, kind == 4, kind == 5
                r = np.select([t, b], [3.1 + 0.35 * u(4), 3.6 + 0.4 * u(4)], 3.2 + 0.4 * u(4))
                asp = np.select([t, b], [1 + 0.08 * u(5), 1.05 + 0.15 * u(5)], 1 + 0.1 * u(5))
                a, bb, phi = r * np.sqrt(asp), r / np.sqrt(asp), u(6) * np.pi
                # T: thin pale halo; B: thin rim; plasma: nucleus eccentric in ovoid cytoplasm
                ba = np.where(pl, 6.0 + u(7), np.where(t, a + 0.8, a + 0.5))
                bb_ = np.where(pl, 4.6 + 0.6 * u(8), np.where(t, bb + 0.8, bb + 0.5))
                off = np.where(pl, np.maximum(ba - a - 0.4, 0.0), 0.0)
                hv = np.select([t, b], [1.85, 1.75], 1.7) * (0.95 + 0.1 * u(10))
                c = dict(cy=cy, cx=cx, a=a, b=bb, phi=phi, irr=np.where(b, 0.07, 0.02),
                         irp=u(9) * _TAU, H=hv, tex=np.select([t, b], [0.12, 0.45], 0.2), bend=z,
                         spokes=np.where(pl, 0.18, 0), ba=ba, bb=bb_, ncy=cy + off * np.sin(phi),
                         ncx=cx + off * np.cos(phi), kind=kind)  # fmt: skip
            else:
                dens = lay.stroma_p * (0.4 + 1.2 * _noise_pts(cy, cx, 300.0, seed, _S_SDENS))
                ok = (u(2) < dens * np.where(a_r < 1, 0.15, 1.0)) & (d_g > 3.0)
                phi = lay.fibre_angle + 1.2 * (_noise_pts(cy, cx, 150.0, seed, _S_FIBRE, 9) - 0.5)
                if len(glands["cy"]):  # fibroblasts wrap around nearby glands
                    tang = np.arctan2(cy - glands["cy"][j], cx - glands["cx"][j]) + np.pi / 2
                    phi = np.where(d_g < 15.0, tang, phi)
                c = dict(cy=cy, cx=cx, a=5.0 + 4.0 * u(4), b=0.9 + 0.6 * u(5), irr=z, irp=z,
                         phi=phi + 0.3 * (u(3) - 0.5), H=1.25 * (0.75 + 0.4 * u(6)), tex=z + 0.25,
                         bend=0.3 * (u(7) - 0.5), spokes=z, ba=z, bb=z + 1, ncy=cy, ncx=cx,
                         kind=np.full(n, 2))  # fmt: skip
            out.append(_take(c, ok))
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    # ------------------------------------------------------------------ rendering
    def _tissue_field(self, ys, xs):
        t = _fbm_grid(ys, xs, self._lay.tissue_scale, 4, self.seed, _S_TISSUE)
        return np.clip((t - self._lay.tissue_thr) / 0.001 + 0.5, 0.0, 1.0)

    def _bbox(self, cy, cx, r, Y0, X0, shape):
        """Slice of the region covering a disc (µm) and the µm offsets of its pixels."""
        mpp, (He, We) = self.mpp, shape
        iy0, iy1 = max(0, math.floor((cy - r) / mpp) - Y0), min(He, math.ceil((cy + r) / mpp) - Y0)
        ix0, ix1 = max(0, math.floor((cx - r) / mpp) - X0), min(We, math.ceil((cx + r) / mpp) - X0)
        if iy0 >= iy1 or ix0 >= ix1:
            return None, None, None
        dy = (np.arange(Y0 + iy0, Y0 + iy1) + 0.5)[:, None] * mpp - cy
        dx = (np.arange(X0 + ix0, X0 + ix1) + 0.5)[None, :] * mpp - cx
        return (slice(iy0, iy1), slice(ix0, ix1)), dy, dx

    def _render(self, y: int, x: int, h: int, w: int):
        """All layers of a region: ``(SyntheticRegion, nucleus-type map)``."""
        mpp, sty, seed, lay = self.mpp, self.style, self.seed, self._lay
        sig = sty.blur_sigma_um / mpp
        m = int(4.0 * sig + 0.5) + 1 if sig > 0.05 else 0  # halo covering the blur kernel
        Y0, X0, He, We = y - m, x - m, h + 2 * m, w + 2 * m
        shp = (He, We)
        ys, xs = (np.arange(Y0, Y0 + He) + 0.5) * mpp, (np.arange(X0, X0 + We) + 0.5) * mpp
        cov = self._tissue_field(ys, xs)
        tex_f, tex_c = (
            _noise_grid(ys, xs, 0.7, seed, _S_CHROM),
            _noise_grid(ys, xs, 1.6, seed, _S_CHROM, 1),
        )

        def box(mg):
            return (ys[0] - mg, ys[-1] + mg, xs[0] - mg, xs[-1] + mg)

        glands = self._glands(box(_CELL_RMAX + _PERI + _GLAND_RMAX))
        aggs = self._aggregates(box(_CELL_RMAX + _AGG_RMAX))

        # --- stroma: two families of wavy collagen fibres, lymphoid aggregates
        warp = 20.0 * _noise_grid(ys, xs, 40.0, seed, _S_FIBRE, 1)
        warp = warp + 70.0 * _noise_grid(ys, xs, 170.0, seed, _S_FIBRE, 2)
        mix = _smooth(np.clip(2.5 * _noise_grid(ys, xs, 300.0, seed, _S_FIBRE, 5) - 0.75, 0, 1))
        fib = 0.0
        for k, ang in enumerate((lay.fibre_angle, lay.fibre_angle + 0.9)):
            v = ys[:, None] * math.cos(ang) - xs[None, :] * math.sin(ang) + warp
            f = (0.5 + 0.5 * np.sin(v * (_TAU / lay.fibre_period))) ** 3
            fib = fib + f * (mix if k else 1 - mix)
        brk = np.clip((_noise_grid(ys, xs, 9.0, seed, _S_FIBRE, 3) - 0.15) / 0.6, 0.0, 1.0)
        dens = 0.7 + 0.5 * _noise_grid(ys, xs, 80.0, seed, _S_FIBRE, 4)
        E = 0.42 * dens * (0.5 + 0.5 * fib * brk) + 0.08 * tex_c
        H = 0.06 + 0.05 * tex_c
        agg = np.zeros(shp)
        for i in range(len(aggs["cy"])):
            g = {k: v[i] for k, v in aggs.items()}
            sl, dy, dx = self._bbox(g["cy"], g["cx"], _AGG_RMAX, Y0, X0, shp)
            if sl is not None:
                np.maximum(
                    agg[sl], np.clip((1.0 - _shape_dist(dy, dx, g)[0]) / 0.15, 0, 1), out=agg[sl]
                )
        E, H = E * (1 - 0.55 * agg), H + 0.05 * agg

        # --- glands: a ring of columnar cells (basal nuclei) around a lumen
        epi, lumen = np.zeros(shp, bool), np.zeros(shp, bool)
        en_cov, en_h, memb, apical, bm, sec = (np.zeros(shp) for _ in range(6))
        for i in range(len(glands["cy"])):
            g = {k: v[i] for k, v in glands.items()}
            sl, dy, dx = self._bbox(g["cy"], g["cx"], g["rmax"] + 3.0, Y0, X0, shp)
            if sl is None:
                continue
            _, d, th = _shape_dist(dy, dx, g)
            depth = -d  # µm inwards from the basement membrane
            t = g["t"] * (1 + 0.08 * np.cos(2 * th + g["p3"]) + g["fold"] * np.cos(g["k"] * th))
            ep, lu = (depth >= 0) & (depth < t), depth >= t
            f = (th / _TAU + 0.5) * g["n"] + g["off"]  # angular cell coordinate
            k = np.floor(f)
            loc, k = f - k, (k.astype(np.int64) % int(g["n"]))

            def jit(q, k=k, g=g):
                return _uniform(seed, _S_EPI, g["uid"].astype(np.int64), k, q)

            dn = t * (0.18 + 0.25 * jit(0))
            ln = np.minimum(0.28 * t, 5.5) * (0.75 + 0.45 * jit(1))
            wn = (2.1 + 0.7 * jit(2)) * (jit(5) > 0.08)  # 8 % of cells: nucleus not in the section
            width = _TAU * np.maximum(d + g["r0"], 1.0) / g["n"]
            tang = (loc - 0.5 - 0.16 * (jit(3) - 0.5)) * width
            qn = np.hypot((depth - dn) / ln, tang / np.maximum(wn, 1e-3))
            nc = np.clip((1 - qn) * wn / mpp + 0.5, 0, 1) * (ep & (wn > 0))
            nh = (
                nc
                * 1.25
                * (0.9 + 0.2 * jit(4))
                * (0.8 + 0.3 * tex_f[sl] + 0.3 * np.clip(qn - 0.6, 0, 1))
            )
            epi[sl] |= ep
            lumen[sl] |= lu
            mb = np.clip(1 - np.minimum(loc, 1 - loc) * width / 0.6, 0, 1) * ep
            for arr, val in ((en_cov, nc), (en_h, nh), (memb, mb), (sec, lu * g["sec"])):
                np.maximum(arr[sl], val, out=arr[sl])
            np.maximum(apical[sl], ep * np.clip(1 - (t - depth) / 1.5, 0, 1), out=apical[sl])
            np.maximum(bm[sl], np.clip(1 - np.abs(depth + 0.7) / 0.8, 0, 1), out=bm[sl])

        # --- cells, stamped with max-composition
        cells = self._cells(box(_CELL_RMAX + 1.0), glands, aggs)
        maps = {k: np.zeros(He * We) for k in ("ncov", "nh", "halo", "cyto", "cd3", "cd3m", "kind")}
        for kinds in ((2,), (3, 4), (5,)):
            self._stamp(_take(cells, np.isin(cells["kind"], kinds)), maps, tex_f, tex_c, Y0, X0)
        mp = {k: v.reshape(shp) for k, v in maps.items()}

        # --- H&E concentrations
        E = np.where(epi, 0.42 * (0.85 + 0.3 * tex_c) + 0.15 * apical, E)
        H = np.where(epi, 0.2 + 0.05 * tex_c, H)
        E = np.where(lumen, 0.03 + sec * (0.6 + 0.4 * tex_c), E)
        H = np.where(lumen, 0.02, H)
        E = np.where(epi | lumen, E, E + 0.35 * bm) * (1 - 0.35 * memb)
        E, H = E * (1 - en_cov) + 0.1 * en_cov, H * (1 - en_cov) + en_h
        cyto, halo, ncov = mp["cyto"], mp["halo"], mp["ncov"]
        E, H = E * (1 - cyto) + 0.45 * cyto, H * (1 - cyto) + 0.3 * cyto
        E, H = E * (1 - 0.45 * halo), H * (1 - 0.3 * halo)
        E, H = E * (1 - ncov) + 0.08 * ncov, H * (1 - ncov) + mp["nh"]

        # --- IHC DAB: CK8/18 cytoplasmic (membrane-accentuated), CD3 membranous ring
        ck = (1.1 * (0.85 + 0.3 * tex_c) + 0.5 * memb + 0.3 * apical) * epi
        ck = ck * (1 - 0.8 * en_cov) * (1 - ncov - halo).clip(0, 1)
        dabs = {"CD3": 1.4 * mp["cd3"], "CK8/18": ck}
        zero = np.zeros(shp)
        key = _hash(seed, _S_NOISE, np.arange(Y0, Y0 + He)[:, None], np.arange(X0, X0 + We))
        sl = (slice(m, m + h), slice(m, m + w))
        hc = cov * H
        he = self._image(
            hc * sty.he_hematoxylin, cov * E * sty.he_eosin, zero, sty.he_vectors, sig, key, 0
        )
        ihc = {
            s: self._image(hc * sty.ihc_hematoxylin, zero, cov * (dabs[s] + 0.03) * sty.ihc_dab,
                           sty.ihc_vectors, sig, key, 1 + i)[sl]
            for i, s in enumerate(STAINS)
        }  # fmt: skip
        tissue = (cov >= 0.5)[sl]
        masks = {"CD3": (mp["cd3m"] > 0)[sl] & tissue, "CK8/18": epi[sl] & tissue}
        kind = np.where(mp["kind"] > 0, mp["kind"], np.where(en_cov > 0.5, 1, 0))[sl] * tissue
        return SyntheticRegion(he=he[sl], ihc=ihc, masks=masks, tissue=tissue), kind.astype(
            np.uint8
        )

    def _stamp(self, c: dict, maps: dict, tex_f, tex_c, Y0, X0):
        """Draw cells (nucleus + cell body) into the flat ``maps`` with max-composition."""
        if len(c["cy"]) == 0:
            return
        mpp, (He, We) = self.mpp, tex_f.shape
        shift = np.hypot(c["ncy"] - c["cy"], c["ncx"] - c["cx"])
        R = math.ceil(np.max(np.maximum(np.maximum(c["a"], c["ba"]) + shift, 1.1 * c["a"])) / mpp)
        off = np.arange(-R - 1, R + 2)
        o = {k: v[:, None, None] for k, v in c.items()}
        py = np.floor(c["cy"] / mpp).astype(np.int64)[:, None, None] + off[:, None]  # (N, S, 1)
        px = np.floor(c["cx"] / mpp).astype(np.int64)[:, None, None] + off[None, :]  # (N, 1, S)
        yum, xum = (py + 0.5) * mpp, (px + 0.5) * mpp
        cs, sn = np.cos(o["phi"]), np.sin(o["phi"])
        dy, dx = yum - o["ncy"], xum - o["ncx"]
        qa, qb = (cs * dx + sn * dy) / o["a"], (cs * dy - sn * dx) / o["b"]
        qb = qb - o["bend"] * qa * qa * o["a"] / o["b"]
        rho = np.hypot(qa, qb)
        ca, sa = qa / np.maximum(rho, 1e-9), qb / np.maximum(rho, 1e-9)  # cos, sin of the angle
        c3, s3 = ca * (4 * ca * ca - 3), sa * (3 - 4 * sa * sa)
        rho = rho / (1 + o["irr"] * (c3 * np.cos(o["irp"]) - s3 * np.sin(o["irp"])))
        ncov = np.clip((1 - rho) * o["b"] / mpp + 0.5, 0, 1)
        dy, dx = yum - o["cy"], xum - o["cx"]
        rb = np.hypot(
            (cs * dx + sn * dy) / np.maximum(o["ba"], 1e-6), (cs * dy - sn * dx) / o["bb"]
        )
        bcov = np.clip((1 - rb) * o["bb"] / mpp + 0.5, 0, 1) * (o["ba"] > 0)
        inside = (py >= Y0) & (py < Y0 + He) & (px >= X0) & (px < X0 + We)
        sel = inside & ((ncov > 0) | (bcov > 0))
        oi, si, sj = np.nonzero(sel)
        flat = (py[oi, si, 0] - Y0) * We + (px[oi, 0, sj] - X0)
        ncov, bcov, rho, rb = ncov[sel], bcov[sel], rho[sel], rb[sel]
        kind, spk = c["kind"][oi], c["spokes"][oi]
        tx = np.where(kind == 4, tex_c.ravel()[flat], tex_f.ravel()[flat])
        hv = c["H"][oi] * (1 + c["tex"][oi] * (2 * tx - 1))
        if np.any(spk > 0):  # plasma cells: clock-face chromatin
            hv *= 1 + spk * np.cos(5 * np.arctan2(qb[sel], qa[sel]) + c["irp"][oi]) * (rho > 0.35)
        rest, tcell = bcov * (1 - ncov), kind == 3
        ring = np.maximum(0.2, np.clip((rho - 0.7) / 0.3, 0, 1))
        ring = ring * (1 + 0.5 * np.exp(-(((rb - 0.85) / 0.12) ** 2)))
        vals = {
            "ncov": ncov, "nh": ncov * hv, "halo": rest * tcell, "cyto": rest * (kind == 5),
            "cd3": bcov * ring * tcell, "cd3m": (tcell & (rb <= 1.0)).astype(np.float64),
            "kind": np.where(ncov >= 0.5, kind, 0).astype(np.float64),
        }  # fmt: skip
        for k, v in vals.items():
            np.maximum.at(maps[k], flat, v)

    def _image(self, h, e, d, vectors, sig, key, salt) -> np.ndarray:
        """Beer–Lambert RGB from concentration maps, blurred and noised; (H, W, 3) uint8."""
        vec, sty = np.asarray(vectors, np.float64), self.style
        out = np.empty((*h.shape, 3), np.uint8)
        with np.errstate(over="ignore"):
            k = _mix(key ^ np.uint64(0x5851F42D4C957F2D * (salt + 1) % 2**64))
        for ch in range(3):
            img = 255.0 * np.exp(
                -(h * vec[0, ch] + e * vec[1, ch] + d * vec[2, ch] + sty.background_od[ch])
            )
            if sig > 0.05:
                img = ndimage.gaussian_filter(img, sig, truncate=4.0)
            if sty.noise_std > 0:
                u = ((k >> np.uint64(21 * ch)) & np.uint64(0x1FFFFF)).astype(np.float64)
                img += (u * 2.0**-21 - 0.5) * (math.sqrt(12.0) * sty.noise_std)
            out[..., ch] = np.clip(np.rint(img), 0, 255)
        return out

    def _render_cached(self, y: int, x: int, h: int, w: int):
        """Render through a small LRU cache; concurrent requests of one region render once."""
        key = (y, x, h, w)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            ev = self._busy.get(key)
            owner = ev is None
            if owner:
                ev = self._busy[key] = threading.Event()
        if not owner:
            ev.wait()
            with self._lock:
                hit = self._cache.get(key)
            return hit if hit is not None else self._render(y, x, h, w)
        try:
            out = self._render(y, x, h, w)
            with self._lock:
                self._cache[key] = out
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        finally:
            with self._lock:
                self._busy.pop(key, None)
            ev.set()
        return out

    def _check_region(self, y, x, h, w) -> tuple[int, int, int, int]:
        y, x = _check_int("y", y, 0), _check_int("x", x, 0)
        h, w = _check_int("h", h), _check_int("w", w)
        if y + h > self.shape[0] or x + w > self.shape[1]:
            raise ValueError(f"region ({y}, {x}, {h}, {w}) exceeds the slide shape {self.shape}")
        return y, x, h, w

    # ------------------------------------------------------------------ public API
    def render(self, y: int, x: int, h: int, w: int) -> SyntheticRegion:
        """Render the pixels ``[y:y+h, x:x+w]``; deterministic and seamless across tilings.

        Returns
        -------
        SyntheticRegion
            H&E and IHC RGB, (h, w, 3) uint8 in 0-255; masks and tissue, (h, w) bool.
        """
        r = self._render_cached(*self._check_region(y, x, h, w))[0]
        copy = {
            k: {s: a.copy() for s, a in v.items()} for k, v in (("ihc", r.ihc), ("masks", r.masks))
        }
        return SyntheticRegion(he=r.he.copy(), tissue=r.tissue.copy(), **copy)  # cache stays intact

    def nucleus_types(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Ground-truth nucleus type per pixel: (h, w) uint8, codes of :data:`NUCLEUS_TYPES`."""
        return self._render_cached(*self._check_region(y, x, h, w))[1].copy()

    def tissue_fraction(self, y: int, x: int, h: int, w: int) -> float:
        """Tissue fraction (0-1) of a region, from the outline field only (cheap)."""
        y, x, h, w = self._check_region(y, x, h, w)
        ys, xs = (np.arange(y, y + h) + 0.5) * self.mpp, (np.arange(x, x + w) + 0.5) * self.mpp
        return float(np.mean(self._tissue_field(ys, xs) >= 0.5))

    def _dask(self, field: str, stain: str | None = None):
        import dask.array as da
        from dask.base import tokenize

        (H, W), c = self.shape, self.chunk
        rgb = field in ("he", "ihc")
        chunks = [tuple(min(c, n - s) for s in range(0, n, c)) for n in (H, W)] + [(3,)] * rgb
        dtype = np.uint8 if rgb else bool
        tok = tokenize(self.seed, self.shape, self.mpp, c, self.style, field, stain)
        return da.map_blocks(
            partial(_dask_block, self, field, stain),
            chunks=tuple(chunks),
            dtype=dtype,
            meta=np.empty((0,) * len(chunks), dtype),
            name=f"synthetic-{field}-{tok}",
        )

    @property
    def he(self):
        """Lazy H&E: dask array (H, W, 3) uint8, chunks of ``chunk`` pixels."""
        return self._dask("he")

    def ihc(self, stain: str):
        """Lazy IHC of ``stain`` (one of :data:`STAINS`): dask array (H, W, 3) uint8."""
        return self._dask("ihc", _check_stain(stain))

    def mask(self, stain: str):
        """Lazy positive-cell mask of ``stain``: dask array (H, W) bool."""
        return self._dask("masks", _check_stain(stain))

    @property
    def tissue(self):
        """Lazy tissue mask: dask array (H, W) bool."""
        return self._dask("tissue")


def _dask_block(slide: SyntheticSlide, field: str, stain: str | None, block_id=None):
    """One dask chunk (picklable: no closures)."""
    (H, W), c = slide.shape, slide.chunk
    i, j = block_id[0] * c, block_id[1] * c
    out = getattr(slide._render_cached(i, j, min(c, H - i), min(c, W - j))[0], field)
    return (out if stain is None else out[stain]).copy()


def synthetic_patches(
    seed: int, n: int, size: int = 256, *, mpp: float = 0.5, min_tissue: float = 0.5
) -> Iterator[SyntheticRegion]:
    """Yield ``n`` training patches, each from a different synthetic slide.

    Parameters
    ----------
    seed : int
        Master seed; the slide seed and position of patch ``i`` derive from ``(seed, i)``.
    n : int
        Number of patches (>= 0).
    size : int
        Patch edge in pixels (>= 16).
    mpp : float
        Microns per pixel.
    min_tissue : float
        Minimum tissue fraction of a patch, in [0, 1].

    Yields
    ------
    SyntheticRegion
        ``size x size`` regions, deterministic in ``seed``.
    """
    n, size = _check_int("n", n, 0), _check_int("size", size, 16)
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue!r}")
    span = 16384
    for i in range(n):
        for attempt in range(100_000):  # a new slide every 32 attempts
            sseed = int(_hash(seed, 7, i, attempt // 32)[0] >> np.uint64(33))
            slide = SyntheticSlide(sseed, (span + size, span + size), mpp)
            u = _uniform(seed, 8, i, attempt, np.arange(2))
            y, x = int(u[0] * span), int(u[1] * span)
            if slide.tissue_fraction(y, x, size, size) >= min_tissue:
                yield slide._render(y, x, size, size)[0]
                break
        else:  # pragma: no cover
            raise RuntimeError(f"no patch with tissue >= {min_tissue} found")
