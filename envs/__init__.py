"""Gymnasium environments of the world model; importing this package registers them.

Gymnasium 1.x loads no plugins from entry points, so use `import envs` (or the id form
`"envs:worldmodel/Doom-v0"`) before `gymnasium.make("worldmodel/Doom-v0")`.
"""

import gymnasium

from envs.keymap import ACTION_NAMES, DISCRETE_ACTIONS
from envs.rewards import ExploreReward, make_reward
from envs.world_model_env import WorldModelEnv
from envs.vector_env import WorldModelVectorEnv

MAX_EPISODE_STEPS = 1000
ENV_IDS = ("worldmodel/Doom-v0", "worldmodel/DoomCamera-v0")
REAL_ENV_IDS = ("worldmodel/DoomReal-v0", "worldmodel/DoomRealCamera-v0")


def register_envs() -> None:
    """Register the ids (idempotent): the world model's (single and natively batched vector entry point) and
    the real engine's (single; vectorise with gymnasium.vector.AsyncVectorEnv)."""
    for env_id, action_type in zip(ENV_IDS, ("keyboard", "camera")):
        if env_id in gymnasium.registry:
            continue
        gymnasium.register(
            id=env_id,
            entry_point="envs.world_model_env:WorldModelEnv",
            vector_entry_point="envs.vector_env:WorldModelVectorEnv",
            max_episode_steps=MAX_EPISODE_STEPS,
            kwargs={"action_type": action_type},
        )
    for env_id, action_type in zip(REAL_ENV_IDS, ("keyboard", "camera")):  # the real engine, same task and spaces
        if env_id in gymnasium.registry:
            continue
        gymnasium.register(id=env_id, entry_point="envs.doom_env:DoomRealEnv",
                           max_episode_steps=MAX_EPISODE_STEPS, kwargs={"action_type": action_type})


register_envs()

__all__ = ["ACTION_NAMES", "DISCRETE_ACTIONS", "ENV_IDS", "REAL_ENV_IDS", "ExploreReward", "WorldModelEnv",
           "WorldModelVectorEnv", "make_reward", "register_envs"]
