"""What every page shares: the :class:`View` (selected runs, focus run, global step), messages, figures, CSV export.

A page module is ``TITLE`` plus ``render(view: View) -> None``; it reads results through the view (cached loaders
of :mod:`mlmscope.app.views.data`) and draws them with the helpers here, so each page stays a few dozen lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from . import data
from .data import Source

#: Plotly's default qualitative palette (one colour per trace, bands in the same colour).
PALETTE = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880", "#FF97FF", "#FECB52")
STEP_MARK = {"line_dash": "dot", "line_color": "#d62728", "line_width": 1.5}
#: Zoom segments (``mlmscope zoom``: checkpoints replayed densely) as a strip along the bottom of curves over steps.
ZOOM_MARK = {"color": "rgba(255,127,14,0.55)", "text": "#c45a00", "height": 0.035}


@dataclass
class View:
    """The state every page follows.

    Attributes:
        sources: Picker entries selected in the sidebar (single runs and seed groups), overlaid on curves.
        focus: The run whose step-specific views (heatmaps, tables, live model) are shown.
        step: The global step (None when no selected run has a checkpoint yet).
        log_x: Log step axis on every curve (plotted at step + 1 so step 0 stays visible).
        fps: Run folder -> fingerprint for this rerun (see :func:`mlmscope.app.views.data.fingerprint`).
    """

    sources: list[Source]
    focus: str
    step: int | None
    log_x: bool = False
    fps: dict[str, tuple[int, ...]] = field(default_factory=dict)

    # --- reading -----------------------------------------------------------------------------------------------
    def fp(self, run: str) -> tuple[int, ...]:
        if run not in self.fps:
            self.fps[run] = data.fingerprint(run)
        return self.fps[run]

    def checkpoints(self, run: str | None = None) -> pd.DataFrame:
        run = run or self.focus
        return data.checkpoints(run, self.fp(run))

    def table(self, analysis: str, table: str, run: str | None = None) -> pd.DataFrame:
        """One stored table of the focus run (or ``run``) over all steps."""
        run = run or self.focus
        return data.results(run, analysis, table, self.fp(run))

    def series(self, analysis: str, table: str) -> pd.DataFrame:
        """A stored table of every selected source stacked, with ``source`` and ``run`` columns."""
        return self.stack(lambda run: self.table(analysis, table, run))

    def stack(self, read: Callable[[str], pd.DataFrame]) -> pd.DataFrame:
        """``read(run)`` for every run of every selected source, with ``source`` and ``run`` columns."""
        frames = [read(run).assign(source=s.label, run=run) for s in self.sources for run in s.runs]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["source", "run", "step"])

    def stored(self, run: str | None = None) -> dict[str, dict[str, Any]]:
        run = run or self.focus
        return data.stored(run, self.fp(run))

    def failures(self, analysis: str | None = None, run: str | None = None) -> pd.DataFrame:
        run = run or self.focus
        df = data.failures(run, self.fp(run))
        return data.failure_scope(df, analysis) if analysis else df

    def at_step(self, df: pd.DataFrame) -> tuple[pd.DataFrame, int | None]:
        """Rows of the nearest step at or before the global step (the first step if all are later)."""
        if not len(df) or self.step is None:
            return df.iloc[:0], None
        steps = df["step"].unique()
        before = steps[steps <= self.step]
        used = int(before.max()) if len(before) else int(steps.min())
        return df[df["step"] == used], used

    # --- page furniture ----------------------------------------------------------------------------------------
    def require(self, analysis: str, table: str, what: str = "") -> pd.DataFrame | None:
        """The focus run's table, or None after a clear message saying why it is missing and what to run."""
        df = self.table(analysis, table)
        if len(df):
            return df
        if not len(self.checkpoints()):
            st.info(f"`{self.focus}` has no finished checkpoints yet, so there are no `{analysis}` results.")
            return None
        info = self.stored().get(analysis)
        if info and info["skipped"] and not info["ok"]:
            reasons = "; ".join(f"{r} ({n}×)" for r, n in info["skipped"].items())
            st.info(f"`{analysis}` was skipped on every checkpoint of `{self.focus}`: {reasons}")
        elif info and info["ok"]:
            st.info(
                f"The stored `{analysis}` results of `{self.focus}` have no `{table}` table"
                f"{' (' + what + ')' if what else ''}; re-run `mlmscope analyze {self.focus} -a {analysis} "
                "--force` with the current version."
            )
        else:
            st.info(
                f"No `{analysis}` results for `{self.focus}` yet{' (' + what + ')' if what else ''}. "
                f"Compute them with `mlmscope analyze {self.focus} -a {analysis}`."
            )
        self.failure_note(analysis)
        return None

    def failure_note(self, analysis: str) -> None:
        """A warning listing the failed checkpoints of ``analysis`` (and whole-checkpoint failures), if any."""
        fails = self.failures(analysis)
        if not len(fails):
            return
        lines = [f"- step {_step_text(r.step)} (`{r.checkpoint}`, {r.analysis}): {r.error}" for r in fails.itertuples()]
        st.warning(
            f"{len(fails)} checkpoint(s) of `{self.focus}` failed for this analysis and are missing from "
            "the views below (re-run `mlmscope analyze` to retry only those):\n" + "\n".join(lines[:10])
        )

    def step_note(self, used: int | None, analysis: str) -> None:
        """Say so when the global step has no result of ``analysis`` and a nearby step is shown instead."""
        if used is None or self.step is None or used == self.step:
            return
        fails = self.failures(analysis)
        failed = fails[fails["step"] == self.step] if len(fails) else fails
        why = f"it failed: {failed['error'].iloc[0]}" if len(failed) else "not analysed (yet)"
        st.caption(f"Step {self.step} has no `{analysis}` result ({why}); showing step {used}.")

    def zoom_segments(self) -> list[dict[str, Any]]:
        """The focus run's zoom segments that wrote checkpoints (manifest ``run.zoom_segments``; ``mlmscope zoom``)."""
        segments = data.run_meta(self.focus, self.fp(self.focus)).get("zoom_segments") or []
        return [s for s in segments if s.get("steps")]

    # --- x axis ------------------------------------------------------------------------------------------------
    def x(self, steps: pd.Series | int) -> Any:
        """Plot coordinate of a step: the step, or step + 1 on a log axis."""
        return steps + 1 if self.log_x else steps

    def label_x(self, step: int) -> float:
        """Where an annotation at ``step`` goes: plotly places annotations on a log axis in log10 units (shapes and
        traces in data units), so without this a label on a log axis lands far off the plot."""
        return math.log10(step + 1) if self.log_x else step

    def zoom_marks(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Shapes and labels marking the focus run's zoom segments: an orange strip along the bottom of the plot
        over each densely replayed window, labelled with its spacing."""
        shapes, labels = [], []
        for seg in self.zoom_segments():
            x0, x1 = self.x(seg["from"]), self.x(seg["to"])
            shapes.append(
                {
                    "type": "rect",
                    "xref": "x",
                    "yref": "paper",
                    "x0": x0,
                    "x1": x1,
                    "y0": 0,
                    "y1": ZOOM_MARK["height"],
                    "fillcolor": ZOOM_MARK["color"],
                    "line": {"width": 0},
                }
            )
            labels.append(
                {
                    "x": self.label_x(seg["to"]),
                    "y": ZOOM_MARK["height"],
                    "xref": "x",
                    "yref": "paper",
                    "text": f"zoom: every {seg['every']}",
                    "showarrow": False,
                    "xanchor": "left",
                    "yanchor": "bottom",
                    "font": {"size": 9, "color": ZOOM_MARK["text"]},
                }
            )
        return shapes, labels

    def step_axis(self) -> dict[str, Any]:
        """Layout entries of a figure over steps: the x axis (log or linear), the zoom segments and the global step
        marker."""
        out: dict[str, Any] = {
            "xaxis": {
                "type": "log" if self.log_x else "linear",
                "title": {"text": "step + 1" if self.log_x else "step"},
            }
        }
        zoom_shapes, zoom_labels = self.zoom_marks()
        if zoom_shapes:
            out["shapes"], out["annotations"] = zoom_shapes, zoom_labels
        if self.step is not None:
            x = self.x(self.step)
            out["shapes"] = out.get("shapes", []) + [
                {
                    "type": "line",
                    "x0": x,
                    "x1": x,
                    "y0": 0,
                    "y1": 1,
                    "xref": "x",
                    "yref": "paper",
                    "line": {
                        "dash": STEP_MARK["line_dash"],
                        "color": STEP_MARK["line_color"],
                        "width": STEP_MARK["line_width"],
                    },
                }
            ]
            out["annotations"] = out.get("annotations", []) + [
                {
                    "x": self.label_x(self.step),
                    "y": 1,
                    "xref": "x",
                    "yref": "paper",
                    "text": f"step {self.step}",
                    "showarrow": False,
                    "yanchor": "bottom",
                    "font": {"size": 10, "color": STEP_MARK["line_color"]},
                }
            ]
        return out

    def style_steps(self, fig: go.Figure, title: str | None = None, mark: bool = True) -> go.Figure:
        """Log/linear step axis and the global step marked (every curve over steps goes through here)."""
        fig.update_xaxes(type="log" if self.log_x else "linear", title=title or ("step + 1" if self.log_x else "step"))
        shapes, labels = self.zoom_marks()
        for shape in shapes:
            fig.add_shape(shape)
        for label in labels:
            fig.add_annotation(label)
        if mark and self.step is not None:
            mark_x(fig, self.x(self.step), f"step {self.step}", self.label_x(self.step))
        return fig

    # --- cached curves -------------------------------------------------------------------------------------------
    @property
    def key(self) -> tuple[Any, ...]:
        """What a step-independent curve depends on: the selected sources and their runs' fingerprints."""
        return tuple((s.label, s.runs, tuple(self.fp(r) for r in s.runs)) for s in self.sources)

    def curve(
        self, analysis: str | None, table: str, value: str, keys: Sequence[str] = (), **filters: Any
    ) -> pd.DataFrame:
        """:func:`band` of ``value`` over the selected sources, cached (it does not depend on the step).

        Args:
            analysis: Analysis name, or None for the checkpoint table (``table`` is then ignored).
            table: Stored table.
            value: Column to average over the seeds of a group.
            keys: Extra columns that name one line each (e.g. ``layer``).
            **filters: ``column=value`` or ``column=(values, ...)`` row filters applied first.
        """
        flt = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else (v,)) for k, v in filters.items()))
        return _cached_curve(self.key, analysis, table, value, tuple(keys), flt)


