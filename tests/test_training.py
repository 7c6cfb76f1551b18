"""Training: the masked multi-stain loss, overfitting, events, stop and exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_staindiffuser.config import TrainConfig, preset
from napari_staindiffuser.events import CheckpointSaved, Finished, TrainStep, Validation
from napari_staindiffuser.model import StainDiffuser
from napari_staindiffuser.model.checkpoint import load_checkpoint
from napari_staindiffuser.pairs import make_batch
from napari_staindiffuser.training import (
    EMA,
    TrainControl,
    diffusion_losses,
    iter_train,
    make_schedule,
)

from conftest import blob_pairs


def _tensors(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def test_tiny_model_overfits_one_batch():
    cfg = preset("tiny", image_size=16, stains=("CD3",))
    torch.manual_seed(0)
    model = StainDiffuser(cfg)
    schedule = make_schedule(cfg)
    pairs = blob_pairs(4, size=16, stains=("CD3",))
    batch = _tensors(make_batch(pairs, image_size=16, stains=cfg.stains, need_mask=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        gen = torch.Generator().manual_seed(1234)  # the same t and noise every step
        total, _ = diffusion_losses(model, schedule, batch, gen)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


def test_masked_loss_trains_only_the_samples_stain(tiny_config):
    model = StainDiffuser(tiny_config)
    for branch in (*model.gen.values(), *model.aux.values()):  # undo the zero init
        torch.nn.init.normal_(branch.conv_out.weight, std=0.02)
    schedule = make_schedule(tiny_config)
    only_cd3 = [s for s in blob_pairs(4) if s.stain == "CD3"]
    batch = _tensors(make_batch(only_cd3, image_size=32, stains=tiny_config.stains))
    total, parts = diffusion_losses(model, schedule, batch, torch.Generator().manual_seed(0))
    assert set(parts) == {"gen/CD3", "aux/CD3"}
    total.backward()
    for name in ("CK8_18",):
        assert all(p.grad is None for p in model.gen[name].parameters())
        assert all(p.grad is None for p in model.aux[name].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_mixed_batch_loss_is_weighted_per_sample(tiny_config):
    """L = (1/B) sum_b lambda[s_b] L(b): doubling CD3's weight doubles exactly its share."""
    cfg1 = tiny_config
    cfg2 = tiny_config.replace(lambda_gen=(2.0, 1.0), lambda_aux=(2.0, 1.0))
    torch.manual_seed(0)
    m1 = StainDiffuser(cfg1)
    m2 = StainDiffuser(cfg2)
    m2.load_state_dict(m1.state_dict())
    for p in m1.parameters():  # make outputs non-zero
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    m2.load_state_dict(m1.state_dict())
    batch = _tensors(make_batch(blob_pairs(4), image_size=32, stains=cfg1.stains))
    sched = make_schedule(cfg1)
    t1, p1 = diffusion_losses(m1, sched, batch, torch.Generator().manual_seed(3))
    t2, _ = diffusion_losses(m2, sched, batch, torch.Generator().manual_seed(3))
    # two samples per stain in a batch of four
    cd3 = (p1["gen/CD3"] + p1["aux/CD3"]) * 2 / 4
    torch.testing.assert_close(t2 - t1, cd3, rtol=1e-4, atol=1e-6)


def test_ema_warmup():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.999)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(100_000) == 0.999
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 0)  # decay 0.1: 90% of the new value
    expected = 0.1 * ema.shadow["bias"] + 0.0  # bias unchanged, weight moves towards 1
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 2), 1.0), atol=0.2)
    assert expected.shape == (2,)


def _train_cfg(**kw):
    base = dict(steps=4, batch_size=2, lr=1e-3, warmup_steps=2, seed=7, val_batches=1)
    base.update(kw)
    return TrainConfig(**base)


def test_iter_train_events_and_checkpoint(tmp_path, tiny_config, pairs):
    out = tmp_path / "m.safetensors"
    events = list(
        iter_train(
            _train_cfg(val_every=2, checkpoint_every=2),
            pairs,
            model_config=tiny_config,
            val_source=pairs,
            out=out,
            device="cpu",
        )
    )
    steps = [e for e in events if isinstance(e, TrainStep)]
    assert [e.step for e in steps] == [1, 2, 3, 4]
    assert {"total", "gen/CD3", "aux/CD3", "gen/CK8/18", "aux/CK8/18"} >= set(steps[0].losses)
    assert all(np.isfinite(e.losses["total"]) and e.it_per_s > 0 for e in steps)
    assert steps[0].lr == pytest.approx(5e-4) and steps[-1].lr == pytest.approx(1e-3)
    vals = [e for e in events if isinstance(e, Validation)]
    assert [v.step for v in vals] == [2, 4]
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [(s.step, s.reason) for s in saved] == [(2, "interval"), (4, "end")]
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    ckpt = load_checkpoint(out, with_training=True)
    assert ckpt.training.step == 4 and ckpt.weights == "ema"
    assert ckpt.provenance["steps"] == 4 and "blob pairs" in ckpt.provenance["data"]
    assert not list(tmp_path.glob("*.tmp"))


