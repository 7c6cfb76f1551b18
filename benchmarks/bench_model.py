"""Parameters, forward time and training-step time per model preset and batch size.

Prints a Markdown table (copy it into docs/performance.md). Runs on the CPU, and on CUDA too when
a GPU is present (bf16 autocast there, as training uses). Not a test: nothing asserts on time.

    python benchmarks/bench_model.py                 # all presets, CPU (+ GPU if present)
    python benchmarks/bench_model.py --presets tiny --batches 1 8 --repeats 5

"forward" is one network evaluation as a sampler makes it: the H&E encoder plus one generation
branch (the encoder output is reused across steps in practice, so this is an upper bound).
"all branches" adds every other branch (the auxiliary one of each stain, and the other stains).
"train step" is loss + backward + AdamW step over a batch mixing both stains.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from napari_staindiffuser.config import preset
from napari_staindiffuser.model import StainDiffuser, count_parameters
from napari_staindiffuser.training import diffusion_losses, make_schedule


def _time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0


def bench(name: str, batch: int, device: torch.device, repeats: int, train: bool) -> dict:
    cfg = preset(name)
    size = cfg.image_size
    model = StainDiffuser(cfg).to(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    g = torch.Generator().manual_seed(0)
    cond = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    m = torch.randn(batch, 1, size, size, generator=g).to(device)
    t = torch.randint(0, cfg.schedule.num_train_timesteps, (batch,), generator=g).to(device)

    @torch.inference_mode()
    def forward():
        with autocast:
            model.denoise("gen", cfg.stains[0], x, t, model.encode(cond))

    @torch.inference_mode()
    def all_branches():
        with autocast:
            feats = model.encode(cond)
            for branch, stain in model.branches():
                model.denoise(branch, stain, m if branch.value == "aux" else x, t, feats)

    row = {
        "preset": name,
        "device": device.type,
        "px": size,
        "batch": batch,
        "params (M)": count_parameters(model) / 1e6,
        "forward ms": _time(forward, repeats, sync),
        "all branches ms": _time(all_branches, repeats, sync),
    }
    if train:
        schedule = make_schedule(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch_t = {
            "he": cond,
            "ihc": x.clamp(-1, 1),
            "aux": m.clamp(-1, 1),
            "stain": torch.arange(batch, device=device) % len(cfg.stains),
        }

        def step():
            with autocast:
                loss, _ = diffusion_losses(model, schedule, batch_t, torch.Generator())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        row["train step ms"] = _time(step, max(1, repeats // 2), sync)
    else:
        row["train step ms"] = float("nan")
    if cuda:
        model.cpu()
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small", "paper"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-train", action="store_true", help="skip the training-step column")
    p.add_argument(
        "--cpu-paper-batches",
        nargs="+",
        type=int,
        default=[1, 4],
        help="batch sizes for the paper preset on the CPU (it is slow there)",
    )
    args = p.parse_args()

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    cols = [
        "preset",
        "device",
        "px",
        "batch",
        "params (M)",
        "forward ms",
        "all branches ms",
        "train step ms",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for dev in devices:
        for name in args.presets:
            batches = args.batches
            if name == "paper" and dev.type == "cpu":
                batches = args.cpu_paper_batches
            for b in batches:
                row = bench(name, b, dev, args.repeats, not args.no_train)
                cells = [
                    f"{row[c]:.1f}"
                    if isinstance(row[c], float) and not np.isnan(row[c])
                    else ("-" if isinstance(row[c], float) else str(row[c]))
                    for c in cols
                ]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
