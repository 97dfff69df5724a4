"""Play the packaged world model in a window: every key press changes the very next generated frame.

    python play.py                        # shipped weights, GPU when available else CPU
    python play.py --steps 1 --scale 6    # 1 denoising step, bigger window
    python play.py --record out.mp4       # also write out.mp4 (H.264) + out.json (seed, actions, poses, latency)
    python play.py --headless --frames 300 --actions acts.json --record demo.mp4   # scripted, no window
    python play.py --compare              # [real ViZDoom | world model], same start pose and actions, PSNR

Keys: W/S forward/back, A/D strafe, <-/-> turn, mouse turns when grabbed (click to grab, Esc releases),
R reset, P pause, . single step (paused), F1 help, Tab start/stop recording, Q or Esc quit.

Layering (as in DIAMOND): this file knows pygame and the env API (reset/step) only; the env knows the
world model and no window. --compare wraps the env and a ViZDoom engine in envs.compare.CompareEnv, one
env-like object whose frames are [engine | world model] and whose info carries the PSNR between them;
the engine renders at the world's frame size (a 32x48 test world is compared at 32x48). With --record
the sidecar also gets per-frame `psnr` and the engine's `real_poses`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HELP = ("W/S  forward/back", "A/D  strafe", "<-/->  turn", "mouse  turn (click to grab, Esc releases)",
        "R  reset", "P  pause", ".  single step (paused)", "Tab  start/stop recording", "F1  this help",
        "Q / Esc  quit")
MOUSE_TURN_PER_PIXEL = 0.05  # turn action per pixel of mouse motion in one frame (1.0 = full turn speed)


class Game:
    """Pygame front end over an env with a camera action Box(4): keys and mouse -> (forward, strafe, turn, look)."""

    def __init__(self, env, *, scale: int = 4, smooth: bool = False, seed: int | None = None,
                 record: str | None = None, steps_label: str = "", fps: float | None = None):
        import pygame

        from envs.keymap import KEYS

        self.pg, self.env = pygame, env
        self.scale, self.smooth, self.seed = scale, smooth, seed
        self.fps = float(fps or env.metadata.get("render_fps", 35))
        self.steps_label = steps_label
        self.key_names = set(KEYS)
        pygame.display.init()
        pygame.font.init()
        h, w, _ = env.observation_space.shape
        self.screen = pygame.display.set_mode((w * scale, h * scale))
        pygame.display.set_caption("worldmodel")
        self.font = pygame.font.Font(None, 20)
        self.clock = pygame.time.Clock()
        self.held: set[str] = set()
        self.mouse_dx = 0.0
        self.grabbed = self.paused = self.show_help = False
        self.single_step = False
        self.running = True
        self.record_path = record
        self.recorder = None
        self.step_count = 0
        self.latency_ms = 0.0
        self.last_action: np.ndarray | None = None
        self.rec_psnr: list[float] = []  # per recorded frame, when the env reports a PSNR (--compare)
        self.rec_real_poses: list[list[float]] = []
        self.obs, self.info = env.reset(seed=seed)
        if record:
            self.start_recording(record)

    # -- input -------------------------------------------------------------------------------
    def handle_event(self, event) -> None:
        pg = self.pg
        if event.type == pg.QUIT:
            self.running = False
        elif event.type == pg.KEYDOWN:
            name = pg.key.name(event.key)
            if name in self.key_names:
                self.held.add(name)
            elif event.key == pg.K_ESCAPE:
                if self.grabbed:
                    self.set_grab(False)
                else:
                    self.running = False
            elif event.key == pg.K_q:
                self.running = False
            elif event.key == pg.K_r:
                self.reset()
            elif event.key == pg.K_p:
                self.paused = not self.paused
            elif event.key == pg.K_PERIOD:
                self.single_step = True
            elif event.key == pg.K_F1:
                self.show_help = not self.show_help
            elif event.key == pg.K_TAB:
                self.stop_recording() if self.recorder else self.start_recording(self.record_path)
        elif event.type == pg.KEYUP:
            self.held.discard(pg.key.name(event.key))
        elif event.type == pg.MOUSEBUTTONDOWN and not self.grabbed:
            self.set_grab(True)
        elif event.type == pg.MOUSEMOTION and self.grabbed:
            self.mouse_dx += event.rel[0]

    def set_grab(self, grab: bool) -> None:
        self.grabbed = grab
        self.pg.event.set_grab(grab)
        self.pg.mouse.set_visible(not grab)

    def action(self) -> np.ndarray:
        """(4,) float32 camera action of the held keys plus this frame's mouse motion (turn > 0 = left)."""
        from envs.keymap import chord_action

        act = chord_action(self.held)
        act[2] = np.clip(act[2] - self.mouse_dx * MOUSE_TURN_PER_PIXEL, -1.0, 1.0)
        self.mouse_dx = 0.0
        return act[: self.env.action_space.shape[0]]

    # -- game state ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.obs, self.info = self.env.reset()
        self.step_count = 0

    def start_recording(self, path: str | None) -> None:
        from worldmodel.inference.recording import Recorder

        path = path or time.strftime("recordings/worldmodel_%Y%m%d_%H%M%S.mp4")
        env = getattr(self.env, "unwrapped", self.env)  # a CompareEnv is no gymnasium.Env
        gen = getattr(getattr(env, "_core", None), "generator", None)
        how = {"fast": gen.fast, "device": str(gen.device), "dtype": str(gen.dtype)} if gen is not None else {}
        self.recorder = Recorder(path, self.fps, {"seed": self.seed, "steps": self.steps_label, **how})
        self.rec_psnr, self.rec_real_poses = [], []
        self.record_path = None  # a second Tab-started recording gets a fresh, time-stamped name

    def stop_recording(self) -> None:
        if self.rec_psnr:
            self.recorder.meta.update(psnr=self.rec_psnr, psnr_mean=float(np.mean(self.rec_psnr)),
                                      real_poses=self.rec_real_poses)
        video, sidecar = self.recorder.close()
        print(f"recorded {self.recorder.frames} frames to {video} (+ {sidecar.name})")
        self.recorder = None

    def step(self, action: np.ndarray) -> None:
        self.obs, _, terminated, truncated, self.info = self.env.step(action)
        self.last_action = action
        self.step_count += 1
        self.latency_ms = self.info["latency_ms"]
        if self.recorder is not None:
            self.recorder.add(self.obs, action, self.info["pose"], self.latency_ms)
            if "psnr" in self.info:
                self.rec_psnr.append(float(self.info["psnr"]))
                self.rec_real_poses.append(np.asarray(self.info["real_pose"], float).tolist())
        if terminated or truncated:
            self.reset()

    def tick(self, action: np.ndarray | None = None) -> None:
        """One frame: handle queued events, step unless paused (a scripted action overrides the keys), draw."""
        for event in self.pg.event.get():
            self.handle_event(event)
        if not self.running:
            return
        keys_action = self.action()
        if not self.paused or self.single_step:
            self.step(keys_action if action is None else np.asarray(action, np.float32))
            self.single_step = False
        self.draw()

    # -- drawing -------------------------------------------------------------------------------
    def draw(self) -> None:
        pg = self.pg
        image = pg.surfarray.make_surface(np.ascontiguousarray(self.obs.swapaxes(0, 1)))  # (W, H, 3)
        scale = pg.transform.smoothscale if self.smooth else pg.transform.scale
        self.screen.blit(scale(image, self.screen.get_size()), (0, 0))
        rec = f"REC {self.recorder.frames}" if self.recorder else "rec off (Tab)"
        hud = [f"{self.clock.get_fps():5.1f} fps  gen {self.latency_ms:6.1f} ms  steps {self.steps_label}",
               f"frame {self.step_count}  {rec}{'  PAUSED' if self.paused else ''}"]
        if "psnr" in self.info:  # --compare: [real engine | world model]
            hud.append(f"PSNR {self.info['psnr']:5.1f} dB  mean {self.info['psnr_mean']:5.1f} dB  (real | model)")
        lines = hud + (["", *HELP] if self.show_help else ["F1 help"])
        for i, line in enumerate(lines):
            text = self.font.render(line, True, (255, 255, 0), (0, 0, 0))
            self.screen.blit(text, (4, 4 + 16 * i))
        pg.display.flip()

    def run(self, frames: int | None = None, actions: list | None = None, realtime: bool = True) -> None:
        """Until quit, or for `frames` generated frames; `actions` (list of (4,)) replaces the keys, cycling."""
        while self.running and (frames is None or self.step_count < frames):
            self.tick(None if actions is None else actions[self.step_count % len(actions)])
            if realtime:
                self.clock.tick(self.fps)
            else:
                self.clock.tick()
        self.close()

    def close(self) -> None:
        if self.recorder is not None:
            self.stop_recording()
        self.env.close()
        self.pg.display.quit()


