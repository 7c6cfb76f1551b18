"""The "Coarse masks" dock in a real napari viewer (xvfb): compute, preview, cancel, errors."""

from __future__ import annotations

import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_staindiffuser._widgets import _common  # noqa: E402
from napari_staindiffuser._widgets import _mask_dock as dock  # noqa: E402
from napari_staindiffuser.stain import (  # noqa: E402
    PRESETS,
    coarse_mask,
    compute_coarse_mask,
    dab_channel,
    dab_statistics,
    threshold_value,
)

MPP = 0.5
SCALE = (MPP, MPP)
TRANSLATE = (10.0, 20.0)
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    """256 x 256 of a real haematoxylin + DAB image (skimage's immunohistochemistry)."""
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry()[128:384, 128:384])


@pytest.fixture
def errors(monkeypatch):
    """Messages that the dock sent to notify_error (the name it calls)."""
    seen: list[str] = []

    def record(exc, action):
        seen.append(_common.error_message(exc, action))

    monkeypatch.setattr(dock, "notify_error", record)
    return seen


def _setup(make_napari_viewer, qtbot, data, *, live=False, name="IHC", multiscale=False):
    viewer = make_napari_viewer()
    layer = viewer.add_image(
        data,
        rgb=True,
        name=name,
        multiscale=multiscale,
        scale=SCALE,
        translate=TRANSLATE,
        units=("um", "um"),
        metadata={"mpp": MPP},
    )
    widget = dock.CoarseMaskWidget(viewer)
    widget._live.value = live
    viewer.window.add_dock_widget(widget, name="Coarse masks")
    return viewer, layer, widget


def _wait_stats(qtbot, widget, layer):
    qtbot.waitUntil(lambda: widget._cached_stats(layer) is not None, timeout=WAIT_MS)


def _run(qtbot, widget):
    worker = widget.compute()
    assert worker is not None and widget.running
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    return worker


def test_preset_controls_follow_the_stain(make_napari_viewer, qtbot, ihc):
    viewer, layer, widget = _setup(make_napari_viewer, qtbot, ihc)
    assert widget.preset() == PRESETS["CD3"]
    assert widget.preset(0.25) == PRESETS["CD3"].at_mpp(0.25)
    widget._stain.value = "CK8/18"
    assert widget._rule.value == "otsu"
    assert widget._min_size.value == pytest.approx(150 * 0.25)  # 150 px at 0.5 µm/px
    assert widget._closing.value == pytest.approx(2 * 0.5)
    assert widget.preset() == PRESETS["CK8/18"]
    assert not widget._k.enabled and not widget._fixed.enabled
    widget._min_size.value = 50.0
    widget._closing.value = 1.5
    p = widget.preset()
    assert (p.min_object_size, p.closing_radius) == (200, 3)
    widget._stain.value = "CD3"
    assert widget.preset() == PRESETS["CD3"]

    # only RGB image layers are offered, and the list follows the layer list
    viewer.add_image(np.zeros((8, 8), np.float32), name="gray")
    viewer.add_labels(np.zeros((8, 8), np.uint8), name="labels")
    extra = viewer.add_image(np.zeros((8, 8, 3), np.uint8), rgb=True, name="other rgb")
    assert [c.name for c in widget._ihc.choices] == ["IHC", "other rgb"]
    viewer.layers.remove(extra)
    assert [c.name for c in widget._ihc.choices] == ["IHC"]
    _wait_stats(qtbot, widget, layer)


