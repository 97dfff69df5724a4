"""Flow-matching schedule and samplers on toy flows whose exact answer is known in closed form."""

import math

import pytest
import torch

from worldmodel.diffusion.flow import (
    add_noise,
    euler_sample,
    few_step_sample,
    guided,
    guided_v,
    sample_train_sigma,
    shift_sigma,
    sigma_grid,
    step_sigmas,
    v_from_x0,
    x0_from_v,
)

# Toy data: x0 ~ N(m, var) per dimension. Then x_s = (1-s) x0 + s eps is Gaussian and the ideal
# denoiser is the posterior mean E[x0 | x_s] = m + a(s) (x_s - (1-s) m), a(s) = (1-s) var / V(s),
# V(s) = (1-s)^2 var + s^2; the ideal velocity is v = (x_s - E[x0|x_s]) / s.
M, VAR = 1.5, 0.25


def ideal_x0(x: torch.Tensor, s: float, m: float = M, var: float = VAR) -> torch.Tensor:
    a = (1 - s) * var / ((1 - s) ** 2 * var + s**2)
    return m + a * (x - (1 - s) * m)


def ideal_v(x: torch.Tensor, s: float, m: float = M, var: float = VAR) -> torch.Tensor:
    return v_from_x0(x, ideal_x0(x, s, m, var), s)


def test_shift_and_grids():
    assert shift_sigma(0.0, 3.0) == 0.0 and shift_sigma(1.0, 3.0) == 1.0
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    g = sigma_grid(48, 3.0)
    assert g.shape == (49,) and g[0] == 1.0 and g[-1] == 0.0 and (g[1:] < g[:-1]).all()
    assert step_sigmas(1, 3.0) == [1.0]
    assert step_sigmas(2, 3.0) == pytest.approx([1.0, 0.75])
    assert step_sigmas(4, 1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert step_sigmas(4, 3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5])
    with pytest.raises(ValueError, match="k in"):
        step_sigmas(3, 3.0)


def test_parameterisation_round_trip():
    x0, eps = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    sigma = torch.rand(4, 3)  # per-frame sigma broadcast over trailing dims
    xt = add_noise(x0, eps, sigma)
    v = eps - x0
    torch.testing.assert_close(x0_from_v(xt, v, sigma), x0)
    torch.testing.assert_close(v_from_x0(xt, x0, sigma), v)


def test_point_mass_every_sampler_returns_the_point():
    c = torch.tensor([0.3, -1.2, 2.0])
    x0_fn = lambda x, s: c.expand_as(x)  # noqa: E731  (the exact denoiser of a point mass)
    v_fn = lambda x, s: (x - c) / s  # noqa: E731
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(64, 3, generator=g)
    torch.testing.assert_close(euler_sample(v_fn, eps, sigma_grid(48, 3.0)), c.expand_as(eps), atol=1e-5, rtol=0)
    # Straight paths: even 2 Euler steps are exact.
    torch.testing.assert_close(euler_sample(v_fn, eps, sigma_grid(2, 3.0)), c.expand_as(eps), atol=1e-5, rtol=0)
    for k in (1, 2, 4):
        out = few_step_sample(x0_fn, eps, step_sigmas(k, 3.0), lambda: torch.randn(64, 3, generator=g))
        torch.testing.assert_close(out, c.expand_as(eps))


def test_euler_transports_noise_to_the_gaussian_exactly():
    # The PF-ODE of a Gaussian is the monotone map eps -> m + sqrt(var) eps; a fine Euler grid on the
    # ideal velocity must reproduce it per sample (not only in distribution).
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(20000, dtype=torch.float64, generator=g)
    exact = M + math.sqrt(VAR) * eps
    err = {n: (euler_sample(ideal_v, eps, sigma_grid(n, 3.0).double()) - exact).abs().max().item() for n in (200, 800)}
    assert err[800] < 0.01  # max over 20k samples out to |eps| ~ 4
    assert err[800] < 0.3 * err[200]  # first-order convergence toward the exact map
    out = euler_sample(ideal_v, eps, sigma_grid(800, 3.0).double())
    assert out.mean().item() == pytest.approx(M, abs=0.02)
    assert out.var().item() == pytest.approx(VAR, rel=0.05)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_few_step_sampler_moments_match_closed_form(k):
    # Predict-x0 / re-noise with fresh noise keeps everything Gaussian, so its output variance follows a
    # recursion: var(x_1) = 1; var(x0_i) = a_i^2 var(x_i); var(x_{i+1}) = (1-s_{i+1})^2 var(x0_i) + s_{i+1}^2.
    sig = step_sigmas(k, 3.0)
    var_x, expect = 1.0, None
    for i, s in enumerate(sig):
        a = (1 - s) * VAR / ((1 - s) ** 2 * VAR + s**2)
        expect = a * a * var_x
        if i + 1 < len(sig):
            var_x = (1 - sig[i + 1]) ** 2 * expect + sig[i + 1] ** 2
    g = torch.Generator().manual_seed(2)
    n = 200000
    eps = torch.randn(n, dtype=torch.float64, generator=g)
    out = few_step_sample(ideal_x0, eps, sig, lambda: torch.randn(n, dtype=torch.float64, generator=g))
    assert out.mean().item() == pytest.approx(M, abs=0.01)
    assert out.var().item() == pytest.approx(expect, rel=0.03, abs=1e-12)
    if k == 1:
        # One step from pure noise is the posterior mean at s=1: the data mean, exactly (DESIGN §5).
        torch.testing.assert_close(out, torch.full_like(out, M))
    else:
        assert 0 < expect < VAR  # the few-step sampler under-disperses; fresh noise keeps it above 0


def test_few_step_sampler_is_deterministic_given_generator():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(100, generator=g)
        return few_step_sample(ideal_x0, eps, step_sigmas(4, 3.0), lambda: torch.randn(100, generator=g))

    torch.testing.assert_close(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


def test_guidance():
    vc, vu = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(guided(vc, vu, 1.0), vc)
    torch.testing.assert_close(guided(vc, vu, 0.0), vu)
    torch.testing.assert_close(guided(vc, vu, 3.0), vu + 3 * (vc - vu))
    fn = guided_v(lambda x, s: x + 1, lambda x, s: x * 0, 2.0)
    torch.testing.assert_close(fn(torch.ones(3), 0.5), torch.full((3,), 4.0))


@pytest.mark.parametrize("dist", ["uniform", "logit_normal"])
def test_train_sigma_distribution(dist):
    g = torch.Generator().manual_seed(0)
    s = sample_train_sigma((100000,), 3.0, g, dist=dist)
    assert s.shape == (100000,) and (s > 0).all() and (s < 1).all()
    # Both draws are symmetric around u = 0.5 before the shift, so the median is shift_sigma(0.5).
    assert s.median().item() == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ValueError, match="dist"):
        sample_train_sigma((3,), 3.0, dist="beta")
