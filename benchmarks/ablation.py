"""The initialisation ablation of issue 6: which few-step student does the same DMD budget finish best?

    python -m benchmarks.ablation train DATA --out RUN --time-budget S [--device cuda] [--plan P] [k=v ...]
    python -m benchmarks.ablation evaluate DATA --run RUN [--steps 1 2 4] [--horizons 1 8 32] --out JSON
    python -m benchmarks.ablation table JSON [--speed SPEED_JSON]

`train` runs, with `worldmodel.build` (so every part resumes, stops cleanly at --time-budget and restarts
from bf16 exports), into RUN:
  base/            autoencoder -> teacher -> AR diffusion -> Causal CD, then Causal ODE with as many
                   regression steps as Causal CD took training steps (plus its trajectory-generation steps);
  dmd_from_<init>/ asymmetric DMD from each initialisation (causal_cd, ar_diffusion, causal_ode), the same
                   plan, seed and step count; base's autoencoder, teacher and <init> are linked in.
A call that runs out of budget exits 3: run the same command again. RUN/ablation_train.json holds the cost
of every stage (steps, GPU-seconds; Causal ODE's generation seconds and the bytes of its stored trajectories).

`evaluate` rolls every initialisation and every DMD student out on windows of the held-out episodes (4
ground-truth context frames, then the recorded pose deltas) with the frame-wise few-step sampler at each
step count (the first frame takes the same k steps): PSNR / SSIM at each horizon (95% interval over
windows), a detail ratio (mean image-gradient magnitude of the frame over the engine's: < 1 is blur, which
PSNR rewards), and the action-following yaw error (the image-only annotator, data_tools.annotator, on
[last context frame, generated frames] against the recorded yaw deltas; its own error on the engine frames
is the reference row). `table` prints the markdown tables and checks the paper's claims against the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.ablation_report import interval, table
from benchmarks.action_following import annotate, follow_stats
from data_tools.shards import ShardError, read_manifest
from worldmodel.build import BuildOptions, build
from worldmodel.build_plan import PIPELINE, BuildError, Ledger, load_plan, stage_configs, weights_path
from worldmodel.checkpoint import CheckpointError, load_training_state
from worldmodel.eval import load_heldout, load_models, rollout, write_report
from worldmodel.inference.generator import StreamingGenerator
from worldmodel.metrics import detail, psnr, ssim
from worldmodel.training.batches import decode_latents, encode_frames, float_to_frames, frames_to_float
from worldmodel.training.causal_ode import PAIRS_SUBDIR

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
DEFAULT_PLAN = ROOT / "configs" / "ablation.yaml"
BASE = "base"
BASE_STAGES = ("autoencoder", "teacher", "ar_diffusion", "causal_cd")
INITS = ("causal_cd", "ar_diffusion", "causal_ode")  # DMD branches in this order: the paper's method first
YAW_KEYS = ("yaw_err_median", "yaw_err_p90", "yaw_err_mean", "frames", "turning_frames", "yaw_err_median_turning",
            "yaw_sign_agree", "yaw_gain")


def branch(init: str) -> str:
    return f"dmd_from_{init}"


def checkpoints(run: Path) -> dict[str, Path]:
    """name -> DiT weights of every student the evaluation compares (inits alone, then DMD from each)."""
    inits = {init: weights_path(run / BASE, init) for init in sorted(INITS)}  # alphabetical: AR, CD, ODE
    return inits | {f"dmd<-{init}": weights_path(run / branch(init), "dmd") for init in INITS}


# ----- train -----

def link_inputs(run: Path, init: str) -> Path:
    """RUN/dmd_from_<init>/ with base's autoencoder, teacher and <init> stage folders linked in."""
    out = run / branch(init)
    out.mkdir(parents=True, exist_ok=True)
    for stage in ("autoencoder", "teacher", init):
        link, target = out / stage, Path("..") / BASE / stage
        if not link.is_symlink() and not link.exists():
            link.symlink_to(target, target_is_directory=True)
        if link.resolve() != (run / BASE / stage).resolve():
            raise BuildError(f"{link} is not a link to {run / BASE / stage}; remove it and run again")
    return out


