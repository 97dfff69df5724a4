"""Training throughput of each stage through the real loop: `python -m benchmarks.train_throughput
--config configs/default.yaml --stage teacher[,dmd,...] --batch 64 --steps 30 [--warmup 10] [--device cuda]
[--sync-debug] [--json out.json] [section.key=value ...]`.

For every stage it writes synthetic data of the config's frame size (random frames and poses: speed does
not depend on the values) and random-init checkpoints (autoencoder, DiT) into a temporary directory,
builds the stage as `worldmodel.train` does and runs `training.loop.train` for warm-up + timed steps:
the same DataLoader, latent table, autocast, EMA and log-line syncs as a real run. The timed window is
between two log lines (the loop synchronises the device there), so asynchronous CUDA work is counted.
Prints steps/s, clips/s and tokens/s (clips x frames x tokens per frame) and a table, one line a stage.

`--sync-debug` (CUDA) turns on torch's sync debug mode for the timed steps and prints where the host
waited for the device; the loop's log line (`MetricSums.means`) is expected once per `--warmup` steps.
Stages: autoencoder, teacher, ar_diffusion, causal_cd, causal_ode, dmd (causal_ode spends its first
steps generating `stage.ode_samples` teacher trajectories, so its numbers mix the two phases).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from worldmodel.config import RunConfig, load_config

STAGES = ("autoencoder", "teacher", "ar_diffusion", "causal_cd", "causal_ode", "dmd")
SYNC_WARNING = "synchronizing CUDA operation"


def write_data(out: Path, cfg: RunConfig, clips: int, episodes: int = 4) -> Path:
    """A recorded-format data dir of at least `clips` clips: random uint8 frames and a random walk of poses
    (speed does not depend on what the frames show)."""
    from data_tools.poses import pose_deltas
    from data_tools.shards import compute_pose_stats, write_episode, write_manifest

    rng = np.random.default_rng(0)
    T, H, W = cfg.data.clip_frames, cfg.data.frame_height, cfg.data.frame_width
    frames = -(-clips // episodes) + T - 1
    entries, deltas = [], []
    for e in range(episodes):
        poses = np.cumsum(rng.normal(0, 1, (frames, 5)), axis=0).astype(np.float32)
        entry = write_episode(out / "episodes" / f"ep_{e:05d}.npz", rng.integers(0, 256, (frames, H, W, 3), np.uint8),
                              poses, np.zeros((frames, 4), np.float32))
        entries.append(entry | {"split": "train"})
        deltas.append(pose_deltas(poses))
    write_manifest(out, {"engine": "synthetic", "frame_height": H, "frame_width": W, "format_version": 1,
                         "pose_stats": compute_pose_stats(deltas), "episodes": entries})
    return out


def write_checkpoints(out: Path, cfg: RunConfig, pose_stats: dict) -> dict[str, str]:
    """Random-init autoencoder and DiT exports -> the stage.* overrides that wire them."""
    from worldmodel.checkpoint import save_weights
    from worldmodel.models.autoencoder import Autoencoder
    from worldmodel.models.dit import WorldDiT

    torch.manual_seed(0)
    meta = {"config": cfg.to_dict(), "step": 0, "pose_stats": pose_stats}
    ae = save_weights(out / "autoencoder", Autoencoder(cfg.autoencoder), meta | {"stage": "autoencoder"})
    dit = save_weights(out / "dit", WorldDiT(cfg.dit), meta | {"stage": "teacher"}, dtype=None)
    return {"autoencoder": str(ae), "teacher": str(dit), "init": str(dit), "ode_pairs_dir": str(out / "ode_pairs")}


def run_stage(name: str, cfg: RunConfig, work: Path, device: torch.device, warmup: int, steps: int,
              sync_debug: bool) -> dict:
    from data_tools.shards import ClipDataset, read_manifest
    from worldmodel.training.loop import seed_everything, train
    from worldmodel.training.registry import build_stage

    t0 = time.time()
    # One epoch holds every step: a DataLoader restarting its workers' prefetch mid-run is not what a run
    # on real data (hundreds of batches per epoch) pays.
    data = write_data(work / "data", cfg, clips=cfg.data.batch_size * (warmup + steps + 1))
    stats = read_manifest(data)["pose_stats"]
    for field, path in write_checkpoints(work, cfg, stats).items():
        setattr(cfg.stage, field, path)
    seed_everything(cfg.seed)
    stage = build_stage(name, cfg, device, stats)
    first, last = warmup, warmup + steps  # log lines at both: the loop logs every `warmup` steps
    sites: collections.Counter = collections.Counter()
    if sync_debug and device.type == "cuda":
        step_fn = stage.step

        def step(batch, i):  # watch steps first .. last - 1 and the loop around them
            if i in (first, last - 1):
                torch.cuda.set_sync_debug_mode("warn" if i == first else "default")
            return step_fn(batch, i)

        stage.step = step
    t_train = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(stage, ClipDataset(data, cfg.data.clip_frames), cfg, work / "run", device=device)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if SYNC_WARNING in str(w.message):
            sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
    log = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed"] for r in log}
    per_step = (elapsed[last] - elapsed[first]) / steps  # both lines written right after a device sync
    clips = cfg.data.batch_size / per_step
    frames = cfg.data.clip_frames
    return {"stage": name, "device": str(device), "batch": cfg.data.batch_size, "frames": frames,
            "tokens_per_frame": cfg.dit.tokens_per_frame, "steps_per_s": 1 / per_step, "clips_per_s": clips,
            "tokens_per_s": clips * frames * cfg.dit.tokens_per_frame, "ms_per_step": 1e3 * per_step,
            # data, checkpoints, stage, latent table and the first step: what a run pays before it trains
            "start_s": t_train - t0 + elapsed[1],
            "syncs": dict(sites) if sync_debug else None, "loss": summary["metrics"].get("loss")}


COLUMNS = ("stage", "device", "batch", "frames", "tokens_per_frame", "steps_per_s", "clips_per_s", "tokens_per_s",
           "ms_per_step", "start_s")


def table(rows: list[dict]) -> str:
    def fmt(v) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    cells = [list(COLUMNS)] + [[fmt(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml", help="RunConfig YAML (default: %(default)s)")
    p.add_argument("--stage", default="teacher", help=f"comma-separated stages of {STAGES} (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="data.batch_size (default: the config's)")
    p.add_argument("--steps", type=int, default=30, help="timed steps, rounded up to a multiple of --warmup")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (and the log interval)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: report host syncs within the timed steps")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--work", default=None,
                   help="directory for data, checkpoints and runs (default: a temp dir, removed at the end)")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides, e.g. dit.dim=256")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    names = [s.strip() for s in a.stage.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or a.warmup < 1 or a.steps < 1:
        raise SystemExit(f"--stage must name stages of {STAGES} (got {unknown}); --warmup and --steps must be >= 1")
    steps = -(-a.steps // a.warmup) * a.warmup
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    root = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="train_throughput_"))
    rows = []
    try:
        for name in names:
            over = list(a.overrides) + ([f"data.batch_size={a.batch}"] if a.batch else [])
            over += [f"stage.steps={a.warmup + steps}", f"stage.log_every={a.warmup}",
                     "stage.checkpoint_every=1000000000"]
            cfg = load_config(a.config, over)
            work = root / name
            shutil.rmtree(work, ignore_errors=True)
            rows.append(run_stage(name, cfg, work, device, a.warmup, steps, a.sync_debug))
            r = rows[-1]
            print(f"{name}: {r['steps_per_s']:.2f} steps/s, {r['clips_per_s']:.1f} clips/s, "
                  f"{r['tokens_per_s']:.0f} tokens/s ({steps} steps after {a.warmup} warm-up)", flush=True)
            if r["syncs"] is not None:
                print(f"{name}: host syncs in the timed steps: {r['syncs'] or 'none'}", flush=True)
    finally:
        if not a.work:
            shutil.rmtree(root, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
