"""Long rollout (issue 5): thousands of frames of play with the student; memory flat, no collapse.

    python -m benchmarks.long_rollout --world RUN_DIR/world --frames 2000 [--mp4 out.mp4] [--out PATH]

The world (WorldModelEnv, camera actions, one start context) is driven for --frames frames by the recorder's
exploration policy (data_tools.exploration.ExplorationPolicy, seeded; its turn / look rates from the world's
action model and the pose it reads is the env's integrated pose). Per window of --window frames:
- sharpness: mean over frames of the variance of the Laplacian of the gray image (cv2, 8-bit units);
- colour: per RGB channel the mean over frames of the pixel mean and of the pixel std;
- motion: mean absolute difference between consecutive frames (8-bit units; a frozen image has ~0);
- blank share: share of near-constant frames (gray std < NEAR_CONSTANT_STD);
- process RSS at the window's end (and peak CUDA memory in the window on a GPU), generation latency.
The real engine (DoomEngine, same map and frame size, placed at the same start pose) is driven by the same
policy with the same seed for the same number of frames: its own trajectory (the policy reacts to the
engine's poses, walls included), so its statistics are a distribution to compare with, not a paired run.
Memory is the model's only: the engine runs afterwards and in its own process.

A window is flagged (thresholds below, 8-bit intensity units; measured on 2,000 engine frames of MAP01 at
128x96 under this policy: gray std per frame >= 5.7, window motion 13.7-26.5, window sharpness 333-1,872):
- blank: more than BLANK_SHARE of its frames near-constant (gray std < NEAR_CONSTANT_STD);
- frozen: window motion < FROZEN_DIFF (the policy never stands still for a whole window);
- washed out: window sharpness < WASHED_OUT_RATIO x the engine's median window sharpness (1%: blurrier than
  a Gaussian blur of sigma 2 px of the engine's frames, which measures 0.9%; a sigma-1 blur keeps ~6%), or
  < WASHED_OUT_ABS without an engine reference.
Memory is flat when RSS grows by at most MEMORY_GROWTH_MB from the first window to the last (one leaked
128x96 frame per step would be 74 MB over 2,000 frames).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from benchmarks.action_following import finite_or_none, full_rate, open_engine
from benchmarks.world_cli import world_parser
from worldmodel.eval import write_report
from worldmodel.inference.world import World, WorldError, default_device, default_dtype, resolve_dtype

NEAR_CONSTANT_STD = 2.0
BLANK_SHARE = 0.5
FROZEN_DIFF = 0.5
WASHED_OUT_RATIO = 0.01
WASHED_OUT_ABS = 5.0
MEMORY_GROWTH_MB = 32.0


def rss_mb() -> float:
    """Resident set size of this process now (MB); the peak (ru_maxrss) where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def frame_stats(frame: np.ndarray) -> np.ndarray:
    """One uint8 (H, W, 3) RGB frame -> (sharpness, gray std, mean R, G, B, std R, G, B)."""
    gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    x = frame.reshape(-1, 3).astype(np.float32)
    return np.array([cv2.Laplacian(gray, cv2.CV_64F).var(), gray.std(), *x.mean(0), *x.std(0)], np.float64)


class WindowStats:
    """Per-frame statistics streamed in, one summary per `window` frames out (no frame is kept)."""

    def __init__(self, window: int):
        self.window = window
        self.windows: list[dict[str, Any]] = []
        self._rows: list[np.ndarray] = []
        self._diffs: list[float] = []
        self._lat: list[float] = []
        self._prev: np.ndarray | None = None

    def add(self, frame: np.ndarray, latency_ms: float | None = None, extra=None) -> dict | None:
        """Add a frame; returns the window summary when this frame completes one. `extra()` -> dict is called
        then and merged into the summary (memory readings)."""
        f = np.asarray(frame)
        self._rows.append(frame_stats(f))
        if self._prev is not None:
            self._diffs.append(float(np.abs(f.astype(np.int16) - self._prev).mean()))
        self._prev = f.astype(np.int16)
        if latency_ms is not None:
            self._lat.append(float(latency_ms))
        if len(self._rows) == self.window:
            return self.close_window(extra)
        return None

    def close_window(self, extra=None) -> dict | None:
        if not self._rows:
            return None
        s = np.stack(self._rows)
        w = {"index": len(self.windows), "frames": int(len(s)),
             "first_frame": int(sum(x["frames"] for x in self.windows)),
             "sharpness": float(s[:, 0].mean()), "blank_share": float((s[:, 1] < NEAR_CONSTANT_STD).mean()),
             "channel_mean": s[:, 2:5].mean(0).tolist(), "channel_std": s[:, 5:8].mean(0).tolist(),
             "motion": float(np.mean(self._diffs)) if self._diffs else float("nan")}
        if self._lat:
            w["latency_ms_median"] = float(np.median(self._lat))
        if extra is not None:
            w.update(extra())
        self.windows.append(w)
        self._rows, self._diffs, self._lat = [], [], []
        return w


