"""SAS regulariser: hand-computed values, gradient direction on a real BERT, token alignment of parses, caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlmscope.checkpoints.data import Masker, StepBatches, pack
from mlmscope.checkpoints.sas_reg import (
    SASRegConfig,
    SASRegError,
    iter_arcs,
    pack_heads,
    parse_corpus,
    piece_heads,
    sas_attention_score,
    sas_regularizer,
    step_heads,
    training_heads,
)


def hand_attentions() -> list[torch.Tensor]:
    """2 layers x 2 heads over 4 tokens; the max over (layer, head) is easy to read off."""
    eye = torch.eye(4)
    l0 = torch.stack([eye, torch.full((4, 4), 0.25)])
    l1 = torch.stack([torch.roll(eye, 1, dims=1), torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4)])
    return [l0[None], l1[None]]


def test_hand_computed_sum_and_mean():
    atts = hand_attentions()
    gamma = torch.maximum(atts[0][0].amax(0), atts[1][0].amax(0))
    # arcs: token 1 -> head 2, token 3 -> head 1; tokens 0 and 2 have none
    dep = torch.tensor([[-1, 2, -1, 1]])
    # dep->head: gamma[1, 2] = 1.0 (roll: row 1 attends to column 2); gamma[3, 1] = 0.25
    assert gamma[1, 2] == 1.0 and gamma[3, 1] == 0.25
    assert sas_attention_score(atts, dep, ("dep->head",)) == pytest.approx(1.25)
    # head->dep: gamma[2, 1] = 0.25, gamma[1, 3] = 0.4
    assert sas_attention_score(atts, dep, ("head->dep",)) == pytest.approx(0.65)
    assert sas_attention_score(atts, dep) == pytest.approx(1.9)
    assert sas_attention_score(atts, dep, reduction="mean") == pytest.approx(1.9 / 4)
    assert sas_regularizer(atts, dep, -0.5) == pytest.approx(-0.95)
    assert sas_regularizer(torch.stack(atts), dep, 0.001) == pytest.approx(0.0019)  # stacked (L, B, H, T, T)
    assert sas_regularizer(atts, dep, 0.0) == 0.0


def test_root_arcs_count_by_default_as_in_chen_et_al():
    """Chen et al.'s code indexes heads in token positions with ROOT = 0 ([CLS]), so the root word's two terms are
    in the sum; that is the default, and dropping them is the opt-out."""
    assert SASRegConfig().root_to_cls is True
    atts = hand_attentions()
    gamma = torch.maximum(atts[0][0].amax(0), atts[1][0].amax(0))
    # token 1 -> head 2, token 3 -> head 1, token 2 is the root: -> [CLS] at 0 (what pack_heads writes by default)
    with_root = torch.tensor([[-1, 2, 0, 1]])
    chen = sum(float(gamma[d, h] + gamma[h, d]) for d, h in ((1, 2), (3, 1), (2, 0)))
    assert sas_attention_score(atts, with_root) == pytest.approx(chen)
    without = sas_attention_score(atts, torch.tensor([[-1, 2, -1, 1]]))
    assert without == pytest.approx(chen - float(gamma[2, 0] + gamma[0, 2])) and without < chen


def test_bad_regulariser_input():
    atts = hand_attentions()
    with pytest.raises(SASRegError, match="directions"):
        sas_attention_score(atts, torch.tensor([[-1, 2, -1, 1]]), ("up",))
    with pytest.raises(SASRegError, match="shape"):
        sas_attention_score(atts, torch.tensor([[-1, 2, -1]]))
    with pytest.raises(SASRegError, match="past"):
        sas_attention_score(atts, torch.tensor([[-1, 9, -1, 1]]))
    with pytest.raises(SASRegError, match="reduction"):
        SASRegConfig(lam=0.001, reduction="median")
    cfg = SASRegConfig(lam=0.001, release_step=3000)
    assert cfg.lam_at(2999) == 0.001 and cfg.lam_at(3000) == 0.0 and cfg.active
    assert not SASRegConfig().active and not SASRegConfig(lam=1.0, release_step=0).active


def _reg_after_training(model_dir: str, lam: float, steps: int = 10) -> tuple[float, float]:
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel.from_pretrained(model_dir, attn_implementation="eager")
    model.train()
    ids = torch.randint(5, model.config.vocab_size, (4, 16))
    dep = torch.randint(1, 15, (4, 16))
    dep[:, 0] = dep[:, -1] = -1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def score() -> float:
        with torch.no_grad():
            return float(sas_attention_score(model(input_ids=ids, output_attentions=True).attentions, dep))

    before = score()
    for _ in range(steps):
        out = model(input_ids=ids, output_attentions=True)
        loss = sas_regularizer(out.attentions, dep, lam)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return before, score()


@pytest.fixture
def one_thread():
    """Tiny models train 20x faster on one thread than on an oversubscribed shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_positive_lambda_suppresses_negative_promotes(micro_headless_dir, one_thread):
    b0, suppressed = _reg_after_training(micro_headless_dir, lam=0.01)
    b1, promoted = _reg_after_training(micro_headless_dir, lam=-0.01)
    assert b0 == pytest.approx(b1)
    assert suppressed < 0.5 * b0 and promoted > 2 * b0


