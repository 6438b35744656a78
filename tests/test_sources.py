"""Published trajectories (``mlmscope.analyses.sources``): hub ids and revisions resolved offline from a real Hugging
Face cache layout, suite files, seeds, the missing-revision / not-an-MLM / malformed-suite errors.

The cache is built on disk as ``huggingface_hub`` writes it (``models--ORG--NAME/refs/<rev>`` holding the commit hash,
``snapshots/<commit>/<file>`` relative symlinks to ``blobs/<hash>``; git blob sha1 for small files, sha256 for the
LFS weights) from tiny random-config checkpoints, and read through the library's own functions
(``snapshot_download(local_files_only=True)``, ``scan_cache_dir``). Downloads need the hub: the one-at-a-time
download / ``--evict`` loop is exercised with a fake download (a copy into the cache) and the real eviction
(``scan_cache_dir().delete_revisions``), never with the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlmscope.analyses import sources as S
from mlmscope.analyses.store import load_results
from mlmscope.checkpoints.manifest import Manifest, weights_sha256
from mlmscope.probes.probeset import sentences_of
from test_runner import PROBES, FakeNorm

ORG = "test-org"
#: Files huggingface_hub stores as LFS (blob named by the sha256 of the content).
LFS = ("model.safetensors", "pytorch_model.bin")


# --- a Hugging Face cache on disk -----------------------------------------------------------------------------------
def add_to_cache(cache: Path, repo: str, folder: Path, revision: str | None = "main") -> str:
    """Put ``folder``'s files into ``cache`` as revision ``revision`` of ``repo``; return the commit hash."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    commit = hashlib.sha1((repo + str(revision)).encode() + b"".join(f.read_bytes() for f in files)).hexdigest()
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = f.read_bytes()
        if f.name in LFS:
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo_dir / "blobs" / blob).write_bytes(data)
        link = snap / f.name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / blob, snap))
    if revision is not None:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / revision).write_text(commit)  # huggingface_hub writes the hash without a newline
    return commit


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.lstat().st_size) for p in folder.rglob("*"))


