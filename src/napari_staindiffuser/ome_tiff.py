"""Writing virtual stains and masks as tiled, pyramidal OME-TIFF, streamed and atomic.

Split from ``io.py`` (which re-exports :func:`write_ome_tiff` and :func:`read_provenance`);
see docs/io.md. numpy/tifffile/dask only: no torch, no Qt.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile

from .outputs import check_output_file

PROVENANCE_NAMESPACE = "urn:napari-staindiffuser:provenance"
_PROVENANCE_JSON_NAMESPACE = PROVENANCE_NAMESPACE + ":json"
_LABEL_DTYPES = {"uint8", "uint16", "uint32", "int8", "int16", "int32"}


def _check_mpp(mpp: float | None, name: str = "mpp") -> float | None:
    if mpp is None:
        return None
    value = float(mpp)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of microns per pixel, got {mpp!r}")
    return value


def _prepare_image(image: Any) -> tuple[Any, str, np.dtype, Callable | None]:
    """Validate ``image``; return (source, kind, stored dtype, per-block transform)."""
    if not isinstance(image, (np.ndarray, da.Array)):
        if not all(hasattr(image, a) for a in ("shape", "dtype", "__getitem__")):
            raise TypeError(f"image must be a numpy or dask array, got {type(image).__name__}")
        image = da.from_array(image, chunks=getattr(image, "chunks", "auto"))
    dtype = np.dtype(image.dtype)
    shape = tuple(int(s) for s in image.shape)
    if image.ndim == 3:
        if shape[2] != 3 or dtype != np.uint8:
            raise ValueError(
                f"image must be (H, W, 3) uint8 RGB or (H, W) labels; got {shape} {dtype} "
                "(convert RGB with as_rgb_uint8 first)"
            )
        kind, out, fn = "rgb", dtype, None
    elif image.ndim == 2:
        kind = "labels"
        if dtype == np.bool_:
            out, fn = np.dtype(np.uint8), functools.partial(np.asarray, dtype=np.uint8)
        elif dtype.name in _LABEL_DTYPES:
            out, fn = dtype, None
        elif dtype.kind in "iu":
            out, fn = np.dtype(np.int32), _to_int32
        else:
            raise ValueError(f"2-D label image must be bool or integer; got {dtype}")
    else:
        raise ValueError(f"image must be (H, W, 3) uint8 or (H, W) labels; got shape {shape}")
    if min(shape[:2]) < 1:
        raise ValueError(f"image is empty: shape {shape}")
    return image, kind, out, fn


def _to_int32(block: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int32)
    if block.size and (block.min() < info.min or block.max() > info.max):
        raise ValueError("label ids do not fit in int32")
    return block.astype(np.int32)


def _pyramid_shapes(h: int, w: int, tile: int, levels: int | None) -> list[tuple[int, int]]:
    shapes = [(h, w)]
    if levels is None:
        while min(shapes[-1]) > tile:
            shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
        return shapes
    if int(levels) < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    for _ in range(int(levels) - 1):
        nh, nw = shapes[-1][0] // 2, shapes[-1][1] // 2
        if min(nh, nw) < 1:
            raise ValueError(f"{levels} levels are too many for a {h}x{w} image")
        shapes.append((nh, nw))
    return shapes


def _downsample2(band: np.ndarray, kind: str) -> np.ndarray:
    """2x2 reduction (floor size): rounded mean for RGB, 2x2 mode for labels (ids kept)."""
    h2, w2 = band.shape[0] // 2, band.shape[1] // 2
    a, b = band[0 : 2 * h2 : 2, 0 : 2 * w2 : 2], band[0 : 2 * h2 : 2, 1 : 2 * w2 : 2]
    c, d = band[1 : 2 * h2 : 2, 0 : 2 * w2 : 2], band[1 : 2 * h2 : 2, 1 : 2 * w2 : 2]
    if kind == "rgb":
        total = a.astype(np.uint16) + b + c + d + 2
        return (total // 4).astype(np.uint8)
    # most frequent of the four; ties -> a, then b, then c
    out = np.where((c == d), c, a)
    out = np.where((b == c) | (b == d), b, out)
    return np.where((a == b) | (a == c) | (a == d), a, out)


def _bands(src: Any, tile: int, fn: Callable | None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, rows) bands of ``tile`` rows; each source block is computed once."""
    if not isinstance(src, da.Array):
        for r0 in range(0, src.shape[0], tile):
            band = np.asarray(src[r0 : r0 + tile])
            yield r0, fn(band) if fn is not None else band
        return
    bounds = np.cumsum((0, *src.chunks[0]))
    pending: np.ndarray | None = None
    r0 = 0
    for a, b in itertools.pairwise(bounds):
        block = np.asarray(src[int(a) : int(b)].compute())
        block = fn(block) if fn is not None else block
        pending = block if pending is None else np.concatenate([pending, block])
        while len(pending) >= tile:
            yield r0, pending[:tile]
            r0 += tile
            pending = pending[tile:]
    if pending is not None and len(pending):
        yield r0, pending


