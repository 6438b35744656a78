"""Syntax: SAS over steps with onsets and the validation loss, the layer × head UAS heatmap, per-relation best heads
with their offset baselines, and a live attention viewer for a probe sentence with its gold arcs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app.views import common, data, model
from app.views.common import View

TITLE = "Syntax (SAS)"
ANALYSIS = "sas"


@st.cache_data(show_spinner="Detecting onsets…", max_entries=32)
def _onsets(curve: pd.DataFrame) -> tuple[pd.DataFrame | None, str]:
    """``analyses.sas.sas_onsets`` of one run's curve (bootstrap intervals: cached), or None and why not."""
    from analyses.sas import sas_onsets

    if curve["step"].nunique() < 6:
        return None, f"onset detection needs at least 6 analysed checkpoints (this run has {curve['step'].nunique()})"
    try:
        return sas_onsets(curve), ""
    except (ValueError, np.linalg.LinAlgError) as e:
        return None, f"onset detection failed: {e}"


def render(view: View) -> None:
    st.header(TITLE)
    summary = view.require(ANALYSIS, "summary")
    if summary is None:
        return
    view.failure_note(ANALYSIS)
    rows, used = view.at_step(summary)
    view.step_note(used, ANALYSIS)
    r = rows.iloc[0]
    common.metric_row([
        ("SAS score (held-out)", float(r["sas_score"]), "UAS of the best head chosen on one probe half and scored "
                                                        "on the other (relation `all`: no root, no punct)."),
        ("best head (in-sample)", f"L{int(r['layer'])} H{int(r['head'])} {r['direction']}", None),
        ("best offset baseline", float(r["offset_uas_held_out"]), f"held-out UAS of offset {int(r['best_offset']):+d}"),
        ("kind", str(r["kind"]), "syntactic: beats the offset baseline by > 2 s.e.; positional: >= 50 % of its "
                                 "predictions at the best offset."),
    ])
    _curve(view)
    left, right = st.columns(2)
    with left:
        _heatmap(view, used)
    with right:
        _best_table(view, used)
    _attention_viewer(view, used)


def _curve(view: View) -> None:
    from analyses.sas import sas_curve

    stacked = view.series(ANALYSIS, "summary")
    ck = view.stack(view.checkpoints)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    sas = common.band(stacked, "sas_score")
    loss = common.band(ck, "val_loss")
    for i, (src, d) in enumerate(sas.groupby("source", sort=False)):
        color = common.PALETTE[i % len(common.PALETTE)]
        _band_trace(fig, view, d, color, f"SAS · {src}", False)
        lo = loss[loss["source"] == src]
        fig.add_trace(go.Scatter(x=view.x(lo["step"]), y=lo["mean"], name=f"val loss · {src}", mode="lines",
                                 line={"color": color, "dash": "dot", "width": 1}), secondary_y=True)
    focus = sas_curve(view.table(ANALYSIS, "summary")).merge(
        view.checkpoints()[["step", "val_loss"]], on="step", how="left")
    for col, name in [("sas_in_sample", "best head, in-sample"), ("offset_uas_held_out", "best offset (held-out)")]:
        fig.add_trace(go.Scatter(x=view.x(focus["step"]), y=focus[col], name=f"{name} · {view.focus}",
                                 mode="lines", line={"dash": "dash", "width": 1}))
    onsets, why = _onsets(focus)
    if onsets is not None:
        o = onsets.iloc[0]
        for prefix, color, label in [("sas_", "rgba(31,119,180,0.15)", "structure onset"),
                                     ("loss_", "rgba(128,128,128,0.15)", "loss drop")]:
            if o.get(f"{prefix}found"):
                fig.add_vrect(x0=view.x(o[f"{prefix}onset_step"]), x1=view.x(o[f"{prefix}end_step"]),
                              fillcolor=color, line_width=0, annotation_text=label)
    fig.update_yaxes(title="UAS (all: no root, no punct)", secondary_y=False)
    fig.update_yaxes(title="validation loss (nats)", secondary_y=True)
    fig.update_layout(title="Syntactic attention structure over training", height=400, margin={"t": 40})
    view.style_steps(fig)
    caption = ("SAS score = held-out UAS of the best attention head against the probe set's dependency parses "
               "(analyses/sas.py, Clark et al. 2019; Chen et al. 2024), dashed: in-sample best head and the best "
               "fixed-offset baseline of the focus run; dotted: validation loss (right axis). Shaded: structure "
               "onset and loss drop detected on the focus run (3-segment fit on log step).")
    if onsets is not None:
        o = onsets.iloc[0]
        caption += (f" Structure kind: {o.get('structure_kind')}; coincide with the loss drop: "
                    f"{o.get('coincide')}.")
    else:
        caption += f" ({why}.)"
    common.show(fig, pd.concat([sas.assign(curve="sas_score"), loss.assign(curve="val_loss")]), "syntax_sas", caption)
    if onsets is not None:
        with st.expander("Onsets (analyses.sas.sas_onsets)"):
            common.table(onsets.T.reset_index().set_axis(["field", "value"], axis=1).astype(str), "syntax_onsets")


def _band_trace(fig: go.Figure, view: View, d: pd.DataFrame, color: str, name: str, secondary: bool) -> None:
    x = view.x(d["step"])
    if d["lo"].notna().any():
        fig.add_trace(go.Scatter(x=pd.concat([x, x[::-1]]), y=pd.concat([d["hi"], d["lo"][::-1]]), fill="toself",
                                 fillcolor=common.rgba(color, 0.18), line={"width": 0}, hoverinfo="skip",
                                 showlegend=False), secondary_y=secondary)
    fig.add_trace(go.Scatter(x=x, y=d["mean"], name=name, mode="lines+markers", line={"color": color},
                             marker={"size": 4}), secondary_y=secondary)


