"""``staindiffuser evaluate``: the paper's Table 1 for one or more models, as a generator.

:func:`iter_evaluate` stains held-out H&E with each model and scores the virtual IHC against the
real IHC with :mod:`metrics` (PSNR, SSIM, FID, KID, precision, recall; Dice, IoU and the
positive-cell count error of DAB masks). Data, one of:

- paired patches (a :class:`~pairs.PairFolder`, or :func:`held_out_synthetic`), each resized to
  the model's patch size as training does and sampled whole;
- slide pairs (:class:`SlideRegions`): each region of the H&E is stained with the tiled pipeline
  (:func:`inference.iter_stain`), then the virtual and the real IHC are cut into the same
  non-overlapping model-sized patches (the paper tiles its test slides without overlap).

Scores are per (model, stain) at the model's patch size and pixel size. The real IHC's features
are computed once and shared by all models. :func:`write_tables` writes ``metrics.csv`` and
``metrics.json`` atomically; :func:`format_table` prints the Table 1 layout.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .events import Event, Progress
from .metrics import MIN_CELL_AREA_UM2

#: Master seed of the held-out synthetic pairs (training uses other seeds; the same value as
#: ``benchmarks/eval_demo_model.py``).
HELD_OUT_SEED = 777_000_001
COLUMNS = (
    "model", "stain", "n", "psnr", "ssim", "fid", "kid", "kid_std", "precision", "recall",
    "dice", "iou", "count_pred", "count_true", "count_error", "count_abs_error",
    "count_rel_error", "seconds",
)  # fmt: skip
TABLE = (  # (column, header, format) of the printed table, per stain
    ("psnr", "PSNR", ".2f"),
    ("ssim", "SSIM", ".3f"),
    ("fid", "FID", ".2f"),
    ("kid", "KID", ".4f"),
    ("precision", "Prec", ".3f"),
    ("recall", "Rec", ".3f"),
    ("dice", "Dice", ".3f"),
    ("iou", "IoU", ".3f"),
    ("count_rel_error", "Count err", ".1%"),
)


@dataclass(frozen=True)
class SlideRegions:
    """A registered H&E / IHC slide pair of one stain and the regions to evaluate.

    Attributes
    ----------
    he, ihc : str or Path
        Slide files (same pixel grid at level 0).
    stain : str
    regions : list of (x, y, w, h) in level-0 pixels
    mpp : float, optional
        µm/px of level 0 when the files do not say.
    """

    he: str | Path
    ihc: str | Path
    stain: str
    regions: Sequence[tuple[int, int, int, int]]
    mpp: float | None = None


@dataclass(frozen=True)
class EvalNote(Event):
    """Something the user should read (e.g. why the distribution metrics are skipped)."""

    text: str


@dataclass(frozen=True)
class StainScores(Event):
    """All scores of one model on one stain (one row of ``metrics.csv``)."""

    row: dict[str, Any]


@dataclass(frozen=True)
class EvalResult(Event):
    """Last event: every row, and the settings they were made with."""

    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)


def held_out_synthetic(n: int, stains: Sequence[str], config, *, size: int = 256):
    """``n`` SYNTHETIC pairs per stain from :data:`HELD_OUT_SEED`, rendered at ``size`` px and
    the pixel size that downsamples to the model's (as training renders them)."""
    from .pairs import InMemoryPairs, synthetic_pairs

    if n < 1:
        raise ValueError(f"the number of synthetic pairs must be >= 1; got {n}")
    mpp = config.image_size * config.mpp / size
    samples = []
    for stain in stains:  # as benchmarks/eval_demo_model.py draws them
        samples += synthetic_pairs(HELD_OUT_SEED, n, stains=[stain], size=size, mpp=mpp).samples
    desc = f"held-out synthetic pairs (seed {HELD_OUT_SEED}, {n} per stain)"
    return InMemoryPairs(samples, description=desc)


def model_name(path: str | Path | None) -> str:
    """A model's label in the tables: its file's stem (the default model's when None)."""
    from .checkpoint_meta import default_model_path

    return Path(path or default_model_path()).stem


def _load(path, device: str):
    from .model.checkpoint import default_model_path, load_checkpoint
    from .training import resolve_device

    ckpt = load_checkpoint(Path(path) if path else default_model_path())
    dev = resolve_device(device)
    return ckpt.model.to(dev).eval(), dev


