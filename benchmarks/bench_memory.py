"""Memory: opening and panning a 50k x 50k slide, staining a 4k x 4k region, RSS drift.

Prints a Markdown table with three rows (each measured in a fresh Python process, so one row's
memory does not leak into the next):

1. **open + pan**: a 50,000 x 50,000 px pyramidal OME-TIFF (JPEG tiles of 512 px, written once
   to a temporary folder from a few repeated synthetic tiles, then deleted) opened with
   ``io.open_slide`` (lazy dask levels) and read the way napari reads a multiscale layer: a few
   hundred random 1024 x 1024 px viewports at several levels. Goal: peak RSS < 500 MB.
2. **stain 4k x 4k**: ``iter_stain`` over a 4096 x 4096 px region (tiny model, 2 steps,
   batch 8, at the model's µm/px): RSS growth from before the run to its peak, beside what the
   run must hold (the result arrays and one batch; the stitcher keeps one tile-row band and
   assembles the result band by band, with no full-size working buffer).
3. **drift**: 1,000 tiles (tiny model, 1 step) as 10 regions of about 100 tiles; RSS after
   every region; first vs last. Goal: <= 5 %.
4. **stream** (not in the default rows): ``iter_stain`` + OME-TIFFs over square regions of
   ``--stream-sizes`` px with a trivial pointwise tile model (the cost is tiling, stitching,
   resampling and writing, not the network), at 0.499 µm/px for a 0.5 µm/px model (so the
   output is resampled, as with a real slide), in memory (then ``write_stain_outputs``, what
   ``staindiffuser stain`` did for every region) and streamed (``out_path=``): RSS growth from
   before the run to its peak, files included. ``--stream-width W``: regions W px wide and
   ``--stream-sizes`` px tall (the streamed band grows with the width only); ``--stream-only``:
   skip the in-memory runs. Goal: streamed growth does not grow with the region's height.

    python benchmarks/bench_memory.py                  # rows open, stain, drift
    python benchmarks/bench_memory.py --rows open      # one row
    python benchmarks/bench_memory.py --stain-size 2048 --drift-tiles 500   # quicker
    python benchmarks/bench_memory.py --rows stream --stream-sizes 2048 4096 8192 16384
    python benchmarks/bench_memory.py --rows stream --stream-only --stream-width 2048 \
        --stream-sizes 2048 8192 32768

RSS is read from /proc/self/status (VmRSS, VmHWM = peak) on Linux, else psutil. Not a test:
nothing asserts. The file needs about 1 GB of free disk in the temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

MB = 1 << 20
SIDE = 50_000
TILE = 512


def rss() -> tuple[float, float]:
    """(current RSS, peak RSS) in MB."""
    try:
        with open("/proc/self/status") as f:
            vals = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(vals["VmRSS"].split()[0]) / 1024, int(vals["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        import psutil

        info = psutil.Process().memory_info()
        return info.rss / MB, getattr(info, "peak_wset", info.rss) / MB


def reset_peak() -> bool:
    """Reset VmHWM (Linux: write 5 to /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- row 1: a 50k x 50k slide -----------------------------------------------------------------


def _texture_tiles(n: int = 16) -> list[np.ndarray]:
    """A few distinct 512 px H&E-looking tiles (SYNTHETIC tissue, flipped and rotated)."""
    from napari_staindiffuser.synthetic import SyntheticSlide

    he = np.asarray(SyntheticSlide(seed=7, shape=(1024, 1024), mpp=0.5).render(0, 0, 1024, 1024).he)
    quads = [he[y : y + TILE, x : x + TILE] for y in (0, TILE) for x in (0, TILE)]
    out = []
    for i in range(n):
        q = np.rot90(quads[i % 4], i // 4)
        out.append(np.ascontiguousarray(q))
    return out


def write_big_slide(path: str, side: int = SIDE, mpp: float = 0.25) -> list[tuple[int, int]]:
    """A side x side px pyramidal OME-TIFF (JPEG, 512 px tiles; reduced levels as SubIFDs),
    its content repeated texture tiles (the reduced levels reuse them: only the layout and the
    reading cost matter here). Returns the level shapes."""
    import tifffile

    tiles = _texture_tiles()
    shapes = [(side, side)]
    while max(shapes[-1]) > 1024:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))

    def gen(h, w, salt):
        rng = np.random.default_rng(salt)
        for _ in range(-(-h // TILE) * -(-w // TILE)):
            yield tiles[int(rng.integers(len(tiles)))]

    opts = dict(tile=(TILE, TILE), compression="jpeg", photometric="rgb", dtype=np.uint8)
    res = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(
            gen(*shapes[0], 0),
            shape=(*shapes[0], 3),
            subifds=len(shapes) - 1,
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
            **opts,
        )
        for k, (h, w) in enumerate(shapes[1:], 1):
            r = res / 2**k
            tw.write(
                gen(h, w, k),
                shape=(h, w, 3),
                subfiletype=1,
                resolution=(r, r),
                resolutionunit="CENTIMETER",
                **opts,
            )
    return shapes


def row_open(path: str, viewports: int, seed: int = 0) -> dict:
    from napari_staindiffuser.io import open_slide

    base = rss()[0]
    t0 = time.perf_counter()
    slide = open_slide(path)
    t_open = time.perf_counter() - t0
    after_open = rss()[0]
    rng = np.random.default_rng(seed)
    levels = slide.levels[: max(1, len(slide.levels) - 2)]  # the levels a user pans at
    t0 = time.perf_counter()
    px = 0
    for i in range(viewports):
        lv = levels[i % len(levels)]
        h, w = lv.shape[:2]
        vh, vw = min(1024, h), min(1024, w)
        y, x = int(rng.integers(0, h - vh + 1)), int(rng.integers(0, w - vw + 1))
        px += np.asarray(lv[y : y + vh, x : x + vw]).shape[0] * vw
    t_pan = time.perf_counter() - t0
    cur, peak = rss()
    return {
        "what": f"open + pan {slide.shape[1]} x {slide.shape[0]} px, {len(slide.levels)} levels",
        "detail": f"{viewports} random 1024 px viewports over levels 0-{len(levels) - 1}",
        "baseline_mb": base,
        "after_open_mb": after_open,
        "end_mb": cur,
        "peak_mb": peak,
        "seconds": t_open + t_pan,
        "note": f"open {t_open:.2f} s; {px / t_pan / 1e6:.0f} Mpx/s panning",
        "goal": "peak < 500 MB",
        "ok": peak < 500,
    }


# -- rows 2 and 3: staining ------------------------------------------------------------------


def _he_image(side: int, width: int | None = None) -> np.ndarray:
    """A side x width (default side) H&E built from tiled synthetic texture (cheap; content
    barely matters)."""
    width = width or side
    t = _texture_tiles(4)
    row = np.concatenate(t, 1)
    block = np.concatenate([row, np.roll(row, TILE, 1)], 0)  # 1024 x 2048
    reps = (-(-side // block.shape[0]), -(-width // block.shape[1]), 1)
    return np.ascontiguousarray(np.tile(block, reps)[:side, :width])


def _tiny_model():
    import torch

    from napari_staindiffuser.config import preset
    from napari_staindiffuser.model import StainDiffuser

    torch.manual_seed(0)
    return StainDiffuser(preset("tiny")).eval()


def row_stain(side: int, batch: int, steps: int) -> dict:
    from napari_staindiffuser.inference import StainResult, iter_stain, plan_grid

    model = _tiny_model()
    cfg = model.config
    img = _he_image(side)
    kw = dict(steps=steps, batch=batch, device="cpu", image_mpp=cfg.mpp)
    for _ in iter_stain(img[:256, :256], model, **kw):  # warm-up: allocator, lazy init
        pass
    grid, _ = plan_grid(
        (side, side),
        model_tile=cfg.image_size,
        multiple_of=cfg.downsample_factor,
        model_mpp=cfg.mpp,
        image_mpp=cfg.mpp,
    )
    n = len(cfg.stains)
    result = side * side * n * (3 + 1 + 4) / MB  # images uint8 x3, masks bool, scores float32
    # one batch: input tiles, noise/state per branch, encoder features (not the exact peak)
    s = cfg.image_size
    batch_bytes = batch * s * s * 4 * (3 + n * 2 * 3 + 64) / MB
    reset_peak()
    base = rss()[0]
    t0 = time.perf_counter()
    samples = []
    done = 0
    res = None
    for ev in iter_stain(img, model, **kw):
        if isinstance(ev, StainResult):
            res = ev
        elif hasattr(ev, "box"):
            done += 1
            if done % 500 == 0:
                samples.append(rss()[0])
    secs = time.perf_counter() - t0
    cur, peak = rss()
    del res
    need = result + batch_bytes
    return {
        "what": f"stain {side} x {side} px (tiny, {steps} steps, batch {batch})",
        "detail": f"{grid.height} x {grid.width} model px, {len(grid.tiles)} tiles, both stains",
        "baseline_mb": base,
        "end_mb": cur,
        "peak_mb": peak,
        "growth_mb": peak - base,
        "need_mb": need,
        "seconds": secs,
        "note": (
            f"needs: result {result:.0f} MB + batch ~{batch_bytes:.0f} MB; RSS during tiling "
            f"{', '.join(f'{x:.0f}' for x in samples[:6])}{' ...' if len(samples) > 6 else ''}"
        ),
        "goal": "growth <= need",
        "ok": peak - base <= need * 1.1,
    }


def row_drift(tiles: int, per_region: int = 100) -> dict:
    from napari_staindiffuser.inference import iter_stain

    model = _tiny_model()
    cfg = model.config
    stride = cfg.image_size - cfg.image_size // 4 // 2 * 2
    k = max(1, round(per_region**0.5))
    side = k * stride + (cfg.image_size - stride)
    regions = max(1, round(tiles / (k * k)))
    img = _he_image(side + regions)
    kw = dict(steps=1, batch=8, device="cpu", image_mpp=cfg.mpp)
    for _ in iter_stain(img[:side, :side], model, **kw):  # warm-up
        pass
    series = []
    done = 0
    t0 = time.perf_counter()
    for r in range(regions):
        sub = img[r : r + side, r : r + side]  # a shifted region each time
        for ev in iter_stain(sub, model, **kw):
            done += hasattr(ev, "box")
        series.append(rss()[0])
    drift = (series[-1] - series[0]) / series[0] * 100
    return {
        "what": f"RSS drift over {done} tiles (tiny, 1 step, {regions} regions of {k * k})",
        "detail": "RSS after each region (MB): " + ", ".join(f"{x:.0f}" for x in series),
        "baseline_mb": series[0],
        "growth_mb": series[-1] - series[0],
        "end_mb": series[-1],
        "peak_mb": rss()[1],
        "seconds": time.perf_counter() - t0,
        "note": f"first {series[0]:.0f} MB, last {series[-1]:.0f} MB: {drift:+.1f} %",
        "goal": "<= 5 %",
        "ok": abs(drift) <= 5,
    }


# -- row 4: slide-scale staining streamed to OME-TIFF ------------------------------------------


class PointwiseTileModel:
    """A trivial TileModel (a pointwise colour map, a score from the green channel): staining
    costs nothing, so the row measures tiling, stitching, resampling and writing."""

    stains = ("CD3", "CK8/18")
    tile = 64
    multiple_of = 8
    mpp = 0.5

    def run(self, tiles, seeds, stains):
        from napari_staindiffuser.inference import TileOutput

        x = tiles.astype(np.float32) / 255.0
        out = np.stack([x[..., 1] ** 2, 1 - x[..., 0], 0.5 * (x[..., 2] + x[..., 0])], -1)
        yield TileOutput(
            images={s: out if s == "CD3" else 1 - out for s in stains},
            scores={s: out[..., 0] for s in stains},
        )

    def decode_mask(self, stain, score):
        return score > 0.5

    def describe(self):
        return {"model": "pointwise (benchmark)"}


def row_stream(side: int, stream: bool, batch: int, tmpdir: str | None, width: int | None) -> dict:
    from napari_staindiffuser.inference import StainResult, iter_stain
    from napari_staindiffuser.ome_tiff import write_stain_outputs

    model = PointwiseTileModel()
    img = _he_image(side, width)
    width = img.shape[1]
    kw = dict(batch=batch, image_mpp=0.499)
    tmp = tempfile.mkdtemp(prefix="bench-stream-", dir=tmpdir)
    try:
        for _ in iter_stain(img[:256, :256], model, **kw):  # warm-up: imports, allocator
            pass
        n = len(model.stains)
        inputs = img.nbytes / MB
        result = side * width * n * (3 + 1 + 4) / MB  # images uint8 x3, masks bool, scores f32
        reset_peak()
        base = rss()[0]
        t0 = time.perf_counter()
        res = None
        tiles = 0
        for ev in iter_stain(img, model, out_path=tmp if stream else None, **kw):
            if isinstance(ev, StainResult):
                res = ev
            elif hasattr(ev, "box"):
                tiles += 1
        stain_s = time.perf_counter() - t0
        if not stream:
            write_stain_outputs(res, tmp, "image", 0.499)
        secs = time.perf_counter() - t0
        cur, peak = rss()
        files = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / MB
        left = [f for f in os.listdir(tmp) if not f.endswith(".ome.tif")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "what": f"stain {width} x {side} px (w x h) + OME-TIFFs, "
        + ("streamed to disk (out_path)" if stream else "in memory, then written"),
        "detail": f"pointwise tile model, {tiles} tiles of 64 px, 2 stains, 0.499 -> 0.5 um/px",
        "baseline_mb": base,
        "end_mb": cur,
        "peak_mb": peak,
        "growth_mb": peak - base,
        "need_mb": 0 if stream else result,
        "seconds": secs,
        "note": f"input {inputs:.0f} MB (before the baseline); stain {stain_s:.0f} s; "
        f"files {files:.0f} MB" + (f"; LEFT OVER {left}" if left else ""),
        "goal": "growth flat in region size" if stream else "growth ~ result",
        "ok": not left,
    }


# -- driver ------------------------------------------------------------------------------------


def _child(args) -> None:
    if args.child == "open":
        out = row_open(args.file, args.viewports)
    elif args.child == "stain":
        out = row_stain(args.stain_size, args.batch, args.steps)
    elif args.child == "stream":
        out = row_stream(args.stain_size, args.streamed, args.batch, args.tmpdir, args.width)
    else:
        out = row_drift(args.drift_tiles)
    out["load"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print("RESULT " + json.dumps(out))


def _run_child(argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=["open", "stain", "drift"])
    ap.add_argument("--viewports", type=int, default=300)
    ap.add_argument("--side", type=int, default=SIDE, help="slide side for the open row")
    ap.add_argument("--stain-size", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--drift-tiles", type=int, default=1000)
    ap.add_argument("--stream-sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--stream-width", type=int, help="stream row: regions this wide (px)")
    ap.add_argument("--stream-only", action="store_true", help="stream row: skip in-memory runs")
    ap.add_argument("--streamed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmpdir", default=None, help="where to write the big slide")
    ap.add_argument("--child", choices=["open", "stain", "drift", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    import torch

    rows = []
    if "open" in args.rows:
        tmp = tempfile.mkdtemp(prefix="bench-memory-", dir=args.tmpdir)
        try:
            free = shutil.disk_usage(tmp).free / 2**30
            if free < 4:
                raise SystemExit(f"only {free:.1f} GiB free in {tmp}; need ~1 GB (use --tmpdir)")
            path = os.path.join(tmp, "big.ome.tif")
            t0 = time.perf_counter()
            write_big_slide(path, args.side)
            size = os.path.getsize(path) / 2**30
            print(f"wrote {path}: {size:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
            rows.append(_run_child(["--child", "open", "--file", path, "--viewports",
                                    str(args.viewports)]))  # fmt: skip
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if "stain" in args.rows:
        argv = ["--child", "stain", "--stain-size", str(args.stain_size), "--batch",
                str(args.batch), "--steps", str(args.steps)]  # fmt: skip
        rows.append(_run_child(argv))
    if "drift" in args.rows:
        rows.append(_run_child(["--child", "drift", "--drift-tiles", str(args.drift_tiles)]))
    if "stream" in args.rows:
        for side in args.stream_sizes:
            for streamed in (True,) if args.stream_only else (False, True):
                argv = ["--child", "stream", "--stain-size", str(side), "--batch", str(args.batch)]
                argv += ["--tmpdir", args.tmpdir] if args.tmpdir else []
                argv += ["--width", str(args.stream_width)] if args.stream_width else []
                rows.append(_run_child(argv + (["--streamed"] if streamed else [])))
                print(json.dumps(rows[-1]), flush=True)

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
    )
    print("| what | detail | baseline MB | peak MB | growth MB | need MB | s | load | "
          "goal | met | note |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        growth = r.get("growth_mb", r["peak_mb"] - r["baseline_mb"])
        need = f"{r['need_mb']:.0f}" if "need_mb" in r else ""
        print(
            f"| {r['what']} | {r['detail']} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | "
            f"{growth:.0f} | {need} | {r['seconds']:.1f} | {r['load']:.1f} | {r['goal']} | "
            f"{'yes' if r['ok'] else 'NO'} | {r['note']} |"
        )


if __name__ == "__main__":
    main()
