"""Model shapes, parameter sharing, presets and input validation."""

from __future__ import annotations

import pytest
import torch

from napari_staindiffuser.config import ModelConfig, TrainConfig, preset
from napari_staindiffuser.model import Branch, StainDiffuser, count_parameters

from conftest import untrained_model


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"aux_target": "distance"},
        {"aux_target": "none"},
        {"variant": "bidirectional", "aux_target": "none"},
        {"stains": ("CD3",)},
        {"mid_attention": True},
    ],
)
def test_output_shapes_every_variant(overrides):
    cfg = preset("tiny", image_size=32, **overrides)
    model = StainDiffuser(cfg)
    cond = torch.rand(2, 3, 32, 48) * 2 - 1  # non-square works too
    feats = model.encode(cond)
    assert [tuple(f.shape) for f in feats] == [
        (2, 16, 32, 48),
        (2, 16, 16, 24),
        (2, 32, 8, 12),
        (2, 32, 4, 6),
    ]
    t = torch.tensor([0, 999])
    for branch, stain in model.branches():
        c = model.target_channels(branch)
        out = model.denoise(branch, stain, torch.randn(2, c, 32, 48), t, feats)
        assert out.shape == (2, c, 32, 48)
    kinds = {b for b, _ in model.branches()}
    if cfg.variant.value == "bidirectional":
        assert kinds == {Branch.GEN, Branch.REVERSE}
    elif cfg.has_aux:
        assert kinds == {Branch.GEN, Branch.AUX}
    else:
        assert kinds == {Branch.GEN}


def test_encoder_shared_and_attention_disjoint():
    model = StainDiffuser(preset("tiny", image_size=32))
    groups = {
        "encoder": model.encoder,
        **{f"gen/{k}": m for k, m in model.gen.items()},
        **{f"aux/{k}": m for k, m in model.aux.items()},
    }
    ptrs = {name: {p.data_ptr() for p in m.parameters()} for name, m in groups.items()}
    names = list(ptrs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not ptrs[a] & ptrs[b], f"{a} and {b} share parameters"
    # all parameters belong to exactly one group
    assert sum(len(p) for p in ptrs.values()) == len(list(model.parameters()))
    # four attention blocks (one per scale) per task, each its own parameters
    attn = [blk for m in (*model.gen.values(), *model.aux.values()) for blk in m.attn]
    assert len(attn) == 4 * 4
    attn_ptrs = [{p.data_ptr() for p in blk.parameters()} for blk in attn]
    assert len(set().union(*attn_ptrs)) == sum(len(p) for p in attn_ptrs)


def test_gradient_reaches_only_encoder_and_own_branch():
    model = StainDiffuser(preset("tiny", image_size=32))
    cond = torch.rand(2, 3, 32, 32)
    feats = model.encode(cond)
    out = model.denoise("gen", "CD3", torch.randn(2, 3, 32, 32), torch.tensor([5, 500]), feats)
    # conv_out is zero-initialised: use a loss that reaches the attention blocks anyway
    out.sum().backward()
    assert all(p.grad is None for p in model.gen["CK8_18"].parameters())
    assert all(p.grad is None for p in model.aux["CD3"].parameters())
    assert model.gen["CD3"].conv_out.weight.grad.abs().sum() > 0


def test_attention_modulates_with_he_features():
    """The H&E image changes the branch output (conditioning actually reaches the UNet)."""
    model = untrained_model()
    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor([100])
    a = model(torch.zeros(1, 3, 32, 32), x, t)
    b = model(torch.ones(1, 3, 32, 32) * 0.5, x, t)
    assert (a - b).abs().max() > 1e-3
    with torch.no_grad():
        f1 = model.encode(torch.zeros(1, 3, 32, 32))[0]
        attn = model.gen["CD3"].attn[0].attention(f1, x[:, :1].repeat(1, 16, 1, 1))
    assert attn.shape == (1, 16, 32, 32)
    assert float(attn.min()) > 0 and float(attn.max()) < 1


def test_preset_parameter_counts():
    counts = {name: count_parameters(StainDiffuser(preset(name))) for name in ("tiny", "small")}
    assert counts == {"tiny": 1_097_288, "small": 4_356_232}


def test_paper_preset_parameter_count():
    model = StainDiffuser(preset("paper"))
    assert count_parameters(model) == 129_599_624
    assert count_parameters(model.gen["CD3"]) == 30_215_299
    assert model.config.schedule.prediction_type.value == "epsilon"
    assert model.config.image_size == 128


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.rand(1, 4, 32, 32), "RGB"),
        (torch.rand(1, 3, 30, 32), "multiples of 8"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float"),
        (torch.rand(3, 32, 32), "RGB"),
    ],
)
def test_bad_images_raise_value_error(bad, message):
    model = StainDiffuser(preset("tiny", image_size=32))
    with pytest.raises(ValueError, match=message):
        model.check_input(bad)


def test_unknown_stain_and_branch():
    model = StainDiffuser(preset("tiny", image_size=32, aux_target="none"))
    feats = model.encode(torch.zeros(1, 3, 32, 32))
    t = torch.tensor([1])
    with pytest.raises(ValueError, match=r"unknown stain 'HER2'.*CD3"):
        model.denoise("gen", "HER2", torch.zeros(1, 3, 32, 32), t, feats)
    with pytest.raises(ValueError, match="no 'aux' branch"):
        model.denoise("aux", "CD3", torch.zeros(1, 1, 32, 32), t, feats)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stains": ()}, "at least one stain"),
        ({"stains": "CD3"}, "sequence of names"),
        ({"stains": ("CD3", "CD3")}, "distinct"),
        ({"stains": ("CK8/18", "CK8_18")}, "distinct"),
        ({"stains": ("bad\nname",)}, "stain names"),
        ({"image_size": 20}, "multiple of 8"),
        ({"channel_mults": (1, 2, 2)}, "4 entries"),
        ({"lambda_gen": (1.0,)}, "one weight per stain"),
        ({"lambda_aux": (1.0, -1.0)}, ">= 0"),
        ({"variant": "gan"}, "variant must be one of"),
        ({"variant": "bidirectional"}, "no auxiliary branch"),
        ({"mpp": 0.0}, "positive"),
        ({"base_channels": 12}, "multiples of 8"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_config_schedule_validation():
    from napari_staindiffuser.config import ScheduleConfig

    assert ScheduleConfig(num_train_timesteps=4000).num_train_timesteps == 4000
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ScheduleConfig(num_train_timesteps=1)
    with pytest.raises(ValueError, match="beta_start"):
        ScheduleConfig(beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        ScheduleConfig(prediction_type="x0")


def test_config_json_round_trip_and_frozen():
    cfg = preset("paper", stains=("CD3", "CK8/18", "HER2"), lambda_aux=(3.0, 1.0, 1.0))
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    with pytest.raises(AttributeError):
        cfg.image_size = 64  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "layers": 3})
    tc = TrainConfig(steps=5)
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        TrainConfig(seed=-1)
    with pytest.raises(ValueError, match="val_batches"):
        TrainConfig(val_batches=1.5)
    with pytest.raises(ValueError, match="grad_clip must be a finite number"):
        TrainConfig(grad_clip="1")
    with pytest.raises(ValueError, match="distance_max"):
        ModelConfig(distance_max=0.5)
