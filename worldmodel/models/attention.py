"""One attention function, the cached block masks of the training modes, and the streaming KV cache.

Masks are boolean (L_q, L_k) with True = "may attend" (SDPA's convention). Tokens are frame-major:
token index = frame * tokens_per_frame + token-in-frame; frames are grouped into blocks of
`block_size` frames counted from frame 0.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

try:  # flash-attn is an optional GPU extra (setup.cfg [gpu]); SDPA is always there.
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a wheel built against another torch/CUDA
    _flash_attn_func = None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """q: (B, H, Lq, hd), k/v: (B, H, Lk, hd), mask: bool (Lq, Lk) (or any shape that broadcasts to (B, H, Lq, Lk))
    or None -> (B, H, Lq, hd)."""
    if (
        _flash_attn_func is not None
        and mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        # flash-attn wants (B, L, H, hd).
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _frame_blocks(frames: int, block_size: int, device: torch.device) -> Tensor:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return torch.arange(frames, device=device) // block_size


@functools.lru_cache(maxsize=64)
def block_causal_mask(frames: int, tokens_per_frame: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(T*N, T*N) bool: a token sees every token of its own block and of earlier blocks."""
    device = torch.device(device)
    blk = _frame_blocks(frames, block_size, device).repeat_interleave(tokens_per_frame)
    return blk[:, None] >= blk[None, :]


