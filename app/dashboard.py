"""The mlmscope dashboard (Streamlit): explore one or more checkpoint trajectories with one global step slider.

Start it with ``mlmscope app [RUN ...]`` (see :mod:`mlmscope.app.serve`), or directly with
``streamlit run app/dashboard.py -- RUN [RUN ...]``. Runs come from the ``MLMSCOPE_RUNS`` environment variable
(``os.pathsep``-separated; set by ``mlmscope app``), else from the script arguments, else ``runs/demo``.

The sidebar holds the run picker (several runs or seed groups overlaid), the focus run (whose heatmaps, tables and
live model are shown), the page list and the step slider. Page and step are bound to the URL
(``?page=syntax&step=300``). Every page reads precomputed results through cached loaders; only the live panels load a
checkpoint.
"""

from __future__ import annotations

import os
import sys

import streamlit as st

# Run as a script (not a package module), so the imports are absolute; pyright cannot follow the installed package's
# folder mapping (setup.py), hence the ignores.
from mlmscope.app.views import PAGES, page_module  # pyright: ignore[reportMissingImports]
from mlmscope.app.views.common import View  # pyright: ignore[reportMissingImports]
from mlmscope.app.views.data import (  # pyright: ignore[reportMissingImports]
    Source,
    checkpoints,
    discover_sources,
    fingerprint,
    run_meta,
)

RUNS_ENV = "MLMSCOPE_RUNS"
DEFAULT_RUN = "runs/demo"


def configured_runs() -> list[str]:
    """Run folders to offer: ``$MLMSCOPE_RUNS``, else ``streamlit run app/dashboard.py -- RUN ...``, else the demo."""
    env = os.environ.get(RUNS_ENV)
    if env:
        return [p for p in env.split(os.pathsep) if p]
    if sys.argv and sys.argv[0].endswith("dashboard.py") and len(sys.argv) > 1:
        return sys.argv[1:]
    return [DEFAULT_RUN]


def pick_sources(sources: list[Source]) -> list[Source]:
    """The run picker: several runs / seed groups at once (all overlaid on every curve)."""
    by_label = {s.label: s for s in sources}
    if any(label not in by_label for label in st.session_state.get("runs", [])):
        del st.session_state["runs"]
    chosen = st.sidebar.multiselect(
        "Runs",
        list(by_label),
        default=[sources[0].label],
        key="runs",
        help="Overlaid on every curve; a seed group is drawn as mean ± 1 sd.",
    )
    return [by_label[label] for label in chosen]


def pick_focus(chosen: list[Source]) -> str:
    """The run whose step-specific views are shown (only asked when several runs are selected)."""
    members = list(dict.fromkeys(run for s in chosen for run in s.runs))
    if len(members) == 1:
        return members[0]
    if st.session_state.get("focus") not in members:
        st.session_state.pop("focus", None)
    focus = st.sidebar.selectbox(
        "Focus run",
        members,
        key="focus",
        help="Heatmaps, tables and the live model show this run at the selected step.",
    )
    assert focus is not None  # None only for an empty option list
    return focus


def pick_step(runs: list[str], fps: dict[str, tuple[int, ...]]) -> int | None:
    """The global step slider over the union of the selected runs' checkpoint steps (default: the last)."""
    steps = sorted({int(s) for run in runs for s in checkpoints(run, fps[run])["step"]})
    if not steps:
        return None
    if len(steps) == 1:  # a single model or a one-checkpoint run: nothing to slide over
        st.session_state.pop("step", None)
        st.sidebar.caption(f"Step {steps[0]} (single checkpoint)")
        return steps[0]
    if "step" in st.session_state and st.session_state["step"] not in steps:
        del st.session_state["step"]
    return st.sidebar.select_slider(
        "Step",
        options=steps,
        value=steps[-1],
        key="step",
        bind="query-params",
        help="Every page follows this step; it is marked on every curve.",
    )


def pick_page() -> str:
    """The page list; the page is kept in the URL as ``?page=<slug>`` (so a page can be linked and reloaded)."""
    if "page" not in st.session_state:
        wanted = st.query_params.get("page")
        st.session_state["page"] = wanted if wanted in PAGES else PAGES[0]
    page = st.sidebar.radio("Page", PAGES, format_func=lambda p: page_module(p).TITLE, key="page")
    assert page is not None  # None only for an empty option list
    st.query_params["page"] = page
    return page


def status_banner(view: View) -> None:
    """Say when the focus run is empty, still training, or stopped early."""
    meta = run_meta(view.focus, view.fp(view.focus))
    n = len(view.checkpoints())
    status = meta.get("status")
    if not n:
        st.warning(
            f"`{view.focus}` has no finished checkpoints yet"
            + (" (training is running; the first checkpoint appears once written)." if status == "training" else ".")
        )
    elif n == 1 and status != "training":
        single = meta.get("model_dir")
        st.info(
            ("Single model `" + str(single) + "`: " if single else "") + "a single checkpoint, so every curve "
            "over steps is one point; read the values from the tables and per-layer figures."
        )
    elif status == "training":
        last = int(view.checkpoints()["step"].max())
        total = meta.get("config", {}).get("train", {}).get("max_steps", "?")
        st.info(
            f"Training of `{view.focus}` is still running: {n} checkpoints so far (last step {last} of "
            f"{total}). The pages show finished checkpoints and results only; rerun (R) to pick up new ones."
        )
    elif status in ("failed", "interrupted"):
        st.warning(
            f"Training of `{view.focus}` {status} after {n} checkpoints"
            f"{': ' + str(meta['error']) if meta.get('error') else ''}."
        )


def main() -> None:
    """The script's body (Streamlit runs the whole file on every interaction)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this script is an entry point: process defaults are set here
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    st.set_page_config(page_title="mlmscope", layout="wide")
    sources, problems = discover_sources(configured_runs())
    for p in problems:
        st.sidebar.error(p)
    if not sources:
        st.error("No run folder to show: start the dashboard with `mlmscope app RUN` on an existing run folder.")
        return
    st.sidebar.title("mlmscope")
    chosen = pick_sources(sources)
    if not chosen:
        st.info("Pick at least one run in the sidebar.")
        return
    focus = pick_focus(chosen)
    runs = list(dict.fromkeys(run for s in chosen for run in s.runs))
    fps = {run: fingerprint(run) for run in runs}
    page = pick_page()
    log_x = st.sidebar.toggle("Log step axis", key="log_x", help="Plot steps on a log axis (at step + 1).")
    step = pick_step(runs, fps)
    view = View(sources=chosen, focus=focus, step=step, log_x=log_x, fps=fps)
    status_banner(view)
    page_module(page).render(view)


main()
