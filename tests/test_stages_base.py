"""Stages 0-2 learn on the synthetic world; the batcher and noise-level draws do what they say."""

import json

from pathlib import Path

import pytest
import torch

from data_tools.shards import ClipDataset, read_manifest
from synthetic import make_autoencoder_checkpoint, make_data_dir, tiny_config
from worldmodel.checkpoint import CheckpointError
from worldmodel.training.ar_diffusion import block_sigma
from worldmodel.training.batches import LatentBatcher, float_to_frames, frames_to_float
from worldmodel.training.loop import train
from worldmodel.training.registry import build_stage
from worldmodel.training.teacher import draw_pose_keep


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = make_data_dir(tmp_path_factory.mktemp("data"), episodes=3, heldout=1, frames=40)
    return d, read_manifest(d)["pose_stats"]


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory, data):
    return make_autoencoder_checkpoint(tmp_path_factory.mktemp("ae") / "autoencoder", tiny_config(), data[1])


def fixed_batches(data_dir, cfg, n=3):
    ds = ClipDataset(data_dir, cfg.data.clip_frames)
    idx = torch.linspace(0, len(ds) - 1, n * cfg.data.batch_size).long().view(n, -1)
    return [{k: torch.stack([ds[int(i)][k] for i in row]) for k in ("frames", "deltas")} for row in idx]


@torch.no_grad()
def eval_loss(stage, batches):
    """Mean loss of a DiT stage on fixed batches with fixed noise (comparable before/after)."""
    torch.manual_seed(1234)
    return sum(stage.loss(**{k: v for k, v in stage.batcher(b).items()}).item() for b in batches) / len(batches)


def test_frames_round_trip():
    x = torch.randint(0, 256, (2, 3, 8, 16, 3), dtype=torch.uint8)
    f = frames_to_float(x)
    assert f.shape == (2, 3, 3, 8, 16) and f.min() >= -1 and f.max() <= 1
    assert torch.equal(float_to_frames(f), x)


def test_latent_batcher_normalises_pose(data, ae_ckpt):
    d, stats = data
    cfg = tiny_config()
    stage = build_stage("teacher", tiny_config(f"stage.autoencoder={ae_ckpt}"), "cpu", stats)
    b = fixed_batches(d, cfg, 1)[0]
    out = LatentBatcher(stage.batcher.autoencoder, stats, "cpu", keep_frames=True)(b)
    assert out["x0"].shape == (4, 4, 4, 4, 6) and out["frames"].shape == (4, 4, 3, 32, 48)
    mean, std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
    torch.testing.assert_close(out["pose"] * std + mean, b["deltas"], atol=1e-4, rtol=1e-4)


def test_noise_level_draws():
    s = block_sigma(5, 7, 3, shift=3.0, device="cpu")
    assert s.shape == (5, 7)
    assert torch.equal(s[:, 0], s[:, 2]) and torch.equal(s[:, 3], s[:, 5]) and not torch.equal(s[:, 2], s[:, 3])
    keep = draw_pose_keep(200, 4, 0.5, "cpu")
    assert (keep == keep[:, :1]).all() and 50 < keep[:, 0].sum() < 150  # one decision per clip


