"""Positional outlier neurons: argmax/argmin frequency, LayerNorm-γ 3σ rule, link to position, anisotropy.

Luo, Kulmizev & Mao, "Positional Artefacts Propagate Through Masked Language Model Embeddings" (ACL 2021,
arXiv 2011.04393) find a few hidden dimensions that hold the minimum (or maximum) of almost every token vector,
born from the position embeddings and propagated by LayerNorm. This analysis detects them per layer and checkpoint
(never hard-coding indices) and measures how they follow position. Definitions and the choices behind them:
docs/notes/geometry.md, "Positional outlier neurons".

* ``freq`` (Luo et al.): for dimension d of layer l, f_max(l, d) = share of token vectors whose argmax is d (f_min
  likewise). Chance is 1/d_model. Layer 0 is the embedding output (Luo excluded it from detection; it is reported
  but never used to *detect*).
* **Activation outlier** (project rule, documented): d is an outlier at a checkpoint when f_max or f_min ≥
  ``Params.freq_threshold`` (0.5: it holds the extreme of the majority of vectors; Luo's dims sit at 82–100 %) in
  at least one non-input layer.
* **LayerNorm-γ 3σ rule** (Kovaleva et al. 2021 / Puccetti et al. 2022, ``gpucce/outliersvsfreq``
  ``check_out_of_sigma``): on each block's *output* LayerNorm, flag d when |γ_d − mean(γ)| > 3·std(γ) (also for
  β); d is an LN outlier when flagged in more than ``ln_layer_fraction`` · n_layers layers (0.25 reproduces the
  published "more than 3 of 12 layers" and scales to shallow models).
* **Position link** (Luo et al.): for each candidate dim (activation outliers, LN outliers and each layer's top-1
  argmax/argmin dim) and layer, ``eta2`` = share of the dim's variance explained by the token's position
  (between-position variance / total, from streamed per-position means), and ``pe_corr`` = Pearson correlation
  over positions between the dim's per-position mean and the dim's column of the position-embedding matrix.
  ``pe_dims`` gives, per candidate dim, the share of position-embedding rows whose argmax/argmin it is and its
  z-score in the first position's row. Skipped (with the reason in ``notes``) for models without learned absolute
  position embeddings.
* **Position probe** (Luo et al.'s probe, adapted): a closed-form ridge probe from the layer's vectors to the
  one-hot position, fitted on a hash-selected half of the sentences and scored (held-out R², multi-output) on the
  other half, with all dims and without the activation outlier dims. Accuracy of an iterative classifier would
  need the vectors stored; R² is exactly computable from streamed moments (:mod:`mlmscope.analyses.stats`).
* **Anisotropy** (Ethayarajh, EMNLP 2019): mean cosine of random token pairs — one seeded random token from each
  of ``anisotropy_sentences`` sentences, paired — raw, with the activation outlier dims zeroed (Luo et al.'s
  clipping), and after per-dimension standardisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from ..checkpoints.errors import MlmscopeError
from ..probes.batch import CaptureBatch
from .base import Accumulator, Analysis, AnalysisContext, register
from .stats import StreamingCovariance, hash_uniform_like, residual_stream_names, serial_when_threads_sleep

KINDS = ("argmax", "argmin")
CONDITIONS_PROBE = ("all_dims", "without_outliers")
CONDITIONS_ANISO = ("raw", "clipped", "standardised")


class OutlierParamsError(MlmscopeError, ValueError):
    """Invalid outlier-analysis parameters (user-facing message)."""


# --- model access -------------------------------------------------------------------------------------------------
def position_embedding_matrix(ctx: AnalysisContext) -> tuple[torch.Tensor | None, int, str]:
    """The learned absolute position-embedding matrix, the row offset of position 0, or a reason it is absent.

    Returns:
        ``(matrix (P, D) float32 CPU or None, offset, reason)``; ``reason`` is "" when the matrix is available.
    """
    arch = ctx.arch
    if arch is None:
        return None, 0, "no model in the analysis context"
    pe, offset = arch.position_embeddings()
    if pe is None:
        kind = getattr(arch.config, "position_embedding_type", "absolute")
        return (
            None,
            0,
            (
                f"model has no learned absolute position embeddings (position_embedding_type={kind!r}); "
                "the positional link is skipped"
            ),
        )
    return pe.detach().float().cpu(), offset, ""


def output_layernorms(ctx: AnalysisContext) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """(γ, β) of every block's output LayerNorm (``arch.ln2``), or a reason they are unavailable."""
    arch = ctx.arch
    if arch is None:
        return [], "no model in the analysis context"
    out = []
    for l in range(ctx.n_layers):
        ln: Any = arch.ln2(l)  # an HF LayerNorm (torch types its attributes as Tensor | Module)
        out.append((ln.weight.detach().float().cpu(), ln.bias.detach().float().cpu()))
    return out, ""


