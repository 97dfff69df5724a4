"""What `worldmodel.build` runs: per-stage configs, checkpoint wiring, and the run directory's ledger.

Per-stage config, later sources win:
    --config YAML (a RunConfig)  <-  --plan YAML (stage -> RunConfig subset)
    <-  `section.key=value` (every stage)  <-  `STAGE.section.key=value` (that stage only)
The wiring fields `stage.autoencoder` / `stage.teacher` / `stage.init` are set from
RUN_DIR/<stage>/<stage>.safetensors (see `wiring`); a per-stage override of one of them wins.

Ledger `RUN_DIR/build.json`: the data manifest's sha256 and, per stage, its resolved config, its
`time_limit_reached` (the stage.time_limit that stopped it, when one did) and its *segments*. A segment
is one continuous optimiser history. A stage starts with one segment at offset 0;
when its `state.pt` is gone but its bf16 export survives (only small files outlive a GPU lease), training
restarts from the exported weights with a fresh optimiser as a new segment whose offset is the number of
steps already in those weights. The stage's step is offset + the step stored in its export's JSON.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from worldmodel.config import ConfigError, RunConfig, apply_overrides, diff_configs, from_dict

PIPELINE = ("autoencoder", "teacher", "ar_diffusion", "causal_cd", "causal_ode", "dmd")
DEFAULT_STAGES = ("autoencoder", "teacher", "ar_diffusion", "causal_cd", "dmd")
# The shipped student: the first of these among the stages built (DMD's EMA generator when DMD ran).
STUDENT_ORDER = ("dmd", "causal_cd", "causal_ode", "ar_diffusion")
WIRING_FIELDS = ("autoencoder", "teacher", "init")
# Sections that may change between invocations (how long and how fast); every other one defines the model.
MUTABLE_SECTIONS = ("stage", "optim")
LEDGER = "build.json"
STATE_FILE = "state.pt"


class BuildError(RuntimeError):
    """Bad input to the build: the message names the file or field and what to do."""


def weights_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / f"{stage}.safetensors"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- configs -------------------------------------------------------------------------------------

def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`a.b=v` -> every stage; `STAGE.a.b=v` -> that stage. RunConfig sections are flat, so an override
    for every stage has at most two dotted parts and `autoencoder.stage.steps` can only mean the stage."""
    common, per_stage = [], {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] in PIPELINE:
            per_stage.setdefault(parts[0], []).append(item.split(".", 1)[1])
        elif len(parts) == 2 and parts[0] == "stage" and parts[1] in WIRING_FIELDS:
            raise BuildError(f"override {item!r}: the build wires stage.{parts[1]} itself; to point one stage "
                             f"elsewhere name it, e.g. dmd.stage.{parts[1]}=PATH")
        else:
            common.append(item)
    return common, per_stage