def _pair_sets(pairs, stains: Sequence[str], size: int) -> dict[str, dict[str, np.ndarray]]:
    """Stain -> {"he", "ihc" (N, S, S, 3) uint8, "mask" (N, S, S) bool or None}."""
    from .pairs import resize_patch

    sets: dict[str, dict[str, list]] = {}
    for i in range(len(pairs)):
        p = pairs[i]
        if p.stain not in stains:
            continue
        s = sets.setdefault(p.stain, {"he": [], "ihc": [], "mask": []})
        s["he"].append(resize_patch(p.he, size, is_mask=False))
        s["ihc"].append(resize_patch(p.ihc, size, is_mask=False))
        s["mask"].append(None if p.mask is None else resize_patch(p.mask, size, is_mask=True))
    out = {}
    for stain, s in sets.items():
        masks = s["mask"]
        out[stain] = {
            "he": np.stack(s["he"]),
            "ihc": np.stack(s["ihc"]),
            "mask": np.stack(masks) if all(m is not None for m in masks) else None,
        }
    return out


def _sample_patches(model, he, stain, *, sampler, steps, seed, batch, stage) -> Iterator:
    """Virtual IHC of patches (N, S, S, 3) uint8; item i is seeded with ``seed + i``."""
    from .sampling import SampleResult, from_uint8_rgb, iter_sample, to_uint8_rgb

    dev = next(model.parameters()).device
    out = []
    n = len(he)
    yield Progress(0, n, stage=stage)
    for b0 in range(0, n, batch):
        chunk = he[b0 : b0 + batch]
        for ev in iter_sample(
            model,
            from_uint8_rgb(chunk).to(dev),
            stains=[stain],
            sampler=sampler,
            steps=steps,
            seed=[seed + b0 + j for j in range(len(chunk))],
            aux=False,
        ):
            if isinstance(ev, SampleResult):
                out.append(to_uint8_rgb(ev.images[stain]))
        yield Progress(min(b0 + batch, n), n, stage=stage)
    return np.concatenate(out)


def _crops(img: np.ndarray, side: int, size: int, is_mask: bool = False) -> list[np.ndarray]:
    from .pairs import resize_patch

    h, w = img.shape[:2]
    return [
        resize_patch(np.ascontiguousarray(img[y : y + side, x : x + side]), size, is_mask=is_mask)
        for y in range(0, h - side + 1, side)
        for x in range(0, w - side + 1, side)
    ]


def _slide_sets(spec: SlideRegions, model, *, sampler, steps, seed, batch, stage) -> Iterator:
    """Stain the regions of a slide pair; returns (he, ihc, virtual) patch stacks."""
    from .commands import level_region
    from .inference import StainResult, TileStained, iter_stain
    from .io import open_slide

    cfg = model.config
    he_s, ihc_s = open_slide(spec.he, mpp=spec.mpp), open_slide(spec.ihc, mpp=spec.mpp)
    if he_s.shape != ihc_s.shape:
        raise ValueError(
            f"the H&E ({he_s.shape[1]} x {he_s.shape[0]} px) and the IHC ({ihc_s.shape[1]} x "
            f"{ihc_s.shape[0]} px) differ in size at level 0: register them first"
        )
    level = 0 if he_s.mpp is None else he_s.best_level_for(cfg.mpp)
    level_mpp = he_s.level_mpp(level)
    he_img, ihc_img = he_s.levels[level], ihc_s.levels[min(level, len(ihc_s.levels) - 1)]
    if ihc_img.shape != he_img.shape:
        ihc_img = ihc_s.levels[0]
        he_img, level, level_mpp = he_s.levels[0], 0, he_s.mpp
    side = cfg.image_size if level_mpp is None else round(cfg.image_size * cfg.mpp / level_mpp)
    he_p, ihc_p, virt_p = [], [], []
    for k, region in enumerate(spec.regions):
        y, x, h, w = level_region(region, he_s.shape, he_img.shape[:2])
        if h < side or w < side:
            raise ValueError(
                f"region {k + 1} ({region}) is smaller than one model patch ({side} px at this "
                "level): draw it larger"
            )
        result = None
        for ev in iter_stain(
            he_img, model, region=(y, x, h, w), stains=[spec.stain], sampler=sampler,
            steps=steps, seed=seed, batch=batch, image_mpp=level_mpp,
        ):  # fmt: skip
            if isinstance(ev, TileStained):
                yield Progress(ev.done, ev.total, stage=f"{stage} region {k + 1}")
            elif isinstance(ev, StainResult):
                result = ev
        virt_p += _crops(result.images[spec.stain], side, cfg.image_size)
        ihc_p += _crops(np.asarray(ihc_img[y : y + h, x : x + w]), side, cfg.image_size)
        he_p += _crops(np.asarray(he_img[y : y + h, x : x + w]), side, cfg.image_size)
    return np.stack(he_p), np.stack(ihc_p), np.stack(virt_p)


