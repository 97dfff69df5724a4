"""The one training loop every stage runs in: load -> while step < steps: batch -> step -> save.

The loop owns what stages must not each re-implement: resume (models, EMA, optimisers, step, RNG,
data position, config check), the time budget, EMA updates, the learning-rate warm-up/schedule, the
JSONL log, the progress bar and atomic checkpoints. A stage only turns a batch into losses and
optimiser steps (`Stage.step`).

Files in `out_dir`:
    state.pt                  everything to resume (checkpoint.save_training_state, atomic)
    <stage>.safetensors/.json the exported modules (bf16) + provenance, what the next stage loads
    metrics.jsonl             one line per log interval

Distributed (`torchrun`, `distributed.py`): the loop joins the process group (nccl on CUDA, gloo on
CPU), wraps the stage's trainable modules in DDP (`Stage.wrap_ddp`: gradients averaged, EMA identical on
every rank), gives each rank `data.batch_size / world` clips of every global batch (the sampler is
sharded, no clip duplicated or dropped), averages the logged metrics over ranks, and only rank 0 writes
files (between barriers). `data.batch_size` is the GLOBAL batch, so the same command trains the same
model on any number of GPUs, and a run resumes on a different number of GPUs.

No step waits for the GPU: the stage's log values stay on the device and are copied to the host at log
lines (`MetricSums`), and the time budget reads the clock after a device synchronisation every few steps
(`BudgetClock`). Reported `gpu_seconds` (export, state.pt, `gpu_s` in every log line) are the loop's
wall-clock seconds from its start (resume loading and the latent table included) x processes, summed
over resumed runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_tools.shards import ResumableSampler
from worldmodel.checkpoint import CheckpointError, load_training_state, save_training_state, save_weights
from worldmodel.config import RunConfig, diff_configs
from worldmodel.training import distributed
from worldmodel.training.batches import autocast, to_device
from worldmodel.training.distributed import BatchShard, dist_info  # noqa: F401  (dist_info: public here too)
from worldmodel.training.stage import Stage

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
# At most this many steps between two reads of the (synchronised) clock for the time budget.
BUDGET_CHECK_STEPS = 10
# Sections of the resolved config that must not change across a resume (steps, budget, lr may).
RESUME_SECTIONS = ("data", "autoencoder", "dit")


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of each param group's base lr at `step` (0-based): linear warm-up, then flat or cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizers: dict[str, torch.optim.Optimizer], factor: float) -> float:
    """Scale every param group from its own base lr (a critic keeps its own); returns the first lr."""
    first = None
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * factor
            first = group["lr"] if first is None else first
    return first or 0.0


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The RNG streams to resume. Every rank holds the same streams (distributed.py), so rank 0's state,
    with the CUDA state of the device it trains on, is every rank's, on any world size."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    elif torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu") -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # load_training_state maps tensors onto the training device
    device = torch.device(device)
    if "cuda_device" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"].cpu(), device)  # rank 0's GPU stream onto this rank's GPU
    elif "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def manifest_sha256(dataset) -> str | None:
    """sha256 of the data manifest the dataset reads (provenance in every exported checkpoint)."""
    data_dir = getattr(dataset, "data_dir", None)  # ClipDataset has it; a toy test dataset may not
    if data_dir is None or not (Path(data_dir) / "manifest.json").is_file():
        return None
    return hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA allocator peak on GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def batch_stream(loader: DataLoader, sampler: ResumableSampler, start_step: int, batches_per_epoch: int,
                 batch_size: int):
    """Endless batches of this rank, starting exactly at the batch `start_step` of the seeded epochs.

    The position is derived from the step counter (not the sampler's own counter, which runs ahead
    by the DataLoader's prefetch), so a resumed run sees the same batches as an uninterrupted one.
    `batch_size` is this rank's; an epoch is `batches_per_epoch` global batches (the sampler's padding
    to a multiple of the world size is never reached, so no clip is seen twice in an epoch).
    """
    epoch, k = divmod(start_step, batches_per_epoch)
    while True:
        sampler.set_position(epoch, k * batch_size)
        yield from itertools.islice(loader, batches_per_epoch - k)
        epoch, k = epoch + 1, 0


def synchronize(device: torch.device) -> None:
    """Wait for every kernel launched so far (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricSums:
    """Sums of what `Stage.step` returns since the last log line. Tensors stay where they are until
    `means()`, which copies every sum to the host at once: one wait for the device per log line."""

    def __init__(self):
        self.values: dict[str, list] = {}
        self.count = 0

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            self.values.setdefault(k, []).append(v.detach() if isinstance(v, torch.Tensor) else float(v))
        self.count += 1

    def means(self) -> dict[str, float]:
        """Each key's sum over the steps since the last reset / the number of steps (a key some steps lack,
        e.g. Causal ODE's loss while it generates, is averaged over all of them)."""
        sums = {k: sum(v for v in vs if not isinstance(v, torch.Tensor)) for k, vs in self.values.items()}
        on_device = {k: [v for v in vs if isinstance(v, torch.Tensor)] for k, vs in self.values.items()}
        on_device = {k: torch.stack(vs).double().sum() for k, vs in on_device.items() if vs}
        if on_device:
            first = next(iter(on_device.values()))
            host = torch.stack([v.to(first.device) for v in on_device.values()]).tolist()
            for k, v in zip(on_device, host):
                sums[k] += v
        return {k: v / max(1, self.count) for k, v in sums.items()}

    def reset(self) -> None:
        self.values, self.count = {}, 0


class BudgetClock:
    """Whether the next step (plus the final checkpoint) still fits the time budget, without a device
    synchronisation every step.

    A CUDA step returns once its kernels are queued, so the host clock alone measures how fast work is
    enqueued. The clock is therefore read after a synchronisation, at check steps only: the step time is
    the mean over the steps since the previous check (checkpoint saves excluded), and the next check is
    at most BUDGET_CHECK_STEPS steps later, sooner as the budget runs out (half the steps that still
    fit), so the run stops within a step of where a check before every step would stop it. Every rank
    decides from the same maxima over ranks, so all take part in each check and stop at the same step.
    """

    def __init__(self, budget: float, t_start: float, device: torch.device):
        self.budget, self.t_start, self.device = budget, t_start, device
        self.step_time = 0.0
        self.next_check: int | None = None  # None: check before the first step
        self._mark: tuple[float, int] | None = None  # (time, step) of the last check
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent since the last check that is not step time (a checkpoint save)."""
        self._excluded += seconds

    def over(self, step: int, save_margin: float) -> bool:
        if self.next_check is not None and step < self.next_check:
            return False
        synchronize(self.device)
        now = time.time()
        if self._mark is not None and step > self._mark[1]:
            self.step_time = max(0.0, now - self._mark[0] - self._excluded) / (step - self._mark[1])
        self._mark, self._excluded = (now, step), 0.0
        elapsed, step_time, margin = distributed.max_over_ranks([now - self.t_start, self.step_time, save_margin],
                                                                self.device)
        left = self.budget - elapsed - margin
        if left < step_time:
            return True
        fit = int(0.5 * left / step_time) if step_time > 0 else 1
        self.next_check = step + max(1, min(BUDGET_CHECK_STEPS, fit))
        return False


def local_batch_size(global_batch: int, world: int) -> int:
    """Each rank's share of `data.batch_size` (the global batch)."""
    if global_batch % world:
        raise ValueError(f"data.batch_size={global_batch} is the global batch and must divide by the {world} "
                         f"processes; set data.batch_size={max(1, global_batch // world) * world}")
    return global_batch // world


def check_resume_config(path: Path, state: dict[str, Any], cfg: RunConfig, stage_name: str) -> None:
    if state.get("stage") != stage_name:
        raise CheckpointError(f"{path} is a {state.get('stage')!r} training state, not {stage_name!r}; "
                              "use another --out or drop --resume")
    stored = state.get("config", {})
    now = cfg.to_dict()
    problems = [f"{sec}.{d}" for sec in RESUME_SECTIONS for d in diff_configs(now[sec], stored.get(sec, {}))]
    if problems:
        raise CheckpointError(f"cannot resume from {path}: config changed (checkpoint != now): "
                              + "; ".join(problems) + ". Resume with the same data/model settings.")


def export(stage: Stage, out_dir: Path, cfg: RunConfig, step: int, info: dict[str, Any], write: bool = True) -> Path:
    """Write the stage's exported modules as `<stage>.safetensors` (bf16) + provenance JSON.

    One module is stored without prefix (what load_weights expects); several under `name.` prefixes.
    Under FSDP every rank calls this (gathering the shards is collective) and only `write` ranks write.
    """
    meta_extra = stage.on_export()
    modules = stage.export_modules()
    if len(modules) == 1:
        tensors = next(iter(modules.values())).state_dict()
    else:
        tensors = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    if stage.sharded:
        tensors = distributed.full_tensors(tensors)
    path = out_dir / f"{stage.name}.safetensors"
    if not write:
        return path
    meta = {"config": cfg.to_dict(), "stage": stage.name, "step": step, "modules": sorted(modules),
            "pose_stats": stage.pose_stats, **info, **meta_extra}
    return save_weights(path, tensors, meta)


def train(stage: Stage, dataset, cfg: RunConfig, out_dir: str | Path, *, time_budget: float | None = None,
          resume: bool = False, device: torch.device | str = "cpu", max_steps: int | None = None) -> dict[str, Any]:
    """Run `stage` on `dataset` until cfg.stage.steps (or max_steps, or the time budget in seconds).

    Returns a summary: step, stopped ("done" | "time_budget" | "max_steps"), last metrics, paths.
    `max_steps` stops early at that absolute step without changing the lr schedule (tests use it to
    simulate an interruption). Under torchrun (WORLD_SIZE > 1) every rank calls this; the process
    group is joined here unless the caller already did (and then left to the caller to destroy).
    """
    device, started = distributed.setup(device)
    try:
        return _train(stage, dataset, cfg, Path(out_dir), time_budget, resume, device, max_steps)
    finally:
        distributed.teardown(started)


def _train(stage: Stage, dataset, cfg: RunConfig, out_dir: Path, time_budget: float | None, resume: bool,
           device: torch.device, max_steps: int | None) -> dict[str, Any]:
    t_start = time.time()
    rank, world = dist_info()
    writer = rank == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    sc, oc = cfg.stage, cfg.optim
    total = sc.steps
    stop_at = total if max_steps is None else min(total, max_steps)

    # ---- load ----
    step, gpu_seconds = 0, 0.0
    if resume:
        state_path = out_dir / STATE_FILE
        state = load_training_state(state_path, map_location=device)
        check_resume_config(state_path, state, cfg, stage.name)
        stage.load_state_dict(state["stage_state"])
        step, gpu_seconds = int(state["step"]), float(state.get("gpu_seconds", 0.0))
        set_rng_state(state["rng"], device)
    else:
        seed_everything(cfg.seed)  # the same streams on every rank: see distributed.BatchShard
    if sc.compile:
        stage.compile()
    if world > 1:
        stage.wrap_ddp(device, BatchShard(rank, world), fsdp=sc.fsdp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: cuDNN times its conv algorithms once
    dataset = stage.bind_data(dataset, device)  # e.g. every frame's latent onto the device, loader without frames

    global_batch = cfg.data.batch_size
    batch_size = local_batch_size(global_batch, world)
    sampler = ResumableSampler(len(dataset), seed=cfg.seed, rank=rank, world_size=world)
    batches_per_epoch = len(dataset) // global_batch
    if batches_per_epoch < 1:
        raise ValueError(f"dataset has {len(dataset)} clips, fewer than data.batch_size={global_batch}")
    # Its own generator: DataLoader iterators otherwise draw from the global RNG (breaks exact resume).
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    batches = batch_stream(loader, sampler, step, batches_per_epoch, batch_size)
    info = {"data_manifest_sha256": manifest_sha256(dataset)}

    def save(metrics: dict[str, float]) -> float:
        """Training state + exported weights; returns the seconds it took (for the budget margin)."""
        t0 = time.time()
        distributed.barrier()
        # Gathering FSDP shards is collective: then every rank takes part in both, and rank 0 writes.
        if writer or stage.sharded:
            stage_state = stage.full_state_dict()
        if not writer and stage.sharded:
            export(stage, out_dir, cfg, step, {}, write=False)
        if writer:
            epoch, k = divmod(step, batches_per_epoch)
            save_training_state(out_dir / STATE_FILE, {
                "format": 1, "stage": stage.name, "step": step, "stage_state": stage_state,
                "rng": rng_state(device), "world_size": world,
                "data": {"epoch": epoch, "position": k * global_batch, "seed": cfg.seed},
                "config": cfg.to_dict(), "gpu_seconds": gpu_seconds_now(), "metrics": metrics,
            })
            export(stage, out_dir, cfg, step, {**info, "metrics": metrics, "gpu_seconds": gpu_seconds_now(),
                                               "peak_mem": peak_memory(device)})
        distributed.barrier()  # no rank runs ahead (or reads state.pt) before the write is complete
        return time.time() - t0

    def gpu_seconds_now() -> float:
        return gpu_seconds + (time.time() - t_start) * world

    # ---- train ----
    log_path = out_dir / METRICS_FILE
    sums, metrics = MetricSums(), {}
    t_log = time.time()
    # Until a save has been timed, keep 10% of the budget (at most 30 s) for the final checkpoint.
    save_margin = min(30.0, 0.1 * time_budget) if time_budget else 0.0
    budget = BudgetClock(time_budget, t_start, device) if time_budget is not None else None
    stopped = "done"
    bar = tqdm(total=stop_at, initial=step, desc=stage.name, disable=not writer, dynamic_ncols=True)
    while step < stop_at:
        if budget is not None and budget.over(step, save_margin):  # every rank stops at the same step
            stopped = "time_budget"
            break
        batch = to_device(next(batches), device)
        lr = set_lr(stage.optimizers, lr_factor(step, oc.warmup_steps, total, oc.lr_schedule, oc.min_lr_ratio))
        with autocast(device, sc.bf16):
            losses = stage.step(batch, step)
        stage.reshard()  # FSDP: shards again before the EMA update (a no-op otherwise)
        if stage.ema is not None:
            stage.ema.update(stage.online, step)
        step += 1
        sums.add(losses)
        bar.update(1)
        if step % sc.log_every == 0 or step == stop_at or step == 1:
            n = sums.count
            metrics = distributed.mean_over_ranks(sums.means(), device)  # waits for the device: dt after it
            dt = time.time() - t_log
            record = {"step": step, **metrics, "lr": lr, "samples_per_s": n * global_batch / max(dt, 1e-9),
                      "elapsed": time.time() - t_start, "gpu_s": gpu_seconds_now()}
            if writer:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]})
            sums.reset()
            t_log = time.time()
        if step % sc.checkpoint_every == 0 and step < stop_at:
            save_seconds = save(metrics)
            if budget is not None:
                budget.exclude(save_seconds)
                save_margin = 1.5 * save_seconds + 0.5
    bar.close()
    if stopped == "done" and step < total:
        stopped = "max_steps"
    if sums.count:
        metrics = distributed.mean_over_ranks(sums.means(), device)
    save(metrics)
    return {"stage": stage.name, "step": step, "stopped": stopped, "metrics": metrics,
            "seconds": time.time() - t_start, "gpu_seconds": gpu_seconds_now(), "peak_mem": peak_memory(device),
            "state": str(out_dir / STATE_FILE), "weights": str(out_dir / f"{stage.name}.safetensors")}
