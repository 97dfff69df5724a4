"""Stage 3 baseline: Causal ODE initialisation (DESIGN §4 stage 3), with its time and storage measured.

Two phases inside the shared loop:
1. Generation (the first steps, until stage.ode_samples clips are stored): per batch, the frozen AR
   teacher integrates its full PF-ODE (grid_size Euler steps of `sigma_grid`, the student's step levels
   merged in) over all frames of each clip at once through the teacher-forcing forward on the ground-
   truth context (with stage 2's context-noise augmentation), with pose guidance. The states at the
   student's step levels (`step_sigmas(student_steps)`, 1.0 = the initial noise) and the endpoint are
   written with the context to `ode_pairs/chunk_*.pt`. Chunks persist, so a resumed run continues
   generating where it stopped. Logs: ode_clips, ode_bytes (on disk), ode_gen_s (generation seconds).
   Under torchrun `stage.ode_samples` counts clips over all ranks: each rank stores its rows of every
   global batch in its own chunk files (tagged with their global row numbers), and when generation
   ends every rank reads all chunks back in global row order, so all ranks regress on the same set.
2. Regression (every later step; the loop's data batch is then unused): a random minibatch of stored
   (state, level) pairs; the student's x0 prediction from the state, through the teacher-forcing forward
   on the stored context, regresses onto the endpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from worldmodel.checkpoint import CheckpointError, load_training_state, save_training_state
from worldmodel.config import RunConfig
from worldmodel.diffusion.flow import euler_sample, sigma_grid, step_sigmas
from worldmodel.training.ar_diffusion import context_noise  # stage 2's augmentation, shared
from worldmodel.training.distributed import SINGLE, BatchShard, barrier, is_distributed
from worldmodel.training.distill_common import (
    latent_batch, load_teacher, load_trainable, make_batcher, teacher_forced_v, x0_closure,
)
from worldmodel.training.stage import EMA, LatentStage, Logs, make_optimizer, optimizer_step

Tensor = torch.Tensor
PAIRS_SUBDIR = "ode_pairs"


def ode_path(grid_size: int, shift: float, keep: list[float], tol: float = 1e-6) -> tuple[list[float], list[float]]:
    """(Euler path 1 -> 0, keep levels snapped onto it): the shifted grid with the `keep` levels merged in.

    A keep level within `tol` of a grid level is that grid level (2- and 4-step levels sit on a grid
    whose size is a multiple of 4; others are inserted so the states exist exactly).
    """
    path = [float(s) for s in sigma_grid(grid_size, shift)]
    snapped = []
    for k in keep:
        near = min(path, key=lambda s: abs(s - k))
        if abs(near - k) > tol:
            path.append(float(k))
            near = float(k)
        snapped.append(near)
    return sorted(set(path), reverse=True), snapped


def ode_states(v_fn: Callable[[Tensor, float], Tensor], eps: Tensor, path: list[float],
               keep: list[float]) -> tuple[Tensor, Tensor]:
    """Euler-integrate from eps at path[0] = 1; -> (states at `keep` (B, K, ...), endpoint at 0 (B, ...)).

    `keep` must be levels of `path` in descending order. The integration is flow.euler_sample run
    segment by segment, so the states equal what one euler_sample call to each level returns.
    """
    if path[0] != 1.0 or path[-1] != 0.0:
        raise ValueError(f"ode_states needs a path from 1 to 0, got {path[0]} .. {path[-1]}")
    x, at, states = eps, 0, []
    for k in keep:
        j = path.index(k)
        x = euler_sample(v_fn, x, path[at : j + 1])
        states.append(x)
        at = j
    return torch.stack(states, dim=1), euler_sample(v_fn, x, path[at:])


def float_sigma_fn(clip_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, float], Tensor]:
    """flow.py's float-sigma closure from a per-sample one (the whole batch at one level)."""
    return lambda x, s: clip_fn(x, torch.full((x.shape[0],), float(s), device=x.device))


