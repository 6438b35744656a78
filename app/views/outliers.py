"""Outliers: argmax/argmin dimension frequencies at the step, when outlier dimensions emerge, and anisotropy with and
without clipping them."""

from __future__ import annotations

from typing import cast

import pandas as pd
import streamlit as st

from . import common, data
from .common import View

TITLE = "Outliers"
ANALYSIS = "outliers"
#: The analysis' default ``freq_threshold`` (a dimension that is the argmax/argmin of half the tokens; Luo et al.).
DEFAULT_THRESHOLD = 0.5


@st.cache_data(show_spinner=False, max_entries=32)
def _emergence(run: str, fp: tuple[int, ...], threshold: float) -> pd.DataFrame:
    """``mlmscope.analyses.outliers.outlier_emergence`` of one run (cached: it does not depend on the step)."""
    from ...analyses.outliers import outlier_emergence

    return outlier_emergence(data.results(run, ANALYSIS, "freq", fp), threshold=threshold)


@st.cache_data(show_spinner=False, max_entries=32)
def _emerging(key: tuple, dims: tuple[tuple[int, str], ...]) -> pd.DataFrame:
    """Max frequency over layers >= 1 of the given (dim, kind) pairs over steps, mean ± sd over seeds."""
    frames = [
        data.results(run, ANALYSIS, "freq", fp).assign(source=label, run=run)
        for label, runs, fps in key
        for run, fp in zip(runs, fps)
    ]
    freq = pd.concat(frames, ignore_index=True)
    sel = freq.merge(pd.DataFrame(list(dims), columns=["dim", "kind"]), on=["dim", "kind"])
    sel = sel[sel["layer"] >= 1].groupby(["source", "run", "step", "dim", "kind"], as_index=False)["freq"].max()
    return common.band(cast(pd.DataFrame, sel), "freq", keys=["dim", "kind"])  # as_index=False: a DataFrame


def render(view: View) -> None:
    st.header(TITLE)
    freq = view.require(ANALYSIS, "freq")
    if freq is None:
        return
    view.failure_note(ANALYSIS)
    c1, c2 = st.columns(2)
    kind = c1.radio("frequency of", ["argmax", "argmin"], key="outliers_kind", horizontal=True)
    threshold = c2.slider(
        "outlier threshold",
        0.05,
        1.0,
        DEFAULT_THRESHOLD,
        0.05,
        key="outliers_threshold",
        help="A dimension is an activation outlier when it is the argmax (argmin) of at least this "
        "share of token vectors in a non-input layer.",
    )
    at, used = view.at_step(freq)
    view.step_note(used, ANALYSIS)
    upper = at[at["layer"] >= 1]
    top = common.row_at(upper, upper["freq"].idxmax()) if len(upper) else None
    n_out = upper[upper["freq"] >= threshold]["dim"].nunique()
    aniso = view.table(ANALYSIS, "anisotropy")
    a_at, _ = view.at_step(aniso)
    raw = a_at[(a_at["condition"] == "raw")]
    common.metric_row(
        [
            (
                "top dimension",
                f"{int(top['dim'])} ({top['kind']})" if top is not None else None,
                "The dimension that is most often the argmax/argmin of a token vector (layers ≥ 1).",
            ),
            ("its frequency", float(top["freq"]) if top is not None else None, "Share of token vectors; chance = 1/d."),
            ("outlier dims", int(n_out), f"Dimensions with frequency ≥ {threshold} in some layer ≥ 1."),
            (
                "anisotropy, last layer",
                float(common.row_at(raw, raw["layer"].idxmax())["value"]) if len(raw) else None,
                "Mean cosine of random token pairs (Ethayarajh 2019).",
            ),
        ]
    )
    left, right = st.columns(2)
    with left:
        sel = at[at["kind"] == kind]
        # one column level stacked: a Series (pandas-stubs allows a DataFrame)
        grid = cast(pd.Series, sel.pivot_table(index="layer", columns="dim", values="freq", fill_value=0.0).stack())
        grid = grid.rename("freq").reset_index()
        fig = common.heatmap_figure(
            grid,
            "dim",
            "layer",
            "freq",
            f"{kind} frequency per dimension at step {used}",
            colorscale="Magma",
            zmin=0,
            zmax=1,
        )
        fig.update_xaxes(type="linear")
        common.show(
            fig,
            sel,
            "outliers_freq",
            f"Share of token vectors whose {kind} is each dimension, per layer (0 = embeddings); only "
            "dimensions that won at least once are stored (outliers `freq` table; Luo et al. 2021).",
        )
    with right:
        emerg = _emergence(view.focus, view.fp(view.focus), threshold)
        st.markdown(f"**Emergence of outlier dimensions (threshold {threshold})**")
        if len(emerg):
            common.table(
                emerg,
                "outliers_emergence",
                "First checkpoint where each (dim, kind) reaches the threshold in a layer ≥ 1, and the step "
                "from which it stays there (mlmscope.analyses.outliers.outlier_emergence).",
            )
        else:
            st.info(f"No dimension reaches frequency {threshold} in any layer ≥ 1 at any analysed step.")
        _emerging_curve(view, emerg)
    _anisotropy(view)


def _emerging_curve(view: View, emerg: pd.DataFrame) -> None:
    if not len(emerg):
        return
    dims = tuple((int(d), str(k)) for d, k in emerg.head(5)[["dim", "kind"]].itertuples(index=False))
    curve = _emerging(view.key, dims)
    curve["dim"] = "dim " + curve["dim"].astype(str)
    fig = common.line_figure(
        curve,
        view,
        "max frequency over layers ≥ 1",
        series=("source", "dim", "kind"),
        title="Outlier dimensions over training",
    )
    common.show(fig, curve, "outliers_emerging", "The (up to five) earliest outlier dimensions of the focus run.")


def _anisotropy(view: View) -> None:
    aniso = view.table(ANALYSIS, "anisotropy")
    if not len(aniso):
        st.info("No anisotropy table stored.")
        return
    layers = sorted(int(x) for x in aniso["layer"].unique())
    chosen = (
        st.multiselect(
            "anisotropy layers", layers, default=layers[-2:] if len(layers) > 1 else layers, key="outliers_layers"
        )
        or layers
    )
    curve = view.curve(
        ANALYSIS, "anisotropy", "value", ["layer", "condition"], layer=tuple(chosen), condition=("raw", "clipped")
    )
    curve["layer"] = "L" + curve["layer"].astype(str)
    fig = common.line_figure(
        curve,
        view,
        "mean pair cosine",
        series=("source", "layer", "condition"),
        dash_by="condition",
        title="Anisotropy with and without the outlier dimensions",
    )
    common.show(
        fig,
        curve,
        "outliers_anisotropy",
        "Mean cosine of random token pairs, raw (solid) and with the detected activation outlier dimensions "
        "zeroed (dashed, 'clipped') (outliers `anisotropy` table).",
    )
