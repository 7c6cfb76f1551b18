"""napari writers: RGB image and labels layers to tiled, pyramidal OME-TIFF.

Both go through :func:`napari_staindiffuser.io.write_ome_tiff` (streamed one row of chunks at a
time, atomic). The pixel size comes from the layer's scale (µm; converted from the layer's
``units`` when they are another length unit), the position from its ``translate`` (OME
``Plane/@PositionY``, ``@PositionX``: a region stained over an H&E opens where it was, see
``io.ome_origin``), and the provenance from the layer metadata's
``"provenance"`` (its JSON-serialisable parts), plus ``layer_type`` and ``layer_name`` so that
the reader gives the same kind of layer back. Multiscale layers write their level 0 (the writer
builds its own pyramid). See ``docs/napari.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EXTENSIONS", "write_image", "write_labels"]

EXTENSIONS = (".ome.tif", ".ome.tiff", ".tif", ".tiff")


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Write one RGB uint8 image layer (``(H, W, 3)``; RGBA drops alpha) to OME-TIFF."""
    img = _level0(data, meta)
    shape, dtype = tuple(img.shape), np.dtype(img.dtype)
    if img.ndim == 3 and shape[2] == 4 and dtype == np.uint8:
        img = img[..., :3]
    elif not (img.ndim == 3 and shape[2] == 3 and dtype == np.uint8):
        raise ValueError(
            f"{meta.get('name', 'layer')}: only RGB uint8 image layers (H, W, 3) can be saved as "
            f"OME-TIFF by napari-staindiffuser; got shape {shape} {dtype}"
        )
    return _write(path, img, meta, "image")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one 2-D labels layer (integer ids, kept exactly) to OME-TIFF."""
    img = _level0(data, meta)
    if img.ndim != 2:
        raise ValueError(
            f"{meta.get('name', 'layer')}: only 2-D labels layers can be saved as OME-TIFF by "
            f"napari-staindiffuser; got shape {tuple(img.shape)}"
        )
    return _write(path, img, meta, "labels")


def _level0(data: Any, meta: dict) -> Any:
    if meta.get("multiscale"):
        data = data[0]
    if not hasattr(data, "shape"):
        data = np.asarray(data)
    return data


def _write(path: str, img: Any, meta: dict, layer_type: str) -> list[str]:
    from napari_staindiffuser.io import write_ome_tiff

    out = Path(path)
    if not out.name.lower().endswith(EXTENSIONS):
        raise ValueError(f"{out}: the file name must end in {', '.join(EXTENSIONS)}")
    layer_meta = meta.get("metadata") or {}
    prov = _json_safe(layer_meta.get("provenance") or {})
    prov = prov if isinstance(prov, dict) else {}
    if layer_meta.get("synthetic") is True:
        prov["synthetic"] = True
    prov["layer_type"] = layer_type
    prov["layer_name"] = str(meta.get("name", out.name))
    if isinstance(layer_meta.get("path"), str):
        prov.setdefault("source", layer_meta["path"])
    mpp = _mpp(meta)
    write_ome_tiff(out, img, mpp=mpp, metadata=prov, origin=_origin(meta, mpp))
    return [str(out)]


def _mpp(meta: dict) -> float | None:
    """µm per pixel from the layer's scale; None when the reader marked the size unknown."""
    scale = [float(s) for s in (meta.get("scale") if meta.get("scale") is not None else (1, 1))]
    sy, sx = scale[-2:]
    layer_meta = meta.get("metadata") or {}
    if "mpp" in layer_meta and layer_meta["mpp"] is None and sy == sx == 1.0:
        return None  # read from a file without a pixel size and never given one
    if not math.isclose(sy, sx, rel_tol=1e-6):
        raise ValueError(f"OME-TIFF needs square pixels; the layer's scale is ({sy:g}, {sx:g})")
    return sx * _um_per_unit((meta.get("units") or (None,))[-1])


def _origin(meta: dict, mpp: float | None) -> tuple[float, float] | None:
    """The layer's translate (y, x) in the units of :func:`write_ome_tiff`'s ``origin``: µm
    (converted like the scale), or pixels when the pixel size is unknown; None at (0, 0)."""
    translate = meta.get("translate")
    if translate is None:
        return None
    ty, tx = (float(t) for t in list(translate)[-2:])
    if ty == tx == 0.0:
        return None
    if mpp is None:  # scale (1, 1) in unknown units: the translate is in pixels
        return ty, tx
    units = list(meta.get("units") or (None, None))[-2:]
    return ty * _um_per_unit(units[0]), tx * _um_per_unit(units[-1])


def _um_per_unit(unit: Any) -> float:
    """Micrometres per ``unit`` (a pint unit or its name); 1 for pixels/unknown/no unit."""
    if unit is None:
        return 1.0
    try:
        import pint

        q = pint.get_application_registry().Quantity(1.0, unit)
        if q.dimensionality != pint.get_application_registry().Quantity(1.0, "m").dimensionality:
            return 1.0
        return float(q.to("micrometer").magnitude)
    except Exception:
        return 1.0


def _json_safe(value: Any) -> Any:
    """The JSON-serialisable parts of ``value`` (other entries dropped; numpy scalars kept)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            safe = _json_safe(v)
            if isinstance(k, str) and (safe is not None or v is None):
                out[k] = safe
        return out
    if isinstance(value, (list, tuple)):
        items = [_json_safe(v) for v in value]
        return [s for s, v in zip(items, value, strict=True) if s is not None or v is None]
    return None
