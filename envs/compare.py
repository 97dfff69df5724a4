"""The honest view: the real engine and the world model side by side, stepped with the same actions.

`CompareEnv` looks like an env (reset/step, observation_space, action_space, metadata, close) so that a
front end (play.py) draws it like any other: the observation is [real engine | world model], uint8
(H, 2W, 3). It knows no window.

Start: the world's start context's last pose (start_contexts.npz `poses`), which the engine is placed at
with `DoomEngine.reset(start_pose=...)` (data_tools/engine.py: xy within 1 map unit, yaw/pitch exact).
Engine frames are rendered at the world's frame size (cv2.INTER_AREA from the engine's render resolution),
so a world of another size (the 32x48 test world) is compared at its own size, aspect ratio included.
Known mismatch: the world starts with the context's last pose delta as momentum, the engine from rest.

Info adds `real_pose` (5,), `psnr` (dB of this frame pair, capped at 100 for identical frames),
`psnr_mean` (mean over the frames since reset, the start frame excluded: it is a real frame on both sides).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from worldmodel.metrics import psnr

PSNR_CAP_DB = 100.0


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 (H, W, 3) frames (worldmodel.metrics.psnr, the eval's definition), capped at
    PSNR_CAP_DB (identical frames give +inf)."""
    return min(PSNR_CAP_DB, float(psnr(torch.from_numpy(a), torch.from_numpy(b))))


def engine_settings_for(world) -> Any:
    """RecordSettings matching a packaged world: its map (provenance), frame size and frame skip (from fps)."""
    from envs.doom_env import record_settings, world_engine_spec

    _, map_name, frame_shape, fps = world_engine_spec(world)
    return record_settings(map_name, frame_shape, fps)


class CompareEnv:
    """[engine | world model] from one env over a world (WorldModelEnv) and one DoomEngine."""

    def __init__(self, env, engine):
        self.env, self.engine = env, engine
        h, w, c = env.observation_space.shape
        self.observation_space = spaces.Box(0, 255, (h, 2 * w, c), np.uint8)
        self.action_space = env.action_space
        self.metadata = env.metadata
        self.psnrs: list[float] = []
        self.real_pose = np.zeros(5, np.float32)

    def _pair(self, real: np.ndarray, fake: np.ndarray, info: dict) -> tuple[np.ndarray, dict]:
        if real.shape != fake.shape:
            raise ValueError(f"engine frame {real.shape} != world frame {fake.shape}: build the DoomEngine with "
                             "envs.compare.engine_settings_for(world)")
        return np.concatenate([real, fake], axis=1), info

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        fake, info = self.env.reset(seed=seed, options=options)
        start_pose = self.env.world.start_poses[info["start_index"], -1]
        real, self.real_pose = self.engine.reset(start_pose=start_pose, seed=0 if seed is None else seed)
        self.psnrs = []
        info = {**info, "real_pose": self.real_pose, "psnr": psnr_uint8(real, fake), "psnr_mean": float("nan")}
        return self._pair(real, fake, info)

    def step(self, action):
        from data_tools.engine import EpisodeEnded

        fake, reward, terminated, truncated, info = self.env.step(action)
        try:
            real, self.real_pose = self.engine.step(np.asarray(action, np.float32))
        except EpisodeEnded:  # the engine's episode is over: end this one too (the caller resets both)
            real, truncated = self.engine.last_frame, True
        psnr = psnr_uint8(real, fake)
        self.psnrs.append(psnr)
        info = {**info, "real_pose": self.real_pose, "psnr": psnr, "psnr_mean": float(np.mean(self.psnrs))}
        obs, info = self._pair(real, fake, info)
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        self.env.close()
        self.engine.close()
