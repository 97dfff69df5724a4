#!/usr/bin/env bash
# What is left of issue 6, in one GPU call (docs/GPU_RUN_PLAN.md, last section); written 2026-12-02 and run on the
# CPU only, as a dry run:
#   DEVICE=cpu BUDGET=20 WORLDS=4 FRAMES=4 SPEED_PATHS=static SPEED_BATCHES=1 ENV_PATHS="off static" ENV_BATCHES=1 \
#   ENV_STEPS=5 bash scripts/gpu_issue6_next.sh
#   bash scripts/gpu_issue6_next.sh          (device tool, repo root; nothing to carry: the shipped world is in the tree)
# 1. the speed ceiling of a 32-wide decoder (random weights) next to the shipped 48, graph path, B = 1, 64, 256;
# 2. the vector env's steps/s, eager against its default (graph) path, B = 64, 256;
# 3. decoder distillation to width 32 from the shipped world (time-budgeted), exported as a world (3 MB of decoder).
# $OUT gets speed_decoder32.{json,md}, env_speed.{json,md}, decoder_distill.json, decoder32_world.tar.gz (world.json,
# decoder.*, no student: re-attach to worldmodel/weights), log.txt; prints a summary last.
set -uo pipefail
OUT=${OUT:-/tmp/out} DEVICE=${DEVICE:-cuda} PY=${PY:-python3}
BUDGET=${BUDGET:-300} WORLDS=${WORLDS:-256} FRAMES=${FRAMES:-200}
SPEED_PATHS=${SPEED_PATHS:-graph} SPEED_BATCHES=${SPEED_BATCHES:-1 64 256}
ENV_PATHS=${ENV_PATHS:-off graph} ENV_BATCHES=${ENV_BATCHES:-64 256} ENV_STEPS=${ENV_STEPS:-100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TQDM_DISABLE=1
LOG=$OUT/log.txt
: >"$LOG"
echo "== 1. decoder width 48 vs 32, frame-2, graph"
timeout 120 $PY -m benchmarks.speed --device "$DEVICE" --dtype bf16 --samplers frame-2 --paths $SPEED_PATHS --batches $SPEED_BATCHES \
  --decoder-widths 48 32 --decoder-layout contiguous --frames 20 --out "$OUT/speed_decoder32.json" >>"$LOG" 2>&1 \
  || echo "speed failed (log.txt)"
echo "== 2. vector env steps/s, off vs graph"
timeout 150 $PY -m benchmarks.env_speed --device "$DEVICE" --num-envs $ENV_BATCHES --paths $ENV_PATHS --steps-per-row $ENV_STEPS \
  --out "$OUT/env_speed.json" >>"$LOG" 2>&1 || echo "env_speed failed (log.txt)"
echo "== 3. decoder distillation, width 32, ${BUDGET}s"
$PY -m worldmodel.training.decoder_distill --out /tmp/dd --width 32 --worlds "$WORLDS" --frames "$FRAMES" \
  --heldout-worlds 32 --batch-size 64 --time-budget "$BUDGET" --export-world --device "$DEVICE" --no-progress \
  >>"$LOG" 2>&1 || echo "distillation stopped (exit $?; 3 = by the budget, as planned)"
cp /tmp/dd/decoder_distill.json "$OUT/" 2>/dev/null
[ -d /tmp/dd/world ] && tar -czf "$OUT/decoder32_world.tar.gz" -C /tmp/dd/world world.json decoder.json \
  $(cd /tmp/dd/world && ls decoder.safetensors* 2>/dev/null)
cat "$OUT/speed_decoder32.md" 2>/dev/null | tail -8
cat "$OUT/env_speed.md" 2>/dev/null
$PY -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ('step','trained_s','psnr','ssim','detail_ratio','student_decode_ms_b64','teacher_decode_ms_b64')})" \
  "$OUT/decoder_distill.json" 2>/dev/null
