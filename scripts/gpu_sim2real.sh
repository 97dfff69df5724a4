#!/usr/bin/env bash
# One GPU call of issue 10's training (benchmarks/sim2real.py): the PPO agent trained inside the world model
# (GPU-batched worlds) and, at the same time on the machine's CPU cores, the same agent in the real engine.
# Both resume from /tmp/agents (a warm machine) or from .carry/agents (what an earlier call brought back),
# stop at BUDGET seconds or STEPS env steps, and bring back ppo_model.pt / ppo_engine.pt and logs in $OUT.
# Evaluation runs on the CPU afterwards: python -m benchmarks.sim2real evaluate --agents <files_at> ...
#
#   bash scripts/gpu_sim2real.sh BUDGET STEPS [MODEL_ENVS ENGINE_ENVS [COLLISION]]   (device tool: carry .carry)
# ENGINE_ENVS=0 skips the engine agent; COLLISION (a path to an envs/collision.py gate) trains ppo_model_walls.
set -uo pipefail
BUDGET=${1:?seconds for this call}
STEPS=${2:?env steps per agent}
MODEL_ENVS=${3:-256}
ENGINE_ENVS=${4:-12}
COLLISION=${5:-}
OUT=${OUT:-/tmp/out} SITE=${SITE:-/tmp/site} AGENTS=${AGENTS:-/tmp/agents} PY=${PY:-python3}
mkdir -p "$OUT" "$AGENTS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
if [ ! -d "$SITE/vizdoom" ]; then mkdir -p "$SITE" && tar -xJf .carry/site.tar.xz -C "$SITE" || exit 1; fi
chmod +x "$SITE/vizdoom/vizdoom"  # the engine binary: without its exec bit, DoomGame.init() segfaults
for f in ppo_model.pt ppo_model_walls.pt ppo_engine.pt; do
  if [ ! -f "$AGENTS/$f" ] && [ -f ".carry/agents/$f" ]; then cp ".carry/agents/$f" "$AGENTS/"; fi
done
# Leave ~25 s for start-up and collection of the outputs.
TRAIN=$((BUDGET - 25))
COMMON=(--device cuda --total-steps "$STEPS" --time-budget "$TRAIN" --minibatch 1024 --out "$AGENTS")
ENGINE_PID=
if [ "$ENGINE_ENVS" -gt 0 ]; then
  OMP_NUM_THREADS=2 $PY -m benchmarks.sim2real train --where engine --num-envs "$ENGINE_ENVS" "${COMMON[@]}" \
    > "$OUT/train_engine.log" 2>&1 &
  ENGINE_PID=$!
fi
WALLS=()
if [ -n "$COLLISION" ]; then WALLS=(--collision "$COLLISION"); fi
$PY -m benchmarks.sim2real train --where model --num-envs "$MODEL_ENVS" "${COMMON[@]}" "${WALLS[@]}" \
  > "$OUT/train_model.log" 2>&1
if [ -n "$ENGINE_PID" ]; then wait $ENGINE_PID; fi
cp "$AGENTS"/ppo_*.pt "$OUT/" 2>/dev/null
ls -la "$OUT"
for w in engine model; do [ -f "$OUT/train_$w.log" ] && { echo "== $w"; tail -4 "$OUT/train_$w.log"; }; done
