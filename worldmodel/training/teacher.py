"""Stage 1: the bidirectional pose-conditioned teacher, rectified-flow matching on T-frame clips.

Noise levels: with probability `stage.sigma_per_frame` a clip draws one sigma per frame (diffusion-
forcing style), otherwise one sigma for the whole clip. The per-clip case is how DMD queries the
teacher as its real score; the per-frame case teaches the bidirectional network to denoise a frame
next to clean (sigma ~ 0) frames, which is how `worldmodel.eval` runs the teacher frame by frame over a
sliding window. Pose dropout: with probability `flow.pose_dropout` a clip's whole pose condition is
the null embedding (pose_keep False), so guidance on the pose is possible later.

The pieces shared with stage 2 (pose dropout, the flow loss, building/initialising a DiT stage) live
here as functions; `make_batcher` (the frozen encoder as a batcher) serves the distillation stages too.
"""

from __future__ import annotations

from typing import Any

import torch

from worldmodel.config import RunConfig
from worldmodel.diffusion.flow import add_noise, sample_train_sigma, v_target
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.models.dit import WorldDiT
from worldmodel.training.batches import LatentBatcher, check_pose_stats
from worldmodel.training.registry import load_frozen, load_into, require_checkpoint
from worldmodel.training.stage import EMA, LatentStage, Logs, make_optimizer, optimizer_step

Tensor = torch.Tensor


def draw_pose_keep(batch: int, frames: int, dropout: float, device: torch.device) -> Tensor:
    """(B, T) bool: False for every frame of a dropped clip (one decision per clip)."""
    keep = torch.rand(batch, device=device) >= dropout
    return keep[:, None].expand(batch, frames)


def draw_clip_sigma(batch: int, frames: int, shift: float, per_frame_prob: float, device: torch.device) -> Tensor:
    """(B, T) noise levels: per frame for a `per_frame_prob` share of the clips, else one per clip."""
    per_frame = sample_train_sigma((batch, frames), shift, device=device)
    per_clip = sample_train_sigma((batch, 1), shift, device=device).expand(batch, frames)
    use_frame = (torch.rand(batch, 1, device=device) < per_frame_prob).expand(batch, frames)
    return torch.where(use_frame, per_frame, per_clip)


def flow_loss(v_pred: Tensor, x0: Tensor, eps: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error to the rectified-flow target v = eps - x0; `weight` (B, T) masks frames."""
    err = (v_pred.float() - v_target(x0, eps)).pow(2).flatten(2).mean(-1)  # (B, T)
    if weight is None:
        return err.mean()
    return (err * weight).sum() / weight.sum().clamp_min(1)


def teacher_loss(model: WorldDiT, x0: Tensor, pose: Tensor, sigma: Tensor, eps: Tensor,
                 pose_keep: Tensor | None) -> Tensor:
    """Bidirectional flow matching: x0, eps (B,T,C,h,w), sigma (B,T), pose (B,T,5) -> scalar loss."""
    v = model(add_noise(x0, eps, sigma), sigma, pose, mode="bidirectional", pose_keep=pose_keep)
    return flow_loss(v, x0, eps)


def check_latent_shape(cfg: RunConfig) -> None:
    h, w = cfg.data.frame_height // 8, cfg.data.frame_width // 8
    if (cfg.dit.latent_height, cfg.dit.latent_width) != (h, w) or cfg.dit.latent_channels != cfg.autoencoder.latent_channels:
        raise ValueError(
            f"dit latent {cfg.dit.latent_channels}x{cfg.dit.latent_height}x{cfg.dit.latent_width} does not match "
            f"frames {cfg.data.frame_height}x{cfg.data.frame_width} / 8 with "
            f"{cfg.autoencoder.latent_channels} autoencoder channels; set dit.latent_height={h} dit.latent_width={w}"
        )


def make_batcher(cfg: RunConfig, device: torch.device, pose_stats: dict[str, Any] | None, stage: str,
                 required: bool = True) -> LatentBatcher | None:
    """The frozen encoder turning raw batches into latents. Required when the stage is built from
    checkpoints; a stage built from given modules (tests) may go without and take latent batches."""
    if not cfg.stage.autoencoder and not required:
        return None
    check_latent_shape(cfg)
    ae = load_frozen(cfg.stage.autoencoder, Autoencoder(cfg.autoencoder), {"autoencoder": cfg.autoencoder},
                     "autoencoder", stage, device)
    return LatentBatcher(ae, check_pose_stats(pose_stats, f"stage {stage}"), device, bf16=cfg.stage.bf16,
                         table=cfg.stage.cache_latents, source=cfg.stage.autoencoder)


class DiTStage(LatentStage):
    """A stage that trains one WorldDiT on latents (teacher, AR diffusion): batcher, net, EMA, AdamW."""

    init_required = False

    def __init__(self, cfg: RunConfig, device: torch.device, pose_stats: dict[str, Any] | None):
        sc, oc = cfg.stage, cfg.optim
        self.pose_stats = check_pose_stats(pose_stats, f"stage {self.name}")
        self.batcher = make_batcher(cfg, device, self.pose_stats, self.name)
        self.online = WorldDiT(cfg.dit).to(device)
        if sc.init or self.init_required:
            load_into(require_checkpoint(sc.init, "init", self.name), self.online, {"dit": cfg.dit}, self.pose_stats)
        self.ema = EMA(self.online, oc.ema_decay, oc.ema_start)
        self.optimizers = {"dit": make_optimizer(self.online.parameters(), oc.lr, oc.betas, oc.weight_decay)}
        self.grad_clip = oc.grad_clip
        self.flow = cfg.flow
        self.sigma_per_frame = sc.sigma_per_frame
        self.block_size = sc.block_size

    def loss(self, x0: Tensor, pose: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, batch: dict[str, Tensor], step: int) -> Logs:
        lat = self.batcher(batch)
        self.online.train()
        loss = self.loss(lat["x0"], lat["pose"])
        grad_norm = optimizer_step(loss, self.online, self.optimizers["dit"], self.grad_clip)
        return {"loss": loss.detach(), "grad_norm": grad_norm}


class TeacherStage(DiTStage):
    """Bidirectional pose-conditioned flow matching (optionally continued from stage.init)."""

    name = "teacher"

    def loss(self, x0: Tensor, pose: Tensor) -> Tensor:
        B, T = x0.shape[:2]
        # Drawn for the global batch, this rank's rows kept (distributed.BatchShard).
        sigma = self.shard.draw(lambda n: draw_clip_sigma(n, T, self.flow.shift, self.sigma_per_frame, x0.device), B)
        keep = self.shard.draw(lambda n: draw_pose_keep(n, T, self.flow.pose_dropout, x0.device), B)
        return teacher_loss(self.online, x0, pose, sigma, self.shard.randn_like(x0), keep)
