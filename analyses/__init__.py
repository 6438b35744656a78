"""mlmscope: analyses.

One call per analysis from a notebook (the runner's per-checkpoint code path, no store; see :mod:`.api`)::

    import mlmscope.analyses as A
    res = A.analyze(model, probes)                 # every analysis: {name: {table: DataFrame}}, one shared capture
    frames = A.sas.run(model, probes, min_count=50)   # one analysis; A.<name>.run for every registered name
    frames = A.run("layer_drop", model, probes)

``model`` is a loaded model or a model folder, ``probes`` a ProbeSet, a probe folder / CoNLL-U file or word lists.
Attribute access is lazy: importing this package loads no analysis (and no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import AnalysisError, Results, SkippedAnalysisWarning, analyze, run

__all__ = ["AnalysisError", "Results", "SkippedAnalysisWarning", "analyze", "run"]


def __getattr__(name: str) -> Any:
    """``analyze``/``run`` from :mod:`.api`; a registered analysis's name: its module when the module is named after it
    (``sas``, with ``run`` bound by ``@register``), else its class (``layer_drop``, ``logit_lens``: ``.run`` too)."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in __all__:
        from . import api

        return getattr(api, name)
    from .base import load_all

    registry = load_all()  # imports every module of the package, which binds the submodules as attributes
    if name in globals():
        return globals()[name]
    if name in registry:
        return registry[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; analyses: {', '.join(sorted(registry))}")
