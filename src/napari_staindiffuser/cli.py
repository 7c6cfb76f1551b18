"""``staindiffuser``: the command line. Each subcommand drains the same generators the GUI runs.

Errors in the user's input (``ValueError``, ``FileNotFoundError``) become one line on stderr and
exit status 2; nothing the user made is left half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .events import JobError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (when training from scratch)")
    g.add_argument("--preset", default="tiny", help="model size: tiny, small or paper")
    g.add_argument("--stains", default="CD3,CK8/18", help="comma-separated stain names")
    g.add_argument("--variant", default="multitask", choices=["multitask", "bidirectional"])
    g.add_argument(
        "--aux",
        default=None,
        choices=["mask", "distance", "none"],
        help="auxiliary target (default: mask; none for bidirectional)",
    )
    g.add_argument("--image-size", type=int, default=None, help="model patch size in px")
    g.add_argument("--mpp", type=float, default=None, help="µm/px of the model's patches")
    g.add_argument("--prediction", default=None, choices=["v_prediction", "epsilon"])
    g.add_argument("--schedule", default=None, choices=["linear", "cosine"])
    g.add_argument("--timesteps", type=int, default=None, help="T, diffusion steps in training")
    g.add_argument("--lambda-aux", type=float, default=None, help="auxiliary loss weight")


def _model_config(args: argparse.Namespace):
    from .config import ScheduleConfig, preset

    overrides: dict = {"stains": tuple(s.strip() for s in args.stains.split(",") if s.strip())}
    overrides["variant"] = args.variant
    if args.aux is not None:
        overrides["aux_target"] = args.aux
    elif args.variant == "bidirectional":
        overrides["aux_target"] = "none"
    for name, key in (("image_size", "image_size"), ("mpp", "mpp"), ("lambda_aux", "lambda_aux")):
        if getattr(args, name) is not None:
            overrides[key] = getattr(args, name)
    base = preset(args.preset)
    sched = base.schedule.__dict__ | {
        k: v
        for k, v in (
            ("prediction_type", args.prediction),
            ("kind", args.schedule),
            ("num_train_timesteps", args.timesteps),
        )
        if v is not None
    }
    overrides["schedule"] = ScheduleConfig(**sched)
    return preset(args.preset, **overrides)


def _source(folder: str | None, synthetic: int, seed: int, config, size: int):
    from .pairs import PairFolder, synthetic_pairs

    if folder:
        return PairFolder(folder)
    if synthetic > 0:
        mpp = config.image_size * config.mpp / size  # downsampled to the model's µm/px
        return synthetic_pairs(seed=seed, n=synthetic, stains=config.stains, size=size, mpp=mpp)
    return None


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .config import TrainConfig
    from .ddp import env_rank, launched_by_torchrun
    from .events import CheckpointSaved, Finished, TrainStep, Validation
    from .model.checkpoint import read_config
    from .training import iter_train, resolve_device

    # under torchrun every process runs this; only rank 0 talks (the others print errors only)
    say = print if env_rank() == 0 else (lambda *a, **k: None)

    tc = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        warmup_steps=min(args.warmup, args.steps),
    )
    model_config = None
    if args.resume or args.init:
        config, _ = read_config(args.resume or args.init)
    else:
        config = model_config = _model_config(args)
    if not args.data and args.synthetic <= 0:
        raise ValueError("give training data: --data FOLDER (with manifest.csv) or --synthetic N")
    say(f"preparing data ({args.data or f'{args.synthetic} synthetic pairs'}) ...", flush=True)
    patch = args.patch_size
    source = _source(args.data, args.synthetic, args.seed, config, patch)
    val = _source(args.val_data, args.val_synthetic, args.seed + 10_000_019, config, patch)
    if launched_by_torchrun():  # each process picks its own GPU (cuda:LOCAL_RANK) or the CPU
        device = args.device
        n = int(os.environ["WORLD_SIZE"])
        where = f"{n} processes (torch DDP, device {device}), global batch {args.batch}"
    else:
        device = resolve_device(args.device)
        where = str(device)
    say(f"training on {where}; checkpoint -> {args.out}", flush=True)
    bar = tqdm(total=args.steps, unit="step", dynamic_ncols=True, disable=env_rank() != 0)
    for ev in iter_train(
        tc,
        source,
        model_config=model_config,
        init=args.init,
        resume=args.resume,
        val_source=val,
        out=args.out,
        device=device,
    ):
        if isinstance(ev, TrainStep):
            bar.n = ev.step
            bar.set_postfix(loss=f"{ev.losses['total']:.4f}", refresh=False)
            bar.refresh()
        elif isinstance(ev, Validation):
            bar.write(f"step {ev.step}: validation " + json.dumps(_round(ev.losses)))
        elif isinstance(ev, CheckpointSaved):
            bar.write(f"step {ev.step}: checkpoint saved to {ev.path}")
        elif isinstance(ev, Finished):
            bar.close()
            say(f"done after {ev.summary['steps']} steps; model: {args.out}")
    return 0


def _round(d: dict) -> dict:
    return {k: round(v, 5) for k, v in d.items()}


def cmd_info(args: argparse.Namespace) -> int:
    from .model import count_parameters
    from .model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    info = {
        "path": str(ckpt.path),
        "package_version": ckpt.package_version,
        "weights": ckpt.weights,
        "parameters": count_parameters(ckpt.model),
        "config": ckpt.config.to_dict(),
        "provenance": ckpt.provenance,
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import gui_unavailable, open_gui, run_demo

    why_not = None if args.gui is False else gui_unavailable()
    if args.gui and why_not:  # --gui: refuse before the minute of staining, not after it
        raise ValueError(f"--gui: {why_not}")
    report = run_demo(
        Path(args.out),
        model=args.model,
        train_steps=args.train_steps,
        steps=args.steps,
        size=args.size,
        seed=args.seed,
        device=args.device,
    )
    if args.gui is False:
        return 0
    if why_not:
        print(f"napari: {why_not}")
        return 0
    print("opening the results in napari (close its window to finish; --no-gui skips this)")
    open_gui(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="staindiffuser",
        description="Virtual IHC staining of H&E with StainDiffuser (napari-staindiffuser).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train, fine-tune or resume a model")
    p.add_argument("--data", help="folder of paired patches with manifest.csv")
    p.add_argument("--synthetic", type=int, default=0, help="train on N synthetic pairs")
    p.add_argument("--val-data", help="validation folder of paired patches")
    p.add_argument("--val-synthetic", type=int, default=0, help="N synthetic validation pairs")
    p.add_argument(
        "--patch-size",
        type=int,
        default=256,
        help="synthetic patch size before downsampling to the model size (as the paper: 256 px)",
    )
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    p.add_argument("--resume", help="continue a saved run from this checkpoint")
    p.add_argument("--init", help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--steps", type=int, default=1000, help="total optimisation steps")
    p.add_argument(
        "--batch",
        type=int,
        default=16,
        help="batch size; under torchrun the global batch, split evenly over the processes",
    )
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    _add_model_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "demo",
        help="stain the bundled synthetic slide and the real sample SVS with the "
        "bundled model; writes OME-TIFFs and previews",
    )
    p.add_argument("--out", default="staindiffuser-demo", help="output folder")
    p.add_argument("--model", help="use this checkpoint instead of the bundled distilled model")
    p.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="first train a tiny model from scratch for N steps and use it",
    )
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's own, else 10)")
    p.add_argument("--size", type=int, default=512, help="region side in px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--gui",
        action="store_true",
        help="open the results in napari afterwards; exit 2 at once if there is no display or "
        "no Qt binding (default: open napari when possible)",
    )
    g.add_argument(
        "--no-gui", dest="gui", action="store_false", help="never open napari (headless)"
    )
    p.set_defaults(func=cmd_demo, gui=None)

    from .commands import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, JobError) as exc:  # bad input, unusable files, failed tasks
        print(f"staindiffuser {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a diverging training run; the last checkpoint is kept
        print(f"staindiffuser {args.command}: training diverged: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