def test_compute_adds_aligned_layers_and_rerun_replaces(make_napari_viewer, qtbot, ihc):
    viewer, layer, widget = _setup(make_napari_viewer, qtbot, ihc)
    _wait_stats(qtbot, widget, layer)
    t = threshold_value(dab_statistics(ihc), "CD3")
    assert widget._threshold_label.value == f"threshold {t:.3f} (mean+2std of whole-slide DAB)"

    _run(qtbot, widget)
    res = widget.last_result
    assert res is not None and res["threshold"] == pytest.approx(t)
    mask_layer = viewer.layers["coarse mask CD3 (IHC)"]
    dab_layer = viewer.layers["DAB (IHC)"]
    assert isinstance(mask_layer, napari.layers.Labels)
    assert isinstance(dab_layer, napari.layers.Image) and not dab_layer.rgb
    assert mask_layer.data.dtype == np.uint8 and set(np.unique(mask_layer.data)) <= {0, 1}
    assert dab_layer.data.dtype == np.float32 and dab_layer.colormap.name == "viridis"
    for out in (mask_layer, dab_layer):
        assert out.data.shape == ihc.shape[:2]
        np.testing.assert_allclose(out.scale, layer.scale)
        np.testing.assert_allclose(out.translate, layer.translate)
        assert out.metadata["stain"] == "CD3" and out.metadata["mpp"] == pytest.approx(MPP)
        assert out.metadata[_common.OUTPUT_KEY] is True
    prov = mask_layer.metadata["provenance"]
    assert prov["source"] == "IHC" and prov["level"] == 0 and prov["rule"] == "mean+2std"
    assert prov["threshold"] == pytest.approx(t) and prov["k"] == 2.0
    assert prov["tile"] == dock.TILE and prov["halo"] == PRESETS["CD3"].required_halo
    assert prov["preset"]["min_object_size"] == 30 and prov["mpp"] == pytest.approx(MPP)

    expected = compute_coarse_mask(ihc, widget.preset(MPP), threshold=t)
    assert expected.any()
    np.testing.assert_array_equal(mask_layer.data, expected.astype(np.uint8))
    np.testing.assert_array_equal(dab_layer.data, dab_channel(ihc))

    # a rerun with other settings updates the same layers in place
    n_layers = len(viewer.layers)
    widget._k.value = 1.0
    _run(qtbot, widget)
    assert len(viewer.layers) == n_layers
    assert viewer.layers["coarse mask CD3 (IHC)"] is mask_layer
    assert viewer.layers["DAB (IHC)"] is dab_layer
    t1 = threshold_value(dab_statistics(ihc), widget.preset())
    assert t1 < t and mask_layer.metadata["provenance"]["k"] == 1.0
    np.testing.assert_array_equal(
        mask_layer.data, compute_coarse_mask(ihc, widget.preset(MPP), threshold=t1)
    )
    assert mask_layer.data.sum() > expected.sum()


def test_preview_covers_the_visible_region(make_napari_viewer, qtbot, ihc, monkeypatch):
    viewer, layer, widget = _setup(make_napari_viewer, qtbot, ihc, live=True)
    _wait_stats(qtbot, widget, layer)
    camera = _common.camera(viewer)
    camera.zoom *= 3
    box = _common.visible_box(viewer, layer)
    assert box[2] < ihc.shape[0] or box[3] < ihc.shape[1]  # a part of the image
    widget._k.value = 1.5
    name = "mask preview (IHC)"

    def shown(k):
        return (
            name in viewer.layers
            and viewer.layers[name].metadata["threshold"] == pytest.approx(k)
            and viewer.layers[name].data.shape == (box[2], box[3])
        )

    stats = widget._cached_stats(layer)
    t = threshold_value(stats, widget.preset())
    qtbot.waitUntil(lambda: shown(t), timeout=WAIT_MS)
    preview = viewer.layers[name]
    assert isinstance(preview, napari.layers.Labels)
    y, x, h, w = box
    np.testing.assert_allclose(preview.scale, layer.scale)
    np.testing.assert_allclose(preview.translate, np.add(TRANSLATE, np.multiply((y, x), SCALE)))
    region = ihc[y : y + h, x : x + w]
    np.testing.assert_array_equal(
        preview.data, coarse_mask(region, widget.preset(MPP), threshold=t).astype(np.uint8)
    )

    # never more than PREVIEW_MAX_PIXELS: every s-th pixel, drawn s times larger
    monkeypatch.setattr(dock, "PREVIEW_MAX_PIXELS", 1000)
    widget._k.value = 2.5
    t2 = threshold_value(stats, widget.preset())
    s = int(np.ceil(np.sqrt(h * w / 1000)))
    small = (len(range(0, h, s)), len(range(0, w, s)))
    qtbot.waitUntil(
        lambda: preview.metadata["threshold"] == pytest.approx(t2) and preview.data.shape == small,
        timeout=WAIT_MS,
    )
    assert preview.metadata["stride"] == s
    np.testing.assert_allclose(preview.scale, np.multiply(SCALE, s))
    np.testing.assert_allclose(preview.translate, np.add(TRANSLATE, np.multiply((y, x), SCALE)))
    assert len([ly for ly in viewer.layers if ly.name.startswith("mask preview")]) == 1

    # turned off: a change makes no new preview
    widget._live.value = False
    widget._k.value = 3.0
    assert not widget._timer.isActive()


