"""Float comparisons whose tolerance follows the dtype and the size of the values compared, not one machine's CPU.

Why: two correct computations of the same quantity (HF vs our capture vs TransformerLens, a padded batch vs one
sentence, a fused vs a plain kernel) round differently, because BLAS kernels, vector widths (AVX2 vs AVX-512),
thread counts and library builds sum in different orders. One float operation rounds by at most ``eps(dtype)``
relative to its operands, and a sum of ``n`` terms accumulates about ``sqrt(n) * eps * scale`` (random-walk
rounding; ``n * eps * scale`` is the worst case), where ``scale`` is the size of the *terms*, not of the result:
an activation near 0 that came out of a cancellation, a LayerNorm that mixes every dimension, or a softmax of large
logits all carry the rounding of the largest values involved. A fixed ``atol`` (the old ``1e-5``) is therefore
~20 eps of the largest value for a micro model's activations and under 1 eps for MiniLM's outlier dimensions
(~90-190), which flaked on another CPU (one element off by 1.5e-5, relative 1.7e-7).

So ``|actual - expected| <= ulps * eps(dtype) * scale`` elementwise, ``scale = max |expected|`` unless the caller
knows better (``scale=``): ``atol = ulps * eps * scale``, ``rtol = 0``.

How big is ``ulps``: ``DEFAULT_ULPS = 128`` allows the rounding of a dot product of ~1,500 terms (sqrt(1536) ≈ 40:
an FFN) carried through a few layers. Measured on this project's machine, the largest difference over every comparison
that uses the default was 13 ulps of the tensor's max (MiniLM vs TransformerLens' bridge, ``blocks.*.hook_attn_out``);
set ``MLMSCOPE_TOL_LOG=file`` to record the fraction of the allowance each comparison uses. In float32, 128 ulps
is 1.5e-5 of the largest value: a real bug (a hook in the wrong place, a missing bias or residual, a wrong
LayerNorm, another layer's tensor) moves values by 1e-3 .. 1 of that scale, 100 to 60,000 times more. Comparisons
that must be exact (the same tensor under two names, counts, hashes, bit-exact resume) stay exact and do not use
this module.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

#: Default allowance in units of the dtype's machine epsilon (see the module docstring for the derivation).
DEFAULT_ULPS = 128


def eps(dtype) -> float:
    """Machine epsilon of a torch dtype, a numpy dtype / scalar type, or Python ``float`` (float64)."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    if dtype is float:
        dtype = np.float64
    return float(np.finfo(dtype).eps)


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _dtype_of(x):
    if isinstance(x, torch.Tensor):
        return x.dtype
    a = np.asarray(x)
    return a.dtype if np.issubdtype(a.dtype, np.floating) else np.float64


def max_abs(x) -> float:
    """Largest magnitude in ``x`` (0.0 for an empty array)."""
    a = _as_float64(x)
    return float(np.max(np.abs(a))) if a.size else 0.0


def tolerances(expected, *, dtype=None, ulps: float = DEFAULT_ULPS, scale: float | None = None) -> tuple[float, float]:
    """``(atol, rtol)`` for comparing against ``expected``: ``(ulps * eps * scale, 0.0)``.

    Args:
        expected: The reference values (tensor, array or scalar).
        dtype: The precision the values were computed in (default: ``expected``'s floating dtype, float64 for
            Python numbers). Pass the lower one when a float32 computation is compared with a float64 reference.
        ulps: Allowance in machine epsilons.
        scale: Size of the terms the values were computed from (default: ``max |expected|``).
    """
    e = eps(dtype if dtype is not None else _dtype_of(expected))
    s = max_abs(expected) if scale is None else float(scale)
    return ulps * e * s, 0.0


def _log(actual, expected, atol: float, rtol: float) -> None:
    path = os.environ.get("MLMSCOPE_TOL_LOG")
    if not path:
        return
    a, b = _as_float64(actual), _as_float64(expected)
    allowed = atol + rtol * np.abs(b)
    used = float(np.max(np.abs(a - b) / np.where(allowed > 0, allowed, np.inf))) if b.size else 0.0
    with open(path, "a") as f:
        f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "?"), "used": used}) + "\n")


def assert_close_scaled(
    actual, expected, *, dtype=None, ulps: float = DEFAULT_ULPS, scale: float | None = None, msg=None
) -> None:
    """Assert ``|actual - expected| <= ulps * eps(dtype) * scale`` elementwise, ``scale = max |expected|``.

    Torch tensors go through ``torch.testing.assert_close`` (shapes and dtypes must match as there); anything else
    through ``numpy.testing.assert_allclose``. ``msg`` is passed on (a string, or for torch a callable).
    """
    atol, rtol = tolerances(expected, dtype=dtype, ulps=ulps, scale=scale)
    _log(actual, expected, atol, rtol)
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg)
    else:
        np.testing.assert_allclose(
            _as_float64(actual), _as_float64(expected), atol=atol, rtol=rtol, err_msg="" if msg is None else str(msg)
        )


def approx_scaled(expected, *, dtype=None, ulps: float = DEFAULT_ULPS, scale: float | None = None):
    """``pytest.approx(expected, abs=ulps * eps * scale)`` (see :func:`tolerances`); ``scale`` defaults to
    ``max |expected|``, so pass it when ``expected`` is 0 (e.g. a KL of a distribution with itself)."""
    atol, rtol = tolerances(expected, dtype=dtype, ulps=ulps, scale=scale)
    return pytest.approx(expected, rel=rtol, abs=atol)