def load_actions(path: str | None, frames: int, seed: int | None, dim: int) -> list[np.ndarray]:
    """Scripted actions: a JSON list of 4-vectors or of discrete ids (envs.keymap); None -> a random walk
    of key chords, each held for 1-8 frames (seeded)."""
    from envs.keymap import DISCRETE_ACTIONS

    if path is None:
        rng = np.random.default_rng(seed)
        out: list[np.ndarray] = []
        while len(out) < frames:
            out += [DISCRETE_ACTIONS[rng.integers(len(DISCRETE_ACTIONS))]] * int(rng.integers(1, 9))
        return [a[:dim] for a in out[:frames]]
    items = json.loads(Path(path).read_text())
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty JSON list of 4-vectors or discrete action ids")
    acts = []
    for i, item in enumerate(items):
        if isinstance(item, int):
            if not 0 <= item < len(DISCRETE_ACTIONS):
                raise ValueError(f"{path}[{i}]: discrete id {item} not in [0, {len(DISCRETE_ACTIONS)})")
            acts.append(DISCRETE_ACTIONS[item][:dim])
        else:
            vec = np.asarray(item, np.float32)
            if vec.shape != (4,):
                raise ValueError(f"{path}[{i}]: expected a 4-vector (forward, strafe, turn, look), got {item!r}")
            acts.append(vec[:dim])
    return acts


