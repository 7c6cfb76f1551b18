"""Starting points for fine-tuning: changed configs, models that grow a stain, previews."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_staindiffuser.config import AuxTarget, TrainConfig, Variant
from napari_staindiffuser.model.checkpoint import (
    derive_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from napari_staindiffuser.model.staindiffuser import with_config

from conftest import blob_pairs, untrained_model


def test_a_new_stain_starts_as_a_copy_of_the_first(tmp_path):
    src = save_checkpoint(tmp_path / "a.safetensors", untrained_model(32))
    dst = derive_checkpoint(src, tmp_path / "b.safetensors", add_stains=["Ki67"], image_size=64)
    ck = load_checkpoint(dst)
    assert ck.config.stains == ("CD3", "CK8/18", "Ki67") and ck.config.image_size == 64
    assert ck.config.lambda_gen == (1.0, 1.0, 1.0) and ck.provenance["added_stains"] == ["Ki67"]
    sd = ck.model.state_dict()
    new = [k for k in sd if ".Ki67." in k]
    assert len(new) > 20 and any(k.startswith("aux.") for k in new)
    for k in new:
        torch.testing.assert_close(sd[k], sd[k.replace(".Ki67.", ".CD3.")], rtol=0, atol=0)
    old = load_checkpoint(src).model.state_dict()
    for k, v in old.items():  # everything else is carried over unchanged
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    # an existing stain (any case) is not added twice
    same = derive_checkpoint(src, tmp_path / "c.safetensors", add_stains=["cd3"])
    assert load_checkpoint(same).config.stains == ("CD3", "CK8/18")


def test_changes_that_cannot_carry_over_are_refused(tmp_path):
    model = untrained_model(32)
    with pytest.raises(ValueError, match="architecture"):
        with_config(model, model.config.replace(base_channels=8))
    with pytest.raises(ValueError, match="keep the model's stains"):
        with_config(model, model.config.replace(stains=("CK8/18",), lambda_gen=(), lambda_aux=()))
    bidi = untrained_model(32, variant=Variant.BIDIRECTIONAL, aux_target=AuxTarget.NONE)
    src = save_checkpoint(tmp_path / "bidi.safetensors", bidi)
    with pytest.raises(ValueError, match="cannot grow"):
        derive_checkpoint(src, tmp_path / "x.safetensors", add_stains=["Ki67"])
    # the auxiliary target changes without touching shapes
    out = with_config(model, model.config.replace(aux_target=AuxTarget.DISTANCE))
    assert out.config.aux_target is AuxTarget.DISTANCE


def test_validation_previews_show_the_ema_model_on_a_fixed_crop(tmp_path):
    from napari_staindiffuser.events import Validation
    from napari_staindiffuser.training import iter_train

    pairs = blob_pairs(6)
    tc = TrainConfig(steps=4, batch_size=2, val_every=2, val_batches=1, warmup_steps=0)
    crop = pairs[0].he
    vals = [
        ev
        for ev in iter_train(
            tc,
            pairs,
            model_config=untrained_model(32).config,
            val_source=pairs,
            preview_he=crop,
            preview_steps=2,
        )
        if isinstance(ev, Validation)
    ]
    assert [v.step for v in vals] == [2, 4]
    for v in vals:
        assert set(v.previews) == {"CD3", "CK8/18"}
        assert all(p.shape == crop.shape and p.dtype == np.uint8 for p in v.previews.values())
    assert not np.array_equal(vals[0].previews["CD3"], vals[1].previews["CD3"])  # it learns
