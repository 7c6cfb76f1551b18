"""Progressive distillation of the bundled model: the recipe, and its quality table.

Three subcommands (run them in this order; each writes under ``--work``, default
``runs/distill``):

``prep``
    Renders the SYNTHETIC pairs once and caches them at the model's 64 px (``pairs.npz``):
    the training pairs of the teacher (master seed 0, 1,024 pairs) and the held-out pairs of
    ``benchmarks/eval_demo_model.py`` (master seed 777_000_001, ``--n`` per stain).
``distill``
    Distils the bundled model with :func:`napari_staindiffuser.distill.iter_distill` (teacher
    DDIM ``--teacher-steps`` -> ... -> ``--student-steps``), writing ``student-<N>step`` files.
``eval``
    Scores models on the held-out pairs and prints a Markdown table: PSNR/SSIM of the virtual
    IHC against the true IHC and Dice of the auxiliary mask against the true mask (pooled over
    pixels), for the teacher with DDPM 1000, DPM-Solver++ 20, DDIM 16/8/4/2 and for each
    student with its own DDIM steps. Same seeds for every row (noise seed 0 + tile index).

    python benchmarks/bench_distill.py prep --n 64
    python benchmarks/bench_distill.py distill --student-steps 2 --teacher-steps 16 \\
        --steps-per-stage 4000 --batch 64 --lr 2e-4 --device cuda
    python benchmarks/bench_distill.py eval --n 64 [--ddpm] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from napari_staindiffuser.pairs import InMemoryPairs, PairSample, resize_patch, synthetic_pairs

HELD_OUT_SEED = 777_000_001
TRAIN_SEED = 0
STAINS = ("CD3", "CK8/18")


def _pack(pairs, px: int) -> dict[str, np.ndarray]:
    return {
        "he": np.stack([resize_patch(p.he, px, is_mask=False) for p in pairs]),
        "ihc": np.stack([resize_patch(p.ihc, px, is_mask=False) for p in pairs]),
        "mask": np.stack([resize_patch(p.mask, px, is_mask=True) for p in pairs]),
        "stain": np.array([p.stain for p in pairs]),
    }


def _unpack(d: dict[str, np.ndarray], prefix: str, description: str) -> InMemoryPairs:
    he, ihc, mask, stain = (d[f"{prefix}_{k}"] for k in ("he", "ihc", "mask", "stain"))
    samples = [
        PairSample(he=he[i], ihc=ihc[i], stain=str(stain[i]), mask=mask[i]) for i in range(len(he))
    ]
    return InMemoryPairs(samples, description=description)


def _render(job: tuple[int, int, int, float, str, int]) -> dict[str, np.ndarray]:
    """Pairs ``lo..hi`` of ``synthetic_pairs(seed, ...)`` for one stain list, at ``px``."""
    seed, lo, hi, mpp, stains, px = job
    st = stains.split(",")
    pairs = synthetic_pairs(seed, hi, stains=st, size=256, mpp=mpp) if lo == 0 else None
    if pairs is None:  # patch i depends on (seed, i) only: render lo..hi without the ones before
        from napari_staindiffuser import synthetic as syn

        regions = []
        span = 16384
        for i in range(lo, hi):
            for attempt in range(100_000):
                sseed = int(syn._hash(seed, 7, i, attempt // 32)[0] >> np.uint64(33))
                slide = syn.SyntheticSlide(sseed, (span + 256, span + 256), mpp)
                u = syn._uniform(seed, 8, i, attempt, np.arange(2))
                y, x = int(u[0] * span), int(u[1] * span)
                if slide.tissue_fraction(y, x, 256, 256) >= 0.5:
                    regions.append(slide._render(y, x, 256, 256)[0])
                    break
        pairs = [
            PairSample(r.he, r.ihc[st[i % len(st)]], st[i % len(st)], r.masks[st[i % len(st)]])
            for i, r in zip(range(lo, hi), regions, strict=True)
        ]
    else:
        pairs = list(pairs)
    return _pack(pairs, px)


def cmd_prep(args) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from napari_staindiffuser.checkpoint_meta import bundled_model_path, read_config

    cfg, _ = read_config(bundled_model_path())
    px, size = cfg.image_size, 256
    mpp = cfg.image_size * cfg.mpp / size
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sets = [("train", TRAIN_SEED, 0, args.train_n, ",".join(STAINS))]
    sets += [
        (f"eval{s.replace('/', '')}", HELD_OUT_SEED, args.eval_from, args.n, s) for s in STAINS
    ]
    jobs, names = [], []
    for name, seed, first, n, stains in sets:
        chunk = max(1, -(-n // args.workers))
        for lo in range(first, first + n, chunk):
            jobs.append((seed, lo, min(first + n, lo + chunk), mpp, stains, px))
            names.append(name)
    with ProcessPoolExecutor(args.workers) as pool:
        parts = list(pool.map(_render, jobs))
    arrays: dict[str, np.ndarray] = {}
    for name, *_ in sets:
        mine = [p for p, nm in zip(parts, names, strict=True) if nm == name]
        for k in mine[0]:
            arrays[f"{name}_{k}"] = np.concatenate([p[k] for p in mine])
    desc = (
        f"synthetic pairs (seed={TRAIN_SEED}, n={args.train_n}, {size} px at {mpp:g} um/px, "
        f"stains={list(STAINS)})"
    )
    meta = {
        "train": desc, "train_n": args.train_n, "eval_n": args.n, "eval_from": args.eval_from,
        "px": px,
    }  # fmt: skip
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(work / "pairs.npz", **arrays)
    print(f"wrote {work / 'pairs.npz'} in {time.perf_counter() - t0:.0f} s: {meta}", flush=True)


def load_pairs(work: Path) -> tuple[dict, InMemoryPairs, dict[str, InMemoryPairs]]:
    d = dict(np.load(Path(work) / "pairs.npz"))
    meta = json.loads(str(d["meta"]))
    train = _unpack(d, "train", meta["train"] + f" (cached at {meta['px']} px)")
    held = {
        s: _unpack(d, f"eval{s.replace('/', '')}", f"held-out {s} (seed {HELD_OUT_SEED})")
        for s in STAINS
    }
    return meta, train, held


def cmd_distill(args) -> None:
    from napari_staindiffuser.distill import iter_distill, stage_plan
    from napari_staindiffuser.events import CheckpointSaved, Finished, TrainStep, Validation
    from napari_staindiffuser.model.checkpoint import bundled_model_path

    work = Path(args.work)
    _, train, held = load_pairs(work)
    val = InMemoryPairs([p for s in STAINS for p in held[s]][:: max(1, args.n_val_every)])
    teacher = args.teacher or bundled_model_path()
    out = work / f"student{args.tag}.safetensors"  # earlier stages: student<tag>-<N>step
    per_stage = [int(v) for v in str(args.steps_per_stage).split(",")]
    per_stage = per_stage[0] if len(per_stage) == 1 else per_stage
    if args.budget_s:  # size the stages to a time budget from a short timing probe
        n_stages = len(stage_plan(args.teacher_steps, args.student_steps))
        sec = probe(
            teacher, train, args.batch, args.student_steps, args.device,
            "karras" if args.grid == "teacher" else args.grid,  # same cost on any grid
            args.teacher_steps,
        )  # fmt: skip
        per_stage = max(1, int(args.budget_s / n_stages / sec))
        print(f"probe: {sec:.3f} s/step -> {per_stage} steps per stage", flush=True)
    print(
        f"distilling {teacher} -> {out}: DDIM {args.teacher_steps} ({args.grid} grid) -> "
        f"{args.student_steps}, "
        f"{per_stage} steps per stage, batch {args.batch}, lr {args.lr}, device {args.device}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}",
        flush=True,
    )
    t0 = time.perf_counter()
    for ev in iter_distill(
        teacher,
        out,
        train,
        student_steps=args.student_steps,
        teacher_steps=args.teacher_steps,
        grid=args.grid,
        init_student=args.init_student,
        stains=args.stains.split(",") if args.stains else None,
        branches=args.branches.split(",") if args.branches else None,
        step_weights=args.step_weights and [float(v) for v in args.step_weights.split(",")],
        steps_per_stage=per_stage,
        batch_size=args.batch,
        lr=args.lr,
        warmup_steps=args.warmup,
        ema_decay=args.ema,
        seed=args.seed,
        val_source=val,
        val_every=args.val_every,
        half=args.half,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    ):
        if isinstance(ev, TrainStep) and (ev.step % args.log_every == 0 or ev.step == 1):
            loss = {k: round(v, 5) for k, v in ev.losses.items()}
            print(
                f"step {ev.step}/{ev.total_steps} {time.perf_counter() - t0:.0f}s "
                f"{ev.it_per_s:.2f} it/s lr {ev.lr:.2e} {loss} load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        elif isinstance(ev, Validation):
            print(f"validation at {ev.step}: {json.dumps(ev.losses)}", flush=True)
        elif isinstance(ev, (CheckpointSaved, Finished)):
            print(ev, flush=True)
    print(f"distillation took {time.perf_counter() - t0:.0f} s", flush=True)


def probe(teacher_path, train, batch, n, device, grid, teacher_steps, steps=8) -> float:
    """Seconds per distillation step (forward, backward, AdamW) after 3 warm-up steps."""
    from napari_staindiffuser.distill import distill_losses, teacher_grid
    from napari_staindiffuser.model.checkpoint import load_checkpoint
    from napari_staindiffuser.pairs import make_batch
    from napari_staindiffuser.training import make_schedule

    dev = torch.device(device)
    teacher = load_checkpoint(teacher_path).model.to(dev).eval().requires_grad_(False)
    student = load_checkpoint(teacher_path).model.to(dev).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-9)
    cfg = teacher.config
    src = train.resized(cfg.image_size)
    b = make_batch([src[i % len(src)] for i in range(batch)], image_size=64, stains=cfg.stains)
    b = {k: torch.from_numpy(v).to(dev) for k, v in b.items()}
    sched = make_schedule(cfg)
    g = teacher_grid(sched, n, grid=grid, teacher_steps=teacher_steps)
    for k in range(3 + steps):
        if k == 3:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(k)
        total, _ = distill_losses(student, teacher, sched, n, b, gen, grid=g)
        opt.zero_grad()
        total.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    # + the batch making on the CPU
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    make_batch(
        [src[int(i)] for i in rng.integers(len(src), size=batch)],
        image_size=64, stains=cfg.stains, rng=rng, augment=True,
    )  # fmt: skip
    return (t1 - t0) / steps + (time.perf_counter() - t1)


def score(
    model,
    pairs,
    stain,
    *,
    sampler,
    steps,
    spacing=None,
    batch=64,
    seed=0,
    grid=None,
    reference=None,
):
    """(PSNR, SSIM, Dice, sharpness, seconds, virt, mask) of one model/sampler on held-out pairs
    of one stain; ``grid``: explicit DDIM timesteps; with ``reference`` (virt, mask of the DDPM
    1000 outputs) also (PSNR, SSIM, Dice) against it."""
    from napari_staindiffuser.demo import dice, image_scores
    from napari_staindiffuser.sampling import from_uint8_rgb, sample, to_uint8_rgb

    he = np.stack([p.he for p in pairs])
    ihc = np.stack([p.ihc for p in pairs])
    masks = np.stack([p.mask for p in pairs])
    dev = next(model.parameters()).device
    virt, pred = [], []
    own = getattr(model, "sampling_defaults", None)
    if grid is not None:  # sample on this grid: as if it were the model's own (restored below)
        model.sampling_defaults = {
            "sampler": "ddim", "steps": len(grid), "spacing": "custom", "timesteps": list(grid)
        }  # fmt: skip
        sampler, steps, spacing = "ddim", len(grid), "custom"
    t0 = time.perf_counter()
    for i in range(0, len(pairs), batch):
        r = sample(
            model,
            from_uint8_rgb(he[i : i + batch]).to(dev),
            stains=[stain],
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            seed=seed + i,
        )
        virt.append(to_uint8_rgb(r.images[stain]))
        pred.append(r.aux_mask[stain])
    secs = time.perf_counter() - t0
    model.sampling_defaults = own
    virt, pred = np.concatenate(virt), np.concatenate(pred)

    def scores(a, b, ma, mb):
        s = [image_scores(x, t) for x, t in zip(a, b, strict=True)]
        return [np.mean([v["psnr"] for v in s]), np.mean([v["ssim"] for v in s]), dice(ma, mb)]

    vs_ref = None if reference is None else scores(virt, reference[0], pred, reference[1])
    ps, ss, d = scores(virt, ihc, pred, masks)
    return ps, ss, d, sharpness(virt) / sharpness(ihc), secs, virt, pred, vs_ref


def sharpness(images: np.ndarray) -> float:
    """Mean absolute neighbour difference (uint8 (B, H, W, 3)): blur lowers it."""
    x = images.astype(np.float32)
    return float(np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean())


def cmd_eval(args) -> None:
    import re

    from napari_staindiffuser.demo import dice, image_scores
    from napari_staindiffuser.model.checkpoint import bundled_model_path, load_checkpoint

    work = Path(args.work)
    meta, _, held = load_pairs(work)
    dev = torch.device(args.device)
    teacher = load_checkpoint(args.teacher or bundled_model_path()).model.to(dev).eval()
    grids = [[int(t) for t in g.split(",")] for g in args.grids]
    rows = []  # (name, model, sampler, steps, spacing, grid)
    if args.dpm:
        rows.append(("teacher", teacher, "dpmsolver++", 20, args.teacher_spacing, None))
    rows += [("teacher", teacher, "ddim", n, args.teacher_spacing, None) for n in args.teacher_ddim]
    rows += [("teacher", teacher, "ddim", len(g), "custom", g) for g in grids]
    students = sorted(work.glob("student*.safetensors"))
    for path in students if args.students is None else args.students:
        ck = load_checkpoint(path)
        smp = ck.provenance["sampling"]
        name = f"student {Path(path).stem}"
        model = ck.model.to(dev).eval()
        rows.append((name, model, smp["sampler"], int(smp["steps"]), None, None))
        rows += [(name, model, "ddim", len(g), "custom", g) for g in grids]
    n = len(held[STAINS[0]])
    first = meta.get("eval_from", 0)
    print(
        f"{n} held-out SYNTHETIC pairs per stain (master seed {HELD_OUT_SEED}, pairs {first} to "
        f"{first + n - 1}), 64 px, noise seed 0; device {dev}, torch {torch.__version__}, load "
        f"{os.getloadavg()}"
    )
    print()
    print(
        "| stain | model | sampler | NFE | grid | PSNR (dB) | SSIM | Dice | sharpness | "
        "vs DDPM: PSNR | SSIM | Dice | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []

    def report(stain, name, sampler, steps, grid, r) -> None:
        ps, ss, d, sh, secs, _, _, vs = r
        results.append([name, sampler, steps, stain, ps, ss, d, sh, grid, vs])
        ref = "- | - | -" if vs is None else f"{vs[0]:.2f} | {vs[1]:.3f} | {vs[2]:.3f}"
        g = "-" if grid is None else ",".join(map(str, grid))
        print(
            f"| {stain} | {name} | {sampler} | {steps} | {g} | {ps:.2f} | {ss:.3f} | {d:.3f} | "
            f"{sh:.2f} | {ref} | {secs:.1f} |",
            flush=True,
        )

    refs = {}
    stains = args.stains.split(",") if args.stains else STAINS
    for stain in stains:
        pairs = held[stain]
        name = re.sub(r"[^A-Za-z0-9]+", "-", stain)
        if args.ddpm:  # compute the DDPM 1000 reference and keep its outputs beside the pairs
            r = score(teacher, pairs, stain, sampler="ddpm", steps=1000)
            refs[stain] = r[5], r[6]
            np.savez_compressed(
                work / f"ref-eval{first}-{name}-n{n}-ddpm1000-seed0.npz", virt=r[5], mask=r[6]
            )
            report(stain, "teacher", "ddpm", 1000, None, r)
        elif args.reference:  # DDPM 1000 outputs cached by this or benchmarks/bench_samplers.py
            files = sorted(Path(args.reference).glob(f"ref-*-{name}-n*-ddpm1000-seed0.npz"))
            if not files:
                raise ValueError(f"no cached DDPM 1000 reference for {stain} in {args.reference}")
            z = np.load(files[-1])
            virt, mask = z["virt"][: len(pairs)], z["mask"][: len(pairs)]
            if len(virt) < len(pairs):
                raise ValueError(f"{files[-1]} holds {len(virt)} tiles; need {len(pairs)}")
            refs[stain] = virt, mask
            ihc, truth = np.stack([p.ihc for p in pairs]), np.stack([p.mask for p in pairs])
            sc = [image_scores(x, t) for x, t in zip(virt, ihc, strict=True)]
            ps, ss = np.mean([v["psnr"] for v in sc]), np.mean([v["ssim"] for v in sc])
            r = (ps, ss, dice(mask, truth), sharpness(virt) / sharpness(ihc), 0.0, None, None, None)
            report(stain, "teacher (cached)", "ddpm", 1000, None, r)
    for name, model, sampler, steps, spacing, grid in rows:
        for stain in stains:
            r = score(
                model, held[stain], stain, sampler=sampler, steps=steps, spacing=spacing,
                grid=grid, reference=refs.get(stain),
            )  # fmt: skip
            report(stain, name, sampler, steps, grid, r)
    (work / f"eval{args.tag}.json").write_text(json.dumps(results, indent=1, default=float))


def cmd_table(args) -> None:
    """Merge every eval*.json under --work; differences to the teacher's DDPM 1000."""
    rows = []
    for path in sorted(Path(args.work).glob("eval*.json")):
        rows += json.loads(path.read_text())
    ref = {r[3]: r for r in rows if r[0] == "teacher" and r[1] == "ddpm"}
    print(
        "| model | sampler | NFE | stain | PSNR (dB) | SSIM | Dice | sharpness | "
        "ΔSSIM | ΔDice | parity |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, sampler, steps, stain, ps, ss, d, sh, *more in rows:
        if more and more[0]:  # an explicit grid (eval --grids)
            sampler = f"{sampler} on {','.join(map(str, more[0]))}"
        cells = ["-", "-", "-"]
        if stain in ref:
            dss, dd = ss - ref[stain][5], d - ref[stain][6]
            ok = abs(dss) <= 0.01 and abs(dd) <= 0.02
            cells = [f"{dss:+.3f}", f"{dd:+.3f}", "yes" if ok else "no"]
        print(
            f"| {name} | {sampler} | {steps} | {stain} | {ps:.2f} | {ss:.3f} | {d:.3f} | "
            f"{sh:.2f} | {' | '.join(cells)} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/distill", help="folder for pairs and students")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prep")
    q.add_argument("--n", type=int, default=64, help="held-out pairs per stain")
    q.add_argument("--train-n", type=int, default=1024)
    q.add_argument(
        "--eval-from", type=int, default=0, help="first held-out pair (64: a second, fresh set)"
    )
    q.add_argument("--workers", type=int, default=1, help="rendering processes")
    q.set_defaults(func=cmd_prep)
    q = sub.add_parser("distill")
    q.add_argument("--teacher", default=None, help="default: the bundled model")
    q.add_argument("--student-steps", type=int, default=4)
    q.add_argument("--teacher-steps", type=int, default=16)
    q.add_argument("--grid", choices=["karras", "trailing", "teacher"], default="karras")
    q.add_argument("--init-student", help="start the first stage from this student (continue)")
    q.add_argument("--stains", help="distil only these stains' branches (encoder frozen)")
    q.add_argument("--branches", help="distil only these branch kinds: gen,aux")
    q.add_argument("--step-weights", help="how often each student step is drawn, e.g. 1,1,1,4")
    q.add_argument("--steps-per-stage", default="1000", help="one value, or one per stage")
    q.add_argument("--batch", type=int, default=16)
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--warmup", type=int, default=50)
    q.add_argument("--ema", type=float, default=0.995)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--val-every", type=int, default=0)
    q.add_argument("--n-val-every", type=int, default=4, help="validate on every k-th pair")
    q.add_argument("--log-every", type=int, default=50)
    q.add_argument("--tag", default="", help="inserted in the student file names")
    q.add_argument("--half", action="store_true", help="store students as float16")
    q.add_argument("--checkpoint-every", type=int, default=0)
    q.add_argument("--budget-s", type=float, default=0, help="size the stages to this time")
    q.add_argument("--device", default="auto")
    q.set_defaults(func=cmd_distill)
    q = sub.add_parser("eval")
    q.add_argument("--teacher", default=None)
    q.add_argument("--students", nargs="*", default=None, help="default: <work>/student-*")
    q.add_argument("--teacher-ddim", type=int, nargs="*", default=[16, 8, 4, 2])
    q.add_argument(
        "--teacher-spacing", default=None, help="grid of the teacher's DDIM rows (default: karras)"
    )
    q.add_argument("--ddpm", action="store_true", help="also the teacher with DDPM 1000")
    q.add_argument("--no-dpm", dest="dpm", action="store_false", help="skip DPM-Solver++ 20")
    q.add_argument(
        "--reference", help="folder of DDPM 1000 outputs cached by bench_samplers.py (ref-*.npz)"
    )
    q.add_argument(
        "--grids", nargs="*", default=[], help="also every model on these DDIM grids: 999,831,77,7"
    )
    q.add_argument("--stains", help="only these stains (comma-separated; default: both)")
    q.add_argument("--tag", default="", help="eval<tag>.json")
    q.add_argument("--device", default="cpu")
    q.set_defaults(func=cmd_eval)
    q = sub.add_parser("table", help="merge the eval*.json files")
    q.set_defaults(func=cmd_table)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
