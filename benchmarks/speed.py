"""Speed of the shipped architecture: `python -m benchmarks.speed [--device cpu|cuda] [--dtype fp32|bf16]
[--sizes config XXS XS S M] [--batches 1 8 64 256] [--paths eager static graph | --graphs] [--frames N]
[--out results.json]`.

For each DiT size x decoder width x sampler x batch B it measures, with decoding to uint8 frames on the
host always included:
- first frame: reset() from `generator.context_frames` uint8 frames (encoder included) -> first frame on
  the host, its block at the sampler's own steps; median of 5 (teacher: 3) after one unmeasured reset; also from latent
  context frames (first_frame_latents_ms: how a packaged world resets, its start contexts stored encoded). On a
  fast path the first frame goes through the static step too (its partial-window variant, a CUDA graph on CUDA,
  built in the unmeasured reset); the table's last lines give frame-2's first frame over chunk3-4's;
- steady step: one generator call that yields the next frame(s) of all B worlds, with the KV window full
  (reset from cache_frames random latents, warmed up): median and p90 over --frames calls; frames/s =
  B * frames per call / mean call time;
- the analytic floor of that call (benchmarks.flops) under a peak FLOP/s and bandwidth (measured on the
  spot with a large matmul and a large copy unless --peak-flops / --bandwidth are given).

Samplers: frame-wise StreamingGenerator with 1, 2, 4 steps (frame-1, frame-2, frame-4), chunk-wise
(block of 3 frames) with 4 steps (chunk3-4), and the many-step teacher as worldmodel.eval runs it
(teacher: WindowedEulerGenerator, flow.grid_size Euler steps over a clip_frames window, no cache). All
rows of one size use the same weights in the same run, so their ratios hold.

Paths of the frame-wise samplers (--paths; --graphs = all three): "eager" = StreamingGenerator.step as
it is; "static" = its steady-state frames through worldmodel.inference.graphed.StaticFrameStep run eagerly
(fewer, fused ops on static buffers); "graph" = the same step captured as a CUDA graph (CUDA only; on other
devices these rows are skipped, being the static rows); "compile" = the static step through torch.compile
(captured as a CUDA graph on CUDA; Inductor's C++ on the CPU). The capture (and compilation) happens in the
warm-up calls and is reported apart (capture_ms; build_call_ms = the whole call that built the step).
Chunk-wise and teacher rows are eager only.

Weights are random (speed does not depend on the values; the zero-initialised adaLN gates are filled
so that every path carries non-trivial numbers). Other processes on the machine slow it down: the load
average is recorded with every row.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import sys
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.flops import Cost, decoder_params, dit_params, streaming_block, teacher_frame
from worldmodel.config import RunConfig, load_config
from worldmodel.diffusion.flow import sigma_grid
from worldmodel.eval import WindowedEulerGenerator, write_report
from worldmodel.inference.generator import StreamingGenerator
from worldmodel.inference.host import to_host
from worldmodel.inference.world import default_dtype, resolve_dtype
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.models.dit import DIT_SIZES, WorldDiT

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
# name -> (denoising steps, frames per block); None = the teacher.
SAMPLERS: dict[str, tuple[int, int] | None] = {
    "frame-1": (1, 1), "frame-2": (2, 1), "frame-4": (4, 1), "chunk3-4": (4, 3), "teacher": None,
}
# path -> StreamingGenerator(fast=...)
PATHS = {"eager": "off", "static": "static", "graph": "graph", "compile": "compile"}
POSE_STATS = {"mean": [0.0] * 5, "std": [1.0] * 5}
NOTE = "random weights: speed does not depend on the weight values"
# Since 2026-12-02; earlier reports (no such field) timed one cold reset with generator.first_frame_steps (4).
FIRST_FRAME_METHOD = ("the first block at the sampler's own steps; median of 5 resets (3 for the teacher) after "
                      "one unmeasured reset; first_frame_latents_ms: the same from latent context frames")


# ----- machine -----

def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads(), "cpu_cores": os.cpu_count()}
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_after_warm(fn, device: torch.device, reps: int) -> float:
    """Median seconds of `reps` calls of fn after one unmeasured call (which pays one-off costs: allocator,
    kernel selection); fn must end with the result on the host."""
    times = []
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def _best_time(fn, device: torch.device, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def measure_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(FLOP/s of a large square matmul, bytes/s of a large copy) in `dtype`: the attainable roofline."""
    n, elems = (8192, 1 << 28) if device.type == "cuda" else (1024, 1 << 25)
    a = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(elems, device=device, dtype=dtype).fill_(1.0)
    dst = torch.empty_like(src)
    flops = 2 * n**3 / _best_time(lambda: a @ a, device, 8)
    bandwidth = 2 * src.numel() * src.element_size() / _best_time(lambda: dst.copy_(src), device, 8)  # read + write
    return flops, bandwidth