def compare_env(env):
    """Wrap a WorldModelEnv with a ViZDoom engine at the world's map, frame size and frame skip."""
    from data_tools.engine import DoomEngine
    from envs.compare import CompareEnv, engine_settings_for

    try:
        engine = DoomEngine(engine_settings_for(env.world))
    except ImportError as err:
        sys.exit(f"play.py --compare needs ViZDoom (pip install vizdoom==1.3.2): {err}")
    return CompareEnv(env, engine)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", "--checkpoint", dest="world", default=None,
                   help="world directory (default: the weights shipped in worldmodel/weights/)")
    p.add_argument("--steps", type=int, choices=(1, 2, 4), default=None, help="denoising steps per frame")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    # StreamingGenerator.FAST_PATHS, written out: importing it would load torch before --help (tests/test_play.py).
    p.add_argument("--fast", default=None, choices=("off", "static", "graph", "compile"),
                   help="generator step path (default: CUDA graphs on a GPU, the static step on the CPU; off = eager; "
                        "compile = the static step through torch.compile: fastest, but compiles for ~1-2 min on "
                        "a 2-core CPU when the window first fills)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="compute dtype (default: bf16 on GPUs and AMX/AVX512-BF16 CPUs, else float32)")
    p.add_argument("--seed", type=int, default=0, help="seeds the start context and the generator's noise")
    p.add_argument("--scale", type=int, default=4, help="window pixels per frame pixel")
    p.add_argument("--smooth", action="store_true", help="smooth (bilinear) upscaling instead of nearest")
    p.add_argument("--record", default=None, metavar="OUT.mp4", help="record from the start (+ OUT.json sidecar)")
    p.add_argument("--headless", action="store_true", help="no window (SDL dummy driver); needs --frames")
    p.add_argument("--frames", type=int, default=None, help="stop after this many generated frames")
    p.add_argument("--actions", default=None, help="JSON list of 4-vectors or discrete ids (headless script)")
    p.add_argument("--compare", action="store_true",
                   help="real ViZDoom (left) beside the world model (right), same start pose and actions, with PSNR")
    args = p.parse_args(argv)
    if args.headless and args.frames is None:
        p.error("--headless needs --frames N")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.headless:
        os.environ["SDL_VIDEODRIVER"] = "dummy"
        os.environ["SDL_AUDIODRIVER"] = "dummy"
    from envs.world_model_env import WorldModelEnv
    from worldmodel.inference.world import WorldError

    try:
        env = WorldModelEnv(world=args.world, steps=args.steps, device=args.device, dtype=args.dtype,
                            action_type="camera", report_latency=True, fast=args.fast)
    except WorldError as err:
        sys.exit(f"play.py: {err}")
    steps_label = str(args.steps or env.world.config.generator.steps)
    if args.compare:
        env = compare_env(env)
    game = Game(env, scale=args.scale, smooth=args.smooth, seed=args.seed, record=args.record,
                steps_label=steps_label)
    scripted = None
    if args.headless or args.actions:
        scripted = load_actions(args.actions, args.frames or 1000, args.seed, env.action_space.shape[0])
    game.run(frames=args.frames, actions=scripted, realtime=not args.headless)


if __name__ == "__main__":
    main()
