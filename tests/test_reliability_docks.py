"""The reliability sweep through the docks: bad H&E layers, and cancels at random moments.

Every case must end in a notification or a clean stop: napari stays up, the user's layers are
untouched, no half-written file, and a checkpoint on disk always loads.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from napari_staindiffuser._widgets import _mask_dock, _stain_dock, _train_dock
from napari_staindiffuser._widgets._stain_dock import REGION_WHOLE

from conftest import viewer_with_pair

MPP = 1.0
TIMEOUT = 240_000  # generous: CI machines are slow and shared


@pytest.fixture(scope="module")
def region():
    from napari_staindiffuser.synthetic import SyntheticSlide

    return SyntheticSlide(7, (1024, 1024), MPP).render(864, 288, 128, 128)


def _stain_dock_with(make_napari_viewer, tiny_ckpt, monkeypatch):
    errors: list[str] = []
    monkeypatch.setattr(_stain_dock, "notify_error", lambda e, a: errors.append(f"{a}: {e}"))
    viewer = make_napari_viewer(show=True)
    widget = _stain_dock.StainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.set_model(tiny_ckpt)
    widget._steps.value = 1
    widget._batch.value = 8
    widget._region.value = REGION_WHOLE
    widget.confirm = lambda question: True
    return viewer, widget, errors


def _bad_layers(he: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (layer data, what must happen: 'error:<text>', 'stained' or 'not offered')."""
    nan = (he / 255).astype(np.float32)
    nan[::7, ::5] = np.nan
    return {
        "grayscale": (he[..., 0], "not offered"),
        # converted like `staindiffuser stain` does (io.as_rgb_uint8): alpha dropped, 16-bit and
        # [0, 1] float scaled to 8 bits
        "RGBA": (np.dstack([he, np.full(he.shape[:2], 255, np.uint8)]), "stained"),
        "16-bit": (he.astype(np.uint16) * 257, "stained"),
        "float": ((he / 255).astype(np.float32), "stained"),
        "NaN": (nan, "error:NaN"),
        "1x1": (he[:1, :1].copy(), "error:too small"),
        "tiny": (he[:8, :8].copy(), "error:too small"),
        "glass": (np.full((64, 64, 3), 246, np.uint8), "error:no tissue"),
    }


@pytest.mark.parametrize("case", list(_bad_layers(np.zeros((8, 8, 3), np.uint8))))
def test_stain_dock_bad_layers(qtbot, make_napari_viewer, tiny_ckpt, region, monkeypatch, case):
    data, expect = _bad_layers(region.he[:64, :64])[case]
    viewer, widget, errors = _stain_dock_with(make_napari_viewer, tiny_ckpt, monkeypatch)
    layer = viewer.add_image(data, name=case, rgb=data.ndim == 3, scale=(MPP, MPP), units="um")
    offered = [c[1] if isinstance(c, tuple) else c for c in widget._he_choices()]
    if expect == "not offered":
        assert layer not in offered
        assert widget.run() is None and "no H&E layer" in errors[-1]
        return
    widget._he.value = layer
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    names = [ly.name for ly in viewer.layers]
    if expect == "stained":
        assert not errors, errors
        assert f"virtual CD3 ({case})" in names
    else:
        assert errors, f"{case}: no notification"
        assert expect.split(":", 1)[1] in errors[-1], errors[-1]
        assert names == [case]  # nothing added, nothing lost
    assert layer.data is data  # the user's layer is untouched


@pytest.mark.parametrize("seed", [0, 1])
def test_stain_dock_cancel_at_a_random_tile(
    qtbot, make_napari_viewer, tiny_ckpt, region, monkeypatch, seed
):
    viewer, widget, errors = _stain_dock_with(make_napari_viewer, tiny_ckpt, monkeypatch)
    he = viewer.add_image(region.he, name="H&E", rgb=True, scale=(MPP, MPP), units="um")
    widget._he.value = he
    widget._steps.value = 2
    widget._batch.value = 1
    k = random.Random(seed).randint(0, 6)
    widget.run()
    qtbot.waitUntil(lambda: widget.tiles_seen >= k or not widget.running, timeout=TIMEOUT)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert not errors, errors
    name = "virtual CD3 (H&E)"
    img = viewer.layers[name] if name in viewer.layers else None  # noqa: SIM401 (no .get)
    if img is not None:  # finished tiles kept, the rest transparent, marked as cancelled
        assert img.metadata["provenance"]["status"] in ("cancelled", "complete")
        assert img.data.shape[:2] == region.he.shape[:2]
    assert viewer.layers[0] is he and he.data is region.he
    # the dock is usable again at once
    assert widget._run.enabled and not widget._cancel.enabled


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_dock_cancel_at_a_random_tile(qtbot, make_napari_viewer, region, monkeypatch, seed):
    import napari

    errors: list[str] = []
    monkeypatch.setattr(_mask_dock, "notify_error", lambda e, a: errors.append(f"{a}: {e}"))
    monkeypatch.setattr(napari.utils.notifications, "show_info", lambda m: None)
    viewer = make_napari_viewer()
    big = np.ascontiguousarray(np.tile(region.ihc["CD3"], (12, 12, 1)))  # 1536 px: 9 tiles
    layer = viewer.add_image(big, rgb=True, name="IHC")
    widget = _mask_dock.CoarseMaskWidget(viewer)
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: widget._cached_stats(layer) is not None, timeout=TIMEOUT)
    k = random.Random(seed).randint(0, 4)
    widget.compute()
    qtbot.waitUntil(lambda: widget._progress.value >= k or not widget.running, timeout=TIMEOUT)
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert not errors, errors
    names = [ly.name for ly in viewer.layers if not ly.name.startswith("mask preview")]
    # either the compute finished before the cancel (complete layers) or nothing was added
    assert names in (["IHC"], ["IHC", "coarse mask CD3 (IHC)", "DAB (IHC)"]), names
    if len(names) == 3:
        assert viewer.layers[1].data.shape == big.shape[:2]
    assert layer.data is big


@pytest.mark.parametrize("seed", [0, 1])
def test_training_stop_at_a_random_step_leaves_a_loadable_checkpoint(
    qtbot, make_napari_viewer, tiny_ckpt, region, tmp_path, monkeypatch, seed
):
    from napari_staindiffuser.events import TrainStep
    from napari_staindiffuser.model.checkpoint import load_checkpoint

    errors: list[str] = []
    monkeypatch.setattr(_train_dock, "notify_error", lambda e, a: errors.append(f"{a}: {e}"))
    viewer = viewer_with_pair(make_napari_viewer, region, MPP)
    viewer.add_shapes([np.array([[4, 4], [124, 124]])], shape_type="rectangle", name="r")
    widget = _train_dock.TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_start(tiny_ckpt)
    widget._stain.value = "CD3"
    widget._size.value = 32
    widget._steps.value = 200
    widget._batch.value = 2
    widget._val_every.value = 0
    widget._ckpt_every.value = 2
    out = tmp_path / "run.safetensors"
    widget._out.value = out
    k = random.Random(seed).randint(1, 5)
    widget.start()
    qtbot.waitUntil(
        lambda: sum(isinstance(e, TrainStep) for e in widget.events) >= k or not widget.running,
        timeout=TIMEOUT,
    )
    widget.stop()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    assert not errors, errors
    ck = load_checkpoint(out, with_training=True)
    assert ck.training.step >= k
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
