"""Lens: KL(final ‖ layer) over layers × steps for the logit and the tuned lens, and (live) the top-k predictions of
every layer for a masked probe sentence at the selected step."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from . import common, data, model
from .common import View

TITLE = "Lens"
LOGIT, TUNED = "logit_lens", "tuned_lens"


@st.cache_data(show_spinner=False, max_entries=32)
def _kl_frames(run: str, fp: tuple[int, ...], include_mid: bool) -> pd.DataFrame:
    """Both lenses' per-layer rows of one run without the last layer (the final distribution itself, KL = 0)."""
    parts = []
    logit = data.results(run, LOGIT, "per_layer", fp)
    if len(logit):
        parts.append(logit if include_mid else logit[logit["site"] != "resid_mid"])
    tuned = data.results(run, TUNED, "per_layer", fp)
    if len(tuned):
        parts.append(tuned[tuned["lens"] == "tuned"])
    kl = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["step", "depth", "lens", "kl"])
    return kl[kl["depth"] < kl["depth"].max()] if len(kl) else kl


@st.cache_data(show_spinner=False, max_entries=32)
def _kl_grid(run: str, fp: tuple[int, ...], include_mid: bool, lens: str) -> tuple[np.ndarray, list[str], list[str]]:
    """log10 KL as a depth × step grid (cached: only the step outline changes with the slider)."""
    kl = _kl_frames(run, fp, include_mid)
    grid = kl[kl["lens"] == lens].pivot_table(index="depth", columns="step", values="kl", aggfunc="mean")
    return (
        np.log10(grid.to_numpy(float).clip(min=1e-12)),
        [str(s) for s in grid.columns],
        [f"{d:g}" for d in grid.index],
    )