@st.cache_data(show_spinner=False, max_entries=512)
def _cached_curve(
    key: tuple[Any, ...],
    analysis: str | None,
    table: str,
    value: str,
    keys: tuple[str, ...],
    filters: tuple[tuple[str, tuple[Any, ...]], ...],
) -> pd.DataFrame:
    frames = []
    for label, runs, fps in key:
        for run, fp in zip(runs, fps):
            df = data.checkpoints(run, fp) if analysis is None else data.results(run, analysis, table, fp)
            frames.append(df.assign(source=label, run=run))
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["source", "run", "step"])
    for col, allowed in filters:
        if col in df:
            df = df[df[col].isin(allowed)]
    return band(df, value, keys)


def mark_x(fig: go.Figure, x: Any, label: str, label_x: Any = None) -> None:
    """A dotted vertical line across the plot at ``x`` with a label on top (cheaper than ``add_vline``); ``label_x``:
    the label's x where it differs (log axes: :meth:`View.label_x`)."""
    fig.add_shape(
        type="line",
        x0=x,
        x1=x,
        y0=0,
        y1=1,
        xref="x",
        yref="paper",
        line={"dash": STEP_MARK["line_dash"], "color": STEP_MARK["line_color"], "width": STEP_MARK["line_width"]},
    )
    fig.add_annotation(
        x=x if label_x is None else label_x,
        y=1,
        xref="x",
        yref="paper",
        text=label,
        showarrow=False,
        yanchor="bottom",
        font={"size": 10, "color": STEP_MARK["line_color"]},
    )


