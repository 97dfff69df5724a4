"""Stage 3, Causal Forcing++'s method: causal consistency distillation (Causal CD), DESIGN §4 / §4b.

Per step: a grid of N shifted noise levels (`sigma_grid(N, shift)`, 1 -> 0); each clip draws ONE adjacent
pair t_i > t_{i+1} shared by all its frames; x_{t_i} = (1 - t_i) x0 + t_i eps from ground truth. The
frozen AR teacher takes ONE Euler step x_{t_i} -> x_{t_{i+1}} through one teacher-forced forward over
the whole clip (clean context = ground truth with stage 2's context-noise augmentation), with guidance on
the pose condition. Loss = ||x0_student(x_{t_i}, t_i) - sg(x0_ema(x_{t_{i+1}}, t_{i+1}))||^2, both through
the teacher-forcing forward with the SAME clean context; at t_{i+1} = 0 the target is x_{t_{i+1}} itself
(the teacher's last Euler step lands on the data end of the ODE). Nothing is precomputed or stored.

The EMA is the target network: the shared loop updates it after every step (EMA.start copies it
outright for the first optim.ema_start steps, §4b); the exported weights are the EMA's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.config import RunConfig
from worldmodel.diffusion.flow import add_noise, sigma_grid
from worldmodel.training.ar_diffusion import context_noise  # stage 2's augmentation, shared
from worldmodel.training.distill_common import (
    ClipFn, latent_batch, load_teacher, load_trainable, make_batcher, teacher_forced_v, x0_closure,
)
from worldmodel.training.stage import EMA, LatentStage, Logs, make_optimizer, optimizer_step

Tensor = torch.Tensor


def _bc(sigma: Tensor, x: Tensor) -> Tensor:
    """sigma (B,) -> (B, 1, 1, ...) against x (B, ...)."""
    return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def draw_pairs(grid: Tensor, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One adjacent pair per clip from grid (N+1,) descending: (t_hi (B,), t_lo (B,)), t_hi > t_lo >= 0."""
    n = grid.numel() - 1
    idx = torch.randint(0, n, (batch_size,), device=grid.device, generator=generator)
    return grid[idx], grid[idx + 1]


@torch.no_grad()
def consistency_target(teacher_v: ClipFn, ema_x0: ClipFn, x_hi: Tensor, t_hi: Tensor,
                       t_lo: Tensor) -> tuple[Tensor, Tensor]:
    """One teacher Euler step then the EMA's x0 there: x_hi (B,T,...) -> (target, x_lo), both (B,T,...).

    Rectified-flow paths are straight, so dx/dt = v and the Euler step is x + (t_lo - t_hi) v.
    """
    x_lo = x_hi + _bc(t_lo - t_hi, x_hi) * teacher_v(x_hi, t_hi)
    target = torch.where(_bc(t_lo == 0, x_hi).bool(), x_lo, ema_x0(x_lo, t_lo))
    return target, x_lo


def causal_cd_loss(
    student_x0: ClipFn, teacher_v: ClipFn, ema_x0: ClipFn, x0: Tensor, eps: Tensor, t_hi: Tensor, t_lo: Tensor
) -> tuple[Tensor, Tensor]:
    """x0, eps (B,T,C,h,w); t_hi, t_lo (B,) -> (scalar loss, target). Closures bind the clean context."""
    x_hi = add_noise(x0, eps, _bc(t_hi, x0))
    target, _ = consistency_target(teacher_v, ema_x0, x_hi, t_hi, t_lo)
    pred = student_x0(x_hi, t_hi)
    return F.mse_loss(pred.float(), target.float()), target


class CausalCDStage(LatentStage):
    """Causal CD: student and EMA start from the AR weights (stage.init, default stage.teacher)."""

    name = "causal_cd"

    def __init__(self, cfg: RunConfig, device: torch.device | str, pose_stats: dict[str, Any] | None = None, *,
                 student: nn.Module | None = None, teacher: nn.Module | None = None):
        self.device = device = torch.device(device)
        from_checkpoints = student is None  # else modules are given (tests): latent batches, no encoder
        st, fl, opt = cfg.stage, cfg.flow, cfg.optim
        self.teacher = teacher if teacher is not None else load_teacher(cfg, device, pose_stats, self.name)
        self.teacher.eval().requires_grad_(False)
        if student is None:  # the same AR weights as the teacher unless stage.init names others
            student = (load_trainable(st.init, "init", cfg, device, pose_stats, self.name) if st.init
                       else copy.deepcopy(self.teacher))
        self.online = student.to(device).train().requires_grad_(True)
        self.ema = EMA(self.online, opt.ema_decay, opt.ema_start)
        self.optimizers = {"student": make_optimizer(self.online.parameters(), opt.lr, opt.betas, opt.weight_decay)}
        self.pose_stats = pose_stats
        self.batcher = make_batcher(cfg, device, pose_stats, self.name, required=from_checkpoints)
        self.grid = sigma_grid(fl.grid_size, fl.shift).to(device)
        self.block_size, self.guidance = st.block_size, fl.guidance
        self.context_noise_max, self.grad_clip = fl.context_noise_max, opt.grad_clip

    def closures(self, x_clean: Tensor, sigma_clean: Tensor, pose: Tensor) -> tuple[ClipFn, ClipFn, ClipFn]:
        """(student_x0, teacher_v (guided), ema_x0) sharing one clean context."""
        def tf(model: nn.Module, guidance: float) -> ClipFn:
            return teacher_forced_v(model, x_clean, sigma_clean, pose, block_size=self.block_size, guidance=guidance)

        return x0_closure(tf(self.online, 1.0)), tf(self.teacher, self.guidance), x0_closure(tf(self.ema.model, 1.0))

    def step(self, batch: dict[str, Tensor], step: int) -> Logs:
        x0, pose = latent_batch(batch, self.batcher, self.device)
        # Every draw is for the global batch, this rank's rows kept (distributed.BatchShard).
        x_clean, sigma_clean = context_noise(x0, self.context_noise_max, self.shard)
        t_hi, t_lo = self.shard.draw(lambda n: draw_pairs(self.grid, n), x0.shape[0])
        eps = self.shard.randn_like(x0)
        student_x0, teacher_v, ema_x0 = self.closures(x_clean, sigma_clean, pose)
        loss, _ = causal_cd_loss(student_x0, teacher_v, ema_x0, x0, eps, t_hi, t_lo)
        gnorm = optimizer_step(loss, self.online, self.optimizers["student"], self.grad_clip)
        return {"loss": loss.detach(), "grad_norm": gnorm, "t_hi": t_hi.mean()}
