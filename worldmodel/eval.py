"""Fidelity against the recorded engine (DESIGN §5): `python -m worldmodel.eval --checkpoint W --autoencoder A --data D`.

From each held-out episode's first `context` frames and its recorded pose deltas, generate frame by frame
and compare with the engine's frames: PSNR and SSIM at horizons h (the frame h steps after the context;
h = 1 is the first generated frame), each beside the copy-last-frame baseline (the last context frame held
still) and the autoencoder's reconstruction of the same frame (the ceiling), plus latency.

Samplers, chosen from the checkpoint's stage:
- few-step students (causal_cd, causal_ode, dmd; `--sampler few` forces it for ar_diffusion):
  `StreamingGenerator` with its KV cache, k steps for each k in --steps;
- teacher and ar_diffusion: `WindowedEulerGenerator` below, `--euler-steps` Euler steps of the PF-ODE
  per frame. It re-runs a sliding window of the last `window - 1` frames (clean, sigma = 0) plus the new
  noisy frame on every call, no cache: the teacher bidirectionally (trained with per-frame noise levels,
  so clean neighbours are in its training distribution), the AR model block-causally. Slow and simple.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.shards import load_episode, read_manifest
from worldmodel.checkpoint import load_weights, read_meta
from worldmodel.config import RunConfig, from_dict
from worldmodel.diffusion.flow import euler_sample, sigma_grid
from worldmodel.inference.generator import StreamingGenerator
from worldmodel.inference.host import to_host
from worldmodel.metrics import psnr, ssim
from worldmodel.models.autoencoder import Autoencoder
from worldmodel.models.dit import WorldDiT
from worldmodel.training.batches import decode_latents, encode_frames, float_to_frames, frames_to_float, normalize_pose

EULER_STAGES = ("teacher", "ar_diffusion")


class WindowedEulerGenerator:
    """Many-step generation for the teacher / AR model: Euler over `sigmas`, a sliding window, no cache.

    Same interface as StreamingGenerator (reset(frames, deltas), step(deltas) -> uint8 frames).
    """

    def __init__(self, dit: WorldDiT, autoencoder: Autoencoder, pose_stats: dict, *, mode: str, window: int,
                 sigmas: torch.Tensor, device: torch.device):
        self.dit, self.ae = dit.to(device).eval(), autoencoder.to(device).eval()
        self.pose_stats, self.mode, self.window, self.sigmas, self.device = pose_stats, mode, window, sigmas, device
        self.generator: torch.Generator | None = None

    @torch.no_grad()
    def reset(self, context_frames, context_deltas, generator: torch.Generator | None = None) -> None:
        frames = torch.as_tensor(np.asarray(context_frames)).to(self.device)
        self.z = encode_frames(self.ae, frames_to_float(frames), bf16=False)  # (B, T0, C, h, w)
        self.pose = normalize_pose(torch.as_tensor(np.asarray(context_deltas)).to(self.device), self.pose_stats)
        self.generator = generator

    @torch.no_grad()
    def step(self, deltas) -> torch.Tensor:
        pose_new = normalize_pose(torch.as_tensor(np.asarray(deltas)).to(self.device), self.pose_stats)
        ctx_z, ctx_pose = self.z[:, -(self.window - 1):], self.pose[:, -(self.window - 1):]
        pose = torch.cat([ctx_pose, pose_new[:, None]], 1)
        B, n = ctx_z.shape[:2]

        def v_fn(x: torch.Tensor, s: float) -> torch.Tensor:
            sigma = torch.zeros(B, n + 1, device=self.device)
            sigma[:, -1] = s
            v = self.dit(torch.cat([ctx_z, x[:, None]], 1), sigma, pose, mode=self.mode, block_size=1)
            return v[:, -1]

        eps = torch.randn(ctx_z[:, 0].shape, generator=self.generator, device=self.device)
        z_new = euler_sample(v_fn, eps, self.sigmas)
        self.z = torch.cat([self.z, z_new[:, None]], 1)[:, -self.window:]
        self.pose = torch.cat([self.pose, pose_new[:, None]], 1)[:, -self.window:]
        return float_to_frames(decode_latents(self.ae, z_new[:, None], bf16=False))[:, 0]


def load_heldout(data_dir: str | Path, episodes: int, length: int,
                 stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Held-out windows -> frames (N,L,H,W,3), deltas (N,L,5) (a window's first delta is the recorded one).

    stride None: the first `length` frames of up to `episodes` held-out episodes (shortened to the shortest
    episode). stride S: every window of exactly `length` frames starting every S frames of each episode."""
    from data_tools.poses import pose_deltas

    manifest = read_manifest(data_dir)
    held = [e for e in manifest["episodes"] if e.get("split") == "heldout"]
    if not held:
        raise ValueError(f"{data_dir} has no held-out episodes (manifest split 'heldout')")
    eps = [load_episode(data_dir, e, manifest) for e in held[:episodes]]
    if stride is None:
        length = min(length, min(len(e["frames"]) for e in eps))
        starts = [[0] for _ in eps]
    else:
        starts = [range(0, len(e["frames"]) - length + 1, stride) for e in eps]
        if not any(len(s) for s in starts):
            raise ValueError(f"held-out episodes of {data_dir} are shorter than one window of {length} frames")
    frames, deltas = [], []
    for ep, ss in zip(eps, starts):
        d = pose_deltas(ep["poses"])
        for s in ss:
            frames.append(ep["frames"][s:s + length])
            deltas.append(d[s:s + length])
    return np.stack(frames), np.stack(deltas)


