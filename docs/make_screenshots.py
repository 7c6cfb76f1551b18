"""Make the screenshots of docs/user-guide.md (docs/images/*.png) with a real napari window.

    xvfb-run -a .venv/bin/python docs/make_screenshots.py      # on a machine without a display
    python docs/make_screenshots.py                             # on a desktop

It opens the SYNTHETIC paired sample, uses the "Virtual staining" and "Coarse masks" docks as a
user would (through their widgets, with the bundled model) and writes:

1. ``stain-side-by-side.png``: a rectangle of the synthetic H&E stained with the dock, then that
   rectangle of the H&E, the virtual CD3 and the virtual CK8/18 side by side (napari's grid mode;
   the H&E panel is a plain copy of the rectangle: napari 0.9.2 drew the multiscale H&E at the
   wrong zoom in its grid cell);
2. ``stain-dock-mid-run.png``: the dock while it stains a larger rectangle (tiles appear as they
   finish), taken after some tiles, then the run is cancelled;
3. ``mask-dock.png``: the Coarse masks dock with its live preview over the synthetic CD3 IHC.

Each PNG is at most 1400 px wide, and a palette of fewer colours keeps it under 400 KB.
About two minutes on 2 CPU cores. Everything shown is SYNTHETIC tissue and the bundled model,
which was trained on synthetic tissue only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "images"
PLUGIN = "napari-staindiffuser"
WINDOW = (1600, 1000)  # downscaled to MAX_WIDTH: the canvas keeps room beside the docks
DOCK_WIDTH = 430
MAX_WIDTH = 1400
MAX_BYTES = 400_000
#: the stained rectangle of screenshot 1, level-0 px (y, x, h, w) of the synthetic sample
#: (0.5 µm/px): the demo's region, which holds glands (CK8/18) and T cells (CD3)
REGION = (128, 128, 512, 512)
#: the larger rectangle of screenshots 2 and 3: all tissue, 9 % CD3+ and 6 % CK8/18+ pixels
#: (121 tiles; the run is cancelled after MID_RUN_TILES)
BIG_REGION = (2944, 896, 1024, 1024)
MID_RUN_TILES = 16


def process(seconds: float = 0.0) -> None:
    """Run Qt's event loop for ``seconds`` (at least one pass)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while True:
        QApplication.processEvents()
        if time.perf_counter() >= end:
            return
        time.sleep(0.02)


