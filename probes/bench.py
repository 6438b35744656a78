"""Capture throughput and memory benchmark (``mlmscope probes bench``).

Two routes over the same padded batches, both saving the same names with padding zeroed:

* ``nnsight``: :func:`mlmscope.probes.capture.capture` (the production route);
* ``hf``: plain HF ``output_attentions``/``output_hidden_states`` plus forward hooks for sub-layer tensors
  (a reference to check that nnsight costs nothing).

Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the whole process (model + tokenizer + capture).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .align import EncodedProbes
from .batch import CaptureBatch
from .capture import MLM_HEAD_NAME, _batches, _check_names, _taps, _zero_padding_, capture, prepare
from .model import LoadedModel


@dataclass
class BenchResult:
    """One benchmark run."""

    route: str
    n_sentences: int
    n_tokens: int
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    start_rss_mb: float

    @property
    def sentences_per_s(self) -> float:
        return self.n_sentences / self.seconds

    def line(self) -> str:
        return (
            f"{self.route:8s} {self.n_sentences} sentences ({self.n_tokens} pieces) in {self.seconds:.2f} s: "
            f"{self.sentences_per_s:.1f} sentences/s, {self.n_tokens / self.seconds:.0f} pieces/s "
            f"(process CPU {self.cpu_seconds:.2f} s); "
            f"RSS before capture {self.start_rss_mb:.0f} MB, peak RSS {self.peak_rss_mb:.0f} MB"
        )


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports KB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024**2 if sys.platform == "darwin" else r / 1024


def synthetic_sentences(
    tokenizer: Any, n: int, seed: int = 0, min_words: int = 5, max_words: int = 40
) -> list[list[str]]:
    """``n`` word lists of uniform random length drawn from the tokenizer's whole-word alphabetic vocabulary.

    For benchmarks only (no parse needed); word-piece counts are realistic because the words are vocabulary words.
    """
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii())
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_words, max_words + 1, size=n)
    return [[vocab[j] for j in rng.integers(0, len(vocab), size=k)] for k in lengths]


def random_model_dir(preset: str, out: str | Path, seed: int = 0) -> Path:
    """Save a random-init ``BertForMaskedLM`` of a preset's shape with a WordPiece tokenizer for benchmarks.

    The tokenizer is trained on the default corpus's *training* split with the preset's vocab size (seconds), so
    the embedding size and piece counts match a real run of that preset.
    """
    from transformers import BertForMaskedLM

    from ..checkpoints.config import make_config
    from ..checkpoints.corpus import load_corpus
    from ..checkpoints.tokenizer import train_wordpiece

    cfg = make_config(preset)
    dd, _ = load_corpus(cfg.data)
    tok = train_wordpiece(dd["train"]["text"], vocab_size=cfg.data.vocab_size)
    torch.manual_seed(seed)
    model = BertForMaskedLM(cfg.model.to_bert_config(vocab_size=len(tok))).eval()
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def hf_capture(
    lm: LoadedModel, enc: EncodedProbes, names: Sequence[str], batch_size: int = 32
) -> Iterator[CaptureBatch]:
    """Reference route: HF outputs + ``register_forward_hook`` on the adapter's modules (clean variant only)."""
    taps = _taps(lm)
    store: dict[str, torch.Tensor] = {}
    handles = []
    hooked = [
        n
        for n in names
        if n != MLM_HEAD_NAME
        and "hook_pattern" not in n
        and n != "embed.hook_out"
        and not n.endswith("hook_resid_post")
        and not n.endswith("hook_resid_pre")
    ]
    for n in hooked:
        t = taps[n]

        def hook(mod, args, out, n=n, t=t):
            store[n] = args[0] if t.kind == "input" else (out if t.index is None else out[t.index])

        handles.append(t.module().register_forward_hook(hook))
    try:
        for idx in _batches(enc, batch_size, True):
            rows = [enc.input_ids[i] for i in idx]
            T = max(map(len, rows))
            ids = torch.full((len(rows), T), lm.tokenizer.pad_token_id)
            am = torch.zeros((len(rows), T), dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r)], am[b, : len(r)] = torch.tensor(r), 1
            with torch.no_grad():
                out = lm.arch.encoder_model(
                    ids.to(lm.device),
                    attention_mask=am.to(lm.device),
                    output_attentions=True,
                    output_hidden_states=True,
                )
            acts = dict(store)
            for n in names:
                if n == "embed.hook_out":
                    acts[n] = out.hidden_states[0]
                elif n.endswith("hook_resid_pre"):
                    acts[n] = out.hidden_states[int(n.split(".")[1])]
                elif n.endswith("hook_resid_post"):
                    acts[n] = out.hidden_states[int(n.split(".")[1]) + 1]
                elif n.endswith("hook_pattern"):
                    acts[n] = out.attentions[int(n.split(".")[1])]
            pad = (~am.bool().to(lm.device)).nonzero(as_tuple=True)
            acts = {n: _zero_padding_(n, acts[n].float(), pad).cpu() for n in names if n != MLM_HEAD_NAME}
            yield CaptureBatch(
                "clean",
                torch.tensor([enc.sentence_ids[i] for i in idx]),
                ids,
                am,
                ~am.bool(),
                [enc.word_ids[i] for i in idx],
                torch.full_like(ids, -100),
                torch.zeros((0, 2), dtype=torch.long),
                acts,
            )
    finally:
        for h in handles:
            h.remove()


def run_bench(
    lm: LoadedModel, sentences: Any, route: str = "nnsight", names: Sequence[str] | None = None, batch_size: int = 32
) -> BenchResult:
    """Time one full capture pass (clean variant), consuming and discarding each batch as an analysis would."""
    import psutil

    start_rss = psutil.Process().memory_info().rss / 1024**2
    enc = prepare(lm, sentences)
    names = _check_names(lm, names)
    names = [n for n in names if n != MLM_HEAD_NAME]
    it = (
        capture(lm, enc, names=names, batch_size=batch_size)
        if route == "nnsight"
        else hf_capture(lm, enc, names, batch_size)
    )
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for batch in it:
        n += int(batch.attention_mask.sum())
    return BenchResult(route, len(enc), n, time.perf_counter() - t0, time.process_time() - c0, peak_rss_mb(), start_rss)


__all__ = ["BenchResult", "hf_capture", "peak_rss_mb", "run_bench", "synthetic_sentences"]
