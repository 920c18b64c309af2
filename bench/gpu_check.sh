#!/usr/bin/env bash
# One prepared run on a lent GPU machine (no network there), within one 10-minute call.
# Wheels for what its image lacks travel in .whl/ and MNIST-5k in .gpu_data/ (both git-ignored; ../shared does not
# travel): `mkdir -p .gpu_data && cp -r ../shared/data/mnist-5k .gpu_data/`, wheels as the device README says
# (hydra-core, omegaconf, antlr4-python3-runtime, POT, torch-fidelity, torchcfm for Python 3.12), then
#   device run: carry [".whl", ".gpu_data"], command "STAGES='pytest lab3' bash bench/gpu_check.sh"
# Stages (STAGES picks and orders them; each has its own limit inside an overall DEADLINE). The first H200 run
# (2026-11-27) took: tests 20 s, throughput 110 s+ (cudnn autotuning of torchcfm's net costs 15-30 s a mode),
# cifar_train 170 s+ (compile 70 s), 5,000 sampled images 63 s, lab 3 about 60 ms a step before the fused EMA:
# one call does not hold them all, so a session runs the ones its issue needs.
#   pytest      the GPU tests
#   throughput  CIFAR UNet training, flowdiff's ADMUNet vs torchcfm's UNetModelWrapper, one raw loop
#   cifar       train.py experiment=cifar10 (Lightning, bf16 + channels-last + compile), then 10,000 samples at 100 NFE
#   lab3        the full lab 3 (5,000 steps, batch 250), sample.py -m guidance.scale=1,3,5, bits/dim
#   speed_train issue 20, one call: torchcfm's UNetModelWrapper raw loop in fp32 and train.py experiment=cifar10 for
#               the same SPEED_STEPS steps (images/s of both, the ratio); 10,000 CIFAR images at 100 NFE
#               (compile=reduce-overhead: CUDA graphs)
#   speed_lab3  issue 20, a second call: lab 3's 5,000 steps at batch 250 (training set on the GPU) with its wall
#               time, 600 steps through the DataLoader beside it; bench/overhead.py --device cuda (MLP and UNet)
#   precision   lab 3 for PSTEPS steps (default 1,000, EMA 0.995) in fp32 and bf16-mixed: throughput and classifier FID side
#               by side (issue 9)
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

STAGES=${STAGES:-pytest lab3 throughput cifar}
for s in $STAGES; do
case $s in
pytest)
  stage pytest_gpu 60 python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu.py
  tail -3 "$OUT/pytest_gpu.log" ;;
throughput)
  stage throughput 150 python3 bench/image_throughput.py --device $DEVICE --warmup $(q 10 1) --steps $(q 40 10) \
    --batch $(q 128 4) --modes fp32,bf16_cl $( [ "$QUICK" = 1 ] || echo --compile ) --out "$OUT/image_throughput.json"
  cat "$OUT/image_throughput.md" 2>/dev/null || tail -5 "$OUT/throughput.log" ;;
cifar)
  python3 -c "
import numpy as np, sys
from flowdiff.data.formats import write_cifar10
r = np.random.default_rng(0); n = int(sys.argv[1])
write_cifar10('/tmp/fakecifar', r.integers(0, 256, (n, 32, 32, 3)), r.integers(0, 10, n))
" $(q 2000 16)
  stage cifar_train 200 python3 train.py experiment=cifar10 $TRAINER data.root=/tmp/fakecifar data.verify_md5=false \
    trainer.max_steps=$(q 500 4) data.steps_per_epoch=100000 data.n_val=$(q 512 8) data.batch_size=$(q 128 4) \
    callbacks.image_metrics=null callbacks.grid=null callbacks.throughput.skip=$(q 200 1) compile=$(q true false) \
    $COMMON hydra.run.dir="$OUT/cifar"
  grep -E "throughput|checkpoint:" "$OUT/cifar_train.log" || tail -5 "$OUT/cifar_train.log"
  stage cifar_sample 150 python3 sample.py ckpt="$OUT/cifar/checkpoints/last.ckpt" n=$(q 10000 8) metrics.fid=false \
    metrics.batch_size=$(q 2500 4) sampler.steps=$(q 100 2) device=$DEVICE hydra.run.dir="$OUT/cifar_sample"
  grep -E "images/s" "$OUT/cifar_sample.log" || tail -5 "$OUT/cifar_sample.log"
  rm -rf "$OUT"/cifar/checkpoints "$OUT"/cifar_sample/samples.pt ;;
