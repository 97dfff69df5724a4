"""Checkpoints: shipped weights (safetensors + a JSON of provenance) and full training states.

Two kinds, one job each:
- weights: `PATH.safetensors` + `PATH.json` (config, stage, step, data manifest hash, metrics, ...).
  Loading checks the config the caller expects against the one stored and names every mismatch.
  A large file may instead be stored as `PATH.safetensors.part000, part001, ...` (at most PART_BYTES
  each, whose concatenation is the file): a 16 MiB limit per file holds where the weights travel (git, a
  lent GPU's returned files). Reading joins the parts when the whole file is absent.
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
from safetensors.torch import load, load_file, save
from torch import nn

from worldmodel.config import diff_configs


PART_BYTES = 15 * 2**20  # a part stays under the 16 MiB a transported or tracked file may have


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


def _part(st_path: Path, i: int) -> Path:
    return st_path.with_name(f"{st_path.name}.part{i:03d}")


def part_paths(path: str | Path) -> list[Path]:
    """The existing PATH.safetensors.part000, part001, ... in order (gaps included as found)."""
    st_path, _ = weights_paths(path)
    return sorted(st_path.parent.glob(st_path.name + ".part[0-9][0-9][0-9]"))


def weights_exist(path: str | Path) -> bool:
    """PATH.safetensors is there, whole or as parts."""
    st_path, _ = weights_paths(path)
    return st_path.is_file() or _part(st_path, 0).is_file()


def write_parts(path: str | Path, data: bytes, part_bytes: int = PART_BYTES) -> list[Path]:
    """`data` as PATH.safetensors.part000, ... of at most `part_bytes` each (each written atomically);
    parts left over from a longer earlier file are removed. A whole PATH.safetensors is left as it is."""
    st_path, _ = weights_paths(path)
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be >= 1, got {part_bytes}")
    written = []
    for i in range(0, len(data), part_bytes):
        part = _part(st_path, i // part_bytes)
        _atomic_write(part, lambda tmp, chunk=data[i:i + part_bytes]: Path(tmp).write_bytes(chunk))
        written.append(part)
    for stale in part_paths(st_path)[len(written):]:
        stale.unlink()
    return written


def remove_parts(path: str | Path) -> None:
    for part in part_paths(path):
        part.unlink()


def remove_weights(path: str | Path) -> None:
    """Delete PATH.safetensors (whole and parts) and PATH.json, whichever exist."""
    st_path, json_path = weights_paths(path)
    remove_parts(st_path)
    st_path.unlink(missing_ok=True)
    json_path.unlink(missing_ok=True)


def read_parts(path: str | Path) -> bytes:
    """The bytes of PATH.safetensors joined from its parts; an error names a missing part."""
    st_path, _ = weights_paths(path)
    parts = part_paths(st_path)
    if not parts:
        raise CheckpointError(f"checkpoint {st_path} does not exist (whole or as {_part(st_path, 0).name}, ...)")
    gaps = sorted({_part(st_path, i) for i in range(int(parts[-1].name[-3:]) + 1)} - set(parts))
    if gaps:
        raise CheckpointError(f"checkpoint {st_path} is split into parts but {', '.join(p.name for p in gaps)} "
                              "is missing; re-export or re-download it")
    return b"".join(p.read_bytes() for p in parts)


def join_weights(path: str | Path) -> Path:
    """Write PATH.safetensors whole (atomically) from its parts, which stay; for readers of one file."""
    st_path, _ = weights_paths(path)
    data = read_parts(st_path)
    _atomic_write(st_path, lambda tmp: Path(tmp).write_bytes(data))
    return st_path


def save_weights(
    path: str | Path,
    weights: nn.Module | dict[str, torch.Tensor],
    meta: dict[str, Any],
    dtype: torch.dtype | None = torch.bfloat16,
    part_bytes: int | None = None,
) -> Path:
    """Write weights as safetensors (floating tensors cast to `dtype`) and `meta` as JSON beside them.

    part_bytes: a file larger than this is written as PATH.safetensors.partNNN pieces instead of the whole
    file (read_tensors joins them); None: always whole. Whichever form is not written is removed, so a stale
    copy never shadows the new one.
    """
    st_path, json_path = weights_paths(path)
    tensors = weights.state_dict() if isinstance(weights, nn.Module) else weights
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    data = save(out)
    if part_bytes is not None and len(data) > part_bytes:
        write_parts(st_path, data, part_bytes)
        st_path.unlink(missing_ok=True)  # read_tensors prefers the whole file
    else:
        _atomic_write(st_path, lambda tmp: Path(tmp).write_bytes(data))
        remove_parts(st_path)
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
    """The tensors of PATH.safetensors, or of its parts joined where the whole file is absent."""
    st_path, _ = weights_paths(path)
    if st_path.is_file():
        where, read = st_path, lambda: load_file(str(st_path))
    elif part_paths(st_path):
        data = read_parts(st_path)
        where, read = f"{st_path} (joined from {len(part_paths(st_path))} parts)", lambda: load(data)
    else:
        raise CheckpointError(f"checkpoint {st_path} does not exist")
    try:
        return read()
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {where} is corrupt or truncated ({err}); re-export or re-download it") from None


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
