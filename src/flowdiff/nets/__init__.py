"""Networks ``net(x, t, y=None) -> same shape as x``."""

from flowdiff.nets.mlp import MLP, sinusoidal_embedding

__all__ = ["MLP", "sinusoidal_embedding"]
