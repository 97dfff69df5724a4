"""A packaged world: the weights, configs and start contexts that `play.py` and the envs run from.

Layout of a world directory (default: the package's `worldmodel/weights/`):

    student.safetensors (+ .json)       the few-step WorldDiT (bf16)
    decoder.safetensors (+ .json)       the autoencoder's decoder and latent_scale (bf16): all that playing needs
    encoder.safetensors (+ .json)       optional: the autoencoder's encoder (bf16), only to encode other frames
    world.json                          RunConfig dict, pose_stats, fps, provenance, format_version (2)
    action_model.json                   data_tools.action_model.ActionModel (action -> pose delta)
    start_contexts.npz                  frames uint8 (N,T0,H,W,3), deltas (N,T0,5) raw, poses (N,T0,5),
                                        latents float32 (N,T0,C,h,w): the frames encoded once at packaging

A .safetensors over checkpoint.PART_BYTES (15 MiB) is written as NAME.safetensors.part000, part001, ...
instead (the shipped student: 19.7 MB in two parts), so that no file passes 16 MiB; loading joins them.

Generators start from the latents, so a world without encoder.safetensors plays, steps and records exactly
as one with it; only encoding frames (a reset from raw frames) needs the encoder, and says so.
Format 1 (autoencoder.safetensors with both halves, no latents) still loads: its start frames are encoded
once at load time. `python -m worldmodel.inference.world repack SRC --out DST [--no-encoder]` rewrites any
readable world in the current format without retraining.

`save_world` writes all of it; `World.load` checks every file up front and names the one that is
missing or corrupt. Networks are built on first use per (device, dtype) and shared by every generator.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.action_model import ActionModel
from worldmodel.checkpoint import PART_BYTES, CheckpointError, load_weights, remove_weights, save_weights, weights_exist
from worldmodel.config import RunConfig, from_dict
from worldmodel.inference.batched import BatchedGenerator
from worldmodel.inference.generator import autoencoder_on, encode_frames
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.models.dit import WorldDiT

FORMAT_VERSION = 2
DEFAULT_WORLD_DIR = Path(__file__).resolve().parent.parent / "weights"
FILES = ("student.safetensors", "student.json", "decoder.safetensors", "decoder.json",
         "world.json", "action_model.json", "start_contexts.npz")
FILES_V1 = ("student.safetensors", "student.json", "autoencoder.safetensors", "autoencoder.json",
            "world.json", "action_model.json", "start_contexts.npz")
_HOW_TO_GET = ("build a world with `python -m worldmodel.build DATA_DIR --out RUN_DIR` and pass RUN_DIR/world "
               "(--world DIR); if the package shipped weights, reinstall it to restore them")
_HOW_TO_GET_ENCODER = ("a world with its encoder is what `python -m worldmodel.build DATA_DIR --out RUN_DIR` "
                       "packages (RUN_DIR/world/encoder.safetensors), or `python -m worldmodel.inference.world "
                       "repack RUN_DIR/world --out DIR` of it")


class WorldError(RuntimeError):
    pass


class MissingEncoder(torch.nn.Module):
    """Stands in for the encoder of a world packaged without encoder.safetensors: raises when used, so that
    no frame is ever encoded by random weights."""

    def __init__(self, world_dir: Path) -> None:
        super().__init__()
        self.world_dir = str(world_dir)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise WorldError(f"world {self.world_dir} has no encoder.safetensors: it plays from the latents of its "
                         f"start contexts, but encoding frames (a reset from raw frames) needs the encoder; "
                         f"{_HOW_TO_GET_ENCODER}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_fast(device: str | torch.device) -> str:
    """The StreamingGenerator fast path a world's generator uses when none is given: CUDA graphs on CUDA,
    the same static frame step run eagerly elsewhere. Both give the eager step's frames for the same noise up to
    rounding (fp32 latents within ~1e-5, tests/test_graphed.py; bf16 frames a few grey levels apart) and are
    faster (benchmarks/RESULTS.md: H200 2-step B=1 29 -> 2.5 ms, 2-core CPU -16 to -24%)."""
    return "graph" if torch.device(device).type == "cuda" else "static"


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
    start_latents: np.ndarray  # float32 (N, T0, C, h, w): start_frames encoded once; generators reset from these
    format_version: int = FORMAT_VERSION
    has_encoder: bool = True  # encoder.safetensors present (format 1: inside autoencoder.safetensors)
    _modules: tuple[WorldDiT, Autoencoder] | None = field(default=None, repr=False)
    _autoencoder: Autoencoder | None = field(default=None, repr=False)

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
        info_path = path / "world.json"  # without it: name what a world of the current format lacks
        info = _read_json(info_path) if info_path.is_file() else {"format_version": FORMAT_VERSION}
        version = int(info.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise WorldError(f"{path / 'world.json'} has format_version {version}, this code reads "
                             f"up to {FORMAT_VERSION}; update the worldmodel package")
        missing = [name for name in (FILES if version >= 2 else FILES_V1) if not _exists(path / name)]
        if missing:
            raise WorldError(f"world {path} lacks {', '.join(missing)}; {_HOW_TO_GET}")
        try:
            config = from_dict(RunConfig, info["config"], where=str(path / "world.json"))
            pose_stats, fps = info["pose_stats"], float(info["fps"])
        except (KeyError, TypeError, ValueError) as err:
            raise WorldError(f"{path / 'world.json'} is malformed ({err}); {_HOW_TO_GET}") from None
        try:
            action_model = ActionModel.from_json((path / "action_model.json").read_text())
        except Exception as err:  # the action model's own parser decides what is malformed
            raise WorldError(f"{path / 'action_model.json'} is malformed ({err}); {_HOW_TO_GET}") from None
        frames, deltas, poses, latents = _read_starts(path / "start_contexts.npz", config, version >= 2)
        has_encoder = version < 2 or weights_exist(path / "encoder")
        ae = None
        if latents is None:  # format 1: encode the start frames once, with the whole autoencoder
            ae = _load_autoencoder(path, config, version, has_encoder)
            latents = encode_starts(ae, frames)
        return cls(path, config, pose_stats, fps, info.get("provenance", {}), action_model, frames, deltas, poses,
                   latents, version, has_encoder, _autoencoder=ae)

    def modules(self) -> tuple[WorldDiT, Autoencoder]:
        """(dit, autoencoder) on the CPU in fp32, eval mode, loaded once; generators copy them to their
        device and dtype. The autoencoder's decoder and latent_scale are always loaded, its encoder only
        when the world has encoder.safetensors (else a MissingEncoder that raises when used)."""
        if self._modules is None:
            dit = WorldDiT(self.config.dit)
            try:
                load_weights(self.path / "student", dit, {"dit": self.config.dit})
            except CheckpointError as err:
                raise WorldError(f"{err}; {_HOW_TO_GET}") from None
            if self._autoencoder is None:
                self._autoencoder = _load_autoencoder(self.path, self.config, self.format_version, self.has_encoder)
            self._modules = (dit.eval(), self._autoencoder)
        return self._modules

    def generator(
        self,
        batch_size: int,
        steps: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        fast: str | None = None,
    ) -> BatchedGenerator:
        """A StreamingGenerator (with per-world noise and reset_rows) for `batch_size` worlds; `steps`
        overrides the shipped denoising steps; fast: "off" | "static" | "graph" | "compile" (default default_fast(device));
        device default cuda if available, dtype default
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
        return BatchedGenerator(dit, ae, self.pose_stats, gen_cfg, self.config.flow, device=device, dtype=dtype,
                                fast=fast or default_fast(device))