def test_autoencoder_learns_and_sets_latent_scale(data, tmp_path):
    d, stats = data
    cfg = tiny_config("stage.steps=40", "data.batch_size=2", "optim.ema_start=1000")  # EMA copies: export = online net
    stage = build_stage("autoencoder", cfg, "cpu", stats)
    summary = train(stage, ClipDataset(d, cfg.data.clip_frames), cfg, tmp_path)
    lines = [l for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = json.loads(lines[0]), json.loads(lines[-1])
    assert last["loss"] < 0.5 * first["loss"] and last["psnr"] > first["psnr"] + 5
    assert summary["metrics"]["psnr"] > 16
    # latent_scale: encode() of data has ~unit std
    x = frames_to_float(fixed_batches(d, cfg, 1)[0]["frames"]).flatten(0, 1)
    with torch.no_grad():
        z = stage.ema.model.encode(x)
    assert 0.7 < z.std().item() < 1.4, z.std()
    meta = json.loads((tmp_path / "autoencoder.json").read_text())
    assert meta["latent_scale"] == pytest.approx(float(stage.ema.model.latent_scale))


@pytest.mark.parametrize("name", ["teacher", "ar_diffusion"])
def test_dit_stage_loss_decreases(name, data, ae_ckpt, tmp_path):
    d, stats = data
    over = [f"stage.autoencoder={ae_ckpt}", "stage.steps=60", "stage.checkpoint_every=1000"]
    if name == "ar_diffusion":
        teacher = build_stage("teacher", tiny_config(*over), "cpu", stats)
        train(teacher, ClipDataset(d, 4), tiny_config(*over, "stage.steps=1"), tmp_path / "t")
        over.append(f"stage.init={tmp_path / 't' / 'teacher.safetensors'}")
    cfg = tiny_config(*over)
    stage = build_stage(name, cfg, "cpu", stats)
    batches = fixed_batches(d, cfg)
    before = eval_loss(stage, batches)
    train(stage, ClipDataset(d, cfg.data.clip_frames), cfg, tmp_path / name)
    after = eval_loss(stage, batches)
    assert after < 0.8 * before, (before, after)


def test_ar_diffusion_needs_init(data, ae_ckpt):
    with pytest.raises(CheckpointError, match="stage.init"):
        build_stage("ar_diffusion", tiny_config(f"stage.autoencoder={ae_ckpt}"), "cpu", data[1])
    with pytest.raises(CheckpointError, match="stage.autoencoder"):
        build_stage("teacher", tiny_config(), "cpu", data[1])


def test_latent_table_equals_per_batch_encoding(data, ae_ckpt):
    """The table (every frame encoded once) gives the latents encode_frames gives each batch, and the
    frames-free view the DataLoader then reads holds the same clips."""
    d, stats = data
    cfg = tiny_config()
    ae = build_stage("teacher", tiny_config(f"stage.autoencoder={ae_ckpt}"), "cpu", stats).batcher.autoencoder
    plain, table = LatentBatcher(ae, stats, "cpu"), LatentBatcher(ae, stats, "cpu", table=True)
    ds = ClipDataset(d, cfg.data.clip_frames)
    view = table.bind(ds, progress=False)
    assert len(view) == len(ds) and table.table.latents.shape == (2 * 40, 4, 4, 6)  # 2 train episodes of 40
    assert "frames" not in view[0] and "frames" in ds[0]  # the view is another object: ds keeps its frames
    for rows in ([0, 1, 2, 30], [5, 0, 40, 2], [36, 37, 72, 73]):  # both episodes, overlapping, last clips
        raw = collate([ds[i] for i in rows])
        positions = collate([view[i] for i in rows])
        assert set(positions) == {"deltas", "actions", "episode", "start"}
        a, b = table(positions), plain(raw)
        torch.testing.assert_close(a["x0"], b["x0"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["pose"], b["pose"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="no latent table is bound"):
        plain(positions)


def test_latent_table_is_kept_beside_the_autoencoder_and_read_back(data, ae_ckpt, tmp_path, monkeypatch):
    """A later stage with the same autoencoder file and data reads the stored table instead of encoding;
    another autoencoder file (other bytes) gets its own."""
    import shutil

    from worldmodel.training.batches import LatentTable

    d, stats = data
    ae_file = tmp_path / "autoencoder.safetensors"
    shutil.copy(ae_ckpt, ae_file)
    shutil.copy(Path(ae_ckpt).with_suffix(".json"), ae_file.with_suffix(".json"))
    ae = build_stage("teacher", tiny_config(f"stage.autoencoder={ae_file}"), "cpu", stats).batcher.autoencoder
    ds = ClipDataset(d, tiny_config().data.clip_frames)
    first = LatentBatcher(ae, stats, "cpu", table=True, source=ae_file)
    first.bind(ds, progress=False)
    (stored,) = tmp_path.glob("latents-*.pt")
    calls = []
    monkeypatch.setattr(LatentTable, "encode", classmethod(lambda cls, *a, **k: calls.append(1)))
    second = LatentBatcher(ae, stats, "cpu", table=True, source=ae_file)
    second.bind(ds, progress=False)
    assert calls == [] and torch.equal(second.table.latents, first.table.latents)
    assert torch.equal(second.table.offsets, first.table.offsets)
    other = tmp_path / "other" / "autoencoder.safetensors"
    other.parent.mkdir()
    other.write_bytes(ae_file.read_bytes() + b" ")
    assert LatentBatcher(ae, stats, "cpu", table=True, source=other).table_file(ds).name != stored.name


def collate(items):
    """What the DataLoader's default collate makes of these items."""
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k])
            else torch.tensor([it[k] for it in items]) for k in items[0]}


@pytest.mark.parametrize("name", ["teacher", "causal_cd"])
def test_latent_stage_losses_equal_with_and_without_table(name, data, ae_ckpt, tmp_path):
    """The same run with the latent table (default) and with per-batch encoding logs the same losses."""
    from distill_toys import dit_checkpoint, random_dit

    d, stats = data
    over = [f"stage.autoencoder={ae_ckpt}", "stage.steps=4", "stage.log_every=1", "stage.checkpoint_every=100"]
    if name == "causal_cd":
        ar = dit_checkpoint(tmp_path / "ar", tiny_config(), random_dit(tiny_config(), seed=1), stats, "ar_diffusion")
        over.append(f"stage.teacher={ar}")
    logged = {}
    for cache in (True, False):
        cfg = tiny_config(*over, f"stage.cache_latents={str(cache).lower()}")
        torch.manual_seed(cfg.seed)
        train(build_stage(name, cfg, "cpu", stats), ClipDataset(d, cfg.data.clip_frames), cfg, tmp_path / str(cache))
        lines = (tmp_path / str(cache) / "metrics.jsonl").read_text().splitlines()
        logged[cache] = [json.loads(line) for line in lines]
    assert [r["step"] for r in logged[True]] == [1, 2, 3, 4]
    for a, b in zip(logged[True], logged[False]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-7)
