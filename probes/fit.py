"""How well a probe set fits a model's tokenizer, checked once before an analysis run.

Two things would otherwise go unnoticed: sentences the capture skips (empty, longer than the model's positions, or
with a word that maps to no piece; plus blocks without words dropped when a CoNLL-U file was read), and text the
tokenizer cannot represent (a script missing from its vocabulary comes out as [UNK] pieces, and every analysis would
then measure the [UNK] embedding instead of the text).

Definitions:

* a word is *unknown* when every piece it maps to is the tokenizer's unknown token;
* a sentence is *mostly [UNK]* when more than :data:`MOSTLY_UNK_SHARE` of its words are unknown.

The runner warns with the counts, and refuses when no sentence is usable or every sentence is mostly [UNK].

Example::

    from .fit import fit_report, load_tokenizer
    tok, max_len = load_tokenizer("runs/demo/step_012000")
    print(fit_report(tok, probe_set, max_len).warnings())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from .align import encode_words

#: Share of a sentence's words that must be unknown for the sentence to count as mostly [UNK]. Past one half, the
#: word-level quantities the analyses compute (attention between words, parse-head UAS, per-word ranks) are mostly
#: about one shared [UNK] embedding, not about the sentence; below it a few rare names or symbols are normal text.
MOSTLY_UNK_SHARE = 0.5


class _Sentences(Protocol):
    """A probe set: anything with word lists in ``sentences`` (and optionally ``meta``)."""

    sentences: list[list[str]]


@dataclass
class FitReport:
    """Counts of one probe set against one tokenizer.

    Attributes:
        n_sentences: Sentences in the probe set.
        kept: Sentences the capture will use.
        skipped: Reason -> sentences the capture skips (``too_long``, ``word_without_pieces``, ``empty``).
        dropped_at_load: Reason -> sentences dropped when the probe file was read (not in ``n_sentences``).
        mostly_unk: Kept sentences that are mostly [UNK].
        unk_words: Unknown words among the kept sentences.
        n_words: Words in the kept sentences.
        model: Folder of the tokenizer (for messages).
    """

    n_sentences: int
    kept: int
    skipped: dict[str, int] = field(default_factory=dict)
    dropped_at_load: dict[str, int] = field(default_factory=dict)
    mostly_unk: int = 0
    unk_words: int = 0
    n_words: int = 0
    model: str = ""

    @staticmethod
    def _reasons(counts: dict[str, int]) -> str:
        return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(counts.items()) if v)

    def warnings(self) -> list[str]:
        """One line per problem found (empty when the probe set fits)."""
        out = []
        dropped = sum(self.dropped_at_load.values())
        if dropped:
            out.append(
                f"{dropped} sentence(s) of the probe file were dropped when it was read "
                f"({self._reasons(self.dropped_at_load)})"
            )
        skipped = sum(self.skipped.values())
        if skipped:
            out.append(
                f"{skipped} of {self.n_sentences} probe sentences are skipped for {self.model or 'the model'} "
                f"({self._reasons(self.skipped)}); the analyses use the other {self.kept}"
            )
        if self.mostly_unk:
            out.append(
                f"{self.mostly_unk} of {self.kept} probe sentences are mostly [UNK] for the tokenizer of "
                f"{self.model or 'the model'} (more than {MOSTLY_UNK_SHARE:.0%} of their words map only to "
                f"[UNK]; {self.unk_words} of {self.n_words} words in all): their results measure [UNK], "
                "not the text"
            )
        return out

    def refusal(self) -> str | None:
        """Why the probe set cannot be analysed with this tokenizer at all, or None."""
        if self.kept == 0:
            return (
                f"no probe sentence fits {self.model or 'the model'} (of {self.n_sentences}: "
                f"{self._reasons(self.skipped) or 'none given'})"
            )
        if self.mostly_unk == self.kept:
            return (
                f"every usable probe sentence ({self.kept}) is mostly [UNK] for the tokenizer of "
                f"{self.model or 'the model'} ({self.unk_words} of {self.n_words} words map only to [UNK]): its "
                "vocabulary does not cover this text's script; use a probe set in a language the model knows"
            )
        return None


def load_tokenizer(model_dir: str | Path) -> tuple[Any, int]:
    """The fast tokenizer of a checkpoint folder and its position limit (pieces incl. specials), without the weights.

    Raises:
        mlmscope.probes.model.ModelLoadError: no readable config or tokenizer.
    """
    from transformers import AutoTokenizer

    from .model import ModelLoadError, _read_config

    p = Path(model_dir)
    cfg = _read_config(p)
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:
        raise ModelLoadError(f"{str(p)!r}: could not load a tokenizer ({type(e).__name__}: {e})") from None
    n = int(cfg.get("max_position_embeddings", 512))  # 512: the BERT default when a config omits it
    if cfg.get("model_type") == "roberta":  # fairseq offset, as mlmscope.probes.model.ArchAdapter.max_length
        n -= int(cfg.get("pad_token_id", 1)) + 1
    return tok, n


def _unknown_words(word_ids: Sequence[int | None], input_ids: Sequence[int], unk_id: int) -> tuple[int, int]:
    """(unknown words, words) of one encoded sentence."""
    pieces: dict[int, list[int]] = {}
    for w, t in zip(word_ids, input_ids):
        if w is not None:
            pieces.setdefault(w, []).append(t)
    return sum(all(t == unk_id for t in ts) for ts in pieces.values()), len(pieces)


def fit_report(
    tokenizer: Any, probe_set: _Sentences | Sequence[Sequence[str]], max_length: int | None, model: str = ""
) -> FitReport:
    """Count skipped and mostly-[UNK] sentences of ``probe_set`` for ``tokenizer``.

    Args:
        tokenizer: A fast HF tokenizer.
        probe_set: A :class:`mlmscope.probes.probeset.ProbeSet` or word lists.
        max_length: The model's position limit (see :func:`load_tokenizer`).
        model: Folder name used in messages.
    """
    sentences = cast(Sequence[Sequence[str]], getattr(probe_set, "sentences", probe_set))
    meta = getattr(probe_set, "meta", None) or {}
    enc = encode_words(tokenizer, sentences, max_length)
    rep = FitReport(
        n_sentences=len(sentences),
        kept=len(enc),
        skipped=dict(enc.skipped),
        dropped_at_load=dict(meta.get("dropped_at_load") or {}),
        model=model,
    )
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if unk_id is None:  # byte-level BPE (RoBERTa) has no unknown token: every script is representable
        rep.n_words = sum(enc.n_words)
        return rep
    for wids, ids in zip(enc.word_ids, enc.input_ids):
        unk, n = _unknown_words(wids, ids, unk_id)
        rep.unk_words += unk
        rep.n_words += n
        rep.mostly_unk += unk > MOSTLY_UNK_SHARE * n
    return rep
