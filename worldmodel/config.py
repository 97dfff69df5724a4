"""Typed configs for every part of the pipeline, a strict YAML loader and `key=value` overrides.

Every default lives in a dataclass here; code below receives values, never a config to dig in.
A run's YAML file holds a subset of `RunConfig`; an unknown key is an error that names the key
and the section it was found in.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class AutoencoderConfig:
    """Per-frame conv autoencoder: 8x spatial compression, no temporal compression."""

    image_channels: int = 3
    latent_channels: int = 16
    base_channels: int = 64
    """Channels at full resolution; doubled at each of the three downsamplings (capped at 4x)."""
    blocks_per_level: int = 1
    """Residual blocks per resolution level in the encoder and the decoder."""
    decoder_base_channels: int = 32
    """The decoder runs every displayed frame on a 2-core CPU, so it may be thinner than the encoder."""

    def __post_init__(self) -> None:
        if self.latent_channels <= 0 or self.base_channels <= 0:
            raise ValueError("autoencoder latent_channels and base_channels must be positive")


@dataclass
class DiTConfig:
    """Pose-conditioned diffusion transformer over latent tokens, frame-major."""

    latent_channels: int = 16
    latent_height: int = 12
    latent_width: int = 16
    patch_size: int = 2
    dim: int = 384
    depth: int = 8
    heads: int = 6
    mlp_ratio: float = 4.0
    pose_dim: int = 5
    """(forward, strafe, up, dyaw, dpitch) of the camera, relative to the previous frame, normalised."""
    rope_theta: float = 10000.0
    qk_norm: bool = True
    prev_frame_input: bool = True
    """Each frame's patch embedding also reads the previous frame's latent (channel-concatenated; zeros
    before the first frame), the copy-and-warp path that next-frame prediction mostly is (GameNGen and
    DIAMOND concatenate past frames the same way). Without it the network must learn to copy through
    attention, which a few minutes of training do not reach (DESIGN §5: below copy-last)."""

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dit dim={self.dim} is not divisible by heads={self.heads}")
        head_dim = self.dim // self.heads
        if head_dim % 4:
            # RoPE splits each head over (frame, row, col); every axis needs an even share.
            raise ValueError(f"dit head_dim={head_dim} must be divisible by 4 for 3-axis RoPE")
        if self.latent_height % self.patch_size or self.latent_width % self.patch_size:
            raise ValueError(
                f"latent {self.latent_height}x{self.latent_width} not divisible by patch_size={self.patch_size}"
            )

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // self.patch_size) * (self.latent_width // self.patch_size)


@dataclass
class FlowConfig:
    """Rectified-flow schedule: x_t = (1 - s) x0 + s eps, the network predicts v = eps - x0."""

    shift: float = 3.0
    """Timestep shift s' = k s / (1 + (k - 1) s); k > 1 spends more steps at high noise."""
    grid_size: int = 48
    """Timesteps in the teacher's Euler grid and in Causal CD's discretisation."""
    context_noise_max: float = 0.1
    """Upper bound of the noise level drawn for context frames in training (GameNGen-style augmentation)."""
    context_noise_inference: float = 0.0
    """Noise level at which generated frames are written to the cache (the network sees it as an input)."""
    pose_dropout: float = 0.1
    """Probability that a clip's pose condition is replaced by the null embedding (for guidance)."""
    guidance: float = 1.0
    """Guidance scale on the pose condition for the teacher in distillation (1.0 = none)."""


@dataclass
class DataConfig:
    frame_height: int = 96
    frame_width: int = 128
    clip_frames: int = 8
    """Frames per training clip (T)."""
    batch_size: int = 32
    """Clips per optimiser step over ALL processes: under torchrun each of N ranks loads batch_size / N."""
    num_workers: int = 2