@functools.lru_cache(maxsize=64)
def teacher_forcing_mask(frames: int, tokens_per_frame: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(2T*N, 2T*N) bool over [clean frames 0..T-1, noisy frames 0..T-1] (DESIGN §4, stage 2).

    clean -> clean: block-causal (own block and earlier); clean -> noisy: never;
    noisy block i -> clean blocks < i, and -> noisy block i only.
    """
    device = torch.device(device)
    blk = _frame_blocks(frames, block_size, device).repeat_interleave(tokens_per_frame)
    q, k = blk[:, None], blk[None, :]
    clean_clean = q >= k
    clean_noisy = torch.zeros_like(clean_clean)
    noisy_clean = q > k
    noisy_noisy = q == k
    top = torch.cat([clean_clean, clean_noisy], dim=1)
    bottom = torch.cat([noisy_clean, noisy_noisy], dim=1)
    return torch.cat([top, bottom], dim=0)


class KVCache:
    """Per-layer static K/V buffers for streaming: `sink_frames` kept forever + a ring of recent frames.

    Buffers: (B, heads, cache_frames * tokens_per_frame, head_dim) per layer for K and V. K is stored
    UN-ROTATED (after qk-norm, before RoPE) so that the network can give the visible frames positions
    relative to the window: sinks 0..s-1, then the recent frames consecutively, the current block after
    them. Positions therefore never exceed cache_frames + block, and frame 100,000 looks like frame 10.

    Protocol for one block of Tb frames: every layer calls `visible(layer)` (the frames written before
    this block), attends, and when writing calls `append(layer, k, v)`; after the last layer the caller
    calls `advance(Tb)` once. `append` writes slots for frames not yet counted by `advance`, so all layers
    of one block land in the same slots.

    `last_frame` (B, C, h, w) is the input of the last frame written (None before any): the previous frame
    of the next block for a network that reads it (dit.prev_frame_input).

    `staged(key, build)` memoises work derived from the visible frames (the network's rotated window),
    so that the several denoising calls of one block do it once; it is forgotten on append (that layer),
    advance and reset. Code that edits the buffers in place otherwise must call reset() or advance().
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        heads: int,
        head_dim: int,
        tokens_per_frame: int,
        cache_frames: int,
        sink_frames: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if not 0 <= sink_frames < cache_frames:
            raise ValueError(
                f"KVCache needs 0 <= sink_frames < cache_frames, got sink_frames={sink_frames}, "
                f"cache_frames={cache_frames}"
            )
        self.num_layers, self.batch_size, self.heads, self.head_dim = num_layers, batch_size, heads, head_dim
        self.tokens_per_frame = tokens_per_frame
        self.cache_frames, self.sink_frames = cache_frames, sink_frames
        self.ring_frames = cache_frames - sink_frames
        shape = (batch_size, heads, cache_frames * tokens_per_frame, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every frame (buffers are kept, not reallocated)."""
        self.frames_written = 0
        self.last_frame: Tensor | None = None
        self._update_order()

    @property
    def frames_visible(self) -> int:
        return min(self.frames_written, self.cache_frames)

    def _slot(self, frame: int) -> int:
        """Cache slot (in frames) of absolute frame index `frame`."""
        if frame < self.sink_frames:
            return frame
        return self.sink_frames + (frame - self.sink_frames) % self.ring_frames

    def _visible_frames(self) -> list[int]:
        """Absolute indices of the visible frames in temporal order."""
        n, s = self.frames_written, self.sink_frames
        recent_start = max(s, n - self.ring_frames)
        return list(range(min(n, s))) + list(range(recent_start, n))

    def _update_order(self) -> None:
        # Temporal order as contiguous slot ranges (at most 3: sinks, ring tail, ring head), rebuilt once per
        # block: reading them is slicing (views), no gather.
        ranges: list[list[int]] = []
        for f in self._visible_frames():
            slot = self._slot(f)
            if ranges and ranges[-1][1] == slot:
                ranges[-1][1] = slot + 1
            else:
                ranges.append([slot, slot + 1])
        N = self.tokens_per_frame
        self._ranges = [(a * N, b * N) for a, b in ranges]
        self._staged: dict[tuple, Any] = {}

    def staged(self, key: tuple, build: Callable[[], Any]) -> Any:
        """build() once per visible window and key (key[0] is the layer); see the class docstring."""
        if key not in self._staged:
            self._staged[key] = build()
        return self._staged[key]

    def visible_parts(self, layer: int) -> tuple[list[Tensor], list[Tensor]]:
        """The visible K (un-rotated) and V as views, pieces in temporal order: cat(pieces, dim=2)."""
        k, v = self.k[layer], self.v[layer]
        return [k[:, :, a:b] for a, b in self._ranges], [v[:, :, a:b] for a, b in self._ranges]

    def visible(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """K (un-rotated), V: (B, heads, n*N, hd) in temporal order; frame positions (n,) = 0..n-1."""
        ks, vs = self.visible_parts(layer)
        empty = self.k[layer][:, :, :0]
        k = torch.cat(ks, dim=2) if ks else empty
        v = torch.cat(vs, dim=2) if vs else empty
        return k, v, torch.arange(self.frames_visible, device=self.device)

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write one block's un-rotated k, v: (B, heads, Tb*N, hd); the block's frames after the sinks must fit
        the ring (Tb <= ring_frames, or up to cache_frames into an empty cache: a context prefill)."""
        n_tok = k.shape[2]
        if n_tok % self.tokens_per_frame:
            raise ValueError(f"KVCache.append got {n_tok} tokens, not a multiple of {self.tokens_per_frame}")
        tb = n_tok // self.tokens_per_frame
        if tb - max(0, min(tb, self.sink_frames - self.frames_written)) > self.ring_frames:
            raise ValueError(
                f"KVCache: a block of {tb} frames does not fit the ring of {self.ring_frames} frames "
                f"(cache_frames - sink_frames); raise cache_frames"
            )
        N = self.tokens_per_frame
        self._staged = {key: val for key, val in self._staged.items() if key[0] != layer}
        for i in range(tb):
            slot = self._slot(self.frames_written + i)
            self.k[layer][:, :, slot * N : (slot + 1) * N] = k[:, :, i * N : (i + 1) * N]
            self.v[layer][:, :, slot * N : (slot + 1) * N] = v[:, :, i * N : (i + 1) * N]

    def advance(self, frames: int, last_frame: Tensor | None = None) -> None:
        """Count `frames` as written (after every layer appended them); last_frame (B, C, h, w) is the
        written block's last input frame."""
        self.frames_written += frames
        if last_frame is not None:
            self.last_frame = last_frame.detach().clone()
        self._update_order()

    def copy_rows_from(self, rows: list[int], source: "KVCache") -> None:
        """Overwrite batch rows `rows` with every visible frame of `source` (a cache of len(rows) worlds
        showing as many frames as this one), written into this cache's slots in temporal order."""
        if source.batch_size != len(rows) or source.frames_visible != self.frames_visible:
            raise ValueError(
                f"KVCache.copy_rows_from: source holds {source.batch_size} worlds x {source.frames_visible} frames, "
                f"need {len(rows)} x {self.frames_visible}"
            )
        N = self.tokens_per_frame
        slots = torch.tensor([self._slot(f) for f in self._visible_frames()])
        tokens = (slots[:, None] * N + torch.arange(N)[None, :]).reshape(-1).to(self.device)
        index = torch.tensor(rows, device=self.device)
        for layer in range(self.num_layers):
            k, v, _ = source.visible(layer)  # (len(rows), heads, n*N, hd) in temporal order
            self.k[layer][index[:, None], :, tokens[None, :]] = k.transpose(1, 2).to(self.k[layer].dtype)
            self.v[layer][index[:, None], :, tokens[None, :]] = v.transpose(1, 2).to(self.v[layer].dtype)
        if source.last_frame is not None:
            if self.last_frame is None:
                self.last_frame = torch.zeros((self.batch_size, *source.last_frame.shape[1:]),
                                              device=self.device, dtype=source.last_frame.dtype)
            self.last_frame[index] = source.last_frame.to(self.last_frame.dtype)
        self._staged = {}  # the buffers changed under any memoised window

    def adopt_buffers(self, k: list[Tensor], v: list[Tensor]) -> None:
        """Move the cache into the caller's per-layer tensors (same shapes and dtype as now; views of a larger
        static storage are fine), copying the content over; from then on both sides share one cache.
        worldmodel.inference.graphed keeps its fixed-address buffers this way."""
        if len(k) != self.num_layers or len(v) != self.num_layers:
            raise ValueError(f"KVCache.adopt_buffers needs {self.num_layers} K and V tensors, got {len(k)} and {len(v)}")
        for old, new in zip(self.k + self.v, list(k) + list(v)):
            if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
                raise ValueError(f"KVCache.adopt_buffers: got {tuple(new.shape)} {new.dtype} on {new.device}, the cache "
                                 f"holds {tuple(old.shape)} {old.dtype} on {old.device}")
            if new.data_ptr() != old.data_ptr():
                new.copy_(old)
        self.k, self.v = list(k), list(v)
        self._staged = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
