"""The sampling pipeline: model + sampler + noise, as a generator that yields after every step.

As in diffusers, the network (``StainDiffuser.denoise``) and the sampler (``diffusion.samplers``)
never meet except here. The H&E features are computed once and reused at every step (the
conditioning image does not change along the reverse process), and all requested branches (the
generation branch of each stain and, optionally, its auxiliary branch) advance in lockstep.

Randomness comes only from the ``torch.Generator`` objects passed in, one per batch item: item b
draws its initial noise (and any ancestral noise) from ``generators[b]`` alone, so its result does
not depend on what else is in the batch. Noise is drawn on the CPU and moved to the device, so a
seed gives the same noise on every device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import AuxTarget
from .diffusion import SamplerKind, karras_timesteps, make_sampler
from .events import Event, SampleStep
from .model import Branch, StainDiffuser
from .runtime import autocast, resolve_precision
from .training import make_schedule


@dataclass(frozen=True)
class SampleResult(Event):
    """Final event of :func:`iter_sample`.

    Attributes
    ----------
    images : dict[str, ndarray]
        Stain -> float32 (B, 3, H, W) in [-1, 1]: the virtual IHC (or, for a reverse sample of the
        bi-directional model, the virtual H&E under the stain's name).
    aux_score : dict[str, ndarray]
        Stain -> float32 (B, H, W) in [0, 1]: the auxiliary branch's mask probability, or its
        normalised distance map (0 on background, 1 at ``distance_max`` inside a cell).
    aux_mask : dict[str, ndarray]
        Stain -> bool (B, H, W): positive cells from the auxiliary branch.
    """

    images: dict[str, np.ndarray] = field(default_factory=dict)
    aux_score: dict[str, np.ndarray] = field(default_factory=dict)
    aux_mask: dict[str, np.ndarray] = field(default_factory=dict)


def make_generators(seed: int | Sequence[int], batch: int) -> list[torch.Generator]:
    """One CPU generator per batch item: ``seed`` (int) gives seeds seed, seed+1, ... ."""
    seeds = [int(seed) + i for i in range(batch)] if np.isscalar(seed) else [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"need one seed per batch item ({batch}); got {len(seeds)}")
    return [torch.Generator().manual_seed(s) for s in seeds]


_BRANCH_IDS = {Branch.GEN: 0, Branch.AUX: 1, Branch.REVERSE: 2}


def _branch_generator(g: torch.Generator, branch: Branch, stain_index: int) -> torch.Generator:
    """A generator for one (item, branch): seeded from the item's generator *state* (not its
    draws) and the branch's identity, so the item's generator is left untouched."""
    copy = torch.Generator()
    copy.set_state(g.get_state())
    base = int(torch.randint(0, 2**62, (1,), generator=copy))
    seq = np.random.SeedSequence(base, spawn_key=(_BRANCH_IDS[branch], stain_index))
    return torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1)))


def decode_aux(x0: torch.Tensor, aux_target: AuxTarget, distance_max: float):
    """Auxiliary branch output (B, 1, H, W) in [-1, 1] -> (score (B, H, W), mask (B, H, W))."""
    from .stain import distance_to_mask

    x = x0[:, 0].float().clamp(-1, 1).cpu().numpy()
    score = (x + 1.0) / 2.0
    is_distance = aux_target is AuxTarget.DISTANCE
    mask = distance_to_mask(x, distance_max) if is_distance else score > 0.5
    return score.astype(np.float32), mask


#: the default for models without their own (benchmarks/bench_samplers.py, docs/performance.md):
#: 10-step DDIM on a Karras grid matches 1000-step DDPM within 0.005 SSIM and 0.004 Dice on
#: held-out tiles; DPM-Solver++ 20 on the trailing grid (the earlier default) fell 0.23 SSIM
#: short on CD3 (background grain)
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 10
DEFAULT_SPACING = "karras"
#: above this many steps the default grid is "trailing"
KARRAS_MAX_STEPS = 50


def resolve_sampling(
    model, sampler: str | None = None, steps: int | None = None
) -> tuple[str, int]:
    """The sampler and step count to use: what was asked for, else the model's own.

    A distilled checkpoint records the sampler it was distilled for (provenance ``sampling``,
    e.g. ``{"sampler": "ddim", "steps": 4}``); ``load_checkpoint`` puts it on the model as
    ``model.sampling_defaults``. Without one the default is :data:`DEFAULT_SAMPLER` with
    :data:`DEFAULT_STEPS` steps. ``steps`` left out takes the model's own count only when the
    sampler is the model's own.
    """
    own = getattr(model, "sampling_defaults", None) or {}
    own_sampler = str(own.get("sampler", DEFAULT_SAMPLER))
    name = own_sampler if sampler is None else str(getattr(sampler, "value", sampler))
    if steps is None:
        steps = int(own["steps"]) if "steps" in own and name == own_sampler else DEFAULT_STEPS
    return name, int(steps)


def resolve_spacing(model, sampler: str, steps: int, spacing: str | None = None) -> str:
    """The timestep grid: what was asked for, else the model's own when sampling exactly as it
    was distilled for (a distilled student only works on its own grid), else Karras for up to
    :data:`KARRAS_MAX_STEPS` steps when it fits the model's schedule, else "trailing"."""
    if spacing is not None:
        return str(getattr(spacing, "value", spacing))
    own = getattr(model, "sampling_defaults", None) or {}
    if own.get("spacing") and own.get("sampler") == sampler and own.get("steps") == steps:
        return str(own["spacing"])
    if steps > KARRAS_MAX_STEPS:  # many steps: the grid hardly matters (and Karras grids of more
        return "trailing"  # than ~78 steps do not fit T = 1000: they would repeat timesteps)
    config = getattr(model, "config", None)
    if config is not None:
        try:
            karras_timesteps(make_schedule(config).alphas_cumprod, steps)
        except ValueError:  # a short schedule (small T)
            return "trailing"
    return DEFAULT_SPACING


