"""Logit lens (full MLM head, masked positions, post-LN and pre-LN) and tuned lens (fit, warm start, accumulator)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from conftest import FIXTURE_TEXT
from mlmscope.analyses.base import AnalysisContext, SkipAnalysis
from mlmscope.analyses.lens import (
    LogitLens,
    NoMaskedPositionsError,
    NonFiniteActivationError,
    decode_hidden,
    lens_metric_sums,
    lens_sites,
)
from mlmscope.analyses.tuned_lens import (
    TRANSLATORS_FILE,
    AffineTranslators,
    FitConfig,
    TunedLens,
    fit_tuned_lens,
    load_translators,
    save_translators,
    steps_to_reach,
)
from mlmscope.probes import capture, load_model
from mlmscope.probes.batch import CaptureBatch
from tolerance import assert_close_scaled


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


SENTS = [_words(t) for t in FIXTURE_TEXT[:15]]


pytestmark = pytest.mark.usefixtures("one_thread")


# --- a tiny pre-LN MLM with the adapter API of probes.model.ArchAdapter (+ pre_ln / final_norm) ------------------


class _PreLNBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ffn: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, d_ffn), nn.Linear(d_ffn, d)

    def attn_part(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D // self.n_heads)
        p = s.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
        return x + self.o((p @ v).transpose(1, 2).reshape(B, T, D))

    def ffn_part(self, mid: torch.Tensor) -> torch.Tensor:
        return mid + self.fc2(nn.functional.gelu(self.fc1(self.ln2(mid))))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.ffn_part(self.attn_part(x, attention_mask.bool()))


class _PreLNEncoder(nn.Module):
    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, d_ffn: int, max_pos: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_pos, d)
        self.layers = nn.ModuleList([_PreLNBlock(d, n_heads, d_ffn) for _ in range(n_layers)])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))[None]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x


class _Head(nn.Module):
    """BERT-style head: dense → GELU → LayerNorm → tied decoder + bias."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        d = emb.weight.shape[1]
        self.dense, self.ln = nn.Linear(d, d), nn.LayerNorm(d)
        self.emb = emb
        self.bias = nn.Parameter(torch.randn(emb.weight.shape[0]) * 0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln(nn.functional.gelu(self.dense(h))) @ self.emb.weight.T + self.bias


class TinyPreLNForMaskedLM(nn.Module):
    """Pre-LN MLM: blocks h + f(LN(h)), a final norm, then a BERT-style head (random γ/β so norms matter)."""

    def __init__(self, vocab: int = 50, d: int = 16, n_layers: int = 2, n_heads: int = 2, d_ffn: int = 32) -> None:
        super().__init__()
        self.encoder = _PreLNEncoder(vocab, d, n_layers, n_heads, d_ffn)
        self.final_norm = nn.LayerNorm(d)
        self.head = _Head(self.encoder.tok)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(self.encoder(input_ids, attention_mask)))


class PreLNAdapter:
    """The tiny pre-LN model behind the :class:`mlmscope.probes.model.Arch` protocol (as ``ArchAdapter`` is)."""

    pre_ln = True
    has_mlm_head = True
    config = None

    def __init__(self, model: TinyPreLNForMaskedLM) -> None:
        self.model = model
        self.n_layers = len(model.encoder.layers)
        self.n_heads = model.encoder.layers[0].n_heads
        self.d_model = model.final_norm.weight.shape[0]
        self.max_length = model.encoder.pos.num_embeddings

    def position_embeddings(self) -> tuple[torch.Tensor | None, int]:
        return self.model.encoder.pos.weight, 0

    @property
    def encoder_model(self) -> nn.Module:
        return self.model.encoder

    def layer(self, l: int) -> nn.Module:
        return self.model.encoder.layers[l]

    def ln1(self, l: int) -> nn.Module:
        return self.layer(l).ln1

    def ln2(self, l: int) -> nn.Module:
        return self.layer(l).ln2

    def attn_out_dense(self, l: int) -> nn.Module:
        return self.layer(l).o

    def mlp_out_dense(self, l: int) -> nn.Module:
        return self.layer(l).fc2

    def final_norm(self) -> nn.Module:
        return self.model.final_norm

    def mlm_head(self) -> nn.Module:
        return self.model.head

    def apply_mlm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.head(h)


