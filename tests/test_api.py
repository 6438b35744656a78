"""One call per analysis (``mlmscope.analyses.analyze`` / ``<name>.run``): the runner's numbers, explicit masks.

The reference is the trajectory runner itself: the same micro checkpoints and probe set analysed by ``Runner`` (whose
results go through the Parquet store) and by ``analyze()`` (no store) must give the same frames, integer columns
exactly and float columns within ``tests/tolerance.py``.
"""

from __future__ import annotations

import importlib
import io
import warnings

import numpy as np
import pandas as pd
import pytest

import mlmscope.analyses as A
from conftest import FIXTURE_TEXT, _save_micro
from mlmscope.analyses.api import Results, SkippedAnalysisWarning, analyze
from mlmscope.analyses.base import ParamError, SkipAnalysis, load_all
from mlmscope.analyses.runner import Runner, RunnerConfig
from mlmscope.analyses.store import ResultStore
from mlmscope.checkpoints.manifest import CheckpointEntry, Manifest, step_dirname, weights_sha256
from mlmscope.probes.capture import capture, prepare
from mlmscope.probes.masking import MaskPlan, active_plan, explicit_masks, mask_positions
from mlmscope.probes.model import ProbeError, load_model
from tolerance import assert_close_scaled

#: Every analysis the package registers (tests may register fakes of their own).
SHIPPED = sorted(n for n, c in load_all().items() if c.__module__.startswith("mlmscope."))
#: Those fed a masked variant (explicit masks change their inputs).
MASKED = sorted(n for n in SHIPPED if any(v != "clean" for v in load_all()[n].variants))
BATCH = 4


@pytest.fixture(scope="module")
def probes():
    from mlmscope.probes.probeset import BuildConfig, build_probe_set

    return build_probe_set(FIXTURE_TEXT[:12], BuildConfig(n=12, min_words=5))


@pytest.fixture(scope="module")
def analysed_run(tmp_path_factory, probes):
    """A two-checkpoint micro run analysed by the runner (every shipped analysis, one process)."""
    run = tmp_path_factory.mktemp("api") / "run"
    m = Manifest(run={"status": "finished"})
    for s in (0, 1):
        d = run / step_dirname(s)
        _save_micro(d, seed=s)
        m.add(CheckpointEntry(step=s, path=d.name, sha256=weights_sha256(d)))
    m.save(run)
    summary = Runner(run, RunnerConfig(analyses=SHIPPED, batch_size=BATCH, device="cpu"), probe_set=probes).run()
    assert summary.failed == 0, [(f.analysis, f.error) for f in summary.failures]
    return run


@pytest.fixture(scope="module")
def lm(analysed_run):
    return load_model(analysed_run / step_dirname(0))


@pytest.fixture(scope="module")
def fresh(lm, probes) -> Results:
    return analyze(lm, probes, batch_size=BATCH)


