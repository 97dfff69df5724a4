"""Command-line arguments shared by the benchmarks that run a packaged world."""

from __future__ import annotations

import argparse


def world_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser for `python -m prog` (description and epilog from the module docstring) with the arguments
    every world benchmark takes: --world, --device, --dtype, --steps."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n")[0],
                                epilog=doc.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=None, help="world directory (default: the packaged worldmodel/weights/)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 / fp32 / ... (default: default_dtype(device))")
    p.add_argument("--steps", type=int, choices=(1, 2, 4), default=None, help="sampler steps (default: the world's)")
    return p
