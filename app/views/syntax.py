"""Syntax: SAS over steps with onsets and the validation loss, the layer × head UAS heatmap, per-relation best heads
with their offset baselines, and a live attention viewer for a probe sentence with its gold arcs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from . import common, data, model
from .common import View

TITLE = "Syntax (SAS)"
ANALYSIS = "sas"


def _focus_curve(summary: pd.DataFrame, ck: pd.DataFrame) -> pd.DataFrame:
    """``mlmscope.analyses.sas.sas_curve`` of the stored summaries next to the manifest's validation loss."""
    from ...analyses.sas import sas_curve

    return sas_curve(summary).merge(ck[["step", "val_loss"]], on="step", how="left")


def _onset_params(curve: pd.DataFrame, unigram_entropy: float | None):
    """Onset settings that skip the unigram phase: checkpoints before the validation loss first reaches the unigram
    entropy are the model learning token frequencies (a fast fall from ln V), not the transition the page is about;
    a run without that record (or that never reaches it) keeps every checkpoint."""
    from ...analyses.onset import OnsetParams

    below = curve[curve["val_loss"] <= unigram_entropy] if unigram_entropy is not None else curve.iloc[:0]
    return OnsetParams(min_step=float(below["step"].min()) if len(below) else 0.0)


@st.cache_data(show_spinner="Detecting onsets…", max_entries=32)
def _onsets(run: str, fp: tuple[int, ...]) -> tuple[pd.DataFrame | None, str]:
    """``mlmscope.analyses.sas.sas_onsets`` of one run's curve (bootstrap intervals: cached), or None and why not."""
    from ...analyses.sas import sas_onsets

    curve = _focus_curve(data.results(run, ANALYSIS, "summary", fp), data.checkpoints(run, fp))
    if curve["step"].nunique() < 6:
        return None, f"onset detection needs at least 6 analysed checkpoints (this run has {curve['step'].nunique()})"
    try:
        return sas_onsets(curve, _onset_params(curve, data.run_meta(run, fp).get("val_unigram_entropy"))), ""
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
    common.metric_row(
        [
            (
                "SAS score (held-out)",
                float(r["sas_score"]),
                "UAS of the best head chosen on one probe half and scored "
                "on the other (relation `all`: no root, no punct).",
            ),
            ("best head (in-sample)", f"L{int(r['layer'])} H{int(r['head'])} {r['direction']}", None),
            (
                "best offset baseline",
                float(r["offset_uas_held_out"]),
                f"held-out UAS of offset {int(r['best_offset']):+d}",
            ),
            (
                "kind",
                str(r["kind"]),
                "syntactic: beats the offset baseline by > 2 s.e.; positional: >= 50 % of its "
                "predictions at the best offset.",
            ),
        ]
    )
    _curve(view)
    left, right = st.columns(2)
    with left:
        relation = _heatmap(view, used)
    with right:
        _best_table(view, used)
    if relation is not None:
        _relation_curve(view, relation)
    _attention_viewer(view, used)


def _curve(view: View) -> None:
    sas = view.curve(ANALYSIS, "summary", "sas_score")
    loss = view.curve(None, "", "val_loss")
    traces = []
    for i, (src, d) in enumerate(sas.groupby("source", sort=False)):
        color = common.PALETTE[i % len(common.PALETTE)]
        traces += _band_traces(view, d, color, f"SAS · {src}")
        lo = loss[loss["source"] == src]
        traces.append(
            {
                "type": "scatter",
                "x": view.x(lo["step"]).to_numpy(float),
                "y": lo["mean"].to_numpy(float),
                "name": f"val loss · {src}",
                "mode": "lines",
                "yaxis": "y2",
                "line": {"color": color, "dash": "dot", "width": 1},
            }
        )
    focus = _focus_curve(view.table(ANALYSIS, "summary"), view.checkpoints())
    for col, name in [("sas_in_sample", "best head, in-sample"), ("offset_uas_held_out", "best offset (held-out)")]:
        traces.append(
            {
                "type": "scatter",
                "x": view.x(focus["step"]).to_numpy(float),
                "y": focus[col].to_numpy(float),
                "name": f"{name} · {view.focus}",
                "mode": "lines",
                "line": {"dash": "dash", "width": 1},
            }
        )
    layout = view.step_axis()
    layout.update(
        {
            "title": {"text": "Syntactic attention structure over training"},
            "height": 400,
            "margin": {"t": 40},
            "yaxis": {"title": {"text": "UAS (all: no root, no punct)"}},
            "yaxis2": {
                "title": {"text": "validation loss (nats)"},
                "overlaying": "y",
                "side": "right",
                "showgrid": False,
            },
            "legend": {"x": 1.08, "font": {"size": 10}},
        }
    )
    onsets, why = _onsets(view.focus, view.fp(view.focus))
    if onsets is not None:
        layout.setdefault("shapes", []).extend(_onset_shapes(view, onsets.iloc[0]))
    fig = go.Figure(data=traces, layout=layout)
    caption = (
        "SAS score = held-out UAS of the best attention head against the probe set's dependency parses "
        "(analyses/sas.py, Clark et al. 2019; Chen et al. 2024), dashed: in-sample best head and the best "
        "fixed-offset baseline of the focus run; dotted: validation loss (right axis). Shaded: structure "
        "onset (blue) and loss drop (grey) detected on the focus run (3-segment fit on log step, from the "
        "first checkpoint whose val loss is at or below the unigram entropy)."
    )
    if onsets is not None:
        o = onsets.iloc[0]
        caption += f" Structure kind: {o.get('structure_kind')}; coincide with the loss drop: {o.get('coincide')}."
    else:
        caption += f" ({why}.)"
    common.show(fig, pd.concat([sas.assign(curve="sas_score"), loss.assign(curve="val_loss")]), "syntax_sas", caption)
    if onsets is not None:
        with st.expander("Onsets (mlmscope.analyses.sas.sas_onsets)"):
            common.table(onsets.T.reset_index().set_axis(["field", "value"], axis=1).astype(str), "syntax_onsets")


