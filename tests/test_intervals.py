"""The 95% Wilson interval every success figure carries."""

import pytest

from hybrid.intervals import format_rate, wilson_interval


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