def _features(network, images: np.ndarray, batch: int, stage: str) -> Iterator:
    from .metrics import inception_features

    out = []
    yield Progress(0, len(images), stage=stage)
    for b0 in range(0, len(images), batch):
        out.append(inception_features(images[b0 : b0 + batch], network, batch=batch))
        yield Progress(min(b0 + batch, len(images)), len(images), stage=stage)
    return np.concatenate(out)


def score_set(
    virtual: np.ndarray,
    real: np.ndarray,
    true_masks: np.ndarray | None,
    stain: str,
    mpp: float,
    *,
    min_cell_area_um2: float = MIN_CELL_AREA_UM2,
) -> dict[str, float]:
    """PSNR, SSIM (means) and the mask scores of virtual vs real IHC patches (N, S, S, 3) uint8.

    Positive cells of the virtual IHC: :func:`metrics.positive_masks` (one DAB threshold from the
    whole virtual set); of the real IHC: the given masks (N, S, S) bool, else the same DAB masks
    of the real set.
    """
    from .metrics import mask_scores, mean_image_scores, positive_masks

    pred = positive_masks(virtual, stain, mpp)
    truth = true_masks if true_masks is not None else positive_masks(real, stain, mpp)
    return {
        **mean_image_scores(virtual, real),
        **mask_scores(pred, truth, mpp, min_cell_area_um2),
    }


def iter_evaluate(
    models: Sequence[str | Path | None] = (None,),
    *,
    pairs=None,
    slides: SlideRegions | None = None,
    stains: Sequence[str] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch: int = 16,
    distribution: bool | None = None,
    device: str = "auto",
    min_cell_area_um2: float = MIN_CELL_AREA_UM2,
) -> Iterator[Event]:
    """Score each model on each stain, yielding progress.

    Parameters
    ----------
    models : checkpoint paths; None is the bundled model
    pairs : sequence of PairSample (a PairFolder, :func:`held_out_synthetic`), or
    slides : SlideRegions
    stains : only these stains (default: every stain of the data that the model has)
    distribution : FID, KID, precision, recall. True: required (ValueError naming the
        ``[metrics]`` extra when it is missing); None: when the extra is installed (an EvalNote
        otherwise); False: never.
    batch : patches per network call (sampling and Inception)

    Yields
    ------
    Progress (stage says what), EvalNote, StainScores per (model, stain), then EvalResult.
    """
    from .metrics import distribution_scores, distribution_unavailable, load_inception

    if (pairs is None) == (slides is None):
        raise ValueError("give exactly one data source: pairs or slides")
    if not models:
        raise ValueError("give at least one model")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1; got {batch!r}")
    if pairs is not None and len(pairs) == 0:
        raise ValueError("the evaluation data holds no pairs")
    why_not = distribution_unavailable() if distribution is not False else None
    if why_not and distribution:
        raise ValueError(f"--distribution was asked for, but {why_not}")
    if why_not:
        yield EvalNote(f"FID, KID, precision and recall skipped: {why_not}")
    use_dist = distribution is not False and why_not is None
    if slides is not None:
        data_stains = [slides.stain]
    else:
        data_stains = list(getattr(pairs, "stains", None) or {p.stain for p in pairs})
    wanted = list(stains) if stains else data_stains
    missing = [s for s in wanted if s not in data_stains]
    if missing:
        raise ValueError(f"the data has no pairs of {missing}; it has {data_stains}")
    network = None
    real_feats: dict[tuple[str, int], np.ndarray] = {}
    pair_cache: dict[int, dict] = {}
    rows: list[dict[str, Any]] = []
    for mi, path in enumerate(models):
        model, dev = _load(path, device)
        cfg = model.config
        name = model_name(path)
        if any(r["model"] == name for r in rows):  # two files of one name: keep rows apart
            name = f"{name} ({mi + 1})"
        todo = [s for s in wanted if s in cfg.stains]
        skipped = [s for s in wanted if s not in cfg.stains]
        if skipped:
            yield EvalNote(f"{name} has no branch for {skipped}: skipped")
        if pairs is not None and cfg.image_size not in pair_cache:
            pair_cache[cfg.image_size] = _pair_sets(pairs, todo or wanted, cfg.image_size)
        for stain in todo:
            t0 = time.perf_counter()
            stage = f"{name} {stain}"
            common = dict(sampler=sampler, steps=steps, seed=seed, batch=batch)
            if pairs is not None:
                sets = pair_cache[cfg.image_size]
                if stain not in sets:
                    sets.update(_pair_sets(pairs, [stain], cfg.image_size))
                s = sets[stain]
                real, true_masks = s["ihc"], s["mask"]
                virtual = yield from _sample_patches(
                    model, s["he"], stain, stage=f"{stage}: sampling", **common
                )
            else:
                _, real, virtual = yield from _slide_sets(
                    slides, model, stage=f"{stage}: staining", **common
                )
                true_masks = None
            yield Progress(0, 1, stage=f"{stage}: PSNR, SSIM, masks")
            row: dict[str, Any] = {"model": name, "stain": stain, "n": len(virtual)}
            row.update(
                score_set(
                    virtual, real, true_masks, stain, cfg.mpp, min_cell_area_um2=min_cell_area_um2
                )
            )
            yield Progress(1, 1, stage=f"{stage}: PSNR, SSIM, masks")
            row.update(dict.fromkeys(("fid", "kid", "kid_std", "precision", "recall"), math.nan))
            if use_dist and len(virtual) < 4:
                yield EvalNote(f"{stage}: {len(virtual)} patches; FID etc. need at least 4")
            elif use_dist:
                if network is None:
                    network = load_inception(str(dev))
                key = (stain, cfg.image_size)
                if key not in real_feats or slides is not None:
                    real_feats[key] = yield from _features(
                        network, real, batch, f"{stage}: Inception (real)"
                    )
                fake = yield from _features(network, virtual, batch, f"{stage}: Inception")
                row.update(distribution_scores(real_feats[key], fake, seed=seed))
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append({k: row.get(k, math.nan) for k in COLUMNS})
            yield StainScores(rows[-1])
        del model
        yield Progress(mi + 1, len(models), stage="models")
    config = {
        "models": [str(p) if p else model_name(None) for p in models],
        "data": getattr(pairs, "description", None) if pairs is not None else _slides_desc(slides),
        "sampler": str(getattr(sampler, "value", sampler)) if sampler else "each model's default",
        "steps": steps or "each model's default",
        "seed": seed,
        "distribution": use_dist,
        "min_cell_area_um2": min_cell_area_um2,
    }
    yield EvalResult(rows, config)


