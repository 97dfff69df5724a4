"""From a data batch (uint8 frames, raw pose deltas) to what the latent stages train on.

`LatentBatcher` runs the frozen autoencoder's encoder once per batch (no grad, bf16 autocast on CUDA)
and normalises the pose deltas with the dataset statistics, so every latent stage (teacher, AR
diffusion, Causal CD/ODE, DMD) sees the same `x0`/`pose` tensors and none of them repeats this code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor


def frames_to_float(frames: Tensor) -> Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames_to_float expects uint8 frames (..., H, W, 3), got {frames.dtype}")
    return frames.movedim(-1, -3).float().div(127.5).sub(1.0)


def float_to_frames(x: Tensor) -> Tensor:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3) (clamped, rounded)."""
    return x.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1)


def normalize_pose(deltas: Tensor, pose_stats: dict[str, Any]) -> Tensor:
    """Raw deltas (..., 5) -> (delta - mean) / std with the manifest's per-dimension statistics."""
    mean = torch.as_tensor(pose_stats["mean"], dtype=torch.float32, device=deltas.device)
    std = torch.as_tensor(pose_stats["std"], dtype=torch.float32, device=deltas.device)
    if mean.shape[-1] != deltas.shape[-1]:
        raise ValueError(f"pose_stats have {mean.shape[-1]} dimensions, deltas have {deltas.shape[-1]}")
    return (deltas.float() - mean) / std.clamp_min(1e-6)


def check_pose_stats(pose_stats: dict[str, Any] | None, where: str) -> dict[str, list[float]]:
    if not pose_stats or "mean" not in pose_stats or "std" not in pose_stats:
        raise ValueError(f"{where}: pose_stats {{mean, std}} are missing; they come from the data manifest")
    return {"mean": [float(v) for v in pose_stats["mean"]], "std": [float(v) for v in pose_stats["std"]]}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA only (CPU bf16 is slow and not what we measured)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and torch.device(device).type == "cuda")


@torch.no_grad()
def encode_frames(autoencoder: nn.Module, x: Tensor, chunk: int = 256, bf16: bool = True) -> Tensor:
    """x (B, T, 3, H, W) in [-1, 1] -> scaled latents (B, T, C, h, w), float32, encoded in chunks."""
    b, t = x.shape[:2]
    flat = x.flatten(0, 1)
    with autocast(x.device, bf16):
        z = torch.cat([autoencoder.encode(part) for part in flat.split(chunk)])
    return z.float().unflatten(0, (b, t))


@torch.no_grad()
def decode_latents(autoencoder: nn.Module, z: Tensor, chunk: int = 256, bf16: bool = True) -> Tensor:
    """z (B, T, C, h, w) scaled latents -> frames float (B, T, 3, H, W) in [-1, 1]."""
    b, t = z.shape[:2]
    with autocast(z.device, bf16):
        x = torch.cat([autoencoder.decode(part) for part in z.flatten(0, 1).split(chunk)])
    return x.float().unflatten(0, (b, t))


class LatentBatcher:
    """Turn `{"frames": uint8 (B,T,H,W,3), "deltas": (B,T,5) raw}` into latent-stage inputs.

    Returns `{"x0": (B,T,C,h,w) scaled latents, "pose": (B,T,5) normalised}` plus
    `"frames": (B,T,3,H,W) in [-1,1]` when `keep_frames`. The autoencoder is frozen and in eval mode.
    """

    def __init__(self, autoencoder: nn.Module, pose_stats: dict[str, Any], device: torch.device | str,
                 *, keep_frames: bool = False, bf16: bool = True, cache: bool = False):
        self.device = torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        self.pose_stats = check_pose_stats(pose_stats, "LatentBatcher")
        self.keep_frames = keep_frames
        self.bf16 = bf16
        self.cache = LatentCache() if cache else None

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        frames = batch["frames"].to(self.device, non_blocking=True)
        if frames.ndim != 5:
            raise ValueError(f"LatentBatcher expects frames (B,T,H,W,3), got shape {tuple(frames.shape)}")
        x = frames_to_float(frames)  # (B, T, 3, H, W)
        if self.cache is not None and "episode" in batch and "start" in batch:
            x0 = self.cache.lookup(batch["episode"], batch["start"], x,
                                   lambda xs: encode_frames(self.autoencoder, xs[None], bf16=self.bf16)[0])
        else:
            x0 = encode_frames(self.autoencoder, x, bf16=self.bf16)
        out = {
            "x0": x0,
            "pose": normalize_pose(batch["deltas"].to(self.device, non_blocking=True), self.pose_stats),
        }
        if self.keep_frames:
            out["frames"] = x
        return out


class LatentCache:
    """Latents of every (episode, frame) seen so far, on the training device.

    The encoder is frozen, so a frame's latent never changes: encoding it once instead of in every
    clip that contains it removes what dominated a teacher step on the GPU (the 96x128 conv encoder
    over B*T frames cost more than the DiT). Size: C*h*w floats per frame of the data (~12 KB at 16x12x16).
    """

    def __init__(self):
        self.rows: dict[int, int] = {}
        self.store: Tensor | None = None  # (capacity, C, h, w)

    def lookup(self, episode: Tensor, start: Tensor, x: Tensor, encode) -> Tensor:
        """episode, start (B,); x (B,T,3,H,W) the clip frames; encode(frames (N,3,H,W)) -> (N,C,h,w)."""
        B, T = x.shape[:2]
        keys = ((episode.long().cpu()[:, None] << 32) + start.long().cpu()[:, None] + torch.arange(T)).flatten().tolist()
        new = {}
        for i, k in enumerate(keys):
            if k not in self.rows and k not in new:
                new[k] = i
        if new:
            z = encode(x.flatten(0, 1)[list(new.values())])
            self._grow(len(self.rows) + len(new), z)
            base = len(self.rows)
            self.store[base : base + len(new)] = z
            self.rows.update({k: base + j for j, k in enumerate(new)})
        idx = torch.tensor([self.rows[k] for k in keys], device=self.store.device)
        return self.store[idx].float().unflatten(0, (B, T))

    def _grow(self, needed: int, like: Tensor) -> None:
        if self.store is None:
            self.store = like.new_empty((max(needed, 1024), *like.shape[1:]))
        elif needed > len(self.store):
            bigger = self.store.new_empty((max(needed, 2 * len(self.store)), *self.store.shape[1:]))
            bigger[: len(self.store)] = self.store
            self.store = bigger
