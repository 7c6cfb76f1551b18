"""Slide-scale staining on a dask.distributed cluster: ``iter_stain_distributed``.

The same tiles, seeds, stitching and post-processing as :func:`inference.iter_stain`, with the
batches of tiles run as tasks on dask workers (a ``LocalCluster`` of processes by default, or an
existing cluster given by its scheduler address: SLURM, Kubernetes, ...; see docs/cluster.md):

- each task is one batch of tiles in grid order (the batches ``iter_stain`` would make); the
  worker reads its tiles' H&E windows itself from the slide file (only the path, level and
  region travel; an in-memory image is scattered to the workers once);
- each worker process loads the checkpoint once (cache keyed by path, mtime and size; the file's
  SHA-256 must equal the client's) and runs one batch at a time with ``torch`` using as many
  threads as the worker has;
- results come back as tasks finish and are stitched in grid order, so the output equals
  ``iter_stain``'s for the same seed (each tile's noise depends on its position only);
- closing the generator cancels the outstanding tasks (and closes a cluster it started); a
  failed task raises :class:`WorkerTaskError` naming its tiles.

Needs the optional ``distributed`` package (``pip install napari-staindiffuser[cluster]``).
No napari, no Qt.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .assemble import _Assembler, _Geometry
from .events import Event, JobError, Progress
from .inference import (
    MIN_REGION_MODEL_PX,
    DiffusionTileModel,
    StainResult,
    _BatchDone,
    _check_image,
    _eta,
    _finish,
    _iter_batch,
    _open_outputs,
    _prepare_out,
    _stitch,
    plan_grid,
)
from .tiling import Stitcher

__all__ = ["WorkerTaskError", "iter_stain_distributed", "preload_model", "stain_region_distributed"]
__all__ += ["start_local_cluster"]


class WorkerTaskError(JobError):
    """A task failed on a dask worker; ``tiles`` are the indices (grid order) of its tiles."""

    def __init__(self, message: str, tiles: tuple[int, ...]):
        super().__init__(message)
        self.tiles = tiles


# ---------------------------------------------------------------------------------------------
# What travels to the workers: small, picklable descriptions (never weights, never slide pixels)


@dataclass(frozen=True)
class _FileSource:
    """Level ``level`` of the slide file ``path``; the workers open it themselves."""

    path: str
    level: int
    shape: tuple[int, int, int]  # the level's shape seen by the client (checked on the worker)


@dataclass(frozen=True)
class _ModelSpec:
    path: str
    sha256: str  # model_hash() of the client's file: the workers' file must be the same
    sampler: str
    steps: int
    aux: bool
    device: str
    precision: str
    torch_threads: int | None  # None: the worker's number of threads
    client_pid: int  # a worker in the client's process (processes=False) leaves torch alone


class _Head:
    """The client's stand-in for the workers' DiffusionTileModel, from the checkpoint's config
    alone (no weights): tile geometry, stains, sampler and steps, mask decoding."""

    decode_mask = DiffusionTileModel.decode_mask  # reads self.model.config only

    def __init__(self, config, provenance, sampler, steps):
        from .sampling import resolve_sampling

        self.model = SimpleNamespace(config=config, sampling_defaults=provenance.get("sampling"))
        self.stains, self.tile, self.mpp = config.stains, config.image_size, config.mpp
        self.multiple_of = config.downsample_factor
        self.sampler, self.steps = resolve_sampling(self.model, sampler, steps)  # as on workers


# ---------------------------------------------------------------------------------------------
# Worker side: per-process caches and the task


_CACHE_LOCK = threading.Lock()
_RUN_LOCK = threading.Lock()  # one batch through the network at a time per worker process
_MODELS: dict[tuple, Any] = {}  # (path, mtime_ns, size, device) -> StainDiffuser
_SLIDES: dict[tuple, Any] = {}  # (path, mtime_ns, size) -> io.Slide


def _file_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size


def _worker_model(spec: _ModelSpec):
    """The checkpoint's model, loaded once per process and file version (then cached)."""
    from .model.checkpoint import load_checkpoint, model_hash
    from .training import resolve_device

    key = (*_file_key(spec.path), spec.device)
    with _CACHE_LOCK:
        model = _MODELS.get(key)
        if model is None:
            sha = model_hash(spec.path)
            if sha != spec.sha256:
                raise ValueError(
                    f"checkpoint {spec.path} on this worker has SHA-256 {sha}, the client's has "
                    f"{spec.sha256}: every worker must see the same checkpoint file"
                )
            for old in [k for k in _MODELS if k[0] == spec.path]:
                del _MODELS[old]  # an older version of the file
            model = load_checkpoint(spec.path).model
            model.to(resolve_device(spec.device))
            _MODELS[key] = model
    return model