def collapse_flags(window: dict, engine_sharpness: float | None = None) -> list[str]:
    """Why a window summary looks collapsed (empty list: it does not). engine_sharpness: the engine's median
    window sharpness (None: the absolute threshold)."""
    flags = []
    if window["blank_share"] > BLANK_SHARE:
        flags.append(f"blank ({100 * window['blank_share']:.0f}% of frames with gray std < {NEAR_CONSTANT_STD:g})")
    if np.isfinite(window["motion"]) and window["motion"] < FROZEN_DIFF:
        flags.append(f"frozen (mean |frame diff| {window['motion']:.2f} < {FROZEN_DIFF:g})")
    limit = WASHED_OUT_ABS if engine_sharpness is None else WASHED_OUT_RATIO * engine_sharpness
    if window["sharpness"] < limit:
        flags.append(f"washed out (sharpness {window['sharpness']:.1f} < {limit:.1f})")
    return flags


def sequence_windows(frames, window: int) -> list[dict]:
    """Window summaries of a whole sequence of frames (tests, offline videos)."""
    ws = WindowStats(window)
    for f in frames:
        ws.add(f)
    ws.close_window()
    return ws.windows


# ----- rollouts -----

def model_rollout(world: World, frames: int, window: int, *, start: int, steps, device, dtype, seed: int,
                  mp4: str | None = None) -> tuple[list[dict], dict]:
    from data_tools.exploration import ExplorationPolicy
    from envs.world_model_env import WorldModelEnv

    env = WorldModelEnv(world=world, steps=steps, device=device, dtype=dtype, action_type="camera",
                        report_latency=True)
    policy = ExplorationPolicy(seed, turn_deg_per_frame=abs(full_rate(world)) or 1.0,
                               look_deg_per_frame=abs(full_rate(world, 3, 4)) or 1.0)
    cuda = torch.device(device).type == "cuda"

    def memory() -> dict:
        m = {"rss_mb": rss_mb()}
        if cuda:
            m["cuda_max_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        return m

    rec = None
    if mp4:
        from worldmodel.inference.recording import Recorder

        rec = Recorder(mp4, world.fps, meta={"world": str(world.path), "seed": seed, "start_index": start,
                                             "policy": "data_tools.exploration.ExplorationPolicy"})
    stats = WindowStats(window)
    latency, wall = [], []
    rss_start = rss_mb()
    try:
        obs, info = env.reset(seed=seed, options={"start_index": start})
        if rec is not None:
            rec.add(obs, None, info["pose"], 0.0)
        for _ in tqdm(range(frames), desc="model", unit="frame"):
            action = policy.act(info["pose"])
            t = time.perf_counter()
            obs, _, _, _, info = env.step(action)
            wall.append(1e3 * (time.perf_counter() - t))
            latency.append(info["latency_ms"])
            stats.add(obs, info["latency_ms"], memory)
            if rec is not None:
                rec.add(obs, action, info["pose"], info["latency_ms"])
        stats.close_window(memory)
    finally:
        env.close()
        if rec is not None:
            rec.close()
    summary = {"frames": frames, "start_index": start, "rss_mb_before": rss_start,
               "latency_ms_median": float(np.median(latency)), "latency_ms_p90": float(np.percentile(latency, 90)),
               "step_ms_median": float(np.median(wall)), "mp4": mp4}
    return stats.windows, summary


def engine_rollout(engine, world: World, frames: int, window: int, *, start: int, seed: int) -> tuple[list[dict], dict]:
    from data_tools.engine import ACTION_SCALE, EpisodeEnded
    from data_tools.exploration import ExplorationPolicy

    fs = engine.settings.frame_skip
    policy = ExplorationPolicy(seed, turn_deg_per_frame=abs(ACTION_SCALE[2]) * fs,
                               look_deg_per_frame=ACTION_SCALE[3] * fs)  # as data_tools.record does
    start_pose = world.start_poses[start, -1]
    _, pose = engine.reset(start_pose=start_pose, seed=seed)
    stats, restarts = WindowStats(window), 0
    for _ in tqdm(range(frames), desc="engine", unit="frame"):
        try:
            frame, pose = engine.step(policy.act(pose))
        except EpisodeEnded:  # no monsters and no timeout: should not happen; restart at the start pose
            restarts += 1
            frame, pose = engine.reset(start_pose=start_pose, seed=seed + restarts)
        stats.add(frame)
    stats.close_window()
    return stats.windows, {"frames": frames, "restarts": restarts}


# ----- the benchmark -----

def evaluate(world: World, *, frames: int = 2000, window: int = 100, start: int = 0, steps=None, device=None,
             dtype=None, seed: int = 0, engine: bool = True, mp4: str | None = None) -> dict[str, Any]:
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) or default_dtype(device)
    if not 0 <= start < world.num_starts:
        raise ValueError(f"--start must be in [0, {world.num_starts}), got {start}")
    model_w, model_info = model_rollout(world, frames, window, start=start, steps=steps, device=device, dtype=dtype,
                                        seed=seed, mp4=mp4)
    eng, engine_note = open_engine(world, engine)
    engine_w, engine_info = None, None
    if eng is not None:
        try:
            engine_w, engine_info = engine_rollout(eng, world, frames, window, start=start, seed=seed)
        finally:
            eng.close()
    ref_sharp = float(np.median([w["sharpness"] for w in engine_w])) if engine_w else None
    for i, w in enumerate(model_w):
        w["flags"] = collapse_flags(w, ref_sharp)
        e = engine_w[i] if engine_w and i < len(engine_w) else None
        w["sharpness_ratio"] = w["sharpness"] / e["sharpness"] if e and e["sharpness"] > 0 else None
    engine_flags = [collapse_flags(w, ref_sharp) for w in engine_w] if engine_w else None
    rss = [w["rss_mb"] for w in model_w]
    growth = rss[-1] - rss[0]
    collapsed = [w["index"] for w in model_w if w["flags"]]
    mean_model = float(np.mean([w["sharpness"] for w in model_w]))
    mean_engine = float(np.mean([w["sharpness"] for w in engine_w])) if engine_w else None
    verdict = {"memory_growth_mb": growth, "memory_flat": bool(growth <= MEMORY_GROWTH_MB),
               "rss_mb_first": rss[0], "rss_mb_last": rss[-1], "rss_mb_max": max(rss),
               "collapsed_windows": collapsed, "any_collapse": bool(collapsed),
               "sharpness_ratio_overall": mean_model / mean_engine if mean_engine else None,
               "engine_windows_flagged": sum(bool(f) for f in engine_flags) if engine_flags is not None else None}
    if device.type == "cuda":
        cm = [w["cuda_max_mb"] for w in model_w]
        verdict.update(cuda_max_mb_first=cm[0], cuda_max_mb_last=cm[-1], cuda_growth_mb=cm[-1] - cm[0])
    verdict["pass"] = bool(verdict["memory_flat"] and not collapsed)
    return {"world": str(world.path), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "steps": steps or world.config.generator.steps, "seed": seed, "window": window,
            "thresholds": {"near_constant_gray_std": NEAR_CONSTANT_STD, "blank_share": BLANK_SHARE,
                           "frozen_motion": FROZEN_DIFF, "washed_out_ratio": WASHED_OUT_RATIO,
                           "washed_out_abs": WASHED_OUT_ABS, "memory_growth_mb": MEMORY_GROWTH_MB,
                           "engine_median_window_sharpness": ref_sharp},
            "model": {**model_info, "windows": model_w},
            "engine": {"available": eng is not None, "note": engine_note, **(engine_info or {}),
                       "windows": engine_w, "flags": engine_flags},
            "verdict": verdict}


