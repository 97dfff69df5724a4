"""Several processes under `torchrun`: process group, DDP wrapping, metric reduction, batch randomness.

PyTorch's own stack does the work (torch.distributed + DistributedDataParallel); this module only
decides how the shared training loop uses it:

- `setup(device)` starts the process group from torchrun's environment when WORLD_SIZE > 1 (nccl on
  CUDA, gloo on CPU) and puts each rank on its own GPU (LOCAL_RANK). A plain run stays single-process.
- `replicate(module, methods, ...)` wraps a trainable network in DDP *without* changing how stages call
  it: the network keeps its class, its state_dict keys (no `module.` prefix, so checkpoints are saved
  from the bare module) and its methods. DDP only averages gradients for calls that pass through its
  `forward`; our networks are called through `forward_teacher_forcing` / `forward_cached` too, so each
  listed method of the instance is re-pointed through DDP's forward (what FSDP2's
  `register_fsdp_forward_method` does for FSDP).
- `BatchShard`: how randomness (noise, sigmas, pose dropout) is split over ranks. Every rank holds the
  SAME torch RNG stream (seeded with cfg.seed, not seed + rank) and draws every random tensor for the
  GLOBAL batch (world x B rows), then keeps rows rank::world, the rows of the global batch the sampler
  gave it (ResumableSampler interleaves: local row i of rank r is global row i * world + r). So a
  sample's noise depends on (seed, step, its place in the global batch) and not on the number of ranks:
  N ranks reproduce one process with the N-times batch, a checkpoint's RNG state (identical on every
  rank) resumes on any world size, and a single process draws exactly what it drew before.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Tensor = torch.Tensor
T = TypeVar("T")

# Methods through which our networks are trained (WorldDiT's three modes, the autoencoder's encoder).
TRAINED_METHODS = ("forward", "forward_teacher_forcing", "forward_cached", "encode_raw")


def dist_info() -> tuple[int, int]:
    """(rank, world_size): the process group's when it is up, else torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: torch.device | str = "cpu") -> tuple[torch.device, bool]:
    """Join torchrun's process group when WORLD_SIZE > 1; -> (this rank's device, whether we started it).

    Idempotent: a group that is already up (started by the CLI or a test harness) is reused and not
    ours to destroy. On CUDA each rank takes GPU LOCAL_RANK, so "cuda" means that GPU from here on.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device.type == "cuda" and world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world <= 1 or dist.is_initialized():
        return device, False
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with "
                           "`torchrun --nproc_per_node N -m worldmodel.train ...`")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                            device_id=device if device.type == "cuda" else None)
    return device, True


def teardown(started: bool) -> None:
    """destroy_process_group, if `setup` started it."""
    if started and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@dataclass(frozen=True)
class BatchShard:
    """This rank's rows of random tensors drawn for the global batch (see the module docstring)."""

    rank: int = 0
    world: int = 1

    def draw(self, fn: Callable[[int], T], batch: int) -> T:
        """fn(global_batch) -> tensor(s) with global_batch leading rows -> this rank's `batch` rows."""
        out = fn(batch * self.world)
        if self.world == 1:
            return out
        if isinstance(out, tuple):
            return tuple(o[self.rank :: self.world] for o in out)
        return out[self.rank :: self.world]

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal like x (B, ...), B being this rank's rows."""
        return self.draw(lambda n: torch.randn((n, *x.shape[1:]), device=x.device, dtype=x.dtype), x.shape[0])

    def rand(self, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
        """U[0, 1) of shape (B, ...), B = shape[0] being this rank's rows."""
        return self.draw(lambda n: torch.rand((n, *shape[1:]), device=device), shape[0])

    def global_rows(self, global_count: int) -> int:
        """How many of the first `global_count` rows of the global batch are this rank's."""
        return len(range(self.rank, global_count, self.world))


SINGLE = BatchShard()


class _Router(nn.Module):
    """What DDP wraps: forward(name, ...) runs the network's ORIGINAL method `name` (bound before
    `replicate` re-pointed the instance attribute), so each routed call passes DDP's forward."""

    def __init__(self, module: nn.Module, methods: tuple[str, ...]):
        super().__init__()
        self.net = module
        self._original = {name: getattr(module, name) for name in methods}

    def forward(self, _method: str, *args, **kwargs):
        return self._original[_method](*args, **kwargs)


def replicate(module: nn.Module, device: torch.device, *, methods: tuple[str, ...] = TRAINED_METHODS,
              find_unused_parameters: bool = False) -> DistributedDataParallel:
    """Wrap `module` in DDP in place of its methods; returns the DDP object (for `no_sync` etc.).

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts identical.
    `module` stays what the stage holds: its state_dict has no `module.` prefix and `module(...)`,
    `module.forward_teacher_forcing(...)` etc. now average gradients over ranks in backward.
    """
    methods = tuple(m for m in methods if callable(getattr(module, m, None)))
    if getattr(module, "_ddp", None) is not None:
        raise RuntimeError(f"{type(module).__name__} is already wrapped in DDP")
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(_Router(module, methods), device_ids=device_ids,
                                  find_unused_parameters=find_unused_parameters)
    for name in methods:
        # An instance attribute shadows the class method: nn.Module.__call__ -> self.forward -> DDP.
        object.__setattr__(module, name, _routed(ddp, name))
    object.__setattr__(module, "_ddp", ddp)
    return ddp


def _routed(ddp: DistributedDataParallel, name: str) -> Callable[..., Any]:
    def call(*args, **kwargs):
        return ddp(name, *args, **kwargs)

    return call


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into `module` on every rank (e.g. an EMA copy)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged floats over ranks (one all_reduce); every rank must pass the same keys."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    reduced = dict(zip(keys, t.tolist()))
    return {k: reduced[k] for k in values}  # the caller's order (the progress bar shows the first keys)


def max_over_ranks(value: float | list[float], device: torch.device) -> float | list[float]:
    """The largest value over ranks (e.g. the slowest rank's elapsed time, so all stop together); of each
    element of a list, in one all_reduce."""
    if not is_distributed():
        return value
    values = value if isinstance(value, list) else [value]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist() if isinstance(value, list) else float(t.item())


# ---- FSDP (stage.fsdp=true): parameters, gradients and optimiser states sharded over ranks ----

def shard_fully(module: nn.Module, device: torch.device, methods: tuple[str, ...] = TRAINED_METHODS) -> None:
    """FSDP2 full-shard in place: each block of every ModuleList and each other direct child is its own
    unit (gathered when called, so a stage may call a child directly, e.g. the autoencoder's decoder);
    the root keeps the rest. The module keeps its class and unprefixed state_dict keys (values become
    DTensor shards: gather with `full_tensors`); its other trained methods gather like forward does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                fully_shard(block, mesh=mesh)
    for child in module.children():
        if not isinstance(child, nn.ModuleList) and any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for name in methods:
        if name != "forward" and callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)


def reshard(module: nn.Module) -> None:
    """Free every gathered FSDP unit of `module`. FSDP2 keeps a root unit gathered after forward (for the
    backward that usually follows); a no-grad call (an EMA target) has no backward to free it."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def rebind_optimizer(opt: torch.optim.Optimizer, new_params: dict[int, nn.Parameter]) -> None:
    """Point `opt` at the sharded parameters that replaced its own (id(old) -> new); its state tensors
    (e.g. loaded from a resume) are sharded like their parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    state = {}
    for group in opt.param_groups:
        fresh = []
        for p in group["params"]:
            q = new_params.get(id(p), p)
            fresh.append(q)
            if p in opt.state:
                state[q] = {k: distribute_tensor(v.to(q.device), q.device_mesh, q.placements)
                            if isinstance(q, DTensor) and torch.is_tensor(v) and v.shape == q.shape else v
                            for k, v in opt.state[p].items()}
        group["params"] = fresh
    opt.state.clear()
    opt.state.update(state)


def full_tensors(obj: Any) -> Any:
    """A (nested) state dict with every DTensor gathered to a full CPU tensor. A collective under FSDP:
    every rank must call it on the same structure (they all hold the same keys)."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: full_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(v) for v in obj)
    return obj


def local_value(t: Any) -> Any:
    """A DTensor reduction (e.g. clip_grad_norm_'s total norm) as a plain tensor; anything else as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
