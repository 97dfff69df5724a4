"""Stage 2: autoregressive diffusion by teacher forcing, initialised from the teacher (DESIGN §4.2).

The clean clip (each frame lightly noised with its own sigma_c ~ U[0, flow.context_noise_max], passed
to the network as that frame's sigma so it knows how noisy its history is) goes in front of the noisy
clip, both with the same positions; the teacher-forcing mask lets noisy block i see clean blocks < i
and itself. Every block of `stage.block_size` frames draws its own sigma. The loss is the flow loss on
the noisy half. Pose dropout is per clip, as in stage 1.
"""

from __future__ import annotations

import torch

from worldmodel.diffusion.flow import add_noise, sample_train_sigma
from worldmodel.models.dit import WorldDiT
from worldmodel.training.distributed import SINGLE, BatchShard
from worldmodel.training.teacher import DiTStage, draw_pose_keep, flow_loss

Tensor = torch.Tensor


def block_sigma(batch: int, frames: int, block_size: int, shift: float, device: torch.device) -> Tensor:
    """(B, T) noise levels, one per block of `block_size` frames (a last partial block is its own)."""
    blocks = -(-frames // block_size)
    per_block = sample_train_sigma((batch, blocks), shift, device=device)
    return per_block.repeat_interleave(block_size, dim=1)[:, :frames]


def context_noise(x0: Tensor, max_sigma: float, shard: BatchShard = SINGLE) -> tuple[Tensor, Tensor]:
    """x0 (B,T,C,h,w) -> (x_clean noised per frame with sigma_c ~ U[0, max_sigma], sigma_c (B,T)).

    Under torchrun x0 is this rank's rows of the global batch; `shard` draws the noise for the global
    batch and keeps the same rows."""
    sigma_c = shard.rand(tuple(x0.shape[:2]), x0.device) * max_sigma
    return add_noise(x0, shard.randn_like(x0), sigma_c), sigma_c


def teacher_forcing_loss(model: WorldDiT, x0: Tensor, pose: Tensor, *, sigma_noisy: Tensor, eps: Tensor,
                         x_clean: Tensor, sigma_clean: Tensor, block_size: int, pose_keep: Tensor | None) -> Tensor:
    """Flow loss of the noisy half of [clean | noisy]: all (B,T,...) -> scalar."""
    v = model.forward_teacher_forcing(x_clean, sigma_clean, add_noise(x0, eps, sigma_noisy), sigma_noisy, pose,
                                      block_size=block_size, pose_keep=pose_keep)
    return flow_loss(v, x0, eps)


class ARDiffusionStage(DiTStage):
    """Teacher forcing with context-noise augmentation; needs stage.init (teacher weights)."""

    name = "ar_diffusion"
    init_required = True

    def loss(self, x0: Tensor, pose: Tensor) -> Tensor:
        B, T = x0.shape[:2]
        # Every draw is for the global batch, this rank's rows kept (distributed.BatchShard).
        x_clean, sigma_clean = context_noise(x0, self.flow.context_noise_max, self.shard)
        sigma = self.shard.draw(lambda n: block_sigma(n, T, self.block_size, self.flow.shift, x0.device), B)
        keep = self.shard.draw(lambda n: draw_pose_keep(n, T, self.flow.pose_dropout, x0.device), B)
        return teacher_forcing_loss(self.online, x0, pose, sigma_noisy=sigma, eps=self.shard.randn_like(x0),
                                    x_clean=x_clean, sigma_clean=sigma_clean, block_size=self.block_size,
                                    pose_keep=keep)
