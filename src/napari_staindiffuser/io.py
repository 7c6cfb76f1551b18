"""Reading H&E slides (TIFF, OME-TIFF, Aperio SVS, PNG, JPEG) and writing pyramidal OME-TIFF.

Slides are exposed as lazy dask arrays, one per pyramid level, each ``(H, W, 3) uint8`` RGB.
The conversion rules for unusual inputs and the OME-TIFF layout are described in ``docs/io.md``.
This module needs numpy, tifffile, zarr, dask and imagecodecs only (scikit-image for PNG/JPEG).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr
from dask.base import tokenize

from .ome_tiff import (
    PROVENANCE_NAMESPACE,
    _check_mpp,
    read_provenance,
    write_ome_tiff,
)

__all__ = [
    "PROVENANCE_NAMESPACE",
    "Slide",
    "as_rgb_uint8",
    "open_slide",
    "read_provenance",
    "sample_svs_path",
    "write_ome_tiff",
]

"""OME ``MapAnnotation`` namespace of the provenance written by :func:`write_ome_tiff`."""
_SAMPLE_SVS = "CMU-1-Small-Region.svs"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_RGB_EXPECTED = "expected an RGB brightfield image of shape (H, W, 3) uint8"
_PLAUSIBLE_MPP = (0.01, 50.0)  # um/px accepted from plain TIFF resolution tags
_UNIT_UM = {
    "m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0,
    "microns": 1.0, "nm": 1e-3, "pm": 1e-6, "\u00c5": 1e-4, "\u212b": 1e-4, "in": 25400.0,
    "inch": 25400.0, "thou": 25.4, "ft": 304800.0, "yd": 914400.0, "pt": 25400.0 / 72,
}  # fmt: skip
_RESUNIT_UM = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}  # TIFF ResolutionUnit -> um per unit


@dataclass(frozen=True, eq=False)
class Slide:
    """A whole-slide or plain RGB image, exposed as a lazy pyramid.

    Attributes
    ----------
    levels : list of dask.array.Array
        Pyramid levels, level 0 (full resolution) first, each ``(H_i, W_i, 3) uint8`` RGB.
        Nothing is read from disk until a level (or a region of it) is computed; chunks are
        the file's tiles (or groups of strips) and may be read from several threads.
    mpp : float or None
        Microns per pixel at level 0; None when unknown.
    path : pathlib.Path or None
        The file the slide was read from.
    metadata : dict
        ``format``, ``vendor``, ``objective_power``, ``original_dtype``, ``original_axes``,
        ``photometric``, ``compression``, ``tile_shape``, ``level_shapes``, ``mpp_source``,
        ``conversions`` (list of str), ``ignored_series``, ``warnings``, ... (see docs/io.md).
    """

    levels: list[da.Array]
    mpp: float | None
    path: Path | None
    metadata: dict = field(default_factory=dict)
    _handle: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("a Slide needs at least one level")
        for i, lvl in enumerate(self.levels):
            if lvl.ndim != 3 or lvl.shape[2] != 3 or lvl.dtype != np.uint8:
                raise ValueError(f"level {i}: {_RGB_EXPECTED}; got {lvl.shape} {lvl.dtype}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of level 0 in pixels."""
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    def level_downsample(self, i: int) -> float:
        """Downsample factor of level ``i`` (mean of the row and column shape ratios)."""
        h, w = self.levels[i].shape[:2]
        return (self.shape[0] / h + self.shape[1] / w) / 2

    def level_mpp(self, i: int) -> float | None:
        """Microns per pixel of level ``i`` (``mpp * downsample``); None when mpp is unknown."""
        return None if self.mpp is None else self.mpp * self.level_downsample(i)

    def best_level_for(self, target_mpp: float, *, tol: float = 0.01) -> int:
        """Index of the coarsest level whose mpp is ``<= target_mpp * (1 + tol)``.

        Never coarser than asked (up to ``tol``); returns 0 when even level 0 is coarser than
        ``target_mpp`` (the caller must then upsample). Raises ValueError when ``mpp`` is None.
        """
        target = _check_mpp(target_mpp, "target_mpp")
        if target is None:
            raise ValueError("target_mpp must be given")
        if self.mpp is None:
            raise ValueError(f"{self.path}: pixel size unknown; pass mpp= to open_slide")
        ok = [i for i in range(len(self.levels)) if self.level_mpp(i) <= target * (1 + tol)]
        return max(ok, key=self.level_mpp) if ok else 0

    def close(self) -> None:
        """Close the underlying file (levels must not be computed afterwards)."""
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sample_svs_path() -> Path:
    """Path of the bundled CMU-1-Small-Region.svs (Aperio, H&E, CC0; see data/ATTRIBUTION.md)."""
    path = Path(str(resources.files("napari_staindiffuser.data").joinpath(_SAMPLE_SVS)))
    if not path.is_file():
        raise FileNotFoundError(f"bundled sample slide missing: {path}")
    return path


