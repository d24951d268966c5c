"""Confidence intervals for success rates: every success figure the project prints carries one.

Wilson's score interval (Wilson 1927) stays inside [0, 1] and keeps close to its nominal coverage
at the small counts evaluations have (20 episodes per task), where the normal approximation
p +- z * sqrt(p (1 - p) / n) collapses to [0, 0] at 0 successes and [1, 1] at n.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` out of `trials`."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def format_rate(successes: int, trials: int) -> str:
    """'35% [26-45%]': the rate and its 95% Wilson interval, for tables."""
    low, high = wilson_interval(successes, trials)
    return f"{successes / trials:.0%} [{100 * low:.0f}–{100 * high:.0f}%]"
