"""One small interface every analysis implements, and the registry the runner and CLI read.

An analysis declares which capture variants it needs and which activation names; the runner loads a checkpoint
once, runs each needed capture variant once, and feeds every requested analysis's accumulator from the same batches
(never one forward pass per analysis). See ``analyses/runner.py``.

Example::

    @register
    class MyAnalysis(Analysis):
        name = "my"
        version = "1"
        description = "one line for `mlmscope analyses list`"
        variants = ("clean",)

        def names(self, ctx): return [f"blocks.{l}.hook_resid_post" for l in range(ctx.n_layers)]
        def accumulator(self, ctx): return MyAccumulator(...)
"""

from __future__ import annotations

from ..checkpoints.errors import MlmscopeError
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import pandas as pd

from ..probes.batch import CaptureBatch


class SkipAnalysis(MlmscopeError):
    """Raised by an analysis that cannot run on this model/probe set; the message is the user-facing reason."""


@dataclass
class AnalysisContext:
    """What an analysis may know about the checkpoint and probe set before the first batch.

    Attributes:
        model: The loaded HF model (eval mode); analyses that intervene (layer drop, lens) use it.
        arch: Architecture adapter from ``mlmscope.probes.model`` (module paths, has_mlm_head, ...).
        n_layers: Number of transformer blocks.
        n_heads: Attention heads per layer.
        d_model: Hidden size.
        probe_set: The probe set (sentences, parses, split halves).
        step: Training step of the checkpoint, or None for a foreign model.
        device: torch device the model runs on.
    """

    model: Any
    arch: Any
    n_layers: int
    n_heads: int
    d_model: int
    probe_set: Any
    step: int | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


class Accumulator(Protocol):
    """Streaming consumer of capture batches: memory must not grow with the probe-set size."""

    def update(self, batch: CaptureBatch) -> None:
        """Consume one batch (``batch.variant`` says which capture variant it came from)."""

    def result(self) -> dict[str, pd.DataFrame]:
        """Return tidy frames, keyed by a short table name (e.g. ``"per_layer"``)."""


class Analysis:
    """Base class: subclasses set the class attributes and implement ``names`` and ``accumulator``.

    Parameters are a dataclass (``Params``) so they double as CLI options and are hashed into the results key.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    variants: ClassVar[tuple[str, ...]] = ("clean",)
    needs_mlm_head: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    def __init__(self, params: Any | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def names(self, ctx: AnalysisContext) -> list[str]:
        """Activation names this analysis needs captured (for every variant it declares)."""
        raise NotImplementedError

    def accumulator(self, ctx: AnalysisContext) -> Accumulator:
        """A fresh accumulator for one checkpoint; raise SkipAnalysis with a reason if it cannot run."""
        raise NotImplementedError

    def params_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)


REGISTRY: dict[str, type[Analysis]] = {}


def register(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator adding an analysis to the registry under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"analysis name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Analysis]:
    """Look up a registered analysis by name (clear error listing what exists)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown analysis {name!r}; available: {', '.join(sorted(REGISTRY)) or '(none)'}")
    return REGISTRY[name]


#: Modules that define analyses; imported by :func:`load_all`. One line per analysis module.
ANALYSIS_MODULES = ("mlmscope.analyses.sas", "mlmscope.analyses.mask_rank", "mlmscope.analyses.outliers", "mlmscope.analyses.redundancy", "mlmscope.analyses.lens")


def load_all() -> dict[str, type[Analysis]]:
    """Import every analysis module so its ``@register`` runs; modules not written yet are skipped."""
    import importlib

    for mod in ANALYSIS_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return REGISTRY
