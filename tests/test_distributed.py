"""Staining on a dask.distributed cluster (cluster.py): same output as iter_stain, streamed
events, cancellation, errors. Workers are processes (LocalCluster(processes=True))."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")

from napari_staindiffuser.cluster import WorkerTaskError, iter_stain_distributed  # noqa: E402
from napari_staindiffuser.events import Progress  # noqa: E402
from napari_staindiffuser.inference import StainResult, TileStained, iter_stain  # noqa: E402
from napari_staindiffuser.io import open_slide, write_ome_tiff  # noqa: E402
from napari_staindiffuser.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

from conftest import untrained_model  # noqa: E402

RUN = dict(steps=2, seed=7, tile=32, overlap=8, batch=2)  # 3 x 3 tiles on 72 x 72 px: 5 tasks


def _he(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Pink tissue with purple nuclei, (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (232, 168, 200)
    yy, xx = np.mgrid[:h, :w]
    for cy, cx, r in zip(
        rng.integers(0, h, 40), rng.integers(0, w, 40), rng.integers(2, 5, 40), strict=True
    ):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (110, 60, 150)
    return img


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    ckpt = save_checkpoint(d / "tiny.safetensors", untrained_model(32))
    slide = write_ome_tiff(d / "he.ome.tif", _he(80, 90), mpp=1.0)  # the model's 1 um/px
    return ckpt, slide


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client

    from napari_staindiffuser.cluster import start_local_cluster

    with start_local_cluster(2, 1) as cl, Client(cl, set_as_default=False) as client:
        yield cl, client


@pytest.fixture
def one_thread():
    """torch with 1 thread here, as on the workers (1 thread each): the same float reduction
    order, so the outputs can be compared exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cluster_idle(client, wait_s: float = 30.0) -> bool:
    """True once the scheduler holds no task and no worker executes one."""
    t_end = time.monotonic() + wait_s
    while time.monotonic() < t_end:
        n_sched = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        busy = client.run(lambda dask_worker: len(dask_worker.state.executing))
        if n_sched == 0 and not any(busy.values()):
            return True
        time.sleep(0.2)
    return False


def test_equals_iter_stain_and_streams_events(files, cluster, one_thread):
    ckpt, slide_path = files
    cl, client = cluster
    region = (5, 10, 72, 72)
    slide = open_slide(slide_path)
    ref = list(iter_stain(slide.levels[0], load_checkpoint(ckpt).model, region=region,
                          image_mpp=1.0, **RUN))  # fmt: skip
    events = list(
        iter_stain_distributed(slide_path, ckpt, region, scheduler=cl.scheduler_address, **RUN)
    )
    assert isinstance(events[0], Progress) and events[0].stage == "cluster"
    assert any(isinstance(e, Progress) and e.stage == "sampling" for e in events)
    tiles = [e for e in events if isinstance(e, TileStained)]
    ref_tiles = [e for e in ref if isinstance(e, TileStained)]
    assert [t.done for t in tiles] == list(range(1, 10))  # in grid order
    assert [t.box for t in tiles] == [t.box for t in ref_tiles]
    res, want = events[-1], ref[-1]
    assert isinstance(res, StainResult) and isinstance(want, StainResult)
    # exactly equal: same batches, seeds from tile positions, stitching in grid order, same
    # torch thread count (other counts change float rounding: rare 1-level uint8 differences)
    for st in want.images:
        np.testing.assert_array_equal(res.images[st], want.images[st])
        np.testing.assert_array_equal(res.masks[st], want.masks[st])
        np.testing.assert_array_equal(res.scores[st], want.scores[st])
    for a, b in zip(tiles, ref_tiles, strict=True):
        for st in b.images:
            np.testing.assert_array_equal(a.images[st], b.images[st])
    assert res.provenance["cluster"] == cl.scheduler_address
    assert res.provenance["steps"] == 2 and res.region == region
    assert _cluster_idle(client)  # every future released


def test_own_local_cluster_in_memory_image_and_files(files, tmp_path, one_thread):
    ckpt, _ = files
    img = _he(40, 48, seed=1)
    out = tmp_path / "out"
    events = list(
        iter_stain_distributed(
            img, ckpt, n_workers=1, processes=False, mpp=1.0, out_path=out, **RUN
        )
    )
    res = events[-1]
    want = list(iter_stain(img, load_checkpoint(ckpt).model, image_mpp=1.0, **RUN))[-1]
    for st in want.images:
        np.testing.assert_array_equal(res.images[st], want.images[st])
    written = res.provenance["files"]
    assert set(written) == set(want.images)
    back = open_slide(written["CD3"]["virtual"]).levels[0].compute()
    np.testing.assert_array_equal(back, res.images["CD3"])


def test_closing_early_cancels_tasks_and_writes_nothing(files, cluster, tmp_path):
    ckpt, slide_path = files
    cl, client = cluster
    out = tmp_path / "out"
    gen = iter_stain_distributed(
        slide_path, ckpt, scheduler=cl.scheduler_address, out_path=out, **{**RUN, "batch": 1}
    )  # 12 tasks, at most 4 in flight
    for ev in gen:
        if isinstance(ev, Progress) and ev.stage == "sampling":
            break
    assert ev.done < ev.total
    n_sched = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
    assert n_sched > 0  # tasks were still outstanding
    gen.close()
    assert _cluster_idle(client)
    assert list(out.iterdir()) == []  # no output, not even a temporary file


def test_worker_error_names_the_tiles(files, cluster, tmp_path):
    ckpt, _ = files
    cl, _ = cluster
    path = write_ome_tiff(tmp_path / "he.ome.tif", _he(40, 40), mpp=1.0)
    gen = iter_stain_distributed(path, ckpt, scheduler=cl.scheduler_address, **RUN)
    assert next(gen).stage == "cluster"  # planned on the client: now change the file
    write_ome_tiff(path, _he(48, 40), mpp=1.0)
    with pytest.raises(WorkerTaskError, match=r"tiles \d-\d .*failed on a dask worker.*same slide"):
        list(gen)


@pytest.mark.timeout(60)  # the connection attempt is bounded by timeout=2 s, not a hang
def test_bad_scheduler_address_fails_fast(files):
    ckpt, _ = files
    with socket.socket() as s:  # a free port: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    img = _he(40, 40)
    with pytest.raises(ConnectionError, match="cannot reach a dask scheduler"):
        list(iter_stain_distributed(img, ckpt, scheduler=f"tcp://127.0.0.1:{port}", timeout=2,
                                    mpp=1.0, **RUN))  # fmt: skip
    with pytest.raises(TypeError, match="scheduler must be"):  # before any event
        next(iter_stain_distributed(img, ckpt, scheduler=8786, mpp=1.0, **RUN))


def test_cli_stain_on_a_cluster(files, cluster, tmp_path):
    from napari_staindiffuser.cli import main

    ckpt, slide_path = files
    cl, _ = cluster
    out = tmp_path / "out"
    args = ["stain", str(slide_path), "--model", str(ckpt), "--steps", "2", "--batch", "4"]
    assert main([*args, "--precision", "fp32", "--out", str(out), "--scheduler",
                 cl.scheduler_address]) == 0  # fmt: skip
    prov = json.loads((out / "he.ome_provenance.json").read_text())
    assert prov["cluster"] == cl.scheduler_address and prov["tiles"] == 12
    assert len(list(out.glob("*.ome.tif"))) == 4  # virtual + mask for CD3 and CK8/18
