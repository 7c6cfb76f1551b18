"""The sampling pipeline: events, determinism, batch independence, aux output, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_staindiffuser.config import preset
from napari_staindiffuser.events import SampleStep
from napari_staindiffuser.model import StainDiffuser
from napari_staindiffuser.sampling import (
    SampleResult,
    from_uint8_rgb,
    iter_sample,
    make_generators,
    sample,
    to_uint8_rgb,
)

from conftest import untrained_model


@pytest.fixture(scope="module")
def model():
    return untrained_model().eval()


def _cond(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 32, 32, generator=g) * 2 - 1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_events_shapes_and_aux(model, sampler):
    events = list(iter_sample(model, _cond(), sampler=sampler, steps=3, seed=5))
    steps = [e for e in events if isinstance(e, SampleStep)]
    assert [e.step for e in steps] == [1, 2, 3] and steps[0].total == 3
    assert steps[0].timestep > steps[-1].timestep
    result = events[-1]
    assert isinstance(result, SampleResult)
    assert set(result.images) == {"CD3", "CK8/18"} == set(result.aux_mask)
    img = result.images["CD3"]
    assert img.shape == (2, 3, 32, 32) and img.dtype == np.float32
    assert img.min() >= -1 and img.max() <= 1
    assert result.aux_score["CK8/18"].shape == (2, 32, 32)
    assert result.aux_mask["CK8/18"].dtype == bool


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_same_seed_same_sample_and_batch_independence(model, sampler):
    cond = _cond(3)
    kw = dict(sampler=sampler, steps=3, eta=1.0, aux=True)
    a = sample(model, cond, seed=11, **kw)
    b = sample(model, cond, seed=11, **kw)
    c = sample(model, cond, seed=12, **kw)
    np.testing.assert_array_equal(a.images["CD3"], b.images["CD3"])
    assert np.abs(a.images["CD3"] - c.images["CD3"]).max() > 1e-3
    # item 1 sampled alone with its own generator equals item 1 of the batch
    alone = sample(model, cond[1:2], generators=make_generators([12], 1), **kw)
    np.testing.assert_allclose(alone.images["CD3"][0], a.images["CD3"][1], atol=1e-5)
    np.testing.assert_array_equal(alone.aux_mask["CD3"][0], a.aux_mask["CD3"][1])


@pytest.mark.parametrize("sampler", ["ddpm", "dpmsolver++"])
def test_a_stain_does_not_depend_on_what_else_is_sampled(model, sampler):
    cond = _cond(2)
    both = sample(model, cond, sampler=sampler, steps=3, seed=4)
    alone = sample(model, cond, sampler=sampler, steps=3, seed=4, stains=["CK8/18"], aux=False)
    np.testing.assert_allclose(alone.images["CK8/18"], both.images["CK8/18"], atol=1e-6)


def test_no_inference_mode_leaks_between_steps(model):
    gen = iter_sample(model, _cond(1), steps=3)
    next(gen)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    x = torch.ones(2, requires_grad=True)
    (x * 2).sum().backward()  # a training step on this thread still works
    gen.close()


def test_subset_of_stains_and_no_aux(model):
    r = sample(model, _cond(1), stains=["CK8/18"], aux=False, steps=2)
    assert set(r.images) == {"CK8/18"} and not r.aux_mask


def test_cancel_between_steps(model):
    gen = iter_sample(model, _cond(1), steps=50)
    first = [next(gen) for _ in range(2)]
    gen.close()  # what the GUI's cancel does: no more network evaluations
    assert [e.step for e in first] == [1, 2]
    assert model.training is False


def test_bad_requests(model):
    with pytest.raises(ValueError, match="unknown stain 'HER2'"):
        sample(model, _cond(1), stains=["HER2"], steps=2)
    with pytest.raises(ValueError, match="bi-directional"):
        sample(model, _cond(1), reverse=True, steps=2)
    with pytest.raises(ValueError, match="one generator per batch item"):
        sample(model, _cond(2), generators=make_generators(0, 1), steps=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        sample(model, torch.zeros(1, 3, 20, 20), steps=2)
    with pytest.raises(ValueError, match="sampler"):
        sample(model, _cond(1), sampler="euler", steps=2)


def test_bidirectional_reverse_sampling():
    m = StainDiffuser(preset("tiny", image_size=32, variant="bidirectional", aux_target="none"))
    r = sample(m, _cond(1), stains=["CD3"], reverse=True, steps=2)
    assert r.images["CD3"].shape == (1, 3, 32, 32) and not r.aux_mask


def test_distance_aux_decodes_to_mask():
    m = StainDiffuser(preset("tiny", image_size=32, aux_target="distance"))
    r = sample(m, _cond(1), steps=2)
    assert r.aux_mask["CD3"].dtype == bool
    assert r.aux_score["CD3"].min() >= 0 and r.aux_score["CD3"].max() <= 1


def test_uint8_conversions_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    t = from_uint8_rgb(rgb)
    assert t.shape == (2, 3, 16, 16) and float(t.min()) >= -1 and float(t.max()) <= 1
    np.testing.assert_array_equal(to_uint8_rgb(t.numpy()), rgb)
    with pytest.raises(ValueError, match="uint8 RGB"):
        from_uint8_rgb(rgb.astype(np.float32))


def test_default_grid_is_karras_except_on_a_distilled_models_own_setting():
    from types import SimpleNamespace

    from napari_staindiffuser import sampling
    from napari_staindiffuser._widgets import _stain_dock

    plain = SimpleNamespace(sampling_defaults=None)
    assert sampling.resolve_sampling(plain) == ("ddim", 10)
    assert sampling.resolve_spacing(plain, "ddim", 10) == "karras"
    assert sampling.resolve_spacing(plain, "ddim", 10, "trailing") == "trailing"
    assert sampling.resolve_spacing(plain, "ddpm", 1000) == "trailing"  # Karras cannot fit T
    own = {"sampler": "ddim", "steps": 4, "spacing": "trailing"}
    student = SimpleNamespace(sampling_defaults=own)
    assert sampling.resolve_sampling(student) == ("ddim", 4)
    assert sampling.resolve_spacing(student, "ddim", 4) == "trailing"  # its own grid
    assert sampling.resolve_spacing(student, "ddim", 8) == "karras"  # not what it learnt
    # the dock (which cannot import torch) shows the same defaults
    assert (_stain_dock.DEFAULT_SAMPLER, _stain_dock.DEFAULT_STEPS) == (
        sampling.DEFAULT_SAMPLER,
        sampling.DEFAULT_STEPS,
    )