@dataclass
class GeneratorConfig:
    """Streaming inference: step counts, block size and the bounded KV cache."""

    steps: int = 2
    first_frame_steps: int = 4
    block_size: int = 1
    """Frames generated per AR step: 1 = frame-wise, 3 = chunk-wise."""
    cache_frames: int = 16
    """Frames of keys/values kept (sinks included); RoPE positions are relative to this window."""
    sink_frames: int = 1
    context_frames: int = 4
    """Ground-truth frames given to reset()."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 200
    """For the first ema_start steps the EMA is copied outright from the online model."""
    lr_schedule: str = "constant"
    """After the linear warm-up: "constant" or "cosine" (down to min_lr_ratio * lr at stage.steps)."""
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")


@dataclass
class StageConfig:
    """What one training stage runs; fields a stage does not use are ignored by it."""

    steps: int = 10000
    log_every: int = 50
    eval_every: int = 1000
    checkpoint_every: int = 500
    bf16: bool = True
    """bf16 autocast on CUDA (fp32 master weights and optimiser state always)."""
    compile: bool = False
    block_size: int = 1
    """Attention block of the causal stages: 1 = frame-wise, 3 = chunk-wise."""
    student_steps: int = 2
    """Few-step schedule of the student (DMD rollout and Causal ODE targets)."""
    critic_steps: int = 5
    """DMD: critic updates per generator update."""
    critic_lr: float = 1e-4
    dmd_t_min: float = 0.02
    dmd_t_max: float = 0.98
    ode_samples: int = 256
    """Causal ODE: clips whose teacher trajectories are generated and stored."""
    ode_pairs_dir: str = ""
    """Causal ODE: where the stored trajectories persist (resumable); empty = OUT/ode_pairs of the run."""
    teacher: str = ""
    """Checkpoint of the frozen teacher (path); stages that need one fail clearly without it."""
    init: str = ""
    """Checkpoint the stage's network starts from (path)."""
    autoencoder: str = ""
    """Autoencoder checkpoint whose encoder makes latents for the latent stages."""
    sigma_per_frame: float = 0.5
    """Teacher: probability that a clip draws one noise level per frame instead of one for the clip
    (per-frame levels let the bidirectional teacher denoise a frame beside clean context frames)."""
    cache_latents: bool = True
    """Latent stages: before training, encode every frame of the training split once into a table on the
    device (the encoder is frozen); batches then carry clip positions, not frames. false: encode each
    batch's frames as it comes."""
    channels_last: bool = True
    """Autoencoder stage on CUDA: convolutions in channels_last (NHWC) memory format (ignored on the CPU)."""
    time_limit: float = 0.0
    """Seconds of training for this stage over all its segments (worldmodel.build); 0 = no cap. When it is
    reached the stage counts as done even if stage.steps is not reached (the lr schedule still spans
    stage.steps)."""
    ae_edge_weight: float = 0.0
    """Autoencoder: weight of an L1 loss on image gradients (sharper edges); 0 disables it."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimiser states over the GPUs (FSDP2 full-shard)
    instead of replicating them (DDP); for networks that do not fit one GPU. Same results, more traffic."""


@dataclass
class RunConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to a field's annotated type, or raise naming the field."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float, str):
        try:
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are errors that name the section."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        path, raw = item.split("=", 1)
        node = data
        keys = path.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from YAML (or defaults when path is None) plus `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data, where=str(path) if path else "config")


def config_from_json(text: str) -> RunConfig:
    return from_dict(RunConfig, json.loads(text))


def diff_configs(expected: Any, found: Any, prefix: str = "") -> list[str]:
    """Human-readable list of fields where two configs (dataclasses or dicts) differ."""
    a = dataclasses.asdict(expected) if dataclasses.is_dataclass(expected) else expected
    b = dataclasses.asdict(found) if dataclasses.is_dataclass(found) else found
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, f"{prefix}{key}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and list(va) == list(vb or [])):
            out.append(f"{prefix}{key}: {vb!r} != {va!r}")
    return out
