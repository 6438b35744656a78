"""Bad input on the training side (issue 13): nothing finished is lost, every error is one line and exit code 1,
garbage corpora are refused or reported, pathological lines are bounded. Each test fails on the code before it."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mlmscope.checkpoints.config import PRESETS, ConfigError, DataConfig, make_config
from mlmscope.checkpoints.corpus import MAX_DOC_CHARS, MAX_RUN_CHARS, CorpusError, CorpusWarning, load_corpus
from mlmscope.checkpoints.manifest import Manifest, ManifestError
from mlmscope.checkpoints.train import TrainingError, _replaced_path, recover_replaced, train
from mlmscope.checkpoints.verify import verify_run

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlmscope.app.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "400"},
    )


def _one_line_error(r: subprocess.CompletedProcess, message: str) -> None:
    """Exit 1, no traceback, exactly one error message (rich may still wrap it), containing ``message``."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr[-2000:]
    assert message in r.stderr[r.stderr.index("error:") :].replace("\n", " "), r.stderr[-2000:]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_corpus):
    """A finished 4-step micro run (copied by each test that might damage it)."""
    run = tmp_path_factory.mktemp("runs") / "done"
    train(run, make_config("micro", corpus=small_corpus, max_steps=4, linear_every=2), progress=False)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# --- 1. --force never loses a finished run -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "batch_size must be an integer >= 1"),
        (["--seq-len", "128"], "exceeds the model's max_position=64"),
        (["--set", "lr=abc"], "--set lr=abc: expected a number"),
        (["--corpus", "/nonexistent/corpus.txt"], "does not exist"),
        (["--vocab-size", "100000"], "left as it was before --force"),  # fails after the move aside: moved back
    ],
)
def test_force_with_invalid_option_keeps_the_run(finished_run, tmp_path, small_corpus, args, message):
    run = _copy(finished_run, tmp_path)
    before = (run / "manifest.json").read_text()
    r = _cli(
        "train",
        str(run),
        "--preset",
        "micro",
        "--corpus",
        small_corpus,
        "--max-steps",
        "4",
        "--linear-every",
        "2",
        "--no-progress",
        "--force",
        *args,
    )
    _one_line_error(r, message)
    assert (run / "manifest.json").read_text() == before
    assert not _replaced_path(run).exists()
    v = _cli("verify", str(run))
    assert v.returncode == 0 and "all 4 checkpoints verified" in v.stderr, v.stderr


def test_force_replaces_the_run_and_drops_the_old_one(finished_run, tmp_path, small_corpus):
    run = _copy(finished_run, tmp_path)
    m = train(run, make_config("micro", corpus=small_corpus, max_steps=2, linear_every=2), force=True, progress=False)
    assert [c.step for c in m.checkpoints] == [0, 1, 2] and m.run["config"]["train"]["max_steps"] == 2
    assert not _replaced_path(run).exists()
    assert {r.status for r in verify_run(run)} == {"ok"}


def test_force_with_a_run_that_diverges_keeps_the_old_run(finished_run, tmp_path, small_corpus):
    """A valid option that makes the new run fail several checkpoints in (the loss becomes NaN): the old run is
    kept until the new one finishes, so it comes back intact."""
    run = _copy(finished_run, tmp_path)
    before = (run / "manifest.json").read_text()
    r = _cli(
        "train",
        str(run),
        "--preset",
        "micro",
        "--corpus",
        small_corpus,
        "--max-steps",
        "40",
        "--linear-every",
        "2",
        "--lr",
        "1e9",
        "--set",
        "grad_clip=1e9",
        "--no-progress",
        "--force",
    )
    _one_line_error(r, "left as it was before --force")
    assert (run / "manifest.json").read_text() == before and not _replaced_path(run).exists()
    assert {v.status for v in verify_run(run)} == {"ok"}


