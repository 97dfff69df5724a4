"""StaticFrameStep: a frame of frame-wise generation as one fixed computation, a CUDA graph on CUDA.

Every frame of a StreamingGenerator with block_size 1 does the same work on tensors of the same shapes
once the KV window is full: `steps` denoising calls and one cache-write call of the DiT against the
window, then the decode. The few frames right after a reset, while the window fills, do the same work
against the window's buffers with the slots not yet written masked out (a second graph), so that the
first frame on screen is a replay too. Run eagerly a frame is ~1,000 small kernels whose launches, not
their arithmetic, set the time on a GPU (37 ms per 2-step frame at batch 1 on an H200 against a 0.02 ms
floor, benchmarks/RESULTS.md). Here the same step is written so that nothing in it depends on the host:

- K/V stay in preallocated buffers, a ring in the KVCache's own slot order; the cache's buffers become
  views of ours (KVCache.adopt_buffers), so the eager path and this one share one cache and may take
  turns. Which ring slot is oldest (or how many slots are written) is a device tensor `state`; every slot's
  window-relative RoPE position for every state is a precomputed table, so the window's keys are rotated in
  one pass over all layers per frame, in slot order (attention does not care about the order of the keys),
  never shifted. RoPE is relative: a partial window's T frames sit at positions n-T..n-1 before the new
  frame at n, the same offsets as the eager path's 0..T-1 before T; a key mask per state drops the rest.
- The noise is drawn outside, by the generator's own `_randn` in the eager order (first state, re-noise
  draws, then the context-noise draw), and copied into static inputs, so a seeded rollout gives the eager
  path's frames. The time embeddings of the fixed sigmas are constants; the pose embedding and the previous
  frame's share of the patch embedding are computed once per frame instead of once per call; the adaLN
  modulations of every block for every call of a frame are one matmul; RoPE is one multiply-add pair with
  the qk-norm weights folded into its tables. Fewer kernels help the CPU too, where each op costs overhead.
- On CUDA the step is captured once per (batch, steps, decode, window full or not) after a warm-up on a side stream and then
  replayed; the warm-up's writes into the cache are undone. If capture fails, a warning is printed and the
  same step runs eagerly. On the CPU (or graphs=False) the same code always runs eagerly.
- compiled=True runs the step through torch.compile (Inductor: elementwise chains fused into few kernels, on
  the CPU into few C++ loops), captured as a CUDA graph on CUDA as above. Every step object compiles the same
  function, so compiling takes its time once per process and configuration (batch, steps, decode, network
  shapes): on a 2-core CPU ~1-2 min for the shipped world, on an H200 40-66 s; Inductor keeps its results on
  disk, so a later process compiles faster. Dynamo's recompile limit is raised to COMPILE_VARIANTS for this (its
  default, 8, would make later configurations run uncompiled without a word). If compiling fails, a warning is
  printed and the step runs uncompiled. The partial-window variant is never compiled (on CUDA it is still a
  graph): it runs for cache_frames - context_frames frames per reset, not worth a second compilation.

Numerics: the operations of WorldDiT.forward_cached and the sampler, regrouped (fused multiply-adds, keys
in slot order), so results agree to rounding: ~1e-6 in fp32 (tests/test_graphed.py), bf16 rounding in
bf16. Weights are read when the step is built: build a new one after changing them.
"""

from __future__ import annotations

import sys
import time
import warnings
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from worldmodel.diffusion.flow import add_noise
from worldmodel.models.attention import attention
from worldmodel.models.autoencoder import tensor_to_frames
from worldmodel.models.dit import Block, timestep_embedding

if TYPE_CHECKING:
    from worldmodel.inference.generator import StreamingGenerator

Tensor = torch.Tensor


# Configurations (batch x steps x decode x network) one process may compile: torch._dynamo's recompile limit is
# raised to this when a compiled step is built (a benchmark sweep of 3 samplers x 4 batches x decode is 24).
COMPILE_VARIANTS = 64