lab3)
  stage lab3 300 python3 train.py experiment=lab3_mnist $TRAINER data.root="$MNIST" data.num_workers=$(q 8 0) \
    trainer.max_steps=$(q 5000 4) data.steps_per_epoch=$(q 5000 4) sampler.steps=$(q 100 2) \
    callbacks.image_metrics.n=$(q 1000 50) $COMMON hydra.run.dir="$OUT/lab3"
  grep -E "FID|class_acc|throughput|grid" "$OUT/lab3.log" || tail -8 "$OUT/lab3.log"
  stage lab3_sweep 80 python3 sample.py -m ckpt="$OUT/lab3/checkpoints/last.ckpt" guidance.scale=1,3,5 \
    n=$(q 1000 50) sampler.steps=$(q 100 2) device=$DEVICE hydra.sweep.dir="$OUT/lab3_sweep"
  cat "$OUT/lab3_sweep/metrics.csv" 2>/dev/null || tail -8 "$OUT/lab3_sweep.log"
  stage lab3_nll 60 python3 sample.py ckpt="$OUT/lab3/checkpoints/last.ckpt" n=16 metrics.fid=false \
    nll.n=$(q 500 4) nll.probes=1 device=$DEVICE hydra.run.dir="$OUT/lab3_nll"
  grep -E "bits/dim" "$OUT/lab3_nll.log" || tail -5 "$OUT/lab3_nll.log"
  cp "$OUT"/lab3/grids/last_w*.png "$OUT"/ 2>/dev/null
  rm -rf "$OUT"/lab3_sweep/*/samples.pt "$OUT"/lab3_nll/samples.pt ;;
precision)
  for prec in 32-true bf16-mixed; do
    stage "precision_$prec" 150 python3 train.py experiment=lab3_mnist $TRAINER trainer.precision=$prec \
      data.root="$MNIST" data.num_workers=$(q 8 0) trainer.max_steps=$(q ${PSTEPS:-1000} 4) \
      data.steps_per_epoch=$(q ${PSTEPS:-1000} 4) sampler.steps=$(q 100 2) callbacks.image_metrics.n=$(q 1000 50) \
      callbacks.throughput.skip=$(q 100 1) callbacks.ema.decay=0.995 callbacks.grid=null $COMMON \
      hydra.run.dir="$OUT/precision_$prec"
    grep -E "throughput|val/fid|class_acc" "$OUT/precision_$prec.log" || tail -5 "$OUT/precision_$prec.log"
  done ;;
speed_train)
  python3 -c "
import numpy as np, sys
from flowdiff.data.formats import write_cifar10
r = np.random.default_rng(0); n = int(sys.argv[1])
write_cifar10('/tmp/fakecifar', r.integers(0, 256, (n, 32, 32, 3)), r.integers(0, 10, n))
" $(q 2000 16)
  SS=$(q ${SPEED_STEPS:-300} 4)
  stage speed_torchcfm 80 python3 bench/image_throughput.py --device $DEVICE --warmup $(q 20 1) --steps $(q $SS 2) \
    --batch $(q 128 4) --modes fp32 --nets torchcfm --out "$OUT/speed_torchcfm.json"
  cat "$OUT/speed_torchcfm.md" 2>/dev/null || tail -5 "$OUT/speed_torchcfm.log"
  stage speed_cifar_train 200 python3 train.py experiment=cifar10 $TRAINER data.root=/tmp/fakecifar \
    data.verify_md5=false trainer.max_steps=$(q $(( SS + 50 )) 4) data.steps_per_epoch=100000 data.n_val=$(q 512 8) \
    data.batch_size=$(q 128 4) callbacks.image_metrics=null callbacks.grid=null callbacks.throughput.skip=$(q 50 1) \
    compile=$(q true false) $COMMON hydra.run.dir="$OUT/speed_cifar"
  grep -E "throughput|on cuda|checkpoint:" "$OUT/speed_cifar_train.log"; tail -2 "$OUT/speed_cifar_train.log"
  python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
try:
    ours = json.load(open(f"{out}/speed_cifar/metrics.json"))["perf/samples_per_s"]
    theirs = json.load(open(f"{out}/speed_torchcfm.json"))["rows"]["torchcfm UNetModelWrapper | fp32"]["images_per_s"]
    print(f"ROW cifar10 training: flowdiff train.py {ours:.0f} images/s, torchcfm raw fp32 {theirs:.0f} images/s, "
          f"ratio {ours / theirs:.2f} (target >= 1.3)")
except Exception as e:
    print("ROW cifar10 training: not measured:", e)
PY
  # two batches of one shape: CUDA graphs are captured once (the first batch pays for compilation: both rates shown)
  stage speed_cifar_sample 200 python3 sample.py ckpt="$OUT/speed_cifar/checkpoints/last.ckpt" n=$(q 10000 8) \
    metrics.fid=false metrics.batch_size=$(q 5000 4) sampler.steps=$(q 100 2) compile=$(q reduce-overhead false) \
    device=$DEVICE hydra.run.dir="$OUT/speed_cifar_sample"
  grep -E "images/s" "$OUT/speed_cifar_sample.log" | sed 's/^/ROW sampling 10,000 CIFAR images at 100 NFE (target <= 45 s): /'
  tail -2 "$OUT/speed_cifar_sample.log"
  rm -rf "$OUT"/speed_cifar/checkpoints "$OUT"/speed_cifar_sample/samples.pt ;;
speed_lab3)
  stage speed_lab3 220 python3 train.py experiment=lab3_mnist $TRAINER data.root="$MNIST" \
    trainer.max_steps=$(q 5000 4) data.steps_per_epoch=$(q 5000 4) sampler.steps=$(q 100 2) \
    callbacks.image_metrics.n=$(q 1000 50) $COMMON hydra.run.dir="$OUT/speed_lab3"
  python3 -c "
import json, sys
m = json.load(open(sys.argv[1]))
print(f\"ROW lab 3: {m['global_step']} steps, {m['train_seconds']:.0f} s in fit (target <= 90 s of training), \"
      f\"{m.get('perf/ms_per_step', float('nan')):.1f} ms/step, class_acc {m.get('val/class_acc', float('nan')):.3f}\")
" "$OUT/speed_lab3/metrics.json"; grep -E "on cuda|on cpu" "$OUT/speed_lab3.log" | head -2; tail -2 "$OUT/speed_lab3.log"
  stage speed_lab3_loader 60 python3 train.py experiment=lab3_mnist $TRAINER data.root="$MNIST" data.on_device=false \
    data.num_workers=$(q 8 0) trainer.max_steps=$(q 600 4) data.steps_per_epoch=100000 callbacks.image_metrics=null \
    callbacks.grid=null callbacks.throughput.skip=$(q 100 1) $COMMON hydra.run.dir="$OUT/speed_lab3_loader"
  grep -E "throughput" "$OUT/speed_lab3_loader.log" | sed 's/^/ROW lab 3 through the DataLoader (8 workers): /'
  grep -E "throughput" "$OUT/speed_lab3.log" | sed 's/^/ROW lab 3 with the training set on the GPU: /'
  stage speed_overhead 220 python3 bench/overhead.py --device $DEVICE --compile --steps $(q 1500 60) \
    --unet-steps $(q 300 0) --repeats 3 --n-sample $(q 10000 256) --mnist "$MNIST"
  cp "$OUT/speed_overhead.log" "$OUT/overhead_cuda.md" 2>/dev/null
  cp docs/bench/overhead_cuda*.json "$OUT"/ 2>/dev/null
  grep -E "ratio" "$OUT/speed_overhead.log" | sed 's/^/ROW /'
  rm -rf "$OUT"/speed_lab3/checkpoints "$OUT"/speed_lab3_loader/checkpoints ;;
*) echo "unknown stage $s (pytest, throughput, cifar, lab3, speed_train, speed_lab3, precision)" ;;
esac
done
find "$W" -name "*.ckpt" -delete
(cd "$W" && tar czf "$FINAL/results.tgz" --exclude="*.pt" --exclude="wandb" .)
cp "$W"/image_throughput.md "$W"/last_w*.png "$FINAL"/ 2>/dev/null
echo "done in ${SECONDS}s; results: $FINAL/results.tgz"
