"""Action following (DESIGN §5): does the generated camera move the way it was told?

    python -m benchmarks.action_following --world RUN_DIR/world [--starts 4] [--steps K] [--out PATH]

Scripted camera actions (forward, strafe, turn, look) in [-1, 1], each run from several of the world's
start contexts (all starts as one batch through `envs.core.WorldBatch`, the code both envs step):
- turn_in_place: turn left a full 360 deg, then right a full 360 deg;
- walk_and_return: walk forward, turn 180 deg in place, walk back;
- strafe_square: strafe right, walk forward, strafe left, walk back (no turning);
- arc: walk forward while turning left at half rate.
Turn lengths come from the world's action model (a full turn is 14 deg/frame at frame skip 4 for the
recorded MAP01 data; the frames for 360 deg are counted on the action model's own rollout).

Commanded motion = the pose deltas the world's action model gives for those actions, exactly what the env
feeds the generator (WorldBatch.step: `action_model.predict(prev_delta, action)`, starting from the start
context's last delta). Recovered motion = the project's image-only pose annotator
(`data_tools.annotator.estimate_deltas`) on [start frame, generated frames...]. Per frame: yaw error
|wrap(est - cmd)| in deg/frame (median, p90, mean; also on turning frames only, |cmd dyaw| >= --turn-min),
yaw sign agreement on turning frames, the least-squares yaw gain (1 = turns as fast as commanded), and the
translation direction error (deg) on frames whose commanded translation is > --min-speed map units/frame
(`data_tools.eval_poses.compare`, the annotator's own benchmark metric), with the share of those frames on
which the annotator found any translation at all.

Reference columns:
- engine: the real ViZDoom engine (data_tools.engine.DoomEngine, at the world's map and frame size, placed at
  the start context's last pose as envs/compare.py does) replays the same actions; the annotator on its
  frames against its exact pose deltas is the annotator's own error on these motions. Skipped with a note
  when ViZDoom is unavailable, --no-engine is given, or the world's start poses are not engine poses.
- frozen: a world that never moves (the annotator reports 0 everywhere) against the same commanded deltas,
  i.e. what "not following at all" scores; the yaw error of frozen frames is |cmd dyaw|.

Target (issue 5): model yaw error median <= 0.5 deg/frame over all scripted frames. Because some scripted
frames do not turn (where a frozen world scores 0 too), the turning-frame median, the sign agreement and the
frozen column are reported beside it; read them together.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.world_cli import world_parser
from data_tools.annotator import estimate_deltas
from data_tools.eval_poses import compare
from data_tools.poses import pose_deltas, wrap_degrees
from worldmodel.eval import write_report
from worldmodel.inference.world import World, WorldError, default_device, default_dtype, resolve_dtype

YAW_TARGET = 0.5  # deg/frame, issue 5
MIN_SPEED = 4.0  # map units/frame of commanded translation that count as "moving" (as data_tools.eval_poses)
TURN_MIN = 1.0  # deg/frame of commanded yaw that count as "turning" (sign agreement, turning-frame stats)
SIGN_DEADZONE = 0.1  # deg/frame: a smaller recovered yaw is "no turn" (identical frames give ~1e-15, not 0)
SCRIPTS = ("turn_in_place", "walk_and_return", "strafe_square", "arc")


# ----- the world's parameters -----

def world_fov(world: World) -> tuple[float, str]:
    """Horizontal fov (deg) of the world's frames and where it came from (provenance data, else 90)."""
    data = (world.provenance or {}).get("data", {}) or {}
    if data.get("fov"):
        return float(data["fov"]), "world provenance"
    return 90.0, "default (the recorder's ViZDoom fov; the world's provenance does not name one)"


def turn_profile(world: World, frames: int = 64, action: int = 2, delta: int = 3) -> np.ndarray:
    """Cumulative yaw (deg) after 1..frames frames of a full left turn from rest, by the world's action model
    (action / delta: another action component and delta dimension, e.g. 3 / 4 for looking up)."""
    acts = np.zeros((frames, 4), np.float32)
    acts[:, action] = 1.0
    return np.cumsum(world.action_model.rollout(np.zeros(5, np.float32), acts)[:, delta])


