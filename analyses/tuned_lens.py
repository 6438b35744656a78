"""Tuned lens for masked language models, with warm starts across a checkpoint trajectory.

Reference: Belrose et al., arXiv 2303.08112 (recipe; code AlignmentResearch/tuned-lens) and docs/notes/depth.md
("Tuned lens over a trajectory (warm starts)").

* One affine translator per hidden state except the last (embedding output and blocks 0 … L−2; L translators):
  h′ = h + (A h + b), A and b initialised to zero, i.e. the translator starts as the identity = the logit lens.
* Decoded through the full MLM head (``mlmscope.analyses.lens.decode_hidden``; final norm recomputed for pre-LN models).
* Loss: KL(p_final ‖ q_lens) against the model's own final distribution at the same **masked** position (the
  tuned-lens ``CE`` option's next-token shift is meaningless for an MLM).
* Optimiser (tuned-lens defaults; docs/notes/depth.md, "Tuned lens"): SGD with Nesterov momentum 0.9, lr = 1.0·(1 −
  0.9), weight decay 1e-3 (pulls towards the identity), gradient clip 1.0, linear lr decay over at most 250 steps, no
  warm-up. mlmscope departs from the recipe in the data (docs/notes/depth.md, "Tuned lens"): a fixed set of masked
  positions of the probe set (capped at ``max_positions``), full-batch steps, and early stopping when the training KL
  plateaus.
* Translators are trained one layer at a time (independent parameters; peak memory O(N·V) for one layer).
* The analysis is ``chained``: across a trajectory the runner (``mlmscope.analyses.runner``) hands each checkpoint
  the result folder of the previous one as ``ctx.previous``, whose ``translators.safetensors`` (written by
  :meth:`TunedLensAccumulator.save_artefacts`) becomes the warm start. In a notebook, pass ``previous=`` any folder
  holding that file (e.g. one written by ``save_artefacts``). With ``compare_cold=True`` the accumulator also fits from
  zero and reports how many optimiser steps the warm start needed to reach the cold fit's final KL; a warm fit whose
  held-out KL is worse than the cold one's by more than ``warm_tolerance`` is replaced by the cold fit
  (docs/notes/depth.md, "Tuned lens over a trajectory (warm starts)").

Public API::

    translators, n_steps, history = fit_tuned_lens(hiddens, final_logits, head_fn, init=None)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..checkpoints.errors import MlmscopeError
from ..probes.batch import CaptureBatch
from .base import Accumulator, Analysis, AnalysisContext, register
from .lens import (
    METRICS,
    FinalRef,
    LensSite,
    LensSums,
    NoMaskedPositionsError,
    check_finite,
    checkpoint_label,
    decode_hidden,
    lens_metric_sums,
    masked_states,
    require_mlm_head,
)

__all__ = [
    "TRANSLATORS_FILE",
    "AffineTranslators",
    "FitConfig",
    "TunedLens",
    "TunedLensAccumulator",
    "TunedLensError",
    "fit_tuned_lens",
    "kl_to_final",
    "load_translators",
    "save_translators",
    "steps_to_reach",
]


#: File name of the fitted translators inside a tuned-lens result folder.
TRANSLATORS_FILE = "translators.safetensors"


class TunedLensError(MlmscopeError, ValueError):
    """A warm start or a saved translator file does not fit this model (message is user-facing)."""


class AffineTranslators(nn.Module):
    """K residual affine translators h ↦ h + h Aₖᵀ + bₖ, zero-initialised (= identity = logit lens).

    Attributes:
        weight: (K, D, D) the Aₖ.
        bias: (K, D) the bₖ.
    """

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, d, d))
        self.bias = nn.Parameter(torch.zeros(n, d))

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def d(self) -> int:
        return self.weight.shape[1]

    def translate(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Apply translator ``k`` to (..., D) hidden states."""
        return h + h @ self.weight[k].T + self.bias[k]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Apply every translator to its layer: (K, N, D) -> (K, N, D)."""
        return h + torch.einsum("kij,knj->kni", self.weight, h) + self.bias[:, None, :]

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> AffineTranslators:
        """Rebuild from a state dict with ``weight`` (K, D, D) and ``bias`` (K, D)."""
        t = cls(*state["weight"].shape[:2])
        t.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
        return t


@dataclass
class FitConfig:
    """Translator optimisation settings (defaults: tuned-lens ``train_loop.py`` SGD recipe of Belrose et al. 2023;
    docs/notes/depth.md, "Tuned lens").

    Attributes:
        optimizer: ``"sgd"`` (Nesterov, tuned-lens default) or ``"adam"`` (tuned-lens Adam option, amsgrad).
        lr: Learning rate; None = recipe default (SGD: 1.0·(1 − momentum); Adam: 1e-3).
        momentum: SGD Nesterov momentum.
        weight_decay: L2 penalty of the optimiser (pulls A, b towards 0, i.e. the translator towards identity).
        grad_clip: Max gradient norm per layer.
        max_steps: Optimiser steps per layer at most (tuned lens: 250; lr decays linearly to 0 there).
        tol: Early stop when the best KL improved by less than ``tol`` (relative) over the last ``patience``
            steps — a mlmscope choice (docs/notes/depth.md, "Tuned lens").
        patience: Window of the plateau test, in steps.
        atol: Absolute floor of the plateau test (nats): gains below it count as a plateau however small the KL.
        chunk: Positions per forward/backward chunk within a full-batch step (memory O(chunk·V); 512 keeps the
            logits of the ``demo`` vocabulary in a 2-core CPU's cache, ~1.7× faster than one 1,024-position pass).
    """

    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    max_steps: int = 250
    tol: float = 1e-3
    patience: int = 20
    atol: float = 0.0
    chunk: int = 512

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            lr = self.lr if self.lr is not None else 1.0 * (1 - self.momentum)
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, nesterov=True, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(
                params, lr=self.lr if self.lr is not None else 1e-3, amsgrad=True, weight_decay=self.weight_decay
            )
        raise TunedLensError(f"unknown tuned-lens optimizer {self.optimizer!r}; choose 'sgd' or 'adam'")


def kl_to_final(logits: torch.Tensor, logp_final: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_final ‖ softmax(logits)), fp32. ``logp_final``: (N, V) log-probabilities."""
    return (logp_final.exp() * (logp_final - torch.log_softmax(logits.float(), -1))).sum(-1).mean()


@contextmanager
def _frozen(modules: list[nn.Module]) -> Iterator[None]:
    """Temporarily stop gradients into the model's parameters (the head is fixed; only translators train)."""
    params = [p for m in modules for p in m.parameters()]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)


