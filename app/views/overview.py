"""Overview: training and validation curves, the checkpoint table (hash, duplicates, verification), run config."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from . import common, data
from .common import View

TITLE = "Overview"


def render(view: View) -> None:
    st.header("Overview")
    ck = view.checkpoints()
    if not len(ck):
        st.info(
            f"`{view.focus}` has no finished checkpoints yet. Train it with `mlmscope train {view.focus}` (or "
            "wait: the first checkpoint appears once it is completely written and hashed)."
        )
        return
    rows, _used = view.at_step(ck)
    r = rows.iloc[0]
    common.metric_row(
        [
            ("step", int(r["step"]), "Optimiser steps taken (0 = initialisation)."),
            ("validation loss", r["val_loss"], "MLM loss on the held-out split (nats per masked token)."),
            ("validation accuracy", r["val_acc"], "Top-1 accuracy at masked positions of the validation split."),
            (
                "tokens seen",
                f"{int(r['tokens_seen']):,}" if pd.notna(r["tokens_seen"]) else None,
                "Training tokens consumed (non-padding, all ranks).",
            ),
        ]
    )
    _curves(view)
    _checkpoint_table(view, ck)
    _config(view)


def _curves(view: View) -> None:
    col_loss, col_acc = st.columns(2)
    with col_loss:
        parts = [
            view.curve(None, "", "val_loss").assign(curve="validation"),
            view.curve(None, "", "train_loss").assign(curve="train (EMA)"),
        ]
        parts = [p for p in parts if len(p)]
        if not parts:  # a single model folder (or a suite without a manifest) has no training record
            st.caption("No training or validation loss recorded for this run (e.g. a single model folder).")
            return
        curve = pd.concat(parts, ignore_index=True)
        fig = common.line_figure(
            curve, view, "MLM loss (nats)", series=("source", "curve"), dash_by="curve", title="Loss over training"
        )
        common.show(
            fig,
            curve,
            "overview_loss",
            "Validation MLM loss and the smoothed training loss at each checkpoint (from manifest.json, "
            "written by the trainer). Seed groups: mean ± 1 sd over seeds.",
        )
    with col_acc:
        curve = view.curve(None, "", "val_acc")
        fig = common.line_figure(curve, view, "top-1 accuracy", title="Validation accuracy at [MASK]")
        common.show(
            fig,
            curve,
            "overview_accuracy",
            "Top-1 accuracy of the MLM head at the masked positions of the validation split (manifest.json).",
        )
    log = data.train_log(view.focus, view.fp(view.focus))
    if len(log) and "loss" in log:
        with st.expander("Per-step training loss (train_log.jsonl)"):
            every = max(1, len(log) // 2000)
            thin = log.iloc[::every]
            curve = thin.assign(source=view.focus, mean=thin["loss"])
            fig = common.line_figure(curve, view, "training MLM loss", title=f"Training loss of {view.focus}")
            common.show(
                fig,
                thin,
                "overview_train_log",
                f"Raw per-step training loss (every {every}th step shown; the CSV has the shown rows).",
            )


def _checkpoint_table(view: View, ck: pd.DataFrame) -> None:
    st.subheader("Checkpoints")
    ver = data.verification(view.focus, view.fp(view.focus))
    tab = ck[["step", "path", "tokens_seen", "val_loss", "val_acc", "sha256", "duplicate_of"]].copy()
    tab["hash"] = tab.pop("sha256").fillna("").str[:12]
    tab["duplicate"] = tab["duplicate_of"].notna()
    zoomed = {s: f"zoom {seg['id']} (every {seg['every']})" for seg in view.zoom_segments() for s in seg["steps"]}
    tab["segment"] = [zoomed.get(int(s), "training") for s in tab["step"].tolist()]
    tab = tab.merge(ver[["step", "status", "detail"]].rename(columns={"status": "verification"}), on="step", how="left")
    fails = view.failures()
    if len(fails):
        per = fails.groupby("checkpoint")["analysis"].apply(lambda s: ", ".join(sorted(s))).rename("failed analyses")
        tab = tab.merge(per, left_on="path", right_index=True, how="left")
    bad = tab[tab["verification"].fillna("ok") != "ok"]
    if len(bad):
        st.warning(
            f"{len(bad)} checkpoint(s) failed verification (`mlmscope verify {view.focus}`): "
            + "; ".join(
                f"step {int(s)}: {v} {d}" for s, v, d in bad[["step", "verification", "detail"]].itertuples(index=False)
            )
        )
    if len(fails):
        st.warning(
            f"{len(fails)} (checkpoint, analysis) pair(s) failed in the analysis run; see the "
            "'failed analyses' column (`mlmscope analyses failures` has the tracebacks)."
        )
    tab.insert(0, "selected", tab["step"] == view.step)
    common.table(
        tab,
        "overview_checkpoints",
        "Finished checkpoints of the focus run (manifest.json); hash = sha256 of the weights; "
        "verification re-hashes every weights file (mlmscope.checkpoints.verify); `selected` marks the global "
        "step; `segment`: written by training, or by a zoom (`mlmscope zoom`: replayed and verified hash-equal "
        "at the run's own checkpoints).",
    )


def _config(view: View) -> None:
    meta = data.run_meta(view.focus, view.fp(view.focus))
    with st.expander("Run config (manifest.json)", expanded=False):
        if not meta:
            st.info("This folder has no manifest.json (a folder of checkpoint folders), so there is no run config.")
        else:
            st.json(meta, expanded=1)
