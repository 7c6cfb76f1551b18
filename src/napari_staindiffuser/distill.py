"""Progressive distillation (Salimans & Ho 2022): fewer sampling steps, same model.

A *student* (initialised from the teacher) learns to do in one deterministic DDIM step what the
teacher does in two. Repeating this halves the number of steps each *stage*: teacher DDIM 16 ->
student 8 -> student 4 -> ... Every branch is distilled (each stain's generation and auxiliary
UNet and the shared H&E encoder), each with the target computed from its own teacher branch.

Target (Salimans & Ho 2022, Algorithm 2, with the discrete grids of ``diffusion.samplers``):
with ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, the original teacher samples on a grid
of ``teacher_steps`` points (``grid="trailing"``: ``make_timesteps("trailing", T, n)``;
``grid="karras"``: ``karras_timesteps``, the grid at which few-step DDIM is at parity with DDPM);
the stage with ``N`` student steps uses every ``teacher_steps / N``-th point of it, so the
teacher grid of ``2N`` points has the student grid as its even points. For a student step
``t -> t''`` (``abar'' = 1`` after the last grid point) and the teacher's midpoint ``t'``:

1. ``z_t = alpha_t x + sigma_t eps`` (``x`` a training target: IHC or mask);
2. ``z_t'`` and ``z_t''``: two teacher DDIM steps (eta 0, ``x0`` clamped to [-1, 1] as the
   sampler does), the exact update of :class:`~napari_staindiffuser.diffusion.DDIMSampler`;
3. ``x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)``, the
   ``x0`` with which ONE DDIM step from ``z_t`` lands on ``z_t''`` (``x~ = z_t''`` on the last);
4. the student's v-target ``v~ = (alpha_t z_t - x~) / sigma_t``; the loss is the MSE on v, i.e.
   the ``x0`` error weighted by ``1 + SNR`` (the paper's "SNR+1" weighting).

The distilled checkpoint records the sampler it was distilled for in its provenance
(``{"sampling": {"sampler": "ddim", "steps": N, "spacing": "trailing"}}``, or for a Karras
teacher grid ``"spacing": "custom"`` with the explicit ``"timesteps"``); sampling code uses it as
the default (:func:`napari_staindiffuser.sampling.resolve_sampling`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from ._distill_focus import focus_of, indices_of, trainable
from .diffusion import NoiseSchedule, custom_timesteps, karras_timesteps, make_timesteps
from .events import CheckpointSaved, Event, Finished, TrainStep, Validation
from .model import Branch, StainDiffuser
from .model.checkpoint import load_checkpoint, model_hash, save_checkpoint
from .pairs import InMemoryPairs, PairSample, make_batch
from .training import (
    EMA,
    TrainControl,
    _check_source,
    _step_seed,
    _to_tensors,
    make_schedule,
    resolve_device,
)

__all__ = [
    "GRIDS",
    "SPACING",
    "distill",
    "distill_grid",
    "distill_losses",
    "distill_target",
    "iter_distill",
    "stage_plan",
    "teacher_grid",
]

SPACING = "trailing"  # the default grid (the student is distilled for it and sampled with it)
GRIDS = ("karras", "trailing", "teacher")  # "teacher": a distilled teacher's own recorded grid


def stage_plan(teacher_steps: int, student_steps: int) -> list[int]:
    """Student step counts of each stage: ``16, 2`` -> ``[8, 4, 2]``.

    ``teacher_steps`` must be ``student_steps * 2**k`` with ``k >= 1``.
    """
    for name, v in (("teacher_steps", teacher_steps), ("student_steps", student_steps)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
    plan, n = [], int(teacher_steps)
    while n > student_steps and n % 2 == 0:
        n //= 2
        plan.append(n)
    if not plan or plan[-1] != student_steps:
        raise ValueError(
            f"teacher_steps must be student_steps times a power of two (>= 2); got "
            f"teacher_steps={teacher_steps}, student_steps={student_steps}"
        )
    return plan


def distill_grid(
    schedule: NoiseSchedule, grid: str | Sequence[int], teacher_steps: int
) -> torch.Tensor:
    """The original teacher's DDIM grid of ``teacher_steps`` points (each stage's grids are
    every k-th point of it): ``"trailing"``, ``"karras"`` or an explicit grid (a distilled
    teacher's own; see :func:`teacher_grid`)."""
    if not isinstance(grid, str):
        return custom_timesteps(grid, schedule.num_train_timesteps, teacher_steps)
    if grid == "trailing":
        return make_timesteps(SPACING, schedule.num_train_timesteps, teacher_steps)
    if grid == "karras":
        return karras_timesteps(schedule.alphas_cumprod, teacher_steps)
    raise ValueError(f"grid must be one of {GRIDS}; got {grid!r}")


def teacher_grid(
    schedule: NoiseSchedule,
    student_steps: int,
    *,
    grid: str | Sequence[int] = SPACING,
    teacher_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps and ``abar`` of the teacher's 2N-point DDIM grid (the student's: its even points).

    ``grid="trailing"`` (default): ``make_timesteps("trailing", T, 2N)``, whose even points are
    the trailing N grid (checked). ``grid="karras"``: every ``teacher_steps / (2N)``-th point of
    the ``teacher_steps``-point Karras grid (``teacher_steps`` needed, a multiple of 2N). A
    sequence of ``teacher_steps`` timesteps: every ``teacher_steps / (2N)``-th point of it.

    Returns
    -------
    t : LongTensor (2N,)
        The teacher's grid; ``t[::2]`` is the student's.
    abar : float64 tensor (2N + 1,)
        ``abar`` at ``t``, then ``1.0`` (the clean sample the last step reaches).

    Raises
    ------
    ValueError
        Unknown grid, ``teacher_steps`` missing or not a multiple of 2N, or (trailing) grids
        that do not nest.
    """
    T = schedule.num_train_timesteps
    if isinstance(grid, str) and grid == SPACING:
        t2 = make_timesteps(SPACING, T, 2 * student_steps)
        s = make_timesteps(SPACING, T, student_steps)
        if not torch.equal(t2[::2], s):
            raise ValueError(
                f"the {2 * student_steps}-step grid does not contain the {student_steps}-step "
                f"grid ({t2.tolist()} vs {s.tolist()}); progressive distillation needs nested grids"
            )
    else:
        if teacher_steps is None or teacher_steps % (2 * student_steps):
            raise ValueError(
                f"the {grid!r} grid needs teacher_steps, a multiple of 2 * {student_steps}; got "
                f"{teacher_steps!r}"
            )
        t2 = distill_grid(schedule, grid, teacher_steps)[:: teacher_steps // (2 * student_steps)]
    abar = schedule.alphas_cumprod.detach().cpu()
    return t2, torch.cat([abar[t2], torch.ones(1, dtype=torch.float64)])


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float64 (B,) -> (B, 1, 1, 1) in ``like``'s float dtype and device."""
    shape = (-1,) + (1,) * (like.ndim - 1)
    return values.reshape(shape).to(device=like.device, dtype=torch.float32)


def _ddim_step(
    schedule: NoiseSchedule, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, abar_s
) -> torch.Tensor:
    """One deterministic DDIM step per sample, exactly as ``DDIMSampler(eta=0)`` with the default
    ``clip_sample=True``: ``x_s = sqrt(abar_s) clamp(x0) + sqrt(1 - abar_s) eps``."""
    x0 = schedule.predict_x0(out, z, t).clamp(-1.0, 1.0)
    eps = schedule.predict_eps(out, z, t)
    return _col(abar_s.sqrt(), z) * x0 + _col((1.0 - abar_s).clamp(min=0).sqrt(), z) * eps


def distill_target(
    schedule: NoiseSchedule,
    z_t: torch.Tensor,
    z_s: torch.Tensor,
    abar_t: torch.Tensor,
    abar_s: torch.Tensor,
) -> torch.Tensor:
    """The student's v-target: the v with which one DDIM step ``t -> s`` maps ``z_t`` to ``z_s``.

    Parameters
    ----------
    z_t, z_s : Tensor (B, C, H, W)
        Sample at the student's timestep and the teacher's result two steps later.
    abar_t, abar_s : float64 Tensor (B,)
        ``abar`` at ``t`` and at ``s`` (``abar_s = 1`` for the clean sample).

    Returns
    -------
    Tensor (B, C, H, W) float32: ``v~ = (alpha_t z_t - x~) / sigma_t`` with
    ``x~ = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - (sigma_s/sigma_t) alpha_t)``.
    """
    a_t, s_t = abar_t.sqrt(), (1.0 - abar_t).sqrt()
    a_s, s_s = abar_s.sqrt(), (1.0 - abar_s).clamp(min=0).sqrt()
    ratio = s_s / s_t
    denom = a_s - ratio * a_t
    x_tilde = (z_s.float() - _col(ratio, z_t) * z_t.float()) / _col(denom, z_t)
    return (_col(a_t, z_t) * z_t.float() - x_tilde) / _col(s_t, z_t)


def distill_losses(
    student: StainDiffuser,
    teacher: StainDiffuser,
    schedule: NoiseSchedule,
    student_steps: int,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    *,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
    step_weights: torch.Tensor | None = None,
    stains: Sequence[str] | None = None,
    branches: Sequence[Branch | str] | None = None,
    train_encoder: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss of one batch, every branch with its own teacher target.

    Like :func:`napari_staindiffuser.training.diffusion_losses` (same batch layout, same
    per-stain loss weights, each sample trains its own stain's branches), but the target is two
    teacher DDIM steps on the ``2 * student_steps`` grid (see the module docstring): ``grid``,
    :func:`teacher_grid`'s result (default: the trailing grid).

    ``step_weights`` (``student_steps`` non-negative values): how often each student step is
    drawn (default: uniformly). ``stains`` and ``branches`` (default: all) limit the loss to
    those stains' samples and those branch kinds; ``train_encoder=False`` computes the student's
    encoder features without gradients.

    Returns
    -------
    total : Tensor (), the weighted loss to minimise
    parts : dict of detached scalar tensors ``gen/<stain>``, ``aux/<stain>``
    """
    cfg = student.config
    if cfg.variant.value != "multitask":
        raise ValueError(f"distillation supports multitask models; got {cfg.variant.value!r}")
    he, stain = batch["he"], batch["stain"]
    b, dev = he.shape[0], he.device
    t2, abar2 = teacher_grid(schedule, student_steps) if grid is None else grid
    if len(t2) != 2 * student_steps:
        raise ValueError(f"grid has {len(t2)} points; need 2 * student_steps = {2 * student_steps}")
    kinds = {Branch(k) for k in branches} if branches is not None else {Branch.GEN, Branch.AUX}
    tasks = []
    if Branch.GEN in kinds:
        tasks.append((Branch.GEN, batch["ihc"], torch.tensor(cfg.lambda_gen, device=dev)[stain]))
    if student.aux is not None and Branch.AUX in kinds:
        if "aux" not in batch:
            raise ValueError("the model has an auxiliary branch: the batch needs 'aux'")
        tasks.append((Branch.AUX, batch["aux"], torch.tensor(cfg.lambda_aux, device=dev)[stain]))
    if not tasks:
        raise ValueError(f"no branch to distil: branches {sorted(k.value for k in kinds)}")

    if train_encoder:
        feats = student.encode(he)
    else:  # contiguous: torch's CPU GroupNorm backward crashes on channels-last inputs that
        # need no gradient (the attention's norm of frozen features; torch 2.13)
        with torch.no_grad():
            feats = [f.contiguous() for f in student.encode(he)]
    with torch.no_grad():
        t_feats = teacher.encode(he)
    total = he.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for branch, x0, lam in tasks:
        if step_weights is None:
            i = torch.randint(0, student_steps, (b,), generator=generator)
        else:
            i = torch.multinomial(step_weights, b, replacement=True, generator=generator)
        noise = torch.randn(tuple(x0.shape), generator=generator).to(dev)
        t, t_mid = t2[2 * i].to(dev), t2[2 * i + 1].to(dev)  # student step t -> t2[2i + 2]
        a_t, a_mid, a_s = abar2[2 * i], abar2[2 * i + 1], abar2[2 * i + 2]
        z_t = schedule.q_sample(x0, t, noise)
        per_sample = x0.new_zeros(b)
        for k, name in enumerate(cfg.stains):
            sel = (stain == k).nonzero(as_tuple=True)[0]
            if sel.numel() == 0 or (stains is not None and name not in stains):
                continue
            sel_cpu = sel.cpu()
            with torch.no_grad():
                tf = [f[sel] for f in t_feats]
                z = z_t[sel]
                out = teacher.denoise(branch, name, z, t[sel], tf).float()
                z_mid = _ddim_step(schedule, out, z, t[sel], a_mid[sel_cpu])
                out = teacher.denoise(branch, name, z_mid, t_mid[sel], tf).float()
                z_s = _ddim_step(schedule, out, z_mid, t_mid[sel], a_s[sel_cpu])
                target = distill_target(schedule, z, z_s, a_t[sel_cpu], a_s[sel_cpu])
            pred = student.denoise(branch, name, z, t[sel], [f[sel] for f in feats]).float()
            loss = (pred - target).square().reshape(len(sel), -1).mean(dim=1)
            per_sample = per_sample.index_put((sel,), loss)
            parts[f"{branch.value}/{name}"] = loss.detach().mean()
        total = total + (lam * per_sample).sum() / b
    return total, parts


def _validate(student, shadow, teacher, schedule, n, val_source, at, *, seed, batch_size,
              val_batches, batch_kw, grid, keep, loss_kw) -> Validation:  # fmt: skip
    """Distillation loss of the EMA student on fixed held-out batches."""
    dev = next(student.parameters()).device
    ev_model = copy.deepcopy(student).eval()
    ev_model.load_state_dict(shadow)
    sums: dict[str, list[float]] = {}
    with torch.no_grad():
        for j in range(val_batches):
            rng = np.random.default_rng([seed, 1_000_003, j])
            idx = rng.integers(len(keep), size=batch_size)
            batch = make_batch([val_source[keep[i]] for i in idx], **batch_kw)
            gen = torch.Generator().manual_seed(_step_seed(seed, j, 7))
            total, parts = distill_losses(
                ev_model, teacher, schedule, n, _to_tensors(batch, dev), gen, grid=grid, **loss_kw
            )
            sums.setdefault("total", []).append(float(total))
            for key, v in parts.items():
                sums.setdefault(key, []).append(float(v))
    losses = {key: float(np.mean(v)) for key, v in sums.items()}
    losses["stage_steps"] = float(n)
    return Validation(step=at, losses=losses)


def _sampling_record(timesteps: torch.Tensor, n: int, grid) -> dict[str, Any]:
    """The provenance ``sampling`` entry of an ``n``-step student (its default sampler)."""
    if isinstance(grid, str) and grid == SPACING:
        return {"sampler": "ddim", "steps": n, "spacing": SPACING}
    return {"sampler": "ddim", "steps": n, "spacing": "custom", "timesteps": timesteps.tolist()}


def iter_distill(
    teacher_checkpoint: str | Path,
    out: str | Path,
    source: Sequence[PairSample],
    *,
    student_steps: int = 4,
    teacher_steps: int = 16,
    grid: str = "karras",
    init_student: str | Path | None = None,
    stains: Sequence[str] | None = None,
    branches: Sequence[str] | None = None,
    step_weights: Sequence[float] | None = None,
    steps_per_stage: int | Sequence[int] = 1000,
    batch_size: int = 16,
    lr: float = 1e-4,
    warmup_steps: int = 50,
    ema_decay: float = 0.995,
    grad_clip: float = 1.0,
    seed: int = 0,
    augment: bool = True,
    color_jitter: float = 0.0,
    val_source: Sequence[PairSample] | None = None,
    val_every: int = 0,
    val_batches: int = 2,
    half: bool = False,
    checkpoint_every: int = 0,
    device: str | torch.device = "auto",
    control: TrainControl | None = None,
) -> Iterator[Event]:
    """Distil a checkpoint progressively down to ``student_steps`` DDIM steps, yielding events.

    Stage k trains a student (initialised from the previous stage's EMA weights, the first from
    the teacher checkpoint's) to match two DDIM steps of the previous model, halving the steps:
    ``teacher_steps`` -> ``teacher_steps/2`` -> ... -> ``student_steps``. The learning rate warms
    up over ``warmup_steps`` and then falls linearly to 0 at the end of each stage (AdamW, no
    weight decay); the EMA (warm-up as in training) restarts each stage.

    Parameters
    ----------
    teacher_checkpoint : path
        A v- or epsilon-prediction multitask checkpoint (EMA weights are used).
    grid : {"karras", "trailing", "teacher"}
        The original teacher's DDIM grid of ``teacher_steps`` points; each stage samples every
        k-th point of it (:func:`teacher_grid`). "karras" is the grid at which few-step DDIM is
        at parity with DDPM (docs/performance.md); its students record their explicit grid
        (``spacing="custom"``). "teacher": the teacher checkpoint's own recorded grid (to
        distil a distilled student further).
    init_student : path, optional
        Start the first stage's student from this checkpoint's EMA weights instead of the
        teacher's (same architecture): to continue a stage that was cut short or needs more
        steps, e.g. teacher ``student-8step`` with ``grid="teacher"`` and ``init_student`` the
        4-step student of that stage.
    stains, branches : sequence of str, optional
        Distil only these stains' branches (default: all; the training and validation pairs of
        other stains are skipped) and only these branch kinds (``"gen"``, ``"aux"``; default:
        both). When either leaves something out, the shared encoder is frozen too, so every
        weight outside the chosen branches stays bit-identical to the first stage's student:
        with ``init_student``, to improve the stain that is short of parity without touching
        the ones that are at it.
    step_weights : sequence of float, optional
        How often each student step is trained, one non-negative weight per step (default:
        uniform), e.g. ``(1, 1, 1, 4)`` to train the last step (the jump to the clean image)
        4 times as often as each other; a single stage only (``teacher_steps = 2 *
        student_steps``).
    out : path
        The final student (``.safetensors``). Earlier stages are written beside it as
        ``<stem>-<N>step.safetensors``. Inference-only (EMA weights, no optimizer state),
        float16 tensors if ``half``.
    source : sequence of PairSample
        Training pairs: their IHC and masks are the ``x`` that get noised (any pairs the teacher
        knows the stains of; the teacher's own training data is the natural choice).
    steps_per_stage : int or sequence of int
        Optimisation steps of each stage (one value for all, or one per stage).
    val_source : sequence of PairSample, optional
        Fixed held-out batches; the EMA student's distillation loss on them is reported every
        ``val_every`` steps (if > 0) and at the end of each stage.
    checkpoint_every : int
        If > 0, also save the stage's EMA student every so many steps of the stage (reason
        "interval"), so that a run cut short still leaves a usable model.

    Yields
    ------
    TrainStep after every step (``step`` counts over all stages; losses ``gen/<stain>``,
    ``aux/<stain>``, ``total``, plus ``stage_steps``: the student steps of the current stage);
    Validation; CheckpointSaved at the end of each stage (``reason`` "stage" or "end", "stop"
    when stopped early); Finished last (``summary``: steps, checkpoint, stages, stage files).
    """
    plan = stage_plan(teacher_steps, student_steps)
    per_stage = (
        [int(steps_per_stage)] * len(plan)
        if isinstance(steps_per_stage, (int, np.integer))
        else [int(v) for v in steps_per_stage]
    )
    if len(per_stage) != len(plan) or min(per_stage) < 1:
        raise ValueError(
            f"steps_per_stage must be a positive int or one per stage ({len(plan)} stages: "
            f"{plan}); got {steps_per_stage!r}"
        )
    if batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"batch_size must be >= 1 and lr > 0; got {batch_size}, {lr}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ValueError(f"checkpoint folder {out.parent} does not exist")
    dev = resolve_device(device)
    ckpt = load_checkpoint(teacher_checkpoint, weights="ema")
    config = ckpt.config
    _check_source(source, config, "training")
    if val_source is not None:
        _check_source(val_source, config, "validation")
    if isinstance(source, InMemoryPairs):
        source = source.resized(config.image_size)
    if isinstance(val_source, InMemoryPairs):
        val_source = val_source.resized(config.image_size)
    focus = focus_of(config, plan, stains, branches, step_weights)
    keep = indices_of(source, focus["stains"])
    val_keep = indices_of(val_source, focus["stains"]) if val_source is not None else None
    schedule = make_schedule(config)
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}; got {grid!r}")
    base: str | list[int] = grid
    if grid == "teacher":  # continue from a distilled checkpoint: on its own grid
        own = ckpt.provenance.get("sampling") or {}
        if own.get("steps") != teacher_steps or not (own.get("timesteps") or own.get("spacing")):
            raise ValueError(
                f"grid 'teacher' needs a distilled teacher with its own {teacher_steps}-step grid; "
                f"{Path(teacher_checkpoint).name} records {own or 'none'}"
            )
        base = own.get("timesteps") or str(own["spacing"])
    grids = {n: teacher_grid(schedule, n, grid=base, teacher_steps=teacher_steps) for n in plan}
    batch_kw = dict(
        image_size=config.image_size,
        stains=config.stains,
        need_mask=config.has_aux,
        distance_max=config.distance_max if config.aux_target.value == "distance" else None,
    )
    teacher: StainDiffuser = ckpt.model.to(dev).eval().requires_grad_(False)
    init_state = None
    if init_student is not None:
        init = load_checkpoint(init_student, weights="ema")
        if init.config != config:
            raise ValueError(
                f"init_student {Path(init_student).name} is not the teacher's architecture: "
                f"{init.config} vs {config}"
            )
        init_state = init.model.state_dict()
    prov_base: dict[str, Any] = {
        **{k: v for k, v in ckpt.provenance.items() if k not in ("sampling", "distillation")},
        "package_version": __version__,
    }
    distill_info: dict[str, Any] = {
        "method": "progressive distillation (Salimans & Ho 2022), DDIM eta 0, v-target",
        "teacher": Path(teacher_checkpoint).name,
        "teacher_sha256": model_hash(teacher_checkpoint),
        **({"init_student": Path(init_student).name} if init_student is not None else {}),
        **{k: v for k, v in focus.items() if v is not None and k != "loss_kw"},
        "teacher_steps": int(teacher_steps),
        "grid": grid,
        "teacher_grid": distill_grid(schedule, base, teacher_steps).tolist(),
        "stages": plan,
        "steps_per_stage": per_stage,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "ema_decay": ema_decay,
        "seed": seed,
        "data": getattr(source, "description", type(source).__name__),
    }
    total_steps = sum(per_stage)
    files: list[str] = []
    step = 0
    stopped = False
    rate = None
    last = time.perf_counter()
    student = ema = None

    def save(k: int, n: int, done: int, final: bool, stopped: bool) -> Path:
        path = out if final else out.with_name(f"{out.stem}-{n}step{out.suffix}")
        shadow = {
            key: (v.half() if half and v.is_floating_point() else v)
            for key, v in ema.shadow.items()
        }
        steps_done = {str(m): per_stage[i] for i, m in enumerate(plan[:k])} | {str(n): done}
        info = {**distill_info, "steps_done": steps_done}
        prov = {
            **prov_base,
            "sampling": _sampling_record(grids[n][0][::2], n, base),
            "distillation": {**info, "stopped": stopped},
            "weights": "ema",
        }
        save_checkpoint(path, student, ema_state=shadow, provenance=prov)
        return path

    try:
        for k, (n, n_steps) in enumerate(zip(plan, per_stage, strict=True)):
            student = copy.deepcopy(teacher).train().requires_grad_(True)
            if k == 0 and init_state is not None:
                student.load_state_dict(init_state)
            params = trainable(student, focus)
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            ema = EMA(student, ema_decay)

            def lr_at(j: int, n_steps=n_steps) -> float:
                warm = min(1.0, (j + 1) / warmup_steps) if warmup_steps else 1.0
                return lr * warm * max(0.0, 1.0 - j / n_steps)

            def validate(at: int, n=n, student=student, ema=ema, teacher=teacher):
                return _validate(
                    student, ema.shadow, teacher, schedule, n, val_source, at,
                    seed=seed, batch_size=batch_size, val_batches=val_batches, batch_kw=batch_kw,
                    grid=grids[n], keep=val_keep, loss_kw=focus["loss_kw"],
                )  # fmt: skip

            for j in range(n_steps):
                rng = np.random.default_rng([seed, k, j])
                idx = rng.integers(len(keep), size=batch_size)
                batch = make_batch(
                    [source[keep[i]] for i in idx],
                    rng=rng,
                    augment=augment,
                    color_jitter=color_jitter,
                    **batch_kw,
                )
                gen = torch.Generator().manual_seed(_step_seed(seed, step, 0))
                cur_lr = lr_at(j)
                for group in optimizer.param_groups:
                    group["lr"] = cur_lr
                total, parts = distill_losses(
                    student, teacher, schedule, n, _to_tensors(batch, dev), gen, grid=grids[n],
                    **focus["loss_kw"],
                )  # fmt: skip
                if not torch.isfinite(total):
                    raise FloatingPointError(
                        f"the distillation loss became {float(total)} at step {step + 1}: "
                        f"lower the learning rate (now {cur_lr:g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                ema.update(student, j)
                step += 1
                now = time.perf_counter()
                inst = 1.0 / max(now - last, 1e-9)
                last = now
                rate = inst if rate is None else 0.9 * rate + 0.1 * inst
                losses = {key: float(v) for key, v in parts.items()}
                losses["total"] = total.item()
                losses["stage_steps"] = float(n)
                yield TrainStep(
                    step=step,
                    total_steps=total_steps,
                    losses=losses,
                    lr=cur_lr,
                    it_per_s=rate,
                    eta_s=(total_steps - step) / rate if rate > 0 else math.inf,
                )
                if control is not None and control.stop_requested:
                    stopped = True
                    break
                if val_source is not None and val_every and (j + 1) % val_every == 0:
                    yield validate(step)
                if checkpoint_every and (j + 1) % checkpoint_every == 0 and j + 1 < n_steps:
                    final = k == len(plan) - 1
                    path = save(k, n, j + 1, final, False)
                    yield CheckpointSaved(step=step, path=path, reason="interval")
            validated = val_every and n_steps % val_every == 0
            if val_source is not None and not stopped and not validated:
                yield validate(step)

            final = k == len(plan) - 1 or stopped
            path = save(k, n, j + 1, final, stopped)
            files.append(str(path))
            yield CheckpointSaved(
                step=step, path=path, reason="stop" if stopped else ("end" if final else "stage")
            )
            if stopped:
                break
            # the next stage's teacher is this stage's EMA student
            teacher = copy.deepcopy(student).eval().requires_grad_(False)
            teacher.load_state_dict(ema.shadow)
        yield Finished(
            stopped=stopped,
            summary={"steps": step, "checkpoint": out, "stages": plan, "files": files},
        )
    finally:
        if dev.type == "cuda":
            student = ema = teacher = None
            torch.cuda.empty_cache()


def distill(*args: Any, **kwargs: Any) -> list[Event]:
    """Drain :func:`iter_distill` and return its events (tests, scripts)."""
    return list(iter_distill(*args, **kwargs))
