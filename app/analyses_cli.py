"""``mlmscope analyze PATH`` and ``mlmscope analyses list|failures|bench`` (mounted by app/cli.py).

``analyze_command`` is the typer-annotated function behind ``mlmscope analyze``; ``app`` holds the ``analyses``
sub-commands. PATH is a run, a folder of checkpoint folders, one model folder (analysed as a trajectory of one
into a results folder outside it: see :mod:`mlmscope.analyses.target`), or published checkpoints named by hub id and
revision or a suite file (resolved from the Hugging Face cache: see :mod:`mlmscope.analyses.sources`). User errors
(bad or empty folder, unknown analysis, bad --steps, unreachable Ray cluster, bad probe set) print one line and exit
1; a run where any checkpoint failed also exits 1 after the summary.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .boundary import UserError

if TYPE_CHECKING:
    from ..analyses.runner import JobResult, RunnerConfig, Summary
    from ..probes.probeset import ProbeSet

# mlmscope.analyses.runner / mlmscope.analyses.store (torch, pandas) are imported inside the commands, so
# `mlmscope --help` stays fast.

app = typer.Typer(
    help="The registered analyses: list them, show recorded failures, benchmark them against the capture.",
    no_args_is_help=True,
)
console = Console(stderr=True)


def _names(values: list[str] | None) -> list[str] | None:
    """``-a sas,lens -a outliers`` -> ["sas", "lens", "outliers"]; None/"all" -> None (every registered one)."""
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return None if names in ([], ["all"]) else names


def analyze_command(
    run: Path = typer.Argument(
        ...,
        help="Run folder, any folder of step_*/checkpoint-* checkpoint folders, one "
        "model folder (HF BERT/RoBERTa MLM, head-less BertModel, a run's step_*), or published checkpoints: "
        "hf:ORG/NAME (with --revisions), hf:ORG/A,ORG/B (one repo per step), or a suite .json/.yaml file.",
    ),
    analyses: list[str] | None = typer.Option(
        None, "--analyses", "-a", help="Analyses to run (comma-separated or repeated; default all)."
    ),
    params: list[str] | None = typer.Option(
        None,
        "--param",
        "-p",
        help="An analysis parameter, NAME.FIELD=VALUE "
        "(repeatable; typed by the analysis's Params, listed by `mlmscope "
        "analyses list`), e.g. -p sas.min_count=50 -p tuned_lens.max_steps=50.",
    ),
    steps: str | None = typer.Option(None, help="Steps to analyse, e.g. '0,100,400-2000,5000-' (default all)."),
    workers: int = typer.Option(1, help="Local worker processes (torch threads are split between them)."),
    threads: int | None = typer.Option(
        None, help="torch threads in all (split between --workers; default: one per core)."
    ),
    out: Path | None = typer.Option(
        None,
        help="Results folder for a single model folder (default: runs/models/<name>-<hash8>) or for published "
        "checkpoints (default: runs/hub/<org>--<name>, runs/suites/<suite name>); not for a run.",
    ),
    backend: Literal["local", "ray"] = typer.Option(
        "local", help="Where checkpoints are analysed: local processes or one Ray task each."
    ),
    address: str | None = typer.Option(
        None, help="Ray cluster address: auto or HOST:PORT (default: start a local Ray instance)."
    ),
    force: bool = typer.Option(False, help="Recompute results that are already stored."),
    follow: bool = typer.Option(
        False, help="Keep analysing new checkpoints until the manifest says training finished."
    ),
    poll: float = typer.Option(10.0, help="Seconds between manifest polls with --follow."),
    idle_timeout: float | None = typer.Option(
        None, help="With --follow, stop after this many seconds without a new checkpoint."
    ),
    probes: Path | None = typer.Option(
        None,
        help="Probe set folder or CoNLL-U file (default: the run's default "
        "probe set, built once into RUN/probes/default; for a single "
        "model, into its results folder).",
    ),
    batch_size: int = typer.Option(32, help="Probe sentences per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:1 ..."),
    verify_hash: bool = typer.Option(True, help="Re-hash weights against the manifest before analysing."),
    revisions: str | None = typer.Option(
        None,
        help="hf:ORG/NAME only: revisions to analyse, comma-separated names or patterns "
        "(e.g. 'step_0,step_20000' or 'step_*'); each step is read from the revision name.",
    ),
    skip_missing: bool = typer.Option(
        False,
        help="Published checkpoints missing from the Hugging Face cache are left out (listed) instead of refused.",
    ),
    evict: bool = typer.Option(
        False,
        help="Published checkpoints: delete each from the Hugging Face cache once analysed (needs the hub: "
        "they are downloaded one at a time).",
    ),
) -> None:
    """Run every requested analysis over every checkpoint of RUN (or on one model): cached, resumable, in parallel."""
    from ..analyses.runner import Runner, RunnerConfig
    from ..analyses.store import ResultStore
    from ..analyses.target import resolve_target

    cfg = RunnerConfig(
        analyses=_names(analyses),
        params=_params(params),
        steps=steps,
        workers=workers,
        backend=backend,
        address=address,
        force=force,
        follow=follow,
        poll_s=poll,
        idle_timeout_s=idle_timeout,
        probes=str(probes) if probes else None,
        batch_size=batch_size,
        device=device,
        verify_hash=verify_hash,
        threads=threads,
    )
    probe_set = _check_options(cfg, probes)
    if evict:
        from ..analyses.sources import check_evict, is_source_spec

        if not is_source_spec(run):
            raise UserError("--evict is for published checkpoints (hf:ORG/NAME or a suite file)")
        check_evict()
    target = resolve_target(run, out, follow, revisions=revisions, steps=steps, skip_missing=skip_missing)
    if target.kind == "hub":
        _analyze_source(target, cfg, probe_set, evict)
        return
    if target.kind == "model":
        console.print(
            f"single model {str(target.path)!r}: a trajectory of one checkpoint; results in "
            f"{str(target.run_dir)!r} (then: mlmscope report {target.run_dir})",
            highlight=False,
            soft_wrap=True,
        )
    summary = Runner(target.run_dir, cfg, probe_set=probe_set, reporter=RichReporter(console)).run()
    print_summary(summary, Console())
    if summary.failed:
        console.print(
            f"[red]{summary.failed} (checkpoint, analysis) pairs failed[/]; errors are recorded in "
            f"{ResultStore(target.run_dir, cfg.results_dir).root / '_failures'}; re-run to retry only those"
        )
        raise typer.Exit(1)


def _analyze_source(target: Any, cfg: RunnerConfig, probe_set: ProbeSet | None, evict: bool) -> None:
    """``mlmscope analyze hf:...`` / ``SUITE.json``: every seed's run folder in turn, then one summary each."""
    from ..analyses.sources import analyse_source, hub_offline
    from ..analyses.store import ResultStore

    prep = target.source
    seeds = f" ({len(target.runs)} seeds)" if len(target.runs) > 1 else ""
    mode = "offline (HF_HUB_OFFLINE)" if hub_offline() else "missing ones downloaded one at a time"
    console.print(
        f"published trajectory {str(target.path)!r}: {target.n_checkpoints} checkpoints{seeds} from the Hugging "
        f"Face cache {str(prep.cache_dir)!r}, {mode}; results in {str(target.run_dir)!r} (then: mlmscope report "
        f"{target.run_dir}, mlmscope app {target.run_dir})",
        highlight=False,
        soft_wrap=True,
    )
    for ck, why in prep.skipped:
        console.print(f"[yellow]skipped[/yellow] {ck.label} (step {ck.step}): {why}", highlight=False, soft_wrap=True)
    done = analyse_source(
        target,
        cfg,
        probe_set,
        reporter=lambda: RichReporter(console),
        evict_after=evict,
        say=lambda text: console.print(text, highlight=False, soft_wrap=True),
    )
    failed = 0
    for run_dir, summary in done:
        if len(done) > 1:
            Console().print(f"[bold]{run_dir}[/]")
        print_summary(summary, Console())
        if summary.failed:
            failed += summary.failed
            console.print(
                f"[red]{summary.failed} (checkpoint, analysis) pairs failed[/]; errors are recorded in "
                f"{ResultStore(run_dir, cfg.results_dir).root / '_failures'}; re-run to retry only those"
            )
    if failed:
        raise typer.Exit(1)


