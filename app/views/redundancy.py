"""Redundancy: 1 − cos per layer over steps, the CKA matrix at the step, and the loss cost of dropping each layer."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from . import common
from .common import View

TITLE = "Redundancy"
ANALYSIS = "redundancy"
DROP = "layer_drop"


def render(view: View) -> None:
    st.header(TITLE)
    per = view.require(ANALYSIS, "per_layer")
    if per is None:
        _layer_drop(view)
        return
    view.failure_note(ANALYSIS)
    c1, c2 = st.columns(2)
    unit = c1.radio(
        "unit",
        ["block", "attn", "ffn"],
        key="redundancy_unit",
        horizontal=True,
        help="block: input vs output of the whole layer; attn / ffn: of one sub-layer.",
    )
    centred = c2.toggle(
        "centred cosine",
        key="redundancy_centred",
        help="Pooled centred cosine: controls for the shared mean direction (LayerNorm β, outlier "
        "dimensions) that pushes raw cosines towards 1.",
    )
    value = "redundancy_centred" if centred else "redundancy"
    at, used = view.at_step(per[per["unit"] == unit])
    view.step_note(used, ANALYSIS)
    least = common.row_at(at, at[value].idxmin()) if len(at) else None
    drop = view.table(DROP, "per_unit")
    d_at, _ = view.at_step(drop[(drop["unit"] == "block")] if len(drop) else drop)
    cheapest = common.row_at(d_at, d_at["delta_loss"].idxmin()) if len(d_at) else None
    common.metric_row(
        [
            (
                f"most redundant {unit}",
                f"block {int(least['block'])}" if least is not None else None,
                "Smallest 1 − cos between the unit's input and output.",
            ),
            ("its 1 − cos", float(least[value]) if least is not None else None, None),
            (
                "cheapest block to drop",
                f"block {int(cheapest['block'])}" if cheapest is not None else None,
                "Smallest increase of the masked-LM loss when the block is skipped (layer_drop).",
            ),
            ("its Δ loss", float(cheapest["delta_loss"]) if cheapest is not None else None, "nats per masked token"),
        ]
    )
    left, right = st.columns(2)
    with left:
        curve = view.curve(ANALYSIS, "per_layer", value, ["block"], unit=unit)
        curve["block"] = "block " + curve["block"].astype(str)
        fig = common.line_figure(
            curve,
            view,
            "1 − cos(in, out)",
            series=("source", "block"),
            title=f"How much each {unit} changes the residual stream",
        )
        common.show(
            fig,
            curve,
            "redundancy_cos",
            "Mean over real tokens of 1 − cosine between the unit's input and output hidden states (He et al. "
            "2024, adapted to post-LN BERT; redundancy `per_layer` table). Near 0: the unit barely changes "
            "its input.",
        )
    with right:
        _cka(view)
    _layer_drop(view)


def _cka(view: View) -> None:
    cka = view.table(ANALYSIS, "cka")
    at, used = view.at_step(cka)
    if not len(at):
        st.info("No CKA matrix stored (the analysis ran with `cka=False`).")
        return
    std = st.toggle(
        "standardised CKA",
        key="redundancy_cka_std",
        help="Every dimension scaled to unit variance first, so outlier dimensions cannot dominate.",
    )
    col = "cka_std" if std else "cka"
    fig = common.heatmap_figure(
        at,
        "layer_j",
        "layer_i",
        col,
        f"Linear CKA between layers at step {used}",
        zmin=0,
        zmax=1,
        x_title="layer",
        y_title="layer",
    )
    common.show(
        fig,
        at,
        "redundancy_cka",
        "Linear CKA (Kornblith et al. 2019) between every pair of hidden states (0 = embeddings, l + 1 = "
        "output of block l), from one streamed covariance (redundancy `cka` table).",
    )


def _layer_drop(view: View) -> None:
    st.subheader("Layer drop")
    drop = view.table(DROP, "per_unit")
    if not len(drop):
        view.require(DROP, "per_unit", "the loss cost of skipping each layer")
        return
    at, used = view.at_step(drop[drop["unit"] != "none"])
    left, right = st.columns(2)
    with left:
        fig = go.Figure()
        for i, (unit, d) in enumerate(at.groupby("unit", sort=False)):
            fig.add_trace(
                go.Bar(x=d["block"], y=d["delta_loss"], name=unit, marker_color=common.PALETTE[i % len(common.PALETTE)])
            )
        fig.update_layout(
            title=f"Δ loss when one unit is skipped, step {used}",
            xaxis_title="block",
            yaxis_title="Δ MLM loss (nats)",
            barmode="group",
            height=360,
            margin={"t": 40},
        )
        common.show(
            fig,
            at,
            "redundancy_drop_at_step",
            "Masked-LM loss at the probe set's [MASK] positions with one block / attention / FFN sub-layer "
            "skipped, minus the full model's (one-shot; layer_drop `per_unit` table).",
        )
    with right:
        curve = view.curve(DROP, "per_unit", "delta_loss", ["block"], unit="block")
        curve["block"] = "block " + curve["block"].astype(str)
        fig = common.line_figure(
            curve,
            view,
            "Δ MLM loss (nats)",
            series=("source", "block"),
            title="Δ loss of skipping each block over training",
        )
        common.show(fig, curve, "redundancy_drop", "Whole-block skips over steps (layer_drop `per_unit`).")