def multibert_like(src: Path, dst: Path) -> Path:
    """A MultiBERTs-shaped copy of a micro checkpoint: BertForPreTraining, pytorch_model.bin, vocab.txt, no
    tokenizer.json (what google/multiberts-seed_N-step_Mk repos hold)."""
    import torch
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BertForPreTraining"]
    (dst / "config.json").write_text(json.dumps(cfg))
    torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
    vocab = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    (dst / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    (dst / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return dst


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """Random micro checkpoints, (seed, step) -> folder: 3 seeds x steps 0, 10, 20 (weights differ everywhere)."""
    from conftest import _save_micro

    root = tmp_path_factory.mktemp("hub_src")
    return {
        (seed, step): _save_micro(root / f"s{seed}_step{step}", seed=100 * seed + step)
        for seed in (0, 1, 2)
        for step in (0, 10, 20)
    }


@pytest.fixture
def cache(tmp_path, monkeypatch, micro) -> Path:
    """A Hugging Face cache: test-org/micro with revisions step_0/10/20 (seed 0), test-org/micro-seed_1 and
    _2 likewise, MultiBERTs-style repos test-org/mb-seed_0-step_{0,10}k, a GPT-2 repo and a repo with no config."""
    c = tmp_path / "hf_cache"
    for seed in (0, 1, 2):
        repo = f"{ORG}/micro" if seed == 0 else f"{ORG}/micro-seed_{seed}"
        for step in (0, 10, 20):
            add_to_cache(c, repo, micro[(seed, step)], revision=f"step_{step}")
    for k, step in ((0, 0), (10, 10)):
        mb = multibert_like(micro[(1, step)], tmp_path / f"mb{k}")
        add_to_cache(c, f"{ORG}/mb-seed_0-step_{k}k", mb)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    shutil.copy(micro[(0, 0)] / "model.safetensors", gpt / "model.safetensors")
    add_to_cache(c, f"{ORG}/gpt", gpt, revision="step_5")
    readme = tmp_path / "readme_only"
    readme.mkdir()
    (readme / "README.md").write_text("# not a model\n")
    add_to_cache(c, f"{ORG}/notes", readme, revision="step_5")
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # runs/hub and runs/suites are created here
    return c


@pytest.fixture
def cli(monkeypatch):
    from typer.testing import CliRunner

    from mlmscope.analyses import base
    from mlmscope.app.cli import app as root

    monkeypatch.setitem(base.REGISTRY, FakeNorm.name, FakeNorm)
    runner_ = CliRunner()
    return lambda *args: runner_.invoke(root, [str(a) for a in args], env={"COLUMNS": "250"})


@pytest.fixture
def probes(tmp_path):
    return sentences_of(PROBES).save(tmp_path / "probes")


def _one_error_line(output: str) -> str:
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in output, output
    return lines[0]


# --- naming -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, step",
    [
        ("step_0", 0),
        ("step_20000", 20000),
        ("step1000", 1000),
        ("checkpoint-300", 300),
        ("multiberts-seed_0-step_20k", 20000),
        ("multiberts-seed_3-step_2000k", 2_000_000),
        ("main", None),
        ("seed_1", None),
        ("stepwise", None),
    ],
)
def test_step_is_read_from_the_name_never_guessed(name, step):
    assert S.step_from_name(name) == step


def test_revision_without_a_step_is_an_error(cache):
    with pytest.raises(S.SourceError, match="cannot tell the step of test-org/micro@main"):
        S.parse_hub_spec("hf:test-org/micro", revisions="main")
    with pytest.raises(S.SourceError, match="which checkpoints.*step_0, step_10, step_20"):
        S.parse_hub_spec("hf:test-org/micro")  # the cached step revisions are listed
    with pytest.raises(S.SourceError, match="step 0 is given twice"):
        S.parse_hub_spec("hf:test-org/micro", revisions="step_0,step_000")


def test_revision_patterns_match_the_cached_refs(cache):
    suite = S.parse_hub_spec("hf:test-org/micro", revisions="step_*")
    assert [c.revision for c in suite.checkpoints] == ["step_0", "step_10", "step_20"]  # by step, not by name
    assert [c.step for c in suite.checkpoints] == [0, 10, 20]
    with pytest.raises(S.SourceError, match="no revision of test-org/micro in the Hugging Face cache matches"):
        S.parse_hub_spec("hf:test-org/micro", revisions="ckpt-*")


# --- acceptance: hf:ORG/NAME --revisions = the same checkpoints from a local folder -------------------------------
def test_hub_revisions_give_the_local_folders_results(cli, cache, micro, probes, tmp_path):
    from huggingface_hub import scan_cache_dir

    local = tmp_path / "local"
    for step in (0, 10, 20):
        shutil.copytree(micro[(0, step)], local / f"step_{step:06d}")
    args = ("-a", "attention,_t_norm", "--probes", probes, "--batch-size", 2, "--threads", 1)
    res = cli("analyze", local, *args)
    assert res.exit_code == 0, res.output
    before = _listing(cache)
    res = cli("analyze", "hf:test-org/micro", "--revisions", "step_0,step_10,step_20", *args)
    assert res.exit_code == 0, res.output
    assert "published trajectory" in res.output and "runs/hub/test-org--micro" in res.output
    assert _listing(cache) == before  # nothing written into the cache
    run = Path("runs/hub/test-org--micro")
    assert load_results(run, "attention", "heads").groupby("step").size().to_dict() == {0: 4, 10: 4, 20: 4}
    for name in ("attention", "_t_norm"):
        pd.testing.assert_frame_equal(load_results(run, name), load_results(local, name))
    m = Manifest.load(run)
    assert [c.step for c in m.checkpoints] == [0, 10, 20]
    assert [c.sha256 for c in m.checkpoints] == [weights_sha256(local / f"step_{s:06d}") for s in (0, 10, 20)]
    info = {r.repo_id: r for r in scan_cache_dir(cache).repos}[f"{ORG}/micro"]
    commits = {ref: rev.commit_hash for rev in info.revisions for ref in rev.refs}
    for step in (0, 10, 20):
        link = run / f"step_{step:06d}"
        assert link.is_symlink() and Path(os.readlink(link)).name == commits[f"step_{step}"]
        assert m.run["hub"][link.name] == {
            "step": step,
            "repo": f"{ORG}/micro",
            "revision": f"step_{step}",
            "commit": commits[f"step_{step}"],
            "path": None,
            "seed": None,
            "folder": os.readlink(link),
        }
    from mlmscope.analyses.store import ResultStore

    stored = len(ResultStore(run).entries())
    again = cli("analyze", "hf:test-org/micro", "--revisions", "step_*", *args)  # a pattern; all cached
    assert again.exit_code == 0 and "cached" in again.output, again.output
    assert len(ResultStore(run).entries()) == stored  # nothing recomputed
    assert cli("analyses", "failures", run).exit_code == 0
    report = cli("report", "hf:test-org/micro")  # the source finds its results folder
    assert report.exit_code == 0 and "published checkpoints from `hf:test-org/micro`" in report.output, report.output
    from mlmscope.analyses.trajectory import Trajectory

    assert Trajectory("hf:test-org/micro").results("attention")["step"].unique().tolist() == [0, 10, 20]


def test_hub_id_list_one_repo_per_step_multiberts_style(cli, cache, micro, probes):
    res = cli(
        "analyze",
        "hf:test-org/mb-seed_0-step_0k,test-org/mb-seed_0-step_10k",
        "-a",
        "attention",
        "--probes",
        probes,
        "--threads",
        1,
    )
    assert res.exit_code == 0, res.output
    run = Path("runs/hub/test-org--mb-seed_0")
    m = Manifest.load(run)
    assert [c.step for c in m.checkpoints] == [0, 10_000]  # step_10k = 10,000
    bin_hash = hashlib.sha256((run / "step_010000" / "pytorch_model.bin").read_bytes()).hexdigest()
    assert m.checkpoints[1].sha256 == bin_hash  # a .bin checkpoint is keyed by its file's hash
    df = load_results(run, "attention", "heads")
    assert sorted(df["step"].unique()) == [0, 10_000] and len(df) == 2 * 2 * 2  # 2 steps x 2 layers x 2 heads
    # BertForPreTraining loads as BertForMaskedLM: same attention as the safetensors original
    ref = cli("analyze", micro[(1, 10)], "-a", "attention", "--probes", probes, "--out", "ref", "--threads", 1)
    assert ref.exit_code == 0, ref.output
    a = df[df["step"] == 10_000].drop(columns="step").reset_index(drop=True)
    b = load_results("ref", "attention", "heads").drop(columns="step").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


# --- clear errors -----------------------------------------------------------------------------------------------------
def test_missing_revision_is_named_with_the_command_to_fetch_it(cli, cache, probes):
    res = cli(
        "analyze", "hf:test-org/micro", "--revisions", "step_0,step_30,step_40", "-a", "_t_norm", "--probes", probes
    )
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "2 of 3 checkpoints of hf:test-org/micro are missing" in line and "HF_HUB_OFFLINE" in line
    assert "test-org/micro@step_30 (step 30): not in the cache" in line
    assert 'hf download test-org/micro --revision step_30 --exclude "*.h5"' in line
    script = Path("runs/hub/test-org--micro") / S.FETCH_SCRIPT
    assert "hf download test-org/micro --revision step_40" in script.read_text()
    res = cli(
        "analyze",
        "hf:test-org/micro",
        "--revisions",
        "step_0,step_30",
        "-a",
        "_t_norm",
        "--probes",
        probes,
        "--skip-missing",
    )
    assert res.exit_code == 0, res.output
    assert "skipped test-org/micro@step_30 (step 30): not in the cache" in res.output
    assert [c.step for c in Manifest.load("runs/hub/test-org--micro").checkpoints] == [0]


def test_missing_weights_in_a_partial_snapshot_are_named(cache, micro, tmp_path):
    part = tmp_path / "partial"
    part.mkdir()
    shutil.copy(micro[(0, 0)] / "config.json", part / "config.json")
    add_to_cache(cache, f"{ORG}/partial", part, revision="step_1")
    with pytest.raises(S.MissingCheckpointsError, match="step_1 \\(step 1\\): no weights file"):
        S.prepare_source("hf:test-org/partial", revisions="step_1")


def test_a_repo_that_is_not_an_mlm_is_refused(cli, cache, probes):
    res = cli("analyze", "hf:test-org/gpt@step_5", "-a", "_t_norm", "--probes", probes)
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "test-org/gpt@step_5 (step 5) is not a BERT/RoBERTa masked language model" in line
    assert "GPT2LMHeadModel" in line
    with pytest.raises(S.MissingCheckpointsError, match="no config.json in the snapshot"):
        S.prepare_source("hf:test-org/notes@step_5")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"checkpoints": [', "is not valid JSON \\(line 1, column"),
        ("[1, 2]", 'expected an object with a "checkpoints" list'),
        ('{"checkpoints": []}', '"checkpoints" must be a non-empty list'),
        ('{"checkpoints": [{"repo": "a/b", "step": 1}], "seed": 3}', "unknown key\\(s\\) seed"),
        ('{"checkpoints": [{"repo": "a/b", "step": "20k"}]}', 'checkpoints\\[0\\]: "step" must be a non-negative'),
        ('{"checkpoints": [{"repo": "a/b", "stp": 1}]}', "checkpoints\\[0\\]: unknown key\\(s\\) stp"),
        ('{"checkpoints": [{"step": 1}]}', 'give exactly one of "repo"'),
        ('{"checkpoints": [{"repo": "a/b@main"}]}', "cannot tell the step of a/b@main"),
        ('{"checkpoints": [{"repo": "not a repo", "step": 1}]}', "is not a hub repo id"),
        (
            '{"checkpoints": [{"repo": "a/b", "step": 1, "seed": 0}, {"repo": "a/c", "step": 2}]}',
            'a/c@main has no "seed" while others do',
        ),
        (
            '{"checkpoints": [{"repo": "a/b", "step": 1, "seed": 0}, {"repo": "a/c", "step": 1, "seed": 0}]}',
            "step 1 of seed 0 is given twice",
        ),
    ],
)
def test_malformed_suite_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "suite.json"
    path.write_text(text)
    with pytest.raises(S.SourceError, match=f"suite file '{path}'.*{message}|{message}"):
        S.load_suite(path)


