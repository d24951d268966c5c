"""The 95% Wilson interval every success figure carries, and the paired interval of the difference
between two modes evaluated on the same episodes."""

import numpy as np
import pytest

from hybrid.intervals import (
    format_paired_difference,
    format_rate,
    paired_difference_interval,
    paired_outcomes,
    wilson_interval,
)


@pytest.mark.parametrize(
    "successes,trials,low,high",
    [
        # reference values of the Wilson score interval (z = 1.96)
        (7, 20, 0.1812, 0.5671),
        (0, 20, 0.0, 0.1611),
        (20, 20, 0.8389, 1.0),
        (35, 100, 0.2636, 0.4475),
    ],
)
def test_wilson_interval_matches_reference_values(successes, trials, low, high):
    got = wilson_interval(successes, trials)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_interval_narrows_with_more_episodes_and_contains_the_rate():
    small, large = wilson_interval(10, 20), wilson_interval(100, 200)
    assert small[0] < large[0] < 0.5 < large[1] < small[1]


def test_bad_counts_are_named():
    with pytest.raises(ValueError, match="trials must be >= 1, got 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must be in \[0, 20\], got 21"):
        wilson_interval(21, 20)


def test_format_rate():
    assert format_rate(7, 20) == "35% [18–57%]"


def test_paired_interval_matches_a_reference_value():
    # Cavo et al. (2012), complete response before and after consolidation therapy, as worked in
    # Fagerland, Lydersen and Laake's "Statistical Analysis of Contingency Tables" (chapter 8):
    # -0.0621, 95% CI -0.1186 to -0.0046
    low, high = paired_difference_interval(59, 6, 16, 80)
    assert (low, high) == pytest.approx((-0.1186, -0.0046), abs=1e-4)


def test_paired_interval_covers_the_true_difference_95_times_in_100():
    """Many simulated evaluations of two correlated modes, 100 paired episodes each: the interval
    holds the true difference close to its nominal rate (Newcombe's method is slightly
    conservative); with the correlation term's sign slipped, or the term dropped, it covers
    more than 99%."""
    cells = np.array([0.70, 0.10, 0.05, 0.15])  # both, first only, second only, neither
    truth = cells[1] - cells[2]
    draws = np.random.default_rng(0).multinomial(100, cells, size=4000)
    covered = [
        low <= truth <= high for low, high in (paired_difference_interval(*d) for d in draws)
    ]
    assert 0.935 <= np.mean(covered) <= 0.97


def test_pairs_that_agree_give_a_narrower_interval_than_two_wilson_intervals():
    # 100 episodes, 83 and 81 successes, only 2 + 0 of them discordant
    low, high = paired_difference_interval(81, 2, 0, 17)
    assert low < 0.02 < high  # the difference, 2 points, is inside
    assert high - low < 0.1
    # unpaired, the two Wilson intervals overlap by more than the paired interval's width
    a, b = wilson_interval(83, 100), wilson_interval(81, 100)
    assert b[1] - a[0] > 0.12


def test_one_sided_discordance_separates_and_balanced_does_not():
    assert paired_difference_interval(60, 12, 1, 27)[0] > 0  # McNemar's exact p = 0.003
    low, high = paired_difference_interval(60, 6, 6, 28)
    assert low < 0 < high


def test_paired_outcomes_and_format():
    first = [True, True, False, False, True]
    second = [True, False, True, False, False]
    assert paired_outcomes(first, second) == (1, 2, 1, 1)
    assert format_paired_difference(first, second).endswith("pts (2 / 1)")
    assert format_paired_difference(first, second).startswith("+20.0 [")
    with pytest.raises(ValueError, match="same episodes, got 5 and 4"):
        paired_outcomes(first, second[:4])
    with pytest.raises(ValueError, match="at least one episode"):
        paired_difference_interval(0, 0, 0, 0)
