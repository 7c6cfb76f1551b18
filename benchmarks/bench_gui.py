"""Responsiveness of the napari docks: Qt event-loop gaps, run times, cancel latency, opening.

Prints Markdown tables (copy them into docs/performance.md). Needs a display; headless:

    xvfb-run -a python benchmarks/bench_gui.py            # full run, a few minutes on 2 cores
    xvfb-run -a python benchmarks/bench_gui.py --quick    # smaller regions: a smoke run

A 10 ms ``QTimer`` heartbeat records ``time.perf_counter()`` on every tick; a gap between two
ticks is a time the event loop could not react (a click, a repaint). For each phase the script
reports the longest gap and the 99th percentile. Gaps over ``--stall-ms`` are attributed: the
dock slots and vispy paints that ran during them are timed (the script wraps them, in its own
process only); ``--stacks`` also samples the main thread's Python stack while it is late.

1. "Virtual staining" with the bundled model on square regions of the SYNTHETIC sample (a
   Shapes rectangle, the dock's automatic level): (a) the staining phase, from the staining
   worker's start to its end, and (b) the whole run (model preparation, output layers,
   staining); and, for comparison, the same staining by ``iter_stain`` in a plain thread
   before any viewer exists.
2. "Coarse masks" on the SYNTHETIC CD3 IHC: whole-slide statistics, the live preview after a
   slider change, and Compute at a ~1024 px level (and level 0 unless ``--quick``).
3. Cancel latency: ``widget.cancel()`` to the staining worker's ``finished``, mid-run.
4. Opening: importing each dock's module in a fresh interpreter (torch must stay unimported),
   starting napari in a subprocess, and constructing each dock.

Parts 1 and 2 each run in a fresh process with a shown 1280 x 900 viewer. Every timed row says
how much CPU other processes took meanwhile ("others' CPU", Xvfb's drawing included): on a
shared 2-core machine anything above a few % skews the figures (torch slows down most).
Nothing here asserts on time; tests/test_stain_dock.py bounds the staining-phase gap loosely.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

#: level-0 pixel (y, x) of the top-left corner of the staining regions: tissue throughout
REGION_ORIGIN = (2304, 256)
SAMPLE = ("napari-staindiffuser", "synthetic-pair")
WINDOW = (1280, 900)  # napari window, px (xvfb-run's default screen is 1280 x 1024)

# --------------------------------------------------------------------------- timing tools

SLOTS: list[tuple[str, float, float]] = []  # (name, start, end) of every wrapped call


def _wrap(cls: type, name: str, label: str | None = None) -> None:
    """Time every call of ``cls.name`` into SLOTS (this process only)."""
    orig = getattr(cls, name)
    label = label or f"{cls.__name__}.{name}"

    @functools.wraps(orig)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            SLOTS.append((label, t0, time.perf_counter()))

    setattr(cls, name, timed)


class Heartbeat:
    """A 10 ms QTimer that records perf_counter() on every tick."""

    def __init__(self, interval_ms: int = 10) -> None:
        from qtpy.QtCore import Qt, QTimer

        self.beats: list[float] = []
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(lambda: self.beats.append(time.perf_counter()))
        self.running = False

    def start(self) -> None:
        self.beats.append(time.perf_counter())
        self.timer.start()
        self.running = True

    def stop(self) -> None:
        self.running = False
        self.timer.stop()

    def gaps(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        """Gaps (s) between ticks in [t0, t1], with t0 and t1 as the outer ends; and the time
        each gap started."""
        b = np.asarray(self.beats)
        pts = np.concatenate([[t0], b[(b > t0) & (b < t1)], [t1]])
        return np.diff(pts), pts[:-1]


class StallSampler(threading.Thread):
    """Every 10 ms: when the heartbeat is over ``late_s`` late, record the main thread's stack."""

    def __init__(self, hb: Heartbeat, late_s: float = 0.04) -> None:
        super().__init__(daemon=True, name="stall-sampler")
        self.hb, self.late_s = hb, late_s
        self.main = threading.main_thread().ident
        # (last beat, now, main thread's stack, other threads' stacks)
        self.samples: list[tuple[float, float, list, list]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            beats = self.hb.beats
            if not beats or not self.hb.running:
                continue
            last, now = beats[-1], time.perf_counter()
            if now - last < self.late_s:
                continue
            frames = sys._current_frames()
            me = threading.get_ident()
            main = _raw_stack(frames.get(self.main))
            others = [_raw_stack(f) for t, f in frames.items() if t not in (me, self.main)]
            self.samples.append((last, now, main, others))


def _raw_stack(frame: Any) -> list[tuple[str, int, str]]:
    """(file, line, function) of a frame and its callers, outermost first; no source read."""
    out = []
    while frame is not None:
        out.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return out[::-1]


#: innermost functions of an idle thread (waiting on a lock, a queue, a timer)
IDLE = {"wait", "_wait_for_tstate_lock", "get", "select", "poll", "sleep", "run", "_worker"}

_PKGS = ("napari_staindiffuser", "napari", "vispy", "magicgui", "superqt", "psygnal", "dask")
_PKGS += ("numpy", "skimage", "scipy", "qtpy", "app_model", "pint", "tqdm")


def _short(filename: str, lineno: int, name: str) -> str:
    path = filename.replace(os.sep, "/")
    for pkg in _PKGS:
        key = f"/{pkg}/"
        if key in path:
            return f"{pkg}/{path.split(key, 1)[1]}:{lineno} {name}"
    return f"{os.path.basename(path)}:{lineno} {name}"


def _interesting(raw: list, n: int = 4) -> str:
    """The innermost ``n`` frames of a stack that are in a known package, innermost last."""
    stack = [_short(*f) for f in raw]
    keep = [s for s in stack if s.split("/", 1)[0] in _PKGS]
    return " > ".join(keep[-n:]) if keep else (stack[-1] if stack else "?")


def wait_until(cond, timeout: float, what: str = "condition") -> None:
    """Run the Qt event loop until ``cond()`` is true (checked every 20 ms; the measured times
    come from signals, not from this check)."""
    from qtpy.QtCore import QEventLoop, QTimer

    if cond():
        return
    loop = QEventLoop()
    check = QTimer()
    check.setInterval(20)
    check.timeout.connect(lambda: cond() and loop.quit())
    deadline = QTimer()
    deadline.setSingleShot(True)
    deadline.timeout.connect(loop.quit)
    check.start()
    deadline.start(int(timeout * 1000))
    loop.exec()
    check.stop()
    deadline.stop()
    if not cond():
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def spin(seconds: float) -> None:
    """Run the event loop for ``seconds``."""
    t_end = time.perf_counter() + seconds
    wait_until(lambda: time.perf_counter() >= t_end, seconds + 5)


def settle(hb: Heartbeat, quiet_s: float = 0.5, max_gap_s: float = 0.03, timeout: float = 60):
    """Run the event loop until no gap over ``max_gap_s`` happened for ``quiet_s``."""
    t_end = time.perf_counter() + timeout
    while time.perf_counter() < t_end:
        spin(0.1)
        now = time.perf_counter()
        gaps, _ = hb.gaps(now - quiet_s, now)
        if gaps.size and gaps.max() < max_gap_s:
            return
    print(f"(warning: the event loop did not settle within {timeout:.0f} s)", file=sys.stderr)


class Phase:
    """A measured window [t0, t1] of the event loop."""

    def __init__(self, name: str, hb: Heartbeat, t0: float, t1: float) -> None:
        self.name, self.t0, self.t1 = name, t0, t1
        self.gaps, self.starts = hb.gaps(t0, t1)

    @property
    def wall(self) -> float:
        return self.t1 - self.t0

    @property
    def max_ms(self) -> float:
        return 1000.0 * float(self.gaps.max())

    @property
    def p99_ms(self) -> float:
        return 1000.0 * float(np.percentile(self.gaps, 99))

    def over(self, ms: float) -> int:
        return int((self.gaps > ms / 1000.0).sum())

    def stalls(self, ms: float) -> list[tuple[float, float]]:
        """(start, length s) of every gap over ``ms``, longest first."""
        sel = self.gaps > ms / 1000.0
        out = list(zip(self.starts[sel], self.gaps[sel], strict=True))
        return sorted(out, key=lambda s: -s[1])


STALL_NOTES: list[str] = []


def attribute(phase: Phase, sampler: StallSampler | None, ms: float, top: int = 6) -> None:
    """Note what ran on the main thread during the gaps of ``phase`` over ``ms``."""
    stalls = phase.stalls(ms)
    if not stalls:
        return
    STALL_NOTES.append(
        f"\n{phase.name}: {len(stalls)} gap(s) over {ms:.0f} ms, "
        f"{1000 * sum(g for _, g in stalls):.0f} ms in all"
    )
    for start, gap in stalls[:top]:
        end = start + gap
        ran = [(n, a, b) for n, a, b in SLOTS if a < end and b > start]
        # slots that ran inside the gap, by time spent inside it (nested calls included)
        spent: Counter = Counter()
        for n, a, b in ran:
            spent[n] += min(b, end) - max(a, start)
        slots = ", ".join(f"{n} {1000 * s:.0f} ms" for n, s in spent.most_common(4)) or "none"
        STALL_NOTES.append(f"  {1000 * gap:6.0f} ms at +{start - phase.t0:6.2f} s: {slots}")
        if sampler is not None:
            inside = [smp for smp in sampler.samples if start <= smp[0] < end]
            stacks = Counter(_interesting(smp[2]) for smp in inside)
            for stack, k in stacks.most_common(2):
                STALL_NOTES.append(f"      main, {k} sample(s): {stack}")
            # what the other threads were doing (a worker holding the GIL shows up here)
            busy = Counter(
                _interesting(st, 3)
                for smp in inside
                for st in smp[3]
                if st and st[-1][2] not in IDLE
            )
            for stack, k in busy.most_common(2):
                STALL_NOTES.append(f"      other thread, {k} sample(s): {stack}")


def slot_table() -> str:
    """Calls, total, mean and max duration of every timed call, most total time first."""
    by: dict[str, list[float]] = {}
    for n, a, b in SLOTS:
        by.setdefault(n, []).append(b - a)
    rows = [
        [n, len(d), sum(d), 1000 * sum(d) / len(d), 1000 * max(d)]
        for n, d in sorted(by.items(), key=lambda kv: -sum(kv[1]))
    ]
    return table(["call", "calls", "total s", "mean ms", "max ms"], rows)


def table(cols: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 1 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- opening


def _subprocess_time(code: str, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{code!r} failed:\n{r.stderr[-2000:]}")
    return wall, r.stdout.strip()


def bench_opening(repeats: int, env: dict) -> list[list[Any]]:
    """Import of each dock module in a fresh interpreter, and napari start-up, in subprocesses
    (one warm-up each, then ``repeats``; median and max)."""
    rows = []
    for mod in ("_stain_dock", "_mask_dock"):
        code = (
            "import sys, time; t = time.perf_counter(); "
            f"import napari_staindiffuser._widgets.{mod}; dt = time.perf_counter() - t; "
            "print(dt, 'torch' in sys.modules, 'napari' in sys.modules)"
        )
        _subprocess_time(code, env)
        times, torch_in, napari_in = [], set(), set()
        for _ in range(repeats):
            _, out = _subprocess_time(code, env)
            dt, t_in, n_in = out.split()[-3:]
            times.append(float(dt))
            torch_in.add(t_in)
            napari_in.add(n_in)
        rows.append(
            [
                f"import `napari_staindiffuser._widgets.{mod}` (fresh interpreter)",
                1000 * float(np.median(times)),
                1000 * max(times),
                f"torch imported: {'/'.join(sorted(torch_in))}; "
                f"napari imported: {'/'.join(sorted(napari_in))}",
            ]
        )
    code = "import napari; v = napari.Viewer(show=False); v.close()"
    _subprocess_time(code, env)
    times = [_subprocess_time(code, env)[0] for _ in range(repeats)]
    rows.append(
        [
            f'`python -c "{code}"` (whole process)',
            1000 * float(np.median(times)),
            1000 * max(times),
            "plugin installed (npe2)",
        ]
    )
    return rows


DOCKS_CODE = """
import json, sys, time
import napari
from napari_staindiffuser._widgets._mask_dock import CoarseMaskWidget
from napari_staindiffuser._widgets._stain_dock import StainWidget
from qtpy.QtWidgets import QApplication

viewer = napari.Viewer(show=False)
viewer.open_sample("napari-staindiffuser", "synthetic-pair")
out, masks = [], []
for cls, label in ((StainWidget, "Virtual staining"), (CoarseMaskWidget, "Coarse masks")):
    for k in (1, 2):
        t0 = time.perf_counter()
        w = cls(viewer)
        t1 = time.perf_counter()
        viewer.window.add_dock_widget(w, name=label)
        out.append([label, k, t1 - t0, time.perf_counter() - t1])
        QApplication.processEvents()
        if cls is CoarseMaskWidget:
            masks.append(w)
print(json.dumps(out))
t_end = time.perf_counter() + 120  # let the mask docks' statistics workers end
while any(m._stats_pending for m in masks) and time.perf_counter() < t_end:
    QApplication.processEvents()
    time.sleep(0.01)
viewer.close()
"""


def bench_docks(env: dict) -> list[list[Any]]:
    """Constructing each dock (twice) in a fresh process, a hidden viewer with the SYNTHETIC
    sample open; then ``add_dock_widget``. The docks' modules are imported before timing; the
    first construction still pays first reads (the bundled model's metadata, the settings)."""
    import json

    _, out = _subprocess_time(DOCKS_CODE, env)
    rows = []
    for label, k, make, add in json.loads(out.splitlines()[-1]):
        rows.append(
            [
                f"construct the {label} dock ({'first' if k == 1 else 'second'} time)",
                1000 * make,
                "",
                f"then add_dock_widget: {1000 * add:.0f} ms",
            ]
        )
    return rows


# --------------------------------------------------------------------------- staining


def cpu_snapshot() -> tuple[float, float] | None:
    """(CPU seconds used by the whole machine, by this process) so far; None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)  # - idle, iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def others_share(start: tuple[float, float] | None, wall: float) -> str:
    """How much of the machine's CPUs other processes (Xvfb included) used since ``start``."""
    end = cpu_snapshot()
    if start is None or end is None or wall <= 0:
        return "?"
    other = (end[0] - start[0]) - (end[1] - start[1])
    return f"{100 * max(other, 0.0) / (wall * (os.cpu_count() or 1)):.0f} %"


def bench_core(side: int, args) -> list[Any]:
    """The same staining without napari: ``iter_stain`` in a plain thread, same region,
    settings and model (loaded and warmed up first, as the dock's preparation does)."""
    from napari_staindiffuser._widgets._sample_data import SYNTHETIC_MPP, synthetic_paired_slide
    from napari_staindiffuser._widgets._stain_worker import _load_model
    from napari_staindiffuser.checkpoint_meta import bundled_model_path
    from napari_staindiffuser.inference import TileStained, iter_stain, time_batch

    he = synthetic_paired_slide()[0][0][1]  # level 1: 1 µm/px, the model's
    model, device = _load_model(bundled_model_path(), "auto")
    time_batch(model, batch=args.batch, stains=list(model.config.stains), sampler="dpmsolver++")
    y, x = (v // 2 for v in REGION_ORIGIN)
    box = (y, x, side // 2, side // 2)
    np.asarray(he[y : y + box[2], x : x + box[3]])  # render the synthetic chunk first
    out: dict[str, Any] = {"tiles": 0}

    def job() -> None:
        t0 = time.perf_counter()
        for ev in iter_stain(
            he,
            model,
            region=box,
            steps=args.steps,
            batch=args.batch,
            device=device,
            image_mpp=2 * SYNTHETIC_MPP,
        ):
            if isinstance(ev, TileStained):
                out["tiles"] += 1
        out["s"] = time.perf_counter() - t0

    cpu0 = cpu_snapshot()
    th = threading.Thread(target=job)
    th.start()
    th.join()
    return [
        f"{side} x {side}, core only (no viewer)",
        out["tiles"],
        out["s"],
        out["tiles"] / out["s"],
        others_share(cpu0, out["s"]),
    ]


def _square(viewer: Any, origin: tuple[int, int], side: int, mpp0: float) -> Any:
    """A Shapes layer with one rectangle over a square of the H&E (level-0 pixels); hidden, never
    removed, after use: under Xvfb/llvmpipe, napari 0.9.2 segfaults in glDrawArrays on a later
    draw once a Shapes layer has been removed (a plain image and one rectangle reproduce it)."""
    y, x = origin
    rect = np.array([[y, x], [y + side, x + side]], float) * mpp0
    name = f"region {side} px"
    if name in viewer.layers:
        viewer.layers[name].visible = True
        return viewer.layers[name]
    he = viewer.layers["SYNTHETIC H&E"]
    units = {"units": tuple(str(u) for u in he.units)} if getattr(he, "units", None) else {}
    return viewer.add_shapes(
        [rect], shape_type="rectangle", name=name, face_color="transparent", **units
    )


def _look_at(viewer: Any, origin: tuple[int, int], side: int, mpp0: float) -> None:
    """Centre the camera on a square and zoom so that it fills about 3/4 of the canvas."""
    from napari_staindiffuser._widgets._common import camera

    cam = camera(viewer)
    y, x = origin
    cam.center = ((y + side / 2) * mpp0, (x + side / 2) * mpp0)
    cam.zoom = 0.75 * min(viewer.canvas.size) / (side * mpp0)


def _remove_outputs(viewer: Any) -> None:
    from napari_staindiffuser._widgets._common import OUTPUT_KEY

    for layer in [ly for ly in viewer.layers if ly.metadata.get(OUTPUT_KEY)]:
        viewer.layers.remove(layer)


class StainRun:
    """One run of the staining dock, timed; ``t_worker``: the staining worker started."""

    def __init__(self, widget: Any) -> None:
        self.widget = widget
        self.t_worker: float | None = None
        self.t_finished: float | None = None  # the main thread handled ``finished``
        self.t_stopped: float | None = None  # the worker thread emitted ``finished``
        orig = widget._on_prepared

        def on_prepared(*args: Any) -> None:
            from qtpy.QtCore import Qt

            before = widget.worker
            orig(*args)
            if widget.worker is not None and widget.worker is not before:
                self.t_worker = time.perf_counter()
                widget.worker.finished.connect(self._finished)
                widget.worker.finished.connect(self._stopped, Qt.ConnectionType.DirectConnection)

        widget._on_prepared = on_prepared  # the dock looks it up when preparation returns
        self._restore = lambda: widget.__dict__.pop("_on_prepared", None)

    def _finished(self) -> None:
        self.t_finished = time.perf_counter()

    def _stopped(self) -> None:  # in the worker thread
        self.t_stopped = time.perf_counter()

    def start(self) -> float:
        self.widget.worker = None
        t0 = time.perf_counter()
        if self.widget.run() is None:
            raise RuntimeError(f"the staining dock did not start: {ERRORS[-1:]}")
        return t0

    def wait(self, timeout: float) -> None:
        try:
            wait_until(
                lambda: (
                    not self.widget.running
                    and (self.t_finished is not None or self.t_worker is None)
                ),
                timeout,
                "the staining run",
            )
        finally:
            self._restore()
        if ERRORS:
            raise RuntimeError(f"the staining dock reported: {ERRORS[-1]}")
        if self.t_finished is None:
            raise RuntimeError(f"the staining worker never started: {self.widget._status.value}")


ERRORS: list[str] = []
T_START = time.perf_counter()


def log(what: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f} s] {what}", file=sys.stderr, flush=True)


def bench_staining(viewer, hb, sampler, args, mpp0) -> tuple[list, list]:
    from napari_staindiffuser._widgets import _stain_dock

    widget = _stain_dock.StainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Virtual staining")
    widget.confirm_above_s = 1e9  # never ask
    widget._region.value = _stain_dock.REGION_SHAPES
    widget._steps.value = args.steps
    widget._batch.value = args.batch
    widget._samples.value = 1
    rows = []
    for side in args.sizes:
        shapes = _square(viewer, REGION_ORIGIN, side, mpp0)
        _remove_outputs(viewer)
        _look_at(viewer, REGION_ORIGIN, side, mpp0)
        widget._shapes.value = shapes
        settle(hb)
        log(f"staining {side} px")
        run = StainRun(widget)
        base = widget.tiles_seen  # counts over all runs of the dock
        cpu0 = cpu_snapshot()
        t0 = run.start()
        run.wait(args.timeout)
        t1 = run.t_finished
        others = others_share(cpu0, time.perf_counter() - t0)
        whole = Phase(f"staining {side} px, whole run", hb, t0, t1)
        stain = Phase(f"staining {side} px, staining phase", hb, run.t_worker, t1)
        layers = sum(b - a for n, a, b in SLOTS if n.endswith("_create_layers") and a >= t0)
        tiles = widget.tiles_seen - base
        job_level = widget._ctx["level"]
        box = widget._ctx["job"].boxes[0]
        rows.append(
            [
                f"{side} x {side} (level {job_level}: {box[3]} x {box[2]})",
                tiles,
                whole.wall,
                tiles / stain.wall,
                run.t_worker - t0,
                layers,
                stain.max_ms,
                stain.p99_ms,
                stain.over(args.stall_ms),
                whole.max_ms,
                whole.p99_ms,
                whole.over(args.stall_ms),
                others,
            ]
        )
        log(f"  {tiles} tiles in {whole.wall:.1f} s (staining {stain.wall:.1f} s), others {others}")
        attribute(stain, sampler, args.stall_ms)
        attribute(whole, sampler, args.stall_ms)
        shapes.visible = False  # not removed: see _square
        settle(hb)

    # cancel latency: mid-run, on the largest region
    side = max(args.sizes)
    shapes = _square(viewer, REGION_ORIGIN, side, mpp0)
    widget._shapes.value = shapes
    settle(hb)
    cancels = []
    for k in range(args.cancels):
        run = StainRun(widget)
        base = widget.tiles_seen  # counts over all runs of the dock
        run.start()
        wait_until(lambda b=base: widget.tiles_seen > b, args.timeout, "the first tile")
        spin(0.25 * k)  # land at different points of a sampler step
        tiles = widget.tiles_seen - base
        t_cancel = time.perf_counter()
        widget.cancel()
        run.wait(args.timeout)
        t1 = run.t_finished
        # main-thread work between the cancel and the handled ``finished``: tile events still
        # queued, then the abort (layers marked, a notification)
        spent: Counter = Counter()
        count: Counter = Counter()
        for n, a, b in SLOTS:
            if t_cancel <= a < t1 and n.split(".")[-1] in ("_on_event", "_on_aborted"):
                spent[n.split(".")[-1]] += b - a
                count[n.split(".")[-1]] += 1
        slots = ", ".join(f"{n} x{count[n]} {1000 * v:.0f} ms" for n, v in spent.items())
        cancels.append(
            [
                k + 1,
                f"{tiles} / {widget._ctx['total']}",
                1000 * (run.t_stopped - t_cancel),
                1000 * (t1 - t_cancel),
                slots or "-",
            ]
        )
        attribute(Phase(f"cancel {k + 1}", hb, t_cancel, t1), sampler, args.stall_ms)
        settle(hb)
    ERRORS.clear()  # the cancelled runs' notices are not errors
    shapes.visible = False
    _remove_outputs(viewer)
    return rows, cancels  # the dock stays open, as a user's would


# --------------------------------------------------------------------------- masks


def bench_masks(viewer, hb, sampler, args, mpp0) -> list:
    from napari_staindiffuser._widgets import _mask_dock

    ihc = viewer.layers["SYNTHETIC CD3 IHC"]
    for layer in viewer.layers:
        layer.visible = layer is ihc
    viewer.reset_view()
    settle(hb)
    widget = _mask_dock.CoarseMaskWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Coarse masks")
    widget._live.value = True
    rows = []

    # whole-slide statistics: selecting the layer starts them
    t0 = time.perf_counter()
    widget._ihc.value = ihc
    wait_until(lambda: widget._cached_stats(ihc) is not None, args.timeout, "DAB statistics")
    ph = Phase("masks: statistics", hb, t0, time.perf_counter())
    rows.append(["whole-slide DAB statistics (on choosing the layer)", "-", ph])
    attribute(ph, sampler, args.stall_ms)
    spin(0.5)  # the preview the statistics asked for
    settle(hb)

    done: list[float] = []
    orig = widget._on_preview

    def on_preview(gen, *a: Any) -> None:
        orig(gen, *a)
        if gen == widget._preview_gen:
            done.append(time.perf_counter())

    widget._on_preview = on_preview  # looked up on the instance by the worker's callback

    def preview(label: str, ks: list[float]) -> None:
        phases = []
        for k in ks:
            settle(hb)
            n = len(done)
            t0 = time.perf_counter()
            widget._k.value = k
            wait_until(lambda n=n: len(done) > n, args.timeout, "the preview")
            phases.append(Phase(f"masks: preview ({label}), k={k}", hb, t0, done[-1]))
        worst = max(phases, key=lambda p: p.max_ms)
        meta = viewer.layers[f"mask preview ({ihc.name})"].metadata
        px = viewer.layers[f"mask preview ({ihc.name})"].data.shape
        where = f"level {meta['level']}, stride {meta['stride']}: {px[1]} x {px[0]}"
        wall = max(p.wall for p in phases)
        rows.append([f"live preview, {label} (slider change to layer; max of {len(ks)})", where])
        rows[-1].append((wall, worst))
        for p in phases:
            attribute(p, sampler, args.stall_ms)

    preview("whole slide in view", [2.5, 1.5, 2.0])
    side = max(args.sizes)
    _look_at(viewer, REGION_ORIGIN, side, mpp0)
    settle(hb)
    spin(0.5)  # the preview of the new view
    preview(f"{side} px region in view", [2.5, 1.5, 2.0])
    widget._live.value = False
    viewer.reset_view()
    settle(hb)

    for level in args.mask_levels:
        log(f"compute level {level}")
        widget._level.value = level
        cpu0 = cpu_snapshot()
        t0 = time.perf_counter()
        worker = widget.compute()
        if worker is None:
            raise RuntimeError(f"Compute did not start: {ERRORS[-1:]}")
        wait_until(lambda: not widget.running, args.timeout, "Compute")
        ph = Phase(f"masks: compute level {level}", hb, t0, time.perf_counter())
        ph.others = others_share(cpu0, ph.wall)
        h, w = widget.last_result["mask"].shape
        add = sum(b - a for n, a, b in SLOTS if n.endswith("_on_compute_returned") and a >= ph.t0)
        rows.append([f"Compute (layers added in {1000 * add:.0f} ms)", f"level {level}: {w} x {h}"])
        rows[-1].append(ph)
        attribute(ph, sampler, args.stall_ms)
        settle(hb)
    if ERRORS:
        raise RuntimeError(f"the mask dock reported: {ERRORS[-1]}")
    return rows


# --------------------------------------------------------------------------- main


def _gl_renderer(viewer: Any) -> str:
    try:
        from vispy.gloo import gl

        canvas = viewer.window._qt_viewer.canvas._scene_canvas
        canvas.set_current()
        return f"{gl.glGetParameter(gl.GL_RENDERER)} ({gl.glGetParameter(gl.GL_VERSION)})"
    except Exception as exc:  # informative only
        return f"unknown ({exc})"


def _print_staining(args, stain_rows: list, cancels: list, core_row: list) -> None:
    print(
        f"Virtual staining, bundled model, {args.steps} steps dpmsolver++, batch {args.batch}, "
        "1 sample, both stains (SYNTHETIC H&E, Shapes rectangle, level auto); gaps in ms:\n"
    )
    cols = ["region, level-0 px", "tiles", "run s", "tiles/s", "start s", "layers s"]
    cols += ["staining max", "staining p99", f"staining >{args.stall_ms:.0f}"]
    cols += ["whole max", "whole p99", f"whole >{args.stall_ms:.0f}", "others' CPU"]
    print(table(cols, stain_rows))
    print(
        "\nrun s: run() to the staining worker's end; tiles/s over the staining phase; start s: "
        "run() to the staining worker's start (model, estimate, layers); layers s: output-layer "
        f"creation; >{args.stall_ms:.0f}: gaps over {args.stall_ms:.0f} ms; others' CPU: share "
        "of the machine's CPU time that other processes (Xvfb included) used meanwhile.\n"
    )
    print("The same staining without napari (`iter_stain` in a plain thread, no viewer yet):\n")
    print(table(["region, level-0 px", "tiles", "s", "tiles/s", "others' CPU"], [core_row]))
    print()
    print(f"Cancel latency (largest region, batch {args.batch}):\n")
    cols = ["run", "tiles done at cancel", "worker stopped ms", "finished handled ms"]
    print(table([*cols, "main-thread slots meanwhile"], cancels))
    print(
        f"\nmax: {max(c[3] for c in cancels):.0f} ms from `cancel()` to the dock's `finished` "
        "slot; worker stopped: the worker thread emitted `finished`.\n"
    )


def _print_masks(args, mask_rows: list) -> None:
    print("Coarse masks, SYNTHETIC CD3 IHC; gaps in ms:\n")
    rows = []
    for what, where, ph in mask_rows:
        wall, ph = ph if isinstance(ph, tuple) else (ph.wall, ph)
        others = getattr(ph, "others", "")
        rows.append([what, where, wall, ph.max_ms, ph.p99_ms, ph.over(args.stall_ms), others])
    cols = ["action", "level, px", "wall s", "max", "p99", f">{args.stall_ms:.0f}", "others' CPU"]
    print(table(cols, rows))
    print()


def run_part(args) -> None:
    """One part (staining or masks) in this process: a shown viewer with the SYNTHETIC sample."""
    import napari
    import qtpy
    import torch

    from napari_staindiffuser._widgets import _mask_dock, _stain_dock

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    for name in ("_on_prepared", "_create_layers", "_on_event", "_on_tile", "_start_region"):
        _wrap(_stain_dock.StainWidget, name)
    for name in ("_finish_region", "_on_finished", "_on_aborted", "_mark_partial", "run"):
        _wrap(_stain_dock.StainWidget, name)
    for name in ("_run_preview", "_on_preview", "_on_compute_event", "_on_compute_returned"):
        _wrap(_mask_dock.CoarseMaskWidget, name)
    for name in ("_on_compute_finished", "_on_stats", "compute"):
        _wrap(_mask_dock.CoarseMaskWidget, name)
    from vispy.app.backends import _qt as vispy_qt

    _wrap(vispy_qt.CanvasBackendDesktop, "paintGL", "vispy paintGL")
    from napari.components import ViewerModel

    for name in ("add_image", "add_labels"):  # napari's own cost of a new layer
        _wrap(ViewerModel, name, f"napari {name}")
    from napari.layers import Layer
    from napari.utils import progress

    _wrap(Layer, "refresh", "napari Layer.refresh")
    for name in ("update", "set_description"):  # napari's progress bar processes Qt events
        _wrap(progress, name, f"napari progress.{name}")
    from magicgui.backends._qtpy import widgets as mgui_qt
    from napari._qt.widgets.qt_progress_bar import QtLabeledProgressBar

    _wrap(mgui_qt.ProgressBar, "_mgui_set_value", "magicgui ProgressBar.value =")
    for name in ("setValue", "setDescription"):  # each calls QApplication.processEvents()
        _wrap(QtLabeledProgressBar, name, f"napari QtLabeledProgressBar.{name}")

    def record(exc: BaseException, action: str) -> None:
        ERRORS.append(f"{action}: {exc}")
        print(f"(dock error) {action}: {exc}", file=sys.stderr)

    _stain_dock.notify_error = record
    _mask_dock.notify_error = record

    if args.part == "staining":
        from napari_staindiffuser._widgets import _stain_worker

        log("core only")
        core_row = bench_core(min(args.sizes), args)
        log(f"  {core_row[1]} tiles in {core_row[2]:.1f} s, others {core_row[4]}")
        _stain_worker._MODEL_CACHE.clear()  # the dock's first run loads the model, as a user's
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*WINDOW)
    hb = Heartbeat()
    hb.start()
    sampler = StallSampler(hb) if args.stacks else None
    if sampler is not None:
        sampler.start()
    settle(hb)
    t0 = time.perf_counter()
    viewer.open_sample(*SAMPLE)
    settle(hb)
    t_sample = time.perf_counter() - t0
    SLOTS.clear()  # the sample's own layers are not part of the measure
    mpp0 = float(viewer.layers["SYNTHETIC H&E"].scale[-1])
    try:
        if args.part == "staining":
            stain_rows, cancels = bench_staining(viewer, hb, sampler, args, mpp0)
        else:
            mask_rows = bench_masks(viewer, hb, sampler, args, mpp0)
    finally:
        hb.stop()
        if sampler is not None:
            sampler.done.set()
    canvas = tuple(viewer.canvas.size)
    print(
        f"[{args.part}] torch {torch.__version__} ({torch.get_num_threads()} threads), napari "
        f"{napari.__version__}, {qtpy.API_NAME} {qtpy.QT_VERSION}; OpenGL: "
        f"{_gl_renderer(viewer)}; canvas {canvas[1]} x {canvas[0]} px; open_sample until "
        f"drawn {t_sample:.1f} s; 1-min load average at the end {os.getloadavg()[0]:.1f}\n"
    )
    viewer.close()
    if args.part == "staining":
        _print_staining(args, stain_rows, cancels, core_row)
    else:
        _print_masks(args, mask_rows)
    print(f"Main-thread time by timed call ({args.part}; nested calls counted in each):\n")
    print(slot_table())
    print()
    if STALL_NOTES:
        print(f"Gaps over {args.stall_ms:.0f} ms ({args.part}): the slots and paints that ran")
        print("inside each (ms inside the gap), and the sampled main-thread stacks:")
        print("\n".join(STALL_NOTES) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small regions, coarse mask level only")
    p.add_argument("--sizes", nargs="+", type=int, help="region sides, level-0 px")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cancels", type=int, help="cancel repeats (default 3, --quick 1)")
    p.add_argument("--mask-levels", nargs="+", type=int, help="Compute levels (default 2 0)")
    p.add_argument("--repeats", type=int, help="subprocess repeats (default 3, --quick 1)")
    p.add_argument("--stall-ms", type=float, default=100.0, help="gaps to attribute")
    p.add_argument(
        "--stacks",
        action="store_true",
        help="also sample the main thread's Python stack during gaps (adds a thread that wakes "
        "every 10 ms and takes the GIL: it perturbs what it measures)",
    )
    p.add_argument("--timeout", type=float, default=240.0, help="per wait, seconds")
    p.add_argument("--keep-config", action="store_true", help="use the real napari settings")
    p.add_argument(
        "--torch-threads", type=int, help="torch.set_num_threads() first (default: torch's own)"
    )
    p.add_argument(
        "--parts",
        nargs="+",
        choices=["opening", "staining", "masks"],
        default=["opening", "staining", "masks"],
        help="what to measure; staining and masks each run in a fresh process",
    )
    p.add_argument("--part", choices=["staining", "masks"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.sizes = args.sizes or ([128, 256] if args.quick else [256, 512])
    args.cancels = args.cancels or (1 if args.quick else 3)
    args.mask_levels = args.mask_levels or ([3] if args.quick else [2, 0])
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.part:
        run_part(args)
        return

    tmp = None
    if not args.keep_config:  # napari and the plugin write settings: keep the user's intact
        tmp = tempfile.TemporaryDirectory(prefix="bench_gui_")
        os.environ["XDG_CONFIG_HOME"] = os.path.join(tmp.name, "config")
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp.name, "cache")
    env = dict(os.environ)
    load0 = os.getloadavg()[0]
    if load0 > 1.0:
        log(f"warning: load average {load0:.1f} at start: other processes skew the figures")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; 10 ms heartbeat; 1-min load average at start "
        f"{load0:.1f}\n"
    )
    failed = []
    if "opening" in args.parts:
        log("opening (subprocesses)")
        opening = bench_opening(args.repeats, env) + bench_docks(env)
        print("Opening:\n")
        print(table(["what", "ms (median)", "ms (max)", "note"], opening))
        print()
    for part in ("staining", "masks"):
        if part not in args.parts:
            continue
        log(part)
        cmd = [sys.executable, os.path.abspath(__file__), *_child_args(args), "--part", part]
        sys.stdout.flush()
        r = subprocess.run(cmd, env=env, check=False)
        if r.returncode != 0:
            failed.append(f"{part} (exit status {r.returncode})")
    log(f"done in {time.perf_counter() - T_START:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


def _child_args(args) -> list[str]:
    out = ["--sizes", *map(str, args.sizes), "--steps", str(args.steps)]
    out += ["--batch", str(args.batch), "--cancels", str(args.cancels)]
    out += ["--mask-levels", *map(str, args.mask_levels), "--stall-ms", str(args.stall_ms)]
    out += ["--timeout", str(args.timeout)]
    if args.torch_threads:
        out += ["--torch-threads", str(args.torch_threads)]
    return out + (["--stacks"] if args.stacks else [])


if __name__ == "__main__":
    main()
