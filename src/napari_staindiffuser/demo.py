"""``staindiffuser demo``: the main job on embedded defaults.

With the bundled model (``data/staindiffuser-demo.safetensors``, trained on SYNTHETIC tissue):

1. stain a region of the bundled SYNTHETIC slide (a slide seed never used in training) and score
   the virtual CD3 / CK8/18 against that slide's true IHC and masks (PSNR, SSIM, Dice), beside a
   trivial baseline (the H&E's own pixels as the "IHC", an all-positive mask);
2. stain a region of the real CMU-1-Small-Region.svs (H&E, public domain);
3. write OME-TIFFs, PNG previews and a JSON report, and print where everything went.

Then the command line opens the results in napari (:func:`open_gui`) when it can: a display
(:func:`has_display`) and a Qt binding (:func:`qt_binding`). This module imports napari only
inside :func:`open_gui`, so the headless demo never loads napari or Qt.

``--train-steps N`` first trains a tiny model from scratch on synthetic pairs (the engine end to
end: data -> training -> checkpoint -> tiled sampling) and uses it instead of the bundled one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .config import TrainConfig, preset
from .events import CheckpointSaved, TrainStep

DEMO_SLIDE_SEED = 20_261_128  # slide seed of the demo's synthetic slide (not a training slide)
DEMO_SLIDE_MPP = 0.5
DEMO_REGION_YX = (128, 128)  # holds glands (CK8/18) and T cells (CD3): 3-6 % of each
QT_BINDINGS = ("PyQt6", "PyQt5", "PySide6", "PySide2")
GUI_INSTALL_HINT = 'pip install "napari-staindiffuser[qt]"'


def has_display() -> bool:
    """Whether a window can be shown: always on macOS and Windows; elsewhere (Linux, BSD) when
    ``DISPLAY`` (X11) or ``WAYLAND_DISPLAY`` is set."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def qt_binding() -> str | None:
    """The first installed Qt binding napari can use (found, not imported), or None."""
    for name in QT_BINDINGS:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def gui_unavailable() -> str | None:
    """Why the demo cannot open napari (one line that says how to get the GUI), or None."""
    if qt_binding() is None:
        return (
            f"no Qt binding is installed, so napari cannot open: {GUI_INSTALL_HINT} to see "
            "the results in napari"
        )
    if not has_display():
        return (
            "no display (neither DISPLAY nor WAYLAND_DISPLAY is set), so napari cannot open: "
            "run `staindiffuser demo` in a desktop session to see the results in napari"
        )
    return None


def open_gui(report: dict | None) -> None:
    """Open napari with both samples, both docks and the demo's results; returns when the
    window is closed."""
    from ._widgets._app import launch_demo

    launch_demo(report)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks, pooled over all pixels (:func:`metrics.dice`)."""
    from .metrics import dice as _dice

    return _dice(pred, truth)


def image_scores(virtual: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM of two uint8 RGB images (:func:`metrics.image_scores`)."""
    from .metrics import image_scores as _scores

    return _scores(virtual, truth)


def train_tiny(out: Path, steps: int, seed: int = 0, log=print) -> Path:
    """Train a tiny model from scratch on 96 synthetic pairs (about 3 it/s on 2 CPU cores)."""
    from .pairs import synthetic_pairs
    from .training import iter_train

    config = preset("tiny")
    size = 256
    mpp = config.image_size * config.mpp / size
    log(f"rendering 96 SYNTHETIC training pairs ({size} px at {mpp:g} um/px) ...")
    pairs = synthetic_pairs(seed=seed, n=96, stains=config.stains, size=size, mpp=mpp)
    path = out / "demo-trained-tiny.safetensors"
    tc = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=min(20, steps), seed=seed)
    log(f"training a tiny StainDiffuser for {steps} steps on the CPU ...")
    for ev in iter_train(tc, pairs, model_config=config, out=path, device="cpu"):
        if isinstance(ev, TrainStep) and (ev.step % 50 == 0 or ev.step == steps):
            log(f"  step {ev.step}/{steps}  loss {ev.losses['total']:.4f}  {ev.it_per_s:.1f} it/s")
        elif isinstance(ev, CheckpointSaved):
            log(f"  checkpoint: {ev.path}")
    return path


