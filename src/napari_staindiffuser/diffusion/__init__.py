"""Diffusion math: noise schedules, the forward process and reverse-process samplers.

Pure ``torch`` / ``numpy``; imports neither the networks nor napari/Qt.
"""

from .samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    Sampler,
    SamplerKind,
    Spacing,
    custom_timesteps,
    karras_timesteps,
    make_sampler,
    make_timesteps,
)
from .schedule import NoiseSchedule, PredictionType, ScheduleKind, make_betas

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPPSampler",
    "NoiseSchedule",
    "PredictionType",
    "Sampler",
    "SamplerKind",
    "ScheduleKind",
    "Spacing",
    "custom_timesteps",
    "karras_timesteps",
    "make_betas",
    "make_sampler",
    "make_timesteps",
]