def prel_model(seed: int = 0, **kw) -> tuple[TinyPreLNForMaskedLM, PreLNAdapter]:
    torch.manual_seed(seed)
    m = TinyPreLNForMaskedLM(**kw).eval()
    return m, PreLNAdapter(m)


def prel_batch(
    model: TinyPreLNForMaskedLM, B: int = 6, T: int = 12, seed: int = 0, mask_id: int = 1, n_mask: int = 2
) -> CaptureBatch:
    """A synthetic ``mask15``-style CaptureBatch from the pre-LN model (rows of varying length, padding zeroed)."""
    g = torch.Generator().manual_seed(seed)
    V = model.encoder.tok.weight.shape[0]
    lengths = torch.randint(6, T + 1, (B,), generator=g)
    am = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = torch.randint(3, V, (B, T), generator=g) * am
    special = ~am.bool()
    special[:, 0] = True
    special[torch.arange(B), lengths - 1] = True
    labels = torch.full((B, T), -100)
    for b in range(B):
        pos = torch.randperm(int(lengths[b]) - 2, generator=g)[:n_mask] + 1
        labels[b, pos] = ids[b, pos]
        ids[b, pos] = mask_id
    keep = am.bool()
    acts = {}
    with torch.no_grad():
        x = model.encoder.embed(ids)
        acts["embed.hook_out"] = x
        for l, blk in enumerate(model.encoder.layers):
            acts[f"blocks.{l}.hook_resid_pre"] = x
            mid = blk.attn_part(x, keep)
            x = blk.ffn_part(mid)
            acts[f"blocks.{l}.hook_resid_mid"], acts[f"blocks.{l}.hook_resid_post"] = mid, x
    acts = {k: v * keep[:, :, None] for k, v in acts.items()}
    return CaptureBatch(
        "mask15",
        torch.arange(B),
        ids,
        am,
        special,
        [[None] * T for _ in range(B)],
        labels,
        (labels != -100).nonzero(),
        acts,
    )


def make_ctx(arch, n_layers: int, d_model: int, model=None, **fields) -> AnalysisContext:
    return AnalysisContext(
        model=model, arch=arch, n_layers=n_layers, n_heads=2, d_model=d_model, probe_set=None, step=7, **fields
    )


def lm_ctx(lm, **fields) -> AnalysisContext:
    return make_ctx(lm.arch, lm.n_layers, lm.d_model, model=lm.model, **fields)


def run_analysis(analysis, ctx, batches):
    acc = analysis.accumulator(ctx)
    for b in batches:
        acc.update(b)
    return acc, acc.result()


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    return load_model(micro_model_dir)


@pytest.fixture(scope="module")
def micro_mask15(micro):
    names = [s.name for s in lens_sites(micro.n_layers)] + ["mlm_head.hook_out"]
    return list(capture(micro, SENTS, variants=("mask15",), names=names, batch_size=8))


# --- logit lens: parity and the full head ---------------------------------------------------------------------------


def test_logit_lens_parity_post_ln_micro(micro, micro_mask15):
    """At the last layer the lens reproduces the model's own logits (capture head output and a plain HF call)."""
    L = micro.n_layers
    for b in micro_mask15:
        mm = b.masked_mask
        lens = decode_hidden(micro.arch, b[f"blocks.{L - 1}.hook_resid_post"][mm])
        assert_close_scaled(lens, b["mlm_head.hook_out"])
        with torch.no_grad():
            hf = micro.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[mm]
        assert_close_scaled(lens, hf)