# ----------------------------------------------------------------------------- conversions


def _dtype_rule(dtype: np.dtype, what: str) -> str:
    """Return the conversion applied to ``dtype``: 'none', 'uint16' or 'float'."""
    if dtype == np.uint8:
        return "none"
    if dtype == np.uint16:
        return "uint16"
    if dtype.kind == "f":
        return "float"
    raise ValueError(
        f"{what}: {_RGB_EXPECTED} (uint16 and float in [0, 1] are converted); got dtype {dtype}"
    )


def _to_uint8(block: np.ndarray, rule: str, what: str) -> np.ndarray:
    """Convert one block by ``rule``: uint16 -> round(x / 257), float in [0, 1] -> round(x*255)."""
    if rule == "uint16":
        return ((block.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if rule == "float":
        if block.size == 0:
            return block.astype(np.uint8)
        if not np.isfinite(block).all():
            raise ValueError(f"{what}: float image contains NaN or infinite values")
        lo, hi = float(block.min()), float(block.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(
                f"{what}: float image values must lie in [0, 1]; found [{lo:g}, {hi:g}]"
            )
        return np.rint(np.clip(block, 0, 1) * 255).astype(np.uint8)
    return block


def _sample_layout(shape: tuple[int, ...], what: str, dtype: Any) -> tuple[bool, int]:
    """Return (planar, n_samples) for a 3-D in-memory array, or raise ValueError."""
    got = f"got shape {tuple(shape)} {np.dtype(dtype)}"
    if len(shape) == 2:
        raise ValueError(f"{what}: {_RGB_EXPECTED}; {got} (grayscale is not supported)")
    if len(shape) != 3:
        raise ValueError(f"{what}: {_RGB_EXPECTED}; {got}")
    if shape[-1] in (3, 4):
        return False, shape[-1]
    if shape[0] in (3, 4) and shape[-1] != 1:
        return True, shape[0]
    reason = "grayscale is not supported" if 1 in (shape[0], shape[-1]) else "unknown layout"
    raise ValueError(f"{what}: {_RGB_EXPECTED}; {got} ({reason})")


def as_rgb_uint8(array: Any, *, _notes: list[str] | None = None) -> np.ndarray:
    """Convert an in-memory image to ``(H, W, 3) uint8`` RGB by the rules of :func:`open_slide`.

    Parameters
    ----------
    array : array-like
        ``(H, W, 3|4)`` interleaved or ``(3|4, H, W)`` planar; uint8, uint16 (mapped by
        ``round(x / 257)``) or float in ``[0, 1]`` (mapped by ``round(x * 255)``). A 4th
        channel is taken as alpha and dropped. Dask arrays are computed.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3) uint8``; a view of the input when no conversion was needed.

    Raises
    ------
    ValueError
        Grayscale ``(H, W)``/``(H, W, 1)``, other channel counts, other dtypes, NaN/inf, or
        float values outside ``[0, 1]``.
    """
    arr = np.asarray(array)
    notes = [] if _notes is None else _notes
    planar, n = _sample_layout(arr.shape, "image", arr.dtype)
    rule = _dtype_rule(arr.dtype, "image")
    if planar:
        arr = np.moveaxis(arr, 0, -1)
        notes.append(f"planar ({n}, H, W) transposed to (H, W, {n})")
    if n == 4:
        arr = arr[..., :3]
        notes.append("alpha channel dropped")
    if rule != "none":
        notes.append(f"{arr.dtype} converted to uint8 ({rule} rule)")
    return _to_uint8(arr, rule, "image")


# ------------------------------------------------------------------------------- reading


class _LevelReader:
    """Array-like over one zarr level of a TIFF, for dask.array.from_array.

    Errors while reading/decoding become ValueError naming the file. tifffile's store
    serialises seeks and reads with the file handle's lock and decodes outside it, so
    chunks may be read from several threads.
    """

    def __init__(self, zarray: Any, what: str, token: str) -> None:
        self._z = zarray
        self._what = what
        self._token = token
        self.shape = tuple(zarray.shape)
        self.dtype = np.dtype(zarray.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self._z[key])
        except Exception as exc:
            msg = f"{self._what}: cannot read pixels {key}: {type(exc).__name__}: {exc}"
            raise ValueError(msg) from exc

    def __dask_tokenize__(self) -> str:
        return self._token


class _LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def open_slide(path: str | os.PathLike, *, mpp: float | None = None) -> Slide:
    """Open a slide or image lazily as a :class:`Slide`.

    Parameters
    ----------
    path : str or path-like
        TIFF, OME-TIFF or Aperio SVS (pyramid levels read lazily, tile by tile), or PNG/JPEG
        (decoded at once; one level).
    mpp : float, optional
        Microns per pixel at level 0; overrides the file's value.

    Returns
    -------
    Slide
        ``levels`` are ``(H, W, 3) uint8`` dask arrays, level 0 first.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Not an image, corrupt or truncated TIFF, or not convertible to RGB (see docs/io.md).
    """
    p = Path(path).expanduser()
    override = _check_mpp(mpp)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory, not an image file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ValueError(f"{p}: cannot read file: {exc}") from exc
    if not head:
        raise ValueError(f"{p}: empty file, not an image")
    if head in _TIFF_MAGICS:
        levels, file_mpp, meta, handle = _open_tiff(p)
    else:
        levels, meta = _open_plain(p)
        file_mpp, handle = None, None
    meta["mpp_file"] = file_mpp
    if override is not None:
        meta["mpp_source"] = "argument"
    return Slide(levels, override if override is not None else file_mpp, p, meta, handle)


def _open_plain(p: Path) -> tuple[list[da.Array], dict]:
    """Decode PNG/JPEG with imagecodecs (16-bit PNG kept), else skimage.io, as one level."""
    data = p.read_bytes()
    fmt = "png" if data[:4] == b"\x89PNG" else "jpeg" if data[:3] == b"\xff\xd8\xff" else None
    try:
        if fmt is not None:
            import imagecodecs

            decode = imagecodecs.png_decode if fmt == "png" else imagecodecs.jpeg8_decode
            arr = np.asarray(decode(data))
        else:
            from skimage import io as skio  # imported lazily: slow import

            with warnings.catch_warnings():  # imageio's plugin probing warns
                warnings.simplefilter("ignore")
                arr = np.asarray(skio.imread(str(p)))
            fmt = p.suffix.lower().lstrip(".") or "unknown"
    except Exception as exc:
        raise ValueError(
            f"{p}: not a supported image (TIFF/SVS/OME-TIFF, PNG, JPEG), or a damaged one: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if fmt == "jpeg" and arr.ndim == 3 and arr.shape[-1] == 4:
        raise ValueError(f"{p}: {_RGB_EXPECTED}; CMYK JPEG is not supported")
    notes: list[str] = []
    meta = {"format": fmt, "original_dtype": str(arr.dtype), "original_shape": arr.shape}
    try:
        rgb = np.ascontiguousarray(as_rgb_uint8(arr, _notes=notes))
    except ValueError as exc:
        raise ValueError(f"{p}: {str(exc).removeprefix('image: ')}") from None
    st = p.stat()
    name = "slide-" + tokenize(str(p.resolve()), st.st_mtime_ns, st.st_size)
    chunks = (min(rgb.shape[0], 1024), min(rgb.shape[1], 1024), 3)
    meta.update(conversions=notes, level_shapes=[rgb.shape], mpp_source=None)
    return [da.from_array(rgb, chunks=chunks, name=name)], meta


def _open_tiff(p: Path) -> tuple[list[da.Array], float | None, dict, Any]:
    log = _LogCollector()
    logger = logging.getLogger("tifffile")
    logger.addHandler(log)
    tf = None
    try:
        tf = tifffile.TiffFile(p)
        levels, mpp, meta = _tiff_levels(tf, p)
    except Exception as exc:
        if tf is not None:
            tf.close()
        if isinstance(exc, ValueError) and str(exc).startswith(str(p)):
            raise
        hint = f" ({log.messages[0]})" if log.messages else ""
        msg = f"{p}: corrupt or unreadable TIFF: {type(exc).__name__}: {exc}{hint}"
        raise ValueError(msg) from exc
    finally:
        logger.removeHandler(log)
    meta["warnings"] = log.messages
    return levels, mpp, meta, tf


def _tiff_levels(tf: tifffile.TiffFile, p: Path) -> tuple[list[da.Array], float | None, dict]:
    if not tf.series or not tf.series[0].shape:
        raise ValueError(f"{p}: TIFF contains no image data (corrupt?)")
    series = tf.series[0]
    page = series.keyframe
    axes, shape, dtype = series.axes, tuple(series.shape), np.dtype(series.dtype)
    what = str(p)
    fmt = "svs" if tf.is_svs else "ome-tiff" if tf.is_ome else "tiff"
    photometric = tifffile.PHOTOMETRIC(page.photometric)
    meta: dict[str, Any] = {
        "format": fmt, "vendor": "aperio" if tf.is_svs else None, "series": series.name,
        "ignored_series": [s.name for s in tf.series[1:]], "original_dtype": str(dtype),
        "original_axes": axes, "original_shape": shape, "photometric": photometric.name,
        "compression": tifffile.COMPRESSION(page.compression).name,
        "tile_shape": (page.tilelength, page.tilewidth) if page.is_tiled else None,
    }  # fmt: skip
    notes: list[str] = []
    # layout: drop singleton axes, keep Y, X and one sample axis (S or C)
    keep = [i for i, a in enumerate(axes) if a in "YX" or shape[i] != 1]
    extra = [axes[i] for i in keep if axes[i] not in "YXSC"]
    got = f"got axes {axes!r} shape {shape} {dtype}"
    if extra or [axes[i] for i in keep].count("S") + [axes[i] for i in keep].count("C") > 1:
        raise ValueError(f"{what}: {_RGB_EXPECTED} (single plane); {got}")
    sample_axes = [i for i in keep if axes[i] in "SC"]
    if photometric == tifffile.PHOTOMETRIC.PALETTE:
        raise ValueError(f"{what}: {_RGB_EXPECTED}; palette-colour TIFF is not supported")
    if not sample_axes or shape[sample_axes[0]] == 1:
        raise ValueError(f"{what}: {_RGB_EXPECTED}; {got} (grayscale is not supported)")
    s_ax = sample_axes[0]
    n = shape[s_ax]
    if n not in (3, 4) or photometric == tifffile.PHOTOMETRIC.SEPARATED:
        raise ValueError(f"{what}: {_RGB_EXPECTED}; {got} ({n} {photometric.name} samples)")
    index = tuple(slice(None) if i in keep else 0 for i in range(len(axes)))
    y, x = keep.index(axes.index("Y")), keep.index(axes.index("X"))
    perm = (y, x, keep.index(s_ax))
    if perm != (0, 1, 2):
        notes.append(f"axes {''.join(axes[i] for i in keep)} transposed to YXS")
    if n == 4:
        notes.append("alpha channel dropped")
    rule = _dtype_rule(dtype, what)
    if rule != "none":
        notes.append(f"{dtype} converted to uint8 ({rule} rule)")

    fsize = p.stat().st_size
    sources: list[tuple[Any, int | None]] = [(series, i) for i in range(len(series.levels))]
    if tf.is_svs and len(series.levels) == 1:
        thumb = _svs_thumbnail(tf, shape)
        if thumb is not None:
            sources.append((thumb, None))
            meta["ignored_series"].remove(thumb.name)
            notes.append("SVS thumbnail used as reduced level 1 (file has no stored pyramid)")
    levels = []
    for k, (src, lvl) in enumerate(sources):
        level_series = src.levels[lvl] if lvl is not None else src
        _check_truncation(level_series, fsize, what)
        zarray, chunkmode = _open_zarr(src, lvl)
        if tuple(zarray.shape) != tuple(level_series.shape):
            raise ValueError(
                f"{what}: level {k} store shape {zarray.shape} != {level_series.shape}"
            )
        token = tokenize(str(p.resolve()), fsize, p.stat().st_mtime_ns, k, chunkmode)
        reader = _LevelReader(zarray, f"{what} (level {k})", token)
        chunks = _dask_chunks(tuple(zarray.chunks), reader.shape, level_series.axes)
        meta_arr = np.empty((0,) * reader.ndim, dtype)
        arr = da.from_array(reader, chunks=chunks, name="tiff-" + token, meta=meta_arr)
        arr = arr[index].transpose(perm)[..., :3]
        if rule != "none":
            arr = arr.map_blocks(_to_uint8, rule, what, dtype=np.uint8)
        levels.append(arr)
    if rule == "float" and math.prod(levels[-1].shape) <= 3 * 4096 * 4096:
        levels[-1].compute()  # early NaN / range check on the coarsest level
    mpp, source = _tiff_mpp(tf, page)
    meta.update(conversions=notes, level_shapes=[a.shape for a in levels], mpp_source=source)
    if tf.is_svs:
        svs = _svs_meta(page.description)
        meta["aperio"] = svs
        if "AppMag" in svs:
            meta["objective_power"] = svs["AppMag"]
    return levels, mpp, meta


def _svs_thumbnail(tf: tifffile.TiffFile, shape: tuple[int, ...]) -> Any:
    """The SVS Thumbnail series when it is a reduced copy of the whole baseline image."""
    for s in tf.series[1:]:
        if s.name == "Thumbnail" and s.axes == "YXS" and s.dtype == np.uint8:
            h, w = s.shape[:2]
            if len(shape) == 3 and h < shape[0] and abs((w / h) / (shape[1] / shape[0]) - 1) < 0.01:
                return s
    return None


def _check_truncation(level_series: Any, fsize: int, what: str) -> None:
    for page in level_series.pages:
        if page is None or not len(page.dataoffsets):
            continue
        end = int(np.max(np.add(page.dataoffsets, page.databytecounts, dtype=np.int64)))
        if end > fsize:
            raise ValueError(
                f"{what}: truncated TIFF: pixel data extends to byte {end} but the file has "
                f"{fsize} bytes"
            )


def _open_zarr(src: Any, level: int | None) -> tuple[Any, int]:
    """Open one level as a read-only zarr array through tifffile's store."""
    kwargs = {"maxworkers": 4} if level is None else {"level": level, "maxworkers": 4}
    try:
        return zarr.open_array(src.aszarr(**kwargs), mode="r"), 0
    except ValueError as exc:  # e.g. incomplete strips: fall back to whole-page chunks
        if "not supported" not in str(exc):
            raise
        return zarr.open_array(src.aszarr(chunkmode=2, **kwargs), mode="r"), 2


def _dask_chunks(chunks: tuple[int, ...], shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    """Dask chunks = stored tiles; thin full-width strips are grouped to about 256 rows."""
    out = list(chunks)
    if len(axes) == len(shape) and "Y" in axes and "X" in axes:
        iy, ix = axes.index("Y"), axes.index("X")
        if out[ix] == shape[ix] and out[iy] < 256:
            out[iy] = min(shape[iy], out[iy] * math.ceil(256 / out[iy]))
    return tuple(out)


def _tiff_mpp(tf: tifffile.TiffFile, page: Any) -> tuple[float | None, str | None]:
    """Pixel size from OME, SVS, ImageJ or resolution tags, with its source."""
    if tf.is_ome:
        mpp = ome_mpp(tf.ome_metadata or "")
        if mpp is not None:
            return mpp, "ome"
    if tf.is_svs:
        mpp = _svs_meta(page.description).get("MPP")
        if isinstance(mpp, (int, float)) and mpp > 0:
            return float(mpp), "svs"
    xres = page.tags.get(282)  # XResolution
    if xres is None:
        return None, None
    ppu = page.resolution[0]  # pixels per unit
    unit_um = _RESUNIT_UM.get(int(page.resolutionunit))
    source = "tiff-resolution"
    if int(page.resolutionunit) == 1 and tf.is_imagej:
        unit_um = _UNIT_UM.get(str((tf.imagej_metadata or {}).get("unit", "")).lower())
        source = "imagej"
    if unit_um is None or not ppu > 0:
        return None, None
    mpp = unit_um / ppu
    lo, hi = _PLAUSIBLE_MPP
    return (mpp, source) if lo <= mpp <= hi else (None, None)


def ome_mpp(xml: str) -> float | None:
    """``Pixels/@PhysicalSizeX`` of the first OME image, in µm (None when absent or unknown)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    unit = _UNIT_UM.get(pixels.get("PhysicalSizeXUnit", "µm"))
    try:
        size = float(pixels.get("PhysicalSizeX", ""))
    except ValueError:
        return None
    return size * unit if unit is not None and math.isfinite(size) and size > 0 else None


def ome_origin(xml: str) -> tuple[float, float, str] | None:
    """``Plane/@PositionY``, ``@PositionX`` of the first OME image's first plane, as written by
    :func:`write_ome_tiff` (``origin``): ``(y, x, "µm")`` for a length unit (converted to µm)
    or ``(y, x, "pixel")``; None when absent, not finite or in another unit."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    plane = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Plane"), None)
    if plane is None or plane.get("PositionX") is None or plane.get("PositionY") is None:
        return None
    out = []
    for axis in "YX":
        unit = plane.get(f"Position{axis}Unit", "µm")
        scale = 1.0 if unit == "pixel" else _UNIT_UM.get(unit)
        try:
            value = float(plane.get(f"Position{axis}", ""))
        except ValueError:
            return None
        if scale is None or not math.isfinite(value):
            return None
        out.append((value * scale, "pixel" if unit == "pixel" else "µm"))
    (y, uy), (x, ux) = out
    return (y, x, uy) if uy == ux else None


def _svs_meta(description: str) -> dict:
    try:
        return dict(tifffile.tifffile.svs_description_metadata(description))
    except ValueError:
        return {}