def _check_options(cfg: RunnerConfig, probes: Path | None) -> ProbeSet | None:
    """Check the options before any folder is created; return the ``--probes`` probe set (loaded once) or None.

    Raises:
        RunnerError, ProbeError: with a one-line message.
    """
    from ..analyses.runner import Runner, RunnerError, parse_steps
    from ..probes.probeset import load_probe_set

    if cfg.threads is not None and cfg.threads < 1:
        raise RunnerError(f"--threads must be at least 1, got {cfg.threads}")
    if cfg.workers < 1:
        raise RunnerError("--workers must be at least 1")
    if cfg.batch_size < 1:
        raise RunnerError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if probes is not None and not probes.exists():
        raise RunnerError(f"probe set {str(probes)!r} does not exist")
    parse_steps(cfg.steps)
    Runner._make_analyses(cfg.analyses, cfg.params)
    return load_probe_set(probes) if probes is not None else None


def _params(values: list[str] | None) -> dict[str, dict[str, str]]:
    """``-p sas.min_count=50 -p sas.margin_se=3`` -> {"sas": {"min_count": "50", "margin_se": "3"}} (cast later)."""
    out: dict[str, dict[str, str]] = {}
    for v in values or []:
        key, sep, text = v.partition("=")
        name, dot, field_name = key.strip().partition(".")
        if not (sep and dot and name and field_name):
            raise UserError(f"--param expects NAME.FIELD=VALUE (e.g. sas.min_count=50), got {v!r}")
        out.setdefault(name, {})[field_name] = text.strip()
    return out


