"""Confidence intervals for success rates: every success figure the project prints carries one.

Wilson's score interval (Wilson 1927) stays inside [0, 1] and keeps close to its nominal coverage
at the small counts evaluations have (20 episodes per task), where the normal approximation
p +- z * sqrt(p (1 - p) / n) collapses to [0, 0] at 0 successes and [1, 1] at n.

Two modes evaluated on the same episodes (the same task placements and, in the planner, the same
action noise) are paired: most episodes succeed or fail in both, and only the discordant ones
carry the difference. `paired_difference_interval` is Newcombe's square-and-add interval for a
paired difference (Newcombe 1998, Stat Med 17:2635, method 10, recommended by Fagerland, Lydersen
and Laake 2014): built from the two Wilson intervals and the correlation of the pairs, it is far
narrower than comparing the two Wilson intervals when the modes agree episode by episode.
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


def paired_difference_interval(
    both: int, first_only: int, second_only: int, neither: int, z: float = Z95
) -> tuple[float, float]:
    """(low, high) of the 95% interval of p_first - p_second from paired outcomes: `both`
    episodes succeeded in both modes, `first_only` in the first alone, `second_only` in the
    second alone, `neither` in none."""
    cells = (both, first_only, second_only, neither)
    if min(cells) < 0:
        raise ValueError(f"paired counts must be >= 0, got {cells}")
    n = sum(cells)
    if n < 1:
        raise ValueError("paired counts must hold at least one episode, got none")
    first, second = both + first_only, both + second_only  # successes of each mode
    p1, p2 = first / n, second / n
    low1, high1 = wilson_interval(first, n, z)
    low2, high2 = wilson_interval(second, n, z)
    # the correlation of the paired outcomes, with Newcombe's correction towards zero
    margins = first * (n - first) * second * (n - second)
    cross = both * neither - first_only * second_only
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
    d1, e2 = p1 - low1, high2 - p2  # distances to the Wilson bounds that make the lower bound
    e1, d2 = high1 - p1, p2 - low2
    low = p1 - p2 - math.sqrt(max(0.0, d1 * d1 + e2 * e2 - 2 * phi * d1 * e2))
    high = p1 - p2 + math.sqrt(max(0.0, d2 * d2 + e1 * e1 - 2 * phi * d2 * e1))
    return max(-1.0, low), min(1.0, high)


def paired_outcomes(first: list[bool], second: list[bool]) -> tuple[int, int, int, int]:
    """(both, first_only, second_only, neither) of two modes' outcomes on the same episodes,
    listed in the same order."""
    if len(first) != len(second):
        raise ValueError(
            f"paired outcomes need the same episodes, got {len(first)} and {len(second)}"
        )
    pairs = list(zip(first, second, strict=True))
    return (
        sum(a and b for a, b in pairs),
        sum(a and not b for a, b in pairs),
        sum(b and not a for a, b in pairs),
        sum(not a and not b for a, b in pairs),
    )


def format_paired_difference(first: list[bool], second: list[bool]) -> str:
    """How many points `first` succeeds more often than `second` on the same episodes, its 95%
    paired interval, and the episodes only `first` solved against those only `second` solved:
    '+3.0 [-2.8, +9.1] pts (5 / 2)' for 100 episodes, 80 solved by both and 13 by neither."""
    both, first_only, second_only, neither = paired_outcomes(first, second)
    low, high = paired_difference_interval(both, first_only, second_only, neither)
    n = len(first)
    points = 100 * (first_only - second_only) / n  # one decimal: a bound near 0 shows its side
    return f"{points:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] pts ({first_only} / {second_only})"
