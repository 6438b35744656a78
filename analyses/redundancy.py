"""Layer redundancy: 1 − cos per block and sub-layer, linear CKA between layers, and layer-drop Δloss.

Reference: docs/notes/depth.md ("Method"). Two registered analyses:

``redundancy`` (variant ``clean``; runs on head-less models too)
    * 1 − cos(in, out) per token, averaged over real non-special tokens (``CaptureBatch.token_mask``; [CLS]/[SEP]
      and padding excluded), for each block and sub-layer — He et al. (arXiv 2406.15786) adapted to post-LN BERT
      (docs/notes/depth.md, "Redundancy on post-LN models"). Tensors (capture names, post-LN):

      ======  =====================================================  ==========================================
      unit    in                                                     out
      ======  =====================================================  ==========================================
      block   ``blocks.{l}.hook_resid_pre`` (= embed / previous out)  ``blocks.{l}.hook_resid_post`` = LN2(...)
      attn    ``blocks.{l}.hook_resid_pre``                           ``blocks.{l}.hook_resid_mid`` = LN1(...)
      ffn     ``blocks.{l}.hook_resid_mid``                           ``blocks.{l}.hook_resid_post``
      ======  =====================================================  ==========================================

      For a pre-LN model the same names are the raw residual stream (resid_mid = resid_pre + attn_out), which is
      He et al.'s X vs X + f(LN(X)) exactly.
    * A pooled centred cosine tr Cov(x, y) / √(tr Cov(x) · tr Cov(y)) (means over the probe set's tokens) as the
      control for the shared LayerNorm β / outlier dims that push raw cosines towards 1. It is the streamable form
      (per-token centred cosines would need the mean before the first batch).
    * Linear CKA (Kornblith et al. 2019, arXiv 1905.00414) between every pair of hidden states (embedding output and
      every block output) in the feature-space form ‖C_xy‖²_F / (‖C_xx‖_F ‖C_yy‖_F), read from one streamed
      float64 covariance of the concatenation [h_0 | … | h_L] (docs/notes/depth.md, "Linear CKA between layers"),
      plus the standardised variant (every dimension scaled to unit variance first), which outlier dimensions cannot
      dominate.
      Memory: 8·((L + 1)·D)² bytes (13 MB for ``tiny``, 0.8 GB for a BERT-base shape; ``cka=False`` turns it off).

``layer_drop`` (variant ``mask15``; needs the MLM head)
    Masked-LM loss at the probe set's [MASK] positions with one block / attention sub-layer / FFN sub-layer skipped,
    one-shot (each unit removed alone from the full model), done as an nnsight intervention on the unmodified model.
    This analysis **runs its own forward passes by nature** (one traced pass per batch over the batch repeated for
    the 1 + 3L configurations — split when that exceeds ``MAX_STACKED_ROWS`` rows — on at most ``max_sentences``
    sentences) — the shared capture cannot provide counterfactual runs. Conventions (docs/notes/depth.md,
    "Layer drop"): post-LN block skip h_out := h_in; attention skip h_mid := h_in (LN1 removed with the sub-layer);
    FFN skip h_out := h_mid (LN2 removed). Pre-LN: the sub-layer's output projection is zeroed (its residual
    contribution removed); the final norm stays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..probes.batch import CaptureBatch
from ..probes.capture import envoy_at, nnsight_wrapper
from .base import Accumulator, Analysis, AnalysisContext, SkipAnalysis, register
from .lens import (
    DepthAnalysisError,
    NoMaskedPositionsError,
    check_finite,
    checkpoint_label,
    decode_hidden,
    is_pre_ln,
    require_mlm_head,
)
from .stats import StreamingCovariance

__all__ = [
    "LayerDrop",
    "LayerDropAccumulator",
    "Redundancy",
    "RedundancyAccumulator",
    "cka_matrix",
    "state_names",
    "unit_pairs",
    "DROP_CONVENTIONS",
]

_F64 = torch.float64
UNITS = ("block", "attn", "ffn")

#: Rows (sentences × skip configurations) of one stacked layer-drop pass. Bounds its memory, which grows with
#: rows × heads × T²: 256 rows of a 12-head model at T = 128 hold 200 MB of fp32 attention probabilities per layer.
#: The ``demo`` model's 7 configurations × 32 sentences fit in one pass; BERT-base's 37 take five.
MAX_STACKED_ROWS = 256

#: What skipping a unit means, stored with every layer-drop result: the Δloss depends on it
#: (docs/notes/depth.md, "Layer drop").
DROP_CONVENTIONS = {
    "post_ln": "block: h_out:=h_in; attn: h_mid:=h_in (LN1 removed); ffn: h_out:=h_mid (LN2 removed); one-shot",
    "pre_ln": "block/attn/ffn: sub-layer output projection(s) zeroed (residual kept), final norm kept; one-shot",
}


def state_names(n_layers: int) -> list[str]:
    """Captured states in depth order: embed, then (resid_mid, resid_post) of every block."""
    out = ["embed.hook_out"]
    for l in range(n_layers):
        out += [f"blocks.{l}.hook_resid_mid", f"blocks.{l}.hook_resid_post"]
    return out


def unit_pairs(n_layers: int) -> list[tuple[int, str, int, int]]:
    """(block, unit, index of the input state, index of the output state) into :func:`state_names`."""
    pairs = []
    for l in range(n_layers):
        pre, mid, post = (0 if l == 0 else 2 * l), 2 * l + 1, 2 * l + 2
        pairs += [(l, "block", pre, post), (l, "attn", pre, mid), (l, "ffn", mid, post)]
    return pairs


def cka_matrix(scatter: torch.Tensor, k: int, standardise: bool = False) -> torch.Tensor:
    """Linear CKA between every pair of k equal-width blocks of a (k·d, k·d) centred scatter/covariance.

    CKA(X, Y) = ‖C_xy‖²_F / (‖C_xx‖_F ‖C_yy‖_F) (Kornblith et al. 2019, feature-space form; the 1/n factors cancel).

    Args:
        scatter: Centred scatter (or covariance) of the concatenated rows [x_1 | … | x_k].
        k: Number of blocks.
        standardise: Scale every dimension to unit variance first (dims with numerically zero variance — at or
            below ``k·d·eps·max variance``, numpy's ``matrix_rank`` rule — are dropped, i.e. scaled by 0).

    Returns:
        (k, k) float64 CKA matrix (NaN where a block has zero variance).
    """
    c = scatter.to(_F64)
    if standardise:
        var = torch.diagonal(c)
        tol = c.shape[0] * float(np.finfo(np.float64).eps) * float(var.max().clamp_min(0))
        s = torch.where(var > tol, var.clamp_min(tol).rsqrt(), torch.zeros_like(var))
        c = c * s[:, None] * s[None, :]
    d = c.shape[0] // k
    hsic = (c.reshape(k, d, k, d) ** 2).sum((1, 3))  # ‖C_ij‖²_F
    norm = torch.diagonal(hsic).sqrt()
    return hsic / (norm[:, None] * norm[None, :])


class _PairedTraceCovariance:
    """Streaming per-state means and centred cross-scatter *traces* Σ_t (x_t − μx)·(y_t − μy) for state pairs.

    O(S·d) memory (the full d×d cross-covariances of ``mlmscope.analyses.stats`` are not needed for a pooled cosine);
    batches are merged with the same Chan et al. (1979) pairwise update as ``mlmscope.analyses.stats``. Within a
    batch the centred traces come from the per-token dot products the cosines need anyway:
    Σ_t (x_t − m)·(y_t − m′) = Σ_t x_t·y_t − N m·m′ (float64; the batch means are ~1 of the vectors' scale, so the
    subtraction loses a few bits of 53 at most).
    """

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        self.a = torch.tensor([p[0] for p in pairs])
        self.b = torch.tensor([p[1] for p in pairs])
        self.n = 0
        self.mean: torch.Tensor | None = None  # (S, d)
        self.tr_xy: torch.Tensor | None = None  # (P,)
        self.tr_xx: torch.Tensor | None = None  # (S,)

    def update(self, x: torch.Tensor) -> None:
        """Add rows of every state: ``x`` (S, N, d)."""
        if x.shape[1] == 0:
            return
        x = x.to(_F64)
        dots = torch.stack([(x[a] * x[b]).sum(-1) for a, b in zip(self.a.tolist(), self.b.tolist())])
        self.update_sums(x.mean(1), dots.sum(-1), (x * x).sum((1, 2)), x.shape[1])

    def update_sums(self, m_b: torch.Tensor, xy_raw: torch.Tensor, xx_raw: torch.Tensor, n_b: int) -> None:
        """Add one batch given its per-state means (S, d), Σ_t x_t·y_t per pair (P,) and Σ_t ‖x_t‖² per state (S,)."""
        if n_b == 0:
            return
        if self.a.device != m_b.device:
            self.a, self.b = self.a.to(m_b.device), self.b.to(m_b.device)
        xy_b = xy_raw - n_b * (m_b[self.a] * m_b[self.b]).sum(-1)
        xx_b = xx_raw - n_b * (m_b * m_b).sum(-1)
        if self.n == 0:
            self.n, self.mean, self.tr_xy, self.tr_xx = n_b, m_b, xy_b, xx_b
            return
        mean, tr_xy, tr_xx = self._moments()
        n = self.n + n_b
        delta = m_b - mean
        w = self.n * n_b / n
        self.tr_xy = tr_xy + xy_b + w * (delta[self.a] * delta[self.b]).sum(-1)
        self.tr_xx = tr_xx + xx_b + w * (delta * delta).sum(-1)
        self.mean = mean + delta * (n_b / n)
        self.n = n

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, tr_xy, tr_xx) once rows were seen (they are None while ``n`` is 0)."""
        assert self.mean is not None and self.tr_xy is not None and self.tr_xx is not None, "no rows seen yet"
        return self.mean, self.tr_xy, self.tr_xx

    def centred_cosine(self) -> torch.Tensor:
        """(P,) pooled centred cosine tr S_xy / √(tr S_xx · tr S_yy)."""
        _, tr_xy, tr_xx = self._moments()
        return tr_xy / (tr_xx[self.a] * tr_xx[self.b]).sqrt()


class RedundancyAccumulator(Accumulator):
    """Streams ``clean`` batches: per-token cosines, pooled centred cosines and the CKA covariance."""

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        label: str,
        cka: bool = True,
        include_special: bool = False,
        eps: float = 1e-8,
    ) -> None:
        self.n_layers = n_layers
        self.names = state_names(n_layers)
        self.pairs = unit_pairs(n_layers)
        self.label = label
        self.include_special = include_special
        self.eps = eps
        self.cos_sum = torch.zeros(len(self.pairs), dtype=_F64)
        self.n_tokens = 0
        self.trace = _PairedTraceCovariance([(i, o) for _, _, i, o in self.pairs])
        #: hidden-state indices (embed, every resid_post) into ``names`` — the CKA layers
        self.hidden_idx = [0] + [2 * l + 2 for l in range(n_layers)]
        self.cov = StreamingCovariance(d_model * (n_layers + 1)) if cka else None

    def update(self, batch: CaptureBatch) -> None:
        dev = batch[self.names[0]].device  # every sum below stays on the activations' device
        mask = (batch.attention_mask.bool() if self.include_special else batch.token_mask).to(dev)
        if not bool(mask.any()):
            return
        # (N, S, d) with the CKA states first, so that their concatenation [h_0 | … | h_L] is a view, not a copy
        order = self.hidden_idx + [i for i in range(len(self.names)) if i not in self.hidden_idx]
        where = {s: k for k, s in enumerate(order)}
        x = torch.stack([batch[self.names[s]][mask] for s in order], 1).to(_F64)
        n_b = x.shape[0]
        # per-token dot products of every (in, out) pair and squared norms: the cosines and the centred traces
        dots = torch.stack([(x[:, where[i]] * x[:, where[o]]).sum(-1) for _, _, i, o in self.pairs])  # (P, N)
        back = [where[s] for s in range(len(self.names))]
        sq = (x * x).sum(-1).T[back]  # (S, N) in name order
        if not bool(torch.isfinite(sq).all()):  # a NaN/inf anywhere in a vector makes its squared norm NaN/inf
            first = int((~torch.isfinite(sq)).any(1).nonzero()[0])
            check_finite(batch[self.names[first]][mask], f"captured state {self.names[first]}", self.label)
        norms = sq.sqrt().clamp_min(self.eps)
        ins = [p[2] for p in self.pairs]
        outs = [p[3] for p in self.pairs]
        if self.cos_sum.device != dev:  # moved once, while still zero
            self.cos_sum = self.cos_sum.to(dev)
        self.cos_sum += (dots / (norms[ins] * norms[outs])).sum(-1)
        self.n_tokens += n_b
        mean = x.mean(0)  # (S', d)
        self.trace.update_sums(mean[back], dots.sum(-1), sq.sum(-1), n_b)
        if self.cov is not None:
            k = len(self.hidden_idx)
            self.cov.update(x[:, :k].reshape(n_b, -1), mean=mean[:k].reshape(-1))

    def result(self) -> dict[str, pd.DataFrame]:
        if self.n_tokens == 0:
            raise SkipAnalysis("redundancy: the probe set has no non-special tokens")
        cos = (self.cos_sum / self.n_tokens).cpu().numpy()
        ccos = self.trace.centred_cosine().cpu().numpy()
        per = pd.DataFrame(
            {
                "block": [p[0] for p in self.pairs],
                "unit": [p[1] for p in self.pairs],
                "in_name": [self.names[p[2]] for p in self.pairs],
                "out_name": [self.names[p[3]] for p in self.pairs],
                "cos": cos,
                "redundancy": 1.0 - cos,
                "cos_centred": ccos,
                "redundancy_centred": 1.0 - ccos,
            }
        )
        per["n_tokens"] = self.n_tokens
        per["include_special"] = self.include_special
        out = {"per_layer": per}
        if self.cov is not None:
            k = self.n_layers + 1
            lin, std = cka_matrix(self.cov.scatter, k), cka_matrix(self.cov.scatter, k, standardise=True)
            ii, jj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
            out["cka"] = pd.DataFrame(
                {
                    "layer_i": ii.ravel(),
                    "layer_j": jj.ravel(),
                    "cka": lin.cpu().numpy().ravel(),
                    "cka_std": std.cpu().numpy().ravel(),
                    "n_tokens": self.n_tokens,
                }
            )
        return out


