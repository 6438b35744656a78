"""Streaming second-moment accumulators and spectrum summaries shared by the geometry analyses.

Every accumulator consumes rows batch by batch (memory O(d²), never O(n·d)) and accumulates in float64 with the
pairwise update of Chan, Golub & LeVeque ("Updating formulae and a pairwise algorithm for computing sample
variances", 1979): each batch is centred on its own mean before it is merged, so a large common offset (e.g. a
LayerNorm β) does not cancel catastrophically the way ``Σxxᵀ − n·μμᵀ`` would.

State lives in float64 torch tensors on the device of the first batch (device-agnostic; call ``.to("cpu")`` style
conversions yourself if you need numpy). All accumulators support ``merge`` so per-worker partial results can be
combined, and the result is independent of how the rows were split into batches (up to float64 rounding).

Spectrum helpers (:func:`eigvals_desc`, :func:`variance_rank`, :func:`entropy_rank`) implement the two
effective-rank definitions of docs/notes/geometry.md ("Effective-rank definitions"):

* 0.9-variance rank (Meng et al., "Representation Deficiency in Masked Language Modeling", arXiv 2302.02060):
  smallest k whose top-k eigenvalues (= squared singular values) reach ``tau`` of the total.
* entropy effective rank (Roy & Vetterli, "The effective rank", EUSIPCO 2007): exp of the Shannon entropy of the
  normalised singular values σ_i / Σσ_j (σ, not σ²).

Both return 0 (not NaN) for a spectrum that is numerically zero (e.g. all-identical vectors after centring).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

__all__ = [
    "StreamingMean",
    "StreamingCovariance",
    "StreamingCrossCovariance",
    "as_rows",
    "eigvals_desc",
    "numerical_tolerance",
    "variance_rank",
    "entropy_rank",
    "correlation_from_covariance",
    "residual_stream_names",
    "hash_uniform",
    "hash_uniform_like",
    "serial_when_threads_sleep",
]

_F64 = torch.float64


def as_rows(x: Any, d: int | None = None) -> torch.Tensor:
    """Convert an array-like of shape (N, d) to a float64 torch tensor, checking the width.

    Args:
        x: torch tensor or numpy array (any float dtype), shape (N, d). A 1-D input is treated as one row.
        d: Expected number of columns, or None to skip the check.

    Returns:
        (N, d) float64 tensor on the input's device.

    Raises:
        ValueError: if the input is not 2-D or has the wrong width.
    """
    t = torch.as_tensor(x)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise ValueError(f"expected rows of shape (N, d), got shape {tuple(t.shape)}")
    if d is not None and t.shape[1] != d:
        raise ValueError(f"expected rows of width {d}, got shape {tuple(t.shape)}")
    return t.to(_F64)


def _rows(x: Any, d: int) -> torch.Tensor:
    """Like :func:`as_rows` but a floating tensor keeps its dtype (the float64 conversion happens inside the ops
    that read it, without a float64 copy of the rows)."""
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        return as_rows(t, d)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[1] != d:
        as_rows(t, d)  # raises the same error
    return t


class StreamingMean:
    """Running mean of d-dimensional rows (float64).

    Attributes:
        d: Row width.
        n: Number of rows seen.
    """

    def __init__(self, d: int) -> None:
        self.d = d
        self.n = 0
        self._sum: torch.Tensor | None = None

    def update(self, x: Any) -> None:
        """Add rows ``x`` of shape (N, d)."""
        t = as_rows(x, self.d)
        if t.shape[0] == 0:
            return
        s = t.sum(0)
        self._sum = s if self._sum is None else self._sum + s.to(self._sum.device)
        self.n += t.shape[0]

    def merge(self, other: StreamingMean) -> None:
        """Fold another accumulator of the same width into this one."""
        if other.n == 0:
            return
        assert other._sum is not None  # set by the first non-empty update
        self._sum = other._sum.clone() if self._sum is None else self._sum + other._sum.to(self._sum.device)
        self.n += other.n

    @property
    def mean(self) -> torch.Tensor:
        """(d,) mean row; zeros when nothing was seen."""
        if self._sum is None:
            return torch.zeros(self.d, dtype=_F64)
        return self._sum / self.n


class StreamingCrossCovariance:
    """Running means and cross-scatter of paired rows (x_t ∈ ℝ^dx, y_t ∈ ℝ^dy), float64, Chan-merged.

    Keeps ``mean_x``, ``mean_y`` and the centred cross-scatter ``S_xy = Σ (x_t − μx)(y_t − μy)ᵀ``. Use it for
    linear CKA between two layers (with :class:`StreamingCovariance` for each side).

    Attributes:
        dx: Width of x rows.
        dy: Width of y rows.
        n: Number of row pairs seen.
    """

    def __init__(self, dx: int, dy: int) -> None:
        self.dx = dx
        self.dy = dy
        self.n = 0
        self._mx: torch.Tensor | None = None
        self._my: torch.Tensor | None = None
        self._sxy: torch.Tensor | None = None

    def _merge_moments(self, n_b: int, mx_b: torch.Tensor, my_b: torch.Tensor, sxy_b: torch.Tensor) -> None:
        if n_b == 0:
            return
        if self.n == 0:
            self.n, self._mx, self._my, self._sxy = n_b, mx_b, my_b, sxy_b
            return
        mx_a, my_a, sxy_a = self._moments()
        dev = mx_a.device
        mx_b, my_b, sxy_b = mx_b.to(dev), my_b.to(dev), sxy_b.to(dev)
        n_a, n = self.n, self.n + n_b
        dx = mx_b - mx_a
        dy = my_b - my_a
        self._sxy = sxy_a + sxy_b + torch.outer(dx, dy) * (n_a * n_b / n)
        self._mx = mx_a + dx * (n_b / n)
        self._my = my_a + dy * (n_b / n)
        self.n = n

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean_x, mean_y, scatter) once rows were seen (they are None while ``n`` is 0)."""
        assert self._mx is not None and self._my is not None and self._sxy is not None, "no rows seen yet"
        return self._mx, self._my, self._sxy

    def update(self, x: Any, y: Any) -> None:
        """Add paired rows: ``x`` (N, dx) and ``y`` (N, dy)."""
        tx, ty = as_rows(x, self.dx), as_rows(y, self.dy)
        if tx.shape[0] != ty.shape[0]:
            raise ValueError(f"x and y must have the same number of rows, got {tx.shape[0]} and {ty.shape[0]}")
        if tx.shape[0] == 0:
            return
        mx, my = tx.mean(0), ty.mean(0)
        self._merge_moments(tx.shape[0], mx, my, (tx - mx).T @ (ty - my))

    def merge(self, other: StreamingCrossCovariance) -> None:
        """Fold another accumulator with the same widths into this one."""
        if other.n:
            mx, my, sxy = other._moments()
            self._merge_moments(other.n, mx.clone(), my.clone(), sxy.clone())

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=_F64)

    @property
    def mean_x(self) -> torch.Tensor:
        """(dx,) mean of x."""
        return self._moments()[0] if self.n else self._zeros(self.dx)

    @property
    def mean_y(self) -> torch.Tensor:
        """(dy,) mean of y."""
        return self._moments()[1] if self.n else self._zeros(self.dy)

    @property
    def scatter(self) -> torch.Tensor:
        """(dx, dy) centred cross-scatter Σ (x − μx)(y − μy)ᵀ (a sum, not divided by n)."""
        return self._moments()[2] if self.n else self._zeros(self.dx, self.dy)

    @property
    def cov(self) -> torch.Tensor:
        """(dx, dy) population cross-covariance (scatter / n); zeros when nothing was seen."""
        return self.scatter / max(self.n, 1)


