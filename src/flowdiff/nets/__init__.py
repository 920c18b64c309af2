"""Networks ``net(x, t, y=None) -> same shape as x``: an MLP for vectors, UNets for images."""

from flowdiff.nets.mlp import MLP, sinusoidal_embedding
from flowdiff.nets.unet import ADMUNet, CourseUNet

__all__ = ["MLP", "ADMUNet", "CourseUNet", "sinusoidal_embedding"]
