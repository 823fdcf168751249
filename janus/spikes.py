"""Loss-spike guard: skip a micro-batch whose loss is far above the recent ones, on every rank.

The loop already all-reduces (MAX over ranks) a few flags per micro-batch before backward; the
micro-batch's loss rides along, so every rank reads the same largest loss of the micro-batch
in the same host read it already does, and decides the same thing from the same window: no
extra collective, no extra sync. A loss above ``mean + sigma * std`` of the last ``window``
accepted values is a spike (OLMo-core's rule: 6 sigma over 128); nothing fires before the
window is full (warm-up). The window is part of the checkpoint, so a resumed run decides exactly
as an uninterrupted one.
"""
from __future__ import annotations

import math
from collections import deque


class SpikeGuard:
    def __init__(self, sigma: float, window: int, state: list[float] | None = None):
        """``sigma`` > 0 and ``window`` >= 2, as ``RunConfig`` validates them."""
        self.sigma, self.window = sigma, window
        self.values: deque[float] = deque(state or [], maxlen=window)

    def threshold(self) -> float | None:
        """The loss above which a micro-batch is a spike; None during warm-up."""
        n = len(self.values)
        if n < self.window:
            return None
        mean = sum(self.values) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in self.values) / n)
        return mean + self.sigma * std if std > 0 else None

    def observe(self, loss: float) -> None:
        self.values.append(loss)

    def state(self) -> list[float]:
        return list(self.values)
