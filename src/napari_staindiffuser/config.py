"""Frozen, validated configuration: model architecture, noise schedule and training.

One :class:`ModelConfig` describes a StainDiffuser completely (architecture, stains, patch size and
pixel size, noise schedule); it is saved as JSON with every checkpoint and rebuilds the network on
load. :class:`TrainConfig` holds the optimisation settings of a training run.

Every field is validated in ``__post_init__``; a bad value raises ``ValueError`` saying what was
expected and what came. This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any


class Variant(str, enum.Enum):
    """Model family.

    MULTITASK: shared H&E encoder, one generation UNet per stain and one auxiliary (segmentation)
    UNet per stain (StainDiffuser, Multi-StainDiffuser; paper Fig. 1).
    BIDIRECTIONAL: one encoder and one UNet, trained on H&E->IHC and IHC->H&E together (no masks).
    """

    MULTITASK = "multitask"
    BIDIRECTIONAL = "bidirectional"


class AuxTarget(str, enum.Enum):
    """What the auxiliary branch denoises: the coarse mask, its distance transform, or nothing."""

    MASK = "mask"
    DISTANCE = "distance"
    NONE = "none"


class ScheduleKind(str, enum.Enum):
    """How the betas are laid out over the training timesteps."""

    LINEAR = "linear"
    COSINE = "cosine"


class PredictionType(str, enum.Enum):
    """What the network predicts: the noise (paper) or the velocity v (our shipped default)."""

    EPSILON = "epsilon"
    V = "v_prediction"


def coerce_enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    """``value`` as a member of ``cls``, or a ValueError that lists the valid values."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"{name} must be one of {valid}; got {value!r}") from None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


_STAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 /+._-]{0,31}$")


def stain_key(stain: str) -> str:
    """A module-safe key for a stain name (``"CK8/18"`` -> ``"CK8_18"``)."""
    return re.sub(r"[^A-Za-z0-9]", "_", stain)


