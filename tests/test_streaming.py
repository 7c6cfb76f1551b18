"""Slide-scale staining streamed to disk: the same pixels as in memory, temporary files removed
on success, error and cancel, nothing half-written at the output paths."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_staindiffuser import assemble, ome_tiff
from napari_staindiffuser.assemble import _Assembler, _Geometry, _MemoryOutputs
from napari_staindiffuser.events import Progress
from napari_staindiffuser.inference import (
    StainResult,
    TileOutput,
    TileStained,
    iter_stain,
    stain_region,
)
from napari_staindiffuser.io import read_provenance
from napari_staindiffuser.ome_tiff import DiskArray, uncertainty_uint8

from conftest import untrained_model

STAINS = ("CD3", "CK8/18")


class Pointwise:
    """A cheap deterministic TileModel (pointwise colour map); ``dab=True``: no auxiliary
    scores, so masks come from the DAB of the virtual IHC; ``fail_at``: raise on that call."""

    stains = STAINS
    tile = 32
    multiple_of = 8
    mpp = 1.0

    def __init__(self, dab: bool = False, fail_at: int | None = None):
        self.dab, self.fail_at, self.calls = dab, fail_at, 0

    def run(self, tiles, seeds, stains):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        yield Progress(0, 1)
        x = tiles.astype(np.float32) / 255.0
        out = np.stack([x[..., 1] ** 2, 1 - x[..., 0], 0.5 * (x[..., 2] + x[..., 0])], -1)
        scores = {} if self.dab else {s: out[..., 0] for s in stains}
        yield TileOutput(images={s: out if s == "CD3" else 1 - out for s in stains}, scores=scores)

    def decode_mask(self, stain, score):
        return score > 0.5

    def describe(self):
        return {"model": "pointwise"}


def _image(h, w, seed=0):
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(seed)
    base = np.stack([yy * 3 % 256, xx * 5 % 256, (yy + xx) % 256], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _read(path):
    return tifffile.imread(path)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _check_same(streamed: StainResult, memory: StainResult, out):
    files = streamed.provenance["files"]
    assert set(files) == set(memory.images)
    for st, f in files.items():
        np.testing.assert_array_equal(_read(f["virtual"]), memory.images[st])
        np.testing.assert_array_equal(_read(f["mask"]).astype(bool), memory.masks[st])
        np.testing.assert_array_equal(np.asarray(streamed.images[st]), memory.images[st])
        np.testing.assert_array_equal(np.asarray(streamed.masks[st]), memory.masks[st])
        if memory.uncertainty:
            want = uncertainty_uint8(memory.uncertainty[st])
            np.testing.assert_array_equal(_read(f["uncertainty"]), want)
    # only the final files remain: no temporary folder, no .tmp
    names = _listing(out)
    assert all(n.endswith(".ome.tif") and not n.startswith(".") for n in names), names


@pytest.mark.parametrize(
    ("shape", "kw"),
    [
        ((90, 70), dict(tile=16, overlap=4)),  # model grid == input grid
        ((120, 97), dict(tile=16, overlap=4, image_mpp=0.7, region=(3, 5, 110, 88))),  # resampled
        ((50, 61), dict(tile=16, overlap=4, image_mpp=1.6)),  # downsampled (anti-aliased)
    ],
)
def test_streamed_equals_in_memory(tmp_path, shape, kw):
    img = _image(*shape)
    memory = stain_region(img, Pointwise(), batch=3, **kw)
    out = tmp_path / "out"
    streamed = stain_region(img, Pointwise(), batch=3, out_path=out, stem="s", **kw)
    assert streamed.scores == {} and streamed.region == memory.region
    _check_same(streamed, memory, out)
    prov = read_provenance(streamed.provenance["files"]["CD3"]["virtual"])
    assert prov["tiles"] == memory.provenance["tiles"] and prov["layer_type"] == "image"


def test_streamed_dab_masks_equal_in_memory(tmp_path, monkeypatch):
    """Without an auxiliary branch the masks need the whole image's DAB statistics: the
    streamed run takes them from its temporary files and masks in tiles with a halo."""
    monkeypatch.setattr(assemble, "DAB_MASK_TILE", 40)  # several tiles of masks
    img = _image(150, 130, seed=3)
    kw = dict(tile=16, overlap=4, image_mpp=0.9)
    memory = stain_region(img, Pointwise(dab=True), **kw)
    out = tmp_path / "out"
    streamed = stain_region(img, Pointwise(dab=True), out_path=out, **kw)
    assert any(m.any() for m in memory.masks.values())
    _check_same(streamed, memory, out)


def test_streamed_real_model_with_samples(tmp_path):
    model = untrained_model(image_size=16).eval()
    img = _image(28, 40, seed=1)
    kw = dict(steps=1, seed=3, tile=16, overlap=4, device="cpu", samples=2, batch=8)
    memory = stain_region(img, model, **kw)
    out = tmp_path / "out"
    streamed = stain_region(img, model, out_path=out, metadata={"note": "x"}, **kw)
    assert streamed.provenance["note"] == "x"
    assert read_provenance(streamed.provenance["files"]["CD3"]["mask"])["note"] == "x"
    _check_same(streamed, memory, out)
    assert len(_listing(out)) == 2 * 3  # virtual, mask, uncertainty per stain


def test_error_mid_run_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "image_virtual-CD3.ome.tif"
    keep.write_bytes(b"an older result")
    with pytest.raises(RuntimeError, match="boom"):
        stain_region(_image(90, 90), Pointwise(fail_at=4), tile=16, batch=2, out_path=out)
    assert _listing(out) == [keep.name]
    assert keep.read_bytes() == b"an older result"


def test_closing_early_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    gen = iter_stain(_image(90, 90), Pointwise(), tile=16, batch=2, out_path=out)
    for ev in gen:
        if isinstance(ev, TileStained) and ev.done > ev.total // 2:
            break
    assert any(p.name.startswith(".staindiffuser-stream-") for p in out.iterdir())
    gen.close()
    assert _listing(out) == []


def test_error_while_writing_files_leaves_no_partial_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = ome_tiff.write_ome_tiff
    calls = []

    def flaky(path, image, **kw):
        calls.append(path)
        if len(calls) == 3:  # the first file of the second stain
            raise OSError("disk full")
        return real(path, image, **kw)

    monkeypatch.setattr(ome_tiff, "write_ome_tiff", flaky)
    with pytest.raises(OSError, match="disk full"):
        stain_region(_image(60, 60), Pointwise(), tile=16, out_path=out)
    names = _listing(out)  # the files finished before the error, complete; nothing else
    assert names == ["image_mask-CD3.ome.tif", "image_virtual-CD3.ome.tif"]
    assert _read(out / names[0]).shape == (60, 60)


def test_assembler_does_not_depend_on_bands():
    """Output rows depend only on the global position: any banding gives the same pixels, and
    the resampling is skimage.transform.resize's (up to float rounding)."""
    from skimage.transform import resize

    class M:
        def decode_mask(self, stain, score):
            return score > 0.5

    rng = np.random.default_rng(0)
    for wh, ww, rh, rw in [(60, 50, 97, 71), (60, 50, 25, 33)]:
        full = rng.random((wh, ww, 4)).astype(np.float32)
        geo = _Geometry(0, 0, rh, rw, wh, ww, 1.0)
        sinks = []
        for band in (wh, 7, 1):
            sink = _MemoryOutputs((rh, rw), ["A"], 1)
            asm = _Assembler(M(), ["A"], geo, 1, sink)
            for y in range(0, wh, band):
                asm[y : min(wh, y + band)] = full[y : y + band]
            asm.close()
            sinks.append(sink)
        for s in sinks[1:]:
            np.testing.assert_array_equal(s.images["A"], sinks[0].images["A"])
            np.testing.assert_array_equal(s.scores["A"], sinks[0].scores["A"])
            np.testing.assert_array_equal(s.masks["A"], sinks[0].masks["A"])
        want = resize(full[..., 3], (rh, rw), order=1, anti_aliasing=True, preserve_range=True)
        np.testing.assert_allclose(sinks[0].scores["A"], want, atol=1e-5)
        mask = resize(full[..., 3] > 0.5, (rh, rw), order=0, anti_aliasing=False)
        np.testing.assert_array_equal(sinks[0].masks["A"], mask.astype(bool))


