"""Onset detection: known sigmoid onsets are recovered, flat noise and straight lines give "no onset"."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlmscope.analyses.onset import OnsetInputError, coincidence, detect_onset

STEPS = np.unique(np.round(np.logspace(0, 4, 50)))
X = np.log10(STEPS + 1)


def sigmoid(center: float, scale: float, lo: float = 0.1, hi: float = 0.4) -> np.ndarray:
    return lo + (hi - lo) / (1 + np.exp(-(X - center) / scale))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigmoid_onset_is_recovered_with_interval(seed):
    rng = np.random.default_rng(seed)
    center, scale = 2.5, 0.15  # steepest at step ~315
    o = detect_onset(STEPS, sigmoid(center, scale) + rng.normal(0, 0.01, len(X)), n_boot=100)
    assert o.found and o.reason == ""
    assert abs(math.log10(o.steepest_step + 1) - center) < 0.1
    # a tangent at the centre meets the lower plateau 2 scales earlier; the fitted ramp starts near there
    assert abs(math.log10(o.onset_step + 1) - (center - 2 * scale)) < 0.2
    assert o.onset_step < o.steepest_step < o.end_step
    lo, hi = o.steepest_ci
    assert lo <= 10**center <= hi * 1.15 and o.boot_found > 0.9
    assert o.change == pytest.approx(0.3, abs=0.08)


def test_loss_drop_detected_with_direction_down():
    rng = np.random.default_rng(3)
    loss = 6.0 - 0.3 * X - 1.5 / (1 + np.exp(-(X - 3.0) / 0.1)) + rng.normal(0, 0.02, len(X))
    o = detect_onset(STEPS, loss, direction="down", n_boot=50)
    assert o.found and o.change < 0
    assert abs(math.log10(o.steepest_step + 1) - 3.0) < 0.1
    assert not detect_onset(STEPS, loss, direction="up", n_boot=0).found


@pytest.mark.parametrize("seed", range(5))
def test_flat_noise_and_straight_line_give_no_onset(seed):
    rng = np.random.default_rng(seed)
    flat = detect_onset(STEPS, 0.3 + rng.normal(0, 0.01, len(X)), n_boot=50)
    assert not flat.found and "no breakpoint" in flat.reason and flat.onset_step is None
    line = detect_onset(STEPS, 0.2 + 0.05 * X + rng.normal(0, 0.01, len(X)), n_boot=0)
    assert not line.found


def test_step_change_between_two_checkpoints():
    y = np.where(STEPS >= 1000, 0.5, 0.1)
    o = detect_onset(STEPS, y, n_boot=0)
    assert o.found
    before, after = STEPS[STEPS < 1000].max(), STEPS[STEPS >= 1000].min()
    assert o.onset_step == pytest.approx(before) and o.end_step == pytest.approx(after)


def test_rise_from_the_first_checkpoint_is_not_an_onset():
    y = np.where(X < 2, 0.5 * X, 1.0)  # rising from the start, then flat
    o = detect_onset(STEPS, y, n_boot=0)
    assert not o.found and "first checkpoint" in o.reason


def test_bad_and_tiny_inputs():
    assert not detect_onset([0, 1, 2], [0.1, 0.2, 0.3]).found
    assert "too few" in detect_onset([0, 1, 2], [0.1, 0.2, 0.3]).reason
    with pytest.raises(OnsetInputError):
        detect_onset([0, 1], [0.1])
    with pytest.raises(OnsetInputError):
        detect_onset(STEPS, X, direction="sideways")
    nan = sigmoid(2.5, 0.15)
    nan[::7] = np.nan  # missing values are dropped, not fatal
    assert detect_onset(STEPS, nan, n_boot=0).found


def test_coincidence_of_onsets():
    rise = detect_onset(STEPS, sigmoid(3.0, 0.1), n_boot=0)
    drop = detect_onset(STEPS, 5 - sigmoid(3.0, 0.1), direction="down", n_boot=0)
    late = detect_onset(STEPS, sigmoid(3.7, 0.05), n_boot=0)
    assert coincidence(rise, drop)["coincide"] is True
    assert coincidence(rise, late)["coincide"] is False and coincidence(rise, late)["distance_decades"] > 0.5
    none = detect_onset(STEPS, np.full(len(X), 0.3), n_boot=0)
    assert coincidence(rise, none)["coincide"] is None
    assert set(rise.as_dict("sas_")) >= {"sas_onset_step", "sas_onset_lo", "sas_found"}
