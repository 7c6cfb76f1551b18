"""Stain as you pan, in the staining dock: live layers fed by a background tile scheduler.

:class:`LiveController` turns the dock's settings into a :class:`~napari_staindiffuser.live.
LiveStainer` (running in a ``thread_worker``) and one multiscale RGBA layer per ticked stain,
``live CD3 (<H&E>)``, whose levels are :class:`~napari_staindiffuser.live.LiveLevel` array-likes
over the tile cache, placed exactly over the H&E. On every camera change (debounced) it sends the
tiles in view, nearest the centre first, to the scheduler; as tiles arrive it refreshes the
layers at most a few times a second. The main thread never runs the model: it only renders
cached tiles when napari slices the layers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ._common import (
    add_or_replace,
    camera,
    image_levels,
    layer_mpp,
    level_downsample,
    notify_error,
    placed_like,
    visible_box,
)
from ._lifetime import while_open

__all__ = ["MAX_LIVE_TILES", "LiveController"]

#: most tiles stained for one view (nearest the centre); beyond it the status says "zoom in"
MAX_LIVE_TILES = 256
#: tiles per network call in live mode (a batch is what a pan can abandon)
LIVE_BATCH = 4
DEBOUNCE_MS = 150
REFRESH_MS = 250
CACHE_BYTES = 512 << 20


def _load_tile_model(path: Path, device: str, sampler: str, steps: int):
    from napari_staindiffuser.inference import DiffusionTileModel

    from ._stain_worker import _load_model

    model, _ = _load_model(path, device)
    return DiffusionTileModel(model, sampler=sampler, steps=steps, name=path.name)


class LiveController:
    """The live mode of a :class:`StainWidget` (``dock``).

    Test hooks: ``stainer`` (the scheduler; ``stainer.stats``), ``worker``, ``layers`` (stain ->
    layer), ``tiles_seen``, ``on`` (whether live mode runs), ``update_view()`` (send the view
    now, without waiting for the debounce).
    """

    def __init__(self, dock: Any):
        from qtpy.QtCore import QTimer

        from napari_staindiffuser.live import TileCache

        self.dock = dock
        self.viewer = dock.viewer
        self.cache = TileCache(CACHE_BYTES)
        self.stainer = None
        self.worker = None
        self.layers: dict[str, Any] = {}
        self.tiles_seen = 0
        self.on = False
        self._he = None
        self._hashes: dict[tuple, str] = {}
        self._last_status = 0.0
        self._last_refresh = 0.0
        self._debounce = QTimer()
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self.update_view)
        self._refresh = QTimer()
        self._refresh.setSingleShot(True)
        self._refresh.setInterval(REFRESH_MS)
        self._refresh.timeout.connect(self._refresh_layers)
        self._connected = False

    # ----------------------------------------------------------------------- on / off

    def start(self) -> bool:
        """Start (or restart with the dock's current settings); False when the input is bad."""
        self.stop()
        try:
            stainer, he, level = self._make_stainer()
        except (ValueError, TypeError, OSError) as exc:
            notify_error(exc, "Stain as you pan")
            return False
        self.stainer, self._he = stainer, he
        self._make_layers(he, stainer)
        self._connect_camera(True)
        self.on = True
        from napari.qt.threading import create_worker

        # events of a previous stainer (still finishing its sampler step) are ignored
        worker = create_worker(
            stainer.run,
            _start_thread=False,
            _connect={"errored": lambda exc, s=stainer: self._on_error(exc, s)},
        )
        worker.yielded.connect(lambda ev, s=stainer: self._on_event(ev, s))
        self.worker = worker
        worker.start()
        self.update_view()
        self.dock._status.value = (
            f"stain as you pan: level {level}, {stainer.grid.core} px cores "
            f"(+{stainer.grid.halo} px halo) · loading the model…"
        )
        return True

    @property
    def lifetime(self) -> Any:
        """The dock's :class:`~._lifetime.DockLifetime`: once the dock is closed, the
        callbacks below do nothing (the dock's close stops live mode)."""
        return self.dock.lifetime

    def stop(self) -> None:
        """Stop the scheduler (at its next sampler step); the layers keep the cached tiles."""
        self._debounce.stop()
        self._refresh.stop()
        self._connect_camera(False)
        if self.stainer is not None:
            self.stainer.stop()
        if self.worker is not None and self.worker.is_running:
            self.worker.quit()
        self.on = False

    def restart_if_on(self, *_: Any) -> None:
        """Settings changed: a running live mode restarts with them (the cache keeps tiles whose
        key did not change). Without an H&E layer left it turns off, quietly: that is also what
        closing the viewer does first (it removes every layer)."""
        if not self.on:
            return
        if self.dock._he.value is None:  # the H&E layer was removed (or the viewer is closing)
            self.stop()
            self.dock._live.value = False
            self.dock._status.value = "stain as you pan: off (the H&E layer was removed)"
            return
        self.start()

    # ----------------------------------------------------------------------- setup

    def _model_id(self, path: Path) -> str:
        from napari_staindiffuser.checkpoint_meta import model_hash

        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._hashes:
            self._hashes[key] = model_hash(path)
        return self._hashes[key]

    def _make_stainer(self):
        import numpy as np

        from napari_staindiffuser.live import LiveGrid, LiveStainer

        d = self.dock
        he, stains, level, data = d.checked_input()
        cfg = d._config
        if data.dtype != np.uint8:
            raise ValueError(
                f"'{he.name}' must be an 8-bit RGB image for live staining; got {data.dtype}"
            )
        image = data[..., :3] if data.shape[2] == 4 else data
        mpp0 = layer_mpp(he)
        ds = level_downsample(he, level)
        grid = LiveGrid.for_model(
            image.shape[:2],
            level=level,
            model_tile=cfg.image_size,
            model_mpp=cfg.mpp,
            level_mpp=mpp0 * max(ds) if mpp0 else None,
            downsample=ds,
            multiple_of=cfg.downsample_factor,
        )
        path = Path(d._model.value)
        device, sampler, steps = d._device.value, d._sampler.value, int(d._steps.value)
        stainer = LiveStainer(
            image,
            lambda: _load_tile_model(path, device, sampler, steps),
            grid,
            stains=stains,
            seed=int(d._seed.value),
            cache=self.cache,
            model_id=self._model_id(path),
            sampler=sampler,
            steps=steps,
            batch=max(1, min(int(d._batch.value), LIVE_BATCH)),
        )
        return stainer, he, level

    def _make_layers(self, he: Any, stainer: Any) -> None:
        from napari_staindiffuser.live import live_levels

        shapes = [lv.shape for lv in image_levels(he)]
        h0, w0 = shapes[0][:2]
        place = placed_like(he, 0, (0, 0, h0, w0))
        self.layers = {}
        for st in stainer.stains:
            levels = live_levels(
                shapes, stainer.grid, lambda st=st, s=stainer: (s.cache, _key_fn(s, st))
            )
            meta = {
                "stain": st,
                "live": True,
                "provenance": {
                    "content": f"live virtual {st} (cached tiles; not saved with the run)",
                    "model_sha256": stainer.key_base[0],
                    "sampler": stainer.key_base[1],
                    "steps": stainer.key_base[2],
                    "seed": stainer.key_base[3],
                    "level": stainer.key_base[4],
                    "tile": stainer.grid.tile,
                    "halo": stainer.grid.halo,
                },
            }
            self.layers[st] = add_or_replace(
                self.viewer,
                levels,
                "image",
                f"live {st} ({he.name})",
                rgb=True,
                multiscale=True,
                contrast_limits=(0, 255),
                metadata=meta,
                **place,
            )

    def _connect_camera(self, on: bool) -> None:
        if on == self._connected:
            return
        cam = camera(self.viewer)
        events = (cam.events.center, cam.events.zoom, self.viewer.dims.events.ndisplay)
        for ev in events:
            if on:
                ev.connect(self._on_camera)
            else:
                ev.disconnect(self._on_camera)
        self._connected = on

    # ----------------------------------------------------------------------- view and tiles

    def _on_camera(self, _event=None) -> None:
        # not restarted while pending: the view is sent 150 ms after a change, and every 150 ms
        # during a continuous pan (a plain debounce would wait for the drag to end)
        if not self._debounce.isActive():
            self._debounce.start()

    def visible(self) -> tuple[list, int]:
        """The tiles in view, nearest the centre first (capped), and how many were left out."""
        try:
            box0 = visible_box(self.viewer, self._he)
        except ValueError:
            return [], 0
        tiles = self.stainer.grid.visible_tiles(box0)
        return tiles[:MAX_LIVE_TILES], max(0, len(tiles) - MAX_LIVE_TILES)

    @while_open
    def update_view(self) -> None:
        if self.stainer is None or not self.on:
            return
        tiles, capped = self.visible()
        self.stainer.set_view(tiles, capped)

    @while_open
    def _on_event(self, ev: Any, stainer: Any = None) -> None:
        from napari_staindiffuser.live import LiveStatus, LiveTile

        if stainer is not None and stainer is not self.stainer:
            return
        if isinstance(ev, LiveTile):
            self.tiles_seen += 1
            wait_ms = REFRESH_MS - 1000 * (time.perf_counter() - self._last_refresh)
            if wait_ms <= 0:  # at most one redraw every REFRESH_MS, the first one at once
                self._refresh.stop()
                self._refresh_layers()
            elif not self._refresh.isActive():
                self._refresh.start(int(wait_ms) + 1)
        elif isinstance(ev, LiveStatus):
            now = time.perf_counter()
            if now - self._last_status >= REFRESH_MS / 1000 or ev.queued == 0:
                self._last_status = now
                self._show_status(ev)

    def _show_status(self, ev: Any) -> None:
        rate = f" · {ev.tiles_per_s:.2g} tiles/s" if ev.tiles_per_s else ""
        text = f"live: {ev.computed} stained · {ev.queued} queued · {ev.cached} cached{rate}"
        if ev.cancelled or ev.dropped:
            text += f" · {ev.cancelled + ev.dropped} left the view"
        if ev.capped:
            text += f"\n{ev.capped} more tiles in view: zoom in to stain them"
        if self.dock._status.value != text:
            self.dock._status.value = text

    @while_open
    def _refresh_layers(self) -> None:
        self._last_refresh = time.perf_counter()
        for layer in self.layers.values():
            if layer in self.viewer.layers:
                layer.refresh()

    @while_open
    def _on_error(self, exc: BaseException, stainer: Any = None) -> None:
        notify_error(exc, "Stain as you pan")
        if stainer is not None and stainer is not self.stainer:
            return
        self.stop()
        self.dock._live.value = False


def _key_fn(stainer: Any, stain: str):
    return lambda r, c: stainer.key(r, c, stain)
