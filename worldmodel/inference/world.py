"""A packaged world: the weights, configs and start contexts that `play.py` and the envs run from.

Layout of a world directory (default: the package's `worldmodel/weights/`):

    student.safetensors (+ .json)       the few-step WorldDiT (bf16)
    autoencoder.safetensors (+ .json)   the whole autoencoder: decoder for display, encoder for contexts
    world.json                          RunConfig dict, pose_stats, fps, provenance, format_version
    action_model.json                   data_tools.action_model.ActionModel (action -> pose delta)
    start_contexts.npz                  frames uint8 (N,T0,H,W,3), deltas (N,T0,5) raw, poses (N,T0,5)

`save_world` writes all of it; `World.load` checks every file up front and names the one that is
missing or corrupt. Networks are built on first use per (device, dtype) and shared by every generator.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.action_model import ActionModel
from worldmodel.checkpoint import CheckpointError, load_weights, save_weights
from worldmodel.config import RunConfig, from_dict
from worldmodel.inference.batched import BatchedGenerator
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.models.dit import WorldDiT

FORMAT_VERSION = 1
DEFAULT_WORLD_DIR = Path(__file__).resolve().parent.parent / "weights"
FILES = ("student.safetensors", "student.json", "autoencoder.safetensors", "autoencoder.json",
         "world.json", "action_model.json", "start_contexts.npz")
_HOW_TO_GET = ("build a world with `python -m worldmodel.build DATA_DIR --out RUN_DIR` and pass RUN_DIR/world "
               "(--world DIR); if the package shipped weights, reinstall it to restore them")


class WorldError(RuntimeError):
    pass


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The compute dtype a generator on `device` should use when none is given.

    bf16 on CUDA (when the GPU supports it) and on CPUs with bf16 matrix hardware (AMX tiles or
    AVX512-BF16); fp32 elsewhere: on an AVX2-only CPU bf16 convolutions and matmuls are emulated and
    much slower than fp32 (decode ~100x, benchmarks/RESULTS.md "## Speed").
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()):
        return torch.bfloat16
    return torch.float32


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype from its name ("bf16", "float32", ...); None stays None (default_dtype decides later)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class World:
    path: Path
    config: RunConfig
    pose_stats: dict[str, list[float]]
    fps: float
    provenance: dict[str, Any]
    action_model: ActionModel
    start_frames: np.ndarray  # uint8 (N, T0, H, W, 3)
    start_deltas: np.ndarray  # float32 (N, T0, 5) raw
    start_poses: np.ndarray  # float32 (N, T0, 5) absolute (x, y, z, yaw, pitch)
    _modules: tuple[WorldDiT, Autoencoder] | None = field(default=None, repr=False)

    @property
    def num_starts(self) -> int:
        return int(self.start_frames.shape[0])

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return tuple(self.start_frames.shape[2:5])  # (H, W, 3)

    @classmethod
    def load(cls, path: str | Path | None = None) -> World:
        path = Path(path) if path is not None else DEFAULT_WORLD_DIR
        if not path.is_dir():
            raise WorldError(f"world directory {path} does not exist; {_HOW_TO_GET}")
        missing = [name for name in FILES if not (path / name).is_file()]
        if missing:
            raise WorldError(f"world {path} lacks {', '.join(missing)}; {_HOW_TO_GET}")
        info = _read_json(path / "world.json")
        if info.get("format_version", 0) > FORMAT_VERSION:
            raise WorldError(f"{path / 'world.json'} has format_version {info['format_version']}, this code reads "
                             f"up to {FORMAT_VERSION}; update the worldmodel package")
        try:
            config = from_dict(RunConfig, info["config"], where=str(path / "world.json"))
            pose_stats, fps = info["pose_stats"], float(info["fps"])
        except (KeyError, TypeError, ValueError) as err:
            raise WorldError(f"{path / 'world.json'} is malformed ({err}); {_HOW_TO_GET}") from None
        try:
            action_model = ActionModel.from_json((path / "action_model.json").read_text())
        except Exception as err:  # the action model's own parser decides what is malformed
            raise WorldError(f"{path / 'action_model.json'} is malformed ({err}); {_HOW_TO_GET}") from None
        frames, deltas, poses = _read_starts(path / "start_contexts.npz", config)
        return cls(path, config, pose_stats, fps, info.get("provenance", {}), action_model, frames, deltas, poses)

    def modules(self) -> tuple[WorldDiT, Autoencoder]:
        """(dit, autoencoder) on the CPU in fp32, eval mode, loaded once; generators copy them to their
        device and dtype."""
        if self._modules is None:
            dit, ae = WorldDiT(self.config.dit), Autoencoder(self.config.autoencoder)
            try:
                load_weights(self.path / "student", dit, {"dit": self.config.dit})
                load_weights(self.path / "autoencoder", ae, {"autoencoder": self.config.autoencoder})
            except CheckpointError as err:
                raise WorldError(f"{err}; {_HOW_TO_GET}") from None
            self._modules = (dit.eval(), ae.eval())
        return self._modules

    def generator(
        self,
        batch_size: int,
        steps: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> BatchedGenerator:
        """A StreamingGenerator (with per-world noise and reset_rows) for `batch_size` worlds; `steps`
        overrides the shipped denoising steps; device default cuda if available, dtype default
        default_dtype(device) (bf16 where the hardware runs it fast, else fp32); a dtype or its name."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(dtype) or default_dtype(device)
        gen_cfg = self.config.generator
        if steps is not None:
            if steps not in (1, 2, 4):
                raise ValueError(f"denoising steps must be 1, 2 or 4, got {steps}")
            gen_cfg = dataclasses.replace(gen_cfg, steps=steps)
        dit, ae = self.modules()
        # The batch is fixed by the first reset(); batch_size is checked here so that a bad value fails early.
        return BatchedGenerator(dit, ae, self.pose_stats, gen_cfg, self.config.flow, device=device, dtype=dtype)


