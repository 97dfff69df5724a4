"""Measure the image-only pose annotator against the recorder's ground truth.

    python -m data_tools.eval_poses DATA_DIR [--split heldout] [--max-episodes N]

Prints yaw error (deg/frame, median and p90, over all frames after the first) and the translation
direction error (deg, on frames that really moved: ground-truth speed > --min-speed map units/frame
and where the annotator reported translation), plus how often real motion was detected at all.
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from data_tools.annotator import estimate_deltas
from data_tools.poses import pose_deltas
from data_tools.shards import load_episode, read_manifest


def compare(est: np.ndarray, gt: np.ndarray, min_speed: float = 4.0) -> dict:
    """est, gt: (N, 5) deltas of one or more sequences (frame-0 rows already dropped)."""
    yaw_err = np.abs((est[:, 3] - gt[:, 3] + 180.0) % 360.0 - 180.0)
    moving = np.linalg.norm(gt[:, :3], axis=1) > min_speed
    has_t = np.linalg.norm(est[:, :3], axis=1) > 0
    m = moving & has_t
    g, e = gt[m, :3], est[m, :3]
    cos = (g * e).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(e, axis=1))
    dir_err = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    q = lambda a, p: float(np.percentile(a, p)) if len(a) else float("nan")  # noqa: E731
    return {"frames": int(len(gt)), "yaw_err_median": q(yaw_err, 50), "yaw_err_p90": q(yaw_err, 90),
            "yaw_err_mean": float(yaw_err.mean()) if len(yaw_err) else float("nan"),
            "moving_frames": int(moving.sum()), "motion_detected": float(m.sum() / max(moving.sum(), 1)),
            "dir_err_median": q(dir_err, 50), "dir_err_p90": q(dir_err, 90)}


def evaluate(data_dir: str, split: str = "heldout", max_episodes: int | None = None, min_speed: float = 4.0,
             progress: bool = True) -> dict:
    manifest = read_manifest(data_dir)
    entries = [e for e in manifest["episodes"] if e.get("split", "train") == split][:max_episodes]
    if not entries:
        raise SystemExit(f"{data_dir}: no '{split}' episodes (record some with --heldout-episodes)")
    ests, gts = [], []
    for entry in tqdm(entries, desc="episodes", disable=not progress):
        ep = load_episode(data_dir, entry, manifest)
        est, _ = estimate_deltas(ep["frames"], manifest["fov"])
        ests.append(est[1:]), gts.append(pose_deltas(ep["poses"])[1:])
    return compare(np.concatenate(ests), np.concatenate(gts), min_speed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.eval_poses", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--split", default="heldout", choices=["train", "heldout"])
    p.add_argument("--max-episodes", type=int, default=None)
    p.add_argument("--min-speed", type=float, default=4.0, help="map units/frame that count as real motion")
    a = p.parse_args(argv)
    r = evaluate(a.data_dir, a.split, a.max_episodes, a.min_speed)
    print(f"frames {r['frames']}: yaw error median {r['yaw_err_median']:.3f} deg/frame, p90 {r['yaw_err_p90']:.3f}, "
          f"mean {r['yaw_err_mean']:.3f}")
    print(f"moving frames {r['moving_frames']}, translation detected on {100 * r['motion_detected']:.0f}%: "
          f"direction error median {r['dir_err_median']:.1f} deg, p90 {r['dir_err_p90']:.1f}")


if __name__ == "__main__":
    main()
