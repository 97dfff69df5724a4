"""StreamingGenerator: few-step, frame-by-frame (or block-by-block) generation with the DiT's KV cache.

Per block (DESIGN §4, Inference): start from noise; for each sigma of the step list predict x0 with a
cached forward (write=False) and re-noise it to the next sigma with fresh noise; after the last step run
the network once on the clean block at sigma = context_noise_inference with write=True so that its keys
and values enter the cache (a ring with sink frames: bounded memory for any rollout length); decode.

A frame-wise generator may hand its frames to worldmodel.inference.graphed.StaticFrameStep (`fast="static"`,
`fast="graph"` for CUDA graphs on CUDA, or `fast="compile"` through torch.compile): the same frames for the same
noise, on static buffers that share this generator's cache; from the first frame after a reset on when
first_frame_steps == steps, else from the second.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from worldmodel.config import FlowConfig, GeneratorConfig
from worldmodel.diffusion.flow import add_noise, few_step_sample, step_sigmas, x0_from_v
from worldmodel.models.autoencoder import Autoencoder, frames_to_tensor, tensor_to_frames
from worldmodel.models.dit import WorldDiT

Tensor = torch.Tensor


def autoencoder_on(autoencoder: Autoencoder, device: torch.device | str, dtype: torch.dtype,
                   memory_format: torch.memory_format = torch.channels_last) -> Autoencoder:
    """An eval-mode copy of the autoencoder on (device, dtype), by default in channels_last, oneDNN's faster
    conv layout (decode -25..35% on a 2-core AVX2 CPU); a copy, so that the caller's module keeps its layout."""
    return copy.deepcopy(autoencoder).to(device, dtype, memory_format=memory_format).eval()


@torch.inference_mode()
def encode_frames(autoencoder: Autoencoder, frames: Tensor) -> Tensor:
    """uint8 (B, T, H, W, 3) on the autoencoder's device -> latents (B, T, C, h, w) in its dtype."""
    if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"context_frames must be uint8 (B, T0, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    B, T = frames.shape[:2]
    dtype = next(autoencoder.decoder.parameters()).dtype
    return autoencoder.encode(frames_to_tensor(frames.flatten(0, 1)).to(dtype)).unflatten(0, (B, T))