def test_malformed_yaml_suite_and_cli_one_line(cli, cache, tmp_path):
    bad = tmp_path / "suite.yaml"
    bad.write_text("checkpoints:\n  - repo: a/b\n    step: [1\n")
    with pytest.raises(S.SourceError, match="is not valid YAML \\(line"):
        S.load_suite(bad)
    assert "does not exist" in _one_error_line(cli("analyze", tmp_path / "nope.json").output)
    assert "--revisions is for hf:ORG/NAME" in _one_error_line(cli("analyze", bad, "--revisions", "x").output)
    assert "has no results folder yet" in _one_error_line(cli("app", "hf:test-org/never-analysed").output)
    assert "--evict deletes each checkpoint" in _one_error_line(
        cli("analyze", "hf:test-org/micro", "--revisions", "step_0", "--evict").output
    )


# --- seeds ----------------------------------------------------------------------------------------------------------
def _suite_file(tmp_path: Path) -> Path:
    entries = [
        {
            "repo": f"{ORG}/micro" if seed == 0 else f"{ORG}/micro-seed_{seed}",
            "revisions": ["step_0", "step_10", "step_20"],
            "seed": seed,
        }
        for seed in (0, 1, 2)
    ]
    path = tmp_path / "three_seeds.json"
    path.write_text(json.dumps({"name": "three-seeds", "checkpoints": entries}))
    return path


