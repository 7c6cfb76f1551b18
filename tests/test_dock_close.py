"""Closing a dock while its worker runs: the worker is asked to stop and what it still sends is
ignored, whether the dock's close button or the viewer's close ends it.

napari (under Xvfb), tiny untrained models, small synthetic images. The staining and mask jobs
are held by a gate after their first event, so the close always comes mid-run; tests wait on
conditions (qtbot), never on sleep. ``qtbot.captureExceptions`` collects what would reach the Qt
event loop (``RuntimeError: wrapped C/C++ object ... has been deleted``), and ``notify_error``
is replaced by a list, as in the other dock tests.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_staindiffuser._widgets import _live, _mask_dock, _stain_dock, _train_dock
from napari_staindiffuser._widgets._stain_dock import REGION_WHOLE

from conftest import viewer_with_pair

MPP = 1.0
TIMEOUT = 120_000  # ms; generous: the test machine is shared
CLOSES = ("dock", "viewer")  # the dock's close button ("x"), or closing the whole viewer


@pytest.fixture(scope="module")
def region():
    from napari_staindiffuser.synthetic import SyntheticSlide

    return SyntheticSlide(7, (1024, 1024), MPP).render(864, 288, 160, 160)


class Gate:
    """Wraps a worker's generator function (:meth:`job`, a generator function too, so that
    napari makes a GeneratorWorker of it): holds it after the first event that ``hold``
    accepts until :meth:`release`, and records whether it ran to its end."""

    def __init__(self, fn, hold=lambda ev: True):
        self.fn, self.hold = fn, hold
        self.reached, self._go = threading.Event(), threading.Event()
        self.ended = False

    def job(self, *args, **kwargs):
        gen = self.fn(*args, **kwargs)
        try:
            ev = next(gen)
            while True:
                yield ev
                if not self.reached.is_set() and self.hold(ev):
                    self.reached.set()
                    self._go.wait(TIMEOUT / 1000)
                ev = next(gen)
        except StopIteration as stop:
            self.ended = True
            return stop.value

    def release(self):
        self._go.set()


@pytest.fixture
def gates():
    made: list[Gate] = []
    yield made
    for g in made:  # never leave a worker thread waiting
        g.release()


def _close(viewer, widget, how: str) -> None:
    if how == "dock":
        widget.native.parent().destroyOnClose()  # what the dock's "x" button calls
        assert widget.native.parent() is None
    else:
        viewer.close()
        assert _deleted(widget._status.native)  # the case that used to raise RuntimeError
    assert widget.lifetime.closed


def _deleted(qobject) -> bool:
    try:
        qobject.objectName()
    except RuntimeError:
        return True
    return False


def _watch(worker) -> dict:
    """Record the worker's end: ``finished`` always comes, ``aborted`` when it was stopped."""
    seen = {"finished": False, "aborted": False, "errored": None}
    worker.finished.connect(lambda: seen.__setitem__("finished", True))
    worker.errored.connect(lambda exc: seen.__setitem__("errored", exc))
    if hasattr(worker, "aborted"):
        worker.aborted.connect(lambda: seen.__setitem__("aborted", True))
    return seen


# --------------------------------------------------------------------------- staining


@pytest.mark.parametrize("how", CLOSES)
def test_closing_the_staining_dock_mid_run(
    qtbot, make_napari_viewer, tiny_ckpt, region, monkeypatch, gates, how
):
    from napari_staindiffuser.inference import TileStained

    errors: list[str] = []
    monkeypatch.setattr(_stain_dock, "notify_error", lambda e, a: errors.append(f"{a}: {e}"))
    gate = Gate(_stain_dock.stain_job, hold=lambda ev: isinstance(ev, TileStained))
    gates.append(gate)
    monkeypatch.setattr(_stain_dock, "stain_job", gate.job)
    viewer = make_napari_viewer(show=True)
    viewer.add_image(region.he[:96, :112], name="H&E", rgb=True, scale=(MPP, MPP), units="um")
    widget = _stain_dock.StainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.set_model(tiny_ckpt)
    widget._steps.value, widget._batch.value = 2, 1
    widget._region.value = REGION_WHOLE
    widget.confirm = lambda question: True
    assert widget.run() is not None, errors
    qtbot.waitUntil(gate.reached.is_set, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: widget.tiles_seen >= 1, timeout=TIMEOUT)
    worker = widget.worker
    seen = _watch(worker)
    tiles = widget.tiles_seen
    with qtbot.captureExceptions() as exceptions:
        _close(viewer, widget, how)
        gate.release()  # the job computes its next tile and yields it to a closed dock
        qtbot.waitUntil(lambda: seen["finished"], timeout=TIMEOUT)
    assert not exceptions, exceptions
    assert not errors, errors
    assert seen["aborted"] and not gate.ended  # stopped, not run to the end
    assert widget.tiles_seen == tiles  # nothing reached the closed dock's layers
    assert not widget.running
    if how == "dock":  # the layers stay in the viewer, flagged as unfinished
        prov = viewer.layers["virtual CD3 (H&E)"].metadata["provenance"]
        assert prov["status"] == "cancelled"


