"""`mlmscope analyses bench`: per analysis, seconds and the ratio to the capture of the same checkpoints, vs budgets.

Timings are not asserted (they are machine- and load-dependent); the accounting is: every analysis measured on every
checkpoint, ratios = seconds / capture seconds, layer drop's budget unit = configurations x token share, the tuned
lens split into its cold first fit and warm refits, and the CLI prints the table.
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from mlmscope.analyses.bench import BUDGETS, bench_run
from mlmscope.app.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def probes(micro_model_dir, tmp_path_factory):
    from conftest import FIXTURE_TEXT
    from mlmscope.probes.probeset import BuildConfig, build_probe_set

    return build_probe_set(FIXTURE_TEXT[:12], BuildConfig(n=12, min_words=5)).save(tmp_path_factory.mktemp("probes"))


@pytest.fixture(scope="module")
def suite(micro_model_dir, tmp_path_factory):
    """A folder of two checkpoints (the micro model twice), so chained analyses warm-start once."""
    root = tmp_path_factory.mktemp("suite")
    for step in (0, 10):
        shutil.copytree(micro_model_dir, root / f"step_{step:06d}")
    return root


def test_trajectory_accounting(suite, probes):
    names = ["sas", "redundancy", "logit_lens", "layer_drop", "tuned_lens"]
    seen = []
    report = bench_run(suite, names, probes=probes, batch_size=4, progress=seen.append)
    assert [c.step for c in report.checkpoints] == [0, 10] and len(seen) == 2
    for c in report.checkpoints:
        assert set(c.analyses) == set(names) and all(t.status == "ok" for t in c.analyses.values())
        assert c.capture_s["clean"] > 0 and c.capture_s["mask15"] > 0 and c.tokens["clean"] == c.tokens["mask15"] > 0
        assert c.forward_s is not None and c.forward_s > 0
    assert [c.analyses["tuned_lens"].warm for c in report.checkpoints] == [False, True]
    rows = {r["analysis"]: r for r in report.rows()}
    assert {"tuned_lens (warm refit)", "tuned_lens (cold fit)", "sas", "layer_drop"} <= set(rows)
    sas = rows["sas"]
    clean = sum(c.capture_s["clean"] for c in report.checkpoints)
    assert sas["x_clean"] == pytest.approx(sas["seconds"] / clean)
    assert sas["budget"] == BUDGETS["sas"].ratio and sas["met"] == (sas["x_clean"] <= 0.5)
    drop = rows["layer_drop"]
    n_configs = 1 + 3 * 2  # intact + block/attn/ffn of the micro model's 2 layers
    assert drop["units"] == pytest.approx(n_configs)  # every sentence < max_sentences = 256: the whole probe set
    assert drop["x_budget_unit"] == pytest.approx(drop["x_clean"] / n_configs)
    warm = rows["tuned_lens (warm refit)"]
    assert warm["checkpoints"] == 1 and warm["budget"] == 2.0
    summary = report.summary()
    assert summary["checkpoints"] == 2 and summary["suite_x_clean"] > 0 and summary["tokens_per_s_clean_capture"] > 0
    json.dumps(report.to_dict())  # JSON-able as written by --out


def test_cli_single_model_prints_the_table(micro_model_dir, probes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(
        app,
        ["analyses", "bench", str(micro_model_dir), "--probes", str(probes), "-a", "sas,mask_rank", "--out", str(out)],
    )
    assert r.exit_code == 0, r.output
    assert "x clean" in r.output and "mask_rank" in r.output and "tokens/s" in r.output and "AVX" in r.output
    d = json.loads(out.read_text())
    assert d["summary"]["checkpoints"] == 1 and {a["analysis"] for a in d["analyses"]} == {"sas", "mask_rank"}
    assert d["checkpoints"][0]["step"] is None
    assert not (tmp_path / "runs").exists()  # a model folder with --probes gets no results folder (runs/models/…)
