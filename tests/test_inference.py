"""Tiled staining: tiled == untiled, batch independence, streaming, scale, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_staindiffuser.config import preset
from napari_staindiffuser.events import Progress
from napari_staindiffuser.inference import (
    StainResult,
    TileStained,
    iter_stain,
    stain_region,
)
from napari_staindiffuser.model import StainDiffuser

from conftest import Pointwise, untrained_model


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "region"),
    [((100, 77), 32, 8, None), ((50, 130), 16, 4, (3, 5, 40, 111)), ((20, 20), 32, 8, None)],
)
def test_tiled_equals_untiled(shape, tile, overlap, region):
    img = _image(*shape)
    m = Pointwise()
    res = stain_region(img, m, tile=tile, overlap=overlap, batch=3, region=region)
    y, x, h, w = region or (0, 0, *shape)
    want = Pointwise.fn(img[y : y + h, x : x + w])
    got = res.images["CD3"].astype(np.float32) / 255
    assert got.shape == (h, w, 3)
    assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6  # exact up to uint8 rounding
    np.testing.assert_array_equal(res.masks["CD3"], want[..., 0] > 0.5)
    assert res.provenance["mpp_assumed"] is True and res.region == (y, x, h, w)


def test_streams_tiles_before_the_end_and_progress():
    img = _image(70, 90)
    events = list(iter_stain(img, Pointwise(), tile=32, overlap=8, batch=2))
    tiles = [e for e in events if isinstance(e, TileStained)]
    assert isinstance(events[-1], StainResult)
    assert len(tiles) == tiles[0].total and [t.done for t in tiles] == list(
        range(1, len(tiles) + 1)
    )
    assert events.index(tiles[0]) < len(events) - 1
    covered = np.zeros((70, 90), bool)
    for t in tiles:
        y, x, h, w = t.box
        assert t.images["CD3"].shape == (h, w, 3) and t.masks["CD3"].shape == (h, w)
        covered[y : y + h, x : x + w] = True
    assert covered.all()
    assert any(isinstance(e, Progress) for e in events)


def test_scale_maps_back_to_input_grid():
    # a smooth image at 0.5 µm/px; the model works at 1 µm/px: tiles read 2x larger windows
    yy, xx = np.mgrid[:120, :90]
    img = np.stack([yy * 2, xx * 2, (yy + xx)], -1).astype(np.uint8)
    res = stain_region(img, Pointwise(), image_mpp=0.5, tile=16, overlap=4)
    assert res.images["CD3"].shape == (120, 90, 3)
    assert res.provenance["scale_input_px_per_model_px"] == 2.0
    want = Pointwise.fn(img)
    err = np.abs(res.images["CD3"].astype(np.float32) / 255 - want)[4:-4, 4:-4]
    assert err.mean() < 0.01 and err.max() < 0.05


def test_dask_input_reads_only_the_region():
    import dask.array as da

    img = _image(256, 256)
    computed = []

    def record(block, block_info=None):
        computed.append(tuple(block_info[0]["chunk-location"][:2]))
        return block

    arr = da.from_array(img, chunks=(64, 64, 3)).map_blocks(record, dtype=np.uint8)
    res = stain_region(arr, Pointwise(), region=(10, 20, 40, 30), tile=16, overlap=4)
    assert set(computed) == {(0, 0)}
    np.testing.assert_array_equal(
        res.images["CD3"],
        stain_region(img, Pointwise(), region=(10, 20, 40, 30), tile=16, overlap=4).images["CD3"],
    )


@pytest.fixture(scope="module")
def tiny_model():
    return untrained_model(image_size=16).eval()


def test_real_model_independent_of_batch_size(tiny_model):
    img = _image(40, 56, seed=1)
    kw = dict(steps=2, seed=3, tile=16, overlap=4, device="cpu")
    a = stain_region(img, tiny_model, batch=1, **kw)
    b = stain_region(img, tiny_model, batch=5, **kw)
    c = stain_region(img, tiny_model, batch=5, **{**kw, "seed": 4})
    for s in ("CD3", "CK8/18"):
        assert np.abs(a.images[s].astype(int) - b.images[s]).max() <= 1
        np.testing.assert_array_equal(a.masks[s], b.masks[s])
    assert np.abs(a.images["CD3"].astype(int) - c.images["CD3"]).max() > 5
    assert a.provenance["sampler"] == "ddim" and a.provenance["steps"] == 2


def test_uncertainty_from_several_samples(tiny_model):
    img = _image(32, 32, seed=2)
    one = stain_region(img, tiny_model, steps=2, tile=16, overlap=4, samples=1, device="cpu")
    two = stain_region(img, tiny_model, steps=2, tile=16, overlap=4, samples=3, device="cpu")
    assert one.uncertainty == {}
    u = two.uncertainty["CD3"]
    assert u.shape == (32, 32) and u.dtype == np.float32 and u.max() > 1.0


def test_bad_input():
    m = Pointwise()
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        stain_region(np.zeros((8, 8, 4), np.uint8), m)
    with pytest.raises(ValueError, match="uint8"):
        stain_region(np.zeros((8, 8, 3), np.float32), m)
    with pytest.raises(ValueError, match="inside the image"):
        stain_region(_image(20, 20), m, region=(10, 10, 20, 5))
    with pytest.raises(ValueError, match="unknown stains"):
        stain_region(_image(20, 20), m, stains=["HER2"])
    with pytest.raises(ValueError, match="positive number"):
        stain_region(_image(20, 20), m, image_mpp=0.0)
    with pytest.raises(ValueError, match="multiple"):
        stain_region(_image(20, 20), m, tile=20)


def test_model_without_aux_branch_masks_from_dab():
    torch.manual_seed(0)
    m = StainDiffuser(preset("tiny", image_size=16, aux_target="none")).eval()
    img = _image(32, 32, seed=5)
    res = stain_region(img, m, steps=2, tile=16, overlap=4, device="cpu")
    from napari_staindiffuser.stain import coarse_mask, get_preset

    for s in ("CD3", "CK8/18"):
        want = coarse_mask(res.images[s], get_preset(s).at_mpp(m.config.mpp))
        np.testing.assert_array_equal(res.masks[s], want)


def test_tile_previews_of_a_region_smaller_than_a_tile():
    img = _image(20, 20)
    tiles = [e for e in iter_stain(img, Pointwise(), tile=32) if isinstance(e, TileStained)]
    assert len(tiles) == 1 and tiles[0].box == (0, 0, 20, 20)
    want = Pointwise.fn(img)
    got = tiles[0].images["CD3"].astype(np.float32) / 255
    assert np.abs(got - want).max() <= 0.5 / 255 + 1e-6


def test_fractional_scale_windows_align():
    """Non-integer pixel-size ratios keep the output on the input grid (no drift over the
    region): a smooth ramp survives the round trip through the model grid."""
    yy, xx = np.mgrid[:150, :150].astype(np.float32)
    img = np.stack([yy * 1.5, xx * 1.5, (yy + xx) * 0.8], -1).astype(np.uint8)
    res = stain_region(img, Pointwise(), image_mpp=0.499, tile=16, overlap=4)
    want = Pointwise.fn(img)
    err = np.abs(res.images["CD3"].astype(np.float32) / 255 - want)[3:-3, 3:-3]
    assert err.mean() < 0.005 and err.max() < 0.03


def test_in_memory_result_is_plain_numpy():
    res = stain_region(_image(48, 40), Pointwise(), tile=16, overlap=4)
    assert isinstance(res.images["CD3"], np.ndarray) and not isinstance(
        res.images["CD3"], np.memmap
    )
    want = Pointwise.fn(_image(48, 40))
    assert np.abs(res.images["CD3"].astype(np.float32) / 255 - want).max() <= 0.5 / 255 + 1e-6
