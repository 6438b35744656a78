"""Analyses on one model in one call, from a notebook: the runner's per-checkpoint code path without a store.

:func:`analyze` loads the model and the probe set if given as paths, builds every analysis's context and
accumulator, runs ONE capture over the union of their variants and activation names, feeds every accumulator from
the same batches and returns the frames: :func:`mlmscope.analyses.runner.analyse_checkpoint`, exactly what
``mlmscope analyze`` runs per checkpoint before it stores the result. Captured tensors stay on the model's device.

Example::

    import mlmscope.analyses as A
    res = A.analyze("runs/demo/step_004000", "runs/demo/probes/default")      # every registered analysis
    res["sas"]["summary"]                                                    # {analysis: {table: DataFrame}}
    res.meta["mask_rank"]["seconds"], res.skipped                            # how each was computed, what was skipped
    res = A.analyze(lm, ps, ["sas", "mask_rank"], params={"sas": {"min_count": 50}}, masks=my_masks)
    frames = A.sas.run(lm, ps, min_count=50)                                 # one analysis: {table: DataFrame}
    frames = A.run("layer_drop", lm, ps)                                     # the same by name
    frames = A.tuned_lens.run(lm2, ps, previous="out/step_1")                # warm start from a saved result folder

``masks``: one list of piece positions per probe sentence (0-based among the sentence's non-special pieces, as
:func:`mlmscope.probes.masking.mask_positions`) used for the masked variants instead of the seeded rule; checked
before anything runs (a position out of range is a ``ProbeError`` naming the sentence) and recorded in
``Results.meta`` and in every frame's ``attrs``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..checkpoints.errors import MlmscopeError
from .base import Analysis, ParamError, SkipAnalysis, get, load_all


class AnalysisError(MlmscopeError):
    """Several analyses failed in one :func:`analyze` call (each failure is listed; the first is the cause)."""


class SkippedAnalysisWarning(UserWarning):
    """An analysis asked of :func:`analyze` cannot run on this model / probe set (``Results.skipped`` says why)."""


class Results(dict[str, dict[str, pd.DataFrame]]):
    """What :func:`analyze` returns: analysis name -> {table name -> tidy frame}.

    Attributes:
        meta: Analysis name -> how it was computed: ``status``, ``params``, ``version``, ``seconds`` (compute time,
            capture excluded), ``warnings``, ``masks`` (``"seeded"``, ``"explicit"`` or None for a clean-only
            analysis; with ``masks_hash`` when explicit), ``model``, ``probe_hash``, ``device``, and ``reason`` for
            a skipped one.
        skipped: Analysis name -> why it could not run (not in the dict itself).
        capture_s: Seconds spent inside the one shared capture.
    """

    def __init__(self) -> None:
        super().__init__()
        self.meta: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.capture_s = 0.0

    def __repr__(self) -> str:
        parts = [f"{n}: {sorted(t)}" for n, t in self.items()] + [f"{n}: skipped" for n in self.skipped]
        return f"Results({{{', '.join(parts)}}})"


def _instances(
    analyses: Sequence[str | Analysis | type[Analysis]] | str | None,
    params: Mapping[str, Any] | None,
) -> list[Analysis]:
    """Analysis instances with their parameters (``{name: {field: value}}`` or ``{name: Params(...)}``)."""
    registry = load_all()
    if analyses is None:
        wanted: list[str | Analysis | type[Analysis]] = [n for n in sorted(registry) if _shipped(registry[n])]
    elif isinstance(analyses, str):
        wanted = [analyses]
    else:
        wanted = list(analyses)
    params = dict(params or {})
    out: list[Analysis] = []
    for w in wanted:
        if isinstance(w, Analysis):
            if w.name in params:
                raise ParamError(f"params[{w.name!r}]: {w.name} was given as an instance that has its parameters")
            out.append(w)
            continue
        if isinstance(w, str):
            try:
                cls = get(w)
            except KeyError as e:
                raise ParamError(e.args[0]) from None
        else:
            cls = w
        out.append(cls(make_params(cls, params.pop(cls.name, None))))
    if params:
        raise ParamError(
            f"params given for {', '.join(sorted(params))}, which is not among the analyses asked for "
            f"({', '.join(a.name for a in out)})"
        )
    names = [a.name for a in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ParamError(f"analysis {', '.join(twice)} asked for twice")
    return out


def _shipped(cls: type[Analysis]) -> bool:
    """A registered analysis of the package itself (not a test's or a notebook's own registration)."""
    return cls.__module__.startswith(f"{__package__}.")


def make_params(cls: type[Analysis], given: Any) -> Any:
    """``cls.Params`` from None, an instance, or a mapping of field values (checked against the fields).

    Raises:
        ParamError: an unknown field or a Params object of another analysis.
    """
    if given is None:
        return cls.Params()
    if isinstance(given, cls.Params):
        return given
    if not isinstance(given, Mapping):
        raise ParamError(
            f"params for {cls.name}: expected a dict of fields or {cls.__name__}.Params, got {given!r:.80}"
        )
    fields = cls.param_fields()
    unknown = [k for k in given if k not in fields]
    if unknown:
        raise ParamError(
            f"{cls.name} has no parameter {', '.join(map(repr, unknown))}; it has: {', '.join(fields) or '(none)'}"
        )
    return cls.Params(**given)


def load(model: Any, device: str | None = None) -> Any:
    """``model`` as a :class:`mlmscope.probes.model.LoadedModel`: loaded from a folder (on ``device``; None = CUDA when
    available), or returned as it is.

    Raises:
        ParamError: a loaded model with another ``device`` asked for (load it on that device instead).
    """
    from ..probes.model import LoadedModel, load_model
    from .runner import resolve_device

    if isinstance(model, LoadedModel):
        if device is not None and str(device) != str(model.device):
            raise ParamError(
                f"device={device!r} but the model is loaded on {model.device!r}; pass the folder, or "
                f"load_model(path, device={device!r})"
            )
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_model(os.fsdecode(model), device=resolve_device(device or "auto"))
    raise ParamError(f"model must be a LoadedModel or a model folder, got {type(model).__name__}")


def probe_set(probes: Any) -> Any:
    """``probes`` as something the capture takes: a ProbeSet as it is, a probe folder / CoNLL-U path loaded, word lists
    (or whitespace-separated sentences) as a parse-less ProbeSet."""
    from ..probes.probeset import load_probe_set, sentences_of

    if isinstance(probes, (str, bytes)) or hasattr(probes, "__fspath__"):
        return load_probe_set(os.fsdecode(probes))
    if hasattr(probes, "sentences"):
        return probes
    if isinstance(probes, Sequence) and all(isinstance(s, str) for s in probes):
        return sentences_of([s.split() for s in probes])
    if isinstance(probes, Sequence):
        return sentences_of([list(s) for s in probes])
    raise ParamError(f"probes must be a ProbeSet, a probe folder or CoNLL-U file, or word lists; got {probes!r:.80}")


def _previous_fn(previous: str | os.PathLike | Mapping[str, Any] | None) -> Any:
    """``previous`` (one folder, or analysis name -> folder) as the runner's ``previous(analysis)`` callback.

    A folder holding a sub-folder named after the analysis (what ``save_to`` writes) resolves to that sub-folder.
    """
    if previous is None:
        return None

    def folder(a: Analysis) -> Path | None:
        p = previous.get(a.name) if isinstance(previous, Mapping) else previous
        if p is None:
            return None
        p = Path(os.fsdecode(p))
        if not p.is_dir():
            raise ParamError(f"previous={str(p)!r} for {a.name}: no such folder")
        return p / a.name if (p / a.name).is_dir() else p

    return folder


def _check_fit(lm: Any, ps: Any) -> None:
    """The runner's probe-fit check (skipped / mostly-[UNK] sentences): warnings, or a refusal."""
    from ..probes.fit import fit_report
    from ..probes.model import ProbeError

    if not isinstance(getattr(ps, "sentences", ps), list):
        return
    report = fit_report(lm.tokenizer, ps, lm.arch.max_length, model=str(lm.path))
    refusal = report.refusal()
    if refusal:
        raise ProbeError(refusal)
    for w in report.warnings():
        warnings.warn(w, stacklevel=3)


