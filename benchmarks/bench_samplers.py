"""Few-step sampling at quality parity: every sampler x steps against the full DDPM reference.

On held-out SYNTHETIC patches (the same ones as ``eval_demo_model.py``: master seed
``HELD_OUT_SEED``, never used in training, downsampled to the model's patch size) it samples each
stain of each model with

- the reference: ancestral DDPM over all T training timesteps (T = 1000), once per model; its
  outputs are cached in an ``.npz`` under ``--cache`` so reruns skip it;
- every sampler of ``diffusion/samplers.py`` (DDPM, DDIM with eta = 0, DPM-Solver++(2M)) at each
  of ``--steps`` (default 4, 8, 10, 20, 50), from the same seeds as the reference;

and prints Markdown tables: PSNR and SSIM of the virtual IHC against the true IHC, Dice of the
auxiliary mask against the true positive-cell mask (pooled over pixels), the same three against
the reference's own output, the network evaluations (NFE) per tile and branch (counted, not
assumed), the wall seconds per tile (both branches of a stain, encoder included) and a PASS/FAIL
column for the parity goal of issue 6: SSIM at most 0.01 and Dice at most 0.02 below the
reference's (scores vs truth), for every stain. Being better than the reference counts as parity.

    python benchmarks/bench_samplers.py [--model M ...] [--n 16] [--steps 4 8 10 20 50]
    python benchmarks/bench_samplers.py --n 2 --reference-steps 50      # quick check
    python benchmarks/bench_samplers.py --spacing trailing linspace      # also other grids

``--spacing`` picks the timestep grid (``iter_sample(spacing=...)``; the pipeline's default is
"karras", Karras et al. 2022, since this benchmark showed it reaches parity; "trailing" was the
default before); rows of grids other than "karras" are labelled ``sampler/spacing``.

Timings depend on the machine and on its load (printed beside them); quality does not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from eval_demo_model import HELD_OUT_SEED, held_out_patches
from napari_staindiffuser.diffusion import SamplerKind
from napari_staindiffuser.metrics import dice, mean_image_scores
from napari_staindiffuser.model.checkpoint import bundled_model_path, load_checkpoint
from napari_staindiffuser.sampling import SampleResult, from_uint8_rgb, iter_sample, to_uint8_rgb

# The parity goal of issue 6 (scores against the synthetic truth, every stain).
MAX_SSIM_DROP = 0.01
MAX_DICE_DROP = 0.02
MAX_NFE = 20
# Models compared by default besides the bundled one, when present (the equal-budget v- and
# epsilon-prediction runs of issue 6; pass --model to choose others).


def image_scores(virtual: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean PSNR (dB; inf if a pair is identical) and SSIM over two uint8 (N, H, W, 3) stacks."""
    s = mean_image_scores(virtual, truth)
    return s["psnr"], s["ssim"]


_HELD_OUT: dict = {}