def test_force_failure_before_first_checkpoint_is_undone(finished_run, tmp_path, small_corpus, monkeypatch):
    """A failure (or a kill) after the move aside: recover_replaced, or the next train() on the folder, moves the
    old run back."""
    import mlmscope.checkpoints.train as tr

    run = _copy(finished_run, tmp_path)
    before = (run / "manifest.json").read_text()

    def boom(*a, **k):
        raise TrainingError("simulated failure before the first checkpoint")

    monkeypatch.setattr(tr, "_build_model", boom)
    with pytest.raises(TrainingError, match="simulated"):
        train(run, make_config("micro", corpus=small_corpus, max_steps=2, linear_every=2), force=True, progress=False)
    assert _replaced_path(run).exists()  # what a kill -9 at this moment leaves
    assert recover_replaced(run) is True
    assert (run / "manifest.json").read_text() == before and not _replaced_path(run).exists()
    # The same left behind again is recovered by the next train() call on the folder, before anything else: here
    # one without --force, refused because the restored finished run is in the way.
    with pytest.raises(TrainingError, match="simulated"):
        train(run, make_config("micro", corpus=small_corpus, max_steps=2, linear_every=2), force=True, progress=False)
    monkeypatch.undo()
    with pytest.raises(TrainingError, match="already exists|different config"):
        train(run, make_config("micro", corpus=small_corpus, max_steps=2, linear_every=2), progress=False)
    assert (run / "manifest.json").read_text() == before and not _replaced_path(run).exists()


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path, small_corpus):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(TrainingError, match="not an mlmscope run folder"):
        train(folder, make_config("micro", corpus=small_corpus, max_steps=2), force=True, progress=False)
    assert (folder / "thesis.tex").read_text() == "precious"


# --- 2. invalid combinations: one user-facing line, not a library error ------------------------------------------


def test_validate_lists_every_problem():
    cfg = make_config(
        "micro", seq_len=128, batch_size=0, mask_rate=1.5, lr=-1.0, n_heads=3, warmup_steps=-1, init_std=0.0
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    for part in (
        "init_std must be a number > 0, got 0.0",
        "batch_size must be",
        "mask_rate must be",
        "lr must be",
        "warmup_steps must be",
        "seq_len=128 exceeds the model's max_position=64",
        "d_model=64 is not divisible by n_heads=3",
    ):
        assert part in msg
    assert "\n" not in msg
    for preset in PRESETS:
        make_config(preset).validate()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "128"], "seq_len=128 exceeds the model's max_position=64"),
        (["--batch-size", "0", "--mask-rate", "0"], "batch_size must be an integer >= 1, got 0; mask_rate must be"),
        (["--set", "lr=abc"], "--set lr=abc: expected a number"),
        (["--set", "betas=x"], "--set betas=x: expected 2 comma-separated numbers"),
        (["--lr", "1e-3", "--set", "lr=2e-3"], "lr is given twice with different values"),
    ],
)
def test_invalid_options_are_one_line_errors(tmp_path, small_corpus, args, message):
    r = _cli("train", str(tmp_path / "run"), "--preset", "micro", "--corpus", small_corpus, "--no-progress", *args)
    _one_line_error(r, message)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: c._parse_set(["max_steps=1.5"]), "--set max_steps=1.5: expected an integer"),
        (lambda c: c._parse_set(["no_such_field=1"]), "unknown config field 'no_such_field'"),
        (lambda c: c._parse_set(["lr"]), "--set expects key=value"),
        (lambda c: c._parse_set(["compile=maybe"]), "expected true or false"),
        (lambda c: c._merge_overrides({"sas_lam": 0.1}, {"sas_lam": 0.2}), "--sas-lam 0.1 and --set sas_lam=0.2"),
        (lambda c: c._int_list("0,x", "--seeds"), "--seeds: expected comma-separated integers"),
        (
            lambda c: make_config("micro", lr=float("nan"), grad_accum=0, betas=(0.9, 1.5)).validate(),
            "grad_accum must be an integer >= 1, got 0; lr must be a finite number >= 0, got nan; betas must be",
        ),
    ],
)
def test_option_parsing_errors_are_user_errors(call, message):
    import mlmscope.app.cli as c

    with pytest.raises((c.UserError, ConfigError), match=message.replace("(", r"\(").replace(")", r"\)")):
        call(c)


def test_set_values_are_cast_to_the_declared_type():
    from mlmscope.app.cli import _merge_overrides, _parse_set

    sets = _parse_set(
        [
            "lr=1e-3",
            "max-steps=7",
            "betas=0.9,0.99",
            "steps=0,3,7",
            "compile=false",
            "sas_release_step=none",
            "corpus=my.txt",
        ]
    )
    assert sets == {
        "lr": 1e-3,
        "max_steps": 7,
        "betas": (0.9, 0.99),
        "steps": [0, 3, 7],
        "compile": False,
        "sas_release_step": None,
        "corpus": "my.txt",
    }
    merged = _merge_overrides({"lr": 1e-3, "seq_len": None}, sets)  # the same value twice is fine
    cfg = make_config("micro", **merged)
    cfg.validate()
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.betas) == (1e-3, 7, (0.9, 0.99))


def _train_params(*args: str) -> dict:
    """What `mlmscope train RUN *args` parses into, without running it."""
    import typer

    import mlmscope.app.cli as c

    return typer.main.get_command(c.app).commands["train"].make_context("train", ["run", *args]).params


