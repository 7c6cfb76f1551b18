"""Saved virtual stains and masks keep their place: the layer's translate and scale survive the
napari writer and reader (OME ``Plane/@PositionY``, ``@PositionX`` and ``PhysicalSize``), and
``staindiffuser stain --region`` writes files that open over the slide where the region lies."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from napari_staindiffuser._widgets._reader import read_layers
from napari_staindiffuser._widgets._writer import write_labels
from napari_staindiffuser.io import ome_origin, write_ome_tiff

from conftest import untrained_model

napari = pytest.importorskip("napari")

PLUGIN = "napari-staindiffuser"


def _world(layer, point):
    return np.asarray(layer.data_to_world(point), float)


@pytest.mark.parametrize("kind", ["image", "labels"])
def test_a_placed_layer_opens_where_it_was(make_napari_viewer, tmp_path, kind):
    from napari_staindiffuser._widgets._common import placed_like

    viewer = make_napari_viewer()
    # a region stained at level 1 of a pyramid H&E that is itself translated (what the docks do)
    he = viewer.add_image(
        [np.zeros((256, 192, 3), np.uint8), np.zeros((128, 96, 3), np.uint8)],
        multiscale=True, rgb=True, name="H&E", scale=(0.25, 0.25), translate=(10.0, 20.0),
        units="um",
    )  # fmt: skip
    place = placed_like(he, 1, (8, 12, 40, 32))
    rng = np.random.default_rng(0)
    if kind == "image":
        data = np.dstack([rng.integers(0, 256, (40, 32, 3), np.uint8), np.full((40, 32), 255)])
        layer = viewer.add_image(data.astype(np.uint8), rgb=True, name="virtual CD3", **place)
    else:
        layer = viewer.add_labels(rng.integers(0, 5, (40, 32)).astype(np.int32), **place)
    np.testing.assert_allclose(layer.translate, (10 + 8 * 0.5, 20 + 12 * 0.5))  # nonzero
    [path] = layer.save(str(tmp_path / f"{kind}.ome.tif"), plugin=PLUGIN)
    [back] = viewer.open(path, plugin=PLUGIN)
    assert back._type_string == layer._type_string
    np.testing.assert_allclose(back.scale, (0.5, 0.5))
    np.testing.assert_allclose(back.translate, layer.translate)
    for p in ((0, 0), (39, 31), (17.5, 3.25)):  # the same pixel over the same H&E pixel
        np.testing.assert_allclose(_world(back, p), _world(layer, p))
    he_px = he.world_to_data(_world(back, (0, 0)))
    np.testing.assert_allclose(he_px, (16, 24))  # level-0 pixel of the region's corner
    level0 = np.asarray(back.data[0] if back.multiscale else back.data)
    expected = layer.data[..., :3] if kind == "image" else layer.data  # RGBA saves as RGB
    np.testing.assert_array_equal(level0, expected)


def test_other_length_units_are_converted_to_micrometres(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(
        np.eye(48, dtype=np.uint8), scale=(5e-4, 5e-4), translate=(0.0125, -0.00325), units="mm"
    )
    [path] = layer.save(str(tmp_path / "mask.ome.tif"), plugin=PLUGIN)
    [back] = viewer.open(path, plugin=PLUGIN)
    np.testing.assert_allclose(back.scale, (0.5, 0.5))
    np.testing.assert_allclose(back.translate, (12.5, -3.25))
    with tifffile.TiffFile(path) as tf:
        assert ome_origin(tf.ome_metadata) == pytest.approx((12.5, -3.25, "µm"))


def test_without_a_pixel_size_the_offset_is_kept_in_pixels(tmp_path):
    # a layer read from a file without pixel size: scale 1, metadata mpp None
    meta = {"name": "m", "scale": (1.0, 1.0), "translate": (4.0, 6.0), "metadata": {"mpp": None}}
    [path] = write_labels(str(tmp_path / "m.ome.tif"), np.ones((32, 32), np.uint8), meta)
    [(_, kwargs, kind)] = read_layers(path)
    assert kind == "labels" and kwargs["scale"] == (1.0, 1.0)
    np.testing.assert_allclose(kwargs["translate"], (4.0, 6.0))
    with tifffile.TiffFile(path) as tf:
        assert ome_origin(tf.ome_metadata) == pytest.approx((4.0, 6.0, "pixel"))


def test_positions_in_other_files_are_not_used(tmp_path):
    # a stage position written by other software is not a napari translate (a registered
    # H&E / IHC pair would open apart): only our own files get theirs back
    path = tmp_path / "scope.ome.tif"
    plane = {"PositionY": 5000.0, "PositionYUnit": "µm", "PositionX": 7000.0, "PositionXUnit": "µm"}
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb", metadata={
        "axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "Plane": plane,
    })  # fmt: skip
    [(_, kwargs, _)] = read_layers(str(path))
    assert "translate" not in kwargs and kwargs["scale"] == (0.5, 0.5)
    # ... while the same position in a file of ours is restored
    ours = write_ome_tiff(tmp_path / "ours.ome.tif", np.zeros((64, 64, 3), np.uint8), mpp=0.5,
                          origin=(5000.0, 7000.0))  # fmt: skip
    [(_, kwargs, _)] = read_layers(str(ours))
    np.testing.assert_allclose(kwargs["translate"], (5000.0, 7000.0))
    with pytest.raises(ValueError, match="origin"):
        write_ome_tiff(tmp_path / "bad.ome.tif", np.zeros((32, 32), np.uint8), mpp=1.0,
                       origin=(np.nan, 0))  # fmt: skip


@pytest.mark.parametrize("mpp", [0.5, None])
def test_stain_outputs_are_placed_at_their_region(tmp_path, mpp):
    from napari_staindiffuser.ome_tiff import write_stain_outputs

    rgb = np.full((40, 48, 3), 200, np.uint8)
    result = SimpleNamespace(
        images={"CD3": rgb}, masks={"CD3": rgb[..., 0] > 100}, uncertainty={},
        provenance={"region": [30, 14, 40, 48], "seed": 0},
    )  # fmt: skip
    written = write_stain_outputs(result, tmp_path, "slide", mpp)
    s = mpp or 1.0
    for path in written["CD3"].values():
        [(_, kwargs, _)] = read_layers(path)
        np.testing.assert_allclose(kwargs["scale"], (s, s))
        np.testing.assert_allclose(kwargs["translate"], (30 * s, 14 * s))


def test_cli_stain_of_a_region_lines_up_with_the_slide(tmp_path):
    from napari_staindiffuser.commands import run_stain
    from napari_staindiffuser.model.checkpoint import save_checkpoint
    from napari_staindiffuser.synthetic import SyntheticSlide

    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", untrained_model(32))
    he = SyntheticSlide(7, (1024, 1024), 1.0).render(864, 288, 128, 160).he
    slide = write_ome_tiff(tmp_path / "he.ome.tif", he, mpp=1.0)
    out = run_stain(
        slide, model_path=ckpt, region=(40, 24, 40, 32), steps=1, batch=8,
        out=tmp_path / "out", log=lambda *a: None,
    )  # fmt: skip
    [(_, he_kw, _)] = read_layers(str(slide))
    np.testing.assert_allclose(he_kw["scale"], (1.0, 1.0))
    assert "translate" not in he_kw  # the slide itself sits at the origin
    for path in out["files"]["CD3"].values():
        [(data, kwargs, _)] = read_layers(path)
        np.testing.assert_allclose(kwargs["scale"], (1.0, 1.0))
        np.testing.assert_allclose(kwargs["translate"], (24.0, 40.0))  # y, x of --region x,y,w,h
        level0 = data[0] if kwargs["multiscale"] else data
        assert level0.shape[:2] == (32, 40)
