"""Dashboard tests with streamlit.testing's AppTest on a trained and analysed micro trajectory.

The fixture run (``app.bench.build_micro_run``: micro preset, 30 steps, checkpoints 0,1,2,4,8,10,20,30, every
registered analysis on 15 parsed probe sentences) is built once per session and shared with tests/test_browser.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlmscope.app.bench import ensure_micro_run
from mlmscope.app.views import PAGES

DASHBOARD = str(Path(__file__).resolve().parents[1] / "app" / "dashboard.py")
LAST, EARLY = 30, 4


@pytest.fixture(scope="session")
def micro_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "dashboard_fixture"
    root.mkdir(exist_ok=True)
    ensure_micro_run(root)
    return root


@pytest.fixture(scope="session")
def analysed(micro_root) -> Path:
    return micro_root / "micro"


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(run: Path, edit) -> None:
    m = json.loads((run / "manifest.json").read_text())
    edit(m)
    (run / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="session")
def group(analysed, micro_root) -> Path:
    """Two seeds of one group: seed_1 = seed_0 with every validation loss raised by 0.5."""
    g = micro_root / "group"
    _copy(analysed, g / "seed_0")
    _copy(analysed, g / "seed_1")

    def shift(m):
        for c in m["checkpoints"]:
            c["val_loss"] += 0.5

    _edit_manifest(g / "seed_1", shift)
    return g


@pytest.fixture(scope="session")
def half(analysed, micro_root) -> Path:
    """Training still running (6 of 8 checkpoints written) and mask_rank not analysed yet."""
    run = _copy(analysed, micro_root / "half")

    def cut(m):
        m["run"]["status"] = "training"
        m["checkpoints"] = m["checkpoints"][:6]

    _edit_manifest(run, cut)
    for step in (20, 30):
        shutil.rmtree(run / f"step_{step:06d}")
    shutil.rmtree(run / "results" / "mask_rank")
    (run / "results" / "index.json").unlink()  # rebuilt from the folders on the next read
    return run


@pytest.fixture(scope="session")
def failed(analysed, micro_root) -> Path:
    """Step 10's weights were damaged after training; the runner refused it for `sas` and recorded the failure."""
    from mlmscope.analyses.runner import Runner, RunnerConfig
    from mlmscope.analyses.store import ResultStore

    run = _copy(analysed, micro_root / "failed")
    m = json.loads((run / "manifest.json").read_text())
    sha = next(c["sha256"] for c in m["checkpoints"] if c["step"] == 10)
    store = ResultStore(run)
    for rec in store.entries("sas"):
        if rec["ckpt_hash"] == sha:
            shutil.rmtree(store.root / "sas" / rec["dirname"])
    weights = run / "step_000010" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2 : len(blob) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(blob))
    summary = Runner(run, RunnerConfig(analyses=["sas"], batch_size=8)).run()
    assert summary.failed == 1
    return run


def _app(monkeypatch, *runs: Path, page: str | None = None):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MLMSCOPE_RUNS", os.pathsep.join(str(r) for r in runs))
    at = AppTest.from_file(DASHBOARD, default_timeout=180)
    at.run()
    if page is not None:
        at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _metrics(at) -> list[str]:
    return [m.value for m in at.metric]


