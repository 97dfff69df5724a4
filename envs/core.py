"""The batched core that both envs drive: N worlds, one generator call per step.

`WorldModelEnv` is a batch of one and `WorldModelVectorEnv` a batch of N over this same code, so the
single and vector envs cannot drift apart. The core owns everything below the Gymnasium API: action
checking and mapping to canonical (forward, strafe, turn, look), the action model, the generator and its
per-world noise, integrated poses and rewards. It knows no window and no Gymnasium wrapper.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from data_tools.poses import integrate_deltas
from envs.collision import gate_deltas, load as load_collision
from envs.keymap import DISCRETE_ACTIONS
from envs.rewards import RewardFn
from worldmodel.inference.host import to_host
from worldmodel.inference.world import World, default_device

ACTION_TYPES = ("keyboard", "camera")


def resolve_world(world: str | Path | World | None) -> World:
    return world if isinstance(world, World) else World.load(world)


def action_space(action_type: str, pitch: bool = True) -> spaces.Space:
    """The single-world action space of an action type."""
    if action_type == "keyboard":
        return spaces.Discrete(len(DISCRETE_ACTIONS))
    if action_type == "camera":
        return spaces.Box(-1.0, 1.0, (4 if pitch else 3,), np.float32)
    raise ValueError(f"unknown action_type {action_type!r}; use one of {ACTION_TYPES}")


def canonical_actions(actions: Any, space: spaces.Space, num: int | None, who: str) -> np.ndarray:
    """Checked actions of `space` -> canonical float32 (N, 4). num=None: one action (single env), else a
    batch of `num` (vector env). Raises ValueError saying what was expected; never changes any state."""
    arr = np.asarray(actions)
    lead = () if num is None else (num,)
    if isinstance(space, spaces.Discrete):
        if arr.shape != lead or not np.issubdtype(arr.dtype, np.integer):
            what = "an integer action id" if num is None else f"{num} integer action ids, shape ({num},)"
            raise ValueError(f"{who}: expected {what} in [0, {space.n}), got {actions!r}")
        if arr.min() < 0 or arr.max() >= space.n:
            raise ValueError(f"{who}: action ids must be in [0, {space.n}), got {actions!r}")
        return DISCRETE_ACTIONS[arr.astype(np.int64).reshape(-1)]
    dim = space.shape[0]
    if arr.shape != lead + (dim,) or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        names = "forward, strafe, turn" + (", look" if dim == 4 else "")
        raise ValueError(f"{who}: expected a float array of shape {lead + (dim,)} in [-1, 1] ({names}), got {actions!r}")
    arr = arr.astype(np.float32).reshape(-1, dim)
    if not np.isfinite(arr).all():
        raise ValueError(f"{who}: action contains NaN or inf: {actions!r}")
    if np.abs(arr).max() > 1.0 + 1e-6:
        raise ValueError(f"{who}: action components must be in [-1, 1], got {actions!r}")
    out = np.zeros((len(arr), 4), np.float32)
    out[:, :dim] = np.clip(arr, -1.0, 1.0)
    return out


class WorldBatch:
    """N worlds advanced together. Rows are reset individually; step advances all rows at once."""

    def __init__(
        self,
        world: World,
        num_worlds: int,
        reward_fn: RewardFn,
        *,
        steps: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        collision: str | Path | torch.nn.Module | None = None,
        fast: str | None = None,
    ):
        self.world = world
        self.num = num_worlds
        self.device = torch.device(device) if device is not None else default_device()
        # fast: the generator's steady-state path (None: CUDA graphs on CUDA, the static step on the CPU).
        self.generator = world.generator(num_worlds, steps=steps, device=self.device, dtype=dtype, fast=fast)
        # Optional walls (envs/collision.py): the frame shown gates the action model's forward/strafe.
        self.collision = None
        if collision is not None:
            self.collision = load_collision(collision, self.device) if isinstance(collision, (str, Path)) else collision
        # One reward object per world: rewards like "explore" keep episode state.
        self.rewards = [copy.deepcopy(reward_fn) for _ in range(num_worlds)]
        h, w, _ = world.frame_shape
        self.frames = np.zeros((num_worlds, h, w, 3), np.uint8)  # last observation of each world
        self.poses = np.zeros((num_worlds, 5), np.float64)  # integrated (x, y, z, yaw, pitch)
        self.prev_deltas = np.zeros((num_worlds, 5), np.float32)  # action-model state (momentum)
        self.start_index = np.zeros(num_worlds, np.int64)
        self.noise = [torch.Generator(self.device) for _ in range(num_worlds)]
        self.started = False

    def reset_rows(self, rows: list[int], rngs: list[np.random.Generator], starts: list[int | None]) -> None:
        """Start rows `rows` from a start context; row i draws its noise seed (and start) from rngs[i]."""
        n_starts = self.world.num_starts
        for start in starts:  # checked before any state changes
            if start is not None and not 0 <= int(start) < n_starts:
                raise ValueError(f"start_index must be in [0, {n_starts}), got {start}")
        for row, rng, start in zip(rows, rngs, starts):
            # The noise seed comes first, so that choosing the start explicitly does not change the noise.
            self.noise[row].manual_seed(int(rng.integers(2**63 - 1)))
            self.start_index[row] = int(rng.integers(n_starts)) if start is None else int(start)
        idx = self.start_index
        frames = self.world.start_frames[idx]  # (N, T0, H, W, 3): the observation at a reset is the last one
        latents = torch.from_numpy(self.world.start_latents[idx])  # (N, T0, C, h, w): what the generator starts from
        deltas = self.world.start_deltas[idx]  # (N, T0, 5)
        mask = np.zeros(self.num, bool)
        mask[rows] = True
        if mask.all() or not self.started:
            self.generator.reset(latents, torch.from_numpy(deltas), generator=self.noise, latents=True)
            self.started = True
        else:
            self.generator.reset_rows(torch.from_numpy(mask), latents, torch.from_numpy(deltas), generator=self.noise,
                                      latents=True)
        for row in rows:
            self.frames[row] = frames[row, -1]
            self.poses[row] = self.world.start_poses[idx[row], -1]
            self.prev_deltas[row] = deltas[row, -1]
            reset = getattr(self.rewards[row], "reset", None)
            if reset is not None:
                reset(self.poses[row].copy())

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Advance every world by one frame. actions: canonical (N, 4) -> (frames, rewards (N,), latency_ms)."""
        assert self.started, "reset the worlds before stepping them"
        deltas = np.asarray(self.world.action_model.predict(self.prev_deltas, actions), np.float32)  # (N, 5)
        if self.collision is not None:
            deltas = gate_deltas(self.collision, self.frames, deltas, self.device)
        t0 = time.perf_counter()
        frames = to_host(self.generator.step(torch.from_numpy(deltas))).numpy()  # uint8 (N, H, W, 3)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        rewards = np.zeros(self.num, np.float32)
        for row in range(self.num):
            self.poses[row] = integrate_pose(self.poses[row], deltas[row])
            rewards[row] = float(self.rewards[row](frames[row], self.poses[row].copy(), actions[row]))
        self.frames[:] = frames
        self.prev_deltas[:] = deltas
        return frames, rewards, latency_ms


def integrate_pose(pose: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Absolute pose (5,) after one delta (5,). integrate_deltas treats deltas[0] as the start frame's own
    (zero) delta, so the step goes second."""
    seq = np.stack([np.zeros(5, np.float32), np.asarray(delta, np.float32)])
    return np.asarray(integrate_deltas(np.asarray(pose, np.float32), seq), np.float64)[-1]
