"""mask_rank on synthetic captures with a planted rank (exact answers), streaming == one-shot, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from mlmscope.analyses.base import AnalysisContext, get
from mlmscope.analyses.mask_rank import MaskRank, MaskRankWarning, rank_gap_over_steps
from mlmscope.analyses.stats import hash_uniform
from mlmscope.probes.batch import CaptureBatch
from mlmscope.probes.masking import apply_mask

CLS, SEP, PAD, MASK = 1, 2, 0, 3
D, R, M, LAYERS = 16, 4, 3, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _basis(seed: int) -> tuple[np.ndarray, np.ndarray]:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(D, D)))
    return q[:, :R].T, q[:, R : R + M].T  # real-token subspace (R, D), mask-only subspace (M, D), orthogonal


def _vectors(sid: np.ndarray, pos: np.ndarray, mask: np.ndarray, layer: int, identical: bool) -> np.ndarray:
    """Deterministic 'model': real tokens live in span(A), [MASK] positions in span(B) ⟂ span(A)."""
    a, b = _basis(0)
    z = np.stack([hash_uniform(sid, pos, seed=k) for k in range(max(R, M))], -1) - 0.5
    real = (z[:, :R] * np.arange(1, R + 1)) @ a  # unequal variances along the R planted directions
    x = np.where(mask[:, None], z[:, :M] @ b, real) * (layer + 1) + 0.25
    if identical:
        x = np.tile(np.linspace(-1, 1, D), (len(sid), 1))
    return x


def synthetic_batches(
    n_sent: int = 60, batch_size: int = 16, identical: bool = False, seed: int = 0, variants=("clean", "mask15")
) -> list[CaptureBatch]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(5, 15, size=n_sent)
    out = []
    for variant in variants:
        for s in range(0, n_sent, batch_size):
            sids = list(range(s, min(s + batch_size, n_sent)))
            T = int(max(lens[sids])) + 2
            ids = torch.full((len(sids), T), PAD)
            am = torch.zeros((len(sids), T), dtype=torch.long)
            lab = torch.full((len(sids), T), -100)
            special = torch.ones((len(sids), T), dtype=torch.bool)
            for b, i in enumerate(sids):
                row = [CLS] + [10 + (i * 7 + k) % 50 for k in range(lens[i])] + [SEP]
                sp = [True] + [False] * int(lens[i]) + [True]
                row, labels = apply_mask(row, sp, variant, i, MASK, seed=0)
                ids[b, : len(row)], am[b, : len(row)] = torch.tensor(row), 1
                lab[b, : len(row)], special[b, : len(row)] = torch.tensor(labels), torch.tensor(sp)
            sid_grid = np.broadcast_to(np.array(sids)[:, None], (len(sids), T)).ravel()
            pos_grid = np.broadcast_to(np.arange(T)[None, :], (len(sids), T)).ravel()
            is_mask = (lab != -100).numpy().ravel()
            acts = {}
            for l, name in enumerate(["embed.hook_out"] + [f"blocks.{k}.hook_resid_post" for k in range(LAYERS)]):
                x = torch.tensor(_vectors(sid_grid, pos_grid, is_mask, l, identical), dtype=torch.float32)
                acts[name] = x.view(len(sids), T, D) * am[:, :, None]
            out.append(
                CaptureBatch(
                    variant=variant,
                    sentence_ids=torch.tensor(sids),
                    input_ids=ids,
                    attention_mask=am,
                    special_mask=special,
                    word_ids=[[None]] * len(sids),
                    labels=lab,
                    head_positions=torch.zeros(0, 2, dtype=torch.long),
                    acts=acts,
                )
            )
    return out


def _ctx(d: int = D) -> AnalysisContext:
    return AnalysisContext(model=None, arch=None, n_layers=LAYERS, n_heads=1, d_model=d, probe_set=None)


def _run(batches, **params) -> dict[str, pd.DataFrame]:
    an = MaskRank(MaskRank.Params(**params))
    acc = an.accumulator(_ctx())
    for b in batches:
        acc.update(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskRankWarning)
        return acc.result()


def _value(ranks, layer, token_set, normalisation="centred", metric="variance_rank"):
    r = ranks[
        (ranks.layer == layer)
        & (ranks.token_set == token_set)
        & (ranks.normalisation == normalisation)
        & (ranks.metric == metric)
    ]
    assert len(r) == 1
    return r["value"].item()


def test_registered():
    assert get("mask_rank") is MaskRank
    assert MaskRank().names(_ctx()) == ["embed.hook_out", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_planted_rank_exact():
    res = _run(synthetic_batches(), tau=1.0, min_tokens_per_dim=1.0)
    ranks = res["ranks"]
    for l in range(LAYERS + 1):
        assert _value(ranks, l, "clean_real") == R
        assert _value(ranks, l, "clean_at_mask") == R
        assert _value(ranks, l, "masked_real") == R
        assert _value(ranks, l, "masked_mask") == M
        assert _value(ranks, l, "masked_all") == R + M
        # the +0.25 offset adds one direction to the uncentred spectrum only
        assert _value(ranks, l, "clean_real", "uncentred") == R + 1
        assert _value(ranks, l, "clean_real", "standardised") == R
    gap = res["gap"]
    g = gap[(gap.normalisation == "centred") & (gap.metric == "variance_rank")]
    assert g["gap"].tolist() == [M] * (LAYERS + 1)
    assert g["gap_equal_n"].tolist() == [M - R] * (LAYERS + 1)
    only = res["mask_only"]
    assert only[only.token_set == "masked_mask"]["outside_fraction"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert only[only.token_set == "masked_real"]["outside_fraction"].to_numpy() == pytest.approx(0.0, abs=1e-9)
    assert (only["k"] == R).all()


def test_counts_and_equal_n():
    batches = synthetic_batches()
    res = _run(batches, min_tokens_per_dim=1.0)
    ranks = res["ranks"]
    n = {s: ranks[ranks.token_set == s]["n_tokens"].iloc[0] for s in ranks.token_set.unique()}
    n_tokens = sum(int(b.token_mask.sum()) for b in batches if b.variant == "clean")
    n_masked = sum(int(b.masked_mask.sum()) for b in batches if b.variant == "mask15")
    assert n["clean_real"] == n["masked_all"] == n_tokens
    assert n["masked_mask"] == n["clean_at_mask"] == n_masked
    assert n["masked_real"] == n_tokens - n_masked
    assert not ranks["low_n"].any() and (ranks["warning"] == "").all()


def test_streaming_equals_one_shot():
    batches = synthetic_batches(n_sent=40, batch_size=7)
    res = _run(batches, tau=0.9, min_tokens_per_dim=1.0)
    ranks = res["ranks"]
    layer = 1
    rows = [b["blocks.0.hook_resid_post"][b.token_mask].double().numpy() for b in batches if b.variant == "clean"]
    h = np.concatenate(rows)
    hc = h - h.mean(0)
    sig = np.linalg.svd(hc, compute_uv=False)
    lam = sig**2
    k = int(np.searchsorted(np.cumsum(lam) / lam.sum(), 0.9) + 1)
    tol = D * np.finfo(np.float64).eps * (h**2).sum()  # the documented numerical-zero rule, same as streaming
    keep = sig[lam > tol]
    p = keep / keep.sum()
    assert _value(ranks, layer, "clean_real") == k
    assert _value(ranks, layer, "clean_real", metric="entropy_rank") == pytest.approx(
        np.exp(-(p * np.log(p)).sum()), abs=1e-6
    )
    corr = np.corrcoef(h.T)
    ev = np.linalg.eigvalsh(corr)[::-1]
    ev[ev <= D * np.finfo(np.float64).eps * D] = 0
    q = np.sqrt(ev[ev > 0]) / np.sqrt(ev[ev > 0]).sum()
    assert _value(ranks, layer, "clean_real", "standardised", "entropy_rank") == pytest.approx(
        np.exp(-(q * np.log(q)).sum()), abs=1e-6
    )
    # batching must not change anything
    again = _run(synthetic_batches(n_sent=40, batch_size=40), tau=0.9, min_tokens_per_dim=1.0)["ranks"]
    np.testing.assert_allclose(again["value"].to_numpy(), ranks["value"].to_numpy(), atol=1e-6)


def test_too_few_tokens_warns_with_numbers():
    an = MaskRank()
    acc = an.accumulator(_ctx())
    for b in synthetic_batches(n_sent=5):
        acc.update(b)
    with pytest.warns(MaskRankWarning, match=r"only \d+ tokens for hidden size 16"):
        res = acc.result()
    ranks = res["ranks"]
    assert ranks["low_n"].all()
    assert ranks["warning"].str.contains("recommended >= 100 x d = 1600").all()
    assert ranks["value"].notna().all()


def test_identical_vectors_rank_zero():
    res = _run(synthetic_batches(identical=True), min_tokens_per_dim=1.0)
    ranks, only = res["ranks"], res["mask_only"]
    assert not ranks["value"].isna().any() and not only.isna().any().any()
    cen = ranks[ranks.normalisation != "uncentred"]
    assert (cen["value"] == 0).all()
    assert (ranks[ranks.normalisation == "uncentred"]["value"] == 1).all()
    assert (only["outside_fraction"] == 0).all()


def test_mask_pattern_mismatch_is_reported():
    batches = synthetic_batches()
    an = MaskRank(MaskRank.Params(mask_seed=1, min_tokens_per_dim=1.0))
    acc = an.accumulator(_ctx())
    for b in batches:
        acc.update(b)
    with pytest.warns(MaskRankWarning, match="mask_seed=1"):
        res = acc.result()
    assert res["ranks"]["warning"].str.contains("clean_at_mask is not the same token set").all()


def test_rank_gap_over_steps():
    frames, plain = [], None
    for step, n in ((0, 30), (100, 60)):
        r = _run(synthetic_batches(n_sent=n), tau=1.0, min_tokens_per_dim=1.0)["ranks"]
        frames.append(r.assign(step=step))
        plain = r
    out = rank_gap_over_steps(pd.concat(frames))
    assert list(out.columns[:5]) == ["step", "layer", "clean_real", "masked_all", "gap"]
    assert len(out) == 2 * (LAYERS + 1) and (out["gap"] == M).all()
    with pytest.raises(ValueError, match="step"):
        rank_gap_over_steps(plain)


def test_frames_are_tidy_and_parquet_safe(tmp_path):
    res = _run(synthetic_batches(n_sent=10))
    assert set(res) == {"ranks", "gap", "mask_only", "mask_dims"}
    for name, df in res.items():
        assert "step" not in df.columns and len(df)
        df.to_parquet(tmp_path / f"{name}.parquet")
        assert len(pd.read_parquet(tmp_path / f"{name}.parquet")) == len(df)