def held_out(config, stain: str, n: int):
    """:func:`held_out_patches`, rendered once per (patch size, pixel size, stain, n)."""
    key = (config.image_size, config.mpp, stain, n)
    if key not in _HELD_OUT:
        _HELD_OUT[key] = held_out_patches(config, stain, n)
    return _HELD_OUT[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sampler(model, he, stain, sampler, steps, *, seed, batch, device, spacing=None):
    """Sample ``stain`` for uint8 H&E tiles ``he`` (N, H, W, 3).

    Returns (virtual IHC uint8 (N, H, W, 3), aux mask bool (N, H, W), seconds per tile, NFE per
    tile and branch). Tile k always uses seed ``seed + k``, whatever the batching.
    """
    calls = [0]
    denoise = model.denoise

    def counting_denoise(*args, **kwargs):
        calls[0] += 1
        return denoise(*args, **kwargs)

    model.denoise = counting_denoise  # instance attribute: counts the network evaluations
    virt, masks, branches = [], [], 0
    try:
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, len(he), batch):
            cond = from_uint8_rgb(he[i : i + batch]).to(device)
            result = None
            for ev in iter_sample(
                model, cond, stains=[stain], sampler=sampler, steps=steps, seed=seed + i,
                spacing=spacing,
            ):  # fmt: skip
                result = ev
            assert isinstance(result, SampleResult)
            virt.append(to_uint8_rgb(result.images[stain]))
            px = he.shape[1]
            default = np.zeros((len(cond), px, px), bool)
            masks.append(result.aux_mask.get(stain, default))
            branches += 1 + (stain in result.aux_mask)
        _sync(device)
        seconds = (time.perf_counter() - t0) / len(he)
    finally:
        del model.denoise
    return np.concatenate(virt), np.concatenate(masks), seconds, calls[0] / branches


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def cached_reference(model, he, stain, steps, *, seed, batch, device, cache, digest):
    """The DDPM reference of one stain, from ``cache`` if it was computed before."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", stain)
    path = cache / f"ref-{digest}-{name}-n{len(he)}-ddpm{steps}-seed{seed}.npz"
    # tile k's result depends only on seed + k, so a cached run of more tiles serves too
    for other in sorted(cache.glob(f"ref-{digest}-{name}-n*-ddpm{steps}-seed{seed}.npz")):
        n = int(re.search(r"-n(\d+)-ddpm", other.name).group(1))
        if n >= len(he):
            z = np.load(other)
            virt, mask = z["virt"][: len(he)], z["mask"][: len(he)]
            return virt, mask, float(z["seconds"]), float(z["nfe"]), True
    virt, mask, seconds, nfe = run_sampler(  # all T timesteps: the grid does not matter
        model, he, stain, "ddpm", steps, seed=seed, batch=batch, device=device, spacing="trailing"
    )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, virt=virt, mask=mask, seconds=seconds, nfe=nfe)
    os.replace(tmp, path)
    return virt, mask, seconds, nfe, False


def scores(virt, mask, truth_ihc, truth_mask, ref_virt=None, ref_mask=None) -> dict:
    out = dict(zip(("psnr", "ssim"), image_scores(virt, truth_ihc), strict=True))
    out["dice"] = dice(mask, truth_mask)
    if ref_virt is not None:
        out["psnr_ref"], out["ssim_ref"] = image_scores(virt, ref_virt)
        out["dice_ref"] = dice(mask, ref_mask)
    return out


def evaluate_model(path, args, device) -> dict:
    """All rows for one model: {"rows": [...], "meta": {...}}."""
    ckpt = load_checkpoint(path)
    model = ckpt.model.eval().to(device)
    cfg = model.config
    ref_steps = args.reference_steps or cfg.schedule.num_train_timesteps
    digest = file_digest(Path(path))
    meta = {
        "model": str(path),
        "training_steps": ckpt.provenance.get("steps", "?"),
        "prediction": cfg.schedule.prediction_type.value,
        "reference": f"ddpm {ref_steps}",
        "stains": list(cfg.stains),
    }
    print(
        f"\n### {Path(path).name}: {meta['prediction']}, "
        f"{meta['training_steps']} training steps, reference DDPM {ref_steps} steps",
        flush=True,
    )
    if device.type == "cuda":  # first-call start-up out of the timings
        warm = held_out(cfg, cfg.stains[0], 1)[0]
        run_sampler(model, warm, cfg.stains[0], "ddim", 2, seed=0, batch=1, device=device)
    rows = []
    for stain in cfg.stains:
        he, ihc, true_mask = held_out(cfg, stain, args.n)
        ref_virt, ref_mask, ref_s, ref_nfe, hit = cached_reference(
            model,
            he,
            stain,
            ref_steps,
            seed=args.seed,
            batch=args.batch,
            device=device,
            cache=args.cache,
            digest=digest,
        )
        ref = scores(ref_virt, ref_mask, ihc, true_mask)
        print(
            f"  {stain}: reference {'from cache' if hit else f'{ref_s:.2f} s/tile'}, "
            f"PSNR {ref['psnr']:.2f} SSIM {ref['ssim']:.4f} Dice {ref['dice']:.4f}",
            flush=True,
        )
        rows.append(
            {
                "stain": stain,
                "sampler": "ddpm",
                "steps": ref_steps,
                "nfe": ref_nfe,
                "s_tile": float("nan") if hit else ref_s,  # a cached time may be another device's
                "reference": True,
                **ref,
            }
        )
        runs = [
            (s, n, args.seed, sp) for sp in args.spacing for s in args.samplers for n in args.steps
        ]
        if args.noise_floor:  # the reference again from other seeds: seed-to-seed spread
            runs.insert(0, ("ddpm", ref_steps, args.seed + 10_000, "trailing"))
        for sampler, steps, seed, spacing in runs:
            virt, mask, s_tile, nfe = run_sampler(
                model,
                he,
                stain,
                sampler,
                steps,
                seed=seed,
                batch=args.batch,
                device=device,
                spacing=spacing,
            )
            sc = scores(virt, mask, ihc, true_mask, ref_virt, ref_mask)
            sc["ssim_drop"] = ref["ssim"] - sc["ssim"]
            sc["dice_drop"] = ref["dice"] - sc["dice"]
            rows.append(
                {
                    "stain": stain,
                    # the label carries a non-default timestep spacing: "ddim/linspace"
                    "sampler": sampler if spacing == "karras" else f"{sampler}/{spacing}",
                    "spacing": spacing,
                    "steps": steps,
                    "nfe": nfe,
                    "s_tile": s_tile,
                    "reference": False,
                    "seed": seed,
                    **sc,
                }
            )
    return {"meta": meta, "rows": rows}


def _f(v, fmt):
    return "-" if v is None or not np.isfinite(v) else format(v, fmt)


def print_tables(res: dict, seed: int) -> None:
    rows = res["rows"]
    stains = res["meta"]["stains"]
    keys = []  # (sampler, steps, seed) in run order
    for r in rows:
        k = (r["sampler"], r["steps"], r.get("seed"), r["reference"])
        if k not in keys:
            keys.append(k)
    print(
        "\nMean over stains; drops are the worst stain's (reference minus sampler, vs truth); "
        "parity: every stain within 0.01 SSIM and 0.02 Dice of the reference.\n"
    )
    print(
        "| sampler | steps | NFE | s/tile | PSNR | SSIM | Dice | SSIM drop | Dice drop "
        "| PSNR vs ref | SSIM vs ref | Dice vs ref | parity |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for sampler, steps, s, is_ref in keys:
        sel = [
            r
            for r in rows
            if (r["sampler"], r["steps"], r.get("seed"), r["reference"])
            == (sampler, steps, s, is_ref)
        ]
        m = {k: float(np.mean([r[k] for r in sel])) for k in ("psnr", "ssim", "dice", "s_tile")}
        name = sampler + (" (reference)" if is_ref else "")
        if s is not None and s != seed:
            name += " (other seeds)"
        if is_ref:
            rest = "- | - | - | - | - | -"
        else:
            ok = all(
                r["ssim_drop"] <= MAX_SSIM_DROP and r["dice_drop"] <= MAX_DICE_DROP for r in sel
            )
            rest = " | ".join(
                [
                    _f(max(r["ssim_drop"] for r in sel), "+.4f"),
                    _f(max(r["dice_drop"] for r in sel), "+.4f"),
                    _f(np.mean([r["psnr_ref"] for r in sel]), ".2f"),
                    _f(np.mean([r["ssim_ref"] for r in sel]), ".4f"),
                    _f(np.mean([r["dice_ref"] for r in sel]), ".4f"),
                    "PASS" if ok else "FAIL",
                ]
            )
        nfe = max(r["nfe"] for r in sel)
        print(
            f"| {name} | {steps} | {nfe:g} | {_f(m['s_tile'], '.3f')} | {_f(m['psnr'], '.2f')} "
            f"| {_f(m['ssim'], '.4f')} | {_f(m['dice'], '.4f')} | {rest} |"
        )
    print("\nPer stain (vs truth | vs reference):\n")
    print(
        "| stain | sampler | steps | PSNR | SSIM | Dice | PSNR vs ref | SSIM vs ref | Dice vs ref |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for stain in stains:
        for r in rows:
            if r["stain"] != stain:
                continue
            name = r["sampler"] + (" (reference)" if r["reference"] else "")
            if r.get("seed") not in (None, seed):
                name += " (other seeds)"
            print(
                f"| {stain} | {name} | {r['steps']} | {r['psnr']:.2f} | {r['ssim']:.4f} "
                f"| {r['dice']:.4f} | {_f(r.get('psnr_ref'), '.2f')} "
                f"| {_f(r.get('ssim_ref'), '.4f')} | {_f(r.get('dice_ref'), '.4f')} |"
            )
    print("\nFewest steps at parity (every stain):")
    for sampler in dict.fromkeys(r["sampler"] for r in rows if not r["reference"]):
        sel = [r for r in rows if r["sampler"] == sampler and not r["reference"]]
        sel = [r for r in sel if r.get("seed") == seed]
        failing = {
            r["steps"]
            for r in sel
            if r["ssim_drop"] > MAX_SSIM_DROP or r["dice_drop"] > MAX_DICE_DROP
        }
        passing = sorted({r["steps"] for r in sel} - failing)
        goal = "goal met" if passing and passing[0] <= MAX_NFE else "goal NOT met"
        best = passing[0] if passing else "none"
        print(f"- {sampler}: {best} (passing: {passing}) -> {goal} (<= {MAX_NFE} NFE)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="checkpoint (repeatable); default: the bundled model",
    )
    p.add_argument("--n", type=int, default=16, help="held-out tiles per stain")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 10, 20, 50])
    p.add_argument(
        "--samplers",
        nargs="+",
        default=[k.value for k in SamplerKind],
        choices=[k.value for k in SamplerKind],
    )
    p.add_argument(
        "--reference-steps",
        type=int,
        default=None,
        help="DDPM steps of the reference (default: T, all training timesteps)",
    )
    p.add_argument(
        "--spacing",
        nargs="+",
        default=["karras"],
        choices=["trailing", "linspace", "leading", "karras"],
        help="timestep grids to try (the pipeline's default: karras)",
    )
    p.add_argument("--seed", type=int, default=0, help="tile k uses seed SEED + k")
    p.add_argument(
        "--noise-floor",
        action="store_true",
        help="also run the reference from other seeds (the seed-to-seed spread)",
    )
    p.add_argument("--batch", type=int, default=16, help="tiles per network call")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("runs/bench_samplers"),
        help="folder for the cached reference outputs",
    )
    p.add_argument("--json", type=Path, default=None, help="also write all rows here")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1 or min(args.steps) < 1:
        p.error("--n, --batch and --steps must be >= 1")
    models = args.model or [str(bundled_model_path())]
    device = torch.device(args.device)
    print(
        f"bench_samplers: {args.n} held-out tiles per stain (master seed {HELD_OUT_SEED}), "
        f"seeds {args.seed}..{args.seed + args.n - 1}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        "NFE: network evaluations per tile and branch (each stain samples a generation and a mask "
        "branch); s/tile: wall seconds per tile for both branches."
    )
    results = []
    for path in models:
        res = evaluate_model(path, args, device)
        print_tables(res, args.seed)
        results.append(res)
        if args.json:  # after every model, so a run cut short keeps what it finished
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