def _plateaued(history: list[float], cfg: FitConfig) -> bool:
    """True when the best KL of the last ``patience`` steps beats the best before them by less than ``tol``
    (relative); best-so-far rather than last value, so an oscillating optimiser is not stopped by one bad step."""
    if len(history) <= cfg.patience:
        return False
    before, recent = min(history[: -cfg.patience]), min(history[-cfg.patience :])
    return before - recent <= max(cfg.tol * abs(before), cfg.atol)


def _fit_one(
    h: torch.Tensor,
    logp_final: torch.Tensor,
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    cfg: FitConfig,
) -> tuple[int, list[float]]:
    """Optimise one translator (``weight``/``bias`` leaf tensors, updated in place). Returns (steps, KL history).

    Full-batch steps, computed in chunks of ``cfg.chunk`` positions whose gradients are summed: the same step as
    one big batch, with the (chunk, V) logits cache-sized and peak memory O(chunk·V). The KL is taken as the
    soft-target cross-entropy minus the (constant) final entropy: one fused op, the same value and gradient.
    """
    opt = cfg.make_optimizer([weight, bias])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.max_steps))
    p_final = logp_final.exp()
    n = h.shape[0]
    entropy = float(-(p_final * logp_final).sum() / n)
    chunks = [slice(s, s + cfg.chunk) for s in range(0, n, max(cfg.chunk, 1))]
    history: list[float] = []
    steps = 0
    while True:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        last = steps >= cfg.max_steps  # the final evaluation needs no gradient
        for c in chunks:
            hc = h[c]
            with torch.set_grad_enabled(not last):
                loss = (
                    torch.nn.functional.cross_entropy(
                        head_fn(hc + hc @ weight.T + bias).float(), p_final[c], reduction="sum"
                    )
                    / n
                )
            if not last:
                loss.backward()
            total += float(loss.detach())
        history.append(total - entropy)
        if steps >= cfg.max_steps or _plateaued(history, cfg):
            return steps, history
        torch.nn.utils.clip_grad_norm_([weight, bias], cfg.grad_clip)
        opt.step()
        sched.step()
        steps += 1