def load_plan(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """A plan YAML maps stage names to RunConfig subsets, e.g. `autoencoder: {data: {batch_size: 16}}`."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"plan file {path} does not exist")
    plan = yaml.safe_load(path.read_text()) or {}
    if not isinstance(plan, dict):
        raise BuildError(f"plan file {path} must map stage names to config sections")
    unknown = sorted(set(plan) - set(PIPELINE))
    if unknown:
        raise BuildError(f"plan file {path}: unknown stage(s) {unknown}; stages are {list(PIPELINE)}")
    return plan


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def wiring(stage: str, stages: tuple[str, ...], run_dir: Path) -> dict[str, str]:
    """The checkpoints stage `stage` loads: cfg.stage field -> RUN_DIR/<maker>/<maker>.safetensors."""
    w = lambda s: str(weights_path(run_dir, s))  # noqa: E731
    if stage == "autoencoder":
        return {}
    out = {"autoencoder": w("autoencoder")}
    if stage == "ar_diffusion":
        out["init"] = w("teacher")
    elif stage in ("causal_cd", "causal_ode"):
        out["teacher"] = w("ar_diffusion")
    elif stage == "dmd":
        # Real score = the bidirectional teacher; the student starts from the few-step initialisation built
        # in this run (Causal CD first, the paper's method), else whichever one exists already.
        inits = ("causal_cd", "causal_ode", "ar_diffusion")
        init = next((s for s in inits if s in stages), None) or next(
            (s for s in inits if weights_path(run_dir, s).is_file()), "causal_cd")
        out |= {"teacher": w("teacher"), "init": w(init)}
    return out


def stage_configs(config_path: str | Path, plan: dict[str, dict], overrides: list[str],
                  stages: tuple[str, ...], run_dir: Path) -> dict[str, RunConfig]:
    """Resolved RunConfig of every stage in `stages` (wiring included)."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise BuildError(f"config file {config_path} does not exist")
    base = yaml.safe_load(config_path.read_text()) or {}
    common, per_stage = split_overrides(overrides)
    unused = sorted(set(per_stage) - set(stages))
    if unused:
        raise BuildError(f"overrides for stage(s) {unused} that are not in --stages {list(stages)}")
    out = {}
    for name in stages:
        data = _merge(copy.deepcopy(base), plan.get(name, {}))
        try:
            apply_overrides(data, common + per_stage.get(name, []))
            cfg = from_dict(RunConfig, data, where=f"{config_path} ({name})")
        except ConfigError as err:
            raise BuildError(str(err)) from None
        explicit = {o.split("=", 1)[0].strip().split(".")[-1] for o in per_stage.get(name, [])
                    if o.startswith("stage.")}
        for field_name, path in wiring(name, stages, run_dir).items():
            if field_name not in explicit:
                setattr(cfg.stage, field_name, path)
        if name == "causal_ode" and not cfg.stage.ode_pairs_dir:  # its stored trajectories live in the run
            cfg.stage.ode_pairs_dir = str(Path(run_dir) / name / "ode_pairs")
        out[name] = cfg
    return out


def identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config dict that defines the model and data (must not change within a run)."""
    return {k: v for k, v in cfg.items() if k not in MUTABLE_SECTIONS}


def config_problems(now: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """'section.field: stored != now' for every identity field that differs."""
    return diff_configs(identity(now), identity(stored))


# ---- ledger --------------------------------------------------------------------------------------

@dataclass
class StageStatus:
    """Where one stage stands on disk."""

    name: str
    target: int  # cfg.stage.steps
    step: int  # offset + the step of the export
    offset: int  # steps already in the weights the current segment started from
    gpu_seconds: float
    peak_mem: int
    has_state: bool
    has_weights: bool
    metrics: dict[str, float]
    time_limit: float = 0.0  # cfg.stage.time_limit (0 = none)
    limit_reached: float = 0.0  # the largest time_limit that stopped this stage (ledger), 0 = none

    @property
    def time_left(self) -> float | None:
        """Seconds of stage.time_limit not yet trained; None without a limit."""
        return self.time_limit - self.gpu_seconds if self.time_limit > 0 else None

    @property
    def limit_done(self) -> bool:
        """Its time limit is used up: a call with this limit (or a higher one that it already reached) stopped it,
        or it trained that long."""
        return self.time_limit > 0 and (self.limit_reached >= self.time_limit or self.gpu_seconds >= self.time_limit)

    @property
    def mode(self) -> str:
        """done (stage.steps or stage.time_limit reached) | resume (state.pt) | warm (bf16 export only: fresh
        optimiser) | fresh."""
        if self.has_weights and (self.step >= self.target or self.limit_done):
            return "done"
        if self.has_state:
            return "resume"
        return "warm" if self.has_weights else "fresh"


class Ledger:
    """RUN_DIR/build.json, rewritten atomically after every change."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LEDGER
        self.data: dict[str, Any] = {"format": 1, "stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise BuildError(f"{self.path} is not valid JSON ({err}); restore it or remove it (stage steps "
                                 "are then read from the exports alone)") from None

    def save(self) -> None:
        text = json.dumps(self.data, indent=1, default=str)
        if self.path.is_file() and self.path.read_text() == text:
            return  # a call that changes nothing rewrites nothing
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(LEDGER + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def entry(self, stage: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(stage, {"segments": []})

    def segment(self, stage: str, run_dir: Path) -> dict[str, Any]:
        """The segment the stage's export belongs to. A warm segment that never saved leaves the export
        it started from unchanged (same JSON bytes): that export still belongs to the segment before."""
        segs = self.entry(stage)["segments"]
        json_path = weights_path(run_dir, stage).with_suffix(".json")
        sha = file_sha256(json_path) if json_path.is_file() else None
        while len(segs) > 1 and segs[-1].get("base_json_sha") == sha:
            segs.pop()
        return segs[-1] if segs else {"offset": 0, "gpu_seconds_before": 0.0, "metrics_line": 0, "peak_mem": 0}

    def start_segment(self, stage: str, run_dir: Path, status: StageStatus) -> dict[str, Any]:
        """Record a fresh (offset 0) or warm (offset = status.step) start; returns the new segment."""
        entry = self.entry(stage)
        metrics = Path(run_dir) / stage / "metrics.jsonl"
        json_path = weights_path(run_dir, stage).with_suffix(".json")
        seg = {"offset": 0, "gpu_seconds_before": 0.0, "peak_mem": 0, "base_json_sha": None,
               "metrics_line": len(metrics.read_text().splitlines()) if metrics.is_file() else 0}
        if status.mode == "warm":
            seg |= {"offset": status.step, "gpu_seconds_before": status.gpu_seconds, "peak_mem": status.peak_mem,
                    "base_json_sha": file_sha256(json_path)}
            entry["segments"].append(seg)
        else:
            entry["segments"] = [seg]
            entry.pop("time_limit_reached", None)  # a fresh start has trained nothing yet
        self.save()
        return seg

    def status(self, stage: str, cfg: RunConfig, run_dir: Path) -> StageStatus:
        st = weights_path(run_dir, stage)
        meta_path = st.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        seg = self.segment(stage, run_dir)
        has_weights = st.is_file() and bool(meta)
        return StageStatus(
            name=stage, target=cfg.stage.steps, step=seg["offset"] + int(meta.get("step", 0)), offset=seg["offset"],
            gpu_seconds=seg["gpu_seconds_before"] + float(meta.get("gpu_seconds", 0.0)),
            peak_mem=max(int(seg.get("peak_mem", 0)), int(meta.get("peak_mem", 0) or 0)),
            has_state=(Path(run_dir) / stage / STATE_FILE).is_file(), has_weights=has_weights,
            metrics=meta.get("metrics", {}), time_limit=cfg.stage.time_limit,
            limit_reached=float(self.data["stages"].get(stage, {}).get("time_limit_reached", 0.0)),
        )
