import json
from fractions import Fraction

import cv2
import numpy as np
import pytest

import data_tools.ingest as ingest_mod
from data_tools.ingest import IngestError, ingest
from data_tools.poses import integrate_deltas, pose_deltas
from data_tools.shards import ClipDataset, load_episode, read_manifest
from data_tools.video import cropped_fov, load_video, pick_by_time, resize_frame, scene_segments


def _texture(h, w, seed, tint):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
    t = cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), (3, 3), 0)
    return (t * np.asarray(tint)).astype(np.uint8)


def _pan(n, h, w, seed, tint, px=3):
    """A camera panning right over a textured wall: n frames uint8 (n,h,w,3)."""
    big = _texture(h, w + n * px, seed, tint)
    return np.stack([big[:, i * px:i * px + w] for i in range(n)])


def _mp4(path, frames, fps=Fraction(35, 4)):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width, s.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        s.options = {"crf": "18"}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


OPTS = dict(workers=1, min_clip_frames=8, heldout_fraction=0.5, progress=False)


def test_crop_fov_and_frame_picking():
    assert cropped_fov(1080, 1920, 96, 128, 90.0) == pytest.approx(73.74, abs=0.01)  # 16:9 loses its sides
    assert cropped_fov(480, 640, 96, 128, 90.0) == pytest.approx(90.0)
    assert cropped_fov(720, 720, 96, 128, 90.0) == pytest.approx(90.0)  # too tall: crops rows, hfov kept
    f = np.zeros((100, 200, 3), np.uint8)
    f[:, 33:167] = 255  # the centred 4:3 part is white, the cropped sides black
    assert resize_frame(f, 96, 128).shape == (96, 128, 3) and resize_frame(f, 96, 128).min() > 200
    assert pick_by_time(np.arange(30) / 30, 10).tolist() == list(range(0, 30, 3))  # 30 -> 10 fps
    assert pick_by_time(np.arange(5) / 5, 10).tolist() == [0, 1, 2, 3, 4]  # never duplicates


def test_scene_cut_detected():
    a, b = _pan(12, 96, 128, 0, (1.0, 0.4, 0.3)), _pan(12, 96, 128, 1, (0.3, 0.5, 1.0))
    assert scene_segments(np.concatenate([a, b])) == [(0, 12), (12, 24)]
    assert scene_segments(a) == [(0, 12)]


@pytest.fixture
def videos(tmp_path):
    d = tmp_path / "videos"
    d.mkdir()
    # 96x160 source (wider than 4:3, so cropped) at 17.5 fps: ingest at 8.75 fps keeps every other frame.
    cut = np.concatenate([_pan(24, 96, 160, 0, (1.0, 0.4, 0.3), px=2), _pan(24, 96, 160, 1, (0.3, 0.5, 1.0), px=2)])
    _mp4(d / "a_cut.mp4", cut, Fraction(35, 2))
    _mp4(d / "b_pan.mp4", _pan(16, 96, 128, 2, (0.8, 0.9, 0.7)))
    _mp4(d / "c_blank.mp4", np.full((16, 96, 128, 3), 120, np.uint8))  # featureless: no poses to estimate
    return d


def test_ingest_writes_dataset_and_resumes_by_hash(videos, tmp_path, monkeypatch):
    out = tmp_path / "data"
    m = ingest(videos, out, **OPTS)
    assert m == read_manifest(out)
    clips = [(e["video"], e["start"], e["end"]) for e in m["episodes"]]
    assert clips == [("a_cut.mp4", 0, 12), ("a_cut.mp4", 12, 24), ("b_pan.mp4", 0, 16)]  # cut found
    assert [(r["video"], r["reason"].split(":")[0]) for r in m["rejected"]] == [("c_blank.mp4", "unreliable poses")]
    assert m["counts"]["rejected"] == 1 and m["counts"]["episodes"] == 3 and len(m["videos"]) == 3
    va = next(v for v in m["videos"].values() if v["name"] == "a_cut.mp4")
    assert va["fov"] == pytest.approx(cropped_fov(96, 160, 96, 128, 90.0), abs=1e-3)  # 77.3: cropped sides
    assert va["effective_fps"] == pytest.approx(8.75, abs=0.01) and va["frames"] == 24  # 17.5 fps -> 8.75
    assert m["annotator"]["version"].startswith("sha256:") and "unit" in m["translation_scale"]
    assert m["action_space"]["known"] is False
    assert {e["split"] for e in m["episodes"]} == {"train", "heldout"}
    ep = load_episode(out, m["episodes"][2], m)
    d = pose_deltas(ep["poses"])
    assert ep["frames"].shape == (16, 96, 128, 3) and not ep["actions"].any()
    assert ep["poses"][0].tolist() == [0, 0, 0, 0, 0]
    assert np.allclose(integrate_deltas(np.zeros(5), d), ep["poses"], atol=1e-3)
    assert np.median(d[1:, 3]) < -1.0  # panning right = turning right = negative yaw
    assert 0.1 < m["episodes"][2]["confidence"] <= 1.0
    train = [e for e in m["episodes"] if e["split"] == "train"]
    ref = np.concatenate([pose_deltas(load_episode(out, e, m)["poses"]) for e in train])
    assert np.allclose(m["pose_stats"]["mean"], ref.mean(0), atol=1e-4)
    assert len(ClipDataset(out, clip_frames=8)) > 0

    # Resume: one new video; only it is processed and nothing earlier changes.
    _mp4(videos / "d_new.mp4", _pan(12, 96, 128, 3, (0.6, 0.6, 0.9))[::-1])
    seen = []
    real = ingest_mod.ingest_video
    monkeypatch.setattr(ingest_mod, "ingest_video", lambda t: seen.append(t["path"]) or real(t))
    m2 = ingest(videos, out, **OPTS)
    assert [p.split("/")[-1] for p in seen] == ["d_new.mp4"]
    assert m2["counts"]["episodes"] == 4 and m2["rejected"] == m["rejected"]
    assert [e["sha256"] for e in m2["episodes"][:3]] == [e["sha256"] for e in m["episodes"]]


