"""Tests for napari_staindiffuser.io: slide reading, conversions, OME-TIFF writing."""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc

import dask
import dask.array as da
import imagecodecs
import numpy as np
import pytest
import tifffile

from napari_staindiffuser import io

SVS_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


@pytest.fixture(scope="module")
def svs():
    return io.sample_svs_path()


@pytest.fixture
def read_counter(monkeypatch):
    """Count tifffile segment reads (tiles/strips through the zarr store) and page reads."""
    counts = {"read": 0, "asarray": 0}
    orig_read, orig_asarray = tifffile.FileCache.read, tifffile.TiffPage.asarray

    def read(self, *args, **kwargs):
        counts["read"] += 1
        return orig_read(self, *args, **kwargs)

    def asarray(self, *args, **kwargs):
        counts["asarray"] += 1
        return orig_asarray(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.FileCache, "read", read)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", asarray)
    return counts


def gradient_rgb(h, w, seed=0, noise=40):
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, noise + 1, (h, w, 3))
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def mean2x2(a):
    h, w = a.shape[0] // 2, a.shape[1] // 2
    b = a[: 2 * h, : 2 * w].astype(np.uint16).reshape(h, 2, w, 2, -1).sum((1, 3))
    return ((b + 2) // 4).astype(np.uint8)


# ---------------------------------------------------------------------------- the real SVS


def test_sample_svs_is_the_unmodified_cc0_file(svs):
    assert svs.name == "CMU-1-Small-Region.svs"
    assert hashlib.sha256(svs.read_bytes()).hexdigest() == SVS_SHA256
    assert "CC0" in (svs.parent / "ATTRIBUTION.md").read_text()


def test_svs_open_is_lazy(svs, read_counter):
    slide = io.open_slide(svs)
    assert read_counter == {"read": 0, "asarray": 0}  # constructing reads no pixels
    assert all(isinstance(lvl, da.Array) for lvl in slide.levels)
    region = slide.levels[0][:300, :300].compute()
    assert region.shape == (300, 300, 3)
    assert 0 < read_counter["read"] <= 4  # only the 2x2 tiles (240 px) covering the region


def test_svs_levels_mpp_and_metadata(svs):
    slide = io.open_slide(svs)
    assert slide.shape == (2967, 2220)  # rows, cols
    assert slide.levels[0].shape == (2967, 2220, 3)
    assert slide.levels[0].dtype == np.uint8
    assert slide.levels[0].chunksize == (240, 240, 3)  # one chunk per stored tile
    assert slide.mpp == pytest.approx(0.499)
    assert slide.metadata["mpp_source"] == "svs"
    assert slide.metadata["vendor"] == "aperio"
    assert slide.metadata["objective_power"] == 20
    # reduced level: the stored whole-slide thumbnail; label and macro images are excluded
    assert len(slide.levels) == 2
    assert slide.levels[1].shape == (768, 574, 3)
    assert slide.metadata["ignored_series"] == ["Label", "Macro"]
    shapes = {lvl.shape[:2] for lvl in slide.levels}
    assert not shapes & {(463, 387), (431, 1280)}
    assert slide.level_mpp(0) == pytest.approx(0.499)
    assert slide.level_mpp(1) == pytest.approx(0.499 * (2967 / 768 + 2220 / 574) / 2)
    assert slide.best_level_for(0.5) == 0
    assert slide.best_level_for(1.0) == 0
    assert slide.best_level_for(2.0) == 1
    assert slide.best_level_for(0.25) == 0  # finer than level 0: the finest there is


def test_svs_pixels_equal_tifffile_and_threaded_reads(svs):
    slide = io.open_slide(svs)
    with tifffile.TiffFile(svs) as tf:
        ref0 = tf.series[0].levels[0].asarray()
        ref1 = next(s for s in tf.series if s.name == "Thumbnail").asarray()
    np.testing.assert_array_equal(
        slide.levels[0][1000:1500, 333:1111].compute(), ref0[1000:1500, 333:1111]
    )
    with dask.config.set(scheduler="threads", num_workers=8):
        np.testing.assert_array_equal(slide.levels[0].compute(), ref0)
        np.testing.assert_array_equal(slide.levels[1].compute(), ref1)


# ----------------------------------------------------------------------- OME-TIFF writing


def test_ome_tiff_round_trip(tmp_path):
    img = gradient_rgb(700, 900)
    prov = {
        "model": "staindiffuser",
        "sampler": "ddim",
        "steps": 50,
        "seed": np.int64(7),
        "region": (10, 20, 700, 900),
        "nested": {"a": [1.5, None, True]},
        "note": "µ <&>",
    }
    calls = []
    out = io.write_ome_tiff(
        tmp_path / "stain.ome.tif",
        img,
        mpp=0.5,
        metadata=prov,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert out == tmp_path / "stain.ome.tif"
    assert sorted(os.listdir(tmp_path)) == ["stain.ome.tif"]
    with tifffile.TiffFile(out) as tf:
        assert tf.is_ome
        page = tf.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.subifds) == 2
        levels = tf.series[0].levels
        assert [lvl.shape for lvl in levels] == [(700, 900, 3), (350, 450, 3), (175, 225, 3)]
        np.testing.assert_array_equal(levels[0].asarray(), img)
        np.testing.assert_array_equal(levels[1].asarray(), mean2x2(img))
        np.testing.assert_array_equal(levels[2].asarray(), mean2x2(mean2x2(img)))
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert page.resolution[0] == pytest.approx(1e4 / 0.5)
        assert '<M K="sampler">ddim</M>' in tf.ome_metadata  # readable in OME viewers
        assert '<M K="steps">50</M>' in tf.ome_metadata
    slide = io.open_slide(out)
    assert slide.mpp == pytest.approx(0.5) and slide.metadata["mpp_source"] == "ome"
    assert slide.level_mpp(1) == pytest.approx(1.0)
    np.testing.assert_array_equal(slide.levels[0].compute(), img)
    expected = {**prov, "seed": 7, "region": [10, 20, 700, 900]}
    assert io.read_provenance(out) == expected
    assert calls == [(i, 12 + 4 + 1) for i in range(1, 18)]


def test_labels_keep_their_ids(tmp_path):
    lab = np.zeros((700, 900), np.int32)
    lab[100:400, 100:500] = 7
    lab[300:600, 400:800] = -3
    lab[50:90, 600:880] = 100_000
    lab[::2, 1::2] = np.where(lab[::2, 1::2] == 0, 5, lab[::2, 1::2])  # 0/5 mix: mean would be 1
    out = io.write_ome_tiff(tmp_path / "lab.ome.tif", lab, mpp=None, levels=4)
    with tifffile.TiffFile(out) as tf:
        levels = [lvl.asarray() for lvl in tf.series[0].levels]
    assert [lvl.shape for lvl in levels] == [(700, 900), (350, 450), (175, 225), (87, 112)]
    assert all(lvl.dtype == np.int32 for lvl in levels)
    np.testing.assert_array_equal(levels[0], lab)
    for lvl in levels[1:]:
        assert set(np.unique(lvl)) <= {0, 5, 7, -3, 100_000}
        assert {7, -3, 100_000} <= set(np.unique(lvl))
    assert io.read_provenance(out) == {}


def test_bool_and_int64_masks(tmp_path):
    mask = np.zeros((300, 300), bool)
    mask[50:200, 60:250] = True
    out = io.write_ome_tiff(tmp_path / "m.ome.tif", mask, mpp=1.0, tile=128)
    back = tifffile.imread(out)
    assert back.dtype == np.uint8 and set(np.unique(back)) == {0, 1}
    np.testing.assert_array_equal(back, mask)
    lab64 = da.from_array(np.arange(300 * 300, dtype=np.int64).reshape(300, 300), chunks=100)
    out = io.write_ome_tiff(tmp_path / "l.ome.tif", lab64, mpp=1.0, tile=128)
    back = tifffile.imread(out)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, lab64.compute())
    too_big = np.full((64, 64), 2**40, np.int64)
    with pytest.raises(ValueError, match="int32"):
        io.write_ome_tiff(tmp_path / "x.ome.tif", too_big, mpp=1.0, tile=16)
    assert not (tmp_path / "x.ome.tif").exists()


