"""Stage name -> Stage class (imported lazily), and the checkpoint loading every stage shares.

A stage constructor is `StageClass(cfg: RunConfig, device, pose_stats)`; it loads the checkpoints
it needs from `cfg.stage.autoencoder` / `cfg.stage.teacher` / `cfg.stage.init` through the helpers
below, which fail with an error that names the config field, the file and the command that makes it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import torch

from worldmodel.checkpoint import CheckpointError, load_weights, read_meta, weights_exist, weights_paths
from worldmodel.config import RunConfig

# name -> "module:Class"; imported on first use so `--help` and the CPU tests stay light.
_STAGE_PATHS = {
    "autoencoder": "worldmodel.training.autoencoder:AutoencoderStage",
    "teacher": "worldmodel.training.teacher:TeacherStage",
    "ar_diffusion": "worldmodel.training.ar_diffusion:ARDiffusionStage",
    "causal_cd": "worldmodel.training.causal_cd:CausalCDStage",
    "causal_ode": "worldmodel.training.causal_ode:CausalODEStage",
    "dmd": "worldmodel.training.dmd:DMDStage",
}

# What each stage needs and makes (for `python -m worldmodel.train --help` and docs/TRAINING.md).
STAGE_HELP = {
    "autoencoder": "per-frame 8x conv autoencoder, L1+MSE; exports autoencoder.safetensors (latent_scale set).",
    "teacher": "bidirectional pose-conditioned flow-matching DiT; needs stage.autoencoder=PATH.",
    "ar_diffusion": "teacher forcing, block-causal (stage.block_size); needs stage.autoencoder, stage.init=teacher.",
    "causal_cd": "causal consistency distillation; needs stage.autoencoder, stage.teacher=ar_diffusion weights.",
    "causal_ode": "causal ODE init (baseline); needs stage.autoencoder, stage.teacher=ar_diffusion weights.",
    "dmd": "asymmetric DMD with self-rollout; needs stage.autoencoder, stage.teacher=teacher, stage.init=student.",
}

# Which earlier stage writes the checkpoint a field points to (named in error messages).
_MADE_BY = {"autoencoder": "autoencoder", "teacher": "teacher or ar_diffusion", "init": "an earlier stage"}


def _lazy(spec: str) -> Callable[[], type]:
    def load() -> type:
        module, cls = spec.split(":")
        return getattr(importlib.import_module(module), cls)

    return load


STAGES: dict[str, Callable[[], type]] = {name: _lazy(spec) for name, spec in _STAGE_PATHS.items()}


def stage_class(name: str) -> type:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return STAGES[name]()


def build_stage(name: str, cfg: RunConfig, device: torch.device | str, pose_stats: dict[str, Any] | None):
    """Construct stage `name`; it loads its frozen/init checkpoints from cfg.stage paths."""
    return stage_class(name)(cfg, torch.device(device), pose_stats)


def require_checkpoint(path: str, field: str, stage: str) -> Path:
    """The weights path in `cfg.stage.<field>`, or an error naming the field and what produces it."""
    if not path:
        raise CheckpointError(
            f"stage {stage} needs stage.{field}=PATH (weights written by the {_MADE_BY.get(field, field)} "
            f"stage, e.g. runs/X/{field if field != 'init' else 'teacher'}.safetensors); pass it as an override"
        )
    st_path, json_path = weights_paths(path)
    for p, there in ((st_path, weights_exist(st_path)), (json_path, json_path.is_file())):  # weights: or its parts
        if not there:
            raise CheckpointError(f"stage {stage}: stage.{field}={path} -> {p} does not exist")
    return st_path


def load_frozen(path: str, module: torch.nn.Module, expected: dict[str, Any], field: str, stage: str,
                device: torch.device, pose_stats: dict[str, Any] | None = None) -> torch.nn.Module:
    """Load weights (fp32) into `module`, check config sections and pose statistics, freeze it."""
    st_path = require_checkpoint(path, field, stage)
    load_into(st_path, module, expected, pose_stats)
    return module.to(device).eval().requires_grad_(False)


def load_into(path: str | Path, module: torch.nn.Module, expected: dict[str, Any],
              pose_stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load weights into a trainable module (kept fp32), checking config and pose statistics."""
    meta = read_meta(path)
    if pose_stats is not None and meta.get("pose_stats") not in (None, {}):
        stored = meta["pose_stats"]
        if any(abs(a - b) > 1e-4 * max(1.0, abs(b)) for key in ("mean", "std")
               for a, b in zip(stored[key], pose_stats[key])):
            raise CheckpointError(
                f"checkpoint {path} was trained with pose_stats {stored}, the data has {pose_stats}; "
                "use the same data (manifest) as the earlier stages"
            )
    return load_weights(path, module, expected_config=expected)