@pytest.fixture
def analysed_suite(cli, cache, probes, tmp_path) -> tuple[Path, Path]:
    suite = _suite_file(tmp_path)
    res = cli("analyze", suite, "-a", "attention", "--probes", probes, "--batch-size", 2, "--threads", 1)
    assert res.exit_code == 0, res.output
    assert "(3 seeds)" in res.output
    return suite, Path("runs/suites/three-seeds")


def test_suite_of_three_seeds_report_has_seed_bands(cli, analysed_suite):
    from mlmscope.app.report import fmt, seed_bootstrap_ci

    suite, root = analysed_suite
    assert sorted(p.name for p in root.iterdir()) == ["seed_0", "seed_1", "seed_2", S.SUITE_RECORD]
    assert [c.step for c in Manifest.load(root / "seed_2").checkpoints] == [0, 10, 20]
    for s in (0, 1, 2):  # 2 layers x 2 heads at every step of every seed
        assert load_results(root / f"seed_{s}", "attention", "heads").groupby("step").size().tolist() == [4, 4, 4]
    res = cli("report", suite)
    assert res.exit_code == 0, res.output
    text = res.output
    assert "## Seed group report" in text and "3 seeds (seed_0, seed_1, seed_2)" in text
    assert "**attention entropy / uniform**" in text
    per_seed = []
    for s in (0, 1, 2):
        h = load_results(root / f"seed_{s}", "attention", "heads")
        h = h[h["step"] == 20]
        per_seed.append(float((h["entropy"] / h["entropy_uniform"]).mean()))
    mean, sd = np.mean(per_seed), np.std(per_seed, ddof=1)
    lo, hi = seed_bootstrap_ci(per_seed)
    eps = 1e-12  # a resample of one seed three times averages to that seed's value up to rounding
    assert lo <= mean <= hi and lo >= min(per_seed) - eps and hi <= max(per_seed) + eps
    assert f"| 20 | 3 | {fmt(mean)} ± {fmt(sd)} | {fmt(lo)} – {fmt(hi)} |" in text
    from mlmscope.analyses.trajectory import Trajectory

    t = Trajectory(suite)
    assert sorted(t.seeds) == ["seed_0", "seed_1", "seed_2"]
    assert t.results("attention", "heads").groupby("seed")["step"].nunique().tolist() == [3, 3, 3]


