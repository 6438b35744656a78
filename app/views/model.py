"""The dashboard's live panels: a checkpoint loaded once (``st.cache_resource``) and run on one sentence.

Everything goes through the project's own contracts: ``mlmscope.probes.model.load_model`` (architecture adapter),
``mlmscope.probes.capture.capture`` (activation names), ``mlmscope.analyses.sas.word_attention`` (Clark et al.'s
word-level merge) and ``mlmscope.analyses.lens.decode_hidden`` (the full MLM head; docs/notes/depth.md, "Decoding
through the full MLM head"), so the live views show exactly what the analyses measure. The pure functions take a
``LoadedModel`` and can be used from a notebook too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
import torch

from ...analyses.lens import decode_hidden, lens_sites
from ...analyses.sas import word_attention, word_index_tensor
from ...checkpoints.errors import MlmscopeError


class LiveInputError(MlmscopeError, ValueError):
    """A sentence the live panel cannot run (empty, too long, no [MASK]); the message is shown to the user."""


@st.cache_resource(max_entries=4, show_spinner="Loading the checkpoint…")
def load_checkpoint(path: str, weights_mtime: int) -> Any:
    """``mlmscope.probes.model.load_model`` once per checkpoint folder (and weights version), on CUDA when available."""
    from transformers.utils import logging as hf_logging

    from ...analyses.runner import resolve_device
    from ...probes.model import load_model

    hf_logging.disable_progress_bar()
    return load_model(path, device=resolve_device("auto"))


def weights_mtime(path: str) -> int:
    """Cache key part: the weights file's modification time (a re-saved checkpoint is reloaded)."""
    from ...checkpoints.manifest import WEIGHTS

    try:
        return (Path(path) / WEIGHTS).stat().st_mtime_ns
    except OSError:
        return 0


def _one(lm: Any, words: Sequence[str], names: list[str]) -> Any:
    """Capture ``names`` for one sentence (clean variant, no MLM head)."""
    from ...probes.capture import capture

    if not words:
        raise LiveInputError("the sentence is empty")
    try:
        return next(capture(lm, [list(words)], variants=("clean",), names=names, batch_size=1, head_at="none"))
    except StopIteration:
        raise LiveInputError(
            f"the sentence does not fit the model ({len(words)} words; at most "
            f"{lm.arch.max_length} pieces including [CLS]/[SEP]) or a word has no piece"
        ) from None


def attention_maps(lm: Any, words: Sequence[str]) -> np.ndarray:
    """Word-level attention (Clark et al. 2019 merge) of every layer and head: (L, H, W, W), rows = from-word."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(lm.n_layers)]
    batch = _one(lm, words, names)
    t = batch.input_ids.shape[1]
    widx = word_index_tensor(batch.word_ids, t)
    maps = [word_attention(batch[n], widx, len(words))[0] for n in names]
    return torch.stack(maps).numpy()


def mask_words(words: Sequence[str], index: int, mask_token: str) -> list[str]:
    """``words`` with word ``index`` replaced by the mask token."""
    if not 0 <= index < len(words):
        raise LiveInputError(f"word {index} is outside the sentence (0..{len(words) - 1})")
    return [mask_token if i == index else w for i, w in enumerate(words)]


def lens_topk(lm: Any, words: Sequence[str], k: int = 5, translators: Any = None) -> pd.DataFrame:
    """Top-k predictions of every layer (logit lens, and tuned lens if ``translators`` are given) at each [MASK].

    Args:
        lm: A loaded checkpoint with an MLM head.
        words: The sentence, with ``lm.tokenizer.mask_token`` as some of its words.
        k: Predictions per layer.
        translators: ``mlmscope.analyses.tuned_lens.AffineTranslators`` of this checkpoint (translator i for lens site i
            of the tuned lens: embedding output, then each block output but the last).

    Returns:
        mask (position among the [MASK]s), lens, site, depth, rank, token, prob.
    """
    if not lm.has_mlm_head:
        raise LiveInputError(f"{lm.path} has no MLM head, so there are no predictions to show")
    tok = lm.tokenizer
    sites = lens_sites(lm.n_layers, include_mid=True)
    batch = _one(lm, words, [s.name for s in sites])
    pos = (batch.input_ids[0] == tok.mask_token_id).nonzero().flatten()
    if not len(pos):
        raise LiveInputError(
            f"no {tok.mask_token} in the sentence: put {tok.mask_token} where the model should fill in a word"
        )
    frames = []
    with torch.no_grad():
        for lens, chosen in [("logit", sites), ("tuned", _tuned_sites(sites) if translators is not None else [])]:
            for i, site in enumerate(chosen):
                h = batch[site.name][0, pos].to(lm.device)
                if lens == "tuned" and translators is not None and i < translators.n:
                    h = translators.translate(i, h.to(translators.weight.device)).to(lm.device)
                frames.append(_topk_frame(decode_hidden(lm.arch, h), tok, k, lens, site))
    return pd.concat(frames, ignore_index=True)


def _tuned_sites(sites: list[Any]) -> list[Any]:
    """The tuned lens' sites: the embedding output and every block output (no ``resid_mid``)."""
    return [s for s in sites if s.site != "resid_mid"]


def _topk_frame(logits: torch.Tensor, tok: Any, k: int, lens: str, site: Any) -> pd.DataFrame:
    probs = torch.softmax(logits.float(), -1)
    p, ids = probs.topk(k, -1)
    n = p.shape[0]
    return pd.DataFrame(
        {
            "mask": np.repeat(np.arange(n), k),
            "lens": lens,
            "site": site.name,
            "depth": site.depth,
            "rank": np.tile(np.arange(1, k + 1), n),
            "token": tok.convert_ids_to_tokens(ids.flatten().tolist()),
            "prob": p.flatten().cpu().numpy(),
        }
    )


def tuned_translators(result_dir: str | None) -> Any:
    """The tuned-lens translators stored with a checkpoint's ``tuned_lens`` result, or None."""
    from ...analyses.tuned_lens import TRANSLATORS_FILE, AffineTranslators, TunedLensError, load_translators

    if result_dir is None or not (Path(result_dir) / TRANSLATORS_FILE).exists():
        return None
    try:
        return AffineTranslators.from_state(load_translators(Path(result_dir) / TRANSLATORS_FILE))
    except (TunedLensError, KeyError, RuntimeError):
        return None
