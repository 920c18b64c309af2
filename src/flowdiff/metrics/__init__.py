"""Sample-quality metrics: W2 / MMD for vectors."""

from flowdiff.metrics.distances import mmd, w2, w2_floor

__all__ = ["mmd", "w2", "w2_floor"]
