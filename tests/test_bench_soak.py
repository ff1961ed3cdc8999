"""The soak's growth detector (:mod:`bench.growth`) on synthetic series: no server, no RabbitMQ.

The series imitate a 30-minute soak sampled every 5 s: server RSS around 60 MiB
with 0.3 MiB of sample noise, checked with the tolerance ``make soak`` uses for RSS.
"""

from __future__ import annotations

import random

import pytest

from bench.growth import Growth, Tolerance, detect, robust_noise, theil_sen

DURATION = 30 * 60.0
STEP = 5.0
WARMUP = 180.0
RSS = Tolerance(absolute=2.0, relative=0.03, noise_factor=2.0)
TIMES = [i * STEP for i in range(int(DURATION / STEP) + 1)]


def noisy(f: object, sd: float = 0.3, seed: int = 7) -> list[float]:
    """``f(t)`` at every sample time plus Gaussian noise (seeded: the same series every run)."""
    rng = random.Random(seed)
    return [f(t) + rng.gauss(0.0, sd) for t in TIMES]  # type: ignore[operator]


def check(values: list[float], tolerance: Tolerance = RSS) -> Growth:
    return detect(TIMES, values, WARMUP, tolerance)


@pytest.mark.parametrize("seed", range(20))
def test_flat_noisy_series_passes(seed: int) -> None:
    g = check(noisy(lambda t: 60.0, seed=seed))
    assert g.verdict == "ok", g.explain("MiB")
    assert abs(g.per_hour) < 2.0


def test_slow_linear_leak_fails() -> None:
    # 20 MiB per hour: 0.33 MiB a minute, under the sample noise from one sample to the next.
    g = check(noisy(lambda t: 60.0 + 20.0 * t / 3600))
    assert g.grows, g.explain("MiB")
    assert g.per_hour == pytest.approx(20.0, rel=0.15)
    assert "GROWS" in g.explain("MiB")


def test_staircase_leak_fails() -> None:
    # Grows in 1 MiB steps every 2 minutes (an allocator taking one more arena at a time).
    g = check(noisy(lambda t: 60.0 + (t // 120)))
    assert g.grows, g.explain("MiB")


@pytest.mark.parametrize("at", [0.05, 0.3, 0.5, 0.65, 0.72])
def test_one_time_step_passes(at: float) -> None:
    # RSS steps up 8 MiB once (allocator arenas settling) and stays there.
    g = check(noisy(lambda t: 60.0 + (8.0 if t >= at * DURATION else 0.0)))
    assert g.verdict == "ok", g.explain("MiB")


def test_spikes_pass() -> None:
    values = noisy(lambda t: 60.0)
    for i in range(0, len(values), 37):
        values[i] += 25.0  # a scrape that landed mid-burst, a GC pause
    assert check(values).verdict == "ok"


def test_falling_series_passes() -> None:
    assert check(noisy(lambda t: 80.0 - 10.0 * t / 3600)).verdict == "ok"


def test_noisy_population_passes_but_a_connection_leak_fails() -> None:
    # ~500 live connections with a spread of 20 (clients come and go at random).
    tol = Tolerance(absolute=5, relative=0.03, noise_factor=2.0)
    assert check(noisy(lambda t: 500.0, sd=20.0), tol).verdict == "ok"
    # 1 in 100 of 20 connects/s never forgotten: 720 per hour.
    assert check(noisy(lambda t: 500.0 + 0.2 * t, sd=20.0), tol).grows


def test_too_short() -> None:
    assert detect([0.0, 5.0, 10.0], [1.0, 2.0, 3.0], warmup_s=0.0).verdict == "too short"
    assert detect([], [], warmup_s=0.0).verdict == "too short"
    assert detect(TIMES, [1.0] * len(TIMES), warmup_s=DURATION + 1).verdict == "too short"
    with pytest.raises(ValueError):
        detect([0.0], [], warmup_s=0.0)


def test_theil_sen_and_noise() -> None:
    ts = [float(t) for t in range(10)]
    assert theil_sen(ts, [2 * t + 1 for t in ts]) == pytest.approx(2.0)
    assert theil_sen([1.0, 1.0], [0.0, 5.0]) == 0.0  # no two distinct times
    assert robust_noise(ts, [3 * t for t in ts]) == pytest.approx(0.0)  # a line is no noise
