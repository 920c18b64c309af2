"""Networks ``net(x, t, y=None) -> same shape as x``: an MLP for vectors, UNets for images, action-chunk networks for
policies (``y`` their context)."""

from flowdiff.nets.mlp import MLP, sinusoidal_embedding
from flowdiff.nets.policy import PolicyMLP, PolicyUNet1D
from flowdiff.nets.unet import ADMUNet, CourseUNet

__all__ = ["MLP", "ADMUNet", "CourseUNet", "PolicyMLP", "PolicyUNet1D", "sinusoidal_embedding"]
