"""Train one stage of the pipeline: `python -m worldmodel.train STAGE --config C --data DIR --out DIR`.

Thin: parses arguments, builds the dataset and the stage, and calls `worldmodel.training.loop.train`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from worldmodel.training.registry import STAGE_HELP, STAGES

EPILOG = "stages (run in this order; each writes OUT/<stage>.safetensors for the next):\n" + "\n".join(
    f"  {name:13s} {text}" for name, text in STAGE_HELP.items()
) + """

examples:
  python -m worldmodel.train autoencoder --config configs/default.yaml --data data/doom --out runs/ae --time-budget 480
  python -m worldmodel.train teacher --config configs/default.yaml --data data/doom --out runs/teacher \\
      stage.autoencoder=runs/ae/autoencoder.safetensors
  python -m worldmodel.train teacher ... --resume stage.steps=12000     # continue where it stopped
  torchrun --nproc_per_node 2 -m worldmodel.train teacher ...           # 2 GPUs, DDP; data.batch_size is global
See docs/TRAINING.md for every stage."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worldmodel.train", description=__doc__.split("\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=list(STAGES), help="which stage to train (see below)")
    p.add_argument("--config", required=True, help="YAML RunConfig (e.g. configs/default.yaml)")
    p.add_argument("--data", required=True, help="data directory (manifest.json + episodes/)")
    p.add_argument("--out", required=True, help="run directory: state.pt, <stage>.safetensors, metrics.jsonl")
    p.add_argument("--time-budget", type=float, default=None,
                   help="wall-clock seconds; stops cleanly with a checkpoint before it runs out")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt (same data/model config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this step (the lr schedule still uses stage.steps)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the networks over the GPUs (FSDP full-shard) instead of DDP; "
                        "the same as stage.fsdp=true")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides, e.g. stage.steps=2000")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Imported after parsing so `--help` is instant.
    from data_tools.shards import ClipDataset, read_manifest
    from worldmodel.config import load_config
    from worldmodel.training import distributed
    from worldmodel.training.loop import dist_info, seed_everything, train
    from worldmodel.training.registry import build_stage

    cfg = load_config(args.config, args.overrides + (["stage.fsdp=true"] if args.fsdp else []))
    manifest = read_manifest(args.data)
    if (manifest["frame_height"], manifest["frame_width"]) != (cfg.data.frame_height, cfg.data.frame_width):
        raise SystemExit(f"data {args.data} has {manifest['frame_height']}x{manifest['frame_width']} frames, config "
                         f"says data.frame_height/width={cfg.data.frame_height}x{cfg.data.frame_width}")
    # Under torchrun: join the process group first, so each rank builds its networks on its own GPU.
    device, started = distributed.setup(args.device)
    try:
        rank, _ = dist_info()
        seed_everything(cfg.seed)  # network initialisation is part of the run's seed (the same on every rank)
        dataset = ClipDataset(args.data, cfg.data.clip_frames, split="train")
        if args.stage == "causal_ode" and not cfg.stage.ode_pairs_dir:  # its stored trajectories live in the run
            cfg.stage.ode_pairs_dir = os.path.join(args.out, "ode_pairs")
        stage = build_stage(args.stage, cfg, device, manifest.get("pose_stats"))
        summary = train(stage, dataset, cfg, args.out, time_budget=args.time_budget, resume=args.resume,
                        device=device, max_steps=args.max_steps)
    finally:
        distributed.teardown(started)
    if rank == 0:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in summary["metrics"].items())
        print(f"{args.stage}: step {summary['step']}/{cfg.stage.steps} ({summary['stopped']}) in "
              f"{summary['seconds']:.0f}s; {metrics}\nweights: {summary['weights']}\nstate:   {summary['state']}")
        print(json.dumps({k: summary[k] for k in ("stage", "step", "stopped", "gpu_seconds", "peak_mem")}))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
