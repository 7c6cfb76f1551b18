"""Paired training data: H&E / IHC patches with a coarse mask and the name of the IHC's stain.

A *source* is any sequence of :class:`PairSample` (``len(source)`` and ``source[i]``). Sources:

- :class:`PairFolder`: a folder with ``manifest.csv`` (columns ``he, ihc, mask, stain``; paths
  relative to the folder; ``mask`` may be empty) of PNG/TIFF patches. ``write_pair_folder``
  writes one, ``staindiffuser synth`` makes one from synthetic tissue.
- :class:`InMemoryPairs`: a list of samples (tests, the GUI's marked regions).

:func:`make_batch` turns samples into model tensors: resized to the model's patch size,
augmented (flips and 90° rotations on H&E, IHC and mask together; mild stain jitter on the
H&E only), scaled to [-1, 1]. All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class PairSample:
    """One uniplex training pair.

    Attributes
    ----------
    he, ihc : ndarray (H, W, 3) uint8
        Registered H&E and IHC of the same tissue.
    stain : str
        Which stain the IHC is (must be one of the model's stains).
    mask : ndarray (H, W) bool, optional
        Coarse positive-cell mask (from the IHC). Required when the model has an auxiliary branch.
    """

    he: np.ndarray
    ihc: np.ndarray
    stain: str
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("he", "ihc"):
            a = getattr(self, name)
            if not (isinstance(a, np.ndarray) and a.ndim == 3 and a.shape[2] == 3):
                got = getattr(a, "shape", type(a).__name__)
                raise ValueError(f"{name} must be an (H, W, 3) RGB array; got {got}")
            if a.dtype != np.uint8:
                raise ValueError(f"{name} must be uint8; got {a.dtype}")
        if self.he.shape != self.ihc.shape:
            raise ValueError(
                f"H&E and IHC of a pair must have the same size; got {self.he.shape[:2]} and "
                f"{self.ihc.shape[:2]}"
            )
        if self.mask is not None and self.mask.shape != self.he.shape[:2]:
            raise ValueError(
                f"mask must be (H, W) = {self.he.shape[:2]}; "
                f"got {getattr(self.mask, 'shape', None)}"
            )


class InMemoryPairs(Sequence):
    """A list of :class:`PairSample` with a description for checkpoint provenance."""

    def __init__(self, samples: Iterable[PairSample], description: str = "in-memory pairs"):
        self.samples = list(samples)
        self.description = description

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.samples[i]

    @property
    def stains(self) -> list[str]:
        return sorted({s.stain for s in self.samples})

    def resized(self, size: int) -> InMemoryPairs:
        """A copy with every sample downsampled once to ``size`` (instead of at every step)."""
        out = []
        for s in self.samples:
            mask = None if s.mask is None else resize_patch(s.mask, size, is_mask=True)
            he = resize_patch(s.he, size, is_mask=False)
            out.append(PairSample(he, resize_patch(s.ihc, size, is_mask=False), s.stain, mask))
        return InMemoryPairs(out, self.description)


def _read_image(path: Path) -> np.ndarray:
    from skimage import io as skio

    try:
        return np.asarray(skio.imread(str(path)))
    except Exception as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


class PairFolder(Sequence):
    """Paired patches listed in ``<root>/manifest.csv``; images are read lazily per item."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise ValueError(
                f"{self.root} is not a paired-patch folder: {MANIFEST} is missing (expected "
                "columns he, ihc, mask, stain; see docs/training.md)"
            )
        with open(manifest, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"he", "ihc", "stain"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"{manifest} lacks the columns {sorted(missing)}; it has {reader.fieldnames}"
                )
            self.rows = [r for r in reader if r.get("he")]
        if not self.rows:
            raise ValueError(f"{manifest} lists no pairs")
        self.description = f"paired folder {self.root.resolve()} ({len(self.rows)} pairs)"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def stains(self) -> list[str]:
        return sorted({r["stain"] for r in self.rows})

    def __getitem__(self, i):  # type: ignore[override]
        row = self.rows[i]
        he = _to_rgb(_read_image(self.root / row["he"]), row["he"])
        ihc = _to_rgb(_read_image(self.root / row["ihc"]), row["ihc"])
        mask = None
        if row.get("mask"):
            m = _read_image(self.root / row["mask"])
            mask = (m[..., 0] if m.ndim == 3 else m) > 0
        return PairSample(he=he, ihc=ihc, stain=row["stain"], mask=mask)


