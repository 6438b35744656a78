"""Trajectory runner: shared capture, caching, failure isolation, warm starts, follow mode, kill -9 resume, CLI.

The fake analyses and the fake capture below are module-level (importable by spawned workers and Ray workers);
``test_ray_backend.py`` reuses them. The capture is an HF forward pass with ``output_hidden_states`` returning
``blocks.{l}.hook_resid_post`` only: enough to check the plumbing independently of ``probes.capture``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from mlmscope.analyses.base import Accumulator, Analysis, SkipAnalysis
from mlmscope.analyses.runner import Runner, RunnerConfig, RunnerError, parse_steps
from mlmscope.analyses.store import CHECKPOINT_SCOPE, ResultStore, load_results
from mlmscope.analyses.trajectory import Trajectory
from mlmscope.checkpoints.manifest import CheckpointEntry, Manifest, step_dirname, weights_sha256
from mlmscope.probes.batch import CaptureBatch

PROBES = [
    ["the", "cat", "sat", "on", "the", "mat"],
    ["the", "dog", "slept", "near", "the", "fire"],
    ["many", "people", "believe", "that", "music", "can", "improve", "memory"],
]
TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent


# --- fakes --------------------------------------------------------------------------------------------------------
def resid_names(n_layers: int) -> list[str]:
    return [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]


def fake_capture(lm, probe_set, *, variants, names, batch_size):
    """Yield CaptureBatch objects with ``blocks.{l}.hook_resid_post`` from an HF forward pass (mask1: word 0 masked)."""
    tok = lm.tokenizer
    for variant in variants:
        for start in range(0, len(probe_set), batch_size):
            words = probe_set[start : start + batch_size]
            enc = tok(words, is_split_into_words=True, padding=True, return_tensors="pt")
            ids = enc["input_ids"].clone()
            labels = torch.full_like(ids, -100)
            if variant == "mask1":
                labels[:, 1] = ids[:, 1]
                ids[:, 1] = tok.mask_token_id
            with torch.no_grad():
                out = lm.model(input_ids=ids, attention_mask=enc["attention_mask"], output_hidden_states=True)
            keep = enc["attention_mask"].unsqueeze(-1).float()
            acts = {f"blocks.{l}.hook_resid_post": out.hidden_states[l + 1] * keep for l in range(lm.n_layers)}
            special = torch.tensor([[t in tok.all_special_ids for t in row] for row in enc["input_ids"].tolist()])
            yield CaptureBatch(
                variant=variant,
                sentence_ids=torch.arange(start, start + len(words)),
                input_ids=ids,
                attention_mask=enc["attention_mask"],
                special_mask=special,
                word_ids=[enc.word_ids(i) for i in range(len(words))],
                labels=labels,
                head_positions=torch.zeros(0, 2, dtype=torch.long),
                acts={n: acts[n] for n in names},
            )


class RecordingCapture:
    """fake_capture that records (variants, names) of every call (in-process runs only)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], tuple[str, ...]]] = []

    def __call__(self, lm, probe_set, *, variants, names, batch_size):
        self.calls.append((tuple(variants), tuple(names)))
        return fake_capture(lm, probe_set, variants=variants, names=names, batch_size=batch_size)


class NormAcc(Accumulator):
    """Mean L2 norm and mean first coordinate of the residual stream over real tokens, per requested layer."""

    def __init__(self, layers: list[int], variant: str, delay: float = 0.0) -> None:
        self.layers = layers
        self.sum = torch.zeros(len(layers), dtype=torch.float64)
        self.sum0 = torch.zeros(len(layers), dtype=torch.float64)
        self.n = 0
        self.variant = variant
        self.delay = delay

    def update(self, batch: CaptureBatch) -> None:
        assert batch.variant == self.variant
        m = batch.attention_mask.bool()
        for i, l in enumerate(self.layers):
            x = batch[f"blocks.{l}.hook_resid_post"][m].double()
            self.sum[i] += x.norm(dim=-1).sum()
            self.sum0[i] += x[:, 0].sum()
        self.n += int(m.sum())
        time.sleep(self.delay)

    def result(self) -> dict[str, pd.DataFrame]:
        return {
            "per_layer": pd.DataFrame(
                {"layer": self.layers, "norm": (self.sum / self.n).numpy(), "mean0": (self.sum0 / self.n).numpy()}
            )
        }


