"""What the machine computes fast, asked of torch rather than assumed: precision and kernel choices by capability.

The same trainer runs on CPUs of one "kind" that differ where it matters: some have AVX-512 with native bf16
(AVX512_BF16 or AMX), others AVX2 only, where bf16 autocast is emulated and ~20x slower than fp32 (measured on a
2-core AVX2 EPYC: 118 tok/s vs 2,079 tok/s fp32 for HF's Trainer). Every speed lever that depends on the hardware is
decided here, from what torch reports, and the decision and its reason are recorded in the run manifest.

``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` makes an AVX-512 machine report (and compute) as an AVX2 one:
torch's dispatch capability and oneDNN's bf16 support both follow those variables, so this module does too.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Choice:
    """A resolved setting and the reason it was chosen (saved in the manifest, shown in the progress line)."""

    value: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def cpu_capability() -> str:
    """torch's CPU dispatch level: ``"AVX512"``, ``"AVX2"``, ``"DEFAULT"`` … (honours ``ATEN_CPU_CAPABILITY``)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512_BF16 or AMX tiles) *and* torch/oneDNN will use it.

    All three must hold: the instructions exist (CPUID), torch dispatches AVX-512 kernels, and oneDNN reports bf16
    support (false under ``ONEDNN_MAX_CPU_ISA=AVX2``, so the AVX2 emulation above is honoured).
    """
    has_isa = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(has_isa and onednn and cpu_capability().startswith("AVX512"))


def resolve_precision(requested: str, device: str) -> Choice:
    """``auto`` → bf16 autocast where the device computes bf16 natively, else fp32; explicit values are kept.

    Raises:
        ValueError: an unknown precision name.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        return Choice(requested, "requested")
    if device.startswith("cuda"):
        ok = torch.cuda.is_bf16_supported()
        return Choice("bf16" if ok else "fp32", f"CUDA device {'supports' if ok else 'lacks'} bf16")
    if cpu_native_bf16():
        return Choice("bf16", f"CPU {cpu_capability()} with native bf16 (AVX512_BF16/AMX)")
    return Choice("fp32", f"CPU {cpu_capability()} has no native bf16 (bf16 would be emulated, ~20x slower)")


def resolve_attention(requested: str, device: str, precision: str) -> Choice:
    """``auto`` → SDPA on CUDA; on CPU ``eager_fp32`` under bf16 (eager speed, fp32 scores) and plain ``eager`` at
    fp32 (the same arithmetic without the casts). Under bf16 eager beats SDPA's CPU kernel at the short sequences we
    train on (demo shape, 2 cores: eager 68–75 ms/step vs SDPA 83–104 ms); at fp32 the two are on par (demo shape,
    encoder forward + backward, 1 thread: 120 vs 121 ms median, interleaved on a loaded machine)."""
    if requested != "auto":
        return Choice(requested, "requested")
    if device.startswith("cuda"):
        return Choice("sdpa", "CUDA: fused SDPA kernels")
    if precision == "bf16":
        return Choice("eager_fp32", "CPU bf16: eager matmuls, scores kept in fp32")
    return Choice("eager", "CPU fp32: eager matmuls (on par with SDPA's CPU kernel at T <= 128)")


def fused_adamw_ok(device: str) -> Choice:
    """Fused AdamW where torch has a kernel for the device (CPU since torch 2.4, CUDA); else the foreach loop."""
    if device not in _FUSED_OK:
        _FUSED_OK[device] = _probe_fused_adamw(device)
    return _FUSED_OK[device]


_FUSED_OK: dict[str, Choice] = {}


def _probe_fused_adamw(device: str) -> Choice:
    try:
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], fused=True).step()
        return Choice("fused", "one kernel per step")
    except (RuntimeError, TypeError) as e:
        return Choice("foreach", f"fused AdamW unavailable here ({str(e).splitlines()[0][:80]})")


def gemm_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5) -> float:
    """Achieved GFLOP/s of a large square matmul: the practical ceiling ("peak") a training step is compared to.

    Measured, not read off a datasheet: clock, core count and vector width vary between machines of one kind.
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def describe() -> dict[str, object]:
    """The facts above in one dict (manifest, bench headers, ``mlmscope info``)."""
    return {
        "cpu_capability": cpu_capability(),
        "cpu_native_bf16": cpu_native_bf16(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "omp_wait_policy": os.environ.get("MLMSCOPE_OMP_WAIT_REASON", os.environ.get("OMP_WAIT_POLICY") or "default"),
    }
