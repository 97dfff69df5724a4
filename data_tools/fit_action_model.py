"""Fit the action -> pose-delta model on a recording and report its error on held-out episodes.

    python -m data_tools.fit_action_model DATA_DIR --out action_model.json

Fits both state frames ("previous" and "rotated", see data_tools.action_model) on the train split,
prints RMSE per dimension (one step, and open loop over --horizon steps) on the held-out split (the
train split if there is none), and saves the one with the lower open-loop error normalised by the
data's pose std.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data_tools.action_model import ActionModel, rmse_one_step, rmse_open_loop
from data_tools.poses import DELTA_NAMES, pose_deltas
from data_tools.shards import load_episode, read_manifest


def load_split(data_dir: str, split: str):
    """-> (actions (N,4), deltas (N,5), episode_starts) of all episodes of a split, concatenated."""
    m = read_manifest(data_dir)
    acts, dels, starts, n = [], [], [], 0
    for e in m["episodes"]:
        if e.get("split", "train") != split:
            continue
        ep = load_episode(data_dir, e, m)
        starts.append(n)
        n += len(ep["actions"])
        acts.append(ep["actions"]), dels.append(pose_deltas(ep["poses"]))
    if not acts:
        return None
    return np.concatenate(acts), np.concatenate(dels), starts


def fit_and_report(data_dir: str, horizon: int = 32) -> tuple[ActionModel, dict]:
    train = load_split(data_dir, "train")
    if train is None:
        raise SystemExit(f"{data_dir}: no train episodes")
    held = load_split(data_dir, "heldout") or train
    std = np.asarray(read_manifest(data_dir)["pose_stats"]["std"])
    report, best = {}, None
    for frame in ("previous", "rotated"):
        model = ActionModel.fit(*train, frame=frame)
        one = rmse_one_step(model, *held)
        ol = rmse_open_loop(model, *held, horizon=horizon)
        score = float((ol / std).mean())
        report[frame] = {"one_step": one.tolist(), "open_loop": ol.tolist(), "score": score}
        if best is None or score < best[0]:
            best = (score, model)
    return best[1], report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.fit_action_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--out", default="action_model.json")
    p.add_argument("--horizon", type=int, default=32)
    a = p.parse_args(argv)
    model, report = fit_and_report(a.data_dir, a.horizon)
    head = " ".join(f"{n:>8}" for n in DELTA_NAMES)
    for frame, r in report.items():
        print(f"[{frame}] held-out RMSE per dim        {head}")
        print(f"  one step                              " + " ".join(f"{v:8.3f}" for v in r["one_step"]))
        print(f"  open loop {a.horizon:3d} steps                   " + " ".join(f"{v:8.3f}" for v in r["open_loop"]))
        print(f"  open-loop RMSE / pose std, mean: {r['score']:.3f}")
    Path(a.out).write_text(model.to_json())
    print(f"saved frame='{model.frame}' model to {a.out}")


if __name__ == "__main__":
    main()
