"""Agents trained inside the world model, tested in the real engine: `python -m benchmarks.sim2real CMD`.

    train --where model  : PPO (benchmarks.ppo) inside the world model (WorldModelVectorEnv, GPU batched)
    train --where engine : the same agent in the real engine (AsyncVectorEnv of DoomRealEnv, one process each)
    evaluate             : every agent in the real engine (and the trained ones in the model) -> JSON + markdown
    export               : final policies as bf16 safetensors + JSON
    plot                 : training curves PNG from the evaluation JSON

The task is the same function of the camera pose in both worlds: `explore`, +1 per new 64-unit grid
cell of (x, y) within one episode of `--episode-steps` steps, from the world's start poses. In the
model the pose is the one integrated from the action model's deltas (no walls); in the engine it is
where the player really is.

Training resumes from `OUT/ppo_<where>.pt` (written atomically after every iteration) and stops cleanly at
`--time-budget` seconds or `--total-steps` env steps; policy snapshots along the way let `evaluate`
draw engine return against training wall-clock. Baselines in `evaluate`: uniform random actions and a
scripted explorer that reads the engine's pose (walk; when stuck, turn away for a while).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.ppo import PPOConfig, Policy, Trainer, act, play_episode
from envs.keymap import ACTION_NAMES
from worldmodel.checkpoint import load_training_state, save_training_state
from worldmodel.inference.generator import StreamingGenerator

TASK = "explore"
TASK_KWARGS = {"cell_size": 64.0}
FORWARD, TURN_LEFT, TURN_RIGHT = (ACTION_NAMES.index(n) for n in ("forward", "turn_left", "turn_right"))
NUM_ACTIONS = len(ACTION_NAMES)


# ----- environments -----

def model_venv(world, num_envs: int, device: str | None, steps: int | None, collision: str | None = None,
               fast: str | None = None):
    from envs.vector_env import WorldModelVectorEnv

    return WorldModelVectorEnv(num_envs, world=world, steps=steps, device=device, task=TASK, task_kwargs=TASK_KWARGS,
                               collision=collision, fast=fast)


def agent_name(where: str, collision: str | None) -> str:
    """ppo_model, ppo_model_walls (trained in the world model with the collision gate), ppo_engine."""
    return f"ppo_{where}" + ("_walls" if collision and where == "model" else "")


def engine_venv(spec, num_envs: int, start_per_env: bool = False):
    """AsyncVectorEnv of DoomRealEnv; start_per_env: env i always starts at start pose i % N (evaluation)."""
    import gymnasium

    from envs.doom_env import DoomRealEnv

    start_poses, map_name, frame_shape, fps = spec

    def make(i: int):
        poses = start_poses[[i % len(start_poses)]] if start_per_env else start_poses
        return lambda: DoomRealEnv(start_poses=poses, map=map_name, frame_shape=frame_shape, fps=fps,
                                   task=TASK, task_kwargs=TASK_KWARGS)

    return gymnasium.vector.AsyncVectorEnv([make(i) for i in range(num_envs)], context="spawn")


def load_world(path: str | None):
    from worldmodel.inference.world import World

    return World.load(path)


# ----- baselines -----

class ScriptedExplorer:
    """Walk forward, reading the engine's pose: after 2 steps that moved less than 8 map units (a wall), turn
    one way for 5-12 steps (70-170 deg); after 20-50 steps of free walking, veer for 2-6 steps so as not to
    run the same line back and forth. Privileged (the real pose), so it is the bar a pixel agent aims at."""

    def __init__(self, num: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.prev: np.ndarray | None = None
        self.stuck = np.zeros(num, np.int64)
        self.turning = np.zeros(num, np.int64)
        self.turn = np.full(num, TURN_LEFT)
        self.walk_left = self.rng.integers(20, 51, num)
        self.walked = np.zeros(num, bool)

    def _start_turns(self, rows: np.ndarray, low: int, high: int) -> None:
        n = int(rows.sum())
        self.turning[rows] = self.rng.integers(low, high + 1, n)
        self.turn[rows] = self.rng.choice([TURN_LEFT, TURN_RIGHT], n)
        self.walk_left[rows] = self.rng.integers(20, 51, n)

    def __call__(self, pose: np.ndarray) -> np.ndarray:
        pose = np.asarray(pose, np.float64)
        free = self.turning == 0
        if self.prev is not None:  # only a step that walked can show a wall (turning in place moves nothing)
            moved = np.hypot(*(pose[:, :2] - self.prev[:, :2]).T)
            self.stuck = np.where(self.walked & (moved < 8.0), self.stuck + 1, 0)
        self.prev = pose
        stuck = free & (self.stuck >= 2)
        self._start_turns(stuck, 5, 12)
        self.stuck[stuck] = 0
        self._start_turns(free & ~stuck & (self.walk_left <= 0), 2, 6)
        action = np.where(self.turning > 0, self.turn, FORWARD)
        self.walked = action == FORWARD
        self.walk_left = np.where(self.turning > 0, self.walk_left, self.walk_left - 1)
        self.turning = np.maximum(self.turning - 1, 0)
        return action


def policy_fns(kind: str, num: int, seed: int, device: torch.device, policy: Policy | None = None):
    """policy_fn(obs, info) -> (actions (B,), {}) for play_episode."""
    if kind == "random":
        rng = np.random.default_rng(seed)
        return lambda obs, info: (torch.as_tensor(rng.integers(NUM_ACTIONS, size=num)), {})
    if kind == "scripted":
        explorer = ScriptedExplorer(num, seed)
        return lambda obs, info: (torch.as_tensor(explorer(info["pose"])), {})
    gen = torch.Generator(device).manual_seed(seed)
    return lambda obs, info: (act(policy, obs, gen)[0], {})


# ----- train -----

def train(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = PPOConfig(episode_steps=args.episode_steps, minibatch=args.minibatch)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = load_world(args.world)
    if args.where == "model":
        venv = model_venv(world, args.num_envs, str(device), args.steps, args.collision, args.fast)
    else:
        from envs.doom_env import world_engine_spec

        venv = engine_venv(world_engine_spec(world), args.num_envs)
    trainer = Trainer(venv, NUM_ACTIONS, cfg, device, seed=args.seed)
    path = out / f"{agent_name(args.where, args.collision)}.pt"
    if path.exists():
        trainer.load_state_dict(load_training_state(path, map_location=device))
        print(f"resumed {path}: iteration {trainer.iteration}, {trainer.env_steps} env steps")
    start, next_snapshot = time.perf_counter(), (trainer.env_steps // args.snapshot_every + 1) * args.snapshot_every
    if not trainer.snapshots:
        trainer.snapshot()
    per_iter = 0.0
    while trainer.env_steps < args.total_steps:
        elapsed = time.perf_counter() - start
        if elapsed + 1.2 * per_iter > args.time_budget:
            print(f"time budget {args.time_budget:.0f} s reached after {elapsed:.0f} s: stopping cleanly")
            break
        t0 = time.perf_counter()
        row = trainer.iterate()
        per_iter = time.perf_counter() - t0
        if trainer.env_steps >= next_snapshot or trainer.env_steps >= args.total_steps:
            trainer.snapshot()
            next_snapshot += args.snapshot_every
        save_training_state(path, {**trainer.state_dict(), "machine": machine(), "num_envs": args.num_envs})
        print(f"[{args.where}] it {row['iteration']:4d}  steps {row['env_steps']:8d}  return {row['return_mean']:6.2f}"
              f"  env {row['env_steps_per_s']:7.0f}/s  all {row['steps_per_s']:7.0f}/s  ent {row['entropy']:.2f}"
              f"  kl {row['approx_kl']:.4f}", flush=True)
    venv.close()


# ----- evaluate -----

def mean_ci(x) -> dict[str, float]:
    """Mean and 95% interval half-width (Student t) of per-episode returns."""
    from scipy import stats

    x = np.asarray(x, np.float64)
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"mean": float(x.mean()), "ci95": half, "n": int(len(x))}


def load_policy(state: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device) -> Policy:
    cfg = PPOConfig(**state["cfg"])
    policy = Policy(NUM_ACTIONS, cfg.obs_size, cfg.width).to(device)
    policy.load_state_dict(weights)
    return policy.eval()


def evaluate(args) -> None:
    from envs.doom_env import world_engine_spec

    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = load_world(args.world)
    spec = world_engine_spec(world)
    n, steps = args.seeds, args.episode_steps
    size = PPOConfig().obs_size
    names = args.names or sorted(p.stem for p in Path(args.agents).glob("ppo_*.pt"))
    agents = {name: load_training_state(Path(args.agents) / f"{name}.pt", map_location="cpu") for name in names}
    if any(name.endswith("_walls") for name in agents) and not args.collision:
        raise SystemExit("an agent trained with walls needs --collision PATH for its in-model evaluation")
    engine = engine_venv(spec, n, start_per_env=True)
    result: dict[str, Any] = {"task": TASK, "task_kwargs": TASK_KWARGS, "episode_steps": steps, "seeds": n,
                              "machine": machine(), "engine": {}, "model": {}, "training": {}}

    def run(venv, kind, seed, policy=None, record=False, options=None):
        t0 = time.perf_counter()
        fn = policy_fns(kind, n, seed, device, policy)
        ep = play_episode(venv, fn, steps, seed=seed, size=size, device=device, record=record, options=options)
        ep["seconds"] = time.perf_counter() - t0
        return ep

    for kind in ("random", "scripted"):
        ep = run(engine, kind, args.seed)
        result["engine"][kind] = {**mean_ci(ep["returns"].cpu()), "steps_per_s": n * steps / ep["seconds"]}
    models: dict[bool, Any] = {}
    videos = {}
    # The engine's env i starts at start pose i % N (engine_venv start_per_env): the same starts in the model.
    model_starts = {"start_index": np.arange(n) % world.num_starts}
    for name, state in agents.items():
        policy = load_policy(state, state["policy"], device)
        walls = name.endswith("_walls")
        if walls not in models:
            models[walls] = model_venv(world, n, str(device), args.steps, args.collision if walls else None, args.fast)
        model = models[walls]
        ep = run(engine, "policy", args.seed, policy, record=True)
        result["engine"][name] = {**mean_ci(ep["returns"].cpu()), "steps_per_s": n * steps / ep["seconds"]}
        videos[(name, "engine")] = ep
        ep_model = run(model, "policy", args.seed, policy, record=True, options=model_starts)
        result["model"][name] = mean_ci(ep_model["returns"].cpu())
        videos[(name, "model")] = ep_model
        curve = []
        for snap in state["snapshots"][:: max(1, len(state["snapshots"]) // args.max_snapshots)]:
            snap_policy = load_policy(state, snap["policy"], device)
            ep_snap = run(engine, "policy", args.seed + 1, snap_policy)
            curve.append({"env_steps": snap["env_steps"], "train_seconds": snap["train_seconds"],
                          **mean_ci(ep_snap["returns"].cpu())})
        last = state["curve"][-1] if state["curve"] else {}
        result["training"][name] = {
            "env_steps": state["env_steps"], "train_seconds": state["train_seconds"],
            "env_steps_per_s": float(np.median([r["env_steps_per_s"] for r in state["curve"]])) if state["curve"] else None,
            "steps_per_s": float(np.median([r["steps_per_s"] for r in state["curve"]])) if state["curve"] else None,
            "machine": state.get("machine"), "curve": state["curve"], "engine_curve": curve,
            "last_return_in_training_env": last.get("return_mean")}
    engine.close()
    for model in models.values():
        model.close()
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / "sim2real.json").exists():  # keep agents evaluated earlier, update the rest
        old = json.loads((out / "sim2real.json").read_text())
        for key in ("engine", "model", "training"):
            result[key] = {**old.get(key, {}), **result[key]}
    (out / "sim2real.json").write_text(json.dumps(result, indent=1))
    (out / "sim2real.md").write_text(markdown(result))
    print(markdown(result))
    if videos and not args.no_video:
        write_videos(videos, out, world.fps)


def machine() -> dict[str, Any]:
    import os
    import platform

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Task `{r['task']}` {r['task_kwargs']}, {r['episode_steps']} steps per episode, {r['seeds']} "
             "episodes (start i % 8, own policy seed): return = new grid cells visited.", "",
             "| agent | return in the engine (mean ± 95% CI) | return in the world model |", "|---|---|---|"]
    for name, e in r["engine"].items():
        m = r["model"].get(name)
        in_model = f"{m['mean']:.1f} ± {m['ci95']:.1f}" if m else "-"
        lines.append(f"| {name} | {e['mean']:.1f} ± {e['ci95']:.1f} | {in_model} |")
    if r["training"]:
        lines += ["", "| trained | env steps | train wall-clock (s) | env steps/s (collection) | steps/s (with updates) |",
                  "|---|---|---|---|---|"]
        for name, t in r["training"].items():
            lines.append(f"| {name} | {t['env_steps']} | {t['train_seconds']:.0f} | {t['env_steps_per_s']:.0f} | "
                         f"{t['steps_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def write_videos(videos: dict, out: Path, fps: float) -> None:
    """The model-trained agent, episode 0: [engine | world model] from the same start (each closed-loop)."""
    from worldmodel.inference.recording import Recorder

    for name in {k[0] for k in videos}:
        if (name, "model") not in videos:
            continue
        real, fake = videos[(name, "engine")]["frames"][:, 0], videos[(name, "model")]["frames"][:, 0]
        with Recorder(out / f"{name}_engine_vs_model.mp4", fps, meta={"left": "engine", "right": "world model"}) as rec:
            for a, b in zip(real, fake):
                rec.add(np.concatenate([a, b], axis=1))


# ----- export -----

def export(args) -> None:
    """Final policies of the training states as bf16 safetensors + JSON (config, steps, seconds, machine):
    `benchmarks.ppo.Policy(15, obs_size, width)` + `worldmodel.checkpoint.load_weights` reads them back."""
    from worldmodel.checkpoint import save_weights

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(args.agents).glob("ppo_*.pt")):
        state = load_training_state(path, map_location="cpu")
        meta = {key: state.get(key) for key in ("cfg", "env_steps", "train_seconds", "iteration", "seed", "machine",
                                                "num_envs")}
        meta.update(task=TASK, task_kwargs=TASK_KWARGS, num_actions=NUM_ACTIONS)
        print(f"wrote {save_weights(out / path.stem, state['policy'], meta)}")


# ----- plot -----

def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(Path(args.result).read_text())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, t in r["training"].items():
        c = t["curve"]
        axes[0].plot([x["env_steps"] for x in c], [x["return_mean"] for x in c], label=f"{name}: in its training env")
        e = t["engine_curve"]
        axes[0].errorbar([x["env_steps"] for x in e], [x["mean"] for x in e], [x["ci95"] for x in e], fmt="o-",
                         capsize=3, label=f"{name}: in the engine")
        axes[1].errorbar([x["train_seconds"] for x in e], [x["mean"] for x in e], [x["ci95"] for x in e], fmt="o-",
                         capsize=3, label=f"{name}: in the engine")
    for kind in ("random", "scripted"):
        for ax in axes:
            ax.axhline(r["engine"][kind]["mean"], ls="--", lw=1, color="gray" if kind == "random" else "k",
                       label=f"{kind} (engine)")
    axes[0].set_xlabel("env steps")
    axes[1].set_xlabel("training wall-clock (s)")
    for ax in axes:
        ax.set_ylabel("return (new cells per episode)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


def main(argv=None) -> None:
    doc = __doc__
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim2real", description=doc.split("\n")[0],
                                epilog=doc.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "evaluate"):
        s = sub.add_parser(name)
        s.add_argument("--world", default=None, help="world directory (default: the packaged worldmodel/weights/)")
        s.add_argument("--device", default=None, help="torch device of the policy (and the model); default cuda if available")
        s.add_argument("--steps", type=int, choices=(1, 2, 4), default=None, help="world model sampler steps (default: the world's)")
        s.add_argument("--fast", default=None, choices=StreamingGenerator.FAST_PATHS,
                       help="the world model's step path (default: graph on CUDA, static elsewhere; compile: ~1.4x the "
                            "env steps/s of graph at 256 worlds on an H200, after ~1 min of compiling)")
        s.add_argument("--episode-steps", type=int, default=200)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--out", required=True, help="folder of agents (train) / results (evaluate)")
        s.add_argument("--collision", default=None, help="collision gate (envs/collision.py) for the world model: "
                       "train: the agent is ppo_model_walls; evaluate: the in-model runs of *_walls agents")
    t = sub.choices["train"]
    t.add_argument("--where", choices=("model", "engine"), required=True)
    t.add_argument("--num-envs", type=int, default=64, help="worlds (model) or engine processes (engine)")
    t.add_argument("--minibatch", type=int, default=2048)
    t.add_argument("--total-steps", type=int, default=1_000_000, help="stop after this many env steps")
    t.add_argument("--time-budget", type=float, default=540.0, help="stop cleanly before this many seconds")
    t.add_argument("--snapshot-every", type=int, default=100_000, help="env steps between policy snapshots")
    e = sub.choices["evaluate"]
    e.add_argument("--agents", required=True, help="folder holding ppo_model.pt / ppo_engine.pt")
    e.add_argument("--seeds", type=int, default=20, help="evaluation episodes (one engine process each)")
    e.add_argument("--max-snapshots", type=int, default=10, help="snapshots evaluated in the engine per agent")
    e.add_argument("--no-video", action="store_true")
    e.add_argument("--names", nargs="*", default=None, help="agents to evaluate (default: every ppo_*.pt in --agents)")
    e.add_argument("--merge", action="store_true", help="update an existing OUT/sim2real.json instead of replacing it")
    ex = sub.add_parser("export", help="final policies of --agents as bf16 safetensors (for committing)")
    ex.add_argument("--agents", required=True)
    ex.add_argument("--out", required=True)
    pl = sub.add_parser("plot")
    pl.add_argument("--result", required=True, help="sim2real.json of evaluate")
    pl.add_argument("--png", required=True)
    args = p.parse_args(argv)
    {"train": train, "evaluate": evaluate, "export": export, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    main()
