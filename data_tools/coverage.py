"""Coverage histogram of recorded pose deltas, drawn with OpenCV (no matplotlib dependency).

One panel per delta dimension (log-scaled counts, so rare motions stay visible) and one 2D panel
of forward speed against yaw rate: the pairs a player combines (walk while turning).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from data_tools.poses import DELTA_NAMES

PANEL_W, PANEL_H, BINS = 320, 180, 48


def _hist_panel(values: np.ndarray, name: str) -> np.ndarray:
    img = np.full((PANEL_H, PANEL_W, 3), 255, np.uint8)
    lo, hi = np.percentile(values, [0.5, 99.5]) if len(values) else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 1.0, hi + 1.0
    counts, _ = np.histogram(np.clip(values, lo, hi), bins=BINS, range=(lo, hi))
    h = np.log1p(counts) / max(np.log1p(counts.max()), 1e-9)
    top, bottom, bw = 22, PANEL_H - 22, (PANEL_W - 20) / BINS
    for i, v in enumerate(h):
        x0 = int(10 + i * bw)
        cv2.rectangle(img, (x0, int(bottom - v * (bottom - top))), (int(x0 + bw) - 1, bottom), (180, 90, 30), -1)
    cv2.putText(img, f"{name} (log count)", (10, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(img, f"{lo:.2f}", (10, PANEL_H - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(img, f"{hi:.2f}", (PANEL_W - 60, PANEL_H - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    return img


def _joint_panel(fwd: np.ndarray, dyaw: np.ndarray) -> np.ndarray:
    img = np.full((PANEL_H, PANEL_W, 3), 255, np.uint8)
    fr = np.percentile(fwd, [0.5, 99.5]) if len(fwd) else (0, 1)
    yr = np.percentile(dyaw, [0.5, 99.5]) if len(dyaw) else (0, 1)
    fr = (fr[0] - 1e-3, fr[1] + 1e-3)
    yr = (yr[0] - 1e-3, yr[1] + 1e-3)
    counts, _, _ = np.histogram2d(np.clip(dyaw, *yr), np.clip(fwd, *fr), bins=(BINS, BINS), range=(yr, fr))
    m = (np.log1p(counts) / max(np.log1p(counts.max()), 1e-9) * 255).astype(np.uint8)
    heat = cv2.applyColorMap(255 - m, cv2.COLORMAP_BONE)
    heat = cv2.resize(heat.transpose(1, 0, 2)[::-1], (PANEL_W - 20, PANEL_H - 40), interpolation=cv2.INTER_NEAREST)
    img[22:PANEL_H - 18, 10:PANEL_W - 10] = heat
    cv2.putText(img, f"forward [{fr[0]:.1f},{fr[1]:.1f}] (up) vs dyaw [{yr[0]:.0f},{yr[1]:.0f}]", (10, 15),
                cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1)
    return img


def coverage_image(deltas: np.ndarray) -> np.ndarray:
    """deltas: (N, 5) -> uint8 BGR image (2 rows x 3 panels)."""
    d = np.asarray(deltas, dtype=np.float64).reshape(-1, 5)
    panels = [_hist_panel(d[:, k], DELTA_NAMES[k]) for k in range(5)] + [_joint_panel(d[:, 0], d[:, 3])]
    return np.vstack([np.hstack(panels[:3]), np.hstack(panels[3:])])


def write_coverage_png(path: str | Path, deltas: np.ndarray) -> None:
    if not cv2.imwrite(str(path), coverage_image(deltas)):
        raise OSError(f"could not write coverage image {path}")