def save_world(
    out_dir: str | Path,
    dit: torch.nn.Module,
    autoencoder: Autoencoder,
    cfg: RunConfig,
    pose_stats: dict[str, Any],
    action_model: ActionModel,
    start_contexts: dict[str, np.ndarray],
    provenance: dict[str, Any],
    fps: float = 35.0,
    *,
    encoder: bool = True,
) -> Path:
    """Write a world directory (bf16 weights, format FORMAT_VERSION) that `World.load(out_dir)` reads back.

    start_contexts: frames uint8 (N,T0,H,W,3), deltas and poses (N,T0,5), and optionally latents
    (N,T0,C,h,w); without latents the frames are encoded here, by the encoder as saved (its bf16 weights
    in fp32: what a world's generator would encode). encoder=False leaves encoder.safetensors out.
    """
    out = Path(out_dir)
    frames = np.asarray(start_contexts["frames"])
    deltas = np.asarray(start_contexts["deltas"], dtype=np.float32)
    poses = np.asarray(start_contexts["poses"], dtype=np.float32)
    weights = autoencoder.state_dict()
    encoder_weights = {k: v for k, v in weights.items() if k.startswith("encoder.")}
    if encoder and not encoder_weights:
        raise WorldError(f"save_world({out}): the autoencoder has no encoder weights (a world loaded without "
                         "encoder.safetensors?); pass encoder=False (repack: --no-encoder)")
    latents = start_contexts.get("latents")
    latents = encode_starts(_as_saved(autoencoder), frames) if latents is None else np.asarray(latents, np.float32)
    _check_starts(out / "start_contexts.npz", frames, deltas, poses, cfg, latents)
    out.mkdir(parents=True, exist_ok=True)
    pose_stats = {k: [float(v) for v in np.asarray(pose_stats[k]).reshape(-1)] for k in ("mean", "std")}
    meta = {"pose_stats": pose_stats, "provenance": provenance}
    save_weights(out / "student", dit, {**meta, "config": {"dit": dataclasses.asdict(cfg.dit)}}, part_bytes=PART_BYTES)
    ae_meta = {**meta, "config": {"autoencoder": dataclasses.asdict(cfg.autoencoder)}}
    decoder_weights = {k: v for k, v in weights.items() if k not in encoder_weights}
    save_weights(out / "decoder", decoder_weights, ae_meta, part_bytes=PART_BYTES)
    remove_weights(out / "encoder")  # never an old encoder (whole or parts) beside a new decoder
    if encoder:
        save_weights(out / "encoder", encoder_weights, ae_meta, part_bytes=PART_BYTES)
    (out / "action_model.json").write_text(action_model.to_json())
    np.savez(out / "start_contexts.npz", frames=frames, deltas=deltas, poses=poses, latents=latents)
    info = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "pose_stats": pose_stats,
            "fps": float(fps), "provenance": provenance}
    (out / "world.json").write_text(json.dumps(info, indent=2, default=str))
    return out


