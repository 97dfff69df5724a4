"""Env tests on the tiny random world: checkers, determinism, vector == singles, bad input, rewards, keymap."""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest

import envs
from envs import WorldModelEnv, WorldModelVectorEnv
from envs.keymap import ACTION_KEYS, ACTION_NAMES, CHORDS, DISCRETE_ACTIONS, chord_index
from envs.rewards import ExploreReward
from tests.world_fixture import H, STARTS, W, tiny_world, tiny_world_dir  # noqa: F401 (fixtures)
from worldmodel.inference.world import World, WorldError

CPU = {"device": "cpu", "dtype": "float32"}


def single(world, action_type="keyboard", **kw):
    return WorldModelEnv(world=world, action_type=action_type, **CPU, **kw)


def rollout(env, seed, actions, start_index=None):
    obs, _ = env.reset(seed=seed, options=None if start_index is None else {"start_index": start_index})
    out = [obs]
    for a in actions:
        out.append(env.step(a)[0])
    return np.stack(out)


# -- world packaging -----------------------------------------------------------------------------

def test_world_round_trip(tiny_world, tiny_world_dir):
    assert tiny_world.frame_shape == (H, W, 3) and tiny_world.num_starts == STARTS
    assert tiny_world.fps == 10.0
    again = World.load(tiny_world_dir)
    np.testing.assert_array_equal(again.start_frames, tiny_world.start_frames)
    assert again.config == tiny_world.config


def test_world_missing_and_corrupt_files_are_named(tiny_world_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_world_dir, broken)
    (broken / "action_model.json").unlink()
    with pytest.raises(WorldError, match="action_model.json"):
        World.load(broken)
    shutil.copy(tiny_world_dir / "action_model.json", broken / "action_model.json")
    (broken / "start_contexts.npz").write_bytes(b"not a zip")
    with pytest.raises(WorldError, match="start_contexts.npz"):
        World.load(broken)
    shutil.copy(tiny_world_dir / "start_contexts.npz", broken / "start_contexts.npz")
    data = (broken / "student.safetensors").read_bytes()
    (broken / "student.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WorldError, match="student.safetensors"):
        World.load(broken).modules()
    with pytest.raises(WorldError, match="does not exist"):
        World.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorldError, match="lacks student.safetensors.*start_contexts.npz; build a world with"):
        World.load(tmp_path / "empty")


# -- registration and checkers -------------------------------------------------------------------

