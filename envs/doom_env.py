"""`worldmodel/DoomReal-v0` and `worldmodel/DoomRealCamera-v0`: the real engine behind the world model's API.

The same task in both worlds is what makes "train in the model, test in the engine" a measurement: this env
has the world model env's action spaces, observation size, start poses and reward functions, and steps
ViZDoom (data_tools/engine.py) instead of the generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

from envs.core import action_space, canonical_actions, resolve_world
from envs.rewards import RewardFn, make_reward
from worldmodel.inference.world import World

DOOM_TICS_PER_SECOND = 35.0


class DoomRealEnv(gymnasium.Env):
    """The ViZDoom level a world was trained on, seen through the world model env's interface.

    ## Description

    Each step holds the canonical action for the world's frame skip (35 / fps tics) in the engine
    (no monsters, HUD and weapon hidden, as recorded). Walls stop the player here; in the world model the
    camera goes where the action model says, walls or not.

    ## Action Space

    As `worldmodel/Doom-v0`: `Discrete(15)` key chords (`envs/keymap.py`) for `action_type="keyboard"`;
    `Box(-1, 1, (4,), float32)` (forward, strafe, turn, look), or `(3,)` with `pitch=False`, for
    `action_type="camera"`. A bad action raises `ValueError` and leaves the engine unstepped.

    ## Observation Space

    `Box(0, 255, (H, W, 3), uint8)` at the world's frame size (cv2.INTER_AREA from the engine's render).

    ## Rewards

    The world model env's: `task` ("none", "explore") with `task_kwargs`, or `reward_fn(obs, pose, action)`,
    evaluated on the engine's own pose (where the player really is).

    ## Starting State

    The last pose of one of the world's start contexts (drawn with `self.np_random`, or
    `reset(options={"start_index": i})`), reached with `DoomEngine.reset(start_pose=...)` (xy within 1 map
    unit, yaw and pitch exact); the engine's seed comes from `self.np_random` too. The player starts at rest.

    ## Episode End

    Never terminates (no monsters, no exit in reach); truncated after `max_episode_steps`, or when the
    engine itself ends the episode.

    ## Info

    `pose` (x, y, z, yaw, pitch) of the engine, `pose_delta` is not given (the engine has no such notion),
    `start_index`, `step`.

    ## Arguments

    `world` (directory or `World`; default the shipped weights) gives the map, frame size, fps and start
    poses; or give them directly (`start_poses` (N, 5), `map`, `frame_shape`, `fps`) to skip loading the
    world's networks (what a subprocess vector env wants). `task`, `task_kwargs`, `reward_fn`,
    `action_type`, `pitch`, `max_episode_steps`, `render_mode` ("rgb_array").

    ## Version History

    - v0: initial version.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 35}

    def __init__(
        self,
        world: str | Path | World | None = None,
        *,
        start_poses: np.ndarray | None = None,
        map: str | None = None,
        frame_shape: tuple[int, int, int] | None = None,
        fps: float | None = None,
        reward_fn: RewardFn | None = None,
        task: str | None = None,
        task_kwargs: dict[str, Any] | None = None,
        render_mode: str | None = None,
        action_type: str = "keyboard",
        pitch: bool = True,
        max_episode_steps: int | None = None,
    ):
        from data_tools.engine import DoomEngine

        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"DoomRealEnv renders only 'rgb_array' (or None), got {render_mode!r}")
        given = (start_poses, map, frame_shape, fps)
        if all(v is None for v in given):
            start_poses, map, frame_shape, fps = world_engine_spec(resolve_world(world))
        elif any(v is None for v in given) or world is not None:
            raise ValueError("give either world, or all of start_poses, map, frame_shape and fps")
        self.start_poses = np.asarray(start_poses, np.float32).reshape(-1, 5)
        if not len(self.start_poses):
            raise ValueError("DoomRealEnv needs at least one start pose")
        h, w, _ = frame_shape
        self.metadata = {**self.metadata, "render_fps": float(fps)}
        self.render_mode = render_mode
        self.action_space = action_space(action_type, pitch)
        self.observation_space = spaces.Box(0, 255, (h, w, 3), np.uint8)
        self.max_episode_steps = max_episode_steps
        self.reward = make_reward(task, reward_fn, **(task_kwargs or {}))
        self.engine = DoomEngine(record_settings(map, frame_shape, fps))
        self._frame: np.ndarray | None = None
        self._pose = np.zeros(5, np.float32)
        self._start_index = 0
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"start_index"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; known: ['start_index']")
        start = options.get("start_index")
        n = len(self.start_poses)
        if start is not None and not 0 <= int(start) < n:
            raise ValueError(f"start_index must be in [0, {n}), got {start}")
        # Drawn in this order whatever is given, so that choosing the start does not change the engine seed.
        engine_seed = int(self.np_random.integers(2**31 - 1))
        drawn = int(self.np_random.integers(n))
        self._start_index = drawn if start is None else int(start)
        self._frame, self._pose = self.engine.reset(start_pose=self.start_poses[self._start_index], seed=engine_seed)
        reset = getattr(self.reward, "reset", None)
        if reset is not None:
            reset(self._pose.astype(np.float64))
        self._steps = 0
        return self._frame.copy(), self._info()

    def step(self, action):
        from data_tools.engine import EpisodeEnded

        if self._frame is None:
            raise RuntimeError("call reset() before step()")
        canonical = canonical_actions(action, self.action_space, None, type(self).__name__)[0]
        ended = False
        try:
            self._frame, self._pose = self.engine.step(canonical)
        except EpisodeEnded:
            ended = True
        self._steps += 1
        reward = 0.0 if ended else float(self.reward(self._frame, self._pose.astype(np.float64), canonical))
        truncated = ended or (self.max_episode_steps is not None and self._steps >= self.max_episode_steps)
        return self._frame.copy(), reward, False, bool(truncated), self._info()

    def _info(self) -> dict[str, Any]:
        return {"pose": self._pose.copy(), "start_index": self._start_index, "step": self._steps}

    def render(self):
        if self.render_mode == "rgb_array" and self._frame is not None:
            return self._frame.copy()
        return None

    def close(self):
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None


def world_engine_spec(world: World) -> tuple[np.ndarray, str, tuple[int, int, int], float]:
    """What the real engine needs of a world: start poses (N, 5) (each context's last), map, frame shape, fps."""
    data = (world.provenance or {}).get("data", {}) or {}
    return (np.asarray(world.start_poses[:, -1], np.float32), data.get("map") or "MAP01",
            tuple(world.frame_shape), float(world.fps))


def record_settings(map_name: str, frame_shape: tuple[int, int, int], fps: float):
    """The engine's RecordSettings for a world of this map, frame size and fps (Doom runs 35 tics/s)."""
    from data_tools.engine import RecordSettings

    h, w, _ = frame_shape
    return RecordSettings(map=map_name, height=h, width=w, frame_skip=max(1, round(DOOM_TICS_PER_SECOND / float(fps))))
