"""Build a playable world from a data directory in one command; a second call resumes where it stopped.

    python -m worldmodel.build DATA_DIR --out RUN_DIR [--config configs/default.yaml]
        [--plan configs/build_default.yaml]
        [--time-budget S] [--stages autoencoder,teacher,ar_diffusion,causal_cd,dmd] [--device cuda]
        [section.key=value ...] [STAGE.section.key=value ...]

Runs the stages in order (autoencoder -> teacher -> AR diffusion -> Causal CD -> DMD; causal_ode on
request) in RUN_DIR/<stage>/, each wired to the exports of the stages before it, through the shared
training loop. A stage whose step reached its stage.steps is skipped; one with a state.pt resumes exactly;
one with only its bf16 export restarts from those weights with a fresh optimiser. One --time-budget covers
the whole call: each stage gets what is left, and the call stops cleanly with checkpoints when it runs
out; the next call continues. A stage's own stage.time_limit (seconds of training over all its calls,
e.g. in the plan: `teacher: {stage: {steps: 100000, time_limit: 300}}`) caps it: when reached, the stage
counts as done (not a stop of the call) and the next one starts in the same call; a later call with a
higher limit continues it. When every stage is done: fits the action model, picks start contexts,
evaluates the student on held-out episodes and packages RUN_DIR/world/ (play.py --world RUN_DIR/world),
then writes RUN_DIR/report.md with a loss-curve and a sample-strip PNG.

Exit status: 0 when everything asked for is built, 3 when the time budget stopped it (run it again), 2 on
bad input (the message names the file or field and what to do).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_tools.shards import ClipDataset, ShardError, read_manifest
from worldmodel.build_plan import (
    DEFAULT_STAGES, PIPELINE, STUDENT_ORDER, BuildError, Ledger, StageStatus, config_problems, file_sha256,
    load_plan, stage_configs, weights_path, wiring,
)
from worldmodel.checkpoint import CheckpointError, join_weights, load_weights, part_paths, remove_parts, write_parts
from worldmodel.config import RunConfig, from_dict
from worldmodel.packaging import log, package, sample_strip
from worldmodel.report import write_report
from worldmodel.training.loop import dist_info, seed_everything, train
from worldmodel.training.registry import build_stage

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
# Below this many seconds a stage is not started: building it and saving a checkpoint would not fit.
MIN_STAGE_SECONDS = 2.0


@dataclass
class BuildOptions:
    config: str | Path = DEFAULT_CONFIG
    plan: str | Path | None = None
    """YAML: stage -> RunConfig subset applied to that stage only (e.g. configs/build_default.yaml)."""
    overrides: list[str] = field(default_factory=list)
    stages: tuple[str, ...] = DEFAULT_STAGES
    time_budget: float | None = None
    """Wall-clock seconds for the whole call (stages, evaluation and packaging)."""
    reserve: float | None = None
    """Seconds kept back from training for evaluation and packaging; default 5% of the budget, at most 60."""
    device: str = "cpu"
    eval_steps: tuple[int, ...] = (1, 2, 4)
    eval_horizons: tuple[int, ...] = (1, 8, 32, 128)
    eval_episodes: int = 8
    starts: int = 8
    """Start contexts packaged with the world."""
    split_mb: float | None = None
    """Also write every .safetensors over this size as NAME.safetensors.partNNN pieces (for transport)."""
    package: bool = True
    """False: train only (e.g. on a lent GPU); a later call on any machine with the data packages the world."""


# ---- checks before anything is written -------------------------------------------------------------

def data_fingerprint(manifest: dict) -> str:
    """sha256 of the manifest without its `recording` section (wall time, workers): a re-recording with the
    same seed and settings gives identical episodes (data_tools.record) and so the same fingerprint."""
    return hashlib.sha256(json.dumps({k: v for k, v in manifest.items() if k != "recording"},
                                     sort_keys=True).encode()).hexdigest()


def check_data(data_dir: Path, cfgs: dict[str, RunConfig], ledger: Ledger, run_dir: Path) -> tuple[dict, str]:
    """The manifest, its sha256; errors if it is missing, of another size, or not the run's data."""
    try:
        manifest = read_manifest(data_dir)
    except ShardError as err:
        raise BuildError(f"{err}. DATA_DIR must be a recorded data directory (manifest.json + episodes/)") from None
    sha, fingerprint = file_sha256(data_dir / "manifest.json"), data_fingerprint(manifest)
    if ledger.data.get("data_fingerprint"):
        recorded = [(ledger.path, ledger.data["data_fingerprint"], fingerprint)]
    else:  # no ledger (e.g. only the exports came back): each export names the manifest it was trained on
        metas = [weights_path(run_dir, s).with_suffix(".json") for s in PIPELINE]
        recorded = [(m, json.loads(m.read_text()).get("data_manifest_sha256"), sha) for m in metas if m.is_file()]
    for where, theirs, ours in recorded:
        if theirs and theirs != ours:
            raise BuildError(
                f"{data_dir / 'manifest.json'} ({ours[:12]}) does not describe the data this run was trained on "
                f"({where} records {theirs[:12]}). Pass the data directory RUN_DIR was built from (or one recorded "
                "with the same seed and settings), or start a new run with another --out; nothing was changed.")
    for name, cfg in cfgs.items():
        if (manifest["frame_height"], manifest["frame_width"]) != (cfg.data.frame_height, cfg.data.frame_width):
            raise BuildError(f"{data_dir} has {manifest['frame_height']}x{manifest['frame_width']} frames, the {name} "
                             f"config says data.frame_height/width={cfg.data.frame_height}x{cfg.data.frame_width}")
    if not manifest.get("pose_stats"):
        raise BuildError(f"{data_dir / 'manifest.json'} has no pose_stats; re-record or re-ingest the data")
    return manifest, sha