@register
class Redundancy(Analysis):
    """1 − cos per block / sub-layer (raw and centred) and linear CKA between layers (clean probe set)."""

    name = "redundancy"
    version = "1"
    description = "Layer redundancy: 1 - cos(in, out) per block and sub-layer, linear CKA between every pair of layers"
    variants = ("clean",)

    @dataclass
    class Params(Analysis.Params):
        """Options of the redundancy analysis.

        Attributes:
            cka: Compute the CKA matrix (memory 8·((L+1)·D)² bytes).
            include_special: Average over [CLS]/[SEP] too (default: real non-special tokens only).
        """

        cka: bool = True
        include_special: bool = False

    def names(self, ctx: AnalysisContext) -> list[str]:
        return state_names(ctx.n_layers)

    def accumulator(self, ctx: AnalysisContext) -> RedundancyAccumulator:
        return RedundancyAccumulator(
            ctx.n_layers,
            ctx.d_model,
            checkpoint_label(ctx),
            cka=self.params.cka,
            include_special=self.params.include_special,
        )


# --- layer drop ---------------------------------------------------------------------------------------------------


def _envoy(net: Any, root: torch.nn.Module, module: torch.nn.Module) -> Any:
    """The nnsight envoy of ``module`` inside ``net`` (= NNsight(root)), found by its path under ``root``."""
    return envoy_at(net, next(p for p, m in root.named_modules() if m is module))