def test_suite_of_three_seeds_is_a_band_in_the_dashboard(monkeypatch, analysed_suite):
    from test_dashboard import _app, _arr, _figures

    _, root = analysed_suite
    at = _app(monkeypatch, root.resolve(), page="attention")
    label = f"{root.resolve()} (mean of 3 seeds)"
    assert label in at.sidebar.multiselect(key="runs").options
    at.sidebar.multiselect(key="runs").set_value([label]).run()
    assert not at.exception, [e.value for e in at.exception]
    fig = next(f for f in _figures(at) if f["layout"].get("title", {}).get("text") == "Mean over heads")
    line = next(t for t in fig["data"] if t.get("name") == f"{label} · L1")
    heads = pd.concat([load_results(root / f"seed_{s}", "attention", "heads") for s in (0, 1, 2)])
    expected = heads[heads["layer"] == 1].groupby("step")["entropy"].mean()
    np.testing.assert_allclose(_arr(line["y"]), expected.to_numpy(), rtol=1e-9)
    assert [t for t in fig["data"] if t.get("fill") == "toself"], "a seed group must be drawn with a band"
    from mlmscope.app.views.data import discover_sources

    found, problems = discover_sources([str(_suite_file(Path.cwd()))])  # the suite file stands for its folder
    assert not problems and any(s.is_group and len(s.runs) == 3 for s in found)


