"""Checkpoints: training state round trip, bf16 export as the next stage's start, split weights, clear errors."""

import copy

import pytest
import torch

from data_tools.shards import ClipDataset, read_manifest
from synthetic import make_autoencoder_checkpoint, make_data_dir, tiny_config
from worldmodel.checkpoint import (
    CheckpointError, load_training_state, load_weights, part_paths, read_tensors, save_weights, weights_exist,
)
from worldmodel.models.dit import WorldDiT
from worldmodel.training.loop import train
from worldmodel.training.registry import build_stage


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher trained 30 steps: (data_dir, pose_stats, ae path, run dir, stage, over)."""
    d = make_data_dir(tmp_path_factory.mktemp("data"), episodes=3, heldout=1, frames=32)
    stats = read_manifest(d)["pose_stats"]
    ae = make_autoencoder_checkpoint(tmp_path_factory.mktemp("ae") / "autoencoder", tiny_config(), stats)
    out = tmp_path_factory.mktemp("run")
    over = [f"stage.autoencoder={ae}", "stage.steps=30", "optim.ema_start=1000"]  # EMA = online
    cfg = tiny_config(*over)
    stage = build_stage("teacher", cfg, "cpu", stats)
    train(stage, ClipDataset(d, cfg.data.clip_frames), cfg, out)
    return d, stats, ae, out, stage, over


def batch(data_dir, n=8):
    ds = ClipDataset(data_dir, 4)
    items = [ds[i] for i in range(0, len(ds), max(1, len(ds) // n))][:n]
    return {k: torch.stack([it[k] for it in items]) for k in ("frames", "deltas")}


def next_loss(stage, b, seed=7):
    """One real training step (forward, backward, optimiser) from a fixed RNG state; its loss."""
    torch.manual_seed(seed)
    return stage.step(b, 100)["loss"], stage.step(b, 101)["loss"]


@torch.no_grad()
def eval_loss(stage, b, seed=3):
    torch.manual_seed(seed)
    lat = stage.batcher(b)
    return sum(stage.loss(lat["x0"], lat["pose"]).item() for _ in range(8)) / 8


def test_training_state_round_trip_gives_identical_next_loss(trained):
    d, stats, _, out, stage, over = trained
    torch.manual_seed(123)
    fresh = build_stage("teacher", tiny_config(*over), "cpu", stats)
    fresh.load_state_dict(load_training_state(out / "state.pt")["stage_state"])
    b = batch(d)
    # Two steps: the second depends on the restored optimiser moments, not only the weights.
    assert next_loss(fresh, b) == next_loss(copy.deepcopy(stage), b)  # the fixture's stage stays as exported


def test_bf16_export_starts_the_next_stage_sensibly(trained, tmp_path):
    d, stats, _, out, stage, over = trained
    b = batch(d)
    before = eval_loss(stage, b)
    cfg = tiny_config(*over, f"stage.init={out / 'teacher.safetensors'}", "stage.steps=10")
    nxt = build_stage("teacher", cfg, "cpu", stats)  # bf16 weights -> fp32, fresh optimiser
    assert not nxt.optimizers["dit"].state
    loaded = eval_loss(nxt, b)
    assert loaded == pytest.approx(before, rel=0.03)
    train(nxt, ClipDataset(d, 4), cfg, tmp_path)  # warm-up from scratch: no jump in the loss
    assert eval_loss(nxt, b) < before * 1.1


def test_truncated_state_names_the_file(trained, tmp_path):
    out = trained[3]
    bad = tmp_path / "state.pt"
    bad.write_bytes((out / "state.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=str(bad)):
        load_training_state(bad)


def test_corrupt_weights_name_the_file(trained, tmp_path):
    out = trained[3]
    st = tmp_path / "teacher.safetensors"
    st.write_bytes((out / "teacher.safetensors").read_bytes()[:200])
    (tmp_path / "teacher.json").write_text((out / "teacher.json").read_text())
    with pytest.raises(CheckpointError, match="teacher.safetensors.*corrupt or truncated"):
        load_weights(st, WorldDiT(tiny_config().dit))


def test_mismatched_weights_name_file_and_field(trained):
    out = trained[3]
    cfg = tiny_config("dit.dim=64")
    with pytest.raises(CheckpointError, match=r"teacher.safetensors.*dit\.dim"):
        load_weights(out / "teacher.safetensors", WorldDiT(cfg.dit), {"dit": cfg.dit})


def test_resume_with_other_data_config_names_the_field(trained):
    d, stats, _, out, _, over = trained
    cfg = tiny_config(*over, "data.clip_frames=5")
    stage = build_stage("teacher", cfg, "cpu", stats)
    with pytest.raises(CheckpointError, match=r"state.pt.*data\.clip_frames"):
        train(stage, ClipDataset(d, 5), cfg, out, resume=True)


def test_resume_into_another_stage_is_refused(trained):
    d, stats, ae, out, _, _ = trained
    cfg = tiny_config(f"stage.init={out / 'teacher.safetensors'}", f"stage.autoencoder={ae}")
    stage = build_stage("ar_diffusion", cfg, "cpu", stats)
    with pytest.raises(CheckpointError, match="'teacher' training state"):
        train(stage, ClipDataset(d, 4), cfg, out, resume=True)


def test_pose_stats_mismatch_is_refused(trained):
    _, stats, ae, out, _, _ = trained
    other = {"mean": stats["mean"], "std": [s * 2 for s in stats["std"]]}
    cfg = tiny_config(f"stage.init={out / 'teacher.safetensors'}", f"stage.autoencoder={ae}")
    with pytest.raises(CheckpointError, match="pose_stats"):
        build_stage("ar_diffusion", cfg, "cpu", other)


def test_written_files_get_the_umask_permissions(tmp_path):
    """Exports are shared files (copied off a GPU lease, committed): not the 0600 that safetensors creates."""
    import os

    from worldmodel.checkpoint import save_weights

    old = os.umask(0o022)
    try:
        path = save_weights(tmp_path / "w", {"a": torch.zeros(2)}, {"x": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def _tensors(n: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(40, 25, generator=gen) for i in range(n)} | {"step": torch.arange(7)}


def test_split_weights_round_trip_and_replace_the_other_form(tmp_path):
    tensors = _tensors()
    whole = save_weights(tmp_path / "whole", tensors, {"x": 1}, dtype=None)
    split = save_weights(tmp_path / "w", tensors, {"x": 1}, dtype=None, part_bytes=10_000)
    parts = part_paths(split)
    assert not split.exists() and weights_exist(split) and len(parts) == -(-whole.stat().st_size // 10_000) > 2
    assert [p.name for p in parts] == [f"w.safetensors.part{i:03d}" for i in range(len(parts))]
    assert all(p.stat().st_size <= 10_000 for p in parts)
    assert b"".join(p.read_bytes() for p in parts) == whole.read_bytes()  # the parts are the file, cut
    back = read_tensors(split)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    # A module loads from the parts like from the whole file.
    net = torch.nn.Linear(25, 40)
    save_weights(tmp_path / "net", net, {}, dtype=None, part_bytes=1000)
    other = torch.nn.Linear(25, 40)
    load_weights(tmp_path / "net", other)
    assert torch.equal(other.weight, net.weight) and torch.equal(other.bias, net.bias)
    # Fewer parts, the whole file, then parts again: no stale form or part is left to shadow the new one.
    save_weights(split, _tensors(2), {}, dtype=None, part_bytes=10_000)
    assert len(part_paths(split)) < len(parts) and read_tensors(split).keys() == _tensors(2).keys()
    save_weights(split, tensors, {}, dtype=None, part_bytes=10**9)
    assert split.is_file() and part_paths(split) == []
    save_weights(split, tensors, {}, dtype=None, part_bytes=10_000)
    assert not split.exists() and len(part_paths(split)) == len(parts)


def test_missing_or_corrupt_parts_name_the_file(tmp_path):
    split = save_weights(tmp_path / "w", _tensors(), {}, dtype=None, part_bytes=10_000)
    parts = part_paths(split)
    data = [p.read_bytes() for p in parts]
    parts[1].unlink()  # a gap: named, not read as a shorter file
    with pytest.raises(CheckpointError, match=r"w\.safetensors is split into parts but .*\.part001 is missing"):
        read_tensors(split)
    parts[1].write_bytes(data[1])
    parts[0].unlink()
    with pytest.raises(CheckpointError, match=r"part000 is missing"):
        read_tensors(split)
    parts[0].write_bytes(data[0])
    parts[-1].unlink()  # the last part missing: the joined file is truncated
    with pytest.raises(CheckpointError, match=r"w\.safetensors \(joined from \d+ parts\) is corrupt or truncated"):
        read_tensors(split)
    parts[-1].write_bytes(data[-1])
    parts[0].write_bytes(b"\xff" * len(data[0]))  # a corrupt header
    with pytest.raises(CheckpointError, match=r"w\.safetensors \(joined from \d+ parts\) is corrupt or truncated"):
        load_weights(split, torch.nn.Linear(25, 40))
    for p in parts:
        p.unlink()
    assert not weights_exist(split)
    with pytest.raises(CheckpointError, match=r"w\.safetensors does not exist"):
        read_tensors(split)
