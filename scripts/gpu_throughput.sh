#!/usr/bin/env bash
# Training throughput of every stage at the shipped sizes on this GPU (random weights, synthetic data;
# benchmarks/train_throughput.py), a smoke test of each stage's GPU path before the real build, and the
# autoencoder's memory-format A/B. Writes $OUT/throughput.json and /tmp/channels_last (the faster setting).
#   bash scripts/gpu_throughput.sh [ae]   (about a minute on one H200; `ae`: only the autoencoder A/B)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"; rm -f /tmp/tp_*.json
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PY:-python3}
run() {  # name, then train_throughput arguments
  local name=$1; shift
  timeout 90 $PY -m benchmarks.train_throughput --device ${DEVICE:-cuda} --steps ${STEPS:-10} --warmup 5 --config ${CONFIG:-configs/default.yaml} --json /tmp/tp_$name.json "$@" \
    2>&1 | grep -E "steps/s|Error|error" | tail -3
}
run ae_cl --stage autoencoder --batch 16 stage.channels_last=true
run ae_nchw --stage autoencoder --batch 16 stage.channels_last=false
if [ "${1:-all}" != ae ]; then
  run dit --stage teacher,ar_diffusion,causal_cd
  run dmd --stage dmd --batch 64
fi
$PY - "$OUT/throughput.json" <<'EOF'
import json, sys
from pathlib import Path
rows = {}
for name in ("ae_cl", "ae_nchw", "dit", "dmd"):
    p = Path(f"/tmp/tp_{name}.json")
    rows[name] = json.loads(p.read_text()) if p.is_file() else None
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
cl, nchw = (rows[k][0]["steps_per_s"] if rows[k] else 0.0 for k in ("ae_cl", "ae_nchw"))
Path("/tmp/channels_last").write_text("true" if cl > nchw else "false")
print(f"autoencoder steps/s: channels_last {cl:.2f}, contiguous {nchw:.2f} -> channels_last={cl > nchw}")
for name, r in rows.items():
    for row in r or []:
        print(f"{row['stage']:>12} batch {row['batch']:>4}: {row['steps_per_s']:7.2f} steps/s {row['clips_per_s']:8.0f} clips/s "
              f"{row['tokens_per_s'] / 1e6:6.2f} M tokens/s, start {row['start_s']:.1f} s")
EOF
