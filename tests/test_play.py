"""play.py: headless recording round-trip (MP4 decoded back, JSON sidecar) and keyboard/mouse handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pygame
import pytest

import play
from envs import WorldModelEnv
from tests.world_fixture import H, W, tiny_world, tiny_world_dir  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_headless_record_writes_mp4_and_sidecar(tiny_world_dir, tmp_path):
    out = tmp_path / "x.mp4"
    play.main(["--headless", "--frames", "32", "--record", str(out), "--world", str(tiny_world_dir),
               "--device", "cpu", "--dtype", "float32", "--seed", "3"])
    frames = decode(out)
    assert frames.shape == (32, H, W, 3)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == pytest.approx(10.0)  # the world's fps
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["seed"] == 3 and side["frames"] == 32 and side["codec"] == "libx264"
    assert len(side["actions"]) == len(side["poses"]) == len(side["latency_ms"]) == 32
    assert all(len(a) == 4 for a in side["actions"]) and all(len(p) == 5 for p in side["poses"])
    # The video shows the env's frames: replaying the sidecar's seed and actions reproduces them up to
    # H.264 loss (large on these 32x48 noise-like frames), far closer than the same actions under another seed.
    def replay(seed):
        env = WorldModelEnv(world=tiny_world_dir, action_type="camera", device="cpu", dtype="float32")
        env.reset(seed=seed)
        return np.stack([env.step(np.asarray(a, np.float32))[0] for a in side["actions"]]).astype(int)

    same, other = np.abs(replay(3) - frames).mean(), np.abs(replay(4) - frames).mean()
    assert same < 0.5 * other, (same, other)


def test_scripted_actions_file_discrete_ids(tiny_world_dir, tmp_path):
    acts = tmp_path / "acts.json"
    acts.write_text(json.dumps([1, 5, [0.0, 1.0, 0.0, 0.0]]))
    out = tmp_path / "s.mp4"
    play.main(["--headless", "--frames", "4", "--actions", str(acts), "--record", str(out),
               "--world", str(tiny_world_dir), "--device", "cpu", "--dtype", "float32"])
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["actions"] == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([99]))
    with pytest.raises(ValueError, match="discrete id 99"):
        play.load_actions(str(bad), 3, 0, 4)


def key(event_type, k):
    pygame.event.post(pygame.event.Event(event_type, key=k, mod=0, unicode="", scancode=0))


def test_keyboard_and_mouse_events_drive_actions(tiny_world, tmp_path):
    env = WorldModelEnv(world=tiny_world, action_type="camera", device="cpu", dtype="float32", report_latency=True)
    game = play.Game(env, scale=2, seed=0)
    key(pygame.KEYDOWN, pygame.K_w)
    key(pygame.KEYDOWN, pygame.K_LEFT)
    game.tick()
    np.testing.assert_array_equal(game.last_action, [1, 0, 1, 0])
    key(pygame.KEYUP, pygame.K_w)
    key(pygame.KEYDOWN, pygame.K_d)
    game.tick()
    np.testing.assert_array_equal(game.last_action, [0, 1, 0, 0])  # longest chord first: D+left is no chord
    key(pygame.KEYUP, pygame.K_LEFT)
    key(pygame.KEYUP, pygame.K_d)
    game.tick()
    np.testing.assert_array_equal(game.last_action, [0, 0, 0, 0])
    assert game.step_count == 3

    key(pygame.KEYDOWN, pygame.K_p)  # pause: no step ...
    game.tick()
    assert game.paused and game.step_count == 3
    key(pygame.KEYDOWN, pygame.K_PERIOD)  # ... until a single step
    game.tick()
    game.tick()
    assert game.step_count == 4
    key(pygame.KEYDOWN, pygame.K_p)

    pygame.event.post(pygame.event.Event(pygame.MOUSEBUTTONDOWN, button=1, pos=(1, 1)))
    game.tick()
    assert game.grabbed
    pygame.event.post(pygame.event.Event(pygame.MOUSEMOTION, rel=(-10, 0), pos=(0, 0), buttons=(0, 0, 0)))
    game.tick()
    assert game.last_action[2] == pytest.approx(10 * play.MOUSE_TURN_PER_PIXEL)  # mouse left turns left

    game.record_path = str(tmp_path / "tab.mp4")
    key(pygame.KEYDOWN, pygame.K_TAB)  # start recording
    game.tick()
    game.tick()
    key(pygame.KEYDOWN, pygame.K_TAB)  # stop
    game.tick()
    assert game.recorder is None and decode(tmp_path / "tab.mp4").shape[0] == 2

    key(pygame.KEYDOWN, pygame.K_r)
    game.tick()
    assert game.step_count == 1  # reset, then this tick's step

    key(pygame.KEYDOWN, pygame.K_F1)
    game.tick()
    assert game.show_help
    key(pygame.KEYDOWN, pygame.K_ESCAPE)  # first Esc releases the mouse ...
    game.tick()
    assert not game.grabbed and game.running
    key(pygame.KEYDOWN, pygame.K_ESCAPE)  # ... the second quits
    game.tick()
    assert not game.running
    game.close()


def test_help():
    out = subprocess.run([sys.executable, "play.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--record" in out.stdout and "Keys:" in out.stdout and "--compare" in out.stdout


def test_fast_takes_every_generator_path():
    """play.py writes the paths out (no torch before --help): they must stay StreamingGenerator's."""
    from worldmodel.inference.generator import StreamingGenerator

    for fast in StreamingGenerator.FAST_PATHS:
        assert play.parse_args(["--fast", fast]).fast == fast
    with pytest.raises(SystemExit):
        play.parse_args(["--fast", "fastest"])


