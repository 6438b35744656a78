"""Onset detection on training curves: a three-segment piecewise-linear fit on log-step with bootstrap intervals.

Used for the structure onset (SAS score rising), the loss-drop onset (validation loss falling) and any other curve
over checkpoints. Chen et al. describe onsets without an operational definition we could reproduce, so mlmscope
defines its own breakpoint rule and stores it with every result (docs/notes/sas.md, "Onsets").

**Method** (``method = "3seg-log10"``).

1. ``x = log10(step + x_offset)`` (checkpoints are log-spaced early on, and onsets are seen on a log-step axis);
   points with ``step < min_step`` are ignored (e.g. the loss's initial unigram fall).
2. Fit ``y = a + b x + c1 (x - k1)+ + c2 (x - k2)+`` — continuous, three linear segments — by least squares for
   every pair of knots ``k1 < k2`` on the checkpoint x values (at most ``grid`` candidates, quantile-thinned), each
   outer segment holding at least ``min_seg`` points; keep the pair with the smallest residual sum of squares
   (vectorised: one QR per knot pair, all bootstrap replicates projected at once).
3. The **ramp** is the segment with the steepest slope in the requested direction (``up`` for a rising curve,
   ``down`` for a falling one). **Onset** = its start, **end** = its end, **steepest** = its midpoint (in x).
4. "No onset" (``found = False``, with a ``reason``) unless all hold: the three-segment model beats a single straight
   line by ΔBIC >= ``min_delta_bic`` (Gaussian likelihood; 4 extra parameters: 2 slopes + 2 knots; 10 = "very
   strong" on Kass & Raftery's 1995 scale), the ramp moves in the requested direction by at least
   ``min_effect_sigma`` residual standard deviations, and the ramp is not the first segment (a curve already
   changing fastest at its first checkpoint has its onset before the trajectory: not resolved).
5. **Uncertainty**: residual bootstrap (``n_boot`` replicates ``y* = fit + resampled residuals``, refit with the same
   rule); percentile intervals (``ci``) of onset, steepest point and end over the replicates that found an onset,
   and the share of replicates that found one (``boot_found``).

Example::

    from .onset import detect_onset
    o = detect_onset(steps, sas_scores)                      # rising curve
    l = detect_onset(steps, val_loss, direction="down")      # loss drop
    o.found, o.onset_step, o.onset_ci, coincidence(o, l)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..checkpoints.errors import MlmscopeError

METHOD = "3seg-log10"


class OnsetInputError(MlmscopeError, ValueError):
    """The curve cannot be analysed (mismatched lengths, non-finite values...); the message says why."""


@dataclass
class OnsetParams:
    """Settings of the breakpoint onset detector (stored with every result).

    Attributes:
        direction: ``"up"`` (find the steepest rise) or ``"down"`` (steepest fall, e.g. a loss drop).
        x_offset: ``x = log10(step + x_offset)``; 1 keeps step 0.
        min_step: Ignore checkpoints before this step.
        min_seg: Minimum points in each outer segment.
        grid: Maximum candidate knot positions (quantiles of the checkpoint x values beyond that).
        min_delta_bic: Required BIC advantage of the three-segment model over a straight line.
        min_effect_sigma: Required ramp change, in residual standard deviations.
        n_boot: Residual-bootstrap replicates (0 = no intervals).
        ci: Central coverage of the percentile intervals.
        seed: Bootstrap seed.
    """

    direction: str = "up"
    x_offset: float = 1.0
    min_step: float = 0.0
    min_seg: int = 2
    grid: int = 60
    min_delta_bic: float = 10.0
    min_effect_sigma: float = 3.0
    n_boot: int = 200
    ci: float = 0.9
    seed: int = 0


@dataclass
class Onset:
    """Result of :func:`detect_onset` (steps are in training-step units; slopes per decade of steps).

    ``found`` False means "no onset" — a valid answer; ``reason`` then says which criterion failed.
    """

    found: bool
    reason: str = ""
    onset_step: float | None = None
    steepest_step: float | None = None
    end_step: float | None = None
    onset_ci: tuple[float, float] | None = None
    steepest_ci: tuple[float, float] | None = None
    end_ci: tuple[float, float] | None = None
    slope: float | None = None
    change: float | None = None
    delta_bic: float | None = None
    noise_sd: float | None = None
    boot_found: float | None = None
    n_points: int = 0
    method: str = METHOD
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """Flat dict (intervals split into ``_lo``/``_hi``) for a one-row frame."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if k == "params":
                continue
            if k.endswith("_ci"):
                out[f"{prefix}{k[:-3]}_lo"], out[f"{prefix}{k[:-3]}_hi"] = v if v is not None else (None, None)
            else:
                out[prefix + k] = v
        return out


