#!/usr/bin/env bash
# MNIST-5k few-step distillation at a 2-core CPU budget (about 30 minutes in all):
#   a class-conditional teacher (lab 3's UNet at half width, [16, 32, 64]; 1,500 steps at batch 64, CFG w = 3),
#   its 2-step student (stage=distill stage.steps=2) trained on 3,000 teacher trajectories (20 Euler steps at w = 3),
#   then classifier FID and class accuracy of 500 samples: the teacher at 2 and 100 Euler steps, the student at 2.
#   bash bench/few_step_mnist.sh [OUT]       (OUT defaults to /tmp/flowdiff-few-step-mnist; a teacher there is reused)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/flowdiff-few-step-mnist}
COMMON=(experiment=lab3_mnist_cpu "net.channels=[16,32,64]" callbacks.progress_bar=null trainer.enable_progress_bar=false
        "callbacks.grid.guidance_scales=[1.0,3.0]" "callbacks.image_metrics.nfe=[1,2,4]" log_root="$OUT")
[ -f "$OUT/teacher/checkpoints/last.ckpt" ] || time python train.py "${COMMON[@]}" hydra.run.dir="$OUT/teacher"
time python train.py "${COMMON[@]}" stage=distill teacher="$OUT/teacher/checkpoints/last.ckpt" stage.steps=2 \
    stage.n_pairs=3000 sampler@stage.sampler=euler stage.sampler.steps=20 stage.batch_size=500 \
    hydra.run.dir="$OUT/student"
time python sample.py -m ckpt="$OUT/teacher/checkpoints/last.ckpt" sampler.steps=2,100 n=500 \
    hydra.sweep.dir="$OUT/sample_teacher"
time python sample.py -m ckpt="$OUT/student/checkpoints/last.ckpt" sampler.steps=1,2,4 n=500 \
    hydra.sweep.dir="$OUT/sample_student"
