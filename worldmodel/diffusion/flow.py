"""Rectified-flow schedule and samplers: functions over tensors and model closures.

Convention (DESIGN §3): `x_t = (1 - s) x0 + s eps`, the network predicts `v = eps - x0`, so
`x0 = x_t - s v`. `s` (sigma) runs from 1 (pure noise) to 0 (data). The network never sees this file;
samplers take closures `v_fn(x_t, sigma) -> v` or `x0_fn(x_t, sigma) -> x0` where `sigma` is a Python
float (one noise level for the whole call; the closure broadcasts it to the shape the model wants).
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor
VFn = Callable[[Tensor, float], Tensor]


def _bc(sigma: Tensor | float, x: Tensor) -> Tensor | float:
    """Broadcast a per-sample/per-frame sigma (leading dims of x) against x by adding trailing dims."""
    if not isinstance(sigma, Tensor) or sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)).to(x.dtype)


def shift_sigma(s: Tensor | float, shift: float) -> Tensor | float:
    """Timestep shift s' = k s / (1 + (k - 1) s): k > 1 moves steps toward high noise; s=0,1 fixed."""
    return shift * s / (1 + (shift - 1) * s)


def add_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    sigma = _bc(sigma, x0)
    return (1 - sigma) * x0 + sigma * eps


def x0_from_v(x_t: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    return x_t - _bc(sigma, x_t) * v


def v_from_x0(x_t: Tensor, x0: Tensor, sigma: Tensor | float) -> Tensor:
    """Inverse of x0_from_v; undefined at sigma = 0 (callers never ask for v of clean data)."""
    return (x_t - x0) / _bc(sigma, x_t)


def v_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The flow-matching regression target."""
    return eps - x0


def sigma_grid(n: int, shift: float) -> Tensor:
    """(n+1,) float32 noise levels from 1 to 0: n uniform steps in s, then shifted (Euler grid)."""
    if n < 1:
        raise ValueError(f"sigma_grid needs n >= 1 steps, got {n}")
    return shift_sigma(torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64), shift).float()


_STEP_LISTS = {1: [1.0], 2: [1.0, 0.5], 4: [1.0, 0.75, 0.5, 0.25]}


def step_sigmas(k: int, shift: float) -> list[float]:
    """The few-step student's k noise levels (k in 1, 2, 4), shifted, WITHOUT a trailing 0.

    Each level is one network call (predict x0); few_step_sample re-noises to the next level and
    returns the last x0. Unshifted lists: 1 -> {1}, 2 -> {1, .5}, 4 -> {1, .75, .5, .25} (DESIGN §4b).
    """
    if k not in _STEP_LISTS:
        raise ValueError(f"step_sigmas supports k in {sorted(_STEP_LISTS)}, got {k}")
    return [float(shift_sigma(s, shift)) for s in _STEP_LISTS[k]]


@torch.no_grad()
def euler_sample(v_fn: VFn, x: Tensor, sigmas: Tensor | list[float]) -> Tensor:
    """Probability-flow ODE from sigmas[0] to sigmas[-1] (usually a sigma_grid, ending at 0).

    x is the state at sigmas[0] (pure noise when sigmas[0] == 1). Rectified-flow paths are straight,
    so dx/ds = v exactly and one Euler step is x + (s_next - s) v.
    """
    sig = [float(s) for s in sigmas]
    for s, s_next in zip(sig[:-1], sig[1:]):
        x = x + (s_next - s) * v_fn(x, s)
    return x


@torch.no_grad()
def few_step_sample(
    x0_fn: Callable[[Tensor, float], Tensor],
    eps: Tensor,
    sigmas: Tensor | list[float],
    noise_fn: Callable[[], Tensor],
) -> Tensor:
    """Consistency-style sampling: predict x0 at each level, re-noise it with FRESH noise to the next.

    eps is the state at sigmas[0] (pure noise at 1.0). A trailing 0 in sigmas is ignored (no call at
    sigma 0: the last x0 prediction is the sample). noise_fn() returns a new eps shaped like eps; draw it
    from a torch.Generator for determinism.
    """
    sig = [float(s) for s in sigmas]
    if sig and sig[-1] == 0.0:
        sig = sig[:-1]
    if not sig:
        raise ValueError("few_step_sample needs at least one sigma > 0")
    x = eps
    x0 = eps
    for i, s in enumerate(sig):
        x0 = x0_fn(x, s)
        if i + 1 < len(sig):
            x = add_noise(x0, noise_fn(), sig[i + 1])
    return x0


def guided(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on one condition; scale 1 returns v_cond."""
    return v_uncond + scale * (v_cond - v_uncond)


def guided_v(v_fn_cond: VFn, v_fn_uncond: VFn, scale: float) -> VFn:
    """Guidance as a closure over two v closures (skips the unconditional call at scale 1)."""
    if scale == 1.0:
        return v_fn_cond

    def v_fn(x_t: Tensor, sigma: float) -> Tensor:
        return guided(v_fn_cond(x_t, sigma), v_fn_uncond(x_t, sigma), scale)

    return v_fn


def sample_train_sigma(
    shape: tuple[int, ...] | torch.Size,
    shift: float,
    generator: torch.Generator | None = None,
    *,
    dist: str = "uniform",
    device: torch.device | str | None = None,
) -> Tensor:
    """Training noise levels in (0, 1), drawn then shifted by the same shift as the sampling grids.

    dist="uniform": u ~ U(0, 1) (after the shift this matches where the shifted grid puts its steps);
    dist="logit_normal": u = sigmoid(N(0, 1)) (SD3's choice; concentrates on the middle). Clamped away
    from exactly 0 and 1 so that v_from_x0 and the x0 weighting stay finite.
    """
    if device is None and generator is not None:
        device = generator.device
    if dist == "uniform":
        u = torch.rand(shape, generator=generator, device=device)
    elif dist == "logit_normal":
        u = torch.sigmoid(torch.randn(shape, generator=generator, device=device))
    else:
        raise ValueError(f"sample_train_sigma dist must be 'uniform' or 'logit_normal', got {dist!r}")
    return shift_sigma(u, shift).clamp(1e-5, 1 - 1e-5)

