"""Accumulators keep the captured tensors on their device: nothing leaves it (``.cpu()``, ``.numpy()``) in ``update``.

On a GPU the capture hands the analyses device tensors; an accumulator that copied them to the host per batch would
lose what the GPU gains. A CPU-only test cannot see a device change, so every tensor of the batch is wrapped in a
subclass that refuses ``.cpu()`` / ``.numpy()`` while ``update`` runs; anything computed from it inherits the refusal
(``__torch_function__``). ``result()`` may copy to the host to build the frames. A ``.to(device)`` cannot be told
apart from a copy to the host on a CPU-only machine (the lenses and layer drop move inputs to the *model's* device,
``ctx.device``, on purpose), so it is left to review. The results must equal those from plain tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import fields
from typing import Any

import pandas as pd
import pytest
import torch

from conftest import FIXTURE_TEXT
from mlmscope.analyses.base import AnalysisContext, load_all
from mlmscope.probes import capture, load_model
from mlmscope.probes.batch import CaptureBatch

pytestmark = pytest.mark.usefixtures("one_thread")

_STRICT = [False]


class Pinned(torch.Tensor):
    """A tensor that may not be copied to the host while :data:`_STRICT` is set."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if _STRICT[0] and name in ("cpu", "numpy"):
            raise AssertionError(f"Tensor.{name}() inside update(): the accumulator copies a batch tensor to the host")
        return super().__torch_function__(func, types, args, kwargs)


@contextmanager
def strict():
    _STRICT[0] = True
    try:
        yield
    finally:
        _STRICT[0] = False


def pinned(batch: CaptureBatch) -> CaptureBatch:
    """A copy of ``batch`` whose tensors (activations, masks, ids) are :class:`Pinned`."""
    values = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            v = v.as_subclass(Pinned)
        elif f.name == "acts":
            v = {k: t.as_subclass(Pinned) for k, t in v.items()}
        elif f.name == "derived":
            v = {}
        values[f.name] = v
    return CaptureBatch(**values)


@pytest.fixture(scope="module")
def setup(micro_model_dir):
    from mlmscope.probes.probeset import BuildConfig, build_probe_set

    lm = load_model(micro_model_dir)
    probes = build_probe_set(FIXTURE_TEXT[:15], BuildConfig(n=15, min_words=5))
    analyses = [cls() for _, cls in sorted(load_all().items())]
    ctx = AnalysisContext(
        model=lm.model,
        arch=lm.arch,
        n_layers=lm.n_layers,
        n_heads=lm.n_heads,
        d_model=lm.d_model,
        probe_set=probes,
        step=0,
    )
    names = sorted({n for a in analyses for n in a.names(ctx)})
    batches = list(capture(lm, probes, variants=("clean", "mask15"), names=names, batch_size=6))
    return analyses, ctx, batches


def _frames(analysis: Any, ctx: AnalysisContext, batches: list[CaptureBatch], wrap: bool) -> dict[str, pd.DataFrame]:
    torch.manual_seed(0)
    acc = analysis.accumulator(ctx)
    for b in batches:
        if b.variant in analysis.variants:
            if wrap:
                with strict():
                    acc.update(pinned(b))
            else:
                acc.update(b)
    return acc.result()


def test_the_wrapper_catches_a_host_copy():
    x = torch.ones(3).as_subclass(Pinned)
    with strict(), pytest.raises(AssertionError, match="copies a batch tensor"):
        (x * 2).cpu()
    with strict(), pytest.raises(AssertionError):
        x.sum(0).numpy()
    assert float(x.sum()) == 3.0 and x.to(torch.float64).dtype == torch.float64  # scalars and dtype casts are fine


@pytest.mark.parametrize(
    "name", ["attention", "layer_drop", "logit_lens", "mask_rank", "outliers", "redundancy", "sas", "tuned_lens"]
)
def test_update_keeps_tensors_on_their_device(setup, name):
    analyses, ctx, batches = setup
    analysis = next(a for a in analyses if a.name == name)
    want = _frames(analysis, ctx, batches, wrap=False)
    got = _frames(analysis, ctx, batches, wrap=True)
    assert want.keys() == got.keys()
    for table, frame in want.items():
        pd.testing.assert_frame_equal(pd.DataFrame(got[table]), frame, check_exact=False, rtol=1e-9, atol=1e-12)
