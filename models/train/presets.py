"""Named training presets: TOML files shipped in ``models/presets/`` (package data).

A preset file is a TrainConfig TOML ([data], [model], [optim], ...) with three top-level keys of its
own: ``summary`` (one line, shown by ``looplens train --list-presets``), ``description`` (what the
preset shows and what it cannot) and optionally ``extends = "other-preset"``, whose tables it
updates key by key.

>>> "tiny-composition" in preset_names()
True
>>> preset("paper-composition-code").optim.batch_size
128
"""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from looplens.models.train.config import TrainConfig

_META_KEYS = ("summary", "description", "extends")


def _preset_dir():
    return resources.files("looplens.models.presets")


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".toml")] for p in _preset_dir().iterdir() if p.name.endswith(".toml"))


def preset_dict(name: str) -> dict[str, Any]:
    """The preset's tables merged over its ``extends`` chain, meta keys included."""
    names = preset_names()
    if name not in names:
        raise ValueError(f"--preset {name!r}: unknown preset; available: {', '.join(names)}")
    d = tomllib.loads((_preset_dir() / f"{name}.toml").read_text(encoding="utf-8"))
    base_name = d.get("extends")
    if base_name is None:
        return d
    if base_name == name:
        raise ValueError(f"preset {name!r} extends itself")
    base = preset_dict(base_name)
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items() if k != "extends"}
    for key, value in d.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    return merged


def preset(name: str) -> TrainConfig:
    """The TrainConfig of a named preset."""
    d = preset_dict(name)
    return TrainConfig.from_dict({k: v for k, v in d.items() if k not in _META_KEYS})


def preset_summaries() -> dict[str, str]:
    """name -> one-line summary, for every preset."""
    return {name: " ".join(str(preset_dict(name).get("summary", "")).split()) for name in preset_names()}


def preset_description(name: str) -> str:
    return str(preset_dict(name).get("description", "")).strip()
