"""Attention: where each head looks (entropy, [CLS], [SEP], self, previous / next token) at the step and over
training (``mlmscope.analyses.attention``)."""

from __future__ import annotations

import streamlit as st

from . import common
from .common import View

TITLE = "Attention"
ANALYSIS = "attention"
#: Selectable quantities: column -> (label, help).
QUANTITIES = {
    "entropy_norm": (
        "entropy / uniform",
        "Mean attention entropy over query tokens divided by that of uniform "
        "attention over the sentence (1 = attends everywhere, 0 = one token).",
    ),
    "to_sep": ("share on [SEP]", "Mean attention weight on [SEP]."),
    "to_cls": ("share on [CLS]", "Mean attention weight on [CLS]."),
    "to_self": ("share on itself", "Mean attention weight on the query token itself."),
    "to_prev": ("share on previous token", "Mean attention weight on the token to the left."),
    "to_next": ("share on next token", "Mean attention weight on the token to the right."),
}


def _with_norm(df):
    return df.assign(entropy_norm=df["entropy"] / df["entropy_uniform"])


def render(view: View) -> None:
    st.header(TITLE)
    heads = view.require(ANALYSIS, "heads")
    if heads is None:
        return
    view.failure_note(ANALYSIS)
    at, used = view.at_step(heads)
    view.step_note(used, ANALYSIS)
    if not len(at):
        return
    at = _with_norm(at)
    sep, prev = common.row_at(at, at["to_sep"].idxmax()), common.row_at(at, at["to_prev"].idxmax())
    common.metric_row(
        [
            ("mean entropy / uniform", float(at["entropy_norm"].mean()), QUANTITIES["entropy_norm"][1]),
            (
                "most [SEP]-bound head",
                f"L{int(sep['layer'])}.H{int(sep['head'])} ({sep['to_sep']:.2f})",
                "Clark et al. (2019) find BERT's middle layers attend mostly to [SEP].",
            ),
            (
                "most previous-token head",
                f"L{int(prev['layer'])}.H{int(prev['head'])} ({prev['to_prev']:.2f})",
                "The positional heads the Syntax page compares syntactic heads against.",
            ),
        ]
    )
    column = st.radio(
        "quantity", list(QUANTITIES), format_func=lambda c: QUANTITIES[c][0], key="attention_quantity", horizontal=True
    )
    label, help_text = QUANTITIES[column]
    left, right = st.columns(2)
    with left:
        fig = common.heatmap_figure(at, "head", "layer", column, f"{label} per head at step {used}", zmin=0, zmax=1)
        common.show(
            fig,
            at,
            "attention_heads",
            f"{help_text} Per layer and head (0-based) at the selected step "
            "(attention `heads` table; Clark et al. 2019).",
        )
    with right:
        value = "entropy" if column == "entropy_norm" else column
        curve = view.curve(ANALYSIS, "heads", value, ["layer"])
        curve["layer"] = "L" + curve["layer"].astype(str)
        fig = common.line_figure(
            curve,
            view,
            label if value != "entropy" else "entropy (nats)",
            series=("source", "layer"),
            title="Mean over heads",
        )
        common.show(
            fig, curve, "attention_curve", "Mean over the heads of each layer; band: ±1 sd over heads (and seeds)."
        )
