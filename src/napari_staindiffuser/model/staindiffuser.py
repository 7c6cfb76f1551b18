"""StainDiffuser: the shared H&E encoder and its branches (paper Fig. 1A and 1B).

Branches are addressed by a :class:`Branch` kind and a stain:

- ``GEN``: H&E -> IHC of the stain (one UNet per stain in the multitask variant);
- ``AUX``: H&E -> coarse mask (or distance map) of the stain's positive cells (multitask only);
- ``REVERSE``: IHC of the stain -> H&E (bi-directional variant only).

In the multitask variant nothing is shared between branches except the encoder: each UNet owns
its TaskAttention blocks. The bi-directional variant has one encoder (fed H&E or IHC) and one
UNet told the task by a learned task embedding.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from ..config import ModelConfig, Variant, stain_key
from .networks import DenoisingUNet, HEEncoder


class Branch(str, enum.Enum):
    GEN = "gen"
    AUX = "aux"
    REVERSE = "reverse"


class StainDiffuser(nn.Module):
    """All variants of the model; built from a :class:`ModelConfig`.

    Images are float tensors (B, 3, H, W) in [-1, 1]; masks (B, 1, H, W) in [-1, 1]. H and W must
    be multiples of ``config.downsample_factor``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = HEEncoder(config)
        keys = [stain_key(s) for s in config.stains]
        if config.variant is Variant.MULTITASK:
            self.gen = nn.ModuleDict({k: DenoisingUNet(config, 3) for k in keys})
            self.aux = (
                nn.ModuleDict({k: DenoisingUNet(config, 1) for k in keys})
                if config.has_aux
                else None
            )
            self.unet = None
        else:
            self.gen = None
            self.aux = None
            # task id = direction * n_stains + stain index (direction 0: H&E->IHC, 1: IHC->H&E)
            self.unet = DenoisingUNet(config, 3, num_tasks=2 * len(keys))

    @property
    def stains(self) -> tuple[str, ...]:
        return self.config.stains

    def branches(self) -> list[tuple[Branch, str]]:
        """Every (branch, stain) pair this model can denoise."""
        out = []
        for s in self.stains:
            if self.config.variant is Variant.MULTITASK:
                out.append((Branch.GEN, s))
                if self.aux is not None:
                    out.append((Branch.AUX, s))
            else:
                out += [(Branch.GEN, s), (Branch.REVERSE, s)]
        return out

    def target_channels(self, branch: Branch | str) -> int:
        return 1 if Branch(branch) is Branch.AUX else 3

    def check_input(self, image: torch.Tensor, name: str = "image") -> None:
        """Raise ``ValueError`` unless ``image`` is a finite (B, 3, H, W) float tensor that fits."""
        f = self.config.downsample_factor
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
            raise ValueError(f"{name} must be a (B, 3, H, W) RGB tensor; got shape {shape}")
        if not image.is_floating_point():
            raise ValueError(f"{name} must be float in [-1, 1]; got dtype {image.dtype}")
        h, w = image.shape[-2:]
        if h < f or w < f or h % f or w % f:
            raise ValueError(
                f"{name} height and width must be multiples of {f} and at least {f} for this "
                f"model (4 scales); got {h} x {w}"
            )
        if not torch.isfinite(image).all():
            raise ValueError(f"{name} contains NaN or infinite values")

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Shared encoder features [F1..F4] of the conditioning image (B, 3, H, W) in [-1, 1]."""
        return self.encoder(image)

    def denoise(
        self,
        branch: Branch | str,
        stain: str,
        x_t: torch.Tensor,
        t: torch.Tensor,
        features: list[torch.Tensor],
    ) -> torch.Tensor:
        """Network prediction (epsilon or v) of one branch for one stain.

        Parameters
        ----------
        branch : Branch
        stain : str
            One of ``config.stains`` (``ValueError`` otherwise).
        x_t : Tensor (B, C, H, W)
            Noisy target; C = 3 (images) or 1 (auxiliary mask).
        t : Tensor (B,) int64
        features : list of Tensor
            ``encode(cond)`` of the matching conditioning images.
        """
        branch = Branch(branch)
        i = self.config.stain_index(stain)
        key = stain_key(stain)
        if self.config.variant is Variant.MULTITASK:
            if branch is Branch.GEN:
                return self.gen[key](x_t, t, features)
            if branch is Branch.AUX and self.aux is not None:
                return self.aux[key](x_t, t, features)
        elif branch in (Branch.GEN, Branch.REVERSE):
            direction = 0 if branch is Branch.GEN else 1
            task = torch.full((x_t.shape[0],), direction * len(self.stains) + i, device=x_t.device)
            return self.unet(x_t, t, features, task)
        raise ValueError(
            f"this {self.config.variant.value} model has no {branch.value!r} branch; "
            f"it has {sorted({b.value for b, _ in self.branches()})}"
        )

    def forward(
        self,
        cond: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        branch: Branch | str = Branch.GEN,
        stain: str | None = None,
    ) -> torch.Tensor:
        """Convenience: encode ``cond`` and denoise one branch (the first stain by default)."""
        return self.denoise(branch, stain or self.stains[0], x_t, t, self.encode(cond))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_config(model: StainDiffuser, config: ModelConfig, *, copy_from: str | None = None):
    """A new StainDiffuser with ``config``, holding ``model``'s weights.

    ``config`` may change loss weights, the auxiliary target, the patch size or dropout (the
    weights keep their shapes), and may add stains to a multitask model: each new stain's
    generation and auxiliary branches start as copies of the branches of ``copy_from`` (default
    the model's first stain), a warm start that fine-tuning then specialises.

    Raises
    ------
    ValueError
        The architecture differs (widths, depth, variant), a stain is removed, or stains are
        added to the bi-directional variant (its task embedding cannot grow).
    """
    old = model.config
    new_stains = [s for s in config.stains if s not in old.stains]
    if [s for s in config.stains if s in old.stains] != list(old.stains):
        raise ValueError(
            f"the new config must keep the model's stains {list(old.stains)} in order; got "
            f"{list(config.stains)}"
        )
    if new_stains and old.variant is not Variant.MULTITASK:
        raise ValueError(
            f"this {old.variant.value} model cannot grow new stains ({new_stains}): only "
            "multitask models can; train a multitask model from scratch instead"
        )
    out = StainDiffuser(config)
    state = model.state_dict()
    src = stain_key(copy_from or old.stains[0])
    for s in new_stains:
        key = stain_key(s)
        for kind in ("gen", "aux"):
            prefix = f"{kind}.{src}."
            copies = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            state.update({f"{kind}.{key}.{k}": v.clone() for k, v in copies.items()})
    expected = out.state_dict()
    if old.has_aux and not config.has_aux:
        state = {k: v for k, v in state.items() if not k.startswith("aux.")}
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or wrong:
        raise ValueError(
            "the new config changes the architecture, which fine-tuning cannot carry over "
            f"(missing {missing[:3]}, wrong shape {wrong[:3]}); keep widths, depth and variant"
        )
    out.load_state_dict({k: state[k] for k in expected}, strict=True)
    return out
