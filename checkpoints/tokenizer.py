"""WordPiece tokenizer trained with HF ``tokenizers``, wrapped as a ``PreTrainedTokenizerFast``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class TokenizerError(ValueError):
    """The corpus cannot support the requested tokenizer."""


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8192, lowercase: bool = True,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on an iterator of texts.

    Args:
        texts: Training texts (training split only: the validation split must stay unseen).
        vocab_size: Target vocabulary size including the 5 BERT special tokens.
        lowercase: BERT-uncased normalisation.
        min_frequency: Minimum pair frequency for a merge.

    Raises:
        TokenizerError: if the corpus supports far fewer entries than ``vocab_size`` (the embedding matrix would
            be mostly rows that never occur).
    """
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        min_frequency=min_frequency)
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    got = tok.get_vocab_size()
    if got < 0.9 * vocab_size:
        raise TokenizerError(
            f"the corpus supports only {got} WordPiece entries but vocab_size={vocab_size} was asked for; "
            f"use a larger corpus or --vocab-size {got}")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512, do_lower_case=lowercase)


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id), stable across save/load."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def _batched(texts: Iterable[str], n: int = 1000) -> Iterator[list[str]]:
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