def _band_traces(view: View, d: pd.DataFrame, color: str, name: str) -> list[dict[str, Any]]:
    """A mean line and (for a seed group) its ±1 sd band, as plain trace dicts."""
    x = view.x(d["step"]).to_numpy(float)
    out = []
    if d["lo"].notna().any():
        out.append(
            {
                "type": "scatter",
                "x": np.concatenate([x, x[::-1]]),
                "y": np.concatenate([d["hi"].to_numpy(float), d["lo"].to_numpy(float)[::-1]]),
                "fill": "toself",
                "fillcolor": common.rgba(color, 0.18),
                "line": {"width": 0},
                "hoverinfo": "skip",
                "showlegend": False,
            }
        )
    out.append(
        {
            "type": "scatter",
            "x": x,
            "y": d["mean"].to_numpy(float),
            "name": name,
            "mode": "lines+markers",
            "line": {"color": color},
            "marker": {"size": 4},
        }
    )
    return out


def _onset_shapes(view: View, o: pd.Series) -> list[dict[str, Any]]:
    """Shaded ramps of the structure onset and the loss drop (where found)."""
    out = []
    for prefix, color in [("sas_", "rgba(31,119,180,0.15)"), ("loss_", "rgba(128,128,128,0.15)")]:
        if o.get(f"{prefix}found"):
            out.append(
                {
                    "type": "rect",
                    "xref": "x",
                    "yref": "paper",
                    "y0": 0,
                    "y1": 1,
                    "fillcolor": color,
                    "line": {"width": 0},
                    "layer": "below",
                    "x0": float(view.x(o[f"{prefix}onset_step"])),
                    "x1": float(view.x(o[f"{prefix}end_step"])),
                }
            )
    return out


def _heatmap(view: View, used: int | None) -> str | None:
    """The layer × head UAS heatmap of one relation and direction (chosen here); returns the relation."""
    heads = view.table(ANALYSIS, "heads")
    at, _ = view.at_step(heads)
    if not len(at):
        st.info("No per-head SAS table at this step.")
        return None
    c1, c2 = st.columns(2)
    relations = sorted(at["relation"].unique(), key=lambda x: (x != "all", x))
    relation = c1.selectbox("relation", relations, key="syntax_relation")
    direction = c2.radio("direction", sorted(at["direction"].unique()), key="syntax_direction", horizontal=True)
    sel = at[(at["relation"] == relation) & (at["direction"] == direction)]
    fig = common.heatmap_figure(
        sel, "head", "layer", "uas", f"UAS per head at step {used} ({relation}, {direction})", zmin=0, zmax=1
    )
    common.show(
        fig,
        sel,
        "syntax_heads",
        "Unlabelled attachment score of each head's argmax attention (word level) against the gold head, "
        "in-sample, at the selected step (sas `heads` table; layers/heads 0-based).",
    )
    return str(relation)


#: Columns of the per-relation curve (sas ``best`` table) and their legend names.
RELATION_CURVES = (
    ("uas_held_out", "best head (held-out)"),
    ("offset_uas_held_out", "best offset (held-out)"),
    ("uas_nonoffset", "best head, words whose head is off that offset (in-sample)"),
)


