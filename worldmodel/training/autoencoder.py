"""Stage 0: the per-frame autoencoder (DESIGN §3), L1 + MSE reconstruction (+ optional edge term).

Every frame of every clip in the batch is one training image. The latent std is tracked during
training (a running mean of the raw latents' variance, kept on the device) and written into
`latent_scale` at export, so the DiT stages see unit-variance latents without an extra pass over the
data. Scaling is a pure reparameterisation (encode divides, decode multiplies), so setting it never
changes a reconstruction. On CUDA the convolutions run in channels_last (NHWC, `stage.channels_last`)
under the loop's bf16 autocast; weights stay fp32, and exports are written contiguous as always.
"""

from __future__ import annotations

from typing import Any

import torch

from worldmodel.config import RunConfig
from worldmodel.metrics import psnr
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.training.batches import frames_to_float
from worldmodel.training.stage import EMA, Logs, Stage, make_optimizer, optimizer_step

Tensor = torch.Tensor


def image_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (N, C, H, W) -> horizontal (N,C,H,W-1) and vertical (N,C,H-1,W) finite differences."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def reconstruction_loss(recon: Tensor, target: Tensor, edge_weight: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """recon, target (N, 3, H, W) in [-1, 1] -> (L1 + MSE [+ w * L1 of image gradients], parts)."""
    recon, target = recon.float(), target.float()
    l1 = (recon - target).abs().mean()
    mse = (recon - target).pow(2).mean()
    loss = l1 + mse
    parts = {"l1": l1, "mse": mse}
    if edge_weight > 0:
        (rx, ry), (tx, ty) = image_gradients(recon), image_gradients(target)
        edge = (rx - tx).abs().mean() + (ry - ty).abs().mean()
        loss = loss + edge_weight * edge
        parts["edge"] = edge
    return loss, parts


class AutoencoderStage(Stage):
    """Trains `Autoencoder(cfg.autoencoder)` from scratch; exports the EMA with latent_scale set."""

    name = "autoencoder"

    def __init__(self, cfg: RunConfig, device: torch.device, pose_stats: dict[str, Any] | None):
        oc = cfg.optim
        self.pose_stats = pose_stats
        self.online = Autoencoder(cfg.autoencoder).to(device)
        # NHWC convolutions are cuDNN's fast bf16 path; the EMA copy and the optimiser state follow the layout.
        self.channels_last = cfg.stage.channels_last and torch.device(device).type == "cuda"
        if self.channels_last:
            self.online.to(memory_format=torch.channels_last)
        self.ema = EMA(self.online, oc.ema_decay, oc.ema_start)
        self.optimizers = {"autoencoder": make_optimizer(self.online.parameters(), oc.lr, oc.betas, oc.weight_decay)}
        self.grad_clip = oc.grad_clip
        self.edge_weight = cfg.stage.ae_edge_weight
        # Running mean of E[z^2] - E[z]^2 of raw latents; what latent_scale is set from at export. On the
        # training device: updating a host copy would wait for the GPU every step.
        self.latent_var = torch.zeros((), dtype=torch.float64, device=device)
        self.latent_batches = 0

    def step(self, batch: dict[str, Tensor], step: int) -> Logs:
        x = frames_to_float(batch["frames"]).flatten(0, 1)  # (B*T, 3, H, W)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.online.train()
        z = self.online.encode_raw(x)
        recon = self.online.decoder(z)
        loss, parts = reconstruction_loss(recon, x, self.edge_weight)
        grad_norm = optimizer_step(loss, self.online, self.optimizers["autoencoder"], self.grad_clip)
        with torch.no_grad():
            # Recent batches weigh more (the encoder drifts), but early ones still count until 100 batches.
            rate = max(1.0 / (self.latent_batches + 1), 0.01)
            self.latent_var += rate * (z.detach().float().var().double() - self.latent_var)
            self.latent_batches += 1
            out = {"loss": loss.detach(), "psnr": psnr(recon.detach().clamp(-1, 1), x).mean(), "grad_norm": grad_norm}
        return out | {k: v.detach() for k, v in parts.items()}

    def on_export(self) -> dict[str, Any]:
        std = float(self.latent_var.sqrt()) if self.latent_batches else 1.0
        for model in (self.online, self.ema.model):
            model.set_latent_scale(std)
        return {"latent_scale": std}

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"latent_var": self.latent_var.clone(), "latent_batches": self.latent_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.channels_last:
            match_layouts(self.optimizers["autoencoder"])
        self.latent_var = state["latent_var"].double().to(self.latent_var.device)
        self.latent_batches = int(state["latent_batches"])


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimiser state tensor its parameter's memory layout (a state saved from an NCHW run,
    e.g. on the CPU, resumed in channels_last): the fused AdamW update walks tensors as flat memory."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


@torch.no_grad()
def reconstruction_psnr(autoencoder: Autoencoder, frames: Tensor, chunk: int = 64) -> Tensor:
    """uint8 frames (N, H, W, 3) -> per-frame PSNR (N,) of encode -> decode (for eval and reports)."""
    x = frames_to_float(frames)
    out = [psnr(autoencoder(part).clamp(-1, 1), part) for part in x.split(chunk)]
    return torch.cat(out)

