"""Shared fixtures: tiny configs, small synthetic-looking pairs, an isolated environment."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    import os

    base = tmp_path_factory.mktemp("xdg")
    os.environ["XDG_CONFIG_HOME"] = str(base / "config")
    os.environ["XDG_CACHE_HOME"] = str(base / "cache")
    import torch

    torch.set_num_threads(2)
    yield


@pytest.fixture
def tiny_config():
    from napari_staindiffuser.config import preset

    return preset("tiny", image_size=32)


def untrained_model(image_size: int = 32, seed: int = 0, **overrides):
    """A tiny StainDiffuser whose zero-initialised layers are randomised, so that its outputs
    depend on its inputs (a freshly built model predicts exactly zero)."""
    import torch

    from napari_staindiffuser.config import preset
    from napari_staindiffuser.model import StainDiffuser

    torch.manual_seed(seed)
    model = StainDiffuser(preset("tiny", image_size=image_size, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An untrained tiny model (32 px) saved as a checkpoint, for the docks and the CLI."""
    from napari_staindiffuser.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_checkpoint(path, untrained_model(32), provenance={"steps": 0, "data": "untrained"})
    return path


def viewer_with_pair(make_napari_viewer, region, mpp: float):
    """A shown viewer holding a SyntheticRegion's H&E and CD3 IHC ("H&E", "CD3 IHC") in µm."""
    viewer = make_napari_viewer(show=True)
    kw = {"rgb": True, "scale": (mpp, mpp), "units": "um"}
    viewer.add_image(region.he, name="H&E", **kw)
    viewer.add_image(region.ihc["CD3"], name="CD3 IHC", **kw)
    return viewer


class Pointwise:
    """A deterministic TileModel without a network: each output pixel is a fixed function of its
    RGB (:meth:`fn`). It records the batch size of every call and raises ``error`` (an
    out-of-memory error in the fast-path tests) for batches over ``max_batch`` tiles."""

    stains = ("CD3", "CK8/18")
    tile = 32
    multiple_of = 8
    mpp = 1.0

    def __init__(self, max_batch: int = 1 << 30, error=MemoryError):
        self.max_batch, self.error, self.calls = max_batch, error, []

    @staticmethod
    def fn(rgb: np.ndarray) -> np.ndarray:
        x = rgb.astype(np.float32) / 255.0
        return np.stack([x[..., 1] ** 2, 1 - x[..., 0], 0.5 * (x[..., 2] + x[..., 0])], -1)

    def run(self, tiles, seeds, stains):
        from napari_staindiffuser.events import Progress
        from napari_staindiffuser.inference import TileOutput

        self.calls.append(len(tiles))
        yield Progress(0, 1)
        if len(tiles) > self.max_batch:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = self.fn(tiles)
        yield TileOutput(
            images={s: out if s == "CD3" else 1 - out for s in stains},
            scores={s: out[..., 0] for s in stains},
        )

    def decode_mask(self, stain, score):
        return score > 0.5

    def describe(self):
        return {"model": "pointwise"}


def blob_pairs(n: int, size: int = 32, seed: int = 0, stains=("CD3", "CK8/18")):
    """Minimal paired data: pink H&E with purple nuclei; brown IHC on the larger ones."""
    from napari_staindiffuser.pairs import InMemoryPairs, PairSample

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for i in range(n):
        he = np.empty((size, size, 3), np.uint8)
        he[:] = (235, 170, 200)
        ihc = np.empty_like(he)
        ihc[:] = (240, 235, 230)
        mask = np.zeros((size, size), bool)
        for _ in range(4):
            cy, cx = rng.integers(4, size - 4, 2)
            r = rng.integers(2, 5)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            he[disc] = (110, 60, 150)
            if r >= 3:
                ihc[disc] = (150, 90, 40)
                mask |= disc
            else:
                ihc[disc] = (120, 130, 190)
                mask &= ~disc
        out.append(PairSample(he=he, ihc=ihc, stain=stains[i % len(stains)], mask=mask))
    return InMemoryPairs(out, description=f"blob pairs n={n} seed={seed}")


@pytest.fixture
def pairs():
    return blob_pairs(8)
