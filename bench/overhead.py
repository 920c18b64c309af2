"""Framework overhead: train.py's Lightning path against a raw PyTorch loop, sampling against bare
forwards, CFG as one doubled forward against two, and the cost of minibatch OT.

Each ratio is measured within one run, as a median over repeats, interleaving the two sides.
Written for any ``net(x, t, y)`` and data shape, so the image UNet can join.

    python bench/overhead.py                      # CPU
    python bench/overhead.py --device cuda        # and --compile for torch.compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning as L
import torch
from common import ROOT, compose, markdown_table, median_ms, save_json
from hydra.utils import instantiate

from flowdiff.build import build_datamodule, build_model
from flowdiff.couplings import MinibatchOTCoupling

# the two training workloads: what train.py runs by default, and lab 3's UNet (CPU: batch 64 at 28 x 28)
WORKLOADS = {
    "mlp": {"cpu": [], "cuda": ["trainer=gpu"]},
    "unet": {
        "cpu": ["experiment=lab3_mnist_cpu", f"data.root={ROOT.parent / 'shared' / 'data' / 'mnist-5k'}"],
        "cuda": ["experiment=lab3_mnist", "trainer=gpu", f"data.root={ROOT.parent / 'shared' / 'data' / 'mnist-5k'}"],
    },
}
# image evaluation (FID, grids) runs after the timed steps and is not what is measured: off for the UNet's runs
NO_IMAGE_EVAL = ["callbacks.image_metrics=null", "callbacks.grid=null"]


def workload_overrides(name: str, device: str, steps: int, skip: int, mnist: str | None = None) -> list[str]:
    over = list(WORKLOADS[name][device])
    if mnist:
        over = [o if not o.startswith("data.root=") else f"data.root={mnist}" for o in over]
    over += [f"trainer.max_steps={steps}", f"data.steps_per_epoch={steps + 10}", f"callbacks.throughput.skip={skip}"]
    return over + (NO_IMAGE_EVAL if name == "unet" else [])


class Segments(L.Callback):
    """Wall time between Lightning's hooks in each training step after ``skip``: the step's breakdown. On a GPU each
    hook synchronises, so the segments add up to more than an unsynchronised step."""

    NAMES = {
        "on_train_batch_start": "after the last step: batch end hooks, data, loop (then fetch + transfer)",
        "on_before_zero_grad": "optimizer_step wrappers + training_step (loss, forward)",
        "on_before_backward": "zero_grad",
        "on_after_backward": "backward",
        "on_before_optimizer_step": "after backward: Lightning's hooks",
        "on_train_batch_end": "gradient clipping (if set), optimizer math, Lightning's step bookkeeping",
    }

    def __init__(self, skip: int, sync) -> None:
        self.skip, self.sync, self.t, self.steps, self.last = skip, sync, {}, 0, None
        for hook in self.NAMES:
            setattr(self, hook, self._marker(hook))

    def _marker(self, hook):
        def mark(trainer, *args, **kwargs):
            self.sync()
            now = time.perf_counter()
            if self.last is not None and trainer.global_step >= self.skip:
                self.t[hook] = self.t.get(hook, 0.0) + now - self.last
                self.steps += hook == "on_train_batch_start"
            self.last = now

        return mark

    def ms(self) -> dict[str, float]:
        order = ["on_train_batch_start", *[k for k in self.NAMES if k != "on_train_batch_start"]]
        return {self.NAMES[k]: 1000 * self.t[k] / max(self.steps, 1) for k in order if k in self.t}


def default_run_ms(overrides: list[str], extra_callbacks=()) -> float:
    """ms per training step of ``train.py <overrides>`` as a user starts it (default callbacks and CSV logger),
    from its own ``throughput:`` measurement (validation excluded)."""
    import contextlib
    import io

    import flowdiff.runs as runs

    cfg = compose(overrides)
    build = runs.build_callbacks
    runs.build_callbacks = lambda *a, **k: [*extra_callbacks, *build(*a, **k)]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            metrics = runs.train(cfg)
    finally:
        runs.build_callbacks = build
    return metrics["perf/ms_per_step"]


def raw_loop_ms(overrides: list[str], steps: int, skip: int, device: str) -> float:
    """The same work by hand: the same network, data loader, batch, optimizer and EMA decay as the run; the CondOT
    velocity loss written out (with CFG's label drop where the run has it); EMA by one fused lerp."""
    cfg = compose(overrides)
    L.seed_everything(0, verbose=False)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm)
    net = model.net.to(device).train()
    ema = copy.deepcopy(net)
    avg, cur = list(ema.parameters()), list(net.parameters())
    decay = float(cfg.callbacks.ema.decay)
    opt = instantiate(cfg.optimizer)(list(net.parameters()))
    cfg_drop = model.guidance
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if hasattr(dm, "_place_on_device"):  # images: the same data path as train.py on this device
        dm.setup()
        on_device = dm._place_on_device(torch.device(device))
        batches = iter(dm._device_batches(0, 1, torch.device(device)) if on_device else dm.train_dataloader())
    else:
        batches = iter(dm.train_dataloader())
    start = None
    for step in range(steps):
        if step == skip:
            sync()
            start = time.perf_counter()
        batch = next(batches)
        z = batch["x1"].to(device, non_blocking=True)
        x0 = torch.randn_like(z)
        t = torch.rand(z.shape[0], device=device)
        tb = t.view(-1, *[1] * (z.dim() - 1))
        xt = tb * z + (1 - tb) * x0
        if cfg_drop is not None:
            y = batch["y"].to(device, non_blocking=True)
            y = torch.where(torch.rand(y.shape, device=device) < cfg_drop.p_uncond, cfg_drop.null_label, y)
            pred = net(xt, t, y)
        else:
            pred = net(xt, t)
        loss = (pred - (z - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(avg, cur, 1.0 - decay)
    sync()
    return 1000 * (time.perf_counter() - start) / (steps - skip)


def training_rows(
    name: str, device: str, steps: int, skip: int, repeats: int, mnist: str | None, ablate: bool = True
) -> dict:
    """Interleaved repeats of the default run and the raw loop; the default run's step broken down by hooks, and
    (``ablate``) by removing one callback or the logger at a time."""
    over = workload_overrides(name, device, steps, skip, mnist)
    lit, raw = [], []
    for _ in range(repeats):
        lit.append(default_run_ms(over))
        raw.append(raw_loop_ms(over, steps, skip, device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seg = Segments(skip, sync)
    default_run_ms(over, [seg])
    without = {
        "progress bar": ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false"],
        "EMA": ["callbacks.ema=null"],
        "CSV logger": ["logger=[]"],
        "checkpoint callbacks (3)": [f"callbacks.{c}=null" for c in ("checkpoint", "last_checkpoint", "on_signal")],
    }
    ablations = {}
    for what, extra in without.items() if ablate else ():
        ablations[what] = statistics.median(default_run_ms(over + extra) for _ in range(max(1, repeats)))
    return {
        "default_ms": lit,
        "raw_ms": raw,
        "ratio": statistics.median(raw) / statistics.median(lit),
        "segments_ms": seg.ms(),
        "without_ms": ablations,
    }


def paired_ms(fa, fb, repeats: int = 7, sync=lambda: None) -> tuple[float, float]:
    """Medians of ``fa`` and ``fb`` timed alternately (after a warm-up of each), in ms: noise hits both alike."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for f, out in ((fa, ta), (fb, tb)):
            sync()
            start = time.perf_counter()
            f()
            sync()
            out.append(1000 * (time.perf_counter() - start))
    return statistics.median(ta), statistics.median(tb)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="the sampling rows with torch.compile too")
    p.add_argument("--steps", type=int, default=1500, help="training steps of the MLP runs")
    p.add_argument("--unet-steps", type=int, default=None, help="of the UNet runs (CPU 30, GPU 300; 0: none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-sample", type=int, default=10000)
    p.add_argument("--mnist", default=None, help="MNIST's root for the UNet (default ../shared/data/mnist-5k)")
    p.add_argument("--tmp", default=None, help="unused (every run has its own temporary folder)")
    args = p.parse_args(argv)
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    unet_steps = args.unet_steps if args.unet_steps is not None else (300 if dev == "cuda" else 30)

    # 1. training: the default run against a raw loop of the same work, per workload
    training = {"mlp": training_rows("mlp", dev, args.steps, min(200, args.steps // 5), args.repeats, None)}
    if unet_steps:
        skip = max(1, unet_steps // 6)
        training["unet"] = training_rows("unet", dev, unet_steps, skip, args.repeats, args.mnist, ablate=False)

    # 2. sampling against NFE x one bare forward (of the same network: compiled when sampling is)
    sampling = {}
    modes = [False, True] + (["reduce-overhead"] if dev == "cuda" else []) if args.compile else [False]
    for compiled in modes:  # reduce-overhead: CUDA graphs
        cfg = compose(["data=moons", "sampler=euler", "sampler.steps=100", f"compile={str(compiled).lower()}"])
        module = build_model(cfg, build_datamodule(cfg)).to(dev).eval()
        n = args.n_sample
        x = torch.randn(n, 2, device=dev)
        t = torch.rand(n, device=dev)

        def bare(module=module, x=x, t=t):
            with torch.no_grad():
                for _ in range(100):
                    module._forward(x, t)

        sampling[compiled] = paired_ms(lambda module=module, n=n: module.sample(n), bare, sync=sync)
    sample_ms, bare_ms = sampling[False]

    # 3. CFG: one doubled forward against two forwards
    cfg_c = compose(["data=8gaussians", "guidance=cfg"])
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
    icfm_step_ms = statistics.median(training["mlp"]["raw_ms"])
    rows_ot.append(["one I-CFM training step (raw loop, for scale)", f"{icfm_step_ms:.2f}"])

    results = {
        "device": dev,
        "steps": args.steps,
        "unet_steps": unet_steps,
        "repeats": args.repeats,
        "training": training,
        "sampling_ms": {str(k): v for k, v in sampling.items()},
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
    what = {"mlp": "MLP 3 x 64, batch 256 (train.py's default)", "unet": "lab-3 UNet"}
    rows = []
    for w, r in training.items():
        lit_m, raw_m = statistics.median(r["default_ms"]), statistics.median(r["raw_ms"])
        rows += [
            [f"{what[w]}: train.py default run, ms/step", f"{lit_m:.2f}"],
            [f"{what[w]}: raw loop, same work, ms/step", f"{raw_m:.2f}"],
            [f"{what[w]}: ratio raw / train.py (steps/s of train.py over the raw loop's)", f"**{r['ratio']:.3f}**"],
        ]
    for compiled, (s_ms, b_ms) in sampling.items():
        c = {False: "", True: ", compiled"}.get(compiled, f", compiled ({compiled})")
        rows += [
            [f"sampling {args.n_sample} points, Euler 100 steps{c} (ms)", f"{s_ms:.1f}"],
            [f"100 bare forwards{c} (ms)", f"{b_ms:.1f}"],
            [f"ratio sampling / bare{c} (target <= 1.05)", f"**{s_ms / b_ms:.3f}**"],
        ]
    rows += [["CFG one doubled forward (ms)", f"{doubled_ms:.3f}"], ["CFG two forwards (ms)", f"{twice_ms:.3f}"]]
    out = f"**{name}**, medians of {args.repeats} interleaved repeats\n\n"
    out += markdown_table(["quantity", "value"], rows)
    for w, r in training.items():
        lit_m = statistics.median(r["default_ms"])
        seg = [[k, f"{v:.3f}"] for k, v in r["segments_ms"].items()]
        out += f"\n\n{what[w]}: one default step ({lit_m:.2f} ms) between Lightning's hooks (one run)\n\n"
        out += markdown_table(["segment", "ms per step"], seg)
        if r["without_ms"]:
            abl = [[k, f"{v:.2f}", f"{lit_m - v:+.2f}"] for k, v in r["without_ms"].items()]
            out += f"\n\n{what[w]}: the default run without one part (medians of {args.repeats})\n\n"
            out += markdown_table(["without", "ms/step", "the part costs"], abl)
    out += "\n\n" + markdown_table(["minibatch OT at batch 256", "ms per call"], rows_ot)
    return out


if __name__ == "__main__":
    print(main())