@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_checkers_pass(env_id, tiny_world):
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gymnasium.make(env_id, world=tiny_world, render_mode="rgb_array", **CPU)
    assert env.spec.max_episode_steps == envs.MAX_EPISODE_STEPS
    check_env(env.unwrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 suggests channel-first images; ours are (H, W, 3) on purpose
        sb3_check_env(env.unwrapped, warn=True)
    env.reset(seed=0)
    assert env.render().shape == (H, W, 3)
    env.close()
    env.close()


def test_human_render_with_dummy_sdl(tiny_world):
    env = single(tiny_world, render_mode="human")
    env.reset(seed=0)
    env.step(1)
    assert env.render() is None
    env.close()
    env.close()


def test_camera_spaces(tiny_world):
    assert single(tiny_world, "camera").action_space.shape == (4,)
    # Gymnasium 1.x loads no entry-point plugins: the "module:id" form imports envs on demand.
    env = gymnasium.make("envs:worldmodel/DoomCamera-v0", world=tiny_world, pitch=False, **CPU)
    assert env.action_space.shape == (3,)
    env.reset(seed=0)
    env.step(np.array([1.0, 0.0, -0.5], np.float32))


# -- determinism ---------------------------------------------------------------------------------

def test_same_seed_same_frames_different_seed_differs(tiny_world):
    actions = [1, 7, 7, 5, 0, 2, 10, 3, 4, 6]  # 10 steps: the 4-frame cache wraps
    a = rollout(single(tiny_world), 3, actions)
    b = rollout(single(tiny_world), 3, actions)
    np.testing.assert_array_equal(a, b)
    c = rollout(single(tiny_world), 4, actions, start_index=0)
    d = rollout(single(tiny_world), 5, actions, start_index=0)
    np.testing.assert_array_equal(c[0], d[0])  # same start frame ...
    assert np.abs(c[1:].astype(int) - d[1:].astype(int)).mean() > 1.0  # ... different noise


def test_info_pose_integrates_commanded_motion(tiny_world):
    env = single(tiny_world, report_latency=True)
    _, info = env.reset(seed=0, options={"start_index": 1})
    np.testing.assert_allclose(info["pose"], tiny_world.start_poses[1, -1], atol=1e-4)
    for _ in range(5):
        _, reward, terminated, truncated, info = env.step(1)  # forward
        assert isinstance(reward, float) and terminated is False and truncated is False
    assert info["latency_ms"] > 0 and info["step"] == 5
    moved = info["pose"][:2] - tiny_world.start_poses[1, -1, :2]
    assert np.linalg.norm(moved) > 1.0


# -- vector env ----------------------------------------------------------------------------------

def test_vector_env_equals_single_envs_including_autoreset(tiny_world):
    n, steps, seed = 3, 7, 11
    rng = np.random.default_rng(0)
    actions = rng.integers(0, len(DISCRETE_ACTIONS), (steps, n))
    venv = gymnasium.make_vec("worldmodel/Doom-v0", num_envs=n, vectorization_mode="vector_entry_point",
                              world=tiny_world, max_episode_steps=4, **CPU)
    assert isinstance(venv.unwrapped, WorldModelVectorEnv)
    assert venv.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP
    obs, _ = venv.reset(seed=seed)
    vec_frames, truncs = [obs], []
    for t in range(steps):
        obs, rew, term, trunc, info = venv.step(actions[t])
        vec_frames.append(obs)
        truncs.append(trunc)
    vec_frames = np.stack(vec_frames)  # (steps+1, n, H, W, 3)
    assert np.array_equal(np.stack(truncs)[:, 0], [False, False, False, True, False, False, False])
    for i in range(n):
        env = WorldModelEnv(world=tiny_world, max_episode_steps=4, **CPU)
        frames = [env.reset(seed=seed + i)[0]]
        for t in range(4):
            frames.append(env.step(actions[t, i])[0])
        # NEXT_STEP autoreset: step 5's action is ignored and its observation is a fresh start.
        frames.append(env.reset()[0])
        for t in range(5, steps):
            frames.append(env.step(actions[t, i])[0])
        diff = np.abs(np.stack(frames).astype(int) - vec_frames[:, i].astype(int))
        # The same computation; batched CPU kernels may round a ulp differently (measured: <= 1 level on
        # ~0.005% of pixels).
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, f"world {i}: vector env differs from single env"
        assert diff[5].max() == 0, f"world {i}: autoreset start frame differs"


def test_vector_env_camera_and_infos(tiny_world):
    venv = WorldModelVectorEnv(2, world=tiny_world, action_type="camera", **CPU)
    obs, info = venv.reset(seed=0)
    assert obs.shape == (2, H, W, 3) and info["pose"].shape == (2, 5) and info["_pose"].all()
    obs, rew, term, trunc, info = venv.step(np.zeros((2, 4), np.float32))
    assert rew.shape == (2,) and term.dtype == bool and obs in venv.observation_space
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        venv.step(np.zeros((3, 4), np.float32))


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("action_type,bad", [
    ("keyboard", 15), ("keyboard", -1), ("keyboard", 1.5), ("keyboard", [1, 2]),
    ("camera", np.array([2.0, 0, 0, 0], np.float32)), ("camera", np.array([np.nan, 0, 0, 0], np.float32)),
    ("camera", np.zeros(3, np.float32)), ("camera", "forward"),
])
def test_bad_action_raises_and_leaves_env_unchanged(tiny_world, action_type, bad):
    good = 1 if action_type == "keyboard" else np.array([1.0, 0.0, 0.5, 0.0], np.float32)
    reference = rollout(single(tiny_world, action_type), 0, [good, good, good])
    env = single(tiny_world, action_type)
    env.reset(seed=0)
    env.step(good)
    with pytest.raises(ValueError, match="expected|must be|NaN"):
        env.step(bad)
    got = [env.step(good)[0], env.step(good)[0]]
    np.testing.assert_array_equal(np.stack(got), reference[2:])


# -- rewards -------------------------------------------------------------------------------------

def test_explore_reward_counts_new_cells_only():
    r = ExploreReward(cell_size=10.0)
    r.reset(np.array([0.0, 0.0, 0, 0, 0]))
    act = np.zeros(4)
    assert r(None, np.array([5.0, 5.0, 0, 0, 0]), act) == 0.0  # same cell as the start
    assert r(None, np.array([15.0, 5.0, 0, 0, 0]), act) == 1.0
    assert r(None, np.array([16.0, 5.0, 0, 0, 0]), act) == 0.0
    r.reset(np.array([0.0, 0.0, 0, 0, 0]))
    assert r(None, np.array([15.0, 5.0, 0, 0, 0]), act) == 1.0  # a new episode forgets


def test_explore_task_in_env(tiny_world):
    env = single(tiny_world, task="explore", task_kwargs={"cell_size": 4.0})
    env.reset(seed=0)
    turning = sum(env.step(5)[1] for _ in range(4))  # turning in place never leaves the cell...
    env.reset(seed=0)
    walking = sum(env.step(1)[1] for _ in range(8))  # ...walking does
    assert turning == 0.0 and walking >= 2.0
    calls = []
    env = single(tiny_world, reward_fn=lambda obs, pose, action: calls.append(action) or 0.25)
    env.reset(seed=0)
    assert env.step(1)[1] == 0.25 and np.array_equal(calls[0], DISCRETE_ACTIONS[1])


# -- keymap --------------------------------------------------------------------------------------

def test_keymap_is_consistent():
    assert len(set(ACTION_NAMES)) == len(ACTION_NAMES) == len(DISCRETE_ACTIONS)
    assert len(set(ACTION_KEYS)) == len(ACTION_KEYS)  # no chord twice
    lengths = [len(keys) for keys, _ in CHORDS]
    assert lengths == sorted(lengths, reverse=True)
    assert np.abs(DISCRETE_ACTIONS).max() <= 1.0
    assert ACTION_NAMES[chord_index({"w", "left"})] == "forward_turn_left"
    assert ACTION_NAMES[chord_index({"w"})] == "forward" and chord_index(set()) == 0
    assert ACTION_NAMES[chord_index({"s", "d", "x"})] == "back_strafe_right"
    # turn > 0 is left, strafe > 0 is right (docs/ARCHITECTURE.md)
    assert DISCRETE_ACTIONS[ACTION_NAMES.index("turn_left")][2] > 0
    assert DISCRETE_ACTIONS[ACTION_NAMES.index("strafe_right")][1] > 0


# -- RL ------------------------------------------------------------------------------------------

def test_sb3_ppo_runs_on_vector_env(tiny_world):
    from stable_baselines3 import PPO

    from envs.sb3 import SB3VecEnv

    venv = SB3VecEnv(WorldModelVectorEnv(4, world=tiny_world, task="explore", max_episode_steps=32, **CPU))
    model = PPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256


def test_partial_reset_leaves_other_worlds_untouched(tiny_world):
    """reset(options={"reset_mask"}) restarts some worlds; the others' frames are bit-identical to a run
    without it, and the restarted world starts from its context's last frame and keeps generating."""
    n, seed, acts = 3, 5, np.array([1, 7, 3])

    def run(mask_at):
        venv = WorldModelVectorEnv(n, world=tiny_world, **CPU)
        frames = [venv.reset(seed=seed)[0]]
        for t in range(8):  # past the 4-frame cache, so the ring has wrapped when the reset lands
            if t == mask_at:
                obs, info = venv.reset(options={"reset_mask": [False, True, False], "start_index": 0})
                assert np.array_equal(obs[1], tiny_world.start_frames[0, -1]) and info["step"][1] == 0
            frames.append(venv.step(acts)[0])
        return np.stack(frames)

    plain, reset = run(None), run(5)
    np.testing.assert_array_equal(reset[:, [0, 2]], plain[:, [0, 2]])
    assert np.abs(reset[6:, 1].astype(int) - plain[6:, 1].astype(int)).mean() > 1.0
    assert len({f.tobytes() for f in reset[6:, 1]}) == 3  # the restarted world keeps moving


def test_fast_path_gives_the_eager_frames_through_resets(tiny_world):
    """WorldBatch's default generator path (the static frame step on the CPU, CUDA graphs on CUDA) against
    fast="off": the same frames, in fp32, over ring wraps and a partial reset, with the collision-free action model."""
    from envs.core import WorldBatch
    from envs.rewards import make_reward

    def run(fast):
        core = WorldBatch(tiny_world, 3, make_reward(), device="cpu", dtype="float32", fast=fast)
        rngs = [np.random.default_rng(s) for s in (1, 2, 3)]
        core.reset_rows([0, 1, 2], rngs, [0, 1, 0])
        acts = np.random.default_rng(0).uniform(-1, 1, (12, 3, 4)).astype(np.float32)
        frames = []
        for t, a in enumerate(acts):  # past the 4-frame window, so the fast path is taken, and the ring wraps
            if t == 7:
                core.reset_rows([1], [np.random.default_rng(9)], [1])
            frames.append(core.step(a)[0].copy())
        return np.stack(frames), core.generator

    eager, _ = run("off")
    fast, gen = run(None)
    assert gen.fast == "static" and gen._frame_step is not None  # the static step really ran
    diff = np.abs(fast.astype(int) - eager.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # fp32 latents agree to ~1e-5: at most a rounding flip
