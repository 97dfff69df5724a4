#!/usr/bin/env bash
# Can the batched target (>= 20,000 frames/s) be reached with the decoder? One GPU call, ~7 min, nothing to carry:
# 1. frame-2 compile at B = 256 with cuDNN's algorithm search on, the shipped width 32 and a width-24 decoder
#    (random weights);
# 2. (only if width 24 is >= 15% faster) a width-24 decoder distilled from the shipped world (time-budgeted), exported as a world (decoder files only).
# $OUT: speed_cudnn.{json,md}, decoder24_distill.json, decoder24_world.tar.gz, log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out} DEVICE=${DEVICE:-cuda} PY=${PY:-python3} BUDGET=${BUDGET:-220} BATCHES=${BATCHES:-256}
WORLDS=${WORLDS:-256} FRAMES=${FRAMES:-200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TQDM_DISABLE=1
LOG=$OUT/log.txt
: >"$LOG"
timeout 200 $PY -m benchmarks.speed --device "$DEVICE" --dtype bf16 --samplers frame-2 --paths compile --batches $BATCHES \
  --decoder-widths 32 24 --decoder-layout contiguous --cudnn-benchmark --frames 20 --out "$OUT/speed_cudnn.json" >>"$LOG" 2>&1 \
  || echo "speed failed (log.txt)"
# Distil only if width 24 is faster than 32 at the largest batch by at least 15% (else the budget is better kept).
if ! $PY -c "import json,sys; r=json.load(open(sys.argv[1]))['rows']; f={x['decoder_width']: x['fps'] for x in r if x['batch']==max(y['batch'] for y in r)}; print('fps by width', f); sys.exit(0 if f[24] > 1.15*f[32] else 1)" "$OUT/speed_cudnn.json"; then
  echo "width 24 is not >= 15% faster: no distillation"; tail -n +5 "$OUT/speed_cudnn.md"; exit 0
fi
$PY -m worldmodel.training.decoder_distill --out /tmp/dd24 --width 24 --worlds "$WORLDS" --frames "$FRAMES" \
  --heldout-worlds 32 --batch-size 64 --time-budget "$BUDGET" --export-world --device "$DEVICE" --no-progress \
  >>"$LOG" 2>&1 || echo "distillation stopped (exit $?; 3 = by the budget, as planned)"
cp /tmp/dd24/decoder_distill.json "$OUT/decoder24_distill.json" 2>/dev/null
[ -d /tmp/dd24/world ] && tar -czf "$OUT/decoder24_world.tar.gz" -C /tmp/dd24/world world.json decoder.json \
  $(cd /tmp/dd24/world && ls decoder.safetensors* 2>/dev/null)
tail -n +5 "$OUT/speed_cudnn.md" 2>/dev/null
$PY -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ('step','trained_s','psnr','ssim','detail_ratio')})" \
  "$OUT/decoder24_distill.json" 2>/dev/null
