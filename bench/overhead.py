"""Framework overhead: train.py's Lightning path against a raw PyTorch loop, sampling against bare
forwards, CFG as one doubled forward against two, and the cost of minibatch OT.

Each ratio is measured within one run, as a median over repeats, interleaving the two sides.
Written for any ``net(x, t, y)`` and data shape, so the image UNet can join.

    python bench/overhead.py                      # CPU
    python bench/overhead.py --device cuda        # and --compile for torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from common import QUIET, compose, markdown_table, median_ms, save_json

from flowdiff.build import build_datamodule, build_loggers, build_model, build_run
from flowdiff.couplings import MinibatchOTCoupling
from flowdiff.nets import MLP


class StepTimer(L.Callback):
    """Wall time of the training steps after ``skip`` warm-up steps."""

    def __init__(self, skip: int, sync) -> None:
        self.skip, self.sync = skip, sync
        self.start = self.seconds = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.skip:
            self.sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.sync()
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step - self.skip


def lightning_steps_per_s(steps: int, skip: int, device: str, compile_: bool, tmp: str) -> float:
    """train.py's path: FlowModule, Lightning Trainer, CSV logging every 50 steps, fresh toy batches."""
    trainer_group = "gpu" if device == "cuda" else "cpu"
    cfg = compose(
        [
            "data=moons",
            f"trainer={trainer_group}",
            f"trainer.max_steps={steps}",
            f"data.steps_per_epoch={steps}",
            f"compile={str(compile_).lower()}",
            *QUIET,
            "logger=csv",
            "trainer.log_every_n_steps=50",
        ],
        tmp,
    )
    L.seed_everything(0, verbose=False)
    module, dm = build_run(cfg)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timer = StepTimer(skip, sync)
    from hydra.utils import instantiate

    trainer = instantiate(cfg.trainer, callbacks=[timer], logger=build_loggers(cfg), enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return timer.steps / timer.seconds


def raw_steps_per_s(steps: int, skip: int, device: str, compile_: bool) -> float:
    """The same math by hand: CondOT path, velocity target, MSE, AdamW; same data module and batch size."""
    cfg = compose(["data=moons", f"data.steps_per_epoch={steps}"])
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg)
    net = MLP(dim=2, width=64, depth=3, activation="selu").to(device)
    fwd = torch.compile(net) if compile_ else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    batches = iter(dm.train_dataloader())
    start = None
    for step in range(steps):
        if step == skip:
            sync()
            start = time.perf_counter()
        z = next(batches)["x1"].to(device, non_blocking=True)
        x0 = torch.randn_like(z)
        t = torch.rand(z.shape[0], device=device)
        xt = t[:, None] * z + (1 - t[:, None]) * x0
        loss = (fwd(xt, t) - (z - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return (steps - skip) / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-sample", type=int, default=10000)
    p.add_argument("--tmp", default="/tmp/flowdiff-bench-overhead")
    args = p.parse_args(argv)
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    skip = min(200, args.steps // 5)

    # 1. training throughput, interleaved repeats
    lit, raw = [], []
    for _ in range(args.repeats):
        lit.append(lightning_steps_per_s(args.steps, skip, dev, args.compile, args.tmp))
        raw.append(raw_steps_per_s(args.steps, skip, dev, args.compile))
    lit_m, raw_m = statistics.median(lit), statistics.median(raw)

    # 2. sampling against NFE x one bare forward
    cfg = compose(
        ["data=moons", "sampler=euler", "sampler.steps=100", f"compile={str(args.compile).lower()}"], args.tmp
    )
    module = build_model(cfg, build_datamodule(cfg)).to(dev).eval()
    n = args.n_sample
    x = torch.randn(n, 2, device=dev)
    t = torch.rand(n, device=dev)

    def bare():
        with torch.no_grad():
            for _ in range(100):
                module.net(x, t)

    sample_ms = median_ms(lambda: module.sample(n), sync=sync)
    bare_ms = median_ms(bare, sync=sync)

    # 3. CFG: one doubled forward against two forwards
    cfg_c = compose(["data=8gaussians", "guidance=cfg", f"compile={str(args.compile).lower()}"], args.tmp)
    cmod = build_model(cfg_c, build_datamodule(cfg_c)).to(dev).eval()
    y = torch.randint(0, 8, (n,), device=dev)
    null = torch.full_like(y, 8)

    def doubled():
        with torch.no_grad():
            cmod.prediction(x, t, y, guidance_scale=3.0)

    def twice():
        with torch.no_grad():
            u0, u1 = cmod.net(x, t, null), cmod.net(x, t, y)
            return u0 + 3.0 * (u1 - u0)

    doubled_ms = median_ms(doubled, inner=20, sync=sync)
    twice_ms = median_ms(twice, inner=20, sync=sync)

    # 4. minibatch OT at batch 256: ours (assignment solver) against torchcfm's plan + draws, against an I-CFM step
    a, b = torch.randn(256, 2), torch.randn(256, 2) * 2 + 1
    ours_ot = median_ms(lambda: MinibatchOTCoupling("exact")(a, b), inner=10)
    rows_ot = [["flowdiff MinibatchOTCoupling(exact)", f"{ours_ot:.2f}"]]
    try:
        from torchcfm.optimal_transport import OTPlanSampler

        sampler = OTPlanSampler(method="exact")
        theirs = median_ms(lambda: sampler.sample_plan(a, b), inner=10)
        rows_ot.append(["torchcfm OTPlanSampler(exact).sample_plan", f"{theirs:.2f}"])
    except ImportError:
        theirs = None
    icfm_step_ms = 1000 / raw_m
    rows_ot.append(["one I-CFM training step (raw loop, for scale)", f"{icfm_step_ms:.2f}"])

    results = {
        "device": dev,
        "compile": args.compile,
        "steps": args.steps,
        "repeats": args.repeats,
        "lightning_steps_per_s": lit,
        "raw_steps_per_s": raw,
        "train_ratio": lit_m / raw_m,
        "sample_ms": sample_ms,
        "bare_100_forwards_ms": bare_ms,
        "sample_ratio": sample_ms / bare_ms,
        "cfg_doubled_ms": doubled_ms,
        "cfg_two_forwards_ms": twice_ms,
        "ot_ours_ms": ours_ot,
        "ot_torchcfm_ms": theirs,
        "icfm_step_ms": icfm_step_ms,
    }
    tag = f"{dev}{'_compile' if args.compile else ''}"
    save_json(f"overhead_{tag}", results)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (2 cores)"
    rows = [
        ["training steps/s, train.py path (Lightning, CSV logging)", f"{lit_m:.0f}", ""],
        ["training steps/s, raw PyTorch loop", f"{raw_m:.0f}", ""],
        ["ratio Lightning / raw (target >= 0.95)", f"{lit_m / raw_m:.3f}", ""],
        [f"sampling {n} points, Euler 100 steps (ms)", f"{sample_ms:.1f}", ""],
        ["100 bare forwards (ms)", f"{bare_ms:.1f}", ""],
        ["ratio sampling / bare (target <= 1.05)", f"{sample_ms / bare_ms:.3f}", ""],
        ["CFG one doubled forward (ms)", f"{doubled_ms:.3f}", ""],
        ["CFG two forwards (ms)", f"{twice_ms:.3f}", ""],
    ]
    out = f"**{name}, compile={args.compile}**, MLP 3 x 64, batch 256 (training), medians of {args.repeats} repeats\n\n"
    out += markdown_table(["quantity", "value", ""], rows)
    out += "\n\n" + markdown_table(["minibatch OT at batch 256", "ms per call"], rows_ot)
    return out


if __name__ == "__main__":
    print(main())
