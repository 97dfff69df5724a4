#!/usr/bin/env bash
# What is left of issue 6's speed part, in one GPU call (docs/GPU_RUN_PLAN.md, last section). Rewritten 2026-12-02
# after the width-32 decoder shipped (its distillation was this script's step 3 before; see benchmarks/RESULTS.md):
#   bash scripts/gpu_issue6_next.sh          (device tool, repo root; carry .carry for gymnasium: the env rows)
# Dry run on the CPU:
#   DEVICE=cpu SPEED_PATHS=compile SPEED_BATCHES=1 FIRST_BATCHES=1 ENV_PATHS="off static" ENV_BATCHES=1 ENV_STEPS=5 \
#   FRAMES=3 TESTS=0 bash scripts/gpu_issue6_next.sh
# 1. the CUDA tests of tests/test_graphed.py (graph and compile against eager, fp32 and bf16);
# 2. frame-2 and frame-1 with the shipped decoder (width 32): graph against compile, B = 1, 64, 256;
# 3. first-frame latency, frame-2 against chunk3-4, B = 1, 64, 256 (reset writes the context in one pass now);
# 4. the vector env's steps/s, eager against the default (graph), B = 64, 256.
# $OUT gets speed_compile.{json,md}, speed_first.{json,md}, env_speed.{json,md}, tests.txt, log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out} DEVICE=${DEVICE:-cuda} PY=${PY:-python3} FRAMES=${FRAMES:-30} TESTS=${TESTS:-1}
SPEED_PATHS=${SPEED_PATHS:-graph compile} SPEED_BATCHES=${SPEED_BATCHES:-1 64 256} FIRST_BATCHES=${FIRST_BATCHES:-1 64 256}
ENV_PATHS=${ENV_PATHS:-off graph} ENV_BATCHES=${ENV_BATCHES:-64 256} ENV_STEPS=${ENV_STEPS:-100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -f .carry/site.tar.xz ]; then  # gymnasium (and vizdoom) for the env rows
  mkdir -p /tmp/site && tar -xJf .carry/site.tar.xz -C /tmp/site && export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
LOG=$OUT/log.txt
: >"$LOG"
if [ "$TESTS" = 1 ]; then
  echo "== 1. CUDA tests of test_graphed.py"
  timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_graphed.py -k "cuda" >"$OUT/tests.txt" 2>&1; tail -2 "$OUT/tests.txt"
fi
echo "== 2. graph vs compile, decoder width 32"
timeout 330 $PY -m benchmarks.speed --device "$DEVICE" --dtype bf16 --samplers frame-2 frame-1 --paths $SPEED_PATHS \
  --batches $SPEED_BATCHES --decoder-widths 32 --decoder-layout contiguous --frames "$FRAMES" \
  --out "$OUT/speed_compile.json" >>"$LOG" 2>&1 || echo "speed (compile) failed or timed out (log.txt)"
echo "== 3. first frame, frame-2 vs chunk3-4"
timeout 150 $PY -m benchmarks.speed --device "$DEVICE" --dtype bf16 --samplers frame-2 chunk3-4 --paths eager \
  --batches $FIRST_BATCHES --decoder-widths 32 --decoder-layout contiguous --frames 10 \
  --out "$OUT/speed_first.json" >>"$LOG" 2>&1 || echo "speed (first frame) failed (log.txt)"
echo "== 4. vector env steps/s"
timeout 150 $PY -m benchmarks.env_speed --device "$DEVICE" --num-envs $ENV_BATCHES --paths $ENV_PATHS \
  --steps-per-row $ENV_STEPS --out "$OUT/env_speed.json" >>"$LOG" 2>&1 || echo "env_speed failed (log.txt)"
for f in speed_compile speed_first env_speed; do tail -n +3 "$OUT/$f.md" 2>/dev/null; done
