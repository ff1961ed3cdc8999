"""Does a series still grow once the load is steady?  The soak's leak test, pure functions only.

The rule (:func:`detect`), for samples ``(t, y)`` taken while a steady load runs:

1. Drop the warm-up: every sample before ``warmup_s`` (the population ramping up,
   caches and allocator arenas filling).
2. Split what is left into thirds by time: A (early), B (middle), C (last).
3. ``rise``  = median(C) - median(B): is the series higher at the end than in the middle?
4. ``trend`` = Theil-Sen slope over C x the time C spans: is it *still* climbing at the end?
5. ``noise`` = 1.4826 x the median absolute deviation of the residuals of B and C
   around their Theil-Sen line (a robust standard deviation of the sample noise).
6. ``tolerance`` = max(absolute, relative x |median(B)|, noise_factor x noise).
7. The series GROWS when ``rise > tolerance`` *and* ``trend > tolerance / 2``.

Why this shape: a leak keeps growing, so it is higher at the end than in the middle
*and* still rising within the last third.  A one-time step (RSS settling onto a
new arena, a cache filling once) may make C higher than B, but C itself is flat:
condition 4 lets it pass.  Medians and Theil-Sen slopes ignore a few outlying
samples (a GC pause, a scrape that landed mid-burst).  A step late in C looks like
the start of a leak and fails: rerun longer to tell them apart.

The smallest growth one run can see is about ``tolerance`` per third of the steady
window; :attr:`Growth.per_hour` (the Theil-Sen slope over B and C) says how fast a
series grows, whatever the verdict.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: MAD x this = the standard deviation, for normally distributed noise
MAD_TO_SIGMA = 1.4826
#: fewer samples than this in B or C: no verdict
MIN_SAMPLES_PER_THIRD = 3


@dataclass(frozen=True)
class Tolerance:
    """How much a series may rise from the middle to the last third and still pass."""

    absolute: float = 0.0
    relative: float = 0.0  # a fraction of the middle third's median
    noise_factor: float = 2.0  # times the robust standard deviation of the samples around their trend

    def of(self, level: float, noise: float) -> float:
        return max(self.absolute, self.relative * abs(level), self.noise_factor * noise)


@dataclass(frozen=True)
class Growth:
    """The verdict on one series and the figures behind it."""

    verdict: str  # "ok", "GROWS" or "too short"
    samples: int  # samples after the warm-up
    middle: float = 0.0  # median of B
    last: float = 0.0  # median of C
    rise: float = 0.0  # last - middle
    trend: float = 0.0  # Theil-Sen slope over C x the time C spans
    noise: float = 0.0
    tolerance: float = 0.0
    per_hour: float = 0.0  # Theil-Sen slope over B and C, per hour

    @property
    def grows(self) -> bool:
        return self.verdict == "GROWS"

    def explain(self, unit: str = "") -> str:
        """One line: the verdict and by how much."""
        u = f" {unit}" if unit else ""
        if self.verdict == "too short":
            return f"too short to tell ({self.samples} samples after the warm-up)"
        head = "GROWS" if self.grows else "flat"
        return (f"{head}: middle third {self.middle:.4g}{u} -> last third {self.last:.4g}{u} "
                f"(rise {self.rise:+.3g}{u}, still rising {self.trend:+.3g}{u} within the last third, "
                f"tolerance {self.tolerance:.3g}{u}); {self.per_hour:+.3g}{u}/h")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def theil_sen(ts: Sequence[float], ys: Sequence[float]) -> float:
    """The median of the slopes between every pair of points (0.0 with fewer than two distinct times)."""
    slopes = [
        (ys[j] - ys[i]) / (ts[j] - ts[i])
        for i in range(len(ts))
        for j in range(i + 1, len(ts))
        if ts[j] != ts[i]
    ]
    return statistics.median(slopes) if slopes else 0.0


def trend_line(ts: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """The Theil-Sen line through the points: (slope, intercept), the intercept the median residual."""
    slope = theil_sen(ts, ys)
    return slope, statistics.median(y - slope * t for t, y in zip(ts, ys, strict=True))


def robust_noise(ts: Sequence[float], ys: Sequence[float]) -> float:
    """A robust standard deviation of ``ys`` around their Theil-Sen line (so a trend is not counted as noise)."""
    if len(ys) < 2:
        return 0.0
    slope, centre = trend_line(ts, ys)
    return MAD_TO_SIGMA * statistics.median(abs(y - slope * t - centre) for t, y in zip(ts, ys, strict=True))


def detect(times: Sequence[float], values: Sequence[float], warmup_s: float,
           tolerance: Tolerance = Tolerance()) -> Growth:
    """Whether ``values`` (sampled at ``times``, seconds) still grow after ``warmup_s`` (module docstring)."""
    if len(times) != len(values):
        raise ValueError("times and values differ in length")
    if not times:
        return Growth("too short", 0)
    start = times[0] + warmup_s
    steady = [(t, y) for t, y in zip(times, values, strict=True) if t >= start]
    if not steady:
        return Growth("too short", 0)
    begin, end = steady[0][0], steady[-1][0]
    third = (end - begin) / 3
    b = [(t, y) for t, y in steady if begin + third <= t < begin + 2 * third]
    c = [(t, y) for t, y in steady if t >= begin + 2 * third]
    if len(b) < MIN_SAMPLES_PER_THIRD or len(c) < MIN_SAMPLES_PER_THIRD:
        return Growth("too short", len(steady))
    middle = statistics.median(y for _, y in b)
    last = statistics.median(y for _, y in c)
    c_t, c_y = [t for t, _ in c], [y for _, y in c]
    trend = theil_sen(c_t, c_y) * (c_t[-1] - c_t[0])
    bc_t, bc_y = [t for t, _ in b + c], [y for _, y in b + c]
    noise = robust_noise(bc_t, bc_y)
    tol = tolerance.of(middle, noise)
    rise = last - middle
    grows = rise > tol and trend > tol / 2
    return Growth(
        verdict="GROWS" if grows else "ok",
        samples=len(steady),
        middle=middle,
        last=last,
        rise=rise,
        trend=trend,
        noise=noise,
        tolerance=tol,
        per_hour=theil_sen(bc_t, bc_y) * 3600,
    )