def render(view: View) -> None:
    st.header(TITLE)
    if not len(view.table(LOGIT, "per_layer")) and not len(view.table(TUNED, "per_layer")):
        view.require(LOGIT, "per_layer")
        return
    for name in (LOGIT, TUNED):
        view.failure_note(name)
    include_mid = st.toggle("include the logit lens after each attention sub-layer (resid_mid)", key="lens_mid")
    kl = _kl_frames(view.focus, view.fp(view.focus), include_mid)
    at, used = view.at_step(kl)
    view.step_note(used, LOGIT)
    first = at[at["depth"] == at["depth"].min()]
    mid = at[at["depth"] == sorted(at["depth"].unique())[len(at["depth"].unique()) // 2]]
    common.metric_row(
        [
            (
                "KL at embeddings, logit lens",
                _pick(first, "logit", "kl"),
                "KL(final ‖ lens) in nats at [MASK] positions.",
            ),
            ("KL at embeddings, tuned lens", _pick(first, "tuned", "kl"), None),
            (
                "top-1 agreement mid-depth, logit",
                _pick(mid, "logit", "top1_agree"),
                "Share of masked positions where the layer's top-1 equals the final top-1.",
            ),
            ("top-1 agreement mid-depth, tuned", _pick(mid, "tuned", "top1_agree"), None),
        ]
    )
    positive = kl["kl"][kl["kl"] > 0] if len(kl) else kl
    zrange = (float(np.log10(positive.min())), float(np.log10(positive.max()))) if len(positive) else (None, None)
    left, right = st.columns(2)
    for col, lens, name in [(left, "logit", "logit lens"), (right, "tuned", "tuned lens")]:
        with col:
            sel = kl[kl["lens"] == lens] if len(kl) else kl
            if not len(sel):
                view.require(LOGIT if lens == "logit" else TUNED, "per_layer")
                continue
            grid = _kl_grid(view.focus, view.fp(view.focus), include_mid, lens)
            common.show(
                _kl_heatmap(grid, used, name, zrange),
                sel,
                f"lens_kl_{lens}",
                f"log10 KL(final ‖ {name}) per depth (0 = embeddings, l + 1 = output of block l, l + 0.5 = "
                "after its attention; the last layer, KL = 0, is left out) and step, averaged over [MASK] "
                f"positions of the probe set ({LOGIT if lens == 'logit' else TUNED} `per_layer` table). "
                "The selected step is outlined.",
            )
    _kl_at_step(view, at, used)
    _topk(view)


def _pick(rows: pd.DataFrame, lens: str, col: str) -> float | None:
    sel = rows[rows["lens"] == lens] if len(rows) else rows
    return float(sel[col].iloc[0]) if len(sel) else None


def _kl_heatmap(
    grid: tuple[np.ndarray, list[str], list[str]],
    used: int | None,
    name: str,
    zrange: tuple[float | None, float | None],
) -> go.Figure:
    """Depth × step heatmap of log10 KL with the selected step outlined; both lenses share ``zrange``."""
    z, steps, depths = grid
    layout = {
        "title": {"text": f"KL to the final distribution, {name}"},
        "height": 360,
        "margin": {"t": 40},
        "xaxis": {"type": "category", "title": {"text": "step"}},
        "yaxis": {"type": "category", "title": {"text": "depth"}},
    }
    if used is not None and str(used) in steps:
        i = steps.index(str(used))
        layout["shapes"] = [
            {
                "type": "rect",
                "x0": i - 0.5,
                "x1": i + 0.5,
                "y0": -0.5,
                "y1": len(depths) - 0.5,
                "line": {"color": common.STEP_MARK["line_color"], "width": 2},
            }
        ]
    trace = {
        "type": "heatmap",
        "z": z,
        "x": steps,
        "y": depths,
        "colorscale": "Viridis",
        "zmin": zrange[0],
        "zmax": zrange[1],
        "colorbar": {"title": {"text": "log10 KL"}},
    }
    return go.Figure(data=[trace], layout=layout)


def _kl_at_step(view: View, at: pd.DataFrame, used: int | None) -> None:
    if not len(at):
        return
    fig = common.by_layer_figure(at, "depth", "kl", "lens", f"KL per depth at step {used}", "KL (nats)")
    fig.update_yaxes(type="log")
    common.show(fig, at, "lens_kl_at_step", "Both lenses at the selected step (log scale).")


def _topk(view: View) -> None:
    st.subheader("Top-k predictions per layer (live)")
    if not st.toggle(
        "Run the checkpoint on a masked probe sentence",
        key="lens_live",
        help="Loads the focus run's checkpoint at the selected step (once; cached).",
    ):
        st.caption("Off: the page reads stored results only.")
        return
    probes = data.probe_sentences(view.focus)
    path = data.checkpoint_dir(view.focus, view.step, view.fp(view.focus)) if view.step is not None else None
    if not len(probes) or path is None or view.step is None:
        st.info(f"`{view.focus}` has no default probe set (`RUN/probes/default`) or no checkpoint at this step.")
        return
    c1, c2, c3 = st.columns([3, 2, 1])
    idx = c1.selectbox(
        "probe sentence",
        probes["index"].tolist()[:500],
        key="lens_sentence",
        format_func=lambda i: f"{i}: {probes['text'].iloc[i][:90]}",
    )
    assert idx is not None  # None only for an empty option list
    words = list(probes["words"].iloc[idx])
    masked_at = c2.selectbox(
        "word to mask", range(len(words)), key="lens_word", format_func=lambda i: f"{i}: {words[i]}"
    )
    k = c3.number_input("k", 1, 20, 5, key="lens_k")
    try:
        lm = model.load_checkpoint(path, model.weights_mtime(path))
        translators = model.tuned_translators(data.result_dir(view.focus, TUNED, view.step, view.fp(view.focus)))
        top = model.lens_topk(lm, model.mask_words(words, masked_at, lm.tokenizer.mask_token), int(k), translators)
    except (model.LiveInputError, OSError, ValueError) as e:
        st.error(f"Cannot run {path}: {e}")
        return
    show_topk(
        top,
        "lens_topk",
        f"gold word: **{words[masked_at]}**; tuned lens: "
        f"{'translators of this checkpoint' if translators is not None else 'not stored'}",
    )


def show_topk(top: pd.DataFrame, key: str, caption: str) -> None:
    """One row per (mask, lens, depth): the top-k tokens with probabilities."""
    top = top.assign(pred=top["token"] + " (" + top["prob"].map("{:.3f}".format) + ")")
    wide = top.pivot_table(
        index=["mask", "lens", "depth", "site"], columns="rank", values="pred", aggfunc="first"
    ).reset_index()
    wide.columns = [f"top {c}" if isinstance(c, (int, np.integer)) else c for c in wide.columns]
    st.dataframe(wide, key=f"df_{key}", hide_index=True)
    st.caption(
        caption + ". Each layer's hidden state at the [MASK] decoded through the full MLM head "
        "(mlmscope.analyses.lens.decode_hidden); tuned lens = the stored affine translators applied "
        "first."
    )
    common.csv_button(top, key)
