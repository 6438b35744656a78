"""Logit lens for masked language models: every layer decoded through the FULL MLM head, at masked positions only.

Reference: /work/shared/reference/lens.md (§1 masked positions, §2 full head, §3 norms, §4 metrics).

* The hidden state of every layer (embedding output, each block's ``resid_mid`` and ``resid_post``) is decoded with
  the model's own MLM head — BERT: transform dense → GELU → LayerNorm → tied decoder + bias — never with the bare
  decoder (``get_output_embeddings()``), which skips the transform and is wrong for BERT-style heads (lens.md §2).
* Post-LN models (BERT, RoBERTa) are decoded as they are: every hidden state is already a LayerNorm output.
  Pre-LN models (adapter flag ``arch.pre_ln``) get the final norm applied to each layer's state with statistics
  **recomputed on that state** (TransformerLens issue #1076 / PR #1180; lens.md §3).
* Only positions whose input is [MASK] with a gold label are read (``CaptureBatch.masked_mask``, variant
  ``mask15``): at unmasked positions an MLM copies its input and early layers look trivially good (lens.md §1).
* Metrics per layer (lens.md §4), micro-averaged over masked positions: KL(final ‖ layer), top-1 agreement with the
  final prediction (= precision@1), precision@5/10, surprisal of the layer's top-1 under the final distribution,
  cross-entropy and accuracy against the gold token, the gold token's mean rank, and entropy.

The final distribution is the lens at the last block's output, which equals the model's own logits (parity test
``tests/test_lens.py``). The tuned lens (``analyses/tuned_lens.py``, registered as ``tuned_lens``) shares the decoding
and metric functions of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import torch

from analyses.base import Analysis, AnalysisContext, SkipAnalysis, register
from probes.batch import CaptureBatch

__all__ = [
    "DepthAnalysisError",
    "NonFiniteActivationError",
    "NoMaskedPositionsError",
    "LensSite",
    "LogitLens",
    "LogitLensAccumulator",
    "METRICS",
    "checkpoint_label",
    "decode_hidden",
    "is_pre_ln",
    "lens_metric_sums",
    "lens_sites",
    "require_mlm_head",
]

#: Per-layer lens metrics (lens.md §4). ``top1_agree`` is precision@1 (Din et al.); ``p_at_k`` for the other k.
METRICS = ("kl", "top1_agree", "p_at_5", "p_at_10", "surprisal", "ce", "acc", "gold_rank", "entropy")


class DepthAnalysisError(Exception):
    """User-facing error of the depth analyses (redundancy, layer drop, lenses); the message says what to do."""


class NonFiniteActivationError(DepthAnalysisError):
    """A captured state (or the loss) of a checkpoint is NaN/inf — usually a diverged or corrupt checkpoint."""


class NoMaskedPositionsError(SkipAnalysis):
    """The probe set / variant had no [MASK] positions with a gold label, so there is nothing to decode."""


def checkpoint_label(ctx: AnalysisContext) -> str:
    """How error messages name the checkpoint: its folder (``ctx.extra["ckpt_dir"]``, set by the runner, or
    ``"checkpoint"``) if known, else the training step, else ``"<unnamed checkpoint>"``."""
    for key in ("ckpt_dir", "checkpoint"):
        if ctx.extra.get(key):
            return str(ctx.extra[key])
    return f"step {ctx.step}" if ctx.step is not None else "<unnamed checkpoint>"


def check_finite(t: torch.Tensor, what: str, ctx_label: str) -> None:
    """Raise :class:`NonFiniteActivationError` naming the checkpoint if ``t`` holds a NaN or inf."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteActivationError(
            f"checkpoint {ctx_label}: {what} contains NaN/inf values — the checkpoint is probably corrupt or its "
            "training diverged; re-save it or exclude it from the analysis")


def is_pre_ln(arch: Any) -> bool:
    """Whether the architecture adapter declares a pre-LN model (final norm after the last block).

    The adapter (``probes.model.ArchAdapter``) is post-LN BERT/RoBERTa unless it sets ``pre_ln = True`` and
    provides ``final_norm()``.
    """
    return bool(getattr(arch, "pre_ln", False))