def analyze(
    model: Any,
    probes: Any,
    analyses: Sequence[str | Analysis | type[Analysis]] | str | None = None,
    params: Mapping[str, Any] | None = None,
    *,
    batch_size: int = 32,
    device: str | None = None,
    masks: Sequence[Any] | None = None,
    previous: str | os.PathLike | Mapping[str, Any] | None = None,
    save_to: str | os.PathLike | None = None,
) -> Results:
    """Run analyses on one model with one shared capture; ``{name: {table: DataFrame}}``.

    Args:
        model: A :class:`mlmscope.probes.model.LoadedModel` or a model folder (any ``load_model`` folder: a run's
            ``step_*``, an HF BERT/RoBERTa MLM, a head-less ``BertModel``).
        probes: A ProbeSet, a probe-set folder or CoNLL-U file, or word lists (no parses: SAS is then skipped).
        analyses: Names (or Analysis instances / classes); None = every analysis the package registers.
        params: Analysis name -> ``{field: value}`` or its ``Params`` object.
        batch_size: Probe sentences per forward pass.
        device: Where a model given as a folder is loaded (None = CUDA when available, else CPU).
        masks: Explicit mask positions for the masked variants (one list per probe sentence, see the module
            docstring); None = the seeded rule (the runner's).
        previous: For chained analyses (the tuned lens): a result folder to warm-start from (a run's stored result,
            or a ``save_to`` folder), or analysis name -> folder.
        save_to: Write each computed analysis into ``save_to/<name>/`` (tables as Parquet, ``meta.json``, artefacts
            such as the tuned lens's translators), usable as the next call's ``previous``.

    Returns:
        :class:`Results` (a dict) with ``meta`` and ``skipped``. A skipped analysis is left out with a
        :class:`SkippedAnalysisWarning`.

    Raises:
        ParamError: unknown analysis or parameter; ProbeError: bad ``masks`` or a probe set that does not fit; the
        analysis's own exception when one fails (:class:`AnalysisError` when several fail differently).
    """
    from ..probes.capture import prepare
    from ..probes.masking import as_plan
    from .runner import analyse_checkpoint, check_finite, probe_set_hash

    instances = _instances(analyses, params)
    lm = load(model, device)
    ps = probe_set(probes)
    _check_fit(lm, ps)
    plan = as_plan(masks)
    if plan is not None:
        plan.check(prepare(lm, ps))
    check_finite(lm.model)
    computed, capture_s = analyse_checkpoint(
        lm,
        instances,
        ps,
        batch_size=batch_size,
        checkpoint=str(lm.path),
        previous=_previous_fn(previous),
        masks=plan,
    )
    out = Results()
    out.capture_s = capture_s
    probe_hash = probe_set_hash(ps)
    failed = []
    for c in computed:
        a = c.analysis
        masked = any(v != "clean" for v in a.variants)
        meta: dict[str, Any] = {
            "analysis": a.name,
            "version": str(a.version),
            "status": c.status,
            "params": a.params_dict(),
            "seconds": c.seconds,
            "warnings": c.warnings,
            "masks": ("explicit" if plan is not None else "seeded") if masked else None,
            "model": str(lm.path),
            "probe_hash": probe_hash,
            "device": str(lm.device),
        }
        if masked and plan is not None:
            meta["masks_hash"] = plan.hash
        out.meta[a.name] = meta
        if c.status == "ok":
            tables = dict(c.tables or {})
            if masked and plan is not None:
                for df in tables.values():
                    df.attrs.update(masks="explicit", masks_hash=plan.hash)
            out[a.name] = tables
            if save_to is not None:
                _save(Path(os.fsdecode(save_to)) / a.name, tables, meta, c.acc)
        elif c.status == "skipped":
            meta["reason"] = out.skipped[a.name] = c.error
        else:
            meta["error"] = c.error
            failed.append(c)
    if failed:
        causes = {id(c.exception) for c in failed}
        first = failed[0].exception
        if len(causes) == 1 and first is not None:  # one failure, or one capture failure shared by all
            raise first
        raise AnalysisError(
            f"{len(failed)} analyses failed: " + "; ".join(f"{c.analysis.name}: {c.error}" for c in failed)
        ) from first
    if out.skipped:
        warnings.warn(
            "skipped: " + "; ".join(f"{n} ({r})" for n, r in out.skipped.items()), SkippedAnalysisWarning, stacklevel=2
        )
    return out


