"""Capture parity (HF, TransformerLens bridge), padding invariance, sub-layer identities, masking, MLM head."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import FIXTURE_TEXT
from mlmscope.probes import activation_names, capture, load_model, prepare
from mlmscope.probes.masking import apply_mask, mask_positions
from tolerance import assert_close_scaled

#: Our name -> the TransformerLens 4.3 bridge's name for the same tensor on BERT. The bridge's own
#: ``hook_attn_out`` / ``hook_resid_mid`` on BERT are the post-LN block outputs, so they are mapped explicitly.
TL_NAME = {
    "embed.hook_out": "embed_ln.hook_out",
    "hook_resid_pre": "hook_resid_pre",
    "attn.hook_pattern": "attn.hook_pattern",
    "hook_attn_out": "attn.o.hook_out",
    "ln1.hook_in": "ln1.hook_in",
    "hook_resid_mid": "ln1.hook_out",
    "mlp.hook_post": "mlp.hook_post",
    "hook_mlp_out": "hook_mlp_out",
    "ln2.hook_in": "ln2.hook_in",
    "hook_resid_post": "hook_resid_post",
}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


SENTS = [_words(t) for t in FIXTURE_TEXT[:7]] + [["Short", "one", "."]]


def _tl_name(name: str) -> str:
    m = re.match(r"blocks\.(\d+)\.(.+)", name)
    return f"blocks.{m.group(1)}.{TL_NAME[m.group(2)]}" if m else TL_NAME[name]


def _by_sentence(batches, name):
    """sentence id -> (tensor for that sentence cropped to its real length)."""
    out = {}
    for b in batches:
        for r, sid in enumerate(b.sentence_ids.tolist()):
            n = int(b.attention_mask[r].sum())
            x = b[name][r]
            out[sid] = x[:, :n, :n] if name.endswith("hook_pattern") else x[:n]
    return out


@pytest.fixture(scope="module", params=["micro", "minilm"])
def lm(request, micro_model_dir, minilm_dir):
    return load_model(micro_model_dir if request.param == "micro" else minilm_dir)


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    return load_model(micro_model_dir)


@pytest.fixture(scope="module")
def batched(lm):
    return list(capture(lm, SENTS, batch_size=4))


def test_hf_parity(lm, batched):
    enc = prepare(lm, SENTS)
    for i, sid in enumerate(enc.sentence_ids):
        ids = torch.tensor([enc.input_ids[i]])
        with torch.no_grad():
            out = lm.arch.encoder_model(ids, output_attentions=True, output_hidden_states=True)
        for l in range(lm.n_layers):
            got = _by_sentence(batched, f"blocks.{l}.attn.hook_pattern")[sid]
            assert_close_scaled(got, out.attentions[l][0])
            got = _by_sentence(batched, f"blocks.{l}.hook_resid_post")[sid]
            assert_close_scaled(got, out.hidden_states[l + 1][0])
        assert_close_scaled(_by_sentence(batched, "embed.hook_out")[sid], out.hidden_states[0][0])


def test_transformer_lens_bridge_parity(lm, batched):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(lm.path, device="cpu")
    enc = prepare(lm, SENTS)
    names = [n for n in activation_names(lm.n_layers, False)]
    for i in (0, len(enc) - 1):
        sid = enc.sentence_ids[i]
        _, cache = bridge.run_with_cache(torch.tensor([enc.input_ids[i]]))
        for name in names:
            assert_close_scaled(
                _by_sentence(batched, name)[sid], cache[_tl_name(name)][0], msg=lambda m, name=name: f"{name}: {m}"
            )


def test_padding_invariance_every_name(micro):
    kw = dict(variants=("clean", "mask15"), head_at="tokens")
    batched = list(capture(micro, SENTS, batch_size=8, sort_by_length=False, **kw))
    single = list(capture(micro, SENTS, batch_size=1, **kw))
    assert batched[0].attention_mask.eq(0).any(), "test needs padding in the batch"
    for name in activation_names(micro.n_layers, has_mlm_head=False):
        for v in kw["variants"]:
            a = _by_sentence([b for b in batched if b.variant == v], name)
            s = _by_sentence([b for b in single if b.variant == v], name)
            assert a.keys() == s.keys()
            for sid in a:
                assert_close_scaled(a[sid], s[sid])
    # MLM logits at every token position: same rows (in order) as one-by-one.
    for v in kw["variants"]:
        big = next(b for b in batched if b.variant == v)
        rows = big.head_positions[:, 0]
        for r, sid in enumerate(big.sentence_ids.tolist()):
            one = next(b for b in single if b.variant == v and b.sentence_ids.item() == sid)
            assert_close_scaled(big["mlm_head.hook_out"][rows == r], one["mlm_head.hook_out"])


def test_padding_is_zero(micro):
    b = next(capture(micro, SENTS, batch_size=8, sort_by_length=False))
    pad = ~b.attention_mask.bool()
    assert pad.any()
    for name, x in b.acts.items():
        if name.endswith("hook_pattern"):
            assert x.permute(0, 2, 1, 3)[pad].abs().max() == 0 and x.permute(0, 3, 1, 2)[pad].abs().max() == 0
            real_rows = x.sum(-1)[b.attention_mask.bool()[:, None, :].expand(-1, x.shape[1], -1)]
            torch.testing.assert_close(real_rows, torch.ones_like(real_rows))
        elif name != "mlm_head.hook_out":
            assert x[pad].abs().max() == 0, name


def test_sublayer_identities(lm, batched):
    for b in batched:
        torch.testing.assert_close(b["embed.hook_out"], b["blocks.0.hook_resid_pre"], atol=0, rtol=0)
        for l in range(lm.n_layers):
            p = f"blocks.{l}."
            assert_close_scaled(b[p + "ln1.hook_in"], b[p + "hook_resid_pre"] + b[p + "hook_attn_out"])
            assert_close_scaled(b[p + "ln2.hook_in"], b[p + "hook_resid_mid"] + b[p + "hook_mlp_out"])
            ln = lm.arch.ln2(l)
            expect = ln(b[p + "ln2.hook_in"]) * b.attention_mask[..., None]
            assert_close_scaled(b[p + "hook_resid_post"], expect)
            if l + 1 < lm.n_layers:
                torch.testing.assert_close(
                    b[p + "hook_resid_post"], b[f"blocks.{l + 1}.hook_resid_pre"], atol=0, rtol=0
                )


def test_only_requested_names_saved(micro):
    want = ["blocks.1.attn.hook_pattern", "embed.hook_out"]
    b = next(capture(micro, SENTS, names=want))
    assert set(b.acts) == set(want)


def test_mlm_head_logits_match_hf(micro):
    b = next(capture(micro, SENTS, variants=("mask15",), names=["mlm_head.hook_out"], batch_size=16))
    assert len(b.head_positions) == int(b.masked_mask.sum()) > 0
    assert (b.input_ids[b.masked_mask] == micro.tokenizer.mask_token_id).all()
    with torch.no_grad():
        hf = micro.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    r, t = b.head_positions.T
    assert_close_scaled(b["mlm_head.hook_out"], hf[r, t])
    # gold labels are the clean ids at the masked positions
    clean = next(capture(micro, SENTS, names=["embed.hook_out"], batch_size=16))
    order = {s: i for i, s in enumerate(clean.sentence_ids.tolist())}
    rows = torch.tensor([order[s] for s in b.sentence_ids.tolist()])
    assert torch.equal(b.labels[b.masked_mask], clean.input_ids[rows][b.masked_mask])


def test_masking_deterministic_and_counts(micro):
    enc = prepare(micro, SENTS)
    for i, sid in enumerate(enc.sentence_ids):
        special = [w is None for w in enc.word_ids[i]]
        n = len(special) - sum(special)
        a = apply_mask(enc.input_ids[i], special, "mask15", sid, 4, seed=3)
        assert a == apply_mask(enc.input_ids[i], special, "mask15", sid, 4, seed=3)
        assert sum(x != -100 for x in a[1]) == max(1, round(0.15 * n))
        _ids1, lab1 = apply_mask(enc.input_ids[i], special, "mask1", sid, 4)
        assert sum(x != -100 for x in lab1) == 1 and not any(s and l != -100 for s, l in zip(special, lab1))
    assert any(
        mask_positions("mask15", 30, s, 0).tolist() != mask_positions("mask15", 30, s, 1).tolist() for s in range(5)
    )
    b1 = list(capture(micro, SENTS, variants=("mask1",), names=["embed.hook_out"], batch_size=3))
    b2 = list(capture(micro, SENTS, variants=("mask1",), names=["embed.hook_out"], batch_size=8, sort_by_length=False))

    def masked(batches):
        return {
            s: b.input_ids[r][: int(b.attention_mask[r].sum())].tolist()
            for b in batches
            for r, s in enumerate(b.sentence_ids.tolist())
        }

    assert masked(b1) == masked(b2)
