"""UNets for images, ``net(x, t, y=None) -> same shape as x`` with ``x`` ``(B, C, H, W)``, ``t`` ``(B,)``.

* :class:`CourseUNet` is the course's lab-3 network (MIT 6.S184, lab 3): a learned Fourier time
  embedding, residual layers with time and label adapters, an encoder / midcoder / decoder with
  additive skips, BatchNorm; channels [32, 64, 128], two residual layers per level, embeddings of 40.
* :class:`ADMUNet` is the ADM / "improved DDPM" UNet (Dhariwal & Nichol 2021) in the configuration
  torchcfm trains on CIFAR-10 (128 channels, multipliers [1, 2, 2, 2], two residual blocks per level,
  attention at 16 x 16 with heads of 64 channels, dropout 0.1: 35.7M parameters), written for bf16 and
  channels-last: attention runs through ``scaled_dot_product_attention`` on a ``(B, HW, C)`` view that
  channels-last memory gives without a copy, and nothing is cast to float32 by hand.

Both take labels ``y`` in ``[0, num_classes]``, the last index (``num_classes``) being the learned null
label of classifier-free guidance; ``y=None`` means the null label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdiff.nets.mlp import labels_or_null, sinusoidal_embedding


def _image_shape(data_shape: Sequence[int], net: str) -> tuple[int, int, int]:
    if len(data_shape) != 3:
        raise ValueError(f"net={net} is for images (C, H, W), but the data has shape {tuple(data_shape)}: use net=mlp")
    return tuple(int(s) for s in data_shape)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- course UNet
class FourierEncoder(nn.Module):
    """Lab 3's time embedding: ``sqrt(2) [sin(2 pi w t), cos(2 pi w t)]`` with learned frequencies ``w``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the Fourier embedding needs an even size, got {dim}")
        self.weights = nn.Parameter(torch.randn(1, dim // 2))

    def forward(self, t: Tensor) -> Tensor:  # (B,) -> (B, dim)
        freqs = t.view(-1, 1) * self.weights * (2 * math.pi)
        return torch.cat([torch.sin(freqs), torch.cos(freqs)], dim=-1) * math.sqrt(2)


class ResidualLayer(nn.Module):
    """Two (SiLU, BatchNorm, conv 3x3) blocks; the time and label adapters add per-channel offsets between them."""

    def __init__(self, channels: int, t_dim: int, y_dim: int) -> None:
        super().__init__()

        def block() -> nn.Sequential:
            return nn.Sequential(nn.SiLU(), nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1))

        def adapter(dim: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, channels))

        self.block1, self.block2 = block(), block()
        self.time_adapter = adapter(t_dim)
        self.y_adapter = adapter(y_dim) if y_dim else None

    def forward(self, x: Tensor, t_emb: Tensor, y_emb: Tensor | None) -> Tensor:
        h = self.block1(x)
        h = h + self.time_adapter(t_emb)[:, :, None, None]
        if self.y_adapter is not None:
            h = h + self.y_adapter(y_emb)[:, :, None, None]
        return x + self.block2(h)


class _Level(nn.Module):
    """Residual layers at one resolution, with an optional resampling before (decoder) or after (encoder)."""

    def __init__(self, layers: list[ResidualLayer], before: nn.Module | None, after: nn.Module | None) -> None:
        super().__init__()
        self.before, self.after = before or nn.Identity(), after or nn.Identity()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, t_emb: Tensor, y_emb: Tensor | None) -> Tensor:
        x = self.before(x)
        for layer in self.layers:
            x = layer(x, t_emb, y_emb)
        return self.after(x)


