"""Typed progress events yielded by every long job (``iter_train``, ``iter_sample``, ...).

Long jobs are generators. The GUI runs them in a ``thread_worker`` and routes each event to the
widget that shows it; the CLI and the tests drain them. Events are small frozen dataclasses that
carry plain Python values and numpy arrays only (never tensors on a device, never layers), so they
cross threads safely.

This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Event:
    """Base class of every progress event."""


class JobError(RuntimeError):
    """A long job failed for a reason its message states in full (the CLI prints it as one line
    and exits 2; the docks show it as a notification), e.g. a task failed on a cluster worker."""


@dataclass(frozen=True)
class Progress(Event):
    """Generic progress of a job made of ``total`` units (tiles, steps, chunks).

    Attributes
    ----------
    done, total : int
        Units finished so far and units in all (``done <= total``).
    stage : str
        What is being done, for a status line ("masks", "sampling", ...).
    eta_s : float or None
        Estimated seconds left, or None while it cannot be estimated yet.
    """

    done: int
    total: int
    stage: str = ""
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class SampleStep(Event):
    """One reverse-diffusion step finished.

    Attributes
    ----------
    step : int
        1-based index of the finished step; ``step == total`` on the last one.
    total : int
        Number of network evaluations the sampler makes.
    timestep : int
        The training timestep t the step started from.
    """

    step: int
    total: int
    timestep: int


@dataclass(frozen=True)
class TrainStep(Event):
    """One optimisation step finished.

    Attributes
    ----------
    step : int
        Global step count after this step (continues across resumes).
    total_steps : int
        Step at which the run ends.
    losses : dict[str, float]
        Per-branch diffusion losses, keyed ``"gen/<stain>"``, ``"aux/<stain>"`` (or ``"he->ihc"``
        style keys for the bi-directional variant), plus ``"total"``. A branch that had no sample
        in this batch is absent.
    lr : float
        Learning rate used for this step.
    it_per_s : float
        Smoothed steps per second.
    eta_s : float
        Estimated seconds to ``total_steps``.
    """

    step: int
    total_steps: int
    losses: dict[str, float]
    lr: float
    it_per_s: float
    eta_s: float


@dataclass(frozen=True)
class Validation(Event):
    """Validation losses (EMA weights, fixed noise and timesteps) at ``step``.

    ``previews`` maps each stain to the EMA model's virtual stain, (H, W, 3) uint8, of the
    H&E crop given to ``iter_train(preview_he=...)`` (same noise seed every time); empty
    without one. ``scores`` maps the stain of the preview's real IHC (when given) to the
    preview's ``{"psnr": dB, "ssim", "dice"}`` against it (see ``metrics.preview_scores``).
    """

    step: int
    losses: dict[str, float]
    previews: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSaved(Event):
    """A checkpoint was written atomically to ``path`` after ``step`` steps."""

    step: int
    path: Path
    reason: str = "interval"


@dataclass(frozen=True)
class Finished(Event):
    """The job ended. ``stopped`` is True when it ended early on request."""

    stopped: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