class _SyncLevel:
    """A slide level (dask array) read with the synchronous scheduler inside a worker task."""

    def __init__(self, level):
        self._level = level
        self.shape, self.dtype = level.shape, level.dtype

    def __getitem__(self, key):
        return np.asarray(self._level[key].compute(scheduler="synchronous"))


def _worker_image(source):
    if not isinstance(source, _FileSource):
        return source  # a scattered in-memory array
    from .io import open_slide

    key = _file_key(source.path)
    with _CACHE_LOCK:
        slide = _SLIDES.get(key)
        if slide is None:
            for old in [k for k in _SLIDES if k[0] == source.path]:
                _SLIDES.pop(old).close()
            slide = _SLIDES[key] = open_slide(source.path)
    if source.level >= len(slide.levels):
        raise ValueError(
            f"{source.path} on this worker has {len(slide.levels)} levels; the client planned "
            f"on level {source.level}: every worker must see the same slide file"
        )
    level = slide.levels[source.level]
    if tuple(level.shape) != source.shape:
        raise ValueError(
            f"{source.path} level {source.level} is {tuple(level.shape)} on this worker, "
            f"{source.shape} on the client: every worker must see the same slide file"
        )
    return _SyncLevel(level)


class _LockedTileModel(DiffusionTileModel):
    def run(self, tiles, seeds, stains):
        with _RUN_LOCK:  # reading windows (outside) overlaps with another batch's sampling
            yield from super().run(tiles, seeds, stains)


def _stain_batch(source, chunk, geo, stains, seed, samples, spec: _ModelSpec):
    """The task: read, stain and post-process one batch of tiles on a worker.

    Returns (_BatchDone, the worker's DiffusionTileModel.describe())."""
    import torch

    threads = spec.torch_threads
    if threads is None and os.getpid() != spec.client_pid:
        from distributed import get_worker

        threads = get_worker().state.nthreads
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    image = _worker_image(source)
    tm = _LockedTileModel(
        _worker_model(spec),
        sampler=spec.sampler,
        steps=spec.steps,
        aux=spec.aux,
        precision=spec.precision,
    )
    for ev in _iter_batch(image, tm, chunk, geo, stains, seed, samples):
        if isinstance(ev, _BatchDone):
            return ev, tm.describe()
    raise RuntimeError("internal error: a batch ended without a result")


# ---------------------------------------------------------------------------------------------
# Client side


def _source(slide_or_path, level, mpp, model_mpp):
    """-> (task source, level shape (H, W, 3), level used, µm/px of that level or None)."""
    from .io import Slide, open_slide

    if isinstance(slide_or_path, (str, os.PathLike)):
        slide = open_slide(slide_or_path, mpp=mpp)
        try:
            return _source(slide, level, None, model_mpp)
        finally:
            slide.close()
    if isinstance(slide_or_path, Slide):
        slide = slide_or_path
        if mpp is not None:
            raise ValueError("mpp= is for a path or an array; a Slide carries its own mpp")
        if level is None:
            level = slide.best_level_for(model_mpp) if slide.mpp is not None else 0
        if not (isinstance(level, int) and 0 <= level < len(slide.levels)):
            raise ValueError(f"level must be 0..{len(slide.levels) - 1}; got {level!r}")
        lvl = slide.levels[level]
        shape = tuple(int(s) for s in lvl.shape)
        if slide.path is not None and Path(slide.path).is_file():
            src = _FileSource(str(Path(slide.path).resolve()), level, shape)
        else:
            src = np.asarray(lvl)
        return src, shape, level, slide.level_mpp(level)
    if level not in (None, 0):
        raise ValueError(f"level is for slides; an array has one level (got level={level!r})")
    _check_image(slide_or_path)
    arr = np.asarray(
        slide_or_path.compute() if hasattr(slide_or_path, "compute") else slide_or_path
    )
    return arr, tuple(arr.shape), 0, mpp


