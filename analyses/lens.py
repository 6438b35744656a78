"""Logit lens for masked language models: every layer decoded through the FULL MLM head, at masked positions only.

Reference: nostalgebraist 2020 (logit lens); docs/notes/depth.md (masked positions, the full head, norms, metrics).

* The hidden state of every layer (embedding output, each block's ``resid_mid`` and ``resid_post``) is decoded with
  the model's own MLM head — BERT: transform dense → GELU → LayerNorm → tied decoder + bias — never with the bare
  decoder (``get_output_embeddings()``), which skips the transform and is wrong for BERT-style heads
  (docs/notes/depth.md, "Decoding through the full MLM head").
* Post-LN models (BERT, RoBERTa) are decoded as they are: every hidden state is already a LayerNorm output.
  Pre-LN models (adapter flag ``arch.pre_ln``) get the final norm applied to each layer's state with statistics
  **recomputed on that state** (TransformerLens#1076, fixed in TransformerLens PR #1180; docs/notes/depth.md, "Post-LN
  and pre-LN norms").
* Only positions whose input is [MASK] with a gold label are read (``CaptureBatch.masked_mask``, variant
  ``mask15``): at unmasked positions an MLM copies its input and early layers look trivially good (docs/notes/depth.md,
  "Lens positions: masked positions only").
* Metrics per layer (docs/notes/depth.md, "Lens metrics"), micro-averaged over masked positions: KL(final ‖ layer),
  top-1 agreement with the final prediction (= precision@1), precision@5/10, surprisal of the layer's top-1 under the
  final distribution, cross-entropy and accuracy against the gold token, the gold token's mean rank, and entropy.

The final distribution is the lens at the last block's output, which equals the model's own logits (parity test
``tests/test_lens.py``). The tuned lens (``analyses/tuned_lens.py``, registered as ``tuned_lens``) shares the decoding
and metric functions of this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..checkpoints.errors import MlmscopeError
from ..probes.batch import CaptureBatch
from ..probes.model import Arch
from .base import Accumulator, Analysis, AnalysisContext, SkipAnalysis, register

__all__ = [
    "DepthAnalysisError",
    "NonFiniteActivationError",
    "NoMaskedPositionsError",
    "LensSite",
    "LogitLens",
    "FinalRef",
    "LogitLensAccumulator",
    "METRICS",
    "final_reference",
    "checkpoint_label",
    "decode_hidden",
    "is_pre_ln",
    "lens_metric_sums",
    "lens_sites",
    "require_mlm_head",
    "site_metric_sums",
]

#: Capture name of the model's own MLM logits at the [MASK] positions (shared final distribution).
MLM_HEAD = "mlm_head.hook_out"

#: Per-layer lens metrics (docs/notes/depth.md, "Lens metrics"). ``top1_agree`` is precision@1 (Din et al.); ``p_at_k``
#: for the other k.
METRICS = ("kl", "top1_agree", "p_at_5", "p_at_10", "surprisal", "ce", "acc", "gold_rank", "entropy")


class DepthAnalysisError(MlmscopeError):
    """User-facing error of the depth analyses (redundancy, layer drop, lenses); the message says what to do."""


class NonFiniteActivationError(DepthAnalysisError):
    """A captured state (or the loss) of a checkpoint is NaN/inf — usually a diverged or corrupt checkpoint."""


class NoMaskedPositionsError(SkipAnalysis):
    """The probe set / variant had no [MASK] positions with a gold label, so there is nothing to decode."""


def checkpoint_label(ctx: AnalysisContext) -> str:
    """How error messages name the checkpoint: its folder (``ctx.checkpoint``, set by the runner) if known, else
    the training step, else ``"<unnamed checkpoint>"``."""
    if ctx.checkpoint:
        return ctx.checkpoint
    return f"step {ctx.step}" if ctx.step is not None else "<unnamed checkpoint>"


def check_finite(t: torch.Tensor, what: str, ctx_label: str) -> None:
    """Raise :class:`NonFiniteActivationError` naming the checkpoint if ``t`` holds a NaN or inf."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteActivationError(
            f"checkpoint {ctx_label}: {what} contains NaN/inf values — the checkpoint is probably corrupt or its "
            "training diverged; re-save it or exclude it from the analysis"
        )