def encode_starts(autoencoder: Autoencoder, frames: np.ndarray) -> np.ndarray:
    """Start frames uint8 (N,T0,H,W,3) -> latents float32 (N,T0,C,h,w), one start context at a time: exactly
    what a generator's encode (an fp32 CPU reset of one world from these frames) gives."""
    ae = autoencoder_on(autoencoder, torch.device("cpu"), torch.float32)
    return np.stack([encode_frames(ae, torch.from_numpy(np.ascontiguousarray(f[None])))[0].numpy() for f in frames])


def repack(src: str | Path, out: str | Path, *, encoder: bool = True) -> Path:
    """Rewrite a readable world (any format) as a format-FORMAT_VERSION world in `out`, a new or empty
    directory; no retraining: the weights, start contexts and their latents are carried over as they are."""
    world, out = World.load(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WorldError(f"{out} exists and is not empty; remove it or pick another --out")
    if encoder and not world.has_encoder:
        raise WorldError(f"world {world.path} has no encoder.safetensors to carry over; pass --no-encoder, or repack "
                         f"a world that has it ({_HOW_TO_GET_ENCODER})")
    dit, ae = world.modules()
    starts = {"frames": world.start_frames, "deltas": world.start_deltas, "poses": world.start_poses,
              "latents": world.start_latents}
    source = {"path": str(world.path), "format_version": world.format_version}
    provenance = {**world.provenance, "repacked_from": source}
    return save_world(out, dit, ae, world.config, world.pose_stats, world.action_model, starts, provenance,
                      fps=world.fps, encoder=encoder)


def _as_saved(module: torch.nn.Module) -> torch.nn.Module:
    """An fp32 CPU copy of `module` holding the values save_weights writes (bf16), as a world reads them back."""
    module = copy.deepcopy(module).to("cpu", torch.float32).eval()
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16))
    return module


