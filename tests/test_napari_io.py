"""napari reader, writer and sample data (npe2 manifest), in a real napari viewer under xvfb."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

PLUGIN = "napari-staindiffuser"
SVS_MPP = 0.499


def _forbid(dsk, keys, **kwargs):
    raise AssertionError("pixel data was computed while only opening")


def no_compute():
    """Context: fail if any dask array is computed inside the block."""
    return dask.config.set(scheduler=_forbid)


def test_unsupported_files_are_declined(tmp_path):
    import imagecodecs
    import tifffile

    from napari_staindiffuser._widgets._reader import napari_get_reader

    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    tifffile.imwrite(tmp_path / "gray.tif", np.zeros((32, 32), np.uint16))  # not ours
    (tmp_path / "gray.png").write_bytes(imagecodecs.png_encode(np.zeros((8, 8), np.uint8)))
    (tmp_path / "fake.svs").write_bytes(b"not a slide")
    (tmp_path / "folder.tif").mkdir()
    for name in ("table.csv", "gray.tif", "gray.png", "fake.svs", "folder.tif", "missing.tif"):
        assert napari_get_reader(str(tmp_path / name)) is None, name
    rgb = tmp_path / "rgb.png"
    rgb.write_bytes(imagecodecs.png_encode(np.zeros((8, 8, 3), np.uint8)))
    assert callable(napari_get_reader(str(rgb)))
    assert napari_get_reader([str(rgb), str(tmp_path / "table.csv")]) is None
    assert napari_get_reader(42) is None


def test_reader_real_svs_is_lazy_multiscale_in_um(make_napari_viewer):
    from napari_staindiffuser._widgets._reader import napari_get_reader
    from napari_staindiffuser.io import sample_svs_path

    path = str(sample_svs_path())
    with no_compute():
        reader = napari_get_reader(path)
        [(data, kwargs, layer_type)] = reader(path)
    assert layer_type == "image" and kwargs["rgb"] and kwargs["multiscale"]
    assert kwargs["name"] == "CMU-1-Small-Region"
    assert all(isinstance(level, da.Array) and level.dtype == np.uint8 for level in data)
    assert data[0].shape == (2967, 2220, 3) and data[1].shape[0] < data[0].shape[0]
    assert kwargs["scale"] == pytest.approx((SVS_MPP, SVS_MPP))
    assert kwargs["metadata"]["slide"]["format"] == "svs"
    assert kwargs["metadata"]["mpp"] == pytest.approx(SVS_MPP)

    viewer = make_napari_viewer()
    [layer] = viewer.open(path, plugin=PLUGIN)
    assert isinstance(layer, napari.layers.Image) and layer.multiscale and layer.rgb
    assert isinstance(layer.data[0], da.Array)
    np.testing.assert_allclose(layer.scale, (SVS_MPP, SVS_MPP))
    np.testing.assert_allclose(layer.translate, (0, 0))
    # aligned: level-0 pixel (row 1000, col 500) sits at (1000, 500) * mpp µm in the world
    np.testing.assert_allclose(layer.world_to_data((1000 * SVS_MPP, 500 * SVS_MPP)), (1000, 500))
    height = layer.extent.world[1][0] - layer.extent.world[0][0]
    assert height == pytest.approx(2967 * SVS_MPP, rel=1e-3)


def test_writer_reader_round_trip(make_napari_viewer, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    labels = np.zeros((300, 260), np.uint16)
    labels[10:60, 20:90], labels[100:200, 50:250], labels[250:, :] = 3, 7, 300
    prov = {"model": "demo", "steps": np.int64(20), "region": (1, 2), "handle": object()}
    viewer = make_napari_viewer()
    img = viewer.add_image(
        rgb, rgb=True, name="virtual CD3", scale=(0.25, 0.25), metadata={"provenance": prov}
    )
    lab = viewer.add_labels(labels, name="CD3 mask", scale=(0.25, 0.25))

    [p_img] = img.save(str(tmp_path / "stain.ome.tif"), plugin=PLUGIN)
    [p_lab] = lab.save(str(tmp_path / "mask.tif"), plugin=PLUGIN)
    [img2] = viewer.open(p_img, plugin=PLUGIN)
    [lab2] = viewer.open(p_lab, plugin=PLUGIN)

    assert isinstance(img2, napari.layers.Image) and img2.rgb and img2.multiscale
    assert img2.name == "stain"
    np.testing.assert_array_equal(np.asarray(img2.data[0]), rgb)
    np.testing.assert_allclose(img2.scale, (0.25, 0.25))
    got = img2.metadata["provenance"]
    assert got["model"] == "demo" and got["steps"] == 20 and got["region"] == [1, 2]
    assert "handle" not in got and got["layer_type"] == "image"

    assert isinstance(lab2, napari.layers.Labels)
    level0 = np.asarray(lab2.data[0] if lab2.multiscale else lab2.data)
    assert level0.dtype == np.uint16
    np.testing.assert_array_equal(level0, labels)
    assert set(np.unique(level0)) == {0, 3, 7, 300}
    np.testing.assert_allclose(lab2.scale, (0.25, 0.25))

    # a multiscale layer writes its level 0
    [p_again] = img2.save(str(tmp_path / "again.ome.tiff"), plugin=PLUGIN)
    [img3] = viewer.open(p_again, plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(img3.data[0]), rgb)
    np.testing.assert_allclose(img3.scale, (0.25, 0.25))  # µm units of the read layer kept


def test_sample_data_is_lazy_and_labelled(make_napari_viewer, monkeypatch):
    from napari_staindiffuser import synthetic
    from napari_staindiffuser._widgets._sample_data import synthetic_paired_slide

    rendered = []

    def fake_render(self, y, x, h, w):  # records what napari asks for; cheap pixels
        rendered.append((self.shape, h, w))
        z3, z2 = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), bool)
        region = synthetic.SyntheticRegion(
            he=z3,
            ihc={s: z3 for s in synthetic.STAINS},
            masks={s: z2 for s in synthetic.STAINS},
            tissue=z2,
        )
        return region, np.zeros((h, w), np.uint8)

    monkeypatch.setattr(synthetic.SyntheticSlide, "_render", fake_render)
    from napari.utils import resize_dask_cache

    resize_dask_cache().cache.clear()  # chunks an earlier test drew would not be rendered again
    with no_compute():
        layer_data = synthetic_paired_slide()
    assert rendered == []

    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "synthetic-pair")
    names = [layer.name for layer in layers]
    assert names == [
        "SYNTHETIC H&E",
        "SYNTHETIC CD3 IHC",
        "SYNTHETIC CK8/18 IHC",
        "SYNTHETIC CD3 truth",
        "SYNTHETIC CK8/18 truth",
    ]
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Image"] * 3 + ["Labels"] * 2
    for layer, (data, _, _) in zip(layers, layer_data, strict=True):
        assert layer.multiscale and layer.data[0].shape[:2] == (4096, 4096)
        assert isinstance(layer.data[0], da.Array)
        np.testing.assert_allclose(layer.scale, (0.5, 0.5))
        assert layer.metadata["synthetic"] is True and "SYNTHETIC" in layer.name
        assert data[0].shape[:2] == (4096, 4096)
    assert all(layer.rgb for layer in layers[:3])
    # napari drew an overview: no region of the 4096 x 4096 level 0 was rendered
    assert rendered and all(shape[0] < 4096 for shape, _, _ in rendered)

    [svs] = viewer.open_sample(PLUGIN, "cmu-1-small-region")
    assert svs.name == "CMU-1-Small-Region" and svs.multiscale and svs.rgb
    np.testing.assert_allclose(svs.scale, (SVS_MPP, SVS_MPP))
    assert "synthetic" not in svs.metadata and svs.metadata["slide"]["format"] == "svs"
