"""Interleaved A/B of the generator's step paths on one machine: which is faster here, now.

    python -m benchmarks.fast_ab [--world DIR] [--paths off static compile] [--frames 60] [--batch 1] [--device cpu]

One `World.generator(batch, fast=path)` per path, each reset from the world's first start context and stepped
past the window fill (where the fast paths build: capture, compile), then stepped in turn, one frame each
round, --frames rounds, decode included. Taking turns puts every path under the same load at the same
moments, which single runs on a shared box do not (their medians vary by 20-40% from run to run). Prints the
median and p90 per path, frames/s, and the ratio to the first path; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from worldmodel.inference.generator import StreamingGenerator
from worldmodel.inference.host import to_host
from worldmodel.inference.world import World


def warmed_generator(world: World, batch: int, fast: str, device: str | None = None, frames: int = 20):
    """world.generator(batch, fast=fast) reset from the world's first start context (latents, seed 0) and stepped
    `frames` frames, decode included: past the window fill, where a fast path builds (captures, compiles)."""
    gen = world.generator(batch, device=device, fast=fast)
    gen.reset(np.repeat(world.start_latents[:1], batch, 0), np.repeat(world.start_deltas[:1], batch, 0),
              torch.Generator(gen.device).manual_seed(0), latents=True)
    delta = np.zeros((batch, 5), np.float32)
    for _ in range(frames):
        to_host(gen.step(delta))
    return gen


def measure(world: World, paths: list[str], frames: int, batch: int = 1, device: str = "cpu",
            warm_frames: int = 20) -> dict[str, dict[str, float]]:
    """Per path: warm_s (reset + warm_frames frames, building included), median_ms, p90_ms, fps, fast_taken
    (whether its frames went through the static frame step)."""
    delta = np.zeros((batch, 5), np.float32)
    gens, rows = {}, {}
    for path in paths:
        t = time.perf_counter()
        gens[path] = warmed_generator(world, batch, path, device, warm_frames)
        rows[path] = {"warm_s": time.perf_counter() - t}
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(frames):
        for path, gen in gens.items():
            t = time.perf_counter()
            to_host(gen.step(delta))
            times[path].append(time.perf_counter() - t)
    for path, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        rows[path].update(median_ms=1e3 * med, p90_ms=1e3 * ts[int(0.9 * (len(ts) - 1))], fps=batch / med,
                          fast_taken=bool(gens[path].fast_ready() and gens[path]._frame_step is not None))
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fast_ab", description=__doc__.split("\n")[0])
    p.add_argument("--world", default=None, help="world directory (default: the shipped one)")
    p.add_argument("--paths", nargs="+", default=["off", "static", "compile"], choices=StreamingGenerator.FAST_PATHS)
    p.add_argument("--frames", type=int, default=60, help="rounds (one frame of every path each)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="JSON report")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = measure(World.load(a.world), a.paths, a.frames, a.batch, a.device)
    first = rows[a.paths[0]]["median_ms"]
    print(f"B = {a.batch}, {a.device}, {a.frames} interleaved frames per path, decode included")
    print("| path | median ms | p90 ms | frames/s | / first | warm-up s |\n|---|---|---|---|---|---|")
    for path, r in rows.items():
        print(f"| {path} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['fps']:.1f} | {r['median_ms'] / first:.2f} | "
              f"{r['warm_s']:.1f} |")
    report = {"command": "python -m benchmarks.fast_ab " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows, "threads": torch.get_num_threads(), "load_avg": list(os.getloadavg())}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
