"""End-to-end check of video ingest on footage unlike the training data, against engine ground truth.

    python -m benchmarks.ingest_check --out /tmp/ingest_check [--videos 2 --frames 400 --seed 11]

Records ViZDoom with the recorder's own functions (data_tools.record) and exploration policy, but at a
different resolution (render 320x240 -> 256x192 instead of 160x120 -> 128x96; ViZDoom 1.3.2 renders
only at fov 90, so resolution is what varies), encodes each episode as a lossy H.264 MP4 with PyAV
(crf 28, 35/frame_skip fps), ingests the folder with data_tools.ingest, then compares the ingested
deltas with the engine's ground-truth deltas for the same frames using data_tools.eval_poses.compare
(the same metric as the annotator's own benchmark). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import numpy as np


def write_mp4(path: Path, frames: np.ndarray, fps: Fraction, crf: int = 28) -> None:
    """frames uint8 (N,H,W,3) RGB -> H.264 yuv420p MP4 (lossy, like real footage)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        s.options = {"crf": str(crf), "preset": "medium"}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def record_videos(out: Path, videos: int, frames: int, seed: int, render: str = "320x240", size: str = "256x192",
                  frame_skip: int = 4) -> list[np.ndarray]:
    """Record `videos` episodes (engine at `render`, resized to `size`, both WxH) into out/videos/*.mp4
    -> (ground-truth poses (N,5), frames uint8 (N,h,w,3)) per video."""
    from data_tools.record import RecordSettings, make_game, run_episode

    w, h = (int(v) for v in size.lower().split("x"))
    s = RecordSettings(height=h, width=w, render_resolution=render, frame_skip=frame_skip)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    game = make_game(s)
    poses, clean = [], []
    try:
        for k in range(videos):
            f, p, _ = run_episode(game, s, seed * 1000 + k, frames)
            write_mp4(out / "videos" / f"doom_{k:02d}.mp4", f, Fraction(35, frame_skip))
            poses.append(p), clean.append(f)
    finally:
        game.close()
    return poses, clean


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ingest_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--videos", type=int, default=2)
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--render", default="320x240", help="engine resolution WxH (16:9 e.g. 320x180 tests the crop)")
    p.add_argument("--size", default="256x192", help="video frame size WxH")
    p.add_argument("--fov", type=float, default=90.0, help="horizontal fov of the video (GZDoom widens it on "
                   "16:9: 2*atan(tan(45 deg)*4/3) = 106.26)")
    a = p.parse_args(argv)
    from data_tools.annotator import estimate_deltas
    from data_tools.eval_poses import compare
    from data_tools.ingest import ingest
    from data_tools.poses import pose_deltas
    from data_tools.shards import load_episode
    from data_tools.video import cropped_fov, histogram_distances, load_video, resize_frame

    out = Path(a.out)
    gt, clean = record_videos(out, a.videos, a.frames, a.seed, a.render, a.size)
    mp4_bytes = sum(f.stat().st_size for f in (out / "videos").glob("*.mp4"))
    t0 = time.time()
    m = ingest(out / "videos", out / "data", fps=35 / 4, fov=a.fov, workers=a.workers, seed=a.seed, progress=False)
    seconds = time.time() - t0
    ests, gts = [], []
    for e in m["episodes"]:
        k = int(e["video"].split("_")[1].split(".")[0])
        est = pose_deltas(load_episode(out / "data", e, m)["poses"])  # round trip through the stored poses
        ests.append(est[1:]), gts.append(pose_deltas(gt[k][e["start"]:e["end"]])[1:])
    r = compare(np.concatenate(ests), np.concatenate(gts))
    # Reference: the same frames without the codec (crop + resize of the lossless render, same fov),
    # so the codec's share of the error is visible.
    ref_e, ref_g = [], []
    for k, f in enumerate(clean):
        small = np.stack([resize_frame(x, 96, 128) for x in f])
        ref_e.append(estimate_deltas(small, cropped_fov(f.shape[1], f.shape[2], 96, 128, a.fov))[0][1:])
        ref_g.append(pose_deltas(gt[k])[1:])
    ref = compare(np.concatenate(ref_e), np.concatenate(ref_g))
    # Largest within-shot histogram distance (no real cut in this footage): the margin below --cut-threshold.
    hd = max(float(histogram_distances(load_video(v, 96, 128, 35 / 4)["frames"]).max())
             for v in sorted((out / "videos").glob("*.mp4")))
    r.update(render=a.render, size=a.size, source_fov=a.fov, videos=a.videos, recorded_frames=a.videos * a.frames,
             clips=len(m["episodes"]),
             ingested_frames=m["counts"]["frames"], rejected=m["rejected"], fov=m["fov"],
             mean_confidence=float(np.mean([e["confidence"] for e in m["episodes"]])),
             mp4_kb_per_frame=round(mp4_bytes / 1024 / (a.videos * a.frames), 2),
             ingest_seconds=round(seconds, 1),
             reference_lossless={k: ref[k] for k in ("yaw_err_median", "yaw_err_p90", "dir_err_median", "dir_err_p90",
                                                     "motion_detected")}, max_within_shot_hist_distance=round(hd, 3))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
