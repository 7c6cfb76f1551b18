"""Reverse-process samplers: DDPM (ancestral), DDIM and DPM-Solver++(2M).

Each sampler walks a descending grid of training timesteps ``timesteps[0] > ... > timesteps[-1]``
and, at index ``i``, maps ``x`` at ``timesteps[i]`` to ``x`` at ``timesteps[i + 1]``; after the
last index it returns the clean sample (``abar = 1``). A sampling loop is::

    sampler = make_sampler("dpmsolver++", schedule, 20)
    for i, t in enumerate(sampler.timesteps):
        out = model(x, t)
        x = sampler.step(out, i, x, noise=draw_noise() if sampler.requires_noise(i) else None)

Samplers never draw random numbers: stochastic samplers take the standard normal ``noise``
from the caller. The schedule arithmetic (``abar``, ``lambda``, step coefficients) is done in
float64 Python floats; tensors are combined in the dtype of ``x_t`` (float32 for half
precision) and the result is cast back to ``x_t.dtype``. The reference implementation is
diffusers (``DDPMScheduler``, ``DDIMScheduler``, ``DPMSolverMultistepScheduler``); see each
class for the exact correspondence.
"""

from __future__ import annotations

import abc
import enum
import math
import numbers

import numpy as np
import torch

from .schedule import NoiseSchedule, _coerce_enum, _compute_dtype

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPPSampler",
    "Sampler",
    "SamplerKind",
    "Spacing",
    "custom_timesteps",
    "karras_timesteps",
    "make_sampler",
    "make_timesteps",
]


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class SamplerKind(str, enum.Enum):
    """Names accepted by :func:`make_sampler`."""

    DDPM = "ddpm"
    DDIM = "ddim"
    DPMSOLVER = "dpmsolver++"


class Spacing(str, enum.Enum):
    """Timestep grid layout, diffusers' ``timestep_spacing`` (Lin et al. 2023, Table 2)."""

    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"
    #: Karras et al. 2022 (eq. 5): noise levels uniform in sigma^(1/7), dense at low noise, down
    #: to t = 0; needs the schedule (``alphas_cumprod``). Few-step samples lose the fine grain
    #: that the other grids leave on the background (docs/performance.md, sampling parity).
    KARRAS = "karras"
    #: An explicit grid given as ``timesteps=`` (a distilled student's own grid, recorded in its
    #: checkpoint; see distill.py).
    CUSTOM = "custom"


def karras_timesteps(
    alphas_cumprod: torch.Tensor, num_steps: int, rho: float = 7.0
) -> torch.Tensor:
    """A Karras grid (Karras et al. 2022, eq. 5) mapped onto the training timesteps.

    ``num_steps`` noise levels ``sigma = sqrt((1 - abar) / abar)`` from ``sigma(T-1)`` down to
    ``sigma(0)``, uniform in ``sigma^(1/rho)``, each mapped to the training timestep with the
    nearest ``log sigma`` (as diffusers' ``use_karras_sigmas``) and made strictly decreasing.

    Returns
    -------
    torch.LongTensor
        Shape ``(num_steps,)``, strictly decreasing, from ``T - 1`` to ``0``.
    """
    abar = alphas_cumprod.detach().cpu().double()
    n = int(num_steps)
    if not 1 <= n <= len(abar):
        raise ValueError(f"num_steps must be an integer in [1, {len(abar)}], got {num_steps!r}")
    log_sigma = (0.5 * ((1 - abar) / abar).log()).numpy()
    s_max, s_min = np.exp(log_sigma[-1]), np.exp(log_sigma[0])
    ramp = np.linspace(0.0, 1.0, n)
    sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    out: list[int] = []
    for sigma in sigmas:
        t = int(np.argmin(np.abs(log_sigma - np.log(sigma))))
        out.append(max(min(t, out[-1] - 1) if out else t, 0))
    if len(set(out)) != n:
        raise ValueError(
            f"a Karras grid of {n} steps does not fit T = {len(abar)} training timesteps (it "
            "would repeat timesteps): use fewer steps or the 'trailing' spacing"
        )
    return torch.tensor(out, dtype=torch.long)


