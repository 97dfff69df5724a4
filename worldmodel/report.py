"""RUN_DIR/report.md of a build, with two PNGs drawn by OpenCV (matplotlib is not a dependency):

- loss_curves.png: one panel per stage, its logged `loss` (log scale) against the stage's step (steps of a
  segment restarted from exported weights continue after the steps already in those weights);
- sample_strip.png: context | generated | ground truth on a held-out episode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

PANEL_W, PANEL_H, MARGIN = 360, 220, 40
FONT = cv2.FONT_HERSHEY_SIMPLEX
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]  # RGB


def loss_curve(metrics_path: Path, segments: list[dict[str, Any]], key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) from a stage's metrics.jsonl. Lines from segments[k]["metrics_line"] on are that
    segment's, their steps shifted by its offset; a step logged twice (a resume after a kill re-runs the
    steps since the last checkpoint) keeps its last value."""
    if not metrics_path.is_file():
        return np.zeros(0), np.zeros(0)
    lines = metrics_path.read_text().splitlines()
    starts = [(int(s.get("metrics_line", 0)), int(s.get("offset", 0))) for s in segments] or [(0, 0)]
    points: dict[int, float] = {}
    for i, line in enumerate(lines):
        offset = next((o for first, o in reversed(starts) if first <= i), 0)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if key in rec:
            points[offset + int(rec["step"])] = float(rec[key])
    steps = np.array(sorted(points), dtype=np.float64)
    return steps, np.array([points[int(s)] for s in steps], dtype=np.float64)


def _text(img: np.ndarray, text: str, xy: tuple[int, int], scale: float = 0.4, colour=(0, 0, 0)) -> None:
    cv2.putText(img, text, xy, FONT, scale, colour, 1, cv2.LINE_AA)


def _panel(name: str, steps: np.ndarray, values: np.ndarray, colour) -> np.ndarray:
    """One white (PANEL_H, PANEL_W, 3) RGB panel: log10(value) against step, min/max labelled."""
    img = np.full((PANEL_H, PANEL_W, 3), 255, np.uint8)
    x0, y0, x1, y1 = MARGIN + 10, 24, PANEL_W - 10, PANEL_H - 28  # plot area
    cv2.rectangle(img, (x0, y0), (x1, y1), (160, 160, 160), 1)
    ok = np.isfinite(values)
    steps, values = steps[ok], values[ok]
    log_scale = len(values) > 0 and bool((values > 0).all())
    _text(img, f"{name}" + (f"  last {values[-1]:.4g}" if len(values) else "  (no log yet)"), (x0, 16), 0.45)
    if len(values) == 0:
        return img
    y = np.log10(values) if log_scale else values
    lo, hi = float(y.min()), float(y.max())
    hi = hi if hi > lo else lo + 1e-6
    s_lo, s_hi = float(steps.min()), float(max(steps.max(), steps.min() + 1))
    px = x0 + (steps - s_lo) / (s_hi - s_lo) * (x1 - x0)
    py = y1 - (y - lo) / (hi - lo) * (y1 - y0)
    pts = np.stack([px, py], 1).round().astype(np.int32)
    if len(pts) == 1:
        cv2.circle(img, tuple(int(v) for v in pts[0]), 3, colour, -1)
    else:
        cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, colour, 1, cv2.LINE_AA)
    fmt = (lambda v: f"{10 ** v:.3g}") if log_scale else (lambda v: f"{v:.3g}")
    _text(img, fmt(hi), (2, y0 + 8), 0.35)
    _text(img, fmt(lo), (2, y1), 0.35)
    _text(img, f"{int(s_lo)}", (x0, y1 + 14), 0.35)
    _text(img, f"{int(s_hi)} steps", (x1 - 70, y1 + 14), 0.35)
    _text(img, "loss (log scale)" if log_scale else "loss", (x0 + 4, y1 + 24), 0.3, (90, 90, 90))
    return img


def draw_loss_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, cols: int = 3) -> Path | None:
    """curves: stage -> (steps, losses); a grid of panels written as PNG."""
    if not curves:
        return None
    panels = [_panel(n, s, v, COLOURS[i % len(COLOURS)]) for i, (n, (s, v)) in enumerate(curves.items())]
    while len(panels) % cols and len(panels) > cols:
        panels.append(np.full_like(panels[0], 255))
    rows = [np.concatenate(panels[i:i + cols], 1) for i in range(0, len(panels), cols)]
    img = np.concatenate(rows, 0)
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return path


