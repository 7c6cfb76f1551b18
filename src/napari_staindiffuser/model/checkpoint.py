"""Checkpoints: one safetensors file with the JSON config in its metadata. Nothing is unpickled.

Layout of a checkpoint file
---------------------------
tensors
    ``ema.<param>``    EMA weights, used for sampling (absent if the run had no EMA);
    ``model.<param>``  raw weights (training checkpoints; inference-only exports omit them when
                       EMA weights exist);
    ``optim.<i>.<k>``  AdamW state tensor ``k`` of parameter ``i`` (training checkpoints only).
metadata (all strings)
    ``format`` = "napari-staindiffuser.checkpoint", ``format_version``, ``package_version``,
    ``config`` (ModelConfig JSON: architecture, stains, patch size, µm/px, schedule),
    ``provenance`` (JSON: training steps, data description, seed, ...),
    ``train`` (JSON, training checkpoints only: step, TrainConfig, optimizer param groups).

Files are written atomically (temporary file in the same folder, fsync, rename), so a crash or a
full disk never leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from ..checkpoint_meta import (
    FORMAT,
    FORMAT_VERSION,
    bundled_model_path,
    default_model_path,
    model_hash,
    read_config,
    read_metadata,
)
from ..config import ModelConfig
from .staindiffuser import StainDiffuser

__all__ = ["FORMAT", "FORMAT_VERSION", "read_config", "read_metadata"]
__all__ += ["bundled_model_path", "default_model_path", "export_checkpoint", "load_checkpoint"]
__all__ += ["model_hash"]
__all__ += ["Checkpoint", "TrainingState", "save_checkpoint"]


@dataclass
class TrainingState:
    """What a training run needs to continue exactly where it stopped."""

    step: int
    train_config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    ema_state: dict[str, torch.Tensor] | None = None


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (weights for sampling), its config and its history."""

    model: StainDiffuser
    config: ModelConfig
    provenance: dict[str, Any]
    path: Path
    package_version: str
    weights: str  # "ema" or "model": which weights ``model`` holds
    training: TrainingState | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and not path.is_file():
        raise ValueError(f"cannot write checkpoint {path}: it exists and is not a regular file")
    if not folder.is_dir():
        raise ValueError(f"cannot write checkpoint {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except Exception as exc:  # safetensors reports a full disk as SafetensorError
            if isinstance(exc, OSError):
                raise
            raise OSError(f"cannot write checkpoint {path}: {exc}") from exc
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is a normal file
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _plain(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    path: str | os.PathLike,
    model: StainDiffuser,
    *,
    ema_state: dict[str, torch.Tensor] | None = None,
    training: TrainingState | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and optionally its EMA weights and training state) atomically.

    Parameters
    ----------
    path : path-like
        Destination ``.safetensors`` file; replaced atomically if it exists.
    model : StainDiffuser
        Its current weights are stored as ``model.*`` when ``training`` is given or when there is
        no EMA; its config is stored as JSON.
    ema_state : dict, optional
        EMA weights (same keys as ``model.state_dict()``), stored as ``ema.*``.
    training : TrainingState, optional
        Makes a resumable training checkpoint (raw weights, optimizer state, step).
    provenance : dict, optional
        JSON-serialisable description of how the weights were made.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "package_version": __version__,
        "config": model.config.to_json(),
        "provenance": json.dumps(provenance or {}, sort_keys=True, default=str),
    }
    if ema_state is not None:
        tensors.update(_plain(ema_state, "ema"))
    if training is not None or ema_state is None:
        tensors.update(_plain(model.state_dict(), "model"))
    if training is not None:
        train_meta: dict[str, Any] = {"step": training.step, "train_config": training.train_config}
        if training.optimizer_state is not None:
            opt = training.optimizer_state
            scalars: dict[str, dict[str, Any]] = {}
            for i, st in opt["state"].items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"optim.{i}.{k}"] = v.detach().to("cpu").contiguous().clone()
                    else:
                        scalars.setdefault(str(i), {})[k] = v
            train_meta["optimizer"] = {"param_groups": opt["param_groups"], "scalars": scalars}
        meta["train"] = json.dumps(train_meta, sort_keys=True)
    _atomic_save(tensors, meta, path)
    return path