def _type_name(tp: Any) -> str:
    """``int``, ``tuple[str, ...]``, ``float | None``: as written in the ``Params`` dataclass."""
    import typing

    return tp.__name__ if typing.get_origin(tp) is None and hasattr(tp, "__name__") else str(tp).replace("typing.", "")


@app.command("list")
def list_command() -> None:
    """Registered analyses: version, capture variants, a one-line description and the parameters (``--param``)."""
    from ..analyses.base import load_all

    table = Table("name", "version", "variants", "MLM head", "description", "parameters (default)")
    for name, cls in sorted(load_all().items()):
        params = ", ".join(f"{k}: {_type_name(tp)} = {default!r}" for k, (tp, default) in cls.param_fields().items())
        table.add_row(
            name,
            str(cls.version),
            ",".join(cls.variants),
            "yes" if cls.needs_mlm_head else "",
            escape(cls.description),
            escape(params),
        )
    Console().print(table)


@app.command("failures")
def failures_command(
    run: Path = typer.Argument(..., help="Run folder, or a model folder / its results folder."),
) -> None:
    """Recorded failures of RUN (checkpoint, analysis, error); exit 1 if there are any."""
    from ..analyses.store import ResultStore
    from ..analyses.target import results_folder

    if not run.is_dir():
        raise UserError(f"run folder {str(run)!r} does not exist")
    recs = ResultStore(results_folder(run)).failures()
    table = Table("step", "checkpoint", "analysis", "error")
    for r in sorted(recs, key=lambda r: (r.get("step") or 0, r["analysis"])):
        table.add_row(str(r.get("step", "")), r["checkpoint"], r["analysis"], r["error"])
    Console().print(table)
    if recs:
        raise typer.Exit(1)


