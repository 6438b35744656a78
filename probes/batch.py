"""The contract between the capture layer and every analysis.

A :class:`CaptureBatch` holds what one padded forward pass over a batch of probe sentences recorded.
Activation names follow TransformerLens' vocabulary (see ``ACTIVATION_NAMES`` in ``mlmscope.probes.capture``
for the full documented list). Shapes use B = batch, T = padded sequence length, H = heads,
D = hidden size, L = layers, V = vocabulary.

Names (``l`` is the 0-based layer index):

* ``embed.hook_out``                (B, T, D)  embedding output after the embedding LayerNorm (= HF hidden_states[0])
* ``blocks.{l}.hook_resid_pre``     (B, T, D)  input of layer l (= HF hidden_states[l])
* ``blocks.{l}.attn.hook_pattern``  (B, H, T, T) attention probabilities (rows = queries)
* ``blocks.{l}.hook_attn_out``      (B, T, D)  attention sub-layer output (after the output dense, before residual + LN)
* ``blocks.{l}.ln1.hook_in``        (B, T, D)  resid_pre + attn_out: the input of the attention LayerNorm (post-LN)
* ``blocks.{l}.hook_resid_mid``     (B, T, D)  output of the attention LayerNorm = FFN input
* ``blocks.{l}.mlp.hook_post``      (B, T, F)  FFN hidden activation after GELU (F = intermediate size)
* ``blocks.{l}.hook_mlp_out``       (B, T, D)  FFN output (after the output dense, before residual + LN)
* ``blocks.{l}.ln2.hook_in``        (B, T, D)  resid_mid + mlp_out: the input of the output LayerNorm
* ``blocks.{l}.hook_resid_post``    (B, T, D)  output of layer l (= HF hidden_states[l + 1])
* ``mlm_head.hook_out``             (N, V)     MLM logits at the requested positions (``head_positions``), if the model
                                               has a head

Padding positions of every tensor are zeroed (attention rows *and* columns), so no padding value can leak
into an analysis that forgets the mask; analyses should still use ``token_mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")


@dataclass
class CaptureBatch:
    """One captured batch of probe sentences.

    Attributes:
        variant: Which probe variant was run: ``"clean"``, ``"mask15"`` (15 % of pieces masked) or ``"mask1"``
            (exactly one [MASK] per sentence).
        sentence_ids: (B,) indices of the sentences in the probe set.
        input_ids: (B, T) token ids as fed to the model (with [MASK]s for masked variants).
        attention_mask: (B, T) 1 for real tokens (incl. [CLS]/[SEP]), 0 for padding.
        special_mask: (B, T) True for [CLS], [SEP] and padding.
        word_ids: per sentence, the word index of every piece, padded to length T (None for specials / padding),
            as from the fast tokenizer's ``word_ids()`` with ``is_split_into_words=True``.
        labels: (B, T) gold token id at masked positions, -100 elsewhere (all -100 for ``clean``).
        head_positions: (N, 2) (batch row, position) pairs at which ``mlm_head.hook_out`` was recorded, in row order.
        acts: activation name -> tensor (float32, on CPU unless the capture was asked to keep them on device).
        derived: quantities derived from ``acts`` that several analyses need (see :meth:`memo`).
    """

    variant: str
    sentence_ids: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    special_mask: torch.Tensor
    word_ids: list[list[int | None]]
    labels: torch.Tensor
    head_positions: torch.Tensor
    acts: dict[str, torch.Tensor] = field(default_factory=dict)
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def memo(self, key: str, make: Callable[[], _T]) -> _T:
        """``make()`` computed once per batch and shared by every analysis fed from it (one capture, many analyses).

        Example: the final MLM distribution at the [MASK] positions (``mlmscope.analyses.lens.final_reference``), which
        the logit lens compares every layer against. ``key`` must name everything the value depends on besides this
        batch.
        """
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]

    @property
    def token_mask(self) -> torch.Tensor:
        """(B, T) bool: real, non-special tokens (what most analyses average over)."""
        return self.attention_mask.bool() & ~self.special_mask

    @property
    def masked_mask(self) -> torch.Tensor:
        """(B, T) bool: positions holding a [MASK] with a gold label."""
        return self.labels != -100

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.acts[name]
        except KeyError:
            raise KeyError(f"activation {name!r} was not captured; captured: {sorted(self.acts)}") from None