def full_rate(world: World, action: int = 2, delta: int = 3) -> float:
    """Steady per-frame change of delta dimension `delta` under a full press of `action` (the world's action
    model, from rest): the full turn rate in deg/frame by default, 3 / 4 for the look rate."""
    return float(np.diff(turn_profile(world, 64, action, delta), prepend=0.0)[-1])


def frames_to_turn(world: World, degrees: float) -> int:
    """Frames of turn=1 whose cumulative yaw is closest to `degrees` (at least 1)."""
    cum = turn_profile(world, 256)
    if not np.isfinite(cum).all() or cum[-1] <= 0:
        raise ValueError(f"the world's action model does not turn left on turn=+1 (yaw after 256 frames: {cum[-1]})")
    return int(np.argmin(np.abs(cum - degrees))) + 1


def scripted_actions(name: str, world: World, walk_frames: int = 8, side_frames: int = 6) -> np.ndarray:
    """The scripted action sequence `name` (one of SCRIPTS) -> float32 (T, 4) canonical actions."""
    def seg(n: int, forward=0.0, strafe=0.0, turn=0.0) -> np.ndarray:
        a = np.zeros((n, 4), np.float32)
        a[:, 0], a[:, 1], a[:, 2] = forward, strafe, turn
        return a

    if name == "turn_in_place":
        n = frames_to_turn(world, 360.0)
        return np.concatenate([seg(n, turn=1.0), seg(n, turn=-1.0)])
    if name == "walk_and_return":
        return np.concatenate([seg(walk_frames, forward=1.0), seg(frames_to_turn(world, 180.0), turn=1.0),
                               seg(walk_frames, forward=1.0)])
    if name == "strafe_square":
        return np.concatenate([seg(side_frames, strafe=1.0), seg(side_frames, forward=1.0),
                               seg(side_frames, strafe=-1.0), seg(side_frames, forward=-1.0)])
    if name == "arc":
        return seg(2 * walk_frames, forward=1.0, turn=0.5)
    raise ValueError(f"unknown script {name!r}; use one of {SCRIPTS}")


# ----- statistics -----

def follow_stats(est: np.ndarray, ref: np.ndarray, min_speed: float = MIN_SPEED, turn_min: float = TURN_MIN) -> dict:
    """Recovered deltas `est` against reference deltas `ref`, both (N, 5) (frame-0 rows dropped).

    compare()'s keys (yaw_err_median/p90/mean deg/frame over all frames; dir_err_median/p90 deg and
    motion_detected on frames with |ref translation| > min_speed) plus, on turning frames
    (|ref dyaw| >= turn_min): turning_frames, yaw_err_median_turning, yaw_err_p90_turning, yaw_sign_agree
    (share turning the commanded way by at least SIGN_DEADZONE), yaw_gain (least-squares est/ref slope;
    1 = turns exactly as fast as commanded)."""
    est, ref = np.asarray(est, np.float64).reshape(-1, 5), np.asarray(ref, np.float64).reshape(-1, 5)
    out = compare(est, ref, min_speed)
    yaw_err = np.abs(wrap_degrees(est[:, 3] - ref[:, 3]))
    turning = np.abs(ref[:, 3]) >= turn_min
    e, r = est[turning, 3], ref[turning, 3]
    nan = float("nan")
    out.update(turning_frames=int(turning.sum()),
               yaw_err_median_turning=float(np.median(yaw_err[turning])) if turning.any() else nan,
               yaw_err_p90_turning=float(np.percentile(yaw_err[turning], 90)) if turning.any() else nan,
               yaw_sign_agree=float(np.mean((np.sign(e) == np.sign(r)) & (np.abs(e) >= SIGN_DEADZONE)))
               if turning.any() else nan,
               yaw_gain=float((e * r).sum() / (r * r).sum()) if turning.any() else nan)
    return out


def annotate(frames: np.ndarray, fov: float, seed: int = 0) -> np.ndarray:
    """uint8 (T+1, H, W, 3) [start, step 1, ...] -> recovered deltas (T, 5) of steps 1..T."""
    return estimate_deltas(frames, fov, seed=seed)[0][1:]


# ----- rollouts -----

