"""The napari window of ``staindiffuser demo``: both samples, both docks, the demo's results.

:func:`launch_demo` opens a viewer with the SYNTHETIC paired slide and, to its right, the real
CMU-1-Small-Region H&E; adds the "Virtual staining" and "Coarse masks" docks through npe2 (as
Plugins > StainDiffuser does; the mask dock set to the synthetic CD3 IHC, its live preview off);
and, given the report of :func:`~napari_staindiffuser.demo.run_demo`, opens the OME-TIFFs the
headless demo wrote, each placed over the region of the sample it was stained from. ``demo.py``
imports this module only when a display and a Qt binding are there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._common import OUTPUT_KEY

__all__ = ["PLUGIN", "launch_demo"]

PLUGIN = "napari-staindiffuser"
STAIN_DOCK = "Virtual staining"
MASK_DOCK = "Coarse masks"
TRAIN_DOCK = "Training"
SYNTHETIC_HE = "SYNTHETIC H&E"
SYNTHETIC_CD3_IHC = "SYNTHETIC CD3 IHC"
#: gap between the synthetic slide and CMU-1, in world units (µm)
GAP_UM = 100.0


def launch_demo(result: dict | str | Path | None = None, *, run: bool = True) -> Any:
    """Open the demo in napari and return the viewer.

    Parameters
    ----------
    result : dict, path or None
        The report :func:`~napari_staindiffuser.demo.run_demo` returned, or the path of its
        ``demo_report.json``. Its virtual stains (RGB) and masks (labels) are opened with the
        plugin's reader and placed over the regions they come from; only the virtual CD3 layers
        are visible at first. None opens the samples and the docks only.
    run : bool
        Start napari's event loop (``napari.run()``), which returns when the window is closed.
    """
    import napari

    viewer = napari.Viewer(title="StainDiffuser demo")
    viewer.open_sample(PLUGIN, "synthetic-pair")
    viewer.open_sample(PLUGIN, "cmu-1-small-region")
    synthetic = viewer.layers[SYNTHETIC_HE]
    cmu = next(ly for ly in viewer.layers if ly.name.startswith("CMU-1"))
    # side by side in µm: CMU-1 to the right of the synthetic slide, not on top of it
    right = float(synthetic.extent.world[1][-1])
    cmu.translate = (0.0, right + GAP_UM)
    if result is not None:
        report = _read_report(result)
        _add_results(viewer, report.get("synthetic", {}).get("files", {}), synthetic)
        _add_results(viewer, report.get("svs", {}).get("files", {}), cmu)
    _, masks = viewer.window.add_plugin_dock_widget(PLUGIN, MASK_DOCK)
    viewer.window.add_plugin_dock_widget(PLUGIN, TRAIN_DOCK, tabify=True)
    # added last, as a tab over the others: the staining dock is the tab in front
    viewer.window.add_plugin_dock_widget(PLUGIN, STAIN_DOCK, tabify=True)
    # the live preview would draw a layer over the H&E at once: the user ticks it when needed
    masks._live.value = False
    ihc = viewer.layers[SYNTHETIC_CD3_IHC]
    if ihc in list(masks._ihc.choices):
        masks._ihc.value = ihc  # masks come from IHC, not from the H&E the dock lists first
    viewer.layers.selection.active = synthetic
    viewer.reset_view()
    if run:
        napari.run()
    return viewer


def _read_report(result: dict | str | Path) -> dict:
    if isinstance(result, dict):
        return result
    path = Path(result)
    if path.is_dir():
        path = path / "demo_report.json"
    return json.loads(path.read_text())


def _add_results(viewer: Any, files: dict, source: Any) -> list:
    """Open ``{stain: {"virtual": path, "mask": path, ...}}`` over ``source`` (a sample layer)."""
    added = []
    for stain, paths in files.items():
        for kind, path in paths.items():
            if not Path(path).is_file():
                continue
            for layer in viewer.open(path, plugin=PLUGIN):
                _place(layer, source)
                layer.name = f"demo {kind} {stain} ({source.name})"
                layer.visible = kind == "virtual" and stain == "CD3"
                layer.metadata = {**layer.metadata, OUTPUT_KEY: True}
                added.append(layer)
    return added


def _place(layer: Any, source: Any) -> None:
    """Translate ``layer`` (a region the demo stained) onto that region of ``source``.

    The provenance of the demo's files gives the region as ``region_level0_xywh`` in level-0
    pixels of the slide; the reader has already scaled the layer in µm.
    """
    region = layer.metadata.get("provenance", {}).get("region_level0_xywh")
    if not region:
        return
    x, y = float(region[0]), float(region[1])
    sy, sx = (float(s) for s in source.scale[-2:])
    ty, tx = (float(t) for t in source.translate[-2:])
    layer.translate = (ty + y * sy, tx + x * sx)