def _on(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The module on (device, dtype); an eval-mode copy when it must move, so that a caller's training
    model (or its fp32 EMA) is never cast in place. An uncopied module keeps its train/eval flag (the DiT
    has no dropout or batch statistics, so the flag changes nothing)."""
    p = next(module.parameters())
    if p.device != device or p.dtype != dtype:
        module = copy.deepcopy(module).to(device=device, dtype=dtype).eval()
    return module


class StreamingGenerator:
    """B worlds stepped together. reset() once with ground-truth context, then step()/step_block().

    dtype: the networks' compute dtype. bf16 helps on GPUs and on CPUs with AMX / AVX512-BF16; on CPUs
    without them (e.g. AVX2-only) bf16 convolutions are ~100x slower than fp32: measure.
    fast: "off" (default), "static", "graph" or "compile": with block_size 1, frames go through
    worldmodel.inference.graphed.StaticFrameStep, eagerly ("static"), as CUDA graphs ("graph", on CUDA; eager
    elsewhere) or through torch.compile ("compile", and as CUDA graphs on CUDA; it compiles when the window
    first fills, ~1-2 min on a 2-core CPU; the frames before that run the step uncompiled). Same frames for the
    same noise (to rounding). The first frame after a reset too when first_frame_steps == steps (else it runs
    eagerly at its own steps); chunk-wise blocks as before.
    channels_last: the decoder's memory format (channels_last, or contiguous NCHW).
    """

    FAST_PATHS = ("off", "static", "graph", "compile")

    def __init__(
        self,
        dit: WorldDiT,
        autoencoder: Autoencoder | None,
        pose_stats: dict,
        gen_cfg: GeneratorConfig,
        flow_cfg: FlowConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        fast: str = "off",
        channels_last: bool = True,
    ) -> None:
        if fast not in self.FAST_PATHS:
            raise ValueError(f"StreamingGenerator fast must be one of {self.FAST_PATHS}, got {fast!r}")
        self.device, self.dtype = torch.device(device), dtype
        self.dit = _on(dit, self.device, dtype)
        self.decode_memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autoencoder = None
        if autoencoder is not None:
            self.autoencoder = autoencoder_on(autoencoder, self.device, dtype, self.decode_memory_format)
        mean, std = pose_stats["mean"], pose_stats["std"]
        self.pose_mean = torch.as_tensor(np.asarray(mean, dtype=np.float32), device=self.device)
        self.pose_std = torch.as_tensor(np.asarray(std, dtype=np.float32), device=self.device)
        if self.pose_mean.shape != (dit.cfg.pose_dim,) or self.pose_std.shape != (dit.cfg.pose_dim,):
            raise ValueError(f"pose_stats mean/std must have {dit.cfg.pose_dim} values each, got {mean} / {std}")
        if (self.pose_std <= 0).any():
            raise ValueError(f"pose_stats std must be positive, got {std}")
        self.block_size = gen_cfg.block_size
        self.cache_frames, self.sink_frames = gen_cfg.cache_frames, gen_cfg.sink_frames
        self.sigmas = step_sigmas(gen_cfg.steps, flow_cfg.shift)
        self.first_sigmas = step_sigmas(gen_cfg.first_frame_steps, flow_cfg.shift)
        self.context_sigma = float(flow_cfg.context_noise_inference)
        cfg = dit.cfg
        self.latent_shape = (cfg.latent_channels, cfg.latent_height, cfg.latent_width)
        self.cache = None
        self.generator: torch.Generator | None = None
        self._first = True
        self._queue: list[Tensor] = []  # frames of the current block not yet handed out by step()
        self.fast = fast
        self._frame_step = None  # the StaticFrameStep over self.cache, built when first needed

    # ----- helpers -----

    def _tensor(self, a, dtype: torch.dtype | None = None) -> Tensor:
        t = torch.as_tensor(np.asarray(a)) if isinstance(a, np.ndarray) else a
        return t.to(self.device) if dtype is None else t.to(self.device, dtype)

    def _pose(self, deltas) -> Tensor:
        """Raw pose deltas (..., 5) -> normalised, in the compute dtype."""
        d = self._tensor(deltas, torch.float32)
        return ((d - self.pose_mean) / self.pose_std).to(self.dtype)

    def _randn(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def _sigma(self, s: float, shape: tuple[int, int]) -> Tensor:
        return torch.full(shape, s, device=self.device, dtype=torch.float32)

    def _write(self, z: Tensor, pose: Tensor) -> None:
        """Put clean latents z (B, T, C, h, w) into the cache at the context noise level: one block, or several
        (blocks of block_size from frame 0, a context prefill) in one block-causal call that writes what one
        call per block would. The context noise is drawn block by block, in the order the blocks have."""
        s, bs, T = self.context_sigma, self.block_size, z.shape[1]
        if s > 0:  # the network was trained with context noise of this level: give it the same input
            noise = [self._randn(tuple(z[:, i : i + bs].shape)) for i in range(0, T, bs)]
            z = add_noise(z, noise[0] if len(noise) == 1 else torch.cat(noise, dim=1), s)
        self.dit.forward_cached(z, self._sigma(s, tuple(z.shape[:2])), pose, self.cache, write=True,
                                block_size=bs if T > bs else None)

    def encode(self, frames) -> Tensor:
        """uint8 (B, T, H, W, 3) -> latents (B, T, C, h, w) in the compute dtype."""
        if self.autoencoder is None:
            raise RuntimeError("StreamingGenerator has no autoencoder: pass one to encode context frames")
        return encode_frames(self.autoencoder, self._tensor(frames))

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, T, C, h, w) -> uint8 (B, T, H, W, 3)."""
        if self.autoencoder is None:
            raise RuntimeError("StreamingGenerator has no autoencoder: call with decode=False")
        B, T = z.shape[:2]
        z = z.flatten(0, 1).contiguous(memory_format=self.decode_memory_format)
        return tensor_to_frames(self.autoencoder.decode(z)).unflatten(0, (B, T))

    # ----- public API -----

    @torch.inference_mode()
    def reset(self, context_frames, context_deltas, generator: torch.Generator | None = None, *, latents: bool = False) -> None:
        """Start B worlds from ground-truth frames uint8 (B, T0, H, W, 3) and raw deltas (B, T0, 5).

        latents=True: context_frames are already latents (B, T0, C, h, w) (no autoencoder needed).
        The context is written in blocks of block_size frames from frame 0, as in training: the frames that fit
        the window in one block-causal call (same keys and values as one call per block, one network pass
        instead of T0 / block_size), any later ones block by block.
        """
        z = self._tensor(context_frames, self.dtype) if latents else self.encode(context_frames)
        pose = self._pose(context_deltas)
        B, T0 = z.shape[:2]
        if pose.shape != (B, T0, self.dit.cfg.pose_dim):
            raise ValueError(f"context_deltas must be (B, T0, 5) = {(B, T0, 5)}, got {tuple(pose.shape)}")
        if self.cache is None or self.cache.batch_size != B:
            self.cache = self.dit.new_cache(B, self.cache_frames, self.sink_frames, self.device, self.dtype)
        self.cache.reset()
        self.generator = generator
        bs = self.block_size
        span = min(T0, self.cache_frames // bs * bs)  # whole blocks that fit the empty window
        if span:
            self._write(z[:, :span], pose[:, :span])
        for i in range(span, T0, bs):
            self._write(z[:, i : i + bs], pose[:, i : i + bs])
        self._first = True
        self._queue = []

    @torch.inference_mode()
    def step_block(self, deltas, *, decode: bool = True) -> Tensor:
        """Generate one block: raw deltas (B, Tb, 5) -> uint8 (B, Tb, H, W, 3) (latents if decode=False)."""
        if self.cache is None:
            raise RuntimeError("StreamingGenerator.step_block before reset(): give it context frames first")
        pose = self._pose(deltas)
        B, Tb = self.cache.batch_size, self.block_size
        if pose.shape != (B, Tb, self.dit.cfg.pose_dim):
            raise ValueError(f"deltas must be (B, block_size, 5) = {(B, Tb, 5)}, got {tuple(pose.shape)}")
        shape = (B, Tb, *self.latent_shape)

        def x0_fn(x: Tensor, s: float) -> Tensor:
            v = self.dit.forward_cached(x, self._sigma(s, (B, Tb)), pose, self.cache, write=False)
            return x0_from_v(x, v, s)

        sigmas = self.first_sigmas if self._first else self.sigmas
        z = few_step_sample(x0_fn, self._randn(shape), sigmas, lambda: self._randn(shape))
        self._write(z, pose)
        self._first = False
        return self.decode(z) if decode else z

    def fast_ready(self) -> bool:
        """Whether the next step() goes through the static frame step (fast on, frame-wise, a frame in the
        cache, and past the first frame unless that one takes the same steps)."""
        return (self.fast != "off" and self.block_size == 1 and not self._queue
                and (not self._first or self.first_sigmas == self.sigmas)
                and self.cache is not None and self.cache.frames_visible >= 1)

    def frame_step(self):
        """The StaticFrameStep over this generator's cache, built on first use and again for a new cache
        (another batch size)."""
        from worldmodel.inference.graphed import StaticFrameStep  # imports this module: import here

        graphs = self.fast in ("graph", "compile") and self.device.type == "cuda"
        compiled = self.fast == "compile"
        old = self._frame_step
        if old is None or old.cache is not self.cache or old.graphs != graphs or old.compiled != compiled \
                or old.sigmas != list(self.sigmas) or old.context_sigma != self.context_sigma:
            self._frame_step = old = None  # free the old one's buffers and graphs first
            self._frame_step = StaticFrameStep(self, graphs=graphs, compiled=compiled)
        return self._frame_step

    @torch.inference_mode()
    def step(self, deltas, *, decode: bool = True) -> Tensor:
        """One frame: raw deltas (B, 5) -> uint8 (B, H, W, 3) (latents (B, C, h, w) if decode=False).

        Chunk-wise (block_size > 1): when no frame is pending, a block is generated with this delta held
        for all its frames; the next block_size - 1 calls hand out the rest (their deltas are unused).
        """
        if self.fast_ready():
            out = self.frame_step().step(deltas, decode=decode)
            self._first = False
            return out
        if not self._queue:
            d = self._tensor(deltas, torch.float32)
            block = self.step_block(d[:, None].expand(-1, self.block_size, -1), decode=decode)
            self._queue = list(block.unbind(1))
        return self._queue.pop(0)
