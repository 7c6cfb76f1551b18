"""Data-parallel training (torch DDP) with 2 CPU processes on gloo, launched by torchrun.

torchrun runs with ``--standalone`` (a rendezvous on a free localhost port that it picks itself),
so parallel test runs do not collide on a port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("this torch has no torch.distributed", allow_module_level=True)

# Seed 1 draws, for 8 pairs alternating CD3 / CK8/18 and a global batch of 4 (2 per rank):
# step 0 mixes both stains, step 1 has no CK8/18 at all (its branches get no gradient anywhere:
# AdamW must skip them, as in one process), step 2 only CK8/18 (no CD3 on either rank).
TRAIN_ARGS = [
    "train",
    "--synthetic", "8", "--patch-size", "64", "--preset", "tiny", "--steps", "3",
    "--batch", "4", "--warmup", "1", "--lr", "1e-3", "--seed", "1", "--device", "cpu",
]  # fmt: skip
# float32 sums in another order (the gradient all-reduce): measured differences are ~1e-7
ATOL = 2e-5


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, *args], env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_seed_draws_what_the_comment_says():
    # keeps the scenario of TRAIN_ARGS honest if the sampling of batch indices changes
    stains = [np.random.default_rng([1, k]).integers(8, size=4) % 2 for k in range(3)]
    assert set(stains[0]) == {0, 1} and set(stains[1]) == {0} and set(stains[2]) == {1}


def test_global_batch_is_split_evenly_or_refused(monkeypatch):
    from napari_staindiffuser.config import TrainConfig, preset
    from napari_staindiffuser.ddp import DistContext, plan
    from napari_staindiffuser.pairs import synthetic_pairs
    from napari_staindiffuser.training import train

    ctx = DistContext(rank=1, world_size=4, local_rank=1, device=torch.device("cpu"))
    assert ctx.shard(8) == (2, 2)
    with pytest.raises(ValueError, match="multiple of it; got 6"):
        ctx.shard(6)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert plan("cpu", None) is None  # not under torchrun: one process
    with pytest.raises(ValueError, match="not 'cuda:1'"):
        plan("cuda:1", True)
    pairs = synthetic_pairs(seed=0, n=2, size=32, mpp=2.0)
    with pytest.raises(ValueError, match="environment that torchrun sets"):
        train(TrainConfig(steps=1, batch_size=2), pairs, model_config=preset("tiny"),
              device="cpu", distributed=True)  # fmt: skip


def test_a_rank_builds_its_rows_as_the_whole_batch_has_them():
    from napari_staindiffuser.pairs import make_batch, synthetic_pairs
    from napari_staindiffuser.training import _skip_augment_draws

    pairs = synthetic_pairs(seed=0, n=4, size=32, mpp=2.0)
    kw = dict(image_size=32, stains=("CD3", "CK8/18"), augment=True, color_jitter=0.1)
    whole = make_batch([pairs[i % 4] for i in range(6)], rng=np.random.default_rng(5), **kw)
    rng = np.random.default_rng(5)
    _skip_augment_draws(rng, 3)
    rows = make_batch([pairs[i % 4] for i in range(3, 6)], rng=rng, **kw)
    for k, v in whole.items():
        np.testing.assert_array_equal(rows[k], v[3:], err_msg=k)
    # and the rows do depend on the skipped draws (the check above can fail)
    plain = make_batch([pairs[i % 4] for i in range(3, 6)], rng=np.random.default_rng(5), **kw)
    assert not np.array_equal(plain["he"], whole["he"][3:])


def test_two_processes_train_like_one(tmp_path):
    from napari_staindiffuser.cli import main

    ddp, one = tmp_path / "ddp.safetensors", tmp_path / "one.safetensors"
    res = _torchrun("-m", "napari_staindiffuser.cli", *TRAIN_ARGS, "--out", str(ddp))
    assert res.returncode == 0, res.stdout + res.stderr
    assert ddp.is_file() and not list(tmp_path.glob("*.tmp*"))
    assert res.stdout.count("done after 3 steps") == 1  # rank 1 prints nothing
    assert "2 processes" in res.stdout

    assert main([*TRAIN_ARGS, "--out", str(one)]) == 0
    a, b = _tensors(ddp), _tensors(one)
    assert set(a) == set(b)
    for k in a:  # raw weights, EMA and AdamW state
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=ATOL, err_msg=k)
    # the test can fail: 3 AdamW steps at lr 1e-3 move the weights far beyond ATOL
    from napari_staindiffuser.config import preset
    from napari_staindiffuser.model import StainDiffuser

    torch.manual_seed(1)
    fresh = StainDiffuser(preset("tiny", stains=("CD3", "CK8/18"))).state_dict()
    moved = max(float(np.abs(a[f"model.{k}"] - v.numpy()).max()) for k, v in fresh.items())
    assert moved > 100 * ATOL

    from napari_staindiffuser.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ddp, with_training=True)
    assert ckpt.training.step == 3 and ckpt.provenance["processes"] == 2


_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from napari_staindiffuser.config import TrainConfig, preset
    from napari_staindiffuser.pairs import synthetic_pairs
    from napari_staindiffuser.training import TrainControl, train

    what, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    pairs = synthetic_pairs(seed=0, n=8, size=64, mpp=1.0)

    class Source(list):  # on rank 1 the data becomes unreadable after the first step
        reads = 0

        def __getitem__(self, i):
            Source.reads += 1
            if what == "fail" and rank == 1 and Source.reads > 4:
                raise OSError("planted read failure on rank 1")
            return super().__getitem__(i)

    control = TrainControl()
    if what == "stop" and rank == 1:
        control.request_stop()  # asked on rank 1 only
    events = train(
        TrainConfig(steps=50, batch_size=4, warmup_steps=1, seed=0),
        Source(pairs),
        model_config=preset("tiny"),
        out=out,
        device="cpu",
        control=control,
    )
    print(f"rank {rank} finished: {events[-1]}", flush=True)
    """
)


@pytest.mark.parametrize("what", ["stop", "fail"])
def test_stop_and_failure_reach_every_rank(tmp_path, what):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "m.safetensors"
    t0 = time.monotonic()
    res = _torchrun(str(script), what, str(out), timeout=180)  # a hang would raise TimeoutExpired
    log = res.stdout + res.stderr
    if what == "stop":
        # rank 1's stop request stops rank 0 too, after the same (first) step; rank 0 saves
        assert res.returncode == 0, log
        assert "rank 0 finished: Finished(stopped=True" in log
        assert "rank 1 finished: Finished(stopped=True" in log
        from napari_staindiffuser.model.checkpoint import load_checkpoint

        assert load_checkpoint(out, with_training=True).training.step == 1
    else:
        assert res.returncode != 0, log
        assert "planted read failure on rank 1" in log
        assert "finished" not in log
        assert not out.exists()
    assert time.monotonic() - t0 < 180
