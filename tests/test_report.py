"""``mlmscope report``: Markdown report of a trained and analysed micro trajectory, and of runs without results.

The fixture trains a ``micro`` run for 20 steps (checkpoints 0, 1, 2, 4, 8, 10, 20), builds a 15-sentence parsed
probe set (``app.bench.PROBE_TEXT``, as the dashboard fixture does) and runs every analysis through the real runner
and capture, the tuned lens with ``compare_cold=True`` so the warm-start saving is recorded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mlmscope.analyses.base import load_all
from mlmscope.app.report import NA, ReportError, build_report, fmt, md_table, select_steps

STEPS = [0, 1, 2, 4, 8, 10, 20]
SECTIONS = [
    "### Training",
    "### Syntactic attention structure (SAS)",
    "### Attention: where heads look",
    "### [MASK] rank deficiency",
    "### Outlier dimensions",
    "### Layer redundancy and layer drop",
    "### Logit lens and tuned lens",
]
ANALYSES = ["sas", "attention", "mask_rank", "outliers", "redundancy", "layer_drop", "logit_lens", "tuned_lens"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_corpus) -> Path:
    from mlmscope.analyses.attention import AttentionStats
    from mlmscope.analyses.lens import LogitLens
    from mlmscope.analyses.mask_rank import MaskRank
    from mlmscope.analyses.outliers import Outliers
    from mlmscope.analyses.redundancy import LayerDrop, Redundancy
    from mlmscope.analyses.runner import DEFAULT_PROBES, Runner, RunnerConfig
    from mlmscope.analyses.sas import SAS
    from mlmscope.analyses.tuned_lens import TunedLens
    from mlmscope.app.bench import PROBE_TEXT
    from mlmscope.checkpoints.config import make_config
    from mlmscope.checkpoints.train import train
    from mlmscope.probes.model import load_model
    from mlmscope.probes.probeset import BuildConfig, build_probe_set

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("report") / "micro"
    train(path, make_config("micro", corpus=small_corpus, max_steps=20, linear_every=10), progress=False)
    lm = load_model(path / "step_000000")
    ps = build_probe_set(
        PROBE_TEXT, BuildConfig(n=len(PROBE_TEXT), min_words=3), tokenizer=lm.tokenizer, max_length=lm.arch.max_length
    )
    ps.save(path / DEFAULT_PROBES)
    analyses = [
        SAS(),
        AttentionStats(),
        MaskRank(),
        Outliers(),
        Redundancy(),
        LayerDrop(),
        LogitLens(),
        TunedLens(TunedLens.Params(compare_cold=True, max_steps=40)),
    ]
    summary = Runner(path, RunnerConfig(batch_size=8, device="cpu"), analyses=analyses).run()
    assert summary.failed == 0
    return path


def _table_after(md: str, marker: str) -> pd.DataFrame:
    """The first Markdown table after the line containing ``marker``, as strings."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if marker in l)
    first = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("|"))
    rows = []
    for l in lines[first:]:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip("|").split(" | ")])
    return pd.DataFrame(rows[2:], columns=rows[0])


def _sections(md: str) -> dict[str, str]:
    parts = md.split("\n### ")
    return {"### " + p.split("\n", 1)[0]: p for p in parts[1:]}


# --- formatting and step selection (no model) -----------------------------------------------------------------------


def test_fmt_three_decimals_tiny_values_and_missing():
    assert fmt(6.91239) == "6.912"
    assert fmt(-0.0123) == "-0.012"
    assert fmt(0.0) == "0.000"
    assert fmt(2.4e-05) == "2.40e-05"  # would be 0.000 at 3 decimals
    assert fmt(np.float32(0.5)) == "0.500"
    assert fmt(float("nan")) == NA and fmt(None) == NA
    assert fmt(True) == "yes" and fmt(np.int64(7)) == "7" and fmt("syntactic") == "syntactic"