def _label_column(img: np.ndarray, label: str, scale: int) -> np.ndarray:
    """img (h, w, 3) with a white band above holding `label`."""
    band = np.full((14, img.shape[1], 3), 255, np.uint8)
    _text(band, label, (2, 11), 0.35 if scale < 3 else 0.4)
    return np.concatenate([band, img], 0)


def draw_sample_strip(context: np.ndarray, generated: np.ndarray, truth: np.ndarray, path: Path,
                      horizons=(1, 2, 4, 8, 16, 32)) -> Path:
    """context (T0,H,W,3), generated / truth (L,H,W,3) uint8 RGB -> PNG with two rows (generated, truth),
    each: the context frames | the frames at `horizons` (1 = the first generated frame)."""
    H, W = context.shape[1:3]
    scale = max(1, 96 // H)  # tiny test worlds are 32 px high: enlarge so they can be seen
    up = lambda f: cv2.resize(f, (W * scale, H * scale), interpolation=cv2.INTER_NEAREST)  # noqa: E731
    gap = np.full((H * scale + 14, 6, 3), 255, np.uint8)
    hs = [h for h in horizons if h <= len(generated)]
    rows = []
    for name, frames in (("generated", generated), ("ground truth", truth)):
        cols = [_label_column(up(f), f"ctx {i - len(context) + 1}", scale) for i, f in enumerate(context)]
        cols.append(gap)
        cols += [_label_column(up(frames[h - 1]), f"h{h}", scale) for h in hs]
        row = np.concatenate(cols, 1)
        title = np.full((16, row.shape[1], 3), 255, np.uint8)
        _text(title, name, (2, 12), 0.45)
        rows.append(np.concatenate([title, row], 0))
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))
    return path


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def render_markdown(summary: dict[str, Any], ledger: dict[str, Any], run_dir: Path) -> str:
    lines = [f"# Build report: `{run_dir}`", "",
             f"Data: `{ledger.get('data_dir')}` (manifest sha256 `{str(ledger.get('data_manifest_sha256'))[:12]}`), "
             f"config `{ledger.get('config_file')}`" + (f", plan `{ledger['plan']}`" if ledger.get("plan") else "")
             + (f", overrides `{' '.join(ledger['overrides'])}`" if ledger.get("overrides") else "") + ".", "",
             "Status: " + ("complete" if summary["complete"] else
                           "**incomplete** (time budget): run the same command again to continue") + ".", "",
             "| stage | step / target | GPU-s | peak GiB | segments | last metrics |", "|---|---|---|---|---|---|"]
    for name, s in summary["stages"].items():
        segs = len(ledger.get("stages", {}).get(name, {}).get("segments", []))
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in list(s.metrics.items())[:4])
        lines.append(f"| {name} | {s.step} / {s.target} | {s.gpu_seconds:.0f} | {_gib(s.peak_mem)} | {segs} "
                     f"| {metrics} |")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    prov = summary.get("provenance")
    if prov:
        lines += [f"World: `{summary['world']}`, student = {prov['student']}. "
                  f"Play: `python play.py --world {summary['world']}`.", ""]
        am = prov["action_model"]
        rmse = am["heldout_rmse"][am["frame"]]
        lines += [f"Action model (`frame={am['frame']}`): held-out RMSE one step "
                  f"{', '.join(f'{v:.3g}' for v in rmse['one_step'])}; open loop "
                  f"{', '.join(f'{v:.3g}' for v in rmse['open_loop'])} (forward, strafe, up, dyaw, dpitch).", ""]
        if prov.get("eval"):
            from worldmodel.eval import markdown

            lines += [markdown(prov["eval"]).replace("# Fidelity", "## Held-out fidelity"), ""]
        if (run_dir / "sample_strip.png").is_file():
            lines += ["Sample (held-out episode): context | generated | ground truth", "",
                      "![sample](sample_strip.png)", ""]
    return "\n".join(lines)


def write_report(run_dir: Path, summary: dict[str, Any], ledger: dict[str, Any]) -> Path:
    """RUN_DIR/report.md + RUN_DIR/loss_curves.png from a build summary and the ledger (build.json)."""
    run_dir = Path(run_dir)
    curves = {n: loss_curve(run_dir / n / "metrics.jsonl", ledger.get("stages", {}).get(n, {}).get("segments", []))
              for n in summary["stages"]}
    draw_loss_curves(curves, run_dir / "loss_curves.png")
    path = run_dir / "report.md"
    path.write_text(render_markdown(summary, ledger, run_dir))
    return path
