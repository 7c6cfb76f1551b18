"""Checkpoints: bit-exact round trip, atomic writes, and clear errors for bad files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from napari_staindiffuser.model import StainDiffuser
from napari_staindiffuser.model import checkpoint as ck
from napari_staindiffuser.training import EMA


def _trained(tiny_config):
    torch.manual_seed(0)
    model = StainDiffuser(tiny_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    ema = EMA(model, 0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(model, 5)
    return model, opt, ema


def test_round_trip_is_bit_exact(tmp_path, tiny_config):
    model, opt, ema = _trained(tiny_config)
    path = tmp_path / "m.safetensors"
    state = ck.TrainingState(
        step=17, train_config={"steps": 20}, model_state={}, optimizer_state=opt.state_dict()
    )
    ck.save_checkpoint(
        path, model, ema_state=ema.shadow, training=state, provenance={"data": "x", "seed": 3}
    )
    loaded = ck.load_checkpoint(path, with_training=True)
    assert loaded.config == tiny_config
    assert loaded.provenance == {"data": "x", "seed": 3}
    assert loaded.weights == "ema"
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ema.shadow[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.training.model_state[k]), k
    assert loaded.training.step == 17
    # optimizer state restores into a fresh optimizer and equals the original
    fresh = torch.optim.AdamW(StainDiffuser(tiny_config).parameters(), lr=1e-3)
    fresh.load_state_dict(loaded.training.optimizer_state)
    a, b = opt.state_dict(), fresh.state_dict()
    # betas come back as a list instead of a tuple: compare the JSON form
    dump = lambda groups: json.dumps(groups, sort_keys=True)  # noqa: E731
    assert dump(a["param_groups"]) == dump(b["param_groups"])
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])
    raw = ck.load_checkpoint(path, weights="model")
    for k, v in raw.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_inference_checkpoint_has_no_training_state(tmp_path, tiny_config):
    import os

    model, _, ema = _trained(tiny_config)
    path = ck.save_checkpoint(tmp_path / "m.safetensors", model, ema_state=ema.shadow)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    with pytest.raises(ValueError, match="inference-only"):
        ck.load_checkpoint(path, with_training=True)
    config, prov = ck.read_config(path)
    assert config == tiny_config and prov == {}


def test_atomic_write_keeps_old_file_on_failure(tmp_path, tiny_config, monkeypatch):
    model, _, _ = _trained(tiny_config)
    path = ck.save_checkpoint(tmp_path / "m.safetensors", model)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        ck.save_checkpoint(path, model, provenance={"new": True})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_truncated_checkpoint(tmp_path, tiny_config):
    model, _, _ = _trained(tiny_config)
    path = ck.save_checkpoint(tmp_path / "m.safetensors", model)
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"not a readable safetensors|truncated"):
            ck.load_checkpoint(bad)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a napari-staindiffuser checkpoint"):
        ck.load_checkpoint(path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": _Evil(str(marker))}))
    # sanity: unpickling it would create the marker
    with pytest.raises(ValueError, match="never loaded"):
        ck.load_checkpoint(path)
    assert not marker.exists()
    torch_file = tmp_path / "torch.pt"
    torch.save({"w": torch.zeros(1)}, torch_file)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ck.load_checkpoint(torch_file)


def test_wrong_architecture_is_named(tmp_path, tiny_config):
    model, _, _ = _trained(tiny_config)
    path = ck.save_checkpoint(tmp_path / "m.safetensors", model)
    meta = ck.read_metadata(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    # same file, config claiming a wider network
    cfg = json.loads(meta["config"])
    cfg["base_channels"] = 32
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="wrong shape"):
        ck.load_checkpoint(bad)
    # a config that is not valid
    cfg["channel_mults"] = [1, 2]
    bad2 = tmp_path / "bad2.safetensors"
    save_file(tensors, str(bad2), metadata={**meta, "config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="invalid model config"):
        ck.load_checkpoint(bad2)
    # tensors of another model entirely
    other = tmp_path / "other.safetensors"
    save_file({"model.foo": torch.zeros(1)}, str(other), metadata=meta)
    with pytest.raises(ValueError, match="missing"):
        ck.load_checkpoint(other)


def test_missing_and_future_files(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "nope.safetensors")
    model, _, _ = _trained(tiny_config)
    path = ck.save_checkpoint(tmp_path / "m.safetensors", model)
    meta = ck.read_metadata(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata={**meta, "format_version": "99"})
    with pytest.raises(ValueError, match="upgrade"):
        ck.load_checkpoint(future)