def _f(x, fmt: str = ".1f") -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, fmt)


def _rgb(c) -> str:
    return "/".join(f"{v:.0f}" for v in c)


def markdown(report: dict[str, Any]) -> str:
    m, e, v, th = report["model"], report["engine"], report["verdict"], report["thresholds"]
    ew = e["windows"] or []
    lines = [f"# Long rollout: `{report['world']}`", "",
             f"{m['frames']} frames from start {m['start_index']}, exploration policy seed {report['seed']}, "
             f"{report['steps']}-step sampler, {report['device']} {report['dtype']}; windows of {report['window']} "
             f"frames. Generation latency median {m['latency_ms_median']:.1f} ms, p90 {m['latency_ms_p90']:.1f} ms "
             f"(env step {m['step_ms_median']:.1f} ms).",
             f"Engine reference: {e['note']} (its own trajectory under the same policy: distributional, not paired).",
             "", "Sharpness = mean Laplacian variance (8-bit gray); RGB = mean channel intensity / mean channel std; "
             "motion = mean |frame diff|; blank = share of frames with gray std < "
             f"{th['near_constant_gray_std']:g}.", "",
             "| window | frames | sharpness model / engine (ratio) | RGB mean model / engine | RGB std model / engine | "
             "motion model / engine | blank | RSS MB | latency ms | flags |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, w in enumerate(m["windows"]):
        r = ew[i] if i < len(ew) else None
        rss = f"{w['rss_mb']:.0f}" + (f" (cuda {w['cuda_max_mb']:.0f})" if "cuda_max_mb" in w else "")
        lines.append(
            f"| {w['index']} | {w['first_frame']}-{w['first_frame'] + w['frames'] - 1} | {_f(w['sharpness'])} / "
            f"{_f(r['sharpness']) if r else '-'} ({_f(w['sharpness_ratio'], '.2f')}) | {_rgb(w['channel_mean'])} / "
            f"{_rgb(r['channel_mean']) if r else '-'} | {_rgb(w['channel_std'])} / {_rgb(r['channel_std']) if r else '-'} | "
            f"{_f(w['motion'])} / {_f(r['motion']) if r else '-'} | {100 * w['blank_share']:.0f}% | {rss} | "
            f"{_f(w.get('latency_ms_median'))} | {'; '.join(w['flags']) or 'ok'} |")
    lines += ["", "**Verdict:**",
              f"- memory: RSS {v['rss_mb_first']:.0f} MB after the first window, {v['rss_mb_last']:.0f} MB after the "
              f"last (growth {v['memory_growth_mb']:+.1f} MB, max {v['rss_mb_max']:.0f}; flat if <= "
              f"{th['memory_growth_mb']:g} MB): **{'flat' if v['memory_flat'] else 'GROWS'}**"
              + (f"; CUDA peak {v['cuda_max_mb_first']:.0f} -> {v['cuda_max_mb_last']:.0f} MB" if "cuda_max_mb_first" in v
                 else ""),
              f"- sharpness model / engine: {_f(v['sharpness_ratio_overall'], '.3f')} overall; per window "
              + ", ".join(_f(w["sharpness_ratio"], ".2f") for w in m["windows"]),
              "- collapse (blank: > {:.0f}% near-constant frames; frozen: motion < {:g}; washed out: sharpness < {}): "
              .format(100 * th["blank_share"], th["frozen_motion"],
                      f"{th['washed_out_ratio']:g} x engine median {th['engine_median_window_sharpness']:.0f}"
                      if th["engine_median_window_sharpness"] else f"{th['washed_out_abs']:g}")
              + (f"**windows {v['collapsed_windows']} flagged**" if v["any_collapse"] else "**none**")
              + (f" (engine windows flagged by the same test: {v['engine_windows_flagged']})"
                 if v["engine_windows_flagged"] is not None else ""),
              f"- overall: **{'PASS' if v['pass'] else 'FAIL'}**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = world_parser("benchmarks.long_rollout", __doc__)
    p.add_argument("--seed", type=int, default=0, help="policy seed and the env's noise seed")
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--window", type=int, default=100, help="frames per statistics window")
    p.add_argument("--start", type=int, default=0, help="start context index")
    p.add_argument("--no-engine", action="store_true", help="skip the real-engine reference")
    p.add_argument("--mp4", default=None, help="also write the model's rollout as an MP4 (+ .json sidecar)")
    p.add_argument("--out", default="long_rollout.json", help="JSON report; markdown table beside it (.md)")
    a = p.parse_args(argv)
    if a.frames < 1 or a.window < 1:
        p.error("--frames and --window must be >= 1")
    try:
        world = World.load(a.world)
    except WorldError as err:
        raise SystemExit(f"benchmarks.long_rollout: {err}") from None
    report = evaluate(world, frames=a.frames, window=a.window, start=a.start, steps=a.steps, device=a.device,
                      dtype=a.dtype, seed=a.seed, engine=not a.no_engine, mp4=a.mp4)
    report["command"] = "python -m benchmarks.long_rollout " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(a.out, finite_or_none(report), markdown(report))
    return report


if __name__ == "__main__":
    main()
