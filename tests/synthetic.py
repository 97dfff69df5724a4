"""A tiny synthetic world in the recorder's data format, for CPU tests of the training stages.

The "world" is a smooth, tileable colour texture; the camera sees a window of it. Each frame's pose
delta moves the window: forward scrolls vertically, strafe and yaw scroll horizontally (yaw at its
own rate), so a frame is an exact function of the previous frame and the pose delta, and a model
that uses the pose condition can beat copy-last-frame. The policy holds one action for a few frames
(idle, forward, back, strafe, turn) like the recorder's exploration policy.

`make_data_dir(path, ...)` writes `manifest.json` + `episodes/ep_*.npz` via data_tools.shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.poses import integrate_deltas, pose_deltas
from data_tools.shards import compute_pose_stats, write_episode, write_manifest

# Pixel scroll per unit of motion: integers after scaling so the motion is crisp at tiny sizes.
PX_PER_UNIT = 0.25  # forward/strafe: 8 map units -> 2 px
PX_PER_DEG = 0.4  # yaw: 5 degrees -> 2 px
# (forward, strafe, dyaw) per frame and the action vector (forward, strafe, turn, look) of each move.
MOVES = [
    ((0.0, 0.0, 0.0), (0, 0, 0, 0)),
    ((8.0, 0.0, 0.0), (1, 0, 0, 0)),
    ((-8.0, 0.0, 0.0), (-1, 0, 0, 0)),
    ((0.0, 8.0, 0.0), (0, 1, 0, 0)),
    ((0.0, -8.0, 0.0), (0, -1, 0, 0)),
    ((0.0, 0.0, 5.0), (0, 0, 1, 0)),
    ((0.0, 0.0, -5.0), (0, 0, -1, 0)),
]


def make_texture(height: int, width: int, rng: np.random.Generator, blobs: int = 24) -> np.ndarray:
    """Tileable float (H, W, 3) texture in [0, 1]: a sum of wrapped Gaussian colour blobs."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tex = np.full((height, width, 3), 0.15, np.float32)
    for _ in range(blobs):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(2.0, 6.0)
        dy = np.minimum(abs(yy - cy), height - abs(yy - cy))
        dx = np.minimum(abs(xx - cx), width - abs(xx - cx))
        tex += np.exp(-(dy**2 + dx**2) / (2 * r * r))[..., None] * rng.uniform(0.2, 1.0, 3).astype(np.float32)
    return np.clip(tex / tex.max(), 0, 1)


def render(texture: np.ndarray, oy: float, ox: float, height: int, width: int) -> np.ndarray:
    """uint8 (height, width, 3) window of the wrapped texture at integer offset (oy, ox)."""
    th, tw = texture.shape[:2]
    rows = (np.arange(height) + int(round(oy))) % th
    cols = (np.arange(width) + int(round(ox))) % tw
    return (texture[rows][:, cols] * 255).round().astype(np.uint8)


def make_episode(frames: int, height: int, width: int, seed: int, texture: np.ndarray | None = None):
    """One episode -> (frames uint8 (N,H,W,3), poses float32 (N,5), actions float32 (N,4))."""
    rng = np.random.default_rng(seed)
    if texture is None:
        texture = make_texture(2 * height, 2 * width, rng)
    deltas = np.zeros((frames, 5), np.float32)
    actions = np.zeros((frames, 4), np.float32)
    i = 1
    while i < frames:
        move, action = MOVES[rng.integers(len(MOVES))]
        hold = int(rng.integers(3, 9))
        deltas[i : i + hold, [0, 1, 3]] = move
        actions[i : i + hold] = action
        i += hold
    poses = integrate_deltas(np.array([0, 0, 0, 90.0, 0], np.float32), deltas)
    d = pose_deltas(poses)  # what the reader will see (float round trip)
    oy = np.cumsum(-d[:, 0] * PX_PER_UNIT)
    ox = np.cumsum(d[:, 1] * PX_PER_UNIT - d[:, 3] * PX_PER_DEG)
    imgs = np.stack([render(texture, y, x, height, width) for y, x in zip(oy, ox)])
    return imgs, poses, actions


def make_data_dir(path: str | Path, *, episodes: int = 4, heldout: int = 1, frames: int = 48,
                  height: int = 32, width: int = 48, seed: int = 0) -> Path:
    """Write a data directory (manifest + episode shards); the last `heldout` episodes are held out.

    All episodes share one texture (one "map"), as recorded episodes share a level.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    texture = make_texture(2 * height, 2 * width, rng)
    entries, train_deltas = [], []
    for e in range(episodes):
        imgs, poses, actions = make_episode(frames, height, width, seed * 1000 + e + 1, texture)
        entry = write_episode(path / "episodes" / f"ep_{e:05d}.npz", imgs, poses, actions)
        split = "heldout" if e >= episodes - heldout else "train"
        entry.update(split=split, seed=seed * 1000 + e + 1)
        entries.append(entry)
        if split == "train":
            train_deltas.append(pose_deltas(poses))
    manifest = {
        "engine": "synthetic", "engine_version": "1", "wad": "", "map": "texture",
        "frame_height": height, "frame_width": width, "render_resolution": f"{width}x{height}",
        "frame_skip": 1, "fov": 90, "seed": seed, "format_version": 1,
        "pose_stats": compute_pose_stats(train_deltas),
        "action_space": ["forward", "strafe", "turn", "look"],
        "episodes": entries,
        "counts": {"episodes": episodes, "frames": episodes * frames,
                   "heldout": heldout, "train": episodes - heldout},
    }
    write_manifest(path, manifest)
    return path


def tiny_config(*overrides: str):
    """configs/tiny.yaml plus overrides (a RunConfig)."""
    from worldmodel.config import load_config

    return load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml", list(overrides))


def make_autoencoder_checkpoint(path: str | Path, cfg, pose_stats=None) -> Path:
    """An untrained (seeded) autoencoder saved as a stage-0 export: enough for latent-stage tests,
    whose latents only need to be a fixed function of the frames."""
    import torch

    from worldmodel.checkpoint import save_weights
    from worldmodel.models.autoencoder import Autoencoder

    torch.manual_seed(0)
    ae = Autoencoder(cfg.autoencoder)
    return save_weights(path, ae, {"config": cfg.to_dict(), "stage": "autoencoder", "step": 0,
                                   "pose_stats": pose_stats})