def _slides_desc(s: SlideRegions) -> str:
    return f"slide pair {s.he} / {s.ihc} ({s.stain}), regions {list(s.regions)}"


def evaluate(**kwargs) -> EvalResult:
    """Drain :func:`iter_evaluate` and return its :class:`EvalResult`."""
    result = None
    for ev in iter_evaluate(**kwargs):
        result = ev
    assert isinstance(result, EvalResult)
    return result


def _cell(v: Any, fmt: str) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v == math.inf else "-"
    return format(v, fmt)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table in the layout of the paper's Table 1: one row per model, per stain PSNR,
    SSIM, FID, KID, precision, recall, then Dice, IoU and the relative count error."""
    stains = list(dict.fromkeys(r["stain"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    head = ["model"]
    for st in stains:
        head += [f"{st} {h}" if i == 0 else h for i, (_, h, _) in enumerate(TABLE)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(r["model"], r["stain"]): r for r in rows}
    for m in models:
        cells = [m]
        for st in stains:
            r = by.get((m, st))
            cells += [_cell(r[c], f) if r else "-" for c, _, f in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def write_tables(out: str | Path, result: EvalResult) -> tuple[Path, Path]:
    """Write ``metrics.csv`` (one row per model and stain; empty cells where a metric was not
    computed) and ``metrics.json`` (rows and settings; null for those) into ``out``,
    atomically."""
    from .outputs import prepare_output_dir, write_text_atomic

    out = prepare_output_dir(out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        writer.writerow({k: "" if _plain(r[k]) is None else _plain(r[k]) for k in COLUMNS})
    csv_path = write_text_atomic(out / "metrics.csv", buf.getvalue())
    payload = {
        "config": result.config,
        "rows": [{k: _plain(v) for k, v in r.items()} for r in result.rows],
    }
    json_path = write_text_atomic(out / "metrics.json", json.dumps(payload, indent=2))
    return csv_path, json_path


def add_parser(sub) -> None:
    """The ``evaluate`` subcommand (registered by ``commands.add_commands``)."""
    import argparse

    p = sub.add_parser(
        "evaluate",
        help="score models against real IHC: PSNR, SSIM, FID, KID, precision, recall, Dice, "
        "IoU, cell counts (metrics.csv, metrics.json)",
    )
    p.add_argument(
        "--model",
        action="append",
        help="checkpoint (.safetensors); repeat for several rows (default: the bundled model)",
    )
    g = p.add_argument_group("data (one of)")
    g.add_argument("--data", help="folder of paired patches with manifest.csv")
    g.add_argument("--synthetic", type=int, default=0, help="N held-out SYNTHETIC pairs per stain")
    g.add_argument("--he", help="H&E slide (with --ihc, --stain and --region)")
    g.add_argument("--ihc", help="the registered IHC slide of the same tissue")
    g.add_argument("--stain", help="the stain of --ihc")
    g.add_argument(
        "--region", action="append", help="x,y,w,h in level-0 px of the slides; repeatable"
    )
    g.add_argument("--mpp", type=float, help="µm/px of the slides' level 0 (if they lack it)")
    p.add_argument("--stains", help="comma-separated: only these stains (default: all)")
    p.add_argument(
        "--sampler",
        choices=["dpmsolver++", "ddim", "ddpm"],
        help="default: the model's own (a distilled model's), else ddim",
    )
    p.add_argument("--steps", type=int, help="default: the model's own, else 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="patches per network call")
    p.add_argument(
        "--distribution",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FID, KID, precision, recall (need the [metrics] extra; default: when installed)",
    )
    p.add_argument(
        "--min-cell-area",
        type=float,
        default=MIN_CELL_AREA_UM2,
        help="smallest positive object counted as a cell, µm²",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="staindiffuser-eval", help="folder for metrics.csv/.json")
    p.set_defaults(func=cmd_evaluate)


def _data_from_args(args) -> dict[str, Any]:
    slide_args = [args.he, args.ihc, args.stain, args.region]
    given = [bool(args.data), args.synthetic > 0, any(a for a in slide_args)]
    if sum(given) != 1:
        raise ValueError(
            "give one data source: --data FOLDER, --synthetic N, or --he SLIDE --ihc SLIDE "
            "--stain NAME --region x,y,w,h"
        )
    if args.data:
        from .pairs import PairFolder

        return {"pairs": PairFolder(args.data)}
    if args.synthetic > 0:
        from .checkpoint_meta import read_config

        model = (args.model or [None])[0]
        if model is None:
            from .checkpoint_meta import default_model_path

            model = default_model_path()
        config, _ = read_config(model)
        stains = [s.strip() for s in args.stains.split(",")] if args.stains else config.stains
        return {"pairs": held_out_synthetic(args.synthetic, stains, config)}
    if not all(slide_args):
        raise ValueError("slide evaluation needs --he, --ihc, --stain and at least one --region")
    from .commands import _ints

    regions = [_ints(r, 4, "--region x,y,w,h") for r in args.region]
    return {"slides": SlideRegions(args.he, args.ihc, args.stain, regions, args.mpp)}


def cmd_evaluate(args) -> int:
    """Drain :func:`iter_evaluate` with a progress bar, print the table, write the files."""
    from tqdm import tqdm

    from .outputs import prepare_output_dir

    prepare_output_dir(args.out)  # refuse an unwritable folder before the long part
    data = _data_from_args(args)
    stains = [s.strip() for s in args.stains.split(",")] if args.stains else None
    bar, stage, result = None, None, None
    t0 = time.perf_counter()
    for ev in iter_evaluate(
        args.model or [None],
        stains=stains,
        sampler=args.sampler,
        steps=args.steps,
        seed=args.seed,
        batch=args.batch,
        distribution=args.distribution,
        device=args.device,
        min_cell_area_um2=args.min_cell_area,
        **data,
    ):
        if isinstance(ev, Progress) and ev.stage != "models":
            if ev.stage != stage:
                if bar is not None:
                    bar.close()
                bar = tqdm(total=ev.total, desc=ev.stage, unit="item", dynamic_ncols=True)
                stage = ev.stage
            bar.n = ev.done
            bar.refresh()
        elif isinstance(ev, EvalNote):
            (bar.write if bar is not None else print)(ev.text)
        elif isinstance(ev, EvalResult):
            result = ev
    if bar is not None:
        bar.close()
    csv_path, json_path = write_tables(args.out, result)
    print()
    print(format_table(result.rows))
    print()
    print(f"metrics: {csv_path}, {json_path} ({time.perf_counter() - t0:.0f} s)")
    return 0
