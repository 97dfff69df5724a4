#!/usr/bin/env bash
# Issue 6 (speed): the frame-wise cached step eager vs static vs CUDA graph on this GPU, shipped architecture
# (configs/default.yaml: DiT S, decoder 48, cache 7, no sink), bf16, B = 1, 8, 64, 256, random weights seeded
# alike in every run (benchmarks/speed.py). First the CUDA tests of tests/test_graphed.py (graph == eager).
#   bash scripts/gpu_speed_graphs.sh      (repo root; ~2-3 minutes on one H200; FRAMES=40 calls per row)
#   DEVICE=cpu CONFIG=... FRAMES=2 bash scripts/gpu_speed_graphs.sh   (a dry run of the script itself)
# Writes to $OUT: speed_frame2.{json,md} (frame-2: eager, static, graph), speed_frame14.{json,md} (frame-1 and
# frame-4: eager, graph), speed_layout.{json,md} (frame-2 with a contiguous NCHW decoder at B 64, 256),
# summary.md and log.txt (everything stderr said); prints the summary table last.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TQDM_DISABLE=1
PY=${PY:-python3}
FRAMES=${FRAMES:-40}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-configs/default.yaml}
LOG=$OUT/log.txt
: >"$LOG"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

echo "== tests/test_graphed.py (CPU tests + CUDA graph == eager on this GPU)"
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_graphed.py 2>&1 | tail -4 | tee -a "$LOG"

bench() {  # name, timeout seconds, then benchmarks.speed arguments
  local name=$1 limit=$2; shift 2
  echo "== speed $name: $*"
  timeout "$limit" $PY -m benchmarks.speed --device "$DEVICE" --dtype bf16 --config "$CONFIG" --frames "$FRAMES" \
    --out "$OUT/speed_$name.json" "$@" >>"$LOG" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && echo "speed $name: exit $rc (see log.txt)"
  grep -E "capture failed|Error|Traceback" "$LOG" | sort -u | tail -5
}
bench frame2 80 --samplers frame-2 --paths eager static graph --batches 1 8 64 256
bench frame14 80 --samplers frame-1 frame-4 --paths eager graph --batches 1 8 64 256
bench layout 40 --samplers frame-2 --paths eager graph --batches 64 256 --decoder-layout contiguous

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for name in ("frame2", "frame14", "layout"):
    p = out / f"speed_{name}.json"
    if p.is_file():
        rows += json.loads(p.read_text())["rows"]
by = {}
for r in rows:
    by.setdefault((r["sampler"], r["decoder_layout"], r["batch"]), {})[r["path"]] = r
lines = ["| sampler | decoder | B | eager ms | static ms | graph ms | eager fps | graph fps | graph / eager | capture ms | floor ms |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]


def ms(r):
    return f"{r['step_median_ms']:.2f}" if r else "-"


for (sampler, layout, b), paths in sorted(by.items(), key=lambda kv: (kv[0][1] != "channels_last", kv[0][0], kv[0][2])):
    e, s, g = paths.get("eager"), paths.get("static"), paths.get("graph")
    graph_ms = "-" if not g else ms(g) + ("" if g.get("graphed") else " (NOT captured)")
    speedup = f"{e['step_median_ms'] / g['step_median_ms']:.1f}x" if e and g else "-"
    fps = lambda r: f"{r['fps']:.0f}" if r else "-"  # noqa: E731
    capture = f"{g['capture_ms']:.0f}" if g and g.get("graphed") else "-"
    floor = f"{next(iter(paths.values()))['floor_ms']:.2f}"
    lines.append(f"| {sampler} | {layout} | {b} | {ms(e)} | {ms(s)} | {graph_ms} | {fps(e)} | {fps(g)} | {speedup} | "
                 f"{capture} | {floor} |")
errors = sorted({r["capture_error"] for r in rows if r.get("capture_error")})
text = "\n".join(lines) + "\n" + "".join(f"\ncapture error: {e}" for e in errors) + "\n"
(out / "summary.md").write_text(text)
print("\nsteady per-frame median (2 warm-up calls + 1 for capture excluded), decode to uint8 on the host included:")
print(text)
EOF
