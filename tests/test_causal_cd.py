"""Causal CD: the target is exactly one teacher Euler step then the EMA network; the stage calls each
network as specified (one teacher-forced teacher pass, guidance = a second null-pose pass); the loss
goes down on a toy problem; the stage state round-trips through the loop's checkpoint."""

import json

import pytest
import torch

from distill_toys import GaussianDenoiser, latent_batch, random_dit, stage_run_files, tiny
from data_tools.shards import ClipDataset
from worldmodel.diffusion.flow import add_noise, sigma_grid
from worldmodel.training.causal_cd import CausalCDStage, causal_cd_loss, consistency_target, draw_pairs
from worldmodel.training.loop import train
from worldmodel.training.registry import build_stage



def test_pairs_are_adjacent_grid_levels():
    grid = sigma_grid(8, 3.0)
    hi, lo = draw_pairs(grid, 1000)
    idx = (grid[None, :] == hi[:, None]).float().argmax(1)
    assert torch.equal(lo, grid[idx + 1]) and (hi > lo).all() and (lo == 0).any() and (hi == 1).any()


def test_target_is_one_teacher_euler_step_then_ema():
    """Closures with known outputs: target = ema_x0(x + (t_lo - t_hi) v(x), t_lo); x_lo itself at t_lo = 0."""
    calls = {"teacher": 0, "ema": 0}

    def teacher_v(x, t):
        calls["teacher"] += 1
        return 2.0 * x + t[:, None, None, None, None]

    def ema_x0(x, t):
        calls["ema"] += 1
        return 3.0 * x - t[:, None, None, None, None]

    x0, eps = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    t_hi, t_lo = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0])
    x_hi = add_noise(x0, eps, t_hi[:, None, None, None, None])
    target, x_lo = consistency_target(teacher_v, ema_x0, x_hi, t_hi, t_lo)
    assert calls == {"teacher": 1, "ema": 1}
    for i in range(3):  # by hand, per clip
        step = x_hi[i] + (t_lo[i] - t_hi[i]) * (2.0 * x_hi[i] + t_hi[i])
        want = step if t_lo[i] == 0 else 3.0 * step - t_lo[i]
        torch.testing.assert_close(target[i], want)
    # The student gets the only gradient: the target is a constant.
    w = torch.tensor(1.0, requires_grad=True)
    loss, _ = causal_cd_loss(lambda x, t: w * x, teacher_v, ema_x0, x0, eps, t_hi, t_lo)
    loss.backward()
    assert w.grad is not None and not target.requires_grad


class Counting(torch.nn.Module):
    """Wrap a DiT: count teacher-forcing calls and record their pose_keep."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.keeps = inner, []

    def forward_teacher_forcing(self, *a, pose_keep=None, **k):
        self.keeps.append(None if pose_keep is None else pose_keep.clone())
        return self.inner.forward_teacher_forcing(*a, pose_keep=pose_keep, **k)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_stage_calls_teacher_once_guided_and_ema_as_target(guidance):
    cfg = tiny(f"flow.guidance={guidance}")
    teacher = Counting(random_dit(cfg, seed=1))
    stage = CausalCDStage(cfg, "cpu", None, student=random_dit(cfg, seed=1), teacher=teacher)
    with torch.no_grad():  # make the EMA differ from the online student
        for p in stage.ema.model.parameters():
            p.add_(0.01)
    ema_calls, online_calls = [], []
    orig_ema, orig_online = stage.ema.model.forward_teacher_forcing, stage.online.forward_teacher_forcing
    stage.ema.model.forward_teacher_forcing = lambda *a, **k: ema_calls.append(1) or orig_ema(*a, **k)
    stage.online.forward_teacher_forcing = lambda *a, **k: online_calls.append(1) or orig_online(*a, **k)
    b = latent_batch(cfg)
    torch.manual_seed(5)
    logs = stage.step(b, 0)
    # one teacher-forced teacher pass (+ the null-pose pass under guidance), one EMA pass, one student pass
    assert len(teacher.keeps) == (1 if guidance == 1.0 else 2)
    assert teacher.keeps[0].all() and (guidance == 1.0 or not teacher.keeps[1].any())
    assert len(ema_calls) == 1 and len(online_calls) == 1
    assert logs["loss"] > 0 and torch.isfinite(torch.as_tensor(logs["loss"]))


def test_loss_decreases_on_gaussian_toy():
    """Teacher = exact PF-ODE of N(0.7, 0.4^2) latents; the student (a tiny WorldDiT starting at x0 = x_t)
    learns the consistency map: the CD loss falls several-fold in 80 steps."""
    cfg = tiny("optim.lr=0.003", "optim.ema_decay=0.9", "optim.ema_start=20", "flow.grid_size=8")
    stage = CausalCDStage(cfg, "cpu", None, student=random_dit(cfg, seed=0, scale=0.0),
                          teacher=GaussianDenoiser(0.7, 0.4))
    b = latent_batch(cfg, 8)
    losses = []
    for i in range(80):
        losses.append(stage.step(b, i)["loss"])
        stage.ema.update(stage.online, i)  # the loop's job
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print("Causal CD toy loss first/last", first, last)
    assert last < 0.3 * first, (first, last)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    return stage_run_files(tmp_path_factory.mktemp("run"), "ar_diffusion")


def test_state_round_trips_through_loop(run_files, tmp_path):
    """4 steps straight == 2 steps, checkpoint, resume, 2 steps (weights, EMA, optimiser, RNG, GPU-seconds)."""
    d, stats, ae, ar = run_files
    over = [f"stage.autoencoder={ae}", f"stage.teacher={ar}", "stage.steps=4", "stage.checkpoint_every=100"]
    cfg = tiny(*over)
    ds = ClipDataset(d, cfg.data.clip_frames)
    full = build_stage("causal_cd", cfg, "cpu", stats)
    train(full, ds, cfg, tmp_path / "a")
    part = build_stage("causal_cd", cfg, "cpu", stats)
    assert train(part, ds, cfg, tmp_path / "b", max_steps=2)["step"] == 2
    resumed = build_stage("causal_cd", cfg, "cpu", stats)
    train(resumed, ds, cfg, tmp_path / "b", resume=True)
    for name in ("online",):
        for (k, a), b in zip(full.online.state_dict().items(), resumed.online.state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{name}.{k}")
    for a, b in zip(full.ema.model.parameters(), resumed.ema.model.parameters()):
        torch.testing.assert_close(a, b)
    # GPU-seconds (the loop's clock) continue over the resume, logged without timing each step.
    gpu_s = [json.loads(line)["gpu_s"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(gpu_s) == 3 and 0 < gpu_s[0] and gpu_s == sorted(gpu_s)  # steps 1, 2 (cut), 4 (resumed)
    assert (tmp_path / "b" / "causal_cd.safetensors").is_file()
