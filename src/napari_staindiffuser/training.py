"""Training: the StainDiffuser loss, EMA, and ``iter_train`` (a generator of typed events).

Loss (paper eq. for Multi-StainDiffuser, with the auxiliary term per stain)::

    L = (1/B) sum_b [ lambda_gen[s_b] * L_gen(b) + lambda_aux[s_b] * L_aux(b) ]

where s_b is the stain of sample b's IHC (uniplex pairs: each sample trains only its own stain's
branches; a batch may mix stains) and each L is the diffusion MSE on the configured prediction
target (epsilon as the paper, or v). Averaging over the batch rather than per stain keeps the
gradient unbiased when a batch happens to hold few samples of one stain. The bi-directional
variant sums the H&E->IHC and IHC->H&E terms with the generation weights.

Determinism: the batch of step k (sample indices, augmentation, timesteps, noise) is drawn from
generators seeded with ``(seed, k)``, so a resumed run continues bit-exactly like an unbroken one.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import ModelConfig, TrainConfig, Variant
from .ddp import plan as plan_distributed
from .diffusion import NoiseSchedule
from .events import CheckpointSaved, Event, Finished, TrainStep, Validation
from .model import Branch, StainDiffuser
from .model.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from .pairs import InMemoryPairs, PairSample, make_batch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then CPU; an unavailable device is a ValueError."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device 'mps' was asked for but Apple MPS is not available")
    return dev


def make_schedule(config: ModelConfig) -> NoiseSchedule:
    s = config.schedule
    return NoiseSchedule.create(
        s.kind.value, s.num_train_timesteps, s.beta_start, s.beta_end, s.prediction_type.value
    )


class EMA:
    """Exponential moving average of the weights, with warm-up.

    The decay at update k (0-based) is ``min(decay, (1 + k) / (10 + k))``.
    """

    def __init__(self, model: torch.nn.Module, decay: float, state=None):
        self.decay = decay
        src = state if state is not None else model.state_dict()
        self.shadow = {k: v.detach().clone() for k, v in src.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach(), 1.0 - d)
            else:
                self.shadow[k].copy_(v)


def _step_seed(seed: int, step: int, stream: int) -> int:
    return int(np.random.default_rng([seed, step, stream]).integers(2**62))


def _skip_augment_draws(rng: np.random.Generator, n_samples: int) -> None:
    """Advance ``rng`` past the augmentation draws ``make_batch`` makes for ``n_samples``.

    ``make_batch`` draws the same values per sample (rotation, flip, 6 jitter values) whatever
    it does with them, so a data-parallel rank can skip the rows before its own and build only
    its slice of the global batch, augmented exactly as in the whole batch (checked by
    tests/test_ddp.py).
    """
    for _ in range(n_samples):
        rng.integers(4)
        rng.integers(2)
        rng.uniform(-1.0, 1.0, size=6)


def diffusion_losses(
    model: StainDiffuser,
    schedule: NoiseSchedule,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    rows: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and per-branch mean losses for one batch.

    Parameters
    ----------
    batch : dict
        ``he``, ``ihc`` (B, 3, H, W) and optionally ``aux`` (B, 1, H, W), all in [-1, 1], and
        ``stain`` (B,) int64 on the model's device.
    generator : torch.Generator (CPU)
        Source of timesteps and noise.
    rows : (offset, global batch size), optional
        The batch is rows ``offset:offset + B`` of a larger global batch (a data-parallel
        shard): timesteps and noise are drawn for the global batch and sliced, so the shards
        together see exactly the draws of one process with the whole batch.

    Returns
    -------
    total : Tensor (), the weighted loss to minimise
    parts : dict of detached scalar tensors: ``gen/<stain>``, ``aux/<stain>``, ``reverse/<stain>``
    """
    cfg = model.config
    he, ihc, stain = batch["he"], batch["ihc"], batch["stain"]
    b = he.shape[0]
    dev = he.device
    T = schedule.num_train_timesteps

    lo, n_all = (0, b) if rows is None else rows

    def draw(shape):
        t = torch.randint(0, T, (n_all,), generator=generator)[lo : lo + b].to(dev)
        noise = torch.randn((n_all, *shape[1:]), generator=generator)[lo : lo + b].to(dev)
        return t, noise

    lam_gen = torch.tensor(cfg.lambda_gen, device=dev)[stain]
    lam_aux = torch.tensor(cfg.lambda_aux, device=dev)[stain]
    total = he.new_zeros(())
    parts: dict[str, torch.Tensor] = {}

    # (branch, target x0, per-sample weight, features of the conditioning image)
    tasks: list[tuple[Branch, torch.Tensor, torch.Tensor, list[torch.Tensor]]] = []
    if cfg.variant is Variant.MULTITASK:
        feats = model.encode(he)
        tasks.append((Branch.GEN, ihc, lam_gen, feats))
        if model.aux is not None:
            if "aux" not in batch:
                raise ValueError("the model has an auxiliary branch: the batch needs 'aux'")
            tasks.append((Branch.AUX, batch["aux"], lam_aux, feats))
    else:
        tasks.append((Branch.GEN, ihc, lam_gen, model.encode(he)))
        tasks.append((Branch.REVERSE, he, lam_gen, model.encode(ihc)))

    for branch, x0, lam, feats in tasks:
        t, noise = draw(tuple(x0.shape))
        x_t = schedule.q_sample(x0, t, noise)
        per_sample = x0.new_zeros(b)
        for i, name in enumerate(cfg.stains):
            sel = (stain == i).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            sub_feats = [f[sel] for f in feats]
            pred = model.denoise(branch, name, x_t[sel], t[sel], sub_feats)
            loss = schedule.loss(pred.float(), x0[sel], t[sel], noise[sel], reduction="none")
            per_sample = per_sample.index_put((sel,), loss)
            parts[f"{branch.value}/{name}"] = loss.detach().mean()
        total = total + (lam * per_sample).sum() / b
    return total, parts


