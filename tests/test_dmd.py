"""Asymmetric DMD with self-rollout: the gradient's definition, exit-step truncation, critic ratio, a
full step on a tiny model, training toward the teacher on a toy problem, and checkpoint round-trip."""

import copy

import pytest
import torch

from data_tools.shards import ClipDataset
from distill_toys import GaussianDenoiser, dit_checkpoint, gaussian_x0, latent_batch, random_dit, stage_run_files, tiny
from worldmodel.diffusion.flow import add_noise, step_sigmas
from worldmodel.inference.generator import StreamingGenerator
from worldmodel.training.dmd import DMDStage, dmd_generator_loss, dmd_gradient
from worldmodel.training.loop import train
from worldmodel.training.registry import build_stage
from worldmodel.training.rollout import self_rollout



def test_dmd_gradient_definition_and_per_sample_normaliser():
    x, real, fake = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    g = dmd_gradient(x, real, fake)
    norm = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(g, (fake - real) / norm)
    # Scaling one sample's distance to x0_real rescales only that sample's gradient.
    x2 = x.clone()
    x2[0] = real[0] + 10 * (x[0] - real[0])
    g2 = dmd_gradient(x2, real, fake)
    torch.testing.assert_close(g2[0], g[0] / 10)
    torch.testing.assert_close(g2[1:], g[1:])
    # 0.5||x - sg(x - grad)||^2: d/dx = grad / numel, so descent moves x along -grad.
    xr = x.clone().requires_grad_(True)
    dmd_generator_loss(xr, g).backward()
    torch.testing.assert_close(xr.grad, g / g.numel())


def test_dmd_moves_samples_to_the_real_gaussian():
    """Closed-form scores: real N(1, .5^2); fake = the Gaussian fitted to the current samples (a perfect
    critic). Descending the DMD loss carries samples from N(-1, 1) to the real distribution."""
    torch.manual_seed(0)
    mu_r, s_r = torch.tensor(1.0), torch.tensor(0.5)
    x = (torch.randn(64, 256) - 1.0).requires_grad_(True)  # 64 samples of 256 elements
    opt = torch.optim.SGD([x], lr=0.05 * x.numel())
    for _ in range(300):
        t = torch.rand(x.shape[0], 1) * 0.96 + 0.02
        with torch.no_grad():
            x_t = add_noise(x, torch.randn_like(x), t)
            real = gaussian_x0(x_t, t, mu_r, s_r)
            fake = gaussian_x0(x_t, t, x.mean(), x.std())
            grad = dmd_gradient(x.detach(), real, fake)
            if _ == 0:
                # the first step already points from the fake toward the real mean
                assert (grad.mean() < 0) and ((x - grad).mean() > x.mean())
        opt.zero_grad()
        dmd_generator_loss(x, grad).backward()
        opt.step()
    assert abs(x.mean().item() - 1.0) < 0.05, x.mean()
    assert abs(x.std().item() - 0.5) < 0.1, x.std()


def record_calls(model):
    """Wrap forward_cached to record (grad enabled, write, sigma) of each call."""
    calls, orig = [], model.forward_cached

    def wrapped(x, sigma, pose, cache, *, write, pose_keep=None):
        calls.append((torch.is_grad_enabled(), write, round(float(sigma.flatten()[0]), 5)))
        return orig(x, sigma, pose, cache, write=write, pose_keep=pose_keep)

    model.forward_cached = wrapped
    return calls


@pytest.mark.parametrize("exit_step", [0, 1, 3])
def test_rollout_grad_only_through_exit_step(exit_step):
    cfg = tiny()
    model = random_dit(cfg)
    b = latent_batch(cfg, 2)
    calls = record_calls(model)
    sig = step_sigmas(4, 3.0)
    rounded = [round(s, 5) for s in sig]
    caches = []
    orig_new = model.new_cache
    model.new_cache = lambda *a, **k: caches.append(orig_new(*a, **k)) or caches[-1]
    out = self_rollout(model, b["x0"][:, :2], b["pose"], sigmas=sig, exit_step=exit_step, block_size=1,
                       cache_frames=6, sink_frames=1)
    assert out.shape == (2, 2, 4, 4, 6) and out.requires_grad
    ctx = [(False, True, 0.0)] * 2
    # (grad enabled, write, sigma): free steps, the exit step with grad, then the cache write at sigma 0
    per_block = [(False, False, s) for s in rounded[:exit_step]]
    per_block += [(True, False, rounded[exit_step]), (False, True, 0.0)]
    assert calls == ctx + per_block * 2
    # The history in the cache is detached: no buffer joined the graph.
    assert not any(k.requires_grad or v.requires_grad for k, v in zip(caches[0].k, caches[0].v))
    out.sum().backward()
    unused = {"null_pose"}  # the pose is kept on every frame
    assert all(p.grad is not None for n, p in model.named_parameters() if n not in unused)


