#!/usr/bin/env bash
# Issue 6's first-frame target on the GPU, after the static step took over the first frames (2026-12-03):
#   STEPS="speed encoder" bash scripts/gpu_first_frame.sh    (device tool, repo root; then STEPS=tests)
# Dry run on the CPU:
#   DEVICE=cpu BATCHES=1 PATHS="eager static" FRAMES=3 STEPS="speed encoder" bash scripts/gpu_first_frame.sh
# speed:   first frame and steady step, frame-2 (PATHS) against chunk3-4 (eager), B = BATCHES, shipped decoder
#          (width 32, contiguous); the ratios are the last lines of speed_first.md;
# encoder: benchmarks.profile_encoder (reset's uint8 -> latents), B = BATCHES x 4 context frames;
# tests:   the CUDA tests of tests/test_graphed.py (graph and compile against eager from the first frame).
# $OUT gets speed_first.{json,md}, encoder.txt, tests.txt, log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out} DEVICE=${DEVICE:-cuda} PY=${PY:-python3} FRAMES=${FRAMES:-20} STEPS=${STEPS:-speed encoder tests}
BATCHES=${BATCHES:-1 64 256} PATHS=${PATHS:-eager graph compile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=$PWD
LOG=$OUT/log.txt
touch "$LOG"
for step in $STEPS; do
  case $step in
    speed)
      echo "== first frame, frame-2 ($PATHS) vs chunk3-4"
      timeout 420 $PY -m benchmarks.speed --device "$DEVICE" --dtype bf16 --samplers frame-2 chunk3-4 --paths $PATHS \
        --batches $BATCHES --decoder-widths 32 --decoder-layout contiguous --frames "$FRAMES" \
        --out "$OUT/speed_first.json" >>"$LOG" 2>&1 || echo "speed failed or timed out (log.txt)"
      tail -n +3 "$OUT/speed_first.md" 2>/dev/null ;;
    encoder)
      echo "== encoder"
      timeout 150 $PY -m benchmarks.profile_encoder --device "$DEVICE" --dtype bf16 --batches $BATCHES \
        >"$OUT/encoder.txt" 2>&1 || echo "profile_encoder failed or timed out (encoder.txt)"
      head -12 "$OUT/encoder.txt" ;;
    tests)
      echo "== CUDA tests of test_graphed.py"
      timeout 400 $PY -m pytest -q -p no:cacheprovider tests/test_graphed.py -k "cuda" >"$OUT/tests.txt" 2>&1
      tail -3 "$OUT/tests.txt" ;;
    *) echo "unknown step $step (speed, encoder, tests)" ;;
  esac
done
