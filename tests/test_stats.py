"""The 95 % intervals of the aggregate table, against numbers worked out by hand."""
import math

import pytest

from depthshrinker.base.stats import prediction_interval, t_interval, wilson

Z = 1.959964  # standard normal 97.5 % quantile
T2 = 4.302653  # Student t 97.5 % quantile, 2 degrees of freedom


def test_wilson_350_of_359():
    # p = 350/359 = 0.974930; centre (p + z²/2n)/(1 + z²/n) = 0.980280/1.010700 = 0.969902;
    # half z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n) = 1.959964·sqrt(6.8081e-5 + 7.4515e-6)/1.010700 = 0.016854
    lo, hi = wilson(350, 359)
    assert lo == pytest.approx(0.953049, abs=2e-6)
    assert hi == pytest.approx(0.986756, abs=2e-6)


def test_wilson_at_the_ends_stays_inside_0_1():
    # p = 0: the interval is [0, z²/(n + z²)]
    assert wilson(0, 10) == pytest.approx((0.0, Z * Z / (10 + Z * Z)), abs=1e-6)
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(10 / (10 + Z * Z), abs=1e-6) and hi == pytest.approx(1.0)


def test_t_interval_of_three_values():
    # mean 3, s = 1, half = t(2) · 1/sqrt(3) = 2.484138
    lo, hi = t_interval([2.0, 3.0, 4.0])
    assert (lo, hi) == pytest.approx((3 - T2 / math.sqrt(3), 3 + T2 / math.sqrt(3)), abs=1e-6)
    assert hi - lo == pytest.approx(4.968275, abs=1e-6)
    assert t_interval([5.0, 5.0]) == (5.0, 5.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        wilson(11, 10)
    with pytest.raises(ValueError):
        wilson(0, 0)
    with pytest.raises(ValueError):
        t_interval([1.0])


def test_prediction_interval_is_wider_than_the_confidence_interval_by_sqrt_1_plus_n_over_m():
    lo, hi = t_interval([2.0, 3.0, 4.0])
    plo, phi = prediction_interval(3.0, 1.0, 3, 3)
    assert (phi - plo) == pytest.approx((hi - lo) * math.sqrt(2)) and (plo + phi) / 2 == 3.0
    assert prediction_interval(3.0, 1.0, 3, 10**9) == pytest.approx((lo, hi), rel=1e-6)  # a huge rerun: its true mean
    with pytest.raises(ValueError):
        prediction_interval(3.0, 1.0, 1, 3)
