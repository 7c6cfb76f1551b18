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
    if not isinstance(image, (np.ndarray, da.Array, DiskArray)):
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


def _check_origin(origin: Any) -> tuple[float, float] | None:
    if origin is None:
        return None
    try:
        y, x = (float(v) for v in origin)
    except (TypeError, ValueError):
        raise ValueError(f"origin must be (y, x), two numbers; got {origin!r}") from None
    if not (math.isfinite(y) and math.isfinite(x)):
        raise ValueError(f"origin must be finite; got {origin!r}")
    return y, x


def _region_origin(prov: dict, mpp: float | None) -> tuple[float, float] | None:
    """Where a stained region lies on its slide: its provenance ``region`` (y, x, h, w; pixels
    of the stained level) times ``mpp`` (that level's µm/px; pixels when None)."""
    region = prov.get("region")
    if not isinstance(region, (list, tuple)) or len(region) != 4:
        return None
    s = 1.0 if mpp is None else float(mpp)
    return float(region[0]) * s, float(region[1]) * s


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
    origin: tuple[float, float] | None = None,
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
    origin : (y, x), optional
        Where pixel (0, 0) lies: the napari layer's ``translate``, in µm when ``mpp`` is given,
        else in pixels. Stored as OME ``Plane/@PositionY``, ``@PositionX`` (unit "µm" or
        "pixel"); read back by :func:`napari_staindiffuser.io.ome_origin`.

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
    origin = _check_origin(origin)
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
                           progress, Path(cache), out, origin)  # fmt: skip
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _write_pyramid(tmp, src, kind, dtype, fn, shapes, tile, mpp, prov, compression, progress,
                   cache, out, origin=None) -> None:  # fmt: skip
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
    if origin is not None:  # the position of the image: napari's translate
        unit = "µm" if mpp is not None else "pixel"
        md["Plane"] = {"PositionY": origin[0], "PositionYUnit": unit, "PositionX": origin[1],
                       "PositionXUnit": unit}  # fmt: skip
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
                nxt = DiskArray(cache / f"level{k + 1}.raw", nshape, dtype)
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


def uncertainty_uint8(std: np.ndarray) -> np.ndarray:
    """Per-pixel std across samples (0-255 scale, float) -> what the uncertainty file stores:
    ``clip(std * 4, 0, 255)`` as uint8 (pixelwise, so it may be applied band by band)."""
    return np.clip(std * 4, 0, 255).astype(np.uint8)


def write_stain_outputs(
    result: Any, folder: str | os.PathLike, stem: str, mpp: float | None, provenance=None
) -> dict[str, dict[str, str]]:
    """Write a staining result (``inference.StainResult``) as pyramidal OME-TIFFs, each atomic
    and carrying ``provenance`` (default: the result's): ``<stem>_virtual-<stain>.ome.tif``,
    ``<stem>_mask-<stain>.ome.tif`` and, with several samples,
    ``<stem>_uncertainty-<stain>.ome.tif`` (std x 4, uint8), placed where the provenance's
    ``region`` lies (``origin``: its y, x times ``mpp``). Returns the paths per stain."""
    unc = {st: uncertainty_uint8(u) for st, u in result.uncertainty.items()}
    return _write_stain_files(result.images, result.masks, unc, folder, stem, mpp,
                              provenance or result.provenance)  # fmt: skip


def _write_stain_files(images, masks, unc8, folder, stem, mpp, provenance):
    folder = Path(folder)
    prov = {k: v for k, v in provenance.items() if k != "files"}
    origin = _region_origin(prov, mpp)  # so the files open where the region lies on the slide
    written: dict[str, dict[str, str]] = {}
    for stain, rgb in images.items():
        tag = stain.replace("/", "")
        files = written[stain] = {}
        outputs = [
            ("virtual", rgb, f"virtual {stain} IHC", "image"),
            ("mask", masks[stain], f"{stain} positive cells (model)", "labels"),
        ]
        if stain in unc8:
            outputs.append(("uncertainty", unc8[stain], "std across samples x4 (0-255)", "image"))
        for kind, data, content, layer_type in outputs:
            meta = {**prov, "content": content, "layer_type": layer_type}
            path = folder / f"{stem}_{kind}-{tag}.ome.tif"
            files[kind] = str(write_ome_tiff(path, data, mpp=mpp, metadata=meta, origin=origin))
    return written


# ---------------------------------------------------------------------------------------------
# Slide-scale staining: outputs streamed to disk band by band, then written as OME-TIFFs


