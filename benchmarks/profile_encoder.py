"""Where the time of reset()'s encoder goes: uint8 context frames -> latents, as StreamingGenerator.encode runs it.

    python -m benchmarks.profile_encoder [--device cuda] [--batches 1 64 256] [--frames 4] [--rows 20]

A randomly initialised autoencoder of --config (speed does not depend on the weights), for each batch B of
worlds x --frames context frames: the median time of encode_frames after one unmeasured call (upload of the uint8
frames from the host included, latents synchronised) in the memory layouts channels_last and contiguous, with cuDNN's algorithm
search (cudnn.benchmark) off and on; then a torch.profiler table of the kernels of the last batch in the
layout StreamingGenerator uses by default (channels_last), sorted by device time.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.speed import DEFAULT_CONFIG, _median_after_warm, _sync
from worldmodel.config import load_config
from worldmodel.inference.generator import autoencoder_on, encode_frames
from worldmodel.inference.world import default_dtype, resolve_dtype
from worldmodel.models.autoencoder import Autoencoder

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def time_encode(ae: Autoencoder, frames: np.ndarray, device: torch.device, reps: int) -> float:
    """Median seconds of encode_frames from host uint8 frames, the latents synchronised."""
    def encode() -> None:
        with torch.inference_mode():
            encode_frames(ae, torch.as_tensor(frames).to(device))
        _sync(device)
    return _median_after_warm(encode, device, reps)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_encoder", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (YAML) whose autoencoder is measured")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: default_dtype(device)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256], help="worlds reset together")
    p.add_argument("--frames", type=int, default=None, help="context frames per world (default: the config's)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", type=int, default=20, help="kernels printed (0: no profile)")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    device = torch.device(a.device)
    dtype = resolve_dtype(a.dtype) or default_dtype(device)
    frames_per_world = a.frames or cfg.generator.context_frames
    torch.manual_seed(0)
    base = Autoencoder(cfg.autoencoder).eval()
    rng = np.random.default_rng(0)
    rows = []
    print("| B x frames | layout | cudnn.benchmark | encode ms | ms per frame |\n|---|---|---|---|---|")
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for name, layout in LAYOUTS.items():
            ae = autoencoder_on(base, device, dtype, layout)
            for B in a.batches:
                frames = rng.integers(0, 256, (B, frames_per_world, cfg.data.frame_height, cfg.data.frame_width, 3),
                                      dtype=np.uint8)
                ms = 1e3 * time_encode(ae, frames, device, a.reps)
                rows.append({"batch": B, "frames": frames_per_world, "layout": name, "cudnn_benchmark": bench, "ms": ms})
                print(f"| {B} x {frames_per_world} | {name} | {bench} | {ms:.2f} | {ms / (B * frames_per_world):.4f} |",
                      flush=True)
    if a.rows:
        torch.backends.cudnn.benchmark = False
        ae = autoencoder_on(base, device, dtype, torch.channels_last)
        x = torch.as_tensor(frames).to(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.inference_mode(), profile(activities=acts) as prof:
            encode_frames(ae, x)
            _sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\nkernels of one encode, B={a.batches[-1]} x {frames_per_world}, channels_last, {dtype}:")
        print(prof.key_averages().table(sort_by=key, row_limit=a.rows))
    return rows


if __name__ == "__main__":
    main()