# --- one at a time with downloads, --evict (fake download, real eviction) ------------------------------------------
def test_download_one_at_a_time_and_evict(cli, cache, micro, probes, monkeypatch, tmp_path):
    from huggingface_hub import scan_cache_dir

    add_to_cache(cache, f"{ORG}/fresh", micro[(2, 0)], revision="step_0")  # step_10, step_20 are only "on the hub"
    fetched = []

    def fake_fetch(ck, cache_dir):  # the download: the revision's files land in the cache as huggingface_hub puts them
        fetched.append(ck.revision)
        add_to_cache(cache_dir, ck.repo, micro[(2, ck.step)], revision=ck.revision)
        return Path(S.locate(ck, cache_dir).folder or "")

    monkeypatch.setattr(S, "fetch", fake_fetch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # as with the hub reachable (huggingface_hub itself stays offline)
    args = ("-a", "_t_norm", "--probes", probes, "--threads", 1)
    res = cli("analyze", "hf:test-org/fresh", "--revisions", "step_0,step_10,step_20", "--evict", *args)
    assert res.exit_code == 0, res.output
    assert fetched == ["step_10", "step_20"]  # only what the cache lacked, one at a time
    assert res.output.count("evicted test-org/fresh@") == 3
    assert not [r for r in scan_cache_dir(cache).repos if r.repo_id == f"{ORG}/fresh"]  # nothing left on disk
    run = Path("runs/hub/test-org--fresh")
    m = Manifest.load(run)
    assert [c.step for c in m.checkpoints] == [0, 10, 20] and all(c.sha256 for c in m.checkpoints)
    assert sorted(load_results(run, "_t_norm")["step"].unique()) == [0, 10, 20]
    # offline again, weights gone: everything is found by hash, nothing is missing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = cli("analyze", "hf:test-org/fresh", "--revisions", "step_0,step_10,step_20", *args)
    assert again.exit_code == 0 and "cached" in again.output, again.output
    # ... but a new analysis needs the weights: they are named as missing
    res = cli("analyze", "hf:test-org/fresh", "--revisions", "step_0,step_10", "-a", "attention", "--probes", probes)
    assert res.exit_code == 1
    line = _one_error_line(res.output.split("\n", 1)[1])  # after the line saying what is analysed
    assert "evicted from the cache" in line and "hf download test-org/fresh --revision step_10" in line
    res = cli(
        "analyze",
        "hf:test-org/fresh",
        "--revisions",
        "step_0,step_10",
        "-a",
        "attention",
        "--probes",
        probes,
        "--skip-missing",
    )
    assert res.exit_code == 0 and "skipped test-org/fresh@step_10 (step 10): evicted" in res.output, res.output


def test_yaml_suite_with_local_folders(cli, cache, micro, probes, tmp_path):
    for step in (0, 10):
        shutil.copytree(micro[(1, step)], tmp_path / "mine" / f"ckpt-{step}")
    suite = tmp_path / "mixed.yaml"
    suite.write_text(
        "checkpoints:\n"
        "  - {path: mine/ckpt-0}\n"  # relative to the suite file; step from the folder name
        "  - {path: mine/ckpt-10, step: 10}\n"
        "  - {repo: test-org/micro, revision: step_20}\n"
    )
    res = cli("analyze", suite, "-a", "_t_norm", "--probes", probes, "--threads", 1)
    assert res.exit_code == 0, res.output
    run = Path("runs/suites/mixed")  # no seeds: the suite folder is the run
    m = Manifest.load(run)
    assert [c.step for c in m.checkpoints] == [0, 10, 20]
    assert os.readlink(run / "step_000010") == str((tmp_path / "mine" / "ckpt-10").resolve())
    assert m.run["hub"]["step_000000"]["path"] == str((tmp_path / "mine" / "ckpt-0").resolve())
    assert m.checkpoints[1].sha256 == weights_sha256(micro[(1, 10)])
    assert sorted(load_results(run, "_t_norm")["step"].unique()) == [0, 10, 20]
    report = cli("report", suite)
    assert report.exit_code == 0 and "## Trajectory report: `runs/suites/mixed`" in report.output, report.output