def save_world(
    out_dir: str | Path,
    dit: torch.nn.Module,
    autoencoder: torch.nn.Module,
    cfg: RunConfig,
    pose_stats: dict[str, Any],
    action_model: ActionModel,
    start_contexts: dict[str, np.ndarray],
    provenance: dict[str, Any],
    fps: float = 35.0,
) -> Path:
    """Write a world directory (bf16 weights) that `World.load(out_dir)` reads back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(start_contexts["frames"])
    deltas = np.asarray(start_contexts["deltas"], dtype=np.float32)
    poses = np.asarray(start_contexts["poses"], dtype=np.float32)
    _check_starts(out / "start_contexts.npz", frames, deltas, poses, cfg)
    pose_stats = {k: [float(v) for v in np.asarray(pose_stats[k]).reshape(-1)] for k in ("mean", "std")}
    meta = {"pose_stats": pose_stats, "provenance": provenance}
    save_weights(out / "student", dit, {**meta, "config": {"dit": dataclasses.asdict(cfg.dit)}})
    ae_meta = {**meta, "config": {"autoencoder": dataclasses.asdict(cfg.autoencoder)}}
    save_weights(out / "autoencoder", autoencoder, ae_meta)
    (out / "action_model.json").write_text(action_model.to_json())
    np.savez(out / "start_contexts.npz", frames=frames, deltas=deltas, poses=poses)
    info = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "pose_stats": pose_stats,
            "fps": float(fps), "provenance": provenance}
    (out / "world.json").write_text(json.dumps(info, indent=2, default=str))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorldError(f"{path} is not valid JSON ({err}); {_HOW_TO_GET}") from None


def _read_starts(path: Path, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(path) as data:
            frames, deltas, poses = data["frames"], data["deltas"].astype(np.float32), data["poses"].astype(np.float32)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise WorldError(f"{path} is corrupt or incomplete ({err}); {_HOW_TO_GET}") from None
    _check_starts(path, frames, deltas, poses, cfg)
    return frames, deltas, poses


def _check_starts(path: Path, frames: np.ndarray, deltas: np.ndarray, poses: np.ndarray, cfg: RunConfig) -> None:
    h, w = cfg.data.frame_height, cfg.data.frame_width
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[2:] != (h, w, 3) or frames.shape[1] < 1:
        raise WorldError(f"{path}: frames must be uint8 (N,T0,{h},{w},3), got {frames.dtype} {frames.shape}")
    if deltas.shape != frames.shape[:2] + (5,) or poses.shape != frames.shape[:2] + (5,):
        raise WorldError(f"{path}: deltas and poses must be (N,T0,5) = {frames.shape[:2] + (5,)}, "
                         f"got {deltas.shape} and {poses.shape}")
