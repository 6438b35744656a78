"""Trajectory runner: every requested analysis over every checkpoint of a run, cached, resumable, in parallel.

Per checkpoint the runner loads the model once (``mlmscope.probes.model.load_model``), builds one
:class:`~mlmscope.analyses.base.AnalysisContext`, unions the activation names and capture variants of every pending
analysis, runs ``mlmscope.probes.capture.capture`` once over that union and feeds every accumulator from the same
batches (never a forward pass per analysis): :func:`analyse_checkpoint`, which ``mlmscope.analyses.analyze`` (one
model in a notebook, no store) calls too. Captured tensors stay on the model's device. Results go to
:mod:`mlmscope.analyses.store`, keyed by the checkpoint's content hash, so a re-run skips finished (checkpoint,
analysis) pairs and retries only failures.

Backends:

* ``local`` with ``workers=1``: in this process, checkpoints in step order, all analyses in one shared capture.
* ``local`` with ``workers=N``: N spawned processes, one job per checkpoint, ``torch`` threads split between them.
* ``ray``: one Ray task per checkpoint (the probe set is put once into the object store), fractional GPUs when the
  cluster has GPUs. Workers write to the same store, so on several machines the run folder must be on a shared
  filesystem (the checkpoints have to be readable there anyway).

Warm starts: a ``chained`` analysis (e.g. the tuned lens) is run in step order; its accumulator for checkpoint t_k
gets, as ``ctx.previous``, the stored result folder of the nearest earlier step with a finished result of the same
(version, probe set, params), or None at the first step. With several workers these analyses form one sequential chain
of jobs interleaved with the parallel ones.

Example::

    from .runner import Runner, RunnerConfig
    summary = Runner("runs/demo", RunnerConfig(analyses=["sas", "mask_rank"], workers=2)).run()
    summary.failed   # number of failed (checkpoint, analysis) pairs
"""

from __future__ import annotations

import math
import os
import shutil
import time
import traceback as tb
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..checkpoints.errors import MlmscopeError
from ..checkpoints.manifest import MANIFEST, WEIGHTS, CheckpointEntry, Manifest, list_checkpoints, weights_sha256
from .base import Analysis, AnalysisContext, SkipAnalysis, get, load_all
from .store import CHECKPOINT_SCOPE, ResultKey, ResultStore, stable_hash

if TYPE_CHECKING:
    from ..probes.masking import MaskPlan

#: Order in which capture variants are run (the probes package's variant names).
VARIANT_ORDER = ("clean", "mask15", "mask1")
#: Where the run's default probe set is cached.
DEFAULT_PROBES = Path("probes") / "default"
#: Manifest ``run.status`` values after which ``--follow`` stops polling (written by the trainer).
TERMINAL_STATUSES = ("finished", "failed", "interrupted")


class RunnerError(MlmscopeError):
    """Bad runner input (unknown analysis, bad --steps, missing run folder...); the message is user-facing."""


class CheckpointError(MlmscopeError):
    """A checkpoint that cannot be analysed (NaN weights, content differs from the manifest hash)."""


@dataclass
class RunnerConfig:
    """Options of one ``mlmscope analyze`` invocation (also saved in each result's meta).

    Attributes:
        analyses: Analysis names; None = every registered analysis.
        params: Analysis name -> {parameter: value as text}, cast to the ``Params`` field types.
        steps: Step filter, e.g. ``"0,100,400-2000"`` (inclusive ranges, open ends allowed: ``"-500"``,
            ``"1000-"``); None = all.
        workers: Local worker processes.
        backend: ``"local"`` or ``"ray"``.
        address: Ray address (``"auto"``, ``"HOST:PORT"``); None = start a local Ray instance.
        force: Recompute results that are already stored.
        follow: Keep polling the manifest for new checkpoints until training finishes.
        poll_s: Seconds between polls in follow mode.
        idle_timeout_s: In follow mode, give up after this long without a new checkpoint (None = never).
        probes: Probe-set folder; None = the run's default probe set (built once, cached under ``RUN/probes``).
        batch_size: Probe sentences per forward pass.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        shared_capture: Feed all analyses from one capture (False = naive: one capture per analysis; for the
            benchmark only).
        verify_hash: Re-hash each checkpoint's weights and refuse it if they differ from the manifest's hash.
        gpu_fraction: GPU share per Ray task when the cluster has GPUs.
        results_dir: Store location; None = ``RUN/results``.
        threads: torch threads in all (split between ``workers``; per task with Ray); None = torch's default
            (one per core; with several local workers, the cores split between them).
    """

    analyses: list[str] | None = None
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    steps: str | None = None
    workers: int = 1
    backend: Literal["local", "ray"] = "local"
    address: str | None = None
    force: bool = False
    follow: bool = False
    poll_s: float = 10.0
    idle_timeout_s: float | None = None
    probes: str | None = None
    batch_size: int = 32
    device: str = "auto"
    shared_capture: bool = True
    verify_hash: bool = True
    gpu_fraction: float = 0.25
    results_dir: str | None = None
    threads: int | None = None


