"""``mlmscope probes ...``: build probe sets and benchmark capture (mounted by app/cli.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import typer

from .boundary import UserError

app = typer.Typer(help="Probe sets (parsed held-out sentences) and activation capture.", no_args_is_help=True)


@app.command()
def build(
    out: Path = typer.Option(Path("probesets/default"), help="Output folder (probeset.conllu + probeset.json)."),
    n: int = typer.Option(1000, help="Number of sentences."),
    min_words: int = typer.Option(5, help="Shortest sentence in words."),
    max_words: int = typer.Option(40, help="Longest sentence in words."),
    seed: int = typer.Option(0, help="Seed of document order and the half split."),
    model: Path | None = typer.Option(
        None,
        help="Checkpoint folder: skip sentences that do not fit its tokenizer "
        "and position limit, and record the tokenizer hash.",
    ),
    corpus: str = typer.Option("wiki", help="Corpus (as for training); its validation split is parsed."),
    conllu: Path | None = typer.Option(
        None, help="Use this CoNLL-U file (e.g. a gold treebank) instead of parsing text."
    ),
) -> None:
    """Build a probe set from held-out validation text (spaCy silver parses) or import a CoNLL-U file."""
    from ..probes.probeset import BuildConfig, build_default, read_conllu

    tok, max_len = None, None
    if model is not None:
        from ..probes.model import load_model

        lm = load_model(model)
        tok, max_len = lm.tokenizer, lm.arch.max_length
    if conllu is not None:
        ps = read_conllu(conllu, seed=seed)
        if tok is not None:
            from ..probes.align import encode_words
            from ..probes.model import tokenizer_hash

            enc = encode_words(tok, ps.sentences, max_len)
            ps.meta.update(
                tokenizer_hash=tokenizer_hash(tok),
                max_length=max_len,
                skipped=enc.skipped,
                note="skipped sentences stay in the file; capture skips them again",
            )
    else:
        from ..checkpoints.config import DataConfig

        cfg = BuildConfig(n=n, min_words=min_words, max_words=max_words, seed=seed)
        ps = build_default(cfg, tokenizer=tok, max_length=max_len, data_cfg=DataConfig(corpus=corpus))
    path = ps.save(out)
    h = ps.header()
    typer.echo(
        f"probe set {h['content_hash']}: {h['n_sentences']} sentences, {h['n_words']} words, "
        f"halves {h['halves']}, skipped {ps.meta.get('skipped', {})} -> {path}"
    )
    if h["n_sentences"] < n and conllu is None:
        typer.secho(f"warning: only {h['n_sentences']} of {n} sentences found", fg=typer.colors.YELLOW, err=True)


@app.command()
def bench(
    model: Path | None = typer.Argument(
        None, help="Checkpoint folder (BertForMaskedLM / RobertaForMaskedLM / BertModel); or use --preset."
    ),
    preset: str | None = typer.Option(
        None, help="Benchmark a random-init model of this preset's shape (e.g. tiny) instead of a folder."
    ),
    n: int = typer.Option(1000, help="Sentences (synthetic unless --probes)."),
    probes: Path | None = typer.Option(None, help="Probe set folder or CoNLL-U file to use instead."),
    batch_size: int = typer.Option(32),
    names: Literal["all", "attn", "resid"] = typer.Option(
        "all", help="all | attn (patterns) | resid (embed + resid_post)."
    ),
    route: Literal["nnsight", "hf", "both"] = typer.Option(
        "nnsight", help="hf = output_attentions/hidden_states + hooks."
    ),
    threads: int = typer.Option(0, help="torch threads (0 = torch default)."),
    seed: int = typer.Option(0, help="Seed of the synthetic sentences."),
) -> None:
    """Print capture throughput (sentences/s) and the process's peak RSS."""
    import torch

    from ..probes.bench import run_bench, synthetic_sentences
    from ..probes.model import load_model
    from ..probes.probeset import load_probe_set

    if threads:
        torch.set_num_threads(threads)
    if (model is None) == (preset is None):
        raise UserError("give a model folder or --preset, not both")
    with tempfile.TemporaryDirectory(prefix="mlmscope-bench-") as tmp:
        if preset is not None:
            from ..probes.bench import random_model_dir

            model = random_model_dir(preset, tmp)
        assert model is not None  # exactly one of model and --preset (checked above)
        lm = load_model(model)
        sents = load_probe_set(probes).sentences[:n] if probes else synthetic_sentences(lm.tokenizer, n, seed)
        L = lm.n_layers
        sel = {
            "all": None,
            "attn": [f"blocks.{l}.attn.hook_pattern" for l in range(L)],
            "resid": ["embed.hook_out"] + [f"blocks.{l}.hook_resid_post" for l in range(L)],
        }[names]
        typer.echo(
            f"{preset or model}: {L} layers x {lm.n_heads} heads x {lm.d_model} d, "
            f"{torch.get_num_threads()} threads, batch {batch_size}, names={names}"
        )
        for r in ("nnsight", "hf") if route == "both" else (route,):
            typer.echo(run_bench(lm, sents, r, sel, batch_size).line())
