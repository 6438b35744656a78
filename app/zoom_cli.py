"""``mlmscope zoom RUN``: the command only. The replay lives in :mod:`mlmscope.checkpoints.zoom`; the window of
``--around`` comes from the onset detector (:mod:`mlmscope.analyses.onset`). Both are imported when the command runs,
so ``mlmscope --help`` stays fast."""

from __future__ import annotations

import bisect
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import typer
from rich.console import Console

from .boundary import UserError

console = Console(stderr=True)

Around = Literal["sas", "loss"]


def zoom_command(
    run: Annotated[Path, typer.Argument(help="A run folder trained by `mlmscope train`.")],
    every: Annotated[
        int, typer.Option("--every", help="Write a checkpoint every K steps of the window (K >= 1).", metavar="K")
    ],
    start: Annotated[int | None, typer.Option("--from", help="First step of the window.", metavar="A")] = None,
    end: Annotated[int | None, typer.Option("--to", help="Last step of the window.", metavar="B")] = None,
    around: Annotated[
        Around | None,
        typer.Option(
            "--around",
            help="Window = the interval of the detected onset: sas (structure onset; needs `mlmscope analyze -a "
            "sas`) or loss (loss drop), widened by --pad and out to the run's checkpoints around it.",
        ),
    ] = None,
    pad: Annotated[int, typer.Option("--pad", help="Steps added on each side of the --around interval.")] = 100,
    onset_min_step: Annotated[
        float | None,
        typer.Option(
            "--onset-min-step",
            help="--around: onsets ignore checkpoints before this step (default: before the validation loss first "
            "reaches the unigram entropy, as the dashboard does).",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch threads (default: the run's recorded count; another may change results).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Device to replay on (default: the recorded one).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Replay a window of RUN bit-exactly from its nearest keyframe and write a checkpoint every K steps into it.

    Where the replay passes a checkpoint RUN has, its weights must hash-equal it (else the zoom is undone).

    Killed, the same command finishes the job; run twice, it adds nothing. `mlmscope analyze RUN` then computes the new
    checkpoints only.
    """
    from ..checkpoints.zoom import zoom

    warnings.showwarning = _warn
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    start, end = _window(run, start, end, around, pad, onset_min_step)
    t0 = time.perf_counter()
    result = zoom(run, start, end, every, device=device, threads=threads, progress=progress, say=_say)
    _report(run, result, time.perf_counter() - t0)


def _say(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)


def _warn(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """A warning (e.g. the environment differs from the recorded one) as one yellow line."""
    console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _window(
    run: Path, start: int | None, end: int | None, around: str | None, pad: int, min_step: float | None
) -> tuple[int, int]:
    """``--from``/``--to`` as given, or the window of ``--around``.

    Raises:
        UserError: neither or both ways given, half a window, or no onset to zoom around.
    """
    if around is None:
        if start is None or end is None:
            raise UserError("give the window as --from A --to B, or --around sas|loss")
        return start, end
    if start is not None or end is not None:
        raise UserError("--around picks the window itself: give either --around or --from/--to")
    if pad < 0:
        raise UserError(f"--pad must be >= 0, got {pad}")
    lo, hi, what = onset_interval(run, around, min_step)
    a, b = padded_window(run, lo - pad, hi + pad)
    _say(f"{what} → window {a:,}–{b:,} (±{pad} steps, out to the run's checkpoints)")
    return a, b


def onset_interval(run: Path, around: str, min_step: float | None) -> tuple[float, float, str]:
    """(lo, hi, description) of the onset's interval on RUN's curve: the bootstrap interval of the onset step (the
    onset step alone when the bootstrap gave none).

    Raises:
        UserError: no results to detect on, or no onset found (with the detector's reason).
    """
    from ..analyses.onset import OnsetParams, detect_onset
    from ..analyses.trajectory import Trajectory

    ck = Trajectory(run).checkpoints_frame()
    if around == "sas":
        from ..analyses.sas import sas_curve, sas_onsets

        curve = sas_curve(run)
        if not len(curve):
            raise UserError(f"no SAS results for {run}: run `mlmscope analyze {run} -a sas` first, or give --from/--to")
        params = OnsetParams(min_step=_min_step(run, ck, min_step))
        row = cast(dict[str, Any], sas_onsets(curve, params).iloc[0].to_dict())  # column names are str
        found, reason = row.get("sas_found"), row.get("sas_reason")
        step, lo, hi = row.get("sas_onset_step"), row.get("sas_onset_lo"), row.get("sas_onset_hi")
        name = "structure onset (SAS)"
    else:
        if "val_loss" not in ck or not ck["val_loss"].notna().any():
            raise UserError(f"{run} records no validation loss to detect a loss drop on; give --from/--to")
        o = detect_onset(
            ck["step"], ck["val_loss"], OnsetParams(min_step=_min_step(run, ck, min_step)), direction="down"
        )
        found, reason, step = o.found, o.reason, o.onset_step
        lo, hi = o.onset_ci or (None, None)
        name = "loss-drop onset"
    if not found or step is None:
        raise UserError(f"no {name} detected on {run} ({reason}); give the window with --from/--to")
    lo, hi = _finite(lo, step), _finite(hi, step)
    return min(lo, step), max(hi, step), f"{name} at step {step:,.0f}, interval {lo:,.0f}–{hi:,.0f}"


def _finite(value: Any, default: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return float(default)
    return v if v == v else float(default)  # NaN: no bootstrap interval


def _min_step(run: Path, ck: Any, given: float | None) -> float:
    """``--onset-min-step``, else the first checkpoint whose validation loss is at or below the run's unigram
    entropy (the fall from ln V before it is the model learning token frequencies, not the transition)."""
    if given is not None:
        return given
    from ..checkpoints.manifest import Manifest

    entropy = Manifest.load(run).run.get("val_unigram_entropy") if (run / "manifest.json").exists() else None
    below = ck[ck["val_loss"] <= entropy] if entropy is not None and "val_loss" in ck else ck.iloc[:0]
    return float(below["step"].min()) if len(below) else 0.0


def padded_window(run: Path, lo: float, hi: float) -> tuple[int, int]:
    """[lo, hi] widened out to the training run's own checkpoints around it (clipped to the run)."""
    from ..checkpoints.manifest import Manifest
    from ..checkpoints.zoom import original_steps

    steps = original_steps(Manifest.load(run))
    if not steps:
        raise UserError(f"{run} has no checkpoints")
    i = bisect.bisect_right(steps, lo) - 1
    j = bisect.bisect_left(steps, hi)
    return steps[max(i, 0)], steps[min(j, len(steps) - 1)]


def _report(run: Path, result: Any, seconds: float) -> None:
    """What the zoom did, its time next to what retraining from step 0 cost, and what to run next."""
    p = result.plan
    if result.segment is None:
        console.print(
            f"[green]nothing to do[/]: all {len(p.targets)} checkpoints of {p.start:,}–{p.end:,} every {p.every} "
            f"are in {run} already"
        )
        return
    start = "step 0 (no keyframe)" if result.from_scratch else f"the keyframe at step {result.restored_from:,}"
    retrain = (
        f"; retraining from step 0 to {p.stop:,} took {result.retrain_seconds:,.0f} s in the original run"
        if result.retrain_seconds
        else ""
    )
    console.print(
        f"[green]zoom {result.segment} done[/]: wrote {len(result.written)} checkpoints ({p.start:,}–{p.end:,} every "
        f"{p.every}) in {seconds:,.0f} s, replaying {result.replayed_steps:,} steps from {start}{retrain}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"verified: {result.verified_original} checkpoint(s) of the original run hash-equal"
        + (
            f" (+{len(result.verified) - result.verified_original} of earlier zooms)"
            if len(result.verified) > result.verified_original
            else ""
        )
        + f", {result.losses_checked:,} replayed losses equal to train_log.jsonl",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"next: `mlmscope analyze {run}` computes the new checkpoints only", highlight=False)
