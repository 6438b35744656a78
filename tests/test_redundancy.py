"""Layer redundancy (1 − cos, centred cosine, linear CKA) and layer-drop Δloss (nnsight intervention)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from mlmscope.analyses.base import SkipAnalysis
from mlmscope.analyses.lens import NoMaskedPositionsError, NonFiniteActivationError
from mlmscope.analyses.redundancy import LayerDrop, Redundancy, state_names
from mlmscope.probes import capture, load_model
from mlmscope.probes.batch import CaptureBatch
from test_lens import SENTS, lm_ctx, make_ctx, prel_batch, prel_model, run_analysis
from tolerance import approx_scaled, assert_close_scaled

pytestmark = pytest.mark.usefixtures("one_thread")


def _direct_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. (2019) eq. for linear CKA on the raw (n, d) matrices, columns centred."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def _synthetic(states: dict[str, torch.Tensor], token_mask: torch.Tensor, variant: str = "clean") -> CaptureBatch:
    B, T = token_mask.shape
    am = torch.ones(B, T, dtype=torch.long)
    return CaptureBatch(
        variant,
        torch.arange(B),
        torch.zeros(B, T, dtype=torch.long),
        am,
        ~token_mask,
        [[None] * T for _ in range(B)],
        torch.full((B, T), -100),
        torch.zeros(0, 2, dtype=torch.long),
        states,
    )


def _rotated_states(seed: int = 0, B: int = 8, T: int = 10, d: int = 6):
    """Two layers: h_1 = h_0 Q (Q orthogonal), h_2 an unrelated nonlinear map; mids arbitrary."""
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(B, T, d, generator=g) + 3.0  # a common offset, as LayerNorm β gives
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    h2 = torch.tanh(h0 @ torch.randn(d, d, generator=g)) * torch.linspace(0.1, 5, d)
    states = {
        "embed.hook_out": h0,
        "blocks.0.hook_resid_mid": torch.randn(B, T, d, generator=g),
        "blocks.0.hook_resid_post": h0 @ q,
        "blocks.1.hook_resid_mid": torch.randn(B, T, d, generator=g),
        "blocks.1.hook_resid_post": h2,
    }
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 0] = False
    mask[:, -1] = False
    return states, mask, q


def _redundancy(batches, n_layers=2, d=6, **params):
    _, res = run_analysis(Redundancy(Redundancy.Params(**params)), make_ctx(None, n_layers, d), batches)
    return res


def test_cka_self_one_and_rotation_invariant():
    states, mask, _q = _rotated_states()
    res = _redundancy([_synthetic(states, mask)])
    cka = res["cka"].pivot(index="layer_i", columns="layer_j", values="cka").to_numpy()
    assert cka.diagonal() == pytest.approx([1.0, 1.0, 1.0], abs=1e-12)
    f32 = dict(dtype=torch.float32, scale=1.0)  # inputs rounded to float32; CKA lies in [0, 1]
    assert cka[0, 1] == approx_scaled(1.0, **f32)  # CKA(X, XQ) = 1 (XQ rounded to float32)
    assert cka[1, 2] == approx_scaled(cka[0, 2], **f32)  # rotating X leaves CKA(X, Y) unchanged
    assert cka[0, 2] < 0.99
    x, y = states["embed.hook_out"][mask], states["blocks.1.hook_resid_post"][mask]
    assert cka[0, 2] == pytest.approx(_direct_cka(x, y), rel=1e-9)
    assert cka == pytest.approx(cka.T, abs=1e-12)


def test_standardised_cka_differs_and_is_scale_invariant():
    states, mask, _ = _rotated_states()
    res = _redundancy([_synthetic(states, mask)])
    scaled = dict(states)
    scaled["blocks.1.hook_resid_post"] = states["blocks.1.hook_resid_post"] * torch.linspace(1, 50, 6)
    res2 = _redundancy([_synthetic(scaled, mask)])
    std, std2 = res["cka"]["cka_std"].to_numpy(), res2["cka"]["cka_std"].to_numpy()
    assert std == approx_scaled(std2, dtype=torch.float32, scale=1.0)  # float32 inputs; per-dimension scaling removed
    assert abs(res["cka"]["cka"].iloc[2] - res2["cka"]["cka"].iloc[2]) > 1e-3  # plain CKA is not invariant to it


def test_streaming_equals_one_batch():
    states, mask, _ = _rotated_states(B=8)
    whole = _redundancy([_synthetic(states, mask)])
    halves = [_synthetic({k: v[s] for k, v in states.items()}, mask[s]) for s in (slice(0, 3), slice(3, 8))]
    split = _redundancy(halves)
    for table in ("per_layer", "cka"):
        num = whole[table].select_dtypes("number").columns
        assert whole[table][num].to_numpy() == pytest.approx(split[table][num].to_numpy(), rel=1e-9, abs=1e-12)


def test_cosines_hand_computed():
    states, mask, _ = _rotated_states()
    per = _redundancy([_synthetic(states, mask)])["per_layer"].set_index(["block", "unit"])
    x, y = states["embed.hook_out"][mask].double(), states["blocks.0.hook_resid_post"][mask].double()
    cos = nn.functional.cosine_similarity(x, y, dim=-1).mean()
    assert per.loc[(0, "block"), "redundancy"] == pytest.approx(1 - float(cos), rel=1e-9)
    xc, yc = x - x.mean(0), y - y.mean(0)
    ccos = (xc * yc).sum() / (xc.norm() * yc.norm())
    assert per.loc[(0, "block"), "cos_centred"] == pytest.approx(float(ccos), rel=1e-9)
    m1 = states["blocks.1.hook_resid_mid"][mask].double()
    assert per.loc[(1, "attn"), "cos"] == pytest.approx(float(nn.functional.cosine_similarity(y, m1).mean()), rel=1e-9)
    assert per.loc[(0, "block"), "n_tokens"] == int(mask.sum())


def test_nan_state_names_checkpoint():
    states, mask, _ = _rotated_states()
    states["blocks.1.hook_resid_post"] = states["blocks.1.hook_resid_post"].clone()
    states["blocks.1.hook_resid_post"][0, 3, 0] = float("nan")
    acc = Redundancy().accumulator(make_ctx(None, 2, 6, checkpoint="runs/demo/step_000800"))
    with pytest.raises(NonFiniteActivationError, match=r"step_000800.*blocks\.1\.hook_resid_post"):
        acc.update(_synthetic(states, mask))


# --- through the real capture ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    return load_model(micro_model_dir)


def test_redundancy_real_capture(micro):
    names = state_names(micro.n_layers)
    batches = list(capture(micro, SENTS, variants=("clean",), names=names, batch_size=6))
    _, res = run_analysis(Redundancy(), lm_ctx(micro), batches)
    per, cka = res["per_layer"], res["cka"]
    assert len(per) == 3 * micro.n_layers and per["redundancy"].between(0, 2).all()
    n_tokens = sum(int(b.token_mask.sum()) for b in batches)
    assert (per["n_tokens"] == n_tokens).all()
    assert len(cka) == (micro.n_layers + 1) ** 2
    assert cka[cka.layer_i == cka.layer_j]["cka"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    # cross-check one cosine against plain HF hidden states
    b = batches[0]
    with torch.no_grad():
        hs = micro.model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True
        ).hidden_states
    assert_close_scaled(b["blocks.1.hook_resid_post"][b.token_mask], hs[2][b.token_mask])


def test_headless_redundancy_runs_layer_drop_skipped(micro_headless_dir):
    lm = load_model(micro_headless_dir)
    batches = list(capture(lm, SENTS[:5], variants=("clean",), names=state_names(lm.n_layers)))
    _, res = run_analysis(Redundancy(), lm_ctx(lm), batches)
    assert len(res["per_layer"]) == 3 * lm.n_layers
    with pytest.raises(SkipAnalysis, match="no trained MLM head"):
        LayerDrop().accumulator(lm_ctx(lm))


# --- layer drop -------------------------------------------------------------------------------------------------------


def _masked_batches(lm, n=10):
    return list(capture(lm, SENTS[:n], variants=("mask15",), names=["mlm_head.hook_out"], batch_size=4))


def _hf_masked_loss(model, batches) -> float:
    ce, n = 0.0, 0
    for b in batches:
        with torch.no_grad():
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        ce += float(nn.functional.cross_entropy(logits[b.masked_mask], b.labels[b.masked_mask], reduction="sum"))
        n += int(b.masked_mask.sum())
    return ce / n


def test_layer_drop_identity_block_is_free(micro_model_dir):
    """Block 1 with zeroed output projections is the identity (post-LN, LN γ=1, β=0 at init): Δloss ≈ 0."""
    lm = load_model(micro_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in (lm.arch.attn_out_dense(1), lm.arch.mlp_out_dense(1)):
            m.weight.zero_()
            m.bias.zero_()
        # make the loss sensitive to the hidden state (random-init logits are near uniform whatever the input)
        lm.model.get_input_embeddings().weight.mul_(100.0)
    batches = _masked_batches(lm)
    _, res = run_analysis(LayerDrop(), lm_ctx(lm), batches)
    df = res["per_unit"].set_index(["unit", "block"])
    assert df.loc[("none", -1), "loss"] == pytest.approx(_hf_masked_loss(lm.model, batches), rel=1e-5)
    for unit in ("block", "attn", "ffn"):
        assert abs(df.loc[(unit, 1), "delta_loss"]) < 1e-5
    assert abs(df.loc[("block", 0), "delta_loss"]) > 1e-3
    assert df["n_masked"].iloc[0] == sum(int(b.masked_mask.sum()) for b in batches)


def test_layer_drop_matches_manual_skip(micro):
    """Skipping block 0 = running block 1 on the embedding output by hand; skipping FFN 1 = reading LN1's output."""
    batches = _masked_batches(micro, n=6)
    _, res = run_analysis(LayerDrop(), lm_ctx(micro), batches)
    df = res["per_unit"].set_index(["unit", "block"])
    enc, cls = micro.model.bert, micro.model.cls
    ce_block0 = ce_ffn1 = 0.0
    n = 0
    for b in batches:
        ext = (1.0 - b.attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # additive mask
        mm = b.masked_mask
        with torch.no_grad():
            e = enc.embeddings(input_ids=b.input_ids)
            h_skip0 = enc.encoder.layer[1](e, ext)
            h1 = enc.encoder.layer[0](e, ext)
            mid1 = enc.encoder.layer[1].attention(h1, ext)[0]
            ce_block0 += float(nn.functional.cross_entropy(cls(h_skip0)[mm], b.labels[mm], reduction="sum"))
            ce_ffn1 += float(nn.functional.cross_entropy(cls(mid1)[mm], b.labels[mm], reduction="sum"))
        n += int(mm.sum())
    assert df.loc[("block", 0), "loss"] == pytest.approx(ce_block0 / n, rel=1e-5)
    assert df.loc[("ffn", 1), "loss"] == pytest.approx(ce_ffn1 / n, rel=1e-5)


def test_layer_drop_pre_ln_identity_and_manual():
    model, arch = prel_model(seed=1)
    with torch.no_grad():
        model.encoder.layers[0].o.weight.zero_()
        model.encoder.layers[0].o.bias.zero_()
        model.encoder.layers[0].fc2.weight.zero_()
        model.encoder.layers[0].fc2.bias.zero_()
    batches = [prel_batch(model, seed=s) for s in range(2)]
    _, res = run_analysis(LayerDrop(), make_ctx(arch, 2, 16, model=model), batches)
    df = res["per_unit"].set_index(["unit", "block"])
    for unit in ("block", "attn", "ffn"):
        assert abs(df.loc[(unit, 0), "delta_loss"]) < 1e-6
    # dropping block 1 by hand: final norm + head on block 0's output
    ce, n = 0.0, 0
    for b in batches:
        with torch.no_grad():
            x = model.encoder.layers[0](model.encoder.embed(b.input_ids), b.attention_mask)
            logits = model.head(model.final_norm(x))[b.masked_mask]
        ce += float(nn.functional.cross_entropy(logits, b.labels[b.masked_mask], reduction="sum"))
        n += int(b.masked_mask.sum())
    assert df.loc[("block", 1), "loss"] == pytest.approx(ce / n, rel=1e-5)
    assert "final norm kept" in df["convention"].iloc[0]


def test_layer_drop_no_masked_positions_and_cap(micro):
    clean = list(capture(micro, SENTS[:4], variants=("clean",), names=[]))
    with pytest.raises(NoMaskedPositionsError, match="no masked positions"):
        run_analysis(LayerDrop(), lm_ctx(micro), clean)
    batches = _masked_batches(micro, n=8)
    _, res = run_analysis(LayerDrop(LayerDrop.Params(units="block", max_sentences=3)), lm_ctx(micro), batches)
    df = res["per_unit"]
    assert df["n_sentences"].iloc[0] == 3 and set(df["unit"]) == {"none", "block"}


def test_layer_drop_same_in_one_or_many_stacked_passes(micro, monkeypatch):
    """Splitting the skip configurations over several stacked passes (large models) changes no number."""
    import mlmscope.analyses.redundancy as red

    batches = list(capture(micro, SENTS, variants=("mask15",), names=[], batch_size=8))
    _, one = run_analysis(LayerDrop(), lm_ctx(micro), batches)
    monkeypatch.setattr(red, "MAX_STACKED_ROWS", 8)  # one configuration per pass
    _, many = run_analysis(LayerDrop(), lm_ctx(micro), batches)
    pd.testing.assert_frame_equal(one["per_unit"], many["per_unit"], rtol=1e-5)