def decode_hidden(arch: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logit-lens decoding of any layer's hidden state through the model's full MLM head.

    Args:
        arch: Architecture adapter with ``apply_mlm_head`` (and ``final_norm()`` when ``pre_ln``).
        hidden: (..., D) hidden states of one layer (raw residual stream for pre-LN models).

    Returns:
        (..., V) logits. For a pre-LN model the final norm is applied first with statistics recomputed on
        ``hidden`` itself (a ``LayerNorm`` module normalises each vector by its own mean/variance).
    """
    if is_pre_ln(arch):
        hidden = arch.final_norm()(hidden)
    return arch.apply_mlm_head(hidden)


def require_mlm_head(ctx: AnalysisContext, analysis: str) -> None:
    """Raise :class:`SkipAnalysis` with a clear reason when the model has no trained MLM head."""
    if not getattr(ctx.arch, "has_mlm_head", False):
        raise SkipAnalysis(
            f"{analysis}: the model has no trained MLM head (a head-less encoder such as all-MiniLM-L6-v2); "
            "decoding hidden states through a random head would be meaningless")


@dataclass(frozen=True)
class LensSite:
    """One decoded hidden state.

    Attributes:
        name: Activation name in the capture (``embed.hook_out``, ``blocks.{l}.hook_resid_mid`` / ``_post``).
        block: 0-based block index (-1 for the embedding output).
        site: ``"embed"``, ``"resid_mid"`` (after attention) or ``"resid_post"`` (block output).
        depth: Plotting coordinate: 0 = embeddings, l + 0.5 = inside block l, l + 1 = after block l.
    """

    name: str
    block: int
    site: str
    depth: float


def lens_sites(n_layers: int, include_mid: bool = True) -> list[LensSite]:
    """Hidden states a lens decodes, in depth order; the last one is the final layer."""
    sites = [LensSite("embed.hook_out", -1, "embed", 0.0)]
    for l in range(n_layers):
        if include_mid:
            sites.append(LensSite(f"blocks.{l}.hook_resid_mid", l, "resid_mid", l + 0.5))
        sites.append(LensSite(f"blocks.{l}.hook_resid_post", l, "resid_post", l + 1.0))
    return sites


def lens_metric_sums(logits: torch.Tensor, final_logits: torch.Tensor, gold: torch.Tensor,
                     ks: tuple[int, ...] = (5, 10)) -> dict[str, torch.Tensor]:
    """Per-layer sums (over positions) of the lens metrics of lens.md §4, vectorised over layers and positions.

    Args:
        logits: (S, N, V) or (N, V) lens logits of S layers at N masked positions.
        final_logits: (N, V) the model's final logits at the same positions.
        gold: (N,) gold token ids.
        ks: Precision@k cut-offs besides k = 1 (``top1_agree``).

    Returns:
        Metric name -> (S,) float64 sums (divide by N for means); the keys are :data:`METRICS` for the default ks.
    """
    squeeze = logits.ndim == 2
    lg = (logits.unsqueeze(0) if squeeze else logits).float()
    fin = final_logits.float()
    logp_fin = torch.log_softmax(fin, -1)
    logp = torch.log_softmax(lg, -1)                                   # (S, N, V)
    top = lg.argmax(-1)                                                # (S, N)
    top_fin = fin.argmax(-1)                                           # (N,)
    gold_logit = lg.gather(-1, gold.expand(lg.shape[0], -1).unsqueeze(-1))   # (S, N, 1)
    fin_topk = fin.topk(max(ks), -1).indices if ks else None           # (N, kmax)
    per_pos = {
        "kl": (logp_fin.exp() * (logp_fin - logp)).sum(-1),
        "top1_agree": (top == top_fin).double(),
        **{f"p_at_{k}": (fin_topk[:, :k].unsqueeze(0) == top.unsqueeze(-1)).any(-1).double() for k in ks},
        "surprisal": -logp_fin.expand_as(logp).gather(-1, top.unsqueeze(-1)).squeeze(-1),
        "ce": -logp.gather(-1, gold.expand(lg.shape[0], -1).unsqueeze(-1)).squeeze(-1),
        "acc": (top == gold).double(),
        "gold_rank": 1.0 + (lg > gold_logit).sum(-1).double(),
        "entropy": -(logp.exp() * logp).sum(-1),
    }
    return {k: v.double().sum(-1) for k, v in per_pos.items()}


class LensSums:
    """Running per-site metric sums and position count (shared by the logit and tuned lens)."""

    def __init__(self, n_sites: int) -> None:
        self.n = 0
        self.sums = {m: torch.zeros(n_sites, dtype=torch.float64) for m in METRICS}

    def add(self, sums: dict[str, torch.Tensor], n: int) -> None:
        for m in METRICS:
            self.sums[m] += sums[m].cpu()
        self.n += n

    def frame(self, sites: list[LensSite], **const: Any) -> pd.DataFrame:
        """Tidy frame: one row per site with the mean of every metric, ``n_masked`` and the constant columns."""
        rows = pd.DataFrame({"block": [s.block for s in sites], "site": [s.site for s in sites],
                             "depth": [s.depth for s in sites], "name": [s.name for s in sites]})
        for m in METRICS:
            rows[m] = (self.sums[m] / max(self.n, 1)).numpy()
        rows["n_masked"] = self.n
        for k, v in const.items():
            rows[k] = v
        return rows


def masked_states(batch: CaptureBatch, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, N, D) hidden states of ``names`` at the masked positions of ``batch`` and their (N,) gold ids."""
    mm = batch.masked_mask
    return torch.stack([batch[n][mm] for n in names]), batch.labels[mm]


class LogitLensAccumulator:
    """Streams ``mask15`` batches: decodes every site at masked positions, accumulates metric sums.

    Memory: O(N_batch·V) per batch (sites are decoded one at a time); nothing is kept across batches but the sums.
    """

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], sites: list[LensSite], label: str,
                 device: str = "cpu") -> None:
        self.decode = decode
        self.sites = sites
        self.label = label
        self.device = device
        self.stats = LensSums(len(sites))

    def update(self, batch: CaptureBatch) -> None:
        if not bool(batch.masked_mask.any()):
            return
        hs, gold = masked_states(batch, [s.name for s in self.sites])
        check_finite(hs[-1], f"the final layer ({self.sites[-1].name}) at masked positions", self.label)
        hs, gold = hs.to(self.device), gold.to(self.device)
        with torch.no_grad():
            final = self.decode(hs[-1])
            # one site at a time: peak memory O(N_batch·V), not O(S·N_batch·V) (S ≤ 2L + 1 sites, a short loop)
            sums = [lens_metric_sums(self.decode(h), final, gold) for h in hs]
        self.stats.add({m: torch.cat([s[m] for s in sums]) for m in METRICS}, int(gold.numel()))

    def result(self) -> dict[str, pd.DataFrame]:
        if self.stats.n == 0:
            raise NoMaskedPositionsError(
                "logit_lens: the probe set has no masked positions with a gold label (variant 'mask15'); "
                "rebuild the masked probe variant or use a probe set with non-special tokens")
        return {"per_layer": self.stats.frame(self.sites, lens="logit")}


@register
class LogitLens(Analysis):
    """Logit lens through the full MLM head at masked positions (post-LN as is, pre-LN with per-layer final norm)."""

    name = "logit_lens"
    version = "1"
    description = "Logit lens through the full MLM head at [MASK] positions: KL to final, top-1 agreement, gold rank"
    variants = ("mask15",)
    needs_mlm_head = True

    @dataclass
    class Params:
        """Options of the logit lens.

        Attributes:
            include_mid: Also decode each block's ``resid_mid`` (after the attention sub-layer).
        """

        include_mid: bool = True

    def names(self, ctx: AnalysisContext) -> list[str]:
        return [s.name for s in lens_sites(ctx.n_layers, self.params.include_mid)]

    def accumulator(self, ctx: AnalysisContext) -> LogitLensAccumulator:
        require_mlm_head(ctx, self.name)
        arch = ctx.arch
        return LogitLensAccumulator(lambda h: decode_hidden(arch, h), lens_sites(ctx.n_layers, self.params.include_mid),
                                    checkpoint_label(ctx), ctx.device)


# The tuned lens is registered from its own module; importing it here lets ``analyses.base.load_all`` find it.
import analyses.tuned_lens  # noqa: E402,F401
