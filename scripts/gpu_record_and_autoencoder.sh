#!/usr/bin/env bash
# One GPU slice: record ViZDoom data on the machine's cores, fit the action model, train the
# autoencoder for a time budget, and leave bf16 weights + logs in $OUT.
# Usage (device tool, carry .carry): bash scripts/gpu_record_and_autoencoder.sh AE_SECONDS
set -euo pipefail
AE_SECONDS=${1:-300}
mkdir -p /tmp/site && tar -xJf .carry/site.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m data_tools.record --out /tmp/data --episodes 96 --heldout-episodes 8 --frames-per-episode 1000 \
  --workers "$(nproc)" --seed 0 --no-progress 2>&1 | tail -3
cp /tmp/data/manifest.json /tmp/data/coverage.png "$OUT"/
python3 -m data_tools.fit_action_model /tmp/data --out "$OUT/action_model.json" 2>&1 | tail -12
python3 -m worldmodel.train autoencoder --config configs/default.yaml --data /tmp/data --out /tmp/runs/ae \
  --time-budget "$AE_SECONDS" data.batch_size=16 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -6
cp /tmp/runs/ae/autoencoder.safetensors /tmp/runs/ae/autoencoder.json /tmp/runs/ae/metrics.jsonl "$OUT"/
ls -la "$OUT"