def test_pyramid_level_count(tmp_path):
    img = gradient_rgb(300, 520)
    cases = {None: [(300, 520, 3), (150, 260, 3)], 1: [(300, 520, 3)]}
    for levels, shapes in cases.items():
        out = io.write_ome_tiff(tmp_path / f"{levels}.ome.tif", img, mpp=None, levels=levels)
        with tifffile.TiffFile(out) as tf:
            assert [lvl.shape for lvl in tf.series[0].levels] == shapes
        assert io.open_slide(out).mpp is None
    with pytest.raises(ValueError, match="too many"):
        io.write_ome_tiff(tmp_path / "x.ome.tif", img, mpp=None, levels=10)


def test_write_streams_tile_rows(tmp_path):
    """An 8192 x 8192 RGB (192 MiB) lazily generated block by block is written without ever
    holding more than a couple of tile rows: blocks are computed at most one tile row ahead of
    the tile being written, and the traced peak allocation stays far below the image size."""
    size, tile = 8192, 256
    written = {"tiles": 0}
    rows_ahead = []
    computed_rows = []
    lock = threading.Lock()

    def make(block_info=None):
        (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
        with lock:
            computed_rows.append(r0 // tile)
            row_being_written = written["tiles"] // (size // tile)
            rows_ahead.append(r0 // tile - row_being_written)
        y = np.arange(r0, r1, dtype=np.int32)[:, None, None]
        x = np.arange(c0, c1, dtype=np.int32)[None, :, None]
        return ((y + x + np.arange(3)) % 256).astype(np.uint8)

    image = da.map_blocks(make, dtype=np.uint8, chunks=((tile,) * 32, (tile,) * 32, (3,)))

    def progress(done, total):
        written["tiles"] = done  # level 0 tiles come first

    tracemalloc.start()
    try:
        out = io.write_ome_tiff(
            tmp_path / "big.ome.tif", image, mpp=0.25, compression=None, progress=progress
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = size * size * 3
    assert peak < full / 5, f"peak {peak / 2**20:.1f} MiB for a {full / 2**20:.0f} MiB image"
    assert len(computed_rows) == 32 * 32  # every block computed exactly once
    assert max(rows_ahead) <= 1
    with tifffile.TiffFile(out) as tf:
        levels = tf.series[0].levels
        assert [lvl.shape[0] for lvl in levels] == [8192, 4096, 2048, 1024, 512, 256]
        z = tf.series[0].aszarr(level=0)
        import zarr

        corner = zarr.open_array(z, mode="r")[8000:, 8000:]
    np.testing.assert_array_equal(corner, image[8000:, 8000:].compute())


def test_write_is_atomic(tmp_path):
    target = tmp_path / "out.ome.tif"
    target.write_bytes(b"previous content")
    before = sorted(os.listdir(tmp_path))
    seen = []

    def block(x, block_info=None):
        seen.append(1)
        if len(seen) == 5:
            raise RuntimeError("boom on block 5")
        return x

    zeros = da.zeros((1024, 1024, 3), np.uint8, chunks=(256, 256, 3))
    image = zeros.map_blocks(block, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="boom"):
        io.write_ome_tiff(target, image, mpp=0.5)
    assert target.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == before  # no temp file, no pyramid cache
    io.write_ome_tiff(target, np.zeros((64, 64, 3), np.uint8), mpp=0.5, tile=16)
    assert tifffile.imread(target).shape == (64, 64, 3)
    assert sorted(os.listdir(tmp_path)) == before


def test_write_errors(tmp_path):
    rgb = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.write_ome_tiff(tmp_path / "missing" / "a.ome.tif", rgb, mpp=1.0)
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(PermissionError, match="cannot write"):
            io.write_ome_tiff(ro / "a.ome.tif", rgb, mpp=1.0)
    bad = [
        (np.zeros((64, 64, 4), np.uint8), {}),
        (np.zeros((64, 64, 3), np.float32), {}),
        (np.zeros((64, 64), np.float32), {}),
        (rgb, {"tile": 100}),
        (rgb, {"metadata": {"f": object()}}),
        (rgb, {"mpp": -1.0}),
    ]
    for image, kwargs in bad:
        with pytest.raises(ValueError):
            io.write_ome_tiff(tmp_path / "a.ome.tif", image, **{"mpp": 1.0, **kwargs})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------- formats and inputs


def test_png_and_jpeg(tmp_path):
    img = gradient_rgb(120, 160)
    (tmp_path / "a.png").write_bytes(imagecodecs.png_encode(img))
    smooth = gradient_rgb(120, 160, noise=0)
    (tmp_path / "a.jpg").write_bytes(imagecodecs.jpeg8_encode(smooth, level=95))
    png = io.open_slide(tmp_path / "a.png")
    assert png.metadata["format"] == "png" and png.mpp is None and len(png.levels) == 1
    np.testing.assert_array_equal(png.levels[0].compute(), img)
    jpg = io.open_slide(tmp_path / "a.jpg", mpp=0.25)
    assert jpg.metadata["format"] == "jpeg" and jpg.mpp == 0.25
    assert jpg.metadata["mpp_source"] == "argument"
    assert np.abs(jpg.levels[0].compute().astype(int) - smooth).mean() < 2


def test_rgba_16bit_and_gray_png(tmp_path):
    img = gradient_rgb(50, 60)
    rgba = np.concatenate([img, np.full((50, 60, 1), 128, np.uint8)], -1)
    (tmp_path / "rgba.png").write_bytes(imagecodecs.png_encode(rgba))
    slide = io.open_slide(tmp_path / "rgba.png")
    np.testing.assert_array_equal(slide.levels[0].compute(), img)
    assert "alpha channel dropped" in slide.metadata["conversions"]
    (tmp_path / "16.png").write_bytes(
        imagecodecs.png_encode((img.astype(np.uint16) * 257 + (img < 255) * 100).astype(np.uint16))
    )
    np.testing.assert_array_equal(io.open_slide(tmp_path / "16.png").levels[0].compute(), img)
    (tmp_path / "gray.png").write_bytes(imagecodecs.png_encode(np.ascontiguousarray(img[..., 0])))
    with pytest.raises(ValueError, match=r"gray.png.*\(H, W, 3\).*grayscale"):
        io.open_slide(tmp_path / "gray.png")


def test_as_rgb_uint8_rules():
    img = gradient_rgb(20, 30)
    assert np.shares_memory(io.as_rgb_uint8(img), img)  # no copy when already right
    np.testing.assert_array_equal(io.as_rgb_uint8(np.moveaxis(img, -1, 0)), img)  # planar
    np.testing.assert_array_equal(io.as_rgb_uint8(np.dstack([img, img[..., :1]])), img)
    np.testing.assert_array_equal(io.as_rgb_uint8(img.astype(np.uint16) * 257), img)
    np.testing.assert_array_equal(io.as_rgb_uint8(img / 255.0), img)
    np.testing.assert_array_equal(io.as_rgb_uint8(da.from_array(img, chunks=10)), img)
    bad = {
        "grayscale": img[..., 0],
        "grayscale ": img[..., :1],
        "got shape \\(20, 30, 2\\)": img[..., :2],
        "got shape \\(20, 30, 3, 1\\)": img[..., None],
        "dtype int64": img.astype(np.int64),
        "dtype bool": img > 0,
        "NaN": np.full((4, 4, 3), np.nan),
        "\\[0, 1\\]": img.astype(np.float32),
        "\\[0, 1\\].*\\[-0.5": np.full((4, 4, 3), -0.5),
    }
    for match, array in bad.items():
        with pytest.raises(ValueError, match=match):
            io.as_rgb_uint8(array)


def test_tiff_conversions(tmp_path):
    img = gradient_rgb(100, 130)
    tifffile.imwrite(
        tmp_path / "planar.tif",
        np.moveaxis(img, -1, 0),
        photometric="rgb",
        planarconfig="separate",
        tile=(32, 32),
    )
    slide = io.open_slide(tmp_path / "planar.tif")
    np.testing.assert_array_equal(slide.levels[0].compute(), img)
    assert any("transposed" in n for n in slide.metadata["conversions"])
    tifffile.imwrite(tmp_path / "u16.tif", img.astype(np.uint16) * 257, photometric="rgb")
    np.testing.assert_array_equal(io.open_slide(tmp_path / "u16.tif").levels[0].compute(), img)
    tifffile.imwrite(tmp_path / "f.tif", (img / 255).astype(np.float32), photometric="rgb")
    np.testing.assert_array_equal(io.open_slide(tmp_path / "f.tif").levels[0].compute(), img)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples="unassalpha")
    np.testing.assert_array_equal(io.open_slide(tmp_path / "rgba.tif").levels[0].compute(), img)
    nan = (img / 255).astype(np.float32)
    nan[5, 5, 1] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan, photometric="rgb")
    tifffile.imwrite(tmp_path / "f2.tif", img.astype(np.float32), photometric="rgb")
    tifffile.imwrite(tmp_path / "gray.tif", img[..., 0])
    tifffile.imwrite(tmp_path / "i32.tif", img.astype(np.int32), photometric="rgb")
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([img, img]), photometric="rgb")
    cases = {
        "nan.tif": "NaN",
        "f2.tif": r"\[0, 1\]",
        "gray.tif": "grayscale",
        "i32.tif": "int32",
        "stack.tif": "single plane",
    }
    for name, match in cases.items():
        with pytest.raises(ValueError, match=f"{name}.*{match}"):
            io.open_slide(tmp_path / name)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.open_slide(tmp_path / "nope.svs")
    (tmp_path / "text.png").write_text("hello, not an image")
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    tifffile.imwrite(
        tmp_path / "ok.tif",
        gradient_rgb(512, 512),
        photometric="rgb",
        tile=(128, 128),
        compression="zlib",
    )
    data = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "half.tif").write_bytes(data[: len(data) // 2])
    cases = {
        "text.png": "not a supported image",
        "empty.tif": "empty",
        "corrupt.tif": "corrupt|no image data",
        "half.tif": "truncated",
    }
    for name, match in cases.items():
        with pytest.raises(ValueError, match=match) as info:
            io.open_slide(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(ValueError, match="directory"):
        io.open_slide(tmp_path)
    with pytest.raises(ValueError, match="not a readable TIFF"):
        io.read_provenance(tmp_path / "text.png")


def test_pixel_size_sources(tmp_path, svs):
    img = gradient_rgb(64, 64)
    tifffile.imwrite(
        tmp_path / "ome.ome.tif",
        img,
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm"},
    )
    ome = io.open_slide(tmp_path / "ome.ome.tif")
    assert ome.mpp == pytest.approx(0.25) and ome.metadata["mpp_source"] == "ome"
    assert io.open_slide(svs).mpp == pytest.approx(0.499)
    over = io.open_slide(svs, mpp=0.25)
    assert over.mpp == 0.25 and over.metadata["mpp_file"] == pytest.approx(0.499)
    tifffile.imwrite(tmp_path / "none.tif", img, photometric="rgb")
    none = io.open_slide(tmp_path / "none.tif")
    assert none.mpp is None and none.metadata["mpp_source"] is None
    with pytest.raises(ValueError, match="pixel size unknown"):
        none.best_level_for(1.0)
    tifffile.imwrite(
        tmp_path / "cm.tif",
        img,
        photometric="rgb",
        resolution=(20000, 20000),
        resolutionunit="CENTIMETER",
    )
    assert io.open_slide(tmp_path / "cm.tif").mpp == pytest.approx(0.5)
    tifffile.imwrite(
        tmp_path / "inch.tif",
        img,
        photometric="rgb",
        resolution=(50800, 50800),
        resolutionunit="INCH",
    )
    assert io.open_slide(tmp_path / "inch.tif").mpp == pytest.approx(0.5)
    tifffile.imwrite(
        tmp_path / "dpi.tif", img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH"
    )
    assert io.open_slide(tmp_path / "dpi.tif").mpp is None  # 352.8 um/px: not a microscope
    with pytest.raises(ValueError, match="mpp"):
        io.open_slide(svs, mpp=0)
