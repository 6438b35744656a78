"""The attention analysis (entropy and targets per head): hand-computed values, HF parity, batch-size invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlmscope.analyses.attention import TARGETS, AttentionAccumulator, AttentionStats, head_sums
from mlmscope.analyses.base import AnalysisContext, load_all
from mlmscope.probes.capture import capture
from mlmscope.probes.model import load_model
from tests.tolerance import assert_close_scaled

SENTS = [["the", "cat", "sat", "on", "the", "mat"], ["a", "dog", "slept"], ["birds", "sing", "in", "the", "morning"]]


def test_hand_computed_uniform_and_previous_token_heads():
    # one sentence [CLS] a b [SEP] + one padding position; head 0 uniform, head 1 on the previous token (0 on itself)
    p = torch.zeros(1, 2, 5, 5)
    p[0, 0, :4, :4] = 0.25
    for i in range(4):
        p[0, 1, i, max(i - 1, 0)] = 1.0
    sums = head_sums(p, torch.tensor([[1, 1, 1, 1, 0]]), torch.tensor([[True, False, False, True, True]]))
    # columns: entropy, cls, sep, self, prev, next; each summed over the 4 real queries
    want = [
        [4 * math.log(4), 1.0, 1.0, 1.0, 0.75, 0.75],  # prev/next: 3 of 4 queries have that neighbour
        [0.0, 2.0, 0.0, 1.0, 3.0, 0.0],
    ]
    np.testing.assert_allclose(sums.numpy(), want, rtol=1e-12, atol=1e-12)


def test_registered_by_discovery_alone():
    assert load_all()["attention"] is AttentionStats


@pytest.fixture(scope="module")
def micro(micro_model_dir):
    return load_model(micro_model_dir)


def _run(lm, batch_size: int):
    ctx = AnalysisContext(
        model=lm.model, arch=lm.arch, n_layers=lm.n_layers, n_heads=lm.n_heads, d_model=lm.d_model, probe_set=SENTS
    )
    a = AttentionStats()
    acc = a.accumulator(ctx)
    for b in capture(lm, SENTS, variants=a.variants, names=a.names(ctx), batch_size=batch_size):
        acc.update(b)
    return acc.result()["heads"]


def test_matches_hf_attentions_and_is_batch_size_invariant(micro):
    got = _run(micro, batch_size=2)
    tok = micro.tokenizer
    rows = {}
    for words in SENTS:  # one sentence per forward pass: no padding at all
        enc = tok(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            att = micro.model(**enc, output_attentions=True).attentions
        special = torch.tensor(
            tok.get_special_tokens_mask(enc["input_ids"][0].tolist(), already_has_special_tokens=True), dtype=torch.bool
        )[None]
        for layer, a in enumerate(att):
            s = head_sums(a, enc["attention_mask"], special)
            rows[layer] = rows.get(layer, 0) + s
    n = sum(len(tok(w, is_split_into_words=True)["input_ids"]) for w in SENTS)
    assert (got["n_queries"] == n).all()
    want = torch.cat([rows[layer] / n for layer in sorted(rows)]).numpy()
    cols = ["entropy", *TARGETS]
    assert_close_scaled(got[cols].to_numpy(), want, dtype=torch.float32)
    assert_close_scaled(_run(micro, batch_size=3)[cols].to_numpy(), got[cols].to_numpy(), dtype=torch.float32)


def test_invariants_on_a_real_model(micro):
    df = _run(micro, batch_size=8)
    assert len(df) == micro.n_layers * micro.n_heads
    assert (df["entropy"] >= 0).all() and (df["entropy"] <= df["entropy_uniform"] + 1e-9).all()
    assert df[list(TARGETS)].ge(0).all().all() and df[["to_cls", "to_sep", "to_self"]].sum(axis=1).le(1 + 1e-9).all()


def test_empty_accumulator_returns_an_empty_table():
    assert AttentionAccumulator(2).result()["heads"].empty