def test_md_table_escapes_pipes():
    t = md_table(["a", "b"], [["L0H1 | L1H1", "1"]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| L0H1 \\| L1H1 | 1 |"]


def test_select_steps_log_spaced_first_and_last():
    # every step 0..9999 present: the grid log10(step + 1) = 0, 1, 2, 3, 4 hits 0, 9, 99, 999, 9999 exactly
    assert select_steps(range(10000), 5) == [0, 9, 99, 999, 9999]
    assert select_steps([5, 3, 3, 1], 12) == [1, 3, 5]  # fewer than max_rows: all, sorted, unique
    # the demo schedule (dense powers of two, then every 300): exactly max_rows, first and last included
    demo = [0] + [2**i for i in range(9)] + list(range(300, 12001, 300))
    sel = select_steps(demo, 12)
    assert len(sel) == 12 and sel[0] == 0 and sel[-1] == 12000 and sel == sorted(set(sel))
    # grid points that collide on the dense start are refilled: still max_rows distinct steps
    assert len(select_steps([0, 1, 2, 3, 10000], 4)) == 4
    with pytest.raises(ReportError, match="at least 2"):
        select_steps(demo, 1)


# --- the analysed micro trajectory -----------------------------------------------------------------------------------


def test_report_has_every_section_and_the_selected_steps(run):
    md = build_report(run, max_rows=5)
    for s in SECTIONS:
        assert s in md
    assert "(no results" not in md
    assert set(ANALYSES) == set(load_all())  # every registered analysis has a report section
    expected = select_steps(STEPS, 5)
    assert expected[0] == 0 and expected[-1] == 20 and len(expected) == 5
    train = _table_after(md, "### Training")
    assert train["step"].astype(int).tolist() == expected
    sas = _table_after(md, "### Syntactic attention structure")
    assert sas["step"].astype(int).tolist() == expected
    for marker in (
        "### [MASK] rank",
        "### Outlier dimensions",
        "### Layer redundancy",
        "Layer drop:",
        "### Logit lens",
        "Logit vs tuned lens",
    ):
        assert marker in md
    assert _table_after(md, "### [MASK] rank")["step"].astype(int).tolist() == expected
    assert _table_after(md, "### Layer redundancy")["step"].astype(int).tolist() == expected
    assert _table_after(md, "Layer drop:")["step"].astype(int).tolist() == expected
    assert _table_after(md, "### Logit lens")["step"].astype(int).tolist() == expected


def test_report_numbers_match_the_stored_results(run):
    from mlmscope.analyses.mask_rank import rank_gap_over_steps
    from mlmscope.analyses.sas import sas_curve
    from mlmscope.analyses.trajectory import Trajectory

    md = build_report(run, max_rows=12)
    t = Trajectory(run)
    ck = t.checkpoints_frame().set_index("step")
    train = _table_after(md, "### Training").set_index("step")
    assert train.index.astype(int).tolist() == STEPS  # 7 checkpoints <= 12 rows: all of them
    for s in STEPS:
        assert train.loc[str(s), "val loss"] == f"{ck.loc[s, 'val_loss']:.3f}"
        assert train.loc[str(s), "tokens"] == f"{int(ck.loc[s, 'tokens_seen']):,}"
    h = t.manifest.run["val_unigram_entropy"]
    assert f"Unigram entropy of the validation set: {h:.3f} nats" in md

    curve = sas_curve(run).set_index("step")
    sas = _table_after(md, "### Syntactic attention structure").set_index("step")
    for s in STEPS:
        assert sas.loc[str(s), "SAS (held-out)"] == fmt(curve.loc[s, "sas_score"])
        assert sas.loc[str(s), "in-sample max"] == fmt(curve.loc[s, "sas_in_sample"])
        assert sas.loc[str(s), "val loss"] == fmt(curve.loc[s, "val_loss"])
    for line in (
        "Structure onset on the held-out SAS",
        "Classification of the structure:",
        "Loss-drop onset",
        "Coincide",
        "Best head vs best offset baseline per relation at the last step (20)",
    ):
        assert line in md

    gap = rank_gap_over_steps(t.results("mask_rank", "ranks"))
    last = gap[gap["step"] == 20].sort_values("layer")
    mr = _table_after(md, "### [MASK] rank").set_index("step")
    assert mr.loc["20", "gap"] == " / ".join(f"{v:.0f}" for v in last["gap"])
    only = t.results("mask_rank", "mask_only")
    rho = only[(only["step"] == 20) & (only["token_set"] == "masked_mask")].sort_values("layer")["outside_fraction"]
    assert mr.loc["20", "ρ [MASK]"] == " / ".join(fmt(v) for v in rho)

    red = t.results("redundancy", "per_layer")
    r = red[(red["step"] == 20) & (red["unit"] == "attn") & (red["block"] == 1)]["redundancy"].item()
    assert _table_after(md, "### Layer redundancy").set_index("step").loc["20", "attn 1"] == fmt(r)
    drop = t.results("layer_drop", "per_unit")
    d = drop[(drop["step"] == 20) & (drop["unit"] == "block") & (drop["block"] == 0)]["delta_loss"].item()
    assert _table_after(md, "Layer drop:").set_index("step").loc["20", "block 0"] == fmt(d)

    kl = t.results("logit_lens", "per_layer")
    k = kl[(kl["step"] == 20) & (kl["site"] == "embed")]["kl"].item()
    lens = _table_after(md, "### Logit lens").set_index("step")
    assert lens.loc["20", "embed"] == fmt(k)
    assert "block 1" not in lens.columns  # final layer: KL = 0 by definition


def test_outliers_and_tuned_lens_sections(run):
    from mlmscope.analyses.outliers import outlier_emergence
    from mlmscope.analyses.trajectory import Trajectory

    t = Trajectory(run)
    sec = _sections(build_report(run))
    out = sec["### Outlier dimensions"]
    born = outlier_emergence(t.results("outliers", "freq"))
    if born.empty:
        assert "No dimension reached freq ≥ 0.5" in out
    else:
        table = _table_after(out, "freq = share")
        assert table["dim"].astype(int).tolist() == born["dim"].tolist()[:12]
    aniso = _table_after(out, "Anisotropy at the last step (20)")
    a = t.results("outliers", "anisotropy")
    raw = a[(a["step"] == 20) & (a["condition"] == "raw")].sort_values("layer")["value"]
    assert aniso["raw"].tolist() == [fmt(v) for v in raw]

    lens = sec["### Logit lens and tuned lens"]
    side = _table_after(lens, "Logit vs tuned lens").set_index("step")
    tl = t.results("tuned_lens", "per_layer")
    tuned20 = tl[(tl["step"] == 20) & (tl["lens"] == "tuned") & (tl["depth"] < tl["depth"].max())]
    assert side.loc["20", "tuned KL"] == " / ".join(fmt(v) for v in tuned20.sort_values("depth")["kl"])
    # compare_cold=True: warm steps vs cold steps per translator, from step 1 on (step 0 has no warm start)
    warm = _table_after(lens, "Tuned-lens warm start").set_index(["step", "translator"])
    fit = t.results("tuned_lens", "fit").dropna(subset=["warm_steps_to_cold_kl"])
    assert sorted(set(warm.index.get_level_values(0).astype(int))) == select_steps(fit["step"], 12)
    assert "0" not in warm.index.get_level_values(0)
    row = fit[(fit["step"] == 20) & (fit["block"] == -1)].iloc[0]
    cells = warm.loc[("20", "embed")]
    assert cells["warm steps to cold KL"] == f"{row['warm_steps_to_cold_kl']:.0f}"
    assert cells["saving"] == fmt(1 - row["warm_steps_to_cold_kl"] / row["cold_steps"])


def test_every_table_row_has_the_header_width(run):
    md = build_report(run, max_rows=4)
    lines = md.splitlines()
    for i, l in enumerate(lines):
        if l.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            width = l.replace("\\|", "").count("|")
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].replace("\\|", "").count("|") == width, lines[j]
                j += 1
            assert lines[i - 1] == "" and (j == len(lines) or lines[j] == ""), "tables need blank lines around them"


# --- runs without results, bad input, the command ------------------------------------------------------------------


def test_run_without_results_reports_no_results_lines(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "manifest.json", bare / "manifest.json")  # checkpoints listed, nothing analysed
    md = build_report(bare, max_rows=5)
    for s in SECTIONS:
        assert s in md
    assert _table_after(md, "### Training")["step"].astype(int).tolist() == select_steps(STEPS, 5)
    for a in ANALYSES:
        assert f"(no results for {a}" in md
    assert "Loss-drop onset" in md


def _synthetic_run(
    root: Path, steps: list[int], tables: dict[str, dict[int, dict[str, pd.DataFrame]]], params: dict[str, dict]
) -> Path:
    """A manifest with fake hashes and hand-made stored results (analysis -> step -> table -> frame)."""
    import hashlib

    from mlmscope.analyses.store import ResultKey, ResultStore
    from mlmscope.checkpoints.manifest import CheckpointEntry, Manifest, step_dirname

    sha = {s: hashlib.sha256(f"ckpt-{s}".encode()).hexdigest() for s in steps}
    Manifest(
        run={}, checkpoints=[CheckpointEntry(step=s, path=step_dirname(s), sha256=sha[s], val_loss=1.0) for s in steps]
    ).save(root)
    store = ResultStore(root)
    for analysis, per_step in tables.items():
        for s, frames in per_step.items():
            store.save(
                ResultKey(analysis, "1", sha[s], "p" * 16, "q" * 64),
                frames,
                {"step": s, "params": params.get(analysis, {})},
            )
    return root


def test_outlier_emergence_threshold_and_wide_models(tmp_path):
    """Synthetic store: the emergence table uses the stored freq_threshold; 6 blocks keep only block columns."""
    steps = [0, 10, 100, 1000]

    def freq(s: int) -> pd.DataFrame:
        rows = [(0, 3, "argmax", 0.9)]  # input layer: never counts
        rows += [(1, 7, "argmin", 0.6)] if s == 10 else []  # transient, below the stored 0.7
        rows += [(1, 3, "argmax", 0.8), (2, 3, "argmax", 0.75)] if s >= 100 else [(1, 3, "argmax", 0.1)]
        return pd.DataFrame(rows, columns=["layer", "dim", "kind", "freq"])

    def per_layer(s: int) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {"block": b, "unit": u, "redundancy": 0.01 * b + s / 1e4}
                for b in range(6)
                for u in ("block", "attn", "ffn")
            ]
        )

    run = _synthetic_run(
        tmp_path,
        steps,
        {
            "outliers": {s: {"freq": freq(s)} for s in steps},
            "redundancy": {s: {"per_layer": per_layer(s)} for s in steps},
        },
        {"outliers": {"freq_threshold": 0.7}},
    )
    sec = _sections(build_report(run))
    out = sec["### Outlier dimensions"]
    assert "freq ≥ 0.7 in a non-input layer" in out
    born = _table_after(out, "freq = share")
    assert born.to_dict("records") == [
        {
            "dim": "3",
            "kind": "argmax",
            "emergence step": "100",
            "stable from": "100",
            "first layers": "1 2",
            "peak freq": "0.800",
            "final freq": "0.800",
        }
    ]
    red = sec["### Layer redundancy and layer drop"]
    table = _table_after(red, "1 − cos")
    assert list(table.columns) == ["step"] + [f"block {b}" for b in range(6)]
    assert table.set_index("step").loc["1000", "block 5"] == fmt(0.05 + 0.1)
    assert "(attention / FFN columns omitted: too many layers.)" in red
    assert "(no results for layer_drop" in red