def stored_config(stage: str, ledger: Ledger, run_dir: Path) -> RunConfig:
    """The config a stage was last trained with: the ledger's, else its export's."""
    stored = ledger.data["stages"].get(stage, {}).get("config")
    if stored is None:
        stored = json.loads(weights_path(run_dir, stage).with_suffix(".json").read_text())["config"]
    return from_dict(RunConfig, stored, where=f"{run_dir} ({stage})")


def check_configs(cfgs: dict[str, RunConfig], ledger: Ledger, run_dir: Path) -> None:
    """Every stage's model/data config must equal the one it was trained with (ledger, else its export)."""
    problems = []
    for name, cfg in cfgs.items():
        stored, where = ledger.entry(name).get("config"), ledger.path
        meta = weights_path(run_dir, name).with_suffix(".json")
        if stored is None and meta.is_file():
            stored, where = json.loads(meta.read_text()).get("config"), meta
        if stored:
            problems += [f"{name}: {p} (stored in {where})" for p in config_problems(cfg.to_dict(), stored)]
    if problems:
        raise BuildError(f"{run_dir} was built with another config (stored != now): " + "; ".join(problems)
                         + ". Use the config (and overrides) it was made with, or a new --out; only stage.* and "
                         "optim.* may change between calls. Nothing was changed.")


def check_inputs(stages: tuple[str, ...], run_dir: Path) -> None:
    """Each stage's input checkpoints are made earlier in this call or exist already."""
    for i, name in enumerate(stages):
        for fld, path in wiring(name, stages, run_dir).items():
            maker = Path(path).parent.name
            if maker not in stages[:i] and not Path(path).is_file():
                raise BuildError(f"stage {name} needs stage.{fld}={path}, made by stage {maker}, which is neither "
                                 f"built yet nor in --stages {list(stages)}; add {maker} to --stages")


# ---- training --------------------------------------------------------------------------------------

def load_exported(stage, path: Path, cfg: RunConfig) -> None:
    """Restart a stage from its own bf16 export: online net and EMA start there, optimisers fresh."""
    expected = {"autoencoder": cfg.autoencoder} if stage.name == "autoencoder" else {"dit": cfg.dit}
    load_weights(path, stage.online, expected)
    stage.ema.load_state_dict(stage.online.state_dict())