@dataclass(frozen=True)
class ScheduleConfig:
    """Forward noise process (DDPM). ``num_train_timesteps`` is the paper's T (2000 or 4000)."""

    kind: ScheduleKind = ScheduleKind.LINEAR
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: PredictionType = PredictionType.V

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", coerce_enum(ScheduleKind, self.kind, "schedule kind"))
        object.__setattr__(
            self,
            "prediction_type",
            coerce_enum(PredictionType, self.prediction_type, "prediction_type"),
        )
        t = self.num_train_timesteps
        _check(
            isinstance(t, int) and not isinstance(t, bool) and 2 <= t <= 100_000,
            f"num_train_timesteps must be an integer in [2, 100000]; got {t!r}",
        )
        _check(
            0.0 < self.beta_start < self.beta_end < 1.0,
            "beta schedule needs 0 < beta_start < beta_end < 1; "
            f"got beta_start={self.beta_start!r}, beta_end={self.beta_end!r}",
        )


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a StainDiffuser and the data it expects.

    Attributes
    ----------
    stains : tuple of str
        Stain names, one generation branch (and one auxiliary branch) each, e.g. ("CD3", "CK8/18").
    variant : Variant
    image_size : int
        Patch side in pixels the model was trained on (64 or 128 in the paper). Inference tiles
        must be a multiple of ``2 ** (len(channel_mults) - 1)``.
    mpp : float
        Microns per pixel of the training patches (after downsampling).
    base_channels, channel_mults : int, tuple of int
        Channels per scale are ``base_channels * m``; four scales give F1..F4.
    num_res_blocks : int
        Residual blocks per scale, in the H&E encoder and in each UNet encoder and decoder.
    mid_attention : bool
        Self-attention at the coarsest scale of each UNet (paper-scale presets).
    attention_heads : int
        Heads of the self-attention block.
    aux_target : AuxTarget
        Auxiliary branch target: coarse mask, its distance transform, or none.
    distance_max : float
        Distance (px at ``image_size``) at which the distance target saturates.
    lambda_gen, lambda_aux : tuple of float
        Loss weights per stain (same order as ``stains``); L = sum_i lg_i L_gen_i + la_i L_aux_i.
    dropout : float
    schedule : ScheduleConfig
    """

    stains: tuple[str, ...] = ("CD3", "CK8/18")
    variant: Variant = Variant.MULTITASK
    image_size: int = 64
    mpp: float = 1.0
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    mid_attention: bool = False
    attention_heads: int = 4
    aux_target: AuxTarget = AuxTarget.MASK
    distance_max: float = 8.0
    lambda_gen: tuple[float, ...] = ()
    lambda_aux: tuple[float, ...] = ()
    dropout: float = 0.0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.stains, str):
            raise ValueError(
                f"stains must be a sequence of names, e.g. ('CD3',); got {self.stains!r}"
            )
        set_(self, "stains", tuple(self.stains))
        set_(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        set_(self, "variant", coerce_enum(Variant, self.variant, "variant"))
        set_(self, "aux_target", coerce_enum(AuxTarget, self.aux_target, "aux_target"))
        if isinstance(self.schedule, dict):
            set_(self, "schedule", ScheduleConfig(**self.schedule))
        _check(len(self.stains) >= 1, "stains must name at least one stain; got none")
        for s in self.stains:
            _check(
                isinstance(s, str) and bool(_STAIN_RE.match(s)),
                "stain names are 1-32 characters of letters, digits, space and / + . _ -, "
                f"starting with a letter or digit; got {s!r}",
            )
        keys = [stain_key(s) for s in self.stains]
        _check(
            len(set(keys)) == len(keys),
            f"stain names must be distinct (ignoring punctuation); got {self.stains!r}",
        )
        n = len(self.stains)
        for name in ("lambda_gen", "lambda_aux"):
            value = getattr(self, name)
            if value in ((), None):
                value = (1.0,) * n
            elif isinstance(value, (int, float)):
                value = (float(value),) * n
            value = tuple(float(v) for v in value)
            _check(
                len(value) == n,
                f"{name} needs one weight per stain ({n} for {self.stains}); got {len(value)}",
            )
            _check(
                all(math.isfinite(v) and v >= 0 for v in value),
                f"{name} weights must be finite and >= 0; got {value}",
            )
            set_(self, name, value)
        _check(
            len(self.channel_mults) == 4,
            "channel_mults needs 4 entries, one per scale F1..F4 (the paper's encoder has four); "
            f"got {self.channel_mults}",
        )
        _check(
            all(m >= 1 for m in self.channel_mults),
            f"channel_mults must be >= 1; got {self.channel_mults}",
        )
        _check(
            isinstance(self.base_channels, int) and self.base_channels >= 8,
            f"base_channels must be an integer >= 8; got {self.base_channels!r}",
        )
        _check(
            all((self.base_channels * m) % 8 == 0 for m in self.channel_mults),
            "base_channels * channel_mults must be multiples of 8 (GroupNorm groups); "
            f"got {self.base_channels} x {self.channel_mults}",
        )
        _check(
            isinstance(self.num_res_blocks, int) and 1 <= self.num_res_blocks <= 8,
            f"num_res_blocks must be an integer in [1, 8]; got {self.num_res_blocks!r}",
        )
        f = self.downsample_factor
        _check(
            isinstance(self.image_size, int)
            and self.image_size >= 2 * f
            and self.image_size % f == 0,
            f"image_size must be a multiple of {f} and at least {2 * f}; got {self.image_size!r}",
        )
        _check(
            isinstance(self.mpp, (int, float)) and math.isfinite(self.mpp) and self.mpp > 0,
            f"mpp (microns per pixel) must be a positive number; got {self.mpp!r}",
        )
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1); got {self.dropout!r}")
        _check(
            isinstance(self.distance_max, (int, float)) and self.distance_max >= 1,
            f"distance_max must be a number of pixels >= 1; got {self.distance_max!r}",
        )
        _check(
            self.attention_heads >= 1
            and (self.base_channels * self.channel_mults[-1]) % self.attention_heads == 0,
            "attention_heads must divide the channels of the coarsest scale "
            f"({self.base_channels * self.channel_mults[-1]}); got {self.attention_heads!r}",
        )
        if self.variant is Variant.BIDIRECTIONAL:
            _check(
                self.aux_target is AuxTarget.NONE,
                "the bi-directional variant has no auxiliary branch: set aux_target='none'; "
                f"got {self.aux_target.value!r}",
            )

    @property
    def downsample_factor(self) -> int:
        """Total spatial reduction between F1 and F4 (inputs must be multiples of it)."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def has_aux(self) -> bool:
        return self.variant is Variant.MULTITASK and self.aux_target is not AuxTarget.NONE

    def stain_index(self, stain: str) -> int:
        """Index of ``stain`` in :attr:`stains`; ``ValueError`` naming the known ones if absent."""
        try:
            return self.stains.index(stain)
        except ValueError:
            raise ValueError(
                f"unknown stain {stain!r}: this model knows {list(self.stains)}"
            ) from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown model config fields {sorted(unknown)}; expected some of {sorted(known)}"
            )
        data = dict(data)
        if "schedule" in data and isinstance(data["schedule"], dict):
            data["schedule"] = _from_dict(ScheduleConfig, data["schedule"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW, EMA with warm-up, gradient clipping, bf16 on CUDA).

    ``ema_decay`` is the final EMA decay; the decay at step k is ``min(ema_decay, (1 + k) /
    (10 + k))``, so the EMA forgets the random initialisation early (a fixed 0.999 would still
    hold a third of it after 1,000 steps).
    """

    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    augment: bool = True
    color_jitter: float = 0.05
    val_every: int = 0
    val_batches: int = 2
    checkpoint_every: int = 0
    bf16: bool = True

    def __post_init__(self) -> None:
        ints = (
            "steps",
            "batch_size",
            "warmup_steps",
            "val_every",
            "checkpoint_every",
            "seed",
            "val_batches",
        )
        for name in ints:
            v = getattr(self, name)
            lo = 1 if name in ("steps", "batch_size", "val_batches") else 0
            _check(
                isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                f"{name} must be an integer >= {lo}; got {v!r}",
            )
        _check(math.isfinite(self.lr) and 0 < self.lr < 1, f"lr must be in (0, 1); got {self.lr!r}")
        for name in ("lr", "weight_decay", "grad_clip", "ema_decay", "color_jitter"):
            v = getattr(self, name)
            _check(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                f"{name} must be a finite number; got {v!r}",
            )
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay!r}")
        _check(self.grad_clip > 0, f"grad_clip must be > 0; got {self.grad_clip!r}")
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1); got {self.ema_decay!r}")
        _check(
            0.0 <= self.color_jitter <= 0.5,
            f"color_jitter must be in [0, 0.5]; got {self.color_jitter!r}",
        )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple):
        return [_to_jsonable(v) for v in obj]
    return obj


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} fields {sorted(unknown)}; expected some of {sorted(known)}"
        )
    return cls(**data)


# --------------------------------------------------------------------------------------------
# Presets. Parameter counts are for the default two stains with the auxiliary branch and are
# checked by tests/test_model.py (benchmarks/bench_model.py prints them).
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # Tests and quick CPU runs: encoder + one branch at batch 8, 64 px in ~40 ms here.
    "tiny": dict(base_channels=16, channel_mults=(1, 1, 2, 2), num_res_blocks=1),
    # The bundled demo model: CPU-trainable in tens of minutes with v-prediction.
    "small": dict(base_channels=32, channel_mults=(1, 1, 2, 2), num_res_blocks=1),
    # Paper scale (128 px patches, T = 2000, epsilon as the paper): for a GPU.
    "paper": dict(
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        mid_attention=True,
        attention_heads=8,
        dropout=0.1,
        image_size=128,
        mpp=0.5,
        schedule=ScheduleConfig(num_train_timesteps=2000, prediction_type=PredictionType.EPSILON),
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a preset (``tiny``, ``small``, ``paper``) plus overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    kwargs = dict(PRESETS[name])
    kwargs.update(overrides)
    return ModelConfig(**kwargs)