def _roundtrip(df: pd.DataFrame) -> pd.DataFrame:
    """Through Parquet, as the store writes it (dtypes as the runner's frames come back)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return pd.read_parquet(io.BytesIO(buf.getvalue()))


def assert_same_frame(got: pd.DataFrame, want: pd.DataFrame, what: str) -> None:
    """Same columns and rows; non-float columns exactly, float columns within the scaled float tolerance."""
    got, want = _roundtrip(got), _roundtrip(want)
    assert list(got.columns) == list(want.columns), what
    assert len(got) == len(want), what
    for col in want.columns:
        g, w = got[col], want[col]
        if pd.api.types.is_float_dtype(w.dtype):
            a, b = g.to_numpy(np.float64), w.to_numpy(np.float64)
            assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}.{col}: NaNs differ"
            finite = ~np.isnan(b)
            scale = float(np.max(np.abs(b[finite]))) if finite.any() else 0.0
            assert_close_scaled(a[finite], b[finite], dtype=w.dtype.type, scale=scale, msg=f"{what}.{col}")
        else:
            assert g.astype(str).tolist() == w.astype(str).tolist(), f"{what}.{col}"


def stored(run, name: str, table: str, step: int) -> pd.DataFrame:
    """The table the runner stored for one checkpoint, as written (not stacked with other steps' columns)."""
    (meta,) = [m for m in ResultStore(run).entries(name) if m["step"] == step and m["status"] == "ok"]
    return pd.read_parquet(run / "results" / name / meta["dirname"] / f"{table}.parquet")


# --- the runner's numbers ------------------------------------------------------------------------------------------
def test_analyze_equals_the_runner_for_every_analysis(analysed_run, fresh):
    assert sorted(fresh) == SHIPPED and not fresh.skipped
    for name in SHIPPED:
        meta = ResultStore(analysed_run).entries(name)
        tables = sorted({t for m in meta for t in m["tables"]})
        assert sorted(fresh[name]) == tables, name
        for t in tables:
            assert_same_frame(fresh[name][t], stored(analysed_run, name, t, 0), f"{name}.{t}")
        assert fresh.meta[name]["status"] == "ok" and fresh.meta[name]["params"] == load_all()[name]().params_dict()
    assert fresh.meta["mask_rank"]["masks"] == "seeded" and fresh.meta["sas"]["masks"] is None


def test_chained_analysis_warm_starts_from_a_saved_folder_like_the_runner(analysed_run, probes, tmp_path):
    """tuned_lens on step 1 warm-started from step 0's ``save_to`` folder = the runner's chained step 1."""
    first = A.run(
        "tuned_lens", analysed_run / step_dirname(0), probes, batch_size=BATCH, device="cpu", save_to=tmp_path
    )
    assert (tmp_path / "tuned_lens" / "meta.json").is_file() and (tmp_path / "tuned_lens" / "fit.parquet").is_file()
    assert set(first["fit"]["init"]) == {"zero"}
    second = A.tuned_lens.run(analysed_run / step_dirname(1), probes, batch_size=BATCH, device="cpu", previous=tmp_path)
    assert set(second["fit"]["init"]) == {"warm"}
    for t in ("per_layer", "fit"):
        assert_same_frame(second[t], stored(analysed_run, "tuned_lens", t, 1), f"tuned_lens.{t} (step 1)")
    # the runner's own stored result folder works as `previous` too
    prev = ResultStore(analysed_run).entries("tuned_lens")[0]
    folder = analysed_run / "results" / "tuned_lens" / prev["dirname"]
    again = A.run("tuned_lens", analysed_run / step_dirname(1), probes, batch_size=BATCH, device="cpu", previous=folder)
    assert_same_frame(again["fit"], second["fit"], "tuned_lens.fit from the store's folder")


# --- one call each -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_every_analysis_is_one_call_by_name(name, lm, probes, fresh):
    handle = getattr(A, name)  # the module named after the analysis, or its class (layer_drop, logit_lens)
    frames = handle.run(lm, probes, batch_size=BATCH)
    assert sorted(frames) == sorted(fresh[name])
    for t, df in frames.items():
        assert_same_frame(df, fresh[name][t], f"{name}.{t}")


def test_run_params_and_errors(lm, probes):
    from mlmscope.analyses import sas
    from mlmscope.analyses.sas import SAS, sas_frames

    by_field = sas.run(lm, probes, min_count=1, batch_size=BATCH)
    by_params = A.run("sas", lm, probes, params=SAS.Params(min_count=1), batch_size=BATCH)
    by_alias = sas_frames(lm, probes, SAS.Params(min_count=1), batch_size=BATCH)
    by_dict = analyze(lm, probes, ["sas"], params={"sas": {"min_count": 1}}, batch_size=BATCH)["sas"]
    for t in by_field:
        pd.testing.assert_frame_equal(by_field[t], by_params[t])
        pd.testing.assert_frame_equal(by_field[t], by_alias[t])
        pd.testing.assert_frame_equal(by_field[t], by_dict[t])
    with pytest.raises(ParamError, match="has no parameter 'min_cont'"):
        sas.run(lm, probes, min_cont=1)
    with pytest.raises(ParamError, match="unknown analysis 'nope'"):
        analyze(lm, probes, ["nope"])
    with pytest.raises(ParamError, match="not among the analyses"):
        analyze(lm, probes, ["sas"], params={"outliers": {}})
    with pytest.raises(ParamError, match="loaded on"):
        analyze(lm, probes, ["sas"], device="meta")
    with pytest.raises(SkipAnalysis, match="no dependency parses"):
        sas.run(lm, [["a", "cat", "sat"]])  # word lists: no parses


def test_skipped_analyses_are_reported_not_raised(micro_headless_dir, probes):
    with pytest.warns(SkippedAnalysisWarning, match="layer_drop"):
        res = analyze(micro_headless_dir, probes, ["attention", "layer_drop"], batch_size=BATCH, device="cpu")
    assert list(res) == ["attention"] and "no MLM head" in res.skipped["layer_drop"]
    assert res.meta["layer_drop"]["status"] == "skipped"


def test_words_and_sentences_as_probes(lm):
    words = [["the", "cat", "sat", "on", "the", "mat"], ["a", "dog", "slept", "near", "the", "fire"]]
    a = A.attention.run(lm, words)
    b = A.attention.run(lm, ["the cat sat on the mat", "a dog slept near the fire"])
    assert sorted(a) == sorted(b)
    for t in a:
        pd.testing.assert_frame_equal(a[t], b[t])


# --- explicit masks ------------------------------------------------------------------------------------------------
def seeded_masks(lm, probes, seed: int = 0) -> list[list[int]]:
    """The seeded rule's mask15 positions, as explicit lists (skipped sentences: empty)."""
    enc = prepare(lm, probes)
    out: list[list[int]] = [[] for _ in range(len(probes.sentences))]
    for sid, wids in zip(enc.sentence_ids, enc.word_ids):
        out[sid] = mask_positions("mask15", sum(w is not None for w in wids), sid, seed).tolist()
    return out


def test_explicit_masks_equal_to_the_seeded_rule_give_identical_results(lm, probes, fresh):
    res = analyze(lm, probes, MASKED, batch_size=BATCH, masks=seeded_masks(lm, probes))
    for name in MASKED:
        assert res.meta[name]["masks"] == "explicit" and res.meta[name]["masks_hash"]
        for t, df in res[name].items():
            assert df.attrs["masks"] == "explicit"
            pd.testing.assert_frame_equal(df, fresh[name][t], check_exact=True, obj=f"{name}.{t}")


def test_explicit_masks_are_what_the_capture_and_the_analyses_use(lm, probes, fresh):
    masks = [[0] for _ in probes.sentences]  # the first piece of every sentence
    enc = prepare(lm, probes)
    n_masked = 0
    for batch in capture(lm, probes, variants=("mask15",), names=["embed.hook_out"], masks=masks):
        for b in range(len(batch.sentence_ids)):
            content = (~batch.special_mask[b]).nonzero().squeeze(1)
            assert batch.masked_mask[b].nonzero().squeeze(1).tolist() == [int(content[0])]
            n_masked += 1
    assert n_masked == len(enc)
    res = analyze(lm, probes, ["mask_rank", "logit_lens"], batch_size=BATCH, masks=masks)
    assert not any("mask_seed" in w for w in res.meta["mask_rank"]["warnings"])  # the analysis saw the same plan
    ranks = res["mask_rank"]["ranks"]
    n_at_mask = ranks[ranks["token_set"] == "masked_mask"]["n_tokens"].iloc[0]
    assert n_at_mask == len(enc)  # one [MASK] per sentence
    assert not res["logit_lens"]["per_layer"].equals(fresh["logit_lens"]["per_layer"])
    assert active_plan() is None  # outside the call, the seeded rule is back


def test_bad_masks_are_refused_naming_the_sentence(lm, probes):
    good = seeded_masks(lm, probes)
    out_of_range = [list(m) for m in good]
    out_of_range[3] = [999]
    with pytest.raises(ProbeError, match=r"sentence 3\).*out of range"):
        analyze(lm, probes, ["mask_rank"], masks=out_of_range)
    with pytest.raises(ProbeError, match="entries; the probe set has"):
        analyze(lm, probes, ["mask_rank"], masks=good[:-1])
    with pytest.raises(ProbeError, match="sentence 2.*negative"):
        MaskPlan([[0], [1], [-1]])
    with pytest.raises(ProbeError, match="sentence 1.*twice"):
        MaskPlan([[0], [1, 1]])
    with pytest.raises(ProbeError, match="sentence 0.*integers"):
        MaskPlan([[0.5]])
    with pytest.raises(ProbeError, match="one list of piece positions per sentence"):
        MaskPlan({0: [1]})
    with pytest.raises(ProbeError, match=r"sentence 3\).*out of range"):
        list(capture(lm, probes, variants=("mask15",), names=["embed.hook_out"], masks=out_of_range))
    with explicit_masks([[0]]), pytest.raises(ProbeError, match="entries"):  # a plan in force is checked too
        list(capture(lm, probes, variants=("mask15",), names=["embed.hook_out"]))
    assert MaskPlan([np.array([2, 0]), []]).masks == [(0, 2), ()]


# --- device ----------------------------------------------------------------------------------------------------------
def test_the_runner_and_analyze_keep_captured_tensors_on_the_model_device(lm, probes, monkeypatch):
    cap = importlib.import_module("mlmscope.probes.capture")  # the package re-exports a function of that name

    seen = []
    real = cap.capture

    def recording(*args, **kwargs):
        seen.append(kwargs.get("to_cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cap, "capture", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyze(lm, probes, ["attention"], batch_size=BATCH)
    assert seen == [False]
