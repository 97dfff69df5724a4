"""The student's few-step self-rollout with its KV cache, over latents, for DMD (DESIGN §4 stage 4).

Why not `worldmodel.inference.StreamingGenerator`: the generator serves players (uint8 frames in and
out through the autoencoder, raw pose deltas, everything under no_grad, one frame handed out per call),
while DMD needs latents in and out and a gradient policy per denoising step: ONE exit step (drawn per
iteration, shared by every block) runs with autograd, the earlier steps run under no_grad and every
cache write is detached. So this is a function over tensors built from the same pieces the generator
uses: `WorldDiT.new_cache / forward_cached` and flow.py's `add_noise / x0_from_v` with the inference
step list (`flow.step_sigmas`), following the inference recipe of DESIGN §4: per block start from noise,
predict x0 at each level and re-noise it with fresh noise to the next, then one pass at the context
level writes the clean block into the cache.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from worldmodel.diffusion.flow import add_noise, x0_from_v
from worldmodel.models.attention import KVCache

Tensor = torch.Tensor
NoiseFn = Callable[[tuple[int, ...]], Tensor]  # shape -> standard normal noise (a seeded generator in tests)


def _cached_x0(model: nn.Module, x: Tensor, sigma: float, pose: Tensor, cache: KVCache, write: bool) -> Tensor:
    """One block x (B,Tb,C,h,w) at noise `sigma` -> x0 prediction (fp32 even under autocast)."""
    s = torch.full(x.shape[:2], float(sigma), device=x.device)
    v = model.forward_cached(x, s, pose, cache, write=write)
    return x0_from_v(x, v.float(), float(sigma))


@torch.no_grad()
def write_clean(model: nn.Module, x: Tensor, pose: Tensor, cache: KVCache, *, context_sigma: float,
                noise_fn: NoiseFn | None = None) -> None:
    """Write clean frames x (B,Tb,...) into the cache at the context noise level (always detached).

    At context_sigma > 0 the frames are noised to that level first, so what the network reads as
    "context at level s" is what it was trained on (stage 2's context-noise augmentation).
    """
    x = x.detach()
    if context_sigma > 0:
        x = add_noise(x, noise_fn(tuple(x.shape)) if noise_fn else torch.randn_like(x), context_sigma)
    _cached_x0(model, x, context_sigma, pose, cache, True)


def write_context(model: nn.Module, x_ctx: Tensor, pose_ctx: Tensor, cache: KVCache, *, block_size: int,
                  context_sigma: float, noise_fn: NoiseFn | None = None) -> None:
    """Ground-truth context x_ctx (B,T0,...) into the cache block by block (block-causal, as trained)."""
    for a in range(0, x_ctx.shape[1], block_size):
        write_clean(model, x_ctx[:, a : a + block_size], pose_ctx[:, a : a + block_size], cache,
                    context_sigma=context_sigma, noise_fn=noise_fn)


def self_rollout(
    model: nn.Module,
    x_ctx: Tensor,
    pose: Tensor,
    *,
    sigmas: list[float],
    exit_step: int | None,
    block_size: int,
    cache_frames: int,
    sink_frames: int,
    context_sigma: float = 0.0,
    grad: bool = True,
    noise_fn: NoiseFn | None = None,
) -> Tensor:
    """Generate the frames after a ground-truth context, block by block, with the student's KV cache.

    x_ctx: (B, T0, C, h, w) clean context latents; pose: (B, T, 5) normalised for the WHOLE clip
    (frames T0..T-1 condition the generated frames). sigmas: the student's few-step list (flow.step_sigmas).
    exit_step: index into sigmas where every block stops and returns its x0 prediction; only that
    network call carries gradient (when grad=True); None = run every step (inference). Returns the
    generated latents (B, T - T0, C, h, w).
    """
    B, T0 = x_ctx.shape[:2]
    T = pose.shape[1]
    if T0 % block_size or (T - T0) % block_size or T <= T0:
        raise ValueError(
            f"self_rollout: context {T0} and generated {T - T0} frames must be positive multiples of "
            f"block_size={block_size}; change generator.context_frames or data.clip_frames"
        )
    last = len(sigmas) - 1 if exit_step is None else exit_step
    if not 0 <= last < len(sigmas):
        raise ValueError(f"self_rollout: exit_step {exit_step} outside the {len(sigmas)}-step list {sigmas}")
    noise_fn = noise_fn or (lambda shape: torch.randn(shape, device=x_ctx.device))
    cache = model.new_cache(B, cache_frames, sink_frames, x_ctx.device, torch.float32)
    write_context(model, x_ctx, pose[:, :T0], cache, block_size=block_size, context_sigma=context_sigma,
                  noise_fn=noise_fn)
    blocks = []
    for a in range(T0, T, block_size):
        pose_blk = pose[:, a : a + block_size]
        x = noise_fn((B, block_size) + tuple(x_ctx.shape[2:]))
        for k in range(last + 1):
            # Only the exit step builds a graph: the earlier steps are the "free" part of the trajectory.
            with torch.set_grad_enabled(grad and k == last):
                x0 = _cached_x0(model, x, sigmas[k], pose_blk, cache, False)
            if k < last:
                x = add_noise(x0.detach(), noise_fn(x.shape), sigmas[k + 1])
        blocks.append(x0)
        write_clean(model, x0, pose_blk, cache, context_sigma=context_sigma, noise_fn=noise_fn)
    return torch.cat(blocks, dim=1)