def run_stage(name: str, cfg: RunConfig, status: StageStatus, data_dir: Path, run_dir: Path, ledger: Ledger,
              pose_stats: dict, device: str, budget: float | None, datasets: dict) -> dict[str, Any]:
    """Train one stage (fresh, resumed or warm) within `budget` seconds and what is left of its own
    stage.time_limit; returns what happened ("stopped": done | time_budget | time_limit | max_steps)."""
    t0 = time.time()
    mode = status.mode
    seg = ledger.start_segment(name, run_dir, status) if mode in ("fresh", "warm") else ledger.segment(name, run_dir)
    if not ledger.entry(name)["segments"]:  # resuming a run whose ledger was lost
        ledger.entry(name)["segments"] = [seg]
    ledger.entry(name)["config"] = cfg.to_dict()
    ledger.save()
    # A warm segment trains the steps still missing; the loop counts from 0 inside the segment.
    run_cfg = dataclasses.replace(cfg, stage=dataclasses.replace(cfg.stage, steps=cfg.stage.steps - seg["offset"]))
    log(f"{name}: {mode} at step {status.step}/{cfg.stage.steps}"
        + (f" (from {weights_path(run_dir, name).name}, fresh optimiser)" if mode == "warm" else ""))
    seed_everything(cfg.seed)  # network initialisation is part of the run's seed
    stage = build_stage(name, run_cfg, device, pose_stats)
    if mode == "warm":
        load_exported(stage, weights_path(run_dir, name), cfg)
    key = cfg.data.clip_frames
    if key not in datasets:
        datasets[key] = ClipDataset(data_dir, key, split="train")
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    left = None if budget is None else budget - (time.time() - t0)
    # The stage's own limit counts the loop's seconds (its gpu_seconds), which start inside train().
    by_limit = status.time_left is not None and (left is None or status.time_left <= left)
    summary = train(stage, datasets[key], run_cfg, run_dir / name, time_budget=status.time_left if by_limit else left,
                    resume=mode == "resume", device=device)
    stopped = summary["stopped"]
    if stopped == "time_budget" and by_limit:  # done at this limit: a later call skips it unless the limit rises
        stopped = "time_limit"
        ledger.entry(name)["time_limit_reached"] = cfg.stage.time_limit
    del stage  # its networks and latent table; the next stage gets the memory
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    seg["peak_mem"] = max(int(seg.get("peak_mem", 0)), int(summary["peak_mem"]))
    ledger.save()
    after = ledger.status(name, cfg, run_dir)
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in list(summary["metrics"].items())[:4])
    log(f"{name}: step {after.step}/{after.target} ({stopped}), {after.gpu_seconds:.0f} GPU-s, "
        f"peak {after.peak_mem / 2**30:.2f} GiB; {metrics}")
    return {"stage": name, "mode": mode, "stopped": stopped, "trained_steps": after.step - status.step,
            "seconds": time.time() - t0}


# ---- transport of large files ------------------------------------------------------------------------

def split_large(run_dir: Path, mb: float) -> list[Path]:
    """NAME.safetensors over `mb` MiB -> NAME.safetensors.part000, part001, ... beside it (the whole file
    stays: the run reads it); parts of a file now under the limit go."""
    limit, written = int(mb * 2**20), []
    for path in sorted(run_dir.rglob("*.safetensors")):
        data = path.read_bytes()
        if len(data) <= limit:
            remove_parts(path)
        elif b"".join(p.read_bytes() for p in part_paths(path)) != data:  # else the parts are up to date
            written += write_parts(path, data, limit)
    return written


def join_parts(run_dir: Path) -> list[Path]:
    """Rebuild every NAME.safetensors that is missing but whose .partNNN pieces are present (the stages and
    the ledger read whole files); a world directory stays as save_world split it: World.load reads parts."""
    wholes = [p.with_name(p.name[: -len(".part000")]) for p in sorted(run_dir.rglob("*.safetensors.part000"))]
    return [join_weights(w) for w in wholes if not w.exists() and not (w.parent / "world.json").is_file()]


