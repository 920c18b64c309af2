"""Distances between point clouds: exact 2-Wasserstein (POT) and the kernel MMD.

``w2`` is sqrt(``ot.emd2(unif, unif, M)``) with the squared Euclidean cost ``M``, the
protocol of Tong et al. (TorchCFM) and [SF]2M. Every W2 is reported beside its finite-sample
floor: W2 between two independent samples of the *same* distribution (the validation and test
sets), the best any model can score at that sample count.
"""

from __future__ import annotations

import numpy as np
import ot
import torch
from torch import Tensor


def w2(x: Tensor, y: Tensor, num_iter_max: int = 10_000_000) -> float:
    """Exact ``W2(x, y)`` between empirical measures of ``x`` ``(n, d)`` and ``y`` ``(m, d)``."""
    xd, yd = x.detach().flatten(1).double().cpu(), y.detach().flatten(1).double().cpu()
    cost = torch.cdist(xd, yd).pow(2).numpy()
    a, b = np.full(len(xd), 1.0 / len(xd)), np.full(len(yd), 1.0 / len(yd))
    return float(np.sqrt(ot.emd2(a, b, cost, numItermax=num_iter_max)))


def mmd(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0, 5.0)) -> float:
    """Unbiased squared MMD with a sum of Gaussian kernels ``exp(-||a - b||^2 / (2 h^2))``."""
    x, y = x.detach().flatten(1).double(), y.detach().flatten(1).double()
    n, m = len(x), len(y)

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h**2)) for h in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())