def custom_timesteps(timesteps, num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """Check an explicit grid: ``num_steps`` strictly decreasing integers in ``[0, T-1]``.

    Returns it as a CPU LongTensor; raises ValueError saying what is wrong otherwise.
    """
    try:
        ts = np.asarray(timesteps)
        ok = ts.ndim == 1 and ts.size > 0 and np.issubdtype(ts.dtype, np.integer)
    except (TypeError, ValueError):
        ok = False
    T = int(num_train_timesteps)
    if not ok or not ((ts >= 0) & (ts < T)).all() or not (np.diff(ts) < 0).all():
        raise ValueError(
            f"timesteps must be strictly decreasing integers in [0, {T - 1}]; got {timesteps!r}"
        )
    if len(ts) != num_steps:
        raise ValueError(f"num_steps={num_steps!r} but the grid has {len(ts)} timesteps")
    return torch.from_numpy(ts.astype(np.int64))


def make_timesteps(
    spacing: Spacing | str, num_train_timesteps: int, num_steps: int, *, drop_zero: bool = False
) -> torch.Tensor:
    """Descending inference timesteps, exactly as diffusers' ``set_timesteps``.

    Parameters
    ----------
    spacing : Spacing or str
        ``"leading"``, ``"trailing"`` or ``"linspace"``.
    num_train_timesteps : int
        ``T``.
    num_steps : int
        ``n``, in ``[1, T]``.
    drop_zero : bool
        ``False``: the DDPM/DDIM grid of ``n`` points (linspace ``round(linspace(0, T-1, n))``,
        leading ``k * (T // n)``, trailing ``round(T - k T/n) - 1``). ``True``: the
        DPM-Solver grid, which lays out ``n + 1`` points for linspace/leading (``T // (n+1)``)
        and drops the last one (``t = 0``) because the solver jumps to ``sigma = 0`` instead;
        trailing is the same in both.

    Returns
    -------
    torch.LongTensor
        Shape ``(n,)``, strictly decreasing, values in ``[0, T-1]``, on the CPU.

    Raises
    ------
    ValueError
        Unknown spacing, ``num_steps`` out of range, or a grid with repeated timesteps (only
        the DPM-Solver linspace/leading grids with ``n = T``).

    Notes
    -----
    diffusers' trailing formula ``np.arange(T, 0, -T/n)`` yields ``n + 1`` values for some
    ``n`` (e.g. ``T = 1000, n = 61``: a spurious final timestep ``-1``); here it is cut to ``n``.
    """
    spacing = _coerce_enum(Spacing, spacing, "timestep spacing")
    if spacing is Spacing.KARRAS:
        raise ValueError("the 'karras' grid depends on the schedule: use karras_timesteps")
    if spacing is Spacing.CUSTOM:
        raise ValueError("a 'custom' grid is given explicitly: use custom_timesteps")
    T = int(num_train_timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an integer in [1, {T}], got {num_steps!r}")
    n = int(num_steps)
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be an integer in [1, {T}], got {n}")
    m = n + 1 if drop_zero else n
    if spacing is Spacing.TRAILING:
        ts = np.round(np.arange(T, 0, -T / n))[:n] - 1
    elif spacing is Spacing.LEADING:
        ts = (np.arange(m) * (T // m)).round()[::-1][:n]
    else:
        ts = np.linspace(0, T - 1, m).round()[::-1][:n]
    ts = ts.astype(np.int64)
    if len(ts) != n or ts[-1] < 0 or ts[0] >= T or not bool(np.all(np.diff(ts) < 0)):
        raise ValueError(
            f"spacing {spacing.value!r} with num_steps={n} and T={T} gives the timesteps "
            f"{ts.tolist()[:8]}..., which are not {n} distinct values; use fewer steps or "
            f"spacing 'trailing'"
        )
    return torch.from_numpy(ts.copy())


class Sampler(abc.ABC):
    """One reverse-diffusion sampling run over a fixed timestep grid.

    One instance per sampling run (it may hold multistep state); never shared between threads.

    Parameters
    ----------
    schedule : NoiseSchedule
        Training schedule and prediction type of the network (epsilon or v).
    num_steps : int
        Number of network evaluations, in ``[1, T]``.
    spacing : Spacing or str
        Timestep grid layout, see :func:`make_timesteps`. Default ``"trailing"`` (starts at
        ``t = T-1``; Lin et al. 2023).
    clip_sample : bool
        Clamp the ``x0`` prediction to ``[-clip_range, clip_range]`` at every step
        (diffusers ``clip_sample``; dynamic thresholding is not implemented).
    clip_range : float
        Positive clamp bound (diffusers ``clip_sample_range``).
    timesteps : sequence of int, optional
        An explicit grid (strictly decreasing training timesteps in ``[0, T-1]``, ``num_steps``
        of them); needs ``spacing="custom"`` (and is the only way to get it).

    Attributes
    ----------
    timesteps : torch.LongTensor
        Shape ``(num_steps,)``, strictly decreasing, on the CPU.
    stochastic : bool
        Whether :meth:`step` needs ``noise`` (see :meth:`requires_noise`).
    """

    stochastic: bool = False
    _drop_zero: bool = False  # timestep grid flavour, see make_timesteps

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int,
        *,
        spacing: Spacing | str = Spacing.TRAILING,
        clip_sample: bool = True,
        clip_range: float = 1.0,
        timesteps=None,
    ) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if not _is_real(clip_range) or not (math.isfinite(clip_range) and clip_range > 0):
            raise ValueError(f"clip_range must be a finite number > 0, got {clip_range!r}")
        self.schedule = schedule
        self.spacing = _coerce_enum(Spacing, spacing, "timestep spacing")
        self.clip_sample = bool(clip_sample)
        self.clip_range = float(clip_range)
        if (self.spacing is Spacing.CUSTOM) != (timesteps is not None):
            raise ValueError(
                "an explicit timesteps grid goes with spacing='custom' and only with it; got "
                f"spacing={self.spacing.value!r}, timesteps={timesteps!r}"
            )
        if self.spacing is Spacing.CUSTOM:
            self.timesteps = custom_timesteps(timesteps, schedule.num_train_timesteps, num_steps)
        elif self.spacing is Spacing.KARRAS:
            if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
                raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
            self.timesteps = karras_timesteps(schedule.alphas_cumprod, int(num_steps))
        else:
            self.timesteps = make_timesteps(
                self.spacing, schedule.num_train_timesteps, num_steps, drop_zero=self._drop_zero
            )
        abar = schedule.alphas_cumprod.detach().cpu()
        # abar at each grid point, then abar = 1 for the clean sample reached by the last step
        self._abar: list[float] = [*abar[self.timesteps].tolist(), 1.0]

    @property
    def num_steps(self) -> int:
        """Number of steps (network evaluations) in the run."""
        return int(self.timesteps.shape[0])

    def requires_noise(self, i: int) -> bool:
        """Whether ``step(..., i, ...)`` needs ``noise``: stochastic and not the last step.

        The last step of every sampler is deterministic (it reaches ``abar = 1``); noise
        passed there is accepted and ignored.
        """
        return self.stochastic and i < self.num_steps - 1

    def step(
        self,
        model_output: torch.Tensor,
        i: int,
        x_t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Advance from ``timesteps[i]`` to ``timesteps[i + 1]`` (to the clean sample at the end).

        Parameters
        ----------
        model_output : torch.Tensor
            Network output (eps or v, per ``schedule.prediction_type``) at ``(x_t,
            timesteps[i])``, shape ``(B, C, H, W)`` like ``x_t``.
        i : int
            Index into :attr:`timesteps`, ``0 <= i < num_steps``.
        x_t : torch.Tensor
            Current sample, float dtype, shape ``(B, C, H, W)``.
        noise : torch.Tensor, optional
            Standard normal noise of ``x_t``'s shape, required when :meth:`requires_noise`.

        Returns
        -------
        torch.Tensor
            The less noisy sample, shape and dtype of ``x_t``.
        """
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"step index must be an int, got {type(i).__name__}")
        i = int(i)
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step index must be in [0, {self.num_steps - 1}], got {i}")
        if model_output.shape != x_t.shape:
            raise ValueError(
                f"model_output shape {tuple(model_output.shape)} != x_t shape {tuple(x_t.shape)}"
            )
        cdt = _compute_dtype(x_t.dtype)
        if noise is None:
            if self.requires_noise(i):
                raise ValueError(
                    f"{type(self).__name__} is stochastic: step {i} needs `noise` "
                    f"(standard normal, shape {tuple(x_t.shape)}); samplers draw no randomness"
                )
        else:
            if noise.shape != x_t.shape:
                raise ValueError(
                    f"noise shape {tuple(noise.shape)} != x_t shape {tuple(x_t.shape)}"
                )
            noise = noise.to(device=x_t.device, dtype=cdt)
        out = self._step(model_output.to(cdt), i, x_t.to(cdt), noise)
        return out.to(x_t.dtype)

    @abc.abstractmethod
    def _step(
        self, model_output: torch.Tensor, i: int, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """The update, on tensors already in the compute dtype."""

    def _x0(self, model_output: torch.Tensor, i: int, x_t: torch.Tensor) -> torch.Tensor:
        """``x0`` prediction at step ``i``, clamped if ``clip_sample``."""
        x0 = self.schedule.predict_x0(model_output, x_t, int(self.timesteps[i]))
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_steps={self.num_steps}, spacing={self.spacing.value!r}, "
            f"clip_sample={self.clip_sample}, prediction_type="
            f"{self.schedule.prediction_type.value!r})"
        )


class DDPMSampler(Sampler):
    """Ancestral sampling from the DDPM posterior ``q(x_s | x_t, x0)`` (DDPM eqs. 6-7, 11).

    With ``s = timesteps[i+1]`` (``abar_s = 1`` after the last step), ``a_t = abar_t / abar_s``
    and ``b_t = 1 - a_t``:

    ``x_s = sqrt(abar_s) b_t / (1 - abar_t) x0 + sqrt(a_t) (1 - abar_s) / (1 - abar_t) x_t
    + sqrt(b_t (1 - abar_s) / (1 - abar_t)) z``,

    ``x0`` the (clamped) prediction, ``z = noise``. Equals diffusers
    ``DDPMScheduler(variance_type="fixed_small")`` with ``set_timesteps(num_steps)`` (the
    posterior variance is the "small" one, ``beta~``). Stochastic (except the last step).
    """

    stochastic = True

    def _step(self, model_output, i, x_t, noise):
        abar_t, abar_s = self._abar[i], self._abar[i + 1]
        alpha = abar_t / abar_s
        beta = 1.0 - alpha
        x0 = self._x0(model_output, i, x_t)
        x = (math.sqrt(abar_s) * beta / (1.0 - abar_t)) * x0 + (
            math.sqrt(alpha) * (1.0 - abar_s) / (1.0 - abar_t)
        ) * x_t
        variance = beta * (1.0 - abar_s) / (1.0 - abar_t)
        if noise is not None and variance > 0.0:
            x = x + math.sqrt(variance) * noise
        return x


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12), deterministic for ``eta = 0``.

    ``x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - abar_s)/(1 - abar_t) (1 - abar_t/abar_s))`` (eq. 16), ``x0`` the
    (clamped) prediction, ``eps`` the unclamped noise prediction, ``s = timesteps[i+1]`` and
    ``abar_s = 1`` after the last step.

    Parameters
    ----------
    eta : float
        In ``[0, 1]``: 0 is deterministic DDIM, 1 has the DDPM posterior variance. The sampler
        is stochastic iff ``eta > 0``.
    **kwargs
        See :class:`Sampler`.

    Notes
    -----
    Equals diffusers ``DDIMScheduler(set_alpha_to_one=True, use_clipped_model_output=False)``
    except for the previous timestep: diffusers takes ``t - T // num_steps``, here it is the
    next grid point ``timesteps[i+1]``. The two agree for "leading" spacing and for "trailing"
    when ``T % num_steps == 0``; elsewhere (e.g. "linspace") diffusers evaluates ``abar`` at
    timesteps that are not on its own grid.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, eta: float = 0.0, **kwargs):
        if not (_is_real(eta) and 0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        super().__init__(schedule, num_steps, **kwargs)
        self.eta = float(eta)
        self.stochastic = self.eta > 0.0

    def _step(self, model_output, i, x_t, noise):
        abar_t, abar_s = self._abar[i], self._abar[i + 1]
        sigma = self.eta * math.sqrt((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))
        x0 = self._x0(model_output, i, x_t)
        eps = self.schedule.predict_eps(model_output, x_t, int(self.timesteps[i]))
        x = math.sqrt(abar_s) * x0 + math.sqrt(max(1.0 - abar_s - sigma**2, 0.0)) * eps
        if noise is not None and sigma > 0.0:
            x = x + sigma * noise
        return x


class DPMSolverPPSampler(Sampler):
    """Multistep DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), data prediction.

    With ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``lambda = log(alpha / sigma)``,
    ``h = lambda_s - lambda_t`` (``s = timesteps[i+1]``) and ``D0 = x0`` at step ``i``:

    * first order (first step, DDIM-equivalent):
      ``x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D0``;
    * second order (midpoint, ``r = h_prev / h``, ``D1 = (x0_i - x0_{i-1}) / r``):
      ``x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) (D0 + D1 / 2)``;
    * last step: ``sigma_s = 0`` (diffusers ``final_sigmas_type="zero"``), the first-order
      update whose limit is ``x_s = x0`` (so ``lower_order_final`` always holds at the end).

    Holds the previous ``x0`` as per-run state: :meth:`step` must be called with consecutive
    indices (the first call may start at any index, e.g. for partial denoising).

    Parameters
    ----------
    clip_sample : bool
        Default **False**, matching diffusers (``thresholding=False``, which has no
        ``clip_sample`` for this solver). If True, the ``x0`` prediction is clamped to
        ``[-clip_range, clip_range]`` before it enters the update.
    **kwargs
        See :class:`Sampler`.

    Notes
    -----
    Equals diffusers ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_order=2, solver_type="midpoint", lower_order_final=True,
    final_sigmas_type="zero")`` with the same ``timestep_spacing``.
    """

    _drop_zero = True

    def __init__(self, schedule: NoiseSchedule, num_steps: int, *, clip_sample=False, **kwargs):
        super().__init__(schedule, num_steps, clip_sample=clip_sample, **kwargs)
        self._last_index: int | None = None
        self._prev: tuple[torch.Tensor, float] | None = None  # (x0, lambda) of the last step

    @staticmethod
    def _lambda(abar: float) -> float:
        return 0.5 * (math.log(abar) - math.log1p(-abar))

    def _step(self, model_output, i, x_t, noise):
        if self._last_index is not None and i != self._last_index + 1:
            raise ValueError(
                f"DPMSolverPPSampler steps must be consecutive: last index {self._last_index}, "
                f"got {i}; use a new sampler for a new run"
            )
        x0 = self._x0(model_output, i, x_t)
        abar_t, abar_s = self._abar[i], self._abar[i + 1]
        lam_t = self._lambda(abar_t)
        if abar_s >= 1.0:
            x = x0  # sigma_s = 0: the first-order update reduces to the data prediction
        else:
            lam_s = self._lambda(abar_s)
            h = lam_s - lam_t
            phi = -math.sqrt(abar_s) * math.expm1(-h)  # alpha_s (1 - exp(-h))
            d = x0
            if self._prev is not None:
                x0_prev, lam_prev = self._prev
                r = (lam_t - lam_prev) / h
                d = x0 + (0.5 / r) * (x0 - x0_prev)
            x = math.sqrt((1.0 - abar_s) / (1.0 - abar_t)) * x_t + phi * d
        self._prev = (x0, lam_t)
        self._last_index = i
        return x


_SAMPLERS: dict[SamplerKind, type[Sampler]] = {
    SamplerKind.DDPM: DDPMSampler,
    SamplerKind.DDIM: DDIMSampler,
    SamplerKind.DPMSOLVER: DPMSolverPPSampler,
}


def make_sampler(
    kind: SamplerKind | str, schedule: NoiseSchedule, num_steps: int, **kwargs
) -> Sampler:
    """Build a sampler by name (``"ddpm"``, ``"ddim"``, ``"dpmsolver++"``).

    ``kwargs`` go to the sampler's constructor (``spacing``, ``clip_sample``, ``clip_range``,
    ``timesteps`` with ``spacing="custom"``; ``eta`` for DDIM only).
    """
    kind = _coerce_enum(SamplerKind, kind, "sampler")
    return _SAMPLERS[kind](schedule, num_steps, **kwargs)
