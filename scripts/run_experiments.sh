#!/usr/bin/env bash
# Reproduce docs/experiments.md: 10-epoch test accuracy of the seed's lessons, seeds 0-2,
# one process each. Usage: scripts/run_experiments.sh [OUT_DIR]   (default /tmp/exp)
# Needs MNIST (MNISTDIST_DATA_ROOT, or ../shared/data when present, else downloaded to ./data).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/exp}
PYTHON=${PYTHON:-.venv/bin/python}
if [[ -z "${MNISTDIST_DATA_ROOT:-}" && -d ../shared/data/MNIST/raw ]]; then
  export MNISTDIST_DATA_ROOT=$(cd ../shared/data && pwd)
fi
CONFIGS=(seed seed_no_final_relu mse default)
SEEDS=(0 1 2)
for c in "${CONFIGS[@]}"; do
  for s in "${SEEDS[@]}"; do
    run_dir="$OUT/$c-$s"
    if [[ -f "$run_dir/summary.json" ]]; then
      echo "skip $run_dir (summary.json exists)"; continue
    fi
    rm -rf "$run_dir"
    echo "== $c seed $s"
    "$PYTHON" train_dist.py --config "configs/$c.yaml" --run-dir "$run_dir" "train.seed=$s"
  done
done
# The table (markdown): mean and each seed, in percent.
"$PYTHON" - "$OUT" "${CONFIGS[@]}" <<'PY'
import json, sys
from pathlib import Path
out, configs = Path(sys.argv[1]), sys.argv[2:]
print("| config | mean | seed 0 | seed 1 | seed 2 |")
print("|---|---|---|---|---|")
for c in configs:
    accs = [json.loads((out / f"{c}-{s}" / "summary.json").read_text())["final_test_acc"] * 100 for s in (0, 1, 2)]
    print(f"| `configs/{c}.yaml` | {sum(accs) / len(accs):.2f}% | " + " | ".join(f"{a:.2f}%" for a in accs) + " |")
PY
