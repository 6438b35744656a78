"""SAS analysis: word-level merge, UAS in both directions, offset baselines, held-out selection, bad input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from mlmscope.analyses.base import SkipAnalysis, load_all
from mlmscope.analyses.sas import (
    SAS,
    SASAccumulator,
    SASInputError,
    _held_out,
    fixed_head_curve,
    gold_table,
    predict_heads,
    sas_curve,
    sas_frames,
    sas_onsets,
    word_attention,
    word_index_tensor,
)
from mlmscope.probes.batch import CaptureBatch
from mlmscope.probes.probeset import ProbeSet, sentences_of
from tolerance import assert_close_scaled


@dataclass
class Sent:
    """Minimal probe-set sentence stand-in (the fields the SAS analysis reads)."""

    words: list[str]
    heads: list[int] | None
    relations: list[str] | None
    half: int = 0


def ProbeSetStandIn(sents: list[Sent]) -> ProbeSet:
    """A real :class:`probes.probeset.ProbeSet` from hand-written sentences."""
    return ProbeSet(
        [s.words for s in sents],
        [s.heads for s in sents],
        [s.relations for s in sents],
        [["_"] * len(s.words) for s in sents],
        [s.half for s in sents],
    )


# [CLS] the cat ##s sleep sound ##ly [SEP]  ->  words the / cats / sleep / soundly
HAND_WORD_IDS = [None, 0, 1, 1, 2, 3, 3, None]
HAND_SENT = Sent(["the", "cats", "sleep", "soundly"], [2, 3, 0, 3], ["det", "nsubj", "ROOT", "advmod"])
# head 0: "the" splits 0.3/0.3 over cat/##s vs 0.4 on sleep (sum-to merging decides); "cats" rows differ (mean-from).
HEAD0 = [
    [0.5, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.1],
    [0.0, 0.0, 0.3, 0.3, 0.4, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.2, 0.7, 0.1, 0.0, 0.0],
    [0.0, 0.45, 0.15, 0.0, 0.4, 0.0, 0.0, 0.0],
    [0.2, 0.1, 0.1, 0.1, 0.0, 0.3, 0.1, 0.1],
    [0.0, 0.0, 0.0, 0.0, 0.6, 0.0, 0.4, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.2, 0.8, 0.0, 0.0],
    [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3],
]
# head 1: a next-word head (soundly, the last word, looks back at sleep).
HEAD1 = [
    [1.0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 1.0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1.0, 0, 0, 0],
    [0, 0, 0, 0, 1.0, 0, 0, 0],
    [0, 0.2, 0, 0, 0, 0.4, 0.4, 0],
    [0, 0, 0, 0, 1.0, 0, 0, 0],
    [0, 0, 0, 0, 1.0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 1.0],
]
HAND_AW_HEAD0 = [[0.0, 0.6, 0.4, 0.0], [0.225, 0.175, 0.55, 0.05], [0.1, 0.2, 0.0, 0.4], [0.0, 0.0, 0.4, 0.6]]


def make_batch(patterns: list[torch.Tensor], word_ids: list[list[int | None]], sentence_ids: list[int]) -> CaptureBatch:
    """A hand-built clean CaptureBatch with one (B, H, T, T) pattern per layer."""
    b, _, t, _ = patterns[0].shape
    attn = torch.zeros(b, t, dtype=torch.long)
    special = torch.ones(b, t, dtype=torch.bool)
    for i, ids in enumerate(word_ids):
        attn[i, : len(ids)] = 1
        special[i, : len(ids)] = torch.tensor([w is None for w in ids])
    return CaptureBatch(
        variant="clean",
        sentence_ids=torch.tensor(sentence_ids),
        input_ids=torch.zeros(b, t, dtype=torch.long),
        attention_mask=attn,
        special_mask=special,
        word_ids=word_ids,
        labels=torch.full((b, t), -100),
        head_positions=torch.zeros(0, 2, dtype=torch.long),
        acts={f"blocks.{l}.attn.hook_pattern": p for l, p in enumerate(patterns)},
    )


def run_sas(probe_set, batches, n_layers: int = 1, **params) -> dict[str, pd.DataFrame]:
    acc = SASAccumulator(gold_table(probe_set), n_layers, SAS.Params(**params))
    for batch in batches:
        acc.update(batch)
    return acc.result()


def hand_frames(**params) -> dict[str, pd.DataFrame]:
    pattern = torch.tensor([HEAD0, HEAD1])[None]
    return run_sas(ProbeSetStandIn([HAND_SENT]), [make_batch([pattern], [HAND_WORD_IDS], [0])], min_count=1, **params)


def uas_of(heads: pd.DataFrame, head: int, direction: str, relation: str, col: str = "uas") -> float:
    row = heads[(heads["head"] == head) & (heads["direction"] == direction) & (heads["relation"] == relation)]
    assert len(row) == 1
    return float(row[col].iloc[0])


def test_word_attention_merges_mean_from_sum_to():
    widx = word_index_tensor([HAND_WORD_IDS], 8)
    a_w = word_attention(torch.tensor([HEAD0])[None], widx, 4)
    assert_close_scaled(a_w[0, 0], torch.tensor(HAND_AW_HEAD0))
    # per-piece argmax of "the" would pick sleep (0.4 > 0.3); summing the pieces of "cats" picks cats
    pred = predict_heads(a_w, torch.ones(1, 4, dtype=torch.bool))
    assert pred["dep->head"][0, 0].tolist() == [1, 2, 3, 2]  # soundly: 0.6 on itself is never a prediction
    assert pred["head<-dep"][0, 0].tolist() == [1, 0, 1, 2]


def test_hand_example_uas_both_directions():
    heads = hand_frames()["heads"]
    expected = {  # (head, direction): {relation: UAS}; "all" excludes the root word (and punct)
        (0, "dep->head"): {"all": 1.0, "det": 1.0, "nsubj": 1.0, "advmod": 1.0, "root": 0.0},
        (0, "head<-dep"): {"all": 2 / 3, "det": 1.0, "nsubj": 0.0, "advmod": 1.0},
        (1, "dep->head"): {"all": 1.0, "det": 1.0, "nsubj": 1.0, "advmod": 1.0},
        (1, "head<-dep"): {"all": 1 / 3, "det": 0.0, "nsubj": 0.0, "advmod": 1.0},
    }
    for (h, d), rels in expected.items():
        for rel, value in rels.items():
            assert uas_of(heads, h, d, rel) == pytest.approx(value), (h, d, rel)
    assert set(heads.loc[heads["relation"] == "all", "n"]) == {3}


def test_hand_example_offsets_and_positional_measures():
    frames = hand_frames()
    off = frames["offsets"].set_index(["relation", "offset"])["uas"]
    # gold offsets of the non-root words: the +1, cats +1, soundly -1
    assert off[("all", 1)] == pytest.approx(2 / 3) and off[("all", -1)] == pytest.approx(1 / 3)
    assert off[("all", 2)] == 0.0 and off[("advmod", -1)] == 1.0
    heads = frames["heads"]
    assert set(heads.loc[heads["relation"] == "all", "best_offset"]) == {1}
    # predictions on all-words: h0 dep->head +1,+1,-1; h0 head<-dep +1,-1,-1; h1 head<-dep +2,-1,-1
    assert uas_of(heads, 0, "dep->head", "all", "offset_share") == pytest.approx(2 / 3)
    assert uas_of(heads, 0, "head<-dep", "all", "offset_share") == pytest.approx(1 / 3)
    assert uas_of(heads, 1, "head<-dep", "all", "offset_share") == 0.0
    # the only word whose head is not at +1 is "soundly", hit by every predictor
    assert uas_of(heads, 1, "head<-dep", "all", "uas_nonoffset") == 1.0
    best = frames["best"].set_index("relation")
    assert best.loc["all", "uas_in_sample"] == 1.0 and best.loc["all", "offset_uas_in_sample"] == pytest.approx(2 / 3)
    assert "root" not in best.index


def test_batching_and_padding_do_not_change_counts():
    rng = np.random.default_rng(0)
    sents, wids, pats = [], [], []
    for i, n in enumerate([3, 5, 2, 6]):
        sents.append(random_tree_sentence(rng, n, half=i % 2))
        wids.append(random_pieces(rng, n))
        t = len(wids[-1])
        pats.append(torch.softmax(torch.tensor(rng.normal(size=(2, 3, t, t)), dtype=torch.float32), -1))
    ps = ProbeSetStandIn(sents)
    singles = [make_batch([pats[i][0:1], pats[i][1:2]], [wids[i]], [i]) for i in range(4)]
    t_max = max(len(w) for w in wids)
    padded = [torch.zeros(4, 3, t_max, t_max) for _ in range(2)]
    for i, p in enumerate(pats):
        t = p.shape[-1]
        for layer in range(2):
            padded[layer][i, :, :t, :t] = p[layer]
    one = run_sas(ps, singles, n_layers=2, min_count=1)
    batched = run_sas(ps, [make_batch(padded, wids, [0, 1, 2, 3])], n_layers=2, min_count=1)
    pd.testing.assert_frame_equal(one["heads"], batched["heads"])
    pd.testing.assert_frame_equal(one["offsets"], batched["offsets"])


def random_tree_sentence(rng: np.random.Generator, n: int, half: int = 0) -> Sent:
    """A random projective-ish tree: word 0 is the root, every other word attaches to an earlier word."""
    heads = [0] + [int(rng.integers(1, i + 1)) for i in range(1, n)]
    rels = ["ROOT"] + [str(rng.choice(["det", "nsubj", "punct", "amod"])) for _ in range(1, n)]
    return Sent([f"w{i}" for i in range(n)], heads, rels, half)


def random_pieces(rng: np.random.Generator, n: int) -> list[int | None]:
    ids: list[int | None] = [None]
    for w in range(n):
        ids += [w] * int(rng.integers(1, 3))
    return ids + [None]


def oracle_and_next_patterns(sents: list[Sent], wids: list[list[int | None]]) -> tuple[torch.Tensor, int]:
    """Layer with head 0 = attends to the gold head's pieces, head 1 = attends to the previous word's pieces."""
    t_max = max(len(w) for w in wids)
    pat = torch.zeros(len(sents), 2, t_max, t_max)
    for b, (s, ids) in enumerate(zip(sents, wids)):
        for q, w in enumerate(ids):
            if w is None:
                pat[b, :, q, q] = 1.0
                continue
            for h, target in enumerate([s.heads[w] - 1, w - 1]):
                cols = [k for k, x in enumerate(ids) if x == target] or [0]  # root/first word -> [CLS]
                pat[b, h, q, cols] = 1.0 / len(cols)
    return pat, t_max


def test_oracle_head_wins_held_out_and_previous_word_head_is_positional():
    rng = np.random.default_rng(1)
    sents = [random_tree_sentence(rng, int(rng.integers(4, 9)), half=i % 2) for i in range(60)]
    wids = [random_pieces(rng, len(s.words)) for s in sents]
    pat, _ = oracle_and_next_patterns(sents, wids)
    frames = run_sas(ProbeSetStandIn(sents), [make_batch([pat], wids, list(range(len(sents))))], min_count=1)
    best = frames["best"].set_index("relation")
    assert best.loc["all", "uas_held_out"] == 1.0 and best.loc["all", "head"] == 0
    assert best.loc["all", "kind"] == "syntactic"
    assert frames["summary"]["sas_score"].iloc[0] == 1.0
    heads = frames["heads"]
    prev = heads[(heads["head"] == 1) & (heads["direction"] == "dep->head") & (heads["relation"] == "all")].iloc[0]
    off = frames["offsets"].set_index(["relation", "offset"])["uas"]
    assert prev["uas"] == pytest.approx(off[("all", -1)])  # a previous-word head scores exactly the -1 baseline
    assert prev["best_offset"] == -1  # random trees attach to earlier words
    assert prev["uas_nonoffset"] == 0.0 and prev["offset_share"] == 1.0


def test_held_out_selection_picks_on_one_half_scores_on_other():
    # candidates x relations x halves: candidate 0 great on half 0 only, candidate 1 decent on both
    hits = np.array([[[90, 10]], [[60, 60]]], dtype=float)
    n = np.array([[100, 100]], dtype=float)
    uas, pick0, pick1 = _held_out(hits, n)
    assert pick0[0] == 0 and pick1[0] == 1
    assert uas[0] == pytest.approx((10 + 60) / 200)  # in-sample max would be (90 + 10) / 200 = 0.5 for c0


def test_probe_set_without_parses_is_a_clear_error():
    with pytest.raises(SASInputError, match="no dependency parses"):
        gold_table(sentences_of([["a", "b"], ["c", "d", "e"]]))
    with pytest.raises(SASInputError, match="no dependency parses.*sentence 0"):
        gold_table(ProbeSetStandIn([Sent(["a", "b"], [0, 7], ["ROOT", "det"])]))  # head beyond the sentence
    with pytest.raises(SASInputError, match="empty"):
        gold_table(ProbeSetStandIn([]))


def test_single_word_sentences_and_absent_relations_give_frames_not_tracebacks():
    sents = [Sent(["Hello"], [0], ["ROOT"]), Sent(["Yes"], [0], ["ROOT"], half=1)]
    pat = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    frames = run_sas(ProbeSetStandIn(sents), [make_batch([pat], [[None, 0, None]] * 2, [0, 1])], relations=("nsubj",))
    summary = frames["summary"].iloc[0]
    assert summary["n_skipped"] == 2 and summary["n_sentences"] == 0 and np.isnan(summary["sas_score"])
    assert "fewer than 2 words" in summary["skip_reasons"]
    best = frames["best"].set_index("relation")
    assert best.loc["nsubj", "kind"] == "absent" and best.loc["nsubj", "n"] == 0


def test_layers_with_different_head_counts_are_scored():
    pattern0 = torch.tensor([HEAD0, HEAD1])[None]
    pattern1 = torch.tensor([HEAD1, HEAD0, HEAD1])[None]
    frames = run_sas(
        ProbeSetStandIn([HAND_SENT]), [make_batch([pattern0, pattern1], [HAND_WORD_IDS], [0])], n_layers=2, min_count=1
    )
    all_rows = frames["heads"][frames["heads"]["relation"] == "all"]
    assert all_rows.groupby("layer")["head"].nunique().to_dict() == {0: 2, 1: 3}
    assert frames["summary"]["n_candidates"].iloc[0] == (2 + 3) * 2


def test_mismatched_word_ids_are_skipped_and_counted():
    # the capture says 3 words, the parse has 4: the sentence is skipped, not mis-scored
    frames = run_sas(
        ProbeSetStandIn([HAND_SENT]),
        [make_batch([torch.tensor([HEAD0, HEAD1])[None]], [[None, 0, 1, 1, 2, 2, 2, None]], [0])],
        min_count=1,
    )
    assert frames["summary"]["n_skipped"].iloc[0] == 1


def test_registered_and_names():
    from mlmscope.analyses.base import AnalysisContext

    assert "sas" in load_all()
    ctx = AnalysisContext(model=None, arch=None, n_layers=3, n_heads=2, d_model=8, probe_set=None)
    assert SAS().names(ctx) == [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    with pytest.raises(SkipAnalysis, match="needs a parsed probe set"):  # a final skip, not a retryable failure
        SAS().accumulator(ctx)


# --- end to end on real models -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parsed_fixture_probes():
    from mlmscope.probes.probeset import BuildConfig, build_probe_set
    from tests.conftest import FIXTURE_TEXT

    return build_probe_set(FIXTURE_TEXT[:15], BuildConfig(n=15, min_words=5))


def test_sas_frames_on_micro_model(micro_model_dir, parsed_fixture_probes):
    frames = sas_frames(micro_model_dir, parsed_fixture_probes, SAS.Params(min_count=20))
    summary = frames["summary"].iloc[0]
    assert summary["n_sentences"] + summary["n_skipped"] + summary["n_not_captured"] == len(parsed_fixture_probes)
    assert summary["n_candidates"] == 2 * 2 * 2  # micro: 2 layers x 2 heads x 2 directions
    n_all = sum(
        1
        for hs, rs in zip(parsed_fixture_probes.heads, parsed_fixture_probes.relations)
        for h, r in zip(hs, rs)
        if h != 0 and r != "punct"
    )
    assert summary["n_words"] == n_all
    heads = frames["heads"]
    assert heads[heads["relation"] == "all"].shape[0] == 8 and heads["uas"].between(0, 1).all()
    with pytest.raises(SkipAnalysis, match="no dependency parses"):
        sas_frames(micro_model_dir, sentences_of([["a", "cat", "sat"]]))


def test_sas_curve_and_onsets_on_a_synthetic_trajectory():
    steps = np.unique(np.round(np.logspace(0, 4, 40))).astype(int)
    x = np.log10(steps + 1)
    rise = 1 / (1 + np.exp(-(x - 2.5) / 0.1))
    rng = np.random.default_rng(0)
    curve = pd.DataFrame(
        {
            "step": steps,
            "sas_score": 0.15 + 0.25 * rise + rng.normal(0, 0.005, len(x)),
            "offset_uas_held_out": 0.3,
            "offset_share": 0.9 - 0.6 * rise,
            "uas_nonoffset": 0.05 + 0.3 * rise,
            "kind": np.where(rise > 0.5, "syntactic", "positional"),
            "val_loss": 7 - 0.2 * x - 2 * rise + rng.normal(0, 0.01, len(x)),
        }
    )
    row = sas_onsets(sas_curve(curve)).iloc[0]
    assert row["sas_found"] and row["loss_found"] and row["coincide"]
    assert row["structure_kind"] == "syntactic"
    assert abs(np.log10(row["sas_steepest_step"] + 1) - 2.5) < 0.15
    assert 10**2.3 < row["first_step_above_offset"] < 10**2.7
    # a previous-token head growing: offset share up, non-offset UAS down, never beats the baseline
    positional = curve.assign(
        offset_share=0.2 + 0.7 * rise,
        uas_nonoffset=0.2 - 0.15 * rise,
        kind="positional",
        sas_score=0.1 + 0.18 * rise + rng.normal(0, 0.005, len(x)),
    )
    assert sas_onsets(positional).iloc[0]["structure_kind"] == "positional"
    flat = curve.assign(sas_score=0.2 + rng.normal(0, 0.005, len(x)))
    row = sas_onsets(flat).iloc[0]
    assert not row["sas_found"] and row["structure_kind"] == "none" and row["coincide"] is None


def test_fixed_head_curve_follows_the_final_best_head():
    heads = pd.DataFrame(
        {
            "step": [0, 0, 10, 10],
            "layer": [0, 1, 0, 1],
            "head": [0, 0, 0, 0],
            "direction": "dep->head",
            "relation": "all",
            "uas": [0.3, 0.1, 0.2, 0.5],
            "offset_share": 0.5,
            "uas_nonoffset": 0.1,
        }
    )
    fixed = fixed_head_curve(heads)
    assert fixed["layer"].tolist() == [1, 1] and fixed["uas"].tolist() == [0.1, 0.5]


@pytest.mark.slow
def test_minilm_best_head_beats_best_offset(minilm_dir):
    """all-MiniLM-L6-v2 on 150 parsed validation sentences: a real head beats every offset baseline, held out."""
    from mlmscope.probes.probeset import BuildConfig, build_default

    ps = build_default(BuildConfig(n=150))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = sas_frames(minilm_dir, ps)["best"].set_index("relation")
    finally:
        torch.set_num_threads(n)
    assert best.loc["all", "uas_held_out"] > best.loc["all", "offset_uas_held_out"] + 0.03
    assert best.loc["all", "kind"] == "syntactic"


def test_runner_results_feed_the_trajectory_curve(tmp_path, parsed_fixture_probes):
    """SAS through the trajectory runner (real capture) -> stored tables -> sas_curve with val_loss -> onsets."""
    from conftest import _save_micro
    from mlmscope.analyses.runner import Runner, RunnerConfig
    from mlmscope.checkpoints.manifest import CheckpointEntry, Manifest, step_dirname, weights_sha256

    run = tmp_path / "run"
    manifest = Manifest(run={"status": "finished"})
    for step, loss in [(0, 6.0), (1, 5.5), (2, 5.4)]:
        d = run / step_dirname(step)
        _save_micro(d, seed=step)
        manifest.add(CheckpointEntry(step=step, path=d.name, sha256=weights_sha256(d), val_loss=loss))
    manifest.save(run)
    summary = Runner(
        run, RunnerConfig(batch_size=8), probe_set=parsed_fixture_probes, analyses=[SAS(SAS.Params(min_count=20))]
    ).run()
    assert summary.failed == 0
    curve = sas_curve(run)
    assert curve["step"].tolist() == [0, 1, 2] and curve["val_loss"].tolist() == [6.0, 5.5, 5.4]
    assert curve["sas_score"].between(0, 1).all()
    row = sas_onsets(curve).iloc[0]
    assert not row["sas_found"] and "too few" in row["sas_reason"]