def for_stages(overrides: list[str], stages: tuple[str, ...]) -> list[str]:
    """The overrides for every stage plus the `STAGE.x.y=v` ones of `stages` (a build refuses the others)."""
    def keep(item: str) -> bool:
        parts = item.split("=", 1)[0].strip().split(".")
        return not (len(parts) >= 3 and parts[0] in PIPELINE) or parts[0] in stages

    return [o for o in overrides if keep(o)]


def configs_of(config: Path, plan: dict, overrides: list[str], stages: tuple[str, ...], run_dir: Path) -> dict:
    return stage_configs(config, plan, for_stages(overrides, stages), stages, run_dir)


def ode_steps(run: Path, config: Path, plan: dict, overrides: list[str]) -> int:
    """Causal ODE's stage.steps: its generation steps + as many regression steps as Causal CD trained."""
    base = run / BASE
    cfg = configs_of(config, plan, overrides, ("causal_ode",), base)["causal_ode"]
    cd = configs_of(config, plan, overrides, ("causal_cd",), base)["causal_cd"]
    cd_steps = Ledger(base).status("causal_cd", cd, base).step
    generation = math.ceil(cfg.stage.ode_samples / cfg.data.batch_size)
    return generation + cd_steps


def stage_costs(run_dir: Path, ledger: Ledger, cfgs: dict) -> dict[str, dict[str, Any]]:
    out = {}
    for name, cfg in cfgs.items():
        s = ledger.status(name, cfg, run_dir)
        out[name] = {"steps": s.step, "gpu_seconds": s.gpu_seconds, "peak_mem": s.peak_mem,
                     "batch_size": cfg.data.batch_size}
    return out


def ode_store_cost(run: Path) -> dict[str, float]:
    """Bytes of Causal ODE's stored trajectories and the seconds the teacher took to generate them."""
    pairs = run / BASE / "causal_ode" / PAIRS_SUBDIR
    chunks = sorted(pairs.glob("chunk_*.pt"))
    gen_s, clips = 0.0, 0
    for path in chunks:  # reading the chunks back is the honest count (PairStore would also check their levels)
        chunk = load_training_state(path)
        gen_s += float(chunk["gen_seconds"])
        clips += int(chunk["states"].shape[0])
    return {"bytes": float(sum(p.stat().st_size for p in chunks)), "gen_seconds": gen_s, "clips": clips}


