#!/usr/bin/env bash
# DDP scaling of one AR-diffusion slice: the same command and the same GLOBAL batch (data.batch_size) on
# 1 GPU and on 2 GPUs (torchrun, DDP, NCCL); prints samples/s of each and the scaling efficiency
# (samples/s on 2 GPUs / (2 x samples/s on 1 GPU)), plus both runs' last loss (they train the same model).
#
# Usage (on a machine with >= 2 GPUs, from the repo root):
#   bash scripts/ddp_scaling.sh [STEPS=300] [GLOBAL_BATCH=64]
# Environment (all optional):
#   DATA=dir   data directory (manifest.json + episodes/); default: synthetic 96x128 episodes made here
#   AE=path    autoencoder .safetensors; default: a random one (speed does not depend on the weights)
#   INIT=path  teacher .safetensors for stage.init; default: a random WorldDiT of configs/default.yaml
#   CONFIG=configs/default.yaml   OUT=/tmp/out (metrics + summary)   WORK=/tmp/ddp_scaling (runs)
#   FSDP=1     also measure stage.fsdp=true on 2 GPUs
set -euo pipefail
STEPS=${1:-300}
BATCH=${2:-64}
CONFIG=${CONFIG:-configs/default.yaml}
if [ -f .carry/site.tar.xz ]; then  # packages carried to a bare device machine
  mkdir -p /tmp/site && tar -xJf .carry/site.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# NVLink multicast (NVLS) off: it is not available on every lent machine and NCCL then fails at init.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/ddp_scaling}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
GPUS=$(nvidia-smi --list-gpus | wc -l)
if [ "$GPUS" -lt 2 ]; then echo "ddp_scaling.sh needs 2 GPUs, this machine has $GPUS" >&2; exit 1; fi

if [ -z "${DATA:-}" ] || [ -z "${AE:-}" ] || [ -z "${INIT:-}" ]; then
  python3 - "$WORK" "$CONFIG" "${DATA:-}" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from synthetic import make_autoencoder_checkpoint, make_data_dir  # noqa: E402

from data_tools.shards import read_manifest  # noqa: E402
from worldmodel.checkpoint import save_weights  # noqa: E402
from worldmodel.config import load_config  # noqa: E402
from worldmodel.models.dit import WorldDiT  # noqa: E402

work, config, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = load_config(config)
if not data:
    data = make_data_dir(work / "data", episodes=17, heldout=1, frames=256,
                         height=cfg.data.frame_height, width=cfg.data.frame_width)
stats = read_manifest(data)["pose_stats"]
make_autoencoder_checkpoint(work / "autoencoder", cfg, stats)
save_weights(work / "teacher", WorldDiT(cfg.dit), {"config": cfg.to_dict(), "stage": "teacher", "step": 0,
                                                   "pose_stats": stats}, dtype=None)
print("made", data, work / "autoencoder.safetensors", work / "teacher.safetensors")
EOF
fi
DATA=${DATA:-$WORK/data}; AE=${AE:-$WORK/autoencoder.safetensors}; INIT=${INIT:-$WORK/teacher.safetensors}

ARGS=(ar_diffusion --config "$CONFIG" --data "$DATA" stage.autoencoder="$AE" stage.init="$INIT"
      stage.steps="$STEPS" stage.log_every=25 stage.checkpoint_every=1000000 data.batch_size="$BATCH")
run() {  # name, launcher...
  local name=$1; shift
  rm -rf "$WORK/$name"
  "$@" -m worldmodel.train "${ARGS[@]}" --out "$WORK/$name" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -4
  cp "$WORK/$name/metrics.jsonl" "$OUT/metrics_$name.jsonl"
}
run gpu1 python3
run gpu2 torchrun --standalone --nproc_per_node 2
if [ "${FSDP:-0}" = 1 ]; then ARGS+=(stage.fsdp=true); run gpu2_fsdp torchrun --standalone --nproc_per_node 2; fi

python3 - "$WORK" "$STEPS" "$BATCH" <<'EOF' | tee "$OUT/ddp_scaling.txt"
import json
import statistics
import sys
from pathlib import Path

work, steps, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def rate(name):
    """Median samples/s over the log intervals after the first third (past start-up and the latent cache fill)."""
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    late = [r["samples_per_s"] for r in rows if r["step"] > steps // 3] or [rows[-1]["samples_per_s"]]
    return statistics.median(late), rows[-1]["loss"]


one, loss1 = rate("gpu1")
print(f"AR diffusion, global batch {batch}, {steps} steps")
print(f"1 GPU : {one:9.1f} samples/s   last loss {loss1:.4f}")
for name in ("gpu2", "gpu2_fsdp"):
    if (work / name / "metrics.jsonl").is_file():
        two, loss2 = rate(name)
        print(f"2 GPUs ({'FSDP' if 'fsdp' in name else 'DDP'}): {two:9.1f} samples/s   last loss {loss2:.4f}   "
              f"speed-up {two / one:.2f}x   scaling efficiency {two / (2 * one):.0%}")
EOF
ls -la "$OUT"