def test_head_transform_not_skipped(micro, micro_mask15):
    """decode_hidden = W_E · LN(gelu(W_t h + b_t)) + b_dec by hand, and differs from the bare decoder."""
    h = micro_mask15[0]["embed.hook_out"][micro_mask15[0].masked_mask]
    cls = micro.model.cls.predictions
    t = cls.transform
    z = nn.functional.gelu(h @ t.dense.weight.T + t.dense.bias)
    z = nn.functional.layer_norm(z, z.shape[-1:], t.LayerNorm.weight, t.LayerNorm.bias, t.LayerNorm.eps)
    by_hand = z @ micro.model.get_input_embeddings().weight.T + cls.bias
    with torch.no_grad():
        lens = decode_hidden(micro.arch, h)
        bare = micro.model.get_output_embeddings()(h)
    assert_close_scaled(lens, by_hand.detach())
    assert (lens - bare).abs().max() > 0.1


def test_logit_lens_accumulator_micro(micro, micro_mask15):
    _, res = run_analysis(LogitLens(), lm_ctx(micro), micro_mask15)
    df = res["per_layer"]
    assert list(df["site"]) == ["embed", "resid_mid", "resid_post", "resid_mid", "resid_post"]
    last = df.iloc[-1]
    assert last["kl"] == pytest.approx(0.0, abs=1e-6) and last["top1_agree"] == 1.0 and last["p_at_10"] == 1.0
    n = sum(int(b.masked_mask.sum()) for b in micro_mask15)
    assert (df["n_masked"] == n).all() and n > 15
    assert (df["kl"].iloc[:-1] > 0).all() and (df["gold_rank"] >= 1).all()
    # the final row's CE equals the model's own masked-LM loss on these batches
    ce = sum(
        float(nn.functional.cross_entropy(b["mlm_head.hook_out"], b.labels[b.masked_mask], reduction="sum"))
        for b in micro_mask15
    )
    assert last["ce"] == pytest.approx(ce / n, rel=1e-5)


def test_logit_lens_parity_pre_ln():
    """Pre-LN: final norm applied to the raw last block output reproduces the logits; without it, it does not."""
    model, arch = prel_model()
    b = prel_batch(model)
    mm = b.masked_mask
    with torch.no_grad():
        want = model(b.input_ids, b.attention_mask)[mm]
        got = decode_hidden(arch, b["blocks.1.hook_resid_post"][mm])
        no_norm = arch.apply_mlm_head(b["blocks.1.hook_resid_post"][mm])
    assert_close_scaled(got, want)
    assert (no_norm - want).abs().max() > 0.1


def test_pre_ln_final_norm_recomputed_per_layer():
    """Layer-0 decoding normalises h_0 with h_0's own statistics (not the last layer's: TransformerLens #1076)."""
    model, arch = prel_model()
    b = prel_batch(model)
    mm = b.masked_mask
    h0, hL = b["embed.hook_out"][mm], b["blocks.1.hook_resid_post"][mm]
    fn = model.final_norm

    def norm_with(x, stats):
        mu, var = stats.mean(-1, keepdim=True), stats.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + fn.eps) * fn.weight + fn.bias

    with torch.no_grad():
        got = decode_hidden(arch, h0)
        own = model.head(norm_with(h0, h0))
        stale = model.head(norm_with(h0, hL))
    assert_close_scaled(got, own)
    assert (got - stale).abs().max() > 0.1


