"""Analytic cost of generating frames: FLOPs and bytes moved, from the configs alone.

What is counted: FLOPs of every matmul and convolution (2 per multiply-add: linears, attention's
Q K^T and A V, the decoder's convolutions); norms, activations, RoPE, softmax and upsampling are left
out (a few % of the total at these widths). Bytes: the weights each network call reads once (however
many worlds are batched) plus the KV cache it reads and writes; activations are left out (they stay in
cache at batch 1 and are what a fused kernel would keep on chip). The floor time of a piece of work is
max(FLOPs / peak FLOP/s, bytes / bandwidth): no implementation on that machine can beat it.

Shapes follow worldmodel.models.dit.WorldDiT and worldmodel.models.autoencoder.Decoder; tests check the
counts against torch's FLOP counter and the modules' parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from worldmodel.config import AutoencoderConfig, DiTConfig
from worldmodel.models.autoencoder import LEVELS, level_channels

FREQ_DIM = 256  # WorldDiT's sinusoidal timestep embedding width


@dataclass(frozen=True)
class Cost:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes * k)

    __rmul__ = __mul__

    def floor_s(self, peak_flops: float, bandwidth: float) -> float:
        """Seconds at least: compute-bound or memory-bound, whichever is slower."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def _patch_in(cfg: DiTConfig) -> int:
    """Inputs of the patch embedding per token: the frame's patch (and its previous frame's, prev_frame_input)."""
    return cfg.latent_channels * cfg.patch_size**2 * (2 if cfg.prev_frame_input else 1)


def dit_params(cfg: DiTConfig) -> int:
    D, cpp, hidden = cfg.dim, cfg.latent_channels * cfg.patch_size**2, int(cfg.dim * cfg.mlp_ratio)
    lin = lambda i, o: i * o + o  # noqa: E731  weight + bias
    block = lin(D, 3 * D) + lin(D, D) + lin(D, hidden) + lin(hidden, D) + lin(D, 6 * D)
    if cfg.qk_norm:
        block += 2 * (D // cfg.heads)  # RMSNorm weights of q and k
    embed = lin(_patch_in(cfg), D) + lin(FREQ_DIM, D) + lin(D, D) + lin(cfg.pose_dim, D) + lin(D, D) + D  # + null pose
    return embed + cfg.depth * block + lin(D, 2 * D) + lin(D, cpp)


def dit_call(cfg: DiTConfig, batch: int, frames: int, visible_frames: int, bytes_per_el: int, *, write: bool = False) -> Cost:
    """One WorldDiT forward over `frames` new frames per world that attend to `visible_frames` cached
    frames and to each other (forward_cached; an uncached bidirectional forward over a window of W
    frames is frames=W, visible_frames=0). write=True also writes the block's keys/values to the cache."""
    D, N = cfg.dim, cfg.tokens_per_frame
    cpp, hidden = cfg.latent_channels * cfg.patch_size**2, int(cfg.dim * cfg.mlp_ratio)
    rows = batch * frames  # one conditioning vector per frame
    tokens = rows * N
    keys = (visible_frames + frames) * N  # per world
    per_token = 2 * (_patch_in(cfg) * D + D * cpp) + cfg.depth * 2 * (3 * D * D + D * D + 2 * D * hidden)
    per_row = 2 * (FREQ_DIM * D + D * D + cfg.pose_dim * D + D * D) + cfg.depth * 2 * 6 * D * D + 2 * 2 * D * D
    attn = cfg.depth * 2 * 2 * tokens * keys * D  # Q K^T and A V over all heads (heads * head_dim = D)
    flops = tokens * per_token + rows * per_row + attn
    kv_read = cfg.depth * 2 * batch * visible_frames * N * D
    kv_write = cfg.depth * 2 * batch * frames * N * D if write else 0
    return Cost(float(flops), float(bytes_per_el * (dit_params(cfg) + kv_read + kv_write)))


def _decoder_convs(cfg: AutoencoderConfig, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(c_in, c_out, kernel, output pixels) of every Decoder convolution, in order."""
    ch = level_channels(cfg.decoder_base_channels)[::-1]  # 1/8 -> full resolution
    h, w = height >> LEVELS, width >> LEVELS
    convs = [(cfg.latent_channels, ch[0], 3, h * w)]
    for i in range(LEVELS + 1):
        convs += [(ch[i], ch[i], 3, h * w)] * (2 * cfg.blocks_per_level)  # ResBlocks (no skip conv: cin == cout)
        if i < LEVELS:
            h, w = 2 * h, 2 * w
            convs.append((ch[i], ch[i + 1], 3, h * w))
    convs.append((ch[-1], cfg.image_channels, 3, h * w))
    return convs


def decoder_params(cfg: AutoencoderConfig) -> int:
    ch = level_channels(cfg.decoder_base_channels)
    norms = sum(2 * c * 2 * cfg.blocks_per_level for c in ch) + 2 * ch[0]  # GroupNorm affine, 2 per ResBlock + final
    return sum(ci * co * k * k + co for ci, co, k, _ in _decoder_convs(cfg, 8, 8)) + norms


def decoder_cost(cfg: AutoencoderConfig, frames: int, height: int, width: int, bytes_per_el: int) -> Cost:
    """Decoding `frames` latents to (height, width) images in one call."""
    flops = sum(2 * ci * co * k * k * px for ci, co, k, px in _decoder_convs(cfg, height, width))
    return Cost(float(frames * flops), float(bytes_per_el * decoder_params(cfg)))


def streaming_block(dit: DiTConfig, ae: AutoencoderConfig, *, steps: int, block_size: int, cache_frames: int,
                    batch: int, height: int, width: int, bytes_per_el: int) -> Cost:
    """One StreamingGenerator block in steady state (full cache window): `steps` denoising calls, one
    cache-write call, then decoding batch * block_size frames."""
    call = lambda write: dit_call(dit, batch, block_size, cache_frames, bytes_per_el, write=write)  # noqa: E731
    return steps * call(False) + call(True) + decoder_cost(ae, batch * block_size, height, width, bytes_per_el)


def teacher_frame(dit: DiTConfig, ae: AutoencoderConfig, *, euler_steps: int, window: int, batch: int,
                  height: int, width: int, bytes_per_el: int) -> Cost:
    """One frame of worldmodel.eval.WindowedEulerGenerator in steady state: `euler_steps` uncached
    forwards over the whole window (window - 1 context frames + the new one), then one decode."""
    call = dit_call(dit, batch, window, 0, bytes_per_el)
    return euler_steps * call + decoder_cost(ae, batch, height, width, bytes_per_el)
