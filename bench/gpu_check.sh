#!/usr/bin/env bash
# One prepared run on a lent GPU machine (no network there), within one 10-minute call.
# Wheels for what its image lacks travel in .whl/ and MNIST-5k in .gpu_data/ (both git-ignored):
#   device run: carry [".whl", ".gpu_data"], command "bash bench/gpu_check.sh"
# Stages, most important first, each with its own limit inside an overall deadline:
#   1. CIFAR UNet training throughput, flowdiff's ADMUNet vs torchcfm's UNetModelWrapper (raw loop)
#   2. train.py experiment=cifar10 (Lightning, bf16 + channels-last + compile) on CIFAR-format files
#   3. sampling 10,000 CIFAR-sized images at 100 NFE from that checkpoint
#   4. the full lab 3 (experiment=lab3_mnist, 5,000 steps, batch 250) and sample.py -m guidance.scale=1,3,5
#   5. bits/dim on MNIST-5k; 6. the GPU tests
# QUICK=1 shrinks every stage (to check the script on a CPU machine). Work happens in $W; at the end the logs,
# metrics and grids are packed into $OUT/results.tgz (the device tool brings back at most 8 files).
set -u
OUT=${OUT:-/tmp/gpu-out}
FINAL=$OUT
W=${W:-/tmp/gpu-work}
rm -rf "$W"; mkdir -p "$W" "$FINAL"
OUT=$W
DEADLINE=${DEADLINE:-570}
QUICK=${QUICK:-0}
left() { echo $(( DEADLINE - SECONDS )); }
stage() {  # stage NAME LIMIT CMD...: run with min(LIMIT, time left - 10 s)
  local name=$1 limit=$2; shift 2
  local t=$(( $(left) - 10 )); (( t > limit )) && t=$limit
  if (( t < 15 )); then echo "== $name: skipped (no time left)"; return; fi
  echo "== $name (limit ${t}s, ${SECONDS}s elapsed)"
  local start=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "   rc=$rc in $(( SECONDS - start ))s"
}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || { echo "wheel install failed"; tail "$OUT/pip.log"; }
fi
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site WANDB_MODE=offline PYTHONUNBUFFERED=1
MNIST=${MNIST:-.gpu_data/mnist-5k}
{ nvidia-smi -L 2>/dev/null; python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"; } 2>&1 | tee "$OUT/env.txt"
TRAINER=trainer=gpu; DEVICE=cuda
if [ "$QUICK" = 1 ]; then TRAINER=trainer=cpu; DEVICE=cpu; fi
q() { if [ "$QUICK" = 1 ]; then echo "$2"; else echo "$1"; fi; }
COMMON="callbacks.progress_bar=null trainer.enable_progress_bar=false"

# 1. raw-loop throughput, both nets, same loop
stage throughput 110 python3 bench/image_throughput.py --device $DEVICE --warmup $(q 10 1) --steps $(q 40 10) \
  --batch $(q 128 4) --out "$OUT/image_throughput.json"
cat "$OUT/image_throughput.md" 2>/dev/null || tail -5 "$OUT/throughput.log"

# 2. train.py experiment=cifar10 on CIFAR-format files (random pixels: throughput only)
python3 -c "
import numpy as np, sys
from flowdiff.data.formats import write_cifar10
r = np.random.default_rng(0); n = int(sys.argv[1])
write_cifar10('/tmp/fakecifar', r.integers(0, 256, (n, 32, 32, 3)), r.integers(0, 10, n))
" $(q 2000 16)
stage cifar_train 170 python3 train.py experiment=cifar10 $TRAINER data.root=/tmp/fakecifar data.verify_md5=false \
  trainer.max_steps=$(q 400 4) data.steps_per_epoch=100000 data.n_val=$(q 512 8) data.batch_size=$(q 128 4) \
  callbacks.image_metrics=null callbacks.grid=null callbacks.throughput.skip=$(q 150 1) compile=$(q true false) \
  $COMMON hydra.run.dir="$OUT/cifar"
grep -E "throughput|checkpoint:" "$OUT/cifar_train.log" || tail -5 "$OUT/cifar_train.log"

# 3. sampling 10,000 images at 100 NFE (bf16 autocast from the run's precision)
stage cifar_sample 100 python3 sample.py ckpt="$OUT/cifar/checkpoints/last.ckpt" n=$(q 10000 8) metrics.fid=false \
  metrics.batch_size=$(q 2500 4) sampler.steps=$(q 100 2) device=$DEVICE hydra.run.dir="$OUT/cifar_sample"
grep -E "images/s" "$OUT/cifar_sample.log" || tail -5 "$OUT/cifar_sample.log"
rm -rf "$OUT"/cifar/checkpoints "$OUT"/cifar_sample/samples.pt

# 4. the full lab 3, then the guidance table
stage lab3 150 python3 train.py experiment=lab3_mnist $TRAINER data.root="$MNIST" data.num_workers=$(q 8 0) \
  trainer.max_steps=$(q 5000 4) data.steps_per_epoch=$(q 5000 4) sampler.steps=$(q 100 2) \
  callbacks.image_metrics.n=$(q 1000 50) $COMMON hydra.run.dir="$OUT/lab3"
grep -E "FID|class_acc|throughput|grid" "$OUT/lab3.log" || tail -8 "$OUT/lab3.log"
stage lab3_sweep 80 python3 sample.py -m ckpt="$OUT/lab3/checkpoints/last.ckpt" guidance.scale=1,3,5 n=$(q 1000 50) \
  sampler.steps=$(q 100 2) device=$DEVICE hydra.sweep.dir="$OUT/lab3_sweep"
cat "$OUT/lab3_sweep/metrics.csv" 2>/dev/null || tail -8 "$OUT/lab3_sweep.log"

# 5. bits/dim of the unconditional (null-label) field on held-out digits
stage lab3_nll 60 python3 sample.py ckpt="$OUT/lab3/checkpoints/last.ckpt" n=16 metrics.fid=false nll.n=$(q 500 4) \
  nll.probes=1 device=$DEVICE hydra.run.dir="$OUT/lab3_nll"
grep -E "bits/dim" "$OUT/lab3_nll.log" || tail -5 "$OUT/lab3_nll.log"
cp "$OUT"/lab3/grids/last_w*.png "$OUT"/ 2>/dev/null
rm -rf "$OUT"/lab3/checkpoints "$OUT"/lab3_sweep/*/samples.pt "$OUT"/lab3_nll/samples.pt

# 6. GPU tests
stage pytest_gpu 60 python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu.py
tail -3 "$OUT/pytest_gpu.log"
find "$W" -name "*.ckpt" -delete
(cd "$W" && tar czf "$FINAL/results.tgz" --exclude="*.pt" --exclude="wandb" .)
cp "$W"/image_throughput.md "$W"/last_w*.png "$FINAL"/ 2>/dev/null
echo "done in ${SECONDS}s; results: $FINAL/results.tgz"
