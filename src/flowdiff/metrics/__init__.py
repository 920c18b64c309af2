"""Sample-quality metrics: W2 / MMD for vectors."""

from flowdiff.metrics.distances import mmd, w2

__all__ = ["mmd", "w2"]
