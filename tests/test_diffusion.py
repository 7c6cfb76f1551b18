"""Tests of napari_staindiffuser.diffusion against closed forms and diffusers (the reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_staindiffuser.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    NoiseSchedule,
    PredictionType,
    ScheduleKind,
    Spacing,
    make_betas,
    make_sampler,
    make_timesteps,
)

diffusers = pytest.importorskip("diffusers")
# diffusers' own numpy-2 deprecation noise from DPMSolverMultistepScheduler.set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
)
from diffusers.schedulers import scheduling_dpmsolver_multistep as _dpm_module  # noqa: E402

SHAPE = (2, 3, 4, 4)
PREDS = ["epsilon", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]
STEPS = [4, 10, 20]
DIFFUSERS_KIND = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
_W = torch.randn(3, 3, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic stand-in for the network: channel mix + tanh, plus a function of t."""
    mixed = torch.einsum("oc,bchw->bohw", 0.8 * _W.to(x.dtype), x)
    return 0.8 * torch.tanh(mixed) + 0.3 * math.sin(float(t) / 150.0)


def _noise(gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    # what diffusers' randn_tensor(shape, generator=gen, dtype=dtype) draws on the CPU
    return torch.randn(SHAPE, generator=gen, dtype=dtype)


def _x_init(dtype=torch.float64, seed=7) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------
# reference runs (diffusers)


class _NoDowncastTorch:
    """``torch`` for diffusers' DPM-Solver module with ``float32`` meaning float64.

    ``DPMSolverMultistepScheduler.step`` does ``sample.to(torch.float32)``; with this in place
    the float64 reference stays float64, so the comparison tests the update formulas only.
    """

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def float64_reference(monkeypatch):
    monkeypatch.setattr(_dpm_module, "torch", _NoDowncastTorch())


def _ref64(ref, schedule: NoiseSchedule):
    """Give a diffusers scheduler our float64 tables, so only the update formulas are compared."""
    abar = schedule.alphas_cumprod.clone()
    one = torch.tensor(1.0, dtype=torch.float64)
    ref.alphas_cumprod = abar
    if isinstance(ref, DDPMScheduler):
        ref.one = one
    if isinstance(ref, DDIMScheduler):
        ref.final_alpha_cumprod = one
    if isinstance(ref, DPMSolverMultistepScheduler):
        sig = ((1 - abar[ref.timesteps]) / abar[ref.timesteps]).sqrt()
        ref.sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    return ref


def _make_ref(kind, schedule, n, spacing, clip, *, timesteps=None, solver_order=2, betas="linear"):
    common = dict(
        num_train_timesteps=schedule.num_train_timesteps,
        prediction_type=schedule.prediction_type.value,
        timestep_spacing=spacing,
        beta_schedule=DIFFUSERS_KIND[betas],
    )
    if kind == "ddpm":
        ref = DDPMScheduler(variance_type="fixed_small", clip_sample=clip, **common)
    elif kind == "ddim":
        ref = DDIMScheduler(set_alpha_to_one=True, clip_sample=clip, **common)
    else:
        ref = DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++",
            solver_order=solver_order,
            solver_type="midpoint",
            lower_order_final=True,
            final_sigmas_type="zero",
            **common,
        )
    if timesteps is None:
        ref.set_timesteps(n)
    else:
        ref.set_timesteps(timesteps=[int(t) for t in timesteps])
    return ref


def _run_ref(ref, kind, x, *, eta=0.0, seed=99):
    """diffusers' own loop; returns the final sample and the noise it drew, step by step."""
    gen = torch.Generator().manual_seed(seed)
    drawn = []
    for t in ref.timesteps:
        out = toy_model(x, t)
        if kind == "ddpm":
            # DDPMScheduler draws randn_tensor(shape, generator, dtype=out.dtype) iff t > 0
            before = gen.get_state()
            drawn.append(_noise(gen, x.dtype) if t > 0 else None)
            gen.set_state(before)
            x = ref.step(out, t, x, generator=gen).prev_sample
        elif kind == "ddim":
            before = gen.get_state()
            drawn.append(_noise(gen, x.dtype) if eta > 0 else None)
            gen.set_state(before)
            x = ref.step(out, t, x, eta=eta, generator=gen if eta > 0 else None).prev_sample
        else:
            drawn.append(None)
            x = ref.step(out, t, x).prev_sample
    return x, drawn


