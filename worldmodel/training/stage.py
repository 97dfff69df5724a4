"""What every training stage is to the shared loop: modules, optimisers, an EMA and `step(batch)`.

A stage is a small object; the loop (`worldmodel.training.loop`) owns resume, time budget, EMA updates,
logging, the progress bar and atomic checkpoints. A stage's `step` computes its losses (calling the
stage's pure loss functions), steps its own optimisers (DMD's critic/generator ratio lives there) and
returns its log values as detached 0-dim tensors (or host floats): the loop sums them on the device and
copies them to the host only at log lines, so no step waits for the GPU.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from worldmodel.training.batches import LatentBatcher
from worldmodel.training.distributed import (
    SINGLE, BatchShard, broadcast_module, dist_info, full_tensors, local_value, rebind_optimizer, replicate,
    reshard, shard_fully,
)

Logs = dict[str, "torch.Tensor | float"]
"""What `Stage.step` returns: name -> detached 0-dim tensor (left on the device) or host float."""


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    For the first `start` updates the average is copied outright from the online model: an EMA of a
    freshly initialised network is a poor target (the Causal CD reference copies for ~200 steps).
    """

    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        self.decay = decay
        self.start = start
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = 0.0 if step < self.start else self.decay
        ema = list(self.model.parameters())
        online = [p.detach().to(e.dtype) for e, p in zip(ema, model.parameters())]
        # One multi-tensor kernel on CUDA instead of one lerp per parameter (a step of a small network is
        # launch-bound); on the CPU it is the same per-tensor lerp as before.
        torch._foreach_lerp_(ema, online, 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)


class Stage:
    """Base class of a training stage.

    Subclasses set `name`, `online` (the network whose EMA the loop maintains, or None), `ema`
    (an EMA of `online`, or None) and `optimizers` (name -> torch optimizer), and implement `step`.
    Frozen networks (a teacher) are not part of the training state: they are reloaded from their
    checkpoint path on resume.
    """

    name: str = "stage"
    online: nn.Module | None = None
    ema: EMA | None = None
    optimizers: dict[str, torch.optim.Optimizer]
    pose_stats: dict[str, list[float]] | None = None
    """Normalisation of the pose deltas (from the data manifest); stored in every exported checkpoint."""
    shard: BatchShard = SINGLE
    """This rank's rows of the global batch: every random draw of `step` goes through it (distributed.py)."""
    find_unused_parameters: bool = False
    """DDP: True when a trainable module has parameters that get no gradient in a step."""

    def step(self, batch: dict[str, torch.Tensor], step: int) -> Logs:
        raise NotImplementedError

    def bind_data(self, dataset, device: torch.device):
        """Called by the loop before it builds its DataLoader; returns the dataset to load batches from
        (e.g. one without frames once their latents are on the device). Default: the dataset as is."""
        return dataset

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules whose weights are part of the training state (online nets, critics)."""
        return {"online": self.online} if self.online is not None else {}

    def export_modules(self) -> dict[str, nn.Module]:
        """What a later stage or the shipped world uses: the EMA when there is one."""
        if self.ema is not None:
            return {"model": self.ema.model}
        return {"model": self.online}

    def on_export(self) -> dict[str, Any]:
        """Called by the loop before the exported modules are written; returns extra metadata.

        E.g. the autoencoder stage sets `latent_scale` here from the latent std it has measured.
        """
        return {}

    def compile(self) -> None:
        """torch.compile the trainable modules in place (state_dict keys stay unprefixed)."""
        for module in self.trainable_modules().values():
            module.compile()

    def wrap_ddp(self, device: torch.device, shard: BatchShard, fsdp: bool = False) -> None:
        """Under torchrun: average every trainable module's gradients over ranks (DDP; the critic too),
        keep the EMA identical on every rank and draw randomness for the global batch.

        The stage keeps its bare modules (checkpoints never see a `module.` prefix); only their
        methods are routed through DDP (`distributed.replicate`). Call after loading a resume state.
        fsdp=True shards the trainable modules and the EMA instead (FSDP2; the EMA update is then an
        elementwise op on matching shards) and re-points the optimisers at the shards.
        """
        device = torch.device(device)
        self.shard, self.sharded = shard, fsdp
        if not fsdp:
            for module in self.trainable_modules().values():
                replicate(module, device, find_unused_parameters=self.find_unused_parameters)
            if self.ema is not None:  # built from each rank's own init before DDP broadcast rank 0's weights
                broadcast_module(self.ema.model)
            return
        modules = list(self.trainable_modules().values()) + ([self.ema.model] if self.ema is not None else [])
        old = {}
        for module in modules:
            broadcast_module(module)  # FSDP keeps each rank's slice of its own copy: make the copies equal
            old[id(module)] = {n: id(p) for n, p in module.named_parameters()}
            shard_fully(module, device)
        new = {old[id(m)][n]: p for m in modules for n, p in m.named_parameters()}
        for opt in self.optimizers.values():
            rebind_optimizer(opt, new)
            # The fused AdamW kernel does not take DTensor shards in every torch release (pytorch#126670).
            set_fused(opt, False)

    sharded: bool = False

    def reshard(self) -> None:
        """Under FSDP: leave every trainable module and the EMA sharded (called after each step)."""
        if self.sharded:
            for module in list(self.trainable_modules().values()) + ([self.ema.model] if self.ema else []):
                reshard(module)

    def full_state_dict(self) -> dict[str, Any]:
        """`state_dict()` with full tensors; under FSDP a collective every rank must call."""
        return full_tensors(self.state_dict()) if self.sharded else self.state_dict()

    def state_dict(self) -> dict[str, Any]:
        state = {name: m.state_dict() for name, m in self.trainable_modules().items()}
        state["optimizers"] = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in self.trainable_modules().items():
            module.load_state_dict(state[name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            set_fused(opt, fused_on(opt.param_groups[0]["params"]))  # not the flag the state was saved with
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


class LatentStage(Stage):
    """A stage trained on the frozen autoencoder's latents (teacher, AR diffusion, Causal CD/ODE, DMD).

    `batcher` turns batches into latents; with `stage.cache_latents` it encodes every frame of the
    training data once in `bind_data`, and the DataLoader then ships clip positions instead of frames.
    A stage built from given modules (tests) may have no batcher and take latent batches.
    """

    batcher: LatentBatcher | None = None

    def bind_data(self, dataset, device: torch.device):
        if self.batcher is None:
            return dataset
        return self.batcher.bind(dataset, progress=dist_info()[0] == 0)


def fused_on(params) -> bool:
    """Whether AdamW runs its fused kernel over `params`: on CUDA (one launch for every parameter instead of
    several per parameter); on the CPU the default implementation, as before."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" for p in params)


def make_optimizer(params, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW with fp32 state (fused on CUDA); the loop scales each param group's lr from its `base_lr`."""
    params = list(params)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             fused=fused_on(params) or None)


def set_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Switch AdamW to (or from) its fused kernel; a loaded state brings the flag it was saved with. Each
    `step` counter moves to where that implementation keeps it (the fused one on the parameter's device,
    the default one on the host, where reading it does not wait for the GPU)."""
    for group in optimizer.param_groups:
        group["fused"] = fused or None
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device if fused else "cpu", torch.float32)


def optimizer_step(loss: torch.Tensor, module: nn.Module, optimizer: torch.optim.Optimizer,
                   grad_clip: float) -> torch.Tensor:
    """zero_grad -> backward -> clip -> step; returns the pre-clip gradient norm (a detached 0-dim tensor
    for the log: reading it here would wait for the device)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    return local_value(norm).detach()  # a DTensor under FSDP
