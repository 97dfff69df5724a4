"""Annotate per-frame camera motion on a first-person video from images only.

    python -m data_tools.annotate_poses VIDEO_OR_DIR [--fov 90] [--out FILE.json] [--speed S]

Input: an MP4 (or any video OpenCV reads), a folder of PNG/JPG frames (sorted by name), or a recorder
data directory (manifest.json; every episode is annotated and its fov used). Output JSON:
{"fov", "speed", "sequences": [{"name", "deltas": [[forward, strafe, up, dyaw, dpitch], ...],
"confidence": [...]}]}. Translation is a unit direction times --speed (scale is unobservable from
images; see data_tools.annotator).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from data_tools.annotator import estimate_deltas
from data_tools.shards import MANIFEST, load_episode, read_manifest


def read_video(path: str | Path) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SystemExit(f"{path}: OpenCV cannot open this video")
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    if not frames:
        raise SystemExit(f"{path}: no frames decoded")
    return np.stack(frames)


def read_image_dir(path: Path) -> np.ndarray:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"{path}: no PNG/JPG frames found")
    return np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files])


def load_sequences(source: str, fov: float) -> list[tuple[str, np.ndarray, float]]:
    """-> [(name, frames uint8 (N,H,W,3), fov)]."""
    path = Path(source)
    if path.is_dir() and (path / MANIFEST).is_file():
        m = read_manifest(path)
        return [(e["file"], load_episode(path, e, m)["frames"], float(m["fov"])) for e in m["episodes"]]
    if path.is_dir():
        return [(path.name, read_image_dir(path), fov)]
    if path.is_file():
        return [(path.name, read_video(path), fov)]
    raise SystemExit(f"{source}: no such video, frame folder or data directory")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.annotate_poses", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="video file, folder of frames, or recorder data directory")
    p.add_argument("--fov", type=float, default=90.0, help="horizontal field of view in degrees")
    p.add_argument("--speed", type=float, default=1.0, help="translation scale per frame (default unit norm)")
    p.add_argument("--out", default=None, help="output JSON (default: print a summary only)")
    a = p.parse_args(argv)
    result = {"fov": a.fov, "speed": a.speed, "sequences": []}
    for name, frames, fov in load_sequences(a.source, a.fov):
        deltas, conf = estimate_deltas(frames, fov, speed=a.speed, progress=True)
        result["sequences"].append({"name": name, "fov": fov, "deltas": np.round(deltas, 4).tolist(),
                                    "confidence": np.round(conf, 3).tolist()})
        print(f"{name}: {len(frames)} frames, total yaw {deltas[:, 3].sum():.1f} deg, "
              f"mean confidence {conf.mean():.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(result))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