class _DropRunner:
    """Runs every skip configuration in ONE traced forward pass over the batch repeated once per configuration
    (rows ``c·B … (c+1)·B − 1`` carry configuration ``c``), so a batch costs one pass, not 1 + 3L."""

    def __init__(self, arch: Any) -> None:
        self.arch = arch
        self.pre_ln = is_pre_ln(arch)
        enc = arch.encoder_model
        self.net = nnsight_wrapper(enc)
        self._env: Callable[[torch.nn.Module], Any] = lambda m: _envoy(self.net, enc, m)
        self.last = self._env(arch.layer(arch.n_layers - 1))

    def _intervene(self, l: int, rows: dict[str, list[slice]]) -> None:
        """Skip the units of block ``l`` in their row slices, touching the envoys in execution order."""
        a, env = self.arch, self._env
        if self.pre_ln:
            zero = {"attn": rows["attn"] + rows["block"], "ffn": rows["ffn"] + rows["block"]}
            for unit, m in (("attn", a.attn_out_dense(l)), ("ffn", a.mlp_out_dense(l))):
                if zero[unit]:
                    out = env(m).output
                    for s in zero[unit]:
                        out[s] = 0
            return
        h_in = env(a.layer(l)).input if rows["attn"] or rows["block"] else None
        ffn_keep: list[torch.Tensor] = []
        if rows["attn"] or rows["ffn"]:
            mid = env(a.ln1(l)).output
            ffn_keep = [mid[s].clone() for s in rows["ffn"]]
            for s in rows["attn"]:
                assert h_in is not None  # read above whenever rows["attn"] is non-empty
                mid[s] = h_in[s]  # attention skipped: the FFN reads the block's input
        if rows["ffn"] or rows["block"]:
            out = env(a.ln2(l)).output
            for s, m in zip(rows["ffn"], ffn_keep):
                out[s] = m  # FFN skipped: the block returns its mid state
            for s in rows["block"]:
                assert h_in is not None  # read above whenever rows["block"] is non-empty
                out[s] = h_in[s]  # block skipped: identity

    def last_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, configs: list[tuple[str, int]]
    ) -> torch.Tensor:
        """(C, B, T, D) raw output of the last block under each ``(unit, block)`` configuration (``"none"``: intact)."""
        C, (B, T) = len(configs), input_ids.shape
        per_layer: dict[int, dict[str, list[slice]]] = {}
        for c, (unit, l) in enumerate(configs):
            if unit != "none":
                per_layer.setdefault(l, {u: [] for u in UNITS})[unit].append(slice(c * B, (c + 1) * B))
        with torch.no_grad(), self.net.trace(input_ids.repeat(C, 1), attention_mask=attention_mask.repeat(C, 1)):
            for l in sorted(per_layer):
                self._intervene(l, per_layer[l])
            out = self.last.output.save()
        return out.view(C, B, T, -1)


