"""CUDA: math and module on the GPU agree with the CPU; training and sampling run there (skipped without CUDA)."""

import pytest
import torch

from flowdiff.build import build_run
from flowdiff.paths import CosineSchedule, GaussianPath
from flowdiff.runs import train
from helpers import FAST, OBJECTIVE_FILES, SAMPLER_FILES, compose_cfg, objective_of, sampler_from_conf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("sampler", list(SAMPLER_FILES))
@pytest.mark.parametrize("objective", list(OBJECTIVE_FILES))
def test_samplers_on_cuda_match_cpu(sampler, objective):
    path, obj = GaussianPath(CosineSchedule()), objective_of(objective)
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def velocity(x, t):  # a smooth analytic prediction, converted through the path
        pred = torch.tanh(x - mu.to(x.device)) * t[:, None]
        return obj.to_velocity(path, pred, x, t)

    def score(x, t):
        return obj.to_score(path, torch.tanh(x - mu.to(x.device)) * t[:, None], x, t)

    x0 = torch.randn(256, 2, dtype=torch.float64)
    smp = sampler_from_conf(sampler, path=path, steps=20)
    span = obj.sample_time_range(path, stochastic=smp.stochastic)
    if smp.stochastic:
        pytest.skip("noise streams differ between devices")
    cpu = smp.sample(velocity, x0, score_fn=score, t_span=span)
    gpu = smp.sample(velocity, x0.cuda(), score_fn=score, t_span=span)
    torch.testing.assert_close(gpu.x.cpu(), cpu.x, rtol=1e-9, atol=1e-9)
    assert gpu.nfe == cpu.nfe


def test_module_trains_and_samples_on_cuda(tmp_path):
    cfg = compose_cfg(["trainer=gpu", "guidance=cfg", "coupling=ot", *FAST], tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/w2"]))
    module = build_run(cfg)[0].cuda()
    y = torch.zeros(64, dtype=torch.long)
    a = module.sample(64, y=y, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    b = module.sample(64, y=y, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert a.x.is_cuda and torch.equal(a.x, b.x)
    em = sampler_from_conf("euler_maruyama", path=module.path, steps=10)
    c = module.sample(64, sampler=em, generator=torch.Generator().manual_seed(1))
    d = module.sample(64, sampler=em, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c.x, d.x) and torch.isfinite(c.x).all()


def test_image_run_in_bf16_channels_last_on_cuda(tmp_path):
    """A CFG UNet on MNIST files: bf16-mixed, channels-last, grids and classifier FID, all on the GPU."""
    from helpers import TINY_IMAGES, TINY_UNET, tiny_classifier, tiny_mnist

    tiny_mnist(tmp_path / "data")
    clf = tiny_classifier(tmp_path / "clf.pt")
    cfg = compose_cfg(
        [
            "trainer=gpu",
            "trainer.precision=bf16-mixed",
            "channels_last=true",
            "data=mnist",
            f"data.root={tmp_path / 'data'}",
            "guidance=cfg",
            *TINY_UNET,
            *TINY_IMAGES,
            f"callbacks.image_metrics.classifier_path={clf}",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"])) and metrics["val/fid"] > 0
    module = build_run(cfg)[0].cuda().eval()
    assert module.autocast_dtype == torch.bfloat16 and module.channels_last
    out = module.sample(8, y=torch.arange(8), guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert out.x.dtype == torch.float32 and out.x.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out.x).all()


def test_adm_unet_bf16_channels_last_agrees_with_fp32_on_cuda():
    from flowdiff.nets import ADMUNet

    torch.manual_seed(0)
    net = ADMUNet(channels=64, num_classes=10).cuda().eval()
    for p in net.parameters():
        p.data.normal_(0, 0.02)
    x, t, y = (
        torch.randn(16, 3, 32, 32, device="cuda"),
        torch.rand(16, device="cuda"),
        torch.arange(16, device="cuda") % 11,
    )
    with torch.no_grad():
        ref = net(x, t, y)
        net_cl = net.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = net_cl(x.contiguous(memory_format=torch.channels_last), t, y).float()
    rel = (fast - ref).norm() / ref.norm()
    assert rel < 3e-2, rel
