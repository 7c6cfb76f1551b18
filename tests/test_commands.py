"""Slide-level commands end to end on small inputs: stain, synth, masks, patches, export, demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_staindiffuser.cli import main
from napari_staindiffuser.io import open_slide, read_provenance, sample_svs_path
from napari_staindiffuser.model.checkpoint import load_checkpoint, save_checkpoint

from conftest import untrained_model

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


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model = untrained_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, provenance={"note": "untrained test model"})
    return path


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
    assert prov["sampler"] == "dpmsolver++" and prov["steps"] == 2 and prov["seed"] == 0
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
        main(["demo", "--model", str(tiny_ckpt), "--size", "64", "--steps", "2", "--out", str(out)])
        == 0
    )
    report = json.loads((out / "demo_report.json").read_text())
    stains = {r["stain"] for r in report["synthetic"]["metrics"]}
    assert stains == {"CD3", "CK8/18"}
    assert all(np.isfinite(r["PSNR"]) for r in report["synthetic"]["metrics"])
    assert (out / "svs" / "CMU-1-Small-Region_preview.png").exists()
    assert main(["demo", "--size", "4096", "--out", str(out)]) == 2


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
