"""The fused EMA update equals torch's EMA average (parameters and BatchNorm buffers) step for step."""

import copy

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

from flowdiff.callbacks import EMA
from flowdiff.nets import CourseUNet


class _Trainer:
    def __init__(self):
        self.global_step = 0


def test_fused_update_matches_torch_ema_with_buffers():
    torch.manual_seed(0)
    net = CourseUNet(
        data_shape=(1, 8, 8), channels=(4, 8), num_residual_layers=1, t_embed_dim=4, y_embed_dim=4, num_classes=3
    )
    reference = AveragedModel(copy.deepcopy(net), avg_fn=get_ema_avg_fn(0.9), use_buffers=True)
    ema = EMA(decay=0.9)
    ema._average_model = AveragedModel(copy.deepcopy(net), use_buffers=True)
    trainer = _Trainer()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(5):
        net.train()
        net(torch.randn(6, 1, 8, 8), torch.rand(6), torch.randint(0, 4, (6,))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        trainer.global_step = step + 1
        ema.on_train_batch_end(trainer, net, None, None, step)
        reference.update_parameters(net)
    got = dict(ema._average_model.module.state_dict())
    for name, want in reference.module.state_dict().items():
        if name.endswith("num_batches_tracked"):  # an integer counter: torch averages and truncates it, we copy it
            assert got[name] == net.state_dict()[name] == 5
            continue
        torch.testing.assert_close(got[name], want, msg=name)
    assert int(ema._average_model.n_averaged) == int(reference.n_averaged) == 5
    assert not torch.equal(got["init_conv.1.running_mean"], net.state_dict()["init_conv.1.running_mean"])


def test_a_resumed_average_is_not_overwritten():
    net = torch.nn.Linear(2, 2)
    ema = EMA(decay=0.5)
    ema._average_model = AveragedModel(copy.deepcopy(net), use_buffers=True)
    with torch.no_grad():
        ema._average_model.module.weight.fill_(1.0)
        net.weight.fill_(3.0)
    ema._average_model.n_averaged.fill_(10)  # as loaded from a checkpoint
    trainer = _Trainer()
    trainer.global_step = 11
    ema.on_train_batch_end(trainer, net, None, None, 0)
    assert torch.allclose(ema._average_model.module.weight, torch.full((2, 2), 2.0))  # lerp, not a copy
