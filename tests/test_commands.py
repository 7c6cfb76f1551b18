"""Slide-level commands end to end on small inputs: stain, synth, masks, patches, export, demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_staindiffuser.cli import main
from napari_staindiffuser.io import open_slide, read_provenance, sample_svs_path
from napari_staindiffuser.model.checkpoint import load_checkpoint

TINY_TRAIN = [
    "--preset",
    "tiny",
    "--image-size",
    "32",
    "--steps",
    "1",
    "--batch",
    "2",
    "--device",
    "cpu",
]


def test_stain_svs_region_writes_aligned_outputs(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "stain",
            str(sample_svs_path()),
            "--model",
            str(tiny_ckpt),
            "--region",
            "1000,1200,96,80",
            "--steps",
            "2",
            "--out",
            str(out),
            "--samples",
            "2",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "preview:" in text and "0.499 um/px" in text
    virtual = out / "CMU-1-Small-Region_virtual-CD3.ome.tif"
    mask = out / "CMU-1-Small-Region_mask-CK818.ome.tif"
    slide = open_slide(virtual)
    assert slide.shape == (80, 96) and slide.mpp == pytest.approx(0.499, abs=1e-3)
    prov = read_provenance(virtual)
    assert (
        prov["sampler"] == "ddim"
        and prov["spacing"] == "karras"
        and prov["steps"] == 2
        and prov["seed"] == 0
    )
    assert prov["region"] == [1200, 1000, 80, 96] and len(prov["model_sha256"]) == 16
    assert prov["scale_input_px_per_model_px"] == pytest.approx(1.0 / 0.499, rel=1e-3)
    assert read_provenance(mask)["content"].startswith("CK8/18")
    assert (out / "CMU-1-Small-Region_uncertainty-CD3.ome.tif").exists()
    assert (out / "CMU-1-Small-Region_preview.png").exists()


def test_synth_then_train_on_the_folder(tmp_path):
    folder = tmp_path / "pairs"
    assert main(["synth", str(folder), "--n", "4", "--size", "64", "--mpp", "0.5"]) == 0
    assert (folder / "manifest.csv").read_text().count("\n") == 5
    ckpt = tmp_path / "m.safetensors"
    assert main(["train", "--data", str(folder), *TINY_TRAIN, "--out", str(ckpt)]) == 0
    assert "paired folder" in load_checkpoint(ckpt).provenance["data"]


def test_masks_on_real_ihc(tmp_path, capsys):
    import tifffile
    from skimage.data import immunohistochemistry

    src = tmp_path / "ihc.tif"
    tifffile.imwrite(src, immunohistochemistry())
    out = tmp_path / "mask.ome.tif"
    assert main(["masks", str(src), "--stain", "CD3", "--out", str(out)]) == 0
    frac = np.asarray(open_slide_mask(out)).mean()
    assert 0.005 < frac < 0.1
    assert "positive" in capsys.readouterr().out
    assert read_provenance(out)["rule"] == "mean+2std"


def open_slide_mask(path):
    import tifffile

    return tifffile.imread(path, level=0) > 0


def test_patches_from_registered_and_shifted_pairs(tmp_path, capsys):
    import tifffile

    from napari_staindiffuser.synthetic import SyntheticSlide

    reg = SyntheticSlide(3, shape=(600, 600), mpp=0.5).render(0, 0, 600, 600)
    he, ihc = tmp_path / "he.tif", tmp_path / "ihc.tif"
    tifffile.imwrite(he, reg.he)
    tifffile.imwrite(ihc, reg.ihc["CK8/18"])

    def patches(ihc_file, out, *extra):
        return main(
            [
                "patches",
                str(he),
                str(ihc_file),
                "--stain",
                "CK8/18",
                "--out",
                str(out),
                "--patch",
                "128",
                "--mpp",
                "0.5",
                *extra,
            ]
        )

    assert patches(ihc, tmp_path / "pairs") == 0
    assert (tmp_path / "pairs" / "manifest.csv").exists()
    shifted = tmp_path / "shifted.tif"
    tifffile.imwrite(shifted, np.roll(reg.ihc["CK8/18"], (9, -6), axis=(0, 1)))
    capsys.readouterr()
    rc = patches(shifted, tmp_path / "p2")
    err = capsys.readouterr()
    assert rc == 2 and "--correct-shift" in err.err and "offset by" in err.out
    assert patches(shifted, tmp_path / "p3", "--correct-shift") == 0


def test_export_strips_training_state(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    args = ["train", "--synthetic", "2", "--patch-size", "64", *TINY_TRAIN, "--out", str(ckpt)]
    assert main(args) == 0
    small = tmp_path / "small.safetensors"
    assert main(["export", str(ckpt), str(small)]) == 0
    assert small.stat().st_size < ckpt.stat().st_size / 2
    a, b = load_checkpoint(ckpt), load_checkpoint(small)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="inference-only"):
        load_checkpoint(small, with_training=True)
    # an exported (EMA-only) model is a valid starting point for fine-tuning
    tuned = tmp_path / "tuned.safetensors"
    args = ["train", "--synthetic", "2", "--patch-size", "64", *TINY_TRAIN, "--out", str(tuned)]
    assert main([*args, "--init", str(small)]) == 0
    assert load_checkpoint(tuned).provenance["init"] == str(small)


def test_demo_runs_and_reports(tmp_path, tiny_ckpt):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--model",
                str(tiny_ckpt),
                "--size",
                "64",
                "--steps",
                "2",
                "--out",
                str(out),
                "--no-gui",  # pytest-xvfb sets DISPLAY: without this napari would open and wait
            ]
        )
        == 0
    )
    report = json.loads((out / "demo_report.json").read_text())
    stains = {r["stain"] for r in report["synthetic"]["metrics"]}
    assert stains == {"CD3", "CK8/18"}
    assert all(np.isfinite(r["PSNR"]) for r in report["synthetic"]["metrics"])
    assert (out / "svs" / "CMU-1-Small-Region_preview.png").exists()
    assert main(["demo", "--size", "4096", "--out", str(out)]) == 2


def _headless_linux(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)


def test_display_detection(monkeypatch):
    import sys

    from napari_staindiffuser import demo

    _headless_linux(monkeypatch)
    assert not demo.has_display()
    assert "no display" in demo.gui_unavailable()
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert demo.has_display()
    monkeypatch.delenv("WAYLAND_DISPLAY")
    monkeypatch.setenv("DISPLAY", ":99")
    assert demo.has_display()
    assert demo.gui_unavailable() is None  # PyQt6 comes with the [testing] extra
    monkeypatch.setattr(demo, "QT_BINDINGS", ("NoSuchQtBinding",))
    assert demo.qt_binding() is None
    assert "napari-staindiffuser[qt]" in demo.gui_unavailable()
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("DISPLAY")
    assert demo.has_display()


def test_demo_gui_flag_without_a_display_exits_2(monkeypatch, capsys, tmp_path):
    from napari_staindiffuser import demo

    _headless_linux(monkeypatch)

    def not_run(*_a, **_k):
        raise AssertionError("--gui without a display must fail before the demo runs")

    monkeypatch.setattr(demo, "run_demo", not_run)
    assert main(["demo", "--gui", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "staindiffuser demo: error: --gui: no display" in err
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):  # the two flags exclude each other
        main(["demo", "--gui", "--no-gui"])


def test_demo_without_a_display_says_how_to_get_the_gui(monkeypatch, capsys, tmp_path):
    from napari_staindiffuser import demo

    _headless_linux(monkeypatch)
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: calls.append(out) or {})
    monkeypatch.setattr(demo, "open_gui", lambda report: calls.append("gui"))
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert calls == [tmp_path]
    assert capsys.readouterr().out.startswith("napari: no display")
    monkeypatch.setenv("DISPLAY", ":99")
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert calls[-1] == "gui" and "opening the results in napari" in capsys.readouterr().out
    calls.clear()
    assert main(["demo", "--no-gui", "--out", str(tmp_path)]) == 0
    assert calls == [tmp_path] and capsys.readouterr().out == ""


def test_launch_demo_opens_samples_docks_and_results(monkeypatch, qtbot, tmp_path):
    import napari

    from napari_staindiffuser._widgets._app import launch_demo
    from napari_staindiffuser.io import write_ome_tiff

    monkeypatch.setattr(napari, "run", lambda *a, **k: None)
    # the demo's files, as run_demo writes them (tiny stand-ins)
    rgb = np.full((48, 64, 3), 128, np.uint8)
    prov = {"region_level0_xywh": [900, 1300, 64, 48], "level": 0, "layer_type": "image"}
    virtual = write_ome_tiff(tmp_path / "v.ome.tif", rgb, mpp=0.499, metadata=prov)
    mask = write_ome_tiff(
        tmp_path / "m.ome.tif",
        np.ones((48, 64), np.uint8),
        mpp=0.499,
        metadata={**prov, "layer_type": "labels"},
    )
    report = {"svs": {"files": {"CD3": {"virtual": str(virtual), "mask": str(mask)}}}}
    viewer = launch_demo(report)
    try:
        names = [layer.name for layer in viewer.layers]
        for name in (
            "SYNTHETIC H&E",
            "SYNTHETIC CD3 IHC",
            "SYNTHETIC CK8/18 IHC",
            "SYNTHETIC CD3 truth",
            "SYNTHETIC CK8/18 truth",
            "CMU-1-Small-Region",
        ):
            assert name in names
        assert set(viewer.window.dock_widgets) >= {
            "Virtual staining (napari-staindiffuser)",
            "Coarse masks (napari-staindiffuser)",
            "Training (napari-staindiffuser)",
        }, list(viewer.window.dock_widgets)
        cmu = viewer.layers["CMU-1-Small-Region"]
        assert cmu.translate[1] > viewer.layers["SYNTHETIC H&E"].extent.world[1][1]
        v = viewer.layers["demo virtual CD3 (CMU-1-Small-Region)"]
        m = viewer.layers["demo mask CD3 (CMU-1-Small-Region)"]
        assert v.rgb and v.visible and isinstance(m, napari.layers.Labels) and not m.visible
        corner = np.asarray(cmu.translate) + np.array([1300, 900]) * 0.499  # region's (y, x)
        for layer in (v, m):  # over the stained region of CMU-1
            np.testing.assert_allclose(layer.translate, corner, rtol=1e-3)
        masks = viewer.window.dock_widgets["Coarse masks (napari-staindiffuser)"]
        assert masks._ihc.value is viewer.layers["SYNTHETIC CD3 IHC"] and not masks._live.value
        # let the mask dock's whole-slide statistics finish before the viewer goes
        qtbot.waitUntil(lambda: not masks._stats_pending, timeout=60_000)
    finally:
        viewer.close()


def test_level_region_stays_inside_the_level():
    from napari_staindiffuser.commands import level_region

    shape0, shape1 = (32914, 20000), (8228, 5000)
    for y in range(0, 4000, 7):
        ry, rx, rh, rw = level_region((5, y, 19990, 32914 - y), shape0, shape1)
        assert ry + rh <= shape1[0] and rx + rw <= shape1[1] and rh >= 1 and rw >= 1
    assert level_region((10, 20, 30, 40), (100, 100), (100, 100)) == (20, 10, 40, 30)
    assert level_region(None, (100, 100), (50, 50)) == (0, 0, 50, 50)
    with pytest.raises(ValueError, match="inside the slide"):
        level_region((90, 0, 20, 10), (100, 100), (100, 100))


def test_export_records_a_default_grid_within_a_distilled_models_own(tmp_path, tiny_ckpt, capsys):
    """``export --timesteps`` makes DDIM on that grid the copy's default; a distilled model only
    takes points of its own grid; ``--half`` stores float16 weights."""
    from napari_staindiffuser.model.checkpoint import read_config, save_checkpoint
    from napari_staindiffuser.sampling import SampleStep, iter_sample

    ckpt = load_checkpoint(tiny_ckpt)
    student = tmp_path / "student.safetensors"
    own = {"sampler": "ddim", "steps": 4, "spacing": "custom", "timesteps": [999, 500, 80, 9]}
    prov = {**ckpt.provenance, "sampling": own}
    save_checkpoint(student, ckpt.model, ema_state=ckpt.model.state_dict(), provenance=prov)
    out = tmp_path / "fast.safetensors"
    assert main(["export", str(student), str(out), "--timesteps", "999,80,9", "--half"]) == 0
    sampling = read_config(out)[1]["sampling"]
    assert sampling == {**own, "steps": 3, "timesteps": [999, 80, 9], "subset_of": own["timesteps"]}
    assert out.stat().st_size < student.stat().st_size * 0.6  # float16
    model = load_checkpoint(out).model
    cond = torch.zeros(1, 3, 32, 32)
    ts = [e.timestep for e in iter_sample(model, cond, aux=False) if isinstance(e, SampleStep)]
    assert ts == [999, 80, 9]
    capsys.readouterr()
    assert main(["export", str(student), str(out), "--timesteps", "999,400,9"]) == 2
    assert "pick timesteps among its points" in capsys.readouterr().err
    assert main(["export", str(tiny_ckpt), str(out), "--timesteps", "9,80"]) == 2
    assert "strictly decreasing" in capsys.readouterr().err
    assert main(["export", str(tiny_ckpt), str(out), "--timesteps", "9,x"]) == 2
