"""The training loop: exact resume, time budget, lr schedule, logs, the CLI."""

import json
import time

import pytest
import torch

from data_tools.shards import ClipDataset, read_manifest
from synthetic import make_autoencoder_checkpoint, make_data_dir, tiny_config
from worldmodel.checkpoint import load_training_state, read_meta
from worldmodel.train import main as train_main
from worldmodel.training import loop
from worldmodel.training.loop import BUDGET_CHECK_STEPS, BudgetClock, MetricSums, lr_factor, set_lr, train
from worldmodel.training.registry import build_stage


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = make_data_dir(tmp_path_factory.mktemp("data"), episodes=3, heldout=1, frames=32)
    stats = read_manifest(d)["pose_stats"]
    ae = make_autoencoder_checkpoint(tmp_path_factory.mktemp("ae") / "autoencoder", tiny_config(), stats)
    return d, stats, ae


def run(data, out, *over, resume=False, max_steps=None, time_budget=None):
    d, stats, ae = data
    # 15 clips/epoch at batch 4 -> 3 batches per epoch: 8 steps cross two epoch boundaries.
    cfg = tiny_config(f"stage.autoencoder={ae}", "stage.steps=8", "stage.log_every=1", "stage.checkpoint_every=3",
                      *over)
    torch.manual_seed(99)  # a different init than the run it resumes: state must come from state.pt
    stage = build_stage("teacher", cfg, "cpu", stats)
    summary = train(stage, ClipDataset(d, cfg.data.clip_frames), cfg, out, resume=resume, max_steps=max_steps,
                    time_budget=time_budget)
    return stage, summary


def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def test_resume_continues_identically(data, tmp_path):
    full, _ = run(data, tmp_path / "full")
    _, s = run(data, tmp_path / "cut", max_steps=5)
    assert s["stopped"] == "max_steps" and s["step"] == 5
    resumed, s = run(data, tmp_path / "cut", resume=True)
    assert s["step"] == 8 and s["stopped"] == "done"
    a, b = losses(tmp_path / "full" / "metrics.jsonl"), losses(tmp_path / "cut" / "metrics.jsonl")
    assert set(b) == set(range(1, 9))
    for step in range(6, 9):  # the steps after the interruption
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step
    for (n, p), q in zip(full.online.named_parameters(), resumed.online.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    for p, q in zip(full.ema.model.parameters(), resumed.ema.model.parameters()):
        torch.testing.assert_close(p, q)


def test_time_budget_stops_with_checkpoint(data, tmp_path):
    _, s = run(data, tmp_path, "stage.steps=100000", time_budget=3.0)
    assert s["stopped"] == "time_budget" and 0 < s["step"] < 100000
    assert s["seconds"] < 3.0 + 1.0
    state = load_training_state(tmp_path / "state.pt")
    assert state["step"] == s["step"]
    meta = read_meta(tmp_path / "teacher.safetensors")
    assert meta["step"] == s["step"] and meta["stage"] == "teacher" and meta["pose_stats"] == data[1]
    assert len(meta["data_manifest_sha256"]) == 64 and meta["gpu_seconds"] > 0 and meta["peak_mem"] > 0
    assert "loss" in meta["metrics"]


def test_lr_warmup_then_schedule():
    assert lr_factor(0, 10, 100, "constant", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "constant", 0.1) == 1.0
    assert lr_factor(50, 10, 100, "constant", 0.1) == 1.0
    assert lr_factor(10, 10, 100, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    w = torch.nn.Parameter(torch.zeros(1))
    opts = {"gen": torch.optim.AdamW([w], lr=1e-3), "critic": torch.optim.AdamW([w], lr=1e-4)}
    set_lr(opts, 0.5)
    set_lr(opts, 0.5)  # scaling is from the base lr, not compounding
    assert opts["gen"].param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opts["critic"].param_groups[0]["lr"] == pytest.approx(5e-5)


def test_log_has_the_fields(data, tmp_path):
    run(data, tmp_path, "stage.steps=2")
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "samples_per_s", "elapsed"} <= set(rec)


def test_cli_trains_and_resumes(data, tmp_path, capsys):
    d, _, ae = data
    args = ["teacher", "--config", "configs/tiny.yaml", "--data", str(d), "--out", str(tmp_path),
            f"stage.autoencoder={ae}", "stage.steps=4"]
    s = train_main(args + ["--max-steps", "2"])
    assert s["step"] == 2
    s = train_main(args + ["--resume"])
    assert s["step"] == 4 and "teacher: step 4/4 (done)" in capsys.readouterr().out


def test_cli_help_explains_stages(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    out = capsys.readouterr().out
    for name in ("autoencoder", "teacher", "ar_diffusion", "causal_cd", "causal_ode", "dmd", "--time-budget"):
        assert name in out


def test_budget_clock_synchronises_every_few_steps_and_stops_in_time(monkeypatch):
    syncs = []
    monkeypatch.setattr(loop, "synchronize", lambda device: syncs.append(1))
    clock = BudgetClock(100.0, time.time(), torch.device("cpu"))
    assert not any(clock.over(step, save_margin=0.0) for step in range(50))  # instant steps, far from the end
    assert len(syncs) <= 2 + 50 // BUDGET_CHECK_STEPS
    t0 = time.time()
    clock, step = BudgetClock(0.3, t0, torch.device("cpu")), 0
    while not clock.over(step, save_margin=0.05):
        time.sleep(0.01)  # a 10 ms step
        step += 1
    assert 0.15 < time.time() - t0 <= 0.3 and step > 5  # stopped within the budget


def test_metric_sums_stay_tensors_until_the_log_line():
    sums = MetricSums()
    sums.add({"loss": torch.tensor(1.0), "n": 2.0})
    sums.add({"loss": torch.tensor(3.0), "n": 4.0, "late": torch.tensor(6.0)})  # a key only some steps have
    assert all(torch.is_tensor(v) for v in sums.values["loss"])
    assert sums.means() == {"loss": 2.0, "n": 3.0, "late": 3.0}
    sums.reset()
    assert sums.count == 0 and sums.means() == {}
