"""mlmscope probes: model loading, probe sets, word<->piece alignment and one-pass activation capture.

Notebook use::

    from . import load_model, load_probe_set, capture
    lm = load_model("runs/demo/checkpoints/step_004000")
    ps = load_probe_set("probesets/default")
    for batch in capture(lm, ps, names=["blocks.0.attn.hook_pattern"]):
        print(batch.sentence_ids, batch["blocks.0.attn.hook_pattern"].shape)
"""

from .align import (
    EncodedProbes,
    empty_words,
    encode_words,
    first_piece_positions,
    piece_to_word_matrix,
    word_ids_tensor,
    words_to_pieces,
)
from .batch import CaptureBatch
from .capture import ACTIVATION_NAMES, activation_names, capture, prepare
from .masking import VARIANTS, apply_mask, mask_positions
from .model import ArchAdapter, LoadedModel, ModelLoadError, ProbeError, load_model, tokenizer_hash
from .probeset import (
    BuildConfig,
    ProbeSet,
    ProbeSetError,
    build_default,
    build_probe_set,
    load_probe_set,
    read_conllu,
    sentences_of,
)

__all__ = [
    "BuildConfig",
    "ProbeSet",
    "ProbeSetError",
    "build_default",
    "build_probe_set",
    "load_probe_set",
    "read_conllu",
    "sentences_of",
    "empty_words",
    "ACTIVATION_NAMES",
    "VARIANTS",
    "ArchAdapter",
    "CaptureBatch",
    "EncodedProbes",
    "LoadedModel",
    "ModelLoadError",
    "ProbeError",
    "activation_names",
    "apply_mask",
    "capture",
    "encode_words",
    "first_piece_positions",
    "load_model",
    "mask_positions",
    "piece_to_word_matrix",
    "prepare",
    "tokenizer_hash",
    "word_ids_tensor",
    "words_to_pieces",
]