def _to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


class TrainControl:
    """Thread-safe handle to ask a running ``iter_train`` to stop after the current step.

    On a stop request the run saves a checkpoint (atomically) and ends with
    ``Finished(stopped=True)``.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()


def _check_source(source: Sequence[PairSample], config: ModelConfig, name: str) -> None:
    if len(source) == 0:
        raise ValueError(f"the {name} data holds no pairs")
    stains = getattr(source, "stains", None)
    if stains is not None:
        unknown = sorted(set(stains) - set(config.stains))
        if unknown:
            raise ValueError(
                f"the {name} data has stains {unknown} that the model does not know; "
                f"it has branches for {list(config.stains)}"
            )


def iter_train(
    train_config: TrainConfig,
    source: Sequence[PairSample],
    *,
    model_config: ModelConfig | None = None,
    init: str | Path | None = None,
    resume: str | Path | None = None,
    val_source: Sequence[PairSample] | None = None,
    out: str | Path | None = None,
    device: str | torch.device = "auto",
    control: TrainControl | None = None,
    provenance: dict[str, Any] | None = None,
    preview_he: np.ndarray | None = None,
    preview_mpp: float | None = None,
    preview_steps: int = 10,
    preview_truth: PairSample | None = None,
    distributed: bool | None = None,
) -> Iterator[Event]:
    """Train (or fine-tune, or resume) a StainDiffuser, yielding events.

    Exactly one of ``model_config`` (train from scratch), ``init`` (start from a checkpoint's
    weights, e.g. the bundled model; a new run) or ``resume`` (continue a saved run: same step
    count, optimizer and EMA state; the saved TrainConfig is kept except ``steps``) is given.

    Yields
    ------
    TrainStep after every step; Validation every ``val_every`` steps (if ``val_source``),
    with previews of ``preview_he`` ((H, W, 3) uint8 H&E at ``preview_mpp`` µm/px, default the
    model's) sampled by the EMA weights in ``preview_steps`` DPM-Solver++ steps, and, when
    ``preview_truth`` (the real IHC of that crop, its stain and its mask or None) is given, the
    preview's PSNR, SSIM and Dice against it (``metrics.preview_scores``);
    CheckpointSaved every ``checkpoint_every`` steps, on stop and at the end (if ``out``);
    Finished last.

    Data-parallel (torch DDP, ``ddp.py``) when launched by ``torchrun``, when a process
    group is initialised, or with ``distributed=True``: ``batch_size`` is then the global batch,
    each process trains on its slice of it and the result matches one process with the whole
    batch (the dropout masks aside). Only rank 0 keeps the EMA, validates, writes checkpoints and
    yields events; the other ranks yield only Finished.
    """
    if sum(x is not None for x in (model_config, init, resume)) != 1:
        raise ValueError("give exactly one of model_config (scratch), init or resume")
    dctx = plan_distributed(device, distributed)  # None: one process
    dev = resolve_device(device) if dctx is None else dctx.device
    main = dctx is None or dctx.is_main
    start_step = 0
    training_state = None
    if model_config is not None:
        config = model_config
        torch.manual_seed(train_config.seed)
        model = StainDiffuser(config)
    else:
        # resume continues the raw weights; fine-tuning starts from the (better) EMA weights
        ckpt = load_checkpoint(
            resume or init,
            weights="model" if resume is not None else "ema",
            with_training=resume is not None,
        )
        config, model = ckpt.config, ckpt.model
        if resume is not None:
            training_state = ckpt.training
            saved = TrainConfig.from_dict(training_state.train_config)
            train_config = saved.replace(steps=train_config.steps)
            start_step = training_state.step
            if start_step >= train_config.steps:
                raise ValueError(
                    f"the checkpoint is already at step {start_step}; ask for more than "
                    f"{start_step} steps to continue"
                )
    _check_source(source, config, "training")
    if val_source is not None:
        _check_source(val_source, config, "validation")
    if isinstance(source, InMemoryPairs):  # downsample once, not at every step
        source = source.resized(config.image_size)
    if isinstance(val_source, InMemoryPairs):
        val_source = val_source.resized(config.image_size)
    if out is not None:
        out = Path(out)
        if not out.parent.is_dir():
            raise ValueError(f"checkpoint folder {out.parent} does not exist")

    tc = train_config
    model.to(dev).train()
    schedule = make_schedule(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMA(model, tc.ema_decay)
    if training_state is not None:
        if training_state.optimizer_state is not None:
            optimizer.load_state_dict(training_state.optimizer_state)
        if training_state.ema_state is not None:
            ema = EMA(model, tc.ema_decay, state=training_state.ema_state)
    ema.shadow = {k: v.to(dev) for k, v in ema.shadow.items()} if main else {}
    autocast = dev.type == "cuda" and tc.bf16
    batch_kw = dict(
        image_size=config.image_size,
        stains=config.stains,
        need_mask=config.has_aux,
        distance_max=config.distance_max if config.aux_target.value == "distance" else None,
    )
    prov = {
        "package_version": __version__,
        "data": getattr(source, "description", type(source).__name__),
        "seed": tc.seed,
        "init": str(init) if init else None,
        **({"processes": dctx.world_size} if dctx else {}),
        **(provenance or {}),
    }

    def lr_at(step: int) -> float:
        return tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr

    def save(step: int, reason: str) -> CheckpointSaved:
        state = TrainingState(
            step=step,
            train_config=tc.to_dict(),
            model_state={},
            optimizer_state=optimizer.state_dict(),
        )
        save_checkpoint(
            out,
            model,
            ema_state=ema.shadow,
            training=state,
            provenance={**prov, "steps": step},
        )
        return CheckpointSaved(step=step, path=out, reason=reason)

    eval_model: StainDiffuser | None = None

    def validate(step: int) -> Validation:
        nonlocal eval_model
        if eval_model is None:
            with torch.random.fork_rng(devices=[]):  # leave the training RNG untouched
                eval_model = StainDiffuser(config).to(dev).eval()
        eval_model.load_state_dict(ema.shadow)
        sums: dict[str, list[float]] = {}
        with torch.no_grad():
            for j in range(tc.val_batches):
                rng = np.random.default_rng([tc.seed, 1_000_003, j])
                idx = rng.integers(len(val_source), size=tc.batch_size)
                batch = make_batch([val_source[int(i)] for i in idx], **batch_kw)
                gen = torch.Generator().manual_seed(_step_seed(tc.seed, j, 7))
                total, parts = diffusion_losses(eval_model, schedule, _to_tensors(batch, dev), gen)
                sums.setdefault("total", []).append(float(total))
                for k, v in parts.items():
                    sums.setdefault(k, []).append(float(v))
        previews = {}
        if preview_he is not None:
            from .inference import stain_region

            res = stain_region(
                preview_he,
                eval_model,
                steps=preview_steps,
                seed=tc.seed,
                device=str(dev),
                image_mpp=preview_mpp,
            )
            previews = res.images
        scores = {}
        truth = preview_truth
        if truth is not None and truth.stain in previews:  # PSNR, SSIM, Dice of the preview
            from .metrics import preview_scores

            virtual, mpp = previews[truth.stain], preview_mpp or config.mpp
            scores[truth.stain] = preview_scores(virtual, truth.ihc, truth.mask, truth.stain, mpp)
        losses = {k: float(np.mean(v)) for k, v in sums.items()}
        return Validation(step=step, losses=losses, previews=previews, scores=scores)

    step = start_step
    stopped = False
    rate = None
    net, rows, rank = None, None, 0  # data-parallel: DDP-wrapped loss, shard rows, rank
    if dctx is not None:
        lo, n = dctx.shard(tc.batch_size)
        rows, rank = (lo, tc.batch_size), dctx.rank
        part_keys = [(f"{b.value}/{s}", i) for b in Branch for i, s in enumerate(config.stains)]
    last = time.perf_counter()
    try:
        if dctx is not None:
            dctx.start()
            # a batch that lacks a stain leaves that stain's branches without gradient; the
            # schedule stays out of the forward's arguments (DDP would move its tensors)
            net = dctx.wrap(
                model, lambda m, *a: diffusion_losses(m, schedule, *a), len(config.stains) > 1
            )
        while step < tc.steps:
            rng = np.random.default_rng([tc.seed, step])
            idx = rng.integers(len(source), size=tc.batch_size)
            if rows is not None:  # read and build only this rank's rows of the global batch
                if tc.augment:
                    _skip_augment_draws(rng, lo)
                idx = idx[lo : lo + n]
            batch = make_batch(
                [source[int(i)] for i in idx],
                rng=rng,
                augment=tc.augment,
                color_jitter=tc.color_jitter,
                **batch_kw,
            )
            gen = torch.Generator().manual_seed(_step_seed(tc.seed, step, 0))
            # dropout: same draws after resume (per rank: the shards must not share masks)
            torch.manual_seed(_step_seed(tc.seed, step, 1) + rank)
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tensors = _to_tensors(batch, dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                if net is None:
                    total, parts = diffusion_losses(model, schedule, tensors, gen)
                else:
                    total, parts = net(tensors, gen, rows)
            logged = total
            if dctx is not None:  # the whole batch's losses, the same on every rank
                logged, parts = dctx.reduce_losses(total, parts, tensors["stain"], part_keys)
            if not torch.isfinite(logged):
                raise FloatingPointError(
                    f"the loss became {float(logged)} at step {step + 1}: lower the learning rate "
                    f"(now {lr:g})"
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            if main:
                ema.update(model, step)
            step += 1

            now = time.perf_counter()
            inst = 1.0 / max(now - last, 1e-9)
            last = now
            rate = inst if rate is None else 0.9 * rate + 0.1 * inst
            losses = {k: float(v) for k, v in parts.items()}
            losses["total"] = logged.item()
            if main:
                yield TrainStep(
                    step=step,
                    total_steps=tc.steps,
                    losses=losses,
                    lr=lr,
                    it_per_s=rate,
                    eta_s=(tc.steps - step) / rate if rate > 0 else math.inf,
                )
            if main and val_source is not None and tc.val_every and step % tc.val_every == 0:
                yield validate(step)
            stop = control is not None and control.stop_requested
            if dctx is not None:  # a stop asked on any rank stops every rank after this step
                stop = dctx.any(stop)
            if stop:
                stopped = True
                break
            every = tc.checkpoint_every
            if main and out is not None and every and step % every == 0 and step < tc.steps:
                yield save(step, "interval")
        if main and out is not None:
            yield save(step, "stop" if stopped else "end")
        if dctx is not None:  # on every rank, the checkpoint is written once this returns
            dctx.barrier()
        yield Finished(stopped=stopped, summary={"steps": step, "checkpoint": out})
    finally:
        if dctx is not None:
            dctx.close()
        if dev.type == "cuda":  # hand GPU memory back as soon as the run ends
            optimizer.state.clear()
            ema.shadow.clear()
            model.cpu()
            eval_model = None
            torch.cuda.empty_cache()


def train(*args: Any, **kwargs: Any) -> list[Event]:
    """Drain :func:`iter_train` and return its events (tests, scripts)."""
    return list(iter_train(*args, **kwargs))
