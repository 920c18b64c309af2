"""torch.compile'd sampling gives what eager sampling gives."""

import pytest
import torch

from flowdiff.guidance import ClassifierFreeGuidance
from flowdiff.model import FlowModel
from flowdiff.nets import MLP
from flowdiff.objectives import Objective
from flowdiff.paths import CondOTSchedule, GaussianPath
from flowdiff.samplers import EulerSampler, HeunSampler


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_compiled_sampling_equals_eager(mode):
    """A tiny class-conditional MLP under CFG (one doubled forward), Euler and Heun: the compiled network's samples
    equal the eager network's to 1e-5 (kernels fuse, so not bit for bit). ``reduce-overhead`` (CUDA graphs on a
    GPU; on the CPU the same compiled code) keeps Heun's first evaluation valid across its second."""
    torch.manual_seed(0)
    net = MLP(dim=2, width=32, depth=2, num_classes=3)
    path = GaussianPath(CondOTSchedule())
    cfg = ClassifierFreeGuidance(null_label=3, scale=2.0)
    eager = FlowModel(net, path, Objective("velocity"), (2,), guidance=cfg)
    compiled = FlowModel(net, path, Objective("velocity"), (2,), guidance=cfg, compile=mode)
    x0, y = torch.randn(64, 2), torch.arange(64) % 3
    for sampler in (EulerSampler(steps=8), HeunSampler(steps=4)):
        a = eager.sample(64, sampler, y=y, x0=x0).x
        b = compiled.sample(64, sampler, y=y, x0=x0).x
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (sampler, (a - b).abs().max())