def _run_ours(sampler, x, noises=None):
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(toy_model(x, t), i, x, noise=None if noises is None else noises[i])
    return x


# --------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("T", [1000, 4000])
def test_schedule_pinned_against_diffusers(kind, T):
    ours = NoiseSchedule.create(kind, T)
    assert ours.betas.dtype == torch.float64 and ours.alphas_cumprod.dtype == torch.float64
    assert ours.betas.shape == (T,) and ours.num_train_timesteps == T
    assert make_betas(kind, T).dtype == np.float64
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_KIND[kind])
    idx = [0, 1, 2, T // 4, T // 2, T - 10, T - 2, T - 1]
    # diffusers keeps float32 tables: agreement is to float32 precision
    np.testing.assert_allclose(ours.betas[idx], ref.betas[idx].double(), rtol=2e-6, atol=0)
    np.testing.assert_allclose(
        ours.alphas_cumprod[idx], ref.alphas_cumprod[idx].double(), rtol=1e-4, atol=0
    )


def test_schedule_closed_forms():
    lin = make_betas("linear", 1000)
    assert lin[0] == 1e-4 and lin[-1] == 0.02
    assert lin[500] == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, rel=1e-14)
    # Nichol & Dhariwal eq. 17: abar_t = f(t+1) / f(0) wherever the 0.999 cap is inactive
    T = 4000
    sched = NoiseSchedule.create(ScheduleKind.COSINE, T)

    def f(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in [0, 1, 100, 2000, 3900]:
        assert float(sched.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert float(sched.betas[-1]) == 0.999
    assert float(sched.betas.max()) <= 0.999


def test_schedule_validation():
    with pytest.raises(ValueError, match=r"\[2, 100000\].*got 1"):
        make_betas("linear", 1)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_betas("linear", 100_001)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_betas("linear", 10.0)
    with pytest.raises(ValueError, match=r"0 < beta_start < beta_end < 1.*beta_start=0\.03"):
        make_betas("linear", 10, beta_start=0.03, beta_end=0.02)
    with pytest.raises(ValueError, match=r"beta_end=1\.5"):
        make_betas("linear", 10, beta_end=1.5)
    with pytest.raises(ValueError, match="'linear', 'cosine'"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="'epsilon', 'v_prediction'"):
        NoiseSchedule.create("linear", 10, prediction_type="sample")
    sched = NoiseSchedule.create("linear", 10)
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        sched.q_sample(x, torch.tensor([0, 10]), x)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        sched.predict_x0(x, x, -1)
    with pytest.raises(TypeError, match="integer"):
        sched.q_sample(x, torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match="B=2"):
        sched.q_sample(x, torch.tensor([0, 1, 2]), x)
    with pytest.raises(ValueError, match="shapes must match"):
        sched.q_sample(x, 1, torch.zeros(2, 1, 2, 3))
    with pytest.raises(ValueError, match="reduction"):
        sched.loss(x, x, 1, x, reduction="sum")


@pytest.mark.parametrize("pred", PREDS)
def test_forward_process_identities(pred):
    sched = NoiseSchedule.create("cosine", 1000, prediction_type=pred)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 637])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = sched.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, rtol=0, atol=1e-14)
    target = sched.target(x0, t, eps)
    if pred == "epsilon":
        assert torch.equal(target, eps)
    else:
        v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
        torch.testing.assert_close(target, v, rtol=0, atol=1e-14)
    # the exact network output gives back x0 and eps
    torch.testing.assert_close(sched.predict_x0(target, x_t, t), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.predict_eps(target, x_t, t), eps, rtol=0, atol=1e-12)
    # loss: zero at the target, per-sample mean otherwise
    assert torch.equal(sched.loss(target, x0, t, eps), torch.zeros(2, dtype=torch.float64))
    per = sched.loss(target + 0.5, x0, t, eps)
    torch.testing.assert_close(per, torch.full((2,), 0.25, dtype=torch.float64))
    assert sched.loss(target + 0.5, x0, t, eps, reduction="mean").shape == ()


