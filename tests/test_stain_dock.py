"""The "Virtual staining" dock end to end, with a tiny untrained model on small regions.

Tests wait on signals or conditions (qtbot), never on sleep.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_staindiffuser._widgets import _stain_dock
from napari_staindiffuser._widgets._stain_dock import REGION_FOV, REGION_SHAPES, REGION_WHOLE

MPP = 1.0  # the tiny preset's µm/px
TIMEOUT = 60_000


@pytest.fixture(scope="module")
def he_image():
    from napari_staindiffuser.synthetic import SyntheticSlide

    return SyntheticSlide(7, (1024, 1024), MPP).render(896, 320, 96, 112).he


@pytest.fixture
def dock(make_napari_viewer, tiny_ckpt, he_image, monkeypatch):
    errors: list[str] = []

    def fake_notify(exc, action):
        errors.append(f"{action}: {exc}")

    monkeypatch.setattr(_stain_dock, "notify_error", fake_notify)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(
        he_image, name="H&E", rgb=True, scale=(MPP, MPP), translate=(10.0, 20.0), units="um"
    )
    widget = _stain_dock.StainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.set_model(tiny_ckpt)
    widget._steps.value = 2
    widget._batch.value = 1
    widget._region.value = REGION_WHOLE
    widget.confirm = lambda question: True  # never a modal dialog in tests
    widget.errors = errors
    return viewer, widget


def _run(qtbot, widget):
    events = []
    worker = widget.run()
    assert worker is not None, widget.errors
    qtbot.waitUntil(lambda: widget.worker is not None or not widget.running, timeout=TIMEOUT)
    if widget.worker is not None:
        widget.worker.yielded.connect(lambda ev: events.append(type(ev).__name__))
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    return events


def test_whole_image_layers_are_aligned_named_and_match_the_core(qtbot, dock, he_image):
    from napari_staindiffuser.inference import stain_region
    from napari_staindiffuser.model.checkpoint import load_checkpoint

    viewer, widget = dock
    events = _run(qtbot, widget)
    assert not widget.errors
    he = viewer.layers["H&E"]
    for stain in ("CD3", "CK8/18"):
        img = viewer.layers[f"virtual {stain} (H&E)"]
        lab = viewer.layers[f"{stain}+ cells (H&E)"]
        for layer in (img, lab):
            np.testing.assert_allclose(layer.scale, he.scale)
            np.testing.assert_allclose(layer.translate, he.translate)
        assert img.data.shape == (96, 112, 4) and (img.data[..., 3] == 255).all()
        assert lab.data.shape == (96, 112) and lab.data.dtype == np.int32
        prov = img.metadata["provenance"]
        assert prov["status"] == "complete"
        assert prov["sampler"] == "ddim" and prov["steps"] == 2 and prov["seed"] == 0
        assert prov["region"] == [0, 0, 96, 112] and len(prov["model_sha256"]) == 16
        assert prov["he_layer"] == "H&E" and img.metadata["stain"] == stain
    # streaming: tiles arrive before the region's final result
    assert "TileStained" in events and "RegionDone" in events
    assert events.index("TileStained") < events.index("RegionDone")
    assert widget.tiles_seen == events.count("TileStained") > 1
    # the dock shows exactly what the core computes for the same settings
    model = load_checkpoint(widget._model.value).model
    from napari_staindiffuser._widgets._stain_worker import PRECISION

    ref = stain_region(
        he_image, model, steps=2, batch=1, seed=0, image_mpp=MPP, precision=PRECISION
    )
    for stain in ("CD3", "CK8/18"):
        got = viewer.layers[f"virtual {stain} (H&E)"].data[..., :3]
        np.testing.assert_array_equal(got, ref.images[stain])
        assert (viewer.layers[f"{stain}+ cells (H&E)"].data > 0).sum() == ref.masks[stain].sum()
    # counts: one row per stain, copyable
    tsv = widget.counts_tsv().splitlines()
    assert tsv[0].startswith("region\tstain\tpositive objects") and len(tsv) == 3
    assert widget._device_used.value == "using: cpu"
    # a rerun updates the same layers in place
    n_layers = len(viewer.layers)
    _run(qtbot, widget)
    assert len(viewer.layers) == n_layers and not widget.errors


def test_field_of_view_and_shapes_regions(qtbot, dock):
    from napari_staindiffuser._widgets._common import camera

    viewer, widget = dock
    he = viewer.layers["H&E"]
    widget._stains[1].value = False  # CD3 only
    widget._region.value = REGION_FOV
    cam = camera(viewer)
    cam.center = (10 + 30, 20 + 40)  # world µm: data pixel (30, 40)
    cam.zoom = min(viewer.canvas.size) / 40.0  # at least 40 µm visible each way
    _run(qtbot, widget)
    assert not widget.errors, widget.errors
    img = viewer.layers["virtual CD3 (H&E)"]
    assert "virtual CK8/18 (H&E)" not in viewer.layers
    y, x, h, w = img.metadata["provenance"]["region"]
    assert 0 < h <= 96 and 0 < w <= 112 and min(h, w) >= 38  # the view, not the image
    assert h < 96 or w < 112
    np.testing.assert_allclose(img.translate, (10 + y * MPP, 20 + x * MPP))
    assert y <= 30 <= y + h and x <= 40 <= x + w

    rects = [np.array([[12, 22], [12, 62], [52, 62], [52, 22]]), np.array([[60, 80], [90, 120]])]
    viewer.add_shapes(rects, shape_type=["polygon", "rectangle"], name="regions")
    widget._region.value = REGION_SHAPES
    widget._shapes.value = viewer.layers["regions"]
    _run(qtbot, widget)
    assert not widget.errors
    first, second = viewer.layers["virtual CD3 (H&E) #1"], viewer.layers["virtual CD3 (H&E) #2"]
    assert first.data.shape[:2] == (40, 40)
    np.testing.assert_allclose(first.translate, (12, 22))
    np.testing.assert_allclose(second.translate, (60, 80))
    assert second.data.shape[:2] == (30, 40)
    assert [r["region"] for r in widget._rows] == [1, 2]
    np.testing.assert_allclose(first.scale, he.scale)


def test_cancel_keeps_finished_tiles(qtbot, dock):
    viewer, widget = dock
    widget._steps.value = 50
    widget.confirm_above_s = 1e9
    widget.run()
    qtbot.waitUntil(lambda: widget.tiles_seen >= 1, timeout=TIMEOUT)
    with qtbot.waitSignal(widget.worker.finished, timeout=5_000):
        widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=5_000)
    img = viewer.layers["virtual CD3 (H&E)"]
    assert img.metadata["provenance"]["status"] == "cancelled"
    alpha = img.data[..., 3]
    assert (alpha == 255).any() and (alpha == 0).any()  # kept, and honest about the rest
    assert widget._run.enabled and not widget._cancel.enabled


def test_long_runs_ask_first(qtbot, dock):
    viewer, widget = dock
    questions = []
    widget.confirm_above_s = 0.0
    widget.confirm = lambda q: questions.append(q) or False
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert len(questions) == 1 and "tiles" in questions[0] and "Go ahead?" in questions[0]
    assert [layer.name for layer in viewer.layers] == ["H&E"]
    assert "not started" in widget._status.value
    # steps versus time for this region, from the estimate, following the Steps box
    assert "time for this region on cpu" in widget._timing.value
    assert "[2 steps:" in widget._timing.value and "50:" in widget._timing.value
    widget._steps.value = 20
    assert "[20 steps:" in widget._timing.value


def test_uncertainty_layer_with_several_samples(qtbot, dock):
    viewer, widget = dock
    widget._samples.value = 2
    widget._batch.value = 4
    _run(qtbot, widget)
    unc = viewer.layers["uncertainty CD3 (H&E)"]
    assert unc.data.shape == (96, 112) and unc.data.dtype == np.float32
    assert unc.data.max() > 0 and unc.metadata["provenance"]["samples"] == 2


def test_errors_become_notifications(qtbot, dock, tmp_path):
    viewer, widget = dock
    # a pickle posing as a checkpoint: refused, never loaded
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    assert not widget.set_model(bad)
    assert "not a readable safetensors" in widget.errors[-1]
    # no tissue: an all-white H&E
    white = np.full((64, 64, 3), 245, np.uint8)
    glass = viewer.add_image(white, name="glass", rgb=True, scale=(MPP, MPP), units="um")
    widget._he.value = glass
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert "no tissue" in widget.errors[-1]
    # no H&E chosen
    widget._he.value = None
    assert widget.run() is None
    assert "no H&E layer" in widget.errors[-1]
    # a device that is not there
    import torch

    widget._he.value = viewer.layers["H&E"]
    widget._device.value = "cuda"
    if not torch.cuda.is_available():
        widget.run()
        qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
        assert "CUDA" in widget.errors[-1]
    assert [layer.name for layer in viewer.layers] == ["H&E", "glass"]  # nothing lost or added


def test_model_list_follows_new_checkpoints(dock, tiny_ckpt, tmp_path):
    import shutil

    _, widget = dock
    other = tmp_path / "finetuned.safetensors"
    shutil.copy(tiny_ckpt, other)
    _stain_dock.remember_model(other)  # what the training dock does
    assert other.resolve() in widget._model.choices
    assert widget._model.value == tiny_ckpt.resolve()  # the selection is kept
    names = [name for name, _ in widget._model_choices()]
    assert names[:2] == ["bundled demo model, distilled", "bundled demo model"]
    assert names[2].startswith("finetuned.safetensors")
    widget._model.value = other.resolve()
    assert "CD3" in widget._summary.value and "trained 0 steps" in widget._summary.value
    widget._model.value = widget._model_choices()[0][1]  # the default: the distilled model
    assert (widget._sampler.value, widget._steps.value) == ("ddim", 4)
    assert "distilled for ddim, 4 steps" in widget._summary.value


def test_event_loop_keeps_beating_while_staining(qtbot, dock):
    """The Qt event loop never stalls long while tiles stream in. The output layers are added
    before the staining worker starts (napari's own cost, outside this measure);
    benchmarks/bench_gui.py reports both figures; the bound leaves room for CI noise."""
    import time

    from qtpy.QtCore import QTimer

    _, widget = dock
    widget._steps.value = 4
    beats: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is not None, timeout=TIMEOUT)
    timer.start()
    try:
        qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    finally:
        timer.stop()
    gaps = np.diff(beats)
    assert len(gaps) > 20 and widget.tiles_seen > 1
    assert gaps.max() < 0.5, f"event loop stalled {gaps.max() * 1000:.0f} ms"
