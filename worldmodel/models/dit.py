"""WorldDiT: pose-conditioned diffusion transformer over latent tokens, one network with three modes.

Tokens are frame-major: a clip (B, T, C, h, w) becomes (B, T, N, D) with N = (h/p)(w/p) tokens per
frame. With `prev_frame_input` each frame's patches are embedded together with the previous frame's
latent at the same place (`prev`, zeros before the first frame): in every mode frame i's prev is frame
i-1 as that mode's attention sees it (the same block: its noisy input; an earlier block: the clean
context, i.e. the cache's last written frame when streaming). Each frame carries its own conditioning c = time_mlp(emb(1000 sigma)) + pose_mlp(pose) (or a
learned null pose), fed to every block through adaLN-Zero, so that frames at different noise levels
(teacher forcing, context noise) live in one sequence. The modes differ only in how a block attends
(a mask, or a KV cache); the blocks are the same code:

- forward(mode="bidirectional"): the whole clip (teacher, critic);
- forward(mode="causal", block_size): block-causal (AR diffusion);
- forward_teacher_forcing: [clean | noisy] with the same positions and teacher_forcing_mask;
- forward_cached: one block against a KVCache (streaming inference, DMD self-rollout).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from einops import rearrange

from worldmodel.config import DiTConfig
from worldmodel.models.attention import KVCache, attention, block_causal_mask, teacher_forcing_mask

Tensor = torch.Tensor
# attend(q, k, v) with q, k (B, H, L, hd) qk-normed but not rotated -> (B, H, Lq, hd)
Attend = Callable[[Tensor, Tensor, Tensor], Tensor]

# Name -> DiTConfig fields (head_dim divisible by 4 for 3-axis RoPE). Parameters for latents 16x12x16,
# patch 2 (48 tokens/frame); ms = StreamingGenerator frame (2 steps + cache write + decode with
# decoder_base_channels=16), batch 1, fp32, 2-core AVX2 EPYC shared with other jobs, cache 16 frames.
DIT_SIZES: dict[str, dict] = {
    "tiny": dict(dim=48, depth=2, heads=2),  # 0.11M, tests only
    "XXS": dict(dim=128, depth=4, heads=2),  # 1.3M, ~46 ms (~22 fps): the 2-core CPU size
    "XS": dict(dim=192, depth=6, heads=3),  # 4.2M, ~71 ms
    "S": dict(dim=256, depth=8, heads=4),  # 9.8M, ~130 ms
    "M": dict(dim=384, depth=8, heads=6),  # 22M (the DiTConfig default), ~215 ms
    "L": dict(dim=512, depth=12, heads=8),  # 58M, GPU
}


def dit_config(size: str, **overrides) -> DiTConfig:
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; known: {sorted(DIT_SIZES)}")
    return DiTConfig(**{**DIT_SIZES[size], **overrides})


def previous_frames(x: Tensor, before: Tensor | None = None) -> Tensor:
    """x (B, T, ...) -> (B, T, ...) whose frame i is x's frame i-1; frame 0 gets `before` (B, ...) or zeros."""
    first = torch.zeros_like(x[:, :1]) if before is None else before[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def timestep_embedding(t: Tensor, freqs: Tensor) -> Tensor:
    """Sinusoidal embedding of any-shaped t -> t.shape + (2 * len(freqs),), in float32."""
    args = t.float()[..., None] * freqs.float()
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs per axis (frame, row, col); time gets the remainder of an even 3-way split."""
    pairs = head_dim // 2
    spatial = pairs // 3
    return pairs - 2 * spatial, spatial, spatial


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, L, hd); cos, sin: (L, hd/2). Rotates pair (i, i + hd/2) by angle i."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RoPE3D:
    """Angles over (frame, row, col): spatial part precomputed, the frame part from given positions.

    Deliberately not an nn.Module with buffers: module.to(bfloat16) would round the frequencies, and the
    network must see the same angles in fp32 training and bf16 inference. Tables are float32 on the CPU
    and moved per device; cos/sin are cast to the compute dtype at the end.
    """

    def __init__(self, head_dim: int, rows: int, cols: int, theta: float) -> None:
        n_f, n_r, n_c = rope_split(head_dim)
        inv = lambda n: theta ** (-torch.arange(n, dtype=torch.float64) / max(n, 1))  # noqa: E731
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        self.inv_frame = inv(n_f)
        self.spatial = torch.cat([r.reshape(-1, 1) * inv(n_r), c.reshape(-1, 1) * inv(n_c)], dim=-1)  # (N, n_r+n_c)
        self._tables: dict = {}

    def __call__(self, frame_pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """frame_pos: (T,) -> cos, sin: (T*N, hd/2) on frame_pos.device, for frame-major tokens."""
        N, T = self.spatial.shape[0], len(frame_pos)
        temporal = frame_pos.detach().cpu().double()[:, None] * self.inv_frame  # (T, n_f)
        ang = torch.cat([temporal[:, None].expand(-1, N, -1), self.spatial[None].expand(T, -1, -1)], dim=-1)
        ang = ang.reshape(T * N, -1)
        return ang.cos().to(frame_pos.device, dtype), ang.sin().to(frame_pos.device, dtype)

    def table(self, frames: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin for positions 0..frames-1, memoised: streaming asks for the same few sizes every step.
        Built outside inference_mode so that a table made while generating can serve training later."""
        key = (frames, dtype, device)
        if key not in self._tables:
            with torch.inference_mode(False):
                self._tables[key] = self(torch.arange(frames, device=device), dtype)
        return self._tables[key]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, attend: Attend) -> Tensor:
        """x: (B, T, N, D) tokens; c: (B, T, D) per-frame conditioning."""
        B, T, N, D = x.shape
        sa, ca, ga, sm, cm, gm = self.ada(c)[:, :, None].chunk(6, dim=-1)  # each (B, T, 1, D)
        h = modulate(self.norm1(x), sa, ca)
        q, k, v = rearrange(self.qkv(h), "b t n (three h d) -> three b h (t n) d", three=3, h=self.heads)
        o = attend(self.q_norm(q), self.k_norm(k), v)
        x = x + ga * self.proj(rearrange(o, "b h (t n) d -> b t n (h d)", t=T))
        return x + gm * self.mlp(modulate(self.norm2(x), sm, cm))


class WorldDiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.dim, cfg.patch_size, cfg.latent_channels
        self.rows, self.cols = cfg.latent_height // p, cfg.latent_width // p
        self.tokens_per_frame = self.rows * self.cols
        self.head_dim = D // cfg.heads
        self.patch_embed = nn.Linear(C * p * p * (2 if cfg.prev_frame_input else 1), D)
        self.freq_dim = 256
        self._t_freqs = timestep_frequencies(self.freq_dim)  # float32 whatever the module dtype
        self.time_mlp = nn.Sequential(nn.Linear(self.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.pose_mlp = nn.Sequential(nn.Linear(cfg.pose_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.null_pose = nn.Parameter(torch.zeros(D))
        self.rope = RoPE3D(self.head_dim, self.rows, self.cols, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_linear = nn.Linear(D, C * p * p)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT recipe: xavier linears, N(0, .02) embeddings, adaLN and output zero -> each block starts
        # as the identity and the network outputs v = 0.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for mlp in (self.time_mlp, self.pose_mlp):
            for m in mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.null_pose, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for m in (self.final_ada[-1], self.final_linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _freqs_on(self, device: torch.device) -> Tensor:
        if self._t_freqs.device != device:
            with torch.inference_mode(False):  # may be first called while generating; serves training too
                self._t_freqs = self._t_freqs.to(device)
        return self._t_freqs

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- pieces shared by every mode -----

    def condition(self, sigma: Tensor, pose: Tensor, pose_keep: Tensor | None) -> Tensor:
        """sigma (B, T), pose (B, T, pose_dim) normalised, pose_keep (B, T) bool | None -> c (B, T, D)."""
        dtype = self.patch_embed.weight.dtype
        t = self.time_mlp(timestep_embedding(sigma * 1000.0, self._freqs_on(sigma.device)).to(dtype))
        pe = self.pose_mlp(pose.to(dtype))
        if pose_keep is not None:
            keep = pose_keep.reshape(pose_keep.shape + (1,) * (pe.ndim - pose_keep.ndim)).to(torch.bool)
            pe = torch.where(keep, pe, self.null_pose.to(dtype))
        return t + pe

    def _check(self, x: Tensor, sigma: Tensor | float, pose: Tensor) -> Tensor:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[2:] != (cfg.latent_channels, cfg.latent_height, cfg.latent_width):
            raise ValueError(
                f"WorldDiT expects latents (B, T, {cfg.latent_channels}, {cfg.latent_height}, "
                f"{cfg.latent_width}), got {tuple(x.shape)}"
            )
        if pose.shape != (*x.shape[:2], cfg.pose_dim):
            raise ValueError(f"WorldDiT pose must be (B, T, {cfg.pose_dim}) = {(*x.shape[:2], cfg.pose_dim)}, got {tuple(pose.shape)}")
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 1:  # one level per sample
            sigma = sigma[:, None]
        return sigma.expand(x.shape[:2])

    def forward_with(
        self, x: Tensor, sigma: Tensor, pose: Tensor, pose_keep: Tensor | None, make_attend: Callable[[int], Attend],
        prev: Tensor | None = None,
    ) -> Tensor:
        """The network body with attention supplied per layer: x (B, T, C, h, w) -> v (B, T, C, h, w).

        prev (B, T, C, h, w): each frame's previous frame (`previous_frames`), required with
        cfg.prev_frame_input and ignored without it."""
        sigma = self._check(x, sigma, pose)
        p = self.cfg.patch_size
        dtype = self.patch_embed.weight.dtype
        if self.cfg.prev_frame_input:
            if prev is None or prev.shape != x.shape:
                raise ValueError(f"WorldDiT with dit.prev_frame_input needs prev frames shaped like x {tuple(x.shape)}, "
                                 f"got {None if prev is None else tuple(prev.shape)}")
            x = torch.cat([x.to(dtype), prev.to(dtype)], dim=2)
        tok = rearrange(x.to(dtype), "b t c (hh p) (ww q) -> b t (hh ww) (c p q)", p=p, q=p)
        tok = self.patch_embed(tok)  # (B, T, N, D)
        c = self.condition(sigma, pose, pose_keep)
        for i, blk in enumerate(self.blocks):
            tok = blk(tok, c, make_attend(i))
        shift, scale = self.final_ada(c)[:, :, None].chunk(2, dim=-1)
        out = self.final_linear(modulate(self.final_norm(tok), shift, scale))
        return rearrange(out, "b t (hh ww) (c p q) -> b t c (hh p) (ww q)", hh=self.rows, p=p, q=p)

    def _masked_attend(self, frames: int, copies: int, mask: Tensor | None, device: torch.device) -> Callable[[int], Attend]:
        """Positions 0..frames-1, repeated `copies` times along the tokens (teacher forcing: 2)."""
        cos, sin = self.rope.table(frames, self.patch_embed.weight.dtype, device)
        cos, sin = cos.repeat(copies, 1), sin.repeat(copies, 1)

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)

        return lambda layer: attend

    # ----- modes -----

    def forward(
        self,
        x: Tensor,
        sigma: Tensor,
        pose: Tensor,
        *,
        mode: str = "bidirectional",
        block_size: int = 1,
        pose_keep: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, C, h, w) at noise sigma (B, T), pose (B, T, 5) normalised -> v (B, T, C, h, w)."""
        T = x.shape[1]
        if mode == "bidirectional":
            mask = None
        elif mode == "causal":
            mask = block_causal_mask(T, self.tokens_per_frame, block_size, x.device)
        else:
            raise ValueError(f"WorldDiT mode must be 'bidirectional' or 'causal', got {mode!r}")
        return self.forward_with(x, sigma, pose, pose_keep, self._masked_attend(T, 1, mask, x.device),
                                 previous_frames(x))

    def forward_teacher_forcing(
        self,
        x_clean: Tensor,
        sigma_clean: Tensor,
        x_noisy: Tensor,
        sigma_noisy: Tensor,
        pose: Tensor,
        *,
        block_size: int = 1,
        pose_keep: Tensor | None = None,
    ) -> Tensor:
        """[clean | noisy] in one sequence, same positions, teacher_forcing_mask -> v of the noisy half."""
        B, T = x_clean.shape[:2]
        dev = x_clean.device
        sig = lambda s: self._check(x_clean, s, pose)  # noqa: E731  (float, (B,) or (B, T) -> (B, T))
        x = torch.cat([x_clean, x_noisy], dim=1)
        sigma = torch.cat([sig(sigma_clean), sig(sigma_noisy)], dim=1)
        pose2 = torch.cat([pose, pose], dim=1)
        keep2 = None if pose_keep is None else torch.cat([pose_keep, pose_keep], dim=1)
        mask = teacher_forcing_mask(T, self.tokens_per_frame, block_size, dev)
        # A noisy block's first frame follows the clean context; later frames of a block follow its noisy frames.
        starts_block = (torch.arange(T, device=dev) % block_size == 0).view(1, T, 1, 1, 1)
        prev_clean = previous_frames(x_clean)
        prev = torch.cat([prev_clean, torch.where(starts_block, prev_clean, previous_frames(x_noisy))], dim=1)
        return self.forward_with(x, sigma, pose2, keep2, self._masked_attend(T, 2, mask, dev), prev)[:, T:]

    def new_cache(
        self, batch_size: int, cache_frames: int, sink_frames: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
        return KVCache(
            self.cfg.depth, batch_size, self.cfg.heads, self.head_dim, self.tokens_per_frame,
            cache_frames, sink_frames, device, dtype,
        )

    def forward_cached(
        self,
        x: Tensor,
        sigma: Tensor,
        pose: Tensor,
        cache: KVCache,
        *,
        write: bool,
        pose_keep: Tensor | None = None,
        block_size: int | None = None,
    ) -> Tensor:
        """One block x (B, Tb, C, h, w) attending to the cache's frames and (fully) to itself -> v.

        Positions: cached frames 0..n-1 (window-relative), the block n..n+Tb-1. write=True appends the
        block's un-rotated keys and values and advances the cache by Tb frames; the block's last frame
        becomes the previous frame of the next block (prev_frame_input).
        block_size: x holds several blocks of this many frames (a context prefill, the window not overflowing):
        each attends to the cache, to its own block and to the earlier blocks of x (block_causal_mask), so one
        call writes the same keys and values as one call per block.
        """
        Tb = x.shape[1]
        if x.shape[0] != cache.batch_size:
            raise ValueError(f"forward_cached: batch {x.shape[0]} != cache batch {cache.batch_size}; make a new cache")
        n = cache.frames_visible
        if block_size is not None and n + Tb > cache.cache_frames:
            raise ValueError(f"forward_cached: a prefill of {Tb} frames after {n} overflows the {cache.cache_frames}-frame "
                             "window; write the rest block by block")
        cos, sin = self.rope.table(n + Tb, self.patch_embed.weight.dtype, x.device)
        split = n * self.tokens_per_frame
        mask = None
        if block_size is not None and Tb > block_size:
            # Not the memoised mask: made here under inference mode, it would be an inference tensor in the cache
            # that training's forward(mode="causal") reads.
            inner = block_causal_mask.__wrapped__(Tb, self.tokens_per_frame, block_size, x.device)
            mask = torch.cat([inner.new_ones(inner.shape[0], split), inner], dim=1)
        cos_q, sin_q = cos[split:], sin[split:]

        # Without autograd the visible window is rotated once per block into buffers whose tail each
        # denoising call overwrites with its own keys (the same elementwise ops on the same values as the
        # cat-and-rotate path below: bit-identical). With autograd, in-place reuse would corrupt saved tensors.
        reuse = not torch.is_grad_enabled()

        def window(layer: int, like: Tensor) -> tuple[Tensor, Tensor]:
            ks, vs = cache.visible_parts(layer)
            B, H, _, hd = like.shape
            k_buf = like.new_empty(B, H, split + Tb * self.tokens_per_frame, hd)
            v_buf = torch.empty_like(k_buf)
            a = 0
            for kp, vp in zip(ks, vs):  # pieces in temporal order
                b = a + kp.shape[2]
                k_buf[:, :, a:b] = apply_rope(kp.to(like.dtype), cos[a:b], sin[a:b])
                v_buf[:, :, a:b] = vp
                a = b
            return k_buf, v_buf

        def make_attend(layer: int) -> Attend:
            def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
                if reuse:
                    key = (layer, Tb, k.dtype, torch.is_inference_mode_enabled())
                    k_all, v_all = cache.staged(key, lambda: window(layer, k))
                    k_all[:, :, split:] = apply_rope(k, cos_q, sin_q)
                    v_all[:, :, split:] = v
                else:
                    ks, vs = cache.visible_parts(layer)  # views in temporal order: one cat, one rotation
                    k_all = apply_rope(torch.cat([t.to(k.dtype) for t in ks] + [k], dim=2), cos, sin)
                    v_all = torch.cat([t.to(v.dtype) for t in vs] + [v], dim=2)
                out = attention(apply_rope(q, cos_q, sin_q), k_all, v_all, mask)
                if write:
                    cache.append(layer, k, v)
                return out

            return attend

        out = self.forward_with(x, sigma, pose, pose_keep, make_attend, previous_frames(x, cache.last_frame))
        if write:
            cache.advance(Tb, last_frame=x[:, -1])
        return out