def test_forward_process_against_diffusers_and_dtypes():
    sched = NoiseSchedule.create("linear", 1000, prediction_type="v_prediction")
    ref = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(SHAPE, generator=gen) * 2 - 1
    eps = torch.randn(SHAPE, generator=gen)
    t = torch.tensor([5, 999])
    x_t = sched.q_sample(x0, t, eps)
    assert x_t.dtype == torch.float32
    torch.testing.assert_close(x_t, ref.add_noise(x0, eps, t), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        sched.target(x0, t, eps), ref.get_velocity(x0, eps, t), atol=1e-5, rtol=0
    )
    half = sched.q_sample(x0.half(), t, eps.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), x_t, atol=2e-3, rtol=0)
    # an int timestep broadcasts over the batch
    torch.testing.assert_close(sched.q_sample(x0, 5, eps)[0], x_t[0])
    assert sched.to("cpu") is sched
    assert sched.to("mps") is sched  # no float64 on MPS: the tables stay on the CPU
    assert sched.to(torch.device("cpu")).alphas_cumprod.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# timestep grids


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_equal_diffusers(spacing):
    sched = NoiseSchedule.create("linear", 1000)
    for n in [1, 3, 4, 7, 10, 20, 50, 1000]:
        ddim = DDIMScheduler(timestep_spacing=spacing)
        ddim.set_timesteps(n)
        for cls in (DDPMSampler, DDIMSampler):
            assert torch.equal(
                cls(sched, n, spacing=spacing).timesteps,
                ddim.timesteps,
            )
        dpm = DPMSolverMultistepScheduler(timestep_spacing=spacing)
        dpm.set_timesteps(n)
        if n == 1000 and spacing != "trailing":
            # diffusers repeats timesteps here; we refuse
            with pytest.raises(ValueError, match="distinct"):
                make_timesteps(spacing, 1000, n, drop_zero=True)
            continue
        ours = DPMSolverPPSampler(sched, n, spacing=spacing)
        assert torch.equal(ours.timesteps, dpm.timesteps)
        assert ours.timesteps.dtype == torch.int64


def test_trailing_grid_never_overshoots():
    # diffusers' np.arange(T, 0, -T/n) gives n + 1 values (last -1) for e.g. T=1000, n=61
    ref = DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
    ours = make_timesteps(Spacing.TRAILING, 1000, 61)
    assert len(ours) == 61 and torch.equal(ours, ref.timesteps[:61])


# --------------------------------------------------------------------------------------------
# samplers vs diffusers


GRID = [
    ("linear", kind, pred, spacing, n, eta)
    for kind, etas in (("ddpm", [0.0]), ("ddim", [0.0, 1.0]), ("dpmsolver++", [0.0]))
    for eta in etas
    for pred in PREDS
    for spacing in (["leading", "trailing"] if kind == "ddim" else SPACINGS)
    for n in STEPS
]


GRID += [
    ("cosine", kind, pred, "trailing", 10, eta)
    for kind, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmsolver++", 0.0))
    for pred in PREDS
]


