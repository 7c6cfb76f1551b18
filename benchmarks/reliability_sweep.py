"""Reliability sweep: every bad input we can think of, through the CLI, the core jobs and the docks.

Each case builds its input in a temporary folder, runs it, and checks the outcome:

- ``error``: the command exits 2 (or the job raises ValueError/OSError) with a one-line message;
  no traceback, no output file, no temporary file left behind;
- ``ok``: it runs, and what it wrote is complete and readable;
- ``stopped``: a cancel at a random moment ends the job cleanly (no partial file; the previous
  checkpoint, if any, still loads and is unchanged or replaced by a complete one);
- anything else (an uncaught exception, a stray file, a changed checkpoint, a pickle that ran)
  is ``FAIL``.

It prints one Markdown row per case. The napari dock cases are the pytest-qt tests in
tests/test_reliability_docks.py, run in a subprocess (pytest-xvfb gives them a display);
``--no-docks`` skips them.

    xvfb-run -a python benchmarks/reliability_sweep.py [--no-docks] [--seed 0]

``tests/test_reliability.py`` runs the same cases (``CLI_CASES``, ``JOB_CASES``) under pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

TEMP_MARKERS = (".tmp", ".write-test-")


# --------------------------------------------------------------------------- inputs


class _Evil:
    """Unpickling this runs ``touch <marker>``: proof that a file was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def he_patch(size: int = 256) -> np.ndarray:
    """A SYNTHETIC H&E patch with tissue, (size, size, 3) uint8."""
    from napari_staindiffuser.synthetic import SyntheticSlide

    return SyntheticSlide(7, (1024, 1024), 1.0).render(300, 300, size, size).he


