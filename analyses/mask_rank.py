"""[MASK]-dimension deficiency: effective rank of token representations with vs without [MASK].

Meng et al., "Representation Deficiency in Masked Language Modeling" (ICLR 2024, arXiv 2302.02060) report that
an MLM's representations of inputs *with* [MASK] have a higher effective rank than those of real-token-only inputs:
some dimensions are spent on [MASK] alone. This analysis measures that per layer and checkpoint, from streamed
float64 second-moment accumulators (:mod:`mlmscope.analyses.stats`), never from a stored matrix of all vectors.

Definitions (docs/notes/geometry.md, "[MASK]-dimension deficiency"). Let H ∈ ℝ^{n×d} hold the n selected token
vectors of one layer (layer 0 = embedding output ``embed.hook_out``, layer l + 1 = ``blocks.{l}.hook_resid_post``):

* ``normalisation``: ``centred`` — eigenvalues λ of the scatter (H − 1μᵀ)ᵀ(H − 1μᵀ) (= σ² of the centred rows);
  ``uncentred`` — eigenvalues of HᵀH; ``standardised`` — eigenvalues of the correlation matrix (each dimension
  divided by its std, so one large outlier dimension cannot dominate; zero-variance dimensions are dropped).
* ``variance_rank``: smallest k with Σ_{i≤k} λ_i ≥ τ Σ λ_i (τ = ``Params.tau`` = 0.9, the "0.9-effective rank").
* ``entropy_rank``: exp(−Σ p_i ln p_i), p_i = σ_i / Σσ_j, σ = √λ (Roy & Vetterli 2007).
* Eigenvalues ≤ d·eps·Σ‖h‖² are numerically zero (:func:`mlmscope.analyses.stats.numerical_tolerance`); an all-zero
  spectrum (e.g. identical vectors) gives rank 0, never NaN.

Token sets (special tokens [CLS]/[SEP] and padding excluded unless ``include_special``):

* ``clean_real``: every token of the ``clean`` variant.
* ``clean_at_mask``: the ``clean`` vectors at exactly the positions the ``mask15`` variant masks (same sentences,
  same tokens, same n as ``masked_mask``: the equal-n control). The positions come from
  :func:`mlmscope.probes.masking.mask_positions` with ``Params.mask_seed``; the accumulator checks them against the
  ``mask15`` batches and reports a mismatch in ``warning``.
* ``masked_mask``: ``mask15`` vectors at [MASK] positions; ``masked_real``: ``mask15`` vectors elsewhere;
  ``masked_all``: both (same positions and n as ``clean_real``).

Mask-only directions (Theorem 2.2 of Meng et al. operationalised): with P_k the projector onto the top-k principal
subspace of ``clean_real`` (k = its centred ``variance_rank``), ρ = 1 − tr(P_k S P_k) / tr(S) for the centred
scatter S of a token set = the fraction of that set's variance outside the real-token subspace. Reported for
``masked_mask`` (the quantity of interest), ``masked_real`` and ``clean_at_mask`` (controls). ``mean_shift_outside``
is the same fraction for the offset μ_mask − μ_clean_real. Coordinate view (``mask_dims``): per dimension,
var(masked_mask) / var(clean_at_mask) (equal n, same tokens); the top ``top_dims`` dimensions by that ratio.

Sample size: ranks are limited by n (rank ≤ min(n, d)) and finite-sample estimates grow with n, so every row
carries ``n_tokens`` and ``low_n`` / ``warning`` when n < ``min_tokens_per_dim`` · d (default 100, i.e. n ≥ 100·d;
Meng et al. reportedly used ≈5M tokens for d = 768; docs/notes/geometry.md, "Sample size").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checkpoints.errors import MlmscopeError
from ..probes.batch import CaptureBatch
from .base import Accumulator, Analysis, AnalysisContext, register
from .stats import (
    StreamingCovariance,
    correlation_from_covariance,
    entropy_rank,
    numerical_tolerance,
    residual_stream_names,
    serial_when_threads_sleep,
    variance_rank,
)

#: Stored token sets (``clean_real`` and ``masked_all`` are merged from these at result time).
_STORED = ("clean_at_mask", "clean_other", "masked_mask", "masked_real")
TOKEN_SETS = ("clean_real", "clean_at_mask", "masked_all", "masked_mask", "masked_real")
NORMALISATIONS = ("centred", "uncentred", "standardised")
METRICS = ("variance_rank", "entropy_rank")
CLEAN, MASKED = "clean", "mask15"


class MaskRankParamsError(MlmscopeError, ValueError):
    """Invalid mask_rank parameters (user-facing message)."""


class MaskRankWarning(UserWarning):
    """Too few tokens for the hidden size, or a mask pattern that does not match the capture."""


def token_selection(batch: CaptureBatch, include_special: bool) -> torch.Tensor:
    """(B, T) bool: the positions whose vectors enter the statistics (never padding)."""
    return batch.attention_mask.bool() if include_special else batch.token_mask


def planned_mask(batch: CaptureBatch, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, T) bool: positions the ``mask15`` variant masks for these sentences (see :mod:`mlmscope.probes.masking`).

    The positions are drawn on the host (per sentence, from two integers per row: its id and its number of content
    pieces); the mask is built on ``device`` (default: the special mask's) by comparing each piece's rank among the
    sentence's content pieces with them, so no (B, T) tensor is copied between devices.
    """
    from ..probes.masking import mask_positions

    content = ~batch.special_mask.to(device if device is not None else batch.special_mask.device)
    counts = content.sum(1).tolist()
    picks = [mask_positions(MASKED, int(n), int(sid), seed) for n, sid in zip(counts, batch.sentence_ids.tolist())]
    width = max((len(p) for p in picks), default=0)
    if width == 0:
        return torch.zeros_like(content)
    table = torch.full((len(picks), width), -1, dtype=torch.long)
    for b, p in enumerate(picks):
        table[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    rank = content.long().cumsum(1) - 1  # rank of each content piece among its sentence's content pieces
    hit = (rank[:, :, None] == table.to(content.device)[:, None, :]).any(-1)
    return hit & content


def _spectrum_inputs(acc: StreamingCovariance) -> dict[str, tuple[torch.Tensor, float]]:
    """The three matrices whose eigenvalues give the ranks, with each one's numerical-zero tolerance."""
    tol = numerical_tolerance(acc)
    corr, _ = correlation_from_covariance(acc.cov, var_tol=tol / max(acc.n, 1))
    return {
        "centred": (acc.scatter, tol),
        "uncentred": (acc.gram, tol),
        "standardised": (corr, acc.d * float(np.finfo(np.float64).eps) * max(corr.shape[0], 1)),
    }


def _ranks_of(spectra: dict[str, np.ndarray], tau: float) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for norm, ev in spectra.items():
        out[(norm, "variance_rank")] = float(variance_rank(ev, tau))
        out[(norm, "entropy_rank")] = entropy_rank(ev)
    return out


def batched_spectra(mats: list[tuple[torch.Tensor, float]]) -> list[np.ndarray]:
    """:func:`eigvals_desc` of many symmetric matrices, those of one size in one batched ``eigvalsh`` call (the same
    LAPACK routine per matrix, bit-identical to one call each, without the per-call overhead)."""
    out: list[np.ndarray | None] = [None] * len(mats)
    by_size: dict[int, list[int]] = {}
    for i, (m, _) in enumerate(mats):
        by_size.setdefault(m.shape[0], []).append(i)
    for idx in by_size.values():
        stack = torch.stack([torch.as_tensor(mats[i][0], dtype=torch.float64).cpu() for i in idx])
        ev = torch.linalg.eigvalsh(0.5 * (stack + stack.transpose(1, 2))).numpy()[:, ::-1].copy()
        for row, i in zip(ev, idx):
            row[row <= max(mats[i][1], 0.0)] = 0.0
            out[i] = row
    return [e for e in out if e is not None]


def spectrum_ranks(acc: StreamingCovariance, tau: float) -> dict[tuple[str, str], float]:
    """Both effective ranks under the three normalisations for one accumulator."""
    inputs = _spectrum_inputs(acc)
    return _ranks_of(dict(zip(inputs, batched_spectra(list(inputs.values())))), tau)


def top_subspace(acc: StreamingCovariance, k: int) -> torch.Tensor:
    """(d, k) orthonormal top-k principal directions of the centred scatter."""
    _, vecs = torch.linalg.eigh(acc.scatter.cpu())
    return vecs[:, vecs.shape[1] - k :] if k > 0 else vecs[:, :0]


def outside_fraction(scatter: torch.Tensor, basis: torch.Tensor) -> float:
    """1 − tr(Uᵀ S U) / tr(S): the share of a scatter's variance outside span(U) (0 for a zero scatter)."""
    total = float(torch.trace(scatter))
    if total <= 0.0:
        return 0.0
    inside = float(((scatter.cpu() @ basis) * basis).sum())  # tr(Uᵀ S U)
    return float(min(max(1.0 - inside / total, 0.0), 1.0))


def merged(a: StreamingCovariance, b: StreamingCovariance) -> StreamingCovariance:
    """A new accumulator holding the union of two."""
    out = StreamingCovariance(a.d)
    out.merge(a)
    out.merge(b)
    return out


class MaskRankAccumulator(Accumulator):
    """Per layer and token set, a :class:`StreamingCovariance` (O(L·d²) memory, independent of the probe size)."""

    def __init__(self, names: list[str], d_model: int, params: MaskRank.Params) -> None:
        self.names = names
        self.d = d_model
        self.p = params
        self.acc = {(l, s): StreamingCovariance(d_model) for l in range(len(names)) for s in _STORED}
        self.mask_mismatch = 0

    def update(self, batch: CaptureBatch) -> None:
        """Route each token of each layer into its token set's accumulator."""
        if batch.variant not in (CLEAN, MASKED):
            return
        dev = batch[self.names[0]].device  # masks are moved to the activations, never the other way
        sel = token_selection(batch, self.p.include_special).to(dev)
        planned = planned_mask(batch, self.p.mask_seed, dev)
        if batch.variant == CLEAN:
            at_mask = planned & sel
            groups = {"clean_at_mask": at_mask, "clean_other": sel & ~at_mask}
        else:
            is_mask = (batch.masked_mask & batch.attention_mask.bool()).to(dev)
            self.mask_mismatch += int((planned != is_mask).any(1).sum())
            groups = {"masked_mask": is_mask & sel, "masked_real": sel & ~is_mask}
        for s, m in groups.items():  # every layer of a token set in one batched update (the same rows)
            rows = torch.stack([batch[name][m] for name in self.names])  # (L, n, d)
            StreamingCovariance.update_group([self.acc[(l, s)] for l in range(len(self.names))], rows)

    def _sets(self, l: int) -> dict[str, StreamingCovariance]:
        a = self.acc
        return {
            "clean_real": merged(a[(l, "clean_at_mask")], a[(l, "clean_other")]),
            "clean_at_mask": a[(l, "clean_at_mask")],
            "masked_all": merged(a[(l, "masked_mask")], a[(l, "masked_real")]),
            "masked_mask": a[(l, "masked_mask")],
            "masked_real": a[(l, "masked_real")],
        }

    def _warning(self, n: int) -> str:
        need = int(np.ceil(self.p.min_tokens_per_dim * self.d))
        if n == 0:
            return "no tokens in this set"
        if n < need:
            return (
                f"only {n} tokens for hidden size {self.d} (recommended >= {self.p.min_tokens_per_dim:g} x d = "
                f"{need}); ranks are limited by the sample size, compare only at equal n"
            )
        return ""

    def result(self) -> dict[str, pd.DataFrame]:
        """Tables ``ranks``, ``gap``, ``mask_only`` and ``mask_dims`` (see the module docstring)."""
        with serial_when_threads_sleep():  # ~16 eigendecompositions per layer
            return self._result()

    def _result(self) -> dict[str, pd.DataFrame]:
        rank_rows, only_rows, dim_rows = [], [], []
        for l in range(len(self.names)):
            sets = self._sets(l)
            # every spectrum of the layer (5 token sets x 3 normalisations) in one batched eigvalsh
            inputs = {s: _spectrum_inputs(acc) for s, acc in sets.items()}
            flat = batched_spectra([m for per in inputs.values() for m in per.values()])
            spectra = {s: dict(zip(per, flat[3 * i : 3 * i + 3])) for i, (s, per) in enumerate(inputs.items())}
            for s, acc in sets.items():
                warn = self._warning(acc.n)
                for (norm, metric), v in _ranks_of(spectra[s], self.p.tau).items():
                    rank_rows.append(
                        {
                            "layer": l,
                            "token_set": s,
                            "normalisation": norm,
                            "metric": metric,
                            "value": v,
                            "n_tokens": acc.n,
                            "d_model": self.d,
                            "low_n": bool(warn),
                            "warning": warn,
                        }
                    )
            only_rows += self._mask_only(l, sets, spectra["clean_real"]["centred"])
            dim_rows += self._mask_dims(l, sets)
        ranks = pd.DataFrame(rank_rows)
        if self.mask_mismatch:
            msg = (
                f"{self.mask_mismatch} mask15 sentence(s) were masked at other positions than mask_seed="
                f"{self.p.mask_seed} predicts; clean_at_mask is not the same token set as masked_mask"
            )
            ranks["warning"] = ranks["warning"].where(ranks["warning"] == "", ranks["warning"] + "; ") + msg
            warnings.warn(msg, MaskRankWarning, stacklevel=2)
        low = ranks[ranks["low_n"] & (ranks["n_tokens"] > 0)]
        if len(low):
            r = low.iloc[0]
            warnings.warn(
                f"mask_rank: {r['warning']} (layer {r['layer']}, {r['token_set']})", MaskRankWarning, stacklevel=2
            )
        return {
            "ranks": ranks,
            "gap": rank_gap_table(ranks),
            "mask_only": pd.DataFrame(only_rows),
            "mask_dims": pd.DataFrame(dim_rows),
        }

    def _mask_only(self, l: int, sets: dict[str, StreamingCovariance], ev: np.ndarray) -> list[dict[str, Any]]:
        """``ev``: the centred spectrum of ``clean_real`` (computed once, with the ranks)."""
        ref = sets["clean_real"]
        k = variance_rank(ev, self.p.tau)
        basis = top_subspace(ref, k)
        rows = []
        for s in ("masked_mask", "masked_real", "clean_at_mask"):
            acc = sets[s]
            shift = (acc.mean - ref.mean).cpu()
            shift_scatter = torch.outer(shift, shift)
            rows.append(
                {
                    "layer": l,
                    "token_set": s,
                    "k": k,
                    "outside_fraction": outside_fraction(acc.scatter, basis),
                    "mean_shift_outside": outside_fraction(shift_scatter, basis),
                    "mean_shift_norm": float(shift.norm()),
                    "n_tokens": acc.n,
                    "n_reference": ref.n,
                }
            )
        return rows

    def _mask_dims(self, l: int, sets: dict[str, StreamingCovariance]) -> list[dict[str, Any]]:
        vm, vc = sets["masked_mask"].var.cpu(), sets["clean_at_mask"].var.cpu()
        if sets["masked_mask"].n == 0 or sets["clean_at_mask"].n == 0:
            return []
        floor = max(float(vc.max()), 0.0) * float(np.finfo(np.float64).eps) * self.d
        ratio = vm / vc.clamp(min=floor if floor > 0 else float(np.finfo(np.float64).tiny))
        top = torch.argsort(ratio, descending=True)[: self.p.top_dims]
        return [
            {
                "layer": l,
                "rank": r + 1,
                "dim": int(d),
                "var_mask": float(vm[d]),
                "var_clean": float(vc[d]),
                "ratio": float(ratio[d]),
            }
            for r, d in enumerate(top.tolist())
        ]


def rank_gap_table(ranks: pd.DataFrame) -> pd.DataFrame:
    """Per (step,) layer, normalisation and metric: ``masked_all − clean_real`` and ``masked_mask − clean_at_mask``.

    Works on one checkpoint's ``ranks`` table or on the concatenation over a trajectory (with a ``step`` column).

    Returns:
        Columns ``[step,] layer, normalisation, metric, clean_real, masked_all, gap, clean_at_mask, masked_mask,
        gap_equal_n``.
    """
    if ranks.empty:
        return pd.DataFrame()
    keys = [c for c in ("step", "layer", "normalisation", "metric") if c in ranks.columns]
    wide = ranks.pivot_table(index=keys, columns="token_set", values="value", aggfunc="first").reset_index()
    wide.columns.name = None
    for s in TOKEN_SETS:
        if s not in wide:
            wide[s] = np.nan
    wide["gap"] = wide["masked_all"] - wide["clean_real"]
    wide["gap_equal_n"] = wide["masked_mask"] - wide["clean_at_mask"]
    return wide[keys + ["clean_real", "masked_all", "gap", "clean_at_mask", "masked_mask", "gap_equal_n"]]


def rank_gap_over_steps(
    ranks: pd.DataFrame, normalisation: str = "centred", metric: str = "variance_rank"
) -> pd.DataFrame:
    """The rank gap over a trajectory: one row per (step, layer) for one normalisation and metric.

    Args:
        ranks: ``ranks`` tables of several checkpoints concatenated, with a ``step`` column (as
            ``mlmscope.analyses.store.load_results(run, "mask_rank", table="ranks")`` returns).
        normalisation: ``centred``, ``uncentred`` or ``standardised``.
        metric: ``variance_rank`` or ``entropy_rank``.

    Returns:
        Columns ``step, layer, clean_real, masked_all, gap, clean_at_mask, masked_mask, gap_equal_n``, sorted.
    """
    if "step" not in ranks.columns:
        raise ValueError("rank_gap_over_steps needs the concatenated per-checkpoint tables with a `step` column")
    if normalisation not in NORMALISATIONS or metric not in METRICS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS} and metric one of {METRICS}")
    sub = ranks[(ranks["normalisation"] == normalisation) & (ranks["metric"] == metric)]
    out = rank_gap_table(sub)
    if out.empty:
        return out
    return out.drop(columns=["normalisation", "metric"]).sort_values(["step", "layer"]).reset_index(drop=True)


