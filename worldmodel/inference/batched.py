"""BatchedGenerator: a StreamingGenerator whose B worlds are independent episodes (the vector env's needs).

Two additions to `StreamingGenerator`, nothing changed in it:
- noise per world: `reset(..., generator=[g_0, ..., g_{B-1}])` draws row b's noise from g_b only, so a
  world's frames do not depend on the batch it runs in (world i of a vector env = a single env seeded
  alike). A single `torch.Generator` (or None) keeps the parent's behaviour.
- `reset_rows(mask, frames, deltas, generator, latents=False)`: restart some worlds while the others keep
  their cache (latents=True: `frames` are latents (B, T0, C, h, w), as in reset()).

The KV cache has one frame counter for the whole batch (rows share slots and window positions), so a
restarted row cannot hold fewer frames than the others. reset_rows therefore writes the new context
padded at the front with its first frame standing still (delta 0) up to the number of frames the window
shows, and copies the resulting keys/values into the row's slots in temporal order. Rows not restarted
are bit-for-bit untouched. A restarted row matches a fresh single-world reset exactly once the padding
has left the ring, up to the sink frames (which hold the padded first frame, as they would hold frame 0).
"""

from __future__ import annotations

import torch

from worldmodel.inference.generator import StreamingGenerator

Tensor = torch.Tensor


class BatchedGenerator(StreamingGenerator):
    def _randn(self, shape: tuple[int, ...]) -> Tensor:
        gens = self.generator
        if not isinstance(gens, (list, tuple)):
            return super()._randn(shape)
        if len(gens) != shape[0]:
            raise ValueError(f"{len(gens)} noise generators for a batch of {shape[0]}: give one per world")
        return torch.stack([torch.randn(shape[1:], generator=g, device=self.device, dtype=self.dtype) for g in gens])

    @torch.inference_mode()
    def reset_rows(self, mask, context_frames, context_deltas, generator=None, *, latents: bool = False) -> None:
        """Restart the worlds where mask (B,) is True from context_frames uint8 (B, T0, H, W, 3) and raw
        context_deltas (B, T0, 5) (rows where mask is False are ignored); generator and latents: as in reset()
        (latents=True: context_frames are latents (B, T0, C, h, w))."""
        mask = torch.as_tensor(mask, dtype=torch.bool).cpu()
        if self.cache is None or mask.all():
            return self.reset(context_frames, context_deltas, generator, latents=latents)
        B = self.cache.batch_size
        if mask.shape != (B,):
            raise ValueError(f"reset_rows: mask must be ({B},), got {tuple(mask.shape)}")
        rows = mask.nonzero().flatten().tolist()
        if not rows:
            return
        all_gens = generator if generator is not None else self.generator
        row_gens = [all_gens[r] for r in rows] if isinstance(all_gens, (list, tuple)) else all_gens
        frames = torch.as_tensor(context_frames)[rows]
        deltas = torch.as_tensor(context_deltas, dtype=torch.float32)[rows]
        shared = self.cache
        n_visible, T0 = shared.frames_visible, frames.shape[1]
        pad = max(0, n_visible - min(T0, shared.cache_frames))
        if pad:  # standing still on the first context frame until the window is as full as the others'
            frames = torch.cat([frames[:, :1].expand(-1, pad, -1, -1, -1), frames], dim=1)
            deltas = torch.cat([torch.zeros(len(rows), pad, deltas.shape[-1]), deltas], dim=1)
        # reset() also clears the batch's first-frame flag and pending chunk frames: keep the others'.
        first, queue = self._first, self._queue
        self.generator, self.cache = row_gens, None
        try:
            super().reset(frames, deltas, row_gens, latents=latents)  # builds a fresh cache of len(rows) worlds
            fresh = self.cache
        finally:
            self.cache, self.generator, self._first, self._queue = shared, all_gens, first, queue
        shared.copy_rows_from(rows, fresh)