def _figures(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def _arr(v) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array ``{"dtype": "f8", "bdata": base64}`` (plotly >= 6)."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        shape = [int(n) for n in str(v.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).reshape(shape)
    return np.asarray(v)


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


# --- every page, the slider -------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_and_follows_the_slider(monkeypatch, analysed, page):
    at = _app(monkeypatch, analysed, page=page)
    assert at.select_slider(key="step").value == LAST
    before = _metrics(at)
    assert before and not at.error, _texts(at.error)
    at.select_slider(key="step").set_value(EARLY).run()
    assert not at.exception, [e.value for e in at.exception]
    after = _metrics(at)
    assert after != before, f"{page}: metrics did not change with the step ({before})"
    if page != "live":  # every figure's data is downloadable
        assert len(at.get("download_button")) >= len(at.get("plotly_chart")) > 0


def test_displayed_values_are_the_stored_ones(monkeypatch, analysed):
    from mlmscope.analyses.store import load_results
    from mlmscope.checkpoints.manifest import Manifest

    at = _app(monkeypatch, analysed)
    at.select_slider(key="step").set_value(8).run()
    val = next(c.val_loss for c in Manifest.load(analysed).checkpoints if c.step == 8)
    assert at.metric[1].label == "validation loss" and at.metric[1].value == f"{val:.4g}"
    at.sidebar.radio(key="page").set_value("syntax").run()
    summary = load_results(analysed, "sas", "summary").set_index("step")
    assert at.metric[0].value == f"{summary.loc[8, 'sas_score']:.4g}"
    assert at.metric[1].value == (f"L{summary.loc[8, 'layer']} H{summary.loc[8, 'head']} {summary.loc[8, 'direction']}")


@pytest.mark.parametrize("log_x", [False, True])
def test_selected_step_is_marked_on_every_curve(monkeypatch, analysed, log_x):
    at = _app(monkeypatch, analysed)
    at.sidebar.toggle(key="log_x").set_value(log_x).run()
    at.select_slider(key="step").set_value(EARLY).run()
    n_curves = 0
    for page in ("overview", "syntax", "mask_rank", "outliers", "redundancy"):
        at.sidebar.radio(key="page").set_value(page).run()
        for fig in _figures(at):
            xaxis = fig["layout"].get("xaxis", {})
            if xaxis.get("title", {}).get("text") not in ("step", "step + 1"):
                continue  # a heatmap or a per-layer plot at the step
            n_curves += 1
            assert xaxis["type"] == ("log" if log_x else "linear")
            marks = [s["x0"] for s in fig["layout"].get("shapes", []) if s["type"] == "line"]
            assert (EARLY + 1 if log_x else EARLY) in marks, (page, fig["layout"].get("title"))
    assert n_curves >= 10


def test_seed_group_is_mean_with_band(monkeypatch, group):
    from mlmscope.checkpoints.manifest import Manifest

    at = _app(monkeypatch, group)
    label = f"{group} (mean of 2 seeds)"
    assert label in at.sidebar.multiselect(key="runs").options
    at.sidebar.multiselect(key="runs").set_value([label]).run()
    assert at.sidebar.selectbox(key="focus").options == [str(group / "seed_0"), str(group / "seed_1")]
    loss = next(f for f in _figures(at) if f["layout"]["title"]["text"] == "Loss over training")
    line = next(t for t in loss["data"] if t.get("name") == f"{label} · validation")
    per_seed = [
        pd.Series({c.step: c.val_loss for c in Manifest.load(group / s).checkpoints}) for s in ("seed_0", "seed_1")
    ]
    expected = (per_seed[0] + per_seed[1]) / 2
    np.testing.assert_allclose(_arr(line["y"]), expected.sort_index().to_numpy(), rtol=1e-9)
    band = [t for t in loss["data"] if t.get("fill") == "toself"]
    assert band, "a seed group must be drawn with a band"
    y = _arr(band[0]["y"])
    half_width = (y[:8] - y[8:][::-1]) / 2
    np.testing.assert_allclose(half_width, np.std([0, 0.5], ddof=1), rtol=1e-6)  # 1 sd of two seeds 0.5 apart


# --- live panels -----------------------------------------------------------------------------------------------------


def test_lens_topk_matches_the_model(monkeypatch, analysed):
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    at = _app(monkeypatch, analysed, page="lens")
    at.select_slider(key="step").set_value(20).run()
    at.toggle(key="lens_live").set_value(True).run()
    at.selectbox(key="lens_word").set_value(1).run()
    assert not at.exception, [e.value for e in at.exception]
    (table,) = at.dataframe  # the only dataframe on the lens page
    top = table.value
    final = top[(top["lens"] == "logit") & (top["depth"] == top["depth"].max())].iloc[0]
    # the same sentence and mask through plain transformers
    path = analysed / "step_000020"
    tok = AutoTokenizer.from_pretrained(path)
    model = BertForMaskedLM.from_pretrained(path).eval()
    from mlmscope.app.views.data import probe_sentences

    words = probe_sentences(str(analysed))["words"].iloc[0]
    masked = [tok.mask_token if i == 1 else w for i, w in enumerate(words)]
    enc = tok([masked], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits[0, enc["input_ids"][0] == tok.mask_token_id].softmax(-1)[0]
    p, i = probs.max(-1)
    assert final["top 1"] == f"{tok.convert_ids_to_tokens(int(i))} ({float(p):.3f})"
    assert set(top["lens"]) == {"logit", "tuned"}  # the stored tuned-lens translators are used


def test_attention_viewer_draws_gold_arcs(monkeypatch, analysed):
    at = _app(monkeypatch, analysed, page="syntax")
    at.toggle(key="syntax_live").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    fig = next(f for f in _figures(at) if "Word-level attention" in f["layout"]["title"]["text"])
    from mlmscope.app.views.data import probe_sentences

    row = probe_sentences(str(analysed)).iloc[0]
    att = _arr(fig["data"][0]["z"])
    assert att.shape == (len(row["words"]),) * 2
    np.testing.assert_array_less(att, 1 + 1e-5)  # mean over from-pieces of summed probabilities: rows sum <= 1
    arcs = fig["data"][1]
    assert len(_arr(arcs["x"])) == sum(h > 0 for h in row["heads"])


def test_live_sentence_page(monkeypatch, analysed):
    at = _app(monkeypatch, analysed, page="live")
    assert at.metric[0].value == str(LAST) and "[MASK] 1" in at.metric[1].label
    at.text_input(key="live_text").set_value("no mask here").run()
    assert "no [MASK] in the sentence" in _texts(at.warning) and not at.exception


# --- run states ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_empty_run_shows_a_message_on_every_page(monkeypatch, tmp_path, page):
    empty = tmp_path / "empty"
    empty.mkdir()
    at = _app(monkeypatch, empty, page=page)
    assert "no finished checkpoints" in _texts(at.warning) + _texts(at.info)
    assert not at.exception


def test_half_finished_run(monkeypatch, half):
    at = _app(monkeypatch, half)
    assert "still running" in _texts(at.info)
    assert at.select_slider(key="step").options[-1] == "10"
    at.sidebar.radio(key="page").set_value("mask_rank").run()
    assert f"No `mask_rank` results for `{half}` yet" in _texts(at.info) and not at.exception
    at.sidebar.radio(key="page").set_value("syntax").run()
    assert at.metric and not at.exception


def test_failed_checkpoint(monkeypatch, failed):
    at = _app(monkeypatch, failed)
    warnings = _texts(at.warning)
    assert "failed verification" in warnings and "step 10: mismatch" in warnings
    at.sidebar.radio(key="page").set_value("syntax").run()
    assert "step 10 (`step_000010`" in _texts(at.warning)
    at.select_slider(key="step").set_value(10).run()
    assert "Step 10 has no `sas` result (it failed" in _texts(at.caption) and "showing step 8" in _texts(at.caption)
    assert not at.exception


def test_missing_folder_and_serve_errors(monkeypatch, tmp_path, analysed):
    import socket

    import typer
    from typer.testing import CliRunner

    from mlmscope.app.serve import DashboardError, app_command, check_port, serve

    at = _app(monkeypatch, tmp_path / "nope", analysed)
    assert "does not exist" in _texts(at.sidebar.error) and at.metric
    with pytest.raises(DashboardError, match="not found: .*nope"):
        serve([tmp_path / "nope"], port=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(DashboardError, match="cannot listen on 127.0.0.1"):
            check_port("127.0.0.1", s.getsockname()[1])
    cli = typer.Typer()
    cli.command("app")(app_command)
    cli.command("other")(lambda: None)
    res = CliRunner().invoke(cli, ["app", str(tmp_path / "nope")])
    assert isinstance(res.exception, DashboardError) and "not found" in str(res.exception)


def test_discovers_runs_and_seed_groups(analysed, group, tmp_path):
    from mlmscope.app.views.data import discover_sources

    sources, problems = discover_sources([str(group.parent), str(tmp_path / "missing")])
    labels = [s.label for s in sources]
    assert f"{group} (mean of 2 seeds)" in labels and str(analysed) in labels
    assert next(s for s in sources if s.is_group).runs == (str(group / "seed_0"), str(group / "seed_1"))
    assert problems == [f"run folder {str(tmp_path / 'missing')!r} does not exist"]


# --- benchmark -------------------------------------------------------------------------------------------------------


def test_benchmark_store_and_timing(analysed, tmp_path, monkeypatch):
    from mlmscope.analyses.store import load_results
    from mlmscope.app.bench import bench_pages, bench_steps, synthesize_store

    store = synthesize_store(analysed, tmp_path / "bench", n=20)
    steps = bench_steps(20)
    assert sorted(load_results(store, "sas", "summary")["step"]) == steps
    assert set(load_results(store, "redundancy", "cka")["step"]) == set(steps)
    monkeypatch.setenv("MLMSCOPE_RUNS", str(store))
    times = bench_pages(store, moves=2, pages=("syntax", "lens"))
    assert set(times) == {"syntax", "lens"} and all(len(t) == 2 and min(t) > 0 for t in times.values())


def test_analyses_bench_scratch_stores_identical_results(analysed):
    """`mlmscope analyses bench`: three modes on the same checkpoints, shared and naive results identical, and the
    run's own results store untouched (the bench writes to scratch stores only)."""
    from mlmscope.app.analyses_cli import run_bench

    index = analysed / "results" / "index.json"
    before = index.read_bytes() if index.exists() else None
    out = run_bench(analysed, ["sas", "redundancy"], "0,30", None, 32, 2)
    assert set(out["modes"]) == {"shared", "naive", "shared, 2 workers"}
    assert all(m["checkpoints"] == 2 and m["failed"] == 0 for m in out["modes"].values())
    assert out["identical"] is True
    assert set(out["modes"]["naive"]["compute_s"]) == {"sas", "redundancy"}
    assert out["naive_over_shared"] > 0 and 0 < out["compute_share"] < 1
    assert (index.read_bytes() if index.exists() else None) == before


def test_syntax_onsets_skip_the_unigram_phase():
    """Onsets are searched from the first checkpoint at or below the unigram entropy (the fall from ln V before it
    is token-frequency learning); without the record, or never below it, every checkpoint counts."""
    import pandas as pd

    from mlmscope.app.views.syntax import _onset_params

    curve = pd.DataFrame({"step": [0, 100, 500, 1000], "val_loss": [9.0, 7.2, 6.7, 6.1]})
    assert _onset_params(curve, 6.8).min_step == 500.0
    assert _onset_params(curve, None).min_step == 0.0
    assert _onset_params(curve, 5.0).min_step == 0.0


def test_relation_curve_follows_the_chosen_relation(monkeypatch, analysed):
    from mlmscope.analyses.store import load_results

    at = _app(monkeypatch, analysed, page="syntax")
    best = load_results(analysed, "sas", "best")
    box = at.selectbox(key="syntax_relation")
    relation = box.options[-1]  # the last in the menu: a relation other than `all` where the probes have one
    box.set_value(relation).run()
    assert not at.exception, [e.value for e in at.exception]
    fig = next(f for f in _figures(at) if f["layout"]["title"]["text"].startswith(f"{relation}: best head vs"))
    want = best[best["relation"] == relation].sort_values("step")
    by_name = {t["name"]: t for t in fig["data"]}
    np.testing.assert_allclose(_arr(by_name["best head (held-out)"]["y"]), want["uas_held_out"], rtol=1e-12)
    np.testing.assert_allclose(_arr(by_name["best offset (held-out)"]["y"]), want["offset_uas_held_out"], rtol=1e-12)
    np.testing.assert_allclose(_arr(by_name["best head (held-out)"]["x"]), want["step"], rtol=0)