# --- pure math (unit-tested) --------------------------------------------------------------------------------------
def three_sigma_flags(w: torch.Tensor, n_std: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(flags, z) with z = (w − mean) / std (torch's unbiased std, as ``check_out_of_sigma``), flags = |z| > n_std."""
    std = w.std()
    z = (w - w.mean()) / std if float(std) > 0 else torch.zeros_like(w)
    return z.abs() > n_std, z


def ridge_heldout_r2(train: Any, test: Any, x_idx: torch.Tensor, y_idx: torch.Tensor, ridge: float) -> float:
    """Held-out R² of a ridge regression from columns ``x_idx`` to columns ``y_idx``, from streamed moments only.

    W = (S_xx + λI)⁻¹ S_xy and b = μ_y − Wᵀμ_x on the train moments (λ = ``ridge`` · tr(S_xx)/|x|); on the test
    moments SSE = tr S'_yy − 2 tr(Wᵀ S'_xy) + tr(Wᵀ S'_xx W) + n'‖μ'_y − b − Wᵀμ'_x‖², SST = tr S'_yy.

    Args:
        train, test: Accumulators over the same columns (anything with ``n``, ``mean``, ``scatter``).
        x_idx: Long tensor, the predictor columns (may be empty: intercept-only model).
        y_idx: Long tensor, the target columns.
        ridge: Regularisation relative to the mean eigenvalue of S_xx.

    Returns:
        1 − SSE/SST (NaN when the test targets have no variance or either split is empty).
    """
    if train.n == 0 or test.n == 0:
        return float("nan")
    s, m = train.scatter.cpu(), train.mean.cpu()
    st, mt = test.scatter.cpu(), test.mean.cpu()
    sst = float(torch.trace(st[y_idx][:, y_idx]))
    if sst <= 0:
        return float("nan")
    sxx = s[x_idx][:, x_idx]
    scale = float(torch.trace(sxx)) / max(x_idx.numel(), 1)
    if x_idx.numel() == 0 or scale <= 0:
        resid = mt[y_idx] - m[y_idx]
        return 1.0 - (sst + test.n * float(resid @ resid)) / sst
    w = torch.linalg.solve(sxx + ridge * scale * torch.eye(x_idx.numel(), dtype=sxx.dtype), s[x_idx][:, y_idx])
    b = m[y_idx] - w.T @ m[x_idx]
    resid = mt[y_idx] - b - w.T @ mt[x_idx]
    sse = (
        sst
        - 2 * float(torch.sum(w * st[x_idx][:, y_idx]))
        + float(torch.sum(w * (st[x_idx][:, x_idx] @ w)))
        + test.n * float(resid @ resid)
    )
    return 1.0 - sse / sst


def mean_pair_cosine(x: torch.Tensor) -> tuple[float, int]:
    """Mean cosine of consecutive row pairs (0,1), (2,3), …; zero-norm rows give cosine 0. Returns (mean, pairs)."""
    n = x.shape[0] // 2
    if n == 0:
        return float("nan"), 0
    a, b = x[0 : 2 * n : 2].double(), x[1 : 2 * n : 2].double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)
    return float(cos.mean()), n


def per_position_profile(acc: Any, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From an accumulator over [x, onehot(position), position]: (counts (P,), per-position means of x (P, d)).

    Unseen positions get NaN means.
    """
    mu = acc.mean.cpu()
    n = acc.n
    P = acc.d - d - 1
    counts = mu[d : d + P] * n
    sums = acc.scatter.cpu()[:d, d : d + P] + n * torch.outer(
        mu[:d], mu[d : d + P]
    )  # Σ_t x_t y_tᵀ: column p = Σ_{pos=p} x_t
    means = (sums / counts.clamp(min=1e-12)).T
    means[counts < 0.5] = float("nan")
    return counts.round(), means


# --- accumulator ----------------------------------------------------------------------------------------------------
class PositionMoments:
    """Streamed moments of z = [x (d), onehot(position) (P), position index (1)] without the one-hot block's cost.

    Keeps a :class:`StreamingCovariance` over [x, position] (O(N·d²) per batch) and per-position sums and counts
    (O(N·d)); ``mean`` and ``scatter`` of the full (d + P + 1)-wide z are assembled on demand:
    S_{x,p} = Σ_{pos=p} x − c_p μ_x, S_{p,q} = δ_pq c_p − c_p c_q / n, S_{pos,p} = c_p (p − μ_pos).

    Attributes:
        d: Width of z (d_x + P + 1), so it can stand in for a :class:`StreamingCovariance`.
    """

    def __init__(self, d_x: int, n_positions: int) -> None:
        self.d_x, self.P, self.d = d_x, n_positions, d_x + n_positions + 1
        self.xp = StreamingCovariance(d_x + 1)
        self.sums = torch.zeros(n_positions, d_x, dtype=torch.float64)
        self.counts = torch.zeros(n_positions, dtype=torch.float64)

    @property
    def n(self) -> int:
        return self.xp.n

    def update(self, x: torch.Tensor, pos: torch.Tensor) -> None:
        """Add rows x (N, d_x) at positions ``pos`` (N,) (already clipped to P − 1), on their device."""
        if x.shape[0] == 0:
            return
        if self.sums.device != x.device:  # moved once, while still zero
            self.sums, self.counts = self.sums.to(x.device), self.counts.to(x.device)
        xd = x.double()
        self.xp.update(torch.cat([xd, pos.double()[:, None]], 1))
        self.sums.index_add_(0, pos, xd)
        self.counts += torch.bincount(pos, minlength=self.P).double()

    def merge(self, other: PositionMoments) -> None:
        self.xp.merge(other.xp)
        if self.sums.device != other.sums.device:
            self.sums, self.counts = self.sums.to(other.sums.device), self.counts.to(other.sums.device)
        self.sums += other.sums
        self.counts += other.counts

    @property
    def mean(self) -> torch.Tensor:
        """(d,) mean of z, on the host."""
        mu = self.xp.mean.cpu()
        return torch.cat([mu[: self.d_x], self.counts.cpu() / max(self.n, 1), mu[self.d_x :]])

    @property
    def scatter(self) -> torch.Tensor:
        """(d, d) centred scatter of z, on the host."""
        dx, P, n = self.d_x, self.P, max(self.n, 1)
        sa, mu = self.xp.scatter.cpu(), self.xp.mean.cpu()
        c = self.counts.cpu()
        out = torch.zeros(self.d, self.d, dtype=torch.float64)
        out[:dx, :dx] = sa[:dx, :dx]
        out[:dx, -1] = out[-1, :dx] = sa[:dx, dx]
        out[-1, -1] = sa[dx, dx]
        sxp = self.sums.cpu().T - torch.outer(mu[:dx], c)
        out[:dx, dx : dx + P], out[dx : dx + P, :dx] = sxp, sxp.T
        out[dx : dx + P, dx : dx + P] = torch.diag(c) - torch.outer(c, c) / n
        spp = c * (torch.arange(P, dtype=torch.float64) - mu[dx])
        out[-1, dx : dx + P] = out[dx : dx + P, -1] = spp
        return out

    @property
    def cov(self) -> torch.Tensor:
        return self.scatter / max(self.n, 1)


class _Reservoir:
    """Bottom-k-by-hash sample of one vector per sentence: deterministic, order-independent, bounded memory.

    The rows may carry leading dimensions (every layer's vector of the same tokens, ``(L, m, d)``): the keys, and so
    the selection, are shared along them.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.keys = torch.zeros(0, dtype=torch.float64)
        self.rows: torch.Tensor | None = None

    def offer(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Offer ``rows`` (..., m, d) under ``keys`` (m,)."""
        rows = rows.detach().float()
        allk = torch.cat([self.keys.to(keys.device), keys])
        allr = rows if self.rows is None else torch.cat([self.rows, rows], -2)
        order = torch.argsort(allk)[: self.k]
        self.keys, self.rows = allk[order], allr[..., order, :]


class OutlierAccumulator(Accumulator):
    """Counts, per-position moments and an anisotropy sample per layer (memory O(L·(d + P)²), bounded)."""

    def __init__(
        self, names: list[str], d_model: int, n_positions: int, params: Outliers.Params, ctx: AnalysisContext
    ) -> None:
        self.names, self.d, self.P, self.p, self.ctx = names, d_model, n_positions, params, ctx
        L = len(names)
        self.count_max = torch.zeros(L, d_model, dtype=torch.long)
        self.count_min = torch.zeros(L, d_model, dtype=torch.long)
        self.n = 0
        self.joint = {(l, s): PositionMoments(d_model, n_positions) for l in range(L) for s in ("train", "test")}
        self.sample = _Reservoir(params.anisotropy_sentences)  # rows (L, m, d): one token per sentence, every layer
        self._sums: torch.Tensor | None = None  # (L, 2, P, d): joint[(l, split)].sums are its slices

    def update(self, batch: CaptureBatch) -> None:
        """Argmax/argmin counts, [x, onehot(position), position] moments and the anisotropy sample, vectorised per
        layer."""
        if batch.variant != "clean":
            return
        dev = batch[self.names[0]].device  # everything below stays on the activations' device
        sel = (batch.attention_mask.bool() if self.p.include_special else batch.token_mask).to(dev)
        B, T = sel.shape
        pos = torch.arange(T, device=dev).expand(B, T)[sel].clamp(max=self.P - 1)
        sids = batch.sentence_ids.to(device=dev, dtype=torch.long)
        split_test = hash_uniform_like(sids, seed=self.p.seed) < 0.5
        is_test = split_test[:, None].expand(B, T)[sel]
        pick, pick_rows = self._pick_tokens(sel, sids)
        keys = hash_uniform_like(sids[pick_rows], seed=self.p.seed + 2)
        self.n += int(sel.sum())
        if self.count_max.device != dev:  # moved once, while still zero
            self.count_max, self.count_min = self.count_max.to(dev), self.count_min.to(dev)
        L, d = len(self.names), self.d
        h = torch.stack([batch[name][sel] for name in self.names]).float()  # (L, N, d): every layer at once
        if h.shape[1]:
            offset = (torch.arange(L, device=dev) * d)[:, None]  # one bincount over (layer, dim) cells
            self.count_max += torch.bincount((h.argmax(-1) + offset).flatten(), minlength=L * d).view(L, d)
            self.count_min += torch.bincount((h.argmin(-1) + offset).flatten(), minlength=L * d).view(L, d)
            self._add_position_sums(h, pos, is_test)
        for split, rows in (("train", ~is_test), ("test", is_test)):
            x = h[:, rows]
            z = torch.cat([x, pos[rows].to(x.dtype)[None, :, None].expand(L, -1, 1)], -1)  # [x, position]
            StreamingCovariance.update_group([self.joint[(l, split)].xp for l in range(L)], z)
        self.sample.offer(keys, torch.stack([batch[name][pick] for name in self.names]))

    def _add_position_sums(self, h: torch.Tensor, pos: torch.Tensor, is_test: torch.Tensor) -> None:
        """Per-position sums and counts of every layer and split in one ``index_add_`` and one ``bincount``."""
        L, d, P = len(self.names), self.d, self.P
        if self._sums is None or self._sums.device != h.device:  # allocated once, on the batches' device
            self._sums = torch.zeros(L, 2, P, d, dtype=torch.float64, device=h.device)
            for l in range(L):
                for k, split in enumerate(("train", "test")):
                    self.joint[(l, split)].sums = self._sums[l, k]
                    self.joint[(l, split)].counts = self.joint[(l, split)].counts.to(h.device)
        cell = pos + P * is_test.long()  # (split, position) of every token
        self._sums.view(L, 2 * P, d).index_add_(1, cell, h.double())
        counts = torch.bincount(cell, minlength=2 * P).double()
        for l in range(L):
            self.joint[(l, "train")].counts += counts[:P]
            self.joint[(l, "test")].counts += counts[P:]

    def _pick_tokens(self, sel: torch.Tensor, sids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One seeded random selected token per sentence: (B, T) pick mask and the batch rows that have one."""
        k = sel.sum(1)
        target = torch.floor(hash_uniform_like(sids, seed=self.p.seed + 1) * k).long()
        rank = sel.long().cumsum(1) - 1
        pick = sel & (rank == target[:, None])
        return pick, (k > 0).nonzero().squeeze(1)

    # --- result --------------------------------------------------------------------------------------------------
    def result(self) -> dict[str, pd.DataFrame]:
        """Tables ``freq``, ``top``, ``moments``, ``ln``, ``pe_dims``, ``position_link``, ``position_probe``,
        ``anisotropy``, ``notes`` (see the module docstring)."""
        with serial_when_threads_sleep():  # small solves and (d + P)-wide matrices
            return self._result()

    def _result(self) -> dict[str, pd.DataFrame]:
        notes: list[dict[str, str]] = []
        freq = self._freq_table()
        act_dims = detect_activation_outliers(freq, self.p.freq_threshold)
        notes.append({"key": "activation_outlier_dims", "value": " ".join(map(str, act_dims))})
        notes.append({"key": "n_tokens", "value": str(self.n)})
        ln, ln_dims = self._ln_tables(notes)
        merged = [self._merged(l) for l in range(len(self.names))]
        top = top_dims_table(freq, self.p.top_k)
        candidates = sorted(set(act_dims) | set(ln_dims) | set(top[top["rank"] == 1]["dim"].tolist()))
        pe_dims, link = self._position_tables(merged, candidates, notes)
        return {
            "freq": freq,
            "top": top,
            "moments": self._moments(merged),
            "ln": ln,
            "pe_dims": pe_dims,
            "position_link": link,
            "position_probe": self._probe_table(act_dims),
            "anisotropy": self._anisotropy_table(merged, act_dims),
            "notes": pd.DataFrame(notes),
        }

    def _merged(self, l: int) -> PositionMoments:
        acc = PositionMoments(self.d, self.P)
        acc.merge(self.joint[(l, "train")])
        acc.merge(self.joint[(l, "test")])
        return acc

    def _freq_table(self) -> pd.DataFrame:
        rows = []
        n = max(self.n, 1)
        for kind, counts in (("argmax", self.count_max.cpu()), ("argmin", self.count_min.cpu())):
            l_idx, d_idx = counts.nonzero(as_tuple=True)
            c = counts[l_idx, d_idx]
            rows.append(
                pd.DataFrame(
                    {
                        "layer": l_idx.numpy(),
                        "dim": d_idx.numpy(),
                        "kind": kind,
                        "count": c.numpy(),
                        "freq": (c.double() / n).numpy(),
                        "n_tokens": self.n,
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)

    def _moments(self, merged: list[PositionMoments]) -> pd.DataFrame:
        frames = []
        for l, acc in enumerate(merged):
            var = torch.diagonal(acc.cov)[: self.d].clamp(min=0)
            frames.append(
                pd.DataFrame(
                    {
                        "layer": l,
                        "dim": np.arange(self.d),
                        "mean": acc.mean[: self.d].cpu().numpy(),
                        "std": var.sqrt().cpu().numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def _ln_tables(self, notes: list[dict[str, str]]) -> tuple[pd.DataFrame, list[int]]:
        lns, reason = output_layernorms(self.ctx)
        if reason:
            notes.append({"key": "ln_rule", "value": f"skipped: {reason}"})
            return pd.DataFrame(columns=["layer", "dim", "param", "value", "zscore"]), []
        rows = []
        for l, (g, b) in enumerate(lns):
            for param, w in (("gamma", g), ("beta", b)):
                flags, z = three_sigma_flags(w, self.p.ln_n_std)
                rows += [
                    {"layer": l, "dim": int(d), "param": param, "value": float(w[d]), "zscore": float(z[d])}
                    for d in flags.nonzero().squeeze(1).tolist()
                ]
        ln = pd.DataFrame(rows, columns=["layer", "dim", "param", "value", "zscore"])
        need = self.p.ln_layer_fraction * len(lns)
        g = ln[ln["param"] == "gamma"].groupby("dim")["layer"].nunique()
        dims = sorted(int(d) for d in g[g > need].index)
        notes.append(
            {
                "key": "ln_rule",
                "value": f"|gamma - mean| > {self.p.ln_n_std:g} std in > "
                f"{self.p.ln_layer_fraction:g} x {len(lns)} layers",
            }
        )
        notes.append({"key": "ln_outlier_dims", "value": " ".join(map(str, dims))})
        return ln, dims

    def _position_tables(
        self, merged: list[PositionMoments], candidates: list[int], notes: list[dict[str, str]]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        pe, offset, reason = position_embedding_matrix(self.ctx)
        if reason:
            notes.append({"key": "position_link", "value": f"skipped: {reason}"})
        pe_rows = []
        if pe is not None:
            rows = pe[offset : offset + self.P]
            amax, amin = rows.argmax(1), rows.argmin(1)
            _, z0 = three_sigma_flags(rows[0])
            order0 = torch.argsort(rows[0].abs(), descending=True)
            rank0 = torch.empty_like(order0)
            rank0[order0] = torch.arange(len(order0))
            pe_rows = [
                {
                    "dim": d,
                    "pe_argmax_frac": float((amax == d).double().mean()),
                    "pe_argmin_frac": float((amin == d).double().mean()),
                    "pe_value_pos0": float(rows[0, d]),
                    "pe_z_pos0": float(z0[d]),
                    "pe_absrank_pos0": int(rank0[d]) + 1,
                }
                for d in candidates
            ]
        link = []
        for l, acc in enumerate(merged):
            counts, means = per_position_profile(acc, self.d)
            seen = counts > 0
            var = torch.diagonal(acc.scatter.cpu())[: self.d]
            mu = acc.mean.cpu()[: self.d]
            # a dim whose variance is at rounding level (the numerical_tolerance rule, per dim) is constant
            varies = var > acc.d * float(np.finfo(np.float64).eps) * (var + acc.n * mu**2)
            between = (counts[seen, None] * (means[seen] - mu) ** 2).sum(0)
            for d in candidates:
                row = {
                    "layer": l,
                    "dim": d,
                    "eta2": float(between[d] / var[d]) if varies[d] else 0.0,
                    "pe_corr": float("nan"),
                    "n_positions": int(seen.sum()),
                }
                if pe is not None and int(seen.sum()) > 2 and varies[d]:
                    row["pe_corr"] = _pearson(means[seen, d], pe[offset : offset + self.P][seen, d])
                link.append(row)
        return (
            pd.DataFrame(
                pe_rows,
                columns=["dim", "pe_argmax_frac", "pe_argmin_frac", "pe_value_pos0", "pe_z_pos0", "pe_absrank_pos0"],
            ),
            pd.DataFrame(link),
        )

    def _keep(self, drop: list[int]) -> torch.Tensor:
        keep = torch.ones(self.d, dtype=torch.bool)
        keep[list(drop)] = False
        return keep

    def _probe_table(self, act_dims: list[int]) -> pd.DataFrame:
        targets = {"onehot": torch.arange(self.d, self.d + self.P), "index": torch.tensor([self.d + self.P])}
        rows = []
        for l in range(len(self.names)):
            tr, te = self.joint[(l, "train")], self.joint[(l, "test")]
            for cond, drop in (("all_dims", []), ("without_outliers", act_dims)):
                x_idx = self._keep(drop).nonzero().squeeze(1)
                for target, y_idx in targets.items():
                    rows.append(
                        {
                            "layer": l,
                            "condition": cond,
                            "target": target,
                            "r2": ridge_heldout_r2(tr, te, x_idx, y_idx, self.p.probe_ridge),
                            "n_train": tr.n,
                            "n_test": te.n,
                            "removed_dims": " ".join(map(str, drop)),
                        }
                    )
        return pd.DataFrame(rows)

    def _anisotropy_table(self, merged: list[PositionMoments], act_dims: list[int]) -> pd.DataFrame:
        rows = []
        for l in range(len(self.names)):
            x = self.sample.rows[l].cpu() if self.sample.rows is not None else torch.zeros(0, self.d)
            acc = merged[l]
            std = torch.diagonal(acc.cov)[: self.d].clamp(min=0).sqrt().float().cpu()
            variants = {
                "raw": x,
                "clipped": x * self._keep(act_dims).float(),
                "standardised": (x - acc.mean[: self.d].float().cpu()) / std.where(std > 0, torch.ones(())),
            }
            for cond, v in variants.items():
                val, n = mean_pair_cosine(v)
                rows.append(
                    {
                        "layer": l,
                        "condition": cond,
                        "value": val,
                        "n_pairs": n,
                        "removed_dims": " ".join(map(str, act_dims)) if cond == "clipped" else "",
                    }
                )
        return pd.DataFrame(rows)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else float("nan")


def detect_activation_outliers(freq: pd.DataFrame, threshold: float) -> list[int]:
    """Dims whose argmax or argmin frequency reaches ``threshold`` in at least one non-input layer (layer ≥ 1)."""
    hit = freq[(freq["layer"] >= 1) & (freq["freq"] >= threshold)]
    return sorted(int(d) for d in hit["dim"].unique())


def top_dims_table(freq: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per layer and kind, the ``k`` most frequent argmax/argmin dims (rank 1 = most frequent)."""
    if freq.empty:
        return pd.DataFrame(columns=["layer", "kind", "rank", "dim", "freq"])
    f = freq.sort_values(["layer", "kind", "freq", "dim"], ascending=[True, True, False, True])
    f = f.groupby(["layer", "kind"], sort=False).head(k).copy()
    f["rank"] = f.groupby(["layer", "kind"]).cumcount() + 1
    return f[["layer", "kind", "rank", "dim", "freq"]].reset_index(drop=True)


def outlier_emergence(freq: pd.DataFrame, threshold: float = 0.5, min_layers: int = 1) -> pd.DataFrame:
    """When each outlier dimension is born over a trajectory.

    A (dim, kind) is *present* at a step when its ``freq`` ≥ ``threshold`` in at least ``min_layers`` non-input
    layers (layer ≥ 1). ``emergence_step`` = the first checkpoint where it is present; ``stable_from`` = the first
    step from which it stays present through the last checkpoint (NaN if it is absent at the end).

    Args:
        freq: ``freq`` tables of several checkpoints concatenated, with a ``step`` column (as
            ``mlmscope.analyses.store.load_results(run, "outliers", table="freq")`` returns).
        threshold: Frequency threshold (the analysis's ``freq_threshold``, 0.5 by default).
        min_layers: Layers in which it must pass.

    Returns:
        Columns ``dim, kind, emergence_step, stable_from, first_layers, peak_freq, final_freq, n_steps_present``,
        sorted by emergence step.
    """
    if "step" not in freq.columns:
        raise ValueError("outlier_emergence needs the concatenated per-checkpoint tables with a `step` column")
    cols = [
        "dim",
        "kind",
        "emergence_step",
        "stable_from",
        "first_layers",
        "peak_freq",
        "final_freq",
        "n_steps_present",
    ]
    f = freq[freq["layer"] >= 1]
    steps = sorted(freq["step"].unique())
    if f.empty or not steps:
        return pd.DataFrame(columns=cols)
    hit = f[f["freq"] >= threshold]
    n_layers = hit.groupby(["dim", "kind", "step"])["layer"].nunique()
    present = n_layers[n_layers >= min_layers].reset_index()[["dim", "kind", "step"]]
    best = f.groupby(["dim", "kind", "step"])["freq"].max()
    last = steps[-1]
    rows = []
    for key, g in present.groupby(["dim", "kind"]):
        d, kind = cast(tuple[int, str], key)  # pandas-stubs types group keys as Hashable
        on = set(g["step"])
        first = min(on)
        stable = np.nan
        for s in reversed(steps):
            if s not in on:
                break
            stable = s
        layers = hit[(hit["dim"] == d) & (hit["kind"] == kind) & (hit["step"] == first)]["layer"]
        per = best.loc[(d, kind)]
        rows.append(
            {
                "dim": int(d),
                "kind": kind,
                "emergence_step": first,
                "stable_from": stable,
                "first_layers": " ".join(map(str, sorted(layers.unique()))),
                "peak_freq": float(per.max()),
                "final_freq": float(per.get(last, 0.0)),
                "n_steps_present": len(on),
            }
        )
    return pd.DataFrame(rows, columns=cols).sort_values(["emergence_step", "dim", "kind"]).reset_index(drop=True)


@register
class Outliers(Analysis):
    """Positional outlier neurons (Luo et al. 2021): detection, LayerNorm-γ rule, position link, anisotropy."""

    name = "outliers"
    version = "1"
    description = "positional outlier dims: argmax/argmin frequency, LN-gamma 3-sigma, position link, anisotropy"
    variants = ("clean",)

    @dataclass
    class Params(Analysis.Params):
        """Options (double as CLI options; hashed into the results key).

        Attributes:
            freq_threshold: argmax/argmin frequency that makes a dim an activation outlier (0.5 = majority).
            top_k: Dims listed per layer and kind in ``top``.
            ln_n_std: σ multiple of the LayerNorm rule (3, Kovaleva et al. 2021).
            ln_layer_fraction: A dim is an LN outlier when flagged in more than this fraction of layers (0.25 =
                "more than 3 of 12").
            include_special: Count [CLS]/[SEP] vectors too (Luo's BERT artefact is tied to position 0 = [CLS]).
            max_positions: Positions tracked for the link and probe (later positions share the last bucket).
            probe_ridge: Ridge strength of the position probe, relative to the mean eigenvalue of S_xx.
            anisotropy_sentences: Sentences sampled (one token each) for anisotropy (2000 → 1000 pairs, as
                Ethayarajh 2019).
            seed: Seed of the token sample and the probe's train/test split.
        """

        freq_threshold: float = 0.5
        top_k: int = 3
        ln_n_std: float = 3.0
        ln_layer_fraction: float = 0.25
        include_special: bool = False
        max_positions: int = 128
        probe_ridge: float = 1e-3
        anisotropy_sentences: int = 2000
        seed: int = 0

    def names(self, ctx: AnalysisContext) -> list[str]:
        return residual_stream_names(ctx.n_layers)

    def accumulator(self, ctx: AnalysisContext) -> OutlierAccumulator:
        p = self.params
        if not 0.0 < p.freq_threshold <= 1.0:
            raise OutlierParamsError(f"outliers: freq_threshold must be in (0, 1], got {p.freq_threshold}")
        if p.max_positions < 2 or p.anisotropy_sentences < 2 or p.top_k < 1:
            raise OutlierParamsError("outliers: max_positions and anisotropy_sentences must be >= 2, top_k >= 1")
        n_pos = p.max_positions
        arch = ctx.arch
        if arch is not None and getattr(arch, "max_length", None):
            n_pos = min(n_pos, int(arch.max_length))
        return OutlierAccumulator(self.names(ctx), ctx.d_model, n_pos, p, ctx)