# --- jobs and outcomes ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One checkpoint and the analyses still to compute on it.

    Attributes:
        step, path, rel: Step, absolute folder, folder name relative to the run.
        ckpt_hash: Content hash of the weights.
        analyses: Analysis instances to run (all pending ones, or a subset when split across workers).
        verify_hash: Re-hash the weights before loading (manifest hashes only).
        earlier: ``(step, hash)`` of earlier checkpoints, nearest first (for warm starts).
    """

    step: int
    path: str
    rel: str
    ckpt_hash: str
    analyses: list[Analysis]
    verify_hash: bool = False
    earlier: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Outcome:
    """What happened to one (checkpoint, analysis) pair."""

    step: int
    rel: str
    analysis: str
    status: str  # "ok", "skipped", "failed", "cached"
    seconds: float = 0.0
    error: str = ""
    record: dict[str, Any] | None = None


@dataclass
class JobResult:
    """Everything a worker reports back for one job."""

    step: int
    rel: str
    outcomes: list[Outcome]
    load_s: float = 0.0
    capture_s: float = 0.0


@dataclass
class WorkerEnv:
    """What every worker needs besides the job (shipped once per job; put once into Ray's object store)."""

    run_dir: str
    results_dir: str | None
    probe_set: Any
    probe_hash: str
    capture_fn: Callable[..., Iterable[Any]]
    load_fn: Callable[..., Any]
    batch_size: int = 32
    device: str = "auto"
    shared_capture: bool = True
    torch_threads: int | None = None
    quiet: bool = True


# --- helpers --------------------------------------------------------------------------------------------------------
def parse_steps(spec: str | None) -> Callable[[int], bool]:
    """Turn ``"0,100,400-2000,5000-"`` into a predicate on steps.

    Raises:
        RunnerError: malformed spec.
    """
    if not spec:
        return lambda s: True
    ranges: list[tuple[float, float]] = []
    for item in spec.split(","):
        item = item.strip()
        try:
            if "-" in item:
                lo, hi = item.split("-", 1)
                ranges.append((int(lo) if lo else -math.inf, int(hi) if hi else math.inf))
            else:
                ranges.append((int(item), int(item)))
        except ValueError:
            raise RunnerError(
                f"bad --steps item {item!r}: use integers and inclusive ranges like 0,100,400-2000,5000-"
            ) from None
    return lambda s: any(lo <= s <= hi for lo, hi in ranges)


def probe_set_hash(probe_set: Any) -> str:
    """Content hash of a probe set: its own ``hash``/``content_hash`` if it has one, else of its sentences."""
    for attr in ("hash", "content_hash"):
        h = getattr(probe_set, attr, None)
        if isinstance(h, str) and h:
            return h
    header = getattr(probe_set, "header", None)
    if isinstance(header, dict) and header.get("hash"):
        return str(header["hash"])
    return stable_hash([list(s) for s in getattr(probe_set, "sentences", probe_set)])


def result_key(analysis: Analysis, ckpt_hash: str, probe_hash: str) -> ResultKey:
    return ResultKey(analysis.name, str(analysis.version), ckpt_hash, probe_hash, stable_hash(analysis.params_dict()))


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_finite(model: Any) -> None:
    """Raise CheckpointError if any weight is NaN or infinite (a diverged or corrupted checkpoint)."""
    import torch

    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(f"weights contain NaN/inf (first in {name})")


def default_capture(
    lm: Any, probe_set: Any, *, variants: Sequence[str], names: Sequence[str], batch_size: int
) -> Iterator[Any]:
    """``mlmscope.probes.capture.capture`` (imported lazily so the store and CLI stay light).

    Captured tensors stay on the device the model runs on (``to_cpu=False``): on a GPU the accumulators work on the
    GPU and nothing is copied before the result frames are built; on a CPU this is the same as copying to the CPU.
    """
    from ..probes.capture import capture

    return capture(lm, probe_set, variants=tuple(variants), names=list(names), batch_size=batch_size, to_cpu=False)


def default_load(path: str, device: str = "cpu") -> Any:
    from ..probes.model import load_model

    return load_model(path, device=device)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# --- one checkpoint: contexts, one shared capture, results (the runner and mlmscope.analyses.analyze) ---------------
class Computed:
    """One analysis computed on one loaded checkpoint by :func:`analyse_checkpoint` (nothing is stored).

    Attributes:
        analysis: The analysis instance.
        status: ``"ok"`` (``tables`` holds its frames), ``"skipped"`` (``error`` is the reason, final) or
            ``"failed"`` (``error``/``trace``/``exception`` say why).
        tables: Table name -> frame, when ok.
        acc: Its accumulator (``save_artefacts`` writes what is not a table), when ok.
        seconds: Compute time (accumulator construction, updates and ``result()``; the capture is not included).
        warnings: Warnings it raised, once each.
    """

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.status = "pending"
        self.tables: dict[str, Any] | None = None
        self.acc: Any = None
        self.names: list[str] = []
        self.seconds = 0.0
        self.error = ""
        self.trace = ""
        self.exception: BaseException | None = None
        self.warnings: list[str] = []

    @property
    def live(self) -> bool:
        return self.status == "pending"

    @contextmanager
    def tracked(self) -> Iterator[None]:
        """Time the block and keep the warnings it raises (stored in the result's meta, not printed)."""
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                self.seconds += time.perf_counter() - t0
                for w in caught:
                    msg = f"{w.category.__name__}: {w.message}"
                    if msg not in self.warnings:
                        self.warnings.append(msg)

    def fail(self, e: BaseException) -> None:
        self.status = "failed"
        self.error = _error_text(e)
        self.trace = tb.format_exc()
        self.exception = e

    def skip(self, reason: str) -> None:
        self.status = "skipped"
        self.error = reason


def analyse_checkpoint(
    lm: Any,
    analyses: Sequence[Analysis],
    probe_set: Any,
    *,
    capture_fn: Callable[..., Iterable[Any]] | None = None,
    batch_size: int = 32,
    device: str | None = None,
    step: int | None = None,
    checkpoint: str | None = None,
    previous: Callable[[Analysis], Path | None] | None = None,
    shared_capture: bool = True,
    masks: MaskPlan | None = None,
) -> tuple[list[Computed], float]:
    """Compute analyses on one loaded checkpoint: one context, one capture over the union of their variants and
    activation names, every accumulator fed from the same batches, then their frames. The runner stores what this
    returns; ``mlmscope.analyses.analyze`` hands it to a notebook.

    Args:
        lm: A :class:`mlmscope.probes.model.LoadedModel` (or an object with the same members).
        analyses: Analysis instances.
        probe_set: ProbeSet or word lists (what the capture and the analyses get).
        capture_fn: ``capture_fn(lm, probe_set, variants=, names=, batch_size=)``; default :func:`default_capture`.
        batch_size: Probe sentences per forward pass.
        device: ``ctx.device`` (default: the model's device).
        step, checkpoint: How the context names the checkpoint.
        previous: For a ``chained`` analysis, its previous result folder (``ctx.previous``), or None.
        shared_capture: False = one capture per analysis (the naive mode the benchmark compares against).
        masks: Explicit mask positions for the masked variants (:class:`mlmscope.probes.masking.MaskPlan`), in force
            while accumulators are built, fed and read; None = the seeded rule.

    Returns:
        One :class:`Computed` per analysis (in order), and the seconds spent inside the capture.
    """
    ctx = AnalysisContext(
        model=lm.model,
        arch=lm.arch,
        n_layers=lm.n_layers,
        n_heads=lm.n_heads,
        d_model=lm.d_model,
        probe_set=probe_set,
        step=step,
        device=device if device is not None else str(lm.device),
        checkpoint=checkpoint,
    )
    from ..probes.masking import explicit_masks

    capture_fn = capture_fn or default_capture
    with explicit_masks(masks):
        computed = [_prepare(a, ctx, lm, previous) for a in analyses]
        live = [c for c in computed if c.live]
        groups = [live] if shared_capture else [[c] for c in live]
        capture_s = sum(_feed(g, lm, probe_set, capture_fn, batch_size) for g in groups)
        for c in live:
            if c.live:  # not failed while fed
                _result(c)
    return computed, capture_s


def _prepare(
    a: Analysis, ctx: AnalysisContext, lm: Any, previous: Callable[[Analysis], Path | None] | None
) -> Computed:
    """The analysis's accumulator and activation names for this checkpoint (or its skip reason / failure)."""
    c = Computed(a)
    try:
        with c.tracked():
            if a.needs_mlm_head and not lm.has_mlm_head:
                raise SkipAnalysis("the checkpoint has no MLM head (head-less BertModel/RobertaModel folder)")
            a_ctx = replace(ctx, previous=previous(a) if previous is not None else None) if a.chained else ctx
            c.acc = a.accumulator(a_ctx)
            c.names = list(a.names(a_ctx))
    except SkipAnalysis as e:
        c.skip(str(e))
    except Exception as e:
        c.fail(e)
    return c


def _feed(
    group: list[Computed], lm: Any, probe_set: Any, capture_fn: Callable[..., Iterable[Any]], batch_size: int
) -> float:
    """Run one capture over the union of the group's variants and names; feed every accumulator. Returns seconds
    spent inside the capture iterator."""
    live = [c for c in group if c.live]
    if not live:
        return 0.0
    variants = [v for v in VARIANT_ORDER if any(v in c.analysis.variants for c in live)]
    variants += sorted({v for c in live for v in c.analysis.variants} - set(variants))
    names = sorted({n for c in live for n in c.names})
    capture_s = 0.0
    t0 = time.perf_counter()
    try:
        for batch in capture_fn(lm, probe_set, variants=variants, names=names, batch_size=batch_size):
            capture_s += time.perf_counter() - t0
            for c in live:
                if c.live and batch.variant in c.analysis.variants:
                    try:
                        with c.tracked():
                            c.acc.update(batch)
                    except Exception as e:
                        c.fail(e)
            t0 = time.perf_counter()
    except Exception as e:
        for c in live:
            if c.live:
                c.fail(e)
    return capture_s


def _result(c: Computed) -> None:
    """The accumulator's frames (a SkipAnalysis found only now, e.g. no masked position, is a final skip)."""
    try:
        with c.tracked():
            c.tables = c.acc.result()
        c.status = "ok"
    except SkipAnalysis as e:
        c.skip(str(e))
    except Exception as e:
        c.fail(e)


# --- the worker side --------------------------------------------------------------------------------------------------
def _previous_result(analysis: Analysis, job: Job, store: ResultStore, probe_hash: str) -> Path | None:
    """A chained analysis's finished result folder on the nearest earlier checkpoint of the job, or None."""
    for _, h in job.earlier:
        key = result_key(analysis, h, probe_hash)
        meta = store.meta(key)
        if meta is not None and meta.get("status") == "ok":
            return store.path(key)
    return None


def _meta(job: Job, a: Analysis) -> dict[str, Any]:
    return {"step": job.step, "checkpoint": job.rel, "params": a.params_dict(), "description": a.description}


def _store(c: Computed, job: Job, store: ResultStore, probe_hash: str) -> Outcome:
    """Write one computed analysis to the store (result, final skip, or failure) and say what happened."""
    a = c.analysis
    key = result_key(a, job.ckpt_hash, probe_hash)
    if c.status == "ok":
        try:
            rec = store.save(
                key,
                c.tables or {},
                {**_meta(job, a), "seconds": c.seconds, "warnings": c.warnings},
                write_extra=c.acc.save_artefacts,
            )
            store.clear_failure(job.rel, a.name)
            store.clear_failure(job.rel, CHECKPOINT_SCOPE)
            return Outcome(job.step, job.rel, a.name, "ok", c.seconds, record=rec)
        except Exception as e:
            c.fail(e)
    if c.status == "skipped":
        rec = store.save_skip(key, c.error, _meta(job, a))
        store.clear_failure(job.rel, a.name)
        return Outcome(job.step, job.rel, a.name, "skipped", c.seconds, c.error, rec)
    store.record_failure(job.rel, a.name, c.error, c.trace, {"step": job.step, "ckpt_hash": job.ckpt_hash})
    return Outcome(job.step, job.rel, a.name, "failed", c.seconds, c.error)


def execute_job(job: Job, env: WorkerEnv) -> JobResult:
    """Compute the job's analyses on one checkpoint and write them to the store (runs in any worker).

    A load failure (corrupt weights, foreign folder, NaN, hash mismatch) is recorded for the checkpoint and every
    pending analysis reports ``failed``; an analysis failure affects that analysis only.
    """
    if env.torch_threads:
        import torch

        torch.set_num_threads(env.torch_threads)
    if env.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-checkpoint "Loading weights" bars would bury the runner's own
    store = ResultStore(env.run_dir, env.results_dir)
    device = resolve_device(env.device)
    t0 = time.perf_counter()
    try:
        if job.verify_hash and (Path(job.path) / WEIGHTS).is_file():  # a .bin-only model's hash is of the file
            actual = weights_sha256(job.path)
            if actual != job.ckpt_hash:
                raise CheckpointError(
                    f"weights hash {actual[:12]} differs from the manifest's {job.ckpt_hash[:12]} "
                    "(modified or corrupted after it was written)"
                )
        lm = env.load_fn(job.path, device=device)
        check_finite(lm.model)
    except Exception as e:
        err = _error_text(e)
        store.record_failure(
            job.rel, CHECKPOINT_SCOPE, err, tb.format_exc(), {"step": job.step, "ckpt_hash": job.ckpt_hash}
        )
        return JobResult(
            job.step,
            job.rel,
            [Outcome(job.step, job.rel, a.name, "failed", 0.0, err) for a in job.analyses],
            load_s=time.perf_counter() - t0,
        )
    load_s = time.perf_counter() - t0
    computed, capture_s = analyse_checkpoint(
        lm,
        job.analyses,
        env.probe_set,
        capture_fn=env.capture_fn,
        batch_size=env.batch_size,
        device=device,
        step=job.step,
        checkpoint=str(job.path),
        previous=lambda a: _previous_result(a, job, store, env.probe_hash),
        shared_capture=env.shared_capture,
    )
    outcomes = [_store(c, job, store, env.probe_hash) for c in computed]
    return JobResult(job.step, job.rel, outcomes, load_s=load_s, capture_s=capture_s)


def execute_jobs(jobs: list[Job], env: WorkerEnv) -> list[JobResult]:
    """Run several jobs in order in one worker (the unit a backend schedules)."""
    return [execute_job(j, env) for j in jobs]


# --- backends -------------------------------------------------------------------------------------------------------
class Executor(Protocol):
    """Runs job lists somewhere; the runner keeps at most ``capacity`` in flight."""

    capacity: int

    def submit(self, jobs: list[Job]) -> Any: ...

    def wait_one(self) -> tuple[Any, list[JobResult]]: ...

    def close(self) -> None: ...


class InlineExecutor:
    """Runs each job list in this process when it is collected (``workers=1``)."""

    capacity = 1

    def __init__(self, env: WorkerEnv) -> None:
        self.env = env
        self.pending: deque[tuple[int, list[Job]]] = deque()
        self._n = 0
        self._threads_before: int | None = None
        if env.torch_threads:  # execute_job sets them in this process: put them back on close
            import torch

            self._threads_before = torch.get_num_threads()

    def submit(self, jobs: list[Job]) -> int:
        self._n += 1
        self.pending.append((self._n, jobs))
        return self._n

    def wait_one(self) -> tuple[int, list[JobResult]]:
        handle, jobs = self.pending.popleft()
        return handle, execute_jobs(jobs, self.env)

    def close(self) -> None:
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)


