"""Causal ODE: the stored states are the Euler sampler's; bytes and time are reported; generation is
resumable from disk; the regression loss decreases; the stage round-trips through the loop."""

import torch

from distill_toys import latent_batch, random_dit, stage_run_files, tiny
from data_tools.shards import ClipDataset
from worldmodel.checkpoint import load_training_state
from worldmodel.diffusion.flow import euler_sample, step_sigmas
from worldmodel.training.causal_ode import CausalODEStage, float_sigma_fn, ode_path
from worldmodel.training.distill_common import teacher_forced_v
from worldmodel.training.loop import train
from worldmodel.training.registry import build_stage



def test_ode_path_holds_the_student_levels():
    path, keep = ode_path(8, 3.0, step_sigmas(4, 3.0))
    assert len(path) == 9 and keep == [path[0], path[2], path[4], path[6]]  # on the grid: no extra steps
    path, keep = ode_path(6, 1.0, step_sigmas(4, 1.0))  # .75 and .25 are not on a 6-step grid: inserted
    assert len(path) == 9 and all(k in path for k in keep) and path == sorted(path, reverse=True)
    assert path[0] == 1.0 and path[-1] == 0.0


def make_stage(cfg, tmp_path, teacher=None, student=None):
    teacher = teacher or random_dit(cfg, seed=1)
    return CausalODEStage(cfg, "cpu", None, student=student or random_dit(cfg, seed=1), teacher=teacher,
                          out_dir=tmp_path), teacher


def test_stored_trajectories_match_the_euler_sampler(tmp_path):
    cfg = tiny("stage.ode_samples=6", "stage.student_steps=2", "flow.shift=3.0", "flow.guidance=2.0")
    stage, teacher = make_stage(cfg, tmp_path)
    b = latent_batch(cfg, 4)
    logs = [stage.step(b, i) for i in range(3)]
    assert [l["ode_clips"] for l in logs] == [4, 6, 6] and "loss" in logs[2] and "loss" not in logs[1]
    files = sorted((tmp_path / "ode_pairs").glob("chunk_*.pt"))
    assert len(files) == 2 and logs[-1]["ode_bytes"] == sum(f.stat().st_size for f in files) > 0
    assert logs[-1]["ode_gen_s"] > 0
    for f in files:
        c = load_training_state(f)
        v_fn = float_sigma_fn(teacher_forced_v(teacher, c["x_clean"], c["sigma_clean"], c["pose"],
                                               block_size=cfg.stage.block_size, guidance=2.0))
        assert c["states"].shape[1] == 2 and c["sigmas"][0] == 1.0
        path = c["path"]
        for k, s in enumerate(c["sigmas"]):  # re-run the sampler from the stored noise to each level
            ref = euler_sample(v_fn, c["states"][:, 0], path[: path.index(s) + 1])
            torch.testing.assert_close(c["states"][:, k], ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c["endpoint"], euler_sample(v_fn, c["states"][:, 0], path), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(c["endpoint"], c["states"][:, 0])
    # Resumable: a new stage on the same directory finds the clips and goes straight to regression.
    again, _ = make_stage(cfg, tmp_path)
    assert not again.generating and again.store.clips == 6 and "loss" in again.step(b, 3)


def test_regression_loss_decreases(tmp_path):
    cfg = tiny("stage.ode_samples=8", "stage.student_steps=2", "optim.lr=0.003")
    stage, _ = make_stage(cfg, tmp_path)
    b = latent_batch(cfg, 4)

    def eval_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return sum(stage.regression_loss(8).item() for _ in range(4)) / 4

    stage.step(b, 0), stage.step(b, 1)
    assert not stage.generating and stage._teacher is None  # the teacher is released after generation
    before = eval_loss()
    for i in range(60):
        stage.step(b, 2 + i)
    after = eval_loss()
    print("Causal ODE regression loss before/after", before, after)
    assert after < 0.5 * before, (before, after)


def test_state_round_trips_through_loop(tmp_path_factory, tmp_path):
    d, stats, ae, ar = stage_run_files(tmp_path_factory.mktemp("run"), "ar_diffusion")

    def config(run):
        return tiny(f"stage.autoencoder={ae}", f"stage.teacher={ar}", "stage.steps=5", "stage.ode_samples=8",
                    "stage.checkpoint_every=100", f"stage.ode_pairs_dir={tmp_path / run / 'ode_pairs'}")

    ds = ClipDataset(d, 4)
    full = build_stage("causal_ode", config("a"), "cpu", stats)
    train(full, ds, config("a"), tmp_path / "a")
    part = build_stage("causal_ode", config("b"), "cpu", stats)
    train(part, ds, config("b"), tmp_path / "b", max_steps=3)  # 2 generation + 1 regression step
    resumed = build_stage("causal_ode", config("b"), "cpu", stats)
    assert resumed.store.clips == 8
    train(resumed, ds, config("b"), tmp_path / "b", resume=True)
    for a, b in zip(full.online.parameters(), resumed.online.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(full.ema.model.parameters(), resumed.ema.model.parameters()):
        torch.testing.assert_close(a, b)
