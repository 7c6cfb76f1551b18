"""Stain as you pan: pan-to-tile latency, tiles/s and main-thread gaps while panning.

Prints Markdown tables (copy them into docs/performance.md). Needs a display; headless:

    OMP_NUM_THREADS=1 xvfb-run -a python benchmarks/bench_live.py            # 20 steps
    OMP_NUM_THREADS=1 xvfb-run -a python benchmarks/bench_live.py --steps 4  # a smoke run

The bundled model on the SYNTHETIC sample (read level 1, 1 µm/px, the model's), batch 4:

1. Core, no viewer: ``iter_stain`` over a square region versus :class:`live.LiveStainer` over
   the same number of tiles (both in a plain thread, the model loaded and warmed up first).
2. The dock's live mode in a shown 1280 x 900 viewer: (a) from a camera jump to a new part of
   the tissue until the live layer is first redrawn with a tile of the new view (the dock's
   150 ms debounce and its redraw throttle included), for ``--pans`` jumps; (b) a continuous
   pan (the camera moved by 1 µm 60 times a second for ``--drag-s`` seconds, like a mouse
   drag) while tiles are computed: the longest gap of a 10 ms QTimer heartbeat (the time the
   event loop could not react), its 99th percentile and the gaps over 100 ms; the same while
   idle.

Every row says how much CPU other processes took meanwhile; on a shared machine anything above
a few % skews the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_gui import (
    SAMPLE,
    WINDOW,
    Heartbeat,
    cpu_snapshot,
    others_share,
    settle,
    spin,
    table,
    wait_until,
)

ORIGIN = (2304, 256)  # level-0 px of a tissue area of the SYNTHETIC sample
JUMPS = ((200, 0), (0, 200), (200, 200))  # µm from the first view's centre
CROP = (2048, 0)  # level-0 px: corner of the in-memory piece of the sample (without --lazy)
ERRORS: list[str] = []


def bench_core(args) -> list[list[Any]]:
    from napari_staindiffuser._widgets._sample_data import SYNTHETIC_MPP, synthetic_paired_slide
    from napari_staindiffuser._widgets._stain_worker import _load_model
    from napari_staindiffuser.checkpoint_meta import bundled_model_path
    from napari_staindiffuser.inference import (
        DiffusionTileModel,
        TileStained,
        iter_stain,
        time_batch,
    )
    from napari_staindiffuser.live import LiveGrid, LiveStainer, TileCache

    he = synthetic_paired_slide()[0][0][1]  # level 1: 1 µm/px
    model, device = _load_model(bundled_model_path(), "auto")
    cfg = model.config
    time_batch(model, batch=args.batch, stains=list(cfg.stains), sampler="dpmsolver++")
    y, x = (v // 2 for v in ORIGIN)
    side = args.side
    box = (y, x, side, side)
    np.asarray(he[y : y + side + 64, x : x + side + 64])  # render the synthetic chunks first
    rows = []

    def timed(job) -> tuple[int, float, str]:
        out: dict[str, Any] = {}

        def run() -> None:
            t0 = time.perf_counter()
            out["n"] = job()
            out["s"] = time.perf_counter() - t0

        cpu0 = cpu_snapshot()
        th = threading.Thread(target=run)
        th.start()
        th.join()
        return out["n"], out["s"], others_share(cpu0, out["s"])

    def core() -> int:
        n = 0
        for ev in iter_stain(
            he,
            model,
            region=box,
            steps=args.steps,
            batch=args.batch,
            device=device,
            image_mpp=2 * SYNTHETIC_MPP,
        ):
            n += isinstance(ev, TileStained)
        return n

    n, s, other = timed(core)
    rows.append([f"iter_stain, {side} x {side} px region", n, s, n / s, other])
    grid = LiveGrid.for_model(
        he.shape[:2],
        level=1,
        model_tile=cfg.image_size,
        model_mpp=cfg.mpp,
        level_mpp=2 * SYNTHETIC_MPP,
        downsample=2.0,
    )
    tm = DiffusionTileModel(model, sampler="dpmsolver++", steps=args.steps)
    st = LiveStainer(
        np.asarray(he[: grid.shape[0], : grid.shape[1]]) if args.in_memory else he,
        tm,
        grid,
        stains=list(cfg.stains),
        seed=0,
        cache=TileCache(),
        model_id="bench",
        sampler="dpmsolver++",
        steps=args.steps,
        batch=args.batch,
    )
    r0, c0 = (int(v // grid.core) for v in (y, x))
    k = max(1, round(np.sqrt(n)))
    tiles = [(r0 + i, c0 + j) for i in range(k) for j in range(k)]

    def live() -> int:
        st.set_view(tiles)
        list(st.run(until_idle=True))
        return st.stats.computed

    n2, s2, other2 = timed(live)
    rows.append([f"LiveStainer, {k} x {k} tiles", n2, s2, n2 / s2, other2])
    SEAMS.extend(seam_ratio(st, tiles, stain) for stain in cfg.stains)
    return rows


SEAMS: list[tuple[str, float, float]] = []


def seam_ratio(st: Any, tiles: list, stain: str) -> tuple[str, float, float]:
    """Mean |difference| (0-255, mean over RGB) between horizontally and vertically adjacent
    pixels that straddle a tile border, and between all other adjacent pixels, in the live
    mosaic of ``tiles`` (model px): a seam shows as the first being larger."""
    from napari_staindiffuser.live import LiveLevel

    g = st.grid
    lv = LiveLevel(
        (g.n_rows * g.core, g.n_cols * g.core),
        g,
        g.downsample,
        lambda: (st.cache, lambda r, c: st.key(r, c, stain)),
    )
    r0, c0 = min(t[0] for t in tiles), min(t[1] for t in tiles)
    r1, c1 = max(t[0] for t in tiles) + 1, max(t[1] for t in tiles) + 1
    k = g.core
    m = lv[r0 * k : r1 * k, c0 * k : c1 * k, :3].astype(np.float32)
    dx = np.abs(np.diff(m, axis=1)).mean(-1)  # (H, W-1): pair (j, j+1)
    dy = np.abs(np.diff(m, axis=0)).mean(-1)
    border_x = (np.arange(dx.shape[1]) % k) == k - 1
    border_y = (np.arange(dy.shape[0]) % k) == k - 1
    at = np.concatenate([dx[:, border_x].ravel(), dy[border_y].ravel()])
    off = np.concatenate([dx[:, ~border_x].ravel(), dy[~border_y].ravel()])
    return stain, float(at.mean()), float(off.mean())


def bench_render() -> list[list[Any]]:
    """Main-thread cost of drawing: a 900 x 1300 px region of each level of an 8192 px slide
    whose 86 x 86 tiles (read level 1, 1 µm/px, 64 px tiles) are all cached."""
    from napari_staindiffuser.live import LiveGrid, TileCache, TileKey, live_levels

    g = LiveGrid.for_model(
        (4096, 4096), level=1, model_tile=64, model_mpp=1.0, level_mpp=1.0, downsample=2.0
    )
    cache = TileCache(1 << 30)
    rng = np.random.default_rng(0)

    def key(r: int, c: int) -> TileKey:
        return TileKey("m", "s", 1, 0, 1, r, c, "A")

    for r in range(g.n_rows):
        for c in range(g.n_cols):
            cache.put(key(r, c), rng.integers(0, 255, (g.core, g.core, 4), np.uint8))
    shapes = [(8192, 8192), (4096, 4096), (2048, 2048), (1024, 1024)]
    rows = []
    for k, lv in enumerate(live_levels(shapes, g, lambda: (cache, key))):
        t = time.perf_counter()
        lv[0:1, 0:1]  # a painted level paints every cached tile on its first call
        first = time.perf_counter() - t
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            lv[1000:1900, 1000:2300]
            ts.append(time.perf_counter() - t)
        kind = "painted canvas" if lv.use_canvas else "tiles drawn per call"
        rows.append([k, f"{lv.shape[0]} x {lv.shape[1]}", kind, 1000 * min(ts), 1000 * first])
    return rows


def bench_gui(args) -> tuple[list, list, str]:
    import napari
    import torch

    from napari_staindiffuser._widgets import _live, _stain_dock
    from napari_staindiffuser._widgets._common import camera
    from napari_staindiffuser._widgets._sample_data import synthetic_paired_slide
    from napari_staindiffuser.live import LiveLevel, LiveTile

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    def record(exc: BaseException, action: str) -> None:
        ERRORS.append(f"{action}: {exc}")
        print(f"(dock error) {action}: {exc}", file=sys.stderr)

    _stain_dock.notify_error = record
    _live.notify_error = record
    viewer = napari.Viewer(show=True)
    viewer.window.resize(*WINDOW)
    hb = Heartbeat()
    hb.start()
    settle(hb)
    if args.lazy:  # the sample as it is: napari renders its procedural chunks on the main thread
        viewer.open_sample(*SAMPLE)
        y, x = ORIGIN
    else:  # a 1024 x 1024 px piece of it in memory, so that only the live layer costs
        he_levels, kw, _ = synthetic_paired_slide()[0]
        y0, x0 = CROP
        pyramid = [
            np.asarray(lv[y0 >> k : (y0 + 1024) >> k, x0 >> k : (x0 + 1024) >> k])
            for k, lv in enumerate(he_levels)
        ]
        kw = {k: v for k, v in kw.items() if k in ("scale", "units", "rgb", "contrast_limits")}
        viewer.add_image(pyramid, name="SYNTHETIC H&E", multiscale=True, **kw)
        y, x = ORIGIN[0] - y0, ORIGIN[1] - x0
    settle(hb)
    he = viewer.layers["SYNTHETIC H&E"]
    mpp0 = float(he.scale[-1])
    widget = _stain_dock.StainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget._steps.value = args.steps
    widget._batch.value = args.batch
    widget._he.value = he
    cam = camera(viewer)
    cam.zoom = args.zoom  # screen px per µm
    cam.center = (y * mpp0, x * mpp0)
    settle(hb)
    live = widget.live
    arrivals: list[tuple[float, int, int]] = []
    redraws: list[float] = []

    refresh_s: list[float] = []
    render_s: list[float] = []
    orig_render = LiveLevel.render

    def render(self, *a: Any) -> Any:
        t = time.perf_counter()
        out = orig_render(self, *a)
        render_s.append(time.perf_counter() - t)
        return out

    LiveLevel.render = render

    def refresh(self) -> None:  # the throttle's QTimer calls it too: wrap the class
        t = time.perf_counter()
        orig_refresh(self)
        redraws.append(time.perf_counter())
        refresh_s.append(redraws[-1] - t)

    orig_refresh = _live.LiveController._refresh_layers
    _live.LiveController._refresh_layers = refresh
    live._refresh.timeout.disconnect()
    live._refresh.timeout.connect(live._refresh_layers)
    orig_on_event = _live.LiveController._on_event

    def on_event(self, ev: Any, *a: Any) -> None:  # the tile's arrival, before its redraw
        if isinstance(ev, LiveTile):
            arrivals.append((time.perf_counter(), ev.row, ev.col))
        orig_on_event(self, ev, *a)

    _live.LiveController._on_event = on_event
    widget._live.value = True
    st = live.stainer
    t_on = time.perf_counter()
    wait_until(lambda: bool(arrivals), 600, "the first live tile")
    first_tile_s = arrivals[0][0] - t_on
    wait_until(lambda: not st.queue(), 1200, "the first view")
    n_view = len(st._wanted)
    rows = []
    old = set(st._wanted)
    for i in range(args.pans):  # jump to a fresh part of the tissue
        cpu0 = cpu_snapshot()
        t0 = time.perf_counter()
        jy, jx = JUMPS[i % len(JUMPS)]  # µm from the start, 200 µm or more apart
        cam.center = (y * mpp0 + jy, x * mpp0 + jx)
        wait_until(lambda o=old: set(st._wanted) not in (o, set()), 10, "the new view")
        new = set(st._wanted)
        wait_until(
            lambda n=new, t0=t0: any((r, c) in n and t > t0 for t, r, c in arrivals),
            600,
            "a new tile",
        )
        t_tile = next(t for t, r, c in arrivals if t > t0 and (r, c) in new)
        wait_until(lambda t1=t_tile: any(t >= t1 for t in redraws), 10, "the redraw")
        t_shown = next(t for t in redraws if t >= t_tile)
        gaps, _ = hb.gaps(t0, t_shown)
        rows.append(
            [
                f"jump {i + 1}",
                len(new),
                t_tile - t0,
                t_shown - t0,
                1000 * gaps.max(),
                others_share(cpu0, t_shown - t0),
            ]
        )
        old = new
        spin(0.5)
    # a continuous drag while the worker computes
    from qtpy.QtCore import QTimer

    gap_rows = []
    for label, moving in (("drag while staining", True), ("idle, nothing to stain", False)):
        if not moving:
            wait_until(lambda: not st.queue(), 1200, "the queue to empty")
        c0 = np.asarray(cam.center, float)
        n_before = st.stats.computed
        cpu0 = cpu_snapshot()
        t0 = time.perf_counter()
        ticks = [0]

        def step(ticks=ticks, moving=moving, c0=c0) -> None:
            ticks[0] += 1
            if moving:
                c = c0.copy()
                c[-1] -= 1.0 * ticks[0]  # 60 µm/s to the left
                cam.center = tuple(c)

        timer = QTimer()
        timer.setInterval(16)
        timer.timeout.connect(step)
        timer.start()
        spin(args.drag_s)
        timer.stop()
        t1 = time.perf_counter()
        gaps, _ = hb.gaps(t0, t1)
        gap_rows.append(
            [
                label,
                t1 - t0,
                st.stats.computed - n_before,
                1000 * gaps.max(),
                1000 * np.percentile(gaps, 99),
                int((gaps > 0.1).sum()),
                others_share(cpu0, t1 - t0),
            ]
        )
        old = set(st._wanted)
    stats = st.status()
    widget._live.value = False
    wait_until(lambda: not live.worker.is_running, 120, "the live worker to stop")
    hb.stop()
    note = (
        f"first view: {n_view} tiles in view; model load + first tile {first_tile_s:.1f} s; "
        f"live tiles/s while busy {stats.tiles_per_s or 0:.2f}; cancelled {stats.cancelled}, "
        f"dropped {stats.dropped}; layer refreshes {len(refresh_s)}, max "
        f"{1000 * max(refresh_s, default=0):.0f} ms; LiveLevel.render calls {len(render_s)}, "
        f"max {1000 * max(render_s, default=0):.1f} ms; canvas {tuple(viewer.canvas.size)}; torch "
        f"{torch.get_num_threads()} threads"
    )
    viewer.close()
    return rows, gap_rows, note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--side", type=int, default=160, help="iter_stain region side, level-1 px")
    p.add_argument("--pans", type=int, default=3)
    p.add_argument("--drag-s", type=float, default=4.0)
    p.add_argument("--zoom", type=float, default=4.0, help="screen px per µm")
    p.add_argument("--torch-threads", type=int, default=0)
    p.add_argument("--in-memory", action="store_true", help="LiveStainer on a numpy level")
    p.add_argument("--skip-core", action="store_true")
    p.add_argument("--lazy", action="store_true", help="the lazy sample, not an in-memory crop")
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    if not args.skip_core:
        core = bench_core(args)
        print(f"Tiles/s, bundled model, {args.steps} steps, batch {args.batch} (no viewer):\n")
        cols = ["run", "tiles", "s", "tiles/s", "others' CPU"]
        print(table(cols, core))
        print()
        print("Seams between live tiles (mean |difference| of adjacent pixels, 0-255):\n")
        cols = ["stain", "across a tile border", "elsewhere"]
        print(table(cols, [list(r) for r in SEAMS]))
        print()
    print("Drawing a 900 x 1300 px region of a live layer, all tiles cached (main thread):\n")
    cols = ["level", "px", "how", "ms (min of 5)", "first call ms"]
    print(table(cols, bench_render()))
    print()
    rows, gap_rows, note = bench_gui(args)
    print("Pan to the first new tile shown (live mode; includes the 150 ms debounce):\n")
    cols = ["pan", "tiles in view", "to tile s", "to redraw s", "max gap ms", "others' CPU"]
    print(table(cols, rows))
    print()
    print("Main-thread heartbeat gaps (10 ms QTimer):\n")
    cols = ["phase", "s", "tiles", "max ms", "p99 ms", ">100", "others' CPU"]
    print(table(cols, gap_rows))
    print()
    print(
        f"{note}; 1-min load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    if ERRORS:
        print("errors:", *ERRORS, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
