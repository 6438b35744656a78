"""Precision and kernel choices follow what the hardware computes natively (checkpoints.hardware)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlmscope.checkpoints import hardware
from mlmscope.checkpoints.bench import train_flops_per_token
from mlmscope.checkpoints.config import make_config
from mlmscope.checkpoints.train import TrainingError, resolve_levers

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_native(monkeypatch, native, want):
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: native)
    choice = hardware.resolve_precision("auto", "cpu")
    assert choice.value == want
    assert ("no native bf16" in choice.reason) == (not native)


def test_explicit_precision_is_kept_and_unknown_is_refused():
    assert hardware.resolve_precision("fp32", "cpu") == hardware.Choice("fp32", "requested")
    assert hardware.resolve_precision("bf16", "cpu").value == "bf16"
    with pytest.raises(TrainingError, match="precision must be one of auto, fp32, bf16"):
        resolve_levers(make_config("micro", precision="fp16").train, "cpu")


def test_the_config_offers_the_precisions_the_hardware_resolves():
    """`--precision` choices (the TrainConfig field's Literal) are exactly what resolve_precision accepts."""
    from typing import get_args

    from mlmscope.checkpoints.config import Precision

    assert get_args(Precision) == hardware.PRECISIONS


def test_avx2_emulation_resolves_to_fp32():
    """ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 make any x86 machine choose as an AVX2-only one does."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = (
        "import json; from checkpoints import hardware; "
        "print(json.dumps([hardware.cpu_capability(), hardware.resolve_precision('auto', 'cpu').value]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    cap, prec = json.loads(out.stdout.strip().splitlines()[-1])
    if cap != "AVX2":
        pytest.skip(f"this CPU dispatches {cap} even when asked for AVX2")
    assert prec == "fp32"


def test_attention_follows_precision_and_device():
    assert hardware.resolve_attention("auto", "cpu", "bf16").value == "eager_fp32"
    assert hardware.resolve_attention("auto", "cpu", "fp32").value == "eager"
    assert hardware.resolve_attention("auto", "cuda", "bf16").value == "sdpa"
    assert hardware.resolve_attention("sdpa", "cpu", "fp32") == hardware.Choice("sdpa", "requested")


def test_resume_reuses_the_recorded_choices(monkeypatch):
    """A run started where bf16 was native resumes in bf16 on any machine (bit-exact resume needs it)."""
    tc = make_config("demo").train
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: True)
    first, levers = resolve_levers(tc, "cpu")
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: False)
    again, _ = resolve_levers(tc, "cpu", recorded=levers)
    assert (first.precision, first.attn) == (again.precision, again.attn) == ("bf16", "eager_fp32")
    assert resolve_levers(tc, "cpu")[0].precision == "fp32"


def test_training_flops_hand_computed():
    """2 layers x 64 d, FFN 256, T = 32, V = 1000: per layer 4·64² + 2·64·256 + 2·32·64 = 53,248 MACs; head
    64² + 64·1000 = 68,096 MACs; × 2 FLOPs × 3 (forward + backward)."""
    cfg = make_config("micro")
    assert train_flops_per_token(cfg, 1000, 1.0) == 6 * (2 * 53_248 + 68_096)
    assert train_flops_per_token(cfg, 1000, 0.15) == pytest.approx(6 * (2 * 53_248 + 0.15 * 68_096), rel=1e-12)


def test_gemm_peak_is_positive_and_finite():
    g = hardware.gemm_peak_gflops(n=128, seconds=0.05)
    assert 0.1 < g < 1e6


def test_demo_reports_stage_times_with_the_cpu_kind(tmp_path, small_corpus, monkeypatch):
    """`mlmscope demo` trains, runs its analysis stage and prints one timing line naming the CPU and precision."""
    from typer.testing import CliRunner

    import mlmscope.app.cli as cli
    import mlmscope.checkpoints.config as config

    calls = []
    real = config.make_config
    monkeypatch.setattr(
        config, "make_config", lambda preset="demo", **kw: real("micro", corpus=small_corpus, max_steps=4, steps=[0, 4])
    )
    monkeypatch.setattr(cli, "_DEMO_STEPS", [lambda run: calls.append(run)])
    res = CliRunner().invoke(cli.app, ["demo", "--run", str(tmp_path / "d"), "--no-serve"])
    assert res.exit_code == 0, res.output
    assert calls == [tmp_path / "d"]
    assert "demo wall time: train" in res.output and f"CPU {hardware.cpu_capability()}, fp32" in res.output


@pytest.mark.parametrize("busy_percent, want", [(0.0, None), (60.0, "PASSIVE")])
def test_omp_wait_policy_follows_the_load_at_start(monkeypatch, busy_percent, want):
    """Idle machine: OpenMP's default (spin, then sleep); other processes busy: PASSIVE; a user's value is kept."""
    import psutil

    import mlmscope.app.cli as cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("MLMSCOPE_OMP_WAIT_REASON", raising=False)
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval: busy_percent)
    monkeypatch.setattr(psutil, "cpu_count", lambda: 2)
    reason = cli.choose_omp_wait_policy()
    assert os.environ.get("OMP_WAIT_POLICY") == want and os.environ["MLMSCOPE_OMP_WAIT_REASON"] == reason
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "set by the user" in cli.choose_omp_wait_policy() and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
