"""Checkpoints: training state round trip, bf16 export as the next stage's start, clear errors."""

import copy

import pytest
import torch

from data_tools.shards import ClipDataset, read_manifest
from synthetic import make_autoencoder_checkpoint, make_data_dir, tiny_config
from worldmodel.checkpoint import CheckpointError, load_training_state, load_weights
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