def test_stop_saves_checkpoint_and_resume_is_exact(tmp_path, tiny_config, pairs):
    # reference: 4 uninterrupted steps
    ref = tmp_path / "ref.safetensors"
    list(iter_train(_train_cfg(), pairs, model_config=tiny_config, out=ref, device="cpu"))

    # stopped after 2 steps, then resumed to 4
    part = tmp_path / "part.safetensors"
    control = TrainControl()
    events = []
    for ev in iter_train(
        _train_cfg(), pairs, model_config=tiny_config, out=part, device="cpu", control=control
    ):
        events.append(ev)
        if isinstance(ev, TrainStep) and ev.step == 2:
            control.request_stop()
    assert isinstance(events[-1], Finished) and events[-1].stopped
    assert [(e.step, e.reason) for e in events if isinstance(e, CheckpointSaved)] == [(2, "stop")]
    resumed = list(iter_train(_train_cfg(), pairs, resume=part, out=part, device="cpu"))
    assert [e.step for e in resumed if isinstance(e, TrainStep)] == [3, 4]

    a = load_checkpoint(ref, with_training=True)
    b = load_checkpoint(part, with_training=True)
    assert a.training.step == b.training.step == 4
    for name, tensor in a.training.model_state.items():
        assert torch.equal(tensor, b.training.model_state[name]), name
    for name, tensor in a.training.ema_state.items():
        assert torch.equal(tensor, b.training.ema_state[name]), name
    for i, state in a.training.optimizer_state["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b.training.optimizer_state["state"][i][k])


def test_resume_is_exact_with_dropout_and_validation(tmp_path, pairs):
    cfg = preset("tiny", image_size=32, dropout=0.3)
    kw = dict(val_source=pairs, device="cpu")
    ref = tmp_path / "ref.safetensors"
    list(iter_train(_train_cfg(val_every=1), pairs, model_config=cfg, out=ref, **kw))
    part = tmp_path / "part.safetensors"
    list(iter_train(_train_cfg(steps=2, val_every=1), pairs, model_config=cfg, out=part, **kw))
    list(iter_train(_train_cfg(val_every=1), pairs, resume=part, out=part, **kw))
    a = load_checkpoint(ref, with_training=True).training.model_state
    b = load_checkpoint(part, with_training=True).training.model_state
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_resume_refuses_to_go_backwards(tmp_path, tiny_config, pairs):
    out = tmp_path / "m.safetensors"
    list(iter_train(_train_cfg(steps=2), pairs, model_config=tiny_config, out=out, device="cpu"))
    with pytest.raises(ValueError, match="already at step 2"):
        list(iter_train(_train_cfg(steps=2), pairs, resume=out, device="cpu"))


def test_fine_tune_from_init_changes_weights(tmp_path, tiny_config, pairs):
    base = tmp_path / "base.safetensors"
    list(iter_train(_train_cfg(steps=1), pairs, model_config=tiny_config, out=base, device="cpu"))
    tuned = tmp_path / "tuned.safetensors"
    list(iter_train(_train_cfg(steps=2), pairs, init=base, out=tuned, device="cpu"))
    a, b = load_checkpoint(base), load_checkpoint(tuned)
    assert b.provenance["init"] == str(base)
    diff = [
        not torch.equal(p, q)
        for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True)
    ]
    assert any(diff)


def test_bidirectional_trains(tmp_path, pairs):
    cfg = preset("tiny", image_size=32, variant="bidirectional", aux_target="none")
    events = list(iter_train(_train_cfg(steps=2), pairs, model_config=cfg, device="cpu"))
    keys = {k for e in events if isinstance(e, TrainStep) for k in e.losses}
    stains = {k.split("/", 1)[1] for k in keys if k != "total"}
    assert stains and keys == {"total"} | {f"{b}/{s}" for b in ("gen", "reverse") for s in stains}


def test_distance_target_variant_trains(pairs):
    cfg = preset("tiny", image_size=32, aux_target="distance")
    events = list(iter_train(_train_cfg(steps=1), pairs, model_config=cfg, device="cpu"))
    aux = [v for k, v in events[0].losses.items() if k.startswith("aux/")]
    assert aux and all(np.isfinite(aux))


def test_bad_setups_fail_before_training(tmp_path, tiny_config, pairs):
    from napari_staindiffuser.pairs import InMemoryPairs, PairSample

    with pytest.raises(ValueError, match="exactly one"):
        list(iter_train(_train_cfg(), pairs, device="cpu"))
    with pytest.raises(ValueError, match="holds no pairs"):
        list(iter_train(_train_cfg(), InMemoryPairs([]), model_config=tiny_config))
    foreign = InMemoryPairs([PairSample(pairs[0].he, pairs[0].ihc, "HER2", pairs[0].mask)])
    with pytest.raises(ValueError, match=r"stains \['HER2'\].*does not know"):
        list(iter_train(_train_cfg(), foreign, model_config=tiny_config))
    with pytest.raises(ValueError, match="does not exist"):
        list(
            iter_train(_train_cfg(), pairs, model_config=tiny_config, out=tmp_path / "no" / "m.st")
        )
    no_mask = InMemoryPairs([PairSample(pairs[0].he, pairs[0].ihc, "CD3")])
    with pytest.raises(ValueError, match="needs a coarse mask"):
        list(iter_train(_train_cfg(), no_mask, model_config=tiny_config, device="cpu"))
    with pytest.raises(ValueError, match="same size"):
        PairSample(pairs[0].he, pairs[0].ihc[:16], "CD3")