def load_models(checkpoint: str | Path, autoencoder: str | Path, device: torch.device):
    meta = read_meta(checkpoint)
    cfg = from_dict(RunConfig, meta["config"])
    dit = WorldDiT(cfg.dit)
    load_weights(checkpoint, dit, {"dit": cfg.dit})
    ae = Autoencoder(cfg.autoencoder)
    load_weights(autoencoder, ae, {"autoencoder": cfg.autoencoder})
    if not meta.get("pose_stats"):
        raise ValueError(f"{checkpoint}: its metadata has no pose_stats; re-export it with worldmodel.train")
    return cfg, meta, dit.to(device).eval(), ae.to(device).eval()


@torch.no_grad()
def rollout(gen, frames: np.ndarray, deltas: np.ndarray, context: int, seed: int) -> tuple[np.ndarray, dict]:
    """Generate frames context..L-1 from the first `context` ground-truth frames -> (N, L-context, H, W, 3)."""
    device = gen.device
    g = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    gen.reset(frames[:, :context], deltas[:, :context], generator=g)
    out, times = [], []
    for i in range(context, frames.shape[1]):
        t = time.perf_counter()
        out.append(to_host(gen.step(torch.as_tensor(deltas[:, i]))).numpy())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    latency = {"first_frame_s": time.perf_counter() - t0 - sum(times[1:]), "batch": int(frames.shape[0]),
               "per_frame_s": float(np.mean(times[1:])) if len(times) > 1 else float(times[0])}
    latency["fps"] = latency["batch"] / latency["per_frame_s"]
    return np.stack(out, 1), latency


def score(pred: np.ndarray, truth: np.ndarray, recon: np.ndarray, last: np.ndarray, horizons: list[int]) -> dict:
    """Per horizon: mean PSNR/SSIM of pred, copy-last and AE reconstruction against the truth."""
    res = {}
    for h in horizons:
        if h > pred.shape[1]:
            continue
        gt = torch.from_numpy(truth[:, h - 1])
        row = {"n": int(gt.shape[0])}
        for name, x in (("model", pred[:, h - 1]), ("copy_last", last), ("ae_recon", recon[:, h - 1])):
            x = torch.from_numpy(x)
            row[f"{name}_psnr"] = float(psnr(x, gt).clamp(max=99).mean())
            row[f"{name}_ssim"] = float(ssim(x, gt).mean())
        res[str(h)] = row
    return res