def is_pre_ln(arch: Arch) -> bool:
    """Whether the model is pre-LN (a final norm after the last block); BERT and RoBERTa are post-LN."""
    return arch.pre_ln


def decode_hidden(arch: Arch, hidden: torch.Tensor) -> torch.Tensor:
    """Logit-lens decoding of any layer's hidden state through the model's full MLM head.

    Args:
        arch: Architecture adapter with ``apply_mlm_head`` (and ``final_norm()`` when ``pre_ln``).
        hidden: (..., D) hidden states of one layer (raw residual stream for pre-LN models).

    Returns:
        (..., V) logits. For a pre-LN model the final norm is applied first with statistics recomputed on
        ``hidden`` itself (a ``LayerNorm`` module normalises each vector by its own mean/variance).
    """
    norm = arch.final_norm()
    if norm is not None:
        hidden = norm(hidden)
    return arch.apply_mlm_head(hidden)


def require_mlm_head(ctx: AnalysisContext, analysis: str) -> Arch:
    """Raise :class:`SkipAnalysis` with a clear reason when the model has no trained MLM head; else return its arch."""
    if ctx.arch is None or not ctx.arch.has_mlm_head:
        raise SkipAnalysis(
            f"{analysis}: the model has no trained MLM head (a head-less encoder such as all-MiniLM-L6-v2); "
            "decoding hidden states through a random head would be meaningless"
        )
    return ctx.arch


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


