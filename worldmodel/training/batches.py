"""From a data batch (uint8 frames or clip positions, raw pose deltas) to what the latent stages train on.

`LatentBatcher` gives every latent stage (teacher, AR diffusion, Causal CD/ODE, DMD) the same `x0`/`pose`
tensors: the frozen autoencoder's latents and the pose deltas normalised with the dataset statistics.
With a `LatentTable` bound (`stage.cache_latents`, the default) every frame of the training split is
encoded once before training and a batch is only clip positions: its latents are a gather on the device.
Without one, each batch's frames are encoded as they come (no grad, bf16 autocast on CUDA).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

Tensor = torch.Tensor


def frames_to_float(frames: Tensor) -> Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    if frames.dtype != torch.uint8:
        raise TypeError(f"frames_to_float expects uint8 frames (..., H, W, 3), got {frames.dtype}")
    return frames.movedim(-1, -3).float().div(127.5).sub(1.0)


def float_to_frames(x: Tensor) -> Tensor:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3) (clamped, rounded)."""
    return x.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1)


def pose_stat_tensors(pose_stats: dict[str, Any], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(mean, std clamped away from 0), float32 (5,) on `device`: made once, not per batch (a host list
    copied to the GPU waits for the device)."""
    mean = torch.as_tensor(pose_stats["mean"], dtype=torch.float32, device=device)
    std = torch.as_tensor(pose_stats["std"], dtype=torch.float32, device=device)
    return mean, std.clamp_min(1e-6)


def standardize_pose(deltas: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Raw deltas (..., 5) -> (delta - mean) / std, with `pose_stat_tensors`."""
    if mean.shape[-1] != deltas.shape[-1]:
        raise ValueError(f"pose_stats have {mean.shape[-1]} dimensions, deltas have {deltas.shape[-1]}")
    return (deltas.float() - mean) / std


def normalize_pose(deltas: Tensor, pose_stats: dict[str, Any]) -> Tensor:
    """Raw deltas (..., 5) -> (delta - mean) / std with the manifest's per-dimension statistics."""
    return standardize_pose(deltas, *pose_stat_tensors(pose_stats, deltas.device))


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


def fixed_chunks(arrays: Iterable[np.ndarray], chunk: int) -> Iterator[np.ndarray]:
    """The rows of `arrays` one after another, `chunk` at a time across array boundaries (only the last
    chunk is shorter): one batch shape for the encoder, which cuDNN's autotuner then tunes once."""
    buf, held = [], 0
    for a in arrays:
        while len(a):
            take, a = a[: chunk - held], a[chunk - held:]
            buf.append(take)
            held += len(take)
            if held == chunk:
                yield np.concatenate(buf) if len(buf) > 1 else buf[0]
                buf, held = [], 0
    if buf:
        yield np.concatenate(buf) if len(buf) > 1 else buf[0]


class LatentTable:
    """The latent of every frame of a dataset's split, on the training device, and where each episode starts.

    The encoder is frozen, so a frame's latent never changes: encoding every frame once before training
    replaces the 96x128 conv encoder over B*T frames per step (it cost more than the DiT) and shipping
    uint8 frames through the DataLoader; a batch's latents are then `latents[offsets[episode] + start +
    arange(T)]`, one gather on the device. Values are what `encode_frames` gives (stored in the encoder's
    output dtype: bf16 under CUDA autocast, so nothing is rounded; fp32 otherwise). Size: C*h*w values per
    frame (~6 KB at 16x12x16 in bf16, ~0.6 GB per 100k frames).
    """

    def __init__(self, latents: Tensor, offsets: Tensor):
        self.latents = latents  # (frames_total, C, h, w)
        self.offsets = offsets  # (episodes in the manifest,) long: first row of each episode, -1 outside the split
        self._steps: dict[int, Tensor] = {}

    @classmethod
    @torch.no_grad()
    def encode(cls, dataset, autoencoder: nn.Module, device: torch.device | str, *, bf16: bool = True,
               chunk: int = 256, progress: bool = True) -> "LatentTable":
        """Encode every frame of `dataset` (a ClipDataset: its `episode_ids`, `episode(i)["frames"]`)."""
        device = torch.device(device)
        episodes = dataset.manifest["episodes"]
        counts = [int(episodes[i]["frames"]) for i in dataset.episode_ids]
        offsets = torch.full((len(episodes),), -1, dtype=torch.long)
        offsets[list(dataset.episode_ids)] = torch.tensor([0, *counts[:-1]]).cumsum(0)
        latents, row = None, 0
        episodes_frames = (dataset.episode(i)["frames"] for i in dataset.episode_ids)
        with tqdm(total=sum(counts), desc="latents", unit="frame", disable=not progress, dynamic_ncols=True) as bar:
            for frames in fixed_chunks(episodes_frames, chunk):
                with autocast(device, bf16):
                    z = autoencoder.encode(frames_to_float(torch.from_numpy(frames).to(device)))
                if latents is None:
                    latents = z.new_empty((sum(counts), *z.shape[1:]))
                latents[row:row + len(z)] = z
                row += len(z)
                bar.update(len(z))
        return cls(latents, offsets.to(device))

    def save(self, path: Path) -> None:
        """Atomically (temp file + rename): a table half written by an interrupted run is never read."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"latents": self.latents.cpu(), "offsets": self.offsets.cpu()}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, device: torch.device | str) -> "LatentTable":
        state = torch.load(path, map_location=device, weights_only=True)
        return cls(state["latents"], state["offsets"])

    def lookup(self, episode: Tensor, start: Tensor, frames: int) -> Tensor:
        """episode, start (B,) clip positions on the table's device -> latents (B, frames, C, h, w) float32.

        No check that a clip lies inside its episode (that would wait for the device): the positions come
        from the dataset the table was encoded from."""
        if frames not in self._steps:
            self._steps[frames] = torch.arange(frames, device=self.latents.device)
        rows = self.offsets[episode.long()][:, None] + start.long()[:, None] + self._steps[frames]
        return self.latents[rows].float()


class LatentBatcher:
    """Turn a batch into latent-stage inputs `{"x0": (B,T,C,h,w) scaled latents, "pose": (B,T,5) normalised}`.

    A batch is `{"frames": uint8 (B,T,H,W,3), "deltas": (B,T,5) raw}` (encoded here, plus `"frames": (B,T,3,H,W)
    in [-1,1]` in the output when `keep_frames`), or, once `bind` has encoded the dataset into a
    `LatentTable` (`table=True`), `{"episode": (B,), "start": (B,), "deltas"}` without frames. The
    autoencoder is frozen and in eval mode.
    """

    def __init__(self, autoencoder: nn.Module, pose_stats: dict[str, Any], device: torch.device | str,
                 *, keep_frames: bool = False, bf16: bool = True, table: bool = False,
                 source: str | Path | None = None):
        self.device = torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        self.pose_stats = check_pose_stats(pose_stats, "LatentBatcher")
        self.pose_mean, self.pose_std = pose_stat_tensors(self.pose_stats, self.device)
        self.keep_frames = keep_frames
        self.bf16 = bf16
        self.use_table = table
        self.table: LatentTable | None = None
        # The autoencoder checkpoint: the table is stored beside it, so that every later stage trained from
        # the same autoencoder and data reads it instead of encoding every frame again (~13 GFLOP per frame).
        self.source = Path(source) if source else None

    def bind(self, dataset, progress: bool = True):
        """With `table=True`: encode every frame of `dataset` into a LatentTable and return the dataset's
        frames-free view (`ClipDataset.without_frames`) for the DataLoader; otherwise the dataset as is."""
        if not self.use_table:
            return dataset
        if not hasattr(dataset, "without_frames"):
            raise TypeError(f"stage.cache_latents=true encodes the whole dataset up front and needs a ClipDataset, "
                            f"got {type(dataset).__name__}; set stage.cache_latents=false to encode per batch")
        if not dataset.with_frames:
            raise ValueError("LatentBatcher.bind needs the dataset with its frames (to encode them), got a "
                             "without_frames() view; pass the ClipDataset itself")
        cached = self.table_file(dataset)
        if cached is not None and cached.is_file():
            self.table = LatentTable.load(cached, self.device)
            if len(self.table.latents) != sum(int(dataset.manifest["episodes"][i]["frames"]) for i in dataset.episode_ids):
                self.table = None  # not this dataset's split after all: encode it again
        if self.table is None:
            self.table = LatentTable.encode(dataset, self.autoencoder, self.device, bf16=self.bf16, progress=progress)
            if cached is not None:
                self.table.save(cached)
        return dataset.without_frames()

    def table_file(self, dataset) -> Path | None:
        """Where this autoencoder's table of `dataset` is kept: named by the checkpoint's and the data
        manifest's sha256, the split and the encoding precision, so a changed input never matches."""
        manifest = Path(getattr(dataset, "data_dir", "")) / "manifest.json"
        if self.source is None or not self.source.is_file() or not manifest.is_file():
            return None
        h = hashlib.sha256(self.source.read_bytes())
        h.update(manifest.read_bytes())
        h.update(f"{sorted(dataset.episode_ids)}|{self.bf16 and self.device.type == 'cuda'}".encode())
        return self.source.with_name(f"latents-{h.hexdigest()[:16]}.pt")

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        deltas = batch["deltas"].to(self.device, non_blocking=True)
        out = {"pose": standardize_pose(deltas, self.pose_mean, self.pose_std)}
        if "frames" not in batch:
            if self.table is None:
                raise ValueError("LatentBatcher: the batch has no frames and no latent table is bound; pass frames "
                                 "or call bind(dataset) first (the training loop does, through Stage.bind_data)")
            episode, start = (batch[k].to(self.device, non_blocking=True) for k in ("episode", "start"))
            return {"x0": self.table.lookup(episode, start, deltas.shape[1])} | out
        frames = batch["frames"].to(self.device, non_blocking=True)
        if frames.ndim != 5:
            raise ValueError(f"LatentBatcher expects frames (B,T,H,W,3), got shape {tuple(frames.shape)}")
        x = frames_to_float(frames)  # (B, T, 3, H, W)
        out = {"x0": encode_frames(self.autoencoder, x, bf16=self.bf16)} | out
        if self.keep_frames:
            out["frames"] = x
        return out
