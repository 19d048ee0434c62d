"""A ViT over a feature map's voxels: the bottleneck of the 3D TransUNet (Chen et al. 2023,
its encoder-only design: a CNN encoder, transformer layers on the deepest map's voxels as
tokens, and a U-Net decoder).

Shapes: :class:`ViTBottleneck` takes and returns ``(B, C, D, H, W)``; the voxels, in
(z, y, x) raster order, are the tokens, so the learned position embedding fixes the
bottleneck's size, and with it the patch, once planned (as in UNETR).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import TransformerBlock
from torch import nn


class ViTBottleneck(nn.Module):
    """Project ``channels`` to ``hidden``, add a learned position embedding for ``tokens``
    voxels, run ``layers`` MONAI transformer blocks (pre-norm self-attention and MLP), a
    final layer norm, and project back; the result replaces the map."""

    def __init__(self, channels: int, tokens: int, hidden: int = 768, layers: int = 12, heads: int = 12,
                 mlp: int = 3072) -> None:
        super().__init__()
        self.proj_in = nn.Linear(channels, hidden)
        self.position = nn.Parameter(torch.zeros(1, tokens, hidden))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, mlp, heads) for _ in range(layers))
        for block in self.blocks:  # MONAI makes a cross-attention norm it never uses: DDP wants no idle weights
            block.norm_cross_attn = nn.Identity()
        self.norm = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.proj_in(x.flatten(2).transpose(1, 2))  # (B, L, hidden), voxels in (z, y, x) raster order
        if seq.shape[1] != self.position.shape[1]:
            raise ValueError(f"the ViT bottleneck was planned for {self.position.shape[1]} voxels, got {seq.shape[1]}")
        seq = seq + self.position
        for block in self.blocks:
            seq = block(seq)
        return self.proj_out(self.norm(seq)).transpose(1, 2).reshape(x.shape)
