"""Per-frame ResNet-style conv autoencoder: 8x spatial compression (three stride-2 stages), no temporal
compression, so one autoregressive step is one displayed frame.

The decoder runs on every displayed frame (on a 2-core CPU in the product), so it has its own, usually
thinner, channel width. Latents are divided by `latent_scale` (set from data statistics when AE training
ends) so that the DiT sees roughly unit variance.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from worldmodel.config import AutoencoderConfig

Tensor = torch.Tensor
LEVELS = 3  # stride-2 stages -> 8x


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


def level_channels(base: int) -> list[int]:
    """Channels at resolutions 1, 1/2, 1/4, 1/8: doubled per downsampling, capped at 4x base."""
    return [base * min(2**i, 4) for i in range(LEVELS + 1)]


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch = level_channels(cfg.base_channels)
        layers: list[nn.Module] = [nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)]
        for i in range(LEVELS + 1):
            layers += [ResBlock(ch[i], ch[i]) for _ in range(cfg.blocks_per_level)]
            if i < LEVELS:
                layers.append(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1))
        layers += [_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch = level_channels(cfg.decoder_base_channels)[::-1]  # 1/8 -> 1
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)]
        for i in range(LEVELS + 1):
            layers += [ResBlock(ch[i], ch[i]) for _ in range(cfg.blocks_per_level)]
            if i < LEVELS:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i], ch[i + 1], 3, padding=1)]
        layers += [_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.image_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    """encode: (N, 3, H, W) in [-1, 1] -> z (N, C, H/8, W/8) scaled; decode: z -> (N, 3, H, W), ~[-1, 1].

    decode does not clamp (the reconstruction loss sees the raw output); clamp before display.
    """

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latent_scale", torch.tensor(1.0))

    def set_latent_scale(self, std: float | Tensor) -> None:
        """Record the std of raw latents over data so that encode() returns unit-variance latents."""
        std = float(std)
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"latent std must be positive and finite, got {std}")
        self.latent_scale.fill_(std)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.image_channels or x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(
                f"Autoencoder.encode expects (N, {self.cfg.image_channels}, H, W) with H, W multiples of 8, "
                f"got {tuple(x.shape)}"
            )

    def encode_raw(self, x: Tensor) -> Tensor:
        """Unscaled latents (for measuring the latent std)."""
        self._check(x)
        return self.encoder(x)

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_raw(x) / self.latent_scale.to(x.dtype)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z * self.latent_scale.to(z.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction (N, 3, H, W)."""
        return self.decode(self.encode(x))

    def num_params(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder), "decoder": count(self.decoder)}


def frames_to_tensor(frames: Tensor) -> Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    return frames.movedim(-1, -3).float().div(127.5).sub(1.0)


def tensor_to_frames(x: Tensor) -> Tensor:
    """float (..., 3, H, W) in ~[-1, 1] -> uint8 (..., H, W, 3), clamped and rounded."""
    return x.float().add(1.0).mul(127.5).clamp(0, 255).round().to(torch.uint8).movedim(-3, -1)
