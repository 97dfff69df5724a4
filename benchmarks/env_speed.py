"""Env steps/s of the vector env, per generator path: `python -m benchmarks.env_speed [--num-envs 8 64 256]`.

    python -m benchmarks.env_speed --device cuda --num-envs 64 256 --paths off graph --steps-per-row 200
    python -m benchmarks.env_speed --device cpu --num-envs 1 8 --paths off static

For each number of worlds B and generator path ("off" = eager, "static", "graph" = CUDA graphs; the default
of the envs is graph on CUDA and static elsewhere): a `WorldModelVectorEnv` over the packaged world. Each row
is reset with seed 0, then stepped with uniformly random keyboard actions. The first
`cache_frames + 3` steps are not timed: the window fills, and the fast path builds (and captures) its step.
Reported per row: env steps/s (B x steps / wall time, decode and reward included, as an RL agent sees them) and
the median generation latency per step (the env's `latency_ms`). This is the number `benchmarks.sim2real`
trains at, without the policy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.world_cli import world_parser
from worldmodel.inference.generator import StreamingGenerator
from worldmodel.inference.world import World, WorldError


def measure(world: World, num_envs: int, fast: str, steps: int, *, device=None, dtype=None,
            gen_steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    from envs.vector_env import WorldModelVectorEnv

    env = WorldModelVectorEnv(num_envs, world=world, steps=gen_steps, device=device, dtype=dtype, fast=fast,
                              report_latency=True)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    warm = world.config.generator.cache_frames + 3
    latencies = []
    for i in range(warm + steps):
        if i == warm:
            t0 = time.perf_counter()
        _, _, _, _, info = env.step(rng.integers(0, env.single_action_space.n, num_envs))
        if i >= warm:
            latencies.append(float(np.asarray(info["latency_ms"]).max()))
    wall = time.perf_counter() - t0
    gen = env._core.generator
    row = {"num_envs": num_envs, "fast": fast, "steps": steps, "env_steps_per_s": num_envs * steps / wall,
           "latency_ms_median": float(np.median(latencies)), "fast_taken": gen._frame_step is not None,
           "device": str(gen.device), "dtype": str(gen.dtype).removeprefix("torch.")}
    env.close()
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| worlds | path | env steps/s | generation ms/step (median) | fast step taken | device, dtype |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['num_envs']} | {r['fast']} | {r['env_steps_per_s']:.0f} | {r['latency_ms_median']:.1f} | "
              f"{r['fast_taken']} | {r['device']}, {r['dtype']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = world_parser("benchmarks.env_speed", __doc__)
    p.add_argument("--num-envs", type=int, nargs="+", default=[1, 8])
    p.add_argument("--paths", nargs="+", default=["off", "static"], choices=StreamingGenerator.FAST_PATHS)
    p.add_argument("--steps-per-row", type=int, default=50, help="timed env steps per row")
    p.add_argument("--out", type=Path, default=None, help="JSON report (a markdown table beside it)")
    a = p.parse_args(argv)
    try:
        world = World.load(a.world)
    except WorldError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = [measure(world, n, fast, a.steps_per_row, device=a.device, dtype=a.dtype, gen_steps=a.steps)
            for n in a.num_envs for fast in a.paths]
    table = markdown(rows)
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"rows": rows, "world": str(world.path), "load_avg": os.getloadavg()}, indent=2))
        a.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
