"""Action-chunk networks for policies: ``net(x, t, c)`` with ``x`` a chunk ``(B, horizon, action_dim)`` of future
actions and ``c`` the context ``(B, context_dim)`` (the flattened past observations), conditioned by FiLM
(Perez et al. 2018) on an embedding of time and context, as Diffusion Policy (Chi et al. 2023) does.

A context row of NaN is the null context of classifier-free guidance (:mod:`flowdiff.guidance`): the network puts
its learned null context there. Without a context (``c=None``) every row is the null context.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flowdiff.nets.mlp import sinusoidal_embedding


def context_or_null(c: Tensor | None, null: Tensor, batch: int) -> Tensor:
    """``c`` ``(B, context_dim)`` with NaN rows (and ``c=None``) replaced by the learned ``null`` context."""
    if c is None:
        return null.expand(batch, -1)
    c = c.reshape(batch, -1).to(null.dtype)
    nan = torch.isnan(c)
    missing = nan.all(1, keepdim=True)
    if not torch.compiler.is_compiling() and bool((nan.any(1, keepdim=True) & ~missing).any()):
        raise ValueError("a context row is partly NaN: a null context is a whole row of NaN; fill missing observations")
    return torch.where(missing, null.expand_as(c), c)


class _Conditioning(nn.Module):
    """``(t, c) -> (B, cond_dim)``: sinusoidal time features and the context through a small MLP."""

    def __init__(self, context_dim: int, time_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.null_context = nn.Parameter(torch.zeros(context_dim))
        self.mlp = nn.Sequential(nn.Linear(time_dim + context_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: Tensor, c: Tensor | None, batch: int) -> Tensor:
        ctx = context_or_null(c, self.null_context, batch)
        return self.mlp(torch.cat([sinusoidal_embedding(t.to(ctx.dtype), self.time_dim), ctx], 1))


def _data_dims(data_shape) -> tuple[int, int]:
    if data_shape is None or len(data_shape) != 2:
        raise ValueError(
            f"policy networks generate action chunks of shape (horizon, action_dim), not {tuple(data_shape or ())}: "
            "use them with policy data (data=obstacle or data=metaworld)"
        )
    return int(data_shape[0]), int(data_shape[1])


class _FiLMBlock(nn.Module):
    """``h + W2 silu(W1 (LN(h) (1 + scale) + shift))``, ``scale, shift`` from the conditioning."""

    def __init__(self, width: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(cond_dim, 2 * width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        scale, shift = self.film(e).chunk(2, 1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class PolicyMLP(nn.Module):
    """The chunk flattened through ``depth`` residual FiLM blocks of ``width`` units.

    Args:
        data_shape: ``(horizon, action_dim)``, from the data.
        context_dim: size of the context, from the data.
        width, depth: the residual MLP.
        time_dim: sinusoidal time features; cond_dim: the conditioning embedding.
        num_classes: unused (policies condition on a context), accepted for the common build.
    """

    null_label = 0  # guidance's null is a NaN context row, not a label

    def __init__(
        self,
        data_shape: tuple[int, int] | None = None,
        context_dim: int = 0,
        width: int = 256,
        depth: int = 3,
        time_dim: int = 32,
        cond_dim: int = 128,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        horizon, action_dim = _data_dims(data_shape)
        flat = horizon * action_dim
        self.cond = _Conditioning(context_dim, time_dim, cond_dim)
        self.inp = nn.Linear(flat, width)
        self.blocks = nn.ModuleList(_FiLMBlock(width, cond_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, flat))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        # x: (B, horizon, action_dim), t: (B,), y: the context (B, context_dim) or None
        e = self.cond(t, y, x.shape[0])
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, e)
        return self.out(h).view_as(x)


class _ResidualConv1d(nn.Module):
    """Diffusion Policy's ``ConditionalResidualBlock1D``: two Conv1d-GroupNorm-Mish over the horizon, FiLM between."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int = 5, groups: int = 8) -> None:
        super().__init__()
        g = math.gcd(groups, c_out)
        self.conv1 = nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(g, c_out), nn.Mish()
        )
        self.conv2 = nn.Sequential(
            nn.Conv1d(c_out, c_out, kernel, padding=kernel // 2), nn.GroupNorm(g, c_out), nn.Mish()
        )
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        out = self.conv1(h)
        scale, shift = self.film(e)[:, :, None].chunk(2, 1)
        out = self.conv2(out * scale + shift)
        return out + self.skip(h)


class PolicyUNet1D(nn.Module):
    """Diffusion Policy's conditional 1-D temporal U-Net over the horizon: residual Conv1d blocks at each level
    (``channels``), down by strided convolutions and up by transposed ones with skips, FiLM from time and context.

    Args:
        data_shape: ``(horizon, action_dim)``; the horizon must divide by ``2^(len(channels) - 1)``.
        context_dim: size of the context, from the data.
        channels: channels per level (Diffusion Policy: 256, 512, 1024; smaller here for CPUs).
    """

    null_label = 0

    def __init__(
        self,
        data_shape: tuple[int, int] | None = None,
        context_dim: int = 0,
        channels: tuple[int, ...] = (64, 128, 256),
        time_dim: int = 64,
        cond_dim: int = 128,
        kernel: int = 5,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        horizon, action_dim = _data_dims(data_shape)
        channels = tuple(int(c) for c in channels)
        if horizon % 2 ** (len(channels) - 1):
            raise ValueError(
                f"net=policy_unet1d halves the horizon {len(channels) - 1} times: {horizon} does not divide"
            )
        self.cond = _Conditioning(context_dim, time_dim, cond_dim)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        c_prev = action_dim
        for i, c in enumerate(channels):
            last = i == len(channels) - 1
            self.down.append(
                nn.ModuleList(
                    [
                        _ResidualConv1d(c_prev, c, cond_dim, kernel),
                        _ResidualConv1d(c, c, cond_dim, kernel),
                        nn.Identity() if last else nn.Conv1d(c, c, 3, stride=2, padding=1),
                    ]
                )
            )
            c_prev = c
        self.mid = nn.ModuleList([_ResidualConv1d(c_prev, c_prev, cond_dim, kernel) for _ in range(2)])
        for c_skip, c in zip(reversed(channels[:-1]), reversed(channels[1:])):
            self.up.append(
                nn.ModuleList(
                    [
                        _ResidualConv1d(c + c, c_skip, cond_dim, kernel),
                        _ResidualConv1d(c_skip, c_skip, cond_dim, kernel),
                        nn.ConvTranspose1d(c_skip, c_skip, 4, stride=2, padding=1),
                    ]
                )
            )
        self.final = nn.Sequential(
            nn.Conv1d(channels[0], channels[0], kernel, padding=kernel // 2),
            nn.Mish(),
            nn.Conv1d(channels[0], action_dim, 1),
        )

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        # x: (B, horizon, action_dim) -> channels over time: (B, action_dim, horizon)
        e = self.cond(t, y, x.shape[0])
        h = x.transpose(1, 2)
        skips = []
        for block1, block2, down in self.down:
            h = block2(block1(h, e), e)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, e)
        for block1, block2, up in self.up:  # deepest skip first; the shallowest one is never joined (as in DP)
            h = up(block2(block1(torch.cat([h, skips.pop()], 1), e), e))
        return self.final(h).transpose(1, 2)