def _load_autoencoder(path: Path, cfg: RunConfig, version: int, has_encoder: bool) -> Autoencoder:
    """The world's autoencoder in fp32, eval mode: format 1 from autoencoder.safetensors; format 2 the decoder
    and latent_scale from decoder.safetensors, the encoder from encoder.safetensors or a MissingEncoder."""
    ae, expected = Autoencoder(cfg.autoencoder), {"autoencoder": cfg.autoencoder}
    try:
        if version < 2:
            load_weights(path / "autoencoder", ae, expected)
            return ae.eval()
        encoder, ae.encoder = ae.encoder, MissingEncoder(path)
        load_weights(path / "decoder", ae, expected)  # all that is left in ae: decoder.* and latent_scale
        if has_encoder:
            load_weights(path / "encoder", encoder, expected, prefix="encoder")
            ae.encoder = encoder
    except CheckpointError as err:
        raise WorldError(f"{err}; {_HOW_TO_GET}") from None
    return ae.eval()


def _exists(path: Path) -> bool:
    """A world file is there; a .safetensors counts whole or as its parts."""
    return weights_exist(path) if path.suffix == ".safetensors" else path.is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorldError(f"{path} is not valid JSON ({err}); {_HOW_TO_GET}") from None


def _read_starts(path: Path, cfg: RunConfig, with_latents: bool) -> tuple[np.ndarray, ...]:
    """(frames, deltas, poses, latents); latents None where with_latents is False (format 1 has none)."""
    try:
        with np.load(path) as data:
            frames, deltas, poses = data["frames"], data["deltas"].astype(np.float32), data["poses"].astype(np.float32)
            latents = data["latents"] if with_latents else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise WorldError(f"{path} is corrupt or incomplete ({err}); {_HOW_TO_GET}") from None
    _check_starts(path, frames, deltas, poses, cfg, latents)
    return frames, deltas, poses, latents


def _check_starts(path: Path, frames: np.ndarray, deltas: np.ndarray, poses: np.ndarray, cfg: RunConfig,
                  latents: np.ndarray | None = None) -> None:
    h, w = cfg.data.frame_height, cfg.data.frame_width
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[2:] != (h, w, 3) or frames.shape[1] < 1:
        raise WorldError(f"{path}: frames must be uint8 (N,T0,{h},{w},3), got {frames.dtype} {frames.shape}")
    if deltas.shape != frames.shape[:2] + (5,) or poses.shape != frames.shape[:2] + (5,):
        raise WorldError(f"{path}: deltas and poses must be (N,T0,5) = {frames.shape[:2] + (5,)}, "
                         f"got {deltas.shape} and {poses.shape}")
    want = frames.shape[:2] + (cfg.dit.latent_channels, cfg.dit.latent_height, cfg.dit.latent_width)
    if latents is not None and (latents.dtype != np.float32 or latents.shape != want):
        raise WorldError(f"{path}: latents must be float32 (N,T0,C,h,w) = {want}, got {latents.dtype} {latents.shape}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worldmodel.inference.world", description="World directory tools.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("repack", help="rewrite a world directory in the current format (no retraining)")
    r.add_argument("src", type=Path, help="a world directory (format 1 or 2)")
    r.add_argument("--out", type=Path, required=True, help="the new world directory (new or empty)")
    r.add_argument("--no-encoder", action="store_true",
                   help="leave encoder.safetensors out: the world still plays from its start latents")
    a = p.parse_args(argv)
    try:
        out = repack(a.src, a.out, encoder=not a.no_encoder)
    except WorldError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for f in sorted(out.iterdir()):
        print(f"{f.stat().st_size / 1e6:9.3f} MB  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
