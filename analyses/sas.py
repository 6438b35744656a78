"""Syntactic attention structure (SAS): per-head UAS of attention against dependency parses.

Method (Clark et al. 2019, "What Does BERT Look At?", Section 4.1; Chen et al. 2024, "Sudden Drops in the Loss";
definitions, choices and differences from the papers in ``docs/notes/sas.md``):

1. **Word-level attention.** With S_i the word pieces of word i, ``A_w[i, j] = mean_{a in S_i} sum_{b in S_j} A[a, b]``
   (attention FROM a word = mean over its pieces' rows, TO a word = sum over its pieces' columns). [CLS]/[SEP] (and
   padding) are not words and are dropped. Computed for a whole batch and all heads at once as
   ``P @ A @ S^T`` with ``P`` the (B, W, T) piece->word averaging matrix and ``S`` the 0/1 membership matrix.
2. **Prediction.** ``dep->head``: the predicted head of word i is ``argmax_j A_w[i, j]`` (the word i attends to most);
   ``head<-dep``: ``argmax_j A_w[j, i]`` (the word that attends most to i). The candidate set excludes i itself
   (a word never predicts itself; Clark zeroes the diagonal, which is the same for attention probabilities) and
   non-words. Ties go to the leftmost word (``torch.argmax``).
3. **Scoring.** A hit is ``prediction == gold head``. ROOT (head 0) can never be hit. Counts are kept per
   (layer, head, direction, relation, probe-set half). The row ``relation == "all"`` pools every relation
   **except the root word and ``punct``** (Clark/Chen's ``all`` includes both; see docs/notes/sas.md, "Comparing
   with Clark et al. and Chen et al."). The root word's relation is reported as ``"root"`` whatever the parser
   calls it.
4. **Fixed-offset baselines** ``head = word i + k`` for k in -3..+3, k != 0 (k = 0 is the word itself and always
   wrong). Unlike Clark's ``clip(i + k, 0, n)`` an offset that falls outside the sentence predicts nothing (a miss),
   so a baseline hit is exactly "the gold head is at offset k".
5. **Positional vs syntactic.** For each (head, direction, relation) with the relation's best offset k*: the share of
   the head's predictions that fall at offset k* (``offset_share``) and its UAS on the words whose gold head is *not*
   at k* (``uas_nonoffset``). A previous/next-token head has ``offset_share`` near 1 and ``uas_nonoffset`` near 0.
6. **Held-out selection** (docs/notes/sas.md, "Held-out head selection"): the best (layer, head, direction) and
   the best offset are chosen on one half of the probe set and scored on the other, both ways; the pooled held-out
   UAS of relation ``all`` is the checkpoint's **SAS score**. The in-sample maximum (Clark's way; optimistic,
   biased by head count) is reported beside it, with the number of candidate predictors.

Tables returned by the accumulator (all tidy):

* ``heads``    layer, head, direction, relation, n, hits, uas, uas_half0, uas_half1, best_offset, offset_share,
  uas_nonoffset — the full layer x head matrix (relations with >= ``min_count`` words, plus ``all``).
* ``offsets``  relation, offset, n, hits, uas, uas_half0, uas_half1.
* ``best``     per relation: in-sample best head and offset, held-out head and offset UAS, the positional measures
  of the in-sample best head and its classification (``syntactic`` / ``positional`` / ``neither``).
* ``summary``  one row: sas_score (held-out), sas_in_sample, offset baselines, counts and conventions.

Notebook use::

    from .sas import sas_frames
    frames = sas_frames("runs/demo/step_001200", probe_set)       # or a loaded model + tokenizer
    frames["best"]

Trajectory use: :func:`sas_curve` (per-step SAS score + validation loss) and :func:`sas_onsets` (structure onset,
loss-drop onset, classification and coincidence; see ``mlmscope.analyses.onset``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checkpoints.errors import MlmscopeError
from ..probes.batch import CaptureBatch
from .base import Accumulator, Analysis, AnalysisContext, SkipAnalysis, register

#: Prediction directions, in Clark et al.'s naming.
DIRECTIONS: tuple[str, ...] = ("dep->head", "head<-dep")
#: Fixed-offset baselines k = -3..+3 (docs/notes/sas.md, "What is computed"); 0 = the word itself is never a
#: candidate.
OFFSETS: tuple[int, ...] = (-3, -2, -1, 1, 2, 3)
#: Name given to the root word's relation (head 0), whatever label the parser used (spaCy "ROOT", UD "root").
ROOT = "root"
#: Relations left out of ``all`` besides the root word.
DEFAULT_EXCLUDE: tuple[str, ...] = ("punct",)
#: Minimum occurrences for a per-relation best head (Clark et al. drop relations with < 100 occurrences).
MIN_COUNT = 100
ALL = "all"


class SASInputError(MlmscopeError):
    """The probe set or capture cannot be scored (no parses, inconsistent alignment, ...); the message says why."""


# ----------------------------------------------------------------------------------------------------------------
# Gold parses, padded once per probe set
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GoldTable:
    """The probe set's parses as padded tensors (built once, indexed by ``CaptureBatch.sentence_ids``).

    Attributes:
        gold: (N, W) 0-based word index of each word's head; -1 for the root word, -2 for padding.
        rel: (N, W) relation id into ``relations``; -1 for padding.
        half: (N,) probe-set half (0 or 1) for held-out selection.
        n_words: (N,) words per sentence.
        relations: Relation names (``"root"`` for the root word).
        excluded: Relation ids left out of ``all`` (root + ``exclude``).
    """

    gold: torch.Tensor
    rel: torch.Tensor
    half: torch.Tensor
    n_words: torch.Tensor
    relations: list[str]
    excluded: list[int]


#: Relation labels that mean "no parse" (CoNLL-U underscore; ``mlmscope.probes.probeset.sentences_of`` uses it).
NO_LABEL = ("_", "")


def gold_table(probe_set: Any, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> GoldTable:
    """Pad the probe set's heads, relations and halves into tensors.

    Args:
        probe_set: A :class:`mlmscope.probes.probeset.ProbeSet` (columns ``sentences``, ``heads`` 1-based with 0 = ROOT,
            ``relations``, ``halves``); without ``halves`` the sentence index parity is used.
        exclude: Relations left out of ``all`` besides the root word.

    Raises:
        SASInputError: The probe set is empty, carries no dependency parses, or its columns disagree in length.
    """
    words = getattr(probe_set, "sentences", None)
    heads_l, rels_l = getattr(probe_set, "heads", None), getattr(probe_set, "relations", None)
    if words is None or len(words) == 0:
        raise SASInputError("the probe set is empty: nothing to score")
    no_parse = (
        "the probe set carries no dependency parses{}: the SAS analysis needs heads and relations; build it "
        "with the parser (`mlmscope probes build`) or give a CoNLL-U file with HEAD and DEPREL columns"
    )
    if heads_l is None or rels_l is None or all(r in NO_LABEL for rs in rels_l for r in rs):
        raise SASInputError(no_parse.format(""))
    for i, (w, h, r) in enumerate(zip(words, heads_l, rels_l)):
        if len(h) != len(w) or len(r) != len(w) or any(x is None or not 0 <= int(x) <= len(w) for x in h):
            raise SASInputError(
                no_parse.format(
                    f" (sentence {i}, {' '.join(map(str, w))[:60]!r}, has {len(w)} words but heads {list(h)[:12]})"
                )
            )
    rels_l = [[ROOT if int(h) == 0 else str(r) for h, r in zip(hs, rs)] for hs, rs in zip(heads_l, rels_l)]
    halves = getattr(probe_set, "halves", None) or [i % 2 for i in range(len(words))]
    relations = sorted({r for rs in rels_l for r in rs})
    rel_id = {r: k for k, r in enumerate(relations)}
    n, w_max = len(words), max(max(len(h) for h in heads_l), 1)
    gold = torch.full((n, w_max), -2, dtype=torch.long)
    rel = torch.full((n, w_max), -1, dtype=torch.long)
    for i, (hs, rs) in enumerate(zip(heads_l, rels_l)):
        if hs:
            gold[i, : len(hs)] = torch.tensor([int(h) for h in hs]) - 1
            rel[i, : len(rs)] = torch.tensor([rel_id[r] for r in rs])
    excluded = [rel_id[r] for r in (ROOT, *exclude) if r in rel_id]
    return GoldTable(
        gold=gold,
        rel=rel,
        half=torch.tensor([int(h) % 2 for h in halves]),
        n_words=torch.tensor([len(h) for h in heads_l]),
        relations=relations,
        excluded=excluded,
    )


# ----------------------------------------------------------------------------------------------------------------
# Word-level attention and predictions (vectorised over batch and heads)
# ----------------------------------------------------------------------------------------------------------------


def word_index_tensor(word_ids: Sequence[Sequence[int | None]], seq_len: int) -> torch.Tensor:
    """(B, T) word index of every piece, -1 for [CLS]/[SEP]/padding (from ``CaptureBatch.word_ids``)."""
    out = torch.full((len(word_ids), seq_len), -1, dtype=torch.long)
    for b, ids in enumerate(word_ids):
        row = [-1 if w is None else int(w) for w in ids[:seq_len]]
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def piece_word_matrices(word_index: torch.Tensor, n_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Membership ``S`` (B, W, T) (1 if piece t belongs to word w) and the averaging matrix ``P = S / |S_w|``."""
    onehot = torch.nn.functional.one_hot((word_index + 1).clamp(min=0), n_words + 1)[..., 1:]  # (B, T, W)
    member = onehot.transpose(1, 2).to(torch.float32)
    return member, member / member.sum(-1, keepdim=True).clamp(min=1)


