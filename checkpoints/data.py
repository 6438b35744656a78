"""Packed MLM training data: tokenise once, pack into full sequences, and make each step's batch a pure function
of (data_seed, step) so that a resumed run sees exactly the batches and masks an uninterrupted run would.

Packing: documents are tokenised without special tokens, concatenated with [SEP] between documents, cut into
chunks of ``seq_len - 2`` and wrapped as ``[CLS] chunk [SEP]``. Every sequence is full, so training needs no
padding mask (one of the speed levers, see README "Benchmark").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import MlmscopeError


class DataError(MlmscopeError, ValueError):
    """The corpus cannot feed the requested training configuration (user-facing message)."""


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Tokenise and pack documents into an (N, seq_len) int64 tensor of full sequences."""
    if seq_len < 8:
        raise DataError(f"seq_len={seq_len} is too short")
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    sep = tokenizer.sep_token_id
    flat = np.fromiter((t for ids in enc for t in (*ids, sep)), dtype=np.int64)
    body = seq_len - 2
    n = len(flat) // body
    if n == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    chunks = torch.from_numpy(flat[: n * body].reshape(n, body))
    cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
    end = torch.full((n, 1), sep, dtype=torch.long)
    return torch.cat([cls, chunks, end], dim=1)


@dataclass
class Masker:
    """BERT masking: choose ``rate`` of the non-special positions; replace 80/10/10 ([MASK]/random/same) or 100 %.

    Attributes:
        mask_id, vocab_size: token ids; ``special_ids`` are never chosen or sampled as random replacements.
    """

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    rate: float = 0.15
    replace: str = "80/10/10"

    def __call__(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (masked input ids, labels with -100 at unselected positions)."""
        special = torch.zeros_like(ids, dtype=torch.bool)
        for s in self.special_ids:
            special |= ids == s
        u = torch.rand(ids.shape, generator=gen)
        chosen = (u < self.rate) & ~special
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        out = ids.clone()
        if self.replace == "mask":
            out[chosen] = self.mask_id
            return out, labels
        if self.replace != "80/10/10":
            raise DataError(f"mask_replace must be '80/10/10' or 'mask', not {self.replace!r}")
        r = torch.rand(ids.shape, generator=gen)
        rand_tok = torch.randint(len(self.special_ids), self.vocab_size, ids.shape, generator=gen)
        out[chosen & (r < 0.8)] = self.mask_id
        swap = chosen & (r >= 0.8) & (r < 0.9)
        out[swap] = rand_tok[swap]
        return out, labels


class StepBatches:
    """Deterministic batches: step ``s`` takes global samples ``[s*G, (s+1)*G)`` of an epoch-wise permutation.

    ``G`` = batch_size × grad_accum × world_size; rank ``r`` gets its contiguous share. The permutation of epoch
    ``e`` is seeded by (data_seed, e), the masks of step ``s`` by (data_seed, s) — nothing to save for resume.
    """

    def __init__(
        self,
        data: torch.Tensor,
        masker: Masker,
        batch_size: int,
        grad_accum: int = 1,
        data_seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data, self.masker = data, masker
        self.micro, self.accum, self.seed = batch_size, grad_accum, data_seed
        self.rank, self.world = rank, world_size
        self.global_batch = batch_size * grad_accum * world_size
        if len(data) < self.global_batch:
            raise DataError(
                f"the training split packs into {len(data)} sequences, fewer than one batch "
                f"({self.global_batch}); use a larger corpus or a smaller --batch-size/--seq-len"
            )
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data), generator=g), epoch
        assert self._perm is not None  # set above at the first call (epochs start at 0)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        n = len(self.data)
        start = step * self.global_batch
        idx = torch.arange(start, start + self.global_batch)
        epochs, pos = idx // n, idx % n
        out = torch.empty_like(idx)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm_for(e)[pos[sel]]
        return out

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches (input ids, labels) for optimiser step ``step``."""
        ids = self.data[self.indices(step)]
        g = torch.Generator().manual_seed(self.seed * 7_919 + step * 2 + 1)
        inputs, labels = self.masker(ids, g)
        share = self.micro * self.accum
        inputs = inputs[self.rank * share : (self.rank + 1) * share]
        labels = labels[self.rank * share : (self.rank + 1) * share]
        return list(zip(inputs.split(self.micro), labels.split(self.micro)))

    def tokens_per_step(self) -> int:
        return self.global_batch * self.data.shape[1]


def unigram_entropy(data: torch.Tensor, special_ids: tuple[int, ...]) -> float:
    """Entropy (nats) of the unigram token distribution of packed data, special tokens excluded.

    The loss of a model that predicts every masked token from frequencies alone; the loss plateau sits near it.
    """
    ids = data.flatten()
    keep = torch.ones_like(ids, dtype=torch.bool)
    for s in special_ids:
        keep &= ids != s
    counts = torch.bincount(ids[keep]).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())