@torch.inference_mode()
def model_rollouts(world: World, actions: np.ndarray, starts: list[int], *, steps: int | None, device, dtype,
                   seed: int, core=None, bar=None) -> tuple[np.ndarray, np.ndarray, Any]:
    """All `starts` as one batch, the same actions (T, 4) for each -> (frames uint8 (S, T+1, H, W, 3),
    commanded deltas (S, T, 5), the WorldBatch for reuse). Frame 0 is the start context's last frame."""
    from envs.core import WorldBatch
    from envs.rewards import make_reward

    if core is None:
        core = WorldBatch(world, len(starts), make_reward(), steps=steps, device=device, dtype=dtype)
    rngs = [np.random.default_rng([seed, k]) for k in range(len(starts))]
    core.reset_rows(list(range(len(starts))), rngs, list(starts))
    frames, cmd = [core.frames.copy()], []
    for a in actions:
        out, _, _ = core.step(np.repeat(np.asarray(a, np.float32)[None], len(starts), 0))
        frames.append(out.copy())
        cmd.append(core.prev_deltas.copy())
        if bar is not None:
            bar.update(1)
    return np.stack(frames, 1), np.stack(cmd, 1), core


def open_engine(world: World, enabled: bool = True) -> tuple[Any, str]:
    """(DoomEngine at the world's map / frame size / frame skip, note) or (None, why it is skipped)."""
    if not enabled:
        return None, "engine reference skipped (--no-engine)"
    data = (world.provenance or {}).get("data", {}) or {}
    if data.get("engine") not in (None, "vizdoom"):
        return None, (f"engine reference skipped: the world was built from {data.get('engine')!r} data, so its "
                      "start poses are not ViZDoom poses")
    try:
        from data_tools.engine import DoomEngine
        from envs.compare import engine_settings_for

        settings = engine_settings_for(world)
        engine = DoomEngine(settings)
    except Exception as err:  # ImportError, a missing wad, an engine that fails to start
        return None, f"engine reference skipped: ViZDoom unavailable ({type(err).__name__}: {err})"
    where = "" if data.get("map") else " (the world's provenance names no map: MAP01 assumed)"
    return engine, f"ViZDoom {settings.map}{where}, frame skip {settings.frame_skip}, placed at each start's last pose"


def engine_rollout(engine, start_pose: np.ndarray | None, actions: np.ndarray, seed: int = 0):
    """The engine placed at `start_pose` (None: the map's spawn), then `actions` -> (frames uint8 (T'+1, H, W, 3),
    true deltas (T', 5), placement error dict or None). T' < T only if the engine ended the episode."""
    from data_tools.engine import EpisodeEnded, placement_error

    frame, pose = engine.reset(start_pose=start_pose, seed=seed)
    placed = None if start_pose is None else placement_error(pose, start_pose)
    frames, poses = [frame], [pose]
    for a in actions:
        try:
            frame, pose = engine.step(a)
        except EpisodeEnded:
            break
        frames.append(frame), poses.append(pose)
    return np.stack(frames), pose_deltas(np.stack(poses))[1:], placed


# ----- the benchmark -----

