"""The "Training" dock end to end: synthetic paired layers, a tiny model, a few steps."""

from __future__ import annotations

import numpy as np
import pytest

from napari_staindiffuser._widgets import _stain_dock, _train_dock

from conftest import untrained_model

MPP = 1.0
TIMEOUT = 120_000


@pytest.fixture(scope="module")
def pair():
    from napari_staindiffuser.synthetic import SyntheticSlide

    region = SyntheticSlide(7, (1024, 1024), MPP).render(864, 288, 160, 160)
    return region.he, region.ihc["CD3"]


@pytest.fixture
def dock(make_napari_viewer, pair, tiny_ckpt, tmp_path, monkeypatch):
    errors: list[str] = []
    monkeypatch.setattr(_train_dock, "notify_error", lambda e, a: errors.append(f"{a}: {e}"))
    viewer = make_napari_viewer(show=True)
    kw = {"rgb": True, "scale": (MPP, MPP), "units": "um"}
    viewer.add_image(pair[0], name="H&E", **kw)
    viewer.add_image(pair[1], name="CD3 IHC", **kw)
    rects = [np.array([[8, 8], [104, 104]]), np.array([[100, 100], [156, 156]])]
    viewer.add_shapes(rects, shape_type="rectangle", name="regions", units="um")
    widget = _train_dock.TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_start(tiny_ckpt)
    widget._stain.value = "CD3"
    widget._size.value = 32
    widget._steps.value = 6
    widget._batch.value = 2
    widget._val_every.value = 3
    widget._ckpt_every.value = 3
    widget._out.value = tmp_path / "out" / "finetuned.safetensors"
    widget.errors = errors
    return viewer, widget


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def test_fine_tuning_end_to_end(qtbot, dock, pair, tiny_ckpt):
    from napari_staindiffuser.events import CheckpointSaved, TrainStep, Validation
    from napari_staindiffuser.inference import stain_region
    from napari_staindiffuser.model.checkpoint import load_checkpoint, read_metadata

    viewer, widget = dock
    stainer = _stain_dock.StainWidget(viewer)  # open before training: it must learn the model
    assert widget.start() is not None, widget.errors
    _wait(qtbot, widget)
    assert not widget.errors
    steps = [ev.step for ev in widget.events if isinstance(ev, TrainStep)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert len(widget.plot.series["total"]) == 6 and len(widget.plot.series["gen/CD3"]) == 6
    assert [p[0] for p in widget.plot.series["val total"]] == [3, 6]
    saved = [ev for ev in widget.events if isinstance(ev, CheckpointSaved)]
    out = widget._out.value
    assert saved and saved[-1].path == out and out.is_file()
    assert not out.with_name("finetuned.start.safetensors").exists()  # temporary start removed
    meta = read_metadata(out)
    assert '"step": 6' in meta["train"] and "CD3" in meta["provenance"]
    # validation previews update in place, aligned with the validation region
    val = [ev for ev in widget.events if isinstance(ev, Validation)]
    assert all(set(v.previews) == {"CD3", "CK8/18"} for v in val)
    prev = viewer.layers["preview virtual CD3 (H&E)"]
    real = viewer.layers["preview real CD3 IHC"]
    np.testing.assert_allclose(prev.translate, real.translate)
    assert prev.metadata["provenance"]["step"] == 6
    np.testing.assert_array_equal(prev.data, val[-1].previews["CD3"])
    # with them, the preview's PSNR, SSIM and Dice against the real IHC of the crop
    import math

    from napari_staindiffuser import metrics

    assert all(set(v.scores) == {"CD3"} for v in val)
    last = val[-1].scores["CD3"]
    assert all(math.isfinite(last[k]) for k in ("psnr", "ssim", "dice"))
    assert last["psnr"] == pytest.approx(metrics.psnr(val[-1].previews["CD3"], real.data))
    assert 0 <= last["dice"] <= 1
    shown = widget._val_scores.value
    assert "step 6" in shown and f"PSNR {last['psnr']:.2f} dB" in shown and "Dice" in shown
    # the new model is in the staining dock's list at once, and it stains differently
    assert out.resolve() in stainer._model.choices
    before = stain_region(pair[0][:64, :64], load_checkpoint(tiny_ckpt).model, steps=2)
    after = stain_region(pair[0][:64, :64], load_checkpoint(out).model, steps=2)
    assert np.abs(before.images["CD3"].astype(int) - after.images["CD3"]).mean() > 0.5


def test_stop_saves_and_resume_continues_the_step_count(qtbot, dock):
    from napari_staindiffuser.events import Finished, TrainStep

    _, widget = dock
    widget._steps.value = 400
    widget._ckpt_every.value = 0
    widget.start()
    qtbot.waitUntil(
        lambda: any(isinstance(e, TrainStep) and e.step >= 2 for e in widget.events),
        timeout=TIMEOUT,
    )
    widget.stop()
    _wait(qtbot, widget)
    fin = [e for e in widget.events if isinstance(e, Finished)]
    assert fin and fin[-1].stopped
    stopped_at = fin[-1].summary["steps"]
    assert widget._out.value.is_file() and stopped_at < 400
    widget._steps.value = stopped_at + 2
    assert widget.resume() is not None, widget.errors
    _wait(qtbot, widget)
    steps = [e.step for e in widget.events if isinstance(e, TrainStep)]
    assert steps == [stopped_at + 1, stopped_at + 2]
    assert not widget.errors


def test_bad_setups_are_refused_before_anything_starts(qtbot, dock, tmp_path):
    from napari_staindiffuser.config import AuxTarget, Variant
    from napari_staindiffuser.model.checkpoint import save_checkpoint

    viewer, widget = dock
    shapes = viewer.layers["regions"]

    def refused(match):
        assert widget.start() is None
        assert match in widget.errors[-1], widget.errors[-1]

    viewer.add_shapes(name="empty")
    widget._shapes.value = viewer.layers["empty"]
    refused("no regions")
    viewer.add_shapes([np.array([[120, 120], [200, 200]])], shape_type="rectangle", name="out")
    widget._shapes.value = viewer.layers["out"]
    refused("outside")
    widget._shapes.value = shapes
    viewer.add_image(np.zeros((100, 160, 3), np.uint8), name="small IHC", rgb=True)
    widget._ihc.value = viewer.layers["small IHC"]
    refused("differ in size")
    widget._ihc.value = viewer.layers["CD3 IHC"]
    bidi = untrained_model(32, variant=Variant.BIDIRECTIONAL, aux_target=AuxTarget.NONE)
    widget.set_start(save_checkpoint(tmp_path / "bidi.safetensors", bidi))
    widget._stain.value = _train_dock.NEW_STAIN
    widget._new_stain.value = "Ki67"
    refused("cannot grow")
    # no tissue: rectangles over glass (an all-white pair) fail in the worker, with a message
    glass = np.full((160, 160, 3), 245, np.uint8)
    viewer.add_image(glass, name="glass H&E", rgb=True, scale=(MPP, MPP))
    viewer.add_image(glass.copy(), name="glass IHC", rgb=True, scale=(MPP, MPP))
    widget._he.value, widget._ihc.value = viewer.layers["glass H&E"], viewer.layers["glass IHC"]
    widget._start_from.value = _train_dock.SCRATCH[0]
    widget._stain.value = "CD3"
    widget.start()
    _wait(qtbot, widget)
    assert "no tissue" in widget.errors[-1]
    assert not widget._out.value.exists()  # nothing written


def test_new_stain_grows_a_branch(qtbot, dock):
    from napari_staindiffuser.model.checkpoint import read_config

    _, widget = dock
    widget._stain.value = _train_dock.NEW_STAIN
    widget._new_stain.value = "CD8"
    widget._steps.value = 2
    widget._val_every.value = 0
    widget.start()
    _wait(qtbot, widget)
    assert not widget.errors
    cfg, _ = read_config(widget._out.value)
    assert cfg.stains == ("CD3", "CK8/18", "CD8")


def test_registration_check_measures_and_offers_to_correct(qtbot, dock, pair):
    viewer, widget = dock
    shifted = np.roll(pair[1], (5, -4), axis=(0, 1))
    viewer.add_image(shifted, name="shifted IHC", rgb=True, scale=(MPP, MPP), units="um")
    widget._ihc.value = viewer.layers["shifted IHC"]
    asked = []
    widget.ask_correct = lambda regions: asked.append(regions) or True
    worker = widget.check_registration()
    with qtbot.waitSignal(worker.finished, timeout=TIMEOUT):
        pass
    qtbot.waitUntil(lambda: len(widget.registrations) == 2, timeout=5_000)
    reg = widget.registrations[0]
    assert abs(reg.dy + 5) < 1.0 and abs(reg.dx - 4) < 1.0  # dy, dx undo the roll
    assert asked == [[1, 2]] and reg.correct
    assert "offset by" in widget._reg_label.value
    job = widget._make_job()
    assert set(job.shifts) == {0, 1}
