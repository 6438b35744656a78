"""``mlmscope report RUN``: a Markdown report of an analysed trajectory, to paste into README.md.

One section per analysis (training, SAS, [MASK] rank, outlier dimensions, redundancy, lenses). Each starts with one
line saying what the metric is, followed by compact tables over a log-spaced subset of checkpoints (first and last
always included, at most ``max_rows``). An analysis without stored results gives a line ``(no results for X ...)``
instead of an error. Every number comes from the stored tables and the analyses' own trajectory helpers
(:func:`mlmscope.analyses.sas.sas_curve` / :func:`~mlmscope.analyses.sas.sas_onsets`,
:func:`mlmscope.analyses.onset.detect_onset`, :func:`mlmscope.analyses.mask_rank.rank_gap_over_steps`,
:func:`mlmscope.analyses.outliers.outlier_emergence`); this module only selects rows and formats them (3 decimals;
values below 0.0005 in magnitude in scientific notation, so a small KL does not print as 0.000).

Example::

    from .report import build_report
    print(build_report("runs/demo", max_rows=12))

or ``mlmscope report runs/demo --out docs/demo_report.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from ..analyses.onset import OnsetParams, detect_onset
from ..analyses.sas import MIN_COUNT
from ..analyses.sources import seed_runs
from ..analyses.store import ResultStore, StoreError
from ..analyses.trajectory import Trajectory
from ..checkpoints.errors import MlmscopeError

#: Widest per-layer table before sub-layer columns are dropped (a layout limit: 12 columns still fit a README page).
MAX_COLUMNS = 12
#: Shown for a missing or NaN value.
NA = "–"
#: Magnitudes below this print in scientific notation (they would round to 0.000 at 3 decimals).
_SCI_BELOW = 5e-4
#: Order of the redundancy / layer-drop units (mlmscope.analyses.redundancy.UNITS).
_UNITS = ("block", "attn", "ffn")


class ReportError(MlmscopeError):
    """A user-facing problem with the report request (the CLI prints the message and exits 1)."""


# --- formatting ---------------------------------------------------------------------------------------------------


def _missing_value(x: Any) -> bool:
    if x is None or x is pd.NA:
        return True
    try:
        return bool(isinstance(x, (float, np.floating)) and math.isnan(x))
    except TypeError:
        return False


def fmt(x: Any, decimals: int = 3) -> str:
    """One table cell: floats to ``decimals`` places (tiny non-zero values as ``1.23e-05``), bools as yes/no.

    Args:
        x: The value (float, int, bool, str, None/NaN).
        decimals: Decimal places for floats.
    """
    if _missing_value(x):
        return NA
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if x != 0 and abs(x) < _SCI_BELOW:
            return f"{x:.2e}"
        return f"{x:.{decimals}f}"
    return str(x)


def fmt_int(x: Any) -> str:
    """A count or step: rounded to an integer (``NA`` for missing)."""
    return NA if _missing_value(x) else f"{float(x):.0f}"


def fmt_tokens(x: Any) -> str:
    """A token count with thousands separators."""
    return NA if _missing_value(x) else f"{int(x):,}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown pipe table; ``|`` inside cells is escaped."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def _joined(values: Sequence[Any], cell: Callable[[Any], str] = fmt) -> str:
    """Per-layer values in one cell: ``a / b / c``."""
    return " / ".join(cell(v) for v in values)


# --- step selection -------------------------------------------------------------------------------------------------


def select_steps(steps: Iterable[int], max_rows: int) -> list[int]:
    """At most ``max_rows`` of ``steps``, log-spaced in ``log10(step + 1)``, first and last always included.

    The grid is the onset detector's axis (``mlmscope.analyses.onset``: ``x = log10(step + 1)``): each of ``max_rows``
    evenly spaced grid points picks its nearest checkpoint; when dense early checkpoints make several grid points pick
    the same one, the remaining rows go to the checkpoints farthest (in log steps) from those already chosen.

    Raises:
        ReportError: ``max_rows`` < 2.
    """
    if max_rows < 2:
        raise ReportError(f"--max-rows must be at least 2 (first and last checkpoint), got {max_rows}")
    uniq = np.array(sorted({int(s) for s in steps}), dtype=np.int64)
    if len(uniq) <= max_rows:
        return uniq.tolist()
    x = np.log10(uniq + 1.0)
    grid = np.linspace(x[0], x[-1], max_rows)
    chosen = np.zeros(len(uniq), dtype=bool)
    chosen[np.abs(x[:, None] - grid[None]).argmin(0)] = True
    while chosen.sum() < max_rows:
        gap = np.abs(x[:, None] - x[chosen][None]).min(1)
        gap[chosen] = -1.0
        chosen[int(gap.argmax())] = True
    return uniq[chosen].tolist()


# --- reading results ------------------------------------------------------------------------------------------------


def _int(x: Any) -> int:
    """``int`` of a pandas label or cell (pandas-stubs types those as ``Hashable`` / ``Scalar``, not numbers)."""
    return int(x)


def _results(traj: Trajectory, analysis: str, table: str) -> pd.DataFrame | None:
    """The stored table across checkpoints, or None when there is none (no results, or the table is absent)."""
    try:
        df = traj.results(analysis, table)
    except StoreError:
        return None
    return df if len(df) else None


def _latest_ok(traj: Trajectory, analysis: str) -> dict[str, Any]:
    """Meta of the latest finished result (the series ``load_results`` reads by default); {} if none."""
    recs = [m for m in ResultStore(traj.run_dir).entries(analysis) if m.get("status") == "ok"]
    return recs[-1] if recs else {}


def _params(traj: Trajectory, analysis: str) -> dict[str, Any]:
    return dict(_latest_ok(traj, analysis).get("params") or {})


def no_results(traj: Trajectory, analysis: str) -> str:
    """The ``(no results for X ...)`` line, with the skip reason when the analysis was skipped."""
    skipped = [m for m in ResultStore(traj.run_dir).entries(analysis) if m.get("status") == "skipped"]
    if skipped:
        return f"(no results for {analysis}: skipped, {skipped[-1].get('reason', 'no reason recorded')})"
    return f"(no results for {analysis}; run `mlmscope analyze {traj.run_dir} -a {analysis}`)"


def _rows_at(df: pd.DataFrame, steps: Sequence[int]) -> pd.DataFrame:
    return df[df["step"].isin(steps)]


def _per_layer(
    df: pd.DataFrame, value: str, steps: Sequence[int], layer: str = "layer", cell: Callable[[Any], str] = fmt
) -> dict[int, str]:
    """step -> ``a / b / c`` of ``value`` over layers (ascending)."""
    wide = _rows_at(df, steps).pivot_table(index="step", columns=layer, values=value, aggfunc="first")
    wide = wide.reindex(columns=sorted(wide.columns))
    return {_int(s): _joined(list(r), cell) for s, r in wide.iterrows()}


def _layer_names(n: int) -> str:
    return " / ".join(f"L{l}" for l in range(n))


# --- onsets -------------------------------------------------------------------------------------------------------


def onset_text(row: Mapping[str, Any], prefix: str, params: OnsetParams) -> str:
    """One onset (``Onset.as_dict(prefix)`` fields) in words: step, interval, bootstrap support, ramp end."""
    if not row.get(f"{prefix}found"):
        return f"none ({row.get(f'{prefix}reason') or 'not detected'})"
    text = f"step {fmt_int(row[f'{prefix}onset_step'])}"
    lo, hi = row.get(f"{prefix}onset_lo"), row.get(f"{prefix}onset_hi")
    if not (_missing_value(lo) or _missing_value(hi)):
        text += f" ({params.ci:.0%} interval {fmt_int(lo)}–{fmt_int(hi)}"
        boot = row.get(f"{prefix}boot_found")
        text += f", found in {boot:.0%} of {params.n_boot} bootstrap refits)" if not _missing_value(boot) else ")"
    text += (
        f"; steepest at step {fmt_int(row.get(f'{prefix}steepest_step'))}, ramp ends at step "
        f"{fmt_int(row.get(f'{prefix}end_step'))}"
    )
    return text


# --- sections -----------------------------------------------------------------------------------------------------


def header_section(traj: Trajectory) -> str:
    """Title and one line describing the run (preset, shape, checkpoints, status)."""
    lines = [f"## Trajectory report: `{traj.run_dir}`", ""]
    run = _manifest_run(traj)
    ck = traj.checkpoints
    desc = []
    cfg = run.get("config") or {}
    model = cfg.get("model") or {}
    if cfg.get("preset"):
        desc.append(f"preset `{cfg['preset']}`")
    if model:
        desc.append(f"{model.get('n_layers')} layers × {model.get('d_model')} d × {model.get('n_heads')} heads")
    if run.get("n_params"):
        desc.append(f"{int(run['n_params']):,} parameters")
    if ck:
        desc.append(f"{len(ck)} checkpoints (steps {ck[0].step}–{ck[-1].step})")
    if run.get("kind") == "hub":  # published checkpoints (mlmscope.analyses.sources)
        shape = run.get("shape") or {}
        if shape.get("n_layers"):
            desc.append(f"`{run.get('architecture', '?')}`, {shape['n_layers']} layers × {shape.get('d_model')} d")
        desc.append(
            f"published checkpoints from `{run.get('source')}`"
            + (f", seed {run['seed']}" if run.get("seed") is not None else "")
        )
    elif run.get("status"):
        desc.append(f"training status: {run['status']}")
    lines.append("; ".join(desc) + "." if desc else "(no manifest: a plain folder of checkpoints)")
    lines.append(
        f"Generated by `mlmscope report {traj.run_dir}`; layers and heads are 0-based, layer 0 = embeddings "
        "where a table has an embedding row."
    )
    return "\n".join(lines)


def is_single_model(traj: Trajectory) -> bool:
    """True for a single-model results folder (``mlmscope analyze MODEL``), see :mod:`mlmscope.analyses.target`."""
    from ..analyses.target import SINGLE_MODEL_KIND

    return _manifest_run(traj).get("kind") == SINGLE_MODEL_KIND


def single_model_section(traj: Trajectory) -> str:
    """Title and what a one-checkpoint report shows (it replaces the header and training sections)."""
    run = _manifest_run(traj)
    shape = run.get("shape") or {}
    desc = [f"`{run.get('architecture', '?')}`"]
    if shape.get("n_layers"):
        desc.append(f"{shape['n_layers']} layers × {shape.get('d_model')} d × {shape.get('n_heads')} heads")
    return "\n".join(
        [
            f"## Single-model report: `{run.get('model_dir', traj.run_dir)}`",
            "",
            "; ".join(desc) + f"; results in `{traj.run_dir}`.",
            "Single checkpoint: every table has one row, and onsets, loss curves and warm starts (which need a "
            "trajectory) are not shown. Layers and heads are 0-based, layer 0 = embeddings where a table has an "
            "embedding row.",
        ]
    )


def _manifest_run(traj: Trajectory) -> dict[str, Any]:
    try:
        m = traj.manifest
    except (ValueError, KeyError, TypeError) as e:
        raise ReportError(f"cannot read {traj.run_dir / 'manifest.json'}: {e}") from None
    return dict(m.run) if m is not None else {}


def training_section(traj: Trajectory, max_rows: int, onset: OnsetParams) -> str:
    """Validation loss and accuracy over steps, the unigram entropy and the loss-drop onset."""
    out = [
        "### Training",
        "Validation MLM loss (nats per masked token) and top-1 accuracy at masked positions, from the manifest.",
    ]
    ck = traj.checkpoints_frame()
    if ck.empty:
        return "\n".join(out + ["(no results for training: no checkpoints in this folder)"])
    sel = select_steps(ck["step"], max_rows)
    rows = [
        [str(_int(r.step)), fmt_tokens(r.tokens_seen), fmt(r.val_loss), fmt(r.val_acc)]
        for r in ck[ck["step"].isin(sel)].itertuples()
    ]
    out += ["", md_table(["step", "tokens", "val loss", "val acc"], rows), ""]
    h = _manifest_run(traj).get("val_unigram_entropy")
    out.append(
        f"- Unigram entropy of the validation set: {fmt(h)} nats (the loss of a model that knows only "
        "token frequencies)."
        if h is not None
        else "- Unigram entropy of the validation set: not recorded."
    )
    loss = ck.dropna(subset=["val_loss"]) if "val_loss" in ck else ck.iloc[0:0]
    if h is not None and len(loss):
        below = loss[loss["val_loss"] <= h]
        out.append(
            "- First checkpoint with val loss at or below the unigram entropy: "
            + (f"step {int(below['step'].iloc[0])}." if len(below) else "none.")
        )
    if len(loss):
        o = detect_onset(loss["step"], loss["val_loss"], onset, direction="down")
        out.append(f"- Loss-drop onset ({o.method}): {onset_text(o.as_dict('loss_'), 'loss_', onset)}.")
    else:
        out.append("- Loss-drop onset: no validation loss recorded.")
    return "\n".join(out)


def _head_label(row: Mapping[str, Any] | pd.Series) -> str:
    if _missing_value(row.get("layer")) or _missing_value(row.get("head")):
        return NA
    return f"L{int(row['layer'])}H{int(row['head'])} {row.get('direction', '')}".strip()


def sas_section(traj: Trajectory, max_rows: int, onset: OnsetParams, trajectory: bool = True) -> str:
    """Held-out SAS and in-sample max beside val loss, structure onset vs loss drop, best head vs offset.

    With ``trajectory=False`` (one checkpoint) the onset and coincidence lines are left out.
    """
    from ..analyses.sas import sas_curve, sas_onsets

    out = ["### Syntactic attention structure (SAS)"]
    curve = sas_curve(traj.run_dir)
    if curve.empty:
        return "\n".join(out + [no_results(traj, "sas")])
    n_cand = curve["n_candidates"].iloc[-1] if "n_candidates" in curve else math.nan
    out.append(
        "UAS of attention-predicted heads against silver dependency parses (all = every word except root and "
        "punct): SAS = the held-out UAS of the best head (chosen on one probe half, scored on the other), "
        f"in-sample max = the best of {fmt_int(n_cand)} heads × directions on all words (optimistic), offset = "
        "the best fixed-offset baseline (held-out); kind: syntactic / positional / neither."
    )
    sel = select_steps(curve["step"], max_rows)
    rows = [
        [
            str(int(r["step"])),
            fmt(r.get("sas_score")),
            fmt(r.get("sas_in_sample")),
            f"{fmt(r.get('offset_uas_held_out'))} ({fmt_int(r.get('best_offset'))})",
            _head_label(r),
            fmt(r.get("kind")),
            fmt(r.get("val_loss")),
        ]
        for _, r in _rows_at(curve, sel).iterrows()
    ]
    out += [
        "",
        md_table(
            ["step", "SAS (held-out)", "in-sample max", "offset baseline (k)", "best head", "kind", "val loss"], rows
        ),
        "",
    ]
    if not trajectory:
        best = _results(traj, "sas", "best")
        return "\n".join(out + (["", _sas_best_table(best, max_rows)] if best is not None else []))
    o = cast(dict[str, Any], sas_onsets(curve, onset).iloc[0].to_dict())  # column names are str
    out.append(f"- Structure onset on the held-out SAS ({o.get('method')}): {onset_text(o, 'sas_', onset)}.")
    out.append(f"- Classification of the structure: {o.get('structure_kind', NA)}.")
    first_above = o.get("first_step_above_offset")
    out.append(
        "- First checkpoint whose SAS beats the offset baseline: "
        + (f"step {fmt_int(first_above)}." if not _missing_value(first_above) else "none.")
    )
    out.append(f"- Loss-drop onset (same rule on val loss): {onset_text(o, 'loss_', onset)}.")
    out.append(f"- Coincide (ramp windows overlap, Chen et al. 2024): {_coincide_text(o)}.")
    best = _results(traj, "sas", "best")
    if best is not None:
        out += ["", _sas_best_table(best, max_rows), "", _relations_beating_offsets(best)]
    return "\n".join(out)


#: A relation "has a syntactic head" in the report's summary line when its best head's held-out UAS beats the
#: relation's best held-out offset by at least this much (the per-row ``kind`` uses a standard-error margin instead).
RELATION_MARGIN = 0.05
#: ... for relations with at least this many arcs in the probe set (the SAS analysis's default ``min_count``).
RELATION_MIN_ARCS = MIN_COUNT


def _relations_beating_offsets(best: pd.DataFrame) -> str:
    """One line: the relations (other than ``all``, with ``RELATION_MIN_ARCS`` arcs or more) whose held-out head
    beats their best offset by ``RELATION_MARGIN`` at the last step, each with the first checkpoint from which it
    stays so (a NaN margin counts as a miss; a checkpoint with no row for the relation is skipped)."""
    last = int(best["step"].max())
    if "delta_held_out" not in best:  # no attention captured at any step: no per-relation scores
        return f"- Relations whose best head beats their best offset by ≥ {RELATION_MARGIN} (held out): none."
    b = best[(best["relation"] != "all") & (best["kind"] != "absent") & (best["n"] >= RELATION_MIN_ARCS)]
    above = b.assign(ok=b["delta_held_out"] >= RELATION_MARGIN).sort_values("step")
    found = []
    for rel, g in above.groupby("relation"):
        if not bool(g["ok"].iloc[-1]) or int(g["step"].iloc[-1]) != last:
            continue
        below = g.loc[~g["ok"], "step"]
        since = int(g.loc[g["step"] > below.max(), "step"].min()) if len(below) else int(g["step"].min())
        r = g.iloc[-1]
        found.append(
            (
                -float(r["delta_held_out"]),
                f"`{rel}` (n {fmt_int(r['n'])}: {fmt(r['uas_held_out'])} vs offset {fmt(r['offset_uas_held_out'])}, "
                f"since step {fmt_int(since)})",
            )
        )
    items = [text for _, text in sorted(found)]
    return (
        f"- Relations whose best head beats their best offset by ≥ {RELATION_MARGIN} (held out) at step {last}: "
        + (f"**{len(items)}**: " + ", ".join(items) if items else "none")
        + "."
    )


def _coincide_text(o: Mapping[str, Any]) -> str:
    c = o.get("coincide")
    if _missing_value(c):
        return "undetermined (an onset is missing)"
    text = "yes" if c else "no"
    d = o.get("distance_decades")
    return text + (f"; steepest points {fmt(d)} decades of steps apart" if not _missing_value(d) else "")


def _sas_best_table(best: pd.DataFrame, max_rows: int) -> str:
    last = int(best["step"].max())
    b = best[(best["step"] == last) & (best["kind"] != "absent")].copy()
    b["_all"] = b["relation"] != "all"
    b = b.sort_values(["_all", "n"], ascending=[True, False]).head(max_rows)
    rows = [
        [
            str(r["relation"]),
            fmt_int(r["n"]),
            _head_label(r),
            fmt(r.get("uas_held_out")),
            f"{fmt(r.get('offset_uas_held_out'))} ({fmt_int(r.get('best_offset'))})",
            fmt(r.get("delta_held_out")),
            fmt(r.get("kind")),
        ]
        for _, r in b.iterrows()
    ]
    return f"Best head vs best offset baseline per relation at the last step ({last}), held-out UAS:\n\n" + md_table(
        ["relation", "n", "best head", "head UAS", "offset UAS (k)", "Δ", "kind"], rows
    )


def attention_section(traj: Trajectory, max_rows: int) -> str:
    """Per-layer mean attention entropy (relative to uniform) and share on [SEP] and the previous token."""
    out = ["### Attention: where heads look"]
    heads = _results(traj, "attention", "heads")
    if heads is None or heads.empty:
        return "\n".join(out + [no_results(traj, "attention")])
    out.append(
        "Mean over each layer's heads of the attention entropy divided by that of uniform attention (1 = "
        "attends everywhere), and of the attention weight on [SEP] and on the previous token, over every "
        "real token of the probe set (Clark et al. 2019)."
    )
    heads = heads.assign(entropy_norm=heads["entropy"] / heads["entropy_uniform"])
    sel = select_steps(heads["step"], max_rows)
    # with as_index=False the mean is a DataFrame (pandas-stubs types it as a Series)
    cols = {
        c: _per_layer(cast(pd.DataFrame, heads.groupby(["step", "layer"], as_index=False)[c].mean()), c, sel)
        for c in ("entropy_norm", "to_sep", "to_prev")
    }
    layers = _layer_names(int(heads["layer"].nunique()))
    rows = [[str(s), *(cols[c].get(s, NA) for c in cols)] for s in sel]
    return "\n".join(out + ["", md_table(["step", f"entropy / uniform ({layers})", "on [SEP]", "on previous"], rows)])


def mask_rank_section(traj: Trajectory, max_rows: int) -> str:
    """Per-layer 0.9-rank with vs without [MASK], the gap, and the mask-only variance fraction."""
    from ..analyses.mask_rank import rank_gap_over_steps

    out = ["### [MASK] rank deficiency"]
    ranks = _results(traj, "mask_rank", "ranks")
    gap = rank_gap_over_steps(ranks) if ranks is not None else pd.DataFrame()
    if gap.empty:
        return "\n".join(out + [no_results(traj, "mask_rank")])
    tau = float(_params(traj, "mask_rank").get("tau", 0.9))
    out.append(
        f"Centred {tau:g}-effective rank (smallest k whose top-k covariance eigenvalues hold {tau:g} of the "
        "variance) of the residual vectors per layer (L0 = embeddings): clean sentences vs the same sentences "
        "with 15 % [MASK]; gap = masked − clean (Meng et al. 2024 report gap > 0 for MLMs). ρ = share of the "
        "[MASK] vectors' variance outside the clean top-k subspace; the control (same positions unmasked) "
        f"scores ≈ 1 − τ = {fmt(1 - tau)} by construction."
    )
    sel = select_steps(gap["step"], max_rows)
    cols = {c: _per_layer(gap, c, sel, cell=fmt_int) for c in ("clean_real", "masked_all", "gap")}
    only = _results(traj, "mask_rank", "mask_only")
    rho = {
        s: (_per_layer(only[only["token_set"] == s], "outside_fraction", sel) if only is not None else {})
        for s in ("masked_mask", "clean_at_mask")
    }
    layers = _layer_names(int(gap["layer"].nunique()))
    rows = [
        [
            str(s),
            cols["clean_real"].get(s, NA),
            cols["masked_all"].get(s, NA),
            cols["gap"].get(s, NA),
            rho["masked_mask"].get(s, NA),
            rho["clean_at_mask"].get(s, NA),
        ]
        for s in sel
    ]
    out += ["", md_table(["step", f"clean ({layers})", "with [MASK]", "gap", "ρ [MASK]", "ρ control"], rows)]
    if ranks is not None and "low_n" in ranks and bool(ranks["low_n"].any()):
        out += [
            "",
            "Note: some token sets have fewer than 100·d tokens, so ranks are limited by the sample size; "
            "compare only sets of equal size (clean vs with [MASK]).",
        ]
    return "\n".join(out)


def outliers_section(traj: Trajectory, max_rows: int) -> str:
    """Emergence step of each outlier dimension; anisotropy raw / clipped / standardised at the last step."""
    from ..analyses.outliers import outlier_emergence

    out = ["### Outlier dimensions"]
    freq = _results(traj, "outliers", "freq")
    if freq is None:
        return "\n".join(out + [no_results(traj, "outliers")])
    thr = float(_params(traj, "outliers").get("freq_threshold", 0.5))
    out.append(
        "freq = share of token vectors whose largest (argmax) or smallest (argmin) coordinate is a given "
        f"dimension (chance 1/d); a dimension is an outlier at a step when freq ≥ {thr:g} in a non-input layer "
        "(Luo et al. 2021). Anisotropy = mean cosine of random token pairs (Ethayarajh 2019)."
    )
    born = outlier_emergence(freq, threshold=thr)
    if born.empty:
        out += ["", f"No dimension reached freq ≥ {thr:g} in a non-input layer at any checkpoint."]
    else:
        rows = [
            [
                str(int(r["dim"])),
                r["kind"],
                fmt_int(r["emergence_step"]),
                fmt_int(r["stable_from"]),
                str(r["first_layers"]),
                fmt(r["peak_freq"]),
                fmt(r["final_freq"]),
            ]
            for _, r in born.head(max_rows).iterrows()
        ]
        out += [
            "",
            md_table(["dim", "kind", "emergence step", "stable from", "first layers", "peak freq", "final freq"], rows),
        ]
        if len(born) > max_rows:
            out.append(f"({len(born) - max_rows} more dimensions not shown.)")
    aniso = _results(traj, "outliers", "anisotropy")
    if aniso is not None:
        out += ["", _anisotropy_table(aniso)]
    return "\n".join(out)


def _anisotropy_table(aniso: pd.DataFrame) -> str:
    last = int(aniso["step"].max())
    a = aniso[aniso["step"] == last]
    wide = a.pivot_table(index="layer", columns="condition", values="value", aggfunc="first")
    conds = [c for c in ("raw", "clipped", "standardised") if c in wide.columns]
    rows = [[str(int(l))] + [fmt(wide.loc[l, c]) for c in conds] for l in wide.index]
    removed = a.loc[a["condition"] == "clipped", "removed_dims"].astype(str).str.strip()
    removed = removed[removed != ""]
    clip = (
        f"clipped = outlier dims {removed.iloc[0]} zeroed"
        if len(removed)
        else "no outlier dims at this step, so clipped = raw"
    )
    return f"Anisotropy at the last step ({last}); {clip}; standardised = every dimension z-scored:\n\n" + md_table(
        ["layer", *conds], rows
    )


def _unit_table(
    df: pd.DataFrame, value: str, max_rows: int, lead: dict[int, str] | None = None, lead_name: str = ""
) -> tuple[str, bool]:
    """step × (unit, block) table of ``value``; sub-layer units are dropped when it would be too wide."""
    units = [u for u in _UNITS if u in set(df["unit"])]
    n_blocks = int(df.loc[df["unit"].isin(units), "block"].nunique())
    narrowed = len(units) * n_blocks > MAX_COLUMNS and "block" in units
    if narrowed:
        units = ["block"]
    sel = select_steps(df["step"], max_rows)
    d = _rows_at(df[df["unit"].isin(units)], sel)
    wide = d.pivot_table(index="step", columns=["unit", "block"], values=value, aggfunc="first")
    order = [(u, b) for u in units for b in sorted(d.loc[d["unit"] == u, "block"].unique())]
    wide = wide.reindex(columns=order)
    header = ["step"] + ([lead_name] if lead is not None else []) + [f"{u} {int(b)}" for u, b in order]
    rows = [
        [str(_int(s))] + ([lead.get(_int(s), NA)] if lead is not None else []) + [fmt(v) for v in r]
        for s, r in wide.iterrows()
    ]
    return md_table(header, rows), narrowed


def redundancy_section(traj: Trajectory, max_rows: int) -> str:
    """1 − cos(in, out) per block over steps; layer-drop Δloss per block over steps."""
    out = [
        "### Layer redundancy and layer drop",
        "1 − cos(input, output) of each block (attn = block input → after attention + LN1, ffn = after attention "
        "→ block output), averaged over real tokens: 0 = the unit leaves its input's direction unchanged.",
    ]
    out += _wide_table(
        traj, "redundancy", "per_layer", lambda per: _unit_table(per, "redundancy", max_rows), "attention / FFN"
    )
    out += [
        "",
        "Layer drop: increase of the masked-LM loss (nats, masked positions of the probe set) when one unit "
        "is skipped; loss = the intact model's loss on the same positions.",
    ]

    def drop_table(drop: pd.DataFrame) -> tuple[str, bool]:
        base = {int(r["step"]): fmt(r["loss"]) for _, r in drop[drop["unit"] == "none"].iterrows()}
        return _unit_table(drop[drop["unit"] != "none"], "delta_loss", max_rows, base, "loss")

    out += _wide_table(traj, "layer_drop", "per_unit", drop_table, "attention / FFN")
    return "\n".join(out)


def _wide_table(
    traj: Trajectory, analysis: str, table: str, build: Callable[[pd.DataFrame], tuple[str, bool]], omitted: str
) -> list[str]:
    """Lines for one step × unit table: ``build(results)`` with a note when it dropped columns, or the no-results
    line."""
    df = _results(traj, analysis, table)
    if df is None:
        return [no_results(traj, analysis)]
    text, narrowed = build(df)
    return ["", text] + ([f"({omitted} columns omitted: too many layers.)"] if narrowed else [])


def _site_label(site: str, block: int) -> str:
    return {"embed": "embed", "resid_mid": f"attn {block}", "resid_post": f"block {block}"}.get(site, f"{site} {block}")


def _kl_table(df: pd.DataFrame, max_rows: int) -> tuple[str, bool]:
    """step × site table of KL(final ‖ site), the final layer (KL = 0 by definition) left out."""
    d = df[df["depth"] < df["depth"].max()]
    narrowed = d["depth"].nunique() > MAX_COLUMNS
    if narrowed:
        d = d[d["site"] != "resid_mid"]
    sel = select_steps(d["step"], max_rows)
    d = _rows_at(d, sel)
    wide = d.pivot_table(index="step", columns="depth", values="kl", aggfunc="first")
    wide = wide.reindex(columns=sorted(wide.columns))
    label = d.drop_duplicates("depth").set_index("depth")
    header = ["step"] + [_site_label(str(label.loc[c, "site"]), _int(label.loc[c, "block"])) for c in wide.columns]
    rows = [[str(_int(s))] + [fmt(v) for v in r] for s, r in wide.iterrows()]
    return md_table(header, rows), narrowed


def lens_section(traj: Trajectory, max_rows: int, trajectory: bool = True) -> str:
    """KL(final ‖ layer) of the logit lens over steps; logit vs tuned lens; tuned-lens warm-start saving (only with
    ``trajectory``: a single checkpoint has no warm start)."""
    out = [
        "### Logit lens and tuned lens",
        "KL(final ‖ layer): KL divergence (nats) from the model's output distribution at [MASK] positions to the "
        "distribution read from an intermediate layer through the full MLM head (logit lens), or through a "
        "fitted affine translator first (tuned lens); 0 = the layer already predicts what the model outputs.",
    ]
    out += _wide_table(traj, "logit_lens", "per_layer", lambda logit: _kl_table(logit, max_rows), "after-attention")
    out += ["", "Logit vs tuned lens, KL(final ‖ layer) on held-out masked positions:"]
    tuned = _results(traj, "tuned_lens", "per_layer")
    if tuned is None:
        out.append(no_results(traj, "tuned_lens"))
        return "\n".join(out)
    out += ["", _logit_vs_tuned(tuned, max_rows)] + (["", _warm_start(traj, max_rows)] if trajectory else [])
    return "\n".join(out)


def _logit_vs_tuned(tuned: pd.DataFrame, max_rows: int) -> str:
    d = tuned[tuned["depth"] < tuned["depth"].max()]
    sel = select_steps(d["step"], max_rows)
    sites = d.drop_duplicates("depth").sort_values("depth")
    names = " / ".join(_site_label(r["site"], int(r["block"])) for _, r in sites.iterrows())
    cells = {lens: _per_layer(d[d["lens"] == lens], "kl", sel, layer="depth") for lens in ("logit", "tuned")}
    rows = [[str(s), cells["logit"].get(s, NA), cells["tuned"].get(s, NA)] for s in sel]
    return md_table(["step", f"logit KL ({names})", "tuned KL"], rows)


def _warm_start(traj: Trajectory, max_rows: int) -> str:
    fit = _results(traj, "tuned_lens", "fit")
    if fit is None or "warm_steps_to_cold_kl" not in fit or fit["warm_steps_to_cold_kl"].isna().all():
        return (
            "Tuned-lens warm-start saving: not recorded (run the tuned lens with `compare_cold=True` to fit "
            "each checkpoint from zero too)."
        )
    f = fit.dropna(subset=["warm_steps_to_cold_kl"])
    sel = select_steps(f["step"], max_rows)
    f = _rows_at(f, sel).sort_values(["step", "translator"])
    rows = [
        [
            str(int(r["step"])),
            _site_label("embed" if r["block"] < 0 else "resid_post", int(r["block"])),
            str(r["init"]),
            fmt_int(r["warm_steps_to_cold_kl"]),
            fmt_int(r["cold_steps"]),
            fmt(1.0 - r["warm_steps_to_cold_kl"] / r["cold_steps"]) if r["cold_steps"] else NA,
        ]
        for _, r in f.iterrows()
    ]
    total = 1.0 - f["warm_steps_to_cold_kl"].sum() / f["cold_steps"].sum()
    return (
        "Tuned-lens warm start: optimiser steps a fit started from the previous checkpoint's translators needs to "
        "reach the final KL of a fit from zero, vs the steps the fit from zero took (saving = 1 − warm / cold; "
        f"{fmt(total)} over the rows shown):\n\n"
        + md_table(["step", "translator", "init used", "warm steps to cold KL", "cold steps", "saving"], rows)
    )


# --- seeds ------------------------------------------------------------------------------------------------------

#: Bootstrap resamples of the seeds for the interval of the mean (fixed generator seed: the report is reproducible).
SEED_BOOTSTRAP = 2000
#: Coverage of the bootstrap interval.
SEED_CI = 0.95


def seed_bootstrap_ci(
    values: Sequence[float], n_boot: int = SEED_BOOTSTRAP, ci: float = SEED_CI, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over seeds (seeds resampled with replacement); NaNs for < 2 seeds.

    With few seeds the interval is coarse (3 seeds give only 10 distinct resample means) and tends to be too narrow.
    """
    v = np.asarray([x for x in values if not _missing_value(x)], dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    a = (1.0 - ci) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _per_step(df: pd.DataFrame | None, value: str) -> pd.DataFrame | None:
    if df is None or df.empty or value not in df:
        return None
    return cast(pd.DataFrame, df.groupby("step", as_index=False)[value].mean()).rename(columns={value: "value"})


def _metric_val_loss(t: Trajectory) -> pd.DataFrame | None:
    ck = t.checkpoints_frame()
    return _per_step(ck.dropna(subset=["val_loss"]) if "val_loss" in ck else None, "val_loss")


def _metric_sas(t: Trajectory) -> pd.DataFrame | None:
    from ..analyses.sas import sas_curve

    return _per_step(sas_curve(t.run_dir), "sas_score")


def _metric_attention(t: Trajectory) -> pd.DataFrame | None:
    heads = _results(t, "attention", "heads")
    if heads is None:
        return None
    return _per_step(heads.assign(entropy_norm=heads["entropy"] / heads["entropy_uniform"]), "entropy_norm")


def _metric_rank_gap(t: Trajectory) -> pd.DataFrame | None:
    from ..analyses.mask_rank import rank_gap_over_steps

    ranks = _results(t, "mask_rank", "ranks")
    gap = rank_gap_over_steps(ranks) if ranks is not None else None
    return _per_step(gap[gap["layer"] == gap["layer"].max()] if gap is not None and len(gap) else None, "gap")


def _metric_anisotropy(t: Trajectory) -> pd.DataFrame | None:
    a = _results(t, "outliers", "anisotropy")
    if a is None:
        return None
    a = a[a["condition"] == "raw"]
    return _per_step(a[a["layer"] == a["layer"].max()], "value")


def _metric_redundancy(t: Trajectory) -> pd.DataFrame | None:
    r = _results(t, "redundancy", "per_layer")
    return _per_step(r[r["unit"] == "block"] if r is not None else None, "redundancy")


def _metric_layer_drop(t: Trajectory) -> pd.DataFrame | None:
    d = _results(t, "layer_drop", "per_unit")
    if d is None:
        return None
    d = d[d["unit"] == "block"]
    return cast(pd.DataFrame, d.groupby("step", as_index=False)["delta_loss"].max()).rename(
        columns={"delta_loss": "value"}
    )


def _metric_logit_lens(t: Trajectory) -> pd.DataFrame | None:
    d = _results(t, "logit_lens", "per_layer")
    return _per_step(d[d["depth"] == d["depth"].min()] if d is not None else None, "kl")


#: Headline metric per analysis (label, what it is, reader): one number per checkpoint and seed.
SEED_METRICS: tuple[tuple[str, str, Callable[[Trajectory], pd.DataFrame | None]], ...] = (
    ("validation loss", "validation MLM loss from the manifest (nats)", _metric_val_loss),
    ("SAS (held-out)", "held-out UAS of the best head (sas)", _metric_sas),
    ("attention entropy / uniform", "mean over all heads (attention)", _metric_attention),
    ("[MASK] rank gap, last layer", "0.9-rank with − without [MASK] in the last layer (mask_rank)", _metric_rank_gap),
    ("anisotropy, last layer", "mean cosine of random token pairs, raw (outliers)", _metric_anisotropy),
    ("1 − cos(in, out), mean over blocks", "redundancy of whole blocks (redundancy)", _metric_redundancy),
    ("largest layer-drop Δloss", "the block whose removal costs most, nats (layer_drop)", _metric_layer_drop),
    ("logit-lens KL(final ‖ embeddings)", "nats at [MASK] positions (logit_lens)", _metric_logit_lens),
)


def seed_table(per_seed: Mapping[str, pd.DataFrame], steps: Sequence[int] | None = None) -> pd.DataFrame:
    """step, n_seeds, mean, sd, ci_lo, ci_hi of one metric over seeds (``per_seed``: seed -> frame step, value)."""
    frames = [f.assign(seed=name) for name, f in per_seed.items() if f is not None and len(f)]
    if not frames:
        return pd.DataFrame(columns=["step", "n_seeds", "mean", "sd", "ci_lo", "ci_hi"])
    df = pd.concat(frames, ignore_index=True)
    if steps is not None:
        df = df[df["step"].isin(steps)]
    rows = []
    for step, g in df.groupby("step", sort=True):
        v = g["value"].dropna().to_numpy(dtype=float)
        lo, hi = seed_bootstrap_ci(v)
        rows.append(
            {
                "step": _int(step),
                "n_seeds": len(v),
                "mean": float(v.mean()) if len(v) else math.nan,
                "sd": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                "ci_lo": lo,
                "ci_hi": hi,
            }
        )
    return pd.DataFrame(rows)


def seeds_section(runs: Sequence[str | os.PathLike], max_rows: int) -> str:
    """Mean ± sd over seeds and a bootstrap interval of the mean, per step, for each analysis's headline number."""
    trajs = {Path(r).name: Trajectory(r) for r in runs}
    out = [
        "### Seeds: mean ± sd over seeds",
        f"One headline number per analysis, per checkpoint and seed; mean ± sd (n − 1) over the seeds that have it, "
        f"and a {SEED_CI:.0%} percentile bootstrap interval of the mean ({SEED_BOOTSTRAP} resamples of the seeds; "
        "coarse with few seeds). Steps: log-spaced over the steps of all seeds.",
    ]
    shown = 0
    for label, what, read in SEED_METRICS:
        per_seed: dict[str, pd.DataFrame] = {}
        for name, t in trajs.items():
            try:
                f = read(t)
            except (MlmscopeError, KeyError, ValueError, TypeError):
                f = None
            if f is not None and len(f):
                per_seed[name] = f
        if not per_seed:
            continue
        all_steps = sorted({_int(s) for f in per_seed.values() for s in f["step"]})
        table = seed_table(per_seed, select_steps(all_steps, max_rows))
        rows = [
            [
                str(_int(r["step"])),
                str(_int(r["n_seeds"])),
                f"{fmt(r['mean'])} ± {fmt(r['sd'])}",
                f"{fmt(r['ci_lo'])} – {fmt(r['ci_hi'])}" if not _missing_value(r["ci_lo"]) else NA,
            ]
            for _, r in table.iterrows()
        ]
        out += [
            "",
            f"**{label}** ({what}):",
            "",
            md_table(["step", "seeds", "mean ± sd", f"{SEED_CI:.0%} CI of the mean"], rows),
        ]
        shown += 1
    if not shown:
        out.append(
            f"(no results in any seed; run `mlmscope analyze` on each, e.g. `mlmscope analyze {next(iter(runs))}`)"
        )
    return "\n".join(out)


def seed_group_report(root: str | os.PathLike, runs: Sequence[Path], max_rows: int) -> str:
    """The report of a folder of seed runs (``mlmscope train --seeds``, a suite file with seeds): the seed section,
    then where each seed's own report is."""
    names = ", ".join(r.name for r in runs)
    sources = {str(_manifest_run(Trajectory(r)).get("source") or "") for r in runs} - {""}
    head = [
        f"## Seed group report: `{root}`",
        "",
        f"{len(runs)} seeds ({names})"
        + (f"; published checkpoints from `{sources.pop()}`" if len(sources) == 1 else "")
        + ".",
        f"Generated by `mlmscope report {root}`; each seed's own tables: `mlmscope report {runs[0]}` (and the others).",
    ]
    return "\n".join(head) + "\n\n" + seeds_section(runs, max_rows) + "\n"


# --- the report ---------------------------------------------------------------------------------------------------


def build_report(run: str | os.PathLike, max_rows: int = 12, onset: OnsetParams | None = None) -> str:
    """The whole Markdown report of a run folder.

    A folder of ``seed_*`` runs (``mlmscope train --seeds``, a suite file with seeds) gives the seed report instead:
    mean ± sd over seeds and a bootstrap interval of the mean per step (:func:`seeds_section`).

    Args:
        run: Run folder (or any folder of checkpoint folders, or a folder of seed runs) analysed with
            ``mlmscope analyze``.
        max_rows: At most this many checkpoints per table (log-spaced; first and last included).
        onset: Onset-detector settings (default :class:`mlmscope.analyses.onset.OnsetParams`).

    Raises:
        ReportError: the folder does not exist, its manifest is unreadable, or ``max_rows`` < 2.
    """
    if max_rows < 2:
        raise ReportError(f"--max-rows must be at least 2 (first and last checkpoint), got {max_rows}")
    try:
        traj = Trajectory(run)
    except FileNotFoundError as e:
        raise ReportError(str(e)) from None
    seeds = seed_runs(traj.run_dir)
    if len(seeds) > 1:
        return seed_group_report(traj.run_dir, seeds, max_rows)
    if seeds:  # a suite with one seed: that seed's report
        traj = Trajectory(seeds[0])
    p = onset or OnsetParams()
    single_model = is_single_model(traj)  # reads the manifest first: a damaged one is a ReportError naming it
    single = len(traj.checkpoints) == 1
    head = (
        [single_model_section(traj)]
        if single_model
        else [
            header_section(traj)
            + ("\n\nSingle checkpoint: every table has one row; onsets need a trajectory." if single else ""),
            training_section(traj, max_rows, p)
            if _manifest_run(traj).get("kind") != "hub"
            else "### Training\n(published checkpoints: no training log, token counts or validation loss recorded; "
            "steps come from the revision or repo names)",
        ]
    )
    parts = [
        *head,
        sas_section(traj, max_rows, p, trajectory=not single),
        attention_section(traj, max_rows),
        mask_rank_section(traj, max_rows),
        outliers_section(traj, max_rows),
        redundancy_section(traj, max_rows),
        lens_section(traj, max_rows, trajectory=not single),
    ]
    return "\n\n".join(parts) + "\n"
