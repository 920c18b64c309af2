"""Data: 2D toys (and their DataModule); images join in later issues."""

from flowdiff.data.toys import TOYS, Toy, build_toy

__all__ = ["TOYS", "Toy", "build_toy"]
