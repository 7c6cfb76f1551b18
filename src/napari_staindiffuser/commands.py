"""Slide-level subcommands of ``staindiffuser``: stain, synth, masks, patches, export.

Each one drains a core generator with a progress bar and prints where its outputs went. They are
registered on the parser by :func:`add_commands` (cli.py keeps train, info and demo).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np


def _csv(text: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None stays None."""
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def _floats(text: str | None, name: str) -> list[float] | None:
    try:
        return None if text is None else [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} needs comma-separated numbers; got {text!r}") from None


def _ints(text: str, n: int, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ValueError(f"{name} needs {n} comma-separated integers; got {text!r}")
    return values


def _bar(total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True)


def preview_png(path: Path, panels: list[tuple[str, np.ndarray]], max_side: int = 768) -> Path:
    """Side-by-side PNG of RGB or boolean panels (same size), downsampled to ``max_side``."""
    from skimage.transform import resize

    h, w = panels[0][1].shape[:2]
    f = min(1.0, max_side / max(h, w))
    size = (max(1, round(h * f)), max(1, round(w * f)))
    tiles = []
    for _, a in panels:
        if a.dtype == bool:
            a = np.repeat((a * 255).astype(np.uint8)[..., None], 3, 2)
        a = resize(a, size, order=1, anti_aliasing=f < 1, preserve_range=True).astype(np.uint8)
        tiles.append(np.pad(a, ((0, 0), (0, 6), (0, 0)), constant_values=255))
    import imagecodecs

    from .outputs import atomic_open

    with atomic_open(path) as fh:
        fh.write(imagecodecs.png_encode(np.ascontiguousarray(np.concatenate(tiles, 1)[:, :-6])))
    return path


def check_tissue(image, region: tuple[int, int, int, int], what: str) -> float:
    """The tissue fraction of ``region`` (y, x, h, w) of ``image``; a ValueError when it is
    under :data:`stain.MIN_TISSUE_FRACTION` (glass only: nothing to ``what``)."""
    from .stain import MIN_TISSUE_FRACTION, check_region_size, tissue_fraction

    y, x, h, w = region
    check_region_size(region, what)
    frac = tissue_fraction(image, region)
    if frac < MIN_TISSUE_FRACTION:
        raise ValueError(
            f"no tissue in the region (y={y}, x={x}, h={h}, w={w}): {frac:.2%} of its pixels, "
            f"under {MIN_TISSUE_FRACTION:.1%}; nothing to {what}: choose a region over tissue"
        )
    return frac


def stats_level(slide, max_pixels: int = 16_000_000):
    """The finest pyramid level with at most ``max_pixels`` pixels (the coarsest if none is):
    whole-slide DAB statistics are taken there, as the paper does, without reading level 0."""
    for lvl in slide.levels:
        if lvl.shape[0] * lvl.shape[1] <= max_pixels:
            return lvl
    return slide.levels[-1]


def level_region(region, shape0, shape) -> tuple[int, int, int, int]:
    """(x, y, w, h) in level-0 px -> (y, x, h, w) on a level of ``shape``, per-axis downsample,
    start floored and end ceiled, clipped to the level (whole level when ``region`` is None)."""
    if region is None:
        return 0, 0, int(shape[0]), int(shape[1])
    x, y, w, h = region
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > shape0[1] or y + h > shape0[0]:
        raise ValueError(
            f"region x={x}, y={y}, w={w}, h={h} must be non-empty and inside the slide "
            f"({shape0[1]} x {shape0[0]} px at level 0)"
        )
    fy, fx = shape0[0] / shape[0], shape0[1] / shape[1]
    y0, x0 = math.floor(y / fy), math.floor(x / fx)
    y1, x1 = min(shape[0], math.ceil((y + h) / fy)), min(shape[1], math.ceil((x + w) / fx))
    return y0, x0, max(1, y1 - y0), max(1, x1 - x0)


#: ``staindiffuser stain`` streams regions larger than this many pixels (at the level used) to disk
#: instead of holding the result in memory (``run_stain(stream=None)``)
STREAM_PIXELS = 4096 * 4096


def _file_preview(path: str, max_side: int) -> np.ndarray:
    """The coarsest pyramid level of an OME-TIFF written here whose longer side is still
    >= ``max_side`` (level 0 if none is): a preview panel without reading level 0."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        levels = tf.series[0].levels
        pick = levels[0]
        for lvl in levels[1:]:
            if max(lvl.shape[:2]) >= max_side:
                pick = lvl
        return pick.asarray()


def run_stain(
    slide_path: str | Path,
    *,
    model_path: str | Path | None = None,
    stains=None,
    region=None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch: int | str = 8,
    samples: int = 1,
    mpp: float | None = None,
    device: str = "auto",
    out: str | Path = "staindiffuser-out",
    log=print,
    image=None,
    precision: str = "auto",
    compile: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
    threads_per_worker: int = 1,
    stream: bool | None = None,
) -> dict:
    """Stain a region of a slide file (or of ``image``, a Slide) and write OME-TIFFs + preview.

    ``precision``, ``compile`` and ``batch="auto"``: see :func:`inference.iter_stain`.
    ``workers`` (a LocalCluster of that many processes) or ``scheduler`` (an existing dask
    cluster's address): stain on dask workers, :func:`cluster.iter_stain_distributed`.
    ``stream``: stream the result band by band to disk (``iter_stain(out_path=...)``: memory
    does not grow with the region; the same pixels) instead of holding it in memory; None:
    for regions over :data:`STREAM_PIXELS`. A streamed run's preview is made from the files'
    reduced levels and its ``result`` holds lazy views of the files."""
    from .events import Progress
    from .inference import StainResult, TileStained, iter_stain
    from .io import open_slide
    from .model.checkpoint import default_model_path, load_checkpoint, model_hash
    from .ome_tiff import write_stain_outputs
    from .outputs import prepare_output_dir, write_text_atomic
    from .training import resolve_device

    model_path = Path(model_path) if model_path else default_model_path()
    ckpt = load_checkpoint(model_path)
    slide = image if image is not None else open_slide(slide_path, mpp=mpp)
    model_mpp = ckpt.config.mpp
    if slide.mpp is None:
        log(
            f"{slide_path}: no pixel size in the file and no --mpp given: assuming the model's "
            f"own {model_mpp:g} um/px"
        )
        level, level_mpp = 0, None
    else:
        level = slide.best_level_for(model_mpp)
        level_mpp = slide.level_mpp(level)
    img = slide.levels[level]
    reg = level_region(region, slide.shape, img.shape[:2])
    out = prepare_output_dir(out)  # a read-only or full disk fails now, not after the staining
    check_tissue(img, reg, "stain")
    dev = resolve_device(device)
    ckpt.model.to(dev)
    from .sampling import resolve_sampling

    sampler, steps = resolve_sampling(ckpt.model, sampler, steps)  # None: the model's own
    px = f"{level_mpp:.3g} um/px" if level_mpp else "pixel size assumed"
    from .runtime import resolve_precision

    prec = resolve_precision(precision, dev)
    log(
        f"staining {reg[3]} x {reg[2]} px of level {level} ({px}) with "
        f"{model_path.name} on {dev}: {sampler}, {steps} steps, seed {seed}, {prec}, "
        f"batch {batch}"
    )
    bar = None
    result = None
    stem = Path(slide_path).stem if slide_path else "image"
    extra = {
        "model_file": model_path.name,
        "model_sha256": model_hash(model_path),
        "source": str(slide_path),
        "level": level,
        "region_level0_xywh": list(region) if region else None,
    }
    if stream is None:
        stream = reg[2] * reg[3] > STREAM_PIXELS
    streamed = {"out_path": out, "stem": stem, "metadata": extra} if stream else {}
    if stream:
        log(f"streaming the result to {out} (region of {reg[2] * reg[3] / 1e6:.0f} Mpx)")
    if workers or scheduler:
        from .cluster import iter_stain_distributed

        if batch == "auto" or compile:
            raise ValueError("--batch auto and --compile are for one process, not with a cluster")
        log(f"on dask workers: {scheduler or f'a local cluster of {workers} processes'}")
        events = iter_stain_distributed(
            slide, model_path, reg, scheduler=scheduler, n_workers=workers or 1,
            threads_per_worker=threads_per_worker, level=level, stains=stains, sampler=sampler,
            steps=steps, seed=seed, batch=batch, samples=samples, device=device,
            precision=precision, **streamed,
        )  # fmt: skip
    else:
        events = iter_stain(
            img,
            ckpt.model,
            region=reg,
            stains=stains,
            sampler=sampler,
            steps=steps,
            seed=seed,
            batch=batch,
            samples=samples,
            image_mpp=level_mpp,
            device=str(dev),
            precision=prec,
            compile=compile,
            **streamed,
        )
    for ev in events:
        if isinstance(ev, TileStained):
            if bar is None:
                bar = _bar(ev.total, "tile")
            bar.update(1)
        elif isinstance(ev, Progress) and ev.stage.startswith("out of memory"):
            log(ev.stage)
        elif isinstance(ev, StainResult):
            result = ev
    if bar is not None:
        bar.close()
    y, x, h, w = reg
    if stream:  # files written by the run; preview from their reduced levels, H&E strided
        prov = {k: v for k, v in result.provenance.items() if k != "files"}
        written = result.provenance["files"]
        s = max(1, max(h, w) // 768)
        panels = [("H&E", np.asarray(img[y : y + h : s, x : x + w : s]))]
        for stain, files in written.items():
            mask = _file_preview(files["mask"], 768).astype(bool)
            panels += [(f"virtual {stain}", _file_preview(files["virtual"], 768))]
            panels += [(f"{stain} mask", mask)]
    else:
        prov = {**result.provenance, **extra}
        written = write_stain_outputs(result, out, stem, level_mpp, provenance=prov)
        panels = [("H&E", np.asarray(img[y : y + h, x : x + w]))]
        for stain, rgb in result.images.items():
            panels += [(f"virtual {stain}", rgb), (f"{stain} mask", result.masks[stain])]
    preview = preview_png(out / f"{stem}_preview.png", panels)
    write_text_atomic(out / f"{stem}_provenance.json", json.dumps(prov, indent=2, default=str))
    log(f"preview: {preview}")
    for stain, files in written.items():
        for kind, p in files.items():
            log(f"{stain} {kind}: {p}")
    return {"files": written, "preview": str(preview), "provenance": prov, "result": result}


def _batch_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto'; got {text!r}")
    return value


def cmd_stain(args: argparse.Namespace) -> int:
    stains = _csv(args.stains) or None
    region = _ints(args.region, 4, "--region x,y,w,h") if args.region else None
    from .runtime import configure_threads

    configure_threads(args.threads)
    run_stain(
        args.slide,
        model_path=args.model,
        stains=stains,
        region=region,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        batch=args.batch,
        samples=args.samples,
        mpp=args.mpp,
        device=args.device,
        out=args.out,
        precision=args.precision,
        compile=args.compile,
        workers=args.workers,
        scheduler=args.scheduler,
        threads_per_worker=args.threads or 1,
        stream=args.stream,
    )
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .pairs import synthetic_pairs, write_pair_folder

    stains = [s.strip() for s in args.stains.split(",")]
    print(f"rendering {args.n} SYNTHETIC pairs ({args.size} px at {args.mpp:g} um/px) ...")
    pairs = synthetic_pairs(args.seed, args.n, stains=stains, size=args.size, mpp=args.mpp)
    root = write_pair_folder(args.out, pairs)
    print(f"paired-patch folder: {root} ({len(pairs)} pairs; manifest.csv)")
    return 0


def cmd_masks(args: argparse.Namespace) -> int:
    from .events import Progress
    from .io import open_slide, write_ome_tiff
    from .outputs import check_output_file
    from .stain import MaskTile, dab_statistics, get_preset, iter_coarse_masks

    check_output_file(args.out)  # before the slide-wide work, not after it
    slide = open_slide(args.ihc, mpp=args.mpp)
    preset = get_preset(args.stain)
    if args.rule:
        import dataclasses

        preset = dataclasses.replace(preset, rule=args.rule, fixed_threshold=args.threshold)
    if slide.mpp:
        preset = preset.at_mpp(slide.mpp)
    stats = dab_statistics(stats_level(slide))  # whole-slide statistics, reduced level
    img = slide.levels[0]
    # the full-resolution mask lives in a memory-mapped temporary file, not in RAM
    tmp = tempfile.TemporaryDirectory(prefix="staindiffuser-mask-", ignore_cleanup_errors=True)
    mask = np.lib.format.open_memmap(
        f"{tmp.name}/mask.npy", mode="w+", dtype=bool, shape=img.shape[:2]
    )
    positive = 0
    bar = None
    for ev in iter_coarse_masks(img, preset, stats=stats):
        if isinstance(ev, Progress):
            bar = bar or _bar(ev.total, "tile")
            bar.n = ev.done
            bar.refresh()
        elif isinstance(ev, MaskTile):
            mask[ev.y : ev.y + ev.mask.shape[0], ev.x : ev.x + ev.mask.shape[1]] = ev.mask
            positive += int(ev.mask.sum())
    if bar:
        bar.close()
    out = write_ome_tiff(
        args.out,
        mask,
        mpp=slide.mpp,
        metadata={
            "content": f"coarse {args.stain} mask",
            "source": str(args.ihc),
            "preset": preset.name,
            "rule": preset.rule.value,
            "dab_mean": stats.mean,
            "dab_std": stats.std,
        },
    )
    frac = positive / mask.size
    del mask
    tmp.cleanup()
    print(f"{frac:.2%} of the slide is positive; mask: {out}")
    return 0


def cmd_patches(args: argparse.Namespace) -> int:
    from .events import Progress
    from .io import open_slide
    from .pairs import InMemoryPairs, PairSample, write_pair_folder
    from .patches import PatchSpec, estimate_shift, iter_patch_pairs
    from .stain import dab_statistics

    he, ihc = open_slide(args.he, mpp=args.mpp), open_slide(args.ihc, mpp=args.mpp)
    reg = estimate_shift(he.levels[0], ihc.levels[0], mpp=he.mpp)
    print(reg.message())
    shift = None
    if not reg.ok:
        if not args.correct_shift:
            raise ValueError(
                "the pair is not registered well enough; rerun with --correct-shift to correct "
                "the translation, or register the slides first"
            )
        shift = (reg.dy, reg.dx)
    regions = (
        [_ints(r, 4, "--regions y,x,h,w") for r in args.regions.split(";")]
        if args.regions
        else None
    )
    spec = PatchSpec(patch=args.patch, max_patches=args.max, seed=args.seed)
    stats = dab_statistics(stats_level(ihc))  # whole-slide statistics, as `masks` takes them
    samples, bar = [], None
    for ev in iter_patch_pairs(
        he.levels[0],
        ihc.levels[0],
        args.stain,
        regions=regions,
        spec=spec,
        mpp=he.mpp,
        shift=shift,
        stats=stats,
    ):
        if isinstance(ev, Progress):
            bar = bar or _bar(ev.total, "window")
            bar.n = ev.done
            bar.refresh()
        elif isinstance(ev, PairSample):
            samples.append(ev)
    if bar:
        bar.close()
    if not samples:
        raise ValueError("no patch had enough tissue; check the regions and the H&E")
    root = write_pair_folder(args.out, InMemoryPairs(samples))
    print(f"{len(samples)} pairs written to {root}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .model.checkpoint import export_checkpoint

    path = export_checkpoint(
        args.checkpoint,
        args.out,
        timesteps=_ints(args.timesteps, args.timesteps.count(",") + 1, "--timesteps")
        if args.timesteps
        else None,
        half=args.half,
    )
    print(
        f"inference-only checkpoint (EMA weights, no optimizer state): {path} "
        f"({path.stat().st_size / 1e6:.1f} MB)"
    )
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import iter_distill
    from .events import CheckpointSaved, Finished, TrainStep, Validation
    from .model.checkpoint import read_config
    from .pairs import PairFolder, synthetic_pairs

    config, _ = read_config(args.teacher)
    only = _csv(args.stains)
    if args.data:
        source = PairFolder(args.data)
    elif args.synthetic > 0:
        size = 256
        mpp = config.image_size * config.mpp / size  # downsampled to the model's µm/px
        print(f"rendering {args.synthetic} SYNTHETIC pairs ...", flush=True)
        source = synthetic_pairs(
            args.seed, args.synthetic, stains=only or config.stains, size=size, mpp=mpp
        )
    else:
        raise ValueError("give training data: --data FOLDER (with manifest.csv) or --synthetic N")
    n_stages = len(args.steps_per_stage.split(","))
    per_stage = _ints(args.steps_per_stage, n_stages, "--steps-per-stage")
    bar = None
    for ev in iter_distill(
        args.teacher,
        args.out,
        source,
        student_steps=args.steps,
        teacher_steps=args.teacher_steps,
        grid=args.grid,
        init_student=args.init_student,
        stains=only,
        branches=_csv(args.branches),
        step_weights=_floats(args.step_weights, "--step-weights"),
        steps_per_stage=per_stage[0] if len(per_stage) == 1 else per_stage,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        half=args.half,
        device=args.device,
    ):
        if isinstance(ev, TrainStep):
            bar = bar or _bar(ev.total_steps, "step")
            bar.n = ev.step
            n = int(ev.losses["stage_steps"])
            bar.set_postfix(stage=f"{2 * n}->{n}", loss=f"{ev.losses['total']:.5f}", refresh=False)
            bar.refresh()
        elif isinstance(ev, (Validation, CheckpointSaved)):
            msg = f"step {ev.step}: " + (
                f"student checkpoint {ev.path}"
                if isinstance(ev, CheckpointSaved)
                else "validation " + json.dumps({k: round(v, 5) for k, v in ev.losses.items()})
            )
            bar.write(msg) if bar else print(msg)
        elif isinstance(ev, Finished):
            if bar:
                bar.close()
            print(
                f"distilled to {args.steps} DDIM steps ({ev.summary['steps']} optimisation "
                f"steps); model: {args.out} (samples with DDIM {args.steps} by default)"
            )
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("stain", help="virtual IHC for a slide region (OME-TIFF + PNG preview)")
    p.add_argument("slide", help="H&E slide or image: SVS, (OME-)TIFF, PNG, JPEG")
    p.add_argument(
        "--model", help="checkpoint (.safetensors); default: the bundled distilled model"
    )
    p.add_argument("--stains", help="comma-separated, e.g. CD3,CK8/18 (default: all)")
    p.add_argument("--region", help="x,y,w,h in level-0 pixels (default: whole image)")
    p.add_argument(
        "--sampler",
        choices=["dpmsolver++", "ddim", "ddpm"],
        help="default: the model's own (a distilled model's), else ddim (on a Karras grid)",
    )
    p.add_argument(
        "--steps", type=int, help="default: the model's own (a distilled model's), else 10"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch",
        type=_batch_arg,
        default=8,
        help="tiles per network call, or 'auto' (the largest that fits on a GPU; 8 on a CPU)",
    )
    p.add_argument("--samples", type=int, default=1, help=">1 adds an uncertainty map")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="network precision; auto: bf16 on GPUs and CPUs with bf16 support, else fp32",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the network (falls back if it fails)"
    )
    p.add_argument(
        "--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else physical cores)"
    )
    p.add_argument("--mpp", type=float, help="µm/px of level 0 (overrides the file's value)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="staindiffuser-out", help="output folder")
    p.add_argument(
        "--workers",
        type=int,
        help="stain on a local dask cluster of N worker processes (--threads each; default 1)",
    )
    p.add_argument(
        "--scheduler",
        help="stain on an existing dask cluster: its scheduler address, e.g. tcp://host:8786",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        help="stream the result band by band to disk (memory does not grow with the region) or "
        f"hold it in memory; default: stream regions over {STREAM_PIXELS / 1e6:.1f} Mpx",
    )
    p.set_defaults(func=cmd_stain)

    p = sub.add_parser("synth", help="write SYNTHETIC paired patches (a training folder)")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--stains", default="CD3,CK8/18")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("masks", help="coarse positive-cell mask from an IHC slide")
    p.add_argument("ihc")
    p.add_argument("--stain", required=True, help="preset: CD3 or CK8/18")
    p.add_argument("--rule", choices=["mean+2std", "otsu", "fixed"], help="override the preset")
    p.add_argument("--threshold", type=float, help="DAB threshold for --rule fixed")
    p.add_argument("--mpp", type=float)
    p.add_argument("--out", required=True, help="output .ome.tif")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("patches", help="paired training patches from an H&E and an IHC slide")
    p.add_argument("he")
    p.add_argument("ihc")
    p.add_argument("--stain", required=True)
    p.add_argument("--out", required=True, help="output folder (manifest.csv + PNGs)")
    p.add_argument("--regions", help="x,y,w,h;x,y,w,h;... in level-0 px (default: all)")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--max", type=int, help="at most this many patches (random subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mpp", type=float)
    p.add_argument(
        "--correct-shift",
        action="store_true",
        help="correct a measured translation above the tolerance",
    )
    p.set_defaults(func=cmd_patches)

    p = sub.add_parser(
        "distill", help="progressive distillation: a student that samples in few DDIM steps"
    )
    p.add_argument("teacher", help="checkpoint to distil (.safetensors)")
    p.add_argument("--out", required=True, help="the student checkpoint (.safetensors)")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of the final student")
    p.add_argument(
        "--teacher-steps", type=int, default=16, help="DDIM steps of the teacher (steps x 2^k)"
    )
    p.add_argument(
        "--grid",
        choices=["karras", "trailing", "teacher"],
        default="karras",
        help="the teacher's DDIM timestep grid (karras: at parity with DDPM; the default; "
        "teacher: a distilled teacher's own grid)",
    )
    p.add_argument(
        "--init-student", help="start from this student instead of the teacher (continue a stage)"
    )
    p.add_argument(
        "--stains",
        help="distil only these stains' branches, e.g. CD3 (comma-separated; synthetic pairs "
        "of these only); the encoder and the other branches stay as they are",
    )
    p.add_argument("--branches", help="distil only these branch kinds: gen, aux (comma-separated)")
    p.add_argument(
        "--step-weights",
        help="how often each student step is trained, e.g. 1,1,1,4 (one stage only)",
    )
    p.add_argument(
        "--steps-per-stage", default="1000", help="optimisation steps per halving (or a,b,...)"
    )
    p.add_argument("--data", help="paired-patch folder (manifest.csv)")
    p.add_argument("--synthetic", type=int, default=0, help="N synthetic pairs instead")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--half", action="store_true", help="store the weights as float16")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="strip training state: an inference-only checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument(
        "--timesteps",
        help="make DDIM on this grid the copy's default sampler, e.g. 999,831,77,7 (for a "
        "distilled model: points of its own grid)",
    )
    p.add_argument("--half", action="store_true", help="store the weights as float16")
    p.set_defaults(func=cmd_export)

    from .evaluate import add_parser as add_evaluate

    add_evaluate(sub)  # `staindiffuser evaluate`: the paper's metrics (evaluate.py)
