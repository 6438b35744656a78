"""[MASK] rank: effective rank per layer with vs without [MASK] over steps, and the mask-only variance share."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from . import common
from .common import View

TITLE = "[MASK] rank"
ANALYSIS = "mask_rank"
SETS = ("clean_real", "masked_all", "masked_mask", "clean_at_mask")


def _layers(view: View, available: list[int]) -> list[int]:
    default = available if len(available) <= 4 else [available[0], available[len(available) // 2], available[-1]]
    return (
        st.multiselect(
            "layers",
            available,
            default=default,
            key="mask_rank_layers",
            help="Layer 0 = embedding output, layer l + 1 = output of block l.",
        )
        or default
    )


def render(view: View) -> None:
    st.header(TITLE)
    gap = view.require(ANALYSIS, "gap")
    if gap is None:
        return
    view.failure_note(ANALYSIS)
    c1, c2, c3 = st.columns(3)
    metric = c1.radio(
        "rank",
        sorted(gap["metric"].unique(), reverse=True),
        key="mask_rank_metric",
        horizontal=True,
        help="variance_rank: smallest k reaching 90 % of the variance; entropy_rank: exp of the "
        "spectral entropy (Roy & Vetterli 2007).",
    )
    norms = sorted(gap["normalisation"].unique())
    norm = c2.radio(
        "normalisation",
        norms,
        index=norms.index("centred") if "centred" in norms else 0,
        key="mask_rank_norm",
        horizontal=True,
    )
    assert metric is not None and norm is not None  # None only for an empty option list
    with c3:
        layers = _layers(view, sorted(int(x) for x in gap["layer"].unique()))
    sel = gap[(gap["metric"] == metric) & (gap["normalisation"] == norm)]
    at, used = view.at_step(sel)
    view.step_note(used, ANALYSIS)
    last = at[at["layer"] == at["layer"].max()].iloc[0]
    common.metric_row(
        [
            (
                "gap, last layer",
                float(last["gap"]),
                "rank(masked_all) − rank(clean_real): Meng et al.'s [MASK] "
                "rank gap (positive = [MASK] inputs use extra dimensions).",
            ),
            (
                "equal-n gap, last layer",
                float(last["gap_equal_n"]),
                "rank([MASK] vectors) − rank(the same positions unmasked): the equal-n control.",
            ),
            ("rank clean, last layer", float(last["clean_real"]), None),
            ("rank masked, last layer", float(last["masked_all"]), None),
        ]
    )
    sel = {"metric": metric, "normalisation": norm, "layer": tuple(layers)}
    left, right = st.columns(2)
    with left:
        curve = pd.concat(
            [
                view.curve(ANALYSIS, "gap", col, ["layer"], **sel).assign(input=col)
                for col in ("clean_real", "masked_all")
            ],
            ignore_index=True,
        )
        curve["layer"] = "L" + curve["layer"].astype(str)
        fig = common.line_figure(
            curve,
            view,
            metric,
            series=("source", "layer", "input"),
            dash_by="input",
            title="Effective rank with vs without [MASK]",
        )
        common.show(
            fig,
            curve,
            "mask_rank_ranks",
            f"{metric} ({norm}) of all token vectors of the clean probe sentences (solid) and of the same "
            "sentences with 15 % of pieces masked (dashed), per layer (mask_rank `gap` table; Meng et al. "
            "2024).",
        )
    with right:
        curve = view.curve(ANALYSIS, "gap", "gap", ["layer"], **sel)
        curve["layer"] = "L" + curve["layer"].astype(str)
        fig = common.line_figure(curve, view, f"Δ {metric}", series=("source", "layer"), title="Rank gap")
        fig.add_hline(y=0, line_color="grey", line_width=1)
        common.show(fig, curve, "mask_rank_gap", "masked_all − clean_real per layer (> 0: masking adds dimensions).")
    _mask_only(view, layers)
    _at_step(view, metric, norm)


def _mask_only(view: View, layers: list[int]) -> None:
    curve = view.curve(ANALYSIS, "mask_only", "outside_fraction", ["layer", "token_set"], layer=tuple(layers))
    if not len(curve):
        st.info("No mask-only variance table (`mask_only`) stored.")
        return
    curve["layer"] = "L" + curve["layer"].astype(str)
    fig = common.line_figure(
        curve,
        view,
        "ρ (variance outside the clean subspace)",
        series=("source", "layer", "token_set"),
        dash_by="token_set",
        title="Mask-only variance",
    )
    common.show(
        fig,
        curve,
        "mask_rank_mask_only",
        "Share of a token set's variance outside the top-k principal subspace of the clean tokens "
        "(k = their 0.9-rank). A set inside the clean distribution scores ≈ 0.10 by construction: read "
        "masked_mask against the masked_real / clean_at_mask controls (mask_rank `mask_only` table).",
    )


def _at_step(view: View, metric: str, norm: str) -> None:
    ranks = view.table(ANALYSIS, "ranks")
    at, used = view.at_step(ranks)
    if not len(at):
        return
    at = at[(at["metric"] == metric) & (at["normalisation"] == norm)]
    fig = common.by_layer_figure(at, "layer", "value", "token_set", f"{metric} per layer at step {used}", metric)
    left, right = st.columns(2)
    with left:
        common.show(
            fig,
            at,
            "mask_rank_at_step",
            "Every token set at the selected step (clean_at_mask = the masked positions unmasked, same n as "
            "masked_mask).",
        )
        if bool(at.get("low_n", pd.Series(dtype=bool)).any()):
            st.caption(f"⚠ {at['warning'].dropna().iloc[0]}")
    dims = view.table(ANALYSIS, "mask_dims")
    dat, _ = view.at_step(dims)
    with right:
        if len(dat):
            st.markdown(f"**Coordinates most specific to [MASK] at step {used}**")
            common.table(
                dat,
                "mask_rank_dims",
                "Per layer, coordinates with the largest var([MASK]) / var(same "
                "tokens unmasked) (mask_rank `mask_dims` table).",
            )