def test_preview_uses_the_displayed_pyramid_level(make_napari_viewer, qtbot, ihc):
    big = np.ascontiguousarray(np.tile(ihc, (2, 2, 1)))  # 512 x 512
    levels = [big, np.ascontiguousarray(big[::2, ::2])]
    viewer, layer, widget = _setup(make_napari_viewer, qtbot, levels, live=True, multiscale=True)
    _wait_stats(qtbot, widget, layer)
    widget._k.value = 2.2
    name = "mask preview (IHC)"
    qtbot.waitUntil(
        lambda: name in viewer.layers and viewer.layers[name].metadata["level"] == layer.data_level,
        timeout=WAIT_MS,
    )
    level = layer.data_level
    ds = _common.level_downsample(layer, level)
    np.testing.assert_allclose(viewer.layers[name].scale, np.multiply(SCALE, ds))
    # the level list shows µm/px and size
    labels = [c for c, _ in widget._level_choices()]
    assert labels[0] == "auto (level 0)"
    assert labels[2] == "level 1: 1 µm/px, 256 x 256 px"


def test_cancel_adds_no_layers(make_napari_viewer, qtbot, ihc, monkeypatch):
    infos: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", infos.append)
    big = np.ascontiguousarray(np.tile(ihc, (8, 8, 1)))  # 2048 x 2048: 16 tiles of 512
    viewer, layer, widget = _setup(make_napari_viewer, qtbot, big)
    _wait_stats(qtbot, widget, layer)
    names = [ly.name for ly in viewer.layers]
    widget.compute()
    qtbot.waitUntil(lambda: widget._progress.value >= 1, timeout=WAIT_MS)
    assert "tiles, ETA" in widget._status.value and widget._pbar is not None
    widget.cancel()
    t0 = time.perf_counter()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert time.perf_counter() - t0 < 3.0
    assert widget._progress.value < 16
    assert [ly.name for ly in viewer.layers] == names
    assert widget.last_result is None
    assert any("cancelled" in m for m in infos)
    assert widget._compute_btn.enabled and not widget._cancel_btn.enabled


def test_errors_become_notifications(make_napari_viewer, qtbot, errors, monkeypatch):
    viewer = make_napari_viewer()
    widget = dock.CoarseMaskWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.compute() is None
    assert errors and "no RGB image layer" in errors[-1]
    assert not widget.running

    # glass only: statistics without tissue, so no threshold
    white = viewer.add_image(np.full((64, 64, 3), 250, np.uint8), rgb=True, name="white")
    assert widget._ihc.value is white
    _wait_stats(qtbot, widget, white)
    assert "no tissue" in widget._threshold_label.value
    n = len(errors)
    _run(qtbot, widget)
    assert len(errors) == n + 1 and "no tissue" in errors[-1]
    assert "Pan to tissue" in errors[-1]
    assert [ly.name for ly in viewer.layers] == ["white"]
    assert widget.last_result is None

    # an RGB layer of a dtype the core refuses
    odd = viewer.add_image(np.zeros((32, 32, 3), np.uint16), rgb=True, name="uint16")
    widget._ihc.value = odd
    qtbot.waitUntil(lambda: any("uint16" in m for m in errors), timeout=WAIT_MS)
    assert "statistics failed" in errors[-1]
    _run(qtbot, widget)
    assert "Coarse mask failed" in errors[-1] and "uint16" in errors[-1]
    assert [ly.name for ly in viewer.layers] == ["white", "uint16"]

    # a level too large to hold in memory is refused before any work starts
    with monkeypatch.context() as m:
        m.setattr(dock, "MAX_COMPUTE_PIXELS", 100)
        assert widget.compute() is None and "coarser level" in errors[-1]

    # the preview reports a missing tissue threshold once, however often it is asked
    widget._ihc.value = white
    widget._live.value = True
    qtbot.waitUntil(lambda: any("Mask preview" in m for m in errors), timeout=WAIT_MS)
    n = len(errors)
    widget._k.value = 3.0
    qtbot.waitUntil(lambda: not widget._timer.isActive(), timeout=WAIT_MS)
    assert len(errors) == n
