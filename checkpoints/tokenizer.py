"""WordPiece tokenizer trained with HF ``tokenizers``, wrapped as a ``PreTrainedTokenizerFast``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .errors import MlmscopeError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ASSETS = Path(__file__).parent / "assets" / "tokenizers"
HASHES = "hashes.json"  # {key: tokenizer_hash} of every shipped tokenizer, checked at load


class TokenizerError(MlmscopeError, ValueError):
    """The corpus cannot support the requested tokenizer."""


def train_wordpiece(
    texts: Iterable[str], vocab_size: int = 8192, lowercase: bool = True, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
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
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=min_frequency
    )
    tok.train_from_iterator(_batched(texts), trainer=trainer)
    got = tok.get_vocab_size()
    if got < 0.9 * vocab_size:
        raise TokenizerError(
            f"the corpus supports only {got} WordPiece entries but vocab_size={vocab_size} was asked for; "
            f"use a larger corpus or --vocab-size {got}"
        )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return _wrap(tok, lowercase)


def _wrap(tok: Tokenizer, lowercase: bool) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        do_lower_case=lowercase,
    )


def tokenizer_key(fingerprint: str, vocab_size: int, lowercase: bool) -> str:
    """Name of the tokenizer a (corpus fingerprint, vocab size, casing) gets, shipped or cached."""
    return hashlib.sha256(f"{fingerprint}|{vocab_size}|{lowercase}".encode()).hexdigest()[:16]


def shipped_tokenizer(key: str) -> PreTrainedTokenizerFast | None:
    """The tokenizer shipped with mlmscope for ``key`` (``checkpoints/assets/tokenizers/<key>.json``), or None.

    HF ``tokenizers``' WordPiece trainer breaks frequency ties in hash-map order (huggingface/tokenizers#1794), so
    two trainings on the same corpus give different vocabularies. The default corpus's tokenizers are therefore
    trained once by :func:`ship` and shipped; every machine loads the same file, checked against its recorded hash.

    Raises:
        TokenizerError: the shipped file does not hash to the value recorded beside it (a damaged install).
    """
    path = ASSETS / f"{key}.json"
    if not path.exists():
        return None
    want = json.loads((ASSETS / HASHES).read_text()).get(key)
    tok = _wrap(Tokenizer.from_file(str(path)), lowercase=key_lowercase(path))
    got = tokenizer_hash(tok)
    if got != want:
        raise TokenizerError(
            f"shipped tokenizer {path} hashes to {got[:12]}…, expected {str(want)[:12]}… "
            f"(damaged install: reinstall mlmscope)"
        )
    return tok


def key_lowercase(path: Path) -> bool:
    """Casing of a tokenizer file (its normaliser's ``lowercase`` flag)."""
    norm = json.loads(path.read_text()).get("normalizer") or {}
    return bool(norm.get("lowercase", True))


def store_by_hash(tok: PreTrainedTokenizerFast, root: Path) -> Path:
    """Keep ``tok`` under ``root/sha256/<hash16>/`` (content-addressed; atomic; idempotent) and return the folder."""
    folder = root / "sha256" / tokenizer_hash(tok)[:16]
    if not (folder / "tokenizer.json").exists():
        save_atomic(tok, folder)
    return folder


def save_atomic(tok: PreTrainedTokenizerFast, folder: Path) -> None:
    """``save_pretrained`` into a temporary sibling, then rename: a reader never sees a half-written folder."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    os.replace(tmp, folder)


def load_tokenizer_ref(ref: str, root: Path) -> PreTrainedTokenizerFast:
    """A tokenizer named by path (a folder with ``tokenizer.json``, the file itself, or a run folder) or by the
    hash (≥ 8 hex digits, a prefix of the sha256 recorded in a run's manifest) of one kept in ``root``.

    Raises:
        TokenizerError: nothing found, or an ambiguous hash prefix.
    """
    p = Path(ref)
    for cand in (p, p / "tokenizer.json", p / "tokenizer" / "tokenizer.json"):
        if cand.is_file():
            return (
                PreTrainedTokenizerFast.from_pretrained(str(cand.parent))
                if cand.name == "tokenizer.json" and (cand.parent / "tokenizer_config.json").exists()
                else _wrap(Tokenizer.from_file(str(cand)), key_lowercase(cand))
            )
    if len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref.lower()):
        hits = [h for h in sorted((root / "sha256").glob(f"{ref.lower()[:16]}*")) if (h / "tokenizer.json").exists()]
        if len(hits) == 1:
            return PreTrainedTokenizerFast.from_pretrained(str(hits[0]))
        if len(hits) > 1:
            raise TokenizerError(f"tokenizer hash {ref} is ambiguous ({len(hits)} matches in {root}); give more digits")
    raise TokenizerError(
        f"no tokenizer {ref!r}: not a tokenizer folder/file, and no tokenizer with that hash in "
        f"{root / 'sha256'} (every tokenizer a run trains or uses is kept there)"
    )


def ship(fingerprint: str, texts: Iterable[str], vocab_size: int, lowercase: bool) -> Path:
    """Train the tokenizer for (corpus, vocab size, casing) once and write it into the package's assets.

    Maintainers run this (``python -m mlmscope.checkpoints.tokenizer``) when the default corpus or the trainer changes;
    the result is committed, so users never train the default tokenizer themselves.
    """
    key = tokenizer_key(fingerprint, vocab_size, lowercase)
    tok = train_wordpiece(texts, vocab_size=vocab_size, lowercase=lowercase)
    ASSETS.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(ASSETS / f"{key}.json"))
    hashes_path = ASSETS / HASHES
    hashes = json.loads(hashes_path.read_text()) if hashes_path.exists() else {}
    hashes[key] = tokenizer_hash(tok)
    hashes_path.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    return ASSETS / f"{key}.json"


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


def _ship_defaults() -> None:
    """Ship the tokenizers of the presets' packaged corpora (``wiki``, ``offline``) at their vocabulary sizes."""
    from .config import PRESETS, DataConfig
    from .corpus import load_corpus

    wanted = sorted(
        {
            (
                p.get("data", {}).get("corpus", DataConfig.corpus),
                p.get("data", {}).get("vocab_size", DataConfig.vocab_size),
            )
            for p in PRESETS.values()
        }
    )
    for corpus in sorted({c for c, _ in wanted}):
        dd, fingerprint = load_corpus(DataConfig(corpus=corpus))
        for size in (v for c, v in wanted if c == corpus):
            try:
                print(ship(fingerprint, dd["train"]["text"], size, lowercase=True))
            except TokenizerError as e:
                print(f"{corpus}, vocab {size}: not shipped ({e})")


if __name__ == "__main__":
    _ship_defaults()