def test_corrupt_video_errors_naming_file_or_is_counted(videos, tmp_path):
    (videos / "zz_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(IngestError, match="zz_broken.mp4"):
        ingest(videos, tmp_path / "data", **OPTS)
    m = ingest(videos, tmp_path / "data2", skip_bad=True, **OPTS)
    bad = [r for r in m["rejected"] if r["video"] == "zz_broken.mp4"]
    assert len(bad) == 1 and bad[0]["reason"].startswith("undecodable")
    assert m["counts"]["episodes"] == 3


def test_no_usable_clip_is_a_clear_error(tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    _mp4(d / "blank.mp4", np.full((16, 96, 128, 3), 30, np.uint8))
    with pytest.raises(IngestError, match="no usable clip"):
        ingest(d, tmp_path / "data", **OPTS)
    with pytest.raises(IngestError, match="no videos"):
        ingest(tmp_path / "data" / "episodes", tmp_path / "data3", **OPTS)


def test_frame_folder_and_cli(tmp_path):
    d = tmp_path / "v" / "frames"
    d.mkdir(parents=True)
    for i, f in enumerate(_pan(10, 120, 160, 4, (0.9, 0.7, 0.5))):
        cv2.imwrite(str(d / f"{i:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    assert load_video(d, 96, 128, 8.75)["frames"].shape == (10, 96, 128, 3)
    ingest_mod.main([str(tmp_path / "v"), "--out", str(tmp_path / "data"), "--workers", "1",
                     "--min-clip-frames", "8", "--no-progress"])
    m = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert m["counts"]["episodes"] == 1 and m["fov"] == pytest.approx(90.0)


def test_a_world_builds_from_ingested_videos_and_plays(videos, tmp_path):
    """issue 9: the one command works from footage too. Ingested data has no actions (action_space known=false),
    so the world gets a kinematic action model whose rates come from the footage's own pose deltas: turning
    right in the env commands the yaw rate the camera actually turned at."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the ids)
    from data_tools.action_model import ActionModel
    from worldmodel.build import BuildOptions, build

    data = tmp_path / "data"
    ingest(videos, data, height=32, width=48, **OPTS)
    config = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    summary = build(data, tmp_path / "run", BuildOptions(
        config=config, overrides=["stage.steps=2", "dmd.stage.critic_steps=1", "stage.log_every=1"], device="cpu",
        eval_steps=(1,), eval_horizons=(1,), eval_episodes=1, starts=1))
    assert summary["complete"] and summary["world"]
    world_dir = tmp_path / "run" / "world"
    am = ActionModel.from_json((world_dir / "action_model.json").read_text())
    manifest = read_manifest(data)
    yaw = np.abs(np.concatenate([pose_deltas(load_episode(data, e, manifest)["poses"])[:, 3]
                                 for e in manifest["episodes"] if e["split"] == "train"]))
    assert am.B[3, 2] == pytest.approx(np.quantile(yaw, 0.95)) and (am.A == 0).all()
    assert summary["provenance"]["action_model"]["heldout_rmse"]["previous"]["kinematic"]
    assert json.loads((world_dir / "world.json").read_text())["fps"] == manifest["fps"]
    env = gym.make("worldmodel/DoomCamera-v0", world=world_dir, device="cpu", dtype="float32")
    env.reset(seed=0)
    obs, _, _, _, info = env.step(np.array([0.0, 0.0, 1.0, 0.0], np.float32))
    assert obs.shape == (32, 48, 3) and info["pose_delta"][3] == pytest.approx(am.B[3, 2], rel=1e-4)
    env.close()
