import json
import numpy as np
import pytest

from data_tools.poses import pose_deltas
from data_tools.record import RecordSettings, engine_settings, main, record
from data_tools.shards import ClipDataset, load_episode, read_manifest

pytestmark = pytest.mark.vizdoom


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec")
    record(out, episodes=2, frames_per_episode=60, workers=2, seed=3, heldout_episodes=1, progress=False)
    return out


def test_shapes_and_manifest(recorded):
    m = read_manifest(recorded)
    assert (m["frame_height"], m["frame_width"], m["fov"], m["frame_skip"]) == (96, 128, 90.0, 4)
    assert m["engine"] == "vizdoom" and m["engine_version"] == "1.3.2" and m["map"] == "MAP01"
    assert [e["split"] for e in m["episodes"]] == ["train", "train", "heldout"]
    assert len({e["seed"] for e in m["episodes"]}) == 3
    assert m["counts"] == {"episodes": 3, "frames": 180, "train_frames": 120, "heldout_frames": 60}
    assert len(m["pose_stats"]["mean"]) == 5 and min(m["pose_stats"]["std"]) >= 1e-3
    ep = load_episode(recorded, m["episodes"][0], m)
    assert ep["frames"].shape == (60, 96, 128, 3) and ep["frames"].dtype == np.uint8
    assert ep["frames"].std() > 5  # a rendered level, not a blank screen
    d = pose_deltas(ep["poses"])
    assert np.abs(ep["actions"]).max() <= 1.0 and np.abs(d[:, :2]).max() > 1.0  # the policy moved
    assert (recorded / "coverage.png").stat().st_size > 1000
    assert len(ClipDataset(recorded, clip_frames=8)) == 2 * (60 - 8 + 1)


def test_same_seed_same_frames_and_poses(recorded, tmp_path):
    # One worker here against two in the fixture: the episode seed, not the worker, decides the data.
    record(tmp_path, episodes=1, frames_per_episode=60, workers=1, seed=3, progress=False)
    a = load_episode(recorded, read_manifest(recorded)["episodes"][0])
    b = load_episode(tmp_path, read_manifest(tmp_path)["episodes"][0])
    np.testing.assert_array_equal(a["poses"], b["poses"])
    np.testing.assert_array_equal(a["frames"], b["frames"])


def test_actions_replay_reproduces_poses(recorded, tmp_path):
    ep = load_episode(recorded, read_manifest(recorded)["episodes"][1])
    path = tmp_path / "actions.json"
    path.write_text(json.dumps(ep["actions"].tolist()))
    out = tmp_path / "replay"
    main(["--out", str(out), "--actions", str(path), "--no-progress"])
    m = read_manifest(out)
    assert m["counts"]["episodes"] == 1
    rep = load_episode(out, m["episodes"][0], m)
    np.testing.assert_array_equal(rep["actions"], ep["actions"])
    np.testing.assert_allclose(rep["poses"], ep["poses"], atol=1e-4)


def test_hud_weapon_crosshair_hidden_no_monsters():
    e = engine_settings(RecordSettings())
    for key in ("render_hud", "render_minimal_hud", "render_weapon", "render_crosshair", "render_messages",
                "window_visible"):
        assert e[key] is False, key
    assert "+sv_nomonsters 1" in e["game_args"] and e["screen_format"] == "RGB24"
    assert e["screen_resolution"] == "RES_160X120"
    assert "+sv_nomonsters 0" in engine_settings(RecordSettings(monsters=True))["game_args"]


def test_unsupported_fov_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fov"):
        record(tmp_path, 1, 5, settings=RecordSettings(fov=110), progress=False)
