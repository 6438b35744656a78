"""``mlmscope bench train``: HF's standard route vs our loop, same shape and data, interleaved in one process.

HF route: ``Trainer`` + ``BertForMaskedLM`` + ``DataCollatorForLanguageModeling`` (15 %, 80/10/10), fp32, default
attention, dataset of packed sequences. Ours: ``checkpoints.train`` step (packed, no padding mask, sparse prediction,
SDPA, the preset's precision). Rounds alternate HF/ours so machine noise hits both; the median round is reported.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from checkpoints.config import make_config
from checkpoints.corpus import load_corpus
from checkpoints.data import Masker, StepBatches, pack
from checkpoints.train import SparseMLM, _build_model, _build_tokenizer, _optimizer, _train_step, lr_factor


def _hf_round(cfg, tok, data: torch.Tensor, steps: int, warmup: int) -> float:
    """Tokens/s of HF Trainer over ``steps`` timed steps (after ``warmup`` untimed ones)."""
    import datasets
    from transformers import (BertForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg.model.to_bert_config(vocab_size=len(tok)))
    n = (steps + warmup) * cfg.train.batch_size
    ds = datasets.Dataset.from_dict({"input_ids": data[:n].tolist()})
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.train.batch_size,
                                 max_steps=steps + warmup, learning_rate=cfg.train.lr, warmup_steps=1,
                                 weight_decay=0.01, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                                 disable_tqdm=True)
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=cfg.train.mask_rate)
        Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()]).train()
    timed = stamps[warmup - 1:]
    return (len(timed) - 1) * cfg.train.batch_size * cfg.train.seq_len / (timed[-1] - timed[0])


def _our_round(cfg, tok, data: torch.Tensor, steps: int, warmup: int, device: str) -> float:
    tc = cfg.train
    model = _build_model(cfg, len(tok), device).to(device)
    model.train()
    objective = SparseMLM(model)
    opt = _optimizer(model, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc))
    batches = StepBatches(data, Masker(tok.mask_token_id, len(tok), tuple(tok.all_special_ids), tc.mask_rate),
                          tc.batch_size, 1, tc.data_seed)
    for s in range(warmup):
        _train_step(objective, opt, sched, batches, s, tc, device)
    t = time.perf_counter()
    for s in range(warmup, warmup + steps):
        _train_step(objective, opt, sched, batches, s, tc, device)
    return steps * tc.batch_size * tc.seq_len / (time.perf_counter() - t)


def bench_train(preset: str = "tiny", steps: int = 8, rounds: int = 2, warmup: int = 2,
                device: str | None = None) -> dict[str, float]:
    """Print and return tokens/s of both routes, their ratio and the process's peak RSS."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config(preset)
    console = Console()
    corpus, fingerprint = load_corpus(cfg.data)
    texts = list(corpus["train"]["text"])
    with tempfile.TemporaryDirectory() as tmp:
        tok, _ = _build_tokenizer(Path(tmp), cfg, texts, fingerprint, resume=False)
    data = pack(tok, texts, cfg.train.seq_len)
    hf, ours = [], []
    for r in range(rounds):
        hf.append(_hf_round(cfg, tok, data, steps, warmup))
        ours.append(_our_round(cfg, tok, data, steps, warmup, device))
        console.print(f"round {r + 1}/{rounds}: HF Trainer {hf[-1]:,.0f} tok/s, mlmscope {ours[-1]:,.0f} tok/s")
    res = {"hf_tokens_per_s": statistics.median(hf), "ours_tokens_per_s": statistics.median(ours)}
    res["ratio"] = res["ours_tokens_per_s"] / res["hf_tokens_per_s"]
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    m = cfg.model
    table = Table(title=f"bench train: preset {preset} ({m.n_layers}L x {m.d_model}d, vocab {len(tok)}, seq "
                        f"{cfg.train.seq_len}, batch {cfg.train.batch_size}, {cfg.train.precision}, "
                        f"{torch.get_num_threads()} threads, {device})")
    for col in ("HF Trainer tok/s", "mlmscope tok/s", "ratio", "peak RSS (GB, whole process)"):
        table.add_column(col)
    table.add_row(f"{res['hf_tokens_per_s']:,.0f}", f"{res['ours_tokens_per_s']:,.0f}", f"{res['ratio']:.2f}x",
                  f"{res['peak_rss_gb']:.2f}")
    console.print(table)
    return res