@app.command("bench")
def bench_command(
    run: Path = typer.Argument(
        Path("runs/demo"), help="Run, folder of checkpoints, or ONE model folder (e.g. all-MiniLM-L6-v2)."
    ),
    analyses: list[str] | None = typer.Option(None, "--analyses", "-a", help="Analyses (default all)."),
    params: list[str] | None = typer.Option(None, "--param", "-p", help="NAME.FIELD=VALUE, as for analyze."),
    steps: str | None = typer.Option(None, help="Step filter (default all)."),
    probes: Path | None = typer.Option(None, help="Probe set (default: the run's default, built once)."),
    batch_size: int = typer.Option(32),
    device: str = typer.Option("auto", help="auto | cpu | cuda ..."),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's choice, one per core)."),
    forward: bool = typer.Option(True, help="Also time the bare encoder forward (the floor under the capture)."),
    naive: bool = typer.Option(
        False, help="Instead: the old comparison, shared capture vs one capture per analysis vs N workers (a run)."
    ),
    workers: int = typer.Option(2, help="With --naive: worker count compared against 1."),
    out: Path | None = typer.Option(None, help="Also write the timings as JSON here."),
) -> None:
    """Where the time goes: per analysis, seconds and the ratio to the capture of the same checkpoints, vs budgets."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if naive:
        _naive_bench(run, analyses, steps, probes, batch_size, workers, out)
        return
    from ..analyses.bench import bench_run

    def progress(t: Any) -> None:
        console.print(
            f"step {t.step if t.step is not None else '-'}: load {t.load_s:.2f} s, capture "
            + ", ".join(f"{v} {s:.2f} s" for v, s in t.capture_s.items())
            + f", analyses {t.analysis_s:.2f} s",
            highlight=False,
        )

    report = bench_run(
        run,
        _names(analyses),
        params=_params(params),
        steps=steps,
        probes=probes,
        batch_size=batch_size,
        device=device,
        forward=forward,
        progress=progress,
    )
    print_bench(report.to_dict(), Console(width=max(Console().width, 150)))
    if out:
        out.write_text(json.dumps(report.to_dict(), indent=1, default=str))


def print_bench(d: dict[str, Any], out: Console) -> None:
    """The per-analysis table (seconds, ratios to the capture, budget, met) and the suite's summary lines."""
    m, s = d["machine"], d["summary"]
    table = Table(
        "analysis",
        "ckpts",
        "s",
        "s/ckpt",
        "x clean",
        "x masked",
        "x clean (CPU)",
        "budget",
        "met",
        title=f"analysis compute vs capture ({s['checkpoints']} checkpoint(s), {s['n_sentences']} sentences)",
    )
    not_run = []
    for r in d["analyses"]:
        if r["status"] != "ok":
            not_run.append(f"{r['analysis']}: {r['status']} ({r['reason']})")
            continue
        budget, met = "", ""
        if r["budget"] is not None:
            budget = f"<= {r['budget']:g}x"
            if r["budget_per"] == "configuration":
                budget += f" per config. (here {r['x_budget_unit']:.2f}x)"
            met = "yes" if r["met"] else "[red]no[/]"
        nan = r["x_masked"] != r["x_masked"]
        table.add_row(
            r["analysis"],
            str(r["checkpoints"]),
            f"{r['seconds']:.2f}",
            f"{r['per_checkpoint_s']:.3f}",
            f"{r['x_clean']:.2f}",
            "" if nan else f"{r['x_masked']:.2f}",
            f"{r['x_clean_cpu']:.2f}",
            budget,
            met,
        )
    out.print(table)
    for line in not_run:
        out.print(f"  not measured: {line}", highlight=False, soft_wrap=True)
    fwd = ""
    if s["forward_s"] is not None:
        fwd = (
            f"; bare encoder forward {s['forward_s']:.2f} s ({s['tokens_per_s_forward']:.0f} tokens/s, the capture "
            f"costs {s['capture_over_forward']:.2f}x it)"
        )
    load = m.get("load_avg_1min_at_start")
    out.print(
        f"capture: clean {s['capture_clean_s']:.2f} s ({s['tokens_per_s_clean_capture'] or 0:.0f} tokens/s), "
        f"masked {s['capture_masked_s']:.2f} s, all variants {s['capture_s']:.2f} s{fwd}\n"
        f"suite: analyses {s['analysis_s']:.2f} s = {s['suite_x_clean'] or 0:.2f}x the clean capture, "
        f"{s['suite_x_capture'] or 0:.2f}x all captures; load {s['load_s']:.2f} s\n"
        f"per checkpoint: {s['per_checkpoint_s']:.2f} s (capture {s['per_checkpoint_capture_s']:.2f} s, analyses "
        f"{s['per_checkpoint_analysis_s']:.2f} s)\n"
        f"machine: CPU {m['cpu_capability']}, native bf16 {'yes' if m['cpu_native_bf16'] else 'no'}, "
        f"{m['threads']} torch threads on {m['cpu_count']} cores, OpenMP wait {m.get('omp_wait_policy', '?')}, "
        f"device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + (f"; load average {load} at start, {m.get('load_avg_1min')} at end" if load is not None else ""),
        highlight=False,
        soft_wrap=True,
    )


