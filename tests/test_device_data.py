"""Image training sets held on the device: the same batches as the DataLoader for the same seed, and runs that
resume bit for bit on either path."""

import numpy as np
import pytest
import torch

from flowdiff.data.formats import write_cifar10
from flowdiff.data.images import ImageDataModule
from flowdiff.runs import fit
from helpers import TINY_IMAGES, TINY_UNET, compose_cfg, tiny_mnist


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(3)
    write_cifar10(root, rng.integers(0, 256, (4, 32, 32, 3)), np.arange(4) % 10)  # 5 x 4 = 20 training images
    return root


def _batches(loader, k):
    it = iter(loader)
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("workers", [0, 1])
def test_device_batches_equal_loader_batches(cifar, workers):
    """Seven batches of 6 from 20 images (passes over the data end inside batches) with random flips: the images,
    the flips and the labels gathered from the uint8 copy equal, bit for bit, those read through the DataLoader
    (with a worker process or without); and batch k is the same however many came before it (a resume)."""
    kw = dict(verify_md5=False, batch_size=6, steps_per_epoch=7, hflip=True, seed=5)
    loader = ImageDataModule("cifar10", str(cifar), num_workers=workers, on_device=False, **kw)
    device = ImageDataModule("cifar10", str(cifar), num_workers=0, on_device=True, **kw)
    a, b = _batches(loader.train_dataloader(), 7), _batches(device.train_dataloader(), 7)
    assert device.on_device_used == torch.device("cpu") and loader.on_device_used is None
    for x, y in zip(a, b):
        assert torch.equal(x["x1"], y["x1"]) and torch.equal(x["y"], y["y"])
    seen = torch.cat([x["x1"] for x in a])
    real = loader.real_images(100, "train")[0]
    mirrored = [any(torch.equal(im.flip(-1), r) for r in real) for im in seen]
    assert 0 < sum(mirrored) < len(seen)  # flips happen, not always
    # a resumed datamodule starts at the batch it stopped at
    resumed = ImageDataModule("cifar10", str(cifar), num_workers=0, on_device=True, **kw)
    resumed.load_state_dict({"batches_trained": 4})
    later = _batches(resumed.train_dataloader(), 3)
    for x, y in zip(a[4:], later):
        assert torch.equal(x["x1"], y["x1"])


def test_ddp_ranks_share_each_batch_alike_on_both_paths(cifar):
    """Under DDP (2 ranks) rank r's batch k is the r-th of every 2 positions of the global batch k, read through the
    DataLoader (whose sampler Lightning leaves alone: it is a DistributedSampler) or gathered on the device; the
    two ranks' batches together are the global batch."""
    from torch.utils.data import DistributedSampler

    from flowdiff.data.images import _DeviceBatches, _Flippable, _OrderSampler

    kw = dict(verify_md5=False, batch_size=3, steps_per_epoch=4, hflip=True, seed=2, num_workers=0)
    dm = ImageDataModule("cifar10", str(cifar), on_device=False, **kw)
    dm.setup()
    images = torch.stack([dm._train[i][0] for i in range(len(dm._train))])
    u8 = ((images + 1) / 2 * 255).round().to(torch.uint8)
    shares = []
    for rank in (0, 1):
        sampler = _OrderSampler(dm, rank, 2)
        assert isinstance(sampler, DistributedSampler)
        dm.batches_drawn = 0
        loader = _batches(dm._loader(_Flippable(dm._train), sampler), 4)
        dm.batches_drawn = 0
        device = _batches(_DeviceBatches(dm, u8, None, rank, 2), 4)
        for a, b in zip(loader, device):
            assert torch.equal(a["x1"], b["x1"])
        shares.append(loader)
    for k in range(4):
        glob = dm.order.indices(k, 6)
        x = torch.stack([shares[0][k]["x1"][0], shares[1][k]["x1"][0]])  # positions 0 and 1 of global batch k
        flips = dm.order.flips(k, 6)
        expect = torch.stack([images[glob[i]].flip(-1) if flips[i] else images[glob[i]] for i in (0, 1)])
        assert torch.equal(x, expect)


def test_each_pass_shows_every_image_once(cifar):
    dm = ImageDataModule("cifar10", str(cifar), verify_md5=False, batch_size=5, num_workers=0, on_device=True)
    dm.setup()
    idx = torch.cat([dm.order.indices(k, 5) for k in range(8)])  # two passes over 20 images
    assert sorted(idx[:20].tolist()) == list(range(20)) == sorted(idx[20:].tolist())
    assert not torch.equal(idx[:20], idx[20:])  # each pass in its own order


# the device path gives the loader's batches (above), so its resume is the loader's: `make test-all` runs it
@pytest.mark.parametrize("on_device, workers", [pytest.param(True, 0, marks=pytest.mark.slow), (False, 1)])
def test_image_runs_resume_bit_for_bit(tmp_path, on_device, workers):
    """7 steps straight equal 4 steps, a stop, and 3 more: resumed mid-epoch (3 batches an epoch) and carried over
    the next epoch's start, where a loader worker had read past the end: the weights and the datamodule's
    position, with the training set on the device and through a DataLoader with a worker process."""
    tiny_mnist(tmp_path / "data", n_train=40, n_test=16)
    base = [
        "data=mnist",
        f"data.root={tmp_path / 'data'}",
        f"data.on_device={on_device}",
        *TINY_UNET,
        *TINY_IMAGES,
        "data.steps_per_epoch=3",
        "callbacks.grid=null",
        "callbacks.image_metrics=null",
        "callbacks.checkpoint=null",
        "trainer.check_val_every_n_epoch=100",
        f"data.num_workers={workers}",
        "data.persistent_workers=false",
    ]
    straight = fit(compose_cfg([*base, "trainer.max_steps=7"], tmp_path / "a"))
    periodic = ["callbacks.last_checkpoint.every_n_train_steps=4", "trainer.max_steps=5"]
    fit(compose_cfg([*base, *periodic], tmp_path / "b"))
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    resumed = fit(compose_cfg([*base, "trainer.max_steps=7", f"ckpt_path={last}"], tmp_path / "c"))
    assert resumed[1].batches_trained == straight[1].batches_trained == 7
    assert (resumed[1].on_device_used is not None) == on_device
    a, b = straight[0].state_dict(), resumed[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
