"""Rewards of the world-model envs: a callable `reward(obs, pose, action) -> float` per world.

A reward that keeps episode state (like `ExploreReward`) also has `reset(pose)`, which the env calls at
the start of every episode with the start pose. The vector env deep-copies one reward per world.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def zero_reward(obs: np.ndarray, pose: np.ndarray, action: np.ndarray) -> float:
    return 0.0


class ExploreReward:
    """+`bonus` for entering a cell of the integrated (x, y) grid not visited yet in this episode.

    The pose is the one integrated from the commanded motion (the world model has no collision), so this
    rewards covering ground, not reaching places of the real map.
    """

    def __init__(self, cell_size: float = 64.0, bonus: float = 1.0):
        if cell_size <= 0:
            raise ValueError(f"explore reward cell_size must be positive, got {cell_size}")
        self.cell_size = float(cell_size)
        self.bonus = float(bonus)
        self.visited: set[tuple[int, int]] = set()

    def _cell(self, pose: np.ndarray) -> tuple[int, int]:
        return int(np.floor(pose[0] / self.cell_size)), int(np.floor(pose[1] / self.cell_size))

    def reset(self, pose: np.ndarray) -> None:
        self.visited = {self._cell(pose)}

    def __call__(self, obs: np.ndarray, pose: np.ndarray, action: np.ndarray) -> float:
        cell = self._cell(pose)
        if cell in self.visited:
            return 0.0
        self.visited.add(cell)
        return self.bonus


TASKS: dict[str, Callable[..., Any]] = {"none": lambda: zero_reward, "explore": ExploreReward}


def make_reward(task: str | None = None, reward_fn: RewardFn | None = None, **task_kwargs: Any) -> RewardFn:
    """The reward of an env: an explicit `reward_fn` wins, else the named task (None -> zero reward)."""
    if reward_fn is not None:
        if task is not None:
            raise ValueError("give either reward_fn or task, not both")
        return reward_fn
    task = task or "none"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task](**task_kwargs)
