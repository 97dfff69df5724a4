"""Record ground-truth episodes from ViZDoom: frames, exact camera poses and the actions taken.

    python -m data_tools.record --out data/doom --episodes 64 --frames-per-episode 1000 --workers 2 --seed 0

Engine setup: Freedoom 2 (shipped in the vizdoom wheel), HUD, weapon, crosshair, messages and
screen flashes off, view bob off (`+movebob 0`), no monsters by default, hidden window, RGB24,
rendered at --render-resolution and resized with cv2.INTER_AREA to --height x --width (the engine is driven
through data_tools.engine.DoomEngine, which play.py --compare uses too). One engine process per worker (spawn);
episode k has its own seed f(--seed, k), held-out episodes draw seeds from a disjoint range, so the
same --seed gives identical frames and poses whatever --workers is.

Actions (float32 (4,) in [-1, 1]) map to ViZDoom delta buttons, per game tic (×frame_skip per frame):
    forward  -> MOVE_FORWARD_BACKWARD_DELTA  x 25    (Doom's walking forwardmove; ~8 units/tic top speed)
    strafe   -> MOVE_LEFT_RIGHT_DELTA        x 24    (Doom's walking sidemove; + = right)
    turn     -> TURN_LEFT_RIGHT_DELTA        x -3.5  degrees/tic (Doom's keyboard turn; engine + = right)
    look     -> LOOK_UP_DOWN_DELTA           x 1.5   degrees/tic (+ = up)
Walking, not running: at frame skip 4 running covers ~65 units per recorded frame, so consecutive
frames share little and both the world model and the annotator suffer. A full turn is 14 deg/frame
(a 360 in 26 frames, 3 s at 8.75 frames/s).
Pose of frame i = (POSITION_X, POSITION_Y, POSITION_Z, ANGLE, -PITCH) read after action i, i.e. the
pose frame i shows. The field of view is the engine's (90 deg horizontal at 4:3; measured with a pure
rotation fit, and ViZDoom 1.3.2 ignores a `+fov` argument, so only 90 is accepted).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.engine import (  # noqa: F401 (RecordSettings, engine_settings, make_game: public here too)
    ACTION_SCALE, ENGINE_FOV, DoomEngine, EpisodeEnded, RecordSettings, engine_settings, find_wad, make_game)
from data_tools.exploration import ExplorationPolicy
from data_tools.poses import pose_deltas
from data_tools.shards import FORMAT_VERSION, compute_pose_stats, write_episode, write_manifest

HELDOUT_SEED_OFFSET = 1_000_000  # held-out episode seeds never collide with train seeds


def episode_seed(seed: int, index: int, heldout: bool) -> int:
    return int(seed) * 10_007 + index + (HELDOUT_SEED_OFFSET if heldout else 0)


def run_episode(game, s: RecordSettings, seed: int, frames: int, actions=None, progress=None):
    """One episode -> (frames uint8 (N,H,W,3), poses (N,5), actions (N,4)); N < frames if it ended.
    `game`: a DoomEngine, or a DoomGame from make_game(s) (driven through a DoomEngine)."""
    engine = game if isinstance(game, DoomEngine) else DoomEngine(s, game=game)
    engine.reset(seed=seed)
    policy = ExplorationPolicy(seed, turn_deg_per_frame=abs(ACTION_SCALE[2]) * s.frame_skip,
                               look_deg_per_frame=ACTION_SCALE[3] * s.frame_skip)
    out_f, out_p, out_a = [], [], []
    pose = None
    for i in range(frames):
        a = np.asarray(actions[i], dtype=np.float32) if actions is not None else policy.act(pose)
        try:
            frame, pose = engine.step(a)
        except EpisodeEnded:
            break
        out_f.append(frame), out_p.append(pose), out_a.append(a)
        if progress is not None and i % 64 == 63:
            with progress.get_lock():
                progress.value += 64
    if not out_f:
        raise RuntimeError(f"episode with seed {seed} ended before its first frame (player dead at spawn?)")
    return np.stack(out_f), np.stack(out_p), np.stack(out_a).astype(np.float32)


def _worker(settings: RecordSettings, tasks: list[dict], results, progress) -> None:
    """One engine process: records its share of episodes, always closes the engine (a killed parent
    would otherwise leave orphaned vizdoom processes behind)."""
    engine = DoomEngine(settings)
    try:
        for task in tasks:
            results.put(_record_task(engine, settings, task, progress))
    except BaseException as e:  # report instead of hanging the parent on a missing result
        results.put({"error": f"{type(e).__name__}: {e}"})
    finally:
        engine.close()


def _record_task(engine: DoomEngine, settings: RecordSettings, task: dict, progress) -> dict:
    f, p, a = run_episode(engine, settings, task["seed"], task["frames"], task.get("actions"), progress)
    info = write_episode(task["path"], f, p, a)
    info.update(split=task["split"], seed=task["seed"], index=task["index"])
    return {"info": info, "poses": p, "actions": a}


def record(out: str | Path, episodes: int, frames_per_episode: int, workers: int = 1, seed: int = 0,
           heldout_episodes: int = 0, settings: RecordSettings | None = None, actions=None,
           progress: bool = True) -> dict:
    """Record into `out` (episodes/*.npz + manifest.json + coverage.png); returns the manifest.
    `actions` (M, 4): replay exactly these actions as a single train episode."""
    from data_tools.coverage import write_coverage_png

    s = settings or RecordSettings()
    out = Path(out)
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    if actions is not None:
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2 or actions.shape[1] != 4:
            raise ValueError(f"replay actions must be a list of 4-vectors, got shape {actions.shape}")
        episodes, heldout_episodes, frames_per_episode = 1, 0, len(actions)
    tasks = []
    for k in range(episodes + heldout_episodes):
        held = k >= episodes
        j = k - episodes if held else k
        tasks.append({"index": k, "split": "heldout" if held else "train", "frames": frames_per_episode,
                      "seed": episode_seed(seed, j, held), "path": str(out / "episodes" / f"ep_{k:05d}.npz"),
                      "actions": actions})
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    total = len(tasks) * frames_per_episode
    bar = tqdm(total=total, unit="frame", disable=not progress, smoothing=0.1)
    t0 = time.time()
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        engine = DoomEngine(s)
        try:
            results = []
            for t in tasks:
                results.append(_record_task(engine, s, t, counter))
                bar.update(counter.value - bar.n)
        finally:
            engine.close()
    else:
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(s, tasks[w::workers], queue, counter), daemon=True)
                 for w in range(workers)]
        for pr in procs:
            pr.start()
        results = []
        try:
            while len(results) < len(tasks):
                try:
                    r = queue.get(timeout=0.5)
                except Exception:  # queue.Empty: poll progress, and notice a dead worker
                    if not any(pr.is_alive() for pr in procs) and queue.empty():
                        raise RuntimeError("recording workers exited before finishing their episodes")
                    bar.update(counter.value - bar.n)
                    continue
                if "error" in r:
                    raise RuntimeError(f"recording worker failed: {r['error']}")
                results.append(r)
                bar.update(counter.value - bar.n)
        finally:
            for pr in procs:
                pr.join(timeout=10)
                if pr.is_alive():
                    pr.terminate()
    elapsed = time.time() - t0
    results.sort(key=lambda r: r["info"]["index"])
    n_frames = sum(r["info"]["frames"] for r in results)
    bar.update(n_frames - bar.n)
    bar.close()
    train_deltas = [pose_deltas(r["poses"]) for r in results if r["info"]["split"] == "train"]
    manifest = {
        "engine": "vizdoom", "engine_version": _vizdoom_version(), "wad": s.wad, "map": s.map,
        "frame_height": s.height, "frame_width": s.width, "render_resolution": s.render_resolution,
        "frame_skip": s.frame_skip, "fov": s.fov, "seed": seed, "format_version": FORMAT_VERSION,
        "monsters": s.monsters, "pose_stats": compute_pose_stats(train_deltas),
        "action_space": {"names": ["forward", "strafe", "turn", "look"], "low": -1.0, "high": 1.0,
                         "engine_units_per_tic": ACTION_SCALE.tolist(),
                         "buttons": engine_settings(s)["buttons"], "notes": "turn + = left, look + = up"},
        "episodes": [{k: r["info"][k] for k in ("file", "frames", "split", "seed", "sha256", "bytes")}
                     for r in results],
        "counts": {"episodes": len(results), "frames": n_frames,
                   "train_frames": sum(len(d) for d in train_deltas),
                   "heldout_frames": n_frames - sum(len(d) for d in train_deltas)},
        "recording": {"settings": asdict(s), "workers": workers, "seconds": round(elapsed, 2),
                      "frames_per_second": round(n_frames / max(elapsed, 1e-9), 1)},
    }
    write_manifest(out, manifest)
    if train_deltas:
        write_coverage_png(out / "coverage.png", np.concatenate(train_deltas))
    return manifest


def _vizdoom_version() -> str:
    import vizdoom as vzd

    return vzd.__version__


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.record", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="data directory to create (episodes/, manifest.json)")
    p.add_argument("--episodes", type=int, default=4, help="train episodes")
    p.add_argument("--frames-per-episode", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help="engine processes (one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-episodes", type=int, default=0, help="extra episodes with split 'heldout'")
    p.add_argument("--map", default="MAP01")
    p.add_argument("--wad", default="freedoom2.wad", help="path, or a wad shipped with vizdoom")
    p.add_argument("--monsters", action="store_true", help="keep monsters (off by default)")
    p.add_argument("--frame-skip", type=int, default=4, help="game tics per recorded frame")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--render-resolution", default="160x120", help="engine resolution, resized to HxW")
    p.add_argument("--fov", type=float, default=ENGINE_FOV, help="horizontal fov (engine fixed at 90)")
    p.add_argument("--actions", help="JSON list of per-step 4-vectors to replay exactly (one episode)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    settings = RecordSettings(wad=a.wad, map=a.map, monsters=a.monsters, frame_skip=a.frame_skip,
                              height=a.height, width=a.width, render_resolution=a.render_resolution, fov=a.fov)
    actions = json.loads(Path(a.actions).read_text()) if a.actions else None
    m = record(a.out, a.episodes, a.frames_per_episode, a.workers, a.seed, a.heldout_episodes, settings,
               actions, progress=not a.no_progress)
    r = m["recording"]
    print(f"wrote {m['counts']['frames']} frames in {m['counts']['episodes']} episodes to {a.out} "
          f"({r['frames_per_second']} frames/s with {r['workers']} worker(s), {r['seconds']} s)")


if __name__ == "__main__":
    main()
