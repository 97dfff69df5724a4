"""Stage 4: asymmetric DMD with self-rollout (DESIGN §4 stage 4, §4b).

Networks: the generator is the causal few-step student (stage.init: Causal CD / Causal ODE / AR weights);
the real score is the frozen BIDIRECTIONAL teacher (stage.teacher, stage 1) with guidance on the pose;
the fake score is a bidirectional critic initialised from the teacher and trained online with the
flow-matching loss on student samples. All weights and optimiser states are fp32 (the reference did not
converge with bf16 weights); stage.bf16 only turns on autocast for the forwards.

One `step(batch)`:
1. critic_steps times: a fresh no-grad self-rollout of the student, then one critic update (the critic
   tracks the generator it scores; 5 per generator update in the reference).
2. one generator update: self-rollout with gradient through the exit step only (rollout.py); noise the
   generated frames to one t per clip (u ~ U(0,1), shifted like every grid, clamped to
   [dmd_t_min, dmd_t_max]); x0_real (teacher, guided) and x0_fake (critic, unguided);
   grad = (x0_fake - x0_real) / mean|x - x0_real| (per clip); loss 0.5 ||x - sg(x - grad)||^2.

What the scores see: the WHOLE clip, bidirectionally: the T0 ground-truth context frames, clean latents
at sigma = flow.context_noise_inference (0 by default; noised to that level when > 0), followed by the
T - T0 generated frames at sigma = t, each frame with its own pose. The DMD gradient and the critic's
loss use the generated frames only (the context frames have no score to match).
"""

from __future__ import annotations

import copy
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.config import RunConfig
from worldmodel.diffusion.flow import add_noise, guided, shift_sigma, step_sigmas, x0_from_v
from worldmodel.training.distill_common import latent_batch, load_teacher, load_trainable, make_batcher
from worldmodel.training.rollout import self_rollout
from worldmodel.training.stage import EMA, LatentStage, Logs, make_optimizer, optimizer_step
from worldmodel.training.teacher import flow_loss

Tensor = torch.Tensor