class PairStore:
    """The stored trajectories: chunk files on disk, all loaded in memory (CPU) for the regression."""

    def __init__(self, directory: Path, sigmas: list[float], rank: int = 0):
        self.dir, self.sigmas, self.rank = Path(directory), sigmas, rank
        self.reload()

    def reload(self) -> None:
        """Read every chunk in the directory (every rank's)."""
        sigmas = self.sigmas
        self.chunks: list[dict[str, Any]] = []
        for path in sorted(self.dir.glob("chunk_*.pt")):
            chunk = load_training_state(path)
            if [round(s, 6) for s in chunk["sigmas"]] != [round(s, 6) for s in sigmas]:
                raise CheckpointError(
                    f"{path} holds states at levels {chunk['sigmas']}, this run wants {sigmas} "
                    f"(stage.student_steps or flow.shift changed); use another ode_pairs directory or delete it"
                )
            self.chunks.append(chunk)
        self._cat: dict[torch.device, dict[str, Tensor]] = {}
        self.total_clips = self.clips  # over all ranks; `clips` counts what this process holds

    @property
    def clips(self) -> int:
        return sum(c["states"].shape[0] for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("chunk_*.pt"))

    @property
    def gen_seconds(self) -> float:
        return sum(float(c["gen_seconds"]) for c in self.chunks)

    def add(self, chunk: dict[str, Any], offset: int | None = None, shard: BatchShard = SINGLE) -> Path:
        """Store this rank's rows of a global batch whose first row is global clip `offset`."""
        offset = self.total_clips if offset is None else offset
        n = chunk["states"].shape[0]
        chunk["rows"] = offset + shard.rank + shard.world * torch.arange(n)  # global row of each clip
        path = self.dir / f"chunk_{offset:08d}_r{shard.rank if shard.world > 1 else self.rank}.pt"
        chunk = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in chunk.items()}
        save_training_state(path, chunk)  # atomic: a crash never leaves a half chunk under its name
        self.chunks.append(chunk)
        self._cat = {}
        return path

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Every stored clip, concatenated in global row order, on `device` (copied there once: gathering
        each minibatch in host memory and copying it over would wait for the GPU every step)."""
        device = torch.device(device)
        if device not in self._cat:
            keys = ("states", "endpoint", "x_clean", "sigma_clean", "pose")
            cat = {k: torch.cat([c[k] for c in self.chunks]) for k in keys}
            if all("rows" in c for c in self.chunks):  # global row order: the same on any world size
                order = torch.cat([c["rows"] for c in self.chunks]).argsort()
                cat = {k: v[order] for k, v in cat.items()}
            self._cat = {device: {k: v.to(device) for k, v in cat.items()}}
        return self._cat[device]


class CausalODEStage(LatentStage):
    """Causal ODE baseline; the student (and EMA) start from stage.init, default stage.teacher (AR)."""

    name = "causal_ode"

    def __init__(self, cfg: RunConfig, device: torch.device | str, pose_stats: dict[str, Any] | None = None, *,
                 student: nn.Module | None = None, teacher: nn.Module | None = None,
                 out_dir: str | Path | None = None, rank: int = 0):
        self.device = device = torch.device(device)
        from_checkpoints = student is None  # else modules are given (tests): latent batches, no encoder
        st, fl, opt = cfg.stage, cfg.flow, cfg.optim
        if st.ode_pairs_dir:
            pairs_dir = Path(st.ode_pairs_dir)
        elif out_dir is not None:
            pairs_dir = Path(out_dir) / PAIRS_SUBDIR
        else:
            raise ValueError("causal_ode stores teacher trajectories on disk: pass out_dir to the stage or set "
                             "stage.ode_pairs_dir=DIR (e.g. runs/causal_ode/ode_pairs)")
        pairs_dir.mkdir(parents=True, exist_ok=True)
        # The teacher is only needed while generating: loaded on first use, released when done.
        self._teacher = teacher
        self._load_teacher = lambda: load_teacher(cfg, device, pose_stats, self.name)
        if student is None:
            student = load_trainable(st.init or st.teacher, "init" if st.init else "teacher", cfg, device,
                                     pose_stats, self.name)
        self.online = student.to(device).train().requires_grad_(True)
        self.ema = EMA(self.online, opt.ema_decay, opt.ema_start)
        self.optimizers = {"student": make_optimizer(self.online.parameters(), opt.lr, opt.betas, opt.weight_decay)}
        self.pose_stats = pose_stats
        self.batcher = make_batcher(cfg, device, pose_stats, self.name, required=from_checkpoints)
        self.sigmas_keep = step_sigmas(st.student_steps, fl.shift)
        self.path, self.sigmas_keep = ode_path(fl.grid_size, fl.shift, self.sigmas_keep)
        self.store = PairStore(pairs_dir, self.sigmas_keep, rank)
        self.target_clips = st.ode_samples
        self.block_size, self.guidance, self.context_noise_max = st.block_size, fl.guidance, fl.context_noise_max
        self.grad_clip = opt.grad_clip
        self.sigmas_keep_t = torch.tensor(self.sigmas_keep, device=device)

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = self._load_teacher()
        return self._teacher.eval().requires_grad_(False)

    @property
    def generating(self) -> bool:
        return self.store.total_clips < self.target_clips

    @torch.no_grad()
    def generate(self, x0: Tensor, pose: Tensor, take: int | None = None) -> dict[str, Tensor]:
        """Teacher PF-ODE for the first `take` clips of x0 (B,T,...) -> chunk {states (take,K,T,...),
        endpoint, context, pose}. The noise is drawn for the whole (global) batch either way."""
        x_clean, sigma_clean = context_noise(x0, self.context_noise_max, self.shard)
        eps = self.shard.randn_like(x0)
        take = x0.shape[0] if take is None else take
        x_clean, sigma_clean, eps, pose = x_clean[:take], sigma_clean[:take], eps[:take], pose[:take]
        v_fn = teacher_forced_v(self.teacher, x_clean, sigma_clean, pose, block_size=self.block_size,
                                guidance=self.guidance)
        states, endpoint = ode_states(float_sigma_fn(v_fn), eps, self.path, self.sigmas_keep)
        return {"states": states, "endpoint": endpoint, "x_clean": x_clean, "sigma_clean": sigma_clean,
                "pose": pose, "sigmas": list(self.sigmas_keep), "path": list(self.path)}

    def regression_loss(self, batch_size: int) -> Tensor:
        dev = self.device
        data = self.store.tensors(dev)
        n, K = data["states"].shape[:2]
        # Drawn on the training device: indices made on the host would be copied over every step.
        idx = self.shard.draw(lambda m: torch.randint(0, n, (m,), device=dev), batch_size)
        k = self.shard.draw(lambda m: torch.randint(0, K, (m,), device=dev), batch_size)
        x_t = data["states"][idx, k].float()
        sigma = self.sigmas_keep_t[k]
        student_x0 = x0_closure(teacher_forced_v(
            self.online, data["x_clean"][idx].float(), data["sigma_clean"][idx], data["pose"][idx],
            block_size=self.block_size))
        return F.mse_loss(student_x0(x_t, sigma), data["endpoint"][idx].float())

    def step(self, batch: dict[str, Tensor], step: int) -> Logs:
        if self.generating:
            t0 = time.perf_counter()
            x0, pose = latent_batch(batch, self.batcher, self.device)
            offset = self.store.total_clips
            take_global = min(x0.shape[0] * self.shard.world, self.target_clips - offset)
            take = self.shard.global_rows(take_global)  # this rank's rows come first in its batch
            if take:
                chunk = self.generate(x0, pose, take)
                if self.device.type == "cuda":  # the chunk is written to disk next: its time is the teacher's
                    torch.cuda.synchronize(self.device)
                chunk["gen_seconds"] = time.perf_counter() - t0
                self.store.add(chunk, offset, self.shard)
            else:  # draw what the other ranks draw: the RNG streams stay in step (BatchShard)
                context_noise(x0, self.context_noise_max, self.shard), self.shard.randn_like(x0)
            self.store.total_clips = offset + take_global
            if not self.generating:
                self._teacher = None  # regression never needs it again
                if is_distributed():  # every rank regresses on every rank's clips
                    barrier()
                    self.store.reload()
            return {"ode_clips": float(self.store.total_clips), "ode_bytes": float(self.store.nbytes),
                    "ode_gen_s": self.store.gen_seconds}
        batch_size = batch["x0" if "x0" in batch else "deltas"].shape[0]
        loss = self.regression_loss(batch_size)
        gnorm = optimizer_step(loss, self.online, self.optimizers["student"], self.grad_clip)
        return {"loss": loss.detach(), "grad_norm": gnorm, "ode_clips": float(self.store.total_clips),
                "ode_bytes": float(self.store.nbytes), "ode_gen_s": self.store.gen_seconds}