class DiskArray:
    """A C-ordered array kept in a raw file, written and read by rows with plain file I/O.

    No memory map: the pages sit in the OS file cache, not in the process's resident memory,
    so filling or reading a slide-sized array band by band costs one band of RAM.
    ``a[y0:y1] = rows`` writes whole rows (step 1); ``a[key]`` reads the rows ``key`` spans
    (a slice with any step, or an int) and applies the rest of the key; ``np.asarray(a)`` reads
    everything (small arrays only). The file is created, zero-filled, at ``path``.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: Any):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._items = int(np.prod(self.shape[1:], dtype=np.int64))  # per row
        with open(self.path, "xb") as f:
            f.truncate(self.shape[0] * self._items * self.dtype.itemsize)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DiskArray({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"

    def _rows(self, y0: int, y1: int) -> np.ndarray:
        n = max(0, y1 - y0)
        offset = y0 * self._items * self.dtype.itemsize
        data = np.fromfile(self.path, self.dtype, count=n * self._items, offset=offset)
        return data.reshape(n, *self.shape[1:])

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        if isinstance(first, slice):
            y0, y1, step = first.indices(self.shape[0])
            if step == 1:
                rows = self._rows(y0, y1)
            else:
                idx = range(y0, y1, step)
                rows = np.empty((len(idx), *self.shape[1:]), self.dtype)
                for i, y in enumerate(idx):
                    rows[i] = self._rows(y, y + 1)[0]
            return rows[(slice(None), *rest)]
        if isinstance(first, (int, np.integer)):
            y = range(self.shape[0])[int(first)]  # IndexError when out of range
            return self._rows(y, y + 1)[(0, *rest)]
        raise TypeError(f"DiskArray: expected a row slice or int as the first index; got {first!r}")

    def __setitem__(self, key: Any, value: Any) -> None:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"DiskArray: expected whole rows a[y0:y1] = rows; got key {key!r}")
        y0, y1, _ = key.indices(self.shape[0])
        v = np.ascontiguousarray(value, dtype=self.dtype)
        if v.shape != (max(0, y1 - y0), *self.shape[1:]):
            want = (max(0, y1 - y0), *self.shape[1:])
            raise ValueError(f"DiskArray: expected rows of shape {want}; got {v.shape}")
        with open(self.path, "r+b") as f:
            f.seek(y0 * self._items * self.dtype.itemsize)
            v.tofile(f)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self._rows(0, self.shape[0])
        return a if dtype is None else a.astype(dtype)


class StreamedStainOutputs:
    """Disk-backed outputs of one staining run, filled band by band, then written as OME-TIFFs.

    The virtual IHC (``images``: stain -> (H, W, 3) uint8), the masks (``masks``: stain ->
    (H, W) bool) and, with ``uncertainty``, the uncertainty maps as stored in the files
    (:func:`uncertainty_uint8`) are :class:`DiskArray` files in a hidden temporary folder
    inside ``folder`` (``.staindiffuser-stream-*.tmp``: on the same disk as the outputs).
    :meth:`write_files` streams them into the same files :func:`write_stain_outputs` writes
    (each atomic: a temporary file renamed on success); :meth:`close` (or leaving the ``with``
    block) removes the temporary folder, after success, an error or a cancelled run alike.
    Scores are not kept (no file holds them). Disk use: about ``H * W * (4 + 1)`` bytes per
    stain, plus the writer's pyramid cache.
    """

    def __init__(self, folder: str | os.PathLike, shape: tuple[int, int], stains, uncertainty):
        self.folder = Path(folder).expanduser()
        h, w = (int(s) for s in shape)
        try:
            self._tmp = Path(
                tempfile.mkdtemp(prefix=".staindiffuser-stream-", suffix=".tmp", dir=self.folder)
            )
        except OSError as exc:
            raise PermissionError(f"cannot write to output folder {self.folder}: {exc}") from exc
        try:
            self.images, self.masks, self.uncertainty = {}, {}, {}
            for i, st in enumerate(stains):
                self.images[st] = DiskArray(self._tmp / f"virtual-{i}.u8", (h, w, 3), np.uint8)
                self.masks[st] = DiskArray(self._tmp / f"mask-{i}.b", (h, w), np.bool_)
                if uncertainty:
                    self.uncertainty[st] = DiskArray(self._tmp / f"unc-{i}.u8", (h, w), np.uint8)
        except BaseException:
            self.close()
            raise

    @property
    def temp_folder(self) -> Path:
        return self._tmp

    def write(self, kind: str, stain: str, y0: int, rows: np.ndarray) -> None:
        """Rows ``y0, y0 + 1, ...`` of one output (``kind``: "image", "mask", "score",
        "uncertainty": the float std, converted here; scores are dropped)."""
        if kind == "image":
            self.images[stain][y0 : y0 + len(rows)] = rows
        elif kind == "mask":
            self.masks[stain][y0 : y0 + len(rows)] = rows
        elif kind == "uncertainty":
            self.uncertainty[stain][y0 : y0 + len(rows)] = uncertainty_uint8(rows)

    def write_files(self, stem: str, mpp: float | None, provenance: dict) -> dict:
        """Write ``<stem>_virtual-<stain>.ome.tif``, ... into ``folder`` (as
        :func:`write_stain_outputs`); returns the paths per stain."""
        return _write_stain_files(self.images, self.masks, self.uncertainty, self.folder, stem,
                                  mpp, provenance)  # fmt: skip

    def close(self) -> None:
        """Remove the temporary folder (idempotent)."""
        import shutil

        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> StreamedStainOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_level0(path: str | os.PathLike) -> da.Array:
    """Level 0 of an OME-TIFF written here, as a lazy read-only dask array (one chunk per
    stored tile; the file stays open while the array is referenced)."""
    import zarr

    tf = tifffile.TiffFile(Path(path).expanduser())
    try:
        z = zarr.open_array(tf.series[0].aszarr(level=0), mode="r")
    except BaseException:
        tf.close()
        raise
    return da.from_zarr(z)  # the store keeps ``tf`` open