def test_empty_folder_and_skipped_analysis(tmp_path):
    from mlmscope.analyses.store import ResultKey, ResultStore

    md = build_report(tmp_path)
    assert "(no results for training: no checkpoints in this folder)" in md
    assert all(f"(no results for {a}" in md for a in ANALYSES)
    ResultStore(tmp_path).save_skip(
        ResultKey("logit_lens", "1", "c" * 64, "p" * 16, "q" * 64), "the model has no trained MLM head"
    )
    assert "(no results for logit_lens: skipped, the model has no trained MLM head)" in build_report(tmp_path)


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "nope")
    with pytest.raises(ReportError, match="max-rows"):
        build_report(tmp_path, max_rows=1)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ReportError, match="cannot read"):
        build_report(tmp_path)


def test_command_prints_and_writes(run, tmp_path):
    from typer.testing import CliRunner

    from mlmscope.app.cli import app

    out = tmp_path / "docs" / "report.md"
    res = CliRunner().invoke(app, ["report", str(run), "--out", str(out), "--max-rows", "3"])
    assert res.exit_code == 0, res.output
    assert out.read_text() == build_report(run, max_rows=3)
    assert out.read_text() in res.stdout
    assert _table_after(out.read_text(), "### Training")["step"].astype(int).tolist() == [0, 4, 20]
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert bad.exit_code == 1 and "error:" in bad.output and "does not exist" in bad.output


