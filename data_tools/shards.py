"""Episode shards, the data manifest, and the training-side reader.

Layout (docs/ARCHITECTURE.md "Data directory"):

    DATA_DIR/manifest.json
    DATA_DIR/episodes/ep_00000.npz   frames uint8 (N,H,W,3), poses float32 (N,5), actions float32 (N,4)

Episode files are uncompressed npz: Doom frames would compress ~3x, but zlib costs more CPU than
the engine itself in the recorder, and the GPU machine has the disk. Every problem with a shard
(missing, truncated, wrong checksum, wrong arrays) raises `ShardError` naming the file; nothing is
silently skipped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from data_tools.poses import POSE_DIM, pose_deltas

ACTION_DIM = 4
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STD_FLOOR = 1e-3


class ShardError(RuntimeError):
    """A data file is missing, truncated, corrupt or inconsistent with the manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_episode(path: str | Path, frames: np.ndarray, poses: np.ndarray, actions: np.ndarray) -> dict:
    """frames uint8 (N,H,W,3), poses (N,5), actions (N,4) -> {"file", "frames", "bytes", "sha256"}.
    Written to a temp name and renamed so a crash never leaves a half file under the real name."""
    path = Path(path)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    poses = np.asarray(poses, dtype=np.float32)
    actions = np.asarray(actions, dtype=np.float32)
    n = len(frames)
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be (N,H,W,3) uint8, got {frames.shape}")
    if poses.shape != (n, POSE_DIM) or actions.shape != (n, ACTION_DIM):
        raise ValueError(f"poses {poses.shape} / actions {actions.shape} do not match {n} frames")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, frames=frames, poses=poses, actions=actions)
    os.replace(tmp, path)
    return {"file": f"{path.parent.name}/{path.name}", "frames": n, "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def write_manifest(data_dir: str | Path, manifest: dict) -> None:
    path = Path(data_dir) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path}: manifest missing (record data with `python -m data_tools.record --out {data_dir}`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    for key in ("episodes", "frame_height", "frame_width"):
        if key not in manifest:
            raise ShardError(f"{path}: manifest has no '{key}'")
    return manifest


def verify_episode_file(data_dir: str | Path, entry: dict) -> Path:
    """Existence, size and sha256 of one episode file; returns its path or raises ShardError."""
    path = Path(data_dir) / entry["file"]
    if not path.is_file():
        raise ShardError(f"{path}: episode file missing (listed in the manifest)")
    size = path.stat().st_size
    expected = entry.get("bytes")
    if expected is not None and size < expected:
        raise ShardError(f"{path}: truncated ({size} of {expected} bytes); re-record this episode")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ShardError(f"{path}: checksum mismatch (sha256 {digest[:12]}…, manifest {entry['sha256'][:12]}…); "
                         "the file is corrupt or was rewritten without updating the manifest")
    return path


def load_episode(data_dir: str | Path, entry: dict, manifest: dict | None = None, verify: bool = True) -> dict:
    """Load and validate one episode -> {"frames", "poses", "actions"} numpy arrays.
    The frame size is checked against `manifest` (read from data_dir when not given)."""
    path = verify_episode_file(data_dir, entry) if verify else Path(data_dir) / entry["file"]
    if manifest is None and (Path(data_dir) / MANIFEST).is_file():
        manifest = read_manifest(data_dir)
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("frames", "poses", "actions")}
    except KeyError as e:
        raise ShardError(f"{path}: array {e} missing from the episode file") from e
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ShardError(f"{path}: unreadable or truncated npz ({e})") from e
    n = entry["frames"]
    expected = {"frames": (np.uint8, (n, manifest["frame_height"], manifest["frame_width"], 3) if manifest else None),
                "poses": (np.float32, (n, POSE_DIM)), "actions": (np.float32, (n, ACTION_DIM))}
    for key, (dtype, shape) in expected.items():
        a = arrays[key]
        if a.dtype != dtype:
            raise ShardError(f"{path}: {key} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        if shape is not None and a.shape != shape:
            raise ShardError(f"{path}: {key} has shape {a.shape}, manifest implies {shape}")
        if len(a) != n:
            raise ShardError(f"{path}: {key} has {len(a)} rows, manifest says {n} frames")
    return arrays


def compute_pose_stats(deltas_list) -> dict:
    """Per-dimension mean/std over a list of (N_i, 5) delta arrays (the train split only).
    The std is floored so a dimension that never moves (e.g. `up` on a flat map) cannot blow up."""
    d = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, POSE_DIM) for x in deltas_list])
    return {"mean": d.mean(0).tolist(), "std": np.maximum(d.std(0), STD_FLOOR).tolist()}


