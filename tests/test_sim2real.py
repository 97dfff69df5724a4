"""Issue 10's pieces: PPO learns, resumes exactly; the real-engine env shares the model env's task; baselines."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from benchmarks.ppo import PPOConfig, Trainer, advantages, preprocess
from benchmarks.sim2real import FORWARD, ScriptedExplorer, mean_ci
from tests.world_fixture import tiny_world, tiny_world_dir  # noqa: F401 (fixtures)


class ColourVectorEnv(gymnasium.vector.VectorEnv):
    """Each step shows a red, green or blue frame; reward 1 for the action of that colour (0, 1, 2) of 4."""

    def __init__(self, num_envs: int = 16):
        self.num_envs = num_envs
        self.single_observation_space = spaces.Box(0, 255, (40, 40, 3), np.uint8)
        self.single_action_space = spaces.Discrete(4)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.rng = np.random.default_rng(0)

    def _obs(self):
        self.colour = self.rng.integers(3, size=self.num_envs)
        frames = np.zeros((self.num_envs, 40, 40, 3), np.uint8)
        frames[np.arange(self.num_envs), :, :, self.colour] = 255
        return frames

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        return self._obs(), {}

    def step(self, actions):
        reward = (np.asarray(actions) == self.colour).astype(np.float64)
        done = np.zeros(self.num_envs, bool)
        return self._obs(), reward, done, done, {}


def colour_trainer(seed: int = 0) -> Trainer:
    cfg = PPOConfig(episode_steps=8, obs_size=(40, 40), width=8, minibatch=64, lr=1e-3, ent_coef=0.0)
    return Trainer(ColourVectorEnv(), num_actions=4, cfg=cfg, device="cpu", seed=seed)


def test_ppo_learns_the_colour_task():
    trainer = colour_trainer()
    first = trainer.iterate()["return_mean"]
    for _ in range(40):
        last = trainer.iterate()["return_mean"]
    assert first < 4.0  # 8 steps of a near-uniform 4-way guess: about 2
    assert last > 7.0, f"PPO did not learn the colour task: return {first:.2f} -> {last:.2f} of 8"


def test_ppo_resume_gives_the_identical_next_update(tmp_path):
    from worldmodel.checkpoint import load_training_state, save_training_state

    a = colour_trainer()
    for _ in range(3):
        a.iterate()
    a.snapshot()
    save_training_state(tmp_path / "ppo.pt", a.state_dict())
    b = colour_trainer(seed=0)
    b.load_state_dict(load_training_state(tmp_path / "ppo.pt"))
    ra, rb = a.iterate(), b.iterate()
    assert ra["return_mean"] == rb["return_mean"] and ra["pg_loss"] == rb["pg_loss"]
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(pa, pb)
    assert b.env_steps == a.env_steps == 4 * 8 * 16 and len(b.snapshots) == 1


def test_ppo_state_of_another_config_is_refused(tmp_path):
    a = colour_trainer()
    other = Trainer(ColourVectorEnv(), 4, PPOConfig(episode_steps=9, obs_size=(40, 40), width=8), "cpu")
    with pytest.raises(ValueError, match="trained with"):
        other.load_state_dict(a.state_dict())


def test_advantages_end_the_episode_and_mask_dead_envs():
    reward = torch.tensor([[1.0, 1.0], [1.0, 5.0], [1.0, 7.0]])
    alive = torch.tensor([[True, True], [True, False], [True, False]])
    value = torch.zeros(3, 2)
    adv, ret = advantages(reward, value, alive, gamma=1.0, lam=1.0)
    assert torch.allclose(ret[:, 0], torch.tensor([3.0, 2.0, 1.0]))  # no bootstrap after the last step
    assert ret[0, 1] == 1.0 and adv[1:, 1].abs().sum() == 0  # rewards after the env ended count for nothing


def test_preprocess_area_downsamples_exactly():
    frames = np.zeros((1, 4, 4, 3), np.uint8)
    frames[0, :2, :2, 0] = 200  # top-left quarter red
    out = preprocess(frames, (2, 2), torch.device("cpu"))
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.uint8
    assert out[0, 0].tolist() == [[200, 0], [0, 0]] and out[0, 1:].sum() == 0


def test_scripted_explorer_turns_away_when_stuck():
    explorer = ScriptedExplorer(2, seed=0)
    walking = np.array([[0.0, 0, 0, 0, 0], [0.0, 0, 0, 0, 0]])
    actions = [explorer(walking + np.array([[10.0 * t, 0, 0, 0, 0], [0, 0, 0, 0, 0]])) for t in range(4)]
    assert all(a[0] == FORWARD for a in actions)  # env 0 keeps moving: keeps walking
    assert actions[-1][1] != FORWARD  # env 1 has not moved for 2 steps: turning


def test_mean_ci_matches_students_t():
    r = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert r["mean"] == 2.5 and r["n"] == 4
    assert abs(r["ci95"] - 3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2) < 1e-5


@pytest.mark.vizdoom
def test_real_engine_env_shares_the_task_and_spaces():
    from gymnasium.utils.env_checker import check_env

    import envs  # noqa: F401 (registers the ids)
    from envs.doom_env import DoomRealEnv
    from envs.rewards import ExploreReward

    poses = np.array([[-192.0, -192.0, 0.0, 56.0, 0.0], [-150.0, -193.0, 0.0, 356.0, 0.0]], np.float32)
    env = DoomRealEnv(start_poses=poses, map="MAP01", frame_shape=(48, 64, 3), fps=8.75, task="explore",
                      max_episode_steps=30)
    assert env.observation_space.shape == (48, 64, 3) and env.action_space.n == 15
    obs, info = env.reset(seed=3, options={"start_index": 1})
    assert obs.shape == (48, 64, 3) and np.hypot(*(info["pose"][:2] - poses[1, :2])) <= 1.0
    assert abs(info["pose"][3] - 356.0) < 1e-3
    reference = ExploreReward(64.0)
    reference.reset(info["pose"].astype(np.float64))
    total = expected = 0.0
    for t in range(30):
        obs, reward, terminated, truncated, info = env.step(FORWARD if t % 10 else 7)
        total += reward
        expected += reference(obs, info["pose"].astype(np.float64), None)
        assert not terminated
    assert truncated and total == expected and total > 0  # the same reward, of where the player really is
    tics = env.engine.game.get_episode_time()
    with pytest.raises(ValueError, match="action ids must be in"):
        env.step(15)
    assert env.engine.game.get_episode_time() == tics  # a bad action did not step the engine
    with pytest.raises(ValueError, match="start_index"):
        env.reset(options={"start_index": 2})
    with pytest.raises(ValueError, match="either world"):
        DoomRealEnv(start_poses=poses)
    check_env(env, skip_render_check=True)
    env.close()
    env.close()
    made = gymnasium.make("worldmodel/DoomRealCamera-v0", start_poses=poses, map="MAP01", frame_shape=(48, 64, 3),
                          fps=8.75)
    assert made.action_space.shape == (4,)
    made.close()


def test_collision_gate_learns_walls_from_the_frame(tmp_path):
    from envs.collision import IN_SIZE, fit, load, save

    rng = np.random.default_rng(0)
    n = 1500
    wall = rng.random(n) < 0.5
    frames = rng.integers(0, 60, (n, *IN_SIZE, 3)).astype(np.uint8)
    frames[wall, 10:40, :, 0] = 250  # a red wall in view: the engine stops the player
    kin = np.stack([rng.uniform(5, 25, n), rng.uniform(-10, 10, n)], 1).astype(np.float32)
    real = np.where(wall[:, None], 0.0, kin).astype(np.float32)
    net, metrics = fit({"frames": frames, "kinematic": kin, "realised": real}, epochs=6, batch=64, progress=False)
    assert metrics["val_mse"] < 0.1 * metrics["val_mse_ungated"], metrics
    save(net, tmp_path / "walls", {"metrics": metrics})
    again = load(tmp_path / "walls")
    f, k = torch.as_tensor(frames[:8]), torch.as_tensor(kin[:8])
    assert torch.allclose(net(f, k), again(f, k))
    with pytest.raises(ValueError, match="not a collision model"):
        from worldmodel.checkpoint import save_weights

        save_weights(tmp_path / "other", {"w": torch.zeros(1)}, {"kind": "policy"})
        load(tmp_path / "other")


def test_closed_gate_stops_the_world_models_camera(tiny_world):
    from envs import WorldModelVectorEnv
    from envs.collision import CollisionNet

    shut = CollisionNet(width=4)
    torch.nn.init.constant_(shut.head[-1].bias, -30.0)  # gate ~0: every wall closed
    env = WorldModelVectorEnv(2, world=tiny_world, device="cpu", dtype="float32", collision=shut)
    free = WorldModelVectorEnv(2, world=tiny_world, device="cpu", dtype="float32")
    for e in (env, free):
        e.reset(seed=0)
    for _ in range(3):
        pose = env.step(np.array([FORWARD, FORWARD]))[4]["pose"]
        free_pose = free.step(np.array([FORWARD, FORWARD]))[4]["pose"]
    start = tiny_world.start_poses[env._core.start_index, -1]
    assert np.abs(pose[:, :2] - start[:, :2]).max() < 1e-3  # forward and strafe gated to 0: the camera stays
    assert np.abs(free_pose[:, :2] - start[:, :2]).max() > 1.0  # without the gate it walks
