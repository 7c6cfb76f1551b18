"""What the docks share: layer geometry (levels, µm/px, regions, aligned outputs) and errors.

Everything that maps between napari's world and the arrays the core works on lives here, so the
workers only ever see arrays, boxes and numbers. Boxes are ``(y, x, h, w)`` in pixels of one
pyramid level of a layer's data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "OUTPUT_KEY",
    "add_or_replace",
    "camera",
    "choose_level",
    "error_message",
    "image_levels",
]
__all__ += ["layer_mpp", "level_box", "notify_error", "placed_like", "shape_boxes"]
__all__ += ["visible_box"]

#: metadata key that marks a layer made by one of our docks (it may be replaced by a rerun)
OUTPUT_KEY = "staindiffuser_output"

Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------- levels and scale


def image_levels(layer: Any) -> list[Any]:
    """The data of an image or labels layer as a list of levels (level 0 first)."""
    return list(layer.data) if getattr(layer, "multiscale", False) else [layer.data]


def level_downsample(layer: Any, level: int) -> tuple[float, float]:
    """Level-0 pixels per pixel of ``level``, along y and x."""
    levels = image_levels(layer)
    (h0, w0), (h, w) = levels[0].shape[:2], levels[level].shape[:2]
    return h0 / h, w0 / w


def _um_per_unit(unit: Any) -> float | None:
    """µm per ``unit`` (a pint unit or its name), or None when it is not a length."""
    if unit is None:
        return None
    try:
        import pint

        reg = pint.get_application_registry()
        q = reg.Quantity(1.0, unit)
        if q.dimensionality != reg.Quantity(1.0, "m").dimensionality:
            return None
        return float(q.to("micrometer").magnitude)
    except Exception:
        return None


def layer_mpp(layer: Any) -> float | None:
    """µm per level-0 pixel of a layer, or None when it is unknown.

    From the layer's scale when its ``units`` are a length (napari >= 0.6), else from
    ``metadata["mpp"]`` (set by our reader and sample data).
    """
    units = getattr(layer, "units", None)
    um = _um_per_unit(units[-1] if units else None)
    sy, sx = (float(s) for s in layer.scale[-2:])
    unknown = sy == sx == 1.0 and layer.metadata.get("mpp", 0) is None  # reader: no pixel size
    if um is not None and not unknown and math.isclose(sy, sx, rel_tol=1e-3):
        return sx * um
    mpp = layer.metadata.get("mpp")
    if isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0:
        return float(mpp)
    return None


def choose_level(layer: Any, target_mpp: float | None) -> int:
    """The coarsest level whose µm/px is at most ``target_mpp`` (1 % slack), so the model never
    works on upsampled pixels; level 0 when the pixel size is unknown."""
    mpp0 = layer_mpp(layer)
    n = len(image_levels(layer))
    if mpp0 is None or target_mpp is None or n == 1:
        return 0
    best = 0
    for k in range(n):
        if mpp0 * max(level_downsample(layer, k)) <= target_mpp * 1.01:
            best = k
    return best


def level_box(box0: Sequence[float], layer: Any, level: int) -> Box:
    """A level-0 box ``(y, x, h, w)`` (floats allowed) as whole pixels of ``level``, covering it
    and clipped to that level."""
    dy, dx = level_downsample(layer, level)
    h, w = image_levels(layer)[level].shape[:2]
    y, x, bh, bw = box0
    y0, x0 = max(0, math.floor(y / dy)), max(0, math.floor(x / dx))
    y1, x1 = min(h, math.ceil((y + bh) / dy)), min(w, math.ceil((x + bw) / dx))
    return y0, x0, max(0, y1 - y0), max(0, x1 - x0)


def placed_like(layer: Any, level: int, box: Box) -> dict[str, Any]:
    """Layer keyword arguments that put an array of ``box`` (pixels of ``level``) exactly over
    that region of ``layer``: scale, translate, and the layer's affine and units.

    napari draws pixel ``i`` of level ``k`` at level-0 data coordinate ``i * downsample``; the
    output uses the same convention, so it lines up with what napari shows for the layer.
    """
    dy, dx = level_downsample(layer, level)
    sy, sx = (float(s) for s in layer.scale[-2:])
    ty, tx = (float(t) for t in layer.translate[-2:])
    kwargs: dict[str, Any] = {
        "scale": (sy * dy, sx * dx),
        "translate": (ty + box[0] * dy * sy, tx + box[1] * dx * sx),
        "affine": np.asarray(layer.affine.affine_matrix)[-3:, -3:],
    }
    units = getattr(layer, "units", None)
    if units is not None:
        kwargs["units"] = tuple(str(u) for u in units[-2:])
    return kwargs


# --------------------------------------------------------------------------- regions


def _clip_box(y0: float, x0: float, y1: float, x1: float, shape: Sequence[int]) -> Box | None:
    h, w = shape[:2]
    y0, x0 = max(0, math.floor(y0)), max(0, math.floor(x0))
    y1, x1 = min(h, math.ceil(y1)), min(w, math.ceil(x1))
    if y1 <= y0 or x1 <= x0:
        return None
    return y0, x0, y1 - y0, x1 - x0


def _world_box_to_data(layer: Any, corners_world: np.ndarray) -> Box | None:
    """Bounding box in level-0 data pixels of the world points ``corners_world`` (N, ndim)."""
    pts = np.array([layer.world_to_data(p) for p in corners_world], float)[:, -2:]
    lo, hi = pts.min(0), pts.max(0)
    return _clip_box(lo[0], lo[1], hi[0], hi[1], image_levels(layer)[0].shape)


def visible_box(viewer: Any, layer: Any) -> Box:
    """The part of ``layer`` in the current field of view, in level-0 pixels.

    Raises ValueError when the layer is not in view (panned away) or the view is 3-D.
    """
    if viewer.dims.ndisplay != 2:
        raise ValueError("the field of view needs the 2-D view: switch napari to 2-D")
    canvas = getattr(viewer, "canvas", None)
    if canvas is not None and hasattr(canvas, "viewbox_size"):  # napari >= 0.6
        size = np.asarray(canvas.viewbox_size(viewer.layers), float)  # (h, w) screen px
    else:
        size = np.asarray(viewer._canvas_size, float)
    cam = camera(viewer)
    centre = np.asarray(cam.center, float)[-2:]
    half = size / 2.0 / float(cam.zoom)
    world_dims = len(viewer.dims.point)
    corners = []
    for dy in (-1, 1):
        for dx in (-1, 1):
            p = np.asarray(viewer.dims.point, float).copy()
            p[world_dims - 2 :] = centre + np.array([dy, dx]) * half
            corners.append(p[-layer.ndim :])
    box = _world_box_to_data(layer, np.array(corners))
    if box is None:
        raise ValueError(
            f"'{layer.name}' is not in the field of view: pan or zoom to the tissue, or "
            "choose another region mode"
        )
    return box


def camera(viewer: Any) -> Any:
    """The camera model (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def shape_boxes(shapes: Any, layer: Any) -> list[Box]:
    """Bounding boxes, in level-0 pixels of ``layer``, of each shape of a Shapes layer.

    Rectangles give themselves; other shapes give their bounding rectangle. Shapes that miss the
    image are left out.

    Raises ValueError when the Shapes layer is empty or no shape touches the image.
    """
    if len(shapes.data) == 0:
        raise ValueError(
            f"the Shapes layer '{shapes.name}' has no shapes: draw rectangles over the regions "
            "to stain"
        )
    out = []
    for verts in shapes.data:
        world = np.array([shapes.data_to_world(v) for v in np.asarray(verts, float)])
        box = _world_box_to_data(layer, world[:, -layer.ndim :])
        if box is not None:
            out.append(box)
    if not out:
        raise ValueError(
            f"no shape of '{shapes.name}' lies on '{layer.name}': draw the rectangles over "
            "the image"
        )
    return out


# --------------------------------------------------------------------------- layers


def is_layer(layer: Any, kind: str) -> bool:
    """Whether ``layer`` is a napari layer of ``kind`` ("image", "labels", "shapes")."""
    from napari import layers

    return isinstance(
        layer, {"image": layers.Image, "labels": layers.Labels, "shapes": layers.Shapes}[kind]
    )


def layer_choices(viewer: Any, kind: str, *, rgb: bool = False, ours: bool = True) -> list:
    """``(name, layer)`` of the viewer's layers of ``kind`` (for a ComboBox); ``rgb``: RGB
    images only; ``ours=False`` leaves out the layers our docks made."""
    return [
        (layer.name, layer)
        for layer in viewer.layers
        if is_layer(layer, kind)
        and (not rgb or getattr(layer, "rgb", False))
        and (ours or not layer.metadata.get(OUTPUT_KEY))
    ]


def add_or_replace(viewer: Any, data: Any, kind: str, name: str, **kwargs: Any) -> Any:
    """Add a layer, or update in place the layer of that name made by an earlier run.

    A layer with that name that the user made (no ``OUTPUT_KEY`` in its metadata) is never
    touched: the new layer gets napari's unique-name suffix instead.
    """
    meta = dict(kwargs.pop("metadata", {}))
    meta[OUTPUT_KEY] = True
    if name in viewer.layers:
        old = viewer.layers[name]
        if old.metadata.get(OUTPUT_KEY) and is_layer(old, kind) and old.ndim == 2:
            old.data = data
            for key in ("scale", "translate", "affine", "units"):
                if key in kwargs:
                    setattr(old, key, kwargs[key])
            old.metadata = meta
            for key in ("colormap", "opacity", "contrast_limits", "visible", "blending"):
                if key in kwargs:
                    setattr(old, key, kwargs[key])
            return old
    add = {"image": viewer.add_image, "labels": viewer.add_labels}[kind]
    return add(data, name=name, metadata=meta, **kwargs)


# --------------------------------------------------------------------------- errors

_HINTS = (
    ("out of memory", "Out of memory: stain a smaller region, lower the batch, or use the CPU."),
    ("CUDA", "Pick another device (auto or cpu) in the dock."),
    ("not a readable safetensors", "Pick a checkpoint written by napari-staindiffuser."),
    ("no tissue", "Pan to tissue, or draw the rectangles over tissue."),
)


def error_message(exc: BaseException, action: str) -> str:
    """One message for a notification: what failed, why, and what to do about it."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__:
        text = f"out of memory ({text})"
    hint = next((h for key, h in _HINTS if key.lower() in text.lower()), "")
    if not hint and not isinstance(exc, (ValueError, TypeError, FileNotFoundError)):
        hint = "This looks like a bug: please report it with the message above."
    return f"{action} failed: {text}" + (f"\n{hint}" if hint else "")


def notify_error(exc: BaseException, action: str) -> str:
    """Show :func:`error_message` as a napari error notification; returns the message."""
    from napari.utils.notifications import show_error

    msg = error_message(exc, action)
    show_error(msg)
    return msg


def format_seconds(seconds: float | None) -> str:
    """A duration for people: "42 s", "3 min 05 s", "2 h 10 min"; "?" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"
