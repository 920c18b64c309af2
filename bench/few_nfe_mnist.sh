#!/usr/bin/env bash
# Few-NFE sampling of a lab-3 MNIST-5k model (train.py experiment=lab3_mnist_cpu [objective=noise], CFG w = 3):
# classifier FID of 500 samples (beside its real-vs-real floor) for euler, heun, ddim, dpmpp and edm at about 10 NFE,
# each on the uniform and another grid, and Euler at 100 steps; with NOISE=1, DDIM against DPM-Solver++ at 4 to 10
# steps instead. About 35 minutes (NOISE=1: 10) on 2 CPU cores, where 500 images cost about 7 s per NFE.
#   bash bench/few_nfe_mnist.sh CKPT [OUT]      (OUT defaults to /tmp/flowdiff-few-nfe-mnist)
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$1
OUT=${2:-/tmp/flowdiff-few-nfe-mnist}
run() { python sample.py ckpt="$CKPT" n=500 straightness.images=0 hydra.run.dir="$OUT/$1" "${@:2}"; }
if [ "${NOISE:-0}" = 1 ]; then
  for s in ddim dpmpp; do for k in 4 6 8 10; do run "${s}_$k" sampler=$s sampler.steps=$k; done; done
else
run euler10 sampler=euler sampler.steps=10
run euler10_shift sampler=euler sampler.steps=10 sampler.grid=shift
run heun5 sampler=heun sampler.steps=5
run heun5_edm sampler=heun sampler.steps=5 sampler.grid=edm
run ddim10 sampler=ddim sampler.steps=10
run dpmpp10_uniform sampler=dpmpp sampler.steps=10 sampler.grid=uniform
run dpmpp10_logsnr sampler=dpmpp sampler.steps=10 sampler.grid=logsnr
run edm5 sampler=edm sampler.steps=5
run euler100 sampler=euler sampler.steps=100
fi
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
rows = []
for d in sorted(Path(sys.argv[1]).iterdir()):
    m = json.loads((d / "metrics.json").read_text())
    rows.append(f"| {d.name} | {m['sampler']} | {m['nfe']} | {m['fid']:.2f} | {m['fid_floor']:.2f} | {m['class_acc']:.3f} |")
print("| run | sampler | NFE | classifier FID | floor | class accuracy |\n|---|---|---|---|---|---|\n" + "\n".join(rows))
PY
