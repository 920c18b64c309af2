"""Callbacks: when to sample, score and plot."""

from flowdiff.callbacks.sampling import DistributionMetrics, SamplePlot, validation_samples

__all__ = ["DistributionMetrics", "SamplePlot", "validation_samples"]
