"""What the distillation stages (Causal CD, Causal ODE, DMD) share: closures, loading, batches.

Every distillation stage evaluates networks through the teacher-forcing forward with one clean context
(Causal CD/ODE) or bidirectionally over a whole clip (DMD); the closures below bind that context once so
the losses are functions over tensors and closures, as the samplers in `worldmodel.diffusion.flow` are.
Closures here take a PER-SAMPLE noise level `sigma (B,)` (a clip has one t for all its noisy frames),
unlike flow.py's float-sigma closures.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from worldmodel.config import RunConfig
from worldmodel.diffusion.flow import guided, x0_from_v
from worldmodel.models.dit import WorldDiT
from worldmodel.training.batches import LatentBatcher
from worldmodel.training.registry import load_frozen, load_into, require_checkpoint
from worldmodel.training.teacher import make_batcher  # noqa: F401  (the distillation stages import it from here)

Tensor = torch.Tensor
# fn(x_noisy (B,T,C,h,w), sigma (B,)) -> v or x0 (B,T,C,h,w)
ClipFn = Callable[[Tensor, Tensor], Tensor]


def per_frame(sigma: Tensor, frames: int) -> Tensor:
    """sigma (B,) -> (B, T): one noise level for every frame of a clip."""
    return sigma.float()[:, None].expand(-1, frames)


def teacher_forced_v(
    model: nn.Module, x_clean: Tensor, sigma_clean: Tensor, pose: Tensor, *, block_size: int,
    guidance: float = 1.0,
) -> ClipFn:
    """v closure over the noisy half of `forward_teacher_forcing`, context bound; pose guidance optional.

    guidance 1.0 skips the unconditional pass; otherwise the null pose (pose_keep=False on every frame,
    the stage-1/2 pose dropout is per clip) gives v_uncond and v = v_u + g (v_c - v_u).
    """
    B, T = x_clean.shape[:2]
    keep = torch.ones(B, T, dtype=torch.bool, device=x_clean.device)

    def run(x: Tensor, sigma: Tensor, pose_keep: Tensor) -> Tensor:
        v = model.forward_teacher_forcing(
            x_clean, sigma_clean, x, per_frame(sigma, T), pose, block_size=block_size, pose_keep=pose_keep
        )
        return v.float()  # bf16 under the loop's autocast; losses and ODE steps in fp32

    def v_fn(x: Tensor, sigma: Tensor) -> Tensor:
        v_c = run(x, sigma, keep)
        if guidance == 1.0:
            return v_c
        return guided(v_c, run(x, sigma, ~keep), guidance)

    return v_fn


def x0_closure(v_fn: ClipFn) -> ClipFn:
    """x0 prediction from a v closure (the parameterisation of DESIGN §3: x0 = x_t - sigma v)."""
    return lambda x, sigma: x0_from_v(x, v_fn(x, sigma), sigma)


def load_teacher(cfg: RunConfig, device: torch.device, pose_stats: dict[str, Any] | None, stage: str) -> nn.Module:
    """The frozen teacher of cfg.stage.teacher (fp32, eval, no grad)."""
    return load_frozen(cfg.stage.teacher, WorldDiT(cfg.dit), {"dit": cfg.dit}, "teacher", stage, device, pose_stats)


def load_trainable(path: str, field: str, cfg: RunConfig, device: torch.device,
                   pose_stats: dict[str, Any] | None, stage: str) -> nn.Module:
    """A trainable fp32 WorldDiT initialised from `path` (cfg.stage.<field>)."""
    model = WorldDiT(cfg.dit)
    load_into(require_checkpoint(path, field, stage), model, {"dit": cfg.dit}, pose_stats)
    return model.to(device).train()


def latent_batch(batch: dict[str, Tensor], batcher: LatentBatcher | None,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """(x0 (B,T,C,h,w), pose (B,T,5) normalised) from a latent batch or, through the batcher, a raw one
    (frames, or clip positions into the batcher's latent table)."""
    if "x0" in batch:
        return batch["x0"].to(device).float(), batch["pose"].to(device).float()
    if batcher is None:
        raise ValueError("batch has no latents (x0) but the stage has no autoencoder: set stage.autoencoder=PATH")
    out = batcher(batch)
    return out["x0"], out["pose"]