def word_attention(
    pattern: torch.Tensor,
    word_index: torch.Tensor,
    n_words: int,
    matrices: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Word-to-word attention ``A_w = P @ A @ S^T`` of shape (B, H, W, W) (Clark et al. 2019, Sec. 4.1 merge).

    Args:
        pattern: (B, H, T, T) attention probabilities (rows = queries).
        word_index: (B, T) word index per piece, -1 for non-words.
        n_words: W, the number of word slots.
        matrices: ``piece_word_matrices(word_index, n_words)`` if already computed (one per batch, all layers).
    """
    member, avg = matrices if matrices is not None else piece_word_matrices(word_index, n_words)
    pattern = pattern.to(torch.float32)
    return avg[:, None] @ pattern @ member.transpose(1, 2)[:, None]


def predict_heads(a_w: torch.Tensor, candidate: torch.Tensor) -> dict[str, torch.Tensor]:
    """Argmax head predictions (B, H, W) for both directions.

    Args:
        a_w: (B, H, W, W) word-level attention.
        candidate: (B, W) bool, real words (at least one piece). Only predictions for candidate words are
            meaningful; the candidates for word i are the other candidate words.
    """
    w = a_w.shape[-1]
    allowed = candidate[:, :, None] & candidate[:, None, :] & ~torch.eye(w, dtype=torch.bool, device=a_w.device)
    masked = a_w.masked_fill(~allowed[:, None], torch.finfo(a_w.dtype).min)
    # dep->head: the word row i attends to most; head<-dep: the word (row j) attending most to column i
    return {"dep->head": masked.argmax(-1), "head<-dep": masked.argmax(-2)}


def offset_bucket(offset: torch.Tensor, offsets: Sequence[int] = OFFSETS) -> torch.Tensor:
    """Index of ``offset`` in ``offsets``, or ``len(offsets)`` ("other"); a table lookup, no broadcasting."""
    reach = max(abs(k) for k in offsets)
    lut = torch.full((2 * reach + 1,), len(offsets), dtype=torch.long, device=offset.device)
    lut[torch.tensor(offsets, device=offset.device) + reach] = torch.arange(len(offsets), device=offset.device)
    inside = offset.abs() <= reach
    return torch.where(inside, lut[(offset + reach).clamp(0, 2 * reach)], len(offsets))


# ----------------------------------------------------------------------------------------------------------------
# Streaming counts
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SASCounts:
    """Hit counts of every predictor, streamed batch by batch (memory independent of the probe-set size).

    Cells are (relation, half, gold-offset bucket); buckets are ``offsets`` + "other" (also used for the root word).

    Attributes:
        n: (R, 2, K+1) scored words.
        hits: per layer, (H_l, D, R, 2, K+1) attention-argmax hits (a layer list, so layers may differ in heads).
        pred_off: per layer, (H_l, D, R, K+1) predictions falling at each offset (bucket K = elsewhere).
        n_total: sentences in the probe set (those never captured — too long, word without pieces — are
            ``n_total - n_sentences - n_skipped``).
        n_sentences / n_skipped: sentences scored / skipped (word without pieces, alignment mismatch, < 2 words).
    """

    n_rel: int
    n_layers: int
    offsets: tuple[int, ...] = OFFSETS
    n: torch.Tensor = field(init=False)
    hits: list[torch.Tensor | None] = field(init=False)
    pred_off: list[torch.Tensor | None] = field(init=False)
    n_total: int = 0
    n_sentences: int = 0
    n_skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = len(self.offsets) + 1
        self.n = torch.zeros(self.n_rel, 2, k, dtype=torch.float64)
        self.hits = [None] * self.n_layers
        self.pred_off = [None] * self.n_layers

    @property
    def n_buckets(self) -> int:
        return len(self.offsets) + 1

    def add_words(self, cell: torch.Tensor) -> None:
        if self.n.device != cell.device:  # the counts live where the batches do (moved once, while still zero)
            self.n = self.n.to(cell.device)
        self.n.view(-1).index_add_(0, cell, torch.ones_like(cell, dtype=torch.float64))

    def add_layer(self, layer: int, hits: torch.Tensor, cell: torch.Tensor, pred_cell: torch.Tensor) -> None:
        """Add one layer's hits (H, D, N) bool at word cells (N,), and prediction cells (H, D, N)."""
        h, d = hits.shape[:2]
        dev = hits.device
        counts, pred_off = self.hits[layer], self.pred_off[layer]
        if counts is None or pred_off is None:  # set together, at the layer's first batch
            shape, f64 = (h, d, self.n_rel), torch.float64
            counts = self.hits[layer] = torch.zeros(*shape, 2, self.n_buckets, dtype=f64, device=dev)
            pred_off = self.pred_off[layer] = torch.zeros(*shape, self.n_buckets, dtype=f64, device=dev)
        elif counts.shape[0] != h:
            raise SASInputError(f"layer {layer} had {counts.shape[0]} heads in an earlier batch and {h} now")
        counts.view(h * d, -1).index_add_(1, cell, hits.reshape(h * d, -1).to(torch.float64))
        ones = torch.ones(h * d, pred_cell[0, 0].numel(), dtype=torch.float64, device=dev)
        pred_off.view(h * d, -1).scatter_add_(1, pred_cell.reshape(h * d, -1), ones)

    def to_host(self) -> SASCounts:
        """The counts as CPU tensors (for the numpy tables)."""
        out = SASCounts(self.n_rel, self.n_layers, self.offsets, self.n_total, self.n_sentences, self.n_skipped)
        out.skip_reasons = dict(self.skip_reasons)
        out.n = self.n.cpu()
        out.hits = [None if h is None else h.cpu() for h in self.hits]
        out.pred_off = [None if o is None else o.cpu() for o in self.pred_off]
        return out


class SASAccumulator(Accumulator):
    """Consumes ``clean`` capture batches and produces the SAS tables (see the module docstring)."""

    def __init__(self, gold: GoldTable, n_layers: int, params: SAS.Params) -> None:
        self.gold = gold
        self.params = params
        self.counts = SASCounts(
            n_rel=len(gold.relations), n_layers=n_layers, offsets=tuple(params.offsets), n_total=len(gold.n_words)
        )
        self._gold_on: dict[torch.device, GoldTable] = {}

    def _gold(self, device: torch.device) -> GoldTable:
        """The gold table on the batches' device (copied there once)."""
        if device not in self._gold_on:
            g = self.gold
            self._gold_on[device] = GoldTable(
                g.gold.to(device), g.rel.to(device), g.half.to(device), g.n_words.to(device), g.relations, g.excluded
            )
        return self._gold_on[device]

    def update(self, batch: CaptureBatch) -> None:
        if batch.variant != "clean":
            return
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.counts.n_layers)]
        dev = batch[names[0]].device if names else batch.sentence_ids.device
        table = self._gold(dev)
        ids = batch.sentence_ids.to(device=dev, dtype=torch.long)
        if len(ids) and int(ids.max()) >= len(self.gold.n_words):
            raise SASInputError(
                f"capture batch refers to sentence {int(ids.max())} but the probe set has "
                f"{len(self.gold.n_words)}: was it captured with another probe set?"
            )
        n_words = table.n_words[ids]
        w = int(n_words.max()) if len(ids) else 0
        seq_len = batch.input_ids.shape[1]
        widx = word_index_tensor(batch.word_ids, seq_len).to(dev)
        scored = self._scored_sentences(widx, n_words, w)
        gold = table.gold[ids, :w]
        rel = table.rel[ids, :w]
        half = table.half[ids]
        pos = torch.arange(w, device=dev)
        word_ok = scored[:, None] & (pos[None, :] < n_words[:, None])  # (B, W) words to score
        gold_bucket = torch.where(
            gold >= 0, offset_bucket(gold - pos, self.counts.offsets), torch.full_like(gold, len(self.counts.offsets))
        )
        nb = self.counts.n_buckets
        cell_bw = (rel.clamp(min=0) * 2 + half[:, None]) * nb + gold_bucket  # (B, W) -> flat (R, 2, K+1)
        cell = cell_bw[word_ok]
        self.counts.add_words(cell)
        mats = piece_word_matrices(widx, w)
        a_ws = [word_attention(batch[name], widx, w, mats) for name in names]
        sizes = [a.shape[1] for a in a_ws]
        # all layers' heads at once (layers may differ in head count): one argmax per direction
        a_w = torch.cat(a_ws, 1)  # (B, sum H, W, W)
        pred = predict_heads(a_w, word_ok)
        preds = torch.stack([pred[d] for d in DIRECTIONS], 1).permute(2, 1, 0, 3)  # (sum H, D, B, W)
        hits = ((preds == gold) & (gold >= 0))[:, :, word_ok]  # (sum H, D, N)
        pred_cell = (rel.clamp(min=0) * nb + offset_bucket(preds - pos, self.counts.offsets))[:, :, word_ok]
        for layer, (h_l, p_l) in enumerate(zip(hits.split(sizes), pred_cell.split(sizes))):
            self.counts.add_layer(layer, h_l, cell, p_l)

    def _scored_sentences(self, widx: torch.Tensor, n_words: torch.Tensor, w: int) -> torch.Tensor:
        """(B,) bool: sentences with >= 2 words whose pieces cover exactly words 0..n-1; others counted as skipped."""
        member, _ = piece_word_matrices(widx, max(w, 1))
        pieces = member.sum(-1)[:, :w]  # (B, W)
        in_range = torch.arange(w, device=widx.device)[None, :] < n_words[:, None]
        covered = ((pieces > 0) | ~in_range).all(-1)
        beyond = (widx >= n_words[:, None]).any(-1)
        reasons = {
            "a word has no word piece or the sentence was truncated": ~covered,
            "word_ids point past the sentence's words": beyond & covered,
            "fewer than 2 words": (n_words < 2) & covered & ~beyond,
        }
        for reason, mask in reasons.items():
            if int(mask.sum()):
                self.counts.skip_reasons[reason] = self.counts.skip_reasons.get(reason, 0) + int(mask.sum())
        ok = covered & ~beyond & (n_words >= 2)
        self.counts.n_sentences += int(ok.sum())
        self.counts.n_skipped += int((~ok).sum())
        return ok

    def result(self) -> dict[str, pd.DataFrame]:
        return sas_tables(self.counts.to_host(), self.gold.relations, self.gold.excluded, self.params)


