"""Word <-> piece alignment, from the fast tokenizer's ``word_ids()`` with ``is_split_into_words=True``.

The probe words are tokenised exactly as the forward pass sees them (one call, words pre-split), so the alignment is
the forward pass's own. Helpers turn it into tensors for vectorised word-level pooling, e.g. the Clark et al. word
attention ``A_w = (P @ A @ Pᵀ) / |S_i|`` (Clark et al. 2019; docs/notes/sas.md)::

    P = piece_to_word_matrix(batch.word_ids, n_words, T)      # (B, W, T) 0/1
    to_word = torch.einsum("bwt,bhts->bhws", P / P.sum(-1, keepdim=True).clamp(min=1), attn)   # mean over rows
    A_w = torch.einsum("bhws,bvs->bhwv", to_word, P)                                          # sum over columns
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Reasons a sentence is skipped at encoding time (counted, never silently truncated).
SKIP_TOO_LONG = "too_long"
SKIP_EMPTY_WORD = "word_without_pieces"
SKIP_EMPTY = "empty"
#: Sentences tokenised per call (bounds the tokenizer's transient memory for large probe sets).
ENCODE_CHUNK = 1024


@dataclass
class EncodedProbes:
    """Probe sentences tokenised for one tokenizer.

    Attributes:
        input_ids: per kept sentence, piece ids incl. [CLS]/[SEP] (or <s>/</s>).
        word_ids: per kept sentence, word index of each piece (None for specials).
        sentence_ids: index of each kept sentence in the probe set.
        n_words: number of words of each kept sentence.
        skipped: reason -> number of skipped sentences (``too_long``, ``word_without_pieces``, ``empty``).
        skipped_ids: reason -> probe-set indices of the skipped sentences.
    """

    input_ids: list[list[int]]
    word_ids: list[list[int | None]]
    sentence_ids: list[int]
    n_words: list[int]
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sentence_ids)


def encode_words(tokenizer: Any, sentences: Sequence[Sequence[str]], max_length: int | None = None) -> EncodedProbes:
    """Tokenise pre-split sentences; skip (and count) those empty, too long or with a word that maps to no piece.

    Args:
        tokenizer: A fast HF tokenizer.
        sentences: Word lists.
        max_length: Longest allowed piece sequence incl. specials (the model's position limit); None = no limit.

    Returns:
        The kept sentences' ids and alignment plus skip counts.
    """
    ids, wids, kept, nw = [], [], [], []
    skipped: dict[str, list[int]] = {SKIP_TOO_LONG: [], SKIP_EMPTY_WORD: [], SKIP_EMPTY: []}
    for start in range(0, len(sentences), ENCODE_CHUNK):
        chunk = [list(s) for s in sentences[start : start + ENCODE_CHUNK]]
        enc = tokenizer(
            chunk,
            is_split_into_words=True,
            add_special_tokens=True,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        for j, words in enumerate(chunk):
            i, w = start + j, enc.word_ids(j)
            if not words:
                skipped[SKIP_EMPTY].append(i)
            elif max_length is not None and len(w) > max_length:
                skipped[SKIP_TOO_LONG].append(i)
            elif len({x for x in w if x is not None}) != len(words):
                skipped[SKIP_EMPTY_WORD].append(i)
            else:
                ids.append(enc["input_ids"][j])
                wids.append(w)
                kept.append(i)
                nw.append(len(words))
    return EncodedProbes(ids, wids, kept, nw, {k: len(v) for k, v in skipped.items()}, skipped)


def empty_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """Words of one sentence that the tokenizer maps to no piece (e.g. a lone zero-width space)."""
    w = tokenizer(list(words), is_split_into_words=True, add_special_tokens=False).word_ids()
    got = Counter(x for x in w if x is not None)
    return [words[i] for i in range(len(words)) if got[i] == 0]


def word_ids_tensor(word_ids: Sequence[Sequence[int | None]], T: int) -> torch.Tensor:
    """(B, T) long: word index of each piece, -1 for specials and padding."""
    out = torch.full((len(word_ids), T), -1, dtype=torch.long)
    for b, w in enumerate(word_ids):
        out[b, : len(w)] = torch.tensor([-1 if x is None else x for x in w], dtype=torch.long)
    return out


def piece_to_word_matrix(word_ids: Sequence[Sequence[int | None]], n_words: int, T: int) -> torch.Tensor:
    """(B, W, T) float 0/1 assignment: ``P[b, i, t] = 1`` iff piece t of sentence b belongs to word i.

    Args:
        word_ids: per sentence, ``word_ids()`` (as in :class:`mlmscope.probes.batch.CaptureBatch`).
        n_words: W, at least the longest sentence's word count.
        T: padded piece length.
    """
    wid = word_ids_tensor(word_ids, T)
    return torch.nn.functional.one_hot(wid.clamp(min=0), n_words).transpose(1, 2).float() * (wid >= 0)[:, None, :]


def first_piece_positions(word_ids: Sequence[Sequence[int | None]], n_words: int) -> torch.Tensor:
    """(B, W) long: position of each word's first piece, -1 for words beyond a sentence's length."""
    out = torch.full((len(word_ids), n_words), -1, dtype=torch.long)
    for b, w in enumerate(word_ids):
        seen: set[int] = set()
        for t, x in enumerate(w):
            if x is not None and x not in seen:
                seen.add(x)
                out[b, x] = t
    return out


def words_to_pieces(word_ids: Sequence[int | None]) -> list[list[int]]:
    """For one sentence: word index -> list of its piece positions."""
    n = 1 + max((x for x in word_ids if x is not None), default=-1)
    out: list[list[int]] = [[] for _ in range(n)]
    for t, x in enumerate(word_ids):
        if x is not None:
            out[x].append(t)
    return out
