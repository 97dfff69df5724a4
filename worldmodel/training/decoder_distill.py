"""Distil a world's decoder into a thinner one: `python -m worldmodel.training.decoder_distill --world DIR --out OUT`.

Why: the decoder is most of a displayed frame's work. At the shipped width 48 it is 9.2 GFLOP per 96x128
frame, against ~2.3 for the 2-step DiT. On a 2-core CPU it takes 33 of ~70 ms; on an H200 at B = 256 it takes
28 of 38 ms (benchmarks/RESULTS.md, issue 6). Width 32 has 0.44x its FLOPs.

What it learns from: latents the world's own student generates, since those are the only latents a player's
decoder ever decodes.
- B worlds start from the world's start contexts and run under random actions, each held for 4-12 frames,
  through the world's action model.
- The world's decoder turns each latent into a uint8 frame, which is what the player sees. That frame is the target.
- A held-out pool, rolled out from other seeds, measures the student.

Loss: L1 + MSE on [-1, 1] frames. The student starts from random weights and copies the world's latent_scale.

Resumable:
- OUT/state.pt holds the student decoder, the optimiser, the step and the training time. It is written
  atomically every --checkpoint-every steps and when --time-budget or --steps stops the run.
- The pools are kept in OUT/pools.pt, so a resumed run trains on the same data.

Outputs:
- OUT/decoder_distill.json: student against the world's decoder on the held-out pool (PSNR, SSIM, detail
  ratio) and the decode time of both on the device.
- OUT/world/ (--export-world): a copy of the world with the student as its decoder. That is world.json's
  autoencoder.decoder_base_channels; no encoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from worldmodel.checkpoint import load_training_state, save_training_state
from worldmodel.inference.generator import autoencoder_on
from worldmodel.inference.world import World, WorldError, default_device, default_dtype, save_world
from worldmodel.metrics import detail, psnr, ssim
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.training.batches import float_to_frames, frames_to_float
from worldmodel.training.loop import lr_factor, set_lr

Tensor = torch.Tensor
# Canonical actions (forward, strafe, turn, look) the random player holds: walking, turning, both, strafing.
ACTIONS = np.array([[1, 0, 0, 0], [1, 0, 1, 0], [1, 0, -1, 0], [0, 0, 1, 0], [0, 0, -1, 0], [0, 1, 0, 0],
                    [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, -1]], np.float32)


@dataclasses.dataclass
class DistillConfig:
    width: int = 32
    """The student's decoder_base_channels (the world's decoder is the teacher)."""
    worlds: int = 64
    """Worlds rolled out at once for the pools."""
    frames: int = 64
    """Frames per world and pool: train pool = worlds x frames latents."""
    heldout_worlds: int = 16
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    steps: int = 20000
    checkpoint_every: int = 200
    seed: int = 0


def split_starts(num_starts: int) -> tuple[np.ndarray, np.ndarray]:
    """(train starts, held-out starts): the last quarter of the world's start contexts (at least one) is held
    out, so the held-out pool is measured on places the training pool never started from (with one start, both
    use it)."""
    held = max(1, num_starts // 4)
    all_ = np.arange(num_starts)
    return (all_[:-held], all_[-held:]) if num_starts > 1 else (all_, all_)


def rollout_latents(world: World, worlds: int, frames: int, seed: int, device, dtype,
                    starts: np.ndarray | None = None) -> Tensor:
    """Latents (worlds * frames, C, h, w) float32 on the CPU: the world's student under random held actions,
    world i from start context starts[i % len(starts)] (default: all of the world's)."""
    rng = np.random.default_rng(seed)
    gen = world.generator(worlds, device=device, dtype=dtype)
    pick = np.arange(world.num_starts) if starts is None else np.asarray(starts)
    starts = pick[np.arange(worlds) % len(pick)]
    noise = [torch.Generator(device).manual_seed(int(rng.integers(2**62))) for _ in range(worlds)]
    gen.reset(torch.from_numpy(world.start_latents[starts]), torch.from_numpy(world.start_deltas[starts]),
              generator=noise, latents=True)
    prev = world.start_deltas[starts, -1].astype(np.float32)
    action, left = np.zeros((worlds, 4), np.float32), np.zeros(worlds, np.int64)
    out = []
    for _ in range(frames):
        renew = left <= 0
        action[renew] = ACTIONS[rng.integers(len(ACTIONS), size=int(renew.sum()))]
        left[renew] = rng.integers(4, 13, size=int(renew.sum()))
        left -= 1
        prev = np.asarray(world.action_model.predict(prev, action), np.float32)
        out.append(gen.step(torch.from_numpy(prev), decode=False).float().cpu())
    return torch.stack(out, 1).flatten(0, 1)


def _show(play: Autoencoder, z: Tensor) -> Tensor:
    """Latents (N, C, h, w) -> uint8 frames (N, H, W, 3) on the CPU through a play copy (autoencoder_on)."""
    p = next(play.parameters())
    return float_to_frames(play.decode(z.to(p.device, p.dtype).contiguous(memory_format=torch.channels_last)).float()).cpu()


@torch.no_grad()
def decode_to_frames(ae: Autoencoder, z: Tensor, device, dtype, chunk: int = 64) -> Tensor:
    """Latents (N, C, h, w) -> uint8 frames (N, H, W, 3) on the CPU, as a world's generator shows them: through
    its channels_last copy in the play dtype (on the CPU 2.4x faster than fp32 weights under autocast)."""
    play = autoencoder_on(ae, device, dtype)
    return torch.cat([_show(play, part) for part in z.split(chunk)])


def make_pools(world: World, cfg: DistillConfig, device, dtype, teacher: Autoencoder) -> dict[str, Tensor]:
    pools: dict[str, Any] = {"made_with": pool_key(world, cfg)}
    train_starts, held_starts = split_starts(world.num_starts)
    for name, worlds, seed, starts in (("train", cfg.worlds, cfg.seed, train_starts),
                                       ("heldout", cfg.heldout_worlds, cfg.seed + 1, held_starts)):
        z = rollout_latents(world, worlds, cfg.frames, seed, device, dtype, starts)
        pools[f"{name}_latents"] = z
        pools[f"{name}_frames"] = decode_to_frames(teacher, z, device, dtype)
    return pools


def pool_key(world: World, cfg: DistillConfig) -> dict[str, Any]:
    """What the pools depend on: a resumed run with another world or other pool settings must not reuse them."""
    return {"world": str(world.path), "worlds": cfg.worlds, "frames": cfg.frames,
            "heldout_worlds": cfg.heldout_worlds, "seed": cfg.seed}


def student_for(world: World, width: int, teacher: Autoencoder) -> Autoencoder:
    """A thinner Autoencoder whose decoder is trained (its encoder is never used), latent_scale copied."""
    student = Autoencoder(dataclasses.replace(world.config.autoencoder, decoder_base_channels=width))
    student.set_latent_scale(float(teacher.latent_scale))
    return student


def distill_loss(student: Autoencoder, z: Tensor, target: Tensor) -> Tensor:
    """L1 + MSE between the student's frame and the target uint8 frame, both in [-1, 1]; z (B, C, h, w)."""
    pred = student.decode(z)
    goal = frames_to_float(target)  # fp32: uint8 levels stay exact (bf16 rounds them near +-1)
    return F.l1_loss(pred.float(), goal) + F.mse_loss(pred.float(), goal)


@torch.no_grad()
def measure(student: Autoencoder, teacher: Autoencoder, pools: dict[str, Tensor], device, dtype) -> dict[str, Any]:
    """The student on the held-out pool against the world's decoder's frames, and both decoders' time."""
    z, goal = pools["heldout_latents"], pools["heldout_frames"]
    pred = decode_to_frames(student, z, device, dtype)
    out = {"heldout_frames": int(len(z)), "psnr": float(psnr(pred, goal).clamp(max=99).mean()),
           "ssim": float(ssim(pred, goal).mean()),
           "detail_ratio": float(detail(pred).mean() / detail(goal).mean().clamp(min=1e-8))}
    for batch in (1, 64):  # as a world's generator decodes: its channels_last copy in the play dtype
        zb = z[torch.arange(batch) % len(z)].to(device, dtype)  # the pool repeated up to the batch
        for name, ae in (("student", student), ("teacher", teacher)):
            play = autoencoder_on(ae, device, dtype)
            times = []
            for i in range(13):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                _show(play, zb)
                if i >= 3:
                    times.append(time.perf_counter() - t)
            out[f"{name}_decode_ms_b{batch}"] = 1e3 * float(np.median(times))
    return out


def train(world: World, out: Path, cfg: DistillConfig, *, device=None, dtype=None, time_budget: float | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Distil until cfg.steps or time_budget seconds (resuming OUT/state.pt); -> the measurements written."""
    t_start = time.time()
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    out.mkdir(parents=True, exist_ok=True)
    _, teacher = world.modules()  # stays as the world holds it (CPU fp32); decode_to_frames copies it to the device
    torch.manual_seed(cfg.seed)  # the student's initialisation is part of the run's seed
    student = student_for(world, cfg.width, teacher).to(device)
    opt = torch.optim.AdamW(student.decoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, trained_s = 0, 0.0
    state_path, pools_path = out / "state.pt", out / "pools.pt"
    if state_path.is_file():
        state = load_training_state(state_path, map_location=device)
        if state["config"] != dataclasses.asdict(cfg) | {"steps": state["config"]["steps"]}:
            raise WorldError(f"{state_path} was made with {state['config']}, not {dataclasses.asdict(cfg)}; "
                             "use the same settings (only --steps may change) or another --out")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        step, trained_s = int(state["step"]), float(state["trained_s"])
    if pools_path.is_file():
        pools = load_training_state(pools_path)
        if pools.get("made_with") != pool_key(world, cfg):
            raise WorldError(f"{pools_path} was made with {pools.get('made_with')}, this run asks for "
                             f"{pool_key(world, cfg)}; use the same world and pool settings or another --out")
    else:
        pools = make_pools(world, cfg, device, dtype, teacher)
        save_training_state(pools_path, pools)

    def save() -> None:
        save_training_state(state_path, {"student": student.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                         "trained_s": trained_s, "config": dataclasses.asdict(cfg)})

    z_all, f_all = pools["train_latents"], pools["train_frames"]
    bar = tqdm(total=cfg.steps, initial=step, desc="decoder distill", disable=not progress)
    losses, t_seg = [], time.time()
    while step < cfg.steps and (time_budget is None or time.time() - t_start < time_budget):
        # Each step's batch from its own seed: a resumed run draws what an uninterrupted one would.
        idx = torch.randint(0, len(z_all), (cfg.batch_size,), generator=torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + step))
        set_lr({"decoder": opt}, lr_factor(step, cfg.warmup_steps, cfg.steps, "constant", 0.0))  # linear warm-up
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = distill_loss(student, z_all[idx].to(device), f_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % cfg.checkpoint_every == 0:
            trained_s += time.time() - t_seg
            t_seg = time.time()
            save()
    bar.close()
    trained_s += time.time() - t_seg
    save()
    student.eval()
    report = {"world": str(world.path), "config": dataclasses.asdict(cfg), "step": step, "trained_s": trained_s,
              "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-20:])) if losses else None,
              **measure(student, teacher, pools, device, dtype)}
    (out / "decoder_distill.json").write_text(json.dumps(report, indent=2))
    return report


def export_world(world: World, out: Path, student_state: dict[str, Tensor], width: int,
                 report: dict[str, Any] | None = None) -> Path:
    """A copy of `world` whose decoder is the student (no encoder: the student decoder was never paired with one)."""
    dit, teacher = world.modules()
    student = student_for(world, width, teacher)
    student.load_state_dict(student_state)
    cfg = dataclasses.replace(world.config, autoencoder=student.cfg)
    starts = {"frames": world.start_frames, "deltas": world.start_deltas, "poses": world.start_poses,
              "latents": world.start_latents}
    measured = {k: (report or {}).get(k) for k in ("step", "trained_s", "psnr", "ssim", "detail_ratio", "config")}
    provenance = {**world.provenance, "decoder_distilled_from": {"world": str(world.path), "width": width, **measured}}
    return save_world(out, dit, student.cpu(), cfg, world.pose_stats, world.action_model, starts, provenance,
                      fps=world.fps, encoder=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worldmodel.training.decoder_distill", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=None, help="world directory (default: the packaged worldmodel/weights/)")
    p.add_argument("--out", type=Path, required=True, help="run directory (created; an existing one is resumed)")
    for f in dataclasses.fields(DistillConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--time-budget", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--device", default=None, help="default cuda if available")
    p.add_argument("--export-world", action="store_true", help="also write OUT/world/ with the student decoder")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = DistillConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(DistillConfig)})
    try:
        world = World.load(a.world)
        report = train(world, a.out, cfg, device=a.device, time_budget=a.time_budget, progress=not a.no_progress)
        if a.export_world:
            state = load_training_state(a.out / "state.pt")["student"]
            world_dir = a.out / "world"
            if world_dir.exists():
                shutil.rmtree(world_dir)
            if report["step"] < cfg.steps:
                print(f"warning: exporting a decoder stopped at step {report['step']} of {cfg.steps}", file=sys.stderr)
            report["exported"] = str(export_world(world, world_dir, state, cfg.width, report))
    except WorldError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    keys = ("step", "trained_s", "loss_first", "loss_last", "psnr", "ssim", "detail_ratio", "student_decode_ms_b1",
            "teacher_decode_ms_b1", "student_decode_ms_b64", "teacher_decode_ms_b64")
    print(json.dumps({k: report.get(k) for k in keys}, indent=1))
    return 0 if report["step"] >= cfg.steps else 3


if __name__ == "__main__":
    sys.exit(main())
