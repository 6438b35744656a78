"""outliers on synthetic captures with planted outlier / position dims (exact answers), pure-math parity, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mlmscope.analyses.base import AnalysisContext, get
from mlmscope.analyses.outliers import (
    OutlierParamsError,
    Outliers,
    mean_pair_cosine,
    outlier_emergence,
    ridge_heldout_r2,
    three_sigma_flags,
)
from mlmscope.analyses.stats import StreamingCovariance, hash_uniform
from mlmscope.probes.batch import CaptureBatch

D, LAYERS, MAXPOS = 16, 2, 32
MAX_DIM, MIN_DIM = 7, 5  # planted: dim 7 = +10 everywhere (argmax), dim 5 = -10 - pos/2 (argmin, follows position)


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_batches(n_sent: int = 80, batch_size: int = 16, seed: int = 0) -> list[CaptureBatch]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(4, 20, size=n_sent)
    out = []
    for s in range(0, n_sent, batch_size):
        sids = list(range(s, min(s + batch_size, n_sent)))
        T = int(max(lens[sids])) + 2
        am = torch.zeros((len(sids), T), dtype=torch.long)
        special = torch.ones((len(sids), T), dtype=torch.bool)
        for b, i in enumerate(sids):
            am[b, : lens[i] + 2] = 1
            special[b, 1 : lens[i] + 1] = False
        pos = torch.arange(T, dtype=torch.float32).expand(len(sids), T)
        acts = {}
        for l, name in enumerate(["embed.hook_out"] + [f"blocks.{k}.hook_resid_post" for k in range(LAYERS)]):
            sid, p, k = np.meshgrid(np.array(sids), np.arange(T), np.arange(D), indexing="ij")
            u = hash_uniform(sid, p, k, seed=l)  # a deterministic function of (sentence, position, dim, layer)
            x = torch.as_tensor((u - 0.5) * np.sqrt(12.0), dtype=torch.float32)  # unit variance
            x[..., MAX_DIM] = 10.0
            x[..., MIN_DIM] = -10.0 - pos / 2
            acts[name] = x * am[:, :, None]
        out.append(
            CaptureBatch(
                variant="clean",
                sentence_ids=torch.tensor(sids),
                input_ids=torch.zeros_like(am),
                attention_mask=am,
                special_mask=special,
                word_ids=[[None]] * len(sids),
                labels=torch.full_like(am, -100),
                head_positions=torch.zeros(0, 2, dtype=torch.long),
                acts=acts,
            )
        )
    return out


class _StubArch:
    """Just what outliers reads: config, family, max_length, position_embeddings(), ln2(l)."""

    def __init__(self, with_pe: bool = True) -> None:
        self.config = SimpleNamespace(position_embedding_type="absolute", pad_token_id=0)
        self.family, self.max_length = "bert", MAXPOS
        self._emb = nn.Module()
        if with_pe:
            pe = torch.randn(MAXPOS, D, generator=torch.Generator().manual_seed(0)) * 0.1
            pe[:, MIN_DIM] = -torch.arange(MAXPOS, dtype=torch.float32)
            self._emb.position_embeddings = nn.Embedding.from_pretrained(pe)
        self._ln = []
        for l in range(LAYERS):
            ln = nn.LayerNorm(D)
            with torch.no_grad():
                ln.weight.fill_(1.0)
                ln.weight[MAX_DIM if l == 0 else MIN_DIM] = 6.0  # each flagged in 1 of the 2 layers
            self._ln.append(ln)

    def embeddings(self) -> nn.Module:
        return self._emb

    def position_embeddings(self):
        pe = getattr(self._emb, "position_embeddings", None)
        return (pe.weight, 0) if pe is not None else (None, 0)

    def ln2(self, l: int) -> nn.Module:
        return self._ln[l]


def _ctx(arch=None) -> AnalysisContext:
    return AnalysisContext(model=None, arch=arch, n_layers=LAYERS, n_heads=1, d_model=D, probe_set=None)


def _run(arch=None, batches=None, **params) -> dict[str, pd.DataFrame]:
    acc = Outliers(Outliers.Params(**params)).accumulator(_ctx(arch))
    for b in batches if batches is not None else synthetic_batches():
        acc.update(b)
    return acc.result()


def _note(res, key):
    n = res["notes"]
    return n[n.key == key]["value"].item()


def test_registered():
    assert get("outliers") is Outliers


def test_planted_outlier_dims_detected_exactly():
    res = _run(_StubArch())
    top = res["top"]
    first = top[top["rank"] == 1]
    assert (first[first.kind == "argmax"]["dim"] == MAX_DIM).all()
    assert (first[first.kind == "argmin"]["dim"] == MIN_DIM).all()
    assert np.allclose(first["freq"], 1.0)
    freq = res["freq"]
    assert freq.groupby(["layer", "kind"])["count"].sum().eq(freq["n_tokens"].iloc[0]).all()
    assert _note(res, "activation_outlier_dims") == f"{MIN_DIM} {MAX_DIM}"
    # LN rule: each dim flagged in 1 of 2 layers: > 0.25 x 2 layers passes, > 0.5 x 2 does not
    assert _note(res, "ln_outlier_dims") == f"{MIN_DIM} {MAX_DIM}"
    assert _note(_run(_StubArch(), ln_layer_fraction=0.5), "ln_outlier_dims") == ""
    ln = res["ln"]
    assert sorted(zip(ln.layer, ln.dim, ln.param)) == [(0, MAX_DIM, "gamma"), (1, MIN_DIM, "gamma")]
    moments = res["moments"]
    m7 = moments[(moments.dim == MAX_DIM)]
    assert np.allclose(m7["mean"], 10.0) and np.allclose(m7["std"], 0.0, atol=1e-6)


def test_position_link():
    res = _run(_StubArch())
    link = res["position_link"]
    d5 = link[link.dim == MIN_DIM]
    assert np.allclose(d5["eta2"], 1.0, atol=1e-9)  # dim 5 is a function of position only
    assert np.allclose(d5["pe_corr"], 1.0, atol=1e-9)  # per-position mean = -10 - p/2 follows PE[:, 5] = -p
    d7 = link[link.dim == MAX_DIM]
    assert np.allclose(d7["eta2"], 0.0)
    pe = res["pe_dims"].set_index("dim")
    assert pe.loc[MIN_DIM, "pe_argmin_frac"] == pytest.approx(1 - 1 / MAXPOS)  # every row except position 0
    probe = res["position_probe"].set_index(["layer", "condition", "target"])["r2"]
    for l in range(LAYERS + 1):
        assert probe[(l, "all_dims", "index")] == pytest.approx(1.0, abs=1e-3)  # dim 5 is linear in position
        assert probe[(l, "without_outliers", "index")] < 0.05
        assert probe[(l, "all_dims", "onehot")] > probe[(l, "without_outliers", "onehot")] + 0.01
    aniso = res["anisotropy"].set_index(["layer", "condition"])["value"]
    for l in range(LAYERS + 1):
        assert aniso[(l, "raw")] > 0.7
        assert abs(aniso[(l, "clipped")]) < 0.15
    assert (res["anisotropy"]["n_pairs"] == 40).all()


def test_no_model_and_no_position_embeddings_skip_with_reason():
    res = _run(None)
    assert _note(res, "position_link").startswith("skipped: no model")
    assert _note(res, "ln_rule").startswith("skipped")
    assert res["pe_dims"].empty and res["position_link"]["pe_corr"].isna().all()
    assert res["position_probe"]["r2"].notna().all()  # the probe needs no model
    res = _run(_StubArch(with_pe=False))
    assert "no learned absolute position embeddings" in _note(res, "position_link")


def test_identical_vectors_no_nan():
    batches = synthetic_batches(n_sent=20)
    for b in batches:
        for k in b.acts:
            b.acts[k] = torch.ones_like(b.acts[k]) * b.attention_mask[:, :, None]
    res = _run(_StubArch(), batches)
    assert not res["anisotropy"]["value"].isna().any()
    assert not res["position_link"][["eta2"]].isna().any().any()
    assert _note(res, "activation_outlier_dims") == "0"  # ties resolve to the first index, as torch.argmax


def test_streaming_batch_invariance():
    a = _run(_StubArch(), synthetic_batches(batch_size=7))
    b = _run(_StubArch(), synthetic_batches(batch_size=80))
    for t in ("freq", "position_probe", "anisotropy", "position_link"):
        num = a[t].select_dtypes("number").columns
        np.testing.assert_allclose(a[t][num].to_numpy(float), b[t][num].to_numpy(float), atol=1e-6, err_msg=t)


def test_ridge_r2_matches_one_shot():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) + 3
    y = x @ rng.normal(size=(6, 3)) + rng.normal(size=(400, 3))
    tr, te = StreamingCovariance(9), StreamingCovariance(9)
    for i in range(0, 300, 50):
        tr.update(np.hstack([x[i : i + 50], y[i : i + 50]]))
    te.update(np.hstack([x[300:], y[300:]]))
    keep = torch.tensor([True, True, False, True, True, True])
    xs = x[:, keep.numpy()]
    x_idx, y_idx = keep.nonzero().squeeze(1), torch.arange(6, 9)
    xc, yc = xs[:300] - xs[:300].mean(0), y[:300] - y[:300].mean(0)
    lam = 0.01 * np.trace(xc.T @ xc) / 5
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(5), xc.T @ yc)
    b = y[:300].mean(0) - xs[:300].mean(0) @ w
    pred = xs[300:] @ w + b
    r2 = 1 - ((y[300:] - pred) ** 2).sum() / ((y[300:] - y[300:].mean(0)) ** 2).sum()
    assert ridge_heldout_r2(tr, te, x_idx, y_idx, 0.01) == pytest.approx(r2, abs=1e-9)


def test_three_sigma_and_pair_cosine_hand_values():
    w = torch.ones(20)
    w[3] = 10.0
    flags, z = three_sigma_flags(w)
    assert flags.nonzero().squeeze(1).tolist() == [3]
    assert z[3] == pytest.approx((10 - 1.45) / w.std().item())
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, -1.0], [5.0, 5.0]])
    val, n = mean_pair_cosine(x)
    assert n == 2 and val == pytest.approx((np.sqrt(0.5) - 1.0) / 2)


def test_outlier_emergence():
    rows = []
    for step, f in ((0, 0.1), (100, 0.6), (200, 0.3), (300, 0.7), (400, 0.9)):
        rows += [
            {"step": step, "layer": 0, "dim": 4, "kind": "argmin", "freq": 0.99},  # input layer: ignored
            {"step": step, "layer": 1, "dim": 4, "kind": "argmin", "freq": f},
            {"step": step, "layer": 2, "dim": 9, "kind": "argmax", "freq": 0.8 if step >= 300 else 0.0},
        ]
    out = outlier_emergence(pd.DataFrame(rows), threshold=0.5).set_index(["dim", "kind"])
    assert out.loc[(4, "argmin"), "emergence_step"] == 100
    assert out.loc[(4, "argmin"), "stable_from"] == 300
    assert out.loc[(4, "argmin"), "n_steps_present"] == 3
    assert out.loc[(4, "argmin"), "final_freq"] == pytest.approx(0.9)
    assert out.loc[(9, "argmax"), "emergence_step"] == 300 and out.loc[(9, "argmax"), "first_layers"] == "2"
    assert outlier_emergence(pd.DataFrame(rows), threshold=0.95).empty
    with pytest.raises(ValueError, match="step"):
        outlier_emergence(pd.DataFrame(rows).drop(columns="step"))


def test_bad_params():
    with pytest.raises(OutlierParamsError, match="freq_threshold"):
        Outliers(Outliers.Params(freq_threshold=0.0)).accumulator(_ctx())


@pytest.mark.slow
def test_real_capture_minilm(minilm_dir):
    """Both geometry analyses through the real capture on the pretrained MiniLM (head-less BertModel)."""
    from conftest import FIXTURE_TEXT
    from mlmscope.analyses.mask_rank import MaskRank
    from mlmscope.probes.capture import capture
    from mlmscope.probes.model import load_model

    lm = load_model(minilm_dir)
    ctx = AnalysisContext(
        model=lm.model, arch=lm.arch, n_layers=lm.n_layers, n_heads=lm.n_heads, d_model=lm.d_model, probe_set=None
    )
    words = [s.rstrip(".").split() for s in FIXTURE_TEXT[:15]]
    analyses = [Outliers(), MaskRank()]
    accs = [a.accumulator(ctx) for a in analyses]
    names = analyses[0].names(ctx)
    assert names == analyses[1].names(ctx) and len(names) == 7
    for batch in capture(lm, words, variants=("clean", "mask15"), names=names, batch_size=8):
        for a, acc in zip(analyses, accs):
            if batch.variant in a.variants:
                acc.update(batch)
    out = accs[0].result()
    n_tokens = int(out["freq"]["n_tokens"].iloc[0])
    assert out["freq"].groupby(["layer", "kind"])["count"].sum().eq(n_tokens).all()
    assert "skipped" not in " ".join(out["notes"]["value"])  # MiniLM has learned absolute PE and output LNs
    assert len(out["pe_dims"]) > 0 and out["position_link"]["pe_corr"].notna().any()
    with pytest.warns(UserWarning, match="tokens for hidden size 384"):
        ranks = accs[1].result()["ranks"]
    cr = ranks[(ranks.token_set == "clean_real") & (ranks.normalisation == "centred")]
    assert (cr["n_tokens"] == n_tokens).all()
    assert ((cr["value"] >= 1) & (cr["value"] <= min(n_tokens, 384))).all()


def test_position_moments_match_dense_covariance():
    from mlmscope.analyses.outliers import PositionMoments

    rng = np.random.default_rng(2)
    x, pos = rng.normal(size=(300, 5)) + 2, rng.integers(0, 7, size=300)
    z = np.hstack([x, np.eye(7)[pos], pos[:, None]])
    dense, pm = StreamingCovariance(13), PositionMoments(5, 7)
    dense.update(z)
    for i in range(0, 300, 70):
        pm.update(torch.as_tensor(x[i : i + 70]), torch.as_tensor(pos[i : i + 70]))
    np.testing.assert_allclose(pm.mean.numpy(), dense.mean.numpy(), atol=1e-12)
    np.testing.assert_allclose(pm.scatter.numpy(), dense.scatter.numpy(), atol=1e-9)


def test_frames_are_tidy_and_parquet_safe(tmp_path):
    for res in (_run(_StubArch()), _run(None)):
        for name, df in res.items():
            assert "step" not in df.columns
            df.to_parquet(tmp_path / f"{name}.parquet")
            back = pd.read_parquet(tmp_path / f"{name}.parquet")
            assert len(back) == len(df) and list(back.columns) == list(df.columns)