def _naive_bench(
    run: Path,
    analyses: list[str] | None,
    steps: str | None,
    probes: Path | None,
    batch_size: int,
    workers: int,
    out: Path | None,
) -> None:
    """The earlier headline: shared capture vs naive (one capture per analysis) vs N workers, whole runs."""
    timings = run_bench(run, _names(analyses), steps, str(probes) if probes else None, batch_size, workers)
    out_console = Console()
    table = Table("mode", "seconds", "load s", "capture s", "analyses s", "checkpoints", "failed")
    for mode, t in timings["modes"].items():
        table.add_row(
            mode,
            f"{t['seconds']:.1f}",
            f"{t['load_s']:.1f}",
            f"{t['capture_s']:.1f}",
            f"{sum(t['compute_s'].values()):.1f}",
            str(t["checkpoints"]),
            str(t["failed"]),
        )
    out_console.print(table)
    per = Table("analysis", "shared: compute s", "naive: compute s", title="analysis compute (summed over workers)")
    shared, naive = timings["modes"]["shared"]["compute_s"], timings["modes"]["naive"]["compute_s"]
    for name in sorted(shared, key=shared.get, reverse=True):
        per.add_row(name, f"{shared[name]:.1f}", f"{naive.get(name, 0.0):.1f}")
    out_console.print(per)
    out_console.print(
        f"naive / shared = {timings['naive_over_shared']:.2f}x   "
        f"capture alone: naive / shared = {timings['capture_ratio']:.2f}x   "
        f"analysis compute = {timings['compute_share']:.0%} of the shared run\n"
        f"1 worker / {workers} workers = {timings['speedup_workers']:.2f}x   "
        f"shared and naive results identical: {timings['identical']}"
    )
    if out:
        out.write_text(json.dumps(timings, indent=1))


def run_bench(
    run: Path, analyses: list[str] | None, steps: str | None, probes: str | None, batch_size: int, workers: int
) -> dict[str, Any]:
    """Analyse RUN three times into scratch result stores: shared capture, naive, shared with N workers.

    The probe set is resolved and one checkpoint analysed once beforehand (not timed, so imports and first-call
    costs land on no mode); each mode starts from an empty store (``force``).

    Returns:
        ``{"modes": {mode: {seconds, checkpoints, failed, load_s, capture_s, compute_s}}, "naive_over_shared",
        "capture_ratio", "compute_share", "speedup_workers", "identical"}``.
    """
    from ..analyses.runner import Runner, RunnerConfig

    base: dict[str, Any] = dict(analyses=analyses, steps=steps, probes=probes, batch_size=batch_size, force=True)
    probe_set = Runner(run, RunnerConfig(**base)).probe_set()
    modes = {
        "shared": dict(shared_capture=True),
        "naive": dict(shared_capture=False),
        f"shared, {workers} workers": dict(workers=workers),
    }
    out: dict[str, Any] = {"modes": {}}
    with tempfile.TemporaryDirectory(prefix="mlmscope-bench-") as scratch:
        # untimed warm-up on the first checkpoint: imports and first-call costs would otherwise land on one mode
        from ..analyses.runner import parse_steps
        from ..checkpoints.manifest import list_checkpoints

        first = next((c.step for c in list_checkpoints(run) if parse_steps(steps)(c.step)), 0)
        Runner(
            run,
            RunnerConfig(**{**base, "steps": str(first)}, results_dir=os.path.join(scratch, "warmup")),
            probe_set=probe_set,
        ).run()
        stores = {}
        for mode, extra in modes.items():
            cfg = RunnerConfig(**base, **extra, results_dir=os.path.join(scratch, mode.replace(" ", "_")))
            r = Runner(run, cfg, probe_set=probe_set, reporter=RichReporter(console))
            t0 = time.perf_counter()
            s = r.run()
            out["modes"][mode] = {
                "seconds": time.perf_counter() - t0,
                "checkpoints": s.checkpoints,
                "failed": s.failed,
                "load_s": s.load_s,
                "capture_s": s.capture_s,
                "compute_s": dict(s.seconds),
            }
            stores[mode] = r.store
        out["identical"] = _same_results(stores["shared"], stores["naive"])
    t = {m: v["seconds"] for m, v in out["modes"].items()}
    out["naive_over_shared"] = t["naive"] / t["shared"]
    sh, nv = out["modes"]["shared"], out["modes"]["naive"]
    out["capture_ratio"] = nv["capture_s"] / sh["capture_s"] if sh["capture_s"] else float("nan")
    out["compute_share"] = sum(sh["compute_s"].values()) / t["shared"]
    out["speedup_workers"] = t["shared"] / t[f"shared, {workers} workers"]
    return out


