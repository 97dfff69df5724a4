"""`WorldModelVectorEnv`: N worlds of the world model in one generator call per step.

Made by `gymnasium.make_vec("worldmodel/Doom-v0", num_envs=N, vectorization_mode="vector_entry_point")`
(or the camera id). Same spaces, rewards, starts and infos as `WorldModelEnv` (whose docstring is the
spec, `fast` included); world i behaves like a `WorldModelEnv` reset with seed `seed + i` and given the same
actions, because both drive the same `envs.core.WorldBatch` (exactly until a partial reset; frames then agree to a
rounding level, see below).

Autoreset follows Gymnasium 1.x `AutoresetMode.NEXT_STEP`: the step after a world terminates or is
truncated resets it (its action is ignored, reward 0, its observation is the new start frame).
Infos are dicts of arrays with a boolean `_key` mask, as Gymnasium vector envs return them.
`reset(options={"reset_mask": (N,) bool})` restarts only some worlds (see
`worldmodel.inference.batched.BatchedGenerator.reset_rows` for what that means for their KV cache);
`options={"start_index": i or (N,) ints}` chooses start contexts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from envs.core import WorldBatch, action_space, canonical_actions, resolve_world
from envs.rewards import RewardFn, make_reward
from worldmodel.inference.world import World


class WorldModelVectorEnv(gymnasium.vector.VectorEnv):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 35, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        world: str | Path | World | None = None,
        steps: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        reward_fn: RewardFn | None = None,
        task: str | None = None,
        task_kwargs: dict[str, Any] | None = None,
        render_mode: str | None = None,
        action_type: str = "keyboard",
        pitch: bool = True,
        max_episode_steps: int | None = None,
        report_latency: bool = False,
        collision: str | Path | torch.nn.Module | None = None,
        fast: str | None = None,
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"the vector env renders only 'rgb_array' (or None), got {render_mode!r}")
        self.world = resolve_world(world)
        self.metadata = {**self.metadata, "render_fps": self.world.fps}
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps
        self.report_latency = report_latency
        self.single_action_space = action_space(action_type, pitch)
        self.single_observation_space = spaces.Box(0, 255, self.world.frame_shape, np.uint8)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._core = WorldBatch(self.world, num_envs, make_reward(task, reward_fn, **(task_kwargs or {})),
                                steps=steps, device=device, dtype=dtype, collision=collision,
                                fast=fast)
        self._rngs: list[np.random.Generator] | None = None  # one per world, as a single env's np_random
        self._steps = np.zeros(num_envs, np.int64)
        self._autoreset = np.zeros(num_envs, bool)

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        seeds = _row_seeds(seed, self.num_envs)
        if self._rngs is None or seed is not None:
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
        options = options or {}
        unknown = set(options) - {"start_index", "reset_mask"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; known: ['reset_mask', 'start_index']")
        rows = list(range(self.num_envs))
        if "reset_mask" in options and self._core.started:  # before the first reset every world starts
            rows = [int(i) for i in np.flatnonzero(np.asarray(options["reset_mask"], bool))]
        starts = options.get("start_index")
        starts = [None] * self.num_envs if starts is None else list(np.broadcast_to(starts, (self.num_envs,)))
        self._reset_rows(rows, [starts[i] for i in rows])
        return self._core.frames.copy(), self._info(0.0)

    def _reset_rows(self, rows: list[int], starts: list[int | None]) -> None:
        self._core.reset_rows(rows, [self._rngs[i] for i in rows], starts)
        self._steps[rows] = 0
        self._autoreset[rows] = False

    def step(self, actions):
        if self._rngs is None:
            raise RuntimeError("call reset() before step()")
        canonical = canonical_actions(actions, self.single_action_space, self.num_envs, type(self).__name__)
        frames, rewards, latency_ms = self._core.step(canonical)
        self._steps += 1
        done_before = np.flatnonzero(self._autoreset)
        if len(done_before):
            # NEXT_STEP autoreset: the frame just generated for these worlds is discarded and their
            # generator rows are restarted from a fresh start context.
            self._reset_rows([int(i) for i in done_before], [None] * len(done_before))
            rewards[done_before] = 0.0
        terminated = np.zeros(self.num_envs, bool)
        truncated = np.zeros(self.num_envs, bool)
        if self.max_episode_steps is not None:
            truncated = self._steps >= self.max_episode_steps
        self._autoreset = terminated | truncated
        return (self._core.frames.copy(), rewards.astype(np.float64), terminated, truncated,
                self._info(latency_ms))

    def _info(self, latency_ms: float) -> dict[str, Any]:
        core, every = self._core, np.ones(self.num_envs, bool)
        info = {"pose": core.poses.astype(np.float32), "pose_delta": core.prev_deltas.copy(),
                "start_index": core.start_index.copy(), "step": self._steps.copy()}
        if self.report_latency:
            info["latency_ms"] = np.full(self.num_envs, latency_ms)
        info.update({f"_{key}": every for key in list(info)})
        return info

    def render(self):
        if self.render_mode == "rgb_array":
            return tuple(self._core.frames.copy())
        return None

    def close_extras(self, **kwargs):
        pass


def _row_seeds(seed: int | list[int | None] | None, num: int) -> list[int | None]:
    """Gymnasium's convention: an int seeds world i with seed + i; a list gives one seed per world."""
    if seed is None:
        return [None] * num
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(num)]
    if len(seed) != num:
        raise ValueError(f"expected {num} seeds, got {len(seed)}")
    return list(seed)