@pytest.mark.usefixtures("float64_reference")
@pytest.mark.parametrize(("betas", "kind", "pred", "spacing", "n", "eta"), GRID)
def test_sampler_matches_diffusers_float64(betas, kind, pred, spacing, n, eta):
    """Same model, initial noise, timesteps and step noise; diffusers run in float64."""
    sched = NoiseSchedule.create(betas, 1000, prediction_type=pred)
    clip = kind != "dpmsolver++"
    ref = _ref64(_make_ref(kind, sched, n, spacing, clip), sched)
    kwargs = {"eta": eta} if kind == "ddim" else {}
    ours = make_sampler(kind, sched, n, spacing=spacing, clip_sample=clip, **kwargs)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x_ref, drawn = _run_ref(ref, kind, _x_init(), eta=eta)
    x_ours = _run_ours(ours, _x_init(), drawn)
    assert x_ours.dtype == torch.float64
    assert (x_ours - x_ref).abs().max().item() < 1e-8


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpmsolver++"])
def test_sampler_matches_diffusers_float32(kind):
    """Unpatched diffusers (float32 tables) on float32 samples, v-prediction, 1e-5.

    (epsilon-prediction amplifies diffusers' float32 rounding by 1/sqrt(abar) at high noise,
    up to ~3e-4 for unclipped DPM-Solver++; the float64 test above covers it.)
    """
    sched = NoiseSchedule.create("linear", 1000, prediction_type="v_prediction")
    for spacing, n in [("trailing", 10), ("leading", 20)]:
        ref = _make_ref(kind, sched, n, spacing, clip=True)
        eta = 1.0 if kind == "ddim" else 0.0
        kwargs = {"eta": eta} if kind == "ddim" else {}
        # DPMSolverMultistepScheduler has no clip_sample: our default for it is False
        ours = make_sampler(kind, sched, n, spacing=spacing, **kwargs)
        x_ref, drawn = _run_ref(ref, kind, _x_init(torch.float32), eta=eta)
        x_ours = _run_ours(ours, _x_init(torch.float32), drawn)
        assert x_ours.dtype == torch.float32
        assert (x_ours - x_ref).abs().max().item() < 1e-5


@pytest.mark.usefixtures("float64_reference")
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize(("spacing", "n"), [("linspace", 10), ("trailing", 7), ("linspace", 4)])
def test_ddim_on_any_grid(pred, spacing, n):
    """DDIM steps to the next grid point (diffusers DDIM uses t - T//n, off-grid here).

    eta=0 is first-order DPM-Solver++ on the same grid; eta=1 (unclipped) is the DDPM step.
    """
    sched = NoiseSchedule.create("linear", 1000, prediction_type=pred)
    det = DDIMSampler(sched, n, spacing=spacing, clip_sample=False)
    ref = _make_ref(
        "dpmsolver++", sched, n, spacing, False, timesteps=det.timesteps, solver_order=1
    )
    x_ref, _ = _run_ref(_ref64(ref, sched), "dpmsolver++", _x_init())
    assert (_run_ours(det, _x_init()) - x_ref).abs().max().item() < 1e-8

    sto = DDIMSampler(sched, n, spacing=spacing, clip_sample=False, eta=1.0)
    ref = _ref64(_make_ref("ddpm", sched, n, spacing, False, timesteps=sto.timesteps), sched)
    x_ref, drawn = _run_ref(ref, "ddpm", _x_init())
    assert (_run_ours(sto, _x_init(), drawn) - x_ref).abs().max().item() < 1e-8


# --------------------------------------------------------------------------------------------
# analytic checks


def _exact_output(sched, x_t, t, x0hat):
    abar = float(sched.alphas_cumprod[int(t)])
    eps = (x_t - math.sqrt(abar) * x0hat) / math.sqrt(1 - abar)
    if sched.prediction_type is PredictionType.EPSILON:
        return eps
    return math.sqrt(abar) * eps - math.sqrt(1 - abar) * x0hat


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("kind", ["ddim", "dpmsolver++", "ddpm"])
def test_point_mass_is_recovered(kind, pred):
    """Data = one point x0*: the optimal denoiser is x0* itself; the sampler must land on it."""
    sched = NoiseSchedule.create("linear", 1000, prediction_type=pred)
    x0_star = torch.linspace(-0.9, 0.9, math.prod(SHAPE)).reshape(SHAPE)
    sampler = make_sampler(kind, sched, 10)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=gen)
    for i, t in enumerate(sampler.timesteps):
        noise = torch.randn(SHAPE, generator=gen) if sampler.requires_noise(i) else None
        x = sampler.step(_exact_output(sched, x, t, x0_star), i, x, noise)
    assert (x - x0_star).abs().max().item() < 1e-4