# ----------------------------------------------------------------------------------------------------------------
# Counts -> tidy tables
# ----------------------------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


@dataclass
class _Pooled:
    """Counts with an ``all`` relation appended: n (R', 2, K+1); hits (C, R', 2, K+1); pred_off (C, R', K+1)."""

    relations: list[str]
    n: np.ndarray
    hits: np.ndarray
    pred_off: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    direction: np.ndarray


def _pool(counts: SASCounts, relations: list[str], excluded: list[int]) -> _Pooled:
    keep = np.ones(len(relations), bool)
    keep[excluded] = False

    def with_all(x: np.ndarray, axis: int) -> np.ndarray:
        pooled = np.take(x, np.flatnonzero(keep), axis=axis).sum(axis=axis, keepdims=True)
        return np.concatenate([x, pooled], axis=axis)

    layers = [(l, h) for l, h in enumerate(counts.hits) if h is not None]
    hits = (
        np.concatenate([h.numpy().reshape(-1, *h.shape[2:]) for _, h in layers])
        if layers
        else np.zeros((0, len(relations), 2, counts.n_buckets))
    )
    offs = [o for o in counts.pred_off if o is not None]  # None exactly where counts.hits is None
    pred_off = (
        np.concatenate([o.numpy().reshape(-1, len(relations), counts.n_buckets) for o in offs])
        if layers
        else np.zeros((0, len(relations), counts.n_buckets))
    )
    lab = [(l, hh, d) for l, h in layers for hh in range(h.shape[0]) for d in range(h.shape[1])]
    lab_arr = np.array(lab, dtype=int).reshape(-1, 3)
    return _Pooled(
        relations=[*relations, ALL],
        n=with_all(counts.n.numpy(), 0),
        hits=with_all(hits, 1),
        pred_off=with_all(pred_off, 1),
        layer=lab_arr[:, 0],
        head=lab_arr[:, 1],
        direction=np.array(DIRECTIONS, dtype=object)[lab_arr[:, 2]],
    )


