"""Package a built run as a playable world: action model, start contexts, held-out evaluation, save_world.

Used by `worldmodel.build` once every stage is done. The world directory is written beside the old one and
swapped in only when complete, so an interrupted packaging never leaves a half world under RUN_DIR/world.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.action_model import ActionModel
from data_tools.fit_action_model import fit_and_report
from data_tools.poses import pose_deltas
from data_tools.shards import load_episode
from worldmodel.build_plan import BuildError, Ledger, StageStatus, weights_path
from worldmodel.checkpoint import load_weights
from worldmodel.config import RunConfig
from worldmodel.eval import evaluate, load_heldout, markdown, rollout
from worldmodel.inference.world import World, save_world
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.models.dit import WorldDiT
from worldmodel.report import draw_sample_strip


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def start_contexts(data_dir: Path, manifest: dict, frames: int, count: int) -> tuple[dict, str]:
    """`count` contexts of `frames` frames, evenly spread over held-out episodes (train if none)."""
    split = "heldout" if any(e.get("split") == "heldout" for e in manifest["episodes"]) else "train"
    entries = [e for e in manifest["episodes"] if e.get("split", "train") == split and e["frames"] >= frames]
    if not entries:
        raise BuildError(f"{data_dir}: no {split} episode has {frames} frames for a start context")
    entries = entries[:count]
    per_episode = -(-count // len(entries))
    out: dict[str, list] = {"frames": [], "deltas": [], "poses": []}
    for e in entries:
        ep = load_episode(data_dir, e, manifest)
        deltas = pose_deltas(ep["poses"])
        for j in range(per_episode):
            if len(out["frames"]) == count:
                break
            o = (j * (e["frames"] - frames)) // per_episode
            out["frames"].append(ep["frames"][o:o + frames])
            out["deltas"].append(deltas[o:o + frames])
            out["poses"].append(ep["poses"][o:o + frames])
    return {k: np.stack(v) for k, v in out.items()}, split


def action_model(data_dir: Path, run_dir: Path, ledger: Ledger, sha: str):
    """Fit once per data manifest (cached in RUN_DIR/action_model.json). Data without recorded actions
    (ingested video: the manifest's action_space says known=false) gets a kinematic model instead, whose
    rates come from the data's pose deltas, and its held-out error is measured the same way."""
    path = run_dir / "action_model.json"
    cached = ledger.data.get("action_model", {})
    if path.is_file() and cached.get("data_manifest_sha256") == sha:
        return ActionModel.from_json(path.read_text()), cached["report"]
    manifest = json.loads((data_dir / "manifest.json").read_text())
    shortest = min(e["frames"] for e in manifest["episodes"])
    horizon = max(1, min(32, shortest // 2))
    try:
        space = manifest.get("action_space")
        if not isinstance(space, dict) or space.get("known", True):  # recorder data (older ones: a list of names)
            model, report = fit_and_report(str(data_dir), horizon=horizon)
        else:
            model, report = kinematic_model(data_dir, horizon)
    except SystemExit as err:  # the CLI helper exits on a data dir without train episodes
        raise BuildError(f"cannot fit the action model: {err}") from None
    path.write_text(model.to_json())
    ledger.data["action_model"] = {"data_manifest_sha256": sha, "frame": model.frame, "report": report}
    ledger.save()
    log(f"action model: frame={model.frame}, held-out open-loop RMSE/std {report[model.frame]['score']:.3f}")
    return model, report


def kinematic_model(data_dir: Path, horizon: int) -> tuple[ActionModel, dict]:
    """The action model of data without actions: rates from the train deltas; the report scores it on the
    held-out deltas with the actions a player would press for them (each delta's sign at full rate)."""
    from data_tools.action_model import rmse_one_step, rmse_open_loop
    from data_tools.fit_action_model import load_split

    train = load_split(str(data_dir), "train")
    if train is None:
        raise SystemExit(f"{data_dir}: no train episodes")
    model = ActionModel.kinematic(train[1])
    actions, deltas, starts = load_split(str(data_dir), "heldout") or train
    pressed = np.sign(np.asarray(deltas)[:, [0, 1, 3, 4]]) * (np.abs(model.B).sum(0) > 0)
    open_loop = rmse_open_loop(model, pressed, deltas, starts, horizon=horizon)
    std = np.asarray(json.loads((data_dir / "manifest.json").read_text())["pose_stats"]["std"])
    report = {"previous": {"one_step": rmse_one_step(model, pressed, deltas, starts).tolist(),
                           "open_loop": open_loop.tolist(), "score": float((open_loop / std).mean()), "kinematic": True,
                           "note": "actions unknown for this data: rates = 95th percentile of |delta| per dimension"}}
    return model, report


def world_fps(manifest: dict) -> float:
    """Frames per second of the data: the ingested fps, or Doom's 35 tics / frame_skip for recordings."""
    if manifest.get("fps"):
        return float(manifest["fps"])
    return 35.0 / max(1, int(manifest.get("frame_skip") or 1))


def package(student: str, cfgs: dict[str, RunConfig], statuses: dict[str, StageStatus], data_dir: Path,
            run_dir: Path, ledger: Ledger, manifest: dict, sha: str, *, device: str, eval_steps: tuple[int, ...],
            eval_horizons: tuple[int, ...], eval_episodes: int, starts: int) -> dict[str, Any]:
    """Evaluate the student on held-out episodes and write RUN_DIR/world/ (atomically replaced; with the
    encoder, and the start frames encoded once by save_world); returns the provenance written into world.json
    and RUN_DIR/provenance.json."""
    cfg = cfgs[student]
    student_w, ae_w = weights_path(run_dir, student), weights_path(run_dir, "autoencoder")
    model, am_report = action_model(data_dir, run_dir, ledger, sha)
    contexts, split = start_contexts(data_dir, manifest, cfg.generator.context_frames, starts)
    evaluation = None
    if any(e.get("split") == "heldout" for e in manifest["episodes"]):
        log(f"evaluating {student} on held-out episodes ({device})")
        evaluation = evaluate(student_w, ae_w, data_dir, steps=eval_steps, horizons=eval_horizons,
                              episodes=eval_episodes, context=cfg.generator.context_frames, device=device,
                              seed=cfg.seed)
        (run_dir / "eval.json").write_text(json.dumps(evaluation, indent=2))
        (run_dir / "eval.md").write_text(markdown(evaluation))
        print(markdown(evaluation), flush=True)
    else:
        log(f"{data_dir} has no held-out episodes: no fidelity evaluation")
    dit, ae = WorldDiT(cfg.dit), Autoencoder(cfg.autoencoder)
    load_weights(student_w, dit, {"dit": cfg.dit})
    load_weights(ae_w, ae, {"autoencoder": cfg.autoencoder})
    provenance = {
        "student_stage": student,
        "student": "EMA generator of DMD" if student == "dmd" else f"EMA of {student} (DMD not built)",
        "data": {"dir": str(data_dir), "manifest_sha256": sha, "episodes": len(manifest["episodes"]),
                 "engine": manifest.get("engine"), "map": manifest.get("map")},
        "stages": {n: {"steps": s.step, "target": s.target, "gpu_seconds": s.gpu_seconds, "peak_mem": s.peak_mem,
                       "segments": len(ledger.entry(n)["segments"]), "metrics": s.metrics, "config": cfgs[n].to_dict()}
                   for n, s in statuses.items()},
        "action_model": {"frame": model.frame, "heldout_rmse": am_report},
        "start_contexts": {"split": split, "count": int(contexts["frames"].shape[0])},
        "eval": evaluation, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp, world = run_dir / "world.tmp", run_dir / "world"
    shutil.rmtree(tmp, ignore_errors=True)
    fps = world_fps(manifest)
    save_world(tmp, dit, ae, cfg, manifest["pose_stats"], model, contexts, provenance, fps=fps)
    if world.exists():  # the old world goes only once the new one is complete
        shutil.move(str(world), str(run_dir / "world.old"))
    tmp.rename(world)
    shutil.rmtree(run_dir / "world.old", ignore_errors=True)
    (run_dir / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str))
    log(f"world: {world} (student {student}, step {statuses[student].step})")
    return provenance


def sample_strip(world_dir: Path, data_dir: Path, run_dir: Path, device: str, seed: int) -> Path | None:
    """context | generated | ground truth on the first held-out episode, from the packaged world itself."""
    world = World.load(world_dir)
    t0 = world.config.generator.context_frames
    try:
        frames, deltas = load_heldout(data_dir, 1, t0 + 32)
    except ValueError:
        return None
    gen = world.generator(1, device=device, dtype=torch.float32)
    pred, _ = rollout(gen, frames, deltas, t0, seed)
    return draw_sample_strip(frames[0, :t0], pred[0], frames[0, t0:], run_dir / "sample_strip.png")
