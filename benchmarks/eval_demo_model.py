"""Quality of a model on held-out SYNTHETIC patches (the bundled model by default).

Held-out patches come from ``synthetic_pairs`` with a master seed never used in training
(training used seed 0), at the model's patch size and pixel size. For each stain it samples the
virtual IHC and the auxiliary mask with the default sampler (`sampling.resolve_sampling`)
and prints a Markdown table:

- PSNR and SSIM of the virtual IHC against the true IHC;
- Dice of the positive-cell mask (auxiliary branch) against the true mask, pooled over pixels;
- the same for trivial baselines: the H&E itself as the "IHC", the mean training IHC colour, and an
  all-positive mask; and for the untrained network of the same architecture.

    python benchmarks/eval_demo_model.py [--model M] [--n 64] [--sampler S] [--steps N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from napari_staindiffuser.demo import dice, image_scores
from napari_staindiffuser.model import StainDiffuser
from napari_staindiffuser.model.checkpoint import bundled_model_path, load_checkpoint
from napari_staindiffuser.pairs import resize_patch, synthetic_pairs
from napari_staindiffuser.sampling import (
    from_uint8_rgb,
    resolve_sampling,
    resolve_spacing,
    sample,
    to_uint8_rgb,
)

HELD_OUT_SEED = 777_000_001
SYNTHETIC_SIZE = 256  # px of the rendered synthetic patches, downsampled to the model's size


def held_out_pairs(config, stain, n):
    """``n`` held-out synthetic pairs of ``stain`` at the model's field of view (256 px)."""
    mpp = config.image_size * config.mpp / SYNTHETIC_SIZE
    return synthetic_pairs(HELD_OUT_SEED, n, stains=[stain], size=SYNTHETIC_SIZE, mpp=mpp)


def resized(pairs, px):
    """(H&E uint8 (N, px, px, 3), IHC uint8 (N, px, px, 3), mask bool (N, px, px))."""
    he = np.stack([resize_patch(p.he, px, is_mask=False) for p in pairs])
    ihc = np.stack([resize_patch(p.ihc, px, is_mask=False) for p in pairs])
    masks = np.stack([resize_patch(p.mask, px, is_mask=True) for p in pairs])
    return he, ihc, masks


def held_out_patches(config, stain, n):
    """The held-out patches of ``stain`` at the model's patch size, see :func:`resized`."""
    return resized(held_out_pairs(config, stain, n), config.image_size)


def evaluate(model, pairs, stain, steps=None, seed=0, sampler=None):
    px = model.config.image_size
    he, ihc, masks = resized(pairs, px)
    virt, pred = [], []
    for i in range(0, len(pairs), 16):
        r = sample(
            model,
            from_uint8_rgb(he[i : i + 16]),
            stains=[stain],
            sampler=sampler,
            steps=steps,
            seed=seed + i,
        )
        virt.append(to_uint8_rgb(r.images[stain]))
        pred.append(r.aux_mask.get(stain, np.zeros((len(r.images[stain]), px, px), bool)))
    virt, pred = np.concatenate(virt), np.concatenate(pred)

    def mean_scores(a):
        s = [image_scores(x, t) for x, t in zip(a, ihc, strict=True)]
        return np.mean([v["psnr"] for v in s]), np.mean([v["ssim"] for v in s])

    return {
        "model": (*mean_scores(virt), dice(pred, masks)),
        "H&E as IHC": (*mean_scores(he), float("nan")),
        "all-positive mask": (float("nan"), float("nan"), dice(np.ones_like(masks), masks)),
        "_virt": virt,
        "_ihc": ihc,
        "_he": he,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=64, help="held-out patches per stain")
    p.add_argument("--sampler", help="default: the model's (sampling.resolve_sampling)")
    p.add_argument("--steps", type=int, help="default: the model's")
    p.add_argument("--untrained", action="store_true", help="also score an untrained network")
    args = p.parse_args()
    path = args.model or bundled_model_path()
    ckpt = load_checkpoint(path)
    model = ckpt.model.eval()
    cfg = model.config
    sampler, steps = resolve_sampling(model, args.sampler, args.steps)
    spacing = resolve_spacing(model, sampler, steps)
    print(
        f"model {path} ({ckpt.provenance.get('steps', '?')} training steps), "
        f"{args.n} held-out patches per stain (master seed {HELD_OUT_SEED}), "
        f"{sampler} {steps} steps on the {spacing} grid, torch {torch.__version__}"
    )
    print("| stain | method | PSNR (dB) | SSIM | Dice |")
    print("|---|---|---|---|---|")
    t0 = time.perf_counter()
    for stain in cfg.stains:
        pairs = held_out_pairs(cfg, stain, args.n)
        res = evaluate(model, pairs, stain, steps, sampler=sampler)
        # mean training-IHC colour baseline
        ihc = res["_ihc"]
        flat = np.broadcast_to(ihc.reshape(-1, 3).mean(0).round().astype(np.uint8), ihc.shape)
        s = [image_scores(f, t) for f, t in zip(flat, ihc, strict=True)]
        res["mean IHC colour"] = (
            np.mean([v["psnr"] for v in s]),
            np.mean([v["ssim"] for v in s]),
            float("nan"),
        )
        if args.untrained:
            torch.manual_seed(0)
            raw = StainDiffuser(cfg).eval()
            res["untrained network"] = evaluate(raw, pairs, stain, steps, sampler=sampler)["model"]
        for name, row in res.items():
            if name.startswith("_"):
                continue
            ps, ss, d = row
            cells = [f"{v:.3f}" if np.isfinite(v) else "-" for v in (ss, d)]
            ps_cell = f"{ps:.2f}" if np.isfinite(ps) else "-"
            print(f"| {stain} | {name} | {ps_cell} | {cells[0]} | {cells[1]} |", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
