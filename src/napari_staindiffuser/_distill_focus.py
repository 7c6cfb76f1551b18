"""What :func:`napari_staindiffuser.distill.iter_distill` distils: some stains' branches of some
kinds (``stains``, ``branches``; the rest frozen, bit-identical) and how often each student step
is drawn (``step_weights``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import stain_key
from .model import StainDiffuser
from .pairs import InMemoryPairs, PairFolder


def focus_of(config, plan, stains, branches, step_weights) -> dict[str, Any]:
    """Check what to distil (``iter_distill``'s ``stains``, ``branches``, ``step_weights``).

    Returns the provenance values (``None``: all) and ``loss_kw``, the keyword arguments of
    :func:`~napari_staindiffuser.distill.distill_losses`.
    """
    kinds = ["gen", "aux"] if config.has_aux else ["gen"]
    if stains is not None:
        stains = list(dict.fromkeys(stains))
        unknown = [s for s in stains if s not in config.stains]
        if not stains or unknown:
            raise ValueError(
                f"stains must name some of the model's stains {list(config.stains)}; got {stains}"
            )
    if branches is not None:
        branches = list(dict.fromkeys(str(getattr(b, "value", b)) for b in branches))
        if not branches or not set(branches) <= set(kinds):
            raise ValueError(f"branches must be some of {kinds} for this model; got {branches}")
    weights = None
    if step_weights is not None:
        weights = [float(w) for w in step_weights]
        if len(plan) != 1 or len(weights) != plan[0]:
            raise ValueError(
                f"step_weights needs one weight per student step of a single stage "
                f"(teacher_steps = 2 x student_steps); the stages are {plan}, got {len(weights)} "
                "weights"
            )
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"step_weights must be >= 0 with a positive sum; got {weights}")
    partial = (stains is not None and set(stains) != set(config.stains)) or (
        branches is not None and set(branches) != set(kinds)
    )
    loss_kw = {
        "stains": stains,
        "branches": branches,
        "step_weights": None if weights is None else torch.tensor(weights),
        "train_encoder": not partial,
    }
    return {
        "stains": stains,
        "branches": branches,
        "step_weights": weights,
        "frozen": "all but the distilled branches" if partial else None,
        "loss_kw": loss_kw,
    }


def indices_of(source, stains) -> list[int]:
    """Indices of the pairs of ``stains`` (all when None), read from the manifest or the samples
    where the source allows, so that a lazy folder's images are not read."""
    if stains is None:
        return list(range(len(source)))
    if isinstance(source, InMemoryPairs):
        found = [s.stain for s in source.samples]
    elif isinstance(source, PairFolder):
        found = [r["stain"] for r in source.rows]
    else:
        found = [source[i].stain for i in range(len(source))]
    keep = [i for i, s in enumerate(found) if s in stains]
    if not keep:
        raise ValueError(f"the data hold no pairs of {stains}; they have {sorted(set(found))}")
    return keep


def trainable(student: StainDiffuser, focus: dict[str, Any]) -> list[torch.nn.Parameter]:
    """Freeze what ``focus`` leaves out (nothing by default); the parameters to optimise."""
    if focus["frozen"] is None:
        return list(student.parameters())
    student.requires_grad_(False)
    stains = focus["stains"] or student.stains
    for kind in focus["branches"] or ("gen", "aux"):
        modules = getattr(student, kind)
        if modules is not None:
            for s in stains:
                modules[stain_key(s)].requires_grad_(True)
    return [p for p in student.parameters() if p.requires_grad]
