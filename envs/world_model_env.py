"""`worldmodel/Doom-v0` and `worldmodel/DoomCamera-v0`: one world of the neural world model as a Gymnasium env."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from envs.core import WorldBatch, action_space, canonical_actions, resolve_world
from envs.rewards import RewardFn, make_reward
from worldmodel.inference.world import World


class WorldModelEnv(gymnasium.Env):
    """A first-person world generated frame by frame by a pose-conditioned diffusion transformer.

    ## Description

    Each step turns the action into a camera pose change with the world's fitted action model (Doom has
    momentum, so the change also depends on the previous one), and the streaming generator produces the
    next frame conditioned on that pose change. There are no walls, enemies or items in the *dynamics*:
    the camera moves where it is told (unless a `collision` gate is given); what it sees is whatever the
    model imagines.

    ## Action Space

    - `worldmodel/Doom-v0` (`action_type="keyboard"`): `Discrete(15)`, key chords of `envs/keymap.py`:
      0 none, 1 W, 2 S, 3 A, 4 D, 5 turn left, 6 turn right, 7 W+left, 8 W+right, 9 W+A, 10 W+D,
      11 S+left, 12 S+right, 13 S+A, 14 S+D.
    - `worldmodel/DoomCamera-v0` (`action_type="camera"`): `Box(-1, 1, (4,), float32)` =
      (forward, strafe, turn, look); strafe > 0 moves right, turn > 0 turns left, look > 0 looks up.
      With `pitch=False`, `Box(-1, 1, (3,), float32)` (look fixed at 0).

    An action outside the space, of the wrong shape or dtype, or with NaN raises `ValueError` and leaves
    the env unchanged.

    ## Observation Space

    `Box(0, 255, (H, W, 3), uint8)`: the RGB frame (H x W of the world, 96 x 128 for the shipped one).

    ## Rewards

    0 by default. `task="explore"` gives +1 for entering a cell (`cell_size` map units, default 64) of the
    integrated (x, y) position not visited before in this episode. Any `reward_fn(obs, pose, action) ->
    float` may be given instead; if it has `reset(pose)` that is called at every episode start.

    ## Starting State

    A start context (real engine frames, their pose deltas and poses) drawn uniformly from the world's
    start set with `self.np_random`, or chosen with `reset(options={"start_index": i})`. The first
    observation is the context's last frame. The generator's noise is seeded from `self.np_random`, so
    `reset(seed=s)` plus the same actions gives the same frames (on the same device, dtype and `fast` path;
    the default fast path matches `fast="off"` to rounding: in fp32 at most one grey level, in bf16 a few).

    ## Episode End

    Never terminates. Truncated after `max_episode_steps` (1000 when made with `gymnasium.make`).

    ## Info

    `pose` (x, y, z, yaw, pitch) integrated from the start context's last pose by the commanded pose
    deltas, `pose_delta` (forward, strafe, up, dyaw, dpitch) of this step, `start_index`, `step`; with
    `report_latency=True` also `latency_ms` of generation (decoding included). Wall-clock time is off by
    default because it makes infos differ between identical runs, which Gymnasium's checker rejects.

    ## Arguments

    `world` (directory or `World`; default the shipped weights), `steps` (denoising steps 1, 2 or 4;
    default the world's), `device` (default cuda if available else cpu), `dtype` (default
    `worldmodel.inference.world.default_dtype(device)`: bf16 on GPUs and AMX/AVX512-BF16 CPUs, else fp32),
    `reward_fn` or `task` ("none", "explore") with `task_kwargs`, `render_mode` ("rgb_array", "human"),
    `action_type`, `pitch`, `max_episode_steps` (None: the TimeLimit wrapper of `gymnasium.make` ends episodes),
    `report_latency`, `collision` (a fitted `envs/collision.py` gate, path or module: the frame shown scales
    the action model's forward/strafe, so the camera stops at walls it sees; default None: no walls), `fast`
    (the generator's steady-state path: "off" = eager, "static", "graph" = CUDA graphs, "compile" = torch.compile
    (and CUDA graphs on CUDA; compiles once, for minutes on a small CPU); default None = graph on
    CUDA, static elsewhere, `worldmodel.inference.world.default_fast`). On CUDA the first frame after the window
    fills also captures the graph (tens of ms, once), which `latency_ms` includes.

    ## Version History

    - v0: initial version.
    """

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": 35}

    def __init__(
        self,
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
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.world = resolve_world(world)
        self.metadata = {**self.metadata, "render_fps": self.world.fps}
        self.render_mode = render_mode
        self.action_space = action_space(action_type, pitch)
        self.observation_space = spaces.Box(0, 255, self.world.frame_shape, np.uint8)
        self.max_episode_steps = max_episode_steps
        self.report_latency = report_latency
        self._core = WorldBatch(self.world, 1, make_reward(task, reward_fn, **(task_kwargs or {})),
                                steps=steps, device=device, dtype=dtype, collision=collision,
                                fast=fast)
        self._steps = 0
        self._window = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"start_index"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; known: ['start_index']")
        self._core.reset_rows([0], [self.np_random], [options.get("start_index")])
        self._steps = 0
        if self.render_mode == "human":
            self.render()
        return self._core.frames[0].copy(), self._info(latency_ms=0.0)

    def step(self, action):
        if not self._core.started:
            raise RuntimeError("call reset() before step()")
        actions = canonical_actions(action, self.action_space, None, type(self).__name__)
        frames, rewards, latency_ms = self._core.step(actions)
        self._steps += 1
        truncated = self.max_episode_steps is not None and self._steps >= self.max_episode_steps
        if self.render_mode == "human":
            self.render()
        return frames[0].copy(), float(rewards[0]), False, bool(truncated), self._info(latency_ms)

    def _info(self, latency_ms: float) -> dict[str, Any]:
        core = self._core
        info = {"pose": core.poses[0].astype(np.float32), "pose_delta": core.prev_deltas[0].copy(),
                "start_index": int(core.start_index[0]), "step": self._steps}
        if self.report_latency:
            info["latency_ms"] = float(latency_ms)
        return info

    def render(self):
        if self.render_mode == "rgb_array":
            return self._core.frames[0].copy()
        if self.render_mode == "human":
            if self._window is None:
                self._window = HumanWindow(self.world.frame_shape, self.metadata["render_fps"])
            self._window.show(self._core.frames[0])
        return None

    def close(self):
        if self._window is not None:
            self._window.close()
            self._window = None


class HumanWindow:
    """render_mode="human": the last frame in a pygame window (pygame imported only when used)."""

    def __init__(self, frame_shape: tuple[int, int, int], fps: float, scale: int = 4):
        import pygame

        self.pygame = pygame
        pygame.display.init()
        h, w, _ = frame_shape
        self.surface = pygame.display.set_mode((w * scale, h * scale))
        pygame.display.set_caption("worldmodel")
        self.clock = pygame.time.Clock()
        self.fps = fps

    def show(self, frame: np.ndarray) -> None:
        pygame = self.pygame
        pygame.event.pump()
        image = pygame.surfarray.make_surface(frame.swapaxes(0, 1))  # surfarray is (W, H, 3)
        pygame.transform.scale(image, self.surface.get_size(), self.surface)
        pygame.display.flip()
        self.clock.tick(self.fps)

    def close(self) -> None:
        self.pygame.display.quit()