class ProcessExecutor:
    """``workers`` spawned processes (spawn: safe with torch and threads), torch threads split between them."""

    def __init__(self, env: WorkerEnv, workers: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.capacity = workers
        self.env = env
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
        self.futures: dict[Any, Any] = {}

    def submit(self, jobs: list[Job]) -> Any:
        fut = self.pool.submit(execute_jobs, jobs, self.env)
        self.futures[fut] = fut
        return fut

    def wait_one(self) -> tuple[Any, list[JobResult]]:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
        fut = next(iter(done))
        del self.futures[fut]
        return fut, fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """One Ray task per job list; the worker env (probe set included) is put once into the object store.

    Each task asks for one CPU, plus ``gpu_fraction`` of a GPU when the cluster has GPUs (so several checkpoints
    share a GPU). A local instance is started when ``address`` is None and Ray is not initialised yet.
    """

    def __init__(self, env: WorkerEnv, address: str | None, gpu_fraction: float) -> None:
        try:
            import ray
        except ImportError:
            raise RunnerError("the ray backend needs Ray: pip install 'mlmscope[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as e:
                raise RunnerError(f"could not connect to Ray at {address!r}: {e}") from None
        gpus = ray.cluster_resources().get("GPU", 0)
        self.capacity = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.remote = ray.remote(num_cpus=1, num_gpus=gpu_fraction if gpus > 0 else 0)(execute_jobs)
        self.env_ref = ray.put(env)
        self.refs: dict[Any, Any] = {}

    def submit(self, jobs: list[Job]) -> Any:
        ref = self.remote.remote(jobs, self.env_ref)
        self.refs[ref] = ref
        return ref

    def wait_one(self) -> tuple[Any, list[JobResult]]:
        done, _ = self.ray.wait(list(self.refs), num_returns=1)
        ref = done[0]
        del self.refs[ref]
        return ref, self.ray.get(ref)

    def close(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref)


# --- progress and summary -------------------------------------------------------------------------------------------
class Reporter(Protocol):
    def start(self, total: int) -> None: ...

    def add_total(self, n: int) -> None: ...

    def advance(self, result: JobResult | None, n: int = 1) -> None: ...

    def message(self, text: str) -> None: ...

    def stop(self) -> None: ...


class NullReporter:
    """Silent reporter (tests, library use)."""

    def start(self, total: int) -> None:
        pass

    def add_total(self, n: int) -> None:
        pass

    def advance(self, result: JobResult | None, n: int = 1) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class Summary:
    """Counts per analysis and status, timings, and the failures of this invocation."""

    counts: Counter = field(default_factory=Counter)  # (analysis, status) -> n
    seconds: Counter = field(default_factory=Counter)  # analysis -> compute seconds
    failures: list[Outcome] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checkpoints: int = 0
    load_s: float = 0.0
    capture_s: float = 0.0
    wall_s: float = 0.0

    def add(self, o: Outcome) -> None:
        self.counts[(o.analysis, o.status)] += 1
        # a Counter of float seconds (missing analyses read 0); typeshed types Counter values as int
        self.seconds[o.analysis] += o.seconds  # pyright: ignore[reportArgumentType]
        if o.status == "failed":
            self.failures.append(o)

    @property
    def failed(self) -> int:
        return len(self.failures)


# --- the coordinator ------------------------------------------------------------------------------------------------
class Runner:
    """Plans and runs the analyses of one run folder (see the module docstring).

    Args:
        run_dir: Run folder with ``manifest.json``, or any folder of ``step_*``/``checkpoint-*`` checkpoint folders.
        config: Options.
        probe_set: A probe set object (overrides ``config.probes``); tests pass a list of word lists.
        analyses: Analysis instances (override ``config.analyses``; their classes must be importable by workers).
        capture_fn: ``capture_fn(lm, probe_set, variants=, names=, batch_size=)`` yielding CaptureBatch objects;
            defaults to ``mlmscope.probes.capture.capture``.
        load_fn: ``load_fn(path, device=)`` returning a ``mlmscope.probes.model.LoadedModel``-like object.
        reporter: Progress/summary sink (default: silent).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: RunnerConfig | None = None,
        *,
        probe_set: Any = None,
        analyses: Sequence[Analysis] | None = None,
        capture_fn: Callable[..., Iterable[Any]] | None = None,
        load_fn: Callable[..., Any] | None = None,
        reporter: Reporter | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise RunnerError(f"run folder {str(self.run_dir)!r} does not exist")
        self.config = config or RunnerConfig()
        if self.config.backend not in ("local", "ray"):
            raise RunnerError(f"unknown backend {self.config.backend!r}; choose local or ray")
        if self.config.workers < 1:
            raise RunnerError("--workers must be at least 1")
        if self.config.threads is not None and self.config.threads < 1:
            raise RunnerError(f"--threads must be at least 1, got {self.config.threads}")
        self.store = ResultStore(self.run_dir, self.config.results_dir)
        self.analyses = (
            list(analyses) if analyses is not None else self._make_analyses(self.config.analyses, self.config.params)
        )
        self._probe_set = probe_set
        self.capture_fn = capture_fn or default_capture
        self.load_fn = load_fn or default_load
        self.reporter = reporter or NullReporter()
        self.step_ok = parse_steps(self.config.steps)

    @staticmethod
    def _make_analyses(
        names: Sequence[str] | None, params: Mapping[str, Mapping[str, str]] | None = None
    ) -> list[Analysis]:
        registry = load_all()
        names = sorted(registry) if names is None else list(names)
        params = params or {}
        for n in params:
            if n not in names:
                raise RunnerError(
                    f"--param {n}.…: analysis {n!r} is not "
                    f"{'registered' if n not in registry else 'among those requested (-a)'}"
                )
        out = []
        for n in names:
            try:
                out.append(get(n).from_text(params.get(n, {})))
            except KeyError as e:
                raise RunnerError(e.args[0]) from None
        if not out:
            raise RunnerError("no analyses registered or requested")
        return out

    # --- probe set ----------------------------------------------------------------------------------------------
    def probe_set(self) -> Any:
        """The probe set: given explicitly, from ``config.probes``, or the run's default (built and cached)."""
        if self._probe_set is None:
            self._probe_set = resolve_probe_set(self.run_dir, self.config.probes, self._latest_checkpoint_dir())
        return self._probe_set

    def _latest_checkpoint_dir(self) -> Path | None:
        entries = list_checkpoints(self.run_dir)
        return self.run_dir / entries[-1].path if entries else None

    # --- planning -----------------------------------------------------------------------------------------------
    def _hash_of(self, entry: CheckpointEntry) -> str:
        if entry.sha256:
            return entry.sha256
        return self.store.cached_hash(self.run_dir / entry.path, weights_sha256)

    def plan(self, entries: Sequence[CheckpointEntry], probe_hash: str) -> tuple[list[Job], list[Outcome]]:
        """Jobs for the pending (checkpoint, analysis) pairs, and the outcomes known without running anything
        (cached results, byte-identical duplicates, checkpoints whose weights cannot even be hashed)."""
        jobs, known = [], []
        earlier: list[tuple[int, str]] = []
        seen: set[str] = set()
        for e in sorted(entries, key=lambda c: c.step):
            path = self.run_dir / e.path
            try:
                h = self._hash_of(e)
            except Exception as err:
                msg = _error_text(err)
                self.store.record_failure(e.path, CHECKPOINT_SCOPE, msg, tb.format_exc(), {"step": e.step})
                known += [Outcome(e.step, e.path, a.name, "failed", error=msg) for a in self.analyses]
                continue
            pending = []
            for a in self.analyses:
                if h in seen or (not self.config.force and self.store.has(result_key(a, h, probe_hash))):
                    known.append(Outcome(e.step, e.path, a.name, "cached"))
                else:
                    pending.append(a)
            if pending:
                jobs.append(
                    Job(
                        e.step,
                        str(path),
                        e.path,
                        h,
                        pending,
                        verify_hash=bool(e.sha256 and self.config.verify_hash),
                        earlier=list(reversed(earlier)),
                    )
                )
            seen.add(h)
            earlier.append((e.step, h))
        return jobs, known

    def _split(self, jobs: list[Job]) -> tuple[deque[list[Job]], deque[list[Job]]]:
        """Job lists for the executor: parallel ones, and the sequential warm-start chain."""
        parallel: deque[list[Job]] = deque()
        chain: deque[list[Job]] = deque()
        combine = self.config.backend == "local" and self.config.workers == 1
        for j in jobs:
            chained = [a for a in j.analyses if a.chained]
            free = [a for a in j.analyses if not a.chained]
            if combine or not chained or not free:
                (chain if chained and not combine else parallel).append([j])
            else:
                parallel.append([_with(j, free)])
                chain.append([_with(j, chained)])
        return parallel, chain

    # --- running ------------------------------------------------------------------------------------------------
    def _executor(self, env: WorkerEnv) -> Executor:
        threads = self.config.threads
        if self.config.backend == "ray":
            env.torch_threads = threads
            return RayExecutor(env, self.config.address, self.config.gpu_fraction)
        if self.config.workers == 1:
            env.torch_threads = threads
            return InlineExecutor(env)
        env.torch_threads = max(1, (threads or os.cpu_count() or 1) // self.config.workers)
        return ProcessExecutor(env, self.config.workers)

    def _env(self, probe_set: Any, probe_hash: str) -> WorkerEnv:
        return WorkerEnv(
            run_dir=str(self.run_dir),
            results_dir=self.config.results_dir,
            probe_set=probe_set,
            probe_hash=probe_hash,
            capture_fn=self.capture_fn,
            load_fn=self.load_fn,
            batch_size=self.config.batch_size,
            device=self.config.device,
            shared_capture=self.config.shared_capture,
        )

    def _entries(self) -> list[CheckpointEntry]:
        return [e for e in list_checkpoints(self.run_dir) if self.step_ok(e.step)]

    def check_input(self) -> None:
        """Refuse a run that would do nothing: no checkpoint at all, or none matching ``--steps`` (not with follow).

        Raises:
            RunnerError: with what was looked for and where.
        """
        if self.config.follow:
            return
        entries = list_checkpoints(self.run_dir)
        if not entries:
            from .target import nothing_found_message

            raise RunnerError(nothing_found_message(self.run_dir))
        if not any(self.step_ok(e.step) for e in entries):
            raise RunnerError(
                f"no checkpoint of {str(self.run_dir)!r} matches --steps {self.config.steps!r} "
                f"(it has {len(entries)}, steps {entries[0].step}-{entries[-1].step})"
            )

    def check_probe_fit(self, probe_set: Any) -> list[str]:
        """Warnings about the probe set against the latest checkpoint's tokenizer (see :mod:`mlmscope.probes.fit`).

        Skipped when the probe set has no word lists or the tokenizer cannot be loaded (that checkpoint's load
        failure is then recorded by the run itself).

        Raises:
            RunnerError: no probe sentence is usable, or every one is mostly [UNK].
        """
        from ..probes.fit import fit_report, load_tokenizer
        from ..probes.model import ModelLoadError

        model_dir = self._latest_checkpoint_dir()
        sentences = getattr(probe_set, "sentences", probe_set)
        if model_dir is None or not isinstance(sentences, list):
            return []
        try:
            tok, max_length = load_tokenizer(model_dir)
        except ModelLoadError:
            return []
        report = fit_report(tok, probe_set, max_length, model=str(model_dir))
        refusal = report.refusal()
        if refusal:
            raise RunnerError(refusal)
        return report.warnings()

    def run(self) -> Summary:
        """Analyse every selected checkpoint (and, with ``follow``, new ones until training finishes).

        Raises:
            RunnerError: nothing to analyse, or a probe set that does not fit the model (see :meth:`check_input`,
                :meth:`check_probe_fit`).
        """
        t_start = time.perf_counter()
        summary = Summary()
        self.check_input()
        probe_set = self.probe_set()
        summary.warnings = self.check_probe_fit(probe_set)
        for w in summary.warnings:
            self.reporter.message(f"[yellow]warning:[/yellow] {w}")
        probe_hash = probe_set_hash(probe_set)
        executor = self._executor(self._env(probe_set, probe_hash))
        done_steps: set[tuple[int, str]] = set()
        self.reporter.start(0)
        try:
            last_new = time.monotonic()
            while True:
                status = self._run_status()
                entries = [e for e in self._entries() if (e.step, e.path) not in done_steps]
                if entries:
                    last_new = time.monotonic()
                    self._run_batch(entries, probe_hash, executor, summary)
                    done_steps |= {(e.step, e.path) for e in entries}
                if not self._keep_following(status, last_new):
                    break
                time.sleep(self.config.poll_s)
        finally:
            executor.close()
            self.reporter.stop()
        summary.wall_s = time.perf_counter() - t_start
        return summary

    def _run_status(self) -> str | None:
        if not (self.run_dir / MANIFEST).exists():
            return None
        try:
            return Manifest.load(self.run_dir).run.get("status")
        except (OSError, ValueError):
            return None

    def _keep_following(self, status: str | None, last_new: float) -> bool:
        if not self.config.follow:
            return False
        if status is None and not (self.run_dir / MANIFEST).exists():
            self.reporter.message("no manifest.json: nothing to follow, stopping")
            return False
        if status in TERMINAL_STATUSES:
            return False
        timeout = self.config.idle_timeout_s
        if timeout is not None and time.monotonic() - last_new > timeout:
            self.reporter.message(f"no new checkpoint for {timeout:.0f} s, stopping")
            return False
        return True

    def _run_batch(self, entries: list[CheckpointEntry], probe_hash: str, executor: Executor, summary: Summary) -> None:
        jobs, known = self.plan(entries, probe_hash)
        summary.checkpoints += len(entries)
        for o in known:
            summary.add(o)
        parallel, chain = self._split(jobs)
        parts = Counter(j.rel for lst in list(parallel) + list(chain) for j in lst)  # job lists per checkpoint
        self.reporter.add_total(len(entries))
        self.reporter.advance(None, len(entries) - len(parts))
        in_flight: dict[Any, bool] = {}  # handle -> is chain
        chain_busy = False
        while parallel or chain or in_flight:
            while len(in_flight) < executor.capacity and (parallel or (chain and not chain_busy)):
                if chain and not chain_busy:
                    in_flight[executor.submit(chain.popleft())] = True
                    chain_busy = True
                else:
                    in_flight[executor.submit(parallel.popleft())] = False
            handle, results = executor.wait_one()
            if in_flight.pop(handle):
                chain_busy = False
            self._collect(results, parts, summary)

    def _collect(self, results: list[JobResult], parts: Counter, summary: Summary) -> None:
        for r in results:
            for o in r.outcomes:
                summary.add(o)
            summary.load_s += r.load_s
            summary.capture_s += r.capture_s
            self.store.note_written(o.record for o in r.outcomes if o.record is not None)
            parts[r.rel] -= 1
            self.reporter.advance(r, 1 if parts[r.rel] == 0 else 0)


def _with(job: Job, analyses: list[Analysis]) -> Job:
    return Job(job.step, job.path, job.rel, job.ckpt_hash, analyses, job.verify_hash, job.earlier)


def resolve_probe_set(run_dir: Path, probes: str | None, model_dir: Path | None) -> Any:
    """Load ``probes`` (a probe-set folder or CoNLL-U file), or the run's default probe set.

    The default is built once from the run corpus' validation split (``mlmscope.probes.probeset.build_default``,
    filtered for the run's tokenizer and position limit) and cached in ``RUN/probes/default`` (written to a temporary
    folder and renamed, so a killed build leaves nothing half-written).

    Raises:
        RunnerError: no checkpoint to take the tokenizer from.
    """
    from ..probes.probeset import BuildConfig, build_default, load_probe_set

    if probes is not None:
        return load_probe_set(probes)
    cached = run_dir / DEFAULT_PROBES
    if (cached / "probeset.json").exists():
        return load_probe_set(cached)
    if model_dir is None:
        raise RunnerError(f"{str(run_dir)!r} has no checkpoints to build the default probe set for; pass --probes")
    from ..checkpoints.config import DataConfig
    from ..probes.fit import load_tokenizer

    tokenizer, max_length = load_tokenizer(model_dir)  # the tokenizer is all the builder needs: no weights loaded
    data = Manifest.load(run_dir).run.get("config", {}).get("data") if (run_dir / MANIFEST).exists() else None
    ps = build_default(
        BuildConfig(), tokenizer=tokenizer, max_length=max_length, data_cfg=DataConfig(**data) if data else DataConfig()
    )
    tmp = cached.parent / f".tmp-default-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ps.save(tmp)
    shutil.rmtree(cached, ignore_errors=True)
    os.replace(tmp, cached)
    return ps
