"""The Virtual staining dock's output layers: created empty before a run, filled tile by tile,
finished per region, flagged when a run stops early; and the counts table.

Functions of layers and events only (no widget state), called from ``_stain_dock.StainWidget``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import add_or_replace, placed_like

__all__ = ["COUNT_COLUMNS", "counts_table", "counts_tsv", "create_layers", "finish_region"]
__all__ += ["layer_names", "mark_partial", "paste_tile"]

COUNT_COLUMNS = ("region", "stain", "positive objects", "positive area %", "tissue mm²")
COUNT_COLUMNS += ("objects per mm² tissue", "µm/px")


def layer_names(he_name: str, index: int, stain: str, several: bool) -> dict[str, str]:
    """The output layers' names for region ``index`` (suffixed ``#n`` when there are several)."""
    suffix = f" #{index + 1}" if several else ""
    return {
        "image": f"virtual {stain} ({he_name}){suffix}",
        "labels": f"{stain}+ cells ({he_name}){suffix}",
        "uncertainty": f"uncertainty {stain} ({he_name}){suffix}",
    }


def create_layers(viewer: Any, job: Any, he: Any, level: int, stained: list[bool]) -> dict:
    """Every output layer of a run, empty (transparent): {(region, stain): {kind: layer}}.

    Adding a layer is napari's slowest step, so it is done before the worker starts, letting the
    event loop run between layers, rather than in the middle of the run."""
    from qtpy.QtWidgets import QApplication

    layers = {}
    meta = {"mpp": job.image_mpp, "provenance": {"status": "running"}}
    for i, box in enumerate(job.boxes):
        if not stained[i]:
            continue
        place = placed_like(he, level, box)
        h, w = box[2], box[3]
        for st in job.stains:
            names = layer_names(he.name, i, st, len(job.boxes) > 1)
            m = {**meta, "stain": st}
            entry = {
                "image": add_or_replace(
                    viewer, np.zeros((h, w, 4), np.uint8), "image", names["image"], rgb=True,
                    metadata=m, **place,
                ),
                "labels": add_or_replace(
                    viewer, np.zeros((h, w), np.int32), "labels", names["labels"], metadata=m,
                    **place,
                ),
            }  # fmt: skip
            if job.samples > 1:
                entry["uncertainty"] = add_or_replace(
                    viewer, np.zeros((h, w), np.float32), "image", names["uncertainty"],
                    colormap="magma", visible=False, metadata=m, **place,
                )  # fmt: skip
            layers[(i, st)] = entry
            QApplication.processEvents()  # let the viewer breathe between layers
    return layers


def paste_tile(layers: dict, region: int, ev: Any) -> set:
    """Paste a finished tile (``inference.TileStained``) into its region's layers; returns the
    layers to refresh."""
    y, x, h, w = ev.box
    dirty = set()
    for st, tile in ev.images.items():
        entry = layers.get((region, st))
        if entry is None:
            continue
        img, lab = entry["image"], entry["labels"]
        img.data[y : y + h, x : x + w, :3] = tile
        img.data[y : y + h, x : x + w, 3] = 255
        lab.data[y : y + h, x : x + w][ev.masks[st]] = 1
        dirty.update((img, lab))
    return dirty


def finish_region(layers: dict, ev: Any, prov: dict, mpp: float | None) -> None:
    """Replace a region's tiles by its blended result (``_stain_worker.RegionDone``), with the
    provenance ``prov``."""
    for st in ev.images:
        entry = layers[(ev.index, st)]
        img, lab = entry["image"], entry["labels"]
        rgba = np.concatenate(
            [ev.images[st], np.full((*ev.images[st].shape[:2], 1), 255, np.uint8)], -1
        )
        meta = {"stain": st, "mpp": mpp, "provenance": {**prov, "content": f"virtual {st}"}}
        img.data, img.metadata = rgba, {**img.metadata, **meta}
        lab.data = ev.labels[st]
        lab.metadata = {
            **lab.metadata,
            **meta,
            "provenance": {**prov, "content": f"{st}+ cells (connected components)"},
        }
        if "uncertainty" in entry and st in ev.uncertainty:
            unc = entry["uncertainty"]
            unc.data = ev.uncertainty[st].astype(np.float32)
            unc.contrast_limits = (0.0, max(float(unc.data.max()), 1e-3))
            unc.metadata = {
                **unc.metadata,
                **meta,
                "provenance": {**prov, "content": "std across samples (0-255 units)"},
            }


def mark_partial(layers: dict, status: str) -> None:
    """Flag the layers of unfinished regions (provenance ``status``: cancelled, failed)."""
    for entry in layers.values():
        for layer in entry.values():
            prov = dict(layer.metadata.get("provenance", {}))
            if prov.get("status") == "running":
                prov["status"] = status
                layer.metadata = {**layer.metadata, "provenance": prov}
                layer.refresh()


def counts_table(rows: list[dict]) -> dict:
    """The counts rows as a magicgui Table value."""
    data = [[r[c] if r[c] is not None else "n/a" for c in COUNT_COLUMNS] for r in rows]
    return {"data": data, "index": list(range(len(data))), "columns": list(COUNT_COLUMNS)}


def counts_tsv(rows: list[dict]) -> str:
    """The counts rows as tab-separated text."""
    lines = ["\t".join(COUNT_COLUMNS)]
    for r in rows:
        lines.append("\t".join("" if r[c] is None else str(r[c]) for c in COUNT_COLUMNS))
    return "\n".join(lines) + "\n"
