"""Where the time of an analysis run goes: per analysis, seconds of compute and the ratio to the capture.

The limit of an analysis run is the forward pass itself, so every analysis is measured against the capture of the
same checkpoint(s): ``ratio = analysis seconds / clean capture seconds`` (and ``/ masked capture seconds`` for the
analyses fed by ``mask15``). Per checkpoint, :func:`bench_checkpoint` does what the runner does (one load, one
capture over the union of names and variants, every accumulator fed from the same batches, ``result()``), but
attributes every second: model load, capture per variant (time spent inside the capture iterator), each
accumulator's ``accumulator()`` + ``update()`` + ``result()``, and, as a floor under the capture, the bare encoder's
forward pass over the same padded batches without any recording.

Budgets (:data:`BUDGETS`): SAS, outliers, mask_rank and redundancy each ≤ 0.5 × the clean capture; the
logit lens ≤ 1 ×; layer drop ≤ 1 × per forward configuration (its seconds divided by the number of configurations it
runs and by the share of the probe set's tokens it uses, ``max_sentences``); the tuned lens's warm-started refit
≤ 2 × (checkpoints whose fit started from the previous checkpoint's translators; the first one is a cold fit).

Example::

    from .bench import bench_run
    report = bench_run("runs/demo", analyses=["sas", "mask_rank"], steps="0-2000")
    report.table()          # one row per analysis: seconds, ratios, budget, met
    report.to_dict()        # JSON-able, with the per-checkpoint breakdown

``mlmscope analyses bench RUN_OR_MODEL`` prints the same (:mod:`mlmscope.app.analyses_cli`).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .base import Analysis, AnalysisContext, SkipAnalysis

__all__ = [
    "BUDGETS",
    "AnalysisTiming",
    "BenchReport",
    "CheckpointTiming",
    "bench_checkpoint",
    "bench_run",
]


@dataclass(frozen=True)
class Budget:
    """A ceiling on an analysis's seconds relative to the clean capture of the same checkpoint(s).

    Attributes:
        ratio: The ceiling.
        per: What one unit of the ceiling is: ``"checkpoint"`` (the analysis as a whole), ``"configuration"`` (layer
            drop: per forward configuration, on the share of tokens it uses) or ``"warm refit"`` (tuned lens: the
            checkpoints whose fit started warm).
    """

    ratio: float
    per: str = "checkpoint"


#: Issue 16's budgets, as ratios to the clean capture. Analyses not listed are measured but have no budget.
BUDGETS: dict[str, Budget] = {
    "sas": Budget(0.5),
    "outliers": Budget(0.5),
    "mask_rank": Budget(0.5),
    "redundancy": Budget(0.5),
    "logit_lens": Budget(1.0),
    "layer_drop": Budget(1.0, "configuration"),
    "tuned_lens": Budget(2.0, "warm refit"),
}


@dataclass
class AnalysisTiming:
    """One analysis on one checkpoint.

    Attributes:
        setup_s, update_s, result_s: ``accumulator()``, all ``update()`` calls, ``result()`` (wall clock).
        cpu_s: The same, in process CPU time (all threads): steadier than the wall clock when other processes
            share the cores.
        status: ``ok``, ``skipped`` (with ``reason``) or ``failed`` (with ``reason``).
        units: Multiples of the capture the budget allows per checkpoint (layer drop: configurations × token share;
            1 otherwise).
        warm: The tuned lens started from the previous checkpoint's translators.
    """

    setup_s: float = 0.0
    update_s: float = 0.0
    result_s: float = 0.0
    cpu_s: float = 0.0
    status: str = "ok"
    reason: str = ""
    units: float = 1.0
    warm: bool = False

    @property
    def seconds(self) -> float:
        return self.setup_s + self.update_s + self.result_s


@dataclass
class CheckpointTiming:
    """Everything measured on one checkpoint.

    Attributes:
        step: Training step (None for a single model).
        path: The checkpoint folder.
        load_s: ``load_model`` (+ the NaN check).
        capture_s: Variant -> seconds spent inside the capture iterator (tokenisation is done once beforehand).
        capture_cpu_s: The same in process CPU time.
        tokens: Variant -> real tokens (incl. [CLS]/[SEP]) captured.
        forward_s: The bare encoder's forward pass over the clean batches, nothing recorded (a floor); None if off.
        analyses: Analysis name -> its timing.
    """

    step: int | None
    path: str
    load_s: float = 0.0
    capture_s: dict[str, float] = field(default_factory=dict)
    capture_cpu_s: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    forward_s: float | None = None
    analyses: dict[str, AnalysisTiming] = field(default_factory=dict)

    @property
    def analysis_s(self) -> float:
        return sum(a.seconds for a in self.analyses.values())

    @property
    def total_s(self) -> float:
        return self.load_s + sum(self.capture_s.values()) + self.analysis_s + (self.forward_s or 0.0)


def _sync(device: str) -> None:
    """Wait for queued GPU work so the clock reads what was spent (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class _Timed:
    """One analysis being fed: accumulator, timing, and the first error (which ends its feeding, as in the runner)."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.acc: Any = None
        self.names: list[str] = []
        self.t = AnalysisTiming()

    @property
    def live(self) -> bool:
        return self.t.status == "ok"

    def run(self, phase: str, fn: Callable[[], Any], device: str) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            with warnings.catch_warnings():  # the analyses' own warnings (e.g. low n) are the runner's business
                warnings.simplefilter("ignore")
                return fn()
        except SkipAnalysis as e:
            self.t.status, self.t.reason = "skipped", str(e)
        except Exception as e:  # an analysis failure is reported, not raised: the others are still measured
            self.t.status, self.t.reason = "failed", f"{type(e).__name__}: {e}"
        finally:
            _sync(device)
            setattr(self.t, phase, getattr(self.t, phase) + time.perf_counter() - t0)
            self.t.cpu_s += time.process_time() - c0
        return None


def bench_checkpoint(
    lm: Any,
    probe_set: Any,
    analyses: Sequence[Analysis],
    *,
    encoded: Any = None,
    batch_size: int = 32,
    step: int | None = None,
    previous: dict[str, Path] | None = None,
    artefacts: Path | None = None,
    forward: bool = True,
    max_batches: int | None = None,
    capture_fn: Callable[..., Iterable[Any]] | None = None,
) -> CheckpointTiming:
    """Time every analysis on one loaded checkpoint, the way the runner computes it (one shared capture).

    Args:
        lm: :func:`mlmscope.probes.model.load_model` result.
        probe_set: The probe set the analyses see (``ctx.probe_set``; SAS reads its parses).
        analyses: Analysis instances.
        encoded: ``mlmscope.probes.capture.prepare(lm, probe_set)``, to keep tokenisation out of the timings.
        batch_size: Sentences per forward pass.
        step: Training step of the checkpoint.
        previous: Chained analysis name -> its result folder on the previous checkpoint (the tuned lens's warm start).
        artefacts: Folder under which each chained analysis writes its artefacts (``save_artefacts``) into a
            sub-folder named after it, for the next checkpoint.
        forward: Also time the bare encoder's forward over the same clean batches (the floor under the capture).
        max_batches: Feed only this many batches per variant (the warm-up uses 2).
        capture_fn: The capture (default: the runner's, :func:`mlmscope.analyses.runner.default_capture`).
    """
    import torch

    from .runner import VARIANT_ORDER, default_capture

    capture_fn = capture_fn or default_capture
    device = str(lm.device)
    out = CheckpointTiming(step, str(lm.path))
    ctx = AnalysisContext(
        model=lm.model,
        arch=lm.arch,
        n_layers=lm.n_layers,
        n_heads=lm.n_heads,
        d_model=lm.d_model,
        probe_set=probe_set,
        step=step,
        device=device,
        checkpoint=str(lm.path),
    )
    timed = [_Timed(a) for a in analyses]
    for t in timed:
        a = t.analysis
        a_ctx = replace(ctx, previous=(previous or {}).get(a.name)) if a.chained else ctx

        def setup(a: Analysis = a, a_ctx: AnalysisContext = a_ctx, t: _Timed = t) -> None:
            if a.needs_mlm_head and not lm.has_mlm_head:
                raise SkipAnalysis("the checkpoint has no MLM head")
            t.acc = a.accumulator(a_ctx)
            t.names = list(a.names(a_ctx))

        t.run("setup_s", setup, device)
        t.t.warm = bool(a.chained and getattr(t.acc, "init", None) is not None)
    live = [t for t in timed if t.live]
    variants = [v for v in VARIANT_ORDER if any(v in t.analysis.variants for t in live)]
    variants += sorted({v for t in live for v in t.analysis.variants} - set(variants))
    names = sorted({n for t in live for n in t.names})
    source = encoded if encoded is not None else probe_set
    clean_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    sentence_tokens: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for variant in variants if live else []:
        out.capture_s[variant], out.capture_cpu_s[variant], out.tokens[variant] = 0.0, 0.0, 0
        batches = iter(capture_fn(lm, source, variants=[variant], names=names, batch_size=batch_size))
        if max_batches is not None:
            batches = itertools.islice(batches, max_batches)
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in batches:
            _sync(device)
            out.capture_s[variant] += time.perf_counter() - t0
            out.capture_cpu_s[variant] += time.process_time() - c0
            per_row = batch.attention_mask.sum(1)
            out.tokens[variant] += int(per_row.sum())
            sentence_tokens.setdefault(variant, []).append((batch.sentence_ids, per_row))
            if forward and variant == "clean":
                clean_inputs.append((batch.input_ids, batch.attention_mask))
            for t in live:
                if t.live and variant in t.analysis.variants:
                    t.run("update_s", lambda t=t, batch=batch: t.acc.update(batch), device)
            t0, c0 = time.perf_counter(), time.process_time()
    for t in live:
        if t.live:
            t.run("result_s", t.acc.result, device)
        if t.live and t.analysis.chained and artefacts is not None:
            folder = artefacts / t.analysis.name
            folder.mkdir(parents=True, exist_ok=True)
            t.acc.save_artefacts(folder)
        t.t.units = _units(t, sentence_tokens)
    if forward and clean_inputs:
        out.forward_s = _time_forward(lm, clean_inputs, device)
    out.analyses = {t.analysis.name: t.t for t in timed}
    return out


def _time_forward(lm: Any, inputs: list[tuple[Any, Any]], device: str) -> float:
    """Seconds of the bare encoder's forward pass over the given padded batches (no hooks, no outputs kept)."""
    import torch

    enc = lm.arch.encoder_model
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids, am in inputs:
            enc(input_ids=ids.to(device), attention_mask=am.to(device))
    _sync(device)
    return time.perf_counter() - t0


def _units(t: _Timed, sentence_tokens: dict[str, list[tuple[Any, Any]]]) -> float:
    """Capture multiples the budget allows: layer drop runs ``len(configs)`` passes over the first ``max_sentences``
    sentences (their share of the tokens); every other analysis is one unit."""
    acc = t.acc
    configs, max_s = getattr(acc, "configs", None), getattr(acc, "max_sentences", None)
    if t.analysis.name != "layer_drop" or configs is None or max_s is None:
        return 1.0
    rows = sentence_tokens.get("mask15") or sentence_tokens.get("clean") or []
    total = sum(int(n.sum()) for _, n in rows)
    used = sum(int(n[ids.to(n.device) < max_s].sum()) for ids, n in rows)
    return len(configs) * (used / total if total else 0.0)


# --- a whole run ----------------------------------------------------------------------------------------------------
@dataclass
class BenchReport:
    """Per-checkpoint timings of a run and what the table prints.

    Attributes:
        checkpoints: One :class:`CheckpointTiming` per benchmarked checkpoint.
        machine: CPU capability, native bf16, torch threads, device.
        n_sentences: Probe sentences captured per variant.
    """

    checkpoints: list[CheckpointTiming]
    machine: dict[str, Any]
    n_sentences: int

    def capture_s(self, variant: str, names: Sequence[str] | None = None) -> float:
        """Capture seconds of ``variant`` summed over the checkpoints (those where the named analyses ran)."""
        return sum(c.capture_s.get(variant, 0.0) for c in self._where(names))

    def _where(self, names: Sequence[str] | None, warm: bool | None = None) -> list[CheckpointTiming]:
        if names is None:
            return self.checkpoints
        out = []
        for c in self.checkpoints:
            ts = [c.analyses[n] for n in names if n in c.analyses]
            if ts and all(t.status == "ok" and (warm is None or t.warm == warm) for t in ts):
                out.append(c)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per analysis (and one for the tuned lens's warm refits): the table's content."""
        names = sorted({n for c in self.checkpoints for n in c.analyses})
        rows = []
        for name in names:
            groups: list[tuple[str, bool | None]] = [(name, None)]
            if name == "tuned_lens" and self._where([name]):
                groups = [("tuned_lens (warm refit)", True), ("tuned_lens (cold fit)", False)]
            for label, warm in groups:
                cks = self._where([name], warm)
                row = self._row(label, name, cks, warm)
                if row is not None:
                    rows.append(row)
        return rows

    def _row(self, label: str, name: str, cks: list[CheckpointTiming], warm: bool | None) -> dict[str, Any] | None:
        every = [c.analyses[name] for c in self.checkpoints if name in c.analyses]
        if not cks:
            if warm is not None:
                return None
            bad = every[0] if every else AnalysisTiming(status="skipped")
            return {"analysis": label, "status": bad.status, "reason": bad.reason, "checkpoints": 0}
        ts = [c.analyses[name] for c in cks]
        seconds = sum(t.seconds for t in ts)
        clean = sum(c.capture_s.get("clean", 0.0) for c in cks)
        masked = sum(c.capture_s.get("mask15", 0.0) for c in cks)
        units = sum(t.units * c.capture_s.get("clean", 0.0) for t, c in zip(ts, cks))
        clean_cpu = sum(c.capture_cpu_s.get("clean", 0.0) for c in cks)
        cpu = sum(t.cpu_s for t in ts)
        budget = BUDGETS.get(name)
        ratio = seconds / clean if clean else float("nan")
        budget_ratio = seconds / units if units else float("nan")
        return {
            "analysis": label,
            "status": "ok",
            "reason": "",
            "checkpoints": len(cks),
            "seconds": seconds,
            "per_checkpoint_s": seconds / len(cks),
            "update_s": sum(t.update_s for t in ts),
            "result_s": sum(t.result_s + t.setup_s for t in ts),
            "x_clean": ratio,
            "x_masked": seconds / masked if masked else float("nan"),
            "cpu_s": cpu,
            "x_clean_cpu": cpu / clean_cpu if clean_cpu else float("nan"),
            "units": units / clean if clean else float("nan"),
            "x_budget_unit": budget_ratio,
            "budget": budget.ratio if budget else None,
            "budget_per": budget.per if budget else "",
            "met": (budget_ratio <= budget.ratio) if budget else None,
        }

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows())

    def summary(self) -> dict[str, Any]:
        """Suite totals: capture per variant, tokens/s, the suite's ratio to the capture, seconds per checkpoint."""
        n = max(len(self.checkpoints), 1)
        clean, masked = self.capture_s("clean"), self.capture_s("mask15")
        captured = sum(sum(c.capture_s.values()) for c in self.checkpoints)
        analysis = sum(c.analysis_s for c in self.checkpoints)
        tokens = sum(c.tokens.get("clean", 0) for c in self.checkpoints)
        fwd = [c.forward_s for c in self.checkpoints if c.forward_s is not None]
        return {
            "checkpoints": len(self.checkpoints),
            "n_sentences": self.n_sentences,
            "load_s": sum(c.load_s for c in self.checkpoints),
            "capture_clean_s": clean,
            "capture_masked_s": masked,
            "capture_s": captured,
            "forward_s": sum(fwd) if fwd else None,
            "capture_over_forward": clean / sum(fwd) if fwd and sum(fwd) else None,
            "tokens_per_s_clean_capture": tokens / clean if clean else None,
            "tokens_per_s_forward": tokens / sum(fwd) if fwd and sum(fwd) else None,
            "analysis_s": analysis,
            "suite_x_clean": analysis / clean if clean else None,
            "suite_x_capture": analysis / captured if captured else None,
            "per_checkpoint_s": sum(c.load_s + sum(c.capture_s.values()) + c.analysis_s for c in self.checkpoints) / n,
            "per_checkpoint_capture_s": captured / n,
            "per_checkpoint_analysis_s": analysis / n,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "summary": self.summary(),
            "analyses": self.rows(),
            "checkpoints": [
                {
                    "step": c.step,
                    "path": c.path,
                    "load_s": c.load_s,
                    "capture_s": c.capture_s,
                    "capture_cpu_s": c.capture_cpu_s,
                    "tokens": c.tokens,
                    "forward_s": c.forward_s,
                    "analyses": {n: {**vars(t), "seconds": t.seconds} for n, t in c.analyses.items()},
                }
                for c in self.checkpoints
            ],
        }


def machine_facts(device: str) -> dict[str, Any]:
    """What the numbers depend on: CPU capability, native bf16, torch threads, device (and GPU name)."""
    import torch

    from ..checkpoints.hardware import describe

    facts = {
        k: v for k, v in describe().items() if k in ("cpu_capability", "cpu_native_bf16", "threads", "omp_wait_policy")
    }
    facts["device"] = device
    facts["cpu_count"] = os.cpu_count()
    if hasattr(os, "getloadavg"):
        facts["load_avg_1min"] = round(os.getloadavg()[0], 2)  # other processes on the cores skew every timing
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def bench_run(
    run: str | os.PathLike,
    analyses: Sequence[str] | None = None,
    *,
    params: dict[str, dict[str, str]] | None = None,
    steps: str | None = None,
    probes: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str = "auto",
    forward: bool = True,
    warmup: bool = True,
    progress: Callable[[CheckpointTiming], None] | None = None,
) -> BenchReport:
    """Benchmark the analyses on every checkpoint of a run (or a folder of checkpoints, or ONE model folder).

    Checkpoints are processed in step order; a chained analysis (tuned lens) gets the previous checkpoint's
    artefacts as its warm start, as in the runner. Before the first timed checkpoint, two batches per variant are fed
    to every analysis untimed (imports and first-call costs would otherwise land on the first analysis).

    Args:
        run: Run folder, folder of ``step_*`` checkpoints, or a model folder (e.g. all-MiniLM-L6-v2).
        analyses: Analysis names (default: every registered one).
        params: ``{analysis: {field: text}}`` as ``--param``.
        steps: Step filter (``"0,500-2000"``).
        probes: Probe-set folder (default: the run's default probe set, built once).
        batch_size: Sentences per forward pass.
        device: ``auto`` / ``cpu`` / ``cuda``...
        forward: Also time the bare encoder forward (the floor under the capture).
        warmup: Untimed warm-up on the first checkpoint.
        progress: Called with each checkpoint's timing when it is done.
    """
    from ..checkpoints.manifest import MANIFEST, CheckpointEntry, list_checkpoints
    from ..probes.capture import prepare
    from .runner import Runner, RunnerError, check_finite, default_load, parse_steps, resolve_device, resolve_probe_set
    from .target import is_model_dir, resolve_target

    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    single = Path(run)
    if probes is not None and is_model_dir(single) and not (single / MANIFEST).exists():
        # one model folder with a given probe set: nothing to cache, so no results folder is created for it
        run_dir, entries, is_model = single.parent, [CheckpointEntry(step=0, path=str(single.resolve()))], True
    else:
        target = resolve_target(run)  # a model folder gets its results folder (the default probe set is cached there)
        run_dir, is_model = target.run_dir, target.kind == "model"
        entries = [e for e in list_checkpoints(run_dir) if parse_steps(steps)(e.step)]
    if not entries:
        raise RunnerError(f"no checkpoint of {str(run)!r} matches --steps {steps!r}")
    device = resolve_device(device)
    chosen = Runner._make_analyses(analyses, params)
    probe_set = resolve_probe_set(run_dir, str(probes) if probes else None, run_dir / entries[-1].path)
    timings: list[CheckpointTiming] = []
    encoded = None
    n_sentences = 0
    with tempfile.TemporaryDirectory(prefix="mlmscope-bench-") as scratch:
        previous: dict[str, Path] = {}
        enc_tok = None
        for i, e in enumerate(entries):
            t0 = time.perf_counter()
            lm = default_load(str(run_dir / e.path), device=device)
            check_finite(lm.model)
            load_s = time.perf_counter() - t0
            if encoded is None or enc_tok != lm.tokenizer_hash:  # tokenised once per tokenizer, outside the timings
                encoded, enc_tok = prepare(lm, probe_set), lm.tokenizer_hash
                n_sentences = len(encoded)
            if warmup and i == 0:
                bench_checkpoint(
                    lm, probe_set, chosen, encoded=encoded, batch_size=batch_size, step=e.step, max_batches=2
                )
            art = Path(scratch) / f"{i:05d}"
            t = bench_checkpoint(
                lm,
                probe_set,
                chosen,
                encoded=encoded,
                batch_size=batch_size,
                step=None if is_model else e.step,
                previous=previous,
                artefacts=art,
                forward=forward,
            )
            t.load_s = load_s
            timings.append(t)
            previous.update({a.name: art / a.name for a in chosen if a.chained and t.analyses[a.name].status == "ok"})
            if progress is not None:
                progress(t)
    facts = machine_facts(device)
    facts["load_avg_1min_at_start"] = load_at_start
    return BenchReport(timings, facts, n_sentences)
