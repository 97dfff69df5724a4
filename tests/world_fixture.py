"""A tiny randomly initialised world saved with `save_world`, for the env and play tests (CPU, seconds).

32x48 frames -> 4x6 latents -> 2x3 tokens per frame; a 2-layer DiT; a 4-frame KV cache so rollouts
wrap the ring within a test; 2 start contexts of smooth random frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.poses import integrate_deltas
from worldmodel.config import AutoencoderConfig, DataConfig, DiTConfig, GeneratorConfig, RunConfig

H, W, T0, STARTS = 32, 48, 2, 2


def tiny_config() -> RunConfig:
    return RunConfig(
        autoencoder=AutoencoderConfig(latent_channels=4, base_channels=8, decoder_base_channels=8),
        dit=DiTConfig(latent_channels=4, latent_height=H // 8, latent_width=W // 8, patch_size=2,
                      dim=48, depth=2, heads=2),
        data=DataConfig(frame_height=H, frame_width=W),
        generator=GeneratorConfig(steps=1, first_frame_steps=2, cache_frames=4, sink_frames=1, context_frames=T0),
    )


def tiny_action_model():
    """Hand-made: half the previous delta carries over (momentum) + forward 8, strafe 6, turn 6 deg, look 2 deg."""
    from data_tools.action_model import ActionModel

    B = np.zeros((5, 4))
    B[0, 0], B[1, 1], B[3, 2], B[4, 3] = 8.0, 6.0, 6.0, 2.0
    return ActionModel(A=[0.5, 0.5, 0.0, 0.5, 0.5], B=B, c=np.zeros(5), frame="rotated")


def make_tiny_world(out: Path) -> Path:
    from worldmodel.inference.world import save_world
    from worldmodel.models.autoencoder import Autoencoder
    from worldmodel.models.dit import WorldDiT

    cfg = tiny_config()
    gen = torch.Generator().manual_seed(1234)
    dit, ae = WorldDiT(cfg.dit), Autoencoder(cfg.autoencoder)
    with torch.no_grad():  # the DiT's adaLN-zero init makes its output 0: random weights everywhere instead
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (STARTS, T0, H // 8, W // 8, 3)).astype(np.uint8)
    frames = coarse.repeat(8, axis=2).repeat(8, axis=3)  # blocky but not white noise
    deltas = rng.normal(0, 1, (STARTS, T0, 5)).astype(np.float32)
    deltas[:, 0] = 0
    poses = np.stack([integrate_deltas(rng.normal(0, 100, 5), d) for d in deltas]).astype(np.float32)
    pose_stats = {"mean": [0.0] * 5, "std": [4.0, 4.0, 1.0, 3.0, 1.0]}
    return save_world(out, dit, ae, cfg, pose_stats, tiny_action_model(),
                      {"frames": frames, "deltas": deltas, "poses": poses},
                      provenance={"what": "tiny random test world"}, fps=10.0)


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory) -> Path:
    return make_tiny_world(tmp_path_factory.mktemp("world") / "tiny")


@pytest.fixture(scope="session")
def tiny_world(tiny_world_dir):
    from worldmodel.inference.world import World

    return World.load(tiny_world_dir)
