"""Progressive distillation: the target, one stage end to end, and the sampling defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_staindiffuser.config import preset
from napari_staindiffuser.diffusion import DDIMSampler, karras_timesteps, make_timesteps
from napari_staindiffuser.distill import (
    distill_losses,
    distill_target,
    iter_distill,
    stage_plan,
    teacher_grid,
)
from napari_staindiffuser.events import CheckpointSaved, Finished, TrainStep, Validation
from napari_staindiffuser.model import Branch, StainDiffuser
from napari_staindiffuser.model.checkpoint import load_checkpoint, read_config, save_checkpoint
from napari_staindiffuser.pairs import make_batch, synthetic_pairs
from napari_staindiffuser.sampling import iter_sample, resolve_sampling
from napari_staindiffuser.training import make_schedule

PX = 32  # the tiny preset at 32 px (a multiple of its downsampling, 8): 4x cheaper than 64


def _config():
    return preset("tiny", image_size=PX)


def _tiny_model(seed: int = 0) -> StainDiffuser:
    torch.manual_seed(seed)
    model = StainDiffuser(_config()).eval()
    # the zero-initialised output layers would make every prediction 0: perturb all weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(3, 2, size=PX, mpp=1.0)  # one CD3 and one CK8/18 pair


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    model = _tiny_model()
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_checkpoint(path, model, ema_state=model.state_dict(), provenance={"steps": 7})
    return path


def test_stage_plan():
    assert stage_plan(16, 4) == [8, 4]
    assert stage_plan(8, 4) == [4]
    assert stage_plan(16, 1) == [8, 4, 2, 1]
    for bad in ((12, 4), (4, 4), (2, 4), (16, 0)):
        with pytest.raises(ValueError):
            stage_plan(*bad)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 32, 125])
def test_student_grid_is_every_other_teacher_point(n):
    schedule = make_schedule(preset("small"))
    t2, abar = teacher_grid(schedule, n)
    assert torch.equal(t2[::2], make_timesteps("trailing", 1000, n))
    assert abar.shape == (2 * n + 1,) and abar[-1] == 1.0


@pytest.mark.parametrize("i", [0, 1, 3])
def test_student_target_equals_two_teacher_ddim_steps(i):
    """One student DDIM step with the target (as the v output) lands where two teacher DDIM
    steps land; computed independently with DDIMSampler on the 2N and N grids."""
    n = 4
    schedule = make_schedule(_config())
    teacher = _tiny_model(1)
    gen = torch.Generator().manual_seed(i)
    cond = torch.rand((2, 3, PX, PX), generator=gen) * 2 - 1
    x0 = torch.rand((2, 3, PX, PX), generator=gen) * 2 - 1
    big, small = DDIMSampler(schedule, 2 * n), DDIMSampler(schedule, n)
    t = int(small.timesteps[i])
    z_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
    with torch.no_grad():
        feats = teacher.encode(cond)
        z = z_t
        for j in (2 * i, 2 * i + 1):
            tv = torch.full((2,), int(big.timesteps[j]), dtype=torch.long)
            z = big.step(teacher.denoise(Branch.GEN, "CD3", z, tv, feats), j, z)
    _, abar = teacher_grid(schedule, n)
    ab = lambda k: torch.full((2,), float(abar[k]), dtype=torch.float64)  # noqa: E731
    v = distill_target(schedule, z_t, z, ab(2 * i), ab(2 * i + 2))
    # the target x0 may leave [-1, 1] by a hair (DDIM's eps is the unclamped one): no clamp here
    one = DDIMSampler(schedule, n, clip_sample=False).step(v, i, z_t)
    torch.testing.assert_close(one, z, atol=2e-4, rtol=1e-4)
    assert (one - z_t).abs().mean() > 1e-2  # the steps really moved the sample


def test_distill_losses_train_every_branch(pairs):
    """Both stains' generation and auxiliary UNets and the shared encoder get gradients."""
    cfg = _config()
    teacher, student = _tiny_model(2), _tiny_model(3).train()
    schedule = make_schedule(cfg)
    batch = make_batch(list(pairs), image_size=PX, stains=cfg.stains)
    batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    total, parts = distill_losses(student, teacher, schedule, 2, batch, torch.Generator())
    assert set(parts) == {"gen/CD3", "gen/CK8/18", "aux/CD3", "aux/CK8/18"}
    assert total.item() > 0
    total.backward()
    for module in (student.encoder, *student.gen.values(), *student.aux.values()):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_one_stage_runs_loads_and_samples_with_its_own_defaults(teacher_path, pairs, tmp_path):
    out = tmp_path / "student.safetensors"
    events = list(
        iter_distill(
            teacher_path,
            out,
            pairs,
            student_steps=2,
            teacher_steps=4,
            steps_per_stage=2,
            batch_size=2,
            val_source=pairs,
            val_batches=1,
            grid="trailing",
            device="cpu",
        )
    )
    kinds = [type(e) for e in events]
    assert kinds.count(TrainStep) == 2 and Validation in kinds
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [e.path for e in saved] == [out] and saved[0].reason == "end"

    _, prov = read_config(out)
    assert prov["sampling"] == {"sampler": "ddim", "steps": 2, "spacing": "trailing"}
    assert prov["distillation"]["stages"] == [2] and prov["steps"] == 7
    ckpt = load_checkpoint(out)
    assert ckpt.model.sampling_defaults["steps"] == 2
    assert resolve_sampling(ckpt.model) == ("ddim", 2)
    assert resolve_sampling(ckpt.model, steps=3) == ("ddim", 3)
    assert resolve_sampling(ckpt.model, "dpmsolver++") == ("dpmsolver++", 10)
    cond = torch.zeros((1, 3, PX, PX))
    steps = [e for e in iter_sample(ckpt.model, cond, stains=["CD3"]) if hasattr(e, "timestep")]
    assert [e.timestep for e in steps] == make_timesteps("trailing", 1000, 2).tolist()

    # an ordinary checkpoint keeps DPM-Solver++ 20
    plain = load_checkpoint(teacher_path)
    assert plain.model.sampling_defaults is None
    assert resolve_sampling(plain.model) == ("ddim", 10)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_karras_stage_grids_are_every_kth_point_of_the_teacher_grid(n):
    schedule = make_schedule(preset("small"))
    full = karras_timesteps(schedule.alphas_cumprod, 16)
    t2, abar = teacher_grid(schedule, n, grid="karras", teacher_steps=16)
    assert torch.equal(t2, full[:: 16 // (2 * n)])
    assert len(t2) == 2 * n and t2[0] == 999 and abar[-1] == 1.0
    # the trailing formula would give another grid: the Karras one is denser at low noise
    assert not torch.equal(t2[::2], make_timesteps("trailing", 1000, n)) or n == 1
    with pytest.raises(ValueError, match="multiple of 2"):
        teacher_grid(schedule, n, grid="karras", teacher_steps=2 * n + 1)
    with pytest.raises(ValueError, match="needs teacher_steps"):
        teacher_grid(schedule, n, grid="karras")


def test_karras_student_records_and_samples_on_its_own_grid(teacher_path, pairs, tmp_path):
    out = tmp_path / "karras.safetensors"
    events = list(
        iter_distill(
            teacher_path, out, pairs, student_steps=2, teacher_steps=8, steps_per_stage=1,
            batch_size=2, device="cpu",
        )
    )  # fmt: skip
    saved = [e.path for e in events if isinstance(e, CheckpointSaved)]
    assert saved == [out.with_name("karras-4step.safetensors"), out]
    full = karras_timesteps(make_schedule(_config()).alphas_cumprod, 8).tolist()
    for path, n in zip(saved, (4, 2), strict=True):
        _, prov = read_config(path)
        assert prov["sampling"] == {
            "sampler": "ddim", "steps": n, "spacing": "custom", "timesteps": full[:: 8 // n]
        }  # fmt: skip
        assert prov["distillation"]["grid"] == "karras"
    model = load_checkpoint(out).model
    cond = torch.zeros((1, 3, PX, PX))
    steps = [e.timestep for e in iter_sample(model, cond, stains=["CD3"]) if hasattr(e, "timestep")]
    assert steps == full[::4]
    # another step count cannot use the 2-step grid: Karras (the usual default) instead
    steps = [
        e.timestep for e in iter_sample(model, cond, stains=["CD3"], steps=3)
        if hasattr(e, "timestep")
    ]  # fmt: skip
    assert steps == karras_timesteps(make_schedule(_config()).alphas_cumprod, 3).tolist()
    with pytest.raises(ValueError, match="own timestep grid"):
        list(iter_sample(model, cond, stains=["CD3"], steps=3, spacing="custom"))
    with pytest.raises(ValueError, match="grid must be one of"):
        list(iter_distill(teacher_path, out, pairs, grid="cosine", device="cpu"))


def test_continue_a_stage_on_the_teachers_own_grid(teacher_path, pairs, tmp_path):
    """grid="teacher" + init_student: the student starts from the given student and keeps the
    distilled teacher's grid; a plain teacher or another architecture is refused."""
    first = tmp_path / "a.safetensors"
    kw = dict(batch_size=2, device="cpu", steps_per_stage=1)
    list(
        iter_distill(
            teacher_path,
            first,
            pairs,
            student_steps=2,
            teacher_steps=8,
            lr=1e-2,
            warmup_steps=0,
            **kw,
        )
    )  # fmt: skip  (big steps: each stage's student differs from its teacher)
    half = tmp_path / "a-4step.safetensors"
    more = tmp_path / "b.safetensors"
    events = list(
        iter_distill(
            half, more, pairs, student_steps=2, teacher_steps=4, grid="teacher",
            init_student=first, lr=1e-12, **kw,
        )
    )  # fmt: skip
    assert isinstance(events[-1], Finished)
    _, prov_a = read_config(first)
    _, prov_b = read_config(more)
    assert prov_b["sampling"] == prov_a["sampling"]  # the same 2-step grid
    assert prov_b["distillation"]["init_student"] == "a.safetensors"
    assert prov_b["distillation"]["teacher_grid"] == read_config(half)[1]["sampling"]["timesteps"]
    a, b = load_checkpoint(first).model.state_dict(), load_checkpoint(more).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)  # started from the student
    t = load_checkpoint(half).model.state_dict()
    assert not all(torch.allclose(t[k], b[k], atol=1e-3) for k in t)

    with pytest.raises(ValueError, match="needs a distilled teacher"):
        list(iter_distill(teacher_path, more, pairs, student_steps=2, teacher_steps=4,
                          grid="teacher", **kw))  # fmt: skip
    other = tmp_path / "other.safetensors"
    big = StainDiffuser(preset("tiny", image_size=64))
    save_checkpoint(other, big, ema_state=big.state_dict())
    with pytest.raises(ValueError, match="not the teacher's architecture"):
        list(iter_distill(half, more, pairs, student_steps=2, teacher_steps=4, grid="teacher",
                          init_student=other, **kw))  # fmt: skip


def test_custom_timesteps_are_checked():
    schedule = make_schedule(_config())
    smp = DDIMSampler(schedule, 3, spacing="custom", timesteps=[900, 500, 10])
    assert smp.timesteps.tolist() == [900, 500, 10]
    for bad in ([500, 900, 10], [1000, 500, 10], [900, 500], [9.5, 5.0, 1.0]):
        with pytest.raises(ValueError):
            DDIMSampler(schedule, 3, spacing="custom", timesteps=bad)
    with pytest.raises(ValueError, match="only with it"):
        DDIMSampler(schedule, 3, timesteps=[900, 500, 10])
    with pytest.raises(ValueError, match="only with it"):
        DDIMSampler(schedule, 3, spacing="custom")


def test_half_precision_student_loads(teacher_path, pairs, tmp_path):
    out = tmp_path / "half.safetensors"
    list(
        iter_distill(
            teacher_path, out, pairs, student_steps=1, teacher_steps=2, steps_per_stage=1,
            batch_size=2, half=True, device="cpu",
        )
    )  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}  # noqa: SIM118
    model = load_checkpoint(out).model
    assert next(model.parameters()).dtype == torch.float32


def test_distillation_loss_decreases_on_a_fixed_batch(teacher_path, pairs):
    """20 AdamW steps on one batch: the student moves towards the two-step teacher."""
    teacher = load_checkpoint(teacher_path).model.eval().requires_grad_(False)
    student = load_checkpoint(teacher_path).model.train()
    schedule = make_schedule(teacher.config)
    batch = make_batch(list(pairs), image_size=PX, stains=teacher.config.stains)
    batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):  # same timesteps and noise every time: a fixed regression problem
        total, _ = distill_losses(
            student, teacher, schedule, 1, batch, torch.Generator().manual_seed(0)
        )
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0]


