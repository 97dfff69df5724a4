"""ViZDoom driven one frame at a time with our conventions: the one way to run the real engine.

    eng = DoomEngine(RecordSettings())
    frame, pose = eng.reset(seed=0)                        # the map's spawn
    frame, pose = eng.reset(start_pose=(x, y, z, yaw, pitch))  # placed at a pose
    frame, pose = eng.step(np.array([1, 0, 0.5, 0], np.float32))
    eng.close()

frame: uint8 (H, W, 3) at settings.height x settings.width (cv2.INTER_AREA from the render resolution);
pose: float32 (5,) = (x, y, z, yaw, pitch) the frame shows, pitch + = up (the engine's PITCH flipped).
Actions are canonical (forward, strafe, turn, look) in [-1, 1], scaled by ACTION_SCALE per tic and held for
settings.frame_skip tics (see data_tools/record.py for the units).

Placing at a pose: ZDoom's `warp X Y` console command (through `send_game_command`) teleports the player;
ZDoom has no console command that sets the view angle, so yaw and pitch are then reached with
TURN_LEFT_RIGHT_DELTA / LOOK_UP_DOWN_DELTA in single tics (measured: yaw and pitch exact, x and y within
0.5 map units since warp takes whole units), then one still tic so the screen shows that pose. z is not
set: the engine puts the player on the floor of the sector at (x, y), which is where a recorded pose's z
came from anyway. A point outside the map lands wherever ZDoom's warp puts it;
`placement_error` says how far the result is from the request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

from data_tools.poses import wrap_degrees

# Per-tic engine units of a full action, in (forward, strafe, turn, look) order; signs map our
# conventions (turn + = left, look + = up) onto the engine's.
ACTION_SCALE = np.array([25.0, 24.0, -3.5, 1.5])
ENGINE_FOV = 90.0
SETTLE_NOOPS = 2  # the first actions after new_episode are partly dropped by the engine
PLACE_TRIES = 3  # single-tic turn corrections when placing at a pose


@dataclass
class RecordSettings:
    wad: str = "freedoom2.wad"
    map: str = "MAP01"
    monsters: bool = False
    frame_skip: int = 4
    height: int = 96
    width: int = 128
    render_resolution: str = "160x120"
    fov: float = ENGINE_FOV


class EpisodeEnded(RuntimeError):
    """The engine ended the episode (timeout or death): reset before stepping again."""


def find_wad(name: str) -> str:
    """A wad path as given, else looked up next to the vizdoom package / in its scenarios folder."""
    import vizdoom as vzd

    if os.path.isfile(name):
        return name
    for d in (os.path.dirname(vzd.__file__), vzd.scenarios_path):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"wad {name!r} not found as a path nor in {os.path.dirname(vzd.__file__)}")


def engine_settings(s: RecordSettings) -> dict:
    """Everything the engine is told, as data (tests assert it: HUD hidden is a property of this)."""
    w, h = (int(v) for v in s.render_resolution.lower().split("x"))
    # View bob off: walking (even into a wall) would move the camera up and down by a few units that the
    # recorded pose (feet position) does not show, and a frame must be a function of the pose.
    args = ["+sv_nomonsters 0" if s.monsters else "+sv_nomonsters 1", "+movebob 0"]
    return {"wad": find_wad(s.wad), "map": s.map, "screen_resolution": f"RES_{w}X{h}", "screen_format": "RGB24",
            "render_hud": False, "render_minimal_hud": False, "render_weapon": False, "render_crosshair": False,
            "render_messages": False, "render_screen_flashes": False, "render_decals": False,
            "render_particles": False, "render_corpses": False, "window_visible": False,
            "sound_enabled": False, "episode_timeout": 0, "game_args": args,
            "buttons": ["MOVE_FORWARD_BACKWARD_DELTA", "MOVE_LEFT_RIGHT_DELTA", "TURN_LEFT_RIGHT_DELTA",
                        "LOOK_UP_DOWN_DELTA"],
            "game_variables": ["POSITION_X", "POSITION_Y", "POSITION_Z", "ANGLE", "PITCH"]}


def make_game(s: RecordSettings):
    """An initialised vizdoom.DoomGame with `engine_settings(s)`."""
    import vizdoom as vzd

    if abs(s.fov - ENGINE_FOV) > 1e-6:
        raise ValueError(f"fov {s.fov}: ViZDoom 1.3.2 renders at {ENGINE_FOV} deg and ignores +fov; use --fov 90")
    e = engine_settings(s)
    cv2.setNumThreads(1)  # one engine process per core: OpenCV's thread pool would only contend
    g = vzd.DoomGame()
    g.set_doom_game_path(e["wad"])
    g.set_doom_map(e["map"])
    g.set_screen_resolution(getattr(vzd.ScreenResolution, e["screen_resolution"]))
    g.set_screen_format(getattr(vzd.ScreenFormat, e["screen_format"]))
    for key in ("render_hud", "render_minimal_hud", "render_weapon", "render_crosshair", "render_messages",
                "render_screen_flashes", "render_decals", "render_particles", "render_corpses"):
        getattr(g, f"set_{key}")(e[key])
    g.set_window_visible(e["window_visible"])
    g.set_sound_enabled(e["sound_enabled"])
    g.set_episode_timeout(e["episode_timeout"])
    for a in e["game_args"]:
        g.add_game_args(a)
    for b in e["buttons"]:
        g.add_available_button(getattr(vzd.Button, b))
    for v in e["game_variables"]:
        g.add_available_game_variable(getattr(vzd.GameVariable, v))
    g.set_mode(vzd.Mode.PLAYER)
    g.init()
    return g


def placement_error(pose, target) -> dict[str, float]:
    """How far `pose` (5,) is from `target` (5,): xy distance (map units), |dz|, |dyaw|, |dpitch| (deg)."""
    p, t = np.asarray(pose, np.float64), np.asarray(target, np.float64)
    return {"xy": float(np.hypot(*(p[:2] - t[:2]))), "z": float(abs(p[2] - t[2])),
            "yaw": float(abs(wrap_degrees(p[3] - t[3]))), "pitch": float(abs(wrap_degrees(p[4] - t[4])))}


class DoomEngine:
    """One ViZDoom process stepped frame by frame. `game`: drive an existing DoomGame made by
    `make_game(settings)` instead of starting one (it is still closed by `close()`)."""

    def __init__(self, settings: RecordSettings | None = None, game=None):
        self.settings = settings or RecordSettings()
        self.game = game if game is not None else make_game(self.settings)
        self.pose: np.ndarray | None = None  # (5,) of the last frame read
        self.last_frame: np.ndarray | None = None  # uint8 (H, W, 3)

    def reset(self, start_pose=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """New episode (engine seed `seed`), settled; at `start_pose` (5,) if given -> (frame, pose)."""
        g = self.game
        g.set_seed(int(seed))
        g.new_episode()
        for _ in range(SETTLE_NOOPS):
            g.make_action([0.0] * 4, self.settings.frame_skip)
        if start_pose is not None:
            self._place(np.asarray(start_pose, np.float64).reshape(5))
        return self.read()

    def _place(self, target: np.ndarray) -> None:
        g = self.game
        # warp takes whole map units (a fraction is dropped toward zero, measured): round to the nearest.
        g.send_game_command(f"warp {int(round(target[0]))} {int(round(target[1]))}")
        g.make_action([0.0] * 4, 1)  # console commands run on the next tic
        for _ in range(PLACE_TRIES):
            _, pose = self.read()
            err = [wrap_degrees(target[3] - pose[3]), target[4] - pose[4]]
            if abs(err[0]) < 1e-3 and abs(err[1]) < 1e-3:
                break
            # One tic: delta buttons are degrees per tic; engine turn + = right, look + = up.
            g.make_action([0.0, 0.0, -float(err[0]), float(err[1])], 1)
        # Right after warp + turn tics the screen is not yet the view of the reported pose (measured: ~20/255
        # mean abs difference to the recorded frame at that pose); after one still tic it is (~2/255).
        g.make_action([0.0] * 4, 1)

    def step(self, action) -> tuple[np.ndarray, np.ndarray]:
        """action: canonical (4,) (or (3,), look 0) in [-1, 1], clipped -> (frame, pose) after frame_skip tics.
        Raises EpisodeEnded if the engine ended the episode."""
        a = np.zeros(4, np.float64)
        flat = np.asarray(action, np.float64).reshape(-1)
        a[: len(flat)] = flat
        self.game.make_action((np.clip(a, -1, 1) * ACTION_SCALE).tolist(), self.settings.frame_skip)
        if self.game.is_episode_finished() or self.game.is_player_dead():
            raise EpisodeEnded("the ViZDoom episode ended (timeout or player death); call reset()")
        return self.read()

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """The current (frame uint8 (H, W, 3), pose float32 (5,)) without stepping."""
        st = self.game.get_state()
        x, y, z, yaw, pitch = st.game_variables
        s = self.settings
        frame = cv2.resize(st.screen_buffer, (s.width, s.height), interpolation=cv2.INTER_AREA)
        self.pose = np.array([x, y, z, yaw, -pitch], dtype=np.float32)
        self.last_frame = frame
        return frame, self.pose.copy()

    def close(self) -> None:
        if self.game is not None:
            self.game.close()
            self.game = None

    def __enter__(self) -> DoomEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