#: Column-panel width of the block-triangular scatter update: wider matrices get only their upper panels computed
#: (≈ (1 + b/d)/2 of a full GEMM's multiply-adds; 0.57 for redundancy's 2,688-wide CKA covariance of MiniLM).
PANEL = 384


def _panels(d: int, width: int = PANEL) -> list[tuple[int, int]]:
    """``[(start, stop), …]`` column panels of a d-wide matrix (one panel when d ≤ 2·width)."""
    if d <= 2 * width:
        return [(0, d)]
    return [(a, min(a + width, d)) for a in range(0, d, width)]


class StreamingCovariance:
    """Running mean, covariance and Gram matrix of d-dimensional rows (float64, Chan-merged).

    The centred scatter is accumulated in place (``addmm_``: the batch's cᵀc is added inside the GEMM, no d×d
    temporary) and, for wide rows (d > 2·:data:`PANEL`), only in the row panels on and above the diagonal: the
    matrix is symmetric, so the panels below are mirrored when it is read (:attr:`scatter`).

    Example::

        acc = StreamingCovariance(384)
        for batch in batches:
            acc.update(batch_rows)          # (N, 384)
        eig = eigvals_desc(acc.scatter, tol=numerical_tolerance(acc))
        variance_rank(eig, 0.9), entropy_rank(eig)

    Attributes:
        d: Row width.
        n: Number of rows seen.
    """

    def __init__(self, d: int) -> None:
        self.d = d
        self.n = 0
        self._mean: torch.Tensor | None = None
        self._s: torch.Tensor | None = None  # upper panels valid; below them stale until mirrored
        self._panels = _panels(d)

    def _add_scatter(self, c: torch.Tensor) -> None:
        """``S += cᵀc`` on the upper panels, in place."""
        assert self._s is not None
        for a, b in self._panels:
            self._s[a:b, a:].addmm_(c[:, a:b].T, c[:, a:])

    def update(self, x: Any, mean: torch.Tensor | None = None) -> None:
        """Add rows ``x`` of shape (N, d) (torch or numpy, any float dtype; accumulated in float64 on its device).

        The batch is centred on its own mean (in float64) into a buffer with one extra row, √w·δ (δ = batch mean −
        running mean, w = n_a·n_b / n): one GEMM then adds both the batch's scatter and Chan's correction w·δδᵀ.

        Args:
            x: The rows (a strided view is fine: it is read once, by the centring).
            mean: Their float64 mean, if the caller already has it (saves one pass over ``x``).
        """
        t = _rows(x, self.d)
        n_b = t.shape[0]
        if n_b == 0:
            return
        m = t.mean(0, dtype=_F64) if mean is None else mean.to(_F64)
        first = self.n == 0
        c = torch.empty(n_b + (0 if first else 1), self.d, dtype=_F64, device=t.device)
        torch.sub(t, m, out=c[:n_b])
        if first:
            self._s = torch.zeros(self.d, self.d, dtype=_F64, device=t.device)
            self._add_scatter(c)
            self.n, self._mean = n_b, m
            return
        assert self._mean is not None and self._s is not None
        n = self.n + n_b
        delta = m - self._mean
        torch.mul(delta, math.sqrt(self.n * n_b / n), out=c[n_b])
        self._add_scatter(c)
        self._mean = self._mean + delta * (n_b / n)
        self.n = n

    @staticmethod
    def update_group(accs: list[StreamingCovariance], x: torch.Tensor) -> None:
        """``accs[l].update(x[l])`` for every l at once: x is (L, N, d), the same N rows of L quantities (e.g. one
        token set at every layer). One batched GEMM instead of L, when the accumulators have seen the same number of
        rows and are narrow (one panel); otherwise one update each. The values are those of L single updates.
        """
        first = accs[0]
        if x.ndim != 3 or x.shape[0] != len(accs) or x.shape[1] == 0:
            for a, rows in zip(accs, x):
                a.update(rows)
            return
        n_b = x.shape[1]
        fresh = all(a.n == 0 for a in accs)
        # the states must be slices of one (L, d, d) tensor, which a fresh group update allocates
        big = first._s._base if first._s is not None else None
        stacked = (
            big is not None
            and big.shape[0] == len(accs)
            and all(a.n == first.n and a._s is not None and a._s._base is big for a in accs)
        )
        if not (fresh or stacked) or len(first._panels) != 1 or any(a.d != x.shape[2] for a in accs):
            for a, rows in zip(accs, x):
                a.update(rows)
            return
        m = x.mean(1, dtype=_F64)  # (L, d)
        c = torch.empty(len(accs), n_b + (0 if fresh else 1), first.d, dtype=_F64, device=x.device)
        torch.sub(x, m[:, None], out=c[:, :n_b])
        if fresh:
            big = torch.zeros(len(accs), first.d, first.d, dtype=_F64, device=x.device)
            big.baddbmm_(c.transpose(1, 2), c)
            for l, a in enumerate(accs):
                a._s, a._mean, a.n = big[l], m[l], n_b
            return
        assert big is not None
        n = first.n + n_b
        means = torch.stack([a.mean.to(x.device) for a in accs])
        delta = m - means
        torch.mul(delta, math.sqrt(first.n * n_b / n), out=c[:, n_b])
        big.baddbmm_(c.transpose(1, 2), c)
        new_means = means + delta * (n_b / n)
        for l, a in enumerate(accs):
            a._mean, a.n = new_means[l], n

    def merge(self, other: StreamingCovariance) -> None:
        """Fold another accumulator of the same width into this one."""
        if other.n == 0:
            return
        assert other._mean is not None and other._s is not None
        if self.n == 0:
            self.n, self._mean, self._s = other.n, other._mean.clone(), other._s.clone()
            return
        assert self._mean is not None and self._s is not None
        n_a, n_b = self.n, other.n
        n = n_a + n_b
        delta = other._mean.to(self._mean.device) - self._mean
        self._s.add_(other._s.to(self._s.device)).addr_(delta, delta, alpha=n_a * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self.n = n

    def _full(self) -> torch.Tensor:
        """The accumulated scatter with the panels below the diagonal mirrored from above (a new tensor when
        there are several panels; the state itself, not to be modified, when there is one)."""
        assert self._s is not None
        if len(self._panels) == 1:
            return self._s
        full = self._s.clone()
        for a, b in self._panels[:-1]:
            full[b:, a:b] = self._s[a:b, b:].T
        return full

    @property
    def mean(self) -> torch.Tensor:
        """(d,) mean row; zeros when nothing was seen."""
        return self._mean if self._mean is not None else torch.zeros(self.d, dtype=_F64)

    @property
    def scatter(self) -> torch.Tensor:
        """(d, d) centred scatter Σ (x − μ)(x − μ)ᵀ (eigenvalues = squared singular values of the centred rows)."""
        if self.n == 0:
            return torch.zeros(self.d, self.d, dtype=_F64)
        s = self._full()
        return 0.5 * (s + s.T)

    @property
    def gram(self) -> torch.Tensor:
        """(d, d) uncentred Gram Σ x xᵀ (eigenvalues = squared singular values of the raw rows)."""
        mu = self.mean
        return self.scatter + self.n * torch.outer(mu, mu)

    @property
    def cov(self) -> torch.Tensor:
        """(d, d) population covariance (scatter / n); zeros when nothing was seen."""
        return self.scatter / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        """(d,) per-dimension population variance."""
        if self.n == 0:
            return torch.zeros(self.d, dtype=_F64)
        assert self._s is not None
        return torch.diagonal(self._s).clone() / self.n

    @property
    def energy(self) -> float:
        """Σ‖x‖² over all rows (trace of the uncentred Gram): the scale for the numerical-zero tolerance."""
        if self.n == 0:
            return 0.0
        assert self._s is not None and self._mean is not None
        return float(torch.sum(torch.diagonal(self._s) + self.n * (self._mean * self._mean)))

    def second_moment(self, centre: bool = True) -> torch.Tensor:
        """The scatter (``centre=True``) or the uncentred Gram (``centre=False``)."""
        return self.scatter if centre else self.gram


@contextmanager
def serial_when_threads_sleep() -> Iterator[None]:
    """Run a block of many small dense-algebra calls (LAPACK on a few-hundred-wide matrix, small solves) on one
    thread when OpenMP's threads sleep between parallel regions (``OMP_WAIT_POLICY=PASSIVE``, which ``mlmscope``
    picks when other processes keep the cores busy): waking them at every one of LAPACK's many small BLAS calls
    costs more than the work. Measured (AVX-512, 2 threads, passive): 15 ``eigvalsh`` of 384 x 384 take 600 ms on
    2 threads and 99 ms on 1 (128 x 128: 95 vs 6.3 ms); with spinning threads (the default policy) 71 vs 92 ms, so
    nothing changes then. Eigenvalues differ between thread counts by ~1e-15 of the largest.
    """
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def numerical_tolerance(acc: StreamingCovariance) -> float:
    """Eigenvalues at or below this are numerically zero for a matrix built by ``acc``.

    Follows numpy's ``matrix_rank`` default (``max(M, N) · eps · ‖A‖``, after Golub & Van Loan, "Matrix
    Computations", Sections 2.6 and 5.4) applied to the d×d second-moment matrix, with ‖A‖ replaced by the
    uncentred energy Σ‖x‖²: centring subtracts the mean from rows whose size is set by the uncentred energy, so
    rounding errors scale with it — this is what makes all-identical vectors come out as rank 0 instead of rank d
    of rounding noise.
    """
    return acc.d * float(np.finfo(np.float64).eps) * acc.energy


def eigvals_desc(mat: Any, tol: float = 0.0) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, descending, float64, with values ≤ ``tol`` set to exactly 0.

    Args:
        mat: (d, d) symmetric matrix (torch or numpy).
        tol: Numerical-zero threshold (see :func:`numerical_tolerance`); negative rounding noise is always clipped.
    """
    m = torch.as_tensor(mat, dtype=_F64).cpu()
    ev = torch.linalg.eigvalsh(0.5 * (m + m.T)).numpy()[::-1].copy()
    ev[ev <= max(tol, 0.0)] = 0.0
    return ev


def variance_rank(eigvals: Any, tau: float = 0.9) -> int:
    """Smallest k whose top-k eigenvalues reach ``tau`` of their sum (0 for an all-zero spectrum).

    Args:
        eigvals: Eigenvalues of a second-moment matrix (= σ²), any order; negatives are treated as 0.
        tau: Variance fraction in (0, 1].
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    lam = np.sort(np.clip(np.asarray(eigvals, dtype=np.float64), 0.0, None))[::-1]
    total = lam.sum()
    if total <= 0.0:
        return 0
    frac = np.cumsum(lam) / total
    # tolerate rounding in the cumulative sum so that exactly-tau splits count (e.g. 9 equal of 10 at tau=0.9)
    return int(np.searchsorted(frac, tau - 1e-12 * tau, side="left") + 1)


def entropy_rank(eigvals: Any) -> float:
    """Roy & Vetterli entropy effective rank exp(−Σ p ln p), p = σ/Σσ, σ = √λ (0.0 for an all-zero spectrum).

    Args:
        eigvals: Eigenvalues of a second-moment matrix (= σ²); negatives are treated as 0.
    """
    sigma = np.sqrt(np.clip(np.asarray(eigvals, dtype=np.float64), 0.0, None))
    total = sigma.sum()
    if total <= 0.0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def correlation_from_covariance(cov: Any, var_tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise a covariance into a correlation matrix, dropping dimensions with (numerically) zero variance.

    Args:
        cov: (d, d) covariance.
        var_tol: Variances at or below this count as zero and their dimensions are dropped.

    Returns:
        (correlation over the kept dims, boolean (d,) mask of kept dims).
    """
    c = torch.as_tensor(cov, dtype=_F64)
    v = torch.diagonal(c)
    keep = v > var_tol
    if not bool(keep.any()):
        return torch.zeros(0, 0, dtype=_F64), keep
    s = v[keep].rsqrt()
    return c[keep][:, keep] * s[:, None] * s[None, :], keep


def residual_stream_names(n_layers: int) -> list[str]:
    """Residual-stream activation names indexed like HF ``hidden_states``: index 0 = ``embed.hook_out``
    (embedding output), index l + 1 = ``blocks.{l}.hook_resid_post`` (output of block l)."""
    return ["embed.hook_out"] + [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]


def hash_uniform(*keys: Any, seed: int = 0) -> np.ndarray:
    """Deterministic pseudo-random numbers in [0, 1) from integer keys (vectorised, order- and batch-independent).

    Uses the SplitMix64 finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
    OOPSLA 2014) on a combination of the keys, so a token's draw depends only on e.g. (sentence id, position, seed)
    and every checkpoint of a trajectory sees the same subsample.

    Args:
        *keys: Integer arrays/tensors broadcastable to one shape.
        seed: Extra key.
    """
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.array(seed, dtype=np.uint64) + golden)
        for k in keys:
            k = np.asarray(torch.as_tensor(k).cpu().numpy() if isinstance(k, torch.Tensor) else k).astype(np.uint64)
            h = _splitmix64(h ^ k) + golden
        h = _splitmix64(h)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _u64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value`` (torch has no general uint64 arithmetic)."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _u64(0x9E3779B97F4A7C15), _u64(0xBF58476D1CE4E5B9), _u64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic: the sign bit would smear in)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64_t(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _MIX1  # int64 products wrap modulo 2^64, as the uint64 ones of the numpy version
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def hash_uniform_like(*keys: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """:func:`hash_uniform` computed by torch on the keys' device: bit-identical values, float64, no host copy.

    Args:
        *keys: Non-negative integer tensors on one device, broadcastable to one shape.
        seed: Extra key.
    """
    device = keys[0].device if keys else torch.device("cpu")
    h = _splitmix64_t(torch.tensor(_u64((seed + 0x9E3779B97F4A7C15) % (1 << 64)), dtype=torch.int64, device=device))
    for k in keys:
        h = _splitmix64_t(h ^ k.to(torch.int64)) + _GOLDEN
    h = _splitmix64_t(h)
    return _shr(h, 11).to(torch.float64) / float(1 << 53)