@dataclass(frozen=True)
class FinalRef:
    """The final distribution at N masked positions, pre-computed once and compared against every lens site.

    Attributes:
        logits: (N, V) final logits (fp32).
        logp: (N, V) ``logits − logsumexp(logits)`` (the same op the sites use, so a site equal to the final layer
            gets a KL of exactly 0).
        p: (N, V) final probabilities.
        top: (N,) final top-1 token.
        topk: (N, kmax) final top-kmax tokens (kmax = largest precision@k cut-off).
        plogp: (N,) Σ_v p log p (minus the final entropy; the constant part of every site's KL).
    """

    logits: torch.Tensor
    logp: torch.Tensor
    p: torch.Tensor
    top: torch.Tensor
    topk: torch.Tensor
    plogp: torch.Tensor

    @classmethod
    def from_logits(cls, final_logits: torch.Tensor, kmax: int = 10) -> FinalRef:
        fin = final_logits.float()
        logp = torch.log_softmax(fin, -1)
        p = logp.exp()
        return cls(fin, logp, p, fin.argmax(-1), fin.topk(min(kmax, fin.shape[-1]), -1).indices, _rowdot(p, logp))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[n, v]·b[n, v] with torch's pairwise summation. (``einsum`` would avoid the temporary, but its fp32
    accumulation biased the entropy by ~1e-4 nats per position at V = 30,522 and a KL of 5e-5 by 1 %.)"""
    return (a * b).sum(-1)


#: Positions per block of the metric passes: a (64, V) block of fp32 logits and its temporaries stay in a core's
#: cache (2 MB at V = 8,192). Measured on the demo vocabulary (AVX-512, 2 threads): 128 positions in one block
#: 24.6 ms, in blocks of 64 13.0 ms, of 32 12.4 ms (median of 30). Each position's metrics are computed from its own
#: row only, so the blocking changes nothing but the order of the float64 sums over positions.
METRIC_BLOCK = 64


def _ref_rows(ref: FinalRef, rows: slice) -> FinalRef:
    return FinalRef(ref.logits[rows], ref.logp[rows], ref.p[rows], ref.top[rows], ref.topk[rows], ref.plogp[rows])


def site_metric_sums(
    logits: torch.Tensor, ref: FinalRef, gold: torch.Tensor, ks: tuple[int, ...] = (5, 10)
) -> dict[str, torch.Tensor]:
    """Sums over N positions of the lens metrics (docs/notes/depth.md, "Lens metrics") of one site's (N, V) logits
    against ``ref``.

    Eight passes over the (N, V) logits (log-softmax, argmax, gold comparison, exp, two products and their sums),
    done in blocks of :data:`METRIC_BLOCK` positions so that each block stays in cache.

    Returns:
        Metric name -> 0-d float64 sum; keys are ``kl, top1_agree, p_at_{k}…, surprisal, ce, acc, gold_rank,
        entropy``.
    """
    n = logits.shape[0]
    if n <= METRIC_BLOCK:
        return _block_metric_sums(logits, ref, gold, ks)
    out: dict[str, torch.Tensor] = {}
    for start in range(0, n, METRIC_BLOCK):
        rows = slice(start, start + METRIC_BLOCK)
        part = _block_metric_sums(logits[rows], _ref_rows(ref, rows), gold[rows], ks)
        out = part if not out else {k: out[k] + v for k, v in part.items()}
    return out


def _block_metric_sums(
    logits: torch.Tensor, ref: FinalRef, gold: torch.Tensor, ks: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """:func:`site_metric_sums` of one block of positions."""
    z = logits.float()
    logq = torch.log_softmax(z, -1)
    top = z.argmax(-1)
    g = gold.unsqueeze(-1)
    per_pos = {
        "kl": ref.plogp - _rowdot(ref.p, logq),
        "top1_agree": top == ref.top,
        **{f"p_at_{k}": (ref.topk[:, :k] == top.unsqueeze(-1)).any(-1) for k in ks},
        "surprisal": -ref.logp.gather(-1, top.unsqueeze(-1)).squeeze(-1),
        "ce": -logq.gather(-1, g).squeeze(-1),
        "acc": top == gold,
        "gold_rank": 1 + (z > z.gather(-1, g)).sum(-1, dtype=torch.int32),
        "entropy": -_rowdot(logq.exp(), logq),
    }
    return {k: v.double().sum() for k, v in per_pos.items()}


def lens_metric_sums(
    logits: torch.Tensor, final_logits: torch.Tensor | FinalRef, gold: torch.Tensor, ks: tuple[int, ...] = (5, 10)
) -> dict[str, torch.Tensor]:
    """Per-layer sums (over positions) of the lens metrics (docs/notes/depth.md, "Lens metrics").

    Args:
        logits: (S, N, V) or (N, V) lens logits of S layers at N masked positions.
        final_logits: (N, V) the model's final logits at the same positions, or their :class:`FinalRef`.
        gold: (N,) gold token ids.
        ks: Precision@k cut-offs besides k = 1 (``top1_agree``).

    Returns:
        Metric name -> (S,) float64 sums (divide by N for means); the keys are :data:`METRICS` for the default ks.
    """
    lg = logits.unsqueeze(0) if logits.ndim == 2 else logits
    ref = final_logits if isinstance(final_logits, FinalRef) else FinalRef.from_logits(final_logits, max(ks, default=1))
    sums = [site_metric_sums(z, ref, gold, ks) for z in lg]
    return {m: torch.stack([s[m] for s in sums]) for m in sums[0]}


class LensSums:
    """Running per-site metric sums and position count (shared by the logit and tuned lens)."""

    def __init__(self, n_sites: int) -> None:
        self.n = 0
        self.sums = {m: torch.zeros(n_sites, dtype=torch.float64) for m in METRICS}

    def add(self, sums: dict[str, torch.Tensor], n: int) -> None:
        for m in METRICS:
            v = sums[m]
            if self.sums[m].device != v.device:  # the sums live where the metrics are computed (moved once)
                self.sums[m] = self.sums[m].to(v.device)
            self.sums[m] += v
        self.n += n

    def mean(self, metric: str) -> torch.Tensor:
        """(S,) per-site mean of ``metric`` on the host."""
        return (self.sums[metric] / max(self.n, 1)).cpu()

    def frame(self, sites: list[LensSite], **const: Any) -> pd.DataFrame:
        """Tidy frame: one row per site with the mean of every metric, ``n_masked`` and the constant columns."""
        rows = pd.DataFrame(
            {
                "block": [s.block for s in sites],
                "site": [s.site for s in sites],
                "depth": [s.depth for s in sites],
                "name": [s.name for s in sites],
            }
        )
        for m in METRICS:
            rows[m] = self.mean(m).numpy()
        rows["n_masked"] = self.n
        for k, v in const.items():
            rows[k] = v
        return rows


def masked_states(batch: CaptureBatch, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, N, D) hidden states of ``names`` at the masked positions of ``batch`` and their (N,) gold ids."""
    dev = batch[names[0]].device
    mm = batch.masked_mask.to(dev)
    return torch.stack([batch[n][mm] for n in names]), batch.labels.to(dev)[mm]


