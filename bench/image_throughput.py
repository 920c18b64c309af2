"""CIFAR-10 UNet training throughput: flowdiff's ADMUNet beside torchcfm 1.0.7's UNetModelWrapper (same
architecture, 35.7M parameters) under one raw I-CFM loop, batch 128, in fp32, bf16 autocast and
bf16 + channels-last (and torch.compile with --compile). Data are random tensors already on the device, so
only the network, the loss and Adam are timed. Writes a Markdown table and JSON.

    python bench/image_throughput.py --device cuda --out docs/bench/image_throughput_<card>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flowdiff.nets import ADMUNet


def torchcfm_unet() -> torch.nn.Module:
    from torchcfm.models.unet.unet import UNetModelWrapper

    net = UNetModelWrapper(
        dim=(3, 32, 32),
        num_res_blocks=2,
        num_channels=128,
        channel_mult=[1, 2, 2, 2],
        num_heads=4,
        num_head_channels=64,
        attention_resolutions="16",
        dropout=0.1,
    )
    return _TimeFirst(net)


class _TimeFirst(torch.nn.Module):
    """torchcfm's nets take ``(t, x)``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(t, x)


def time_loop(net, device, mode: str, batch: int, warmup: int, steps: int, compile: bool) -> dict:
    torch.manual_seed(0)
    net = net.to(device).train()
    channels_last = mode == "bf16_cl"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    fwd = torch.compile(net) if compile else net
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    x1 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    if channels_last:
        x1 = x1.contiguous(memory_format=torch.channels_last)
    amp = mode != "fp32"

    def step():
        x0 = torch.randn_like(x1)
        t = torch.rand(batch, device=device)
        tb = t[:, None, None, None]
        xt, ut = tb * x1 + (1 - tb) * x0, x1 - x0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = (fwd(xt, t).float() - ut).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm = time.perf_counter() - start
    blocks = []
    per_block = 10
    for _ in range(max(1, steps // per_block)):
        start = time.perf_counter()
        for _ in range(per_block):
            step()
        sync()
        blocks.append((time.perf_counter() - start) / per_block)
    ms = 1000 * statistics.median(blocks)
    return {"ms_per_step": ms, "images_per_s": batch / ms * 1000, "warmup_s": warm}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--modes", default="fp32,bf16,bf16_cl")
    parser.add_argument("--compile", action="store_true", help="also time bf16 + channels-last + compile (flowdiff)")
    parser.add_argument("--nets", default="torchcfm,flowdiff", help="which nets: torchcfm, flowdiff or both")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    rows = {}
    nets = {"torchcfm UNetModelWrapper": torchcfm_unet, "flowdiff ADMUNet": ADMUNet}
    nets = {k: v for k, v in nets.items() if k.split()[0] in args.nets.split(",")}
    for name, make in nets.items():
        for mode in args.modes.split(","):
            rows[f"{name} | {mode}"] = time_loop(make(), device, mode, args.batch, args.warmup, args.steps, False)
            print(name, mode, rows[f"{name} | {mode}"], flush=True)
    if args.compile:
        key = "flowdiff ADMUNet | bf16_cl+compile"
        rows[key] = time_loop(ADMUNet(), device, "bf16_cl", args.batch, args.warmup + 5, args.steps, True)
        print(key, rows[key], flush=True)
    base = rows.get("torchcfm UNetModelWrapper | fp32", {}).get("ms_per_step", float("nan"))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [
        f"Raw I-CFM loop, batch {args.batch}, {name}, torch {torch.__version__}; median of blocks of 10 steps.",
        "",
        "| net | precision | ms/step | images/s | speed-up vs torchcfm fp32 |",
        "|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        net, mode = key.split(" | ")
        lines.append(
            f"| {net} | {mode} | {r['ms_per_step']:.1f} | {r['images_per_s']:.0f} | {base / r['ms_per_step']:.2f}x |"
        )
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": name, "batch": args.batch, "rows": rows}, indent=2))
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