# ----- models -----

def build(cfg: RunConfig, size: str, decoder_width: int | None, seed: int) -> tuple[RunConfig, WorldDiT, Autoencoder]:
    """The run config with DiT `size` ("config" = as in the file) and decoder width, and random modules."""
    dit_cfg = cfg.dit if size == "config" else dataclasses.replace(cfg.dit, **DIT_SIZES[size])
    ae_cfg = cfg.autoencoder if decoder_width is None else dataclasses.replace(cfg.autoencoder, decoder_base_channels=decoder_width)
    cfg = dataclasses.replace(cfg, dit=dit_cfg, autoencoder=ae_cfg)
    torch.manual_seed(seed)
    dit, ae = WorldDiT(dit_cfg).eval(), Autoencoder(ae_cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():  # adaLN-Zero gates and the output layer: give them values like a trained net's
                p.normal_(0.0, 0.02)
    return cfg, dit, ae


# ----- measurements -----

def _summary(times: list[float]) -> dict[str, float]:
    return {"step_median_ms": 1e3 * statistics.median(times),
            "step_p90_ms": 1e3 * float(np.percentile(times, 90)),
            "step_mean_ms": 1e3 * statistics.fmean(times)}


def _context(cfg: RunConfig, batch: int, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = cfg.data.frame_height, cfg.data.frame_width
    return rng.integers(0, 256, (batch, frames, h, w, 3), dtype=np.uint8), np.zeros((batch, frames, 5), np.float32)


@torch.inference_mode()
def bench_streaming(cfg: RunConfig, dit: WorldDiT, ae: Autoencoder, *, steps: int, block_size: int, batch: int,
                    calls: int, device: torch.device, dtype: torch.dtype, seed: int, path: str = "eager",
                    channels_last: bool = True, first_reps: int = 5) -> dict[str, Any]:
    # The first block takes the sampler's own steps (the shipped world plays its first frame at 2 steps too).
    gen_cfg = dataclasses.replace(cfg.generator, steps=steps, block_size=block_size, first_frame_steps=steps)
    gen = StreamingGenerator(dit, ae, POSE_STATS, gen_cfg, cfg.flow, device=device, dtype=dtype, fast=PATHS[path],
                             channels_last=channels_last)
    rng = np.random.default_rng(seed)
    g = torch.Generator(device).manual_seed(seed)
    delta = torch.zeros(batch, 5)
    frames, deltas = _context(cfg, batch, gen_cfg.context_frames, rng)
    # From uint8 frames (encoder included), and from latents as a packaged world resets (its start contexts are
    # stored encoded; the shipped world has no encoder).
    z_ctx = torch.randn(batch, gen_cfg.context_frames, *gen.latent_shape, generator=torch.Generator().manual_seed(seed))
    first, first_latents = (
        _median_after_warm(lambda: (gen.reset(ctx, deltas, g, latents=lat), to_host(gen.step(delta))), device, first_reps)
        for ctx, lat in ((frames, False), (z_ctx, True)))
    first_fast = gen._frame_step is not None  # the first frames went through the static step
    # Steady state: the window full, as after the first cache_frames frames of any long rollout.
    n = gen_cfg.cache_frames
    z = torch.randn(batch, n, *gen.latent_shape, generator=torch.Generator().manual_seed(seed))
    gen.reset(z, torch.zeros(batch, n, 5), g, latents=True)
    times, warm_times = [], []
    warm = 2 if path == "eager" else 3  # the 1st is the first block: a fast path builds its steady step (captures, compiles) there
    for i in range(calls + warm):
        _sync(device)
        t = time.perf_counter()
        for _ in range(block_size):  # the product's API: one step() per displayed frame
            to_host(gen.step(delta))
        (times if i >= warm else warm_times).append(time.perf_counter() - t)
    extra: dict[str, Any] = {}
    if path != "eager":
        fs = gen._frame_step
        if fs is None or not gen.fast_ready():
            raise RuntimeError(f"speed: the {path} path was never taken (block_size {block_size}, window not full?)")
        extra = {"graphed": bool(fs.graphs and fs._captured.get((True, False)) is not None),
                 "first_frame_graphed": bool(fs.graphs and fs._captured.get((True, True)) is not None),
                 "capture_ms": 1e3 * fs.capture_s.get((True, False), 0.0), "capture_error": fs.capture_error,
                 "compiled": bool(fs.compiled and fs.compile_error is None), "compile_error": fs.compile_error,
                 "build_call_ms": 1e3 * warm_times[0]}  # the call that built the step (capture, compile included)
    z1 = torch.randn(batch, 1, *gen.latent_shape, device=device, dtype=dtype)
    decode = _best_time(lambda: to_host(gen.decode(z1)), device, 3)
    return {"first_frame_ms": 1e3 * first, "first_frame_latents_ms": 1e3 * first_latents,
            "first_frame_path": path if first_fast else "eager", **_summary(times), "decode_ms": 1e3 * decode, **extra}


@torch.no_grad()
def bench_teacher(cfg: RunConfig, dit: WorldDiT, ae: Autoencoder, *, batch: int, calls: int, device: torch.device,
                  dtype: torch.dtype, seed: int, first_reps: int = 3) -> dict[str, float]:
    window = cfg.data.clip_frames
    gen = WindowedEulerGenerator(copy.deepcopy(dit), copy.deepcopy(ae), POSE_STATS, mode="bidirectional",
                                 window=window, sigmas=sigma_grid(cfg.flow.grid_size, cfg.flow.shift), device=device)
    rng = np.random.default_rng(seed)
    g = torch.Generator(device).manual_seed(seed)
    delta = torch.zeros(batch, 5)
    # worldmodel.eval runs it in fp32; other dtypes through autocast (its reset/decode cast to fp32).
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        frames, deltas = _context(cfg, batch, cfg.generator.context_frames, rng)
        first = _median_after_warm(lambda: (gen.reset(frames, deltas, g), to_host(gen.step(delta))), device, first_reps)
        frames, deltas = _context(cfg, batch, window - 1, rng)  # steady: the window always full
        gen.reset(frames, deltas, g)
        times = []
        for i in range(calls + 1):
            _sync(device)
            t = time.perf_counter()
            to_host(gen.step(delta))
            if i >= 1:
                times.append(time.perf_counter() - t)
    return {"first_frame_ms": 1e3 * first, **_summary(times)}


def cost_of(cfg: RunConfig, sampler: str, batch: int, bytes_per_el: int) -> tuple[Cost, int]:
    """Analytic cost of one steady call of `sampler` and the frames per world it yields."""
    hw = dict(height=cfg.data.frame_height, width=cfg.data.frame_width, bytes_per_el=bytes_per_el, batch=batch)
    spec = SAMPLERS[sampler]
    if spec is None:
        return teacher_frame(cfg.dit, cfg.autoencoder, euler_steps=cfg.flow.grid_size, window=cfg.data.clip_frames, **hw), 1
    steps, block = spec
    return streaming_block(cfg.dit, cfg.autoencoder, steps=steps, block_size=block,
                           cache_frames=cfg.generator.cache_frames, **hw), block


# ----- the run -----

def run(cfg: RunConfig, *, device: torch.device, dtype: torch.dtype, sizes: list[str], decoder_widths: list[int | None],
        samplers: list[str], batches: list[int], teacher_batches: list[int], frames: int, teacher_frames: int,
        peak_flops: float | None = None, bandwidth: float | None = None, seed: int = 0,
        paths: list[str] | None = None, channels_last: bool = True) -> dict[str, Any]:
    """Measure every combination; returns the report (rows + machine + roofline)."""
    paths = paths or ["eager"]
    if "graph" in paths and device.type != "cuda":
        print(f"speed: no CUDA graphs on {device}: the 'graph' rows would be the 'static' rows; skipped", file=sys.stderr)
        paths = [p for p in paths if p != "graph"] or ["static"]
    if peak_flops is None or bandwidth is None:
        measured = measure_peak(device, dtype)
        peak_flops = peak_flops or measured[0]
        bandwidth = bandwidth or measured[1]
    bpe = torch.empty((), dtype=dtype).element_size()
    frame_wise = lambda sm: SAMPLERS[sm] is not None and SAMPLERS[sm][1] == 1  # noqa: E731
    jobs = [(s, w, sm, b, pa) for s in sizes for w in decoder_widths for sm in samplers
            for b in (teacher_batches if SAMPLERS[sm] is None else batches)
            for pa in (paths if frame_wise(sm) else ["eager"])]
    rows, built = [], {}
    load_start = os.getloadavg()
    for size, width, sampler, batch, path in tqdm(jobs, desc="speed", unit="row"):
        if (size, width) not in built:
            built = {(size, width): build(cfg, size, width, seed)}  # one pair of modules alive at a time
        run_cfg, dit, ae = built[(size, width)]
        spec = SAMPLERS[sampler]
        if spec is None:
            res = bench_teacher(run_cfg, dit, ae, batch=batch, calls=teacher_frames, device=device, dtype=dtype, seed=seed)
        else:
            steps, block = spec
            calls = max(1, -(-frames // block))
            res = bench_streaming(run_cfg, dit, ae, steps=steps, block_size=block, batch=batch, calls=calls,
                                  device=device, dtype=dtype, seed=seed, path=path, channels_last=channels_last)
        cost, per_call = cost_of(run_cfg, sampler, batch, bpe)
        floor = cost.floor_s(peak_flops, bandwidth)
        rows.append({
            "dit": size, "dit_dim": run_cfg.dit.dim, "dit_depth": run_cfg.dit.depth,
            "dit_params_m": dit_params(run_cfg.dit) / 1e6,
            "decoder_width": run_cfg.autoencoder.decoder_base_channels,
            "decoder_params_m": decoder_params(run_cfg.autoencoder) / 1e6,
            "sampler": sampler, "path": path, "batch": batch, "frames_per_call": per_call,
            "decoder_layout": "channels_last" if channels_last else "contiguous", **res,
            "fps": batch * per_call / (res["step_mean_ms"] / 1e3),
            "gflop_per_frame": cost.flops / (batch * per_call) / 1e9, "mb_per_call": cost.bytes / 1e6,
            "floor_ms": 1e3 * floor, "x_floor": res["step_median_ms"] / (1e3 * floor),
            "load_avg_1min": os.getloadavg()[0],
        })
    return {"note": NOTE, "first_frame_method": FIRST_FRAME_METHOD, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""),
            "machine": machine_info(device), "peak_flops": peak_flops, "bandwidth": bandwidth,
            "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "rows": rows,
            "decoder_layout": "channels_last" if channels_last else "contiguous",
            "config": {"generator": dataclasses.asdict(cfg.generator), "frame": [cfg.data.frame_height, cfg.data.frame_width],
                       "teacher_euler_steps": cfg.flow.grid_size, "teacher_window": cfg.data.clip_frames}}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_capability']}), {m['threads']} threads"
    load = ", ".join(f"{x:.2f}" for x in report["load_avg_start"])
    lines = [f"Device {report['device']} ({where}), {report['dtype']}, torch {m['torch']}; {report['note']}.",
             f"Roofline: {report['peak_flops'] / 1e9:.0f} GFLOP/s, {report['bandwidth'] / 1e9:.1f} GB/s; "
             f"load average at start {load}; decoder {report.get('decoder_layout', 'channels_last')}.", "",
             "| DiT (M params) | decoder width | sampler | B | first frame ms (from latents) | step ms median | p90 | frames/s | "
             "GFLOP/frame | floor ms | x floor | decode ms | load | capture (compile) ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        sampler = r["sampler"] + (f" ({r['frames_per_call']} fr/step)" if r["frames_per_call"] > 1 else "")
        if r.get("path", "eager") != "eager":
            sampler += f" {r['path']}"
            if r["path"] == "graph" and not r.get("graphed"):
                sampler += " (capture FAILED: eager)"
            if r["path"] == "compile" and not r.get("compiled"):
                sampler += " (compile FAILED: static)"
        decode = f"{r['decode_ms']:.1f}" if "decode_ms" in r else "-"
        capture = f"{r['capture_ms']:.0f}" if r.get("graphed") and r["path"] == "graph" else "-"
        if r.get("path") == "compile" and "build_call_ms" in r:
            capture = f"{r['build_call_ms']:.0f}"
        first = f"{r['first_frame_ms']:.1f}" + (f" ({r['first_frame_latents_ms']:.1f})" if "first_frame_latents_ms" in r else "")
        lines.append(f"| {r['dit']} ({r['dit_params_m']:.1f}) | {r['decoder_width']} | {sampler} | {r['batch']} | "
                     f"{first} | {r['step_median_ms']:.1f} | {r['step_p90_ms']:.1f} | {r['fps']:.1f} | "
                     f"{r['gflop_per_frame']:.2f} | {r['floor_ms']:.2f} | {r['x_floor']:.1f} | {decode} | "
                     f"{r['load_avg_1min']:.1f} | {capture} |")
    return "\n".join(lines + first_frame_ratios(report["rows"])) + "\n"


def first_frame_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Lines: frame-wise 2-step first frame over chunk-wise 4-step's (issue 6's target: <= 0.40), per batch and
    path of frame-2 against the eager chunk3-4 row (chunk-wise has no fast path), from frames and from latents."""
    chunk = {(r["dit"], r["decoder_width"], r["batch"]): r for r in rows if r["sampler"] == "chunk3-4"}
    lines = []
    for r in rows:
        c = chunk.get((r["dit"], r["decoder_width"], r["batch"]))
        if r["sampler"] != "frame-2" or c is None:
            continue
        lines.append(f"- first frame, frame-2 {r.get('path', 'eager')} (its first frame {r.get('first_frame_path', 'eager')}) "
                     f"/ chunk3-4 eager, {r['dit']}, B={r['batch']}: {r['first_frame_ms'] / c['first_frame_ms']:.2f}x "
                     f"({r['first_frame_ms']:.1f} / {c['first_frame_ms']:.1f} ms); from latents "
                     f"{r['first_frame_latents_ms'] / c['first_frame_latents_ms']:.2f}x "
                     f"({r['first_frame_latents_ms']:.1f} / {c['first_frame_latents_ms']:.1f} ms)")
    return [""] + lines if lines else []


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (YAML) whose architecture is measured")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="default: worldmodel.inference.world.default_dtype(device) (fp32 on AVX2-only CPUs)")
    p.add_argument("--sizes", nargs="+", default=["config"], choices=["config", *DIT_SIZES],
                   help="DiT sizes (worldmodel.models.dit.DIT_SIZES); 'config' = the config's dit section")
    p.add_argument("--decoder-widths", type=int, nargs="+", default=None,
                   help="autoencoder.decoder_base_channels values (default: the config's)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8 64 256 on CUDA, 1 8 on CPU")
    p.add_argument("--teacher-batches", type=int, nargs="+", default=None,
                   help="batches for the teacher (default: --batches on CUDA, 1 on CPU: ~100x a student frame)")
    p.add_argument("--paths", nargs="+", default=None, choices=list(PATHS),
                   help="frame-wise paths to measure (default: eager); see the module docstring")
    p.add_argument("--graphs", action="store_true", help="= --paths eager static graph")
    p.add_argument("--decoder-layout", choices=["channels_last", "contiguous"], default="channels_last",
                   help="the decoder's memory format (StreamingGenerator channels_last)")
    p.add_argument("--frames", type=int, default=20, help="steady-state generator calls measured per row")
    p.add_argument("--teacher-frames", type=int, default=3, help="steady-state teacher frames measured per row")
    p.add_argument("--peak-flops", type=float, default=None, help="FLOP/s for the floor (default: measured matmul)")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s for the floor (default: measured copy)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True: cuDNN times its convolution algorithms for each new shape "
                        "(the decoder's) and keeps the fastest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results.json", help="JSON report; the markdown table is written beside it (.md)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    device = torch.device(a.device)
    dtype = resolve_dtype(a.dtype) or default_dtype(device)
    batches = a.batches or ([1, 8, 64, 256] if device.type == "cuda" else [1, 8])
    teacher_batches = a.teacher_batches or (batches if device.type == "cuda" else [1])
    report = run(load_config(a.config), device=device, dtype=dtype, sizes=a.sizes,
                 decoder_widths=a.decoder_widths or [None], samplers=a.samplers, batches=batches,
                 teacher_batches=teacher_batches, frames=a.frames, teacher_frames=a.teacher_frames,
                 peak_flops=a.peak_flops, bandwidth=a.bandwidth, seed=a.seed,
                 paths=a.paths or (["eager", "static", "graph"] if a.graphs else ["eager"]),
                 channels_last=a.decoder_layout == "channels_last")
    report["cudnn_benchmark"] = a.cudnn_benchmark
    report["command"] = "python -m benchmarks.speed " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(a.out, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
