"""Discrete-time Gaussian diffusion: noise schedules and the forward process.

Pure math on ``torch`` / ``numpy``; nothing here knows about the networks or the viewer.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", DDPM):
``beta_t`` is the per-step noise variance, ``alpha_t = 1 - beta_t`` and
``abar_t = prod_{s<=t} alpha_s`` (``alphas_cumprod``). Timesteps are integers ``0 .. T-1``.

* forward process (DDPM eq. 4): ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``;
* epsilon-prediction: the network predicts ``eps``;
* v-prediction (Salimans & Ho 2022, "Progressive Distillation", sec. 4):
  ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``.

Schedule values are kept in float64 on the CPU; every coefficient is computed in float64 and
only then cast to the dtype (and moved to the device) of the tensors it multiplies. Half
precision inputs (float16 / bfloat16) are computed in float32 and cast back.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

# One definition of each enum for the whole package (config.py is stdlib-only).
from ..config import PredictionType, ScheduleKind
from ..config import coerce_enum as _coerce_enum

__all__ = ["NoiseSchedule", "PredictionType", "ScheduleKind", "make_betas"]

MAX_TRAIN_TIMESTEPS = 100_000
COSINE_OFFSET = 0.008  # "s" in Nichol & Dhariwal 2021, eq. 17
COSINE_MAX_BETA = 0.999  # clipping of the cosine betas (Nichol & Dhariwal 2021, sec. 3.2)

_E = TypeVar("_E", bound=enum.Enum)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the arithmetic is done in: half precision is upcast to float32."""
    if not dtype.is_floating_point:
        raise TypeError(f"expected a floating point tensor, got dtype {dtype}")
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def make_betas(
    kind: ScheduleKind | str,
    num_train_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> np.ndarray:
    """Per-step noise variances ``beta_t`` of a training schedule.

    Parameters
    ----------
    kind : ScheduleKind or str
        ``"linear"``: ``np.linspace(beta_start, beta_end, T)`` (DDPM sec. 4; diffusers
        ``"linear"``). ``"cosine"``: Nichol & Dhariwal 2021 ("Improved DDPM") eq. 17,
        ``abar(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2`` with ``s = 0.008`` and
        ``beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999)`` (diffusers
        ``"squaredcos_cap_v2"``); ``beta_start``/``beta_end`` are then unused (but validated).
    num_train_timesteps : int
        ``T``, number of training timesteps, an integer in ``[2, 100000]``.
    beta_start, beta_end : float
        First and last beta of the linear schedule, ``0 < beta_start < beta_end < 1``.

    Returns
    -------
    numpy.ndarray
        float64, shape ``(T,)``, values in ``(0, 1)``.

    Raises
    ------
    ValueError
        On an unknown kind or an out-of-range argument.
    """
    kind = _coerce_enum(ScheduleKind, kind, "schedule kind")
    if (
        isinstance(num_train_timesteps, bool)
        or not isinstance(num_train_timesteps, (int, np.integer))
        or not 2 <= num_train_timesteps <= MAX_TRAIN_TIMESTEPS
    ):
        raise ValueError(
            f"num_train_timesteps must be an integer in [2, {MAX_TRAIN_TIMESTEPS}], "
            f"got {num_train_timesteps!r}"
        )
    try:
        ok = 0.0 < float(beta_start) < float(beta_end) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"expected 0 < beta_start < beta_end < 1, got beta_start={beta_start!r}, "
            f"beta_end={beta_end!r}"
        )
    n = int(num_train_timesteps)
    if kind is ScheduleKind.LINEAR:
        return np.linspace(float(beta_start), float(beta_end), n, dtype=np.float64)

    def abar(s: np.ndarray) -> np.ndarray:
        return np.cos((s + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2) ** 2

    steps = np.arange(n, dtype=np.float64)
    betas = 1.0 - abar((steps + 1) / n) / abar(steps / n)
    return np.minimum(betas, COSINE_MAX_BETA)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete diffusion schedule plus the parametrisation the network was trained with.

    Immutable and thread-safe; build it with :meth:`create`.

    Attributes
    ----------
    betas : torch.Tensor
        float64, shape ``(T,)``, values in ``(0, 1)``.
    alphas_cumprod : torch.Tensor
        float64, shape ``(T,)``, ``abar_t = prod_{s<=t} (1 - beta_s)``, decreasing in ``(0, 1)``.
    prediction_type : PredictionType
        What the network outputs (``eps`` or ``v``).

    Notes
    -----
    Methods taking a timestep ``t`` accept a Python int (one timestep for the whole batch) or
    an integer tensor of shape ``()`` or ``(B,)`` on any device; values must lie in
    ``[0, T-1]``. The ``abar_t`` are gathered on the schedule's device in float64, the
    coefficients computed in float64, then cast to the input's dtype and moved to its device
    (so this also works on MPS, which has no float64).
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    prediction_type: PredictionType

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas).detach().to(torch.float64).contiguous()
        abar = torch.as_tensor(self.alphas_cumprod).detach().to(torch.float64).contiguous()
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must have shape (T,) with T >= 2, got {tuple(betas.shape)}")
        if abar.shape != betas.shape:
            raise ValueError(
                f"alphas_cumprod must have the shape of betas {tuple(betas.shape)}, "
                f"got {tuple(abar.shape)}"
            )
        b_cpu = betas.cpu()
        if not bool(((b_cpu > 0) & (b_cpu < 1)).all()):
            raise ValueError("betas must lie in the open interval (0, 1)")
        if not torch.allclose(abar.cpu(), torch.cumprod(1.0 - b_cpu, dim=0), rtol=1e-10, atol=0.0):
            raise ValueError("alphas_cumprod must equal cumprod(1 - betas)")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", abar)
        object.__setattr__(
            self,
            "prediction_type",
            _coerce_enum(PredictionType, self.prediction_type, "prediction type"),
        )

    @classmethod
    def create(
        cls,
        kind: ScheduleKind | str,
        num_train_timesteps: int,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: PredictionType | str = PredictionType.V,
    ) -> NoiseSchedule:
        """Build a schedule from :func:`make_betas` (same arguments) and a prediction type."""
        betas = torch.from_numpy(make_betas(kind, num_train_timesteps, beta_start, beta_end))
        return cls(betas, torch.cumprod(1.0 - betas, dim=0), prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        """``T``, the number of training timesteps."""
        return int(self.betas.shape[0])

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Copy with the tables on ``device`` (still float64).

        MPS has no float64, so for an MPS device the tables stay on the CPU and ``self`` is
        returned; coefficients are always gathered where the tables live and then moved.
        """
        device = torch.device(device)
        if device.type == "mps" or device == self.betas.device:
            return self
        return NoiseSchedule(
            self.betas.to(device), self.alphas_cumprod.to(device), self.prediction_type
        )

    # -- coefficient helpers ------------------------------------------------------------------

    def _abar(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """float64 ``abar_t`` on the schedule's device, shaped to broadcast against ``like``."""
        n = self.num_train_timesteps
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"timesteps must be an integer tensor, got dtype {t.dtype}")
            if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != like.shape[0]):
                raise ValueError(
                    f"timesteps must have shape () or (B,) with B={like.shape[0]}, "
                    f"got {tuple(t.shape)}"
                )
            idx = t.detach().to(device=self.alphas_cumprod.device, dtype=torch.long)
            if idx.numel() and not bool(((idx >= 0) & (idx < n)).all()):
                raise ValueError(
                    f"timesteps must lie in [0, {n - 1}], got values in "
                    f"[{int(idx.min())}, {int(idx.max())}]"
                )
            values = self.alphas_cumprod[idx]
            if values.ndim == 1:
                values = values.reshape(-1, *([1] * (like.ndim - 1)))
            return values
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n:
            raise ValueError(f"timestep must be an integer in [0, {n - 1}], got {t!r}")
        return self.alphas_cumprod[int(t)]

    @staticmethod
    def _cast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return coef.to(device=like.device, dtype=_compute_dtype(like.dtype))

    @staticmethod
    def _check_same_shape(**tensors: torch.Tensor) -> None:
        shapes = {name: tuple(x.shape) for name, x in tensors.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"tensor shapes must match, got {shapes}")

    def _combine(
        self, a: torch.Tensor, ca: torch.Tensor, b: torch.Tensor, cb: torch.Tensor, out_like
    ) -> torch.Tensor:
        """``ca * a + cb * b`` in the compute dtype, cast back to ``out_like.dtype``."""
        cdt = _compute_dtype(out_like.dtype)
        res = self._cast(ca, out_like) * a.to(cdt) + self._cast(cb, out_like) * b.to(cdt)
        return res.to(out_like.dtype)

    # -- forward process ----------------------------------------------------------------------

    def q_sample(
        self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Sample ``q(x_t | x0)``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (DDPM eq. 4).

        Parameters
        ----------
        x0 : torch.Tensor
            Clean data, shape ``(B, C, H, W)`` (any shape with a leading batch axis), any float
            dtype, typically in ``[-1, 1]``.
        t : int or torch.LongTensor
            Timesteps, shape ``()`` or ``(B,)``, values in ``[0, T-1]``.
        noise : torch.Tensor
            Standard normal ``eps``, same shape as ``x0``.

        Returns
        -------
        torch.Tensor
            ``x_t``, shape and dtype of ``x0``.
        """
        self._check_same_shape(x0=x0, noise=noise)
        abar = self._abar(t, x0)
        return self._combine(x0, abar.sqrt(), noise, (1.0 - abar).sqrt(), x0)

    def target(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Regression target of the network for ``x_t = q_sample(x0, t, noise)``.

        ``eps`` for epsilon-prediction, ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` for
        v-prediction. Shape and dtype of ``x0``.
        """
        self._check_same_shape(x0=x0, noise=noise)
        if self.prediction_type is PredictionType.EPSILON:
            self._abar(t, x0)  # validate t
            return noise.to(x0.dtype)
        abar = self._abar(t, x0)
        return self._combine(noise, abar.sqrt(), x0, -(1.0 - abar).sqrt(), x0)

    def loss(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        t: int | torch.Tensor,
        noise: torch.Tensor,
        reduction: str = "none",
    ) -> torch.Tensor:
        """Mean squared error to :meth:`target` (DDPM eq. 14, the "simple" loss).

        Parameters
        ----------
        model_output, x0, noise : torch.Tensor
            Shape ``(B, ...)``, all the same shape.
        t : int or torch.LongTensor
            Timesteps used to noise ``x0``, shape ``()`` or ``(B,)``.
        reduction : {"none", "mean"}
            ``"none"``: per-sample mean over all non-batch axes, shape ``(B,)``;
            ``"mean"``: scalar mean over the batch.

        Returns
        -------
        torch.Tensor
            At least float32 (float64 if an input is float64).
        """
        if reduction not in ("none", "mean"):
            raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
        self._check_same_shape(model_output=model_output, x0=x0, noise=noise)
        target = self.target(x0, t, noise)
        dtype = torch.promote_types(
            torch.promote_types(model_output.dtype, target.dtype), torch.float32
        )
        err = (model_output.to(dtype) - target.to(dtype)).square()
        per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
        return per_sample if reduction == "none" else per_sample.mean()

    # -- parametrisation conversions (shared by all samplers) ---------------------------------

    def predict_x0(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        """Clean-sample estimate from the network output.

        epsilon: ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (DDPM eq. 15);
        v: ``x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v``. Shape and dtype of ``x_t``.
        """
        self._check_same_shape(model_output=model_output, x_t=x_t)
        abar = self._abar(t, x_t)
        if self.prediction_type is PredictionType.EPSILON:
            inv = abar.rsqrt()
            return self._combine(x_t, inv, model_output, -(1.0 - abar).sqrt() * inv, x_t)
        return self._combine(x_t, abar.sqrt(), model_output, -(1.0 - abar).sqrt(), x_t)

    def predict_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor
    ) -> torch.Tensor:
        """Noise estimate from the network output.

        epsilon: the output itself; v: ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``.
        Shape and dtype of ``x_t``.
        """
        self._check_same_shape(model_output=model_output, x_t=x_t)
        abar = self._abar(t, x_t)
        if self.prediction_type is PredictionType.EPSILON:
            return model_output.to(x_t.dtype)
        return self._combine(model_output, abar.sqrt(), x_t, (1.0 - abar).sqrt(), x_t)