def _relation_curve(view: View, relation: str) -> None:
    """One relation over training (focus run): its best head's held-out UAS against its best offset's."""
    best = view.table(ANALYSIS, "best")
    if "relation" not in best:
        return
    d = best[best["relation"] == relation].sort_values("step")
    if d.empty:
        return
    traces = [
        {
            "type": "scatter",
            "x": view.x(d["step"]).to_numpy(float),
            "y": d[col].to_numpy(float),
            "name": name,
            "mode": "lines+markers",
            "marker": {"size": 4},
            "line": {"dash": "dash" if col == "offset_uas_held_out" else "solid", "width": 1.5},
        }
        for col, name in RELATION_CURVES
    ]
    layout = view.step_axis()
    layout.update(
        {
            "title": {"text": f"{relation}: best head vs best offset over training"},
            "height": 360,
            "margin": {"t": 40},
            "yaxis": {"title": {"text": "UAS"}},
            "legend": common.LEGEND_BELOW,
        }
    )
    common.show(
        go.Figure(data=traces, layout=layout),
        d[["step", "relation", "n", "layer", "head", "direction", *(c for c, _ in RELATION_CURVES)]],
        "syntax_relation_curve",
        f"The relation chosen above ({relation}), at every checkpoint of the focus run: the held-out UAS of its best "
        "head (chosen on one probe half, scored on the other) and of its best fixed offset (held out), and, in-sample, "
        "of the head on the words whose gold head is not at that offset (sas `best` table). A syntactic head rises "
        "above the dashed offset line and its off-offset curve rises with it.",
    )


def _best_table(view: View, used: int | None) -> None:
    best = view.table(ANALYSIS, "best")
    at, _ = view.at_step(best)
    if not len(at):
        st.info("No per-relation table at this step.")
        return
    cols = [
        "relation",
        "n",
        "layer",
        "head",
        "direction",
        "uas_in_sample",
        "uas_held_out",
        "best_offset",
        "offset_uas_held_out",
        "delta_held_out",
        "offset_share",
        "uas_nonoffset",
        "kind",
    ]
    st.markdown(f"**Best head per relation at step {used}**")
    common.table(
        at[[c for c in cols if c in at]],
        "syntax_best",
        "Per relation: the in-sample best head, its held-out UAS, and the best fixed-offset baseline "
        "(head = word i + k) held out. kind (default thresholds): syntactic if the held-out UAS beats that "
        "baseline by more than 2 standard errors, else positional if at least half of the head's "
        "predictions fall at the best offset, else neither (sas `best` table).",
    )


def _attention_viewer(view: View, used: int | None) -> None:
    st.subheader("Attention viewer (live)")
    if not st.toggle(
        "Run the checkpoint on a probe sentence",
        key="syntax_live",
        help="Loads the focus run's checkpoint at the selected step (once; cached).",
    ):
        st.caption(
            "Off: the page reads stored results only. Turn it on to see one sentence's attention with its "
            "gold dependency arcs."
        )
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
    idx = c1.selectbox(
        "probe sentence",
        probes["index"].tolist()[:500],
        key="syntax_sentence",
        format_func=lambda i: f"{i}: {probes['text'].iloc[i][:90]}",
    )
    assert idx is not None  # None only for an empty option list
    try:
        lm = model.load_checkpoint(path, model.weights_mtime(path))
        words = list(probes["words"].iloc[idx])
        maps = model.attention_maps(lm, words)
    except (model.LiveInputError, OSError, ValueError) as e:
        st.error(f"Cannot run {path}: {e}")
        return
    layer = int(c2.number_input("layer", 0, maps.shape[0] - 1, 0, key="syntax_layer"))  # int bounds: already an int
    head = int(c3.number_input("head", 0, maps.shape[1] - 1, 0, key="syntax_head"))
    heads, rels = list(probes["heads"].iloc[idx]), list(probes["relations"].iloc[idx])
    fig, frame = attention_figure(maps[layer, head], words, heads, rels)
    fig.update_layout(title=f"Word-level attention, layer {layer} head {head}, step {view.step}")
    common.show(
        fig,
        frame,
        "syntax_attention",
        "Rows attend to columns (Clark et al.'s word-level merge: mean over the from-word's pieces, sum over "
        "the to-word's pieces). Circles: gold arcs dependent → head (dep->head); a syntactic head puts its "
        "row maximum on the circle.",
    )


def attention_figure(
    att: np.ndarray, words: list[str], heads: list[int], rels: list[str]
) -> tuple[go.Figure, pd.DataFrame]:
    labels = [f"{i}:{w}" for i, w in enumerate(words)]
    fig = go.Figure(go.Heatmap(z=att, x=labels, y=labels, colorscale="Blues", zmin=0, colorbar={"title": "attn"}))
    arcs = [(i, h - 1, rels[i]) for i, h in enumerate(heads) if h > 0]
    fig.add_trace(
        go.Scatter(
            x=[labels[h] for _, h, _ in arcs],
            y=[labels[i] for i, _, _ in arcs],
            mode="markers",
            marker={"symbol": "circle-open", "size": 12, "color": "#d62728", "line": {"width": 2}},
            text=[r for *_, r in arcs],
            name="gold arc (dep → head)",
        )
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    fig.update_layout(height=max(360, 18 * len(words)), margin={"t": 40})
    n = len(words)
    frame = pd.DataFrame(
        {
            "from_word": np.repeat(words, n),
            "to_word": np.tile(words, n),
            "from_index": np.repeat(np.arange(n), n),
            "to_index": np.tile(np.arange(n), n),
            "attention": att.flatten(),
            "gold_arc": [heads[i] - 1 == j for i in range(n) for j in range(n)],
        }
    )
    return fig, frame