# --- aggregation and figures ------------------------------------------------------------------------------------


def band(df: pd.DataFrame, value: str, keys: Sequence[str] = ()) -> pd.DataFrame:
    """Mean ± one standard deviation of ``value`` over the runs of each source (seed groups), per step and ``keys``.

    Returns:
        source, step, keys..., mean, lo, hi, n_runs (lo/hi are NaN for a single run).
    """
    cols = ["source", "step", *keys]
    if not len(df) or value not in df:
        return pd.DataFrame(columns=[*cols, "mean", "lo", "hi", "n_runs"])
    g = df.dropna(subset=[value]).groupby(cols, sort=True)[value]
    out = g.agg(mean="mean", sd="std", n_runs="count").reset_index()
    out["lo"], out["hi"] = out["mean"] - out["sd"], out["mean"] + out["sd"]
    return out.drop(columns="sd")


def rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


#: Curve legends go below the plot: run labels are folder paths, and a legend beside a half-width plot squeezes it.
LEGEND_BELOW = {"font": {"size": 10}, "orientation": "h", "yanchor": "top", "y": -0.22, "x": 0}


def line_figure(
    curve: pd.DataFrame,
    view: View,
    y_title: str,
    series: Sequence[str] = ("source",),
    title: str = "",
    y: str = "mean",
    dash_by: str | None = None,
) -> go.Figure:
    """Lines over steps, one per combination of ``series`` columns, with a ±1 sd band where ``lo``/``hi`` exist.

    Args:
        curve: From :func:`band` (or any frame with ``step`` and ``y``).
        view: For the step axis and the step marker.
        y_title: Y axis title.
        series: Columns naming one trace each.
        title: Figure title.
        y: Column of the line.
        dash_by: Optional column whose values get different dash styles (e.g. with vs without [MASK]).
    """
    dashes = ("solid", "dash", "dot", "dashdot")
    # One step (a single model): a line of one point is invisible, so draw large markers (see dashboard.status_banner)
    single = curve["step"].nunique() == 1
    mode, size = ("markers", 10) if single else ("lines+markers", 4)
    dash_of = {v: dashes[i % len(dashes)] for i, v in enumerate(curve[dash_by].unique())} if dash_by else {}
    colors: dict[Any, str] = {}
    traces: list[dict[str, Any]] = []
    # Traces are plain dicts with numpy arrays and the figure is built once: plotly validates each property on
    # every update, so add_trace / update_layout calls would dominate a slider rerun.
    for key, d in curve.groupby(list(series), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        ckey = tuple(k for c, k in zip(series, key) if c != dash_by)
        color = colors.setdefault(ckey, PALETTE[len(colors) % len(PALETTE)])
        name = " · ".join(str(k) for k in key)
        d = d.sort_values("step")
        x = np.asarray(view.x(d["step"]), dtype=float)
        if "lo" in d and d["lo"].notna().any():
            traces.append(
                {
                    "type": "scatter",
                    "x": np.concatenate([x, x[::-1]]),
                    "y": np.concatenate([d["hi"].to_numpy(float), d["lo"].to_numpy(float)[::-1]]),
                    "fill": "toself",
                    "fillcolor": rgba(color, 0.18),
                    "line": {"width": 0},
                    "hoverinfo": "skip",
                    "showlegend": False,
                    "legendgroup": name,
                }
            )
        dash = dash_of.get(key[list(series).index(dash_by)]) if dash_by else None
        traces.append(
            {
                "type": "scatter",
                "x": x,
                "y": d[y].to_numpy(float),
                "name": name,
                "mode": mode,
                "legendgroup": name,
                "line": {"color": color, "dash": dash},
                "marker": {"size": size},
            }
        )
    layout = {
        "title": {"text": title},
        "yaxis": {"title": {"text": y_title}},
        "margin": {"t": 40, "b": 40},
        "height": 360,
        "legend": LEGEND_BELOW,
        **view.step_axis(),
    }
    return go.Figure(data=traces, layout=layout)


def by_layer_figure(df: pd.DataFrame, x: str, y: str, by: str, title: str, y_title: str) -> go.Figure:
    """One line per value of ``by`` over ``x`` (a layer axis) at the selected step."""
    traces = [
        {
            "type": "scatter",
            "x": d[x].to_numpy(float),
            "y": d[y].to_numpy(float),
            "name": str(name),
            "mode": "lines+markers",
            "line": {"color": PALETTE[i % len(PALETTE)]},
        }
        for i, (name, d) in enumerate(df.sort_values(x).groupby(by, sort=False))
    ]
    layout = {
        "title": {"text": title},
        "xaxis": {"title": {"text": x}},
        "yaxis": {"title": {"text": y_title}},
        "height": 340,
        "margin": {"t": 40},
    }
    return go.Figure(data=traces, layout=layout)


def heatmap_figure(
    df: pd.DataFrame,
    x: str,
    y: str,
    value: str,
    title: str = "",
    colorscale: str = "Viridis",
    zmin: float | None = None,
    zmax: float | None = None,
    x_title: str | None = None,
    y_title: str | None = None,
) -> go.Figure:
    """A heatmap of ``value`` over the ``x`` × ``y`` grid of a tidy frame."""
    grid = df.pivot_table(index=y, columns=x, values=value, aggfunc="mean")
    trace = {
        "type": "heatmap",
        "z": grid.to_numpy(float),
        "x": [str(c) for c in grid.columns],
        "y": [str(i) for i in grid.index],
        "colorscale": colorscale,
        "zmin": zmin,
        "zmax": zmax,
        "colorbar": {"title": {"text": value}},
    }
    layout = {
        "title": {"text": title},
        "height": 360,
        "margin": {"t": 40, "b": 40},
        "xaxis": {"title": {"text": x_title or x}, "type": "category"},
        "yaxis": {"title": {"text": y_title or y}, "type": "category"},
    }
    return go.Figure(data=[trace], layout=layout)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def show(fig: go.Figure, frame: pd.DataFrame, key: str, caption: str = "") -> None:
    """Draw a figure with its caption and a button downloading the figure's data as CSV."""
    st.plotly_chart(fig, key=f"fig_{key}", width="stretch")
    if caption:
        st.caption(caption)
    csv_button(frame, key)


def csv_button(frame: pd.DataFrame, key: str, label: str = "Download data (CSV)") -> None:
    """A download button for ``frame`` (the CSV is only built when clicked)."""
    st.download_button(
        label,
        data=lambda: frame.to_csv(index=False),
        file_name=f"{_slug(key)}.csv",
        mime="text/csv",
        key=f"csv_{key}",
        on_click="ignore",
    )


def table(frame: pd.DataFrame, key: str, caption: str = "", **kwargs: Any) -> None:
    """A dataframe with its caption and CSV download."""
    st.dataframe(frame, key=f"df_{key}", hide_index=True, **kwargs)
    if caption:
        st.caption(caption)
    csv_button(frame, key)


def row_at(df: pd.DataFrame, label: Any) -> Any:
    """``df.loc[label]``: the row (a Series) at one index label, e.g. an ``idxmax()``.

    Typed ``Any``: pandas-stubs types a label lookup as frame-or-row and its cells as Series-or-scalar.
    """
    return df.loc[label]


def _step_text(step: Any) -> str:
    """A recorded failure's step, ``?`` when unknown."""
    return "?" if pd.isna(step) else str(int(step))


def metric_row(values: Sequence[tuple[str, Any, str | None]]) -> None:
    """A row of ``st.metric`` (label, value, help); floats shown with 4 significant digits."""
    cols = st.columns(len(values))
    for col, (label, value, help_text) in zip(cols, values):
        if isinstance(value, float):
            value = "–" if pd.isna(value) else f"{value:.4g}"
        col.metric(label, "–" if value is None else value, help=help_text)