def _same_results(a: Any, b: Any) -> bool:
    """Every table of every analysis equal (to float tolerance) between two stores."""
    import pandas as pd

    for name in a.analyses():
        for table in {t for m in a.entries(name) for t in m.get("tables", [])}:
            try:
                pd.testing.assert_frame_equal(a.load(name, table), b.load(name, table), check_exact=False, rtol=1e-5)
            except AssertionError:
                return False
    return a.analyses() == b.analyses()


# --- progress and summary on the terminal ------------------------------------------------------------------------
class RichReporter:
    """Progress bar: checkpoints done / total, elapsed, ETA; failures printed as they happen."""

    def __init__(self, console: Any | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]checkpoints"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: Any = None

    def start(self, total: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("analyze", total=total)

    def add_total(self, n: int) -> None:
        self.progress.update(self.task, total=(self.progress.tasks[0].total or 0) + n)

    def advance(self, result: JobResult | None, n: int = 1) -> None:
        for o in result.outcomes if result else []:
            if o.status == "failed":
                self.progress.console.print(f"[red]failed[/red] step {o.step} ({o.rel}) {o.analysis}: {o.error}")
        self.progress.advance(self.task, n)

    def message(self, text: str) -> None:
        self.progress.console.print(text, soft_wrap=True, highlight=False)

    def stop(self) -> None:
        self.progress.stop()


def summary_table(summary: Summary) -> Table:
    """A rich Table: one row per analysis with ok / cached / skipped / failed counts and compute seconds."""
    t = Table(
        title=f"{summary.checkpoints} checkpoints in {summary.wall_s:.1f} s "
        f"(load {summary.load_s:.1f} s, capture {summary.capture_s:.1f} s)"
    )
    for col in ("analysis", "ok", "cached", "skipped", "failed", "compute s"):
        t.add_column(col, justify="left" if col == "analysis" else "right")
    for name in sorted({a for a, _ in summary.counts}):
        t.add_row(
            name,
            *(str(summary.counts[(name, s)]) for s in ("ok", "cached", "skipped", "failed")),
            f"{summary.seconds[name]:.1f}",
        )
    return t


def analyze_run(
    run_dir: str | os.PathLike, config: RunnerConfig | None = None, console: Any | None = None, **options: Any
) -> Summary:
    """Analyse a run with a progress bar and print the summary table (``mlmscope demo`` calls this).

    Args:
        run_dir: Run folder.
        config: Runner options (or pass them as keyword arguments, e.g. ``workers=2``).
        console: rich Console to print to (default: stderr).
    """
    from ..analyses.runner import Runner, RunnerConfig

    console = console or Console(stderr=True)
    summary = Runner(run_dir, config or RunnerConfig(**options), reporter=RichReporter(console)).run()
    print_summary(summary, console)
    return summary


def print_summary(summary: Summary, console: Any) -> None:
    """The summary table, one line per probe-set warning, one line per failure."""
    console.print(summary_table(summary))
    for w in summary.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)
    for o in summary.failures:
        console.print(f"[red]failed[/red] step {o.step} ({o.rel}) {o.analysis}: {o.error}", highlight=False)
