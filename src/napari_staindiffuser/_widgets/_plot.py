"""A small loss plot drawn with QPainter (no plotting library needed): step on x, loss on a
log-scale y, one polyline per series, a legend. Repaints at most a few times a second."""

from __future__ import annotations

import math
import time

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["LossPlot"]

_COLOURS = ("#4e9af1", "#f1a04e", "#5fc26a", "#e0575b", "#b07fe0", "#c9b458", "#5bc8c8")


class LossPlot(QWidget):
    """``add(name, step, value)`` appends a point; ``series`` holds them (name -> list)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.series: dict[str, list[tuple[int, float]]] = {}
        self._last_paint = 0.0
        self.setMinimumHeight(160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Training losses per branch (log scale); 'val' lines are validation.")

    def clear(self) -> None:
        self.series = {}
        self.update()

    def add(self, name: str, step: int, value: float) -> None:
        if not math.isfinite(value) or value <= 0:
            return
        self.series.setdefault(name, []).append((int(step), float(value)))
        now = time.perf_counter()
        if now - self._last_paint > 0.2:
            self._last_paint = now
            self.update()

    def paintEvent(self, _event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        left, right, top, bottom = 44, 8, 8, 18
        p.fillRect(0, 0, w, h, QColor("#262930"))
        pts = [pt for s in self.series.values() for pt in s]
        p.setPen(QPen(QColor("#aaaaaa")))
        if not pts:
            p.drawText(left, h // 2, "losses appear here once training runs")
            p.end()
            return
        x0, x1 = min(s for s, _ in pts), max(s for s, _ in pts)
        lo = math.log10(min(v for _, v in pts))
        hi = math.log10(max(v for _, v in pts))
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        x1 = x1 if x1 > x0 else x0 + 1

        def to_px(step: int, value: float) -> QPointF:
            fx = (step - x0) / (x1 - x0)
            fy = (math.log10(value) - lo) / (hi - lo)
            return QPointF(left + fx * (w - left - right), top + (1 - fy) * (h - top - bottom))

        p.drawText(2, top + 10, f"{10**hi:.3g}")
        p.drawText(2, h - bottom, f"{10**lo:.3g}")
        p.drawText(left, h - 4, f"step {x0}")
        p.drawText(w - right - 80, h - 4, f"step {x1}")
        p.drawRect(left, top, w - left - right, h - top - bottom)
        for i, (name, data) in enumerate(sorted(self.series.items())):
            colour = QColor(_COLOURS[i % len(_COLOURS)])
            pen = QPen(colour, 1.5)
            if name.startswith("val"):
                pen.setStyle(Qt.PenStyle.DashLine)
            p.setPen(pen)
            poly = [to_px(s, v) for s, v in data]
            p.drawPolyline(QPolygonF(poly))
            if len(poly) == 1:
                p.drawEllipse(poly[0], 2, 2)
            p.drawText(left + 6, top + 14 + 13 * i, name)
        p.end()
