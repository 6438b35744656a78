"""``mlmscope report RUN``: the command only; the report itself (pandas, numpy) lives in :mod:`mlmscope.app.report` and
is imported when the command runs, so ``mlmscope --help`` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report_command(
    run: Annotated[
        Path,
        typer.Argument(
            help="Run folder analysed with `mlmscope analyze`, a single model's results "
            "folder, or the model folder itself (its default results folder is found)."
        ),
    ],
    out: Annotated[Path | None, typer.Option("--out", help="Also write the Markdown to this file.")] = None,
    max_rows: Annotated[
        int, typer.Option("--max-rows", help="Checkpoints per table (log-spaced, first and last included).")
    ] = 12,
    onset_min_step: Annotated[
        float,
        typer.Option(
            "--onset-min-step",
            help="Onsets ignore checkpoints before this step (e.g. to skip the initial fall to the unigram loss).",
        ),
    ] = 0.0,
) -> None:
    """Print a Markdown report of a run's analysed trajectory (to paste into README.md)."""
    from ..analyses.onset import OnsetParams
    from ..analyses.target import results_folder
    from ..checkpoints.manifest import atomic_write_text
    from .report import build_report

    text = build_report(results_folder(run), max_rows=max_rows, onset=OnsetParams(min_step=onset_min_step))
    typer.echo(text, nl=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
        typer.echo(f"wrote {out}", err=True)
