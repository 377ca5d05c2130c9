#!/usr/bin/env bash
# The GPU part of the benchmark (issue 6), as one prepared script for a machine with one GPU.
# It needs MNIST: pass the directory holding MNIST/raw as $1, or a directory of the four
# gzipped raw files as $1 with GUNZIP=1 (how it is carried to a lent GPU machine).
#
#   bash benchmarks/gpu_check.sh DATA_ROOT OUT_DIR
#
# Runs, in this order, keeping every output under OUT_DIR:
# 1. the `gpu` tests (tests/gpu/: one-GPU training eager and as a CUDA graph, bf16, exact
#    evaluation, exact resume, NaN stop, eager vs graph equality): OUT_DIR/gpu_tests.log and
#    gpu_tests.xml;
# 2. the benchmark on the seed config: (a) the per-sample torchvision pipeline, (b) the tensor
#    pipeline eager, and the compiled/graph-captured step (dist.compile=reduce-overhead), each
#    for 10 measured epochs after 1 warm-up epoch (a: 1 measured epoch, it is slow), plus a
#    bf16 run: OUT_DIR/gpu_bench.json and bench.log;
# 3. a default-config run evaluated on the CPU, and the CUDA-graph step against the eager step
#    through the command line (same run, exact resume after SIGTERM, NaN stop): graph_check.txt.
#
# DEVICE=cpu runs the same checks on the CPU with fewer epochs (EPOCHS, default 3): where no
# GPU is lent, this shows the script works and that each GPU option falls back with one
# warning (the gpu tests run on the CPU too, MNISTDIST_GPU_TESTS_DEVICE=cpu); its timings say
# nothing about a GPU.
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
device=${DEVICE:-cuda}
epochs=${EPOCHS:-$([ "$device" = cuda ] && echo 11 || echo 3)}
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
else
  { nproc; grep -m1 "model name" /proc/cpuinfo; } | tee "$out/gpu.txt"
fi
python3 -c "import torch, accelerate; print('torch', torch.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
# 1. The gpu tests (they need pytest: pip install -e '.[test]').
MNISTDIST_GPU_TESTS_DEVICE="$device" python3 -m pytest tests/gpu -m gpu -v -rs -p no:cacheprovider \
  --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log"
echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_tests.log"
# 2. The benchmark.
python3 -m benchmarks.bench --device "$device" --which a,b --reps 1 --epochs "$epochs" --epochs-a 2 --warmup-epochs 1 \
  --variant "compiled:dist.compile=reduce-overhead,train.stop_check_every_steps=50" \
  --variant "graph:dist.cuda_graph=true" \
  --variant "graph-check50:dist.cuda_graph=true,train.stop_check_every_steps=50" \
  --variant "bf16:dist.mixed_precision=bf16" \
  --json "$out/gpu_bench.json" 2>&1 | tee "$out/bench.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$out/bench.log"
# One plain GPU training run through the CLI, and its weights evaluated on the CPU.
python3 train_dist.py --config configs/default.yaml --run-dir "$out/run_default" dist.device="$device" \
  train.epochs="$((epochs - 1))" 2>&1 \
  | tr '\r' '\n' | grep -a -E "training on|^epoch [0-9]+/[0-9]+  " | tee "$out/default_cuda.log"
python3 -m mnistdist.cli evaluate --model "$out/run_default/model.safetensors" --json dist.device=cpu \
  | tee "$out/default_eval_cpu.json"
cp "$out/run_default/summary.json" "$out/default_summary.json" 2>/dev/null
rm -rf "$out/run_default"
# The CUDA-graph step against the eager step on this GPU: same run, exact resume, NaN stop.
t=/tmp/graphcheck; rm -rf "$t"; mkdir -p "$t"
common=(train.epochs=1 train.log_every_steps=1 "dist.device=$device" checkpoint.every_steps=100)
python3 train_dist.py --run-dir "$t/eager" "${common[@]}" > "$t/eager.log" 2>&1; echo "eager exit $?"
python3 train_dist.py --run-dir "$t/graph" "${common[@]}" dist.cuda_graph=true > "$t/graph.log" 2>&1; echo "graph exit $?"
MNISTDIST_FAULT="step=150,action=TERM" python3 tests/fault_train.py --run-dir "$t/graph_r" "${common[@]}" dist.cuda_graph=true > "$t/graph_r1.log" 2>&1; echo "graph interrupted exit $?"
python3 train_dist.py --run-dir "$t/graph_r" "${common[@]}" dist.cuda_graph=true > "$t/graph_r2.log" 2>&1; echo "graph resumed exit $?"
MNISTDIST_FAULT="step=50,action=nan" python3 tests/fault_train.py --run-dir "$t/graph_nan" "${common[@]}" dist.cuda_graph=true > "$t/graph_nan.log" 2>&1; echo "graph nan exit $? (want 3)"
grep -a -h -E "error|warning|stopped" "$t"/*.log | cut -c1-300
python3 - "$t" <<'PY' 2>&1 | tee "$out/graph_check.txt"
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
t = Path(sys.argv[1])
def params(d): return load_file(str(t / d / "model.safetensors"))
def losses(d): return [(r["step"], r["train_loss"]) for r in map(json.loads, open(t / d / "metrics.jsonl")) if "train_loss" in r]
def evals(d): return [(r["step"], r["test_correct"]) for r in map(json.loads, open(t / d / "metrics.jsonl")) if "test_acc" in r]
e, g, r = params("eager"), params("graph"), params("graph_r")
print("eager vs graph: max abs param diff", max((e[k] - g[k]).abs().max().item() for k in e),
      "bitwise", all(torch.equal(e[k], g[k]) for k in e))
le, lg = losses("eager"), losses("graph")
print("eager vs graph: loss steps equal", [s for s, _ in le] == [s for s, _ in lg],
      "max loss diff", max(abs(a[1] - b[1]) for a, b in zip(le, lg)), "evals", evals("eager"), evals("graph"))
print("graph vs graph resumed: bitwise", all(torch.equal(g[k], r[k]) for k in g),
      "losses equal", losses("graph") == losses("graph_r"))
ckpts = sorted(p.name for p in (t / "graph_nan" / "checkpoints").iterdir()) if (t / "graph_nan" / "checkpoints").exists() else []
print("graph nan: checkpoints", ckpts, "model written", (t / "graph_nan" / "model.safetensors").exists())
PY
