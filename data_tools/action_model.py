"""Action -> pose-delta model with momentum, fitted to recorded (actions, deltas).

Doom has momentum (thrust accumulates into a velocity that friction decays), so the state is the
previous pose delta: per output dimension k

    delta_t[k] = A[k] * s_{t-1}[k] + B[k] . action_t + c[k]

fitted by least squares over every consecutive pair inside an episode. Two choices of s:
- frame="previous": s = delta_{t-1} as stored. Its (forward, strafe) live in frame t-2's camera,
  while delta_t's live in frame t-1's, so while turning the momentum term points the wrong way.
- frame="rotated": (forward, strafe) of delta_{t-1} rotated by dyaw_{t-1} into frame t-1's camera,
  where the carried-over velocity actually is. dyaw_{t-1} is part of the state, so this is exact
  bookkeeping, not a learned nonlinearity. `fit_action_model` fits both and keeps the better on
  held-out episodes. Measured on MAP01 recordings the two are equal within noise ("previous" by a
  hair, benchmarks/RESULTS.md), because Doom thrusts along the *new* heading, which neither state
  captures; on synthetic data with strong turn-while-moving "rotated" wins.

`predict` works on numpy arrays and torch tensors (any device, batched), so an env can run it on GPU.
"""

from __future__ import annotations

import json

import numpy as np

DIMS = 5
ACTIONS = 4


def _xp(x):
    """numpy or torch namespace for x (torch only imported if a tensor is passed)."""
    if type(x).__module__.startswith("torch"):
        import torch

        return torch
    return np


def rotate_prev(prev, xp=np):
    """prev (B,5) -> state (B,5): (forward, strafe) turned by dyaw into the newer camera frame."""
    a = prev[..., 3] * (np.pi / 180.0)
    c, s = xp.cos(a), xp.sin(a)
    f, r = prev[..., 0], prev[..., 1]
    # A frame turned left by a sees a vector (f, left=-r) as (f c - r s, ...); strafe is minus left.
    f2 = f * c - r * s
    r2 = f * s + r * c
    return xp.stack([f2, r2, prev[..., 2], prev[..., 3], prev[..., 4]], -1)


