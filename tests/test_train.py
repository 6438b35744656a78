"""Trainer, trajectory store and their failure modes (micro preset on the default corpus: seconds each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlmscope.checkpoints.config import make_config
from mlmscope.checkpoints.data import Masker, StepBatches, unigram_entropy
from mlmscope.checkpoints.manifest import CheckpointEntry, Manifest, list_checkpoints, read_train_log, weights_sha256
from mlmscope.checkpoints.train import TrainingError, checkpoint_steps, lr_factor, train
from mlmscope.checkpoints.verify import verify_run
from tolerance import assert_close_scaled

REPO = Path(__file__).resolve().parents[1]
_THREADS_AT_START = torch.get_num_threads()


@pytest.fixture(scope="module")
def micro(small_corpus):
    """make_config("micro", ...) on the small test corpus."""
    return lambda **kw: make_config("micro", corpus=small_corpus, **kw)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, micro):
    run = tmp_path_factory.mktemp("runs") / "micro"
    train(run, micro(max_steps=40, linear_every=10), progress=False)
    return run


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(data))


# --- schedule, lr, masking: hand-computed values ------------------------------------------------------------


def test_schedule_log_then_linear():
    cfg = make_config("demo", linear_every=300, max_steps=12000).train
    steps = checkpoint_steps(cfg)
    assert steps[:10] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert steps[10:13] == [cfg.linear_every, 2 * cfg.linear_every, 3 * cfg.linear_every]
    assert steps[-1] == cfg.max_steps and len(steps) == 10 + 40
    demo = checkpoint_steps(make_config("demo").train)  # the shipped demo: 0, 1, …, 128, then every 250 to 8k
    assert demo[:10] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 250] and demo[-1] == 8000 and len(demo) == 9 + 32


def test_schedule_rejects_non_increasing():
    with pytest.raises(TrainingError, match="strictly increasing"):
        checkpoint_steps(make_config("micro", steps=[0, 10, 10, 20]).train)


def test_lr_warmup_and_decay():
    cfg = make_config("micro", warmup_steps=10, max_steps=110).train
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == 0.0


def test_masking_rates_and_determinism():
    ids = torch.randint(5, 1000, (64, 128))
    ids[:, 0] = 2
    m = Masker(mask_id=4, vocab_size=1000, special_ids=(0, 1, 2, 3, 4), rate=0.15)
    x1, y1 = m(ids, torch.Generator().manual_seed(0))
    x2, y2 = m(ids, torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    chosen = y1 != -100
    assert not chosen[:, 0].any()  # [CLS] never chosen
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    frac_mask = (x1[chosen] == 4).float().mean().item()
    frac_same = (x1[chosen] == ids[chosen]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_same - 0.1) < 0.03
    xm, _ = Masker(4, 1000, (0, 1, 2, 3, 4), 0.15, "mask")(ids, torch.Generator().manual_seed(0))
    assert (xm[chosen] == 4).all()


def test_step_batches_cover_epoch_once_and_shard_by_rank():
    data = torch.arange(40).unsqueeze(1).repeat(1, 8) + 10
    m = Masker(4, 100, (0, 1, 2, 3, 4), 0.0)
    b = StepBatches(data, m, batch_size=4, data_seed=3)
    seen = torch.cat([b.indices(s) for s in range(10)])
    assert sorted(seen.tolist()) == list(range(40))  # one epoch = every sequence exactly once
    r0 = StepBatches(data, m, 2, data_seed=3, rank=0, world_size=2).micro_batches(5)[0][0]
    r1 = StepBatches(data, m, 2, data_seed=3, rank=1, world_size=2).micro_batches(5)[0][0]
    assert torch.equal(torch.cat([r0, r1]), b.micro_batches(5)[0][0])


def test_unigram_entropy_hand_computed():
    data = torch.tensor([[2, 5, 5, 6, 7, 3]])  # tokens 5,5,6,7 → p = (.5,.25,.25)
    expected = -(0.5 * torch.log(torch.tensor(0.5)) + 2 * 0.25 * torch.log(torch.tensor(0.25)))
    assert unigram_entropy(data, (0, 1, 2, 3, 4)) == pytest.approx(expected.item())


# --- the trajectory ------------------------------------------------------------------------------------------


def test_run_manifest_and_checkpoints(micro_run):
    m = Manifest.load(micro_run)
    steps = [c.step for c in m.checkpoints]
    assert steps == [0, 1, 2, 4, 8, 10, 20, 30, 40]
    assert m.run["status"] == "finished"
    for key in ("config", "corpus_fingerprint", "tokenizer_sha256", "versions", "git_commit", "val_unigram_entropy"):
        assert key in m.run
    assert m.checkpoints[-1].val_loss < m.checkpoints[0].val_loss - 0.5  # it learns
    assert m.checkpoints[-1].tokens_seen == 40 * 16 * 32
    assert all(c.duplicate_of is None for c in m.checkpoints)
    for c in m.checkpoints:
        assert weights_sha256(micro_run / c.path) == c.sha256
    assert len(read_train_log(micro_run)) == 40
    assert not list(micro_run.glob(".*.tmp"))


def test_checkpoint_loads_with_hf_and_transformerlens(micro_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tlb = pytest.importorskip("transformer_lens.model_bridge")
    path = str(micro_run / "step_000040")
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForMaskedLM.from_pretrained(path).eval()
    enc = tok(["the city is the capital of france ."], return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc).logits
        bridge = tlb.TransformerBridge.boot_transformers(path, device="cpu")
        out = bridge(enc["input_ids"])
    out = out.logits if hasattr(out, "logits") else out
    assert_close_scaled(out, ref)


def test_zero_lr_flags_duplicates(tmp_path, micro):
    m = train(tmp_path / "flat", micro(max_steps=4, linear_every=2, lr=0.0), progress=False)
    assert [c.duplicate_of for c in m.checkpoints] == [None, 0, 0, 0]


def test_verify_detects_damage_and_duplicates(micro_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    assert {r.status for r in verify_run(run)} == {"ok"}
    _damage(run / "step_000020" / "model.safetensors")
    bad = {r.step: r.status for r in verify_run(run) if r.status != "ok"}
    assert bad in ({20: "mismatch"}, {20: "corrupted"})
    # A folder of checkpoint folders without a manifest: identical copies are flagged as duplicates.
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copytree(micro_run / "step_000010", suite / "step_10")
    shutil.copytree(micro_run / "step_000010", suite / "step_20")
    assert [r.status for r in verify_run(suite)] == ["ok", "duplicate"]
    assert [c.step for c in list_checkpoints(suite)] == [10, 20]
    r = _cli("verify", str(run))
    assert r.returncode == 1 and "failed verification" in r.stderr and "Traceback" not in r.stderr


def test_manifest_add_flags_duplicate():
    m = Manifest()
    m.add(CheckpointEntry(step=0, path="a", sha256="x"))
    e = m.add(CheckpointEntry(step=5, path="b", sha256="x"))
    assert e.duplicate_of == 0


# --- exact resume ---------------------------------------------------------------------------------------------

_CHILD = """
import sys
from mlmscope.checkpoints.config import make_config
from mlmscope.checkpoints.train import train
train(sys.argv[1], make_config("micro", corpus=sys.argv[2], max_steps=120, linear_every=25), progress=False)
"""


def test_resume_after_kill_is_bit_exact(tmp_path, micro, small_corpus):
    cfg = micro(max_steps=120, linear_every=25)
    # The reference runs in a fresh process like the killed run: same thread count, whatever earlier tests set here.
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "ref"), small_corpus], cwd=REPO, check=True)
    ref = Manifest.load(tmp_path / "ref")
    ref_losses = [r["loss"] for r in read_train_log(tmp_path / "ref")]

    run = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(run), small_corpus], cwd=REPO)
    log = run / "train_log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # kill -9 between checkpoints 50 and 75
        if log.exists() and len(log.read_text().splitlines()) >= 60:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = len(read_train_log(run))
    assert 50 < killed_at < 120, killed_at
    torch.set_num_threads(_THREADS_AT_START)  # resume with the children's thread count (a test may have changed it)
    resumed = train(run, cfg, resume=True, progress=False)
    assert [r["loss"] for r in read_train_log(run)] == ref_losses  # bit-identical loss sequence
    assert resumed.checkpoints[-1].sha256 == ref.checkpoints[-1].sha256  # bit-identical final weights
    assert [c.sha256 for c in resumed.checkpoints] == [c.sha256 for c in ref.checkpoints]


def test_resume_refuses_corrupted_weights(tmp_path, micro):
    cfg = micro(max_steps=20, linear_every=10)
    m = train(tmp_path / "r", cfg, progress=False)
    _damage(tmp_path / "r" / m.checkpoints[-1].path / "model.safetensors")
    with pytest.raises(TrainingError, match="corrupted|cannot resume"):
        train(tmp_path / "r", cfg, resume=True, progress=False)


# --- bad input: one clear message, exit 1, nothing finished lost --------------------------------------------


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
    "setup, args, message",
    [
        ("missing", ["--corpus", "{tmp}/nope.txt"], "does not exist"),
        ("empty", ["--corpus", "{tmp}/empty.txt"], "is empty"),
        ("small", ["--corpus", "{tmp}/small.txt", "--vocab-size", "40", "--seq-len", "16"], "fewer than one batch"),
        ("small", ["--corpus", "{tmp}/small.txt"], "supports only"),
        ("none", ["--steps", "0,5,3"], "strictly increasing"),
        ("none", ["--set", "precision=fp8"], "precision=fp8: expected one of auto, fp32, bf16"),
    ],
)
def test_bad_training_input(tmp_path, small_corpus, setup, args, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "small.txt").write_text("\n\n".join(f"the cat number {i} sat on a mat ." for i in range(12)))
    if setup == "none":
        args = ["--corpus", small_corpus, *args]
    r = _cli(
        "train", str(tmp_path / "run"), "--preset", "micro", "--no-progress", *[a.format(tmp=tmp_path) for a in args]
    )
    assert r.returncode == 1, r.stderr
    assert message in r.stderr.replace("\n", " ") and "Traceback" not in r.stderr


def test_existing_run_with_other_config_is_refused(micro_run):
    corpus = Manifest.load(micro_run).run["config"]["data"]["corpus"]
    r = _cli("train", str(micro_run), "--preset", "micro", "--corpus", corpus, "--max-steps", "41", "--no-progress")
    assert r.returncode == 1 and "different config" in r.stderr and "max_steps" in r.stderr
    assert Manifest.load(micro_run).checkpoints[-1].step == 40  # untouched


def test_nan_loss_stops_and_keeps_last_good(tmp_path, monkeypatch, micro):
    import mlmscope.checkpoints.train as tr

    real = tr._train_step

    def poisoned(objective, optimizer, scheduler, batches, step, *rest):
        return float("nan") if step == 12 else real(objective, optimizer, scheduler, batches, step, *rest)

    monkeypatch.setattr(tr, "_train_step", poisoned)
    with pytest.raises(TrainingError, match="at step 13.*last good checkpoint is step 10"):
        train(tmp_path / "nan", micro(max_steps=30, linear_every=10), progress=False)
    m = Manifest.load(tmp_path / "nan")
    assert m.run["status"] == "failed" and m.checkpoints[-1].step == 10
    assert {r.status for r in verify_run(tmp_path / "nan")} == {"ok"}


def test_disk_full_never_lists_half_written_checkpoint(tmp_path, monkeypatch, micro):
    import mlmscope.checkpoints.train as tr

    real, calls = tr.weights_sha256, {"n": 0}

    def full_disk(path):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(path)

    monkeypatch.setattr(tr, "weights_sha256", full_disk)
    with pytest.raises(TrainingError, match="No space left.*last complete checkpoint is step 2"):
        train(tmp_path / "full", micro(max_steps=10, linear_every=5), progress=False)
    run = tmp_path / "full"
    assert [c.step for c in Manifest.load(run).checkpoints] == [0, 1, 2]
    assert not list(run.glob(".step_*")) and not (run / "step_000004").exists()
    monkeypatch.setattr(tr, "weights_sha256", real)
    m = train(run, micro(max_steps=10, linear_every=5), resume=True, progress=False)
    assert [c.step for c in m.checkpoints] == [0, 1, 2, 4, 5, 10]


def test_corpus_formats_and_deterministic_split(tmp_path, monkeypatch):
    import datasets

    from mlmscope.checkpoints.config import DataConfig
    from mlmscope.checkpoints.corpus import CorpusError, load_corpus

    monkeypatch.setenv("MLMSCOPE_CACHE", str(tmp_path / "cache"))
    docs = [f"document number {i} talks about topic {i % 7}." for i in range(200)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    splits = []
    for corpus, field in (("c.jsonl", "body"), ("c.txt", "text"), ("ds", "text")):
        dd, _fp = load_corpus(DataConfig(corpus=str(tmp_path / corpus), text_field=field, val_fraction=0.1))
        assert len(dd["train"]) + len(dd["validation"]) == 200
        assert not set(dd["train"]["text"]) & set(dd["validation"]["text"])
        splits.append(sorted(dd["validation"]["text"]))
    assert splits[0] == splits[1] == splits[2]  # split depends on document text, not on format or order
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        load_corpus(DataConfig(corpus=str(tmp_path / "bad.jsonl")))


def test_sas_regulariser_is_wired_into_training(tmp_path, micro, monkeypatch):
    """λ ≠ 0 switches to eager attention and adds exactly λ·(SAS term) to the MLM loss of each step."""
    import mlmscope.checkpoints.sas_reg as reg
    import mlmscope.checkpoints.train as tr

    seen = []
    real = reg.sas_regularizer

    def spy(attentions, heads, lam, directions, reduction):
        term = real(attentions, heads, lam, directions, reduction)
        seen.append((lam, float(term.detach())))
        return term

    monkeypatch.setattr(reg, "sas_regularizer", spy)
    monkeypatch.setattr(
        reg,
        "training_heads",
        lambda tok, texts, seq_len, root_to_cls=False: torch.randint(
            -1, seq_len, (len(tr.pack(tok, texts, seq_len)), seq_len)
        ),
    )
    cfg = micro(max_steps=6, linear_every=3, sas_lam=0.5, sas_release_step=4)
    m = train(tmp_path / "reg", cfg, progress=False)
    assert [lam for lam, _ in seen] == [0.5] * 4  # released at step 4: no term afterwards
    assert all(t > 0 for _, t in seen)
    assert m.run["config"]["sas_reg"]["lam"] == 0.5


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, small_corpus):
    """`mlmscope train` under torchrun with 2 gloo processes: rank 0 writes the trajectory, the loss falls."""
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "mlmscope.app.cli",
            "train",
            str(run),
            "--preset",
            "micro",
            "--corpus",
            small_corpus,
            "--max-steps",
            "30",
            "--linear-every",
            "10",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = Manifest.load(run)
    assert m.run["world_size"] == 2 and m.run["status"] == "finished"
    assert m.checkpoints[-1].tokens_seen == 30 * 16 * 2 * 32  # global batch = 2 ranks x 16
    assert m.checkpoints[-1].val_loss < m.checkpoints[0].val_loss - 0.5
    assert {r.status for r in verify_run(run)} == {"ok"}
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(str(run / m.checkpoints[-1].path))


def test_cli_import_is_light():
    """`mlmscope --help` must not pay for torch/pandas/transformers (4.7 s before; the commands import them)."""
    code = (
        "import sys, mlmscope.app.cli; "
        "print(sorted(m for m in ('torch', 'pandas', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert "analyze" in _cli("--help").stdout


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", "/nonexistent/run"],
        ["analyses", "failures", "/nonexistent/run"],
        ["probes", "build", "--conllu", "/nonexistent.conllu"],
    ],
)
def test_cli_errors_exit_nonzero(args):
    """Commands that end in typer.Exit(1) must exit 1 through the console entry point (click returns the code)."""
    r = _cli(*args)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "error" in (r.stderr + r.stdout).lower() and "Traceback" not in r.stderr


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_init_std_sets_the_initial_weight_scale(std):
    from mlmscope.checkpoints.train import _build_model

    model = _build_model(make_config("micro", init_std=std, precision="fp32", attn="eager"), vocab_size=300)
    q = model.bert.encoder.layer[0].attention.self.query.weight  # 64 x 64 = 4,096 draws: sd of the estimate ~1.1 %
    pos = model.bert.embeddings.position_embeddings.weight
    assert float(q.detach().std()) == pytest.approx(std, rel=0.05)
    assert float(pos.detach().std()) == pytest.approx(std, rel=0.05)
