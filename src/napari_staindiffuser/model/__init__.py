"""Pure torch networks: H&E encoder, task attention, denoising UNets, StainDiffuser, checkpoints."""

from .staindiffuser import Branch, StainDiffuser, count_parameters

__all__ = ["Branch", "StainDiffuser", "count_parameters"]
