"""A count that fades: each event counts 1 when it happens, and the sum fades exponentially.

The flap holds (render/flaps.py) and the reload pace (deliver/apply.py) judge "how many lately"
this way: no window to keep, and an old burst weighs less each second instead of dropping out at
once when a window ends.
"""

from __future__ import annotations

import math


def faded(level: float, since: float, now: float, memory_s: float) -> float:
    """`level`, counted at `since` (monotonic seconds), as of `now`: divided by e every `memory_s`."""
    return level * math.exp(-max(0.0, now - since) / memory_s)
