"""A small image classifier: the feature extractor of "classifier FID" and the judge of class-conditional samples.

Inception features suit natural photographs; for MNIST-like data, and for any labelled data when Inception's
weights are not on the machine, a classifier trained on the data itself is the usual offline substitute (its
penultimate layer gives the features, its predictions the accuracy of class-conditional samples). It is trained
once per dataset and preparation (files, size, padding, channels) and cached:

    python -m flowdiff.metrics.classifier --dataset mnist --root ../shared/data/mnist-5k --image-size 32

prints its accuracy on the held-out split; the image-metrics callback and ``sample.py`` train it on first
use when the cache file is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdiff.progress import progress

CACHE = Path("~/.cache/flowdiff/classifiers").expanduser()


class DigitClassifier(nn.Module):
    """Three conv blocks (BatchNorm, ReLU), average pooling to 4 x 4, a 128-d feature layer, a linear head."""

    num_features = 128

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, 32),
            *block(32, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            *block(64, 64),
            nn.MaxPool2d(2),
            *block(64, 128),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(128 * 16, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)
        self.accuracy: float | None = None  # on the held-out split, set by train_classifier

    def features(self, x: Tensor) -> Tensor:  # (B, C, H, W) in [-1, 1] -> (B, 128)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 500) -> Tensor:
        was = self.training
        self.eval()
        device = next(self.parameters()).device
        out = torch.cat([self(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
        self.train(was)
        return out


def _jitter(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random rotations (up to 10 degrees), scalings (0.9-1.1) and shifts (up to 2 pixels) of a batch."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(b, generator=generator)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * 2 / x.shape[-1])
    angle, scale, shift = angle.to(x.device), scale.to(x.device), shift.to(x.device)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # pad with black (-1)


def train_classifier(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int = 10,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    verbose: bool = True,
    device: str | torch.device | None = None,
) -> DigitClassifier:
    """Fit on ``train = (images in [-1, 1], labels)`` with light affine jitter; ``model.accuracy`` on ``test``.

    Runs on ``device`` (default: CUDA when available); the returned model is on the CPU.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = train[0].to(device), train[1].to(device)
    model = DigitClassifier(x.shape[1], num_classes).to(device)
    steps = epochs * math.ceil(len(x) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    model.train()
    what = f"classifier: {epochs} epochs on {len(x)} images"
    with progress(what, steps, enabled=verbose, unit="steps") as advance:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size].to(device)
                loss = F.cross_entropy(model(_jitter(x[idx], g)), y[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                advance(1)
    model = model.cpu().eval()
    model.accuracy = float((model.predict(test[0]) == test[1]).float().mean())
    if verbose:
        print(
            f"classifier: test accuracy {model.accuracy:.4f} on {len(test[1])} held-out images "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return model


#: part of every cache key: a change to the classifier or its training makes the old files stale
CLASSIFIER_VERSION = 2


def cache_path(datamodule) -> Path:
    """Where the classifier for this data is cached: keyed by everything that changes its input (the dataset's
    files, split, size, padding and channels: :meth:`ImageDataModule.fingerprint`) and the classifier's version."""
    key = f"v{CLASSIFIER_VERSION}|{datamodule.fingerprint()}|{tuple(datamodule.data_shape)}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    c, h, w = datamodule.data_shape
    return CACHE / f"{datamodule.name}-{c}x{h}x{w}-{digest}.pt"


def save_classifier(model: DigitClassifier, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # DDP ranks may write at once
    torch.save(
        {
            "state_dict": model.state_dict(),
            "in_channels": model.body[0].in_channels,
            "num_classes": model.head.out_features,
            "accuracy": model.accuracy,
        },
        tmp,
    )
    tmp.replace(path)  # atomic: a crash never leaves half a file


def load_classifier(path: str | Path) -> DigitClassifier:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = DigitClassifier(state["in_channels"], state["num_classes"])
    model.load_state_dict(state["state_dict"])
    model.accuracy = state.get("accuracy")
    return model.eval()


def load_or_train_classifier(datamodule, path: str | Path | None = None, **train_kwargs) -> DigitClassifier:
    """The cached classifier for ``datamodule``'s data (trained on its training split first if missing)."""
    path = Path(path).expanduser() if path else cache_path(datamodule)
    if path.is_file():
        return load_classifier(path)
    if not getattr(datamodule, "dataset_classes", 0):
        raise ValueError("a classifier feature extractor needs labelled data: use features=inception")
    print(f"training the {datamodule.name} classifier once (cached at {path})", flush=True)
    train = datamodule.real_images(10**9, "train")
    test = datamodule.real_images(10**9, "val")
    model = train_classifier(train, test, num_classes=datamodule.dataset_classes, **train_kwargs)
    save_classifier(model, path)
    return model


def main(argv: list[str] | None = None) -> None:
    from flowdiff.data.images import ImageDataModule

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--root", default="../shared/data/mnist-5k")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--pad", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default=None, help="where to save it (default: the cache)")
    args = parser.parse_args(argv)
    dm = ImageDataModule(args.dataset, args.root, image_size=args.image_size, pad=args.pad, num_workers=0)
    path = Path(args.out) if args.out else cache_path(dm)
    if path.is_file():
        path.unlink()
    model = load_or_train_classifier(dm, path, epochs=args.epochs)
    print(f"saved {path} (test accuracy {model.accuracy:.4f})")


if __name__ == "__main__":
    main()
