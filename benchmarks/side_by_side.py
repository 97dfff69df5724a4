"""A short MP4 of the real engine beside the world model: same start pose, same scripted actions.

    python -m benchmarks.side_by_side --world RUN_DIR/world --out docs/side_by_side.mp4 --frames 120

envs.compare.CompareEnv (what `play.py --compare` shows) steps a WorldModelEnv (camera actions) and a
DoomEngine placed at the start context's last pose with the same actions. Each video frame is
[engine | separator | model], upscaled x--scale with nearest neighbour, a caption strip above ("engine",
"model") and one below (frame index, this frame's PSNR and the running mean since the start). Frame 0 is
the start (a real frame on both sides); then --frames - 1 steps. Actions: a tour made of
benchmarks.action_following's scripts (arc, strafe square, walk and return, turn in place), repeated as
needed, or a JSON list of 4-vectors (--actions).

Writes OUT (H.264 through worldmodel.inference.recording.Recorder, world fps) and OUT with .json (the
Recorder's sidecar: actions, model poses, latency; plus per-frame `psnr`, `psnr_mean`, `real_poses` as
play.py --compare writes them, the `frozen_psnr` of a model that kept showing its start frame, and a
summary) and .md (the summary table). PSNR is envs.compare.psnr_uint8 (worldmodel.metrics.psnr, capped
at 100 dB), computed on the frames before upscaling and encoding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from benchmarks.action_following import finite_or_none, open_engine, scripted_actions
from benchmarks.world_cli import world_parser
from worldmodel.eval import write_report
from worldmodel.inference.world import World, WorldError

TOUR = ("arc", "strafe_square", "walk_and_return", "turn_in_place")
HORIZONS = (1, 8, 32, 64, 128)


def tour_actions(world: World, steps: int) -> np.ndarray:
    """`steps` canonical actions (steps, 4): the TOUR scripts back to back, repeated."""
    if steps <= 0:
        return np.zeros((0, 4), np.float32)
    one = np.concatenate([scripted_actions(name, world) for name in TOUR])
    return np.resize(one, (steps, 4)).astype(np.float32)  # np.resize repeats the rows cyclically


def load_actions(path: str, steps: int) -> np.ndarray:
    """A JSON list of 4-vectors -> (steps, 4), repeated or cut to `steps`."""
    acts = np.asarray(json.loads(Path(path).read_text()), np.float32)
    if acts.ndim != 2 or acts.shape[1] != 4 or len(acts) == 0:
        raise SystemExit(f"{path}: expected a JSON list of [forward, strafe, turn, look] vectors, got shape {acts.shape}")
    return np.resize(np.clip(acts, -1, 1), (max(steps, 0), 4)).astype(np.float32)


def _put(img: np.ndarray, text: str, x: int, y: int, scale: float, align: str = "left") -> None:
    font = cv2.FONT_HERSHEY_SIMPLEX
    (w, _), _ = cv2.getTextSize(text, font, scale, 1)
    if align == "center":
        x -= w // 2
    cv2.putText(img, text, (max(0, x), y), font, scale, (235, 235, 235), 1, cv2.LINE_AA)


def compose(real: np.ndarray, fake: np.ndarray, caption: str, scale: int = 2, sep: int = 2) -> np.ndarray:
    """[engine | sep | model] upscaled x`scale` (nearest), label strip above, `caption` strip below -> uint8."""
    h, w, _ = real.shape
    up = lambda f: np.repeat(np.repeat(f, scale, 0), scale, 1)  # noqa: E731 (nearest neighbour)
    strip = max(12, 7 * scale)
    font = max(0.3, 0.18 * scale)
    width = 2 * w * scale + sep
    out = np.zeros((h * scale + 2 * strip, width, 3), np.uint8)
    out[strip:strip + h * scale, : w * scale] = up(real)
    out[strip:strip + h * scale, w * scale: w * scale + sep] = 128
    out[strip:strip + h * scale, w * scale + sep:] = up(fake)
    base = int(strip * 0.75)
    _put(out, "engine", w * scale // 2, base, font, "center")
    _put(out, "model", w * scale + sep + w * scale // 2, base, font, "center")
    _put(out, caption, 3, strip + h * scale + base, font)
    return out


def run(world: World, out: str | Path, *, frames: int = 120, start: int = 0, actions: np.ndarray | None = None,
        steps=None, device=None, dtype=None, seed: int = 0, scale: int = 2, sep: int = 2) -> dict[str, Any]:
    from envs.compare import CompareEnv, psnr_uint8
    from envs.world_model_env import WorldModelEnv
    from worldmodel.inference.recording import Recorder

    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not 0 <= start < world.num_starts:
        raise ValueError(f"start must be in [0, {world.num_starts}), got {start}")
    acts = tour_actions(world, frames - 1) if actions is None else np.asarray(actions, np.float32)[: frames - 1]
    engine, note = open_engine(world)
    if engine is None:
        raise SystemExit(f"benchmarks.side_by_side needs the real engine: {note}")
    env = WorldModelEnv(world=world, steps=steps, device=device, dtype=dtype, action_type="camera", report_latency=True)
    cmp = CompareEnv(env, engine)
    out = Path(out)
    rec = Recorder(out, world.fps, meta={"world": str(world.path), "seed": seed, "start_index": start,
                                         "layout": "[engine | model]", "scale": scale, "engine": note})
    psnrs, frozen, real_poses = [], [], []
    try:
        obs, info = cmp.reset(seed=seed, options={"start_index": start})
        h, w = obs.shape[0], obs.shape[1] // 2
        start_frame = obs[:, w:].copy()

        def add(obs, info, action, latency, i):
            real, fake = obs[:, :w], obs[:, w:]
            psnrs.append(float(info["psnr"]))
            frozen.append(psnr_uint8(real, start_frame))
            real_poses.append(np.asarray(info["real_pose"], float).tolist())
            mean = f"mean {np.mean(psnrs[1:]):.1f}" if i else "start"
            rec.add(compose(real, fake, f"frame {i}  PSNR {info['psnr']:.1f} dB  {mean}", scale, sep),
                    action, info["pose"], latency)

        add(obs, info, None, 0.0, 0)
        for i, a in enumerate(tqdm(acts, desc="side by side", unit="frame"), 1):
            obs, _, _, truncated, info = cmp.step(a)
            add(obs, info, a, info.get("latency_ms", 0.0), i)
            if truncated:  # the engine ended its episode (CompareEnv's signal); should not happen without monsters
                break
        rec.meta.update(psnr=psnrs, psnr_mean=float(np.mean(psnrs[1:])) if len(psnrs) > 1 else float("nan"),
                        real_poses=real_poses, frozen_psnr=frozen)
    finally:
        cmp.close()
        mp4, sidecar = rec.close()
    n = len(psnrs)
    gen = np.asarray(psnrs[1:])
    summary = {"frames": n, "frame_size": [int(h * scale + 2 * max(12, 7 * scale)), int(2 * w * scale + sep)],
               "mp4_bytes": mp4.stat().st_size, "seconds": n / world.fps, "codec": rec.codec,
               "psnr_start": psnrs[0], "psnr_mean": float(gen.mean()) if len(gen) else None,
               "psnr_min": float(gen.min()) if len(gen) else None,
               "frozen_psnr_mean": float(np.mean(frozen[1:])) if n > 1 else None,
               "psnr_at": {str(k): psnrs[k] for k in HORIZONS if k < n},
               "frozen_psnr_at": {str(k): frozen[k] for k in HORIZONS if k < n}}
    report = {**json.loads(sidecar.read_text()), "summary": summary}
    return report


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"# Side by side: `{report['world']}`", "",
             f"`{report['video']}`: {s['frames']} frames ({s['seconds']:.1f} s at {report['fps']:g} fps), "
             f"{s['frame_size'][1]}x{s['frame_size'][0]}, {s['codec']}, {s['mp4_bytes'] / 1024:.0f} KB; "
             f"start {report['start_index']}, seed {report['seed']}. Engine: {report['engine']}.", "",
             "PSNR (dB) of the model's frame against the engine's; frozen = the model's start frame held still "
             "(the copy-last baseline of DESIGN §5).", "",
             "| frame | PSNR | frozen PSNR |", "|---|---|---|",
             f"| 0 (start) | {f(s['psnr_start'])} | - |"]
    lines += [f"| {k} | {f(v)} | {f(s['frozen_psnr_at'][k])} |" for k, v in s["psnr_at"].items()]
    lines += [f"| mean 1-{s['frames'] - 1} | {f(s['psnr_mean'])} | {f(s['frozen_psnr_mean'])} |",
              f"| min | {f(s['psnr_min'])} | |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = world_parser("benchmarks.side_by_side", __doc__)
    p.add_argument("--seed", type=int, default=0, help="the env's noise seed (and the engine's)")
    p.add_argument("--frames", type=int, default=120, help="video frames (the start + frames - 1 steps)")
    p.add_argument("--start", type=int, default=0, help="start context index")
    p.add_argument("--actions", default=None, help="JSON list of [forward, strafe, turn, look] (default: the tour)")
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscale factor")
    p.add_argument("--sep", type=int, default=2, help="separator width in pixels")
    p.add_argument("--out", default="side_by_side.mp4", help="MP4; the JSON (.json) and table (.md) go beside it")
    a = p.parse_args(argv)
    if a.frames < 1 or a.scale < 1 or a.sep < 0:
        p.error("--frames and --scale must be >= 1, --sep >= 0")
    try:
        world = World.load(a.world)
    except WorldError as err:
        raise SystemExit(f"benchmarks.side_by_side: {err}") from None
    acts = load_actions(a.actions, a.frames - 1) if a.actions else None
    report = run(world, a.out, frames=a.frames, start=a.start, actions=acts, steps=a.steps, device=a.device,
                 dtype=a.dtype, seed=a.seed, scale=a.scale, sep=a.sep)
    report["command"] = "python -m benchmarks.side_by_side " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(Path(a.out).with_suffix(".json"), finite_or_none(report), markdown(report))
    return report


if __name__ == "__main__":
    main()