def test_logit_lens_accumulator_pre_ln():
    model, arch = prel_model()
    batches = [prel_batch(model, seed=s) for s in range(3)]
    _, res = run_analysis(LogitLens(), make_ctx(arch, 2, 16), batches)
    df = res["per_layer"]
    assert df.iloc[-1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert df.iloc[-1]["n_masked"] == sum(int(b.masked_mask.sum()) for b in batches)


# --- metrics by hand ------------------------------------------------------------------------------------------------


def test_lens_metrics_hand_computed():
    final = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0], [0.5, 0.4, 5.0, 0.3, 1.0, 0.0]])
    layer = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    gold = torch.tensor([2, 2])
    s = lens_metric_sums(layer, final, gold, ks=(2, 5))
    p, q = final.softmax(-1), layer.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    assert float(s["kl"][0]) == pytest.approx(float(kl.sum()), rel=1e-6)
    assert float(s["top1_agree"][0]) == 0.0  # layer top-1: 1 and 5; final: 0 and 2
    assert float(s["p_at_2"][0]) == 1.0  # token 1 is in final top-2 of row 0 only
    assert float(s["p_at_5"][0]) == 1.0  # row 0 only: token 5 is row 1's last of 6
    assert float(s["surprisal"][0]) == pytest.approx(float(-(p[0, 1].log() + p[1, 5].log())), rel=1e-6)
    assert float(s["ce"][0]) == pytest.approx(float(-(q[0, 2].log() + q[1, 2].log())), rel=1e-6)
    assert float(s["acc"][0]) == 0.0
    assert float(s["gold_rank"][0]) == 2.0 + 2.0  # row 0: below token 1; row 1: below token 5
    assert float(s["entropy"][0]) == pytest.approx(float(-(q * q.log()).sum()), rel=1e-6)


# --- bad input --------------------------------------------------------------------------------------------------------


def test_headless_model_lens_skipped(micro_headless_dir):
    lm = load_model(micro_headless_dir)
    for analysis in (LogitLens(), TunedLens()):
        with pytest.raises(SkipAnalysis, match="no trained MLM head"):
            analysis.accumulator(lm_ctx(lm))


def test_no_masked_positions(micro):
    clean = list(capture(micro, SENTS[:4], variants=("clean",), names=LogitLens().names(lm_ctx(micro))))
    for analysis in (LogitLens(), TunedLens()):
        with pytest.raises(NoMaskedPositionsError, match="no masked positions"):
            run_analysis(analysis, lm_ctx(micro), clean)


def test_final_layer_nan_names_checkpoint(micro, micro_mask15):
    b = micro_mask15[0]
    acts = dict(b.acts)
    acts[f"blocks.{micro.n_layers - 1}.hook_resid_post"] = torch.full_like(acts["embed.hook_out"], float("nan"))
    bad = CaptureBatch(
        b.variant,
        b.sentence_ids,
        b.input_ids,
        b.attention_mask,
        b.special_mask,
        b.word_ids,
        b.labels,
        b.head_positions,
        acts,
    )
    for analysis in (LogitLens(), TunedLens()):
        acc = analysis.accumulator(lm_ctx(micro, checkpoint="runs/x/step_000400"))
        with pytest.raises(NonFiniteActivationError, match=r"runs/x/step_000400.*final layer"):
            acc.update(bad)


# --- tuned lens -------------------------------------------------------------------------------------------------------