def evaluate(world: World, *, scripts=SCRIPTS, starts: int = 4, steps: int | None = None, device=None, dtype=None,
             seed: int = 0, engine: bool = True, fov: float | None = None, walk_frames: int = 8, side_frames: int = 6,
             min_speed: float = MIN_SPEED, turn_min: float = TURN_MIN) -> dict[str, Any]:
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    fov_source = "--fov"
    if fov is None:
        fov, fov_source = world_fov(world)
    start_ids = list(range(min(starts, world.num_starts)))
    if not start_ids:
        raise ValueError(f"starts must be >= 1, got {starts}")
    plans = {name: scripted_actions(name, world, walk_frames, side_frames) for name in scripts}
    eng, engine_note = open_engine(world, engine)
    total = sum(len(a) for a in plans.values())
    per: dict[str, dict[str, Any]] = {name: {"engine": [], "truth": []} for name in plans}
    placement: list[dict] = []
    core = None
    try:
        with tqdm(total=total, desc=f"model ({len(start_ids)} starts)", unit="step") as bar:
            for name, acts in plans.items():
                frames, cmd, core = model_rollouts(world, acts, start_ids, steps=steps, device=device, dtype=dtype,
                                                   seed=seed, core=core, bar=bar)
                per[name]["frames"], per[name]["cmd"] = frames, cmd
        if eng is not None:
            with tqdm(total=total * len(start_ids), desc="engine", unit="step") as bar:
                for name, acts in plans.items():
                    for k in start_ids:
                        f, truth, placed = engine_rollout(eng, world.start_poses[k, -1], acts, seed=seed)
                        per[name]["engine"].append(f), per[name]["truth"].append(truth)
                        placement.append({"script": name, "start": k, **placed})
                        bar.update(len(acts))
    finally:
        if eng is not None:
            eng.close()
    results, pooled = [], {"model": [], "cmd": [], "engine_est": [], "truth": []}
    n_seq = len(plans) * len(start_ids) * (2 if eng is not None else 1)
    with tqdm(total=n_seq, desc="annotate", unit="seq") as bar:
        for name, acts in plans.items():
            d = per[name]
            est = []
            for s in range(len(start_ids)):
                est.append(annotate(d["frames"][s], fov, seed))
                bar.update(1)
            est, cmd = np.concatenate(est), d["cmd"].reshape(-1, 5)
            row = {"script": name, "frames": int(len(acts)), "sequences": len(start_ids),
                   "model": follow_stats(est, cmd, min_speed, turn_min),
                   "frozen": follow_stats(np.zeros_like(cmd), cmd, min_speed, turn_min), "engine": None}
            pooled["model"].append(est), pooled["cmd"].append(cmd)
            if eng is not None:
                e_est = []
                for f in d["engine"]:
                    e_est.append(annotate(f, 90.0, seed))  # data_tools.engine.ENGINE_FOV: the engine renders at 90
                    bar.update(1)
                e_est, truth = np.concatenate(e_est), np.concatenate(d["truth"])
                row["engine"] = follow_stats(e_est, truth, min_speed, turn_min)
                pooled["engine_est"].append(e_est), pooled["truth"].append(truth)
            results.append(row)
    cmd_all = np.concatenate(pooled["cmd"])
    overall = {"script": "overall", "frames": int(sum(len(a) for a in plans.values())), "sequences": len(start_ids),
               "model": follow_stats(np.concatenate(pooled["model"]), cmd_all, min_speed, turn_min),
               "frozen": follow_stats(np.zeros_like(cmd_all), cmd_all, min_speed, turn_min),
               "engine": (follow_stats(np.concatenate(pooled["engine_est"]), np.concatenate(pooled["truth"]),
                                       min_speed, turn_min) if eng is not None else None)}
    m = overall["model"]
    notes = []
    if world.config.generator.block_size > 1:
        notes.append(f"chunk-wise generator (block_size {world.config.generator.block_size}): each block is generated "
                     "with its first frame's delta held, while the env reports (and this benchmark commands) the "
                     "action model's delta of every frame")
    bad = [p for p in placement if p["xy"] > 8.0 or p["yaw"] > 1.0 or p["pitch"] > 1.0]
    if bad:
        notes.append(f"{len(bad)} of {len(placement)} engine placements are off by more than 8 map units or 1 deg "
                     "(max xy {:.1f}, yaw {:.2f}, pitch {:.2f}): the engine does not start where those contexts "
                     "were recorded".format(max(p["xy"] for p in bad), max(p["yaw"] for p in bad),
                                            max(p["pitch"] for p in bad)))
    return {
        "world": str(world.path), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "steps": steps or world.config.generator.steps, "seed": seed, "fov": fov, "fov_source": fov_source,
        "starts": start_ids, "turn_deg_per_frame": full_rate(world),
        "thresholds": {"yaw_target_deg_per_frame": YAW_TARGET, "min_speed": min_speed, "turn_min": turn_min},
        "scripts": {name: acts.tolist() for name, acts in plans.items()},
        "engine": {"available": eng is not None, "note": engine_note, "placement": placement},
        "results": results, "overall": overall, "notes": notes,
        "verdict": {"yaw_err_median": m["yaw_err_median"], "target": YAW_TARGET,
                    "pass": bool(m["yaw_err_median"] <= YAW_TARGET),
                    "yaw_err_median_turning": m["yaw_err_median_turning"], "yaw_sign_agree": m["yaw_sign_agree"]},
    }