def fit_tuned_lens(
    hiddens: torch.Tensor,
    final_logits: torch.Tensor,
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    init: AffineTranslators | dict[str, torch.Tensor] | None = None,
    config: FitConfig | None = None,
    frozen: list[nn.Module] | None = None,
) -> tuple[AffineTranslators, list[int], list[list[float]]]:
    """Fit per-layer affine translators minimising KL(final ‖ lens) at the given positions.

    Args:
        hiddens: (K, N, D) hidden states of the K translated layers at N (masked) positions.
        final_logits: (N, V) the model's final logits at the same positions (the target distribution).
        head_fn: (…, D) -> (…, V) decoding, e.g. ``lambda h: decode_hidden(arch, h)`` (full MLM head).
        init: Warm start (translators or their state dict, K × D must match); None = zero = identity.
        config: Optimisation settings (default :class:`FitConfig`).
        frozen: Modules whose parameters must not receive gradients while fitting (the MLM head / final norm);
            their ``requires_grad`` flags are restored afterwards.

    Returns:
        (translators, n_steps, history): the fitted :class:`AffineTranslators` (on ``hiddens``' device),
        optimiser steps taken per layer, and per layer the full-batch KL before each step and after the last
        (``history[k][s]`` = KL after s steps).

    Raises:
        TunedLensError: ``init`` does not match (K, D).
    """
    cfg = config or FitConfig()
    k_layers, _, d = hiddens.shape
    tr = AffineTranslators(k_layers, d)
    if init is not None:
        state = init.state_dict() if isinstance(init, AffineTranslators) else init
        if tuple(state["weight"].shape) != (k_layers, d, d):
            raise TunedLensError(
                f"warm-start translators have shape {tuple(state['weight'].shape)}, this model needs "
                f"{(k_layers, d, d)} (different depth or width?)"
            )
        tr.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    tr = tr.to(hiddens.device)
    logp_final = torch.log_softmax(final_logits.detach().float(), -1)
    n_steps: list[int] = []
    history: list[list[float]] = []
    with _frozen(frozen or []), torch.enable_grad():
        for k in range(k_layers):
            w = tr.weight.data[k].clone().requires_grad_(True)
            b = tr.bias.data[k].clone().requires_grad_(True)
            steps, hist = _fit_one(hiddens[k].detach().float(), logp_final, head_fn, w, b, cfg)
            tr.weight.data[k], tr.bias.data[k] = w.detach(), b.detach()
            n_steps.append(steps)
            history.append(hist)
    return tr, n_steps, history


def steps_to_reach(history: list[float], target: float, rtol: float = 1e-3) -> int | None:
    """First step s with ``history[s] ≤ target·(1 + rtol)`` (None if never reached)."""
    for s, v in enumerate(history):
        if v <= target * (1 + rtol):
            return s
    return None