class ClipDataset(Dataset):
    """Map-style dataset over every (episode, start) window of `clip_frames` frames.

    Item: {"frames": uint8 (T,H,W,3), "deltas": float32 (T,5) raw, "actions": float32 (T,4),
    "episode": int (index in the manifest's episode list), "start": int}. Clips never cross an
    episode boundary. All files of the split are checksummed at construction so a corrupt shard
    fails at start, not hours into training; each episode is then loaded on first use and kept.
    With DataLoader workers, call `preload()` first: forked workers then share the arrays
    copy-on-write instead of each loading its own copy. `without_frames()` is the same clips without
    their frames (for training on latents encoded once up front: training.batches.LatentTable).
    """

    with_frames: bool = True
    """Items carry "frames"; False in a `without_frames()` view (which then never keeps frames in RAM)."""

    def __init__(self, data_dir: str | Path, clip_frames: int, split: str = "train", stride: int = 1,
                 verify: bool = True):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if clip_frames < 1 or stride < 1:
            raise ValueError(f"clip_frames ({clip_frames}) and stride ({stride}) must be >= 1")
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self.clip_frames = clip_frames
        self.episode_ids = [i for i, e in enumerate(self.manifest["episodes"]) if e.get("split", "train") == split]
        if not self.episode_ids:
            raise ShardError(f"{self.data_dir}: no '{split}' episodes in the manifest")
        if verify:
            for i in self.episode_ids:
                verify_episode_file(self.data_dir, self.manifest["episodes"][i])
        windows = []  # (episode id, start)
        for i in self.episode_ids:
            n = self.manifest["episodes"][i]["frames"]
            windows += [(i, s) for s in range(0, n - clip_frames + 1, stride)]
        if not windows:
            raise ShardError(f"{self.data_dir}: no '{split}' episode has {clip_frames} frames")
        self.windows = np.asarray(windows, dtype=np.int64)
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.windows)

    def episode(self, i: int) -> dict:
        """Episode i's arrays (frames, poses, actions, deltas), loaded once and kept in RAM."""
        if i not in self._cache:
            # Checksummed at construction; reading it again here would double the start-up I/O.
            arrays = load_episode(self.data_dir, self.manifest["episodes"][i], self.manifest, verify=False)
            arrays["deltas"] = pose_deltas(arrays["poses"])
            if not self.with_frames:
                del arrays["frames"]
            self._cache[i] = arrays
        return self._cache[i]

    def preload(self) -> None:
        for i in self.episode_ids:
            self.episode(i)

    def without_frames(self) -> "ClipDataset":
        """The same clips (same order, same windows) whose items have no "frames": what a DataLoader
        ships when every frame's latent is on the device already. Episodes loaded so far are shared
        without their frames, so forked workers never copy or load frames."""
        view = copy.copy(self)
        view.with_frames = False
        view._cache = {i: {k: v for k, v in arrays.items() if k != "frames"} for i, arrays in self._cache.items()}
        return view

    def __getitem__(self, idx: int) -> dict:
        i, s = (int(v) for v in self.windows[idx])
        ep = self.episode(i)
        sl = slice(s, s + self.clip_frames)
        item = {"frames": torch.from_numpy(ep["frames"][sl].copy())} if self.with_frames else {}
        return item | {"deltas": torch.from_numpy(ep["deltas"][sl].copy()),
                       "actions": torch.from_numpy(ep["actions"][sl].copy()),
                       "episode": i, "start": s}


class ResumableSampler(Sampler):
    """Seeded permutation per epoch, sharded over ranks, resumable at an exact position.

    Epoch e uses permutation `randperm(num_items, seed + e)`, padded by wrapping to a multiple of
    world_size; rank r takes every world_size-th index from r. `position` counts indices of this
    rank already handed out. Note a DataLoader prefetches: for an exact resume, the training loop
    should call `set_position(epoch, batches_done * batch_size)` from its own step counter rather
    than trusting the sampler's internal position.
    """

    def __init__(self, num_items: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_items < 1:
            raise ValueError("ResumableSampler needs num_items >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_items, self.seed, self.rank, self.world_size = num_items, seed, rank, world_size
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return -(-self.num_items // self.world_size)

    def indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.num_items, generator=g).tolist()
        total = len(self) * self.world_size
        perm = (perm * (total // self.num_items + 1))[:total]
        return perm[self.rank::self.world_size]

    def __iter__(self):
        idx = self.indices(self.epoch)
        while self.position < len(idx):
            i = idx[self.position]
            self.position += 1
            yield i
        self.epoch += 1
        self.position = 0

    def set_position(self, epoch: int, position: int) -> None:
        self.epoch, self.position = int(epoch), int(position)

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has {self.seed}")
        self.set_position(state["epoch"], state["position"])