def _to_rgb(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{name}: expected an 8-bit RGB(A) image; got {a.dtype} {a.shape}")
    return a


def write_pair_folder(root: str | os.PathLike, samples: Iterable[PairSample]) -> Path:
    """Write samples as PNGs plus ``manifest.csv`` (written last, atomically)."""
    from skimage import io as skio

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(samples):
        stem = f"{i:06d}"
        row = {"he": f"he/{stem}.png", "ihc": f"ihc/{stem}.png", "mask": "", "stain": s.stain}
        if s.mask is not None:
            row["mask"] = f"mask/{stem}.png"
        for key, img in (("he", s.he), ("ihc", s.ihc), ("mask", s.mask)):
            if img is None:
                continue
            (root / key).mkdir(exist_ok=True)
            data = img.astype(np.uint8) * 255 if key == "mask" else img
            skio.imsave(str(root / row[key]), data, check_contrast=False)
        rows.append(row)
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["he", "ihc", "mask", "stain"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, root / MANIFEST)
    return root


def resize_patch(img: np.ndarray, size: int, *, is_mask: bool) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    from skimage.transform import resize

    if is_mask:
        return resize(img.astype(np.float32), (size, size), order=1, anti_aliasing=True) >= 0.5
    out = resize(img, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _stain_jitter(he: np.ndarray, u: np.ndarray, strength: float) -> np.ndarray:
    """Scale and shift the optical density of each RGB channel slightly (stain variation).

    ``u`` holds 6 uniform draws in [-1, 1] (3 scales, 3 shifts).
    """
    od = -np.log((he.astype(np.float32) + 1.0) / 256.0)
    alpha = (1.0 + strength * u[:3]).astype(np.float32)
    beta = (0.2 * strength * u[3:]).astype(np.float32)
    od = od * alpha + beta
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255).astype(np.uint8)


def make_batch(
    samples: Sequence[PairSample],
    *,
    image_size: int,
    stains: Sequence[str],
    rng: np.random.Generator | None = None,
    augment: bool = False,
    color_jitter: float = 0.0,
    need_mask: bool = True,
    distance_max: float | None = None,
) -> dict[str, np.ndarray]:
    """Stack samples into model-ready arrays.

    Returns
    -------
    dict with
        ``he``, ``ihc`` : float32 (B, 3, S, S) in [-1, 1];
        ``aux`` : float32 (B, 1, S, S) in [-1, 1] (mask as -1/1, or the distance target when
        ``distance_max`` is given), only when ``need_mask``;
        ``stain`` : int64 (B,) index into ``stains``.
    """
    from .stain import distance_target

    if augment and rng is None:
        raise ValueError("augmentation needs a numpy Generator (rng)")
    he_b, ihc_b, aux_b, idx = [], [], [], []
    for s in samples:
        if s.stain not in stains:
            raise ValueError(f"sample has stain {s.stain!r}; the model knows {list(stains)}")
        he = resize_patch(s.he, image_size, is_mask=False)
        ihc = resize_patch(s.ihc, image_size, is_mask=False)
        mask = None
        if need_mask:
            if s.mask is None:
                raise ValueError(
                    "the model has an auxiliary branch, so every pair needs a coarse mask "
                    "(compute one from the IHC with `staindiffuser masks`)"
                )
            mask = resize_patch(s.mask, image_size, is_mask=True)
        if augment:
            # always the same draws per sample, so the geometry does not depend on the jitter
            k = int(rng.integers(4))
            flip = bool(rng.integers(2))
            jitter = rng.uniform(-1.0, 1.0, size=6)
            he, ihc = np.rot90(he, k), np.rot90(ihc, k)
            mask = np.rot90(mask, k) if mask is not None else None
            if flip:
                he, ihc = he[:, ::-1], ihc[:, ::-1]
                mask = mask[:, ::-1] if mask is not None else None
            if color_jitter > 0:
                he = _stain_jitter(np.ascontiguousarray(he), jitter, color_jitter)
        he_b.append(np.ascontiguousarray(he))
        ihc_b.append(np.ascontiguousarray(ihc))
        if mask is not None:
            mask = np.ascontiguousarray(mask)
            if distance_max is None:
                aux_b.append(np.where(mask, 1.0, -1.0).astype(np.float32))
            else:
                aux_b.append(distance_target(mask, distance_max).astype(np.float32))
        idx.append(list(stains).index(s.stain))

    def to_float(images: list[np.ndarray]) -> np.ndarray:
        arr = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2)
        return arr / 127.5 - 1.0

    batch = {"he": to_float(he_b), "ihc": to_float(ihc_b), "stain": np.asarray(idx, np.int64)}
    if need_mask:
        batch["aux"] = np.stack(aux_b)[:, None]
    return batch


def synthetic_pairs(
    seed: int,
    n: int,
    *,
    stains: Sequence[str] = ("CD3", "CK8/18"),
    size: int = 256,
    mpp: float = 0.25,
) -> InMemoryPairs:
    """``n`` uniplex pairs of SYNTHETIC tissue (sample i carries stain ``stains[i % len]``).

    Parameters
    ----------
    size : int
        Patch side in px before any downsampling to the model size (the paper samples 256 px).
    mpp : float
        µm/px of the rendered patches; pick ``model.image_size * model.mpp / size`` so that the
        downsampled patch has the model's pixel size.
    """
    from .synthetic import STAINS, synthetic_patches

    stains = list(stains)
    unknown = sorted(set(stains) - set(STAINS))
    if unknown:
        raise ValueError(
            f"the synthetic tissue renders only {list(STAINS)}; cannot make pairs for {unknown}"
        )
    samples = []
    for i, region in enumerate(synthetic_patches(seed, n, size, mpp=mpp)):
        stain = stains[i % len(stains)]
        samples.append(
            PairSample(he=region.he, ihc=region.ihc[stain], stain=stain, mask=region.masks[stain])
        )
    desc = f"synthetic pairs (seed={seed}, n={n}, {size} px at {mpp:g} um/px, stains={stains})"
    return InMemoryPairs(samples, description=desc)
