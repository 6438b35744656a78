"""The contract every analysis implements, and the registry the runner, CLI, report and dashboard read.

An analysis declares which capture variants it needs and which activation names; the runner loads a checkpoint
once, runs each needed capture variant once, and feeds every requested analysis's accumulator from the same batches
(never one forward pass per analysis). See :mod:`mlmscope.analyses.runner`.

Every module of this package is imported by :func:`load_all`, so an analysis is registered by defining it with
``@register`` in a module here; nothing else lists it. A module that fails to import is an error, not a silent skip.

Example::

    @register
    class MyAnalysis(Analysis):
        name = "my"
        version = "1"
        description = "one line for `mlmscope analyses list`"
        variants = ("clean",)

        def names(self, ctx): return [f"blocks.{l}.hook_resid_post" for l in range(ctx.n_layers)]
        def accumulator(self, ctx): return MyAccumulator(...)   # a subclass of Accumulator
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import sys
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import pandas as pd

from ..checkpoints.config import cast_text
from ..checkpoints.errors import MlmscopeError
from ..probes.batch import CaptureBatch

if TYPE_CHECKING:
    from torch import nn

    from ..probes.model import Arch
    from ..probes.probeset import ProbeSet


class ParamError(MlmscopeError):
    """An analysis parameter given on the command line does not exist or does not parse."""


class SkipAnalysis(MlmscopeError):
    """Raised by an analysis that cannot run on this model/probe set; the message is the user-facing reason.

    A skip is final (stored, not retried); any other exception is a failure that the next run retries.
    """


@dataclass
class AnalysisContext:
    """What an analysis may know about the checkpoint and probe set before the first batch.

    Attributes:
        model: The loaded HF model (eval mode); analyses that intervene (layer drop, lens) use it. None in tests
            that feed synthetic batches.
        arch: Architecture adapter (:class:`mlmscope.probes.model.Arch`): module paths and shape facts.
        n_layers: Number of transformer blocks.
        n_heads: Attention heads per layer.
        d_model: Hidden size.
        probe_set: The probe set (sentences, parses, split halves), or plain word lists.
        step: Training step of the checkpoint, or None for a foreign model.
        device: Torch device the model runs on.
        checkpoint: How messages name the checkpoint (its folder), when known.
        previous: For a :attr:`Analysis.chained` analysis, the stored result folder of the same analysis on the
            previous checkpoint (None at the first one). The runner fills it; a notebook may pass any result folder
            of that analysis. This is the one way state travels from checkpoint to checkpoint.
    """

    model: nn.Module | None
    arch: Arch | None
    n_layers: int
    n_heads: int
    d_model: int
    probe_set: ProbeSet | Sequence[Sequence[str]] | None
    step: int | None = None
    device: str = "cpu"
    checkpoint: str | None = None
    previous: Path | None = None


class Accumulator(ABC):
    """Streaming consumer of capture batches for one checkpoint: memory must not grow with the probe-set size."""

    @abstractmethod
    def update(self, batch: CaptureBatch) -> None:
        """Consume one batch (``batch.variant`` says which capture variant it came from)."""

    @abstractmethod
    def result(self) -> dict[str, pd.DataFrame]:
        """Return tidy frames, keyed by a short table name (e.g. ``"per_layer"``)."""

    def save_artefacts(self, folder: Path) -> None:  # noqa: B027 - optional hook with an empty default
        """Write files that are not tables (e.g. fitted weights) into the result folder, after :meth:`result`.

        The store calls this before the folder is renamed into place, so artefacts appear atomically with the
        tables. The default writes nothing.
        """


def _field_default(f: dataclasses.Field[Any]) -> Any:
    """The default of a ``Params`` field (every field has a default or a default factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"Params field {f.name!r} has no default"
    return f.default_factory()


class Analysis(ABC):
    """Base class: subclasses set the class attributes and implement :meth:`names` and :meth:`accumulator`.

    Attributes:
        name: Registry key, results folder name and ``-a`` value.
        version: Bump when the numbers change; part of the results key.
        description: One line for ``mlmscope analyses list``.
        variants: Capture variants to be fed (``clean``, ``mask15``, ``mask1``).
        needs_mlm_head: Skip head-less checkpoints.
        chained: Run checkpoints in step order and hand each one the previous result (``ctx.previous``).

    Parameters are a dataclass (``Params``, deriving from ``Analysis.Params``) so they double as CLI options and are
    hashed into the results key.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    variants: ClassVar[tuple[str, ...]] = ("clean",)
    needs_mlm_head: ClassVar[bool] = False
    chained: ClassVar[bool] = False

    @dataclass
    class Params:
        """No parameters. A subclass's own ``Params`` dataclass derives from this one (``Analysis.Params``)."""

    def __init__(self, params: Any | None = None) -> None:
        # Any: each subclass has its own Params dataclass (the base class cannot name it)
        self.params: Any = params if params is not None else self.Params()

    @abstractmethod
    def names(self, ctx: AnalysisContext) -> list[str]:
        """Activation names this analysis needs captured (for every variant it declares)."""

    @abstractmethod
    def accumulator(self, ctx: AnalysisContext) -> Accumulator:
        """A fresh accumulator for one checkpoint; raise SkipAnalysis with a reason if it cannot run."""

    def params_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params)

    @classmethod
    def param_fields(cls) -> dict[str, tuple[Any, Any]]:
        """Parameter name -> (type, default), read from the ``Params`` dataclass (what the CLI offers)."""
        hints = typing.get_type_hints(cls.Params)
        return {f.name: (hints[f.name], _field_default(f)) for f in dataclasses.fields(cls.Params) if f.init}

    @classmethod
    def run(
        cls,
        model: Any,
        probes: Any,
        *,
        params: Any | None = None,
        batch_size: int = 32,
        device: str | None = None,
        masks: Sequence[Any] | None = None,
        previous: str | os.PathLike | None = None,
        save_to: str | os.PathLike | None = None,
        **fields: Any,
    ) -> dict[str, pd.DataFrame]:
        """This analysis on one model, in one call: ``{table: DataFrame}`` (the runner's code path, no store).

        ``SAS.run(model, probes, min_count=20)`` (or ``params=SAS.Params(...)``); the same function is bound as
        ``run`` in the analysis's module and reachable as ``mlmscope.analyses.<name>.run`` for every registered name.
        Arguments as :func:`mlmscope.analyses.api.analyze`; ``**fields`` are this analysis's ``Params`` fields.

        Raises:
            SkipAnalysis: the analysis cannot run on this model / probe set (the reason says why).
            ParamError: a field this analysis does not have.
        """
        from .api import run

        return run(
            cls,
            model,
            probes,
            params=params,
            batch_size=batch_size,
            device=device,
            masks=masks,
            previous=previous,
            save_to=save_to,
            **fields,
        )

    @classmethod
    def from_text(cls, values: Mapping[str, str]) -> Analysis:
        """An instance whose parameters are given as text (``--param NAME.FIELD=VALUE``), cast to the field types.

        Raises:
            ParamError: an unknown field or a value of the wrong type.
        """
        fields = cls.param_fields()
        typed = {}
        for key, text in values.items():
            if key not in fields:
                raise ParamError(
                    f"--param {cls.name}.{key}: {cls.name} has no parameter {key!r}; it has: "
                    f"{', '.join(fields) or '(none)'}"
                )
            try:
                typed[key] = cast_text(text, fields[key][0], f"--param {cls.name}.{key}={text}")
            except MlmscopeError as e:
                raise ParamError(str(e)) from None
        return cls(cls.Params(**typed))