def test_every_config_field_is_a_generated_option():
    """`train` has one option per RunConfig field, named, typed and documented by the dataclass field; an option not
    given is None (the preset's value)."""
    from mlmscope.checkpoints.config import config_fields

    params = _train_params()
    assert set(config_fields()) <= set(params) and all(params[k] is None for k in config_fields())
    assert "sas_lambda" not in params and "vocab_size" in params and "sas_lam" in params
    got = _train_params(
        "--betas",
        "0.9,0.99",
        "--steps",
        "0,5",
        "--no-lowercase",
        "--sas-lam",
        "0.1",
        "--mask-replace",
        "mask",
        "--precision",
        "bf16",
        "--n-layers",
        "3",
    )
    assert {k: v for k, v in got.items() if k in config_fields() and v is not None} == {
        "betas": (0.9, 0.99),
        "steps": [0, 5],
        "lowercase": False,
        "sas_lam": 0.1,
        "mask_replace": "mask",
        "precision": "bf16",
        "n_layers": 3,
    }
    help_text = _cli("train", "--help").stdout
    for key, f in config_fields().items():
        assert f.help, key
        assert "--" + key.replace("_", "-") in help_text
    assert "auto|fp32|bf16" in help_text and "80/10/10|mask" in help_text and "|".join(PRESETS) in help_text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--precision", "fp8"], "'fp8' is not one of 'auto', 'fp32', 'bf16'"),
        (["--mask-replace", "90/5/5"], "'90/5/5' is not one of '80/10/10', 'mask'"),
        (["--preset", "huge"], "'huge' is not one of 'micro', 'demo'"),
        (["--betas", "0.9"], "expected 2 comma-separated numbers"),
    ],
)
def test_closed_sets_and_lists_are_checked_by_the_command_line(tmp_path, args, message):
    r = _cli("train", str(tmp_path / "run"), "--preset", "micro", "--no-progress", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert message in r.stderr.replace("\n", " "), r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_set_works_for_fields_with_an_option_and_threads_are_recorded(tmp_path, small_corpus):
    run = tmp_path / "run"
    r = _cli(
        "train",
        str(run),
        "--preset",
        "micro",
        "--corpus",
        small_corpus,
        "--no-progress",
        "--threads",
        "1",
        "--set",
        "lr=1e-3",
        "--set",
        "max_steps=2",
        "--max-steps",
        "2",
        "--set",
        "betas=0.9,0.99",
        "--set",
        "linear-every=2",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = Manifest.load(run)
    assert m.run["threads"] == 1
    t = m.run["config"]["train"]
    assert (t["lr"], t["max_steps"], t["betas"], t["linear_every"]) == (1e-3, 2, [0.9, 0.99], 2)


def test_truncated_manifest_is_named(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    text = (run / "manifest.json").read_text()
    (run / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match="manifest.json is truncated or damaged"):
        Manifest.load(run)
    _one_line_error(_cli("verify", str(run)), f"{run / 'manifest.json'} is truncated or damaged")


def test_verify_with_no_checkpoints_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(_cli("verify", str(tmp_path / "empty")), "no checkpoints in")


# --- 3. garbage corpora: refused, or a warning with a count ------------------------------------------------------


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLMSCOPE_CACHE", str(tmp_path / "cache"))


def _docs(n: int = 60) -> list[str]:
    return [f"document {i} says that the river {i % 7} flows into the lake near town {i % 5} ." for i in range(n)]


def test_random_bytes_corpus_is_refused(tmp_path, cache):
    rng = random.Random(0)
    (tmp_path / "noise.txt").write_bytes(bytes(rng.getrandbits(8) for _ in range(100_000)))
    with pytest.raises(CorpusError, match="does not look like text: .* undecodable bytes or control characters"):
        load_corpus(DataConfig(corpus=str(tmp_path / "noise.txt")))
    # The same through the CLI: one line, exit 1, before any run folder exists.
    r = _cli(
        "train", str(tmp_path / "run"), "--preset", "micro", "--corpus", str(tmp_path / "noise.txt"), "--no-progress"
    )
    _one_line_error(r, "does not look like text")
    assert not (tmp_path / "run").exists()


def test_mostly_undecodable_corpus_is_refused_and_a_minority_is_counted(tmp_path, cache):
    docs = _docs()
    mostly = "\n\n".join("\ufffd" * 80 + d[:20] for d in docs)
    (tmp_path / "mostly.txt").write_text(mostly)
    with pytest.raises(CorpusError, match="does not look like text"):
        load_corpus(DataConfig(corpus=str(tmp_path / "mostly.txt")))
    raw = "\n\n".join(docs).encode() + b"\n\ncaf\xe9 cr\xe8me in latin-1 ."  # 2 undecodable bytes
    (tmp_path / "some.txt").write_bytes(raw)
    with pytest.warns(CorpusWarning, match=r"corpus .*some.txt: 2 undecodable or control characters .* in 1 of 61"):
        load_corpus(DataConfig(corpus=str(tmp_path / "some.txt")))
    # A .jsonl with a stray byte no longer stops with a raw UnicodeDecodeError.
    lines = [json.dumps({"text": d}).encode() for d in docs] + [b'{"text": "x\xff"}']
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines))
    with pytest.warns(CorpusWarning, match="1 undecodable"):
        dd, _ = load_corpus(DataConfig(corpus=str(tmp_path / "c.jsonl")))
    assert len(dd["train"]) + len(dd["validation"]) == 61


def test_utf16_with_bom_is_read_as_text(tmp_path, cache):
    (tmp_path / "u16.txt").write_text("\n\n".join(_docs()), encoding="utf-16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorpusWarning)
        dd, _ = load_corpus(DataConfig(corpus=str(tmp_path / "u16.txt")))
    assert len(dd["train"]) + len(dd["validation"]) == 60


# --- 4. one enormous line: bounded, with a warning ----------------------------------------------------------------


def test_enormous_unbroken_line_is_bounded(tmp_path, cache):
    docs = _docs()
    rng = random.Random(0)
    blob = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1_000_000))
    spaced = " ".join(docs) * 300  # ~1.4 M characters of ordinary words in one line
    (tmp_path / "c.txt").write_text("\n\n".join([*docs, blob, spaced]))
    with pytest.warns(
        CorpusWarning,
        match=r"1 unbroken run\(s\) longer than 1,000 .* 2 document\(s\) longer than "
        r"100,000 characters were split",
    ):
        dd, _ = load_corpus(DataConfig(corpus=str(tmp_path / "c.txt")))
    texts = list(dd["train"]["text"]) + list(dd["validation"]["text"])
    assert max(len(t) for t in texts) <= MAX_DOC_CHARS
    assert max(len(w) for t in texts for w in t.split()) <= MAX_RUN_CHARS
    assert sum(len(t.replace(" ", "")) for t in texts) == sum(len(d.replace(" ", "")) for d in [*docs, blob, spaced])
    # Ordinary corpora are untouched: the default corpus's documents (and so its fingerprint) do not change.
    from mlmscope.checkpoints.corpus import _wiki_texts

    wiki = _wiki_texts()
    assert max(len(t) for t in wiki) <= MAX_DOC_CHARS
    assert max(len(w) for t in wiki for w in t.split()) <= MAX_RUN_CHARS