@pytest.mark.vizdoom
def test_compare_env_pairs_engine_and_world(tiny_world):
    from data_tools.engine import DoomEngine
    from envs.compare import CompareEnv, engine_settings_for, psnr_uint8

    env = WorldModelEnv(world=tiny_world, action_type="camera", device="cpu", dtype="float32")
    cmp = CompareEnv(env, DoomEngine(engine_settings_for(tiny_world)))  # engine rendered at the world's 32x48
    ref = DoomEngine(engine_settings_for(tiny_world))
    try:
        obs, info = cmp.reset(seed=1, options={"start_index": 1})
        assert obs.shape == cmp.observation_space.shape == (H, 2 * W, 3)
        real, pose = ref.reset(start_pose=tiny_world.start_poses[1, -1], seed=1)
        np.testing.assert_array_equal(obs[:, :W], real)  # left: the engine placed at the start pose
        np.testing.assert_array_equal(obs[:, W:], tiny_world.start_frames[1, -1])  # right: the world's start
        np.testing.assert_array_equal(info["real_pose"], pose)
        for a in ([1, 0, 0.5, 0], [0, 1, -1, 0.2]):
            obs, _, _, _, info = cmp.step(np.asarray(a, np.float32))
            real, pose = ref.step(np.asarray(a, np.float32))  # the same canonical action reaches the engine
            np.testing.assert_array_equal(obs[:, :W], real)
            assert info["psnr"] == pytest.approx(psnr_uint8(obs[:, :W], obs[:, W:]))
        assert info["psnr_mean"] == pytest.approx(np.mean(cmp.psnrs)) and len(cmp.psnrs) == 2
    finally:
        cmp.close()
        ref.close()


@pytest.mark.vizdoom
def test_headless_compare_records_side_by_side_and_psnr(tiny_world_dir, tmp_path):
    out = tmp_path / "x.mp4"
    play.main(["--headless", "--frames", "8", "--compare", "--record", str(out), "--world", str(tiny_world_dir),
               "--device", "cpu", "--dtype", "float32", "--seed", "2"])
    frames = decode(out)
    assert frames.shape == (8, H, 2 * W, 3)  # [engine | world model], both at the world's frame size
    side = json.loads(out.with_suffix(".json").read_text())
    assert len(side["psnr"]) == len(side["real_poses"]) == side["frames"] == 8
    assert all(np.isfinite(side["psnr"])) and side["psnr_mean"] == pytest.approx(np.mean(side["psnr"]))
    # The sidecar's PSNR is that of the frames shown: recomputed from the decoded halves it agrees up to
    # H.264 loss (the two sides differ far more than the codec changes them).
    from envs.compare import psnr_uint8

    decoded = [psnr_uint8(f[:, :W], f[:, W:]) for f in frames]
    np.testing.assert_allclose(decoded, side["psnr"], atol=0.5)  # measured <= 0.16 dB


@pytest.mark.vizdoom
def test_compare_start_matches_a_real_start_context(tmp_path):
    """A world whose start contexts are real engine frames: at reset the engine, placed at the context's
    last pose, shows that very frame (measured 41-58 dB), so the comparison starts aligned."""
    from data_tools.engine import DoomEngine, RecordSettings
    from data_tools.poses import pose_deltas
    from data_tools.record import run_episode
    from envs.compare import CompareEnv, engine_settings_for
    from tests.world_fixture import tiny_action_model, tiny_config
    from worldmodel.inference.world import World, save_world
    from worldmodel.models.autoencoder import Autoencoder
    from worldmodel.models.dit import WorldDiT

    with DoomEngine(RecordSettings(height=H, width=W)) as eng:
        f, p, _ = run_episode(eng, eng.settings, seed=7, frames=80)
    idx = [20, 50, 78]
    frames, poses = np.stack([f[i - 1:i + 1] for i in idx]), np.stack([p[i - 1:i + 1] for i in idx])
    cfg = tiny_config()
    save_world(tmp_path / "w", WorldDiT(cfg.dit), Autoencoder(cfg.autoencoder), cfg,
               {"mean": [0.0] * 5, "std": [1.0] * 5}, tiny_action_model(),
               {"frames": frames, "deltas": np.stack([pose_deltas(x) for x in poses]), "poses": poses},
               provenance={"data": {"map": "MAP01"}}, fps=35 / 4)
    world = World.load(tmp_path / "w")
    assert engine_settings_for(world).frame_skip == 4
    cmp = CompareEnv(WorldModelEnv(world=world, action_type="camera", device="cpu", dtype="float32"),
                     DoomEngine(engine_settings_for(world)))
    try:
        for k in range(len(idx)):
            _, info = cmp.reset(seed=0, options={"start_index": k})
            assert info["psnr"] > 30.0, (k, info["psnr"])
    finally:
        cmp.close()