def _tiles(
    src: Any, tile: int, fn: Callable | None, nxt: np.ndarray | None, kind: str, tick: Callable
) -> Iterator[np.ndarray]:
    """Yield the tiles of one level row by row; fill ``nxt`` (next level) on the way."""
    for r0, band in _bands(src, tile, fn):
        if nxt is not None:
            down = _downsample2(band, kind)
            r = r0 // 2
            rows = min(len(down), nxt.shape[0] - r)
            if rows > 0:
                nxt[r : r + rows] = down[:rows, : nxt.shape[1]]
        for c0 in range(0, band.shape[1], tile):
            tick()
            yield np.ascontiguousarray(band[:, c0 : c0 + tile])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_ome_tiff(
    path: str | os.PathLike,
    image: Any,
    *,
    mpp: float | None,
    metadata: dict | None = None,
    tile: int = 256,
    levels: int | None = None,
    compression: str | None = "zlib",
    progress: Callable[[int, int], Any] | None = None,
) -> Path:
    """Stream ``image`` into a tiled, pyramidal OME-TIFF, atomically.

    Parameters
    ----------
    path : str or path-like
        Output file (``.ome.tif`` recommended). Written to a temporary file in the same folder
        and renamed over ``path`` only on success; an existing file is untouched on error.
    image : numpy.ndarray or dask.array.Array
        ``(H, W, 3) uint8`` RGB (reduced levels: rounded 2x2 mean) or ``(H, W)`` labels/mask:
        uint8/uint16/uint32/int8/int16/int32 stored as is, bool stored as uint8 0/1, int64/uint64
        stored as int32 (error if out of range); reduced levels by 2x2 mode (ids are never
        averaged). Dask arrays are computed one row of chunks at a time.
    mpp : float or None
        Microns per pixel at level 0 (OME PhysicalSizeX/Y in µm and TIFF resolution tags).
    metadata : dict, optional
        JSON-serialisable provenance (model, sampler, steps, seed, region, ...), stored in the
        OME-XML and returned by :func:`read_provenance`.
    tile : int
        Tile edge in pixels, a multiple of 16.
    levels : int, optional
        Number of levels including level 0; default: halve until the smaller side <= ``tile``.
    compression : str or None
        tifffile compression name ("zlib", "zstd", "lzw", "jpeg" for RGB, ...) or None.
    progress : callable, optional
        Called as ``progress(done_tiles, total_tiles)`` for every tile over all levels.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    out = Path(path).expanduser()
    src, kind, dtype, fn = _prepare_image(image)
    mpp = _check_mpp(mpp)
    if int(tile) != tile or tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    tile = int(tile)
    try:
        prov = json.loads(json.dumps(metadata or {}, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from exc
    if not isinstance(prov, dict):
        raise ValueError("metadata must be a dict")
    shapes = _pyramid_shapes(int(src.shape[0]), int(src.shape[1]), tile, levels)
    out = check_output_file(out)
    parent = out.parent
    tmp = parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        open(tmp, "xb").close()
    except OSError as exc:
        raise PermissionError(f"cannot write to output folder {parent}: {exc}") from exc
    try:
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=parent) as cache:
            _write_pyramid(tmp, src, kind, dtype, fn, shapes, tile, mpp, prov, compression,
                           progress, Path(cache), out)  # fmt: skip
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _write_pyramid(tmp, src, kind, dtype, fn, shapes, tile, mpp, prov, compression, progress,
                   cache, out) -> None:  # fmt: skip
    from . import __version__

    samples = 3 if kind == "rgb" else 1
    total = sum(math.ceil(h / tile) * math.ceil(w / tile) for h, w in shapes)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    name = out.name.removesuffix(".tif").removesuffix(".tiff").removesuffix(".ome")
    md: dict[str, Any] = {"axes": "YXS" if kind == "rgb" else "YX", "Name": name}
    if mpp is not None:
        md.update(PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp,
                  PhysicalSizeYUnit="µm")  # fmt: skip
    if prov:
        # human-readable key/value pairs (strings verbatim unless they hold control characters)
        readable = {
            k if k.isprintable() else json.dumps(k): v
            if isinstance(v, str) and v.isprintable()
            else json.dumps(v)
            for k, v in prov.items()
        }
        md["MapAnnotation"] = {"Namespace": PROVENANCE_NAMESPACE, "Value": readable}
        md["CommentAnnotation"] = {"Namespace": _PROVENANCE_JSON_NAMESPACE,
                                   "Value": json.dumps(prov)}  # fmt: skip
    nbytes = sum(h * w for h, w in shapes) * samples * dtype.itemsize
    current: Any = src
    with tifffile.TiffWriter(tmp, bigtiff=nbytes > 2**32 - 2**28, ome=True) as tw:
        for k, (h, w) in enumerate(shapes):
            nxt = None
            if k + 1 < len(shapes):
                nshape = (*shapes[k + 1], samples) if kind == "rgb" else shapes[k + 1]
                nxt = np.memmap(cache / f"level{k + 1}.raw", dtype, "w+", shape=nshape)
            kwargs: dict[str, Any] = {}
            if mpp is not None:
                res = 1e4 / (mpp * (shapes[0][1] / w))
                kwargs.update(resolution=(res, res), resolutionunit="CENTIMETER")
            if k == 0:
                kwargs.update(
                    subifds=len(shapes) - 1,
                    metadata=md,
                    software=f"napari-staindiffuser {__version__}",
                )
            else:
                kwargs.update(subfiletype=1, metadata=None)
            tw.write(
                _tiles(current, tile, fn if k == 0 else None, nxt, kind, tick),
                shape=(h, w, 3) if kind == "rgb" else (h, w), dtype=dtype, tile=(tile, tile),
                photometric="rgb" if kind == "rgb" else "minisblack", compression=compression,
                buffersize=math.ceil(w / tile) * tile * tile * samples * dtype.itemsize,
                maxworkers=2, **kwargs,
            )  # fmt: skip
            if nxt is not None:
                nxt.flush()
            current = nxt


def read_provenance(path: str | os.PathLike) -> dict:
    """Return the provenance dict stored by :func:`write_ome_tiff` (``{}`` when none).

    Raises FileNotFoundError for a missing file and ValueError for a non-TIFF/corrupt file.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    try:
        with tifffile.TiffFile(p) as tf:
            xml = tf.ome_metadata if tf.is_ome else None
    except Exception as exc:
        raise ValueError(f"{p}: not a readable TIFF: {type(exc).__name__}: {exc}") from exc
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"{p}: invalid OME-XML: {exc}") from exc
    fallback: dict = {}
    for el in root.iter():
        tag, ns = el.tag.rsplit("}", 1)[-1], el.get("Namespace")
        value = next((v for v in el if v.tag.rsplit("}", 1)[-1] == "Value"), None)
        if value is None:
            continue
        if tag == "CommentAnnotation" and ns == _PROVENANCE_JSON_NAMESPACE:
            try:
                return json.loads(value.text or "{}")
            except json.JSONDecodeError:
                continue
        if tag == "MapAnnotation" and ns == PROVENANCE_NAMESPACE:
            fallback = {m.get("K"): m.text or "" for m in value}
    return fallback


