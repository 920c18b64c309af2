"""Callbacks: when to sample, score and plot (2D plots and W2 for vectors, grids and FID for images)."""

from flowdiff.callbacks.ema import EMA
from flowdiff.callbacks.images import ImageGrid, ImageMetrics
from flowdiff.callbacks.progress_bar import StepProgressBar
from flowdiff.callbacks.sampling import DistributionMetrics, SamplePlot, validation_samples
from flowdiff.callbacks.signals import CheckpointOnSignal
from flowdiff.callbacks.timing import Throughput

__all__ = [
    "EMA",
    "CheckpointOnSignal",
    "DistributionMetrics",
    "ImageGrid",
    "ImageMetrics",
    "SamplePlot",
    "StepProgressBar",
    "Throughput",
    "validation_samples",
]
