"""``mlmscope zoom`` on micro runs: replayed checkpoints are the run's (hash-equal), a zoom killed with SIGKILL finishes
when run again without rewriting what it listed, a second zoom adds nothing, and each refusal has its message.

The reference for "the run's": the same config trained from scratch with the zoom's steps in its checkpoint list
(which steps are saved does not change the trajectory).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlmscope.checkpoints.config import make_config
from mlmscope.checkpoints.manifest import Manifest, read_train_log
from mlmscope.checkpoints.train import KEYFRAMES_DIR, checkpoint_steps, keyframe_steps, train
from mlmscope.checkpoints.verify import verify_run
from mlmscope.checkpoints.zoom import (
    LOCK,
    SEGMENTS,
    ZoomError,
    ZoomMismatch,
    environment_diff,
    plan,
    window_steps,
    zoom,
)

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, EVERY = 40, 10  # checkpoints 0, 1, 2, 4, 8, 10, 20, 30, 40; keyframes 4, 8, 10, 20, 30
REFERENCE_STEPS = [0, 12, 14, 16, 24, 28, MAX_STEPS]


@pytest.fixture(scope="module")
def micro(small_corpus):
    return lambda **kw: make_config("micro", corpus=small_corpus, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro) -> Path:
    """A finished micro run with the default keyframes (read-only: tests that write zoom into a copy)."""
    run = tmp_path_factory.mktemp("zoom") / "micro"
    train(run, micro(max_steps=MAX_STEPS, linear_every=EVERY), progress=False)
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro) -> dict[int, str]:
    """Step -> weights hash of the same run trained with :data:`REFERENCE_STEPS` as its checkpoints."""
    run = tmp_path_factory.mktemp("zoom_ref") / "ref"
    m = train(run, micro(max_steps=MAX_STEPS, linear_every=EVERY, steps=REFERENCE_STEPS), progress=False)
    return {c.step: c.sha256 for c in m.checkpoints}


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def _zoom_entries(run: Path) -> dict[int, str]:
    return {c.step: c.sha256 for c in Manifest.load(run).checkpoints if c.segment is not None}


# --- keyframes ----------------------------------------------------------------------------------------------------


def test_keyframes_kept_and_reported(trained):
    m = Manifest.load(trained)
    cfg = make_config("micro", max_steps=MAX_STEPS, linear_every=EVERY).train
    assert keyframe_steps(cfg, checkpoint_steps(cfg)) == [4, 8, 10, 20, 30]
    kept = sorted(int(d.name[5:]) for d in (trained / KEYFRAMES_DIR).iterdir())
    assert kept == m.run["keyframes"]["steps"] == [4, 8, 10, 20, 30]
    sizes = sum(f.stat().st_size for f in (trained / KEYFRAMES_DIR).rglob("state.pt"))
    assert m.run["keyframes"]["bytes"] == sizes > 0
    assert len(m.run["config_sha256"]) == 64
    demo = make_config("demo").train  # the default: 8 keyframes over 8k steps, the longest replay before a window
    assert keyframe_steps(demo, checkpoint_steps(demo)) == [750, 1750, 2500, 3500, 4250, 5250, 6000, 7000]
    assert keyframe_steps(make_config("micro", keyframes=0).train, [0, 10, 20]) == []


def test_window_steps_and_plan(trained):
    assert window_steps(12, 28, 4) == [12, 16, 20, 24, 28]
    assert window_steps(12, 27, 4) == [12, 16, 20, 24, 27]
    p = plan(Manifest.load(trained), 12, 28, 4)
    assert p.missing == [12, 16, 24, 28] and p.stop == 30  # 20 is the run's; the replay ends at the next checkpoint
    assert plan(Manifest.load(trained), 20, 30, 10).missing == []


# --- the replay is the run ----------------------------------------------------------------------------------------


def test_zoom_writes_the_runs_own_checkpoints(trained, reference, tmp_path):
    run = _copy(trained, tmp_path)
    before = {c.step: c for c in Manifest.load(run).checkpoints}
    r = zoom(run, 12, 28, 4)
    assert r.written == [12, 16, 24, 28] and r.restored_from == 10 and not r.from_scratch
    assert r.verified == [20, 30] and r.verified_original == 2  # passed on the way, hash-equal
    assert r.losses_checked == r.replayed_steps == 20  # steps 10 -> 30, each loss equal to train_log.jsonl
    zoomed = _zoom_entries(run)
    assert zoomed == {s: reference[s] for s in (12, 16, 24, 28)}  # bit-identical to training with these checkpoints
    m = Manifest.load(run)
    assert {c.step: c for c in m.checkpoints if c.segment is None} == before  # the run's own entries untouched
    (seg,) = m.run[SEGMENTS]
    assert seg["id"] == r.segment == 1 and seg["status"] == "finished"
    assert (seg["from"], seg["to"], seg["every"]) == (12, 28, 4)
    assert seg["steps"] == [12, 16, 24, 28] and seg["verified"] == [20, 30]
    assert seg["who"] and seg["started"] and seg["finished"] and seg["restored_from"] == 10
    entry = next(c for c in m.checkpoints if c.step == 16)
    assert entry.tokens_seen == 16 * 16 * 32 and entry.val_loss is not None and entry.train_loss is not None
    assert {v.status for v in verify_run(run)} == {"ok"}
    assert not (run / KEYFRAMES_DIR / "zoom").exists() and not list(run.glob(".zoom_verify*"))
    assert len(read_train_log(run)) == MAX_STEPS  # the replay does not log

    from mlmscope.analyses.trajectory import Trajectory

    frame = Trajectory(run).checkpoints_frame()  # ordinary checkpoints to the trajectory API
    assert {12, 16, 24, 28} <= set(frame["step"]) and frame["segment"].notna().sum() == 4


def test_second_zoom_adds_nothing_and_overlap_writes_only_the_missing(trained, reference, tmp_path):
    run = _copy(trained, tmp_path)
    zoom(run, 12, 28, 4)
    text = (run / "manifest.json").read_text()
    again = zoom(run, 12, 28, 4)
    assert again.segment is None and again.written == [] and again.plan.missing == []
    assert (run / "manifest.json").read_text() == text  # not even rewritten
    finer = zoom(run, 12, 16, 2)  # 12 and 16 exist: only 14 is new; the earlier zoom's 12 and 16 are re-checked
    assert finer.written == [14] and finer.verified == [12, 16, 20] and finer.verified_original == 1
    assert _zoom_entries(run)[14] == reference[14]
    assert [s["id"] for s in Manifest.load(run).run[SEGMENTS]] == [1, 2]


def test_without_keyframes_replays_from_step_zero(trained, reference, tmp_path):
    run = _copy(trained, tmp_path)
    shutil.rmtree(run / KEYFRAMES_DIR)  # a run trained before keyframes (or with --keyframes 0)
    lines = []
    r = zoom(run, 12, 14, 2, say=lines.append)
    assert r.from_scratch and r.written == [12, 14]
    assert r.verified == [0, 1, 2, 4, 8, 10, 20]  # the initialisation too
    assert _zoom_entries(run) == {12: reference[12], 14: reference[14]}
    assert any("replaying from step 0" in line for line in lines)


# --- kill -9 and rerun ----------------------------------------------------------------------------------------------

_CHILD = """
import sys
from mlmscope.checkpoints.zoom import zoom
zoom(sys.argv[1], 1, 39, 1)
"""


def test_zoom_killed_then_rerun_finishes_without_rewriting(trained, reference, tmp_path):
    run = _copy(trained, tmp_path)
    total = len(plan(Manifest.load(run), 1, 39, 1).missing)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(run)], cwd=REPO)
    deadline = time.time() + 600
    while time.time() < deadline and child.poll() is None:
        try:
            if len(_zoom_entries(run)) >= 4:
                break
        except (OSError, ValueError):  # the manifest is replaced atomically, but may not exist yet on a slow start
            pass
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = _zoom_entries(run)
    assert 4 <= len(done) < total, (len(done), total)
    stamps = {s: (run / f"step_{s:06d}" / "model.safetensors").stat().st_mtime_ns for s in done}
    assert Manifest.load(run).run[SEGMENTS][0]["status"] == "running"

    r = zoom(run, 1, 39, 1)
    assert set(r.written) == set(range(1, 40)) - {1, 2, 4, 8, 10, 20, 30} - set(done)  # only what was missing
    assert all((run / f"step_{s:06d}" / "model.safetensors").stat().st_mtime_ns == stamps[s] for s in done)
    assert max(done) in r.verified or r.restored_from >= max(done)  # re-checked, or the rolling state is there
    zoomed = _zoom_entries(run)
    assert len(zoomed) == total and all(zoomed[s] == reference[s] for s in (12, 14, 16, 24, 28))
    (seg,) = Manifest.load(run).run[SEGMENTS]
    assert seg["status"] == "finished" and seg["resumed"] == 1 and len(seg["steps"]) == total
    assert {v.status for v in verify_run(run)} == {"ok"}
    assert not list(run.glob(".step_*.tmp"))


# --- proof of identity: a replay that differs is undone -----------------------------------------------------------


@pytest.mark.parametrize("with_log", [True, False], ids=["loss-check", "hash-check"])
def test_replay_that_differs_is_undone(trained, tmp_path, monkeypatch, with_log):
    import mlmscope.checkpoints.zoom as zm

    run = _copy(trained, tmp_path)
    if not with_log:
        (run / "train_log.jsonl").unlink()  # no per-step losses: the hash at step 30 must catch it
    real = zm.replay_step

    def drifting(replay):
        loss = real(replay)
        if replay.state.step == 25:  # e.g. another thread count: a difference in one update
            with torch.no_grad():
                replay.model.bert.embeddings.word_embeddings.weight.mul_(1.01)  # tied to the MLM decoder
        return loss

    monkeypatch.setattr(zm, "replay_step", drifting)
    before = Manifest.load(run).checkpoints
    with pytest.raises(ZoomMismatch) as e:
        zoom(run, 12, 28, 2)
    msg = str(e.value)
    if with_log:  # the loss of step 26 is the first that differs; 12 … 24 were written (20 is the run's)
        assert "at step 26" in msg and "replayed loss" in msg and "(6 checkpoints removed)" in msg
    else:  # without the log the replay goes on to the run's checkpoint 30, whose hash differs
        assert "at step 30" in msg and "replayed weights hash" in msg and "(8 checkpoints removed)" in msg
    assert "the zoom was undone" in msg and "environment matches" in msg
    m = Manifest.load(run)
    assert m.checkpoints == before and m.run[SEGMENTS] == []
    assert not list(run.glob("step_00001[2-9]")) and not (run / "step_000022").exists()
    assert {v.status for v in verify_run(run)} == {"ok"}


def test_environment_diff_names_what_differs():
    meta = {"versions": {"torch": "0.0.1"}, "device": "cuda", "threads": 64, "levers": {"hardware": {"cuda": True}}}
    diff = " | ".join(environment_diff(meta, "cpu", 2))
    assert "torch" in diff and "recorded 0.0.1" in diff
    assert "device cpu (recorded cuda)" in diff and "2 torch threads (recorded 64)" in diff and "CUDA False" in diff
    same = {"versions": {"torch": torch.__version__}, "device": "cpu", "threads": 2}
    assert environment_diff(same, "cpu", 2) == []


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start, end, every, message",
    [
        (0, 41, 1, "outside the run: its checkpoints cover steps 0–40"),
        (-5, 10, 1, "outside the run"),
        (20, 10, 1, "is empty"),
        (10, 20, 0, "--every must be at least 1 step, got 0"),
        (10, 20, -3, "--every must be at least 1"),
    ],
)
def test_refuses_bad_windows(trained, start, end, every, message):
    text = (trained / "manifest.json").read_text()
    with pytest.raises(ZoomError, match=message):
        zoom(trained, start, end, every)
    assert (trained / "manifest.json").read_text() == text


def _edit_manifest(run: Path, edit) -> None:
    data = json.loads((run / "manifest.json").read_text())
    edit(data["run"])
    (run / "manifest.json").write_text(json.dumps(data))


def test_refuses_an_edited_config(trained, tmp_path):
    run = _copy(trained, tmp_path)
    _edit_manifest(run, lambda r: r["config"]["train"].update(lr=0.5))
    with pytest.raises(ZoomError, match="config in .* no longer matches the one the run was trained with"):
        zoom(run, 12, 14, 2)
    assert not _zoom_entries(run)


def test_refuses_a_run_still_training(trained, tmp_path):
    run = _copy(trained, tmp_path)
    _edit_manifest(run, lambda r: r.update(status="training"))
    with pytest.raises(ZoomError, match="is being trained .*--resume"):
        zoom(run, 12, 14, 2)


def test_refuses_a_changed_tokenizer(trained, tmp_path, micro_model_dir):
    run = _copy(trained, tmp_path)
    shutil.rmtree(run / "tokenizer")
    shutil.copytree(micro_model_dir, run / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    with pytest.raises(ZoomError, match="tokenizer has changed since the run was trained"):
        zoom(run, 12, 14, 2)
    assert not _zoom_entries(run) and not Manifest.load(run).run.get(SEGMENTS)


def test_refuses_a_changed_corpus(tmp_path, small_corpus):
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(small_corpus, corpus)
    run = tmp_path / "run"
    train(run, make_config("micro", corpus=str(corpus), max_steps=10, linear_every=5), progress=False)
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(lines[:-1]))  # one document fewer
    with pytest.raises(ZoomError, match="corpus .* has changed since .* was trained"):
        zoom(run, 1, 4, 1)
    assert not _zoom_entries(run)


def test_refuses_a_second_zoom_at_once(trained, tmp_path):
    import fcntl

    run = _copy(trained, tmp_path)
    with open(run / LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ZoomError, match="another `mlmscope zoom` is writing"):
            zoom(run, 12, 14, 2)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlmscope.app.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--from", "0", "--to", "99", "--every", "5"], "is outside the run"),
        (["--from", "0", "--to", "10", "--every", "0"], "--every must be at least 1"),
        (["--every", "5"], "give the window as --from A --to B, or --around sas|loss"),
        (["--around", "sas", "--every", "5"], "no SAS results"),
        (["--around", "loss", "--from", "1", "--every", "5"], "give either --around or --from/--to"),
    ],
)
def test_cli_refusals_are_one_line(trained, args, message):
    r = _cli("zoom", str(trained), *args, "--no-progress")
    assert r.returncode == 1, r.stderr
    assert message in r.stderr.replace("\n", " ") and "Traceback" not in r.stderr


def test_cli_zoom_reports_what_it_verified(trained, reference, tmp_path):
    run = _copy(trained, tmp_path)
    r = _cli("zoom", str(run), "--from", "24", "--to", "28", "--every", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stderr.split())
    assert "replaying from the saved state of step 20" in out and "wrote 2 checkpoints (24–28 every 4)" in out
    assert "verified: 1 checkpoint(s) of the original run hash-equal" in out and "retraining from step 0" in out
    assert _zoom_entries(run) == {24: reference[24], 28: reference[28]}
    again = _cli("zoom", str(run), "--from", "24", "--to", "28", "--every", "4", "--no-progress")
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_around_window_is_widened_to_the_runs_checkpoints(trained):
    from mlmscope.app.zoom_cli import padded_window

    assert padded_window(trained, 12, 25) == (10, 30)
    assert padded_window(trained, -50, 99) == (0, 40)
    assert padded_window(trained, 20, 20) == (20, 20)


# --- the dashboard shows the zoom -----------------------------------------------------------------------------------


def test_dashboard_marks_the_zoom_segment(trained, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from mlmscope.app.views.common import ZOOM_MARK

    run = _copy(trained, tmp_path)
    zoom(run, 12, 28, 4)
    monkeypatch.setenv("MLMSCOPE_RUNS", str(run))
    at = AppTest.from_file(str(REPO / "app" / "dashboard.py"), default_timeout=180)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    figures = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    shapes = [s for f in figures for s in f["layout"].get("shapes", [])]
    strips = [s for s in shapes if s.get("fillcolor") == ZOOM_MARK["color"]]
    assert strips and {(s["x0"], s["x1"]) for s in strips} == {(12, 28)}
    labels = [a["text"] for f in figures for a in f["layout"].get("annotations", [])]
    assert "zoom: every 4" in labels
    table = at.dataframe[0].value
    at.sidebar.toggle(key="log_x").set_value(True).run()  # log axis: shapes at step + 1, labels in log10 units
    (fig, *_) = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    (strip,) = [s for s in fig["layout"]["shapes"] if s.get("fillcolor") == ZOOM_MARK["color"]]
    (label,) = [a for a in fig["layout"]["annotations"] if a["text"] == "zoom: every 4"]
    assert (strip["x0"], strip["x1"]) == (13, 29) and label["x"] == pytest.approx(math.log10(29))
    assert set(table.loc[table["step"].isin([12, 16, 24, 28]), "segment"]) == {"zoom 1 (every 4)"}
    assert set(table.loc[~table["step"].isin([12, 16, 24, 28]), "segment"]) == {"training"}
