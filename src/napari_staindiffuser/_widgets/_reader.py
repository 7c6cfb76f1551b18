"""napari reader: H&E slides and napari-staindiffuser OME-TIFFs as lazy layers scaled in µm.

``napari_get_reader(path)`` claims ``*.svs``, ``*.tif``, ``*.tiff`` (including ``*.ome.tif`` and
``*.ome.tiff``), ``*.png``, ``*.jpg`` and ``*.jpeg`` files that hold either

* an RGB image (read by :func:`napari_staindiffuser.io.open_slide`): an ``image`` layer,
  ``rgb=True``, multiscale when the file has more than one usable level, or
* a 2-D integer plane written by napari-staindiffuser (``write_ome_tiff``: masks, labels):
  a ``labels`` layer, or a grayscale ``image`` layer when the provenance says
  ``"layer_type": "image"``.

Other files (grayscale, multichannel or z-stack TIFFs from elsewhere, grayscale PNG, ...) are
left to other readers (``None``). Nothing is read from the pixel data until napari shows it: the
layers hold dask arrays over the file's tiles. A file written by napari-staindiffuser gets its
position back as the layer's ``translate`` (OME ``Plane/@PositionY``, ``@PositionX``, see
``io.ome_origin``); positions in other files (stage coordinates) are not used. See
``docs/napari.md``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import ome_mpp, ome_origin

__all__ = ["SUFFIXES", "napari_get_reader", "read_layers"]

SUFFIXES = (".svs", ".tif", ".tiff", ".png", ".jpg", ".jpeg")  # .ome.tif(f) ends in .tif(f)
UNKNOWN_MPP_NOTE = "pixel size unknown: the layer's scale is 1 pixel per unit, not µm"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPES = (2, 3, 6)  # RGB, palette, RGBA (0 and 4 are grayscale)
_SOFTWARE = "napari-staindiffuser"

LayerData = tuple  # (data, kwargs, layer_type)


def napari_get_reader(path: str | os.PathLike | Sequence) -> Callable | None:
    """Return :func:`read_layers` when every path is a file this plugin reads, else None."""
    paths = _as_paths(path)
    if not paths or any(_classify(p) is None for p in paths):
        return None
    return read_layers


def read_layers(path: str | os.PathLike | Sequence) -> list[LayerData]:
    """Read one file (or each file of a list) as napari LayerData tuples.

    Raises
    ------
    ValueError
        A path is not a file that :func:`napari_get_reader` accepts.
    """
    paths = _as_paths(path)
    if paths is None:
        raise ValueError(f"not a path or a list of paths: {path!r}")
    out = []
    for p in paths:
        kind = _classify(p)
        if kind is None:
            raise ValueError(f"{p}: not an RGB slide or a napari-staindiffuser mask/labels file")
        out.append(_read_rgb(p) if kind == "rgb" else _read_plane(p, kind))
    return out


# ------------------------------------------------------------------------- classification


def _as_paths(path: Any) -> list[Path] | None:
    if isinstance(path, (str, os.PathLike)):
        return [Path(path)]
    if isinstance(path, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in path):
        return [Path(p) for p in path]
    return None


def _classify(p: Path) -> str | None:
    """'rgb', 'labels', 'image' (2-D grayscale of ours) or None (not for this reader)."""
    if not p.name.lower().endswith(SUFFIXES) or not p.is_file():
        return None
    try:
        with open(p, "rb") as fh:
            head = fh.read(26)
    except OSError:
        return None
    if head[:4] in _TIFF_MAGICS:
        return _classify_tiff(p)
    if head[:8] == _PNG_MAGIC:  # IHDR colour type; grayscale PNG is left to other readers
        return "rgb" if len(head) == 26 and head[25] in _PNG_COLOUR_TYPES else None
    if head[:3] == b"\xff\xd8\xff":
        return "rgb"
    return None


def _classify_tiff(p: Path) -> str | None:
    import tifffile

    from napari_staindiffuser.io import open_slide

    try:
        with tifffile.TiffFile(p) as tf:
            if not tf.series or not tf.series[0].shape:
                return None
            series = tf.series[0]
            axes = [
                a for a, n in zip(series.axes, series.shape, strict=True) if n != 1 or a in "YX"
            ]
            plane, kind = axes == ["Y", "X"], np.dtype(series.dtype).kind
            ours = str(tf.pages[0].software or "").startswith(_SOFTWARE)
    except Exception:
        return None
    if plane:
        if kind not in "biu":
            return None
        prov = _provenance(p)
        if not (ours or prov):  # a grayscale/label TIFF from elsewhere: not ours to guess
            return None
        return "image" if str(prov.get("layer_type", "")).lower() == "image" else "labels"
    try:
        open_slide(p).close()
    except (ValueError, OSError):
        return None
    return "rgb"


# -------------------------------------------------------------------------------- reading


def _provenance(p: Path) -> dict:
    from napari_staindiffuser.io import read_provenance

    try:
        prov = read_provenance(p)
    except (ValueError, OSError):
        return {}
    return prov if isinstance(prov, dict) else {}


def _layer_name(p: Path) -> str:
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def _decreasing(levels: list) -> list:
    """Keep the levels that are smaller than the previous kept one in both Y and X."""
    kept = [levels[0]]
    for lvl in levels[1:]:
        if lvl.shape[0] < kept[-1].shape[0] and lvl.shape[1] < kept[-1].shape[1]:
            kept.append(lvl)
    return kept


@functools.cache
def _layers_take_units() -> bool:
    """napari >= 0.6 layers take ``units``; older ones would reject the keyword."""
    import inspect

    try:
        from napari.layers import Image
    except ImportError:  # the reader used without napari (scripts)
        return False
    return "units" in inspect.signature(Image.__init__).parameters


def _spatial_kwargs(mpp: float | None, meta: dict, origin: tuple | None = None) -> dict:
    """scale (µm/px, or 1 when unknown), units, and the translate from ``origin``
    (:func:`~napari_staindiffuser.io.ome_origin`: µm, or pixels times the pixel size)."""
    translate = None
    if origin is not None:
        y, x, unit = origin
        if unit == "pixel":
            translate = (y * (mpp or 1.0), x * (mpp or 1.0))
        elif mpp is not None:  # µm: only meaningful on a layer scaled in µm
            translate = (y, x)
    if mpp is None:
        meta["note"] = UNKNOWN_MPP_NOTE
        kwargs: dict[str, Any] = {"scale": (1.0, 1.0)}
    else:
        kwargs = {"scale": (mpp, mpp)}
        if _layers_take_units():
            kwargs["units"] = ("um", "um")
    if translate is not None:
        kwargs["translate"] = translate
    return kwargs


def _own_origin(tf: Any) -> tuple | None:
    """The position stored by our writer in an open TiffFile; None for other files."""
    ours = str(tf.pages[0].software or "").startswith(_SOFTWARE)
    return ome_origin(tf.ome_metadata or "") if ours and tf.is_ome else None


def _file_origin(p: Path) -> tuple | None:
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            return _own_origin(tf)
    except Exception:  # the pixels were readable; a missing position is not an error
        return None


def _layer_metadata(p: Path, mpp: float | None, file_meta: dict, prov: dict) -> dict:
    meta = {"path": str(p), "mpp": mpp, "slide": file_meta, "provenance": prov}
    if prov.get("synthetic") is True:
        meta["synthetic"] = True
    return meta


def _read_rgb(p: Path) -> LayerData:
    from napari_staindiffuser.io import open_slide

    slide = open_slide(p)
    levels = _decreasing(slide.levels)
    tiff = slide.metadata.get("format") in ("svs", "ome-tiff", "tiff")
    prov = _provenance(p) if tiff else {}
    meta = _layer_metadata(p, slide.mpp, dict(slide.metadata), prov)
    origin = _file_origin(p) if slide.metadata.get("format") == "ome-tiff" else None
    kwargs = {
        "name": _layer_name(p),
        "rgb": True,
        "multiscale": len(levels) > 1,
        "contrast_limits": (0, 255),
        "metadata": meta,
        **_spatial_kwargs(slide.mpp, meta, origin),
    }
    return (levels if len(levels) > 1 else levels[0], kwargs, "image")


def _read_plane(p: Path, kind: str) -> LayerData:
    """A 2-D integer OME-TIFF of ours (all levels, lazily) as a labels or grayscale layer."""
    import dask.array as da
    import tifffile
    import zarr
    from dask.base import tokenize

    tf = tifffile.TiffFile(p)  # stays open while the dask arrays live
    try:
        series = tf.series[0]
        index = tuple(slice(None) if a in "YX" else 0 for a in series.axes)
        st = p.stat()
        levels = []
        for i in range(len(series.levels)):
            z = zarr.open_array(series.aszarr(level=i), mode="r")
            name = "staindiffuser-plane-" + tokenize(
                str(p.resolve()), st.st_mtime_ns, st.st_size, i
            )
            levels.append(da.from_array(z, chunks=z.chunks, name=name)[index])
        mpp = ome_mpp(tf.ome_metadata or "") if tf.is_ome else None
        origin = _own_origin(tf)
        file_meta = {
            "format": "ome-tiff" if tf.is_ome else "tiff",
            "original_dtype": str(series.dtype),
            "original_axes": series.axes,
            "level_shapes": [tuple(a.shape) for a in levels],
            "software": str(tf.pages[0].software or ""),
        }
    except Exception:
        tf.close()
        raise
    levels = _decreasing(levels)
    meta = _layer_metadata(p, mpp, file_meta, _provenance(p))
    kwargs: dict[str, Any] = {
        "name": _layer_name(p),
        "multiscale": len(levels) > 1,
        "metadata": meta,
        **_spatial_kwargs(mpp, meta, origin),
    }
    if kind == "image":
        kwargs["colormap"] = "gray"
        if levels[0].dtype == np.uint8:
            kwargs["contrast_limits"] = (0, 255)
    return (levels if len(levels) > 1 else levels[0], kwargs, kind)
