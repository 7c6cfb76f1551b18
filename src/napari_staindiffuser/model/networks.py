"""The networks of StainDiffuser (arXiv 2403.11340, Fig. 1A).

- :class:`HEEncoder` turns the conditioning image (H&E; IHC too in the bi-directional variant)
  into feature maps F1..F4 at four scales (full, 1/2, 1/4, 1/8 resolution).
- :class:`TaskAttention` computes, per task and per scale, an attention map A_k^task from the
  H&E features F_k and the matching diffusion features F_k^diff, and modulates F_k^diff with it.
- :class:`DenoisingUNet` denoises one target (IHC image or coarse mask); its encoder features
  F1diff..F4diff are modulated at each scale by its own TaskAttention blocks; a plain decoder
  with skip connections follows.

The paper does not spell out the attention block. Ours is an attention gate (Oktay et al. 2018):
A_k = sigmoid(W_a [GN(F_k), GN(F_k^diff)]) is a per-position, per-channel attention map in (0, 1),
and the modulated features are F_k^diff + A_k * W_v GN(F_k): the H&E information that reaches the
diffusion branch is selected by the branch's own attention, so each task looks at different
H&E evidence while all tasks share one encoder.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .blocks import Downsample, ResBlock, SelfAttention, Upsample, norm, timestep_embedding


def _channels(cfg: ModelConfig) -> list[int]:
    return [cfg.base_channels * m for m in cfg.channel_mults]


class HEEncoder(nn.Module):
    """Conditioning encoder: image (B, 3, H, W) in [-1, 1] -> [F1, F2, F3, F4].

    F_k has ``base_channels * channel_mults[k]`` channels and spatial size ``H / 2**k``.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int = 3):
        super().__init__()
        chs = _channels(cfg)
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.down = nn.ModuleList()
        cin = chs[0]
        for k, c in enumerate(chs):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, c, None, cfg.dropout))
                cin = c
            self.levels.append(nn.ModuleList(blocks))
            if k < len(chs) - 1:
                self.down.append(Downsample(c))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        h = self.conv_in(image)
        feats = []
        for k, blocks in enumerate(self.levels):
            for block in blocks:
                h = block(h)
            feats.append(h)
            if k < len(self.down):
                h = self.down[k](h)
        return feats


class TaskAttention(nn.Module):
    """A_k^task from (F_k, F_k^diff); returns F_k^diff + A_k^task * V(F_k).

    Parameters
    ----------
    channels : int
        Channels of both F_k and F_k^diff.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm_he = norm(channels)
        self.norm_diff = norm(channels)
        self.gate = nn.Conv2d(2 * channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 3, padding=1)

    def attention(self, f_he: torch.Tensor, f_diff: torch.Tensor) -> torch.Tensor:
        """The attention map A_k^task, (B, C, H, W) in (0, 1)."""
        return torch.sigmoid(self.gate(torch.cat([self.norm_he(f_he), self.norm_diff(f_diff)], 1)))

    def forward(self, f_diff: torch.Tensor, f_he: torch.Tensor) -> torch.Tensor:
        return f_diff + self.attention(f_he, f_diff) * self.value(self.norm_he(f_he))


class DenoisingUNet(nn.Module):
    """One diffusion branch: (x_t, t, [F1..F4]) -> prediction (epsilon or v).

    Parameters
    ----------
    cfg : ModelConfig
    channels : int
        Channels of the denoised target (3 for an RGB image, 1 for a mask or distance map).
    num_tasks : int
        > 0 adds a learned task embedding (used by the bi-directional variant to tell
        H&E->IHC from IHC->H&E and which stain); 0 for the multitask branches.
    """

    def __init__(self, cfg: ModelConfig, channels: int, num_tasks: int = 0):
        super().__init__()
        chs = _channels(cfg)
        self.base = cfg.base_channels
        emb = 4 * cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(self.base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.task_emb = nn.Embedding(num_tasks, emb) if num_tasks else None
        self.conv_in = nn.Conv2d(channels, chs[0], 3, padding=1)

        self.enc = nn.ModuleList()
        self.attn = nn.ModuleList(TaskAttention(c) for c in chs)
        self.down = nn.ModuleList(Downsample(c) for c in chs[:-1])
        cin = chs[0]
        for c in chs:
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, c, emb, cfg.dropout))
                cin = c
            self.enc.append(nn.ModuleList(blocks))

        cmid = chs[-1]
        self.mid1 = ResBlock(cmid, cmid, emb, cfg.dropout)
        self.mid_attn = SelfAttention(cmid, cfg.attention_heads) if cfg.mid_attention else None
        self.mid2 = ResBlock(cmid, cmid, emb, cfg.dropout)

        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        cin = cmid
        for k in reversed(range(len(chs))):
            c = chs[k]
            blocks = [ResBlock(cin + c, c, emb, cfg.dropout)]
            blocks += [ResBlock(c, c, emb, cfg.dropout) for _ in range(cfg.num_res_blocks - 1)]
            self.dec.append(nn.ModuleList(blocks))
            self.up.append(Upsample(c) if k > 0 else nn.Identity())
            cin = c
        self.norm_out = norm(chs[0])
        self.conv_out = nn.Conv2d(chs[0], channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        features: list[torch.Tensor],
        task: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict epsilon or v.

        Parameters
        ----------
        x_t : Tensor (B, C, H, W)
            Noisy target.
        t : Tensor (B,) int64
            Timesteps in [0, T).
        features : list of 4 Tensors
            H&E features F1..F4 of the same B conditioning images.
        task : Tensor (B,) int64, optional
            Task ids when the UNet has a task embedding.
        """
        emb = self.time_mlp(timestep_embedding(t, self.base))
        if self.task_emb is not None:
            if task is None:
                raise ValueError("this UNet serves several tasks: pass task ids")
            emb = emb + self.task_emb(task)
        h = self.conv_in(x_t)
        skips = []
        for k, blocks in enumerate(self.enc):
            for block in blocks:
                h = block(h, emb)
            h = self.attn[k](h, features[k])  # F_k^diff modulated by A_k^task
            skips.append(h)
            if k < len(self.down):
                h = self.down[k](h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for blocks, up in zip(self.dec, self.up, strict=True):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            h = up(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))