def _load_into(module: StainDiffuser, state: dict[str, torch.Tensor], path: Path, what: str):
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with the wrong shape (e.g. {k}: file {tuple(state[k].shape)}, "
                f"model {tuple(expected[k].shape)})"
            )
        raise ValueError(
            f"{path}: the {what} weights do not match the architecture in its config: "
            + "; ".join(parts)
        )
    module.load_state_dict(state, strict=True)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    weights: str = "ema",
    with_training: bool = False,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    weights : {"ema", "model"}
        Which weights to put in ``Checkpoint.model``; each falls back to the other kind when the
        file holds only one (``Checkpoint.weights`` says which was loaded).
    with_training : bool
        Also return the :class:`TrainingState` (``ValueError`` if the file has none).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model'; got {weights!r}")
    path = Path(path)
    meta = read_metadata(path)
    config, provenance = read_config(path)
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "optim": {}}
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                prefix, _, rest = name.partition(".")
                if prefix not in groups:
                    raise ValueError(f"{path}: unexpected tensor {name!r} in checkpoint")
                groups[prefix][rest] = fh.get_tensor(name)
    except SafetensorError as exc:
        raise ValueError(f"{path}: cannot read tensors (truncated or corrupt): {exc}") from None

    model = StainDiffuser(config)
    # the requested weights, else the other kind (an exported file holds only EMA weights)
    use = weights if groups[weights] else ("model" if weights == "ema" else "ema")
    if not groups[use]:
        raise ValueError(f"{path} holds no {use} weights")
    _load_into(model, groups[use], path, use)
    model.to(map_location)
    # a distilled checkpoint's own sampler and steps: the default of sampling.resolve_sampling
    model.sampling_defaults = provenance.get("sampling")

    training = None
    if with_training:
        if "train" not in meta or not groups["model"]:
            raise ValueError(f"{path} is an inference-only checkpoint: it cannot resume training")
        train_meta = json.loads(meta["train"])
        optimizer_state = None
        if "optimizer" in train_meta:
            state: dict[int, dict[str, Any]] = {}
            for name, tensor in groups["optim"].items():
                i, _, k = name.partition(".")
                state.setdefault(int(i), {})[k] = tensor
            for i, extra in train_meta["optimizer"]["scalars"].items():
                state.setdefault(int(i), {}).update(extra)
            optimizer_state = {
                "state": state,
                "param_groups": train_meta["optimizer"]["param_groups"],
            }
        training = TrainingState(
            step=int(train_meta["step"]),
            train_config=train_meta["train_config"],
            model_state=groups["model"],
            optimizer_state=optimizer_state,
            ema_state=groups["ema"] or None,
        )
    return Checkpoint(
        model=model,
        config=config,
        provenance=provenance,
        path=path,
        package_version=meta.get("package_version", "?"),
        weights=use,
        training=training,
        metadata=meta,
    )


def export_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    timesteps: Sequence[int] | None = None,
    half: bool = False,
) -> Path:
    """Write an inference-only copy of ``src``: EMA (or raw) weights, config and provenance.

    ``timesteps`` makes DDIM on that explicit grid (strictly decreasing training timesteps) the
    copy's default sampler (provenance ``sampling``, see ``sampling.resolve_sampling``); for a
    distilled model the grid must be points of its own grid, the only timesteps it was trained
    at. ``half`` stores the weights as float16 (loading casts them back to float32).
    """
    ckpt = load_checkpoint(src, weights="ema")
    prov = {**ckpt.provenance, "exported_from": Path(src).name, "weights": ckpt.weights}
    if timesteps is not None:
        from ..diffusion import custom_timesteps

        n_train = ckpt.config.schedule.num_train_timesteps
        ts = custom_timesteps(list(timesteps), n_train, len(timesteps)).tolist()
        own = (ckpt.provenance.get("sampling") or {}).get("timesteps")
        if own is not None and not set(ts) <= set(own):
            raise ValueError(
                f"{Path(src).name} is distilled for the grid {own}: pick timesteps among its "
                f"points; got {ts}"
            )
        prov["sampling"] = {"sampler": "ddim", "steps": len(ts), "spacing": "custom",
                            "timesteps": ts}  # fmt: skip
        if own is not None:
            prov["sampling"]["subset_of"] = own
    state = ckpt.model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return save_checkpoint(dst, ckpt.model, ema_state=state, provenance=prov)


def derive_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    add_stains: tuple[str, ...] | list[str] = (),
    **config_changes: Any,
) -> Path:
    """Write to ``dst`` the EMA weights of ``src`` under a changed config: a starting point
    for fine-tuning (see :func:`~napari_staindiffuser.model.staindiffuser.with_config`).

    ``add_stains`` appends stains (new branches copied from the first stain's), with loss
    weights 1; ``config_changes`` are :class:`ModelConfig` fields (``lambda_gen``,
    ``aux_target``, ``image_size``, ...). ``ValueError`` when the change cannot be carried.
    """
    from .staindiffuser import with_config

    ckpt = load_checkpoint(src, weights="ema")
    cfg = ckpt.config
    known = {s.lower() for s in cfg.stains}
    new = [s for s in dict.fromkeys(add_stains) if s.lower() not in known]
    if new:
        n = len(new)
        cfg = cfg.replace(
            stains=cfg.stains + tuple(new),
            lambda_gen=cfg.lambda_gen + (1.0,) * n,
            lambda_aux=cfg.lambda_aux + (1.0,) * n,
        )
    cfg = cfg.replace(**config_changes) if config_changes else cfg
    model = with_config(ckpt.model, cfg)
    prov = {**ckpt.provenance, "derived_from": Path(src).name}
    if new:
        prov["added_stains"] = new
    return save_checkpoint(dst, model, ema_state=model.state_dict(), provenance=prov)
