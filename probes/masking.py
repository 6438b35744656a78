"""Deterministic masked probe variants.

* ``clean``: no masking.
* ``mask15``: ``max(1, round(0.15 * n))`` of a sentence's n non-special pieces replaced by [MASK] (the BERT masking
  rate, Devlin et al. 2019, Section 3.1; all replaced by [MASK], no 80/10/10, so the probe is a pure [MASK] probe;
  docs/notes/probes.md, "Masking variants").
* ``mask1``: exactly one piece per sentence replaced by [MASK].

Positions depend only on ``(seed, variant, sentence id)``, never on batching or order, so every checkpoint of a
trajectory sees the same masked inputs.

Explicit positions (e.g. to compare with another tool's masking) replace the seeded rule for the masked variants
inside :func:`explicit_masks`: one list of piece positions per probe sentence, in the convention of
:func:`mask_positions` (0-based among the sentence's non-special pieces)::

    with explicit_masks([[0, 3], [2], []]):            # sentence 0: pieces 0 and 3; sentence 2: nothing masked
        mask_positions("mask15", 5, 0)                 # array([0, 3])

``mlmscope.probes.capture.capture(masks=...)`` and ``mlmscope.analyses.analyze(masks=...)`` take the same lists; every
caller of :func:`mask_positions` (the capture, and analyses that need the masked positions of the clean variant)
then sees them.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from .model import ProbeError

if TYPE_CHECKING:
    from .align import EncodedProbes

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

    Inside :func:`explicit_masks`, the masked variants return the given positions instead (``seed`` is then unused).
    """
    check_variant(variant)
    plan = _PLAN.get()
    if plan is not None and variant != "clean":
        return plan.positions(sentence_id, n_pieces)
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


class MaskPlan:
    """Explicit mask positions: one list per probe sentence (index = the sentence's position in the probe set).

    Positions count the sentence's non-special pieces from 0, as :func:`mask_positions` returns them; they are used
    for every masked variant. A sentence's list may be empty (nothing masked there). Entries of sentences the
    capture skips (too long, empty) are not used.

    Args:
        masks: Per sentence, integer positions (lists, tuples, numpy arrays or tensors).

    Raises:
        ProbeError: a position that is not an integer, negative, or given twice (naming the sentence).
    """

    def __init__(self, masks: Sequence[Any]) -> None:
        if isinstance(masks, (str, bytes, Mapping)) or not hasattr(masks, "__iter__"):
            raise ProbeError(f"masks must be a list with one list of piece positions per sentence, got {masks!r:.80}")
        self.masks: list[tuple[int, ...]] = [self._entry(i, m) for i, m in enumerate(masks)]

    @staticmethod
    def _entry(i: int, m: Any) -> tuple[int, ...]:
        if hasattr(m, "detach"):  # a torch tensor
            m = m.detach().cpu().numpy()
        a = np.asarray(m)
        if a.ndim == 0:
            raise ProbeError(f"masks[{i}] (sentence {i}): expected a list of piece positions, got {m!r:.80}")
        if a.size and (a.dtype == bool or not np.issubdtype(a.dtype, np.integer)):
            raise ProbeError(f"masks[{i}] (sentence {i}): positions must be integers, got {a.tolist()!r:.80}")
        pos = sorted(int(x) for x in a.reshape(-1))
        if pos and pos[0] < 0:
            raise ProbeError(f"masks[{i}] (sentence {i}): negative position {pos[0]}")
        twice = sorted({p for p, q in itertools.pairwise(pos) if p == q})
        if twice:
            raise ProbeError(f"masks[{i}] (sentence {i}): position(s) {twice} given twice")
        return tuple(pos)

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def hash(self) -> str:
        """Content hash of the positions (recorded with results computed under this plan)."""
        return hashlib.sha256(repr(self.masks).encode()).hexdigest()

    def positions(self, sentence_id: int, n_pieces: int) -> np.ndarray:
        """The sentence's positions, sorted.

        Raises:
            ProbeError: the plan has no entry for the sentence, or a position is not below ``n_pieces``.
        """
        if not 0 <= sentence_id < len(self.masks):
            raise ProbeError(
                f"masks has {len(self.masks)} entries but sentence {sentence_id} was asked for; give one list per "
                "probe sentence"
            )
        pos = self.masks[sentence_id]
        if pos and pos[-1] >= n_pieces:
            raise ProbeError(
                f"masks[{sentence_id}] (sentence {sentence_id}): position {pos[-1]} is out of range; the sentence "
                f"has {n_pieces} non-special pieces (positions 0..{n_pieces - 1})"
            )
        return np.array(pos, dtype=np.int64)

    def check(self, enc: EncodedProbes) -> None:
        """Validate the plan against a tokenised probe set (one entry per sentence, every position in range).

        Raises:
            ProbeError: naming the first offending sentence.
        """
        total = len(enc) + sum(enc.skipped.values())
        if len(self.masks) != total:
            raise ProbeError(f"masks has {len(self.masks)} entries; the probe set has {total} sentences (one each)")
        for sid, wids in zip(enc.sentence_ids, enc.word_ids):
            self.positions(sid, sum(w is not None for w in wids))


_PLAN: ContextVar[MaskPlan | None] = ContextVar("mlmscope_mask_plan", default=None)


def as_plan(masks: MaskPlan | Sequence[Any] | None) -> MaskPlan | None:
    """``masks`` as a :class:`MaskPlan` (None stays None: the seeded rule)."""
    return masks if masks is None or isinstance(masks, MaskPlan) else MaskPlan(masks)


def active_plan() -> MaskPlan | None:
    """The plan of the enclosing :func:`explicit_masks` block, or None (the seeded rule)."""
    return _PLAN.get()


@contextmanager
def explicit_masks(masks: MaskPlan | Sequence[Any] | None) -> Iterator[MaskPlan | None]:
    """Within the block, :func:`mask_positions` returns ``masks`` for the masked variants (None: no change).

    The setting is local to the current thread / asyncio task (a context variable), so concurrent runs do not
    see each other's masks.
    """
    plan = as_plan(masks)
    if plan is None:
        yield None
        return
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)