def test_disk_array_rows(tmp_path):
    a = DiskArray(tmp_path / "a.raw", (30, 20, 3), np.uint8)
    want = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    a[0:13] = want[:13]
    a[13:30] = want[13:]
    np.testing.assert_array_equal(np.asarray(a), want)
    np.testing.assert_array_equal(a[::4, 3:17:2], want[::4, 3:17:2])
    np.testing.assert_array_equal(a[-1], want[-1])
    with pytest.raises(ValueError, match="expected rows of shape"):
        a[0:2] = want[:3]
    with pytest.raises(TypeError, match="whole rows"):
        a[0:4:2] = want[:2]


def test_run_stain_streamed_equals_in_memory(tmp_path):
    from napari_staindiffuser.commands import run_stain
    from napari_staindiffuser.io import sample_svs_path
    from napari_staindiffuser.model.checkpoint import save_checkpoint

    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, untrained_model(), provenance={"note": "untrained test model"})
    kw = dict(model_path=ckpt, region=(1000, 1200, 96, 80), steps=1, device="cpu", log=lambda m: 0)
    a = run_stain(sample_svs_path(), out=tmp_path / "a", stream=False, **kw)
    b = run_stain(sample_svs_path(), out=tmp_path / "b", stream=True, **kw)
    for st, files in a["files"].items():
        for kind, path in files.items():
            np.testing.assert_array_equal(_read(path), _read(b["files"][st][kind]))
            pa, pb = read_provenance(path), read_provenance(b["files"][st][kind])
            assert pa.keys() == pb.keys() and pb["model_file"] == "tiny.safetensors"
    assert _listing(tmp_path / "a") == _listing(tmp_path / "b")


def test_cli_stream_flag(tmp_path, capsys, monkeypatch):
    """``staindiffuser stain --stream/--no-stream`` forces streaming on or off; without either,
    regions over STREAM_PIXELS stream (set to 0 here, so the small region would stream)."""
    from napari_staindiffuser import commands
    from napari_staindiffuser.cli import main
    from napari_staindiffuser.io import sample_svs_path
    from napari_staindiffuser.model.checkpoint import save_checkpoint

    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, untrained_model(), provenance={"note": "untrained test model"})
    monkeypatch.setattr(commands, "STREAM_PIXELS", 0)
    args = ["stain", str(sample_svs_path()), "--model", str(ckpt), "--region", "1000,1200,96,80"]
    args += ["--steps", "1", "--device", "cpu", "--stains", "CD3"]
    for flag, streams in (("--no-stream", False), ("--stream", True), (None, True)):
        out = tmp_path / f"out{flag}"
        assert main([*args, "--out", str(out), *([flag] if flag else [])]) == 0
        assert ("streaming the result to" in capsys.readouterr().out) == streams, flag
        assert _listing(out) == [
            "CMU-1-Small-Region_mask-CD3.ome.tif",
            "CMU-1-Small-Region_preview.png",
            "CMU-1-Small-Region_provenance.json",
            "CMU-1-Small-Region_virtual-CD3.ome.tif",
        ]