def train(data: Path, run: Path, *, config: Path, plan_path: Path, overrides: list[str], budget: float | None,
          device: str, split_mb: float | None = None) -> dict[str, Any]:
    """Every stage of the ablation, as far as `budget` seconds allow; -> summary (also RUN/ablation_train.json)."""
    t0 = time.time()
    plan = load_plan(plan_path)
    left = lambda: None if budget is None else budget - (time.time() - t0)  # noqa: E731

    def run_build(run_dir: Path, stages: tuple[str, ...], extra: list[str] = ()) -> bool:
        # build() skips finished stages and starts none it has no time for, so a spent budget is its call.
        budget_left = None if left() is None else max(0.0, left())
        opts = BuildOptions(config=config, plan=plan_path, overrides=[*for_stages(overrides, stages), *extra],
                            stages=stages, time_budget=budget_left, reserve=2.0, device=device, package=False,
                            split_mb=split_mb)
        return build(data, run_dir, opts)["complete"]

    base = run / BASE
    done = run_build(base, BASE_STAGES)
    if done:
        done = run_build(base, ("causal_ode",), [f"causal_ode.stage.steps={ode_steps(run, config, plan, overrides)}"])
    for init in INITS:
        if done:  # the init named outright (the build's own wiring would pick whichever student it finds)
            b = link_inputs(run, init)
            done = run_build(b, ("dmd",), [f"dmd.stage.init={weights_path(b, init)}"])
    summary = {"complete": done, "data": str(data), "config": str(config), "plan": str(plan_path),
               "overrides": overrides, "device": device, "stages": {}}
    if base.is_dir():
        names = [s for s in (*BASE_STAGES, "causal_ode") if (base / s).is_dir()]
        summary["stages"] = stage_costs(base, Ledger(base), configs_of(config, plan, overrides, tuple(names), base))
    for init in INITS:
        b = run / branch(init)
        if (b / "dmd").is_dir():
            cfg = configs_of(config, plan, overrides, ("dmd",), b)
            summary["stages"][branch(init)] = stage_costs(b, Ledger(b), cfg)["dmd"]
    if (base / "causal_ode").is_dir():
        summary["ode_store"] = ode_store_cost(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / "ablation_train.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----- evaluate -----

def picture_scores(pred: np.ndarray, truth: np.ndarray, horizons: list[int]) -> dict[str, dict[str, float]]:
    """Per horizon: PSNR and SSIM (mean, 95% half-width over windows) and the detail ratio."""
    out = {}
    for h in horizons:
        x, gt = torch.from_numpy(pred[:, h - 1]), torch.from_numpy(truth[:, h - 1])
        per_window = psnr(x, gt).clamp(max=99)
        p, p_ci = interval(per_window)
        s, s_ci = interval(ssim(x, gt))
        out[str(h)] = {"psnr": p, "psnr_ci": p_ci, "ssim": s, "ssim_ci": s_ci,
                       "detail": float(detail(x).mean() / detail(gt).mean().clamp(min=1e-8)),
                       "psnr_windows": [round(float(v), 3) for v in per_window]}  # same windows for every student
    return out


def _annotate(args: tuple[np.ndarray, float]) -> np.ndarray:
    return annotate(*args)


def yaw_following(sequences: np.ndarray, truth_deltas: np.ndarray, fov: float, workers: int) -> dict[str, float]:
    """The annotator on each (L+1)-frame sequence [last context frame, L frames] against the recorded deltas
    (N, L, 5): row j of a window is the motion into its frame j, as `rollout` conditions frame j on it."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        est = np.concatenate(list(pool.map(_annotate, [(seq, fov) for seq in sequences])))
    stats = follow_stats(est, truth_deltas.reshape(-1, truth_deltas.shape[-1]))
    return {k: stats[k] for k in YAW_KEYS}


def evaluate(data_dir: Path, run: Path, *, steps=(1, 2, 4), horizons=(1, 8, 32), context: int = 4,
             stride: int = 200, episodes: int = 8, device: str = "cpu", seed: int = 0,
             workers: int | None = None) -> dict[str, Any]:
    """Every student of `run` at every step count on the held-out windows -> report dict."""
    device = torch.device(device)
    horizons = sorted(horizons)
    workers = workers or max(1, min(16, (os.cpu_count() or 2)))
    ae_path = weights_path(run / BASE, "autoencoder")
    found = {name: path for name, path in checkpoints(run).items() if path.is_file()}
    missing = sorted(set(checkpoints(run)) - set(found))
    if not found:
        raise CheckpointError(f"{run} holds none of the ablation's students; run `benchmarks.ablation train` first")
    frames, deltas = load_heldout(data_dir, episodes, context + max(horizons), stride=stride)
    truth, truth_deltas = frames[:, context:], deltas[:, context:]
    manifest = read_manifest(data_dir)
    if "fov" not in manifest:
        raise ValueError(f"{data_dir / 'manifest.json'} names no fov: the pose annotator needs the frames' field of view")
    fov = float(manifest["fov"])
    last = frames[:, context - 1]
    with_last = lambda pred: np.concatenate([last[:, None], pred], axis=1)  # noqa: E731  (N, 1 + L, H, W, 3)
    report: dict[str, Any] = {"data": str(data_dir), "run": str(run), "windows": int(frames.shape[0]),
                              "context": context, "horizons": horizons, "steps": list(steps), "fov": fov,
                              "missing": missing, "students": {}}
    report["annotator_on_engine"] = yaw_following(with_last(truth), truth_deltas, fov, workers)
    frozen = follow_stats(np.zeros_like(truth_deltas.reshape(-1, 5)), truth_deltas.reshape(-1, 5))
    report["frozen_world"] = {k: frozen[k] for k in YAW_KEYS}
    report["copy_last"] = picture_scores(np.repeat(last[:, None], truth.shape[1], 1), truth, horizons)
    for name, path in found.items():
        cfg, meta, dit, ae = load_models(path, ae_path, device)
        if "ae_recon" not in report:  # the autoencoder's ceiling (every student shares base's autoencoder)
            with torch.no_grad():
                x = frames_to_float(torch.from_numpy(truth).to(device))
                recon = float_to_frames(decode_latents(ae, encode_frames(ae, x, bf16=False), bf16=False)).cpu().numpy()
            report["ae_recon"] = picture_scores(recon, truth, horizons)
        rows = {}
        for k in steps:
            gen_cfg = dataclasses.replace(cfg.generator, steps=k, first_frame_steps=k, block_size=1)
            gen = StreamingGenerator(dit, ae, meta["pose_stats"], gen_cfg, cfg.flow, device=device)
            pred, latency = rollout(gen, frames, deltas, context, seed)
            rows[str(k)] = {"horizons": picture_scores(pred, truth, horizons),
                            "yaw": yaw_following(with_last(pred), truth_deltas, fov, workers),
                            "per_frame_s": latency["per_frame_s"]}
            h = rows[str(k)]["horizons"]
            print(f"{name:20s} {k}-step: " + "  ".join(f"h{x} {h[str(x)]['psnr']:.2f} dB" for x in horizons)
                  + f"  yaw {rows[str(k)]['yaw']['yaw_err_median']:.2f} deg/frame", flush=True)
        report["students"][name] = {"checkpoint": str(path), "stage": meta.get("stage"), "step": meta.get("step"),
                                    "samplers": rows}
    report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    train_json = run / "ablation_train.json"
    if train_json.is_file():
        report["train"] = json.loads(train_json.read_text())
    return report


# ----- command line -----

def main(argv: list[str] | None = None) -> int:
    doc = __doc__
    p = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=doc.split("\n")[0],
                                epilog=doc.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train every stage of the ablation (resumable)")
    t.add_argument("data", type=Path, help="recorded data directory (manifest.json + episodes/)")
    t.add_argument("--out", type=Path, required=True, help="ablation run directory (created or continued)")
    t.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    t.add_argument("--plan", type=Path, default=DEFAULT_PLAN, help="per-stage budgets (default: %(default)s)")
    t.add_argument("--time-budget", type=float, default=None, help="wall-clock seconds for this call")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--export-split-mb", type=float, default=None, help="also write exports as .partNNN pieces")
    t.epilog = "Other arguments: section.key=value or STAGE.section.key=value overrides, as worldmodel.build takes."
    e = sub.add_parser("evaluate", help="every student at every step count on held-out windows")
    e.add_argument("data", type=Path)
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    e.add_argument("--horizons", type=int, nargs="+", default=[1, 8, 32])
    e.add_argument("--stride", type=int, default=200, help="frames between window starts in an episode")
    e.add_argument("--episodes", type=int, default=8, help="held-out episodes used")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--workers", type=int, default=None, help="processes for the pose annotator")
    e.add_argument("--speed", type=Path, default=None, help="benchmarks.speed JSON for the first-frame claim")
    e.add_argument("--out", type=Path, default=Path("ablation.json"))
    tb = sub.add_parser("table", help="markdown tables and the claims from an evaluate JSON")
    tb.add_argument("report", type=Path)
    tb.add_argument("--speed", type=Path, default=None, help="benchmarks.speed JSON (frame-2 and chunk3-4 rows)")
    a, extra = p.parse_known_args(argv)  # a subcommand's positionals cannot interleave: overrides are the rest
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad or (extra and a.cmd != "train"):
        p.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    a.overrides = extra
    try:
        if a.cmd == "train":
            s = train(a.data, a.out, config=a.config, plan_path=a.plan, overrides=a.overrides,
                      budget=a.time_budget, device=a.device, split_mb=a.export_split_mb)
            for name, c in s["stages"].items():
                print(f"  {name:24s} {c['steps']:>6d} steps {c['gpu_seconds']:7.0f} GPU-s")
            print("complete" if s["complete"] else "stopped by the time budget: run the same command again")
            return 0 if s["complete"] else 3
        speed = json.loads(a.speed.read_text()) if getattr(a, "speed", None) else None
        if a.cmd == "evaluate":
            report = evaluate(a.data, a.run, steps=a.steps, horizons=a.horizons, stride=a.stride,
                              episodes=a.episodes, device=a.device, workers=a.workers)
        else:
            report = json.loads(a.report.read_text())
        text = table(report, speed)
        if a.cmd == "evaluate":
            write_report(a.out, report, text)
        else:
            print(text)
    except (BuildError, CheckpointError, ShardError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
