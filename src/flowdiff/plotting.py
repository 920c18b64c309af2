"""Figures of 2D models: samples over data, trajectories, and the learned velocity field at several times."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def plot_samples_2d(
    samples: Tensor,
    data: Tensor,
    trajectories: Tensor | None = None,
    velocity_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    quiver_times: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    title: str = "",
) -> plt.Figure:
    """One row: samples over data (with trajectories ``(T+1, k, 2)``), then a quiver of ``velocity_fn`` per time."""
    samples, data = samples.detach().cpu()[:, :2], data.detach().cpu()[:, :2]
    n_quiver = len(quiver_times) if velocity_fn is not None else 0
    fig, axes = plt.subplots(1, 1 + n_quiver, figsize=(4.2 * (1 + n_quiver), 4.2), squeeze=False)
    ax = axes[0, 0]
    lo = torch.minimum(samples.quantile(0.005, 0), data.quantile(0.005, 0)) - 0.5
    hi = torch.maximum(samples.quantile(0.995, 0), data.quantile(0.995, 0)) + 0.5
    ax.scatter(data[:, 0], data[:, 1], s=2, alpha=0.3, c="tab:gray", label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, c="tab:blue", label="samples")
    if trajectories is not None:
        traj = trajectories.detach().cpu()[..., :2]
        for k in range(traj.shape[1]):
            ax.plot(traj[:, k, 0], traj[:, k, 1], lw=0.6, alpha=0.7, c="tab:orange")
        ax.scatter(traj[0, :, 0], traj[0, :, 1], s=6, c="black", zorder=3, label="start")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    ax.set_title(title or "samples over data")
    if velocity_fn is not None:
        gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 21), torch.linspace(lo[1], hi[1], 21), indexing="xy")
        grid = torch.stack([gx.flatten(), gy.flatten()], 1)
        for ax, t in zip(axes[0, 1:], quiver_times):
            with torch.no_grad():
                v = velocity_fn(grid, torch.full((grid.shape[0],), float(t))).cpu()
            speed = v.norm(dim=1)
            ax.quiver(grid[:, 0], grid[:, 1], v[:, 0], v[:, 1], speed, cmap="viridis", angles="xy")
            ax.set_title(f"velocity at t = {t:g}")
            ax.set_aspect("equal")
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
    fig.tight_layout()
    return fig