# ---- the build ---------------------------------------------------------------------------------------

def build(data_dir: str | Path, run_dir: str | Path, opts: BuildOptions | None = None) -> dict[str, Any]:
    """Run the pipeline into run_dir as far as the time budget allows; returns a summary:
    {"complete": bool, "ran": [per-stage results], "stages": {name: StageStatus}, "world": path | None, ...}."""
    opts = opts or BuildOptions()
    t_start = time.time()
    if dist_info()[1] > 1:
        raise BuildError("worldmodel.build runs as one process (it keeps one ledger); for several GPUs run the "
                         "stages with `torchrun ... -m worldmodel.train` (docs/TRAINING.md)")
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    unknown = [s for s in opts.stages if s not in PIPELINE]
    if unknown:
        raise BuildError(f"unknown stage(s) {unknown}; stages are {list(PIPELINE)}")
    stages = tuple(s for s in PIPELINE if s in opts.stages)
    deadline = None if opts.time_budget is None else t_start + opts.time_budget
    reserve = 0.0
    if opts.time_budget is not None:
        reserve = opts.reserve if opts.reserve is not None else min(60.0, 0.05 * opts.time_budget)

    for path in join_parts(run_dir) if run_dir.is_dir() else []:
        log(f"joined {path} from its parts")
    cfgs = stage_configs(opts.config, load_plan(opts.plan), list(opts.overrides), stages, run_dir)
    ledger = Ledger(run_dir)
    manifest, sha = check_data(data_dir, cfgs, ledger, run_dir)
    check_configs(cfgs, ledger, run_dir)
    check_inputs(stages, run_dir)

    run_dir.mkdir(parents=True, exist_ok=True)
    ledger.data |= {"data_manifest_sha256": sha, "data_fingerprint": data_fingerprint(manifest),
                    "data_dir": str(data_dir), "config_file": str(opts.config),
                    "plan": str(opts.plan) if opts.plan else None, "overrides": list(opts.overrides)}
    ledger.save()
    ran, datasets, complete = [], {}, True
    for i, name in enumerate(stages):
        status = ledger.status(name, cfgs[name], run_dir)
        if status.mode != "done" and status.has_weights and status.time_left is not None \
                and status.time_left < MIN_STAGE_SECONDS:  # what is left of its limit would not fit a step
            ledger.entry(name)["time_limit_reached"] = status.time_limit
            ledger.save()
            status = ledger.status(name, cfgs[name], run_dir)
        if status.mode == "done":
            limit = f", time limit {status.time_limit:g}s reached" if status.step < status.target else ""
            log(f"[{i + 1}/{len(stages)}] {name}: done ({status.step}/{status.target} steps, "
                f"{status.gpu_seconds:.0f} GPU-s{limit})")
            continue
        budget = None if deadline is None else deadline - time.time() - reserve
        if budget is not None and budget < MIN_STAGE_SECONDS:
            log(f"time budget spent before {name}; run the same command again to continue")
            complete = False
            break
        log(f"[{i + 1}/{len(stages)}] {name}" + (f" (budget {budget:.0f}s)" if budget is not None else ""))
        ran.append(run_stage(name, cfgs[name], status, data_dir, run_dir, ledger, manifest["pose_stats"],
                             opts.device, budget, datasets))
        if ran[-1]["stopped"] not in ("done", "time_limit"):
            log(f"{name} stopped ({ran[-1]['stopped']}); run the same command again to continue")
            complete = False
            break

    # Stages built by earlier calls but not named now still belong in the report and the provenance.
    cfgs = {n: cfgs.get(n) or stored_config(n, ledger, run_dir) for n in PIPELINE
            if n in cfgs or weights_path(run_dir, n).with_suffix(".json").is_file()}
    statuses = {n: ledger.status(n, cfg, run_dir) for n, cfg in cfgs.items()}
    student = next((s for s in STUDENT_ORDER if s in stages), None)
    provenance, strip, world = None, None, run_dir / "world"
    if complete and not opts.package:
        log("--no-package: trained only; run the build again without it (any device) to package the world")
    elif complete and student is None:
        log("no causal student among --stages (ar_diffusion, causal_cd, causal_ode or dmd): no world packaged")
    elif complete:
        fingerprint = {n: s.step for n, s in statuses.items()} | {"student": student}
        if ledger.data.get("packaged") == fingerprint and (world / "world.json").is_file():
            log(f"world {world} is up to date")
            provenance = json.loads((run_dir / "provenance.json").read_text())
        else:
            provenance = package(student, cfgs, statuses, data_dir, run_dir, ledger, manifest, sha, device=opts.device,
                                 eval_steps=opts.eval_steps, eval_horizons=opts.eval_horizons,
                                 eval_episodes=opts.eval_episodes, starts=opts.starts)
            strip = sample_strip(world, data_dir, run_dir, opts.device, cfgs[student].seed)
            ledger.data["packaged"] = fingerprint
            ledger.save()
    summary = {"complete": complete, "ran": ran, "stages": statuses, "student": student if complete else None,
               "world": str(world) if provenance else None, "provenance": provenance,
               "seconds": time.time() - t_start}
    report = write_report(run_dir, summary, ledger.data)
    for name, s in statuses.items():
        log(f"  {name:13s} {s.step:>7d}/{s.target:<7d} {s.gpu_seconds:8.0f} GPU-s  peak {s.peak_mem / 2**30:6.2f} GiB")
    log(f"report: {report}" + (f", sample strip {strip}" if strip else ""))
    if opts.split_mb:
        for part in split_large(run_dir, opts.split_mb):
            log(f"wrote {part}")
    return summary


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _names(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worldmodel.build", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2] + "\nSee docs/TRAINING.md, 'One command'.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", help="recorded data: manifest.json + episodes/")
    p.add_argument("--out", required=True, help="run directory (created; an existing one is continued)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="RunConfig YAML shared by every stage")
    p.add_argument("--plan", default=None,
                   help="YAML of per-stage config subsets, e.g. configs/build_default.yaml (step counts, batch sizes)")
    p.add_argument("--stages", type=_names, default=",".join(DEFAULT_STAGES),
                   help=f"comma-separated stages to build, run in pipeline order {PIPELINE} (default: %(default)s)")
    p.add_argument("--time-budget", type=float, default=None, help="wall-clock seconds for the whole call")
    p.add_argument("--reserve", type=float, default=None,
                   help="seconds of the budget kept for evaluation and packaging (default 5%%, at most 60)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="training and evaluation device (default: %(default)s)")
    p.add_argument("--eval-steps", type=_ints, default="1,2,4",
                   help="few-step sampler step counts (default: %(default)s)")
    p.add_argument("--eval-horizons", type=_ints, default="1,8,32,128",
                   help="frames after the context (default: %(default)s)")
    p.add_argument("--eval-episodes", type=int, default=8, help="held-out episodes evaluated")
    p.add_argument("--starts", type=int, default=8, help="start contexts packaged with the world")
    p.add_argument("--no-package", action="store_true",
                   help="train only: no evaluation or world directory (package later, e.g. on the CPU, with the same data)")
    p.add_argument("--export-split-mb", type=float, default=None,
                   help="also write each .safetensors over this many MiB as .partNNN pieces (joined on the next call)")
    p.add_argument("overrides", nargs="*",
                   help="section.key=value for every stage, STAGE.section.key=value for one (dmd.stage.steps=800)")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    # argparse runs `type` on string defaults too: stages and eval lists are tuples here.
    opts = BuildOptions(config=a.config, plan=a.plan, overrides=a.overrides, stages=a.stages,
                        time_budget=a.time_budget, reserve=a.reserve, device=a.device,
                        eval_steps=a.eval_steps, eval_horizons=a.eval_horizons,
                        eval_episodes=a.eval_episodes, starts=a.starts, split_mb=a.export_split_mb,
                        package=not a.no_package)
    try:
        summary = build(a.data_dir, a.out, opts)
    except (BuildError, CheckpointError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if summary["complete"] else 3


if __name__ == "__main__":
    sys.exit(main())