def _toy_problem(seed=0, K=2, N=400, d=8, V=20):
    """hiddens whose final distribution is head(R_k h + c_k): an affine translator can reach KL = 0."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g)
    head = lambda h: h @ W.T
    h = torch.randn(K, N, d, generator=g)
    R = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
    final = head(h[0] @ R.T + 0.2)
    hiddens = torch.stack([h[0], h[0] * 1.0])
    return hiddens, final, head


def test_fit_tuned_lens_zero_init_is_logit_lens_and_improves():
    hiddens, final, head = _toy_problem()
    tr, steps, hist = fit_tuned_lens(hiddens, final, head, config=FitConfig(max_steps=150))
    logp = final.log_softmax(-1)
    logit_lens_kl = float((logp.exp() * (logp - head(hiddens[0]).log_softmax(-1))).sum(-1).mean())
    assert hist[0][0] == pytest.approx(logit_lens_kl, rel=1e-5)  # step 0 = identity = logit lens
    assert all(h[-1] < 0.2 * h[0] for h in hist) and all(0 < s <= 150 for s in steps)
    assert len(hist[0]) == steps[0] + 1
    assert isinstance(tr, AffineTranslators) and tr.weight.abs().max() > 0


def test_fit_tuned_lens_warm_start_saves_steps():
    hiddens, final, head = _toy_problem()
    cfg = FitConfig(max_steps=200)
    cold, _cold_steps, _cold_hist = fit_tuned_lens(hiddens, final, head, config=cfg)
    # a slightly perturbed "next checkpoint": warm start from the previous fit
    hiddens2 = hiddens * 1.02
    _warm, _warm_steps, warm_hist = fit_tuned_lens(hiddens2, final, head, init=cold.state_dict(), config=cfg)
    _cold2, cold2_steps, cold2_hist = fit_tuned_lens(hiddens2, final, head, config=cfg)
    for k in range(2):
        reach = steps_to_reach(warm_hist[k], cold2_hist[k][-1], rtol=0.05)
        assert reach is not None and reach < cold2_steps[k] / 2
        assert warm_hist[k][0] < 0.5 * cold2_hist[k][0]


def test_fit_tuned_lens_rejects_mismatched_init():
    hiddens, final, head = _toy_problem()
    from mlmscope.analyses.tuned_lens import TunedLensError

    with pytest.raises(TunedLensError, match="shape"):
        fit_tuned_lens(hiddens, final, head, init=AffineTranslators(3, 8).state_dict())


def test_fit_does_not_touch_model_parameters(micro, micro_mask15):
    head = micro.arch.mlm_head()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    flags = [p.requires_grad for p in head.parameters()]
    b = micro_mask15[0]
    mm = b.masked_mask
    hs = torch.stack([b["embed.hook_out"][mm]])
    fit_tuned_lens(
        hs,
        decode_hidden(micro.arch, b["blocks.1.hook_resid_post"][mm]).detach(),
        lambda h: decode_hidden(micro.arch, h),
        config=FitConfig(max_steps=3),
        frozen=[head],
    )
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert [p.requires_grad for p in head.parameters()] == flags
    assert all(p.grad is None for p in head.parameters())


def test_tuned_lens_accumulator_micro_warm_start_round_trip(micro, micro_mask15, tmp_path):
    params = TunedLens.Params(max_steps=40, heldout_every=3)
    acc, res = run_analysis(TunedLens(params), lm_ctx(micro), micro_mask15)
    per, fit = res["per_layer"], res["fit"]
    assert set(per["lens"]) == {"logit", "tuned"} and len(fit) == micro.n_layers
    assert (fit["init"] == "zero").all() and (fit["train_kl"] <= fit["train_kl_start"]).all()
    tuned_train = fit["train_kl"].to_numpy()
    assert (tuned_train < fit["train_kl_start"].to_numpy()).all()
    # the final layer has no translator: both lenses give the model's own distribution there
    for lens in ("logit", "tuned"):
        assert per[per["lens"] == lens].iloc[-1]["kl"] == pytest.approx(0.0, abs=1e-6)
    state = acc.translator_state()
    path = save_translators(state, tmp_path / "tl.safetensors")
    acc.save_artefacts(tmp_path)  # what the runner stores beside the tables
    loaded = load_translators(path)
    torch.testing.assert_close(loaded["weight"], state["weight"])
    assert loaded["steps"] == state["steps"] and loaded["checkpoint"] == "step 7"
    # warm start from the file, with the cold comparison
    params_cmp = TunedLens.Params(max_steps=40, heldout_every=3, compare_cold=True)
    _acc2, res2 = run_analysis(TunedLens(params_cmp), lm_ctx(micro, previous=tmp_path), micro_mask15)
    fit2 = res2["fit"]
    assert set(fit2["init"]) <= {"warm", "zero (warm start rejected)"}
    assert {"cold_steps", "warm_steps_to_cold_kl", "heldout_kl_warm", "drift_fro"} <= set(fit2.columns)
    # same checkpoint: the warm start is already at the cold optimum's neighbourhood
    assert (fit2["train_kl_start"] <= fit["train_kl"] * 1.001 + 1e-9).all()
    assert (fit2["warm_steps_to_cold_kl"].fillna(10**9) <= fit2["cold_steps"]).all()


# --- through the trajectory runner ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_runner_end_to_end_warm_start_chain(tmp_path):
    """Real capture + runner: every depth analysis stores results; the tuned lens is warm-started from step t-1."""
    from mlmscope.analyses.redundancy import LayerDrop, Redundancy
    from mlmscope.analyses.runner import Runner, RunnerConfig
    from mlmscope.analyses.store import load_results
    from test_runner import make_run

    run = make_run(tmp_path / "run", steps=(0, 1, 2))
    analyses = [
        TunedLens(TunedLens.Params(max_steps=15, heldout_every=3)),
        LogitLens(),
        Redundancy(),
        LayerDrop(LayerDrop.Params(max_sentences=4)),
    ]
    summary = Runner(run, RunnerConfig(batch_size=8, device="cpu"), probe_set=SENTS[:10], analyses=analyses).run()
    assert summary.failed == 0
    fit = load_results(run, "tuned_lens", table="fit").sort_values(["step", "translator"])
    assert list(fit.groupby("step")["init"].first()) == ["zero", "warm", "warm"]
    assert fit[fit.step > 0]["drift_fro"].notna().all()
    for name, table in (("logit_lens", "per_layer"), ("redundancy", "cka"), ("layer_drop", "per_unit")):
        assert sorted(load_results(run, name, table=table)["step"].unique()) == [0, 1, 2]
    assert len(list(run.rglob(TRANSLATORS_FILE))) == 3


def test_logit_lens_shared_final_reference_equals_own_decode(micro, micro_mask15):
    """The final distribution taken from the capture's head output (shared across analyses through the batch memo)
    gives the same table as decoding the last hidden state inside the lens."""
    _, shared = run_analysis(LogitLens(), lm_ctx(micro), micro_mask15)
    own = [
        CaptureBatch(
            b.variant,
            b.sentence_ids,
            b.input_ids,
            b.attention_mask,
            b.special_mask,
            b.word_ids,
            b.labels,
            b.head_positions,
            {k: v for k, v in b.acts.items() if k != "mlm_head.hook_out"},
        )
        for b in micro_mask15
    ]
    _, alone = run_analysis(LogitLens(), lm_ctx(micro), own)
    assert all("lens.final_ref:cpu" in b.derived for b in micro_mask15)
    for m in ("kl", "ce", "entropy", "surprisal", "gold_rank", "top1_agree"):
        assert list(shared["per_layer"][m]) == pytest.approx(list(alone["per_layer"][m]), rel=1e-5, abs=1e-6), m


def test_lens_metric_sums_float64_accuracy():
    """Entropy and KL against a float64 computation at a BERT-size vocabulary (fp32 einsum accumulation was off by
    ~1e-4 nats per position here)."""
    g = torch.Generator().manual_seed(0)
    final = 3 * torch.randn(64, 30522, generator=g)
    layer = final + 0.05 * torch.randn(64, 30522, generator=g)  # a nearly final layer: a small KL
    gold = torch.randint(0, 30522, (64,), generator=g)
    s = lens_metric_sums(layer, final, gold)
    lp, lq = final.double().log_softmax(-1), layer.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    ent = -(lq.exp() * lq).sum(-1)
    assert float(s["kl"][0]) / 64 == pytest.approx(float(kl.mean()), rel=1e-3)
    assert abs(float(s["entropy"][0]) / 64 - float(ent.mean())) < 1e-5


def test_real_adapter_and_the_pre_ln_double_satisfy_the_arch_protocol(micro):
    from mlmscope.probes.model import Arch

    _, double = prel_model()
    assert isinstance(micro.arch, Arch) and isinstance(double, Arch)
    assert (micro.arch.pre_ln, micro.arch.final_norm()) == (False, None)
    assert double.pre_ln and double.final_norm() is double.model.final_norm
