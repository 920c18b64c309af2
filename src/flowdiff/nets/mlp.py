"""MLP velocity/score/noise/data network for vectors: ``net(x, t, y=None) -> same shape as x``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_ACTIVATIONS = {"selu": nn.SELU, "silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Transformer-style features of ``t`` ``(B,)`` -> ``(B, dim)`` (frequencies geometric up to ``max_period``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    angles = 1000.0 * t[:, None] * freqs[None]  # t in [0, 1]: scale to the usual step range
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], 1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def labels_or_null(y: Tensor | None, x: Tensor, null: int) -> Tensor:
    """``y``, or the null label for every sample of ``x`` when there are no labels (the unconditional model).

    Every net with a label embedding has ``num_classes + 1`` rows, the last (index ``num_classes``) the
    learned null label; the net's ``null_label`` is the one definition, which guidance reads.
    """
    return torch.full((x.shape[0],), null, device=x.device, dtype=torch.long) if y is None else y


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units on ``[x, time features, class embedding]``.

    Args:
        dim: data dimension (``data_shape``, when given, must be ``(dim,)``).
        width, depth, activation: the body (torchcfm's toy model: 64, 3, selu).
        time_dim: 0 feeds ``t`` itself (as torchcfm does); otherwise that many sinusoidal features.
        num_classes: >0 adds an embedding of ``num_classes + 1`` rows, the last one the null label
            used for unconditional predictions (classifier-free guidance); ``y=None`` means null.
        class_dim: size of the class embedding.
    """

    def __init__(
        self,
        dim: int = 2,
        width: int = 64,
        depth: int = 3,
        activation: str = "selu",
        time_dim: int = 0,
        num_classes: int = 0,
        class_dim: int = 16,
        data_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if data_shape is not None:
            if len(data_shape) != 1:
                raise ValueError(
                    f"net=mlp is for vectors, but the data has shape {tuple(data_shape)}: use net=unet for images"
                )
            dim = int(data_shape[0])
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}")
        self.dim, self.time_dim, self.num_classes = dim, time_dim, num_classes
        self.class_embedding = nn.Embedding(num_classes + 1, class_dim) if num_classes > 0 else None
        in_dim = dim + max(time_dim, 1) + (class_dim if num_classes > 0 else 0)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else width, width), _ACTIVATIONS[activation]()]
        layers.append(nn.Linear(width if depth > 0 else in_dim, dim))
        self.body = nn.Sequential(*layers)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        # x: (B, dim), t: (B,), y: (B,) or None
        feats = [
            x,
            t[:, None].to(x.dtype) if self.time_dim == 0 else sinusoidal_embedding(t.to(x.dtype), self.time_dim),
        ]
        if self.class_embedding is not None:
            feats.append(self.class_embedding(labels_or_null(y, x, self.null_label)))
        return self.body(torch.cat(feats, 1))
