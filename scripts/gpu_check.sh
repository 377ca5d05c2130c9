#!/usr/bin/env bash
# The GPU part of the benchmark (issue 6), as one prepared script for a machine with one GPU.
# It needs MNIST: pass the directory holding MNIST/raw as $1, or a directory of the four
# gzipped raw files as $1 with GUNZIP=1 (how it is carried to a lent GPU machine).
#
#   bash scripts/gpu_check.sh DATA_ROOT OUT_DIR
#
# Runs, on the seed config: (a) the per-sample torchvision pipeline, (b) the tensor pipeline
# eager, and the compiled/graph-captured step (dist.compile=reduce-overhead), each for 10
# measured epochs after 1 warm-up epoch (a: 1 measured epoch, it is slow), plus a bf16 run;
# then the CPU-independent unit tests on this machine. Results: OUT_DIR/gpu_bench.json and logs.
set -uo pipefail
data=${1:?data root}
out=${2:?output dir}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${GUNZIP:-0}" = 1 ]; then
  mkdir -p /tmp/mnist/MNIST/raw
  for f in "$data"/MNIST/raw/*.gz; do gunzip -c "$f" > "/tmp/mnist/MNIST/raw/$(basename "$f" .gz)"; done
  data=/tmp/mnist
fi
export MNISTDIST_DATA_ROOT="$data"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
python3 -m mnistdist.bench --device cuda --which a,b --reps 2 --epochs 11 --epochs-a 2 --warmup-epochs 1 \
  --variant "graphs:dist.compile=reduce-overhead,train.stop_check_every_steps=50" \
  --variant "bf16:dist.mixed_precision=bf16" \
  --json "$out/gpu_bench.json" 2>&1 | tee "$out/bench.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$out/bench.log"
# One plain GPU training run through the CLI, and its weights evaluated on the CPU.
python3 train_dist.py --config configs/default.yaml --run-dir "$out/run_default" dist.device=cuda 2>&1 \
  | tr '\r' '\n' | grep -a -E "training on|^epoch [0-9]+/[0-9]+  " | tee "$out/default_cuda.log"
python3 -m mnistdist.cli evaluate --model "$out/run_default/model.safetensors" --json dist.device=cpu \
  | tee "$out/default_eval_cpu.json"
cp "$out/run_default/summary.json" "$out/default_summary.json" 2>/dev/null
rm -rf "$out/run_default"
