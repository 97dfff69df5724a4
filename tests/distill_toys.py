"""Toy networks with closed-form answers for the distillation tests (Causal CD, Causal ODE, DMD).

`GaussianDenoiser` is the exact rectified-flow denoiser of data x0 ~ N(mu, s^2) (i.i.d. per element),
behind WorldDiT's call signatures (bidirectional forward and the teacher-forcing forward; context and
pose are ignored). With `mu`/`log_s` as parameters it is also a learnable critic.
"""

from __future__ import annotations

import torch
from torch import nn

from synthetic import tiny_config
from worldmodel.models.dit import WorldDiT


def gaussian_x0(x_t: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mu, s^2), x_t = (1 - t) x0 + t eps; sigma broadcast against x_t."""
    a = 1 - sigma
    return mu + a * s**2 / (a**2 * s**2 + sigma**2) * (x_t - a * mu)


class GaussianDenoiser(nn.Module):
    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(float(mu)))
        self.log_s = nn.Parameter(torch.tensor(float(s)).log())
        self.calls = 0

    def v(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sig = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)).clamp_min(1e-4)
        return (x - gaussian_x0(x, sig, self.mu, self.log_s.exp())) / sig

    def forward(self, x, sigma, pose, *, mode="bidirectional", block_size=1, pose_keep=None):
        return self.v(x, torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[:2]))

    def forward_teacher_forcing(self, x_clean, sigma_clean, x_noisy, sigma_noisy, pose, *, block_size=1,
                                pose_keep=None):
        return self.v(x_noisy, torch.as_tensor(sigma_noisy, dtype=x_noisy.dtype).expand(x_noisy.shape[:2]))


def tiny(*overrides: str):
    return tiny_config(*overrides)


def random_dit(cfg, seed: int = 0, scale: float = 0.05) -> WorldDiT:
    """A tiny WorldDiT whose zero-initialised layers are perturbed, so that it outputs something."""
    torch.manual_seed(seed)
    m = WorldDiT(cfg.dit)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))
    return m


def latent_batch(cfg, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """{"x0": (B,T,C,h,w), "pose": (B,T,5)}: a latent batch as the stages' batcher would give."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.dit
    T = cfg.data.clip_frames
    return {"x0": torch.randn(batch_size, T, d.latent_channels, d.latent_height, d.latent_width, generator=g),
            "pose": torch.randn(batch_size, T, d.pose_dim, generator=g)}


def dit_checkpoint(path, cfg, model: WorldDiT, pose_stats, stage: str):
    """Save `model` as stage `stage`'s export (what cfg.stage.teacher / init point to), fp32."""
    from worldmodel.checkpoint import save_weights

    return save_weights(path, model, {"config": cfg.to_dict(), "stage": stage, "step": 0, "pose_stats": pose_stats},
                        dtype=None)


def stage_run_files(root, teacher_stage: str):
    """Tiny synthetic data dir + autoencoder + a random DiT saved as `teacher_stage`'s export, under root:
    what the distillation stages load through the registry. -> (data_dir, pose_stats, ae_path, teacher_path)."""
    from pathlib import Path

    from data_tools.shards import read_manifest
    from synthetic import make_autoencoder_checkpoint, make_data_dir

    root = Path(root)
    d = make_data_dir(root / "data", episodes=3, heldout=1, frames=24)
    stats = read_manifest(d)["pose_stats"]
    cfg = tiny()
    ae = make_autoencoder_checkpoint(root / "autoencoder", cfg, stats)
    teacher = dit_checkpoint(root / teacher_stage, cfg, random_dit(cfg, seed=4), stats, teacher_stage)
    return d, stats, ae, teacher
