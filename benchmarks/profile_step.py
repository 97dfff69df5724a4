"""Where the time of one steady-state frame goes: the CUDA (or CPU) kernels of the shipped world's generator step.

    python -m benchmarks.profile_step [--device cuda] [--batch 256] [--fast static] [--steps 5] [--rows 25]

Loads the shipped world (or --world), resets B worlds from its first start context (latents), steps until the
KV window is full and the fast path is built, then profiles --steps frames with torch.profiler and prints the
kernels sorted by device time (self time), decode included. Use --fast static on CUDA to see every kernel as
launched (graph replays are one event on some CUPTI versions); at large B the GPU is busy either way.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.fast_ab import warmed_generator
from worldmodel.inference.host import to_host
from worldmodel.inference.world import World


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0])
    p.add_argument("--world", default=None, help="world directory (default: the shipped one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--fast", default="static", choices=("off", "static", "graph", "compile"))
    p.add_argument("--steps", type=int, default=5, help="frames profiled")
    p.add_argument("--rows", type=int, default=25, help="kernels printed")
    a = p.parse_args(argv)
    world = World.load(a.world)
    gen = warmed_generator(world, a.batch, a.fast, a.device)  # window full, fast path built (captured, compiled)
    delta = torch.zeros(a.batch, 5)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gen.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(a.steps):
            to_host(gen.step(delta))
    key = "self_cuda_time_total" if gen.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=a.rows)
    print(f"{a.steps} frames of {a.batch} worlds, fast={a.fast}, {gen.device}, {gen.dtype}\n{table}")
    return table


if __name__ == "__main__":
    main()
