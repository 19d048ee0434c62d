"""A Mamba layer over a feature map's voxels (U-Mamba Bot's bottleneck; Gu & Dao 2023).

The selective scan runs on ``mamba-ssm``'s fused CUDA kernel where that package is
installed and the tensors are on a GPU; everywhere else a plain PyTorch loop over the
sequence computes the same recurrence, so the layer trains and is tested on CPU. Both use
the same parameters, so a RUN trained on either predicts on the other.

Shapes: :class:`MambaLayer` takes and returns ``(B, C, D, H, W)``; the voxels, in (z, y, x)
raster order, are the sequence. :class:`Mamba` maps ``(B, L, C) -> (B, L, C)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor) -> torch.Tensor:
    """The recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, y_t = C_t . h_t + D u_t.

    Shapes: ``u``, ``delta`` ``(B, L, E)``; ``A`` ``(E, N)``; ``B``, ``C`` ``(B, L, N)``;
    ``D`` ``(E,)``; returns ``(B, L, E)``. Computed in fp32 whatever the input's dtype.
    """
    dtype = u.dtype
    u, delta, B, C = (t.float() for t in (u, delta, B, C))
    decay = torch.exp(delta.unsqueeze(-1) * A.float())  # (B, L, E, N)
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (B, L, E, N)
    h = torch.zeros_like(decay[:, 0])
    ys = []
    for t in range(u.shape[1]):
        h = decay[:, t] * h + drive[:, t]
        ys.append((h * C[:, t].unsqueeze(1)).sum(-1))
    return (torch.stack(ys, dim=1) + u * D.float()).to(dtype)


@lru_cache(maxsize=1)
def _fused_scan():  # looked up once: a failed import is not retried every step
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


class Mamba(nn.Module):
    """One Mamba block: input projection to x and the gate z, a causal depthwise conv and
    SiLU on x, input-dependent (delta, B, C), the selective scan, the gate, and the output
    projection. ``d_state`` 16, ``d_conv`` 4 and ``expand`` 2 are Mamba's defaults."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        inner, self.rank, self.d_state = expand * d_model, math.ceil(d_model / 16), d_state
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.rank, inner)
        # S4D-real initialisation: A_n = -(n + 1); delta's bias puts exp(bias) in [1e-3, 1e-1].
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        with torch.no_grad():
            dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :length].transpose(1, 2))
        dt, B, C = self.x_proj(u).split([self.rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log)
        fused = _fused_scan() if x.is_cuda else None
        if fused is not None:  # the kernel takes (B, E, L) and (B, N, L), and applies softplus and the gate
            y = fused(u.transpose(1, 2).contiguous(), (dt @ self.dt_proj.weight.T).transpose(1, 2).contiguous(), A,
                      B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float(),
                      z=z.transpose(1, 2).contiguous(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
            return self.out_proj(y.transpose(1, 2))
        y = selective_scan(u, F.softplus(self.dt_proj(dt)), A, B, C, self.D)
        return self.out_proj(y * F.silu(z))


class MambaLayer(nn.Module):
    """Layer norm and :class:`Mamba` over the voxels of a ``(B, C, D, H, W)`` map; its output
    replaces the map, as U-Mamba Bot's bottleneck does (no residual around it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mamba = Mamba(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        seq = x.flatten(2).transpose(1, 2)  # (B, L, C), voxels in (z, y, x) raster order
        out = self.mamba(self.norm(seq))
        return out.transpose(1, 2).reshape(x.shape)
