"""Time to stain a region: per model preset and precision, on the CPU (and CUDA when present).

A ``--size`` x ``--size`` px region (default 1024) of a SYNTHETIC slide rendered at the model's
own µm/px is stained with ``iter_stain`` (the default sampler, DDIM on the Karras grid, with
``--steps`` 20, one sample, all the model's stains with their auxiliary branches, as the demo
does). Prints a Markdown table: tiles, tiles/s, Mpx/s (region pixels per second), seconds, and
the time a 400 Mpx slide of tissue would take at that rate (issue 6's paper-scale goal; real
slides are partly glass, whose tiles are skipped). "small" is the bundled model; "distilled" its
distilled student (the default for staining), sampled with its own 4 steps whatever ``--steps``
says; "tiny" and "paper" are untrained models of those presets (speed only). "paper" runs on
CUDA only unless named in ``--presets``.

    python benchmarks/bench_region.py                          # tiny + small, fp32 + bf16
    python benchmarks/bench_region.py --presets small --precisions bf16 --threads 2
    python benchmarks/bench_region.py --presets distilled --precisions bf16   # the default model
    python benchmarks/bench_region.py --breakdown              # where the time goes (estimates)
    python benchmarks/bench_region.py --devices cuda --batch auto

``--breakdown`` times one sampler step per variant (branches, tile size, batch, threads) with
``inference.time_batch`` and multiplies out to the region: ``ceil(tiles / batch) * steps * t``.
The machine's load average is printed beside every row: timings on a busy machine are skewed.
Not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
import torch

from napari_staindiffuser.config import preset
from napari_staindiffuser.inference import (
    DiffusionTileModel,
    StainResult,
    iter_stain,
    plan_grid,
    time_batch,
)
from napari_staindiffuser.model import StainDiffuser
from napari_staindiffuser.runtime import configure_threads, cpu_has_native_bf16
from napari_staindiffuser.synthetic import SyntheticSlide


def load_model(name: str):
    if name in ("small", "distilled"):
        from napari_staindiffuser.model.checkpoint import bundled_model_path, load_checkpoint

        return load_checkpoint(bundled_model_path(distilled=name == "distilled")).model
    torch.manual_seed(0)
    return StainDiffuser(preset(name))


def region(size: int, mpp: float) -> np.ndarray:
    slide = SyntheticSlide(seed=20_261_128, shape=(size + 256, size + 256), mpp=mpp)
    return np.ascontiguousarray(slide.render(128, 128, size, size).he)


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def stain_row(name, model, img, device, precision, args) -> dict:
    model.to(device)
    kw = dict(
        steps=None if name == "distilled" else args.steps,  # None: the model's own
        batch=args.batch,
        device=str(device),
        image_mpp=model.config.mpp,
        precision=precision,
        compile=args.compile,
        tile=args.tile,
        overlap=args.overlap,
        aux=not args.no_aux,
    )
    # warm-up; with --compile on the whole region, so that every batch shape is compiled first
    for _ in iter_stain(img if args.compile else img[:128, :128], model, **{**kw, "steps": 1}):
        pass
    load0 = _load()
    t0 = time.perf_counter()
    res = None
    for ev in iter_stain(img, model, **kw):
        if isinstance(ev, StainResult):
            res = ev
    secs = time.perf_counter() - t0
    p = res.provenance
    return {
        "preset": name,
        "device": str(device),
        "precision": p["precision"],
        "tile": f"{p['tile']}/{p['overlap']}",
        "batch": p["batch"],
        "tiles": p["tiles"],
        "tiles/s": p["tiles"] / secs,
        "Mpx/s": img.shape[0] * img.shape[1] / secs / 1e6,
        "s": secs,
        "400 Mpx min": 400e6 / (img.shape[0] * img.shape[1] / secs) / 60,
        "sampler": f"{p['sampler']} {p['steps']} {p['spacing']}",
        "compiled": p["compiled"],
        "load": f"{load0:.1f}-{_load():.1f}",
    }


def breakdown(model, args) -> None:
    """One sampler step per variant, multiplied out to the region."""
    cfg = model.config
    size = args.size
    rows = []
    both, one = list(cfg.stains), list(cfg.stains[:1])
    variants = [
        ("demo: both stains + aux, fp32", dict(stains=both, aux=True), "fp32", None, 8),
        ("demo, bf16", dict(stains=both, aux=True), "bf16", None, 8),
        ("both stains, no aux, bf16", dict(stains=both, aux=False), "bf16", None, 8),
        ("one stain, no aux, bf16", dict(stains=one, aux=False), "bf16", None, 8),
        ("demo, bf16, batch 1", dict(stains=both, aux=True), "bf16", None, 1),
        ("demo, bf16, batch 32", dict(stains=both, aux=True), "bf16", None, 32),
        ("demo, bf16, tile 128 / overlap 16", dict(stains=both, aux=True), "bf16", 128, 4),
        ("demo, bf16, tile 256 / overlap 32", dict(stains=both, aux=True), "bf16", 256, 1),
    ]
    for label, kw, prec, tile, batch in variants:
        t = tile or cfg.image_size
        ov = 16 if tile == 128 else 32 if tile == 256 else None
        grid, _ = plan_grid(
            (size, size),
            model_tile=t,
            multiple_of=cfg.downsample_factor,
            model_mpp=cfg.mpp,
            image_mpp=cfg.mpp,
            tile=t,
            overlap=ov,
        )
        tm = DiffusionTileModel(model, precision=prec, aux=kw["aux"])
        tm.tile = t
        load0 = _load()
        step = min(time_batch(tm, batch=batch, stains=kw["stains"]) for _ in range(2))
        n = len(grid.tiles)
        est = math.ceil(n / batch) * args.steps * step
        px = n * t * t / (size * size)
        rows.append((label, t, grid.overlap, n, px, batch, step * 1000, est, load0))
    print(f"\nWhere the time goes: {size} x {size} px, {args.steps} steps (estimates)\n")
    print("| variant | tile | overlap | tiles | px computed / px | batch | ms per step | "
          "est. s | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]} | {r[6]:.0f} | "
              f"{r[7]:.1f} | {r[8]:.1f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", help="default: tiny small (+ paper on CUDA)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--devices", nargs="+", help="default: cpu, and cuda when present")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", help="int or 'auto' (default: 8 on the CPU, auto on CUDA)")
    ap.add_argument("--tile", type=int)
    ap.add_argument("--overlap", type=int)
    ap.add_argument("--no-aux", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, help="default: OMP_NUM_THREADS, else physical cores")
    ap.add_argument("--breakdown", action="store_true", help="only the where-the-time-goes table")
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    batch_arg = args.batch
    cuda = torch.cuda.is_available()
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"native CPU bf16: {cpu_has_native_bf16()}"
        + (f", GPU {torch.cuda.get_device_name()}" if cuda else "")
    )
    if args.breakdown:
        args.batch = 8
        breakdown(load_model("small"), args)
        return
    devices = args.devices or (["cpu", "cuda"] if cuda else ["cpu"])
    out = []
    for dev in devices:
        b = batch_arg or ("auto" if dev == "cuda" else "8")
        args.batch = b if b == "auto" else int(b)
        presets = args.presets or (["tiny", "small"] + (["paper"] if dev == "cuda" else []))
        for name in presets:
            model = load_model(name)
            img = region(args.size, model.config.mpp)
            for prec in args.precisions:
                row = stain_row(name, model, img, torch.device(dev), prec, args)
                out.append(row)
                print(row, flush=True)
    print(f"\n{args.size} x {args.size} px at the model's um/px, {args.steps} steps (distilled: "
          "its own 4), both stains + aux branches\n")  # fmt: skip
    cols = ["preset", "device", "precision", "compiled", "sampler", "tile", "batch", "tiles",
            "tiles/s", "Mpx/s", "s", "400 Mpx min", "load"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in out:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