def _address(scheduler, n_workers, threads_per_worker) -> str | None:
    """The scheduler's address (None: start a LocalCluster), validated before any work."""
    if scheduler is None:
        for name, v in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        return None
    address = getattr(scheduler, "scheduler_address", scheduler)
    if not isinstance(address, str) or not address:
        raise TypeError(
            "scheduler must be a scheduler address such as 'tcp://10.0.0.5:8786' (or a cluster "
            f"object with .scheduler_address); got {type(scheduler).__name__}"
        )
    return address


def start_local_cluster(
    n_workers: int = 2, threads_per_worker: int = 1, *, processes: bool = True, **kwargs
):
    """A ``distributed.LocalCluster`` set up for staining (what ``iter_stain_distributed``
    starts): dashboard on a free port, quiet logs, and worker processes without dask's
    ``MALLOC_TRIM_THRESHOLD_=65536``, which makes torch on the CPU 1.5-2x slower (every large
    tensor is then mmap-ed and page-faulted afresh). ``kwargs`` go to LocalCluster."""
    import logging

    import dask
    from distributed import LocalCluster

    kw = {"dashboard_address": ":0", "silence_logs": logging.ERROR, **kwargs}
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes, **kw
        )


def _connect(address, n_workers, threads_per_worker, processes, timeout, cluster_kwargs):
    """-> (client, cluster we started or None, description)."""
    from distributed import Client

    if address is None:
        cluster = start_local_cluster(
            n_workers, threads_per_worker, processes=processes, **(cluster_kwargs or {})
        )
        try:
            client = Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        return client, cluster, f"LocalCluster({n_workers} x {threads_per_worker} threads)"
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(
            f"cannot reach a dask scheduler at {address!r} within {timeout:g} s "
            f"({type(exc).__name__}: {exc}); is the cluster running and the address right?"
        ) from exc
    return client, None, address