class CourseUNet(nn.Module):
    """The lab-3 UNet: encoders (residual layers, then a stride-2 conv), a midcoder, decoders (bilinear
    upsampling + conv, then residual layers), the encoder outputs added back before each decoder.

    Args:
        data_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2^(len(channels) - 1)`` (lab 3 resizes MNIST to 32).
        channels: the width of each level.
        num_residual_layers: residual layers per level.
        t_embed_dim, y_embed_dim: sizes of the time and label embeddings.
        num_classes: > 0 adds a label embedding of ``num_classes + 1`` rows (the last is the null label).
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (1, 32, 32),
        channels: Sequence[int] = (32, 64, 128),
        num_residual_layers: int = 2,
        t_embed_dim: int = 40,
        y_embed_dim: int = 40,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        c_in, h, w = _image_shape(data_shape, "unet")
        factor = 2 ** (len(channels) - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"net=unet with {len(channels)} levels needs H and W divisible by {factor}, got {h} x {w}: "
                f"set data.image_size (lab 3 uses 32) or data.pad"
            )
        self.num_classes = num_classes
        y_dim = y_embed_dim if num_classes > 0 else 0
        self.time_embedder = FourierEncoder(t_embed_dim)
        self.y_embedder = nn.Embedding(num_classes + 1, y_embed_dim) if num_classes > 0 else None
        self.init_conv = nn.Sequential(
            nn.Conv2d(c_in, channels[0], 3, padding=1), nn.BatchNorm2d(channels[0]), nn.SiLU()
        )

        def layers(c: int) -> list[ResidualLayer]:
            return [ResidualLayer(c, t_embed_dim, y_dim) for _ in range(num_residual_layers)]

        pairs = list(zip(channels[:-1], channels[1:]))
        self.encoders = nn.ModuleList(
            _Level(layers(c), None, nn.Conv2d(c, c_next, 3, stride=2, padding=1)) for c, c_next in pairs
        )
        self.midcoder = _Level(layers(channels[-1]), None, None)
        self.decoders = nn.ModuleList(
            _Level(
                layers(c),
                nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(c_next, c, 3, padding=1)),
                None,
            )
            for c, c_next in reversed(pairs)
        )
        self.final_conv = nn.Conv2d(channels[0], c_in, 3, padding=1)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t_emb = self.time_embedder(t.to(x.dtype))
        y_emb = None if self.y_embedder is None else self.y_embedder(labels_or_null(y, x, self.null_label))
        h = self.init_conv(x)
        skips = []
        for encoder in self.encoders:
            h = encoder(h, t_emb, y_emb)
            skips.append(h)
        h = self.midcoder(h, t_emb, y_emb)
        for decoder in self.decoders:
            h = decoder(h + skips.pop(), t_emb, y_emb)
        return self.final_conv(h)


# ---------------------------------------------------------------------------------------------- ADM UNet
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """ADM residual block: norm, SiLU, conv; add the embedding's projection; norm, SiLU, dropout, zero-init conv."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(
            _norm(c_out), nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the ``H W`` positions, by ``F.scaled_dot_product_attention``."""

    def __init__(self, channels: int, head_channels: int = 64) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention over {channels} channels needs heads of a divisor of it, got {head_channels}")
        self.heads = channels // head_channels
        self.norm = _norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view when x is channels-last
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.view(b, h, w, c).permute(0, 3, 1, 2)


class _Step(nn.Module):
    """One entry of the ADM input/output lists: a residual block, optional attention, optional resampling."""

    def __init__(self, res: ResBlock | None, attn: nn.Module | None, resample: nn.Module | None) -> None:
        super().__init__()
        self.res, self.attn, self.resample = res, attn or nn.Identity(), resample or nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.res is not None:
            x = self.res(x, emb)
        return self.resample(self.attn(x))


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ADMUNet(nn.Module):
    """ADM UNet (torchcfm's ``UNetModelWrapper`` architecture; its defaults are torchcfm's CIFAR-10 run).

    Args:
        data_shape: ``(C, H, W)``.
        channels: base width; level ``i`` has ``channels * channel_mult[i]``.
        channel_mult, num_res_blocks: the levels and residual blocks per level.
        attention_resolutions: resolutions (in pixels) that get self-attention after each block.
        head_channels: channels per attention head.
        dropout: inside residual blocks.
        num_classes: > 0 adds a label embedding of ``num_classes + 1`` rows (the last is the null label).
    """

    def __init__(
        self,
        data_shape: Sequence[int] = (3, 32, 32),
        channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        head_channels: int = 64,
        dropout: float = 0.1,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        c_in, size, width = _image_shape(data_shape, "unet_cifar")
        factor = 2 ** (len(channel_mult) - 1)
        if size % factor or width % factor:
            raise ValueError(f"net=unet_cifar needs H and W divisible by {factor}, got {size} x {width}")
        self.channels, self.num_classes = channels, num_classes
        emb_dim = 4 * channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        def attention(c: int, res: int) -> nn.Module | None:
            return SelfAttention(c, head_channels) if res in attention_resolutions else None

        ch = channels * channel_mult[0]
        self.input_conv = nn.Conv2d(c_in, ch, 3, padding=1)
        self.inputs = nn.ModuleList()
        skip_channels, res = [ch], size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.inputs.append(
                    _Step(ResBlock(ch, channels * mult, emb_dim, dropout), attention(channels * mult, res), None)
                )
                ch = channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.inputs.append(_Step(None, None, nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
                skip_channels.append(ch)
                res //= 2
        self.middle = nn.ModuleList(
            [ResBlock(ch, ch, emb_dim, dropout), SelfAttention(ch, head_channels), ResBlock(ch, ch, emb_dim, dropout)]
        )
        self.outputs = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = ResBlock(ch + skip_channels.pop(), channels * mult, emb_dim, dropout)
                ch = channels * mult
                up = _Upsample(ch) if level and i == num_res_blocks else None
                self.outputs.append(_Step(block, attention(ch, res), up))
            res *= 2
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, c_in, 3, padding=1)))

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_embed(sinusoidal_embedding(t.to(x.dtype), self.channels))
        if self.label_emb is not None:
            emb = emb + self.label_emb(labels_or_null(y, x, self.null_label))
        h = self.input_conv(x)
        skips = [h]
        for step in self.inputs:
            h = step(h, emb)
            skips.append(h)
        h = self.middle[2](self.middle[1](self.middle[0](h, emb)), emb)
        for step in self.outputs:
            h = step(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
