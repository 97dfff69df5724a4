#!/usr/bin/env bash
# One GPU call of the shipped world's build (issue 5; docs/GPU_RUN_PLAN.md): record the data if this machine
# has none, train the given stages with `worldmodel.build` for what is left of BUDGET seconds, and put what a
# later call or session needs into $OUT (at most 8 files of 16 MiB: the new exports in 15 MiB parts and one
# tar of the small files: ledger, export JSONs, metrics, logs, data manifest).
#
#   bash scripts/gpu_build_world.sh STAGES BUDGET [build args...]    (device tool: carry .carry)
#   e.g. bash scripts/gpu_build_world.sh autoencoder,teacher 560
#
# Calls chained on one warm machine reuse /tmp/data and /tmp/run (full training states). On a fresh machine
# the data is re-recorded (deterministic: same seed, same frames) and the run directory is restored from
# .carry/run (what earlier calls brought back: exports + ledger), so a stage continues warm from its bf16
# export. Packaging (evaluation, start contexts, world directory) runs on the CPU afterwards: --no-package.
set -uo pipefail
STAGES=${1:?stages, e.g. autoencoder,teacher}
BUDGET=${2:?seconds for this call}
shift 2
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
# Overridable for a CPU dry run of the same script (tiny config, a few short episodes).
DATA=${DATA:-/tmp/data} RUN=${RUN:-/tmp/run} PY=${PY:-python3}
CONFIG=${CONFIG:-configs/default.yaml} PLAN=${PLAN:-configs/build_default.yaml}
RECORD=${RECORD:---episodes 192 --heldout-episodes 8 --frames-per-episode 1000}
SITE=${SITE:-/tmp/site}   # where the carried cp312 vizdoom wheel is unpacked; SITE=none uses the installed vizdoom
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$PWD NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader 2>/dev/null || echo "no GPU"
if [ "$SITE" != none ] && [ ! -d "$SITE/vizdoom" ]; then
  mkdir -p "$SITE" && tar -xJf .carry/site.tar.xz -C "$SITE" || exit 1
fi
# AE_AB=1: the autoencoder's memory-format A/B (scripts/gpu_throughput.sh ae) runs on the GPU while the CPUs
# record, and the faster layout is passed to the autoencoder stage.
EXTRA=()
if [ "${AE_AB:-0}" = 1 ]; then OUT=/tmp/ab bash scripts/gpu_throughput.sh ae > /tmp/ab.log 2>&1 & AB_PID=$!; fi
if [ ! -f $DATA/manifest.json ]; then
  $PY -m data_tools.record --out $DATA $RECORD --workers "$(nproc)" --seed 0 --no-progress 2>&1 | tail -3
fi
# Episode hashes: the CPU re-records the same data for packaging, and these must match it.
$PY -c "import json; e=json.load(open('$DATA/manifest.json'))['episodes']; print('episode sha256', [x['sha256'][:10] for x in e[:3] + e[-2:]])"
if [ "${AE_AB:-0}" = 1 ]; then
  wait $AB_PID; cat /tmp/ab.log; EXTRA+=("autoencoder.stage.channels_last=$(cat /tmp/channels_last 2>/dev/null || echo false)")
  cp /tmp/ab/throughput.json "$OUT/throughput_ae.json" 2>/dev/null
fi
if [ ! -f $RUN/build.json ] && [ -f .carry/run/build.json ]; then
  cp -r .carry/run $RUN && echo "restored $RUN from .carry/run"
fi
LEFT=$(( BUDGET - ($(date +%s) - T0) - 15 ))   # 15 s to collect the files
echo "build: stages $STAGES, budget ${LEFT}s"
$PY -m worldmodel.build $DATA --out $RUN --config $CONFIG --plan $PLAN \
  --stages "$STAGES" --time-budget "$LEFT" --export-split-mb 15 --no-package "${EXTRA[@]}" "$@" 2>&1 \
  | tr '\r' '\n' | tee /tmp/build_log.txt | grep -v -E "[0-9]%\||^\s*$"
echo "build exit ${PIPESTATUS[0]}"
# The new exports, split (parts) or whole (small ones), then everything small in one tar.
for s in ${STAGES//,/ }; do
  w=$RUN/$s/$s.safetensors
  if ls "$w".part[0-9][0-9][0-9] >/dev/null 2>&1; then cp "$w".part[0-9][0-9][0-9] "$OUT"/; elif [ -f "$w" ]; then cp "$w" "$OUT"/; fi
done
cp /tmp/build_log.txt $RUN/build_log_$(date +%H%M%S).txt
cp $DATA/manifest.json $RUN/data_manifest.json
(cd $RUN && tar -czf "$OUT/run_small.tar.gz" --exclude="*.safetensors*" --exclude=state.pt --exclude=ode_pairs --exclude="latents-*.pt" .)
ls -la "$OUT"
echo "call took $(( $(date +%s) - T0 ))s"