def _rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(L, hd/2) cos, sin -> (L, hd) tables for rotate(x) = x * cos_t + swap_halves(x) * sin_t
    (the same rotation as dit.apply_rope, pair (i, i + hd/2) by angle i)."""
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def _swap_halves(x: Tensor) -> Tensor:
    return x.roll(x.shape[-1] // 2, dims=-1)


class StaticFrameStep:
    """One frame of `gen` (block_size 1, at its `steps` sigmas) on static buffers.

    Build it from a StreamingGenerator that has been reset (at least one frame in its window); then
    `step(deltas (B, 5) raw, decode=True)` -> uint8 (B, H, W, 3) (latents (B, C, h, w) with decode=False),
    the same frame as gen.step with the same noise. StreamingGenerator(fast="static" | "graph" | "compile")
    does this by itself. graphs: capture CUDA graphs (default: on CUDA); compiled: through torch.compile
    (StreamingGenerator fast="compile").
    """

    def __init__(self, gen: StreamingGenerator, *, graphs: bool | None = None, compiled: bool = False) -> None:
        cache, dit = gen.cache, gen.dit
        if gen.block_size != 1:
            raise ValueError(f"StaticFrameStep is frame-wise only: generator.block_size is {gen.block_size}, needs 1")
        if cache is None:
            raise RuntimeError("StaticFrameStep needs a generator that has been reset() (it takes over its KV cache)")
        if not all(type(b) is Block and isinstance(b.ada, nn.Sequential) for b in dit.blocks):
            raise TypeError("StaticFrameStep re-schedules worldmodel.models.dit.Block: the DiT's blocks are another class")
        self.device, self.dtype = gen.device, gen.dtype
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise ValueError(f"StaticFrameStep(graphs=True) needs a CUDA device, the generator is on {self.device}")
        # The generator owns its step: a weak reference back, so that dropping the generator frees the GPU buffers
        # and graphs at once (no reference cycle waiting for the garbage collector).
        self._gen = weakref.ref(gen)
        self.cache, self.dit = cache, dit
        self.autoencoder = gen.autoencoder
        self.sigmas = list(gen.sigmas)
        self.context_sigma = gen.context_sigma
        cfg = dit.cfg
        self.B, self.L, self.H, self.hd = cache.batch_size, cfg.depth, cfg.heads, dit.head_dim
        self.N, self.D, self.p = dit.tokens_per_frame, cfg.dim, cfg.patch_size
        self.S, self.R, n_frames = cache.sink_frames, cache.ring_frames, cache.cache_frames
        self.W = n_frames * self.N  # window tokens
        self.latent_shape = tuple(gen.latent_shape)
        dev, dt, B, L, H, hd, N, W = self.device, self.dtype, self.B, self.L, self.H, self.hd, self.N, self.W
        with torch.inference_mode():
            self._constants(n_frames)
            # State: the ring (un-rotated K after qk-norm, and V with one extra slot for the frame being made),
            # the rotated keys the attention reads, the previous frame, the window's state (ring phase or fill).
            self.k_ring = torch.empty((L, B, H, W, hd), device=dev, dtype=dt)
            self.v_all = torch.empty((L, B, H, W + N, hd), device=dev, dtype=dt)
            self.k_att = torch.empty_like(self.v_all)
            self.v_ring = [self.v_all[i, :, :, :W] for i in range(L)]
            # Where each layer's new-frame key and value go, as views held here: under torch.compile, views that
            # are inputs of the graph make their writes in-place stores (through one synthetic base); a slice of
            # a slice taken inside it was instead a copy of all of k_att for every layer of every call.
            self.k_win = self.k_att[:, :, :, :W]
            self.k_new = [self.k_att[i, :, :, W:] for i in range(L)]
            self.v_new = [self.v_all[i, :, :, W:] for i in range(L)]
            cache.adopt_buffers(list(self.k_ring.unbind(0)), self.v_ring)
            self.prev = torch.zeros((B, *self.latent_shape), device=dev, dtype=dt)
            self.state = torch.zeros((1,), device=dev, dtype=torch.long)
            # Inputs, written before each frame: raw pose deltas and the frame's noise draws.
            self.delta = torch.zeros((B, 1, cfg.pose_dim), device=dev, dtype=torch.float32)
            self.noise_shape = (B, 1, *self.latent_shape)  # what the eager path draws (B, block, C, h, w)
            n_noise = len(self.sigmas) + (1 if self.context_sigma > 0 else 0)
            self.noise = torch.zeros((n_noise, *self.noise_shape), device=dev, dtype=dt)
            self._written = -1  # frames_written of the cache that state and prev reflect; -1: not yet
            self._follow_cache()
        if dev.type == "cuda":  # pose deltas from the host go through a pinned buffer (async upload)
            self._pinned = torch.zeros((B, cfg.pose_dim), dtype=torch.float32, pin_memory=True)
            self._uploaded = torch.cuda.Event()
        self.compiled, self.compile_error = bool(compiled), None
        # The function, not the bound method: no reference from the step to itself (dropping it frees it at once).
        self._compiled_run = self._compiled_rotate = None
        if compiled:
            from torch._dynamo import config as dynamo
            dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILE_VARIANTS)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * COMPILE_VARIANTS)
            self._compiled_run = torch.compile(type(self)._run, dynamic=False)
            self._compiled_rotate = torch.compile(type(self)._rotate_window, dynamic=False)
        self._compiled_for: set[bool] = set()  # decode values compiled (and run) once
        # CUDA graphs by (decode, masked): masked = the partial-window variant (the frames after a reset).
        self._captured: dict[tuple[bool, bool], tuple[torch.cuda.CUDAGraph, Tensor] | None] = {}
        self.capture_s: dict[tuple[bool, bool], float] = {}
        self.capture_error: str | None = None

    @property
    def gen(self) -> StreamingGenerator:
        gen = self._gen()
        if gen is None:
            raise RuntimeError("StaticFrameStep: its StreamingGenerator is gone (the step draws noise through it)")
        return gen

    # ----- construction -----

    def _constants(self, n_frames: int) -> None:
        dit, dev, dt, D, L, N, hd = self.dit, self.device, self.dtype, self.D, self.L, self.N, self.hd
        self.pose_mean, self.pose_std = self.gen.pose_mean, self.gen.pose_std
        # Time embeddings of every call of a frame (the denoising sigmas, then the cache write's).
        sig = torch.tensor(self.sigmas + [self.context_sigma], device=dev, dtype=torch.float32)
        self.t_emb = dit.time_mlp(timestep_embedding(sig * 1000.0, dit._freqs_on(dev)).to(dt))[:, None]  # (calls, 1, D)
        # Every block's adaLN linear and the final one stacked; the "1 +" of modulate() folded into the scale
        # biases (chunks 1 and 4 of a block: shift, scale, gate, shift, scale, gate; 1 of the final: shift, scale).
        lins = [b.ada[-1] for b in dit.blocks] + [dit.final_ada[-1]]
        self.ada_w = torch.cat([m.weight for m in lins]).detach()
        bias = torch.cat([m.bias for m in lins]).detach().float()
        for i in range(L):
            bias[(6 * i + 1) * D : (6 * i + 2) * D] += 1
            bias[(6 * i + 4) * D : (6 * i + 5) * D] += 1
        bias[(6 * L + 1) * D :] += 1
        self.ada_b = bias.to(dt)
        # Patch embedding: [x | prev] @ W = x @ W_x + prev @ W_prev, the second once per frame.
        w = dit.patch_embed.weight.detach()
        self.cpp = dit.cfg.latent_channels * self.p**2
        self.embed_x = w[:, : self.cpp].contiguous()
        self.embed_prev = w[:, self.cpp :].contiguous() if dit.cfg.prev_frame_input else None
        self.embed_b = dit.patch_embed.bias.detach()
        # RoPE, per state of the window (a device index, `state`): states 0..R-1 are the full window at ring phase
        # p, where slot j holds a sink (position j) or the ring frame of age rank (j - S - p) mod R (position S +
        # that); state R + T is the window while only T < n_frames frames are written (right after a reset),
        # where slot j < T holds frame j (no wrap yet) and slots j >= T are stale and masked out. The frame being
        # made always sits at position n_frames; in a partial state the written frames get positions
        # j + n_frames - T, the same offsets to it as the eager path's 0..T-1 to T (RoPE is relative).
        S, R = self.S, self.R
        positions = [[j if j < S else S + (j - S - phase) % R for j in range(n_frames)] for phase in range(R)]
        positions += [[j + n_frames - T if j < T else 0 for j in range(n_frames)] for T in range(n_frames)]
        tables = [_rope_tables(*dit.rope(torch.tensor(pos), dt)) for pos in positions]
        self.win_cos = torch.stack([c for c, _ in tables]).to(dev)  # (R + n_frames, W, hd)
        self.win_sin = torch.stack([s for _, s in tables]).to(dev)
        # Keys a partial window may attend to: its T written frames and the frame being made (always valid).
        valid = torch.tensor([[j < T for j in range(n_frames)] for T in range(n_frames)])
        valid = torch.cat([torch.ones(R, n_frames, dtype=torch.bool), valid])  # full states: all (unused: no mask)
        self.key_mask = torch.cat([valid.repeat_interleave(N, dim=1), torch.ones(R + n_frames, N, dtype=torch.bool)],
                                  dim=1)[:, None].to(dev)  # (states, 1, W + N): broadcasts over batch, heads, queries
        # The state after this frame: the next phase, the next partial state, or (the window filling) phase 0.
        nxt = [(p + 1) % R for p in range(R)] + [R + T + 1 if T + 1 < n_frames else 0 for T in range(n_frames)]
        self.next_state = torch.tensor(nxt, dtype=torch.long).to(dev)
        cos_q, sin_q = _rope_tables(*dit.rope(torch.tensor([n_frames]), dt))  # (N, hd)
        # New frame's q and k: rms-normalised without weight, then rotated with the qk-norm weights folded in.
        self.qk_norm = dit.cfg.qk_norm
        ones = torch.ones(hd, dtype=dt)
        qk_w = [torch.stack([b.q_norm.weight.detach().cpu(), b.k_norm.weight.detach().cpu()]) if self.qk_norm
                else torch.stack([ones, ones]) for b in dit.blocks]  # (2, hd) per layer
        self.k_w = torch.stack([w[1] for w in qk_w]).to(dev)  # (L, hd): the un-rotated key the ring stores
        self.qk_cos = torch.stack([cos_q[:, None] * w for w in qk_w])[:, :, :, None].to(dev)  # (L, N, 2, 1, hd)
        self.qk_sin = torch.stack([sin_q[:, None] * _swap_halves(w) for w in qk_w])[:, :, :, None].to(dev)
        self.eps = dit.blocks[0].q_norm.eps if self.qk_norm else None
        if self.qk_norm and any(b.q_norm.eps != self.eps or b.k_norm.eps != self.eps for b in dit.blocks):
            raise ValueError("StaticFrameStep assumes one qk-norm eps for every block")
        # Token indices of the slot the next frame is written to: ring slot S + phase, or slot T of a partial window.
        slots = torch.cat([torch.arange(R) + S, torch.arange(n_frames)])[:, None]
        self.slot_tokens = (slots * N + torch.arange(N)[None]).to(dev)  # (states, N)
        self.memory_format = self.gen.decode_memory_format

    # ----- per frame, on the host -----

    def _follow_cache(self) -> None:
        """Take over what the eager path (or BatchedGenerator.reset_rows) did to the shared cache."""
        c = self.cache
        if c.k[0].data_ptr() != self.k_ring[0].data_ptr():
            raise RuntimeError("StaticFrameStep: the KV cache's buffers were replaced; build a new step")
        if c.frames_written < 1:
            raise RuntimeError("StaticFrameStep: the KV cache holds no frame; reset() with at least one context frame")
        if c.frames_written != self._written:
            n = c.cache_frames
            self.state.fill_((c.frames_written - self.S) % self.R if c.frames_written >= n else self.R + c.frames_written)
            self._written = c.frames_written
        if c.last_frame is not self.prev:
            self.prev.copy_(c.last_frame)
            c.last_frame = self.prev

    def _set_inputs(self, deltas) -> None:
        d = torch.as_tensor(deltas)
        if d.shape != (self.B, self.delta.shape[-1]):
            raise ValueError(f"deltas must be (B, {self.delta.shape[-1]}) = {(self.B, self.delta.shape[-1])}, "
                             f"got {tuple(d.shape)}")
        if self.device.type == "cuda" and d.device.type == "cpu":
            self._uploaded.synchronize()  # the last frame's upload has left the pinned buffer (long done, as a rule)
            self._pinned.copy_(d)
            self.delta.copy_(self._pinned[:, None], non_blocking=True)
            self._uploaded.record()
        else:
            self.delta.copy_(d[:, None])
        for buf in self.noise:
            buf.copy_(self.gen._randn(self.noise_shape))

    @torch.inference_mode()
    def step(self, deltas, *, decode: bool = True) -> Tensor:
        """Raw deltas (B, 5) -> uint8 frames (B, H, W, 3) (latents (B, C, h, w) if decode=False); a fresh
        tensor the next frame does not overwrite."""
        if decode and self.autoencoder is None:
            raise RuntimeError("StaticFrameStep: the generator has no autoencoder; call with decode=False")
        self._follow_cache()
        self._set_inputs(deltas)
        masked = self._written < self.cache.cache_frames  # a partial window: stale slots masked out
        out = self._replay(decode, masked) if self.graphs else self._frame(decode, masked)
        self.cache.advance(1)  # host bookkeeping only: the device already wrote the slot
        self.cache.last_frame = self.prev
        self._written = self.cache.frames_written
        return out

    __call__ = step

    def _frame(self, decode: bool, masked: bool = False) -> Tensor:
        """_rotate_window, then _run, each compiled when asked for (and compiling worked). The masked variant
        (the few frames while the window fills after a reset) is never compiled: compiling it would cost as
        long again as the steady step's, at the first frame."""
        if self._compiled_run is None or masked:
            self._rotate_window()
            return self._run(decode, masked)
        if decode in self._compiled_for:
            self._compiled_rotate(self)
            return self._compiled_run(self, decode)
        saved = [t.clone() for t in self._state()]  # the first call compiles: keep what a failure must restore
        try:
            self._compiled_rotate(self)
            out = self._compiled_run(self, decode)
            self._compiled_for.add(decode)
            return out
        except Exception as e:  # noqa: BLE001  (compilation failed: the same step uncompiled, from the same state)
            for t, s in zip(self._state(), saved):
                t.copy_(s)
            self._compiled_run = self._compiled_rotate = None
            self.compile_error = f"{type(e).__name__}: {e}"
            msg = f"StaticFrameStep: torch.compile failed ({self.compile_error}); running the step uncompiled"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            print(msg, file=sys.stderr, flush=True)
            self._rotate_window()  # rewrites k_att's window from the ring, which no failed call has changed yet
            return self._run(decode)

    # ----- CUDA graphs -----

    def _replay(self, decode: bool, masked: bool) -> Tensor:
        key = (decode, masked)
        if key not in self._captured:
            self._captured[key] = self._capture(decode, masked)
        captured = self._captured[key]
        if captured is None:  # capture failed (warned once): the same step, eagerly
            return self._frame(decode, masked)
        graph, out = captured
        graph.replay()
        return out.clone()

    def _state(self) -> list[Tensor]:
        return [self.k_ring, self.v_all, self.prev, self.state]  # k_att and outputs are rewritten every frame

    def _capture(self, decode: bool, masked: bool) -> tuple[torch.cuda.CUDAGraph, Tensor] | None:
        """Warm up on a side stream (lazy inits, cuBLAS/cuDNN choices), undo its writes, capture on that stream."""
        t0 = time.perf_counter()
        main = torch.cuda.current_stream(self.device)
        saved = [t.clone() for t in self._state()]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._frame(decode, masked)
                for t, s in zip(self._state(), saved):
                    t.copy_(s)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side):
                out = self._frame(decode, masked)  # compiled in the warm-up above (or uncompiled if that failed)
        except Exception as e:  # noqa: BLE001  (any failure: fall back to the identical eager step)
            torch.cuda.set_stream(main)  # torch.cuda.graph leaves the side stream current when capture_end raises
            torch.cuda.synchronize(self.device)
            for t, s in zip(self._state(), saved):  # capture executes nothing, but be sure
                t.copy_(s)
            self.capture_error = f"{type(e).__name__}: {e}"
            msg = (f"StaticFrameStep: CUDA graph capture failed (batch {self.B}, {len(self.sigmas)} steps, "
                   f"decode={decode}, masked={masked}): {self.capture_error}; running the static step eagerly")
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            print(msg, file=sys.stderr, flush=True)
            return None
        main.wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.capture_s[(decode, masked)] = time.perf_counter() - t0
        return graph, out

    # ----- the step itself: device work only (no host reads, no allocation from host data) -----

    def _patchify(self, z: Tensor) -> Tensor:
        return rearrange(z, "b c (hh p) (ww q) -> b (hh ww) (c p q)", p=self.p, q=self.p)

    def _unpatchify(self, tok: Tensor) -> Tensor:
        return rearrange(tok, "b (hh ww) (c p q) -> b c (hh p) (ww q)", hh=self.latent_shape[1] // self.p, p=self.p, q=self.p)

    def _rotate_window(self) -> None:
        """The window's keys at this frame's positions into k_att, every layer in one pass. Compiled as a graph
        of its own: inside _run's graph, which also writes the new frame's keys into k_att, Inductor copied all
        of k_att for every layer of every call (~5 ms of a 20 ms frame at batch 256 on an H200); uncompiled it
        is four kernels over the whole ring (~1.7 ms there), compiled one."""
        k_cos, k_sin = self.win_cos.index_select(0, self.state), self.win_sin.index_select(0, self.state)
        if torch.compiler.is_compiling():  # out= into a strided view breaks the graph; copy_ into k_win is in place
            self.k_win.copy_(torch.addcmul(self.k_ring * k_cos, _swap_halves(self.k_ring), k_sin))
        else:
            torch.addcmul(self.k_ring * k_cos, _swap_halves(self.k_ring), k_sin, out=self.k_win)

    def _run(self, decode: bool, masked: bool = False) -> Tensor:
        """The frame after _rotate_window. masked: the window is partly filled (a device-indexed key mask keeps
        its stale slots out of the attention; SDPA's masked kernel instead of flash)."""
        dit = self.dit
        pose = ((self.delta - self.pose_mean) / self.pose_std).to(self.dtype)  # as StreamingGenerator._pose
        c = self.t_emb + dit.pose_mlp(pose)[:, 0]  # (calls, B, D), as WorldDiT.condition
        mods = F.linear(F.silu(c), self.ada_w, self.ada_b)  # (calls, B, L*6D + 2D)
        slot = self.slot_tokens.index_select(0, self.state)[0]  # (N,) tokens of the slot this frame takes
        mask = self.key_mask.index_select(0, self.state) if masked else None  # (1, 1, W + N)
        prev = None
        if self.embed_prev is not None:
            prev = F.linear(self._patchify(self.prev), self.embed_prev, self.embed_b).flatten(0, 1)  # (B*N, D)

        # few_step_sample in token space: predict x0 at each sigma, re-noise it to the next with fresh noise.
        x = self._patchify(self.noise[0][:, 0])
        for i, s in enumerate(self.sigmas):
            x0 = torch.sub(x, self._dit(x, mods[i], prev, None, mask), alpha=s)
            if i + 1 < len(self.sigmas):
                x = add_noise(x0, self._patchify(self.noise[i + 1][:, 0]), self.sigmas[i + 1])
        written = x0
        if self.context_sigma > 0:
            written = add_noise(x0, self._patchify(self.noise[-1][:, 0]), self.context_sigma)
        self._dit(written, mods[-1], prev, slot, mask)  # the cache write at the context noise level
        self.prev.copy_(self._unpatchify(written))
        self.state.copy_(self.next_state.index_select(0, self.state))
        z = self._unpatchify(x0)
        if not decode:
            return z.contiguous()
        z = z.contiguous(memory_format=self.memory_format)
        return tensor_to_frames(self.autoencoder.decode(z))

    def _dit(self, x: Tensor, mod: Tensor, prev: Tensor | None, write: Tensor | None, mask: Tensor | None) -> Tensor:
        """WorldDiT.forward_cached for one frame in tokens: x (B, N, C p p), mod (B, L*6D + 2D) -> v tokens.
        write: the ring tokens (N,) this frame's keys and values go to, or None; mask: the keys it may attend to
        (broadcast to (B, H, N, W + N)), or None for all."""
        B, N, D, L = self.B, self.N, self.D, self.L
        dit = self.dit
        if prev is not None:
            tok = torch.addmm(prev, x.flatten(0, 1), self.embed_x.t()).view(B, N, D)
        else:
            tok = F.linear(x, self.embed_x, self.embed_b)
        for i, blk in enumerate(dit.blocks):
            tok = self._block(i, blk, tok, mod[:, 6 * i * D : 6 * (i + 1) * D].view(B, 6, 1, D), write, mask)
        shift, scale = mod[:, 6 * L * D :].view(B, 2, 1, D).unbind(1)
        return dit.final_linear(torch.addcmul(shift, dit.final_norm(tok), scale))

    def _block(self, i: int, blk: Block, x: Tensor, m: Tensor, write: Tensor | None, mask: Tensor | None) -> Tensor:
        """Block.forward for one frame against the window: x (B, N, D), m (B, 6, 1, D) with 1 + scale."""
        B, N, H, hd, W = self.B, self.N, self.H, self.hd, self.W
        sa, ca, ga, sm, cm, gm = m.unbind(1)
        qkv = blk.qkv(torch.addcmul(sa, blk.norm1(x), ca)).view(B, N, 3, H, hd)
        qk = F.rms_norm(qkv[:, :, :2], (hd,), eps=self.eps) if self.qk_norm else qkv[:, :, :2]  # (B, N, 2, H, hd)
        rot = torch.addcmul(qk * self.qk_cos[i], _swap_halves(qk), self.qk_sin[i])
        v = qkv[:, :, 2].transpose(1, 2)  # (B, H, N, hd)
        self.k_new[i].copy_(rot[:, :, 1].transpose(1, 2))
        self.v_new[i].copy_(v)
        o = attention(rot[:, :, 0].transpose(1, 2), self.k_att[i], self.v_all[i], mask)  # (B, H, N, hd)
        if write is not None:  # after the attention read the frame this write evicts
            self.k_ring[i].index_copy_(2, write, (qk[:, :, 1] * self.k_w[i]).transpose(1, 2))
            self.v_ring[i].index_copy_(2, write, v)
        x = torch.addcmul(x, ga, blk.proj(o.transpose(1, 2).reshape(B, N, self.D)))
        return torch.addcmul(x, gm, blk.mlp(torch.addcmul(sm, blk.norm2(x), cm)))
