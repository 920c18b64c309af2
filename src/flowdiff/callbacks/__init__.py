"""Callbacks: when to sample, score and plot."""

from flowdiff.callbacks.sampling import DistributionMetrics, MetricsFile, SamplePlot, validation_samples

__all__ = ["DistributionMetrics", "MetricsFile", "SamplePlot", "validation_samples"]