def finite_or_none(obj: Any) -> Any:
    """The report with NaN/inf floats as None, so that the JSON is strict (NaN is not JSON)."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    th = report["thresholds"]
    lines = [f"# Action following: `{report['world']}`", "",
             f"{len(report['starts'])} start contexts, {report['steps']}-step sampler, {report['device']} "
             f"{report['dtype']}, seed {report['seed']}; annotator fov {report['fov']:g} ({report['fov_source']}); "
             f"full turn {report['turn_deg_per_frame']:.1f} deg/frame by the world's action model.",
             f"Engine: {report['engine']['note']}.", "",
             "Model = annotator on generated frames vs commanded deltas; engine = annotator on the real engine's "
             "frames vs its exact deltas (the annotator's own error); frozen = a world that never moves. "
             f"Yaw errors in deg/frame; turning = |cmd dyaw| >= {th['turn_min']:g}; direction error (deg) on frames "
             f"commanded to move > {th['min_speed']:g} units/frame, 'found' = share of those where the annotator saw "
             "translation.", "",
             "| script | frames x seqs | model yaw med / p90 / mean | model yaw med turning | sign agree | yaw gain | "
             "model dir med / p90 (found) | engine yaw med / p90 | engine yaw med turning | engine dir med (found) | "
             "frozen yaw med / turning |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"] + [report["overall"]]:
        m, e, z = r["model"], r["engine"], r["frozen"]
        name = f"**{r['script']}**" if r["script"] == "overall" else r["script"]
        eng = ("| - | - | - " if e is None else
               f"| {_f(e['yaw_err_median'])} / {_f(e['yaw_err_p90'])} | {_f(e['yaw_err_median_turning'])} | "
               f"{_f(e['dir_err_median'], '.1f')} ({100 * e['motion_detected']:.0f}%) ")
        lines.append(
            f"| {name} | {r['frames']} x {r['sequences']} | {_f(m['yaw_err_median'])} / {_f(m['yaw_err_p90'])} / "
            f"{_f(m['yaw_err_mean'])} | {_f(m['yaw_err_median_turning'])} | {_f(m['yaw_sign_agree'])} | "
            f"{_f(m['yaw_gain'])} | {_f(m['dir_err_median'], '.1f')} / {_f(m['dir_err_p90'], '.1f')} "
            f"({100 * m['motion_detected']:.0f}%) {eng}| {_f(z['yaw_err_median'])} / {_f(z['yaw_err_median_turning'])} |")
    v = report["verdict"]
    lines += ["", f"**Verdict:** model yaw error median {_f(v['yaw_err_median'], '.3f')} deg/frame "
                  f"(target <= {v['target']}): **{'PASS' if v['pass'] else 'FAIL'}**; on turning frames "
                  f"{_f(v['yaw_err_median_turning'], '.3f')}, sign agreement {_f(v['yaw_sign_agree'])}."]
    lines += [f"- note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = world_parser("benchmarks.action_following", __doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--starts", type=int, default=4, help="start contexts used (the first N of the world's)")
    p.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS)
    p.add_argument("--walk-frames", type=int, default=8, help="frames per walk leg (walk_and_return; arc = 2x)")
    p.add_argument("--side-frames", type=int, default=6, help="frames per side of the strafe square")
    p.add_argument("--fov", type=float, default=None, help="annotator fov for generated frames (default: provenance, 90)")
    p.add_argument("--min-speed", type=float, default=MIN_SPEED, help="map units/frame that count as moving")
    p.add_argument("--turn-min", type=float, default=TURN_MIN, help="deg/frame that count as turning")
    p.add_argument("--no-engine", action="store_true", help="skip the real-engine reference")
    p.add_argument("--out", default="action_following.json", help="JSON report; markdown table beside it (.md)")
    a = p.parse_args(argv)
    try:
        world = World.load(a.world)
    except WorldError as err:
        raise SystemExit(f"benchmarks.action_following: {err}") from None
    report = evaluate(world, scripts=a.scripts, starts=a.starts, steps=a.steps, device=a.device, dtype=a.dtype,
                      seed=a.seed, engine=not a.no_engine, fov=a.fov, walk_frames=a.walk_frames,
                      side_frames=a.side_frames, min_speed=a.min_speed, turn_min=a.turn_min)
    report["command"] = "python -m benchmarks.action_following " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(a.out, finite_or_none(report), markdown(report))
    return report


if __name__ == "__main__":
    main()
