"""Video decoding, resampling to the project's frame size and rate, and scene-cut detection.

Sources: a video file PyAV can decode (MP4, WebM, MKV, MOV, AVI) or a folder of PNG/JPG frames
(sorted by name, taken to run at `image_fps`).

Frame size: center-crop to the output aspect (4:3 for 128x96), then cv2.INTER_AREA resize. Cropping
rather than squashing keeps pixels square, which the annotator's pinhole intrinsics assume; the price
is a narrower view when the source is wider than 4:3, so the horizontal fov is recomputed
(`cropped_fov`) and that effective fov is what the annotator gets and the manifest records.

Frame rate: frames are picked by their presentation timestamps: the first frame at or after each
tick of a 1/fps grid (starting at the first frame), the others dropped. Frames are never duplicated:
a source slower than the asked fps keeps its own rate, and the effective rate is reported.

Scene cuts: a cut is declared between consecutive frames whose hue-saturation histogram Bhattacharyya
distance exceeds a threshold (0.5). Within one shot, even a fast 14 deg/frame turn in Doom stays below
it (max 0.41 over 800 frames, benchmarks/RESULTS.md "## Ingest"), while a hard cut to a differently
coloured place jumps it. Limitation: a cut between two places with the same palette can be missed
(the annotator then sees one bad pair: low confidence there, or a spurious delta).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class VideoError(RuntimeError):
    """A source video or frame folder cannot be decoded."""


def center_crop_box(src_h: int, src_w: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the largest centred crop of a src_h x src_w frame with out_w:out_h aspect."""
    if src_w * out_h > src_h * out_w:  # too wide: crop the sides
        cw = int(round(src_h * out_w / out_h))
        x0 = (src_w - cw) // 2
        return 0, src_h, x0, x0 + cw
    ch = int(round(src_w * out_h / out_w))
    y0 = (src_h - ch) // 2
    return y0, y0 + ch, 0, src_w


def cropped_fov(src_h: int, src_w: int, out_h: int, out_w: int, fov_deg: float) -> float:
    """Horizontal fov (deg) after `center_crop_box`, for a source of horizontal fov `fov_deg`.
    A pinhole crop keeps the focal length: tan(fov/2) scales with the kept width fraction."""
    _, _, x0, x1 = center_crop_box(src_h, src_w, out_h, out_w)
    half = np.tan(np.radians(fov_deg) / 2.0) * (x1 - x0) / src_w
    return float(np.degrees(2.0 * np.arctan(half)))


def resize_frame(frame: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """frame uint8 (h, w, 3) RGB -> (out_h, out_w, 3): center crop to the aspect, INTER_AREA resize."""
    y0, y1, x0, x1 = center_crop_box(frame.shape[0], frame.shape[1], out_h, out_w)
    crop = np.ascontiguousarray(frame[y0:y1, x0:x1])
    if crop.shape[:2] == (out_h, out_w):
        return crop
    return cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)


class TimePicker:
    """Keeps the first frame at or after each tick t0 + k/fps of a grid starting at the first frame's
    time; a quarter-period tolerance absorbs timestamp rounding. Call with each timestamp in order."""

    def __init__(self, fps: float):
        self.step, self.tol, self.next = 1.0 / fps, 0.25 / fps, None

    def __call__(self, t: float) -> bool:
        if self.next is not None and t < self.next - self.tol:
            return False
        self.next = (t if self.next is None else self.next) + self.step
        while self.next <= t - self.tol:  # the source skipped ahead (slower than fps, or a gap)
            self.next += self.step
        return True


def pick_by_time(times, fps: float) -> np.ndarray:
    """Timestamps (N,) in seconds, non-decreasing -> indices (M,) of the frames kept at `fps`."""
    keep = TimePicker(fps)
    return np.asarray([i for i, t in enumerate(np.asarray(times, dtype=np.float64)) if keep(float(t))], np.int64)


def _iter_av(path: Path):
    """Yield (rgb frame (h,w,3) uint8, time s) from a video file with PyAV."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 30)
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else i / rate
                yield frame.to_ndarray(format="rgb24"), float(t)
    except VideoError:
        raise
    except (av.FFmpegError, ValueError, OSError) as e:
        raise VideoError(f"{path}: cannot decode video ({type(e).__name__}: {e}); re-encode it "
                         "(e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`) or pass --skip-bad") from e


def _iter_images(path: Path, image_fps: float):
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    for i, f in enumerate(files):
        bgr = cv2.imread(str(f))
        if bgr is None:
            raise VideoError(f"{f}: cannot decode image (frame folder {path}); remove it or pass --skip-bad")
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), i / image_fps


def load_video(path: str | Path, out_h: int, out_w: int, fps: float, image_fps: float | None = None) -> dict:
    """Decode, pick frames at `fps` by timestamp, crop+resize -> {"frames": uint8 (N,out_h,out_w,3),
    "times": (N,) s, "source_size": [h, w], "source_frames": int, "effective_fps": float}.
    Frames are resized as they are decoded, so a long HD video never sits in memory at full size."""
    path = Path(path)
    it = _iter_images(path, image_fps or fps) if path.is_dir() else _iter_av(path)
    frames, times, size, n_src = [], [], None, 0
    keep = TimePicker(fps)
    for rgb, t in it:
        n_src += 1
        size = size or [int(rgb.shape[0]), int(rgb.shape[1])]
        if not keep(t):
            continue
        frames.append(resize_frame(rgb, out_h, out_w))
        times.append(t)
    if not frames:
        raise VideoError(f"{path}: no frames decoded (empty or unreadable); pass --skip-bad to count and skip it")
    span = times[-1] - times[0]
    eff = (len(times) - 1) / span if span > 0 else fps
    return {"frames": np.stack(frames), "times": np.asarray(times), "source_size": size,
            "source_frames": n_src, "effective_fps": float(eff)}


def histogram_distances(frames: np.ndarray, bins: tuple[int, int] = (16, 8)) -> np.ndarray:
    """frames uint8 (N,H,W,3) RGB -> (N-1,) Bhattacharyya distances of consecutive hue-saturation
    histograms. Value (brightness) is left out: lighting changes and codec noise live there, and with it
    a fast Doom turn reached 0.63 (within-shot p99.9 0.54); without it the max was 0.41 (RESULTS.md)."""
    hists = []
    for f in frames:
        hsv = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2HSV)
        h = cv2.calcHist([hsv], [0, 1], None, list(bins), [0, 180, 0, 256])
        hists.append(cv2.normalize(h, None).astype(np.float32))
    return np.array([cv2.compareHist(hists[i - 1], hists[i], cv2.HISTCMP_BHATTACHARYYA)
                     for i in range(1, len(hists))], dtype=np.float32)


def scene_segments(frames: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """frames (N,H,W,3) -> [(start, end)] half-open index ranges between scene cuts, covering all frames."""
    if len(frames) == 0:
        return []
    cuts = [i + 1 for i, d in enumerate(histogram_distances(frames)) if d > threshold]
    bounds = [0] + cuts + [len(frames)]
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]
