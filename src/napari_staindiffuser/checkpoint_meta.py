"""Checkpoint metadata without torch: format check, config, provenance, the bundled model.

The GUI lists models and shows their summaries through this module, so opening the staining
dock does not import torch. Loading weights is :mod:`napari_staindiffuser.model.checkpoint`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from . import __version__
from .config import ModelConfig

FORMAT = "napari-staindiffuser.checkpoint"
FORMAT_VERSION = 1


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a checkpoint, validated, without reading any tensor.

    Raises ``ValueError`` naming the problem for a missing, truncated, non-safetensors (e.g. a
    pickle) or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint (truncated, corrupt, or another "
            f"format such as a pickle, which is never loaded): {exc}"
        ) from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a napari-staindiffuser checkpoint "
            f"(metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r})"
        )
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses checkpoint format {version}; this napari-staindiffuser "
            f"({__version__}) reads up to {FORMAT_VERSION}: upgrade the plugin"
        )
    for key in ("config", "provenance"):
        if key not in meta:
            raise ValueError(f"{path} is missing the {key!r} metadata; the file is damaged")
    return meta


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """Model config and provenance of a checkpoint, cheaply (for model lists and summaries)."""
    meta = read_metadata(path)
    try:
        config = ModelConfig.from_json(meta["config"])
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has an invalid model config: {exc}") from None
    return config, json.loads(meta["provenance"])


BUNDLED_MODEL = "staindiffuser-demo.safetensors"
# its progressive-distillation student, sampling in 4 DDIM steps at parity (docs/distillation.md)
BUNDLED_DISTILLED = "staindiffuser-demo-distilled.safetensors"


def bundled_model_path(distilled: bool = False) -> Path:
    """Path of a demo model shipped in the package (``napari_staindiffuser/data``): the trained
    model (the one to fine-tune or distil), or with ``distilled`` its distilled student."""
    from importlib import resources

    name = BUNDLED_DISTILLED if distilled else BUNDLED_MODEL
    path = Path(str(resources.files("napari_staindiffuser.data").joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled model {name} is missing from the installation ({path}); pass a checkpoint"
        )
    return path


def default_model_path() -> Path:
    """The model that staining uses when none is given: the bundled distilled model (4 DDIM
    steps, at quality parity with 1000-step DDPM), else the bundled model."""
    try:
        return bundled_model_path(distilled=True)
    except FileNotFoundError:
        return bundled_model_path()


def model_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file (for provenance), first 16 hex digits."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
