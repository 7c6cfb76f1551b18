"""When a dock is closed while its background jobs run: stop them, and ignore what they send.

napari closes a dock in two ways, and neither tells the dock's own code:

* the dock's close button ("x", :meth:`QtViewerDockWidget.destroyOnClose`) and
  ``viewer.window.remove_dock_widget`` take the dock's widget out of the window with
  ``setParent(None)``: the widget is not deleted (Python still holds it) but is gone from the
  screen, and a new dock is made when the user opens it again from the Plugins menu;
* closing the viewer (``viewer.close()``, the window's close button) clears the layers and then
  deletes the window and every widget in it: Qt emits ``destroyed`` for the dock's widget, and
  anything that touches one of its widgets afterwards raises ``RuntimeError: wrapped C/C++ object
  ... has been deleted``.

:class:`DockLifetime` watches for both (a ``ParentChange`` event that leaves the widget without a
parent, and ``destroyed``), and also treats a viewer whose window is gone as closed. It then runs
the dock's ``on_close`` once, which asks the workers to stop, and :func:`while_open` turns the
dock's worker callbacks into no-ops. ``on_close`` may run while Qt is deleting the widgets, so it
must only set flags (``worker.quit()``, a stop control) and disconnect from the viewer's events,
never touch a Qt widget.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["DockLifetime", "while_open"]

_log = logging.getLogger("napari_staindiffuser")


def _event_filter_class() -> type:
    from qtpy.QtCore import QEvent, QObject

    class _ParentWatcher(QObject):
        """Calls ``docked()`` when the watched widget gets a parent, and ``removed()`` when it
        loses it after having one."""

        def __init__(self, docked: Callable[[], None], removed: Callable[[], None]) -> None:
            super().__init__()
            self._docked, self._removed = docked, removed
            self._was_docked = False

        def eventFilter(self, obj: Any, event: Any) -> bool:  # Qt calls it by this name
            if event.type() == QEvent.Type.ParentChange:
                if obj.parent() is not None:
                    self._was_docked = True
                    self._docked()
                elif self._was_docked:
                    self._removed()
            return False

    return _ParentWatcher


class DockLifetime:
    """Whether a dock is still open; runs ``on_close`` once when napari closes it.

    Parameters
    ----------
    widget : magicgui Container
        The dock (its ``native`` QWidget is what napari puts into the dock and takes out).
    viewer : napari.Viewer
    on_close : callable
        Called once, with no argument, when the dock is closed: ask the workers to stop and
        disconnect from the viewer. It must not touch Qt widgets (they may be being deleted).

    A closed dock stays closed: napari makes a new dock when the user opens it again.

    ``destroyed`` is watched only while the widget has a parent (the dock, in napari's window):
    Qt then deletes it with the window. A widget without a parent belongs to Python, which
    deletes it during garbage collection, when no Python code may run safely.
    """

    def __init__(self, widget: Any, viewer: Any, on_close: Callable[[], None]) -> None:
        self._viewer = viewer
        self._on_close = on_close
        self._closed = False
        self._native = widget.native
        self._on_destroyed_connected = False
        self._watcher = _event_filter_class()(self._docked, self._removed)
        self._native.installEventFilter(self._watcher)

    def _docked(self) -> None:
        if not self._on_destroyed_connected and not self._closed:
            self._native.destroyed.connect(self._on_destroyed)  # a bound method: held weakly
            self._on_destroyed_connected = True

    def _removed(self) -> None:
        """Taken out of the window (napari's close button): the widget lives on, unwatched."""
        if self._on_destroyed_connected:
            self._native.destroyed.disconnect(self._on_destroyed)
            self._on_destroyed_connected = False
        self._native.removeEventFilter(self._watcher)
        self.close()

    def _on_destroyed(self, *_: Any) -> None:
        self._on_destroyed_connected = False
        self.close()

    @property
    def closed(self) -> bool:
        """True once the dock was removed from its window, its widgets were deleted, or its
        viewer was closed."""
        if not self._closed and self._viewer_closed():
            self.close()
        return self._closed

    def _viewer_closed(self) -> bool:
        # napari's Window.close() drops ``_qt_window`` at once, while Qt deletes the widgets
        # later; events queued before that would otherwise add layers to a closed viewer
        window = getattr(self._viewer, "window", None)
        return window is not None and not hasattr(window, "_qt_window")

    def close(self) -> None:
        """Mark the dock closed and run ``on_close`` (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._on_close()
        except Exception:  # a failing clean-up must not take napari's close down with it
            _log.exception("stopping the jobs of a closed dock failed")


def while_open(method: Callable) -> Callable:
    """Decorator for a dock's worker callbacks: nothing happens once ``self.lifetime`` is
    closed (an exception passed to an ``errored`` callback is logged instead of notified)."""

    @functools.wraps(method)
    def slot(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.lifetime.closed:
            exc = next((a for a in args if isinstance(a, BaseException)), None)
            if exc is not None:
                _log.warning("%s after its dock was closed: %s", method.__qualname__, exc)
            return None
        return method(self, *args, **kwargs)

    return slot