def final_reference(batch: CaptureBatch, arch: Any, n_layers: int, device: str = "cpu") -> FinalRef:
    """The final distribution at the batch's masked positions, computed once per batch (:meth:`CaptureBatch.memo`)
    so that every analysis fed from the same capture that compares against it pays for it once (the logit lens;
    any analysis added later that reads the final [MASK] distribution should use this too).

    Uses the capture's own MLM logits (``mlm_head.hook_out``) when they were recorded at exactly the masked
    positions of a post-LN model, else decodes ``blocks.{L-1}.hook_resid_post`` with :func:`decode_hidden`.
    """

    def make() -> FinalRef:
        last = batch[f"blocks.{n_layers - 1}.hook_resid_post"]
        mm = batch.masked_mask.to(last.device)
        head = batch.acts.get(MLM_HEAD)
        hp = batch.head_positions
        if head is not None and not is_pre_ln(arch) and torch.equal(hp.to(mm.device), mm.nonzero()):
            logits = head.to(device)
        else:
            with torch.no_grad():
                logits = decode_hidden(arch, last[mm].to(device))
        return FinalRef.from_logits(logits)

    return batch.memo(f"lens.final_ref:{device}", make)


class LogitLensAccumulator(Accumulator):
    """Streams ``mask15`` batches: decodes every site at masked positions, accumulates metric sums.

    Memory: O(N_batch·V) per batch (sites are decoded one at a time); nothing is kept across batches but the sums.
    """

    def __init__(self, arch: Any, sites: list[LensSite], label: str, device: str = "cpu") -> None:
        self.arch = arch
        self.sites = sites
        self.label = label
        self.device = device
        self.stats = LensSums(len(sites))

    def update(self, batch: CaptureBatch) -> None:
        if not bool(batch.masked_mask.any()):
            return
        hs, gold = masked_states(batch, [s.name for s in self.sites])
        check_finite(hs[-1], f"the final layer ({self.sites[-1].name}) at masked positions", self.label)
        ref = final_reference(batch, self.arch, self.sites[-1].block + 1, self.device)
        gold = gold.to(self.device)
        with torch.no_grad():
            # one site at a time: peak memory O(N_batch·V), not O(S·N_batch·V) (S ≤ 2L + 1 sites, a short loop);
            # the last site is the final layer, whose logits the reference already holds
            sums = [site_metric_sums(decode_hidden(self.arch, h.to(self.device)), ref, gold) for h in hs[:-1]]
            sums.append(site_metric_sums(ref.logits, ref, gold))
        self.stats.add({m: torch.stack([s[m] for s in sums]) for m in METRICS}, int(gold.numel()))

    def result(self) -> dict[str, pd.DataFrame]:
        if self.stats.n == 0:
            raise NoMaskedPositionsError(
                "logit_lens: the probe set has no masked positions with a gold label (variant 'mask15'); "
                "rebuild the masked probe variant or use a probe set with non-special tokens"
            )
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
    class Params(Analysis.Params):
        """Options of the logit lens.

        Attributes:
            include_mid: Also decode each block's ``resid_mid`` (after the attention sub-layer).
        """

        include_mid: bool = True

    def names(self, ctx: AnalysisContext) -> list[str]:
        return [s.name for s in lens_sites(ctx.n_layers, self.params.include_mid)] + [MLM_HEAD]

    def accumulator(self, ctx: AnalysisContext) -> LogitLensAccumulator:
        require_mlm_head(ctx, self.name)
        return LogitLensAccumulator(
            ctx.arch, lens_sites(ctx.n_layers, self.params.include_mid), checkpoint_label(ctx), ctx.device
        )
