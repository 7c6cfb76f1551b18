"""Fast paths: precision (autocast), torch.compile fallback, CPU threads, out-of-memory batch
halving and the automatic batch size. CPU only, except the tests marked ``gpu``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_staindiffuser import runtime
from napari_staindiffuser.events import Progress
from napari_staindiffuser.inference import (
    AUTO_BATCH_CPU,
    DiffusionTileModel,
    TileStained,
    auto_batch,
    iter_stain,
    stain_region,
)
from napari_staindiffuser.sampling import sample

import conftest
from conftest import untrained_model

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


class FakeOOM(torch.cuda.OutOfMemoryError):
    pass


class Pointwise(conftest.Pointwise):
    """The pointwise TileModel, running out of (fake CUDA) memory above ``max_batch`` tiles."""

    def __init__(self, max_batch: int = 1 << 30, error=FakeOOM):
        super().__init__(max_batch, error)


# -- precision ---------------------------------------------------------------------------------


def test_resolve_precision_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", "cpu") == "fp32"
    assert runtime.resolve_precision("fp32", "cpu") == "fp32"
    assert runtime.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match=r"fp16.*CUDA"):
        runtime.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.resolve_precision("float16", "cpu")


def test_resolve_precision_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.resolve_precision("auto", "cuda") == "bf16"
    assert runtime.resolve_precision("fp16", "cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(ValueError, match="does not support bfloat16"):
        runtime.resolve_precision("bf16", "cuda")


def test_cpu_bf16_flag_is_a_bool():
    assert isinstance(runtime.cpu_has_native_bf16(), bool)


def test_bf16_close_to_fp32():
    """bf16 autocast of the network only: same noise, outputs close to float32 and float32.
    Tolerance measured here: max abs difference 0.010, mean 0.0018 ([-1, 1] scale) for
    2 steps of the bundled model on 32 px tiles; 0.05 leaves room for other CPUs."""
    from napari_staindiffuser.model.checkpoint import bundled_model_path, load_checkpoint

    model = load_checkpoint(bundled_model_path()).model
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kw = dict(steps=2, seed=3, stains=["CD3"], aux=True)
    a = sample(model, cond, precision="fp32", **kw)
    b = sample(model, cond, precision="bf16", **kw)
    assert b.images["CD3"].dtype == np.float32 and b.aux_score["CD3"].dtype == np.float32
    diff = np.abs(a.images["CD3"] - b.images["CD3"])
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.005
    assert np.abs(a.aux_score["CD3"] - b.aux_score["CD3"]).max() < 0.05
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_precision_in_provenance():
    model = untrained_model()
    res = stain_region(
        _image(40, 40), model, steps=1, tile=32, overlap=8, precision="bf16", device="cpu"
    )
    assert res.provenance["precision"] == "bf16"
    assert res.provenance["compiled"] is False and res.provenance["channels_last"] is False
    with pytest.raises(ValueError, match="precision and compile apply"):
        stain_region(_image(40, 40), Pointwise(), precision="bf16")


# -- torch.compile -----------------------------------------------------------------------------


def _stain_tiny(**kw):
    img = _image(40, 40)
    kw = dict(steps=1, tile=32, overlap=8, device="cpu", stains=["CD3"], aux=False, **kw)
    return stain_region(img, untrained_model(), **kw)


def test_compile_failure_at_run_falls_back(monkeypatch):
    def broken_compile(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("inductor: no working C++ compiler")

        return call

    ref = _stain_tiny()
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*no working C"):
        res = _stain_tiny(compile=True)
    assert res.provenance["compiled"] is False
    np.testing.assert_array_equal(res.images["CD3"], ref.images["CD3"])


def test_compile_failure_at_wrap_falls_back(monkeypatch):
    def broken_compile(fn, **kw):
        raise RuntimeError("dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        tm = DiffusionTileModel(untrained_model(), steps=1, compile=True)
    assert tm.describe()["compiled"] is False


def test_compiled_model_passes_oom_on(monkeypatch):
    def oom_compile(fn, **kw):
        def call(*a, **k):
            raise FakeOOM("CUDA out of memory")

        return call

    monkeypatch.setattr(torch, "compile", oom_compile)
    net = runtime.CompiledModel(untrained_model())
    with pytest.raises(FakeOOM):
        net.encode(torch.zeros(1, 3, 32, 32))
    assert net.active


# -- threads -----------------------------------------------------------------------------------


def test_configure_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert runtime.configure_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert runtime.configure_threads() == runtime.physical_cores()
        with pytest.raises(ValueError, match="threads must be"):
            runtime.configure_threads(0)
    finally:
        torch.set_num_threads(before)


# -- out of memory: halve the batch ------------------------------------------------------------


@pytest.mark.parametrize("error", [FakeOOM, RuntimeError])
def test_oom_halves_batch_and_keeps_tiles(error):
    img = _image(100, 90)
    ref = list(iter_stain(img, Pointwise(), tile=32, overlap=8, batch=2))
    fake = Pointwise(max_batch=2, error=error)
    events = list(iter_stain(img, fake, tile=32, overlap=8, batch=8))
    stages = [e.stage for e in events if isinstance(e, Progress)]
    assert "out of memory: batch reduced to 4" in stages
    assert "out of memory: batch reduced to 2" in stages
    assert fake.calls[:3] == [8, 4, 2]
    tiles = [e for e in events if isinstance(e, TileStained)]
    ref_tiles = [e for e in ref if isinstance(e, TileStained)]
    assert [t.box for t in tiles] == [t.box for t in ref_tiles]  # each tile once, in order
    assert [t.done for t in tiles] == list(range(1, len(ref_tiles) + 1))
    res, want = events[-1], ref[-1]
    for st in want.images:
        np.testing.assert_array_equal(res.images[st], want.images[st])
        np.testing.assert_array_equal(res.masks[st], want.masks[st])
    assert res.provenance["batch"] == 2 and res.provenance["batch_requested"] == 8


def test_oom_after_finished_tiles_keeps_them():
    """The OOM strikes a later, larger batch: tiles already yielded are not redone."""

    class LateOOM(Pointwise):
        def run(self, tiles, seeds, stains):
            if len(self.calls) >= 1 and len(tiles) > 2:
                self.calls.append(len(tiles))
                raise FakeOOM("CUDA out of memory")
            yield from super().run(tiles, seeds, stains)

    img = _image(100, 90)
    fake = LateOOM()
    events = list(iter_stain(img, fake, tile=32, overlap=8, batch=4))
    tiles = [e for e in events if isinstance(e, TileStained)]
    assert fake.calls[:3] == [4, 4, 2] and len(tiles) == events[-1].provenance["tiles"]
    assert len({t.box for t in tiles}) == len(tiles)
    want = list(iter_stain(img, Pointwise(), tile=32, overlap=8, batch=4))[-1]
    np.testing.assert_array_equal(events[-1].images["CD3"], want.images["CD3"])


def test_oom_at_batch_one_is_a_clear_error():
    with pytest.raises(MemoryError, match="batch 1: one tile does not fit"):
        list(iter_stain(_image(60, 60), Pointwise(max_batch=0), tile=32, overlap=8, batch=4))


def test_other_errors_pass_through():
    with pytest.raises(ValueError, match="CUDA out of memory"):
        list(iter_stain(_image(60, 60), Pointwise(0, ValueError), tile=32, overlap=8, batch=4))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("CUDA out of memory. Tried to allocate 20.00 MiB", True),
        ("CUDA error: an illegal memory access was encountered", False),
    ],
)
def test_is_out_of_memory(text, expected):
    assert runtime.is_out_of_memory(RuntimeError(text)) is expected
    assert runtime.is_out_of_memory(FakeOOM("x"))
    assert not runtime.is_out_of_memory(ValueError("out of memory"))


# -- automatic batch ---------------------------------------------------------------------------


def test_auto_batch_probe_finds_largest_power_of_two():
    fake = Pointwise(max_batch=13)
    assert auto_batch(fake, ["CD3"], total=1000, probe=True) == 8
    assert fake.calls == [1, 2, 4, 8, 16]
    assert auto_batch(Pointwise(), ["CD3"], total=5, probe=True) == 8  # capped by the tiles
    with pytest.raises(MemoryError, match="batch 1"):
        auto_batch(Pointwise(max_batch=0), ["CD3"], total=10, probe=True)


def test_auto_batch_on_cpu_is_fixed():
    fake = Pointwise()
    res = list(iter_stain(_image(100, 90), fake, tile=32, overlap=8, batch="auto"))[-1]
    assert res.provenance["batch"] == AUTO_BATCH_CPU and res.provenance["batch_requested"] == "auto"
    assert max(fake.calls) <= AUTO_BATCH_CPU
    with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
        list(iter_stain(_image(60, 60), fake, batch="max"))


def test_auto_batch_restores_steps():
    tm = DiffusionTileModel(untrained_model(), steps=3)
    assert auto_batch(tm, ["CD3"], total=2, probe=True) == 2
    assert tm.steps == 3


# -- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
def test_gpu_auto_precision_and_batch():
    model = untrained_model().to("cuda")
    tm = DiffusionTileModel(model, steps=2, precision="auto")
    assert tm.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert not tm.channels_last  # off by default: slower on an H200 (docs/performance.md)
    assert auto_batch(tm, list(tm.stains), total=64) == 64


@pytest.mark.gpu
@needs_gpu
def test_gpu_real_oom_halves_batch():
    """A real CUDA OOM: cap the process's share of the GPU so a big batch cannot fit."""
    model = untrained_model(image_size=256).to("cuda")
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 200 * 2**20) / total)
    try:
        img = _image(1024, 1024)
        events = list(iter_stain(img, model, steps=1, batch=256, tile=256, device="cuda"))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert any(isinstance(e, Progress) and "out of memory" in e.stage for e in events)
    assert events[-1].provenance["batch"] < 256


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_and_fp16_close_to_fp32():
    model = untrained_model().to("cuda")
    cond = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = sample(model, cond.cuda(), steps=2, seed=1).images["CD3"]
    for p in ("bf16", "fp16"):
        out = sample(model, cond.cuda(), steps=2, seed=1, precision=p).images["CD3"]
        assert np.abs(out - ref).max() < 0.05


# -- command line ------------------------------------------------------------------------------


def test_cli_stain_speed_options():
    from napari_staindiffuser.cli import build_parser

    p = build_parser()
    args = p.parse_args(["stain", "x.svs", "--batch", "auto", "--precision", "bf16", "--compile"])
    assert (args.batch, args.precision, args.compile, args.threads) == ("auto", "bf16", True, None)
    args = p.parse_args(["stain", "x.svs", "--batch", "16", "--threads", "1"])
    assert (args.batch, args.precision, args.compile, args.threads) == (16, "auto", False, 1)
    for bad in ("0", "big"):
        with pytest.raises(SystemExit):
            p.parse_args(["stain", "x.svs", "--batch", bad])
