"""The world benchmarks (benchmarks/action_following.py, long_rollout.py, side_by_side.py): end to end on the
tiny world, and their statistics on cases with a known answer (synthetic turns, real engine frames, frozen
and blank frames)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from benchmarks import action_following as af
from benchmarks import long_rollout as lr
from benchmarks import side_by_side as sbs
from data_tools.annotator import _yaw_rotation, intrinsics
from tests.world_fixture import H, W, tiny_world, tiny_world_dir  # noqa: F401 (fixtures)

CPU = ["--device", "cpu", "--dtype", "float32"]


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), (3, 3), 0)


def turning_views(yaws_deg, h: int = 96, w: int = 128) -> np.ndarray:
    """Views of one textured scene by a camera at absolute yaws (deg, + = left), fov 90: pure rotation."""
    big = _texture(3 * h, 3 * w)
    K, Kb = intrinsics(w, h, 90.0), intrinsics(3 * w, 3 * h, 150.0)  # a wide source covers every view
    out = []
    for yaw in yaws_deg:
        Hm = K @ _yaw_rotation(yaw) @ np.linalg.inv(K)
        out.append(cv2.warpPerspective(big, Kb @ np.linalg.inv(K) @ np.linalg.inv(Hm), (w, h),
                                       flags=cv2.WARP_INVERSE_MAP))
    return np.stack(out)


def _cmd(yaws) -> np.ndarray:
    d = np.zeros((len(yaws) - 1, 5), np.float32)
    d[:, 3] = np.diff(yaws)
    return d


# ----- action following: statistics -----------------------------------------------------------

def test_follow_stats_on_a_known_synthetic_turn_and_on_frozen_frames():
    yaws = [0, 4, 8, 12, 8, 4, 0, -4, -8]
    frames, cmd = turning_views(yaws), _cmd(yaws)
    good = af.follow_stats(af.annotate(frames, 90.0), cmd)
    assert good["frames"] == 8 and good["turning_frames"] == 8
    assert good["yaw_err_median"] < 0.3 and good["yaw_err_p90"] < 0.5, good
    assert good["yaw_sign_agree"] == 1.0 and good["yaw_gain"] == pytest.approx(1.0, abs=0.05)
    frozen = af.follow_stats(af.annotate(np.repeat(frames[:1], len(yaws), 0), 90.0), cmd)
    assert frozen["yaw_err_median"] == pytest.approx(4.0, abs=0.01)  # the whole commanded turn is missed
    assert frozen["yaw_sign_agree"] == 0.0 and frozen["yaw_gain"] == pytest.approx(0.0, abs=1e-6)
    # A world that turns the wrong way: error twice the rate, signs all wrong.
    backwards = af.follow_stats(af.annotate(turning_views([-y for y in yaws]), 90.0), cmd)
    assert backwards["yaw_err_median"] > 7.0 and backwards["yaw_sign_agree"] == 0.0


def test_follow_stats_translation_direction():
    cmd = np.zeros((4, 5))
    cmd[:, 0] = 10.0  # forward
    est = np.zeros((4, 5))
    est[:2, 0], est[2:, 1] = 1.0, 1.0  # half right, half strafing (90 deg off)
    r = af.follow_stats(est, cmd)
    assert r["moving_frames"] == 4 and r["motion_detected"] == 1.0
    assert r["dir_err_median"] == pytest.approx(45.0) and r["dir_err_p90"] == pytest.approx(90.0)
    assert r["turning_frames"] == 0 and np.isnan(r["yaw_sign_agree"])
    assert af.follow_stats(np.zeros((4, 5)), cmd)["motion_detected"] == 0.0  # a frozen world finds no motion


def test_scripts_follow_the_worlds_action_model(tiny_world):
    rate = af.full_rate(tiny_world)
    assert rate == pytest.approx(12.0, abs=1e-3)  # fixture: 6 deg/frame + half the previous turn carried over
    turn = af.scripted_actions("turn_in_place", tiny_world)
    n = len(turn) // 2
    assert (turn[:n, 2] == 1).all() and (turn[n:, 2] == -1).all() and not turn[:, [0, 1, 3]].any()
    yaw = tiny_world.action_model.rollout(np.zeros(5), turn[:n])[:, 3].sum()
    assert abs(yaw - 360.0) <= rate / 2  # a full turn by the world's own action model
    square = af.scripted_actions("strafe_square", tiny_world)
    assert not square[:, 2].any() and square[:, :2].sum(0).tolist() == [0.0, 0.0]  # no turn, back where it began
    with pytest.raises(ValueError, match="unknown script"):
        af.scripted_actions("moonwalk", tiny_world)


def test_commanded_deltas_are_what_the_env_feeds_the_generator(tiny_world):
    from envs.world_model_env import WorldModelEnv

    acts = af.scripted_actions("walk_and_return", tiny_world)[:10]
    frames, cmd, _ = af.model_rollouts(tiny_world, acts, [0, 1], steps=None, device="cpu", dtype="float32", seed=0)
    assert frames.shape == (2, len(acts) + 1, H, W, 3) and cmd.shape == (2, len(acts), 5)
    np.testing.assert_array_equal(frames[:, 0], tiny_world.start_frames[:, -1])
    env = WorldModelEnv(world=tiny_world, action_type="camera", device="cpu", dtype="float32")
    for k in (0, 1):
        env.reset(seed=0, options={"start_index": k})
        deltas = [env.step(a)[4]["pose_delta"] for a in acts]
        np.testing.assert_allclose(cmd[k], np.stack(deltas), rtol=1e-6, atol=1e-6)


# ----- action following: end to end -----------------------------------------------------------

def test_action_following_main_writes_report(tiny_world_dir, tmp_path):
    out = tmp_path / "af.json"
    report = af.main(["--world", str(tiny_world_dir), *CPU, "--no-engine", "--out", str(out)])
    saved = json.loads(out.read_text())  # strict JSON: NaN became null
    assert [r["script"] for r in saved["results"]] == list(af.SCRIPTS)
    assert saved["overall"]["frames"] == sum(r["frames"] for r in saved["results"])
    assert saved["engine"]["available"] is False and "--no-engine" in saved["engine"]["note"]
    assert all(r["engine"] is None for r in saved["results"])
    assert saved["starts"] == [0, 1] and saved["fov"] == 90.0
    assert set(saved["verdict"]) >= {"yaw_err_median", "target", "pass"}
    assert report["overall"]["model"]["frames"] == 2 * saved["overall"]["frames"]  # two starts
    md = out.with_suffix(".md").read_text()
    assert "| **overall** |" in md and "Verdict" in md and all(s in md for s in af.SCRIPTS)


def test_benchmarks_name_the_missing_world(tmp_path):
    for mod in (af, lr, sbs):
        with pytest.raises(SystemExit, match="does not exist; build a world"):
            mod.main(["--world", str(tmp_path / "nope"), "--out", str(tmp_path / "x.json")])


@pytest.mark.vizdoom
def test_follow_stats_on_real_engine_turn():
    from data_tools.engine import DoomEngine, RecordSettings

    acts = np.zeros((12, 4), np.float32)
    acts[:6, 2], acts[6:, 2] = 1.0, -0.5
    with DoomEngine(RecordSettings()) as eng:
        frames, truth, placed = af.engine_rollout(eng, None, acts)
    assert frames.shape == (13, 96, 128, 3) and truth.shape == (12, 5)
    assert np.abs(truth[1:6, 3]).min() > 10  # a full turn is 14 deg/frame at frame skip 4
    r = af.follow_stats(af.annotate(frames, 90.0), truth)
    assert r["yaw_err_median"] < 0.5 and r["yaw_sign_agree"] == 1.0, r
    frozen = af.follow_stats(af.annotate(np.repeat(frames[:1], 13, 0), 90.0), truth)
    assert frozen["yaw_err_median"] > 5.0 and frozen["yaw_sign_agree"] == 0.0


@pytest.mark.vizdoom
def test_action_following_with_engine_reference(tiny_world_dir, tmp_path):
    out = tmp_path / "af.json"
    af.main(["--world", str(tiny_world_dir), *CPU, "--scripts", "turn_in_place", "strafe_square",
             "--starts", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["engine"]["available"] is True and len(saved["engine"]["placement"]) == 2
    for row in saved["results"] + [saved["overall"]]:
        assert row["engine"]["frames"] == row["frames"]  # the engine replayed every action
    assert saved["results"][0]["engine"]["turning_frames"] > 0
    assert saved["overall"]["engine"]["yaw_err_median"] is not None
    overall_row = [ln for ln in out.with_suffix(".md").read_text().splitlines() if "**overall**" in ln][0]
    assert overall_row.split("|")[8].strip() != "-"  # the engine's yaw column is filled


# ----- long rollout ----------------------------------------------------------------------------

def test_collapse_detector_flags_blank_and_frozen_sequences():
    blank = np.full((100, H, W, 3), 90, np.uint8)
    (w,) = lr.sequence_windows(blank, 100)
    flags = lr.collapse_flags(w, engine_sharpness=800.0)
    assert w["blank_share"] == 1.0 and w["motion"] == 0.0 and w["sharpness"] == 0.0
    assert [f.split()[0] for f in flags] == ["blank", "frozen", "washed"]
    assert w["channel_mean"] == [90.0, 90.0, 90.0] and w["channel_std"] == [0.0, 0.0, 0.0]
    textured = np.repeat(turning_views([0])[None, 0], 60, 0)  # a sharp image that never changes
    (w,) = lr.sequence_windows(textured, 100)
    assert w["frames"] == 60 and [f.split()[0] for f in lr.collapse_flags(w)] == ["frozen"]
    moving = turning_views(np.linspace(-20, 20, 30))
    assert all(not lr.collapse_flags(w) for w in lr.sequence_windows(moving, 10))


@pytest.mark.vizdoom
def test_collapse_detector_passes_the_real_engine():
    from data_tools.engine import ACTION_SCALE, DoomEngine, RecordSettings
    from data_tools.exploration import ExplorationPolicy

    policy = ExplorationPolicy(5, abs(ACTION_SCALE[2]) * 4, ACTION_SCALE[3] * 4)
    with DoomEngine(RecordSettings()) as eng:
        _, pose = eng.reset(seed=5)
        frames = []
        for _ in range(300):
            f, pose = eng.step(policy.act(pose))
            frames.append(f)
    windows = lr.sequence_windows(frames, 100)
    ref = float(np.median([w["sharpness"] for w in windows]))
    assert len(windows) == 3
    for w in windows:
        assert lr.collapse_flags(w, ref) == [] and lr.collapse_flags(w) == [], w
        assert w["motion"] > 5 * lr.FROZEN_DIFF and w["blank_share"] == 0.0


def test_long_rollout_main_writes_windows_and_mp4(tiny_world_dir, tmp_path):
    import av

    out, mp4 = tmp_path / "lr.json", tmp_path / "lr.mp4"
    lr.main(["--world", str(tiny_world_dir), *CPU, "--frames", "120", "--window", "50", "--no-engine",
             "--mp4", str(mp4), "--out", str(out)])
    saved = json.loads(out.read_text())
    windows = saved["model"]["windows"]
    assert [w["frames"] for w in windows] == [50, 50, 20] and [w["first_frame"] for w in windows] == [0, 50, 100]
    assert all(w["rss_mb"] > 0 and w["latency_ms_median"] > 0 for w in windows)
    assert saved["engine"]["available"] is False and saved["engine"]["windows"] is None
    v = saved["verdict"]
    assert v["memory_growth_mb"] == pytest.approx(windows[-1]["rss_mb"] - windows[0]["rss_mb"])
    assert isinstance(v["pass"], bool) and v["sharpness_ratio_overall"] is None
    with av.open(str(mp4)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 121  # the start frame + 120 generated
    assert "Verdict" in out.with_suffix(".md").read_text()


@pytest.mark.vizdoom
def test_long_rollout_with_engine_reference(tiny_world_dir, tmp_path):
    out = tmp_path / "lr.json"
    lr.main(["--world", str(tiny_world_dir), *CPU, "--frames", "60", "--window", "30", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["engine"]["available"] is True and len(saved["engine"]["windows"]) == 2
    assert saved["thresholds"]["engine_median_window_sharpness"] > 0
    assert all(w["sharpness_ratio"] is not None for w in saved["model"]["windows"])
    assert saved["verdict"]["engine_windows_flagged"] == 0


# ----- side by side ----------------------------------------------------------------------------

def test_compose_layout():
    real, fake = np.full((H, W, 3), 10, np.uint8), np.full((H, W, 3), 200, np.uint8)
    img = sbs.compose(real, fake, "frame 3", scale=2, sep=2)
    strip = max(12, 7 * 2)
    assert img.shape == (2 * H + 2 * strip, 4 * W + 2, 3)
    assert (img[strip:strip + 2 * H, : 2 * W] == 10).all() and (img[strip:strip + 2 * H, 2 * W + 2:] == 200).all()
    assert (img[strip:strip + 2 * H, 2 * W:2 * W + 2] == 128).all()
    assert img[:strip].any() and img[-strip:].any()  # captions drawn


@pytest.mark.vizdoom
def test_side_by_side_mp4(tiny_world_dir, tmp_path):
    import av

    out = tmp_path / "sbs.mp4"
    sbs.main(["--world", str(tiny_world_dir), *CPU, "--frames", "12", "--out", str(out)])
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    strip = max(12, 7 * 2)
    assert len(frames) == 12 and frames[0].shape == (2 * H + 2 * strip, 4 * W + 2, 3)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["frames"] == 12 and len(saved["psnr"]) == len(saved["real_poses"]) == len(saved["frozen_psnr"]) == 12
    assert saved["psnr_mean"] == pytest.approx(np.mean(saved["psnr"][1:]))
    assert len(saved["actions"]) == 12 and saved["actions"][0] == []  # the start frame has no action
    assert saved["summary"]["mp4_bytes"] == out.stat().st_size < 2_000_000
    assert "| 8 |" in out.with_suffix(".md").read_text()


def test_side_by_side_actions_tour_and_file(tiny_world, tmp_path):
    tour = sbs.tour_actions(tiny_world, 300)
    one = np.concatenate([af.scripted_actions(name, tiny_world) for name in sbs.TOUR])
    assert tour.shape == (300, 4) and len(one) < 300
    np.testing.assert_array_equal(tour[: len(one)], one)
    np.testing.assert_array_equal(tour[len(one): 2 * len(one)], one[: 300 - len(one)])  # repeated
    path = tmp_path / "acts.json"
    path.write_text(json.dumps([[1, 0, 0, 0], [0, 0, 2, 0]]))
    acts = sbs.load_actions(str(path), 5)
    assert acts.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]  # clipped, cycled
    path.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(SystemExit, match="expected a JSON list"):
        sbs.load_actions(str(path), 5)


def test_env_speed_rows_per_path(tiny_world, tmp_path):
    from benchmarks.env_speed import main, markdown, measure

    rows = [measure(tiny_world, 2, fast, 3, device="cpu", dtype="float32") for fast in ("off", "static")]
    assert [r["fast"] for r in rows] == ["off", "static"] and [r["fast_taken"] for r in rows] == [False, True]
    assert all(r["env_steps_per_s"] > 0 and r["latency_ms_median"] > 0 and r["num_envs"] == 2 for r in rows)
    assert markdown(rows).count("\n| 2 |") == 2
    out = tmp_path / "env_speed.json"
    assert main(["--world", str(tiny_world.path), "--device", "cpu", "--dtype", "float32", "--num-envs", "1",
                 "--paths", "static", "--steps-per-row", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["fast_taken"] is True
    assert main(["--world", str(tmp_path / "missing")]) == 2


def test_fast_ab_interleaves_the_paths(tiny_world, tmp_path):
    from benchmarks.fast_ab import main

    out = tmp_path / "ab.json"
    report = main(["--world", str(tiny_world.path), "--paths", "off", "static", "--frames", "3", "--out", str(out)])
    rows = report["rows"]
    assert [rows[p]["fast_taken"] for p in ("off", "static")] == [False, True]
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["fps"] > 0 for r in rows.values())
    assert json.loads(out.read_text())["rows"]["static"]["fast_taken"] is True
