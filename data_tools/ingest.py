"""Ingest a folder of first-person videos into a training data directory (same shards + manifest as
the recorder, docs/ARCHITECTURE.md "Data directory").

    python -m data_tools.ingest VIDEOS_DIR --out DATA_DIR [--fps 8.75] [--height 96 --width 128] [--fov 90]
                                [--workers N] [--heldout-fraction 0.1] [--seed 0] [--skip-bad]

Per video (MP4/WebM/MKV/MOV/AVI, or a sub-folder of PNG/JPG frames): decode, pick frames at --fps by
timestamp, center-crop to the output aspect and INTER_AREA resize (data_tools.video; the crop narrows
the view, so the annotator gets and the manifest records the effective horizontal fov), cut at scene
changes (colour-histogram jumps), annotate camera motion with data_tools.annotator.estimate_deltas, and
write one episode per clip with poses integrated from a zero start pose.

- Translation scale: unobservable from images. Deltas carry a unit-norm translation direction times
  --speed (default 1.0) on frames with parallax and 0 otherwise; the manifest's `translation_scale`
  says so. Yaw/pitch are in degrees.
- Actions: unknown for video. Episodes store zeros (4,) and the manifest's action_space says
  `"known": false`; fit an action model on recorder data, not on these.
- Clips shorter than --min-clip-frames or with mean annotator confidence below --min-confidence
  are left out and listed in the manifest's `rejected` with the reason; so are undecodable videos
  with --skip-bad (without it they stop the run with an error naming the file).
- Resumable: each video is keyed by the sha256 of its file (of its sorted frame files for a folder);
  a re-run skips videos already in the manifest. Episode files are written atomically and the
  manifest is rewritten after every video, so an interrupted run loses at most the video in flight.
- Held-out split: a clip is held out when a hash of (seed, video sha256, clip start) falls below
  --heldout-fraction (stable when videos are added); if that leaves none and there are >= 2 clips, the
  clip with the lowest hash is held out. pose_stats come from the train split only.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.annotator import estimate_deltas
from data_tools.poses import integrate_deltas
from data_tools.shards import (FORMAT_VERSION, MANIFEST, compute_pose_stats, read_manifest, sha256_file,
                               write_episode, write_manifest)
from data_tools.video import IMAGE_EXTS, VIDEO_EXTS, VideoError, cropped_fov, load_video, scene_segments

TRANSLATION_SCALE_NOTE = ("unit: forward/strafe/up of a delta are a unit-norm direction times `speed` on frames "
                          "where the annotator saw parallax, 0 otherwise; monocular video does not give metric "
                          "scale (data_tools.annotator)")


class IngestError(RuntimeError):
    """Bad input to the ingest: an undecodable video, or no usable clip at all."""


def annotator_version() -> str:
    """The annotator has no version number; the sha256 of its source pins exactly what made the poses."""
    import data_tools.annotator as ann

    return "sha256:" + sha256_file(ann.__file__)[:16]


def find_sources(videos_dir: str | Path) -> list[Path]:
    """Video files and frame folders (sub-folders holding PNG/JPG) directly under videos_dir, sorted."""
    root = Path(videos_dir)
    if not root.is_dir():
        raise IngestError(f"{root}: not a folder of videos")
    out = []
    for p in sorted(root.iterdir()):
        if p.is_file() and p.suffix.lower() in VIDEO_EXTS:
            out.append(p)
        elif p.is_dir() and any(q.suffix.lower() in IMAGE_EXTS for q in p.iterdir()):
            out.append(p)
    if any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir()):
        out.append(root)  # the folder itself is one frame sequence
    return out


def source_hash(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(q for q in path.iterdir() if q.suffix.lower() in IMAGE_EXTS):
        h.update(f.name.encode()), h.update(sha256_file(f).encode())
    return h.hexdigest()


def heldout_score(seed: int, video_sha: str, start: int) -> float:
    """Deterministic number in [0, 1) per clip."""
    return int(hashlib.sha256(f"{seed}:{video_sha}:{start}".encode()).hexdigest()[:15], 16) / 16**15


def ingest_video(task: dict) -> dict:
    """One video -> {"video": entry, "episodes": [...], "rejected": [...]} (episode files written here).
    Undecodable input comes back as {"error": message} so the parent decides (stop, or --skip-bad)."""
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    path, o = Path(task["path"]), task["opts"]
    try:
        v = load_video(path, o["height"], o["width"], o["fps"], o["image_fps"])
    except VideoError as e:
        return {"error": str(e), "path": str(path), "sha256": task["sha256"]}
    fov = cropped_fov(*v["source_size"], o["height"], o["width"], o["fov"])
    entry = {"path": str(path), "name": path.name, "sha256": task["sha256"], "source_size": v["source_size"],
             "source_frames": v["source_frames"], "frames": len(v["frames"]),
             "effective_fps": round(v["effective_fps"], 4),
             "fov": round(fov, 4), "clips": 0}
    episodes, rejected = [], []
    for start, end in scene_segments(v["frames"], o["cut_threshold"]):
        # start/end: indices into the resampled frames (half-open); times: seconds in the source.
        clip = {"video": path.name, "start": start, "end": end, "t_start": round(float(v["times"][start]), 3),
                "t_end": round(float(v["times"][end - 1]), 3)}
        if end - start < o["min_clip_frames"]:
            rejected.append({**clip, "reason": f"too short: {end - start} frames < {o['min_clip_frames']}"})
            continue
        deltas, conf = estimate_deltas(v["frames"][start:end], fov, speed=o["speed"], seed=o["seed"])
        mean_conf = float(conf[1:].mean()) if end - start > 1 else 0.0  # frame 0's is 1 by definition
        if mean_conf < o["min_confidence"]:
            rejected.append({**clip, "reason": f"unreliable poses: mean confidence {mean_conf:.3f} < "
                                               f"{o['min_confidence']} (too few features or failed fits)"})
            continue
        poses = integrate_deltas(np.zeros(5), deltas)
        actions = np.zeros((end - start, 4), np.float32)
        name = f"episodes/v{task['sha256'][:12]}_{start:06d}.npz"
        info = write_episode(Path(task["out"]) / name, v["frames"][start:end], poses, actions)
        info.update(**clip, video_sha256=task["sha256"], fov=entry["fov"],
                    confidence=round(mean_conf, 4), seed=o["seed"])
        episodes.append(info)
    entry["clips"] = len(episodes)
    return {"video": entry, "episodes": episodes, "rejected": rejected}


def _assign_splits(episodes: list[dict], fraction: float, seed: int) -> None:
    scores = [heldout_score(seed, e["video_sha256"], e["start"]) for e in episodes]
    for e, s in zip(episodes, scores):
        e["split"] = "heldout" if s < fraction else "train"
    if fraction > 0 and len(episodes) >= 2 and all(e["split"] == "train" for e in episodes):
        episodes[int(np.argmin(scores))]["split"] = "heldout"


def _finish_manifest(out: Path, m: dict, opts: dict, cache: dict) -> dict:
    """Splits, pose_stats (train only, from the stored poses) and counts; written atomically."""
    from data_tools.poses import pose_deltas

    eps = m["episodes"]
    _assign_splits(eps, opts["heldout_fraction"], opts["seed"])
    train = []
    for e in eps:
        if e["split"] == "train":
            if e["file"] not in cache:  # each file read once per run, and only its poses member
                with np.load(out / e["file"]) as z:
                    cache[e["file"]] = pose_deltas(z["poses"])
            train.append(cache[e["file"]])
    m["pose_stats"] = compute_pose_stats(train) if train else None
    fovs = sorted({e["fov"] for e in eps})
    m["fov"] = fovs[0] if len(fovs) == 1 else None  # per-episode "fov" otherwise
    n = sum(e["frames"] for e in eps)
    m["counts"] = {"videos": len(m["videos"]), "episodes": len(eps), "frames": n,
                   "train_frames": sum(e["frames"] for e in eps if e["split"] == "train"),
                   "heldout_frames": sum(e["frames"] for e in eps if e["split"] == "heldout"),
                   "rejected": len(m["rejected"])}
    write_manifest(out, m)
    return m


def _new_manifest(opts: dict) -> dict:
    return {"engine": "video", "engine_version": None, "wad": None, "map": None,
            "frame_height": opts["height"], "frame_width": opts["width"], "render_resolution": None,
            "frame_skip": None, "fps": opts["fps"], "fov": None, "source_fov": opts["fov"], "seed": opts["seed"],
            "format_version": FORMAT_VERSION, "pose_stats": None,
            "action_space": {"names": ["forward", "strafe", "turn", "look"], "low": -1.0, "high": 1.0,
                             "known": False, "notes": "actions unknown for ingested video: stored as zeros"},
            "annotator": {"module": "data_tools.annotator.estimate_deltas", "version": annotator_version()},
            "translation_scale": {"speed": opts["speed"], "unit": TRANSLATION_SCALE_NOTE},
            "ingest": {k: opts[k] for k in ("cut_threshold", "min_clip_frames", "min_confidence", "heldout_fraction",
                                             "image_fps")},
            "videos": {}, "episodes": [], "rejected": []}


def ingest(videos_dir: str | Path, out: str | Path, *, fps: float = 8.75, height: int = 96, width: int = 128,
           fov: float = 90.0, workers: int | None = None, heldout_fraction: float = 0.1, seed: int = 0,
           skip_bad: bool = False, speed: float = 1.0, min_clip_frames: int = 16, min_confidence: float = 0.15,
           cut_threshold: float = 0.5, image_fps: float | None = None, progress: bool = True) -> dict:
    """Ingest every video under videos_dir into `out`; returns the manifest (see module doc)."""
    opts = dict(fps=fps, height=height, width=width, fov=fov, heldout_fraction=heldout_fraction, seed=seed,
                speed=speed, min_clip_frames=min_clip_frames, min_confidence=min_confidence,
                cut_threshold=cut_threshold, image_fps=image_fps)
    out = Path(out)
    sources = find_sources(videos_dir)
    if not sources:
        raise IngestError(f"{videos_dir}: no videos ({', '.join(VIDEO_EXTS)}) or frame folders found")
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        for k, theirs in (("frame_height", height), ("frame_width", width), ("fps", fps), ("seed", seed)):
            if m.get(k) != theirs:
                raise IngestError(f"{out}: existing manifest has {k}={m.get(k)}, this run asks {theirs}; "
                                  "use a new --out or the same settings to resume")
    else:
        m = _new_manifest(opts)
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    tasks = []
    for p in tqdm(sources, desc="hash", unit="video", disable=not progress):
        h = source_hash(p)
        if h not in m["videos"] and h not in {t["sha256"] for t in tasks}:
            tasks.append({"path": str(p), "sha256": h, "out": str(out), "opts": opts})
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    cache: dict = {}
    results = pool.imap_unordered(ingest_video, tasks) if pool else map(ingest_video, tasks)
    try:
        for r in tqdm(results, total=len(tasks), desc="ingest", unit="video", disable=not progress):
            if "error" in r:
                if not skip_bad:
                    raise IngestError(r["error"])
                m["videos"][r["sha256"]] = {"path": r["path"], "name": Path(r["path"]).name, "sha256": r["sha256"],
                                            "clips": 0, "error": r["error"]}
                m["rejected"].append({"video": Path(r["path"]).name, "start": None, "end": None,
                                      "reason": f"undecodable: {r['error']}"})
            else:
                m["videos"][r["video"]["sha256"]] = r["video"]
                m["episodes"] += r["episodes"]
                m["rejected"] += r["rejected"]
            # Same order whatever the worker timing.
            m["episodes"].sort(key=lambda e: (e["video"], e["start"], e["file"]))
            _finish_manifest(out, m, opts, cache)  # after every video: a crash later keeps this one
    finally:
        if pool:
            pool.terminate()
    m = _finish_manifest(out, m, opts, cache)
    if not m["episodes"]:
        reasons = "; ".join(f"{r['video']} [{r['start']}:{r['end']}] {r['reason']}" for r in m["rejected"][:5])
        raise IngestError(f"{videos_dir}: no usable clip in {len(m['videos'])} video(s) ({reasons}); "
                          "lower --min-confidence / --min-clip-frames or check the footage")
    return m


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos_dir", help="folder of videos and/or sub-folders of PNG/JPG frames")
    p.add_argument("--out", required=True, help="data directory to create or resume")
    p.add_argument("--fps", type=float, default=8.75, help="output frame rate (recorder: 35/frame_skip = 8.75)")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--fov", type=float, default=90.0, help="horizontal fov of the source videos, degrees")
    p.add_argument("--workers", type=int, default=None, help="processes, one video each (default: one per core)")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="count undecodable videos in `rejected` instead of stopping")
    p.add_argument("--speed", type=float, default=1.0, help="translation per moving frame (scale is unobservable)")
    p.add_argument("--min-clip-frames", type=int, default=16)
    p.add_argument("--min-confidence", type=float, default=0.15, help="mean annotator confidence to keep a clip")
    p.add_argument("--cut-threshold", type=float, default=0.5, help="histogram distance that counts as a scene cut")
    p.add_argument("--image-fps", type=float, default=None, help="frame rate of PNG/JPG folders (default: --fps)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        m = ingest(a.videos_dir, a.out, fps=a.fps, height=a.height, width=a.width, fov=a.fov, workers=a.workers,
                   heldout_fraction=a.heldout_fraction, seed=a.seed, skip_bad=a.skip_bad, speed=a.speed,
                   min_clip_frames=a.min_clip_frames, min_confidence=a.min_confidence,
                   cut_threshold=a.cut_threshold, image_fps=a.image_fps, progress=not a.no_progress)
    except IngestError as e:
        raise SystemExit(f"error: {e}") from None
    c = m["counts"]
    print(f"{a.out}: {c['videos']} videos, {c['episodes']} clips ({c['frames']} frames, {c['heldout_frames']} "
          f"held out), {c['rejected']} rejected")


if __name__ == "__main__":
    main()