@pytest.mark.parametrize("how", ["viewer"])  # the dock's button: as in the test above
def test_closing_the_staining_dock_stops_live_mode(
    qtbot, make_napari_viewer, tiny_ckpt, region, monkeypatch, how
):
    from napari_staindiffuser._widgets._common import camera

    errors: list[str] = []
    for mod in (_stain_dock, _live):
        monkeypatch.setattr(mod, "notify_error", lambda e, a: errors.append(f"{a}: {e}"))
    viewer = make_napari_viewer(show=True)
    viewer.add_image(region.he, name="H&E", rgb=True, scale=(MPP, MPP), units="um")
    widget = _stain_dock.StainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.set_model(tiny_ckpt)
    widget._steps.value, widget._batch.value = 20, 1
    cam = camera(viewer)
    cam.zoom, cam.center = 8.0, (80, 80)
    widget._live.value = True
    live = widget.live
    assert live.on, errors
    qtbot.waitUntil(lambda: live.tiles_seen >= 1 or bool(errors), timeout=TIMEOUT)
    assert not errors, errors
    assert live.stainer.queue()  # more tiles in view to stain: the close comes mid-run
    seen = _watch(live.worker)
    with qtbot.captureExceptions() as exceptions:
        _close(viewer, widget, how)
        qtbot.waitUntil(lambda: seen["finished"], timeout=TIMEOUT)  # it only ends when stopped
    assert not exceptions, exceptions
    assert not errors, errors
    assert live.stainer.stopped and not live.on


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("how", CLOSES)
def test_closing_the_mask_dock_mid_run(qtbot, make_napari_viewer, region, monkeypatch, gates, how):
    from napari_staindiffuser.events import Progress

    errors: list[str] = []
    monkeypatch.setattr(_mask_dock, "notify_error", lambda e, a: errors.append(f"{a}: {e}"))
    gate = Gate(_mask_dock.compute_job, hold=lambda ev: isinstance(ev, Progress))
    gates.append(gate)
    monkeypatch.setattr(_mask_dock, "compute_job", gate.job)
    monkeypatch.setattr(_mask_dock, "TILE", 64)  # 160 px: 9 tiles
    viewer = make_napari_viewer(show=True)
    layer = viewer.add_image(region.ihc["CD3"], rgb=True, name="IHC", scale=(MPP, MPP))
    widget = _mask_dock.CoarseMaskWidget(viewer)
    widget._live.value = False
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: widget._cached_stats(layer) is not None, timeout=TIMEOUT)
    worker = widget.compute()
    assert worker is not None, errors
    seen = _watch(worker)
    qtbot.waitUntil(gate.reached.is_set, timeout=TIMEOUT)
    with qtbot.captureExceptions() as exceptions:
        _close(viewer, widget, how)
        gate.release()
        qtbot.waitUntil(lambda: seen["finished"], timeout=TIMEOUT)
    assert not exceptions, exceptions
    assert not errors, errors
    assert seen["aborted"] and not gate.ended
    assert widget.last_result is None and not widget.running
    if how == "dock":  # the viewer lives on, with no half-made layer
        assert [ly.name for ly in viewer.layers] == ["IHC"]


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("how", CLOSES)
def test_closing_the_training_dock_stops_and_keeps_a_checkpoint(
    qtbot, make_napari_viewer, region, tiny_ckpt, tmp_path, monkeypatch, how
):
    from napari_staindiffuser.events import Finished, TrainStep
    from napari_staindiffuser.model.checkpoint import load_checkpoint
    from napari_staindiffuser.settings import recent_models

    errors: list[str] = []
    monkeypatch.setattr(_train_dock, "notify_error", lambda e, a: errors.append(f"{a}: {e}"))
    viewer = viewer_with_pair(make_napari_viewer, region, MPP)
    rect = [np.array([[8, 8], [104, 104]])]
    viewer.add_shapes(rect, shape_type="rectangle", name="regions", units="um")
    widget = _train_dock.TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.set_start(tiny_ckpt)
    widget._stain.value = "CD3"
    widget._size.value, widget._batch.value = 32, 2
    widget._steps.value, widget._val_every.value, widget._ckpt_every.value = 10_000, 0, 0
    widget._split.value = _train_dock.SPLITS[2]
    out = tmp_path / f"closed-{how}.safetensors"
    widget._out.value = out
    worker = widget.start()
    assert worker is not None, errors
    seen = _watch(worker)
    qtbot.waitUntil(
        lambda: any(isinstance(e, TrainStep) for e in widget.events) or bool(errors),
        timeout=TIMEOUT,
    )
    assert not errors, errors
    with qtbot.captureExceptions() as exceptions:
        _close(viewer, widget, how)
        qtbot.waitUntil(lambda: seen["finished"], timeout=TIMEOUT)
    assert not exceptions, exceptions
    assert not errors, errors
    steps = [e.step for e in widget.events if isinstance(e, TrainStep)]
    assert steps[-1] < 10_000  # stopped, not run to the end
    assert not widget.running
    if how == "viewer":
        # napari's window cancels the tasks it started (``cancel_all``: worker.quit()) before
        # the dock learns of the close: the run is aborted, like any napari worker
        assert seen["aborted"] or any(isinstance(e, Finished) for e in widget.events)
        return
    # the dock's close button asks the run to stop as Stop does: it saves a checkpoint first
    fin = [e for e in widget.events if isinstance(e, Finished)]
    assert fin, ([type(e).__name__ for e in widget.events[-5:]], seen)
    assert fin[-1].stopped and fin[-1].summary["steps"] == steps[-1]
    assert load_checkpoint(out).config.stains  # the work so far was saved, and loads
    assert out.resolve() in recent_models()  # and is offered by the staining docks
