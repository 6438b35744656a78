"""Streaming accumulators and effective-rank helpers: exact answers on planted spectra, streaming == one-shot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlmscope.analyses.stats import (
    StreamingCovariance,
    StreamingCrossCovariance,
    StreamingMean,
    correlation_from_covariance,
    eigvals_desc,
    entropy_rank,
    numerical_tolerance,
    variance_rank,
)


def _planted(n: int, d: int, rank: int, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) + offset


def _stream(x: np.ndarray, sizes: list[int]) -> StreamingCovariance:
    acc = StreamingCovariance(x.shape[1])
    i = 0
    for s in sizes:
        acc.update(torch.as_tensor(x[i : i + s], dtype=torch.float32 if x.dtype == np.float32 else torch.float64))
        i += s
    acc.update(x[i:])
    return acc


def test_streaming_equals_one_shot():
    x = _planted(300, 16, 16, offset=50.0)  # large common offset: the naive Σxxᵀ − nμμᵀ would lose digits
    acc = _stream(x, [1, 7, 0, 100, 41])
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / len(x)
    assert acc.n == 300
    np.testing.assert_allclose(acc.mean.numpy(), mu, rtol=0, atol=1e-9)
    np.testing.assert_allclose(acc.cov.numpy(), cov, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(acc.gram.numpy(), x.T @ x, rtol=1e-9)
    ev_stream = eigvals_desc(acc.scatter)
    ev_shot = np.linalg.svd(x - mu, compute_uv=False) ** 2
    np.testing.assert_allclose(ev_stream, ev_shot, rtol=1e-6)
    assert entropy_rank(ev_stream) == pytest.approx(entropy_rank(ev_shot), abs=1e-6)


def test_merge_equals_single_pass():
    x = _planted(200, 8, 8, seed=3, offset=-2.0)
    a, b, whole = StreamingCovariance(8), StreamingCovariance(8), StreamingCovariance(8)
    a.update(x[:50]), b.update(x[50:]), whole.update(x)
    a.merge(b)
    np.testing.assert_allclose(a.cov.numpy(), whole.cov.numpy(), atol=1e-12)
    m = StreamingMean(8)
    m.update(x[:13]), m.update(x[13:])
    np.testing.assert_allclose(m.mean.numpy(), x.mean(0), atol=1e-12)


def test_cross_covariance_matches_numpy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(90, 5)), rng.normal(size=(90, 3)) + 4
    acc = StreamingCrossCovariance(5, 3)
    acc.update(x[:30], y[:30]), acc.update(x[30:], y[30:])
    np.testing.assert_allclose(acc.cov.numpy(), (x - x.mean(0)).T @ (y - y.mean(0)) / 90, atol=1e-12)
    with pytest.raises(ValueError, match="same number of rows"):
        acc.update(x[:2], y[:3])


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_planted_rank_exact(rank):
    x = _planted(500, 12, rank, seed=rank, offset=3.0)
    acc = _stream(x, [100, 100])
    ev = eigvals_desc(acc.scatter, tol=numerical_tolerance(acc))
    assert int((ev > 0).sum()) == rank  # exactly `rank` non-zero eigenvalues after the tolerance
    assert 1 <= variance_rank(ev, 0.9) <= rank
    assert variance_rank(ev, 1.0) == rank
    assert 1.0 <= entropy_rank(ev) <= rank


def test_rank_formulas_hand_values():
    # 10 equal eigenvalues: 9 of them carry exactly 90 %; erank = 10
    assert variance_rank(np.ones(10), 0.9) == 9
    assert entropy_rank(np.ones(10)) == pytest.approx(10.0)
    # σ = (3, 1) -> λ = (9, 1): 0.9-rank 1 (9/10 = 0.9); p = (3/4, 1/4)
    assert variance_rank([9.0, 1.0], 0.9) == 1
    assert variance_rank([1.0, 9.0], 0.91) == 2
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy_rank([9.0, 1.0]) == pytest.approx(math.exp(h))
    with pytest.raises(ValueError):
        variance_rank([1.0], 0.0)


def test_identical_vectors_rank_zero_no_nan():
    x = np.tile(np.array([[0.1, -3.7, 2.2, 1e3]], dtype=np.float32), (257, 1))
    acc = _stream(x, [10, 17])
    ev = eigvals_desc(acc.scatter, tol=numerical_tolerance(acc))
    assert np.all(ev == 0)
    assert variance_rank(ev) == 0 and entropy_rank(ev) == 0.0
    corr, keep = correlation_from_covariance(acc.cov, var_tol=numerical_tolerance(acc) / acc.n)
    assert corr.shape == (0, 0) and not keep.any()
    # uncentred: a single non-zero direction
    evu = eigvals_desc(acc.gram, tol=numerical_tolerance(acc))
    assert variance_rank(evu) == 1 and entropy_rank(evu) == pytest.approx(1.0)


def test_empty_accumulator_is_zero():
    acc = StreamingCovariance(4)
    assert acc.n == 0 and torch.all(acc.cov == 0) and torch.all(acc.mean == 0)
    assert variance_rank(eigvals_desc(acc.scatter)) == 0
    with pytest.raises(ValueError, match="width 4"):
        acc.update(np.zeros((2, 5)))


def test_correlation_drops_constant_dims():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)) * np.array([1.0, 100.0, 0.0])
    acc = StreamingCovariance(3)
    acc.update(x)
    corr, keep = correlation_from_covariance(acc.cov, var_tol=1e-12)
    assert keep.tolist() == [True, True, False]
    np.testing.assert_allclose(torch.diagonal(corr).numpy(), [1.0, 1.0])


def test_wide_rows_use_upper_panels_and_equal_one_shot():
    """d > 2·PANEL: only the panels on and above the diagonal are accumulated; the scatter read back is complete."""
    from mlmscope.analyses.stats import PANEL

    d = 2 * PANEL + 5
    x = _planted(60, d, 40, seed=5, offset=3.0)
    acc, a, b = _stream(x, [7, 20]), StreamingCovariance(d), StreamingCovariance(d)
    a.update(x[:25]), b.update(x[25:])
    a.merge(b)
    mu = x.mean(0)
    scatter = (x - mu).T @ (x - mu)
    for got in (acc, a):
        np.testing.assert_allclose(got.scatter.numpy(), scatter, rtol=0, atol=1e-9 * np.abs(scatter).max())
        np.testing.assert_allclose(got.var.numpy(), np.diag(scatter) / len(x), rtol=1e-12)
        assert got.energy == pytest.approx(float((x * x).sum()), rel=1e-12)


def test_hash_uniform_like_is_bit_identical_on_the_keys_device():
    from mlmscope.analyses.stats import hash_uniform, hash_uniform_like

    a = torch.randint(0, 2**62, (500,), generator=torch.Generator().manual_seed(0))
    b = torch.arange(500)
    for seed in (0, 1, 7, 2**40):
        np.testing.assert_array_equal(hash_uniform_like(a, b, seed=seed).numpy(), hash_uniform(a, b, seed=seed))
    got = hash_uniform_like(torch.arange(6)[:, None], torch.arange(4)[None, :], seed=3)
    assert got.shape == (6, 4) and got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), hash_uniform(np.arange(6)[:, None], np.arange(4)[None, :], seed=3))


def test_update_group_equals_single_updates():
    """L accumulators fed the same rows' L quantities at once (one batched GEMM) equal L separate updates."""
    x = torch.as_tensor(_planted(3 * 90, 12, 12, seed=9, offset=4.0).reshape(3, 90, 12))
    grouped = [StreamingCovariance(12) for _ in range(3)]
    single = [StreamingCovariance(12) for _ in range(3)]
    for s in (slice(0, 1), slice(1, 30), slice(30, 30), slice(30, 90)):
        StreamingCovariance.update_group(grouped, x[:, s])
        for acc, rows in zip(single, x[:, s]):
            acc.update(rows)
    for g, a in zip(grouped, single):
        assert g.n == a.n == 90
        np.testing.assert_allclose(g.scatter.numpy(), a.scatter.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(g.mean.numpy(), a.mean.numpy(), rtol=1e-14, atol=1e-14)


def test_serial_when_threads_sleep(monkeypatch):
    """One thread inside the block only under OpenMP's passive waiting; the count is restored after."""
    from mlmscope.analyses.stats import serial_when_threads_sleep

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
        with serial_when_threads_sleep():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_WAIT_POLICY")
        with serial_when_threads_sleep():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
