"""Garbage is never accepted silently on the analysis side: dependency cycles are refused (naming the sentence);
sentences dropped from a probe set (empty, too long) and text in a script the tokenizer cannot represent are
analysed with a visible warning and a count, or refused when nothing usable is left."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mlmscope.analyses.runner import Runner, RunnerConfig, RunnerError
from mlmscope.probes.fit import MOSTLY_UNK_SHARE, fit_report
from mlmscope.probes.probeset import ProbeSetError, find_cycle, load_probe_set, sentences_of
from test_runner import PROBES, FakeNorm, make_run
from test_single_model import _one_error_line, cli  # noqa: F401 - the CLI fixture

#: Words of a script the micro fixtures' WordPiece vocabulary (trained on English text) has never seen: [UNK].
UNSEEN = ["Ж", "щ", "Ю", "ф", "Ц"]


def _conllu(rows: list[tuple[str, int]], sent_id: str = "s1", text: str = "") -> str:
    lines = [f"# sent_id = {sent_id}"] + ([f"# text = {text}"] if text else [])
    lines += [f"{i}\t{w}\t_\t_\t_\t_\t{h}\tdep\t_\t_" for i, (w, h) in enumerate(rows, 1)]
    return "\n".join(lines) + "\n\n"


GOOD = _conllu([("the", 2), ("cat", 3), ("sat", 0)], "ok", "the cat sat")


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("bad_probes") / "run", steps=(0,))


# --- dependency cycles -------------------------------------------------------------------------------------------
def test_find_cycle():
    assert find_cycle([2, 0, 2]) is None
    assert find_cycle([2, 3, 1]) == [1, 2, 3, 1]
    assert find_cycle([0, 2]) == [2, 2]  # a word that is its own head
    assert find_cycle([0, 3, 2, 3]) == [2, 3, 2]
    assert find_cycle([]) is None


def test_cycle_in_a_user_conllu_is_refused_naming_the_sentence(tmp_path):
    f = tmp_path / "cyc.conllu"
    f.write_text(GOOD + _conllu([("dogs", 2), ("bark", 3), ("loudly", 2)], "weird-7", "dogs bark loudly"))
    with pytest.raises(
        ProbeSetError,
        match=r"dependency cycle in sentence 'weird-7' \('dogs bark loudly'\): "
        r"words 2 -> 3 -> 2",
    ) as e:
        load_probe_set(f)
    assert "cyc.conllu:" in str(e.value)
    f.write_text(GOOD.replace("# sent_id = ok\n", "") + GOOD.replace("3\tsat\t_\t_\t_\t_\t0", "3\tsat\t_\t_\t_\t_\t3"))
    with pytest.raises(ProbeSetError, match="dependency cycle in sentence 'ok'.*words 3 -> 3"):
        load_probe_set(f)


def test_cli_refuses_a_cyclic_probe_set_in_one_line(cli, run1, tmp_path):  # noqa: F811 - the `cli` fixture imported above
    f = tmp_path / "cyc.conllu"
    f.write_text(_conllu([("a", 2), ("b", 1)], "loop"))
    res = cli("analyze", run1, "-a", "_t_norm", "--probes", f)
    assert res.exit_code == 1
    assert "dependency cycle in sentence 'loop'" in _one_error_line(res.output)


# --- dropped sentences --------------------------------------------------------------------------------------------
def test_dropped_sentences_are_warned_with_counts(cli, run1, tmp_path):  # noqa: F811 - the `cli` fixture imported above
    long = " ".join(["word"] * 80)
    rows = [(w, 0 if i == 0 else 1) for i, w in enumerate(long.split())]
    f = tmp_path / "mixed.conllu"
    f.write_text(GOOD + "# sent_id = empty\n# text = \n\n" + _conllu(rows, "long"))
    ps = load_probe_set(f)
    assert len(ps) == 2 and ps.meta["dropped_at_load"] == {"empty": 1}
    res = cli("analyze", run1, "-a", "_t_norm", "--probes", f)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "warning: 1 sentence(s) of the probe file were dropped when it was read (empty: 1)" in out
    assert "warning: 1 of 2 probe sentences are skipped" in out and "too long: 1" in out
    assert "the analyses use the other 1" in out


def test_empty_word_lists_are_skipped_and_counted(run1):
    r = Runner(
        run1, RunnerConfig(batch_size=2, force=True), probe_set=sentences_of(PROBES + [[]]), analyses=[FakeNorm()]
    )
    warnings = r.check_probe_fit(r.probe_set())
    assert any("1 of 4 probe sentences are skipped" in w and "empty: 1" in w for w in warnings), warnings


def test_no_usable_sentence_is_refused(run1):
    r = Runner(run1, RunnerConfig(), probe_set=sentences_of([["word"] * 200]), analyses=[FakeNorm()])
    with pytest.raises(RunnerError, match="no probe sentence fits"):
        r.run()


# --- text the tokenizer cannot represent ---------------------------------------------------------------------------
def test_fit_report_counts_mostly_unk_sentences(micro_model_dir):
    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    assert tok.convert_tokens_to_ids(tok.tokenize(UNSEEN[0])) == [tok.unk_token_id]
    half = ["the", "cat"] + UNSEEN[:2]  # exactly half unknown: not "mostly"
    most = ["the"] + UNSEEN[:3]
    rep = fit_report(tok, sentences_of([half, most, PROBES[0]]), 512)
    assert (rep.kept, rep.mostly_unk, rep.unk_words, rep.n_words) == (3, 1, 5, 14)
    assert MOSTLY_UNK_SHARE == 0.5 and rep.refusal() is None
    (w,) = rep.warnings()
    assert "1 of 3 probe sentences are mostly [UNK]" in w and "5 of 14 words" in w


def test_cli_warns_on_some_and_refuses_all_unk(cli, run1, tmp_path):  # noqa: F811 - the `cli` fixture imported above
    some = sentences_of([UNSEEN, PROBES[0], PROBES[1]]).save(tmp_path / "some")
    res = cli("analyze", run1, "-a", "_t_norm", "--probes", some)
    assert res.exit_code == 0, res.output
    assert "warning: 1 of 3 probe sentences are mostly [UNK]" in " ".join(res.output.split())
    allunk = sentences_of([UNSEEN, UNSEEN[::-1]]).save(tmp_path / "all")
    res = cli("analyze", run1, "-a", "_t_norm", "--probes", allunk)
    assert res.exit_code == 1
    assert "every usable probe sentence (2) is mostly [UNK]" in _one_error_line(res.output)
