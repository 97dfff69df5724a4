"""worldmodel.training.decoder_distill on the tiny world (CPU, seconds): pools, loss, resume, export."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.world_fixture import tiny_world, tiny_world_dir  # noqa: F401 (fixtures)
from worldmodel.checkpoint import load_training_state
from worldmodel.inference.world import World, WorldError
from worldmodel.training.decoder_distill import DistillConfig, export_world, main, rollout_latents, train

CPU = {"device": "cpu", "dtype": torch.float32}


def small(**kw) -> DistillConfig:
    return DistillConfig(**{"width": 4, "worlds": 4, "frames": 6, "heldout_worlds": 2, "batch_size": 8, "lr": 3e-3,
                            "warmup_steps": 5, "steps": 60, "checkpoint_every": 10, **kw})


def test_rollout_latents_are_the_students_and_seeded(tiny_world):
    a = rollout_latents(tiny_world, 3, 5, seed=0, **CPU)
    b = rollout_latents(tiny_world, 3, 5, seed=0, **CPU)
    c = rollout_latents(tiny_world, 3, 5, seed=1, **CPU)
    assert a.shape == (15, 4, 4, 6) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.allclose(a, c)  # the seed picks the noise and the actions
    assert a.std() > 0.01  # frames, not zeros


def test_distillation_lowers_the_loss_and_measures(tiny_world, tmp_path):
    report = train(tiny_world, tmp_path / "run", small(), progress=False, **CPU)
    assert report["step"] == 60
    assert report["loss_last"] < 0.7 * report["loss_first"]  # it learns the world's decoder
    assert 0 < report["psnr"] < 99 and -1 <= report["ssim"] <= 1 and report["detail_ratio"] > 0
    assert report["heldout_frames"] == 2 * 6
    assert all(report[f"{who}_decode_ms_b{b}"] > 0 for who in ("student", "teacher") for b in (1, 64))
    assert json.loads((tmp_path / "run" / "decoder_distill.json").read_text()) == report
    # Better than where it started: a fresh student (0 steps) on the same held-out pool scores lower.
    fresh = train(tiny_world, tmp_path / "fresh", small(steps=0), progress=False, **CPU)
    assert report["psnr"] > fresh["psnr"] + 1.0


def test_a_resumed_run_equals_an_uninterrupted_one(tiny_world, tmp_path):
    whole = tmp_path / "whole"
    train(tiny_world, whole, small(steps=20), progress=False, **CPU)
    parts = tmp_path / "parts"
    train(tiny_world, parts, small(steps=10), progress=False, **CPU)
    pools_mtime = (parts / "pools.pt").stat().st_mtime_ns
    report = train(tiny_world, parts, small(steps=20), progress=False, **CPU)  # only --steps changed
    assert report["step"] == 20 and (parts / "pools.pt").stat().st_mtime_ns == pools_mtime  # the same data
    a, b = (load_training_state(d / "state.pt")["student"] for d in (whole, parts))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(WorldError, match="only --steps may change"):
        train(tiny_world, parts, small(steps=30, lr=1e-2), progress=False, **CPU)


def test_time_budget_stops_cleanly_with_a_checkpoint(tiny_world, tmp_path):
    report = train(tiny_world, tmp_path / "run", small(steps=10_000), time_budget=0.0, progress=False, **CPU)
    assert report["step"] == 0 and (tmp_path / "run" / "state.pt").is_file()
    assert main(["--world", str(tiny_world.path), "--out", str(tmp_path / "run"), "--steps", "10000", "--width", "4",
                 "--worlds", "4", "--frames", "6", "--heldout-worlds", "2", "--batch-size", "8", "--lr", "0.003",
                 "--warmup-steps", "5", "--checkpoint-every", "10", "--time-budget", "1", "--no-progress"]) == 3


def test_exported_world_plays_with_the_student_decoder(tiny_world, tmp_path):
    cfg = small(steps=30)
    train(tiny_world, tmp_path / "run", cfg, progress=False, **CPU)
    state = load_training_state(tmp_path / "run" / "state.pt")["student"]
    out = export_world(tiny_world, tmp_path / "world", state, cfg.width)
    slim = World.load(out)
    assert slim.config.autoencoder == dataclasses.replace(tiny_world.config.autoencoder, decoder_base_channels=4)
    assert not slim.has_encoder and slim.config.dit == tiny_world.config.dit
    np.testing.assert_array_equal(slim.start_latents, tiny_world.start_latents)
    dit_a, ae_slim = slim.modules()
    dit_b, _ = tiny_world.modules()
    assert all(torch.equal(x, y) for x, y in zip(dit_a.state_dict().values(), dit_b.state_dict().values()))
    z = torch.from_numpy(slim.start_latents[0])
    with torch.no_grad():  # its decoder is the student's (as saved: bf16 weights)
        want = {k[len("decoder."):]: v.to(torch.bfloat16).float() for k, v in state.items() if k.startswith("decoder.")}
        got = {k: v for k, v in ae_slim.decoder.state_dict().items()}
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert ae_slim.decode(z).shape == (z.shape[0], 3, 32, 48)
    gen = slim.generator(2, **CPU)
    gen.reset(torch.from_numpy(slim.start_latents[[0, 1]]), torch.from_numpy(slim.start_deltas[[0, 1]]), latents=True)
    frame = gen.step(torch.zeros(2, 5))
    assert frame.shape == (2, 32, 48, 3) and frame.dtype == torch.uint8


def test_bad_world_is_a_clear_error(tmp_path, capsys):
    assert main(["--world", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err


def test_held_out_starts_are_disjoint_and_the_teacher_scores_perfectly_against_itself(tiny_world):
    from worldmodel.training.decoder_distill import make_pools, measure, split_starts

    train_s, held_s = split_starts(8)
    assert list(train_s) == [0, 1, 2, 3, 4, 5] and list(held_s) == [6, 7]
    assert [list(x) for x in split_starts(1)] == [[0], [0]]
    _, teacher = tiny_world.modules()
    pools = make_pools(tiny_world, small(), "cpu", torch.float32, teacher)
    same = measure(teacher, teacher, pools, torch.device("cpu"), torch.float32)  # layouts and metrics line up
    assert same["psnr"] == 99 and same["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert same["detail_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_pools_of_other_settings_are_refused(tiny_world, tmp_path):
    train(tiny_world, tmp_path / "run", small(steps=0), progress=False, **CPU)
    (tmp_path / "run" / "state.pt").unlink()  # as if stopped before its first checkpoint: only the pools are there
    with pytest.raises(WorldError, match="pools.pt was made with"):
        train(tiny_world, tmp_path / "run", small(steps=0, frames=7), progress=False, **CPU)