def _sample_gaussian_data(kind, pred, n, mu, seed=11):
    """Data ~ N(mu, 1) per element, sampled with the exact denoiser E[x0 | x_t].

    With unit data variance x_t ~ N(sqrt(abar) mu, 1) for every t, and
    E[x0 | x_t] = mu + sqrt(abar) (x_t - sqrt(abar) mu). Returns (x_T, x_0).
    """
    sched = NoiseSchedule.create("linear", 1000, prediction_type=pred)
    sampler = make_sampler(kind, sched, n, clip_sample=False)
    a0 = float(sched.alphas_cumprod[int(sampler.timesteps[0])])
    gen = torch.Generator().manual_seed(seed)
    x_init = math.sqrt(a0) * mu + torch.randn((4, 1, 64, 64), generator=gen, dtype=torch.float64)
    x = x_init
    for i, t in enumerate(sampler.timesteps):
        abar = float(sched.alphas_cumprod[int(t)])
        x0hat = mu + math.sqrt(abar) * (x - math.sqrt(abar) * mu)
        x = sampler.step(_exact_output(sched, x, t, x0hat), i, x)
    return sampler, x_init, x


@pytest.mark.parametrize("pred", PREDS)
def test_gaussian_data_ddim_closed_form(pred):
    """DDIM on Gaussian data is affine: x0 - mu = c (x_T - sqrt(abar_T) mu), c known exactly.

    Each step multiplies the centred sample by sqrt(abar_s abar_t) + sqrt((1-abar_s)(1-abar_t))
    (= cos of the angle step, < 1: first-order DDIM under-disperses with few steps, ~17% at 10
    steps); the many-step limit is the probability-flow ODE, which keeps the unit variance.
    """
    mu = 0.3
    sampler, x_init, x = _sample_gaussian_data("ddim", pred, 10, mu)
    a = sampler._abar
    c = math.prod(
        math.sqrt(a[k] * a[k + 1]) + math.sqrt((1 - a[k]) * (1 - a[k + 1])) for k in range(10)
    )
    a0 = a[0]
    assert x.std().item() == pytest.approx(c * x_init.std().item(), rel=1e-10)
    assert x.mean().item() - mu == pytest.approx(c * (x_init.mean().item() - math.sqrt(a0) * mu))
    assert abs(x.mean().item() - mu) < 0.03 and 0.8 < c < 0.85
    _, x_init, x = _sample_gaussian_data("ddim", pred, 250, mu)
    assert abs(x.mean().item() - mu) < 0.03  # 16384 samples: standard error 0.008
    assert x.std().item() / x_init.std().item() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("pred", PREDS)
def test_gaussian_data_dpm_solver(pred):
    """DPM-Solver++(2M) keeps mean and std of N(mu, 1) data: 5% low at 10 steps, 1% at 20."""
    mu = 0.3
    ddim = _sample_gaussian_data("ddim", pred, 10, mu)[2]
    _, x_init, x = _sample_gaussian_data("dpmsolver++", pred, 10, mu)
    assert abs(x.mean().item() - mu) < 0.03
    assert x.std().item() / x_init.std().item() == pytest.approx(1.0, abs=0.06)
    assert abs(x.std().item() - 1.0) < abs(ddim.std().item() - 1.0)  # second order beats DDIM
    _, x_init, x = _sample_gaussian_data("dpmsolver++", pred, 20, mu)
    assert abs(x.mean().item() - mu) < 0.03
    assert x.std().item() / x_init.std().item() == pytest.approx(1.0, abs=0.01)


# --------------------------------------------------------------------------------------------
# state, dtypes, validation


def test_dpm_solver_state_is_per_instance():
    sched = NoiseSchedule.create("linear", 1000)
    xa, xb = _x_init(seed=1), _x_init(seed=2)
    seq_a = _run_ours(DPMSolverPPSampler(sched, 10), xa)
    seq_b = _run_ours(DPMSolverPPSampler(sched, 10), xb)
    sa, sb = DPMSolverPPSampler(sched, 10), DPMSolverPPSampler(sched, 10)
    for i, t in enumerate(sa.timesteps):
        xa = sa.step(toy_model(xa, t), i, xa)
        xb = sb.step(toy_model(xb, t), i, xb)
    assert torch.equal(xa, seq_a) and torch.equal(xb, seq_b)
    with pytest.raises(ValueError, match="consecutive"):
        sa.step(toy_model(xa, 0), 0, xa)