def iter_stain_distributed(
    slide_or_path,
    model_path: str | os.PathLike | None = None,
    region: tuple[int, int, int, int] | None = None,
    *,
    scheduler=None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    processes: bool = True,
    level: int | None = None,
    mpp: float | None = None,
    stains: Sequence[str] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    tile: int | None = None,
    overlap: int | None = None,
    batch: int = 8,
    samples: int = 1,
    aux: bool = True,
    device: str = "auto",
    precision: str = "fp32",
    torch_threads: int | None = None,
    out_path: str | os.PathLike | None = None,
    stem: str | None = None,
    metadata: dict | None = None,
    timeout: float = 10.0,
    cluster_kwargs: dict | None = None,
) -> Iterator[Event]:
    """Stain a region on dask workers; yields the events of :func:`inference.iter_stain`.

    Parameters
    ----------
    slide_or_path : path, io.Slide or array (H, W, 3) uint8
        A slide file (the workers open it: they need read access to the same path), a Slide
        (read by path when it has one) or an in-memory image (scattered to the workers once).
    model_path : path, optional
        Checkpoint (.safetensors); the bundled distilled model by default. The workers load
        it from this path (same file on every worker: checked by SHA-256).
    region : (y, x, h, w), optional
        In pixels of the level used; the whole level by default.
    scheduler : str or cluster, optional
        None: start a ``LocalCluster`` of ``n_workers`` processes (``processes=False``: threads)
        with ``threads_per_worker`` threads each, closed at the end. An address such as
        ``"tcp://host:8786"`` (or an object with ``.scheduler_address``, e.g. a SLURMCluster):
        use that cluster, left running. ``timeout`` (s) bounds the connection attempt.
    level : int, optional
        Slide level; default the coarsest level at least as fine as the model's µm/px (as
        ``staindiffuser stain``), level 0 when the pixel size is unknown.
    mpp : float, optional
        µm/px of level 0 of a path (overrides the file's) or of an array.
    stains, sampler, steps, seed, tile, overlap, batch, samples, aux
        As :func:`inference.iter_stain`; one task stains one batch of ``batch`` tiles.
    out_path, stem, metadata
        As :func:`inference.iter_stain` (``stem`` default: the slide file's, else "image"):
        the result streams, band by band, to temporary files in ``out_path`` that become the
        pyramidal OME-TIFFs; nothing is written when the run is cancelled or fails.
    device, precision : str
        Resolved on each worker ("auto": its GPU if it has one), as for ``iter_stain``.
    torch_threads : int, optional
        torch threads per worker process; default the worker's number of threads.
    cluster_kwargs : dict, optional
        More keyword arguments for ``LocalCluster`` (e.g. ``dashboard_address=":8787"``).

    Yields
    ------
    Progress (stage "cluster" while starting or connecting, then "sampling" as tasks finish),
    TileStained for every tile in grid order, then one StainResult whose provenance also says
    where it ran (``"cluster"``) and, with ``out_path``, the files written (``"files"``).

    Raises
    ------
    ConnectionError
        No scheduler at ``scheduler`` within ``timeout``.
    WorkerTaskError
        A task failed on a worker (message and ``.tiles`` name its tiles).
    """
    from .checkpoint_meta import default_model_path, model_hash, read_config

    address = _address(scheduler, n_workers, threads_per_worker)
    for name, v in (("batch", batch), ("samples", samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
    model_path = Path(model_path or default_model_path()).expanduser().resolve()
    if not model_path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {model_path}")
    config, ckpt_provenance = read_config(model_path)
    head = _Head(config, ckpt_provenance, sampler, steps)  # None: the model's own
    src, shape, level, image_mpp = _source(slide_or_path, level, mpp, config.mpp)
    h_img, w_img = int(shape[0]), int(shape[1])
    ry, rx, rh, rw = region if region is not None else (0, 0, h_img, w_img)
    if rh < 1 or rw < 1 or ry < 0 or rx < 0 or ry + rh > h_img or rx + rw > w_img:
        raise ValueError(
            f"region (y={ry}, x={rx}, h={rh}, w={rw}) must be non-empty and lie inside the "
            f"image of {h_img} x {w_img} px (level {level})"
        )
    stains = list(stains) if stains is not None else list(head.stains)
    unknown = [s for s in stains if s not in head.stains]
    if unknown or not stains:
        raise ValueError(f"unknown stains {unknown}: the model makes {list(head.stains)}")
    grid, scale = plan_grid(
        (rh, rw),
        model_tile=head.tile,
        multiple_of=head.multiple_of,
        model_mpp=head.mpp,
        image_mpp=image_mpp,
        tile=tile,
        overlap=overlap,
    )
    if min(grid.height, grid.width) < MIN_REGION_MODEL_PX:
        raise ValueError(
            f"region of {rh} x {rw} px is {grid.height} x {grid.width} px at the model's "
            f"{head.mpp:g} um/px: too small to stain; expected at least {MIN_REGION_MODEL_PX} px "
            f"a side ({MIN_REGION_MODEL_PX * head.mpp:g} um)"
        )
    geo = _Geometry(ry, rx, rh, rw, grid.height, grid.width, image_mpp or head.mpp)
    out_dir = _prepare_out(out_path)  # a read-only or full disk fails now, not at the end
    spec = _ModelSpec(
        str(model_path), model_hash(model_path), head.sampler, head.steps, bool(aux),
        str(device), str(precision), torch_threads, os.getpid(),
    )  # fmt: skip
    tiles = grid.tiles
    total = len(tiles)
    batches = [tiles[b0 : b0 + batch] for b0 in range(0, total, batch)]

    yield Progress(0, total, stage="cluster")
    t0 = time.perf_counter()
    client, cluster, where = _connect(
        address, n_workers, threads_per_worker, processes, timeout, cluster_kwargs
    )
    sink = None
    pending: dict = {}  # future -> batch index
    try:
        from distributed import as_completed

        if not isinstance(src, _FileSource):
            src = client.scatter(src, broadcast=True, hash=False)
        sink = _open_outputs(out_dir, geo, stains, samples)
        asm = _Assembler(head, stains, geo, samples, sink)
        stitcher = Stitcher(grid, asm.shape[2], out=asm)
        run_id = uuid.uuid4().hex[:8]
        ac = as_completed(loop=client.loop)
        submitted = 0

        def submit_more() -> None:
            nonlocal submitted
            # a window of tasks in flight: bounded client memory for results that wait their turn
            window = max(4, 2 * sum(client.nthreads().values()))
            while submitted < len(batches) and len(pending) < window:
                fut = client.submit(
                    _stain_batch, src, batches[submitted], geo, stains, seed, samples, spec,
                    key=f"staindiffuser-batch-{run_id}-{submitted}", pure=False,
                )  # fmt: skip
                pending[fut] = submitted
                ac.add(fut)
                submitted += 1

        submit_more()
        ready: dict[int, _BatchDone] = {}
        described: dict = {}
        nxt = finished = done = 0
        for fut in ac:
            i = pending.pop(fut)
            try:
                res, described = fut.result()
            except Exception as exc:
                chunk = batches[i]
                raise WorkerTaskError(
                    f"tiles {chunk[0].index}-{chunk[-1].index} (tile row {chunk[0].row}, "
                    f"col {chunk[0].col} onwards; batch {i}) failed on a dask worker: "
                    f"{type(exc).__name__}: {exc}",
                    tuple(t.index for t in chunk),
                ) from exc
            fut.release()
            ready[i] = res
            finished += len(res.tiles)
            yield Progress(finished, total, stage="sampling", eta_s=_eta(t0, finished, total))
            while nxt in ready:  # stitch in grid order (as iter_stain: same sums, same output)
                res = ready.pop(nxt)
                nxt += 1
                asm.dab_stains = res.dab_stains
                eta_s = _eta(t0, finished, total)  # from the tiles sampled so far
                yield from _stitch(stitcher, res, done, total, lambda _, e=eta_s: e)
                done += len(res.tiles)
            submit_more()
        stitcher.finish()
        provenance = {
            **described,  # a worker's DiffusionTileModel: sampler, steps, precision, device...
            "model": model_path.name,
            "model_sha256": spec.sha256,
            "stains": stains,
            "seed": seed,
            "region": [ry, rx, rh, rw],
            "level": level,
            "tile": grid.tile,
            "overlap": grid.overlap,
            "samples": samples,
            "image_mpp": image_mpp,
            "mpp_assumed": image_mpp is None,
            "scale_input_px_per_model_px": scale,
            "tiles": total,
            "batch": batch,
            "cluster": where,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if isinstance(src, _FileSource):
            provenance["source"] = src.path
        provenance.update(metadata or {})
        if stem is None:
            stem = Path(src.path).stem if isinstance(src, _FileSource) else "image"
        yield _finish(asm, sink, geo, provenance, stem, image_mpp)
    finally:  # errors while cleaning up must not hide the one that got us here
        with contextlib.suppress(Exception):
            if pending:
                client.cancel(list(pending), force=True)
        pending.clear()
        with contextlib.suppress(Exception):
            client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()
        if out_dir is not None and sink is not None:
            sink.close()


def preload_model(
    client, model_path: str | os.PathLike | None = None, device: str = "auto"
) -> dict[str, str]:
    """Load the checkpoint on every worker of ``client`` now (each worker otherwise loads it on
    its first task): fails early when a worker cannot read it. Returns worker -> device."""
    from .checkpoint_meta import default_model_path, model_hash

    path = Path(model_path or default_model_path()).expanduser().resolve()
    spec = _ModelSpec(str(path), model_hash(path), "", 0, True, str(device), "fp32", None, 0)
    return client.run(_preload, spec)


def _preload(spec: _ModelSpec) -> str:
    return str(next(_worker_model(spec).parameters()).device)


def stain_region_distributed(slide_or_path, model_path=None, region=None, **kwargs) -> StainResult:
    """Run :func:`iter_stain_distributed` to the end and return its StainResult."""
    result = None
    for ev in iter_stain_distributed(slide_or_path, model_path, region, **kwargs):
        result = ev
    if not isinstance(result, StainResult):
        raise RuntimeError("internal error: the run ended without a result")
    return result
