"""Where each attention head looks: entropy and the share of attention on [CLS], [SEP], the token itself and its
neighbours, per layer and head (Clark et al. 2019, "What Does BERT Look At?", Sections 3.1-3.2).

For every query token of a probe sentence (real tokens, [CLS] and [SEP] included; padding never), with ``p`` the
query's attention distribution over the sentence's real tokens:

* ``entropy``: ``-Σ_k p_k ln p_k`` in nats (0 = all attention on one token). ``entropy_uniform`` is the same
  mean for uniform attention, ``ln n`` with ``n`` the sentence's real tokens, so ``entropy / entropy_uniform`` is
  comparable across probe sets.
* ``to_cls``, ``to_sep``: attention on position 0 ([CLS]) and on the other special positions ([SEP]).
* ``to_self``, ``to_prev``, ``to_next``: attention on the query's own position and its left / right neighbour
  (the positional heads the SAS analysis tells apart from syntactic ones; see docs/notes/sas.md).

Every column is a mean over all query tokens of the probe set (sums kept in float64, so the result does not depend
on the batch size). A trained BERT's middle layers put much of their attention on [SEP] (Clark et al., Figure 2);
over a trajectory, the columns show when heads stop attending broadly (entropy falls) and which of these targets
they settle on.

Over a trajectory: ``mlmscope analyze RUN -a attention``, then ``Trajectory(RUN).results("attention", "heads")``
(:mod:`mlmscope.analyses.trajectory`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..probes.batch import CaptureBatch
from .base import Accumulator, Analysis, AnalysisContext, register

#: Output columns, in order (each a mean over query tokens).
TARGETS = ("to_cls", "to_sep", "to_self", "to_prev", "to_next")


def _pattern_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def head_sums(pattern: torch.Tensor, attention_mask: torch.Tensor, special_mask: torch.Tensor) -> torch.Tensor:
    """Per-head sums over the batch's query tokens of entropy and the attention on each target.

    Args:
        pattern: (B, H, T, T) attention probabilities (rows = queries; padding rows and columns zero).
        attention_mask: (B, T) 1 for real tokens.
        special_mask: (B, T) True for [CLS], [SEP] and padding.

    Returns:
        (H, 1 + len(TARGETS)) float64: entropy sum, then one sum per target, over the real query tokens.
    """
    p = pattern.double()
    real = attention_mask.bool()
    q = real[:, None, :, None]  # real query rows
    entropy = -(p * torch.log(p.clamp_min(1e-300))).masked_fill(~real[:, None, None, :], 0.0).sum(-1)
    sep = special_mask & real
    sep[:, 0] = False
    diag = p.diagonal(dim1=-2, dim2=-1)  # (B, H, T): p[i, i]
    prev = torch.nn.functional.pad(p.diagonal(offset=-1, dim1=-2, dim2=-1), (1, 0))  # p[i, i-1]; 0 at i = 0
    nxt = torch.nn.functional.pad(p.diagonal(offset=1, dim1=-2, dim2=-1), (0, 1))  # p[i, i+1]; 0 at i = T-1
    per_query = torch.stack([entropy, p[..., 0], (p * sep[:, None, None, :]).sum(-1), diag, prev, nxt], dim=-1)
    return (per_query * q).sum(dim=(0, 2))


class AttentionAccumulator(Accumulator):
    """Streaming sums per layer and head; memory O(L·H)."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.sums: list[torch.Tensor | None] = [None] * n_layers
        self.n_queries = 0
        self.uniform_sum = 0.0

    def update(self, batch: CaptureBatch) -> None:
        # sums stay where the patterns are
        dev = batch[_pattern_name(0)].device if self.n_layers else batch.attention_mask.device
        am, special = batch.attention_mask.to(dev), batch.special_mask.to(dev)
        real = am.bool()
        for layer in range(self.n_layers):
            s = head_sums(batch[_pattern_name(layer)], am, special)
            prev = self.sums[layer]
            self.sums[layer] = s if prev is None else prev + s
        n_real = real.sum(1).double()
        self.n_queries += int(n_real.sum())
        self.uniform_sum += float((n_real * torch.log(n_real.clamp_min(1))).sum())

    def result(self) -> dict[str, pd.DataFrame]:
        rows = []
        for layer, s in enumerate(self.sums):
            if s is None:
                continue
            means = (s / max(self.n_queries, 1)).cpu().numpy()
            for head, m in enumerate(means):
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "entropy": m[0],
                        **dict(zip(TARGETS, m[1:])),
                        "entropy_uniform": self.uniform_sum / max(self.n_queries, 1),
                        "n_queries": self.n_queries,
                    }
                )
        return {"heads": pd.DataFrame(rows)}


@register
class AttentionStats(Analysis):
    """Attention entropy and the share on [CLS], [SEP], self and neighbours, per layer and head."""

    name = "attention"
    version = "1"
    description = "Where heads look: attention entropy and share on [CLS]/[SEP]/self/prev/next (Clark et al. 2019)"
    variants = ("clean",)

    @dataclass
    class Params(Analysis.Params):
        pass

    def names(self, ctx: AnalysisContext) -> list[str]:
        return [_pattern_name(layer) for layer in range(ctx.n_layers)]

    def accumulator(self, ctx: AnalysisContext) -> AttentionAccumulator:
        return AttentionAccumulator(ctx.n_layers)