@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpmsolver++"])
def test_sampler_preserves_dtype(kind):
    sched = NoiseSchedule.create("linear", 1000)
    sampler = make_sampler(kind, sched, 4)
    x = _x_init(torch.float16)
    for i, t in enumerate(sampler.timesteps):
        noise = torch.zeros_like(x) if sampler.requires_noise(i) else None
        x = sampler.step(toy_model(x, t), i, x, noise=noise)
    assert x.dtype == torch.float16 and torch.isfinite(x).all()


def test_sampler_validation():
    sched = NoiseSchedule.create("linear", 1000)
    with pytest.raises(ValueError, match="'ddpm', 'ddim', 'dpmsolver\\+\\+'"):
        make_sampler("euler", sched, 10)
    with pytest.raises(ValueError, match="'leading', 'trailing', 'linspace'"):
        make_sampler("ddim", sched, 10, spacing="uniform")
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
            make_sampler("ddpm", sched, bad)
    with pytest.raises(ValueError, match="eta"):
        make_sampler("ddim", sched, 10, eta=1.5)
    with pytest.raises(ValueError, match="clip_range"):
        make_sampler("ddim", sched, 10, clip_range=0)
    with pytest.raises(TypeError):
        make_sampler("ddpm", sched, 10, eta=0.5)
    x = _x_init()
    ddpm = make_sampler("ddpm", sched, 4)
    assert ddpm.stochastic and ddpm.num_steps == 4
    with pytest.raises(ValueError, match="stochastic: step 0 needs `noise`"):
        ddpm.step(x, 0, x)
    ddpm.step(x, 3, x)  # the last step is deterministic
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        ddpm.step(x, 4, x, torch.zeros_like(x))
    with pytest.raises(ValueError, match="noise shape"):
        ddpm.step(x, 0, x, torch.zeros(1))
    with pytest.raises(ValueError, match="model_output shape"):
        ddpm.step(x[:1], 0, x, torch.zeros_like(x))
    with pytest.raises(ValueError, match="needs `noise`"):
        make_sampler("ddim", sched, 4, eta=0.5).step(x, 0, x)
    ddim = make_sampler("ddim", sched, 4)
    assert not ddim.stochastic
    ddim.step(x, 0, x)
    assert not DPMSolverPPSampler(sched, 4).clip_sample and DDIMSampler(sched, 4).clip_sample


@pytest.mark.parametrize("n", [1, 4, 8, 10, 20, 50])
def test_karras_grid_is_dense_at_low_noise_and_ends_at_zero(n):
    from napari_staindiffuser.diffusion import karras_timesteps

    sched = NoiseSchedule.create("linear", 1000)
    ts = karras_timesteps(sched.alphas_cumprod, n)
    assert len(ts) == n and ts.dtype == torch.int64
    assert int(ts[0]) == 999 and (n == 1 or int(ts[-1]) == 0)
    assert bool((ts[1:] < ts[:-1]).all())
    if n >= 8:  # Karras: the steps shrink towards t = 0 (dense where detail forms)
        gaps = (ts[:-1] - ts[1:]).tolist()
        assert gaps[0] > gaps[-1]
    # the same grid as diffusers' use_karras_sigmas where it has n distinct steps
    ref = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    ref.set_timesteps(n)
    if len(set(ref.timesteps.tolist())) == n and n > 1:
        assert (ts - ref.timesteps).abs().max() <= 1
    # samplers build it from their schedule; make_timesteps refuses it without one
    assert torch.equal(DDIMSampler(sched, n, spacing="karras").timesteps, ts)
    with pytest.raises(ValueError, match="karras_timesteps"):
        make_timesteps("karras", 1000, n)
