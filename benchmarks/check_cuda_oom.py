"""Real CUDA out-of-memory recovery: the batch halves, the job goes on, the pixels do not change.

The GPU's memory is capped with ``torch.cuda.set_per_process_memory_fraction`` so that the
requested batch cannot fit; the region is then stained with that batch, and again with a batch
that fits. Prints the requested and final batch, the peak memory and whether both results are
identical (they must be: each tile's noise comes from its position, not its batch).
``tests/test_fastpaths.py`` checks the same logic with a simulated OOM on machines without a GPU.

    python benchmarks/check_cuda_oom.py --preset paper --size 768 --batch 512 --cap-gib 6
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from napari_staindiffuser.config import preset
from napari_staindiffuser.inference import StainResult, iter_stain
from napari_staindiffuser.model import StainDiffuser
from napari_staindiffuser.synthetic import SyntheticSlide


def stain(model, img, batch, args) -> tuple[StainResult, float]:
    t0 = time.perf_counter()
    res = None
    for ev in iter_stain(
        img, model, steps=args.steps, batch=batch, device=args.device,
        image_mpp=model.config.mpp, precision="bf16" if args.device == "cuda" else "fp32",
    ):  # fmt: skip
        if isinstance(ev, StainResult):
            res = ev
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512, help="the batch that must not fit")
    ap.add_argument("--fits", type=int, default=8, help="a batch that fits")
    ap.add_argument("--cap-gib", type=float, default=6.0, help="memory cap on the GPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = StainDiffuser(preset(args.preset)).to(args.device).eval()
    slide = SyntheticSlide(seed=7, shape=(args.size + 256, args.size + 256), mpp=model.config.mpp)
    img = np.ascontiguousarray(slide.render(128, 128, args.size, args.size).he)
    cap = "none (not CUDA: nothing can run out of memory)"
    if args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
        torch.cuda.reset_peak_memory_stats()
        cap = f"{args.cap_gib:g} GiB of {total / 2**30:.0f} GiB"
    big, t_big = stain(model, img, args.batch, args)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    ok, t_ok = stain(model, img, args.fits, args)
    same = all(
        np.array_equal(big.images[s], ok.images[s]) and np.array_equal(big.masks[s], ok.masks[s])
        for s in big.images
    )
    p = big.provenance
    print(
        f"\n{args.preset} preset, {args.size}^2 px ({p['tiles']} tiles), {args.steps} steps, "
        f"device {args.device}, cap {cap}\n"
    )
    print("| batch requested | batch in the end | peak GiB | s | same pixels as batch "
          f"{args.fits} |")  # fmt: skip
    print("|---|---|---|---|---|")
    print(f"| {p['batch_requested']} | {p['batch']} | {peak:.2f} | {t_big:.1f} | {same} |")
    print(f"| {args.fits} | {ok.provenance['batch']} | - | {t_ok:.1f} | - |")


if __name__ == "__main__":
    main()
