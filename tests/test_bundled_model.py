"""The bundled demo model ships, loads safely, and has actually learned the synthetic task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_staindiffuser.model.checkpoint import bundled_model_path, load_checkpoint, read_config


def test_bundled_model_is_small_and_describes_itself():
    path = bundled_model_path()
    assert path.stat().st_size <= 20 * 1024 * 1024
    config, prov = read_config(path)
    assert config.stains == ("CD3", "CK8/18") and config.has_aux
    assert config.schedule.prediction_type.value == "v_prediction"
    assert config.image_size == 64 and config.mpp == 1.0
    assert "synthetic" in prov["data"] and prov["steps"] >= 1000
    ckpt = load_checkpoint(path)
    assert ckpt.weights == "ema"
    with pytest.raises(ValueError, match="inference-only"):
        load_checkpoint(path, with_training=True)


def test_bundled_distilled_model_is_the_default_and_samples_in_4_steps():
    """The distilled student of the bundled model ships, is what staining uses by default, and
    samples on 4 points of its own 8-step grid (docs/distillation.md)."""
    from napari_staindiffuser.checkpoint_meta import default_model_path, model_hash
    from napari_staindiffuser.sampling import SampleStep, iter_sample

    path = bundled_model_path(distilled=True)
    assert default_model_path() == path
    assert path.stat().st_size <= 10 * 1024 * 1024  # float16
    config, prov = read_config(path)
    assert config == read_config(bundled_model_path())[0]
    sampling = prov["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["spacing"]) == ("ddim", 4, "custom")
    assert set(sampling["timesteps"]) <= set(sampling["subset_of"])
    assert prov["distillation"]["teacher_sha256"] == model_hash(bundled_model_path())
    model = load_checkpoint(path).model
    cond = torch.zeros(1, 3, 64, 64)
    ts = [e.timestep for e in iter_sample(model, cond, aux=False) if isinstance(e, SampleStep)]
    assert ts == sampling["timesteps"]


@pytest.mark.parametrize("distilled", [False, True])
def test_bundled_models_find_glands_and_t_cells_on_a_held_out_slide(distilled):
    from napari_staindiffuser.demo import DEMO_SLIDE_SEED, dice
    from napari_staindiffuser.inference import stain_region
    from napari_staindiffuser.synthetic import SyntheticSlide

    model = load_checkpoint(bundled_model_path(distilled=distilled)).model
    slide = SyntheticSlide(DEMO_SLIDE_SEED, shape=(1024, 1024), mpp=0.5)
    region = slide.render(128, 128, 256, 256)
    steps = None if distilled else 8  # the distilled model: its own 4 steps
    res = stain_region(region.he, model, image_mpp=0.5, steps=steps, seed=0, device="cpu")
    for stain, floor in (("CK8/18", 0.8), ("CD3", 0.6)):  # measured: 0.98 and 0.86
        assert region.masks[stain].any()
        d = dice(res.masks[stain], region.masks[stain])
        assert d > floor, f"{stain}: Dice {d:.2f}"
        assert np.isfinite(res.scores[stain]).all()