def test_a_run_saved_before_a_field_existed_differs_only_where_settings_differ(finished_run, tmp_path, small_corpus):
    """An older manifest lacks fields added later (here data.tokenizer): refusing to overwrite it names only the
    setting that really differs."""
    import json as _json

    from mlmscope.checkpoints.config import RunConfig

    run = _copy(finished_run, tmp_path)
    m = _json.loads((run / "manifest.json").read_text())
    m["run"]["config"]["data"].pop("tokenizer", None)
    m["run"]["config"]["model"]["vocab_size"] = 1024  # a field older versions saved: a copy of data.vocab_size
    m["run"]["config"]["sas_reg"]["root_to_cls"] = False  # the default before; with λ = 0 it changes nothing
    (run / "manifest.json").write_text(_json.dumps(m))
    with pytest.raises(TrainingError) as e:
        train(run, make_config("micro", corpus=small_corpus, max_steps=5, linear_every=2), progress=False)
    assert "train.max_steps: 4 -> 5" in str(e.value) and "tokenizer" not in str(e.value)
    assert "vocab_size" not in str(e.value) and "root_to_cls" not in str(e.value)
    old = RunConfig.from_dict(m["run"]["config"])  # what --resume reads
    assert old == make_config("micro", corpus=small_corpus, max_steps=4, linear_every=2, sas_root_to_cls=False)
    with pytest.raises(TrainingError, match="already exists; use --resume"):  # the same settings: nothing differs
        train(run, make_config("micro", corpus=small_corpus, max_steps=4, linear_every=2), progress=False)
    with pytest.raises(TrainingError, match=r"sas_reg.lam: 0.0 -> 0.01"):  # with λ ≠ 0 the settings count again
        train(run, make_config("micro", corpus=small_corpus, max_steps=4, linear_every=2, sas_lam=0.01), progress=False)