class FakeNorm(Analysis):
    """Clean-variant residual norms per layer."""

    name = "_t_norm"
    version = "1"
    description = "test: residual norm per layer"
    variants = ("clean",)
    delay = 0.0  # seconds per batch (kill -9 test); not a parameter, so it does not change the result key

    @dataclass
    class Params(Analysis.Params):
        tag: str = "default"

    def names(self, ctx):
        return resid_names(ctx.n_layers)

    def accumulator(self, ctx):
        return NormAcc(list(range(ctx.n_layers)), "clean", self.delay)


class SlowNorm(FakeNorm):
    delay = 0.4


class FakeMasked(Analysis):
    """mask1-variant residual norm of the last layer only (so the union of names/variants is exercised)."""

    name = "_t_masked"
    variants = ("mask1",)

    def names(self, ctx):
        return resid_names(ctx.n_layers)[-1:]

    def accumulator(self, ctx):
        return NormAcc([ctx.n_layers - 1], "mask1")


class Broken(Analysis):
    """Raises inside update (must not affect the other analyses on the same checkpoint)."""

    name = "_t_broken"
    variants = ("clean",)

    def names(self, ctx):
        return resid_names(ctx.n_layers)[:1]

    def accumulator(self, ctx):
        class _Acc(Accumulator):
            def update(self, batch):
                raise RuntimeError("boom in update")

            def result(self):
                return {}

        return _Acc()


class NeedsHead(Analysis):
    """Declares needs_mlm_head: skipped with a reason on a head-less model."""

    name = "_t_head"
    needs_mlm_head = True

    def names(self, ctx):
        return []

    def accumulator(self, ctx):
        return NormAcc([0], "clean")


class Chained(Analysis):
    """Warm-start analysis: stores the step of the result folder it was warm-started from (-1 for none)."""

    name = "_t_chain"
    variants = ("clean",)
    chained = True

    def names(self, ctx):
        return resid_names(ctx.n_layers)[:1]

    def accumulator(self, ctx):
        prev = -1 if ctx.previous is None else json.loads((ctx.previous / "meta.json").read_text())["step"]
        step = ctx.step

        class _Acc(Accumulator):
            def update(self, batch):
                pass

            def result(self):
                warnings.warn("small sample", UserWarning, stacklevel=2)
                return {"warm": pd.DataFrame({"prev_step": [prev], "own_step": [step]})}

            def save_artefacts(self, folder):
                (Path(folder) / "translator.txt").write_text(f"fitted at {step}")

        return _Acc()


class SkipAlways(Analysis):
    name = "_t_skip"

    def names(self, ctx):
        return []

    def accumulator(self, ctx):
        raise SkipAnalysis("not applicable to this probe set")


# --- trajectory builders --------------------------------------------------------------------------------------------
def make_run(
    root: Path, steps=(0, 1, 2, 4), manifest: bool = True, status: str = "finished", model_cls: str = "BertForMaskedLM"
) -> Path:
    """A run folder with random micro checkpoints (seed = step) and, optionally, a manifest with hashes."""
    from conftest import _save_micro

    root.mkdir(parents=True, exist_ok=True)
    m = Manifest(run={"status": status})
    for s in steps:
        d = root / step_dirname(s)
        _save_micro(d, model_cls, seed=s)
        m.add(CheckpointEntry(step=s, path=d.name, sha256=weights_sha256(d)))
    if manifest:
        m.save(root)
    return root


def add_checkpoint(run: Path, step: int) -> None:
    from conftest import _save_micro

    d = run / step_dirname(step)
    _save_micro(d, seed=step)
    m = Manifest.load(run)
    m.add(CheckpointEntry(step=step, path=d.name, sha256=weights_sha256(d)))
    m.save(run)


