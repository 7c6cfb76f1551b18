"""Stain as you pan in the "Virtual staining" dock: napari (under Xvfb), a tiny untrained model,
2 sampler steps, a small synthetic H&E. Tests wait on conditions (qtbot), never on sleep."""

from __future__ import annotations

import numpy as np
import pytest

from napari_staindiffuser._widgets import _live, _stain_dock

MPP = 1.0  # the tiny preset's µm/px
TIMEOUT = 120_000  # generous: the shared test machine can be very loaded


@pytest.fixture(scope="module")
def he_image():
    from napari_staindiffuser.synthetic import SyntheticSlide

    return SyntheticSlide(7, (1024, 1024), MPP).render(640, 320, 240, 288).he


@pytest.fixture
def dock(make_napari_viewer, tiny_ckpt, he_image, monkeypatch):
    errors: list[str] = []

    def fake_notify(exc, action):
        errors.append(f"{action}: {exc}")

    monkeypatch.setattr(_stain_dock, "notify_error", fake_notify)
    monkeypatch.setattr(_live, "notify_error", fake_notify)
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(900, 700)
    viewer.add_image(
        he_image, name="H&E", rgb=True, scale=(MPP, MPP), translate=(10.0, 20.0), units="um"
    )
    widget = _stain_dock.StainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.set_model(tiny_ckpt)
    widget._steps.value = 2
    widget._batch.value = 1
    widget.confirm = lambda question: True  # never a modal dialog in tests
    widget.errors = errors
    yield viewer, widget
    widget._live.value = False


def _look_at(viewer, y, x, zoom):
    from napari_staindiffuser._widgets._common import camera

    cam = camera(viewer)
    cam.zoom = zoom
    cam.center = (10 + y, 20 + x)  # world µm of data pixel (y, x)


def test_live_mode_stains_what_is_in_view_and_follows_the_pan(qtbot, dock):
    viewer, widget = dock
    live = widget.live
    # enough steps that the first view is still being stained when the pan comes (at 2 steps a
    # quiet machine finishes it within the 150 ms debounce)
    widget._steps.value = 40
    _look_at(viewer, 60, 60, 12.0)
    widget._live.value = True
    assert live.on and not widget.errors and not widget._run.enabled
    he = viewer.layers["H&E"]
    layers = [viewer.layers[f"live {s} (H&E)"] for s in ("CD3", "CK8/18")]
    for layer in layers:
        assert layer.multiscale and layer.rgb
        np.testing.assert_allclose(layer.scale, he.scale)
        np.testing.assert_allclose(layer.translate, he.translate)
    st = live.stainer
    first = list(st._wanted)
    assert first and first[0] == st.grid.visible_tiles((59, 59, 2, 2))[0]  # centre first
    assert len(first) < st.grid.n_rows * st.grid.n_cols  # only what is in view
    # pan away as soon as the first tile is in: the rest of the first view is abandoned
    qtbot.waitUntil(lambda: live.tiles_seen >= 1 or bool(widget.errors), timeout=TIMEOUT)
    assert not widget.errors
    _look_at(viewer, 180, 150, 12.0)
    qtbot.waitUntil(lambda: bool(st._wanted) and st._wanted != first, timeout=TIMEOUT)  # debounced
    second = list(st._wanted)
    assert not set(second) & set(first)
    qtbot.waitUntil(lambda: not st.queue(), timeout=TIMEOUT)
    assert all(st.is_cached(t) for t in second)
    left = [t for t in first if not st.is_cached(t)]
    assert left, "the pan came too late to leave queued tiles behind"
    assert st.stats.dropped + st.stats.cancelled >= len(left)
    assert not widget.errors
    # the layer shows the cached cores where they are, transparent elsewhere
    lv = layers[0].data[0]
    r, c = second[0]
    core = st.cache.get(st.key(r, c, "CD3"))
    k = st.grid.core
    assert core.shape == (k, k, 4)  # tissue there: stained, not skipped as background
    np.testing.assert_array_equal(lv[r * k : (r + 1) * k, c * k : (c + 1) * k], core)
    r, c = left[0]
    assert not lv[r * k : (r + 1) * k, c * k : (c + 1) * k][..., 3].any()
    qtbot.waitUntil(lambda: "stained" in widget._status.value, timeout=TIMEOUT)
    # off: the worker ends, Run is back, the layers keep their tiles
    worker = live.worker
    widget._live.value = False
    qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT)
    assert widget._run.enabled and not live.on
    assert lv[: 3 * k, : 3 * k].shape == (3 * k, 3 * k, 4)


def test_changed_settings_recompute_and_unchanged_reuse(qtbot, dock):
    viewer, widget = dock
    live = widget.live
    widget._stains[1].value = False  # CD3 only
    _look_at(viewer, 100, 100, 16.0)
    widget._live.value = True
    st = live.stainer
    qtbot.waitUntil(lambda: bool(st._wanted) and not st.queue(), timeout=TIMEOUT)
    assert st.stats.computed == len(st._wanted) - st.stats.blank > 0
    assert "live CK8/18 (H&E)" not in viewer.layers
    widget._seed.value = 1  # restarts with a new key: everything in view again
    assert live.stainer is not st and live.on
    st1 = live.stainer
    qtbot.waitUntil(lambda: bool(st1._wanted) and not st1.queue(), timeout=TIMEOUT)
    assert st1.stats.computed == len(st1._wanted) - st1.stats.blank > 0
    widget._seed.value = 0  # back: all from the cache
    st0 = live.stainer
    st0.set_view(list(st1._wanted))
    qtbot.waitUntil(lambda: not st0.queue(), timeout=TIMEOUT)
    assert st0.stats.computed == 0
    widget._live.value = False
    qtbot.waitUntil(lambda: not live.worker.is_running, timeout=TIMEOUT)
    assert not widget.errors


def test_a_failing_worker_becomes_a_notification_and_turns_live_off(qtbot, dock, monkeypatch):
    viewer, widget = dock

    def broken(*args):
        raise ValueError("not a readable safetensors checkpoint")

    monkeypatch.setattr(_live, "_load_tile_model", broken)
    _look_at(viewer, 100, 100, 16.0)
    widget._live.value = True
    qtbot.waitUntil(lambda: bool(widget.errors), timeout=TIMEOUT)
    assert widget.errors[0].startswith("Stain as you pan: not a readable safetensors")
    qtbot.waitUntil(lambda: not widget._live.value, timeout=TIMEOUT)
    assert not widget.live.on and widget._run.enabled
