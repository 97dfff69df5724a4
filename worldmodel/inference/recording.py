"""MP4 + JSON sidecar recording of a rollout: every frame shown, never dropped.

Frames go through an unbounded queue to a writer thread, so encoding never stalls the game loop and a
slow encoder delays the end of the recording rather than losing frames. Video: H.264 (libx264, yuv420p,
browser-playable) at the env's fps; if this PyAV build has no libx264 the recorder says so and falls
back to MPEG-4 Part 2. The sidecar `out.json` holds the seed, fps, codec, and per frame the action, the
pose and the generation latency.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

_DONE = object()


def pick_codec() -> str:
    for name in ("libx264", "h264"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # av raises UnknownCodecError (type differs between versions)
            continue
    print("recording: H.264 encoder unavailable in this PyAV build; writing MPEG-4 Part 2 instead "
          "(install PyAV wheels with libx264 for browser-playable files)", file=sys.stderr)
    return "mpeg4"


class Recorder:
    """`add(frame, action, pose, latency_ms)` per shown frame, then `close()`; also a context manager."""

    def __init__(self, path: str | Path, fps: float, meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.sidecar = self.path.with_suffix(".json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = float(fps)
        self.codec = pick_codec()
        self.meta = dict(meta or {})
        self.actions: list[list[float]] = []
        self.poses: list[list[float]] = []
        self.latency_ms: list[float] = []
        self.frames = 0
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="recorder", daemon=True)
        self._thread.start()
        self._closed = False

    def add(self, frame: np.ndarray, action: Any = None, pose: Any = None, latency_ms: float = 0.0) -> None:
        """frame: uint8 (H, W, 3); the same size for every call."""
        if self._error is not None:
            raise RuntimeError(f"recording to {self.path} failed: {self._error}") from self._error
        self._queue.put(np.ascontiguousarray(frame, dtype=np.uint8))
        self.actions.append(np.asarray(action if action is not None else [], np.float64).tolist())
        self.poses.append(np.asarray(pose if pose is not None else [], np.float64).tolist())
        self.latency_ms.append(float(latency_ms))
        self.frames += 1

    def _write(self) -> None:
        container, stream = None, None
        try:
            while (frame := self._queue.get()) is not _DONE:
                if container is None:
                    container, stream = self._open(frame.shape)
                image = av.VideoFrame.from_ndarray(_even(frame), format="rgb24")
                container.mux(stream.encode(image))
            if container is not None:
                container.mux(stream.encode(None))  # flush the encoder's delayed frames
        except BaseException as err:  # reported to the caller on the next add()/close()
            self._error = err
            while self._queue.get() is not _DONE:  # keep draining so close() does not hang
                pass
        finally:
            if container is not None:
                container.close()

    def _open(self, shape: tuple[int, ...]):
        container = av.open(str(self.path), mode="w")
        stream = container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
        h, w = shape[0] + shape[0] % 2, shape[1] + shape[1] % 2  # yuv420p needs even sizes
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        if self.codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        return container, stream

    def close(self) -> tuple[Path, Path]:
        """Finish the video (waits for the writer) and write the sidecar; returns (mp4, json)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_DONE)
            self._thread.join()
            sidecar = {**self.meta, "video": self.path.name, "fps": self.fps, "codec": self.codec,
                       "frames": self.frames, "actions": self.actions, "poses": self.poses,
                       "latency_ms": self.latency_ms}
            self.sidecar.write_text(json.dumps(sidecar, indent=1))
            if self._error is not None:
                raise RuntimeError(f"recording to {self.path} failed: {self._error}") from self._error
        return self.path, self.sidecar

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _even(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frame