def save_translators(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write translator weights (safetensors) with their metadata (JSON strings) atomically; returns the path."""
    from safetensors.torch import save_file

    p = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: json.dumps(v) for k, v in state.items() if not isinstance(v, torch.Tensor)}
    tmp = p.with_name(p.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


def load_translators(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_translators` back into a state dict (tensors + decoded metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state: dict[str, Any] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
            state.update({k: json.loads(v) for k, v in (f.metadata() or {}).items()})
    except (OSError, ValueError) as e:
        raise TunedLensError(f"cannot read tuned-lens translators from {str(path)!r}: {e}") from None
    return state


class TunedLensAccumulator(Accumulator):
    """Collects masked-position hidden states (capped), fits the translators in :meth:`result`, scores both lenses.

    Memory: at most ``max_positions`` × (L + 1) × D floats of hidden states (bounded, independent of the probe-set
    size), plus O(N·V) while fitting one layer.
    """

    def __init__(
        self,
        arch: Any,
        n_layers: int,
        params: TunedLens.Params,
        label: str,
        device: str,
        init: dict[str, Any] | None,
        frozen: list[nn.Module],
    ) -> None:
        self.arch = arch
        self.params = params
        self.label = label
        self.device = device
        self.init = init
        self.frozen = frozen
        self.sites = [LensSite("embed.hook_out", -1, "embed", 0.0)] + [
            LensSite(f"blocks.{l}.hook_resid_post", l, "resid_post", l + 1.0) for l in range(n_layers)
        ]
        self._h: dict[str, list[torch.Tensor]] = {"train": [], "heldout": []}
        self._gold: dict[str, list[torch.Tensor]] = {"train": [], "heldout": []}
        self._n = 0
        self._state: dict[str, Any] | None = None

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        return decode_hidden(self.arch, h)

    def update(self, batch: CaptureBatch) -> None:
        room = self.params.max_positions - self._n
        if room <= 0 or not bool(batch.masked_mask.any()):
            return
        hs, gold = masked_states(batch, [s.name for s in self.sites])
        check_finite(hs[-1], f"the final layer ({self.sites[-1].name}) at masked positions", self.label)
        rows = batch.masked_mask.to(hs.device).nonzero()[:, 0]
        held = (
            (batch.sentence_ids.to(hs.device)[rows] % self.params.heldout_every == 0)
            if self.params.heldout_every
            else (torch.zeros_like(rows, dtype=torch.bool))
        )
        hs, gold, held = hs[:, :room], gold[:room], held[:room]
        for split, sel in (("train", ~held), ("heldout", held)):
            self._h[split].append(hs[:, sel].float())
            self._gold[split].append(gold[sel])
        self._n += int(gold.numel())

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat(self._h[split], 1).to(self.device), torch.cat(self._gold[split]).to(self.device))

    def _score(self, hs: torch.Tensor, gold: torch.Tensor, tr: AffineTranslators | None) -> LensSums:
        stats = LensSums(len(self.sites))
        with torch.no_grad():
            ref = FinalRef.from_logits(self._decode(hs[-1]))
            sums = [
                lens_metric_sums(self._decode(h if tr is None or k >= tr.n else tr.translate(k, h)), ref, gold)
                for k, h in enumerate(hs)
            ]
        stats.add({m: torch.cat([s[m] for s in sums]) for m in METRICS}, int(gold.numel()))
        return stats

    def _fit(self, hs: torch.Tensor, init: dict[str, Any] | None) -> tuple[AffineTranslators, list[int], list]:
        with torch.no_grad():
            final = self._decode(hs[-1])
        return fit_tuned_lens(
            hs[:-1], final, self._decode, init=init, config=self.params.fit_config(), frozen=self.frozen
        )

    def result(self) -> dict[str, pd.DataFrame]:
        if self._n == 0:
            raise NoMaskedPositionsError(
                "tuned_lens: the probe set has no masked positions with a gold label (variant 'mask15'); "
                "rebuild the masked probe variant or use a probe set with non-special tokens"
            )
        train_h, _ = self._split("train")
        eval_split = "heldout" if sum(g.numel() for g in self._gold["heldout"]) else "train"
        eval_h, eval_gold = self._split(eval_split)
        tr, steps, hist = self._fit(train_h, self.init)
        init_src = "warm" if self.init is not None else "zero"
        fit = pd.DataFrame(
            {
                "translator": range(tr.n),
                "block": [s.block for s in self.sites[:-1]],
                "init": init_src,
                "steps": steps,
                "train_kl": [h[-1] for h in hist],
                "train_kl_start": [h[0] for h in hist],
            }
        )
        if self.init is not None:
            prev = torch.as_tensor(self.init["weight"]).to(tr.weight.device)
            fit["drift_fro"] = torch.linalg.matrix_norm(tr.weight.data - prev).cpu().numpy()
        tuned = self._score(eval_h, eval_gold, tr)
        if self.init is not None and self.params.compare_cold:
            tr, fit, tuned = self._compare_cold(train_h, eval_h, eval_gold, tr, fit, tuned, hist)
        self._state = {
            "weight": tr.weight.data.cpu(),
            "bias": tr.bias.data.cpu(),
            "checkpoint": self.label,
            "init": str(fit["init"].iloc[0]),
            "steps": [int(s) for s in steps],
            "n_train": int(train_h.shape[1]),
        }
        logit = self._score(eval_h, eval_gold, None)
        per_layer = pd.concat(
            [
                logit.frame(self.sites, lens="logit", eval_split=eval_split),
                tuned.frame(self.sites, lens="tuned", eval_split=eval_split),
            ],
            ignore_index=True,
        )
        fit["n_train"] = int(train_h.shape[1])
        return {"per_layer": per_layer, "fit": fit}

    def _compare_cold(self, train_h, eval_h, eval_gold, warm_tr, fit, warm_scores, warm_hist):
        """Fit from zero too; record steps-to-cold-KL; fall back to the cold fit if the warm one is worse."""
        cold_tr, cold_steps, cold_hist = self._fit(train_h, None)
        cold_scores = self._score(eval_h, eval_gold, cold_tr)
        fit["cold_steps"] = cold_steps
        fit["cold_train_kl"] = [h[-1] for h in cold_hist]
        fit["warm_steps_to_cold_kl"] = [steps_to_reach(w, c[-1]) for w, c in zip(warm_hist, cold_hist)]
        n = len(self.sites) - 1
        warm_kl, cold_kl = warm_scores.mean("kl")[:n], cold_scores.mean("kl")[:n]
        fit["heldout_kl_warm"], fit["heldout_kl_cold"] = warm_kl.numpy(), cold_kl.numpy()
        if bool((warm_kl > cold_kl * (1 + self.params.warm_tolerance) + 1e-9).any()):
            fit["init"] = "zero (warm start rejected)"
            return cold_tr, fit, cold_scores
        return warm_tr, fit, warm_scores

    def translator_state(self) -> dict[str, Any] | None:
        """Fitted translators + metadata (after :meth:`result`): pass as the next checkpoint's warm start, or save
        beside the results with :func:`save_translators`."""
        return self._state

    def save_artefacts(self, folder: Path) -> None:
        """Write the fitted translators into the result folder (called by the runner's store before the rename)."""
        if self._state is not None:
            save_translators(self._state, Path(folder) / TRANSLATORS_FILE)


@register
class TunedLens(Analysis):
    """Tuned lens (affine translators, KL to the final distribution at masked positions), warm-started over steps."""

    name = "tuned_lens"
    version = "1"
    description = (
        "Tuned lens for MLMs at [MASK] positions (warm-started across checkpoints), side by side with the logit lens"
    )
    variants = ("mask15",)
    needs_mlm_head = True
    chained = True

    @dataclass
    class Params(Analysis.Params):
        """Options of the tuned lens (see :class:`FitConfig` for the optimiser fields).

        Attributes:
            max_positions: Masked positions kept for fitting + evaluation (bounds memory; keep ≫ d_model;
                docs/notes/depth.md, "Tuned lens").
            max_steps, tol, patience: At most 100 steps (tuned-lens uses 250), stopped when the training KL improved
                by less than 1 % over the last 10 steps. On 1,024 positions longer fits overfit: along a warm-started
                chain of five ``demo`` checkpoints (10,800–12,000) the held-out KL of the embedding translator was
                0.91–1.07 with this rule (10–31 steps, 9.9 s for the chain) and 0.95–1.21 with the stricter
                0.1 %/20 steps (48–99 steps, 41.6 s). ``atol`` (nats per 10 steps) ends the fits that chase
                KLs of ~1e-4 on the loss plateau, where a relative rule never fires (80–100 steps at steps 16–2,100
                of the demo run without it).
            heldout_every: Sentences with ``sentence_id % heldout_every == 0`` are held out for evaluation
                (0 = evaluate on the training positions).
            compare_cold: With a warm start, also fit from zero and report the step saving (doubles the cost).
            warm_tolerance: A warm fit whose held-out KL exceeds the cold one's by more than this fraction is
                replaced by the cold fit (docs/notes/depth.md, "Tuned lens over a trajectory (warm starts)").
        """

        max_positions: int = 1024
        heldout_every: int = 5
        optimizer: str = "sgd"
        lr: float | None = None
        max_steps: int = 100
        tol: float = 1e-2
        patience: int = 10
        atol: float = 1e-4
        weight_decay: float = 1e-3
        compare_cold: bool = False
        warm_tolerance: float = 0.02

        def fit_config(self) -> FitConfig:
            return FitConfig(
                optimizer=self.optimizer,
                lr=self.lr,
                max_steps=self.max_steps,
                tol=self.tol,
                patience=self.patience,
                atol=self.atol,
                weight_decay=self.weight_decay,
            )

    def names(self, ctx: AnalysisContext) -> list[str]:
        return ["embed.hook_out"] + [f"blocks.{l}.hook_resid_post" for l in range(ctx.n_layers)]

    def accumulator(self, ctx: AnalysisContext) -> TunedLensAccumulator:
        arch = require_mlm_head(ctx, self.name)
        warm = ctx.previous / TRANSLATORS_FILE if ctx.previous is not None else None
        init = load_translators(warm) if warm is not None and warm.exists() else None
        if init is not None and tuple(init["weight"].shape) != (ctx.n_layers, ctx.d_model, ctx.d_model):
            init = None  # another architecture (e.g. a foreign checkpoint in the folder): cold start
        norm = arch.final_norm()
        frozen = [arch.mlm_head()] + ([norm] if norm is not None else [])
        return TunedLensAccumulator(arch, ctx.n_layers, self.params, checkpoint_label(ctx), ctx.device, init, frozen)
