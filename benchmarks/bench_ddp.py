"""Data-parallel training speed: N processes (torch DDP via torchrun) x T threads, per preset.

Prints a Markdown table of seconds per training step (median over the timed steps, after
``--skip`` warm-up steps) for each preset and each layout ``PxT`` (P processes, T torch threads
each), the machine's load average before and after each row, and the CPU time one process takes
to build its rows of the global batch from ``--patch`` px patches, as ``make_batch`` does for a
patch folder (resize to the model's size, augment). The timed runs themselves train on
in-memory synthetic pairs, downsampled once up front. On CUDA it adds the peak GPU memory of
rank 0.

    python benchmarks/bench_ddp.py                              # CPU: tiny and small, 1x2 vs 2x1
    python benchmarks/bench_ddp.py --device cuda --presets paper --layouts 1 --batch 4,8,16,32 \\
        --ddp                                                   # one GPU, through DDP

``--ddp`` launches single-process layouts through torchrun as well (DDP with one rank), so the
memory figure includes DDP's gradient buckets. Each row runs in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.abspath(__file__)


def _worker(args: argparse.Namespace) -> None:
    import torch

    from napari_staindiffuser.config import TrainConfig, preset
    from napari_staindiffuser.events import TrainStep
    from napari_staindiffuser.pairs import synthetic_pairs
    from napari_staindiffuser.training import iter_train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = preset(args.preset)
    mpp = config.image_size * config.mpp / args.patch  # patches downsampled to the model's µm/px
    source = synthetic_pairs(seed=0, n=args.pairs, stains=config.stains, size=args.patch, mpp=mpp)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch, warmup_steps=1, seed=0)
    times = []
    t0 = time.perf_counter()
    for ev in iter_train(tc, source, model_config=config, device=args.device):
        if isinstance(ev, TrainStep):
            now = time.perf_counter()
            times.append(now - t0)
            t0 = now
    if int(os.environ.get("RANK", "0")) == 0:
        timed = times[args.skip :]
        res = {"s_per_step": statistics.median(timed), "n": len(timed)}
        if args.device.startswith("cuda"):
            res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            res["gpu"] = torch.cuda.get_device_name()
        print("RESULT " + json.dumps(res), flush=True)


def _batch_build_ms(preset_name: str, batch: int, patch: int, pairs: int) -> float:
    import numpy as np

    from napari_staindiffuser.config import preset
    from napari_staindiffuser.pairs import make_batch, synthetic_pairs

    config = preset(preset_name)
    mpp = config.image_size * config.mpp / patch
    source = synthetic_pairs(seed=0, n=pairs, stains=config.stains, size=patch, mpp=mpp)
    kw = dict(
        image_size=config.image_size,
        stains=config.stains,
        need_mask=config.has_aux,
        distance_max=config.distance_max if config.aux_target.value == "distance" else None,
    )
    best = float("inf")
    for step in range(3):
        rng = np.random.default_rng([0, step])
        idx = rng.integers(len(source), size=batch)
        t0 = time.process_time()  # CPU time: less skewed by other processes than wall time
        make_batch([source[int(i)] for i in idx], rng=rng, augment=True, color_jitter=0.05, **kw)
        best = min(best, time.process_time() - t0)
    return best * 1000


def _run(args: argparse.Namespace, preset_name: str, batch: int, procs: int, threads: int):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    worker = [
        HERE,
        "--worker",
        "--presets", preset_name, "--batch", str(batch), "--steps", str(args.steps),
        "--skip", str(args.skip), "--device", args.device, "--threads", str(threads),
        "--patch", str(args.patch), "--pairs", str(args.pairs),
    ]  # fmt: skip
    if procs > 1 or args.ddp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(procs), *worker]
    else:
        cmd = [sys.executable, *worker]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--layouts", default="1x2,2x1", help="PxT: P processes x T threads (0: default)")
    p.add_argument("--batch", default="8", help="global batch size(s), comma-separated")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the timing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--patch", type=int, default=256, help="synthetic patch px (the paper: 256)")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--ddp", action="store_true", help="one-process layouts through torchrun too")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.preset = args.presets
        args.batch = int(args.batch)
        _worker(args)
        return

    import torch

    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}, "
        f"{args.steps} steps (median of the last {args.steps - args.skip}), "
        f"synthetic {args.patch} px patches\n"
    )
    gpu = args.device.startswith("cuda")
    head = "| preset | global batch | layout (procs x threads) | per process | s/step |"
    head += " GPU peak GiB (rank 0) |" if gpu else ""
    head += " rows build CPU ms | load before | load after |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name in args.presets.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            for layout in args.layouts.split(","):
                procs, _, threads = layout.partition("x")
                procs, threads = int(procs), int(threads or 0)
                build = _batch_build_ms(name, batch // procs, args.patch, args.pairs)
                load0 = os.getloadavg()[0]
                res = _run(args, name, batch, procs, threads)
                load1 = os.getloadavg()[0]
                row = f"| {name} | {batch} | {procs} x {threads or 'default'} | {batch // procs} "
                row += f"| {res['s_per_step']:.3f} |"
                row += f" {res['peak_gib']:.2f} |" if gpu else ""
                row += f" {build:.0f} | {load0:.1f} | {load1:.1f} |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
