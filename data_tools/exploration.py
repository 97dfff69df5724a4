"""Seeded exploration policy for recording: what a player does, not uniform button mashing.

A mode machine: each mode lasts a random number of frames and sets a target action; modes are
walk (with slow drift), turn in place (sometimes a full 360), strafe, back up, walk-and-turn, stand,
look up/down briefly, and "backtrack" (turn ~180 and walk back, to revisit places). Half the modes use
key-like full presses (values in {-1, 0, 1}), the rest continuous rates, so the data holds both.
Reading the previous pose, the policy notices being stuck against a wall while pushing forward and
switches to an unstick manoeuvre (back up + turn) after a short while of bumping, so bumping into
walls is in the data too. Pitch stays near 0: outside look modes it is steered back to level.

Action: float32 (4,) in [-1, 1] = (forward, strafe, turn (+ = left), look (+ = up)).
"""

from __future__ import annotations

import numpy as np

# mode: (relative weight, min frames, max frames)
MODES = {
    "walk": (5.0, 10, 80),
    "turn": (2.0, 4, 24),
    "spin": (0.5, 0, 0),  # duration from the turn rate: one full turn
    "strafe": (1.5, 5, 30),
    "backup": (0.7, 4, 20),
    "walk_turn": (2.5, 8, 40),
    "strafe_turn": (0.8, 8, 30),
    "stand": (0.5, 2, 12),
    "look": (0.4, 6, 16),
    "backtrack": (0.5, 20, 60),
}


class ExplorationPolicy:
    """`act(pose) -> action`, with `pose` the absolute (x, y, z, yaw, pitch) shown in the last frame
    (None at the start). `turn_deg_per_frame` / `look_deg_per_frame` are the engine rates of a full
    action; the policy needs them to time a full 360 and to level the pitch."""

    def __init__(self, seed: int, turn_deg_per_frame: float = 24.0, look_deg_per_frame: float = 8.0,
                 max_pitch: float = 10.0):
        self.rng = np.random.default_rng(seed)
        self.turn_rate = turn_deg_per_frame
        self.look_rate = look_deg_per_frame
        self.max_pitch = max_pitch
        self.names = list(MODES)
        w = np.array([MODES[m][0] for m in self.names])
        self.weights = w / w.sum()
        self.mode, self.left, self.target = "stand", 0, np.zeros(4)
        self.prev_pose = None
        self.stuck_frames = 0
        self.look_phase = 0
        self.turn_left = 0

    def _start(self, mode: str) -> None:
        r = self.rng
        keys = r.random() < 0.5  # key-like full presses or continuous rates
        sign = lambda: float(r.choice([-1.0, 1.0]))  # noqa: E731
        mag = lambda lo=0.3: 1.0 if keys else float(r.uniform(lo, 1.0))  # noqa: E731
        t = np.zeros(4)
        _, lo, hi = MODES[mode]
        n = int(r.integers(lo, hi + 1)) if hi else 0
        if mode == "walk":
            t[0] = mag(0.5)
            t[2] = 0.0 if keys else r.normal(0, 0.08)
        elif mode in ("turn", "spin"):
            t[2] = sign() * mag(0.15)
            if mode == "spin":
                n = int(np.ceil(360.0 / (abs(t[2]) * self.turn_rate)))
        elif mode == "strafe":
            t[1] = sign() * mag()
            t[0] = 0.0 if r.random() < 0.6 else mag() * sign()
        elif mode == "backup":
            t[0] = -mag()
        elif mode == "walk_turn":
            t[0] = mag(0.4)
            t[2] = sign() * (1.0 if keys else r.uniform(0.1, 0.8))
        elif mode == "strafe_turn":  # circle-strafing
            t[1] = sign() * mag()
            t[2] = sign() * (1.0 if keys else r.uniform(0.1, 0.6))
        elif mode == "look":
            self.look_phase = 0
            t[3] = sign() * (1.0 if keys else r.uniform(0.3, 1.0))
        elif mode == "backtrack":
            t[2] = sign()
            self.turn_left = int(np.ceil(180.0 / self.turn_rate))
            t[0] = mag(0.6)
        self.mode, self.left, self.target = mode, max(n, 1), t

    def act(self, pose=None) -> np.ndarray:
        pose = None if pose is None else np.asarray(pose, dtype=np.float64)
        self._update_stuck(pose)
        if self.left <= 0:
            self._start(str(self.rng.choice(self.names, p=self.weights)))
        if self.stuck_frames > int(self.rng.integers(4, 12)) and self.mode not in ("backup", "turn"):
            # Pushed into a wall for a while: back off and turn away (the bump itself is recorded).
            self._start("backup" if self.rng.random() < 0.5 else "turn")
            self.stuck_frames = 0
        a = self.target.copy()
        if self.mode == "backtrack" and self.turn_left > 0:
            a[0] = 0.0  # turn around first, then walk back along where we came from
            self.turn_left -= 1
        elif self.mode == "backtrack":
            a[2] = 0.0
        if self.mode == "look":
            # Look away for the first half, then come back: pitch returns near level.
            if self.look_phase >= self.left:
                a[3] = -a[3]
            self.look_phase += 1
        elif pose is not None and abs(pose[4]) > 0.5:
            a[3] = float(np.clip(-pose[4] / self.look_rate, -1.0, 1.0))
        if pose is not None and abs(pose[4]) > self.max_pitch and np.sign(a[3]) == np.sign(pose[4]):
            a[3] = 0.0
        self.left -= 1
        self.prev_pose = pose
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def _update_stuck(self, pose) -> None:
        if pose is None or self.prev_pose is None:
            return
        moved = np.hypot(*(pose[:2] - self.prev_pose[:2]))
        pushing = abs(self.target[0]) > 0.3 or abs(self.target[1]) > 0.3
        self.stuck_frames = self.stuck_frames + 1 if (pushing and moved < 1.0) else 0