# --- alignment ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nlp():
    from mlmscope.probes.probeset import load_parser

    return load_parser()


@pytest.fixture(scope="module")
def tok():
    from mlmscope.checkpoints.tokenizer import train_wordpiece
    from tests.conftest import FIXTURE_TEXT

    return train_wordpiece(FIXTURE_TEXT, vocab_size=300, min_frequency=1)


def test_piece_heads_first_piece_of_head_word():
    # words: "Unbelievable"(0) "cats"(1) "sleep"(2): 0 -> 1, 1 -> 2, 2 root; pieces: unbeliev ##able | cats | sle ##ep
    word_starts, word_heads, space = np.array([0, 13, 18]), np.array([1, 2, 2]), np.zeros(3, bool)
    pieces = np.array([0, 8, 13, 18, 21])
    assert piece_heads(pieces, word_starts, word_heads, space).tolist() == [2, 2, 3, -1, -1]
    assert piece_heads(pieces, word_starts, word_heads, space, root_to_cls=True).tolist() == [2, 2, 3, -2, -2]


def test_pack_heads_matches_pack_layout_and_parses(tok, nlp, tmp_path):
    texts = ["The cat sat on the mat.", "Children learn languages faster than adults."] * 6
    seq_len = 12
    data = pack(tok, texts, seq_len)
    heads = training_heads(tok, texts, seq_len, cache_dir=tmp_path, root_to_cls=False, nlp=nlp)
    assert heads.shape == data.shape and heads.dtype == torch.int16
    assert (heads[:, 0] == -1).all() and (heads[:, -1] == -1).all()
    assert (heads[data == tok.sep_token_id] == -1).all()
    assert ((heads == -1) | ((heads >= 1) & (heads < seq_len - 1))).all()
    pieces = [tok.convert_ids_to_tokens(row) for row in data.tolist()]
    arcs = {(pieces[r][i], pieces[r][h]) for r in range(len(data)) for i, h in iter_arcs(heads[r])}
    for dep, head in [
        ("the", "cat"),
        ("cat", "sat"),
        ("on", "sat"),
        ("mat", "on"),
        ("##ild", "lear"),
    ]:  # every piece -> first piece of the head
        assert (dep, head) in arcs, (dep, head, sorted(arcs)[:20])
    # root -> [CLS] (the default, Chen's ROOT = 0): "sat" and "learn" are roots
    cls = training_heads(tok, texts, seq_len, cache_dir=tmp_path, nlp=nlp)
    roots = {pieces[r][i] for r in range(len(data)) for i in range(seq_len) if cls[r, i] == 0}
    assert {"sat", "lear", "##n"} <= roots  # every piece of the root word


def test_parse_cache_is_reused(tok, nlp, tmp_path):
    texts = ["The cat sat on the mat."]
    first = parse_corpus(texts, cache_dir=tmp_path, nlp=nlp)

    class NoParse:
        meta = nlp.meta

        def pipe(self, *a, **k):
            raise AssertionError("parsed again instead of using the cache")

    second = parse_corpus(texts, cache_dir=tmp_path, nlp=NoParse())
    assert np.array_equal(first.heads, second.heads) and np.array_equal(first.starts, second.starts)
    with pytest.raises(SASRegError, match="parsed documents"):
        pack_heads(tok, texts * 2, 12, first)


def test_step_heads_slices_like_micro_batches():
    n, seq_len = 40, 8
    data = torch.arange(n)[:, None].expand(n, seq_len).contiguous() + 10  # row id in every token
    heads = (torch.arange(n)[:, None].expand(n, seq_len) + 10).to(torch.int16)
    masker = Masker(mask_id=0, vocab_size=100, special_ids=(0, 1, 2), rate=0.0)
    for rank in (0, 1):
        batches = StepBatches(data, masker, batch_size=3, grad_accum=2, data_seed=5, rank=rank, world_size=2)
        for step in (0, 3, 7):
            micro = batches.micro_batches(step)
            hs = step_heads(heads, batches, step)
            assert len(hs) == len(micro)
            for (x, _), h in zip(micro, hs):
                assert torch.equal(x, h)