class ActionModel:
    def __init__(self, A, B, c, frame: str = "previous"):
        if frame not in ("previous", "rotated"):
            raise ValueError(f"action model frame must be 'previous' or 'rotated', got {frame!r}")
        self.A = np.asarray(A, np.float64).reshape(DIMS)
        self.B = np.asarray(B, np.float64).reshape(DIMS, ACTIONS)
        self.c = np.asarray(c, np.float64).reshape(DIMS)
        self.frame = frame

    # ---- fitting -------------------------------------------------------------------------------
    @staticmethod
    def pairs(actions: np.ndarray, deltas: np.ndarray, episode_starts) -> np.ndarray:
        """Row indices t whose t-1 and t-2 lie in the same episode (delta at a start is a stand-in 0)."""
        n = len(deltas)
        start = np.zeros(n, bool)
        start[np.asarray(list(episode_starts), dtype=np.int64)] = True
        start[0] = True
        ep = np.cumsum(start)
        t = np.arange(2, n)
        return t[(ep[t] == ep[t - 1]) & (ep[t] == ep[t - 2])]

    @classmethod
    def fit(cls, actions, deltas, episode_starts=(0,), frame: str = "previous") -> "ActionModel":
        """actions (N,4), deltas (N,5) of concatenated episodes; episode_starts: first row of each."""
        actions = np.asarray(actions, np.float64)
        deltas = np.asarray(deltas, np.float64)
        t = cls.pairs(actions, deltas, episode_starts)
        if len(t) < 2 * (ACTIONS + 2):
            raise ValueError(f"only {len(t)} usable (prev, next) pairs; record more frames to fit an action model")
        prev = deltas[t - 1]
        state = rotate_prev(prev) if frame == "rotated" else prev
        A, B, c = np.zeros(DIMS), np.zeros((DIMS, ACTIONS)), np.zeros(DIMS)
        for k in range(DIMS):
            X = np.c_[state[:, k], actions[t], np.ones(len(t))]
            w, *_ = np.linalg.lstsq(X, deltas[t, k], rcond=None)
            A[k], B[k], c[k] = w[0], w[1:1 + ACTIONS], w[-1]
        return cls(A, B, c, frame)

    @classmethod
    def kinematic(cls, deltas, quantile: float = 0.95) -> "ActionModel":
        """For data whose actions are unknown (ingested video): no momentum, each action drives its own pose
        dimension at a full-press rate taken from the data, the `quantile` of |delta| (forward -> forward,
        strafe -> strafe, turn -> dyaw, look -> dpitch; + turn = + dyaw as in the recorder's data)."""
        deltas = np.asarray(deltas, np.float64).reshape(-1, DIMS)
        if len(deltas) == 0:
            raise ValueError("no pose deltas to take the action rates from")
        rate = np.quantile(np.abs(deltas), quantile, axis=0)
        B = np.zeros((DIMS, ACTIONS))
        for action, dim in enumerate((0, 1, 3, 4)):
            B[dim, action] = rate[dim]
        return cls(np.zeros(DIMS), B, np.zeros(DIMS), "previous")

    # ---- use -----------------------------------------------------------------------------------
    def predict(self, prev_delta, action):
        """prev_delta (B,5), action (B,4) -> delta (B,5); numpy in numpy out, torch in torch out."""
        xp = _xp(prev_delta)
        if xp is np:
            prev, act = np.asarray(prev_delta, np.float64), np.asarray(action, np.float64)
            A, B, c = self.A, self.B, self.c
        else:
            prev, act = prev_delta, action.to(prev_delta.dtype)
            A, B, c = (xp.as_tensor(v, dtype=prev.dtype, device=prev.device) for v in (self.A, self.B, self.c))
        state = rotate_prev(prev, xp) if self.frame == "rotated" else prev
        out = A * state + act @ B.T + c
        return out.astype(np.float32) if xp is np else out

    def rollout(self, start_delta, actions):
        """start_delta (5,), actions (T,4) -> deltas (T,5), each step fed its own prediction."""
        d = np.asarray(start_delta, np.float64).reshape(1, DIMS)
        out = []
        for a in np.asarray(actions, np.float64):
            d = self.predict(d, a[None]).astype(np.float64)
            out.append(d[0])
        return np.asarray(out, np.float32).reshape(-1, DIMS)

    # ---- io ------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"type": "momentum_linear", "frame": self.frame, "A": self.A.tolist(),
                           "B": self.B.tolist(), "c": self.c.tolist(),
                           "inputs": ["forward", "strafe", "turn", "look"],
                           "outputs": ["forward", "strafe", "up", "dyaw", "dpitch"]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ActionModel":
        d = json.loads(text)
        return cls(d["A"], d["B"], d["c"], d.get("frame", "previous"))


def rmse_one_step(model: ActionModel, actions, deltas, episode_starts=(0,)) -> np.ndarray:
    t = ActionModel.pairs(actions, deltas, episode_starts)
    pred = model.predict(np.asarray(deltas)[t - 1], np.asarray(actions)[t])
    return np.sqrt(((pred - np.asarray(deltas)[t]) ** 2).mean(0))


def rmse_open_loop(model: ActionModel, actions, deltas, episode_starts=(0,), horizon: int = 32) -> np.ndarray:
    """Start from the true delta, roll `horizon` steps on the actions alone; windows tile each episode."""
    deltas, actions = np.asarray(deltas), np.asarray(actions)
    bounds = list(episode_starts) + [len(deltas)]
    errs = []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        for s in range(s0 + 1, s1 - horizon, horizon):
            pred = model.rollout(deltas[s], actions[s + 1:s + 1 + horizon])
            errs.append((pred - deltas[s + 1:s + 1 + horizon]) ** 2)
    if not errs:
        raise ValueError(f"no episode is longer than horizon {horizon} + 1 frames")
    return np.sqrt(np.concatenate(errs).mean(0))
