"""Image fidelity metrics in torch: PSNR, SSIM and image detail, per image, for frames in [-1, 1] or uint8.

Both take `(..., 3, H, W)` float in [-1, 1] (data range 2) and return one value per leading index,
so a caller can average over episodes or report percentiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def as_float(x: Tensor) -> Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]; float input is returned as float32."""
    if x.dtype == torch.uint8:
        return x.movedim(-1, -3).float().div(127.5).sub(1.0)
    return x.float()


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """x, y (..., 3, H, W) -> PSNR in dB (...,); identical images give +inf (callers may clamp)."""
    x, y = as_float(x), as_float(y)
    mse = (x - y).pow(2).flatten(-3).mean(-1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> Tensor:
    g = torch.exp(-((torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004, Gaussian 11x11 window, valid region), mean over
    channels and pixels: x, y (..., C, H, W) in [-1, 1] (or uint8 frames) -> (...,).

    Computed on intensities mapped to [0, 1]: SSIM's luminance term is not shift-invariant and is
    defined for non-negative intensities. The window shrinks for frames under 11 px."""
    x, y = (as_float(x) + 1) / 2, (as_float(y) + 1) / 2
    data_range = 1.0
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    x, y = x.reshape(-1, c, h, w), y.reshape(-1, c, h, w)
    window = min(window, h, w)
    k = _gaussian_window(window, sigma, c, x.device, x.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = lambda t: F.conv2d(t, k, groups=c)  # noqa: E731
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(-1).reshape(lead)


def detail(x: Tensor) -> Tensor:
    """Mean image-gradient magnitude (forward differences, both axes, all channels) of x (..., 3, H, W) in
    [-1, 1] (or uint8 frames) -> (...,). A blurred frame has less of it than the engine's: the ratio of the
    two tells blur apart from error, which PSNR does not (a blurry mean frame scores well on PSNR)."""
    x = as_float(x)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(-3).mean(-1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(-3).mean(-1)
    return 0.5 * (dx + dy)
