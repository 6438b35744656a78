"""``mlmscope bench train``: HF's standard route vs our loop, same shape and data, interleaved in one process.

HF route: ``Trainer`` + ``BertForMaskedLM`` + ``DataCollatorForLanguageModeling`` (15 %, 80/10/10), fp32 (its
default), default attention, dataset of packed sequences. Ours: ``mlmscope.checkpoints.train`` step (packed, no padding
mask, sparse prediction, the precision and attention ``mlmscope.checkpoints.hardware`` picks for this machine). Rounds
alternate HF/ours so machine noise hits both; the median round is reported.

Besides tokens/s the table gives each route's achieved GFLOP/s (model FLOPs: 6 per parameter-MAC per token for
forward + backward, attention score/mix products included, the MLM head counted where each route computes it) and the
fraction of this machine's measured matmul peak at the precision the route runs in, so the distance to the physical
limit is visible. The CPU capability (``mlmscope.checkpoints.hardware``) is printed with every number.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import hardware
from .config import make_config
from .corpus import load_corpus
from .data import Masker, StepBatches, pack
from .train import SparseMLM, _build_model, _build_tokenizer, _optimizer, _train_step, lr_factor, resolve_levers


def _hf_round(cfg, tok, data: torch.Tensor, steps: int, warmup: int) -> float:
    """Tokens/s of HF Trainer over ``steps`` timed steps (after ``warmup`` untimed ones)."""
    import datasets
    from transformers import (
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
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
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=cfg.train.batch_size,
            max_steps=steps + warmup,
            learning_rate=cfg.train.lr,
            warmup_steps=1,
            weight_decay=0.01,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        collator = DataCollatorForLanguageModeling(tok, mlm_probability=cfg.train.mask_rate)
        Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()]).train()
    timed = stamps[warmup - 1 :]
    return (len(timed) - 1) * cfg.train.batch_size * cfg.train.seq_len / (timed[-1] - timed[0])


def train_flops_per_token(cfg, vocab: int, head_fraction: float) -> float:
    """Forward + backward FLOPs per token (3 × forward, 2 FLOPs per multiply-add) of a BERT MLM step.

    Args:
        cfg: The run config (model shape, sequence length).
        vocab: Vocabulary size (the decoder's width).
        head_fraction: Share of positions where the MLM head runs: 1 for HF (logits everywhere), the mask rate for
            sparse prediction.
    """
    m, t = cfg.model, cfg.train.seq_len
    per_layer = 4 * m.d_model**2 + 2 * m.d_model * m.d_ffn + 2 * t * m.d_model  # projections, FFN, QKᵀ and AV
    head = m.d_model**2 + m.d_model * vocab  # transform + tied decoder
    return 3 * 2 * (m.n_layers * per_layer + head_fraction * head)


def _our_round(cfg, tok, data: torch.Tensor, steps: int, warmup: int, device: str) -> float:
    tc = cfg.train
    # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), which pyright misreads
    model = _build_model(cfg, len(tok), device).to(device)  # pyright: ignore[reportArgumentType]
    model.train()
    objective = SparseMLM(model)
    opt = _optimizer(model, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc))
    batches = StepBatches(
        data,
        Masker(tok.mask_token_id, len(tok), tuple(tok.all_special_ids), tc.mask_rate),
        tc.batch_size,
        1,
        tc.data_seed,
    )
    for s in range(warmup):
        _train_step(objective, opt, sched, batches, s, tc, device)
    t = time.perf_counter()
    for s in range(warmup, warmup + steps):
        _train_step(objective, opt, sched, batches, s, tc, device)
    return steps * tc.batch_size * tc.seq_len / (time.perf_counter() - t)


def bench_train(
    preset: str = "tiny", steps: int = 8, rounds: int = 2, warmup: int = 2, device: str | None = None
) -> dict[str, float]:
    """Print and return tokens/s of both routes, their ratio and the process's peak RSS."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config(preset)
    tc, levers = resolve_levers(cfg.train, device)
    cfg = dataclasses.replace(cfg, train=tc)
    console = Console()
    console.print(
        f"CPU capability {hardware.cpu_capability()}, native bf16: {hardware.cpu_native_bf16()}; ours: "
        f"{tc.precision} ({levers['precision']['reason']}), attention {tc.attn}"
    )
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
    res.update(_efficiency(cfg, len(tok), res, device))
    res["cpu_capability"] = hardware.cpu_capability()
    res["precision"] = tc.precision
    _print_table(console, cfg, preset, len(tok), res, device)
    return res


def _efficiency(cfg, vocab: int, res: dict[str, float], device: str) -> dict[str, float]:
    """Achieved GFLOP/s of both routes and their share of the measured matmul peak at their precision."""
    hf_flops = train_flops_per_token(cfg, vocab, 1.0)
    our_flops = train_flops_per_token(cfg, vocab, cfg.train.mask_rate)
    peaks = {"fp32": hardware.gemm_peak_gflops(torch.float32)} if device == "cpu" else {}
    if device == "cpu" and cfg.train.precision == "bf16":
        peaks["bf16"] = hardware.gemm_peak_gflops(torch.bfloat16)
    out = {
        "hf_gflops": res["hf_tokens_per_s"] * hf_flops / 1e9,
        "ours_gflops": res["ours_tokens_per_s"] * our_flops / 1e9,
        "hf_flops_per_token": hf_flops,
        "ours_flops_per_token": our_flops,
    }
    if peaks:
        out["peak_fp32_gflops"] = peaks["fp32"]
        out["peak_gflops"] = peaks.get(cfg.train.precision, peaks["fp32"])
        out["hf_peak_fraction"] = out["hf_gflops"] / peaks["fp32"]
        out["ours_peak_fraction"] = out["ours_gflops"] / out["peak_gflops"]
    return out


def _print_table(console: Console, cfg, preset: str, vocab: int, res: dict[str, float], device: str) -> None:
    m, tc = cfg.model, cfg.train
    table = Table(
        title=f"bench train: preset {preset} ({m.n_layers}L x {m.d_model}d, vocab {vocab}, seq "
        f"{tc.seq_len}, batch {tc.batch_size}; {torch.get_num_threads()} threads, {device}, CPU "
        f"capability {res['cpu_capability']})"
    )
    for col in ("route", "precision", "tok/s", "GFLOP/token", "GFLOP/s", "share of peak"):
        table.add_column(col)
    for route, name, prec in (("hf", "HF Trainer", "fp32"), ("ours", "mlmscope", tc.precision)):
        share = f"{res[f'{route}_peak_fraction']:.0%}" if f"{route}_peak_fraction" in res else "n/a"
        table.add_row(
            name,
            prec,
            f"{res[f'{route}_tokens_per_s']:,.0f}",
            f"{res[f'{route}_flops_per_token'] / 1e9:.4f}",
            f"{res[f'{route}_gflops']:.1f}",
            share,
        )
    console.print(table)
    peak = (
        (
            f"matmul peak (1024² GEMM, measured now): fp32 {res['peak_fp32_gflops']:.0f} GFLOP/s"
            + (f", bf16 {res['peak_gflops']:.0f}" if tc.precision == "bf16" else "")
        )
        if "peak_fp32_gflops" in res
        else ""
    )
    console.print(
        f"ratio mlmscope / HF: [bold]{res['ratio']:.2f}x[/] tokens/s; peak RSS {res['peak_rss_gb']:.2f} GB "
        f"(whole process). {peak}"
    )
