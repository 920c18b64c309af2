#!/usr/bin/env bash
# One prepared run on a lent GPU machine (no network there): wheels for what its image lacks travel in .whl/.
# Writes logs and bench JSON under $OUT. Usage (device tool): bash bench/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.log" 2>&1 || { echo "wheel install failed"; tail "$OUT/pip.log"; }
export PYTHONPATH=$PWD/src:/tmp/site WANDB_MODE=offline
{ nvidia-smi -L; python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
echo "== GPU tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_samplers.py -k "cuda or order or ddim_eta0" \
  > "$OUT/pytest_gpu.log" 2>&1; tail -3 "$OUT/pytest_gpu.log"
echo "== overhead on CUDA"
timeout 150 python3 bench/overhead.py --device cuda --steps 1500 --repeats 3 > "$OUT/overhead_cuda.log" 2>&1
grep -A22 '^\*\*' "$OUT/overhead_cuda.log" || tail -5 "$OUT/overhead_cuda.log"
echo "== overhead on CUDA with torch.compile"
timeout 170 python3 bench/overhead.py --device cuda --compile --steps 1500 --repeats 2 > "$OUT/overhead_cuda_compile.log" 2>&1
grep -A22 '^\*\*' "$OUT/overhead_cuda_compile.log" || tail -5 "$OUT/overhead_cuda_compile.log"
cp docs/bench/overhead_cuda*.json "$OUT/" 2>/dev/null
echo "== train.py on the GPU"
( time timeout 110 python3 train.py trainer=gpu callbacks.progress_bar=null trainer.enable_progress_bar=false \
    hydra.run.dir="$OUT/train_gpu" ) > "$OUT/train_gpu.log" 2>&1
grep -E "val/w2|real" "$OUT/train_gpu.log"
rm -f "$OUT"/train_gpu/checkpoints/*.ckpt