REGISTRY: dict[str, type[Analysis]] = {}


_A = TypeVar("_A", bound="type[Analysis]")


def register(cls: _A) -> _A:
    """Class decorator adding an analysis to the registry under ``cls.name``.

    When the defining module is named after the analysis (``analyses/sas.py`` for ``sas``) and has no ``run`` of its
    own, the module also gets ``run = cls.run``: ``from mlmscope.analyses import sas; sas.run(model, probes)``.
    Other names (``layer_drop``, ``logit_lens``) resolve to the class through ``mlmscope.analyses.<name>``.
    """
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"analysis name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    module = sys.modules.get(cls.__module__)
    if module is not None and cls.__module__.rpartition(".")[2] == cls.name and not hasattr(module, "run"):
        module.run = cls.run  # pyright: ignore[reportAttributeAccessIssue]
    return cls


def get(name: str) -> type[Analysis]:
    """Look up a registered analysis by name (clear error listing what exists)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown analysis {name!r}; available: {', '.join(sorted(REGISTRY)) or '(none)'}")
    return REGISTRY[name]


def load_all() -> dict[str, type[Analysis]]:
    """Import every module of this package so each ``@register`` runs; return the registry.

    Raises:
        ImportError (or whatever the module raises): a module of the package is broken; never skipped silently.
    """
    package = importlib.import_module(__package__ or "mlmscope.analyses")
    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        importlib.import_module(info.name)
    return REGISTRY