def write_stain_outputs(
    result: Any, folder: str | os.PathLike, stem: str, mpp: float | None, provenance=None
) -> dict[str, dict[str, str]]:
    """Write a staining result (``inference.StainResult``) as pyramidal OME-TIFFs, each atomic
    and carrying ``provenance`` (default: the result's): ``<stem>_virtual-<stain>.ome.tif``,
    ``<stem>_mask-<stain>.ome.tif`` and, with several samples,
    ``<stem>_uncertainty-<stain>.ome.tif`` (std x 4, uint8). Returns the paths per stain."""
    folder = Path(folder)
    prov = {k: v for k, v in (provenance or result.provenance).items() if k != "files"}
    written: dict[str, dict[str, str]] = {}
    for stain, rgb in result.images.items():
        tag = stain.replace("/", "")
        files = written[stain] = {}
        outputs = [
            ("virtual", rgb, f"virtual {stain} IHC", "image"),
            ("mask", result.masks[stain], f"{stain} positive cells (model)", "labels"),
        ]
        if stain in result.uncertainty:
            u = np.clip(result.uncertainty[stain] * 4, 0, 255).astype(np.uint8)
            outputs.append(("uncertainty", u, "std across samples x4 (0-255)", "image"))
        for kind, data, content, layer_type in outputs:
            meta = {**prov, "content": content, "layer_type": layer_type}
            path = folder / f"{stem}_{kind}-{tag}.ome.tif"
            files[kind] = str(write_ome_tiff(path, data, mpp=mpp, metadata=meta))
    return written