def test_distil_one_stains_generation_branch_leaves_every_other_weight_bit_identical(
    teacher_path, pairs, tmp_path
):
    """stains=["CD3"], branches=["gen"]: only CD3's generation UNet changes (the encoder is
    frozen), only CD3 pairs are drawn, and the provenance says so."""
    out = tmp_path / "cd3.safetensors"
    events = list(
        iter_distill(
            teacher_path, out, pairs, student_steps=2, teacher_steps=4, stains=["CD3"],
            branches=["gen"], step_weights=[1, 3], steps_per_stage=3, batch_size=4, lr=1e-2,
            warmup_steps=0, val_source=pairs, device="cpu",
        )
    )  # fmt: skip
    for ev in events:
        if isinstance(ev, (TrainStep, Validation)):
            assert set(ev.losses) == {"gen/CD3", "total", "stage_steps"}
    before = load_checkpoint(teacher_path, weights="ema").model.state_dict()
    after = load_checkpoint(out).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("gen.CD3.") for k in changed), sorted(changed)[:5]
    info = read_config(out)[1]["distillation"]
    assert (info["stains"], info["branches"], info["step_weights"]) == (["CD3"], ["gen"], [1, 3])
    assert info["frozen"]


def test_step_weights_choose_which_student_steps_are_trained(pairs):
    cfg = _config()
    teacher, student = _tiny_model(2), _tiny_model(3).train()
    schedule = make_schedule(cfg)
    batch = make_batch(list(pairs) * 8, image_size=PX, stains=cfg.stains)
    batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    grid = teacher_grid(schedule, 2)
    seen: list[int] = []
    denoise = student.denoise

    def spy(branch, stain, x, t, feats):
        seen.extend(t.tolist())
        return denoise(branch, stain, x, t, feats)

    student.denoise = spy
    for weights, expect in (([0.0, 1.0], {2}), ([1.0, 0.0], {0}), (None, {0, 2})):
        seen.clear()
        w = None if weights is None else torch.tensor(weights)
        total, _ = distill_losses(
            student, teacher, schedule, 2, batch, torch.Generator().manual_seed(0), grid=grid,
            step_weights=w, train_encoder=False,
        )  # fmt: skip
        assert set(seen) == {int(grid[0][i]) for i in expect}
        total.backward()  # frozen channels-last features: no crash in GroupNorm's backward


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"stains": ["HER2"]}, "stains must name"),
        ({"stains": []}, "stains must name"),
        ({"branches": ["reverse"]}, "branches must be"),
        ({"step_weights": [1, 1, 1]}, "one weight per student step"),
        ({"step_weights": [1, 1], "teacher_steps": 8}, "single stage"),
        ({"step_weights": [0, 0]}, "positive sum"),
        ({"step_weights": [1, float("nan")]}, "positive sum"),
    ],
)
def test_what_to_distil_is_checked(teacher_path, pairs, tmp_path, kw, match):
    kw = {"student_steps": 2, "teacher_steps": 4, "steps_per_stage": 1, "device": "cpu", **kw}
    with pytest.raises(ValueError, match=match):
        list(iter_distill(teacher_path, tmp_path / "x.safetensors", pairs, **kw))
    assert not list(tmp_path.iterdir())


def test_distilling_a_stain_the_data_lack_is_refused(teacher_path, pairs, tmp_path):
    ck_only = [p for p in pairs if p.stain == "CK8/18"]
    with pytest.raises(ValueError, match=r"hold no pairs of \['CD3'\]"):
        list(iter_distill(teacher_path, tmp_path / "x.safetensors", ck_only, stains=["CD3"],
                          student_steps=2, teacher_steps=4, device="cpu"))  # fmt: skip