@pytest.mark.parametrize("context_sigma", [0.0, 0.05])
def test_rollout_matches_the_inference_generator(context_sigma):
    """With the same noise, the training rollout (exit = last step, no grad) IS streaming inference."""
    cfg = tiny("generator.steps=2", "generator.first_frame_steps=2", "flow.shift=3.0",
               f"flow.context_noise_inference={context_sigma}")
    model = random_dit(cfg, seed=1)
    b = latent_batch(cfg, 2, seed=3)
    stats = {"mean": [0.0] * 5, "std": [1.0] * 5}
    gen = StreamingGenerator(copy.deepcopy(model), None, stats, cfg.generator, cfg.flow)
    gen.reset(b["x0"][:, :2], b["pose"][:, :2], torch.Generator().manual_seed(7), latents=True)
    ref = torch.stack([gen.step(b["pose"][:, t], decode=False) for t in (2, 3)], dim=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        out = self_rollout(model, b["x0"][:, :2], b["pose"], sigmas=step_sigmas(2, 3.0), exit_step=None,
                           block_size=1, cache_frames=6, sink_frames=1, grad=False, context_sigma=context_sigma,
                           noise_fn=lambda shape: torch.randn(shape, generator=g))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def count_steps(opt):
    n = [0]
    orig = opt.step

    def step(*a, **k):
        n[0] += 1
        return orig(*a, **k)

    opt.step = step
    return n


def test_full_step_critic_ratio_and_frozen_teacher():
    cfg = tiny("stage.critic_steps=3", "generator.steps=2", "stage.student_steps=2")
    teacher = random_dit(cfg, seed=1)
    stage = DMDStage(cfg, "cpu", None, student=random_dit(cfg, seed=2), teacher=teacher)
    assert stage.critic is not stage.teacher
    t0 = copy.deepcopy(teacher.state_dict())
    c0 = copy.deepcopy(stage.critic.state_dict())
    g0 = copy.deepcopy(stage.online.state_dict())
    n_gen, n_crit = count_steps(stage.optimizers["generator"]), count_steps(stage.optimizers["critic"])
    logs = stage.step(latent_batch(cfg), 0)
    assert (n_gen[0], n_crit[0]) == (1, 3) and logs["critic_updates"] == 3
    assert all(torch.isfinite(torch.as_tensor(v)) for v in logs.values()), logs
    assert all(torch.equal(t0[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(c0[k], v) for k, v in stage.critic.state_dict().items())
    assert any(not torch.equal(g0[k], v) for k, v in stage.online.state_dict().items())
    # The exit step is one draw per (seed, step, rollout), in range, and not constant across steps.
    draws = {stage.exit_step(s, 3) for s in range(50)}
    assert draws == {0, 1}


def test_generator_training_moves_student_toward_teacher():
    """Toy: the teacher is the exact denoiser of N(1.5, .3^2) latents, the critic a Gaussian fitted online by
    the flow loss; a tiny causal student (starting as pure noise) is pulled toward the teacher's data."""
    cfg = tiny("stage.critic_steps=2", "stage.student_steps=1", "optim.lr=0.01", "stage.critic_lr=0.05",
               "optim.grad_clip=0")
    student = random_dit(cfg, seed=3, scale=0.0)  # zero output layer: samples start as pure noise
    teacher = GaussianDenoiser(1.5, 0.3)
    critic = GaussianDenoiser(0.0, 1.0)
    stage = DMDStage(cfg, "cpu", None, student=student, teacher=teacher, critic=critic)
    b = latent_batch(cfg, 8)

    def distance():
        with torch.no_grad():
            x = stage.rollout(b["x0"], b["pose"], exit_step=0, grad=False)
        return abs(x.mean().item() - 1.5) + abs(x.std().item() - 0.3)

    torch.manual_seed(0)
    before = distance()
    for i in range(40):
        stage.step(b, i)
    after = distance()
    print("toy DMD distance before/after", before, after)
    assert after < 0.5 * before, (before, after)


def test_state_round_trips_through_loop(tmp_path_factory, tmp_path):
    """4 steps straight == 2 steps, checkpoint, resume, 2 steps: generator, critic, EMA, both optimisers."""
    d, stats, ae, teacher = stage_run_files(tmp_path_factory.mktemp("run"), "teacher")
    cfg = tiny()
    student = dit_checkpoint(tmp_path / "causal_cd", cfg, random_dit(cfg, seed=5), stats, "causal_cd")
    cfg = tiny(f"stage.autoencoder={ae}", f"stage.teacher={teacher}", f"stage.init={student}", "stage.steps=4",
               "stage.checkpoint_every=100", "stage.critic_steps=2", "generator.steps=2", "stage.student_steps=2")
    ds = ClipDataset(d, 4)
    full = build_stage("dmd", cfg, "cpu", stats)
    train(full, ds, cfg, tmp_path / "a")
    train(build_stage("dmd", cfg, "cpu", stats), ds, cfg, tmp_path / "b", max_steps=2)
    resumed = build_stage("dmd", cfg, "cpu", stats)
    train(resumed, ds, cfg, tmp_path / "b", resume=True)
    for m in ("online", "critic"):
        for a, b in zip(getattr(full, m).parameters(), getattr(resumed, m).parameters()):
            torch.testing.assert_close(a, b)
    for a, b in zip(full.ema.model.parameters(), resumed.ema.model.parameters()):
        torch.testing.assert_close(a, b)
    # The export is the EMA generator alone (what inference loads).
    from worldmodel.checkpoint import read_meta
    assert read_meta(tmp_path / "b" / "dmd.safetensors")["modules"] == ["model"]
