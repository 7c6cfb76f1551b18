"""``staindiffuser evaluate``: a tiny model, 2-step sampling, numbers equal to metrics.py."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from napari_staindiffuser import evaluate, metrics
from napari_staindiffuser.cli import main

from conftest import blob_pairs, untrained_model

STEPS = 2


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from napari_staindiffuser.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("models")
    return [
        save_checkpoint(root / f"tiny{seed}.safetensors", untrained_model(32, seed=seed))
        for seed in (0, 1)
    ]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from napari_staindiffuser.pairs import write_pair_folder

    return write_pair_folder(tmp_path_factory.mktemp("pairs"), blob_pairs(8, size=32, seed=3))


class TinyFeatures:
    """A stand-in for the Inception network: 4 x 4 average-pooled RGB (48 features)."""

    @staticmethod
    def load(device="cpu"):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.scale = torch.nn.Parameter(torch.ones(()), requires_grad=False)

            def forward(self, x):
                x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4)
                return (x * self.scale).flatten(1)

        return Net()


def _expected(ckpt, folder, stain, seed=0):
    """The row recomputed from scratch with metrics.py."""
    from napari_staindiffuser.model.checkpoint import load_checkpoint
    from napari_staindiffuser.pairs import PairFolder
    from napari_staindiffuser.sampling import from_uint8_rgb, sample, to_uint8_rgb

    pairs = [p for p in PairFolder(folder) if p.stain == stain]
    model = load_checkpoint(ckpt).model.eval()
    he = np.stack([p.he for p in pairs])
    res = sample(model, from_uint8_rgb(he), stains=[stain], steps=STEPS, seed=seed, aux=False)
    virtual = to_uint8_rgb(res.images[stain])
    real = np.stack([p.ihc for p in pairs])
    mpp = model.config.mpp
    pred = metrics.positive_masks(virtual, stain, mpp)
    want = {
        **metrics.mean_image_scores(virtual, real),
        **metrics.mask_scores(pred, [p.mask for p in pairs], mpp),
    }
    return want, virtual, real


@pytest.mark.skipif(metrics._find("torchmetrics") is None, reason="needs the [metrics] extra")
def test_iter_evaluate_scores_equal_metrics_py(ckpts, folder, monkeypatch):
    from napari_staindiffuser.events import Progress
    from napari_staindiffuser.pairs import PairFolder

    monkeypatch.setattr(metrics, "load_inception", TinyFeatures.load)
    monkeypatch.setattr(metrics, "distribution_unavailable", lambda: None)
    events = list(
        evaluate.iter_evaluate([ckpts[0]], pairs=PairFolder(folder), steps=STEPS, batch=4)
    )
    assert any(isinstance(e, Progress) and "sampling" in e.stage for e in events)
    result = events[-1]
    assert isinstance(result, evaluate.EvalResult)
    assert [(r["model"], r["stain"], r["n"]) for r in result.rows] == [
        ("tiny0", "CD3", 4),
        ("tiny0", "CK8/18", 4),
    ]
    net = TinyFeatures.load()
    for row in result.rows:
        want, virtual, real = _expected(ckpts[0], folder, row["stain"])
        for key, value in want.items():
            assert row[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key
        feats = [metrics.inception_features(x, net) for x in (real, virtual)]
        for key, value in metrics.distribution_scores(*feats).items():
            assert row[key] == pytest.approx(value, abs=1e-9), key
        assert 0 <= row["precision"] <= 1 and row["fid"] >= 0


def test_cli_writes_the_table_and_files(ckpts, folder, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(folder), "--model", str(ckpts[0])]
    argv += ["--model", str(ckpts[1]), "--steps", str(STEPS), "--no-distribution"]
    assert main([*argv, "--stains", "CD3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | CD3 PSNR | SSIM | FID |" in printed
    assert "| tiny0 |" in printed and "| tiny1 |" in printed
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["model"], r["stain"]) for r in rows] == [("tiny0", "CD3"), ("tiny1", "CD3")]
    assert rows[0]["fid"] == ""  # not computed: an empty cell
    data = json.loads((out / "metrics.json").read_text())
    assert data["config"]["steps"] == STEPS and data["config"]["distribution"] is False
    assert data["rows"][0]["fid"] is None
    want, _, _ = _expected(ckpts[0], folder, "CD3")
    assert float(rows[0]["ssim"]) == pytest.approx(want["ssim"], rel=1e-9)
    assert data["rows"][0]["dice"] == pytest.approx(want["dice"], abs=1e-12)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_cli_on_a_slide_pair(ckpts, tmp_path, capsys):
    from skimage import io as skio

    from napari_staindiffuser.synthetic import SyntheticSlide

    region = SyntheticSlide(7, (256, 256), 1.0).render(96, 96, 96, 80)
    skio.imsave(tmp_path / "he.png", region.he, check_contrast=False)
    skio.imsave(tmp_path / "ihc.png", region.ihc["CD3"], check_contrast=False)
    argv = ["evaluate", "--he", str(tmp_path / "he.png"), "--ihc", str(tmp_path / "ihc.png")]
    argv += ["--stain", "CD3", "--region", "0,0,64,32", "--region", "16,40,40,36", "--mpp", "1"]
    argv += ["--model", str(ckpts[0]), "--steps", str(STEPS), "--no-distribution"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())["rows"]
    # 32 px model patches: 2 from the first region, 1 from the second
    assert len(rows) == 1 and rows[0]["n"] == 3 and rows[0]["stain"] == "CD3"
    assert math.isfinite(rows[0]["psnr"]) and 0 <= rows[0]["dice"] <= 1


def test_cli_refuses_bad_requests(ckpts, folder, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o")
    assert main(["evaluate", "--out", out]) == 2
    assert "one data source" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(folder), "--synthetic", "4", "--out", out]) == 2
    capsys.readouterr()
    argv = ["evaluate", "--data", str(folder), "--model", str(ckpts[0]), "--out", out]
    assert main([*argv, "--stains", "Ki67"]) == 2
    assert "no pairs of ['Ki67']" in capsys.readouterr().err
    monkeypatch.setattr(
        metrics, "distribution_unavailable", lambda: "X: " + metrics.METRICS_INSTALL_HINT
    )
    assert main([*argv, "--distribution", "--steps", "1"]) == 2
    assert 'pip install "napari-staindiffuser[metrics]"' in capsys.readouterr().err
    # without the extra, the default run notes it and computes everything else
    assert main([*argv, "--steps", "1", "--stains", "CD3"]) == 0
    captured = capsys.readouterr()
    assert "FID, KID, precision and recall skipped" in captured.out + captured.err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["rows"][0]["kid"] is None