def test_relations_beating_their_offsets_line():
    from mlmscope.app.report import _relations_beating_offsets

    rows = []
    for step, deltas in ((0, (-0.2, -0.3, 0.0, 0.1)), (10, (0.06, -0.1, 0.07, 0.2)), (20, (0.04, 0.0, 0.09, 0.3))):
        rows += [
            dict(step=step, relation=r, n=n, delta_held_out=d, uas_held_out=0.4 + d, offset_uas_held_out=0.4, kind=k)
            for r, n, d, k in zip(
                ("dobj", "pobj", "det", "all"), (649, 1196, 300, 5000), deltas, ("syntactic",) * 3 + ("syntactic",)
            )
        ]
    rows.append(
        dict(
            step=10,
            relation="cc",
            n=120,
            delta_held_out=0.5,
            uas_held_out=0.9,
            offset_uas_held_out=0.4,
            kind="syntactic",
        )
    )  # gone by the last step
    line = _relations_beating_offsets(pd.DataFrame(rows))
    # dobj dipped below 0.05 at the last step, `all` is not a relation, cc is absent at step 20: det only, since 10
    assert line == (
        "- Relations whose best head beats their best offset by ≥ 0.05 (held out) at step 20: **1**: "
        "`det` (n 300: 0.490 vs offset 0.400, since step 10)."
    )
    none = _relations_beating_offsets(pd.DataFrame(rows).assign(delta_held_out=-1.0))
    assert none.endswith("at step 20: none.")
    # a NaN margin is a miss (det restarts at 20), too few arcs drop a relation, no scores at all give "none"
    frame = pd.DataFrame(rows)
    frame.loc[(frame.relation == "det") & (frame.step == 10), "delta_held_out"] = np.nan
    assert "`det` (n 300: 0.490 vs offset 0.400, since step 20)" in _relations_beating_offsets(frame)
    assert _relations_beating_offsets(frame.assign(n=99)).endswith("none.")
    assert _relations_beating_offsets(frame.drop(columns="delta_held_out")).endswith("none.")