def _held_out(hits_h: np.ndarray, n_h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-fold held-out selection over candidates.

    Args:
        hits_h: (C, R, 2) hits per candidate, relation and half.
        n_h: (R, 2) words per relation and half.

    Returns:
        held-out UAS (R,) pooled over both folds, and the chosen candidate (R,) on half 0 and on half 1.
    """
    uas_h = _ratio(hits_h, n_h[None])  # (C, R, 2)
    pick = np.nan_to_num(uas_h, nan=-1.0).argmax(0)  # (R, 2): selected on half h
    r = np.arange(hits_h.shape[1])
    held_hits = hits_h[pick[:, 0], r, 1] + hits_h[pick[:, 1], r, 0]
    both = (n_h > 0).all(-1)
    uas = np.where(both, _ratio(held_hits, n_h.sum(-1)), np.nan)
    return uas, pick[:, 0], pick[:, 1]


def _classify(
    uas_ho: np.ndarray, base_ho: np.ndarray, n: np.ndarray, share: np.ndarray, margin_se: float, positional_share: float
) -> np.ndarray:
    se = np.sqrt(np.clip(uas_ho * (1 - uas_ho), 0, None) / np.maximum(n, 1))
    syn = (uas_ho - base_ho) > margin_se * se
    pos = ~syn & (share >= positional_share)
    out = np.where(syn, "syntactic", np.where(pos, "positional", "neither"))
    return np.where(np.isnan(uas_ho) | np.isnan(base_ho), "unknown", out)


def sas_tables(
    counts: SASCounts, relations: list[str], excluded: list[int], params: SAS.Params
) -> dict[str, pd.DataFrame]:
    """Turn streamed counts into the ``heads``, ``offsets``, ``best`` and ``summary`` tables."""
    p = _pool(counts, relations, excluded)
    offsets = np.array(counts.offsets)
    n_rk = p.n.sum(1)  # (R', K+1)
    n_r = n_rk.sum(-1)  # (R',)
    # offset baselines: a hit is "gold head at offset k", so hits = n in bucket k
    off_hits_h = p.n[:, :, :-1]  # (R', 2, K)
    off_uas = _ratio(n_rk[:, :-1], n_r[:, None])  # (R', K)
    best_k = np.nan_to_num(off_uas, nan=-1).argmax(-1)  # (R',) index into offsets
    r_idx = np.arange(len(p.relations))
    off_ho, _, _ = _held_out(off_hits_h.transpose(2, 0, 1), p.n.sum(-1))

    # heads: in-sample UAS, per half, positional measures at the relation's best offset
    hits_rh = p.hits.sum(-1)  # (C, R', 2)
    hits_r = hits_rh.sum(-1)  # (C, R')
    uas = _ratio(hits_r, n_r[None])
    hits_at_k = p.hits.sum(2)[:, r_idx, best_k]  # (C, R') hits where gold at k*
    uas_nonoff = _ratio(hits_r - hits_at_k, (n_r - n_rk[r_idx, best_k])[None])
    share = _ratio(p.pred_off[:, r_idx, best_k], n_r[None])
    uas_half = _ratio(hits_rh, p.n.sum(-1)[None])  # (C, R', 2)

    report = (n_r >= params.min_count) | (np.array(p.relations) == ALL) | np.isin(p.relations, params.relations)
    c, r = np.meshgrid(np.arange(len(p.layer)), np.flatnonzero(report), indexing="ij")
    c, r = c.ravel(), r.ravel()
    heads = pd.DataFrame(
        {
            "layer": p.layer[c],
            "head": p.head[c],
            "direction": p.direction[c],
            "relation": np.array(p.relations, dtype=object)[r],
            "n": n_r[r].astype(int),
            "hits": hits_r[c, r].astype(int),
            "uas": uas[c, r],
            "uas_half0": uas_half[c, r, 0],
            "uas_half1": uas_half[c, r, 1],
            "best_offset": offsets[best_k[r]],
            "offset_share": share[c, r],
            "uas_nonoffset": uas_nonoff[c, r],
        }
    )

    rk = np.flatnonzero(report)
    ro, ko = np.meshgrid(rk, np.arange(len(offsets)), indexing="ij")
    ro, ko = ro.ravel(), ko.ravel()
    off_half = _ratio(off_hits_h, p.n.sum(-1)[:, :, None])  # (R', 2, K)
    offsets_df = pd.DataFrame(
        {
            "relation": np.array(p.relations, dtype=object)[ro],
            "offset": offsets[ko],
            "n": n_r[ro].astype(int),
            "hits": n_rk[ro, ko].astype(int),
            "uas": off_uas[ro, ko],
            "uas_half0": off_half[ro, 0, ko],
            "uas_half1": off_half[ro, 1, ko],
        }
    )

    best = _best_table(p, params, n_r, uas, hits_rh, share, uas_nonoff, off_uas, best_k, off_ho, offsets, excluded)
    summary = _summary(best, counts, params, len(p.layer))
    return {"heads": heads, "offsets": offsets_df, "best": best, "summary": summary}


def _best_table(
    p: _Pooled,
    params: SAS.Params,
    n_r: np.ndarray,
    uas: np.ndarray,
    hits_rh: np.ndarray,
    share: np.ndarray,
    uas_nonoff: np.ndarray,
    off_uas: np.ndarray,
    best_k: np.ndarray,
    off_ho: np.ndarray,
    offsets: np.ndarray,
    excluded: list[int],
) -> pd.DataFrame:
    """Per relation (>= min_count, never root/excluded; ``all`` always): best head vs best offset."""
    names = np.array(p.relations, dtype=object)
    eligible = (n_r >= params.min_count) | np.isin(names, params.relations)
    eligible[excluded] = False
    eligible[-1] = True
    rows = np.flatnonzero(eligible)
    n_cand = len(p.layer)
    absent = [r for r in params.relations if r not in set(p.relations)]
    if n_cand == 0:  # nothing was captured
        return pd.DataFrame(
            {
                "relation": [*names[rows], *absent],
                "n": [*n_r[rows].astype(int), *[0] * len(absent)],
                "n_candidates": 0,
                "uas_held_out": np.nan,
                "kind": "unknown",
            }
        )
    pick = np.nan_to_num(uas, nan=-1).argmax(0)  # (R',) in-sample best candidate
    head_ho, pick0, pick1 = _held_out(hits_rh, p.n.sum(-1))
    r = np.arange(len(names))
    kind = _classify(head_ho, off_ho, n_r, share[pick, r], params.margin_se, params.positional_share)

    def label(i: np.ndarray) -> np.ndarray:
        return np.array([f"L{p.layer[j]}H{p.head[j]} {p.direction[j]}" for j in i], dtype=object)

    df = pd.DataFrame(
        {
            "relation": names,
            "n": n_r.astype(int),
            "n_candidates": n_cand,
            "layer": p.layer[pick],
            "head": p.head[pick],
            "direction": p.direction[pick],
            "uas_in_sample": uas[pick, r],
            "uas_held_out": head_ho,
            "held_out_heads": label(pick0) + " | " + label(pick1),
            "best_offset": offsets[best_k],
            "offset_uas_in_sample": off_uas[r, best_k],
            "offset_uas_held_out": off_ho,
            "delta_held_out": head_ho - off_ho,
            "offset_share": share[pick, r],
            "uas_nonoffset": uas_nonoff[pick, r],
            "kind": kind,
        }
    ).iloc[rows]
    if absent:  # asked for but not in the probe set: reported as empty rows, not an error
        df = pd.concat([df, pd.DataFrame({"relation": absent, "n": 0, "n_candidates": n_cand, "kind": "absent"})])
    return df.reset_index(drop=True)


def _summary(best: pd.DataFrame, counts: SASCounts, params: SAS.Params, n_cand: int) -> pd.DataFrame:
    row = best[best["relation"] == ALL].iloc[0] if "relation" in best and (best["relation"] == ALL).any() else None
    get = (lambda k: row.get(k, np.nan)) if row is not None else (lambda k: np.nan)
    return pd.DataFrame(
        [
            {
                "sas_score": get("uas_held_out"),
                "sas_in_sample": get("uas_in_sample"),
                "best_offset": get("best_offset"),
                "offset_uas_held_out": get("offset_uas_held_out"),
                "offset_uas_in_sample": get("offset_uas_in_sample"),
                "delta_held_out": get("delta_held_out"),
                "layer": get("layer"),
                "head": get("head"),
                "direction": get("direction"),
                "offset_share": get("offset_share"),
                "uas_nonoffset": get("uas_nonoffset"),
                "kind": get("kind"),
                "n_words": int(get("n")) if row is not None and not pd.isna(get("n")) else 0,
                "n_candidates": n_cand,
                "n_sentences": counts.n_sentences,
                "n_skipped": counts.n_skipped,
                "n_not_captured": counts.n_total - counts.n_sentences - counts.n_skipped,
                "skip_reasons": "; ".join(f"{k}: {v}" for k, v in sorted(counts.skip_reasons.items())),
                "convention": f"all = every word except root and {'/'.join(params.exclude) or 'nothing'}; "
                "word-level merge mean-from/sum-to; held-out = 2-fold over probe-set halves",
            }
        ]
    )


# ----------------------------------------------------------------------------------------------------------------
# The registered analysis
# ----------------------------------------------------------------------------------------------------------------


@register
class SAS(Analysis):
    """Per-head UAS of attention against the probe set's dependency parses (Clark et al. 2019; Chen et al. 2024)."""

    name = "sas"
    version = "1"
    description = "syntactic attention structure: per-head UAS vs dependency parses, offset baselines, held-out SAS"
    variants = ("clean",)

    @dataclass
    class Params(Analysis.Params):
        """Attributes:
        min_count: Relations with fewer words get no per-relation best head (Clark et al.: 100).
        exclude: Relations left out of ``all`` besides the root word.
        relations: Relations always reported (n = 0 / NaN if absent from the probe set).
        offsets: Fixed-offset baselines.
        margin_se: A head is ``syntactic`` if its held-out UAS beats the held-out best offset by this many
            binomial standard errors.
        positional_share: Otherwise ``positional`` if at least this share of its predictions fall at the best
            offset.
        """

        min_count: int = MIN_COUNT
        exclude: tuple[str, ...] = DEFAULT_EXCLUDE
        relations: tuple[str, ...] = ()
        offsets: tuple[int, ...] = OFFSETS
        margin_se: float = 2.0
        positional_share: float = 0.5

    def names(self, ctx: AnalysisContext) -> list[str]:
        return [f"blocks.{l}.attn.hook_pattern" for l in range(ctx.n_layers)]

    def accumulator(self, ctx: AnalysisContext) -> SASAccumulator:
        """Raises SkipAnalysis (final) when the probe set cannot be scored (none, empty, unparsed)."""
        try:
            if ctx.probe_set is None:
                raise SASInputError("the SAS analysis needs a parsed probe set")
            gold = gold_table(ctx.probe_set, self.params.exclude)
        except SASInputError as e:
            raise SkipAnalysis(str(e)) from e
        return SASAccumulator(gold, ctx.n_layers, self.params)


# ----------------------------------------------------------------------------------------------------------------
# Notebook API: one model, and a trajectory
# ----------------------------------------------------------------------------------------------------------------


def sas_frames(
    model: Any, probe_set: Any, params: SAS.Params | None = None, batch_size: int = 32, device: str = "cpu"
) -> dict[str, pd.DataFrame]:
    """Run the SAS analysis on one model: ``SAS.run`` (= ``mlmscope.analyses.sas.run``), the runner's code path.

    Args:
        model: A checkpoint folder (any ``probes.load_model`` folder, e.g. all-MiniLM-L6-v2) or a ``LoadedModel``.
        probe_set: A ``ProbeSet`` or a probe-set folder / CoNLL-U file (``mlmscope.probes.probeset.load_probe_set``).
        params: ``SAS.Params``; default Clark-style settings (see the class).
        batch_size: Probe sentences per forward pass.
        device: Torch device for a model given as a folder.

    Returns:
        The ``heads``, ``offsets``, ``best`` and ``summary`` tables.

    Raises:
        SkipAnalysis: the probe set has no parses; ``probes`` errors for a bad folder or tokenizer mismatch.
    """
    from ..probes.model import LoadedModel

    return SAS.run(
        model,
        probe_set,
        params=params,
        batch_size=batch_size,
        device=None if isinstance(model, LoadedModel) else device,
    )


def sas_curve(source: Any, table: str = "summary") -> pd.DataFrame:
    """Per-checkpoint SAS summary next to the validation loss.

    Args:
        source: A run folder analysed with ``mlmscope analyze`` (results read with ``Trajectory.results``), or a
            frame of ``summary`` rows with a ``step`` column (e.g. concatenated :func:`sas_frames` outputs).
        table: Which stored table to read from a run folder.

    Returns:
        One row per step, sorted: ``step``, the summary columns and, when the manifest has it, ``val_loss``.
    """
    from .trajectory import Trajectory

    if isinstance(source, pd.DataFrame):
        curve, loss = source.copy(), None
    else:
        traj = Trajectory(source)
        curve = traj.results("sas", table)
        ck = traj.checkpoints_frame()
        loss = ck[["step", "val_loss"]] if "val_loss" in ck else None
    if "step" not in curve:
        raise SASInputError("the SAS curve needs a `step` column (one summary row per checkpoint)")
    curve = curve.sort_values("step").drop_duplicates("step", keep="last")
    if loss is not None and "val_loss" not in curve:
        curve = curve.merge(loss, on="step", how="left")
    return curve.reset_index(drop=True)


def fixed_head_curve(heads: pd.DataFrame, relation: str = ALL) -> pd.DataFrame:
    """UAS over steps of the one (layer, head, direction) that is best at the last step.

    Why a fixed head: docs/notes/sas.md, "Held-out head selection".

    Args:
        heads: Stored ``heads`` tables of several checkpoints with a ``step`` column.
        relation: Relation row to follow.
    """
    rows = heads[heads["relation"] == relation]
    last = rows[rows["step"] == rows["step"].max()]
    if last.empty:
        return pd.DataFrame(columns=["step", "layer", "head", "direction", "uas"])
    top = last.loc[last["uas"].idxmax()]
    sel = rows[
        (rows["layer"] == top["layer"]) & (rows["head"] == top["head"]) & (rows["direction"] == top["direction"])
    ]
    return sel[["step", "layer", "head", "direction", "uas", "offset_share", "uas_nonoffset"]].sort_values("step")


def _window_mean(
    curve: pd.DataFrame, col: str, before: float | None = None, after: float | None = None, k: int = 3
) -> float:
    sel = curve[curve["step"] <= before].tail(k) if before is not None else curve[curve["step"] >= after].head(k)
    return float(sel[col].mean()) if len(sel) and col in sel else math.nan


def classify_onset(curve: pd.DataFrame, onset_step: float, end_step: float, k: int = 3) -> dict[str, Any]:
    """Call a structure onset ``syntactic``, ``positional`` or ``mixed`` from the best head's measures around it.

    Compares the ``k`` checkpoints at or before the onset with the ``k`` at or after the ramp's end:

    * ``syntactic``: most post-ramp checkpoints' best head beats the held-out offset baseline (summary ``kind``
      = syntactic) and its UAS on non-offset words rose;
    * ``positional``: most post-ramp checkpoints are ``positional``, or the share of predictions at the best offset
      rose while the non-offset UAS did not (a previous/next-token head growing);
    * ``mixed`` otherwise.
    """
    d_share = _window_mean(curve, "offset_share", after=end_step, k=k) - _window_mean(
        curve, "offset_share", before=onset_step, k=k
    )
    d_nonoff = _window_mean(curve, "uas_nonoffset", after=end_step, k=k) - _window_mean(
        curve, "uas_nonoffset", before=onset_step, k=k
    )
    post = curve[curve["step"] >= end_step].head(k)["kind"] if "kind" in curve else pd.Series(dtype=object)
    share_syn = float((post == "syntactic").mean()) if len(post) else math.nan
    share_pos = float((post == "positional").mean()) if len(post) else math.nan
    if share_syn > 0.5 and d_nonoff > 0:
        kind = "syntactic"
    elif share_pos > 0.5 or (d_share > 0 and not d_nonoff > 0):
        kind = "positional"
    else:
        kind = "mixed"
    return {
        "structure_kind": kind,
        "delta_offset_share": d_share,
        "delta_uas_nonoffset": d_nonoff,
        "post_share_syntactic": share_syn,
    }


def sas_onsets(curve: pd.DataFrame, params: Any = None, score: str = "sas_score") -> pd.DataFrame:
    """Structure onset of the SAS curve, its kind, the loss-drop onset and whether they coincide (one row).

    Args:
        curve: From :func:`sas_curve` (``step``, ``sas_score``, positional measures, ``val_loss``).
        params: ``mlmscope.analyses.onset.OnsetParams`` shared by both curves (direction is set per curve).
        score: Column to detect the structure onset on (``sas_score`` = held-out; ``sas_in_sample``).

    Returns:
        ``sas_*`` and ``loss_*`` onset fields (see ``mlmscope.analyses.onset.Onset.as_dict``), ``structure_kind`` and
        the measures behind it, ``first_step_above_offset`` (first checkpoint whose held-out SAS beats the held-out
        best offset), and ``coincide`` / ``coincide_reason`` / ``distance_decades``.
    """
    from .onset import OnsetParams, coincidence, detect_onset

    p = params or OnsetParams()
    sas = detect_onset(curve["step"], curve[score], p, direction="up")
    row: dict[str, Any] = {**sas.as_dict("sas_"), "method": sas.method}
    if sas.found:
        assert sas.onset_step is not None and sas.end_step is not None  # set whenever found
        row.update(classify_onset(curve, sas.onset_step, sas.end_step))
    else:
        row["structure_kind"] = "none"
    above = curve[curve[score] > curve.get("offset_uas_held_out", pd.Series(np.inf, index=curve.index))]
    row["first_step_above_offset"] = int(above["step"].iloc[0]) if len(above) else None
    if "val_loss" in curve and curve["val_loss"].notna().sum() > 0:
        loss = detect_onset(curve["step"], curve["val_loss"], p, direction="down")
        row.update(loss.as_dict("loss_"))
        c = coincidence(sas, loss)
        row.update(
            {"coincide": c["coincide"], "coincide_reason": c["reason"], "distance_decades": c["distance_decades"]}
        )
    else:
        row.update({"loss_found": False, "loss_reason": "no validation loss in the curve", "coincide": None})
    return pd.DataFrame([row])
