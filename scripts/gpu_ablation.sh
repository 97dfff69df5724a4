#!/usr/bin/env bash
# Issue 6's initialisation ablation on one GPU (benchmarks/ablation.py, configs/ablation.yaml): one call of a
# chain. Records the data if this machine has none, runs `benchmarks.ablation train` for what is left of
# BUDGET seconds (the same command every call: it continues where the last one stopped), and once training
# is complete evaluates every student on the held-out windows, measures the first-frame rows of
# benchmarks.speed and runs the CUDA tests of tests/test_graphed.py. Small files come back in $OUT.
#
#   bash scripts/gpu_ablation.sh BUDGET          (device tool, repo root; carry .carry)
#   KEEP="autoencoder teacher ar_diffusion" bash scripts/gpu_ablation.sh 560   (also bring those exports back)
#   DEVICE=cpu CONFIG=configs/tiny.yaml PLAN=... RECORD="..." SITE=none bash scripts/gpu_ablation.sh 300  (dry run)
#
# On a fresh machine with .carry/abl_run (what earlier calls brought back: exports as parts + the small tar
# unpacked), the run directory is restored from it and every unfinished stage continues from its bf16 export.
set -uo pipefail
BUDGET=${1:?seconds for this call}
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
DATA=${DATA:-/tmp/abl_data} RUN=${RUN:-/tmp/abl_run} PY=${PY:-python3} DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/default.yaml} PLAN=${PLAN:-configs/ablation.yaml}
RECORD=${RECORD:---episodes 96 --heldout-episodes 8 --frames-per-episode 1000}
SITE=${SITE:-/tmp/site} KEEP=${KEEP:-} EVAL_ARGS=${EVAL_ARGS:-} SPEED=${SPEED:-1}
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$PWD NCCL_NVLS_ENABLE=0 TQDM_DISABLE=1
elapsed() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
if [ "$SITE" != none ] && [ ! -d "$SITE/vizdoom" ]; then
  mkdir -p "$SITE" && tar -xJf .carry/site.tar.xz -C "$SITE" || exit 1
  chmod +x "$SITE/vizdoom/vizdoom"   # zip extraction drops the exec bit; without it DoomGame.init() segfaults
fi
if [ ! -f "$DATA/manifest.json" ]; then
  $PY -m data_tools.record --out "$DATA" $RECORD --workers "$(nproc)" --seed 0 --no-progress 2>&1 | tail -2
fi
$PY -c "import json; e=json.load(open('$DATA/manifest.json'))['episodes']; print('episode sha256', [x['sha256'][:10] for x in e[:2] + e[-1:]])"
if [ ! -d "$RUN" ] && [ -d .carry/abl_run ]; then cp -r .carry/abl_run "$RUN" && echo "restored $RUN from .carry/abl_run"; fi

LEFT=$(( BUDGET - $(elapsed) - 25 ))   # 25 s for collecting the files
echo "== train (budget ${LEFT}s)"
$PY -m benchmarks.ablation train "$DATA" --out "$RUN" --config "$CONFIG" --plan "$PLAN" --time-budget "$LEFT" \
  --device "$DEVICE" >>"$LOG" 2>&1
RC=$?
grep -E "^\[build\] (\[|.*: step|.*stopped|time budget)|Error|error:" "$LOG" | tail -30
tail -12 "$LOG"
echo "train exit $RC at $(elapsed)s"

if [ $RC -eq 0 ] && [ ! -f "$OUT/ablation.json" ]; then
  echo "== evaluate"
  $PY -m benchmarks.ablation evaluate "$DATA" --run "$RUN" --device "$DEVICE" --out "$OUT/ablation.json" $EVAL_ARGS \
    >>"$LOG" 2>&1 || echo "evaluate failed (log.txt)"
  echo "evaluated at $(elapsed)s"
  if [ "$SPEED" = 1 ] && [ $(( BUDGET - $(elapsed) )) -gt 90 ]; then
    echo "== speed: first frame, frame-wise 2-step vs chunk-wise 4-step"
    timeout 90 $PY -m benchmarks.speed --device "$DEVICE" --dtype bf16 --config configs/default.yaml \
      --samplers frame-1 frame-2 chunk3-4 --batches 1 8 --paths eager --frames 10 --out "$OUT/speed_firstframe.json" \
      >>"$LOG" 2>&1 || echo "speed failed (log.txt)"
    cat "$OUT/speed_firstframe.md" 2>/dev/null | head -12
  fi
  if [ "$SPEED" = 1 ] && [ $(( BUDGET - $(elapsed) )) -gt 70 ]; then
    echo "== tests/test_graphed.py (the CUDA tests: graph == eager on this GPU)"
    timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_graphed.py 2>&1 | tail -4 | tee -a "$LOG"
  fi
  SP=(); [ -f "$OUT/speed_firstframe.json" ] && SP=(--speed "$OUT/speed_firstframe.json")
  [ -f "$OUT/ablation.json" ] && $PY -m benchmarks.ablation table "$OUT/ablation.json" "${SP[@]}" | tee "$OUT/ablation_table.md"
fi

# Exports asked for (15 MiB parts), then every small file of the run in one tar.
for s in $KEEP; do
  w=$RUN/base/$s/$s.safetensors
  [ -f "$w" ] && $PY -c "import sys; from pathlib import Path; from worldmodel.checkpoint import write_parts; \
print(*write_parts(sys.argv[1], Path(sys.argv[1]).read_bytes(), 15 * 2**20))" "$w" \
    && cp "$w".part[0-9][0-9][0-9] "$OUT"/
done
cp "$DATA/manifest.json" "$RUN/data_manifest.json" 2>/dev/null
(cd "$RUN" && tar -czf "$OUT/abl_small.tar.gz" --exclude="*.safetensors*" --exclude=state.pt --exclude=ode_pairs \
  --exclude="latents-*.pt" .)
ls -la "$OUT"
echo "call took $(elapsed)s"