def wait(condition, timeout: float, what: str) -> None:
    start = time.perf_counter()
    while not condition():
        process(0.05)
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def save(image: np.ndarray, name: str) -> Path:
    """Write a screenshot at most MAX_WIDTH wide and, when it can, under MAX_BYTES: full colour
    if that is small enough, else a palette of 256, 128 or 64 colours, else narrower."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    width = min(im.width, MAX_WIDTH)
    while True:
        scaled = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        for colours in (None, 256, 128, 64):
            out = scaled
            if colours is not None:
                out = scaled.quantize(colours, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            out.save(path, optimize=True)
            if path.stat().st_size <= MAX_BYTES:
                break
        if path.stat().st_size <= MAX_BYTES or width <= 800:
            break
        width = round(width * 0.9)
    kind = "full colour" if colours is None else f"{colours} colours"
    size = path.stat().st_size / 1000
    print(f"{path.name}: {out.width} x {out.height} px, {kind}, {size:.0f} KB")
    return path


def grid_model(viewer):
    """napari's grid settings (``viewer.canvas.grid`` since 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def tissue_fraction(box) -> float:
    """Fraction of tissue (not glass or lumen) in ``box`` of the synthetic sample, from a render
    at 4 µm/px (cheap). ``SyntheticSlide.tissue_fraction`` counts lumens as tissue."""
    from napari_staindiffuser.stain import tissue_mask
    from napari_staindiffuser.synthetic import SyntheticSlide

    coarse = SyntheticSlide(20261128, (512, 512), 4.0)  # the sample at 1/8 of its level 0
    y, x, h, w = (v // 8 for v in box)
    return float(tissue_mask(coarse.render(y, x, h, w).he).mean())


def dismiss_notifications(viewer) -> None:
    """Close the notification pop-ups, so that they do not cover the canvas."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


def narrow_docks(viewer, *docks) -> None:
    from qtpy.QtCore import Qt

    qt_window = viewer.window._qt_window
    qt_window.resizeDocks(list(docks), [DOCK_WIDTH] * len(docks), Qt.Orientation.Horizontal)


def viewbox_width(viewer) -> float:
    """Screen pixels across one view (one grid cell when the grid is on)."""
    canvas = getattr(viewer, "canvas", None)
    if canvas is not None and hasattr(canvas, "viewbox_size"):  # napari >= 0.6
        return float(canvas.viewbox_size(viewer.layers)[1])
    width = float(viewer._canvas_size[1])
    grid = grid_model(viewer)
    return width / grid.actual_shape(len(viewer.layers))[1] if grid.enabled else width


def rectangle(viewer, box, name: str):
    """A Shapes layer with one rectangle over ``box`` (level-0 px of the synthetic sample)."""
    he = viewer.layers["SYNTHETIC H&E"]
    y, x, h, w = box
    (y0, x0), (y1, x1) = he.data_to_world((y, x))[-2:], he.data_to_world((y + h, x + w))[-2:]
    units = getattr(he, "units", None)  # same units as the image: napari warns otherwise
    return viewer.add_shapes(
        [np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])],
        shape_type="rectangle",
        edge_color="yellow",
        edge_width=4,
        face_color="transparent",
        name=name,
        **({"units": tuple(str(u) for u in units[-2:])} if units is not None else {}),
    )


def look_at(viewer, box, fill: float = 0.9) -> None:
    """Centre the camera on ``box`` (level-0 px) so that it fills ``fill`` of the view."""
    from napari_staindiffuser._widgets._common import camera

    he = viewer.layers["SYNTHETIC H&E"]
    y, x, h, w = box
    centre = np.asarray(he.data_to_world((y + h / 2, x + w / 2)))[-2:]
    size = float(he.scale[-1]) * max(h, w)
    cam = camera(viewer)
    cam.center = tuple(centre)
    cam.zoom = fill * viewbox_width(viewer) / size


def stain(widget, shapes, timeout: float, stop_after: int | None = None) -> float:
    """Stain the rectangles of ``shapes`` with the dock; returns the seconds it took."""
    from napari_staindiffuser._widgets._stain_dock import REGION_SHAPES

    widget._region.value = REGION_SHAPES
    widget._shapes.value = shapes
    widget.confirm = lambda question: True  # a long run asks first: answer yes
    start = time.perf_counter()
    seen = widget.tiles_seen
    assert widget.run() is not None, "the staining dock refused to start"
    if stop_after is None:
        wait(lambda: not widget.running, timeout, "the staining run")
    else:
        wait(
            lambda: widget.tiles_seen - seen >= stop_after or not widget.running,
            timeout,
            f"{stop_after} tiles",
        )
    return time.perf_counter() - start


def main() -> int:
    import napari

    t_start, cpu_start = time.perf_counter(), time.process_time()
    for box in (REGION, BIG_REGION):
        frac = tissue_fraction(box)
        assert frac > 0.9, f"the region {box} holds only {frac:.0%} tissue"

    viewer = napari.Viewer(title="napari-staindiffuser", show=True)
    viewer.window.resize(*WINDOW)
    viewer.open_sample(PLUGIN, "synthetic-pair")
    stain_dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Virtual staining")
    narrow_docks(viewer, stain_dock)
    process(1.0)

    # 1. H&E, virtual CD3 and virtual CK8/18 side by side
    shapes = rectangle(viewer, REGION, "regions")
    widget._steps.value = 20
    widget._level.value = -1  # auto: level 1, the model's 1 µm/px
    look_at(viewer, REGION)
    process(1.0)
    cpu = time.process_time()
    took = stain(widget, shapes, timeout=600)
    print(
        f"stained {REGION[2]} x {REGION[3]} level-0 px ({widget.tiles_seen} tiles) in "
        f"{took:.1f} s ({time.process_time() - cpu:.0f} CPU s); status: {widget._status.value}"
    )
    he = viewer.layers["SYNTHETIC H&E"]
    cd3, ck = (
        viewer.layers["virtual CD3 (SYNTHETIC H&E)"],
        viewer.layers["virtual CK8/18 (SYNTHETIC H&E)"],
    )
    y, x, h, w = REGION
    crop = viewer.add_image(  # the stained rectangle of the H&E, as one plain layer
        np.asarray(he.data[0][y : y + h, x : x + w]),
        rgb=True,
        name="SYNTHETIC H&E (stained rectangle)",
        scale=he.scale,
        translate=tuple(np.asarray(he.data_to_world((y, x)))[-2:]),
        **({"units": he.units} if getattr(he, "units", None) is not None else {}),
    )
    for layer in (ck, cd3, crop):  # to the top, in turn: crop, CD3, CK8/18 from the top down
        viewer.layers.move(viewer.layers.index(layer), len(viewer.layers))
    for layer in viewer.layers:
        layer.visible = layer in (crop, cd3, ck)
    grid = grid_model(viewer)
    grid.stride = -1  # napari 0.9: the top layer goes left with a negative stride
    grid.shape = (1, 3)
    grid.spacing = 8
    grid.enabled = True
    viewer.layers.selection.active = cd3
    process(0.5)
    look_at(viewer, REGION, 1.0)
    dismiss_notifications(viewer)
    process(2.0)
    save(viewer.screenshot(canvas_only=False), "stain-side-by-side.png")

    # 2. the dock mid-run: tiles appear as they finish
    grid.enabled = False
    viewer.layers.remove(crop)
    for layer in viewer.layers:
        layer.visible = layer.name == "SYNTHETIC H&E"
    viewer.layers.remove(shapes)
    big = rectangle(viewer, BIG_REGION, "regions")
    look_at(viewer, BIG_REGION)
    process(2.0)
    seen = widget.tiles_seen
    took = stain(widget, big, timeout=600, stop_after=MID_RUN_TILES)
    print(
        f"mid-run: {widget.tiles_seen - seen} tiles after {took:.1f} s; "
        f"status: {widget._status.value}"
    )
    for name in ("virtual CD3 (SYNTHETIC H&E)", "CD3+ cells (SYNTHETIC H&E)"):
        viewer.layers[name].visible = True
    viewer.layers.selection.active = viewer.layers["virtual CD3 (SYNTHETIC H&E)"]
    dismiss_notifications(viewer)
    process(1.0)
    save(viewer.screenshot(canvas_only=False), "stain-dock-mid-run.png")
    widget.cancel()
    wait(lambda: not widget.running, 120, "the cancelled run to stop")
    print(f"cancelled: {widget._status.value}")

    # 3. the Coarse masks dock over the synthetic CD3 IHC
    stain_dock.setVisible(False)
    for layer in list(viewer.layers):
        if layer.name.startswith(("virtual", "CD3+", "CK8/18+", "uncertainty", "regions")):
            viewer.layers.remove(layer)
    for layer in viewer.layers:
        layer.visible = layer.name == "SYNTHETIC CD3 IHC"
    mask_dock, masks = viewer.window.add_plugin_dock_widget(PLUGIN, "Coarse masks")
    narrow_docks(viewer, mask_dock)
    masks._ihc.value = viewer.layers["SYNTHETIC CD3 IHC"]
    look_at(viewer, BIG_REGION, 0.6)
    process(1.0)
    preview = "mask preview (SYNTHETIC CD3 IHC)"
    wait(
        lambda: preview in viewer.layers and masks._status.value.startswith("preview"),
        300,
        "the mask preview",
    )
    viewer.layers.selection.active = viewer.layers[preview]
    dismiss_notifications(viewer)
    process(2.0)
    save(viewer.screenshot(canvas_only=False), "mask-dock.png")

    # 4. the Training dock mid-run: regions, registration, loss curves, validation preview
    import tempfile

    from napari_staindiffuser.events import TrainStep, Validation

    masks._live.value = False
    mask_dock.setVisible(False)
    for layer in list(viewer.layers):
        if layer.name.startswith(("mask preview", "coarse mask", "DAB")):
            viewer.layers.remove(layer)
    for layer in viewer.layers:
        layer.visible = layer.name == "SYNTHETIC H&E"
    train_dock, trainer = viewer.window.add_plugin_dock_widget(PLUGIN, "Training")
    narrow_docks(viewer, train_dock)
    by, bx = BIG_REGION[:2]
    regions = rectangle(viewer, REGION, "training regions")
    val = [he.data_to_world(p)[-2:] for p in ((by, bx), (by + 256, bx + 256))]
    regions.add_rectangles(np.array(val), edge_color="cyan")  # the last one validates
    trainer._he.value = he
    trainer._ihc.value = viewer.layers["SYNTHETIC CD3 IHC"]
    trainer._shapes.value = regions
    trainer._stain.value = "CD3"
    trainer._steps.value = 200
    trainer._batch.value = 4
    trainer._val_every.value = 15
    trainer._ckpt_every.value = 0
    trainer._out.value = Path(tempfile.mkdtemp()) / "finetuned-cd3.safetensors"
    trainer.ask_correct = lambda regions: False
    reg_worker = trainer.check_registration()
    wait(lambda: reg_worker is None or len(trainer.registrations) == 2, 120, "registration")
    trainer.start()
    wait(
        lambda: (
            sum(isinstance(e, Validation) for e in trainer.events) >= 2
            and any(isinstance(e, TrainStep) and e.step >= 30 for e in trainer.events)
        ),
        900,
        "two validations",
    )
    preview = "preview virtual CD3 (SYNTHETIC H&E)"
    for layer in viewer.layers:
        layer.visible = layer.name in ("SYNTHETIC H&E", preview, "training regions")
    look_at(viewer, (by, bx, 256, 256), 0.9)
    viewer.layers.selection.active = viewer.layers[preview]
    dismiss_notifications(viewer)
    process(2.0)
    save(viewer.screenshot(canvas_only=False), "train-dock.png")
    trainer.stop()
    wait(lambda: not trainer.running, 300, "training to stop")
    print(f"training: {trainer._status.value}")

    viewer.close()
    print(
        f"done in {time.perf_counter() - t_start:.0f} s "
        f"({time.process_time() - cpu_start:.0f} CPU s in this process)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
