"""Checkpoints: shipped weights (safetensors + a JSON of provenance) and full training states.

Two kinds, one job each:
- weights: `PATH.safetensors` + `PATH.json` (config, stage, step, data manifest hash, metrics, ...).
  Loading checks the config the caller expects against the one stored and names every mismatch.
- training state: one `torch.save` file holding everything needed to resume (models, EMA,
  optimisers, step, RNG, data position, resolved config).
Both are written to a temporary file in the same directory and renamed, so a crash mid-write never
leaves a half-written checkpoint under the real name (the previous one survives).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from worldmodel.config import diff_configs


class CheckpointError(RuntimeError):
    pass


def _atomic_write(path: Path, write_fn) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Checkpoints get the umask's permissions: safetensors' writer (like mkstemp) creates 0600 files.
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def weights_paths(path: str | Path) -> tuple[Path, Path]:
    """(PATH.safetensors, PATH.json) for a path given with or without the suffix."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_weights(
    path: str | Path,
    weights: nn.Module | dict[str, torch.Tensor],
    meta: dict[str, Any],
    dtype: torch.dtype | None = torch.bfloat16,
) -> Path:
    """Write weights as safetensors (floating tensors cast to `dtype`) and `meta` as JSON beside them."""
    st_path, json_path = weights_paths(path)
    tensors = weights.state_dict() if isinstance(weights, nn.Module) else weights
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    _atomic_write(st_path, lambda tmp: save_file(out, tmp))
    _atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, default=str)))
    return st_path


def read_meta(path: str | Path) -> dict[str, Any]:
    _, json_path = weights_paths(path)
    if not json_path.is_file():
        raise CheckpointError(f"checkpoint metadata {json_path} is missing (every .safetensors has a .json beside it)")
    try:
        return json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint metadata {json_path} is not valid JSON: {err}") from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    st_path, _ = weights_paths(path)
    if not st_path.is_file():
        raise CheckpointError(f"checkpoint {st_path} does not exist")
    try:
        return load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {st_path} is corrupt or truncated ({err}); re-export or re-download it") from None


def check_config(path: str | Path, meta: dict[str, Any], expected: dict[str, Any] | None) -> None:
    """Raise naming each field where the stored config differs from `expected` (a sub-dict of RunConfig)."""
    if not expected:
        return
    stored = meta.get("config", {})
    problems = []
    for section, want in expected.items():
        have = stored.get(section)
        if have is None:
            problems.append(f"{section}: missing in checkpoint")
            continue
        problems += [f"{section}.{d}" for d in diff_configs(want, have)]
    if problems:
        st_path, _ = weights_paths(path)
        raise CheckpointError(
            f"checkpoint {st_path} does not match the config (checkpoint != config): " + "; ".join(problems)
        )


def load_weights(
    path: str | Path,
    module: nn.Module,
    expected_config: dict[str, Any] | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Load weights into `module` (cast to its dtype), after checking the stored config; returns the meta.

    `expected_config` maps RunConfig sections to dicts/dataclasses, e.g. {"dit": cfg.dit}.
    `prefix` selects the tensors stored under `prefix.` (several modules in one file).
    """
    meta = read_meta(path)
    check_config(path, meta, expected_config)
    tensors = read_tensors(path)
    if prefix:
        tensors = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shape_errors = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} != model {tuple(own[k].shape)}"
        for k in set(own) & set(tensors)
        if tensors[k].shape != own[k].shape
    ]
    if missing or unexpected or shape_errors:
        st_path, _ = weights_paths(path)
        raise CheckpointError(
            f"checkpoint {st_path} does not fit {type(module).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shapes {shape_errors[:5]}"
        )
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    return meta


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    _atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} does not exist; start without --resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for a truncated zip
        raise CheckpointError(f"training state {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
