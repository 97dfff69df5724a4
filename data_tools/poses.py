"""Absolute camera poses <-> relative pose deltas (the model's conditioning signal).

Absolute pose per frame: `(x, y, z, yaw_deg, pitch_deg)` in Doom map units and degrees. Yaw is
counter-clockwise from +x seen from above (Doom's ANGLE), pitch is positive when looking up (the
recorder flips the engine's PITCH, which is negative up).

Delta of frame i: motion from frame i-1 to frame i expressed in frame i-1's camera:
`(forward, strafe, up, dyaw, dpitch)`, strafe positive to the right, angles wrapped to (-180, 180].
The translation frame is the yaw-only (horizontal) camera frame: Doom moves the player on the
floor plane whatever the pitch, so rotating by pitch would only mix vertical motion into "forward".
Frame 0 of a sequence has delta 0. `integrate_deltas` is the exact inverse of `pose_deltas`.

Numpy in and out; torch tensors are accepted through `np.asarray` (detach/cpu first).
"""

from __future__ import annotations

import numpy as np

POSE_DIM = 5
DELTA_NAMES = ("forward", "strafe", "up", "dyaw", "dpitch")


def wrap_degrees(angle):
    """Wrap degrees to (-180, 180]. Works elementwise on scalars and arrays."""
    a = np.asarray(angle, dtype=np.float64)
    wrapped = -((-a + 180.0) % 360.0) + 180.0  # maps -180 to +180, keeps (-180, 180]
    return wrapped if wrapped.ndim else float(wrapped)


def _check(poses: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(poses, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != POSE_DIM:
        raise ValueError(f"{name} must have shape (N, {POSE_DIM}), got {arr.shape}")
    return arr


def pose_deltas(poses) -> np.ndarray:
    """poses: (N, 5) absolute -> deltas: (N, 5) float32, frame 0 = 0."""
    p = _check(poses, "poses")
    out = np.zeros_like(p)
    if len(p) > 1:
        d = p[1:, :3] - p[:-1, :3]
        yaw = np.radians(p[:-1, 3])
        c, s = np.cos(yaw), np.sin(yaw)
        out[1:, 0] = d[:, 0] * c + d[:, 1] * s  # forward = along the previous facing
        out[1:, 1] = d[:, 0] * s - d[:, 1] * c  # right of a CCW yaw is (sin, -cos)
        out[1:, 2] = d[:, 2]
        out[1:, 3] = wrap_degrees(p[1:, 3] - p[:-1, 3])
        out[1:, 4] = wrap_degrees(p[1:, 4] - p[:-1, 4])
    return out.astype(np.float32)


def integrate_deltas(start_pose, deltas) -> np.ndarray:
    """Inverse of `pose_deltas`: start_pose (5,) is frame 0's pose, deltas (N, 5) with deltas[0]
    ignored (it is 0 by definition). Returns poses (N, 5) float32 with yaw/pitch wrapped to
    [0, 360) and (-180, 180] respectively, yaw in Doom's [0, 360) like the engine reports it."""
    d = _check(deltas, "deltas")
    start = np.asarray(start_pose, dtype=np.float64).reshape(POSE_DIM)
    n = len(d)
    poses = np.zeros((n, POSE_DIM), dtype=np.float64)
    if n == 0:
        return poses.astype(np.float32)
    # Yaw/pitch unwrapped by cumulative sums so the translation uses the exact previous yaw.
    yaw = start[3] + np.concatenate([[0.0], np.cumsum(d[1:, 3])])
    pitch = start[4] + np.concatenate([[0.0], np.cumsum(d[1:, 4])])
    r = np.radians(yaw[:-1])
    c, s = np.cos(r), np.sin(r)
    dx = d[1:, 0] * c + d[1:, 1] * s
    dy = d[1:, 0] * s - d[1:, 1] * c
    poses[:, 0] = start[0] + np.concatenate([[0.0], np.cumsum(dx)])
    poses[:, 1] = start[1] + np.concatenate([[0.0], np.cumsum(dy)])
    poses[:, 2] = start[2] + np.concatenate([[0.0], np.cumsum(d[1:, 2])])
    poses[:, 3] = np.mod(yaw, 360.0)
    poses[:, 4] = wrap_degrees(pitch)
    return poses.astype(np.float32)
