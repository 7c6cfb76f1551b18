"""Scaling of staining on a dask LocalCluster: tiles/s with 1, 2, ... worker processes.

Prints a Markdown table (copy it into docs/cluster.md). Each worker has 1 thread and torch uses
1 thread in it, so N workers use N cores; on a machine with fewer free cores than workers the
speed-up is capped by the cores, not by the cluster. Not a test: nothing asserts on time.

    python benchmarks/bench_distributed.py                       # 1 and 2 workers, bundled model
    python benchmarks/bench_distributed.py --workers 1 2 4 --size 768 --batch 2

The region is a square of ``--size`` level-0 px at the centre of the bundled CMU-1 sample
(0.499 µm/px, so ``size / 2`` px at the demo model's 1 µm/px). Each cluster is started, warmed
up (every worker loads the model and stains one batch), then timed over the whole region; the
cluster start-up is not in the timing. The baseline row is ``inference.iter_stain`` in this
process with torch on 1 thread. All rows must give the same output (checked).

"worker CPU s/tile" is the CPU time the workers (the in-process row: this process) spent per
tile, "client CPU s" what this process (client, scheduler and nannies) spent during a cluster
run: both hardly depend on the machine's load, unlike the wall-clock columns. On a busy Linux
machine with autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) the whole
benchmark shares one CPU slot with every other session, so more workers cannot get more CPU:
run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import numpy as np
import torch


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def _last(events):
    return collections.deque(events, maxlen=1)[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=512, help="region side, level-0 px")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1, help="tiles per task")
    ap.add_argument("--model", help="checkpoint; default: the bundled model")
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-process row")
    args = ap.parse_args(argv)

    from distributed import Client

    from napari_staindiffuser.cluster import (
        iter_stain_distributed,
        preload_model,
        start_local_cluster,
    )
    from napari_staindiffuser.inference import StainResult, iter_stain
    from napari_staindiffuser.io import open_slide, sample_svs_path
    from napari_staindiffuser.model.checkpoint import bundled_model_path, load_checkpoint

    model_path = args.model or bundled_model_path()
    path = sample_svs_path()
    slide = open_slide(path)
    h, w = slide.shape
    s = min(args.size, h, w)
    region = ((h - s) // 2, (w - s) // 2, s, s)
    run = dict(steps=args.steps, seed=0, batch=args.batch, precision="fp32")
    print(
        f"region {s} x {s} px of {path.name} (level 0, {slide.mpp} um/px), {args.steps} steps, "
        f"batch {args.batch}, {os.cpu_count()} CPUs\n"
    )
    rows, outputs = [], {}
    torch.set_num_threads(1)
    if not args.no_baseline:
        model = load_checkpoint(model_path).model
        list(iter_stain(slide.levels[0], model, region=(*region[:2], 64, 64),  # warm-up
                        image_mpp=slide.mpp, **run))  # fmt: skip
        load0 = _load()
        t0, c0 = time.perf_counter(), time.process_time()
        ev = _last(iter_stain(slide.levels[0], model, region=region, image_mpp=slide.mpp, **run))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert isinstance(ev, StainResult)
        outputs["in-process"] = ev
        rows.append(("in-process (1 thread)", ev.provenance["tiles"], dt, cpu, 0.0, load0,
                     _load()))  # fmt: skip
    for n in args.workers:
        with (
            start_local_cluster(n, 1) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            addr = cluster.scheduler_address
            preload_model(client, model_path)  # every worker loads the model now
            warm = (region[0], region[1], 128, 128 * 2 * n)  # a few tasks: kernels warmed up
            _last(iter_stain_distributed(path, model_path, warm, scheduler=addr, **run))
            load0 = _load()
            w0 = client.run(time.process_time)
            t0, c0 = time.perf_counter(), time.process_time()
            ev = _last(iter_stain_distributed(path, model_path, region, scheduler=addr, **run))
            dt, client_cpu = time.perf_counter() - t0, time.process_time() - c0
            w1 = client.run(time.process_time)
            cpu = sum(w1[k] - w0[k] for k in w1)
        assert isinstance(ev, StainResult)
        outputs[n] = ev
        rows.append((f"{n} worker{'s' if n > 1 else ''} x 1 thread", ev.provenance["tiles"], dt,
                     cpu, client_cpu, load0, _load()))  # fmt: skip

    ref_key = args.workers[0]
    base = next(r for r in rows if r[0].startswith(str(ref_key)))
    print("| run | tiles | seconds | tiles/s | speed-up vs 1st cluster row | worker CPU s/tile "
          "| client CPU s | load before/after |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, tiles, dt, cpu, client_cpu, l0, l1 in rows:
        print(f"| {name} | {tiles} | {dt:.1f} | {tiles / dt:.2f} | {base[2] / dt:.2f}x | "
              f"{cpu / tiles:.2f} | {client_cpu:.1f} | {l0} -> {l1} |")  # fmt: skip
    ref = outputs[ref_key]
    same = all(
        all(np.array_equal(o.images[st], ref.images[st]) for st in ref.images)
        for o in outputs.values()
    )
    print(f"\nidentical virtual stains in every row: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