def _save(folder: Path, tables: dict[str, pd.DataFrame], meta: dict[str, Any], acc: Any) -> None:
    """One result folder: ``<table>.parquet``, ``meta.json`` and the accumulator's artefacts (replaced if present)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        df.to_parquet(folder / f"{name}.parquet", index=False)
    acc.save_artefacts(folder)
    (folder / "meta.json").write_text(json.dumps({**meta, "tables": sorted(tables)}, indent=1, default=str))


def run(
    analysis: str | Analysis | type[Analysis],
    model: Any,
    probes: Any,
    *,
    params: Any | None = None,
    batch_size: int = 32,
    device: str | None = None,
    masks: Sequence[Any] | None = None,
    previous: str | os.PathLike | Mapping[str, Any] | None = None,
    save_to: str | os.PathLike | None = None,
    **fields: Any,
) -> dict[str, pd.DataFrame]:
    """One analysis on one model: ``{table: DataFrame}`` (:func:`analyze` with one analysis).

    ``fields`` are the analysis's ``Params`` fields (``run("sas", lm, ps, min_count=20)``); or pass ``params=``
    (a ``Params`` object or a dict), not both.

    Raises:
        SkipAnalysis: the analysis cannot run here (e.g. SAS on a probe set without parses); others as
            :func:`analyze`.
    """
    if isinstance(analysis, Analysis):
        if params is not None or fields:
            raise ParamError(f"{analysis.name} was given as an instance, which has its parameters already")
        inst = analysis
    else:
        try:
            cls = get(analysis) if isinstance(analysis, str) else analysis
        except KeyError as e:
            raise ParamError(e.args[0]) from None
        if params is not None and fields:
            raise ParamError(f"{cls.name}: pass params= or parameter fields ({', '.join(fields)}), not both")
        inst = cls(make_params(cls, params if params is not None else fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedAnalysisWarning)  # raised below instead
        res = analyze(
            model,
            probes,
            [inst],
            batch_size=batch_size,
            device=device,
            masks=masks,
            previous=previous,
            save_to=save_to,
        )
    if inst.name in res.skipped:
        raise SkipAnalysis(res.skipped[inst.name])
    return res[inst.name]


__all__ = [
    "AnalysisError",
    "Results",
    "SkippedAnalysisWarning",
    "analyze",
    "load",
    "make_params",
    "probe_set",
    "run",
]