def _heatmap(view: View, used: int | None) -> None:
    heads = view.table(ANALYSIS, "heads")
    at, _ = view.at_step(heads)
    if not len(at):
        st.info("No per-head SAS table at this step.")
        return
    c1, c2 = st.columns(2)
    relations = sorted(at["relation"].unique(), key=lambda x: (x != "all", x))
    relation = c1.selectbox("relation", relations, key="syntax_relation")
    direction = c2.radio("direction", sorted(at["direction"].unique()), key="syntax_direction", horizontal=True)
    sel = at[(at["relation"] == relation) & (at["direction"] == direction)]
    fig = common.heatmap_figure(sel, "head", "layer", "uas", f"UAS per head at step {used} ({relation}, {direction})",
                                zmin=0, zmax=1)
    common.show(fig, sel, "syntax_heads",
                "Unlabelled attachment score of each head's argmax attention (word level) against the gold head, "
                "in-sample, at the selected step (sas `heads` table; layers/heads 0-based).")


def _best_table(view: View, used: int | None) -> None:
    best = view.table(ANALYSIS, "best")
    at, _ = view.at_step(best)
    if not len(at):
        st.info("No per-relation table at this step.")
        return
    cols = ["relation", "n", "layer", "head", "direction", "uas_in_sample", "uas_held_out", "best_offset",
            "offset_uas_held_out", "delta_held_out", "offset_share", "uas_nonoffset", "kind"]
    st.markdown(f"**Best head per relation at step {used}**")
    common.table(at[[c for c in cols if c in at]], "syntax_best",
                 "Per relation: the in-sample best head, its held-out UAS, and the best fixed-offset baseline "
                 "(head = word i + k) held out; kind as in the SAS notes (sas `best` table).")


def _attention_viewer(view: View, used: int | None) -> None:
    st.subheader("Attention viewer (live)")
    if not st.toggle("Run the checkpoint on a probe sentence", key="syntax_live",
                     help="Loads the focus run's checkpoint at the selected step (once; cached)."):
        st.caption("Off: the page reads stored results only. Turn it on to see one sentence's attention with its "
                   "gold dependency arcs.")
        return
    probes = data.probe_sentences(view.focus)
    path = data.checkpoint_dir(view.focus, view.step, view.fp(view.focus)) if view.step is not None else None
    if not len(probes):
        st.info(f"`{view.focus}` has no default probe set yet (`RUN/probes/default`, built by `mlmscope analyze`).")
        return
    if path is None:
        st.info(f"`{view.focus}` has no checkpoint at step {view.step}.")
        return
    c1, c2, c3 = st.columns([3, 1, 1])
    idx = c1.selectbox("probe sentence", probes["index"].tolist()[:500], key="syntax_sentence",
                       format_func=lambda i: f"{i}: {probes['text'].iloc[i][:90]}")
    try:
        lm = model.load_checkpoint(path, model.weights_mtime(path))
        words = list(probes["words"].iloc[idx])
        maps = model.attention_maps(lm, words)
    except (model.LiveInputError, OSError, ValueError) as e:
        st.error(f"Cannot run {path}: {e}")
        return
    layer = c2.number_input("layer", 0, maps.shape[0] - 1, 0, key="syntax_layer")
    head = c3.number_input("head", 0, maps.shape[1] - 1, 0, key="syntax_head")
    heads, rels = list(probes["heads"].iloc[idx]), list(probes["relations"].iloc[idx])
    fig, frame = attention_figure(maps[layer, head], words, heads, rels)
    fig.update_layout(title=f"Word-level attention, layer {layer} head {head}, step {view.step}")
    common.show(fig, frame, "syntax_attention",
                "Rows attend to columns (Clark et al.'s word-level merge: mean over the from-word's pieces, sum over "
                "the to-word's pieces). Circles: gold arcs dependent → head (dep->head); a syntactic head puts its "
                "row maximum on the circle.")


def attention_figure(att: np.ndarray, words: list[str], heads: list[int], rels: list[str]
                      ) -> tuple[go.Figure, pd.DataFrame]:
    labels = [f"{i}:{w}" for i, w in enumerate(words)]
    fig = go.Figure(go.Heatmap(z=att, x=labels, y=labels, colorscale="Blues", zmin=0, colorbar={"title": "attn"}))
    arcs = [(i, h - 1, rels[i]) for i, h in enumerate(heads) if h > 0]
    fig.add_trace(go.Scatter(x=[labels[h] for _, h, _ in arcs], y=[labels[i] for i, _, _ in arcs], mode="markers",
                             marker={"symbol": "circle-open", "size": 12, "color": "#d62728", "line": {"width": 2}},
                             text=[r for *_, r in arcs], name="gold arc (dep → head)"))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    fig.update_layout(height=max(360, 18 * len(words)), margin={"t": 40})
    n = len(words)
    frame = pd.DataFrame({"from_word": np.repeat(words, n), "to_word": np.tile(words, n),
                          "from_index": np.repeat(np.arange(n), n), "to_index": np.tile(np.arange(n), n),
                          "attention": att.flatten(),
                          "gold_arc": [heads[i] - 1 == j for i in range(n) for j in range(n)]})
    return fig, frame
