"""Speed without changed results: compiled sampling gives what eager sampling gives; sampling in the largest batch
that fits gives what one batch gives."""

import pytest
import torch

from flowdiff.guidance import ClassifierFreeGuidance
from flowdiff.model import FlowModel
from flowdiff.nets import MLP
from flowdiff.objectives import Objective
from flowdiff.paths import CondOTSchedule, GaussianPath
from flowdiff.samplers import EulerSampler, HeunSampler


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, device",
    [
        (True, "cpu"),
        ("reduce-overhead", "cpu"),
        pytest.param("reduce-overhead", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU")),
    ],
)
def test_compiled_sampling_equals_eager(mode, device):
    """A tiny class-conditional MLP under CFG (one doubled forward), Euler and Heun: the compiled network's samples
    equal the eager network's to 1e-5 (kernels fuse, so not bit for bit). On a GPU ``reduce-overhead`` replays CUDA
    graphs, whose outputs a later replay overwrites: Heun's first evaluation must survive its second."""
    torch.manual_seed(0)
    net = MLP(dim=2, width=32, depth=2, num_classes=3).to(device)
    path = GaussianPath(CondOTSchedule())
    cfg = ClassifierFreeGuidance(null_label=3, scale=2.0)
    eager = FlowModel(net, path, Objective("velocity"), (2,), guidance=cfg)
    compiled = FlowModel(net, path, Objective("velocity"), (2,), guidance=cfg, compile=mode)
    x0, y = torch.randn(64, 2, device=device), torch.arange(64, device=device) % 3
    for sampler in (EulerSampler(steps=8), HeunSampler(steps=4)):
        a = eager.sample(64, sampler, y=y, x0=x0).x
        b = compiled.sample(64, sampler, y=y, x0=x0).x
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (sampler, (a - b).abs().max())


class _SmallMemory(torch.nn.Module):
    """A model that runs out of memory on batches larger than ``fits`` (what a GPU does), counting its attempts."""

    def __init__(self, model, fits: int) -> None:
        super().__init__()
        self.model, self.fits, self.sizes = model, fits, []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)

    def sample(self, n, **kwargs):
        self.sizes.append(n)
        if n > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model.sample(n, **kwargs)


def test_automatic_batch_halves_after_out_of_memory_and_gives_the_same_images():
    """batch_size=None: a batch that does not fit is drawn again, half as large, until it fits; the images equal
    those of one batch (each image starts from its own noise), progress counts every image once, and the size
    found is kept for the next call."""
    from flowdiff.callbacks.images import sample_images

    torch.manual_seed(0)
    model = FlowModel(MLP(dim=2, width=16, depth=1), GaussianPath(CondOTSchedule()), Objective("velocity"), (2,))
    sampler = EulerSampler(steps=3)
    whole, _ = sample_images(model, 40, None, None, seed=1, batch_size=40, sampler=sampler)
    small = _SmallMemory(model, fits=12)
    told = []
    halved, _ = sample_images(small, 40, None, None, seed=1, batch_size=None, sampler=sampler, advance=told.append)
    assert small.sizes[:4] == [40, 20, 10, 10] and max(small.sizes[2:]) <= 12
    assert torch.allclose(halved, whole, atol=1e-6) and abs(sum(told) - 40) < 1e-9
    small.sizes.clear()
    sample_images(small, 40, None, None, seed=1, batch_size=None, sampler=sampler)
    assert small.sizes[0] == 10  # remembered
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a size the user set is theirs: no retry
        sample_images(_SmallMemory(model, fits=12), 40, None, None, seed=1, batch_size=20, sampler=sampler)