def _bc(s: Tensor, x: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def draw_dmd_sigma(batch_size: int, shift: float, t_min: float, t_max: float, device: torch.device | str,
                   generator: torch.Generator | None = None) -> Tensor:
    """(B,) one noise level per clip: shifted uniform, clamped to [t_min, t_max] (§4b)."""
    u = torch.rand(batch_size, device=device, generator=generator)
    return shift_sigma(u, shift).clamp(t_min, t_max)


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """(x0_fake - x0_real) / mean|x - x0_real|, the normaliser per sample; all (B, ...)."""
    dims = tuple(range(1, x.ndim))
    norm = (x - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / norm)


def dmd_generator_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5 ||x - sg(x - grad)||^2 (mean): its gradient w.r.t. x is grad / numel, pushing x along -grad."""
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())


def score_clip(x_ctx: Tensor, x_gen_t: Tensor, sigma: Tensor, context_sigma: float) -> tuple[Tensor, Tensor]:
    """[context | noisy generated] -> (x_clip (B,T,...), sigma_clip (B,T)) as the scores see it."""
    if context_sigma > 0:
        x_ctx = add_noise(x_ctx, torch.randn_like(x_ctx), context_sigma)
    B, T0, Tg = x_ctx.shape[0], x_ctx.shape[1], x_gen_t.shape[1]
    sig = torch.cat([torch.full((B, T0), float(context_sigma), device=x_ctx.device),
                     sigma.float()[:, None].expand(B, Tg)], dim=1)
    return torch.cat([x_ctx, x_gen_t], dim=1), sig


def bidirectional_v(model: nn.Module, x: Tensor, sigma: Tensor, pose: Tensor, *, guidance: float = 1.0) -> Tensor:
    """v (fp32) over a whole clip (B,T,...) with pose guidance (null pose on every frame when uncond)."""
    keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    v = model(x, sigma, pose, mode="bidirectional", pose_keep=keep).float()
    if guidance != 1.0:
        v = guided(v, model(x, sigma, pose, mode="bidirectional", pose_keep=~keep).float(), guidance)
    return v


@torch.no_grad()
def dmd_scores(teacher: nn.Module, critic: nn.Module, x_ctx: Tensor, x_gen: Tensor, pose: Tensor, sigma: Tensor,
               eps: Tensor, *, guidance: float, context_sigma: float) -> tuple[Tensor, Tensor]:
    """(x0_real, x0_fake) of the generated frames (B,Tg,...) noised to sigma (B,) with eps."""
    x_t = add_noise(x_gen, eps, _bc(sigma, x_gen))
    clip, sig = score_clip(x_ctx, x_t, sigma, context_sigma)
    T0 = x_ctx.shape[1]
    s = _bc(sigma, x_t)
    v_real = bidirectional_v(teacher, clip, sig, pose, guidance=guidance)[:, T0:]
    v_fake = bidirectional_v(critic, clip, sig, pose)[:, T0:]
    return x0_from_v(x_t, v_real, s), x0_from_v(x_t, v_fake, s)


def critic_loss(critic: nn.Module, x_ctx: Tensor, x_gen: Tensor, pose: Tensor, sigma: Tensor, eps: Tensor, *,
                context_sigma: float) -> Tensor:
    """Flow-matching (denoising) loss of the fake score on student samples x_gen (B,Tg,...), detached."""
    x_gen = x_gen.detach()
    x_t = add_noise(x_gen, eps, _bc(sigma, x_gen))
    clip, sig = score_clip(x_ctx, x_t, sigma, context_sigma)
    v = bidirectional_v(critic, clip, sig, pose)[:, x_ctx.shape[1]:]
    return flow_loss(v, x_gen, eps)


class DMDStage(LatentStage):
    """Generator (online + EMA) and critic trained; teacher frozen. Exports the EMA generator."""

    name = "dmd"
    find_unused_parameters = True  # the cached rollout never uses the generator's null pose embedding

    def __init__(self, cfg: RunConfig, device: torch.device | str, pose_stats: dict[str, Any] | None = None, *,
                 student: nn.Module | None = None, teacher: nn.Module | None = None, critic: nn.Module | None = None):
        self.device = device = torch.device(device)
        from_checkpoints = student is None  # else modules are given (tests): latent batches, no encoder
        st, fl, opt, gen = cfg.stage, cfg.flow, cfg.optim, cfg.generator
        if st.block_size != gen.block_size:
            raise ValueError(f"dmd: stage.block_size={st.block_size} != generator.block_size={gen.block_size}; "
                             "the self-rollout must generate the blocks inference will: set both the same")
        self.teacher = teacher if teacher is not None else load_teacher(cfg, device, pose_stats, self.name)
        self.teacher.eval().requires_grad_(False)
        if critic is None:  # initialised from the teacher (a copy: the teacher itself stays frozen)
            critic = copy.deepcopy(self.teacher)
        if student is None:
            student = load_trainable(st.init, "init", cfg, device, pose_stats, self.name)
        self.online = student.to(device).train().requires_grad_(True)
        self.critic = critic.to(device).train().requires_grad_(True)
        self.ema = EMA(self.online, opt.ema_decay, opt.ema_start)
        self.optimizers = {
            "generator": make_optimizer(self.online.parameters(), opt.lr, opt.betas, opt.weight_decay),
            "critic": make_optimizer(self.critic.parameters(), st.critic_lr, opt.betas, opt.weight_decay),
        }
        self.pose_stats = pose_stats
        self.batcher = make_batcher(cfg, device, pose_stats, self.name, required=from_checkpoints)
        self.sigmas = step_sigmas(st.student_steps, fl.shift)
        self.rollout_kw = dict(sigmas=self.sigmas, block_size=st.block_size, cache_frames=gen.cache_frames,
                               sink_frames=gen.sink_frames, context_sigma=fl.context_noise_inference)
        self.context_frames, self.critic_steps = gen.context_frames, st.critic_steps
        self.shift, self.t_min, self.t_max = fl.shift, st.dmd_t_min, st.dmd_t_max
        self.guidance, self.context_sigma, self.grad_clip = fl.guidance, fl.context_noise_inference, opt.grad_clip
        self.seed = cfg.seed

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"online": self.online, "critic": self.critic}

    def exit_step(self, step: int, draw: int) -> int:
        """The exit step of rollout `draw` of `step`: a function of (seed, step) so every DDP rank and a
        resumed run agree; shared by all blocks of that rollout."""
        return random.Random(self.seed * 1_000_003 + step * 1_009 + draw).randrange(len(self.sigmas))

    def rollout(self, x0: Tensor, pose: Tensor, exit_step: int, grad: bool) -> Tensor:
        """x0 (B,T,...) ground truth -> generated frames (B, T-T0, ...) after T0 context frames."""
        def noise(shape: tuple[int, ...]) -> Tensor:  # drawn for the global batch (distributed.BatchShard)
            return self.shard.draw(lambda n: torch.randn((n, *shape[1:]), device=x0.device), shape[0])

        return self_rollout(self.online, x0[:, : self.context_frames], pose, exit_step=exit_step, grad=grad,
                            noise_fn=noise, **self.rollout_kw)

    def draw_sigma_eps(self, x_gen: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma (B,), eps like x_gen) for the scores, drawn for the global batch."""
        sigma = self.shard.draw(lambda n: draw_dmd_sigma(n, self.shift, self.t_min, self.t_max, self.device),
                                x_gen.shape[0])
        return sigma, self.shard.randn_like(x_gen)

    def critic_update(self, x0: Tensor, pose: Tensor, step: int, draw: int) -> Tensor:
        with torch.no_grad():
            x_gen = self.rollout(x0, pose, self.exit_step(step, draw), grad=False)
        sigma, eps = self.draw_sigma_eps(x_gen)
        loss = critic_loss(self.critic, x0[:, : self.context_frames], x_gen, pose, sigma, eps,
                           context_sigma=self.context_sigma)
        optimizer_step(loss, self.critic, self.optimizers["critic"], self.grad_clip)
        return loss.detach()

    def generator_update(self, x0: Tensor, pose: Tensor, step: int) -> Logs:
        exit_step = self.exit_step(step, self.critic_steps)
        x_gen = self.rollout(x0, pose, exit_step, grad=True)
        sigma, eps = self.draw_sigma_eps(x_gen)
        x0_real, x0_fake = dmd_scores(self.teacher, self.critic, x0[:, : self.context_frames], x_gen.detach(), pose,
                                      sigma, eps, guidance=self.guidance,
                                      context_sigma=self.context_sigma)
        grad = dmd_gradient(x_gen.detach(), x0_real, x0_fake)
        loss = dmd_generator_loss(x_gen, grad)
        gnorm = optimizer_step(loss, self.online, self.optimizers["generator"], self.grad_clip)
        return {"dmd_loss": loss.detach(), "gen_grad_norm": gnorm, "exit_step": float(exit_step),
                "real_fake_gap": (x0_real - x0_fake).abs().mean(),
                "gen_to_gt": (x_gen.detach() - x0[:, self.context_frames:]).pow(2).mean()}

    def step(self, batch: dict[str, Tensor], step: int) -> Logs:
        x0, pose = latent_batch(batch, self.batcher, self.device)
        c_losses = [self.critic_update(x0, pose, step, d) for d in range(self.critic_steps)]
        logs = self.generator_update(x0, pose, step)
        return {"loss": logs["dmd_loss"], **logs, "critic_loss": sum(c_losses) / max(1, len(c_losses)),
                "critic_updates": float(len(c_losses))}