@register
class MaskRank(Analysis):
    """Effective rank of token representations with vs without [MASK] (Meng et al. 2024), per layer."""

    name = "mask_rank"
    version = "1"
    description = "[MASK]-dimension deficiency: effective rank with vs without 15% [MASK], mask-only directions"
    variants = (CLEAN, MASKED)

    @dataclass
    class Params(Analysis.Params):
        """Options (double as CLI options; hashed into the results key).

        Attributes:
            tau: Variance fraction of the variance rank (0.9 = Meng et al.'s "0.9-effective rank").
            include_special: Also count [CLS]/[SEP] vectors (atypical, large-norm; excluded by default).
            min_tokens_per_dim: Warn when a token set has fewer than this many tokens per hidden dimension
                (100: docs/notes/geometry.md, "Sample size").
            mask_seed: Masking seed of the capture (``mlmscope.probes.capture.capture(seed=...)``, default 0); used to
                find the ``clean_at_mask`` positions in the clean pass.
            top_dims: Dimensions listed per layer in ``mask_dims``.
        """

        tau: float = 0.9
        include_special: bool = False
        min_tokens_per_dim: float = 100.0
        mask_seed: int = 0
        top_dims: int = 5

    def names(self, ctx: AnalysisContext) -> list[str]:
        return residual_stream_names(ctx.n_layers)

    def accumulator(self, ctx: AnalysisContext) -> MaskRankAccumulator:
        if not 0.0 < self.params.tau <= 1.0:
            raise MaskRankParamsError(f"mask_rank: tau must be in (0, 1], got {self.params.tau}")
        return MaskRankAccumulator(self.names(ctx), ctx.d_model, self.params)