def build_inputs(root: Path) -> dict[str, Path]:
    """Write every bad (and one good) input file under ``root``; returns name -> path."""
    from safetensors.torch import save_file

    from napari_staindiffuser.model.checkpoint import bundled_model_path, save_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    he = he_patch()
    rng = np.random.default_rng(0)
    f: dict[str, Path] = {}

    def tif(name: str, a: np.ndarray, **kw) -> None:
        f[name] = root / f"{name}.tif"
        tifffile.imwrite(f[name], a, **kw)

    tif("good", he, photometric="rgb")
    tif("grayscale", he[..., 0])
    tif("rgba", np.dstack([he, np.full(he.shape[:2], 255, np.uint8)]), photometric="rgb")
    tif("16-bit", he.astype(np.uint16) * 257, photometric="rgb")
    tif("float", (he / 255).astype(np.float32), photometric="rgb")
    nan = (he / 255).astype(np.float32)
    nan[rng.random(he.shape[:2]) < 0.01] = np.nan
    tif("NaN", nan, photometric="rgb")
    tif("1x1", he[:1, :1].copy(), photometric="rgb")
    tif("tiny 8x8", he[:8, :8].copy(), photometric="rgb")
    tif("no tissue", np.full((256, 256, 3), 246, np.uint8), photometric="rgb")
    tif("IHC other size", he[:200, :180].copy(), photometric="rgb")
    data = f["good"].read_bytes()
    f["truncated TIFF"] = root / "truncated.tif"
    f["truncated TIFF"].write_bytes(data[: len(data) // 2])
    f["corrupt TIFF"] = root / "corrupt.tif"
    f["corrupt TIFF"].write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    f["not an image"] = root / "notes.png"
    f["not an image"].write_text("this is not a PNG\n")

    model = bundled_model_path().read_bytes()
    f["truncated checkpoint"] = root / "truncated.safetensors"
    f["truncated checkpoint"].write_bytes(model[: len(model) // 2])
    f["foreign safetensors"] = root / "foreign.safetensors"
    save_file({"conv.weight": torch_zeros()}, str(f["foreign safetensors"]), {"format": "pt"})
    f["foreign architecture"] = root / "foreign-arch.safetensors"
    _foreign_architecture(f["foreign architecture"])
    f["pickle as checkpoint"] = root / "evil.safetensors"
    f["pickle as checkpoint"].write_bytes(pickle.dumps({"w": _Evil(str(root / "PWNED"))}))
    f["pickle .pt"] = root / "evil.pt"
    f["pickle .pt"].write_bytes(pickle.dumps({"w": _Evil(str(root / "PWNED"))}))
    f["good checkpoint"] = root / "tiny.safetensors"
    save_checkpoint(f["good checkpoint"], tiny_model(), provenance={"note": "sweep"})
    return f


def torch_zeros():
    import torch

    return torch.zeros(3, 3)


def tiny_model():
    import torch

    from napari_staindiffuser.config import preset
    from napari_staindiffuser.model import StainDiffuser

    torch.manual_seed(0)
    return StainDiffuser(preset("tiny", image_size=32, stains=("CD3", "CK8/18")))


def _foreign_architecture(path: Path) -> None:
    """A real napari-staindiffuser checkpoint whose tensors belong to another architecture:
    the config says ``small`` but the weights are the ``tiny`` network's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from napari_staindiffuser.config import preset
    from napari_staindiffuser.model.checkpoint import save_checkpoint

    tmp = path.with_suffix(".tiny.safetensors")
    save_checkpoint(tmp, tiny_model())
    with safe_open(str(tmp), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    tmp.unlink()
    meta["config"] = preset("small", image_size=32, stains=("CD3", "CK8/18")).to_json()
    save_file(tensors, str(path), meta)


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    case: str
    via: str
    expected: str
    got: str
    message: str
    ok: bool
    seconds: float

    def row(self) -> str:
        msg = self.message.replace("|", "/").replace("\n", " ")
        if len(msg) > 150:
            msg = msg[:147] + "..."
        verdict = "pass" if self.ok else "**FAIL**"
        return (
            f"| {self.case} | {self.via} | {self.expected} | {self.got} | {verdict} | "
            f"{self.seconds:.1f} | {msg} |"
        )


def stray_files(folder: Path) -> list[str]:
    """Temporary or half-written files under ``folder``."""
    if not folder.exists():
        return []
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if any(m in p.name for m in TEMP_MARKERS) or p.name.startswith(".")
    )


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """``staindiffuser ARGV`` in this process: (exit code or 'CRASH ...', last stderr line)."""
    from napari_staindiffuser import cli

    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc: int | str = cli.main(argv)
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    except BaseException as exc:
        return f"CRASH {type(exc).__name__}", str(exc)
    text = err.getvalue()
    at = text.rfind("staindiffuser ")  # the message may follow a progress bar on the same line
    return rc, text[at:].splitlines()[0] if at >= 0 else text.strip()[-300:]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "-"


@contextlib.contextmanager
def small_mount(size_kb: int, read_only: bool = False) -> Iterator[Path | None]:
    """A real tmpfs of ``size_kb`` (or read-only) for the disk-full cases; None when this process
    cannot mount one (not root, or no CAP_SYS_ADMIN): the cases then use a simulated error."""
    point = Path(tempfile.mkdtemp(prefix="sweep-mnt-"))
    opts = f"size={size_kb}k" + (",ro" if read_only else "")
    ok = (
        shutil.which("mount") is not None
        and os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield point if ok else None
    finally:
        if ok:
            subprocess.run(["umount", str(point)], capture_output=True)
        shutil.rmtree(point, ignore_errors=True)


@contextlib.contextmanager
def simulated_oserror(errno_: int, after_bytes: int = 8192) -> Iterator[None]:
    """Without a mountable tmpfs: make every file write fail with ``errno_`` once a file has
    grown past ``after_bytes`` (what a full disk does), for the code under test."""
    import builtins

    real_open = builtins.open
    real_fdopen = os.fdopen

    class _Failing:
        def __init__(self, fh):
            self._fh, self._n = fh, 0

        def write(self, b):
            self._n += len(b)
            if self._n > after_bytes:
                raise OSError(errno_, os.strerror(errno_))
            return self._fh.write(b)

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

    def wrap(opener):
        def _open(file, mode="r", *a, **k):
            fh = opener(file, mode, *a, **k)
            return _Failing(fh) if any(c in mode for c in "wax+") else fh

        return _open

    builtins.open, os.fdopen = wrap(real_open), wrap(real_fdopen)
    try:
        yield
    finally:
        builtins.open, os.fdopen = real_open, real_fdopen


# --------------------------------------------------------------------------- CLI cases

STAIN = ["--steps", "1", "--batch", "8", "--device", "cpu", "--mpp", "1"]


@dataclass(frozen=True)
class CliCase:
    """``argv(inputs, out)`` -> CLI arguments; ``expect``: 'error' (+ message substring) or 'ok'."""

    name: str
    argv: Callable[[dict[str, Path], Path], list[str]]
    expect: str = "error"
    match: str = ""


def _stain(name: str, **kw) -> CliCase:
    return CliCase(
        f"stain: {name}",
        lambda f, out: [
            "stain",
            str(f[name]),
            "--model",
            str(f["good checkpoint"]),
            *STAIN,
            "--out",
            str(out),
        ],
        **kw,
    )


def _masks(name: str, **kw) -> CliCase:
    return CliCase(
        f"masks: {name}",
        lambda f, out: [
            "masks",
            str(f[name]),
            "--stain",
            "CD3",
            "--mpp",
            "1",
            "--out",
            str(out / "mask.ome.tif"),
        ],
        **kw,
    )


def _model(name: str, command: str, **kw) -> CliCase:
    argv = {
        "stain": lambda f, out: [
            "stain",
            str(f["good"]),
            "--model",
            str(f[name]),
            *STAIN,
            "--out",
            str(out),
        ],
        "info": lambda f, out: ["info", str(f[name])],
        "train --init": lambda f, out: [
            "train",
            "--synthetic",
            "2",
            "--init",
            str(f[name]),
            "--steps",
            "1",
            "--batch",
            "2",
            "--out",
            str(out / "t.safetensors"),
        ],
        "train --resume": lambda f, out: [
            "train",
            "--synthetic",
            "2",
            "--resume",
            str(f[name]),
            "--steps",
            "1",
            "--batch",
            "2",
            "--out",
            str(out / "t.safetensors"),
        ],
    }[command]
    return CliCase(f"{command}: {name}", argv, **kw)


CLI_CASES: list[CliCase] = [
    _stain("good", expect="ok"),
    _stain("grayscale", match="grayscale"),
    _stain("rgba", expect="ok"),  # alpha dropped, as documented in docs/io.md
    _stain("16-bit", expect="ok"),  # scaled to 8 bits
    _stain("float", expect="ok"),  # [0, 1] floats scaled to 8 bits
    _stain("NaN", match="NaN"),
    _stain("1x1", match="too small"),
    _stain("tiny 8x8", match="too small"),
    _stain("no tissue", match="no tissue"),
    _stain("truncated TIFF", match="truncated"),
    _stain("corrupt TIFF", match="corrupt"),
    _stain("not an image", match=""),
    CliCase(
        "stain: empty region",
        lambda f, out: [
            "stain",
            str(f["good"]),
            "--region",
            "10,10,0,0",
            *STAIN,
            "--out",
            str(out),
        ],
        match="non-empty",
    ),
    CliCase(
        "stain: region outside the image",
        lambda f, out: [
            "stain",
            str(f["good"]),
            "--region",
            "900,900,50,50",
            *STAIN,
            "--out",
            str(out),
        ],
        match="inside",
    ),
    CliCase(
        "stain: output folder is a file",
        lambda f, out: ["stain", str(f["good"]), *STAIN, "--out", str(f["good"])],
        match="existing file",
    ),
    _masks("grayscale", match="grayscale"),
    _masks("16-bit", expect="ok"),
    _masks("NaN", match="NaN"),
    _masks("no tissue", match="no tissue"),
    _masks("truncated TIFF", match="truncated"),
    _masks("corrupt TIFF", match="corrupt"),
    CliCase(
        "masks: output is a device (/dev/null)",
        lambda f, out: ["masks", str(f["good"]), "--stain", "CD3", "--out", "/dev/null"],
        match="not a regular file",
    ),
    CliCase(
        "patches: H&E/IHC of different sizes",
        lambda f, out: [
            "patches",
            str(f["good"]),
            str(f["IHC other size"]),
            "--stain",
            "CD3",
            "--mpp",
            "1",
            "--out",
            str(out / "pairs"),
        ],
        match="same size",
    ),
    CliCase(
        "patches: empty region",
        lambda f, out: [
            "patches",
            str(f["good"]),
            str(f["good"]),
            "--stain",
            "CD3",
            "--mpp",
            "1",
            "--regions",
            "0,0,0,0",
            "--out",
            str(out / "pairs"),
        ],
        match="",
    ),
]
for _name in (
    "truncated checkpoint",
    "foreign safetensors",
    "foreign architecture",
    "pickle as checkpoint",
    "pickle .pt",
):
    for _cmd in ("stain", "info", "train --init", "train --resume"):
        if _name == "foreign architecture" and _cmd == "info":
            continue  # info reads the JSON config only; the tensors are checked on loading
        CLI_CASES.append(_model(_name, _cmd, match=""))


def run_cli_case(case: CliCase, inputs: dict[str, Path], work: Path) -> Outcome:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    rc, msg = run_cli(case.argv(inputs, out))
    dt = time.perf_counter() - t0
    strays = stray_files(out) + stray_files(inputs["good"].parent)
    pwned = (inputs["good"].parent / "PWNED").exists()
    if isinstance(rc, str):
        got = rc
    elif rc == 0:
        got = "ok"
    elif rc == 2:
        got = "error"
    else:
        got = f"exit {rc}"
    written = sorted(p.name for p in out.rglob("*") if p.is_file())
    ok = got == case.expect and not strays and not pwned
    if case.expect == "error":
        ok = ok and case.match.lower() in msg.lower() and not written and "Traceback" not in msg
    else:
        ok = ok and bool(written) and _all_readable(out)
    note = msg if case.expect == "error" or not ok else f"wrote {len(written)} files"
    if strays:
        note = f"stray files {strays}; " + note
    if pwned:
        note = "THE PICKLE RAN; " + note
    return Outcome(case.name, "CLI", case.expect, got, note, ok, dt)


def _all_readable(folder: Path) -> bool:
    """Every OME-TIFF under ``folder`` reads completely, every level."""
    for p in folder.rglob("*.tif"):
        with tifffile.TiffFile(p) as tf:
            for level in tf.series[0].levels:
                level.asarray()
    return True


# --------------------------------------------------------------------------- job cases
# the core generators, closed at random moments, and the disk cases


def _close_at_random(gen, rng: random.Random, max_events: int) -> int:
    """Drain ``gen`` for a random number of events, then close it; returns events seen."""
    n = rng.randint(1, max_events)
    seen = 0
    for _ in gen:
        seen += 1
        if seen >= n:
            break
    gen.close()
    return seen


def case_cancel_stain(inputs: dict[str, Path], work: Path, rng: random.Random) -> tuple[str, str]:
    from napari_staindiffuser.inference import iter_stain
    from napari_staindiffuser.model.checkpoint import load_checkpoint

    model = load_checkpoint(inputs["good checkpoint"]).model
    out = work / "cancelled-stain"  # streamed to disk: temporary files, then the OME-TIFFs
    gen = iter_stain(he_patch(), model, steps=2, batch=2, seed=0, device="cpu", out_path=out)
    seen = _close_at_random(gen, rng, 12)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if left:
        raise AssertionError(f"a cancelled streamed run left {left} in {out}")
    return "stopped", f"closed after {seen} events; nothing left in the output folder"


def case_cancel_masks(inputs: dict[str, Path], work: Path, rng: random.Random) -> tuple[str, str]:
    from napari_staindiffuser.stain import iter_coarse_masks

    gen = iter_coarse_masks(np.tile(he_patch(), (4, 4, 1)), "CD3", tile=128, threshold=0.1)
    seen = _close_at_random(gen, rng, 20)
    return "stopped", f"closed after {seen} events"


def _train(out: Path, steps: int, resume: Path | None = None):
    from napari_staindiffuser.config import TrainConfig
    from napari_staindiffuser.pairs import synthetic_pairs
    from napari_staindiffuser.training import iter_train

    cfg = tiny_model().config
    pairs = synthetic_pairs(3, 4, stains=list(cfg.stains), size=cfg.image_size, mpp=cfg.mpp)
    return iter_train(
        TrainConfig(steps=steps, batch_size=2, checkpoint_every=2, seed=0),
        pairs,
        model_config=None if resume else cfg,
        resume=resume,
        out=out,
        device="cpu",
    )


def case_cancel_training(
    inputs: dict[str, Path], work: Path, rng: random.Random
) -> tuple[str, str]:
    from napari_staindiffuser.model.checkpoint import load_checkpoint

    ck = work / "run.safetensors"
    for _ in _train(ck, 2):
        pass
    before = sha(ck)
    seen = _close_at_random(_train(ck, 6, resume=ck), rng, 8)
    step = load_checkpoint(ck, with_training=True).training.step if ck.exists() else None
    strays = stray_files(work)
    verdict = "stopped" if step is not None and not strays else "FAIL"
    changed = "replaced by a complete one" if sha(ck) != before else "unchanged"
    return verdict, f"closed after {seen} events; checkpoint loads (step {step}), {changed}"


def case_disk_full(inputs: dict[str, Path], work: Path, rng: random.Random) -> tuple[str, str]:
    with small_mount(256) as mnt:
        folder = mnt if mnt is not None else work / "full"
        folder.mkdir(exist_ok=True)
        if mnt is None:
            with simulated_oserror(28):
                rc, msg = run_cli(_stain_argv(inputs, folder))
            how = "simulated ENOSPC"
        else:
            rc, msg = run_cli(_stain_argv(inputs, folder))
            how = "256 KiB tmpfs"
        left = sorted(p.name for p in folder.rglob("*"))
    verdict = "error" if rc == 2 and not [n for n in left if n.startswith(".")] else "FAIL"
    return verdict, f"{how}: {msg}; left: {left or 'nothing'}"


def case_read_only(inputs: dict[str, Path], work: Path, rng: random.Random) -> tuple[str, str]:
    with small_mount(256, read_only=True) as mnt:
        if mnt is None:
            folder = work / "ro"
            folder.mkdir(exist_ok=True)
            with simulated_oserror(30, after_bytes=0):
                rc, msg = run_cli(_stain_argv(inputs, folder))
            how = "simulated EROFS"
        else:
            rc, msg = run_cli(_stain_argv(inputs, mnt))
            how = "read-only tmpfs"
    return ("error" if rc == 2 else "FAIL"), f"{how}: {msg}"


def case_checkpoint_disk_full(
    inputs: dict[str, Path], work: Path, rng: random.Random
) -> tuple[str, str]:
    """A good checkpoint exists; the next save hits a full disk: it must stay intact."""
    from napari_staindiffuser.model.checkpoint import load_checkpoint

    with small_mount(64 * 1024) as mnt:  # room for the first checkpoint (with Adam state)
        folder = mnt if mnt is not None else work / "ckfull"
        folder.mkdir(exist_ok=True)
        ck = folder / "run.safetensors"
        for _ in _train(ck, 2):
            pass
        before = sha(ck)
        filler = folder / "filler.bin"
        try:
            if mnt is not None:  # leave less room than one more checkpoint needs
                free = shutil.disk_usage(folder).free
                filler.write_bytes(b"\0" * max(0, free - ck.stat().st_size // 2))
                err = _drain_error(_train(ck, 4, resume=ck))
            else:
                with simulated_oserror(28, after_bytes=1024):
                    err = _drain_error(_train(ck, 4, resume=ck))
        finally:
            filler.unlink(missing_ok=True)
        intact = sha(ck) == before and load_checkpoint(ck, with_training=True).training.step == 2
        left = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    how = "64 MiB tmpfs" if mnt is not None else "simulated ENOSPC"
    verdict = "error" if err and intact and not left else "FAIL"
    return verdict, f"{how}: {err}; last good checkpoint intact: {intact}; temp left: {left}"


def _drain_error(gen) -> str:
    try:
        for _ in gen:
            pass
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _stain_argv(inputs: dict[str, Path], out: Path) -> list[str]:
    return [
        "stain",
        str(inputs["good"]),
        "--model",
        str(inputs["good checkpoint"]),
        *STAIN,
        "--out",
        str(out),
    ]


JOB_CASES: dict[str, tuple[str, Callable]] = {
    "cancel staining at a random event": ("stopped", case_cancel_stain),
    "cancel mask computation at a random event": ("stopped", case_cancel_masks),
    "cancel training at a random event (resumed run)": ("stopped", case_cancel_training),
    "disk full while writing stains": ("error", case_disk_full),
    "read-only output folder": ("error", case_read_only),
    "disk full while saving a checkpoint": ("error", case_checkpoint_disk_full),
}


def run_job_case(name: str, inputs, work: Path, rng: random.Random) -> Outcome:
    expected, fn = JOB_CASES[name]
    sub = work / name.replace(" ", "_")
    sub.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        got, msg = fn(inputs, sub, rng)
    except BaseException as exc:
        got, msg = f"CRASH {type(exc).__name__}", str(exc)
    return Outcome(name, "core job", expected, got, msg, got == expected, time.perf_counter() - t0)


# --------------------------------------------------------------------------- dock cases

DOCK_TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_reliability_docks.py"


def run_dock_cases() -> list[Outcome]:
    """The dock cases are pytest-qt tests (they need napari's viewer fixture); run them in a
    subprocess and turn each test into a row."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(DOCK_TESTS), "-q", "-rA", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=DOCK_TESTS.parents[1],
    )
    dt = time.perf_counter() - t0
    rows = []
    for line in proc.stdout.splitlines():
        verdict, _, rest = line.partition(" ")
        if verdict not in ("PASSED", "FAILED", "ERROR") or "::" not in rest:
            continue
        test, _, reason = rest.partition(" - ")
        name = test.split("::", 1)[1].replace("test_", "", 1).replace("_", " ")
        ok = verdict == "PASSED"
        rows.append(Outcome(name, "napari dock", "clean", "clean" if ok else verdict.lower(),
                            reason or "see tests/test_reliability_docks.py", ok, 0.0))  # fmt: skip
    if not rows:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        rows.append(Outcome("dock cases", "napari dock", "clean", "not run", tail[0], False, dt))
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--no-docks", action="store_true", help="skip the napari dock cases (they need Xvfb)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random cancel moments")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    rng = random.Random(args.seed)
    rows: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        work = Path(tmp)
        inputs = build_inputs(work / "inputs")
        for case in CLI_CASES:
            rows.append(run_cli_case(case, inputs, work))
            print(rows[-1].row(), file=sys.stderr, flush=True)
        for name in JOB_CASES:
            rows.append(run_job_case(name, inputs, work, rng))
            print(rows[-1].row(), file=sys.stderr, flush=True)
    if not args.no_docks:
        rows += run_dock_cases()
    print("| case | via | expected | got | verdict | s | message |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(r.row())
    failed = [r.case for r in rows if not r.ok]
    print(f"\n{len(rows)} cases, {len(rows) - len(failed)} pass, {len(failed)} fail")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