def run_demo(
    out: Path,
    *,
    model: str | Path | None = None,
    train_steps: int = 0,
    steps: int | None = None,
    size: int = 512,
    seed: int = 0,
    device: str = "auto",
    log=print,
) -> dict:
    """Run the demo; returns the report (also written to ``out/demo_report.json``)."""
    from .commands import preview_png, run_stain
    from .io import Slide, sample_svs_path
    from .model.checkpoint import default_model_path
    from .outputs import write_text_atomic
    from .synthetic import SyntheticSlide

    if not 32 <= size <= 1024:
        raise ValueError(f"the demo region side must be in [32, 1024] px; got {size}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if train_steps > 0:
        model = train_tiny(out, train_steps, seed, log)
    model = Path(model) if model else default_model_path()
    from .model.checkpoint import load_checkpoint
    from .sampling import resolve_sampling

    # the model's own sampler and steps (a distilled model's) unless steps are asked for
    sampler, steps = resolve_sampling(load_checkpoint(model).model, None, steps)
    report: dict = {"model": str(model), "sampler": sampler, "steps": steps}

    # 1. a SYNTHETIC slide with known truth
    syn = SyntheticSlide(DEMO_SLIDE_SEED, shape=(2048, 2048), mpp=DEMO_SLIDE_MPP)
    y, x = DEMO_REGION_YX
    region = syn.render(y, x, size, size)
    levels = [syn.he]
    slide = Slide(levels=levels, mpp=syn.mpp, path=None, metadata={"synthetic": True})
    log(
        f"1/2 SYNTHETIC slide (seed {DEMO_SLIDE_SEED}), region {size} x {size} px at "
        f"{syn.mpp} um/px"
    )
    res = run_stain(
        "synthetic-slide",
        model_path=model,
        region=(x, y, size, size),
        sampler=sampler,
        steps=steps,
        seed=seed,
        device=device,
        out=out / "synthetic",
        log=log,
        image=slide,
    )
    rows = []
    for stain, virtual in res["result"].images.items():
        truth = region.ihc[stain]
        scores = image_scores(virtual, truth)
        base = image_scores(region.he, truth)
        rows.append(
            {
                "stain": stain,
                "PSNR": scores["psnr"],
                "SSIM": scores["ssim"],
                "Dice": dice(res["result"].masks[stain], region.masks[stain]),
                "baseline PSNR": base["psnr"],
                "baseline SSIM": base["ssim"],
                "baseline Dice": dice(np.ones_like(region.masks[stain]), region.masks[stain]),
            }
        )
    panels = [("H&E", region.he)]
    for stain in res["result"].images:
        panels += [
            (f"true {stain}", region.ihc[stain]),
            (f"virtual {stain}", res["result"].images[stain]),
        ]
    truth_png = preview_png(out / "synthetic" / "truth_vs_virtual.png", panels)
    report["synthetic"] = {"metrics": rows, "preview": str(truth_png), "files": res["files"]}

    # 2. the real SVS
    log("2/2 real H&E: CMU-1-Small-Region.svs (Aperio, 0.499 um/px, CC0)")
    svs = sample_svs_path()
    real = run_stain(
        svs,
        model_path=model,
        region=(900, 1300, size, size),
        sampler=sampler,
        steps=steps,
        seed=seed,
        device=device,
        out=out / "svs",
        log=log,
    )
    report["svs"] = {"preview": real["preview"], "files": real["files"]}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(out / "demo_report.json", json.dumps(report, indent=2))

    log("")
    log("Virtual vs true IHC on the SYNTHETIC slide (baseline: the H&E itself / all positive):")
    log("| stain | PSNR dB | SSIM | Dice | baseline PSNR | baseline SSIM | baseline Dice |")
    log("|---|---|---|---|---|---|---|")
    for r in rows:
        log(
            f"| {r['stain']} | {r['PSNR']:.2f} | {r['SSIM']:.3f} | {r['Dice']:.3f} | "
            f"{r['baseline PSNR']:.2f} | {r['baseline SSIM']:.3f} | {r['baseline Dice']:.3f} |"
        )
    log("")
    log(f"synthetic preview: {truth_png}")
    log(f"real SVS preview:  {real['preview']}")
    log(f"report:            {out / 'demo_report.json'}")
    log(f"done in {report['seconds']} s")
    return report
