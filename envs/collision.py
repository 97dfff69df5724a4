"""Walls for the world model's camera: a gate on the action model's (forward, strafe) read off the frame shown.

The action model (data_tools/action_model.py) maps an action to the pose change the engine would make in
open space; the engine stops the player at walls, the action model does not, so in the world model a
camera pushed at a wall walks through it and an agent trained there learns that walking straight pays
(benchmarks/sim2real.py measured it). This net looks at the frame the player sees and the kinematic
(forward, strafe) the action model predicts and says which fraction of each is realised:

    gate = sigmoid(net(frame (B, H, W, 3) uint8, kinematic (B, 2)))      (B, 2) in [0, 1]
    delta[:, :2] = gate * kinematic[:, :2]

Fitted by least squares of `gate * kinematic` against the engine's realised (forward, strafe), on engine
episodes from the world's start poses under a persistent random-action policy (it bumps into walls often).
The world model then conditions on the gated delta, so the generated camera stops at the walls it shows.

    python -m envs.collision fit --world DIR --steps 60000 --out DIR/collision
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

IN_SIZE = (48, 64)  # (h, w) the frame is area-downsampled to
KIN_SCALE = 20.0  # map units per frame: the kinematic input's rough scale


class CollisionNet(nn.Module):
    """frame uint8 (B, H, W, 3), kinematic (forward, strafe) (B, 2) -> gate (B, 2) in [0, 1]."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(3, w, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d((3, 4)), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(4 * w * 12 + 2, 128), nn.ReLU(), nn.Linear(128, 2))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.constant_(self.head[-1].bias, 3.0)  # start open: gate ~0.95, the action model unchanged

    def forward(self, frame: torch.Tensor, kinematic: torch.Tensor) -> torch.Tensor:
        x = downsample(frame).float() / 255.0
        h = torch.cat([self.conv(x), kinematic.float() / KIN_SCALE], dim=1)
        return torch.sigmoid(self.head(h))