class LayerDropAccumulator(Accumulator):
    """Streams ``mask15`` batches; for each, the MLM loss with every unit skipped in turn (own forward passes)."""

    def __init__(
        self, arch: Any, n_layers: int, units: tuple[str, ...], max_sentences: int, label: str, device: str = "cpu"
    ) -> None:
        bad = [u for u in units if u not in UNITS]
        if bad:
            raise DepthAnalysisError(f"layer_drop: unknown unit(s) {bad}; choose from {', '.join(UNITS)}")
        self.arch = arch
        self.label = label
        self.device = device
        self.max_sentences = max_sentences
        self.configs = [("none", -1)] + [(u, l) for l in range(n_layers) for u in units]
        self.ce = torch.zeros(len(self.configs), dtype=_F64)
        self.correct = torch.zeros(len(self.configs), dtype=_F64)
        self.n_masked = 0
        self.n_sentences = 0
        self._runner: _DropRunner | None = None

    def update(self, batch: CaptureBatch) -> None:
        # the probe set's first sentences, whatever the batching
        keep = batch.sentence_ids.to(batch.input_ids.device) < self.max_sentences
        if not bool(keep.any()):
            return
        ids, am = batch.input_ids[keep], batch.attention_mask.to(keep.device)[keep]
        labels = batch.labels.to(keep.device)[keep]
        self.n_sentences += ids.shape[0]
        mm = labels != -100
        if not bool(mm.any()):
            return
        self._runner = self._runner or _DropRunner(self.arch)
        ids, am, mm = ids.to(self.device), am.to(self.device), mm.to(self.device)
        gold = labels.to(self.device)[mm]
        per_pass = max(1, MAX_STACKED_ROWS // ids.shape[0])
        for first in range(0, len(self.configs), per_pass):
            with torch.no_grad():
                last = self._runner.last_hidden(ids, am, self.configs[first : first + per_pass])
            for i, h in enumerate(last):
                c = first + i
                with torch.no_grad():
                    logits = decode_hidden(self.arch, h[mm]).float()
                if c == 0:
                    check_finite(logits, "the final layer's MLM logits", self.label)
                if self.ce.device != logits.device:  # the sums live on the model's device (moved once, at zero)
                    self.ce, self.correct = self.ce.to(logits.device), self.correct.to(logits.device)
                self.ce[c] += torch.nn.functional.cross_entropy(logits, gold, reduction="sum").double()
                self.correct[c] += (logits.argmax(-1) == gold).sum().double()
        self.n_masked += int(gold.numel())

    def result(self) -> dict[str, pd.DataFrame]:
        if self.n_masked == 0:
            raise NoMaskedPositionsError(
                "layer_drop: the probe set has no masked positions with a gold label (variant 'mask15'); "
                "rebuild the masked probe variant or use a probe set with non-special tokens"
            )
        loss = (self.ce / self.n_masked).cpu().numpy()
        acc = (self.correct / self.n_masked).cpu().numpy()
        df = pd.DataFrame(
            {"unit": [c[0] for c in self.configs], "block": [c[1] for c in self.configs], "loss": loss, "acc": acc}
        )
        df["delta_loss"] = df["loss"] - loss[0]
        df["rel_delta_loss"] = df["delta_loss"] / loss[0] if loss[0] > 0 else math.nan
        df["delta_acc"] = df["acc"] - acc[0]
        df["n_masked"] = self.n_masked
        df["n_sentences"] = self.n_sentences
        df["convention"] = DROP_CONVENTIONS["pre_ln" if is_pre_ln(self.arch) else "post_ln"]
        return {"per_unit": df}


@register
class LayerDrop(Analysis):
    """Δ masked-LM loss when one block / sub-layer is skipped (nnsight intervention; own forward passes)."""

    name = "layer_drop"
    version = "1"
    description = "Layer-drop: masked-LM loss increase when one block / attention / FFN sub-layer is skipped"
    variants = ("mask15",)
    needs_mlm_head = True

    @dataclass
    class Params(Analysis.Params):
        """Options of the layer-drop analysis.

        Attributes:
            units: Which units to skip, comma-separated subset of ``block,attn,ffn``.
            max_sentences: Use the probe set's sentences with id < max_sentences (each is run 1 + len(units)·L
                times, stacked into one pass per batch or a few, see ``MAX_STACKED_ROWS``); a fixed subset,
                independent of batching, so every checkpoint sees the same.
        """

        units: str = "block,attn,ffn"
        max_sentences: int = 256

    def names(self, ctx: AnalysisContext) -> list[str]:
        return []  # reads input_ids / labels only; runs its own (intervened) forward passes

    def accumulator(self, ctx: AnalysisContext) -> LayerDropAccumulator:
        require_mlm_head(ctx, self.name)
        units = tuple(u.strip() for u in self.params.units.split(",") if u.strip())
        return LayerDropAccumulator(
            ctx.arch, ctx.n_layers, units, self.params.max_sentences, checkpoint_label(ctx), ctx.device
        )