def model_timesteps(model, sampler: str, steps: int) -> list[int]:
    """A distilled model's own explicit grid (provenance ``sampling.timesteps``), for
    ``spacing="custom"``; a ValueError if the model has none for this sampler and step count."""
    own = getattr(model, "sampling_defaults", None) or {}
    ts = own.get("timesteps")
    if ts is None or own.get("sampler") != sampler or own.get("steps") != steps:
        have = (
            f"{own.get('sampler')} {own.get('steps')} steps"
            if ts is not None
            else "no explicit grid"
        )
        raise ValueError(
            f"spacing 'custom' uses the model's own timestep grid, and this model has {have}; "
            f"asked for {sampler} {steps} steps"
        )
    return [int(t) for t in ts]


def iter_sample(
    model: StainDiffuser,
    cond: torch.Tensor,
    *,
    stains: Sequence[str] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    generators: Sequence[torch.Generator] | None = None,
    seed: int | Sequence[int] = 0,
    aux: bool = True,
    reverse: bool = False,
    eta: float = 0.0,
    spacing: str | None = None,
    precision: str = "fp32",
) -> Iterator[Event]:
    """Sample virtual stains for a batch of conditioning images.

    Parameters
    ----------
    model : StainDiffuser
        Used on its current device, in eval mode.
    cond : Tensor (B, 3, H, W) float in [-1, 1]
        H&E images (IHC images of ``stains[0]`` when ``reverse``). H, W multiples of
        ``model.config.downsample_factor``.
    stains : sequence of str, optional
        Stains to generate; all of the model's by default.
    sampler : {"ddpm", "ddim", "dpmsolver++"}, optional
    steps : int, optional
        Network evaluations per branch. Both default to the model's own (a distilled
        checkpoint's), else 10-step DDIM (:func:`resolve_sampling`).
    generators : list of torch.Generator, optional
        One per batch item; otherwise made from ``seed`` with :func:`make_generators`.
    aux : bool
        Also sample the auxiliary branch (mask / distance map) of each stain, if the model has it.
    reverse : bool
        Bi-directional models only: IHC -> H&E.
    eta : float
        DDIM stochasticity (0 = deterministic).
    spacing : {"karras", "trailing", "leading", "linspace", "custom"}, optional
        How the ``steps`` timesteps are picked from the T training timesteps; default: a
        distilled model's own grid, else "karras" (:func:`resolve_spacing`). "custom" is a
        distilled model's explicit grid (:func:`model_timesteps`).
    precision : {"fp32", "bf16", "fp16", "auto"}
        The network's autocast precision (``runtime.resolve_precision``); the sampler's math
        stays float32 and the network's outputs are cast to float32.

    Yields
    ------
    SampleStep after every step, then one SampleResult.
    """
    model.check_input(cond, "conditioning image")
    sampler, steps = resolve_sampling(model, sampler, steps)
    spacing = resolve_spacing(model, sampler, steps, spacing)
    stains = list(stains) if stains is not None else list(model.stains)
    if not stains:
        raise ValueError("ask for at least one stain")
    for s in stains:
        model.config.stain_index(s)
    if reverse and model.config.variant.value != "bidirectional":
        raise ValueError("reverse (IHC -> H&E) sampling needs a bi-directional model")
    b, _, h, w = cond.shape
    if generators is None:
        generators = make_generators(seed, b)
    if len(generators) != b:
        raise ValueError(f"need one generator per batch item ({b}); got {len(generators)}")

    schedule = make_schedule(model.config)
    branches: list[tuple[Branch, str]] = []
    for s in stains:
        branches.append((Branch.REVERSE if reverse else Branch.GEN, s))
        if aux and model.aux is not None and not reverse:
            branches.append((Branch.AUX, s))
    kwargs: dict = {"spacing": spacing}
    if spacing == "custom":
        kwargs["timesteps"] = model_timesteps(model, sampler, steps)
    if sampler == SamplerKind.DDIM:  # str enum: matches "ddim" too
        kwargs["eta"] = eta
    samplers = [make_sampler(sampler, schedule, steps, **kwargs) for _ in branches]
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)

    # Every (item, branch) gets its own generator, derived from the item's generator and the
    # branch's identity (kind, stain), so a stain's sample does not depend on which other stains
    # or branches are requested, nor on the batch.
    branch_gens = [
        [_branch_generator(g, br, model.config.stain_index(st)) for br, st in branches]
        for g in generators
    ]
    xs = [
        torch.stack(
            [
                torch.randn((model.target_channels(br), h, w), generator=branch_gens[i][j])
                for i in range(b)
            ]
        ).to(device)
        for j, (br, _) in enumerate(branches)
    ]

    # Inference mode and eval mode are held only while computing, never across a yield, so the
    # consumer's code between steps (or a thread that keeps a paused generator) is unaffected.
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode(), autocast(precision, device):
            feats = model.encode(cond.to(device))
        model.train(was_training)
        timesteps = samplers[0].timesteps
        for i, t in enumerate(timesteps):
            model.eval()
            with torch.inference_mode():
                t_vec = torch.full((b,), int(t), device=device, dtype=torch.long)
                for j, ((branch, stain), smp) in enumerate(zip(branches, samplers, strict=True)):
                    with autocast(precision, device):
                        out = model.denoise(branch, stain, xs[j], t_vec, feats).float()
                    noise = None
                    if smp.requires_noise(i):
                        shape = tuple(xs[j].shape[1:])
                        noise = torch.stack(
                            [torch.randn(shape, generator=branch_gens[k][j]) for k in range(b)]
                        ).to(device)
                    xs[j] = smp.step(out, i, xs[j], noise)
            model.train(was_training)
            yield SampleStep(step=i + 1, total=len(timesteps), timestep=int(t))
    finally:
        model.train(was_training)

    result = SampleResult()
    for (branch, stain), x in zip(branches, xs, strict=True):
        if branch is Branch.AUX:
            score, mask = decode_aux(x, model.config.aux_target, model.config.distance_max)
            result.aux_score[stain] = score
            result.aux_mask[stain] = mask
        else:
            result.images[stain] = x.float().clamp(-1, 1).cpu().numpy()
    yield result


def sample(model: StainDiffuser, cond: torch.Tensor, **kwargs) -> SampleResult:
    """Run :func:`iter_sample` to the end and return its :class:`SampleResult`."""
    result = None
    for event in iter_sample(model, cond, **kwargs):
        result = event
    assert isinstance(result, SampleResult)
    return result


def to_uint8_rgb(images: np.ndarray) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = (np.clip(images, -1, 1) + 1.0) * 127.5
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)


def from_uint8_rgb(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (H, W, 3) -> float32 tensor (B, 3, H, W) in [-1, 1]."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images (B, H, W, 3); got {a.dtype} {a.shape}")
    return torch.from_numpy(a.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
