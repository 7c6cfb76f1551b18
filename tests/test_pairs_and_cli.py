"""Paired-patch folders, batch making (aligned augmentation), and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_staindiffuser.cli import main
from napari_staindiffuser.pairs import PairFolder, make_batch, write_pair_folder

from conftest import blob_pairs


def test_pair_folder_round_trip(tmp_path):
    pairs = blob_pairs(3)
    root = write_pair_folder(tmp_path / "pairs", pairs)
    folder = PairFolder(root)
    assert len(folder) == 3 and folder.stains == ["CD3", "CK8/18"]
    for a, b in zip(pairs, folder, strict=True):
        np.testing.assert_array_equal(a.he, b.he)
        np.testing.assert_array_equal(a.ihc, b.ihc)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.stain == b.stain
    assert "3 pairs" in folder.description


def test_pair_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"manifest\.csv is missing"):
        PairFolder(tmp_path)
    (tmp_path / "manifest.csv").write_text("he,stain\nx.png,CD3\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['ihc'\]"):
        PairFolder(tmp_path)
    (tmp_path / "manifest.csv").write_text("he,ihc,mask,stain\nnope.png,nope.png,,CD3\n")
    with pytest.raises(ValueError, match="cannot read image"):
        PairFolder(tmp_path)[0]


def test_augmentation_keeps_he_ihc_mask_aligned():
    pairs = blob_pairs(16, size=32, seed=3)
    rng = np.random.default_rng(0)
    batch = make_batch(
        pairs, image_size=32, stains=("CD3", "CK8/18"), rng=rng, augment=True, color_jitter=0.0
    )
    ref = make_batch(pairs, image_size=32, stains=("CD3", "CK8/18"))
    assert not np.array_equal(batch["he"], ref["he"])  # something was rotated or flipped
    brown = np.array([150, 90, 40]) / 127.5 - 1
    for he, ihc, aux in zip(batch["he"], batch["ihc"], batch["aux"], strict=True):
        mask = aux[0] > 0
        # brown IHC exactly where the mask is, and nuclei in the H&E there too
        is_brown = np.all(np.abs(ihc.transpose(1, 2, 0) - brown) < 1e-6, axis=-1)
        np.testing.assert_array_equal(is_brown, mask)
        assert np.all(he[0][mask] < 0)  # dark (purple) H&E under every positive pixel


def test_color_jitter_touches_only_he():
    pairs = blob_pairs(4)
    kw = dict(image_size=32, stains=("CD3", "CK8/18"), augment=True)
    a = make_batch(pairs, rng=np.random.default_rng(1), color_jitter=0.0, **kw)
    b = make_batch(pairs, rng=np.random.default_rng(1), color_jitter=0.1, **kw)
    np.testing.assert_array_equal(a["ihc"], b["ihc"])
    np.testing.assert_array_equal(a["aux"], b["aux"])
    assert np.abs(a["he"] - b["he"]).max() > 0.01


def test_distance_target_batch():
    batch = make_batch(blob_pairs(2), image_size=32, stains=("CD3", "CK8/18"), distance_max=4.0)
    aux = batch["aux"]
    assert aux.min() == -1.0 and aux.max() <= 1.0 and len(np.unique(aux)) > 2


def test_cli_train_info_resume(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    common = ["--synthetic", "4", "--patch-size", "64", "--batch", "2", "--out", str(out)]
    model = ["--preset", "tiny", "--image-size", "32", "--timesteps", "100"]
    assert main(["train", *common, *model, "--steps", "2", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint saved" in captured.out + captured.err and out.exists()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["schedule"]["num_train_timesteps"] == 100
    assert info["provenance"]["steps"] == 2 and "synthetic" in info["provenance"]["data"]
    assert main(["train", *common, "--resume", str(out), "--steps", "3", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["steps"] == 3


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "give training data" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["info", str(bad)]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    assert main(["train", "--synthetic", "2", "--stains", "CD3,HER2", "--out", "x"]) == 2
    assert "HER2" in capsys.readouterr().err


def test_cli_distill_one_stains_generation_branch(tiny_ckpt, tmp_path, capsys):
    """``distill --stains --branches --step-weights``: only CD3 pairs are rendered and the choice
    lands in the provenance; malformed weights exit 2."""
    out = tmp_path / "s.safetensors"
    args = ["distill", str(tiny_ckpt), "--out", str(out), "--steps", "2", "--teacher-steps", "4"]
    args += ["--steps-per-stage", "1", "--synthetic", "2", "--batch", "2", "--device", "cpu"]
    focus = ["--stains", "CD3", "--branches", "gen", "--step-weights", "1,2"]
    assert main([*args, *focus]) == 0
    assert "rendering 2 SYNTHETIC pairs" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)["provenance"]["distillation"]
    assert (info["stains"], info["branches"], info["step_weights"]) == (["CD3"], ["gen"], [1, 2])
    assert "stains=['CD3']" in info["data"]  # only CD3 pairs were rendered
    assert main([*args, "--step-weights", "1,x"]) == 2
    assert "--step-weights needs comma-separated numbers" in capsys.readouterr().err
