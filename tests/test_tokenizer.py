"""The shipped default tokenizers and reuse of a tokenizer by hash (issue: same command, same trajectory)."""

from __future__ import annotations

import json
import shutil

import pytest

from mlmscope.checkpoints import tokenizer as tk
from mlmscope.checkpoints.config import PRESETS, DataConfig, make_config
from mlmscope.checkpoints.corpus import load_corpus
from mlmscope.checkpoints.manifest import Manifest
from mlmscope.checkpoints.train import train


@pytest.mark.parametrize(
    "path", [p for p in sorted(tk.ASSETS.glob("*.json")) if p.name != tk.HASHES], ids=lambda p: p.stem
)
def test_every_shipped_tokenizer_matches_its_recorded_hash(path):
    tok = tk.shipped_tokenizer(path.stem)
    assert tok is not None
    assert tk.tokenizer_hash(tok) == json.loads((tk.ASSETS / tk.HASHES).read_text())[path.stem]
    assert tok.mask_token == "[MASK]" and tok("The cat")["input_ids"][0] == tok.cls_token_id


def test_the_default_corpus_tokenizers_are_shipped():
    """Every preset on the default corpus loads a shipped tokenizer, so no machine trains its own."""
    _, fingerprint = load_corpus(DataConfig())
    for preset in (p for p in PRESETS if make_config(p).data.corpus == "wiki"):
        d = make_config(preset).data
        key = tk.tokenizer_key(fingerprint, d.vocab_size, d.lowercase)
        tok = tk.shipped_tokenizer(key)
        assert tok is not None, f"{preset}: no shipped tokenizer {key}"
        assert len(tok) == d.vocab_size


def test_a_damaged_shipped_tokenizer_is_refused(tmp_path, monkeypatch):
    src = next(p for p in sorted(tk.ASSETS.glob("*.json")) if p.name != tk.HASHES)
    shutil.copy(tk.ASSETS / tk.HASHES, tmp_path / tk.HASHES)
    data = json.loads(src.read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, different tokenizer
    (tmp_path / src.name).write_text(json.dumps(data))
    monkeypatch.setattr(tk, "ASSETS", tmp_path)
    with pytest.raises(tk.TokenizerError, match="damaged install"):
        tk.shipped_tokenizer(src.stem)


def test_a_run_reuses_a_tokenizer_by_the_hash_its_manifest_records(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setenv("MLMSCOPE_CACHE", str(tmp_path / "cache"))
    cfg = make_config("micro", corpus=small_corpus, max_steps=2, steps=[0, 2])
    first = train(tmp_path / "a", cfg, progress=False).run
    assert first["tokenizer_source"] == "trained"
    other = make_config(
        "micro", corpus=small_corpus, max_steps=2, steps=[0, 2], tokenizer=first["tokenizer_sha256"][:10]
    )
    second = train(tmp_path / "b", other, progress=False).run
    assert second["tokenizer_sha256"] == first["tokenizer_sha256"]
    assert second["tokenizer_source"].startswith("given")
    assert Manifest.load(tmp_path / "b").run["config"]["data"]["tokenizer"] == first["tokenizer_sha256"][:10]


def test_an_unknown_tokenizer_reference_is_one_clear_error(tmp_path):
    with pytest.raises(tk.TokenizerError, match="no tokenizer 'deadbeefdeadbeef'"):
        tk.load_tokenizer_ref("deadbeefdeadbeef", tmp_path)


def test_the_offline_corpus_tokenizer_of_the_syntax_preset_is_shipped():
    """The syntax preset's (offline corpus, 8,192) tokenizer is shipped under the key of the corpus's fingerprint,
    checked where the sources are downloaded (`mlmscope corpus fetch`)."""
    from mlmscope.checkpoints import offline

    d = make_config("syntax").data
    assert d.corpus == "offline"
    if offline.missing():
        pytest.skip("offline corpus sources not downloaded (mlmscope corpus fetch)")
    _, fingerprint = load_corpus(d)
    tok = tk.shipped_tokenizer(tk.tokenizer_key(fingerprint, d.vocab_size, d.lowercase))
    assert tok is not None and len(tok) == d.vocab_size
