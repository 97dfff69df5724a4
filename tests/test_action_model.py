import numpy as np
import pytest
import torch

from data_tools.action_model import ActionModel, rmse_one_step, rmse_open_loop, rotate_prev
from data_tools.poses import pose_deltas


def simulate(n_eps=4, n=300, seed=0):
    """Doom-like kinematics: world-frame velocity with friction, thrust along the new heading,
    recorded as absolute poses and turned into deltas like the recorder does."""
    rng = np.random.default_rng(seed)
    acts, dels, starts = [], [], []
    for e in range(n_eps):
        a = np.repeat(rng.uniform(-1, 1, (n // 10, 4)), 10, axis=0).astype(np.float32)
        a[rng.random(len(a)) < 0.3, 2] = 0.0
        pos, vel, yaw, pitch = np.zeros(3), np.zeros(2), 0.0, 0.0
        poses = []
        for t in range(n):
            yaw += 20.0 * a[t, 2]
            pitch = pitch + 1.5 * a[t, 3]  # no clamp: a linear model cannot know the limit
            c, s = np.cos(np.radians(yaw)), np.sin(np.radians(yaw))
            thrust = 12.0 * a[t, 0] * np.array([c, s]) + 9.0 * a[t, 1] * np.array([s, -c])
            vel = 0.6 * vel + thrust
            pos[:2] += vel
            poses.append([pos[0], pos[1], 0.0, yaw % 360, pitch])
        starts.append(sum(len(x) for x in acts))
        acts.append(a), dels.append(pose_deltas(np.array(poses)))
    return np.concatenate(acts), np.concatenate(dels), starts


def test_fit_recovers_momentum_and_gains():
    acts, dels, starts = simulate()
    m = ActionModel.fit(acts, dels, starts, frame="rotated")
    assert m.A[0] == pytest.approx(0.6, abs=0.08) and m.A[1] == pytest.approx(0.6, abs=0.08)
    assert m.B[3, 2] == pytest.approx(20.0, abs=0.5)  # dyaw per unit turn
    assert m.B[0, 0] == pytest.approx(12.0, abs=1.5) and m.B[1, 1] == pytest.approx(9.0, abs=1.5)
    assert m.B[4, 3] == pytest.approx(1.5, abs=0.05)


def test_rotated_state_fits_better_than_previous_frame_when_turning():
    acts, dels, starts = simulate(seed=1)
    test = simulate(n_eps=2, seed=2)
    err = {f: rmse_one_step(ActionModel.fit(acts, dels, starts, frame=f), *test)[:2].sum()
           for f in ("previous", "rotated")}
    assert err["rotated"] < 0.92 * err["previous"], err
    m = ActionModel.fit(acts, dels, starts, frame="rotated")
    ol = rmse_open_loop(m, *test, horizon=32)
    assert ol[3] < 1.0 and ol[0] < 0.5 * dels[:, 0].std(), ol


def test_predict_numpy_and_torch_agree_and_json_round_trip():
    acts, dels, starts = simulate(n_eps=2)
    m = ActionModel.fit(acts, dels, starts)
    m2 = ActionModel.from_json(m.to_json())
    prev, a = dels[10:42], acts[11:43]
    out_np = m2.predict(prev, a)
    out_t = m2.predict(torch.from_numpy(prev).double(), torch.from_numpy(a))
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (32, 5)
    np.testing.assert_allclose(out_np, m.predict(prev, a), rtol=1e-6)
    np.testing.assert_allclose(out_t.numpy(), out_np, rtol=1e-5, atol=1e-5)
    roll = m.rollout(dels[10], acts[11:21])
    assert roll.shape == (10, 5)
    np.testing.assert_allclose(roll[0], out_np[0], rtol=1e-5, atol=1e-5)


def test_rotate_prev_is_a_frame_change():
    # Moving forward 10 then turning left 90: that motion is to the right (strafe +10) in the new frame.
    out = rotate_prev(np.array([[10.0, 0, 0, 90.0, 0]]))
    np.testing.assert_allclose(out[0], [0, 10, 0, 90, 0], atol=1e-9)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="record more"):
        ActionModel.fit(np.zeros((5, 4)), np.zeros((5, 5)))