def markdown(report: dict) -> str:
    lines = [f"# Fidelity: `{report['checkpoint']}` ({report['stage']}, step {report['step']})", "",
             f"{report['episodes']} held-out episodes, {report['context']} context frames, device {report['device']}.",
             "", "| sampler | h | PSNR | copy-last PSNR | SSIM | copy-last SSIM | AE-recon PSNR |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for h, m in r["horizons"].items():
            lines.append(f"| {r['sampler']} | {h} | {m['model_psnr']:.2f} | {m['copy_last_psnr']:.2f} | "
                         f"{m['model_ssim']:.3f} | {m['copy_last_ssim']:.3f} | {m['ae_recon_psnr']:.2f} |")
    lines += ["", "| sampler | first frame (s) | per frame (s) | frames/s (batch) |", "|---|---|---|---|"]
    for r in report["results"]:
        lat = r["latency"]
        lines.append(f"| {r['sampler']} | {lat['first_frame_s']:.3f} | {lat['per_frame_s']:.4f} | "
                     f"{lat['fps']:.1f} ({lat['batch']}) |")
    return "\n".join(lines) + "\n"


def evaluate(checkpoint: str | Path, autoencoder: str | Path, data_dir: str | Path, *, steps=(1, 2, 4),
             horizons=(1, 8, 32, 128), episodes: int = 8, context: int = 4, sampler: str = "auto",
             euler_steps: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
             first_frame_steps: int | None = None) -> dict[str, Any]:
    """Run the fidelity evaluation; returns the report dict (see `markdown` for the table).
    first_frame_steps: steps of the first generated frame (None: the checkpoint's generator config; 0: the
    same as the sampler's, so horizon 1 measures the few-step sampler itself)."""
    device = torch.device(device)
    cfg, meta, dit, ae = load_models(checkpoint, autoencoder, device)
    stats = meta["pose_stats"]
    horizons = sorted(horizons)
    frames, deltas = load_heldout(data_dir, episodes, context + max(horizons))
    if frames.shape[1] <= context:
        raise ValueError(f"held-out episodes have {frames.shape[1]} frames, need more than context={context}")
    truth = frames[:, context:]
    with torch.no_grad():
        x = frames_to_float(torch.from_numpy(truth).to(device))
        recon = float_to_frames(decode_latents(ae, encode_frames(ae, x, bf16=False), bf16=False)).cpu().numpy()
    last = frames[:, context - 1]
    stage = meta.get("stage", "")
    use_euler = sampler == "euler" or (sampler == "auto" and stage in EULER_STAGES)
    gens = []
    if use_euler:
        n = euler_steps or cfg.flow.grid_size
        mode = "bidirectional" if stage == "teacher" else "causal"
        gens.append((f"euler-{n} ({mode} window {cfg.data.clip_frames})",
                     WindowedEulerGenerator(dit, ae, stats, mode=mode, window=cfg.data.clip_frames,
                                            sigmas=sigma_grid(n, cfg.flow.shift), device=device)))
    else:
        for k in steps:
            first = cfg.generator.first_frame_steps if first_frame_steps is None else (first_frame_steps or k)
            gen_cfg = dataclasses.replace(cfg.generator, steps=k, block_size=1, first_frame_steps=first)
            gen = StreamingGenerator(dit, ae, stats, gen_cfg, cfg.flow, device=device)
            gens.append((f"{k}-step (first frame {gen_cfg.first_frame_steps})", gen))
    results = []
    for name, gen in gens:
        pred, latency = rollout(gen, frames, deltas, context, seed)
        results.append({"sampler": name, "horizons": score(pred, truth, recon, last, horizons), "latency": latency})
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"checkpoint": str(checkpoint), "stage": stage, "step": meta.get("step"), "device": dev_name,
            "episodes": int(frames.shape[0]), "context": context, "frames_per_episode": int(frames.shape[1]),
            "results": results}


def write_report(path: str | Path, report: dict, table: str) -> None:
    """The JSON report at `path`, its markdown table beside it (.md), and the table on stdout."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(table)
    print(table)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m worldmodel.eval", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="DiT weights: student, ar_diffusion or teacher .safetensors")
    p.add_argument("--autoencoder", required=True, help="autoencoder weights the DiT was trained on")
    p.add_argument("--data", required=True, help="data directory; its held-out episodes are used")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="few-step sampler step counts")
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--episodes", type=int, default=8, help="held-out episodes (one batch)")
    p.add_argument("--context", type=int, default=4, help="ground-truth frames before generation starts")
    p.add_argument("--sampler", choices=["auto", "few", "euler"], default="auto",
                   help="auto: Euler for teacher/ar_diffusion checkpoints, few-step otherwise")
    p.add_argument("--euler-steps", type=int, default=None, help="Euler steps per frame (default flow.grid_size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-frame-steps", type=int, default=None,
                   help="steps of the first generated frame (default: the checkpoint's generator.first_frame_steps; "
                        "0 = the sampler's own, so that h=1 measures it)")
    p.add_argument("--out", default="results.json", help="JSON report; a markdown table is written beside it (.md)")
    a = p.parse_args(argv)
    report = evaluate(a.checkpoint, a.autoencoder, a.data, steps=a.steps, horizons=a.horizons, episodes=a.episodes,
                      context=a.context, sampler=a.sampler, euler_steps=a.euler_steps, device=a.device, seed=a.seed,
                      first_frame_steps=a.first_frame_steps)
    write_report(a.out, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
