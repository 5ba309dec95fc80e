"""Checkpoints: physical weights as safetensors + a JSON sidecar (config, provenance, checksum).

A checkpoint at stem ``.../step_100`` is two files: ``step_100.safetensors`` and ``step_100.json``.
The JSON is written last and carries the weights' sha256, so it doubles as a commit marker: a crash
mid-save leaves either the previous checkpoint or none, never one that loads with wrong weights.
Only physical weights are stored (tied or per-iteration views are not tensors of their own;
safetensors also refuses tensors that share memory).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from looplens.data.files import InvalidFileError, check_format, read_json
from looplens.data.provenance import atomic_write_bytes, atomic_write_text, provenance
from looplens.models.config import LoopedConfig
from safetensors.torch import load, save

# Bump FORMAT_VERSION when a change breaks readers of older checkpoints; loading refuses other
# versions, naming the looplens that wrote the file (the sidecar's provenance).
FORMAT_PREFIX = "looplens-checkpoint-v"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_PREFIX}{FORMAT_VERSION}"


def _stem(path: str | Path) -> Path:
    """A directory means ``DIR/model``; ``X.safetensors`` / ``X.json`` mean stem ``X``; else a stem."""
    path = Path(path)
    if path.is_dir():
        return path / "model"
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix("")
    return path


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) paths of the checkpoint at ``path`` (a directory, a stem or either file)."""
    stem = _stem(path)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(model, path: str | Path, **meta: Any) -> Path:
    """Write ``model``'s weights and sidecar atomically at stem ``path``; returns the weights' path.

    ``meta`` is recorded as given (the trainer passes step, seed, dataset_checksum, ...).
    """
    weights_path, sidecar_path = checkpoint_files(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(state)
    vocab = getattr(model, "vocab", None)
    sidecar = {
        "format": FORMAT,
        "config": model.cfg.to_dict(),
        "weights_file": weights_path.name,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "tensors": {k: list(v.shape) for k, v in state.items()},
        "vocab": None if vocab is None else {"n_entities": vocab.n_entities, "n_relations": vocab.n_relations},
        "provenance": provenance(),
        **meta,
    }
    atomic_write_bytes(weights_path, blob)
    atomic_write_text(sidecar_path, json.dumps(sidecar, indent=2, sort_keys=True, default=str))
    return weights_path


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a checkpoint, with a clear error when missing or unreadable."""
    weights_path, sidecar_path = checkpoint_files(path)
    if not sidecar_path.exists():
        raise FileNotFoundError(f"checkpoint {sidecar_path.with_suffix('')}: no {sidecar_path.name} (not a looplens checkpoint, or its save did not finish)")
    sidecar = read_json(sidecar_path, "checkpoint sidecar")
    check_format(sidecar_path, sidecar, FORMAT_PREFIX, FORMAT_VERSION, "checkpoint")
    for key, kind in (("config", dict), ("weights_sha256", str), ("tensors", dict)):
        if not isinstance(sidecar.get(key), kind):
            raise InvalidFileError(sidecar_path, f"checkpoint sidecar has no valid {key!r} (truncated or edited?)")
    return sidecar


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", **expect: Any):
    """Load and verify a checkpoint; ``expect`` pins sidecar fields (e.g. dataset_checksum=...).

    Raises ValueError / FileNotFoundError naming the file and the mismatch: missing files, a changed
    weights file (sha256), config keys, tensor names or shapes that do not match the architecture.
    """
    from looplens.models.looped import LoopedTransformer

    weights_path, sidecar_path = checkpoint_files(path)
    sidecar = read_sidecar(path)
    if not weights_path.exists():
        raise FileNotFoundError(f"checkpoint {weights_path} is missing (its sidecar {sidecar_path.name} exists)")
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != sidecar["weights_sha256"]:
        raise InvalidFileError(weights_path, f"sha256 mismatch with its sidecar ({len(blob):,} bytes): the weights "
                                             "file is truncated, corrupted or was changed after saving")
    for key, want in expect.items():
        if sidecar.get(key) != want:
            raise ValueError(f"checkpoint {sidecar_path}: {key} is {sidecar.get(key)!r}, expected {want!r}")
    try:
        cfg = LoopedConfig.from_dict(sidecar["config"])
    except (TypeError, ValueError) as err:
        raise InvalidFileError(sidecar_path, f"invalid model config: {err}") from None
    model = LoopedTransformer(cfg)
    try:
        state = load(blob)
    except Exception as err:  # safetensors raises its own SafetensorError on a bad header
        raise InvalidFileError(weights_path, f"not a safetensors file ({err})") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {weights_path} does not match its config: missing tensors {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"checkpoint {weights_path}: tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    if sidecar.get("vocab"):
        from looplens.data import Vocab

        model.vocab = Vocab(**sidecar["vocab"])
    model.checkpoint_meta = sidecar
    return model.to(device).eval()