def downsample(frame: torch.Tensor, size: tuple[int, int] = IN_SIZE) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, h, w) float in 0..255 at `size` (area average)."""
    x = frame.permute(0, 3, 1, 2).float()
    return x if tuple(x.shape[2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="area")


def gate_deltas(net: CollisionNet, frames: np.ndarray, deltas: np.ndarray, device: torch.device) -> np.ndarray:
    """Gated copy of kinematic deltas (B, 5) given the frames uint8 (B, H, W, 3) they start from."""
    with torch.inference_mode():
        g = net(torch.as_tensor(frames, device=device), torch.as_tensor(deltas[:, :2], device=device)).cpu().numpy()
    out = np.array(deltas, np.float32, copy=True)
    out[:, :2] *= g
    return out


# ----- data -----

def record(world, steps: int, seed: int = 0, episode_steps: int = 400, progress: bool = True) -> dict[str, np.ndarray]:
    """Engine transitions from the world's start poses: frame shown (N, h, w, 3) at IN_SIZE, kinematic
    (forward, strafe) of the action model (N, 2), realised (forward, strafe) of the engine (N, 2)."""
    from data_tools.engine import DoomEngine
    from data_tools.poses import pose_deltas
    from envs.doom_env import record_settings, world_engine_spec
    from envs.keymap import DISCRETE_ACTIONS

    rng = np.random.default_rng(seed)
    start_poses, map_name, frame_shape, fps = world_engine_spec(world)
    model = world.action_model
    frames, kin, real = [], [], []
    with DoomEngine(record_settings(map_name, frame_shape, fps)) as engine, \
            tqdm(total=steps, desc="collision data", disable=not progress) as bar:
        while len(frames) < steps:
            frame, pose = engine.reset(start_pose=start_poses[rng.integers(len(start_poses))], seed=int(rng.integers(2**31)))
            prev_delta = np.zeros(5, np.float32)
            action, hold = 0, 0
            for _ in range(min(episode_steps, steps - len(frames))):
                if hold <= 0:  # forward-heavy persistent random chords: walls get walked into
                    action = int(rng.choice([1, 7, 8, 9, 10]) if rng.random() < 0.6 else rng.integers(len(DISCRETE_ACTIONS)))
                    hold = int(rng.integers(1, 12))
                hold -= 1
                a = DISCRETE_ACTIONS[action]
                k = np.asarray(model.predict(prev_delta[None], a[None]), np.float32)[0]
                next_frame, next_pose = engine.step(a)
                d = pose_deltas(np.stack([pose, next_pose]))[1]
                frames.append(cv2.resize(frame, IN_SIZE[::-1], interpolation=cv2.INTER_AREA))  # as downsample() does
                kin.append(k[:2])
                real.append(d[:2])
                frame, pose, prev_delta = next_frame, next_pose, d
                bar.update(1)
    return {"frames": np.stack(frames), "kinematic": np.stack(kin).astype(np.float32),
            "realised": np.stack(real).astype(np.float32)}


# ----- fit -----

def fit(data: dict[str, np.ndarray], epochs: int = 4, batch: int = 256, lr: float = 2e-3, seed: int = 0,
        val_fraction: float = 0.1, device: str = "cpu", progress: bool = True) -> tuple[CollisionNet, dict[str, Any]]:
    """Least squares of gate * kinematic vs realised; the last val_fraction (whole episodes' tail) held out."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    n = len(data["frames"])
    n_val = max(1, int(n * val_fraction))
    tensors = [torch.as_tensor(data[k]) for k in ("frames", "kinematic", "realised")]
    train = [t[: n - n_val] for t in tensors]
    val = [t[n - n_val:] for t in tensors]
    net = CollisionNet().to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)

    def loss_of(f, k, r):
        g = net(f.to(dev), k.to(dev))
        return F.mse_loss(g * k.to(dev), r.to(dev))

    def evaluate() -> float:
        with torch.no_grad():
            return float(np.mean([float(loss_of(*(t[i:i + 1024] for t in val))) for i in range(0, n_val, 1024)]))

    before = evaluate()
    ungated = float(F.mse_loss(val[1], val[2]))
    total = epochs * ((n - n_val + batch - 1) // batch)
    with tqdm(total=total, desc="fit collision", disable=not progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(n - n_val, generator=gen)
            for i in range(0, n - n_val, batch):
                idx = perm[i:i + batch]
                loss = loss_of(*(t[idx] for t in train))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
    metrics = {"samples": n, "val_samples": n_val, "val_mse_ungated": ungated, "val_mse_init": before,
               "val_mse": evaluate(), "epochs": epochs}
    return net.eval(), metrics


def save(net: CollisionNet, path: str | Path, meta: dict[str, Any]) -> Path:
    from worldmodel.checkpoint import save_weights

    return save_weights(path, net, {"kind": "collision", "width": net.width, "in_size": list(IN_SIZE), **meta},
                        dtype=torch.float32)


def load(path: str | Path, device: str | torch.device = "cpu") -> CollisionNet:
    """A saved CollisionNet (eval mode, fp32) on device; names the file if it is missing or of another kind."""
    from worldmodel.checkpoint import load_weights, read_meta

    meta = read_meta(path)
    if meta.get("kind") != "collision":
        raise ValueError(f"{path} is not a collision model (kind={meta.get('kind')!r})")
    net = CollisionNet(int(meta["width"]))
    load_weights(path, net)
    return net.to(device).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m envs.collision", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="record engine transitions from the world's start poses and fit the gate")
    f.add_argument("--world", default=None, help="world directory (default: the packaged worldmodel/weights/)")
    f.add_argument("--steps", type=int, default=60_000, help="engine transitions to record")
    f.add_argument("--epochs", type=int, default=4)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="output path (PATH.safetensors + PATH.json)")
    args = p.parse_args(argv)
    from worldmodel.inference.world import World

    world = World.load(args.world)
    t0 = time.perf_counter()
    data = record(world, args.steps, seed=args.seed)
    t_rec = time.perf_counter() - t0
    net, metrics = fit(data, epochs=args.epochs, seed=args.seed)
    metrics.update(record_seconds=t_rec, fit_seconds=time.perf_counter() - t0 - t_rec, seed=args.seed)
    path = save(net, args.out, {"metrics": metrics, "world_map": world.provenance.get("data", {}).get("map")})
    print(json.dumps(metrics, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