def runner(run, analyses, capture=None, **cfg) -> Runner:
    return Runner(
        run, RunnerConfig(batch_size=2, **cfg), probe_set=PROBES, analyses=analyses, capture_fn=capture or fake_capture
    )


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """Four-checkpoint run (steps 0, 1, 2, 4) with a manifest; copy it before writing results."""
    return make_run(tmp_path_factory.mktemp("run4") / "run")


@pytest.fixture
def run(run4, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run4, dst)
    return dst


def hand_mean0(ckpt: Path) -> list[float]:
    """FakeNorm's mean first coordinate per layer, computed directly with transformers (no runner, no store)."""
    from transformers import AutoTokenizer, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = BertForMaskedLM.from_pretrained(ckpt).eval()
    norms = [[] for _ in range(model.config.num_hidden_layers)]
    for words in PROBES:
        enc = tok(words, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        for l in range(len(norms)):
            norms[l] += hs[l + 1][0, :, 0].tolist()
    return [sum(n) / len(n) for n in norms]


# --- tests ----------------------------------------------------------------------------------------------------------
def test_results_have_step_column_and_match_hand_computation(run):
    summary = runner(run, [FakeNorm(), FakeMasked()]).run()
    assert summary.failed == 0 and summary.counts[("_t_norm", "ok")] == 4
    df = Trajectory(run).results("_t_norm")
    assert sorted(df["step"].unique()) == [0, 1, 2, 4] and list(df.columns) == ["step", "layer", "norm", "mean0"]
    got = df[df.step == 2].sort_values("layer")["mean0"].tolist()
    assert got == pytest.approx(hand_mean0(run / "step_000002"), rel=1e-5)
    # different seeds -> different numbers per step (the step column is not a relabelled copy)
    assert df[df.step == 0]["mean0"].iloc[0] != pytest.approx(df[df.step == 4]["mean0"].iloc[0], rel=1e-3)


def test_one_capture_per_checkpoint_over_the_union(run):
    cap = RecordingCapture()
    runner(run, [FakeNorm(), FakeMasked()], cap).run()
    assert len(cap.calls) == 4  # one capture per checkpoint, not per analysis
    for variants, names in cap.calls:
        assert variants == ("clean", "mask1")
        assert set(names) == set(resid_names(2))
    naive = RecordingCapture()
    runner(run, [FakeNorm(), FakeMasked()], naive, force=True, shared_capture=False).run()
    assert len(naive.calls) == 8 and {c[0] for c in naive.calls} == {("clean",), ("mask1",)}
    # shared and naive captures give the same numbers
    assert load_results(run, "_t_masked")["norm"].notna().all()


def test_rerun_is_cached_and_force_recomputes(run):
    runner(run, [FakeNorm()]).run()
    before = {m["dirname"]: m["result_id"] for m in ResultStore(run).entries("_t_norm")}
    cap = RecordingCapture()
    s = runner(run, [FakeNorm()], cap).run()
    assert cap.calls == [] and s.counts[("_t_norm", "cached")] == 4
    assert {m["dirname"]: m["result_id"] for m in ResultStore(run).entries("_t_norm")} == before
    cap = RecordingCapture()
    runner(run, [FakeNorm()], cap, force=True, steps="1-2").run()
    after = {m["dirname"]: m["result_id"] for m in ResultStore(run).entries("_t_norm")}
    assert len(cap.calls) == 2 and sum(after[k] != before[k] for k in before) == 2


def test_params_and_version_key_results(run):
    runner(run, [FakeNorm()], steps="0").run()
    s = runner(run, [FakeNorm(FakeNorm.Params(tag="other"))], steps="0").run()
    assert s.counts[("_t_norm", "ok")] == 1  # other params -> other key -> computed, not reused
    assert len(ResultStore(run).entries("_t_norm")) == 2


def test_failures_are_isolated_recorded_and_retried(run, tmp_path):
    good = (run / "step_000001" / "model.safetensors").read_bytes()
    (run / "step_000001" / "model.safetensors").write_bytes(good[: len(good) // 2])  # truncated: corrupt
    sd = {
        k: v
        for k, v in __import__("safetensors.torch", fromlist=["load_file"])
        .load_file(run / "step_000002" / "model.safetensors")
        .items()
    }
    first = sorted(sd)[0]
    sd[first] = sd[first].clone().fill_(float("nan"))
    nan_dir = tmp_path / "nan"
    shutil.copytree(run / "step_000002", nan_dir)
    from safetensors.torch import save_file

    save_file(sd, nan_dir / "model.safetensors", metadata={"format": "pt"})
    m = Manifest.load(run)
    shutil.rmtree(run / "step_000002")
    shutil.copytree(nan_dir, run / "step_000002")  # NaN weights, manifest hash updated (a diverged run)
    m.checkpoints[2].sha256 = weights_sha256(run / "step_000002")
    foreign = run / "step_000003"  # a foreign (GPT-2) folder listed as a checkpoint
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    save_file({"w": torch.randn(4)}, foreign / "model.safetensors")
    m.add(CheckpointEntry(step=3, path=foreign.name, sha256=weights_sha256(foreign)))
    m.save(run)

    s = runner(run, [FakeNorm(), FakeMasked()]).run()
    failed = {(o.step, o.analysis) for o in s.failures}
    assert {st for st, _ in failed} == {1, 2, 3} and s.counts[("_t_norm", "ok")] == 2
    errors = {f["checkpoint"]: f["error"] for f in ResultStore(run).failures() if f["analysis"] == CHECKPOINT_SCOPE}
    assert "corrupted weights file" in errors["step_000001"]  # caught by the hash check before loading
    assert "NaN" in errors["step_000002"]
    assert "not a supported BERT/RoBERTa checkpoint" in errors["step_000003"]  # foreign architecture

    # repair step 1 (and its manifest hash): a re-run retries the failures only and clears the fixed record
    (run / "step_000001" / "model.safetensors").write_bytes(good)
    cap = RecordingCapture()
    s = runner(run, [FakeNorm(), FakeMasked()], cap).run()
    assert len(cap.calls) == 1 and s.counts[("_t_norm", "ok")] == 1 and s.counts[("_t_norm", "cached")] == 2
    assert {f["checkpoint"] for f in ResultStore(run).failures()} == {"step_000002", "step_000003"}
    assert sorted(load_results(run, "_t_norm")["step"].unique()) == [0, 1, 4]


def test_corrupt_weights_without_manifest(tmp_path):
    run = make_run(tmp_path / "suite", steps=(0, 5), manifest=False)
    w = run / "step_000005" / "model.safetensors"
    w.write_bytes(b"\x00" * 16)
    s = runner(run, [FakeNorm()]).run()
    assert [(o.step, o.status) for o in s.failures] == [(5, "failed")]
    assert "corrupted" in s.failures[0].error
    assert load_results(run, "_t_norm")["step"].tolist() == [0, 0]


def test_analysis_failure_does_not_stop_others(run):
    s = runner(run, [Broken(), FakeNorm()], steps="0-1").run()
    assert s.counts[("_t_broken", "failed")] == 2 and s.counts[("_t_norm", "ok")] == 2
    recs = [f for f in ResultStore(run).failures() if f["analysis"] == "_t_broken"]
    assert len(recs) == 2 and "boom in update" in recs[0]["error"] and "Traceback" in recs[0]["traceback"]


def test_skips_are_final(tmp_path):
    run = make_run(tmp_path / "headless", steps=(0,), model_cls="BertModel")
    s = runner(run, [NeedsHead(), SkipAlways(), FakeNorm()]).run()
    assert s.counts[("_t_head", "skipped")] == 1 and s.counts[("_t_skip", "skipped")] == 1
    assert s.counts[("_t_norm", "ok")] == 1 and s.failed == 0
    reasons = {m["analysis"]: m["reason"] for m in ResultStore(run).entries() if m["status"] == "skipped"}
    assert "no MLM head" in reasons["_t_head"]
    s = runner(run, [NeedsHead(), SkipAlways()]).run()
    assert s.counts[("_t_head", "cached")] == 1  # not retried


@pytest.mark.parametrize("workers", [1, 2])
def test_warm_start_chain_in_step_order(run, workers):
    s = runner(run, [Chained(), FakeNorm()], workers=workers).run()
    assert s.failed == 0
    df = load_results(run, "_t_chain")
    assert df[["step", "prev_step"]].values.tolist() == [[0, -1], [1, 0], [2, 1], [4, 2]]
    store = ResultStore(run)
    assert all((store.root / "_t_chain" / m["dirname"] / "translator.txt").exists() for m in store.entries("_t_chain"))
    assert all(m["warnings"] == ["UserWarning: small sample"] for m in store.entries("_t_chain"))
    if workers == 2:  # the parallel path gives the same numbers as the in-process one
        par = load_results(run, "_t_norm")
        runner(run, [FakeNorm()], force=True).run()
        pd.testing.assert_frame_equal(par, load_results(run, "_t_norm"))


def test_follow_picks_up_new_checkpoints_until_finished(tmp_path):
    run = make_run(tmp_path / "live", steps=(0,), status="training")

    def trainer():
        time.sleep(0.5)
        add_checkpoint(run, 3)
        time.sleep(0.5)
        m = Manifest.load(run)
        m.run["status"] = "finished"
        m.save(run)

    t = threading.Thread(target=trainer)
    t.start()
    t0 = time.monotonic()
    s = runner(run, [FakeNorm()], follow=True, poll_s=0.1, idle_timeout_s=30).run()
    t.join()
    assert time.monotonic() - t0 < 20
    assert s.counts[("_t_norm", "ok")] == 2
    assert sorted(load_results(run, "_t_norm")["step"].unique()) == [0, 3]


def test_parse_steps_and_bad_input(run):
    ok = parse_steps("0,100,400-2000,5000-")
    assert [s for s in (0, 1, 100, 399, 400, 2000, 2001, 5000, 10**7) if ok(s)] == [0, 100, 400, 2000, 5000, 10**7]
    assert parse_steps("-3")(0) and not parse_steps("-3")(4)
    with pytest.raises(RunnerError, match="bad --steps"):
        parse_steps("1,x")
    with pytest.raises(RunnerError, match="does not exist"):
        Runner(run / "nope")
    with pytest.raises(RunnerError, match="unknown analysis"):
        Runner(run, RunnerConfig(analyses=["no_such_analysis"]))
    with pytest.raises(RunnerError, match="backend"):
        Runner(run, RunnerConfig(backend="slurm"), analyses=[FakeNorm()])


_KILL_SCRIPT = """
import sys
sys.path[:0] = [{tests!r}, {repo!r}]
from test_runner import SlowNorm, FakeMasked, runner
runner({run!r}, [SlowNorm(), FakeMasked()]).run()
"""


def test_kill_9_then_resume(tmp_path):
    """kill -9 mid-run: finished results survive untouched, nothing half-written is read, the re-run completes."""
    run = make_run(tmp_path / "k", steps=(0, 1, 2, 3, 4, 5))
    script = tmp_path / "go.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(TESTS_DIR), repo=str(REPO), run=str(run)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    store = ResultStore(run)
    try:
        deadline = time.monotonic() + 120
        while (
            time.monotonic() < deadline
            and len(list((store.root / "_t_norm").glob("*/meta.json")) if (store.root / "_t_norm").exists() else []) < 2
        ):
            time.sleep(0.05)
            assert proc.poll() is None, "runner exited before it could be killed"
        time.sleep(0.3)  # land somewhere inside the next checkpoint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {m["dirname"]: m["result_id"] for m in store.entries("_t_norm")}
    assert 2 <= len(finished) < 6
    partial = load_results(run, "_t_norm")  # only complete results, never a half-written one
    assert partial["step"].nunique() == len(finished) and partial["norm"].notna().all()
    both = {m["ckpt_hash"] for m in store.entries("_t_norm")} & {m["ckpt_hash"] for m in store.entries("_t_masked")}
    cap = RecordingCapture()
    s = runner(run, [FakeNorm(), FakeMasked()], cap).run()
    assert s.failed == 0 and len(cap.calls) == 6 - len(both)  # only unfinished checkpoints are captured again
    after = {m["dirname"]: m["result_id"] for m in store.entries("_t_norm")}
    assert all(after[k] == v for k, v in finished.items())  # nothing finished was recomputed
    assert sorted(load_results(run, "_t_norm")["step"].unique()) == [0, 1, 2, 3, 4, 5]


# --- CLI -------------------------------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch):
    """The ``mlmscope`` typer app (its error boundary included), with the fakes registered."""
    from typer.testing import CliRunner

    from mlmscope.analyses import base
    from mlmscope.app.cli import app as root

    monkeypatch.setitem(base.REGISTRY, FakeNorm.name, FakeNorm)
    monkeypatch.setitem(base.REGISTRY, FakeMasked.name, FakeMasked)
    runner_ = CliRunner()
    return lambda *args: runner_.invoke(root, [str(a) for a in args], env={"COLUMNS": "250"})


def test_cli_analyze_real_capture_failure_exit_code_and_retry(cli, run, tmp_path):
    from mlmscope.probes.probeset import sentences_of

    probes = sentences_of(PROBES).save(tmp_path / "probes")
    good = (run / "step_000004" / "model.safetensors").read_bytes()
    (run / "step_000004" / "model.safetensors").write_bytes(good[:100])
    res = cli("analyze", run, "-a", "_t_norm,_t_masked", "--probes", probes, "--batch-size", 2)
    assert res.exit_code == 1, res.output
    assert "_t_norm" in res.output and "step 4" in res.output and "Traceback" not in res.output
    df = load_results(run, "_t_norm")  # the real probes.capture path gives the hand-computed numbers
    assert df[df.step == 2].sort_values("layer")["mean0"].tolist() == pytest.approx(
        hand_mean0(run / "step_000002"), rel=1e-4, abs=1e-5
    )
    assert cli("analyses", "failures", run).exit_code == 1
    (run / "step_000004" / "model.safetensors").write_bytes(good)
    res = cli("analyze", run, "-a", "_t_norm", "-a", "_t_masked", "--probes", probes, "--batch-size", 2)
    assert res.exit_code == 0, res.output
    assert sorted(load_results(run, "_t_norm")["step"].unique()) == [0, 1, 2, 4]
    assert cli("analyses", "failures", run).exit_code == 0


def test_cli_bad_input_and_list(cli, run):
    res = cli("analyze", run, "--steps", "1,x", "-a", "_t_norm")
    assert res.exit_code == 1 and "bad --steps item 'x'" in res.output and "Traceback" not in res.output
    res = cli("analyze", run / "missing", "-a", "_t_norm")
    assert res.exit_code == 1 and "does not exist" in res.output
    res = cli("analyze", run, "-a", "nope")
    assert res.exit_code == 1 and "unknown analysis 'nope'" in res.output
    res = cli("analyses", "list")
    assert res.exit_code == 0 and "_t_norm" in res.output and "residual norm per layer" in res.output


def test_cli_param_is_typed_by_the_params_dataclass_and_checked(cli, run):
    from mlmscope.analyses.runner import Runner
    from mlmscope.analyses.sas import SAS

    (sas,) = Runner._make_analyses(["sas"], {"sas": {"min_count": "50", "exclude": "punct,det", "offsets": "-1,1"}})
    assert isinstance(sas, SAS) and sas.params == SAS.Params(min_count=50, exclude=("punct", "det"), offsets=(-1, 1))
    for args, message in [
        (["-p", "sas.min_cnt=5"], "sas has no parameter 'min_cnt'; it has: min_count"),
        (["-p", "sas.min_count=many"], "--param sas.min_count=many: expected an integer"),
        (["-p", "nope.x=1"], "analysis 'nope' is not registered"),
        (["-a", "_t_norm", "-p", "sas.min_count=5"], "not among those requested (-a)"),
        (["-p", "min_count=5"], "--param expects NAME.FIELD=VALUE"),
    ]:
        res = cli("analyze", run, *args)
        assert res.exit_code == 1 and message in " ".join(res.output.split()), (args, res.output)
    (norm,) = Runner._make_analyses(["_t_norm"], {"_t_norm": {"tag": "other"}})
    assert norm.params.tag == "other"
