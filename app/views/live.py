"""Live: a sentence typed by the user through the focus run's checkpoint at the selected step.

The only page that needs the model on every interaction; the checkpoint is loaded once per step
(``st.cache_resource``), everything else on the dashboard reads stored results.
"""

from __future__ import annotations

import streamlit as st

from . import common, data, model
from .common import View
from .lens import TUNED, show_topk

TITLE = "Live sentence"
DEFAULT_TEXT = "The cat sat on the [MASK] near the fire ."


def render(view: View) -> None:
    st.header(TITLE)
    path = data.checkpoint_dir(view.focus, view.step, view.fp(view.focus)) if view.step is not None else None
    if path is None or view.step is None:
        st.info(f"`{view.focus}` has no finished checkpoint to run yet.")
        return
    text = st.text_input(
        "Sentence (words separated by spaces; [MASK] where the model should fill in)", DEFAULT_TEXT, key="live_text"
    )
    k = st.number_input("k", 1, 20, 5, key="live_k")
    try:
        lm = model.load_checkpoint(path, model.weights_mtime(path))
    except (OSError, ValueError) as e:
        st.error(f"Cannot load {path}: {e}")
        return
    words = text.replace(lm.tokenizer.mask_token, f" {lm.tokenizer.mask_token} ").split()
    st.caption(f"Checkpoint `{path}` (step {view.step}).")
    try:
        translators = model.tuned_translators(data.result_dir(view.focus, TUNED, view.step, view.fp(view.focus)))
        top = model.lens_topk(lm, words, int(k), translators)
    except model.LiveInputError as e:
        st.warning(str(e))
        return
    final = top[(top["lens"] == "logit") & (top["depth"] == top["depth"].max()) & (top["rank"] == 1)]
    common.metric_row(
        [("checkpoint step", view.step, "The focus run's checkpoint at the selected step.")]
        + [
            (
                f"[MASK] {int(r.mask) + 1}: top-1",
                f"{r.token} ({r.prob:.3f})",
                "The model's own prediction (last layer through the MLM head).",
            )
            for r in final.itertuples()
        ][:3]
    )
    show_topk(top, "live_topk", "Per layer, logit lens and (if stored for this step) tuned lens")
    _attention(view, lm, words)


def _attention(view: View, lm: object, words: list[str]) -> None:
    from .syntax import attention_figure

    st.subheader("Attention of the typed sentence")
    try:
        maps = model.attention_maps(lm, words)
    except model.LiveInputError as e:
        st.warning(str(e))
        return
    c1, c2 = st.columns(2)
    layer = int(c1.number_input("layer", 0, maps.shape[0] - 1, 0, key="live_layer"))  # int bounds: already an int
    head = int(c2.number_input("head", 0, maps.shape[1] - 1, 0, key="live_head"))
    fig, frame = attention_figure(maps[layer, head], words, [0] * len(words), ["_"] * len(words))
    fig.update_layout(title=f"Word-level attention, layer {layer} head {head}, step {view.step}")
    common.show(
        fig,
        frame.drop(columns="gold_arc"),
        "live_attention",
        "Rows attend to columns (word-level merge as in the SAS analysis); no gold parse for typed text.",
    )
