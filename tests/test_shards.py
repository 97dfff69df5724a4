import numpy as np
import pytest
import torch

from data_tools.poses import pose_deltas
from data_tools.shards import (ClipDataset, ResumableSampler, ShardError, compute_pose_stats, load_episode,
                               read_manifest, write_episode, write_manifest)

H, W = 6, 8


def make_data(root, lengths=(7, 5, 9), heldout=(4,)):
    """Episodes whose frames encode (episode, frame index) so a clip's origin can be read back."""
    rng = np.random.default_rng(0)
    entries, train_deltas = [], []
    for k, n in enumerate(list(lengths) + list(heldout)):
        frames = np.zeros((n, H, W, 3), np.uint8)
        frames[..., 0] = k
        frames[..., 1] = np.arange(n)[:, None, None]
        poses = np.cumsum(rng.normal(0, 5, (n, 5)), 0).astype(np.float32)
        actions = rng.uniform(-1, 1, (n, 4)).astype(np.float32)
        info = write_episode(root / "episodes" / f"ep_{k:05d}.npz", frames, poses, actions)
        split = "train" if k < len(lengths) else "heldout"
        info.update(split=split, seed=k)
        entries.append(info)
        if split == "train":
            train_deltas.append(pose_deltas(poses))
    write_manifest(root, {"frame_height": H, "frame_width": W, "fov": 90.0, "episodes": entries,
                          "pose_stats": compute_pose_stats(train_deltas)})
    return read_manifest(root)


def test_write_load_round_trip(tmp_path):
    m = make_data(tmp_path)
    ep = load_episode(tmp_path, m["episodes"][1], m)
    assert ep["frames"].shape == (5, H, W, 3) and ep["frames"].dtype == np.uint8
    assert (ep["frames"][..., 0] == 1).all() and ep["frames"][3, 0, 0, 1] == 3
    assert ep["poses"].dtype == np.float32 and ep["actions"].shape == (5, 4)


def test_pose_stats_floor():
    s = compute_pose_stats([np.zeros((10, 5)), np.ones((10, 5)) * [1, 0, 0, 0, 0]])
    assert s["mean"][0] == pytest.approx(0.5) and s["std"][0] == pytest.approx(0.5)
    assert s["std"][1] == pytest.approx(1e-3)


def test_corrupt_truncated_missing_name_the_file(tmp_path):
    m = make_data(tmp_path)
    files = [tmp_path / e["file"] for e in m["episodes"]]
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"ep_00000\.npz.*checksum"):
        load_episode(tmp_path, m["episodes"][0], m)
    files[1].write_bytes(files[1].read_bytes()[:-100])
    with pytest.raises(ShardError, match=r"ep_00001\.npz.*truncated"):
        load_episode(tmp_path, m["episodes"][1], m)
    files[2].unlink()
    with pytest.raises(ShardError, match=r"ep_00002\.npz.*missing"):
        load_episode(tmp_path, m["episodes"][2], m)
    # The dataset checks every file of the split when it is built, not when a clip is first drawn.
    with pytest.raises(ShardError, match=r"ep_0000[012]\.npz"):
        ClipDataset(tmp_path, clip_frames=3)


def test_inconsistent_lengths_and_shapes(tmp_path):
    m = make_data(tmp_path)
    entry = dict(m["episodes"][0], frames=8)
    with pytest.raises(ShardError, match=r"ep_00000\.npz.*frames"):
        load_episode(tmp_path, entry, m)
    with pytest.raises(ShardError, match=r"ep_00000\.npz.*shape"):
        load_episode(tmp_path, m["episodes"][0], dict(m, frame_width=W + 1))


def test_clips_never_cross_episodes(tmp_path):
    make_data(tmp_path)
    T = 4
    ds = ClipDataset(tmp_path, clip_frames=T)
    assert len(ds) == (7 - T + 1) + (5 - T + 1) + (9 - T + 1)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        f = item["frames"]
        assert f.shape == (T, H, W, 3) and f.dtype == torch.uint8
        assert item["deltas"].dtype == torch.float32 and item["actions"].shape == (T, 4)
        assert (f[..., 0] == item["episode"]).all(), "clip mixes episodes"
        assert f[:, 0, 0, 1].tolist() == list(range(item["start"], item["start"] + T))
        ep = ds.episode(item["episode"])
        np.testing.assert_array_equal(item["deltas"].numpy(), pose_deltas(ep["poses"])[item["start"]:item["start"] + T])
        seen.add((item["episode"], item["start"]))
    assert len(seen) == len(ds)
    held = ClipDataset(tmp_path, clip_frames=T, split="heldout")
    assert len(held) == 1 and held[0]["episode"] == 3
    assert len(ClipDataset(tmp_path, clip_frames=T, stride=2)) == 2 + 1 + 3


def test_sampler_resume_gives_identical_continuation():
    full = ResumableSampler(37, seed=5)
    ref = list(full) + list(full)  # two epochs uninterrupted
    s = ResumableSampler(37, seed=5)
    it = iter(s)
    first = [next(it) for _ in range(20)]
    state = s.state_dict()
    resumed = ResumableSampler(37, seed=5)
    resumed.load_state_dict(state)
    rest = list(resumed)
    second_epoch = list(resumed)
    assert first + rest + second_epoch == ref
    assert sorted(ref[:37]) == list(range(37)) and ref[:37] != ref[37:]  # permutation, new per epoch
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(37, seed=6).load_state_dict(state)


def test_sampler_two_ranks_disjoint_and_cover():
    n = 11
    r0, r1 = ResumableSampler(n, 3, rank=0, world_size=2), ResumableSampler(n, 3, rank=1, world_size=2)
    a, b = list(r0), list(r1)
    assert len(a) == len(b) == len(r0) == 6
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    interleaved = [x for pair in zip(a, b) for x in pair]
    assert interleaved == perm + perm[:1]  # rank r takes every 2nd index; padded by wrapping
    assert set(a) | set(b) == set(range(n))
    assert set(a[:5]) & set(b[:5]) == set()  # only the wrapped pad repeats an item
