import numpy as np
import pytest
import torch

from data_tools.poses import integrate_deltas, pose_deltas, wrap_degrees


def test_wrap_degrees_range_and_359_to_1():
    assert wrap_degrees(180.0) == 180.0
    assert wrap_degrees(-180.0) == 180.0
    assert wrap_degrees(540.0) == 180.0
    assert wrap_degrees(1.0 - 359.0) == pytest.approx(2.0)
    assert wrap_degrees(359.0 - 1.0) == pytest.approx(-2.0)
    a = wrap_degrees(np.linspace(-1000, 1000, 2001))
    assert a.min() > -180.0 and a.max() <= 180.0


def test_yaw_wrap_359_to_1_is_small_left_turn():
    poses = np.array([[0, 0, 0, 359.0, 0], [0, 0, 0, 1.0, 0]], np.float32)
    d = pose_deltas(poses)
    assert d[0].tolist() == [0, 0, 0, 0, 0]
    assert d[1, 3] == pytest.approx(2.0, abs=1e-5)


def test_conventions_forward_strafe_up():
    # Facing 90 deg (Doom: +y), walking forward moves +y; the right-hand side is +x.
    poses = np.array([[0, 0, 0, 90, 0], [0, 10, 0, 90, 0], [5, 10, 2, 90, 3]], np.float32)
    d = pose_deltas(poses)
    np.testing.assert_allclose(d[1], [10, 0, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(d[2], [0, 5, 2, 0, 3], atol=1e-5)  # +x is to the right: strafe +5
    # Facing 0 (+x): a step to -y is to the right.
    d = pose_deltas(np.array([[0, 0, 0, 0, 0], [0, -4, 0, 0, 0]], np.float32))
    np.testing.assert_allclose(d[1], [0, 4, 0, 0, 0], atol=1e-5)


def test_delta_is_in_previous_camera_frame():
    # Turn 90 left and step along the new facing in the same frame: in the previous frame (facing +x)
    # a step to +y is to the left, i.e. strafe -1.
    d = pose_deltas(np.array([[0, 0, 0, 0, 0], [0, 1, 0, 90, 0]], np.float32))
    np.testing.assert_allclose(d[1], [0, -1, 0, 90, 0], atol=1e-5)


def test_round_trip_random_trajectories():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 200
        deltas = np.c_[rng.normal(0, 10, (n, 3)), rng.uniform(-30, 30, n), rng.uniform(-3, 3, n)]
        deltas[0] = 0
        start = np.array([rng.uniform(-1000, 1000), rng.uniform(-1000, 1000), 0, rng.uniform(0, 360), 0])
        poses = integrate_deltas(start, deltas)
        np.testing.assert_allclose(poses[0], start, atol=1e-3)
        back = pose_deltas(poses)
        np.testing.assert_allclose(back[1:, :3], deltas[1:, :3], atol=2e-2)
        np.testing.assert_allclose(back[1:, 3:], deltas[1:, 3:], atol=1e-3)
        again = integrate_deltas(poses[0], back)
        np.testing.assert_allclose(again[:, :3], poses[:, :3], atol=0.1)
        assert np.abs(wrap_degrees(again[:, 3] - poses[:, 3])).max() < 1e-2


def test_accepts_torch():
    poses = torch.tensor([[0, 0, 0, 90, 0], [0, 10, 0, 90, 0]], dtype=torch.float32)
    np.testing.assert_allclose(pose_deltas(poses)[1], [10, 0, 0, 0, 0], atol=1e-5)


def test_bad_shape_raises():
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        pose_deltas(np.zeros((3, 4)))
