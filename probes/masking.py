"""Deterministic masked probe variants.

* ``clean``: no masking.
* ``mask15``: ``max(1, round(0.15 * n))`` of a sentence's n non-special pieces replaced by [MASK] (the BERT masking
  rate, Devlin et al. 2019, Section 3.1; all replaced by [MASK], no 80/10/10, so the probe is a pure [MASK] probe;
  docs/notes/probes.md, "Masking variants").
* ``mask1``: exactly one piece per sentence replaced by [MASK].

Positions depend only on ``(seed, variant, sentence id)``, never on batching or order, so every checkpoint of a
trajectory sees the same masked inputs.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .model import ProbeError

VARIANTS = ("clean", "mask15", "mask1")
#: BERT's masking rate (Devlin et al. 2019, Section 3.1).
MASK15_RATE = 0.15
_VARIANT_CODE = {"clean": 0, "mask15": 1, "mask1": 2}


def check_variant(variant: str) -> None:
    """Raise ProbeError for an unknown variant name."""
    if variant not in _VARIANT_CODE:
        raise ProbeError(f"unknown probe variant {variant!r}; choose from {', '.join(VARIANTS)}")


def mask_positions(variant: str, n_pieces: int, sentence_id: int, seed: int = 0) -> np.ndarray:
    """Positions (0-based among the sentence's non-special pieces) to mask, sorted.

    Args:
        variant: ``clean``, ``mask15`` or ``mask1``.
        n_pieces: Number of non-special pieces of the sentence.
        sentence_id: Probe-set index of the sentence (part of the seed).
        seed: Global masking seed.
    """
    check_variant(variant)
    return np.array(_positions(variant, n_pieces, sentence_id, seed), dtype=np.int64)


@lru_cache(maxsize=1 << 16)
def _positions(variant: str, n_pieces: int, sentence_id: int, seed: int) -> tuple[int, ...]:
    """Memoised: a trajectory asks for the same sentences at every checkpoint (a generator costs ~50 µs to seed)."""
    if variant == "clean" or n_pieces == 0:
        return ()
    k = 1 if variant == "mask1" else max(1, round(MASK15_RATE * n_pieces))
    rng = np.random.default_rng([seed, _VARIANT_CODE[variant], sentence_id])
    return tuple(np.sort(rng.choice(n_pieces, size=min(k, n_pieces), replace=False)).tolist())


def apply_mask(
    input_ids: list[int], special: list[bool], variant: str, sentence_id: int, mask_id: int, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Mask one sentence.

    Args:
        input_ids: Piece ids incl. specials.
        special: True at special-token positions (never masked).
        variant, sentence_id, seed: See :func:`mask_positions`.
        mask_id: The tokenizer's [MASK] id.

    Returns:
        ``(masked_ids, labels)`` with ``labels[t]`` the gold id at masked positions and -100 elsewhere.
    """
    content = np.flatnonzero(~np.asarray(special, dtype=bool))
    pos = content[mask_positions(variant, len(content), sentence_id, seed)]
    ids = list(input_ids)
    labels = [-100] * len(ids)
    for t in pos.tolist():
        labels[t] = ids[t]
        ids[t] = mask_id
    return ids, labels