@dataclass
class _Fit:
    found: bool
    reason: str
    k1: float = math.nan
    k2: float = math.nan
    ramp: tuple[float, float] = (math.nan, math.nan)
    slope: float = math.nan
    change: float = math.nan
    delta_bic: float = math.nan
    sd: float = math.nan
    fitted: np.ndarray | None = None


def _candidate_pairs(x: np.ndarray, p: OnsetParams) -> tuple[np.ndarray, np.ndarray]:
    """Knot pairs (P,), (P,) with at least ``min_seg`` points on each outer side."""
    lo, hi = x[p.min_seg - 1], x[-p.min_seg]
    cand = np.unique(x[(x >= lo) & (x <= hi)])
    if len(cand) > p.grid:
        cand = np.unique(np.quantile(cand, np.linspace(0, 1, p.grid), method="nearest"))
    i, j = np.triu_indices(len(cand), k=1)
    return cand[i], cand[j]


def _designs(x: np.ndarray, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
    """(P, n, 4) design matrices [1, x, (x-k1)+, (x-k2)+]."""
    n = len(x)
    ones = np.ones((len(k1), n))
    xx = np.broadcast_to(x, (len(k1), n))
    return np.stack([ones, xx, np.maximum(xx - k1[:, None], 0), np.maximum(xx - k2[:, None], 0)], -1)


def _fit_many(x: np.ndarray, ys: np.ndarray, p: OnsetParams) -> list[_Fit]:
    """Best three-segment fit of every row of ``ys`` (R, n), with the onset criteria applied."""
    n = len(x)
    k1, k2 = _candidate_pairs(x, p)
    if len(k1) == 0:
        return [_Fit(False, f"too few checkpoints ({n}) for a breakpoint fit") for _ in ys]
    q, _ = np.linalg.qr(_designs(x, k1, k2))  # (P, n, 4)
    proj = np.einsum("pnk,rn->rpk", q, ys)  # (R, P, 4)
    rss = (ys**2).sum(-1)[:, None] - (proj**2).sum(-1)  # (R, P)
    best = rss.argmin(-1)
    line = np.stack([np.ones(n), x], -1)
    rss_line = ((ys - ys @ (line @ np.linalg.pinv(line)).T) ** 2).sum(-1)
    fits = []
    for r, b in enumerate(best.tolist()):
        design = _designs(x, k1[b : b + 1], k2[b : b + 1])[0]
        coef, *_ = np.linalg.lstsq(design, ys[r], rcond=None)
        fits.append(
            _judge(x, ys[r], design @ coef, coef, float(k1[b]), float(k2[b]), max(rss[r, b], 0.0), rss_line[r], p)
        )
    return fits


def _judge(
    x: np.ndarray,
    y: np.ndarray,
    fitted: np.ndarray,
    coef: np.ndarray,
    k1: float,
    k2: float,
    rss: float,
    rss_line: float,
    p: OnsetParams,
) -> _Fit:
    n = len(x)
    sign = 1.0 if p.direction == "up" else -1.0
    slopes = np.array([coef[1], coef[1] + coef[2], coef[1] + coef[2] + coef[3]])
    bounds = [(x[0], k1), (k1, k2), (k2, x[-1])]
    seg = int((sign * slopes).argmax())
    tiny = 1e-12 * float((y**2).sum()) + 1e-300  # floor: an exact fit of both models is a tie
    delta_bic = n * math.log(max(rss_line, tiny) / max(rss, tiny)) - 4 * math.log(n)
    sd = math.sqrt(max(rss, 0.0) / max(n - 6, 1))
    (a, b), slope = bounds[seg], float(slopes[seg])
    change = slope * (b - a)
    fit = _Fit(False, "", k1, k2, (a, b), slope, change, delta_bic, sd, fitted)
    if delta_bic < p.min_delta_bic:
        fit.reason = f"no breakpoint: a straight line fits as well (ΔBIC {delta_bic:.1f} < {p.min_delta_bic})"
    elif sign * change < p.min_effect_sigma * sd:
        fit.reason = (
            f"the steepest {p.direction} segment changes by {change:.3g}, < {p.min_effect_sigma} x noise sd {sd:.3g}"
        )
    elif seg == 0:
        fit.reason = "the curve changes fastest from its first checkpoint: onset before the trajectory (not resolved)"
    else:
        fit.found = True
    return fit


def _to_step(x: float, p: OnsetParams) -> float:
    return float(10**x - p.x_offset)


def _interval(values: list[float], p: OnsetParams) -> tuple[float, float] | None:
    if not values:
        return None
    a = (1 - p.ci) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return float(lo), float(hi)


def detect_onset(steps: ArrayLike, values: ArrayLike, params: OnsetParams | None = None, **overrides: Any) -> Onset:
    """Detect the onset of the steepest rise (or fall) of a curve over training steps.

    Args:
        steps: Checkpoint steps (any order; duplicates and NaN values are dropped).
        values: Curve values at those steps.
        params: Detector settings; keyword ``overrides`` replace single fields (``direction="down"``).

    Returns:
        An :class:`Onset`; ``found`` False (with ``reason``) is the "no onset" answer.

    Raises:
        OnsetInputError: ``steps`` and ``values`` differ in length, or ``direction`` is not up/down.
    """
    p = OnsetParams(**{**asdict(params or OnsetParams()), **overrides})
    if p.direction not in ("up", "down"):
        raise OnsetInputError(f"direction must be 'up' or 'down', not {p.direction!r}")
    s, v = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    if s.shape != v.shape:
        raise OnsetInputError(f"{len(s)} steps but {len(v)} values")
    keep = np.isfinite(s) & np.isfinite(v) & (s >= p.min_step) & (s + p.x_offset > 0)
    s, v = s[keep], v[keep]
    s, first = np.unique(s, return_index=True)
    v = v[first]
    base: dict[str, Any] = dict(n_points=len(s), params=asdict(p))
    if len(s) < 2 * p.min_seg + 1:
        return Onset(False, f"too few checkpoints ({len(s)}) for a breakpoint fit", **base)
    x = np.log10(s + p.x_offset)
    fit = _fit_many(x, v[None], p)[0]
    out = Onset(
        fit.found, fit.reason, slope=fit.slope, change=fit.change, delta_bic=fit.delta_bic, noise_sd=fit.sd, **base
    )
    if fit.found:
        out.onset_step, out.end_step = _to_step(fit.ramp[0], p), _to_step(fit.ramp[1], p)
        out.steepest_step = _to_step(sum(fit.ramp) / 2, p)
    if p.n_boot and fit.fitted is not None:
        _bootstrap(x, v, fit, p, out)
    return out


def _bootstrap(x: np.ndarray, y: np.ndarray, fit: _Fit, p: OnsetParams, out: Onset) -> None:
    assert fit.fitted is not None  # the caller bootstraps successful fits only
    rng = np.random.default_rng(p.seed)
    resid = y - fit.fitted
    ys = fit.fitted[None] + rng.choice(resid, size=(p.n_boot, len(y)), replace=True)
    boots = [b for b in _fit_many(x, ys, p)]
    found = [b for b in boots if b.found]
    out.boot_found = len(found) / len(boots)
    out.onset_ci = _interval([_to_step(b.ramp[0], p) for b in found], p)
    out.end_ci = _interval([_to_step(b.ramp[1], p) for b in found], p)
    out.steepest_ci = _interval([_to_step(sum(b.ramp) / 2, p) for b in found], p)


def _ramp(o: Onset) -> tuple[float, float, float]:
    """(onset, steepest, end) step of a found onset (:func:`detect_onset` sets all three when ``found``)."""
    assert o.onset_step is not None and o.steepest_step is not None and o.end_step is not None, "onset not found"
    return o.onset_step, o.steepest_step, o.end_step


def coincidence(a: Onset, b: Onset) -> dict[str, Any]:
    """Do two onsets coincide (Chen et al.: the structure onset falls in the loss drop)?

    Rule: both found and their ramp windows ``[onset, end]`` overlap. Also returned: whether the onset intervals
    overlap and the distance between the steepest points in decades of steps.
    """
    if not (a.found and b.found):
        return {"coincide": None, "reason": "an onset is missing", "ci_overlap": None, "distance_decades": None}
    (a_onset, a_steepest, a_end), (b_onset, b_steepest, b_end) = _ramp(a), _ramp(b)
    overlap = min(a_end, b_end) >= max(a_onset, b_onset)
    ci = None
    if a.onset_ci and b.onset_ci:
        ci = min(a.onset_ci[1], b.onset_ci[1]) >= max(a.onset_ci[0], b.onset_ci[0])
    off = a.params.get("x_offset", 1.0)
    dist = abs(math.log10(a_steepest + off) - math.log10(b_steepest + off))
    return {
        "coincide": bool(overlap),
        "reason": "ramp windows overlap" if overlap else "ramp windows are disjoint",
        "ci_overlap": ci,
        "distance_decades": dist,
    }
