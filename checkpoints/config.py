"""The run configuration, declared once: dataclass fields with their types, defaults and help, plus the presets.

A :class:`RunConfig` is saved in the run manifest (``run.config``). Every field of its sections is also a flat
name (:func:`config_fields`): the key of ``make_config(**overrides)`` and ``mlmscope train --set KEY=VALUE``, and the
``mlmscope train --key`` option the command line generates from the field (type and choices from the annotation,
help from the ``Attributes:`` section of its class docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import MlmscopeError

if TYPE_CHECKING:
    from .sas_reg import SASRegConfig  # imports torch: loaded only where a RunConfig is built


class ConfigError(MlmscopeError, ValueError):
    """A run configuration that cannot train (message is user-facing: every problem, one line)."""


#: Closed sets of values (the command line offers and checks them as choices).
Precision = Literal["auto", "fp32", "bf16"]
Attention = Literal["auto", "sdpa", "eager", "eager_fp32"]
MaskReplace = Literal["80/10/10", "mask"]


@dataclass
class ModelConfig:
    """Shape of the ``BertForMaskedLM`` (post-LN, learned absolute positions, tied decoder).

    The vocabulary is the tokenizer's: ``DataConfig.vocab_size`` asks the tokenizer trainer for it, and the model is
    built with ``len(tokenizer)`` rows (:meth:`to_bert_config`).

    Attributes:
        n_layers: Transformer layers.
        d_model: Hidden size.
        n_heads: Attention heads per layer (must divide d_model).
        d_ffn: Feed-forward inner size.
        max_position: Learned absolute positions (at least seq_len).
        dropout: Dropout on hidden states and attention probabilities.
        init_std: Standard deviation of the normal initialisation of every weight matrix and embedding (BERT's
            ``initializer_range``, 0.02 as in Devlin et al.). Larger values give attention logits that are not
            nearly zero at step 0, a shorter stay on the uniform-attention plateau.
    """

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_ffn: int = 512
    max_position: int = 128
    dropout: float = 0.0
    init_std: float = 0.02

    def to_bert_config(self, vocab_size: int):
        """The ``transformers.BertConfig`` of this shape for a tokenizer of ``vocab_size`` entries."""
        from transformers import BertConfig

        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=self.d_model,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            intermediate_size=self.d_ffn,
            max_position_embeddings=self.max_position,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            type_vocab_size=2,
            tie_word_embeddings=True,
            initializer_range=self.init_std,
        )


@dataclass
class TrainConfig:
    """Optimisation, masking, precision and checkpointing settings of one run.

    AdamW with linear warm-up over ``warmup_steps``, then linear decay to 0 at ``max_steps``. Checkpoints are
    log-spaced (0, 1, 2, 4, …) below ``linear_every``, then every ``linear_every`` steps to ``max_steps``, unless
    ``steps`` lists them (``mlmscope.checkpoints.train.checkpoint_steps``).

    Attributes:
        seq_len: Tokens per packed training sequence (incl. [CLS]/[SEP]).
        batch_size: Sequences per micro-batch (per process).
        grad_accum: Micro-batches accumulated per optimiser step.
        lr: Peak learning rate of AdamW (0: a frozen-weights control run).
        warmup_steps: Linear warm-up steps.
        max_steps: Optimiser steps; the learning rate decays linearly to 0 here.
        weight_decay: AdamW weight decay (not on biases and LayerNorm weights).
        grad_clip: Gradient-norm clip.
        betas: AdamW betas, comma-separated.
        mask_rate: Fraction of non-special tokens selected for prediction (BERT: 0.15).
        mask_replace: How selected tokens are corrupted: 80/10/10 = BERT's [MASK] / random / unchanged; mask =
            always [MASK].
        precision: auto = bf16 autocast where the device computes bf16 natively, else fp32
            (mlmscope.checkpoints.hardware; what auto chose, and why, is saved in the manifest's run.levers).
            Weights and optimiser state stay fp32.
        attn: Attention kernels while training: auto = SDPA on CUDA, eager on CPU (eager_fp32 under bf16;
            mlmscope.checkpoints.attention). Checkpoints load with any.
        compile: torch.compile the model (CUDA only; it did not help on CPU).
        init_seed: Seed of the weight initialisation (MultiBERTs-style, separate from data_seed).
        data_seed: Seed of the data order and masking.
        linear_every: Checkpoint spacing after the log-spaced start (0, 1, 2, 4, …).
        steps: Explicit checkpoint steps instead, comma-separated (e.g. 0,10,100).
        val_batches: Validation batches (fixed masks) scored at every checkpoint.
        log_every: Write the training loss to train_log.jsonl every N steps.
        keyframes: Full resumable states (optimiser, scheduler, RNG, loss EMA) kept at this many checkpoint steps
            spread over the run (keyframes/), so that mlmscope zoom replays a window from the nearest one; 0 = none
            (a zoom then replays from step 0).
    """

    seq_len: int = 64
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-3
    warmup_steps: int = 200
    max_steps: int = 12000
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    mask_rate: float = 0.15
    mask_replace: MaskReplace = "80/10/10"
    precision: Precision = "auto"
    attn: Attention = "auto"
    compile: bool = False
    init_seed: int = 0
    data_seed: int = 0
    linear_every: int = 400
    steps: list[int] | None = None
    val_batches: int = 16
    log_every: int = 1
    keyframes: int = 8


@dataclass
class DataConfig:
    """Corpus and tokenizer settings.

    Attributes:
        corpus: 'wiki' (the packaged corpus), 'offline' (eight packaged sources) or 'offline:wiki,brown,…' (some
            of them), a .txt/.jsonl file or folder, or a datasets dir.
        text_field: Text field of JSONL / datasets corpora.
        val_fraction: Fraction of documents held out for validation.
        split_seed: Seed of the train/validation split.
        vocab_size: WordPiece vocabulary size, special tokens included (the model's vocabulary is the tokenizer's).
        lowercase: Lowercase the text before tokenizing.
        tokenizer: Reuse a tokenizer: a path, or the tokenizer_sha256 (a prefix will do) a run's manifest records.
    """

    corpus: str = "wiki"
    text_field: str = "text"
    val_fraction: float = 0.05
    split_seed: int = 0
    vocab_size: int = 8192
    lowercase: bool = True
    tokenizer: str | None = None


@dataclass
class RunConfig:
    """Everything that defines a run; saved in its manifest. ``sas_reg`` is Chen et al.'s SAS regulariser
    (``mlmscope.checkpoints.sas_reg.SASRegConfig``; λ = 0, i.e. off, by default)."""

    preset: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sas_reg: SASRegConfig = field(default_factory=lambda: _sas_reg_config())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every field and every combination of fields before anything touches the disk.

        Raises:
            ConfigError: listing every problem found, in one line (e.g. ``batch_size must be an integer >= 1, got
                0; seq_len=128 exceeds max_position=64 ...``).
        """
        problems = config_problems(self)
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The config a manifest saved (JSON lists back to tuples). A field an older version saved and this one
        no longer has (:data:`RETIRED_FIELDS`) is dropped; fields added since take their defaults."""
        values = {section: dict(d.get(section) or {}) for section, _, _ in config_sections()}
        for section, names in RETIRED_FIELDS.items():
            for name in names:
                values[section].pop(name, None)
        for f in config_fields().values():
            if f.name in values[f.section] and get_origin(f.type) is tuple:
                values[f.section][f.name] = tuple(values[f.section][f.name])
        return cls(preset=d["preset"], **{section: klass(**values[section]) for section, klass, _ in config_sections()})


#: Fields older manifests hold that are now derived elsewhere: ``model.vocab_size`` was a copy of
#: ``data.vocab_size`` (the model's vocabulary is the tokenizer's).
RETIRED_FIELDS: dict[str, tuple[str, ...]] = {"model": ("vocab_size",)}


def _sas_reg_config(**kw: Any):
    from .sas_reg import SASRegConfig

    return SASRegConfig(**kw)


def config_sections() -> tuple[tuple[str, type, str], ...]:
    """RunConfig's sections: (attribute, dataclass, prefix of its fields' flat names).

    The regulariser's fields carry ``sas_`` (``sas_lam``, ``sas_release_step`` …); the other sections' field names
    are unique across them and used as they are.
    """
    from .sas_reg import SASRegConfig  # imports torch: only where a whole RunConfig is needed

    return (
        ("model", ModelConfig, ""),
        ("train", TrainConfig, ""),
        ("data", DataConfig, ""),
        ("sas_reg", SASRegConfig, "sas_"),
    )


@dataclass(frozen=True)
class ConfigField:
    """One field of a :class:`RunConfig` section under its flat name (``--set`` key, ``mlmscope train`` option)."""

    key: str  # flat name: section prefix + field name
    section: str  # RunConfig attribute: model, train, data or sas_reg
    name: str  # the field's name in its section's dataclass
    type: Any  # the declared type (typing objects, ``from __future__`` strings resolved)
    help: str  # the field's entry in its class docstring's ``Attributes:`` section


@functools.cache
def config_fields() -> dict[str, ConfigField]:
    """Every run-config field by flat name, in declaration order (model, train, data, sas_reg)."""
    out: dict[str, ConfigField] = {}
    for section, klass, prefix in config_sections():
        hints, documented = get_type_hints(klass), _docstring_attributes(klass)
        for f in dataclasses.fields(klass):
            key = prefix + f.name
            assert key not in out, f"config field {key!r} is declared twice"
            text = documented.get(f.name, "").replace("``", "")  # rST literals read as plain text in --help
            out[key] = ConfigField(key, section, f.name, hints[f.name], text)
    return out


def _docstring_attributes(klass: type) -> dict[str, str]:
    """``name: text`` entries of the class docstring's Google-style ``Attributes:`` section (continuation lines
    joined; ``a, b: text`` gives each name the text)."""
    doc = inspect.getdoc(klass) or ""
    m = re.search(r"^Attributes:\n((?:[ \t]+\S.*\n?|\n)+)", doc, re.M)
    if not m:
        return {}
    out, names = {}, []
    for line in m.group(1).splitlines():
        entry = re.match(r"^ {4}(\w[\w, ]*):\s*(.*)$", line)
        if entry:
            names = [n.strip() for n in entry.group(1).split(",")]
            for n in names:
                out[n] = entry.group(2).strip()
        elif line.strip() and names:
            for n in names:
                out[n] += " " + line.strip()
    return out


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Tests: seconds on a CPU.
    "micro": dict(
        model=dict(n_layers=2, d_model=64, n_heads=2, d_ffn=256, max_position=64),
        train=dict(
            seq_len=32, batch_size=16, max_steps=60, warmup_steps=10, linear_every=20, val_batches=2, precision="fp32"
        ),
        data=dict(vocab_size=1024),
    ),
    # Default: a plateau (~1k-3k steps), then the SAS onset (~3.2k) and a loss drop (~4k-8k) with the shipped
    # tokenizer, at fp32 and bf16 alike. lr 1e-3 reaches it in 8k steps; 2e-3 over 12k left SAS flat past 6.6k and
    # 4e-3 or 6e-3 over 5k stayed on the plateau (docs/notes/training.md, "The demo run").
    "demo": dict(
        model=dict(n_layers=2, d_model=128, n_heads=4, d_ffn=512, max_position=64),
        train=dict(seq_len=64, batch_size=32, lr=1e-3, warmup_steps=200, max_steps=8000, linear_every=250),
    ),
    # Syntax, not only position (docs/notes/syntax.md): on the offline corpus, with sentence-length sequences and
    # init_std 0.08 the attention plateau ends by ~1.5k steps (positional heads, as in the demo), then heads that
    # find direct objects (~6k) and objects of prepositions (~10k) away from any fixed offset form.
    "syntax": dict(
        model=dict(n_layers=2, d_model=128, n_heads=4, d_ffn=512, max_position=32, init_std=0.08),
        train=dict(seq_len=32, batch_size=64, lr=1e-3, warmup_steps=200, max_steps=12000, linear_every=500),
        data=dict(corpus="offline"),
    ),
    "tiny": dict(
        model=dict(n_layers=4, d_model=256, n_heads=4, d_ffn=1024, max_position=128),
        train=dict(seq_len=128, batch_size=32, lr=1e-3, warmup_steps=500, max_steps=20000, linear_every=1000),
    ),
    "small": dict(
        model=dict(n_layers=6, d_model=512, n_heads=8, d_ffn=2048, max_position=128),
        train=dict(seq_len=128, batch_size=64, lr=5e-4, warmup_steps=2000, max_steps=50000, linear_every=1000),
    ),
    # BERT-base shape (Chen et al. / MultiBERTs) for GPU users.
    "base": dict(
        model=dict(n_layers=12, d_model=768, n_heads=12, d_ffn=3072, max_position=512, dropout=0.1),
        train=dict(seq_len=128, batch_size=256, lr=1e-4, warmup_steps=10000, max_steps=500000, linear_every=5000),
        data=dict(vocab_size=30522),
    ),
}


def make_config(preset: str = "demo", **overrides: Any) -> RunConfig:
    """A RunConfig from a preset plus overrides by flat field name (:func:`config_fields`; ``None`` = the preset's
    value). Values are taken as given: :meth:`RunConfig.validate` checks them.

    Raises:
        KeyError: unknown preset or override name.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    fields = config_fields()
    values = {section: dict(PRESETS[preset].get(section, {})) for section, _, _ in config_sections()}
    for key, value in overrides.items():
        if key not in fields:
            raise KeyError(f"unknown config field {key!r}")
        if value is not None:
            values[fields[key].section][fields[key].name] = value
    return RunConfig(preset=preset, **{section: klass(**values[section]) for section, klass, _ in config_sections()})


# ------------------------------------------------------------------------------------------------------------------
# Validation: every field's range and the combinations that cannot train, checked before the disk is touched
# ------------------------------------------------------------------------------------------------------------------

#: [PAD] [UNK] [CLS] [SEP] [MASK] (``mlmscope.checkpoints.tokenizer.SPECIAL_TOKENS``): a vocabulary must hold more
#: than these.
N_SPECIAL_TOKENS = 5
#: ``mlmscope.checkpoints.data.pack`` needs [CLS] + [SEP] + a few tokens per sequence.
MIN_SEQ_LEN = 8
#: Attention implementations the trainer knows (``TrainConfig.attn``; ``mlmscope.checkpoints.attention`` adds
#: eager_fp32).
ATTN_CHOICES: tuple[str, ...] = get_args(Attention)
MASK_REPLACE_CHOICES: tuple[str, ...] = get_args(MaskReplace)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= lo


def _in_open_unit(v: Any) -> bool:
    return _is_num(v) and 0 < v < 1


#: (section, field, test, what the value must be). ``lr`` may be 0: a frozen-weights control run (every checkpoint
#: is then flagged as a duplicate of step 0), but not negative. Fields with a closed set of values (``Literal``)
#: are checked against it by :func:`config_problems`.
_RULES: tuple[tuple[str, str, Callable[[Any], bool], str], ...] = (
    ("model", "n_layers", _int_at_least(1), "an integer >= 1"),
    ("model", "d_model", _int_at_least(1), "an integer >= 1"),
    ("model", "n_heads", _int_at_least(1), "an integer >= 1"),
    ("model", "d_ffn", _int_at_least(1), "an integer >= 1"),
    ("model", "max_position", _int_at_least(MIN_SEQ_LEN), f"an integer >= {MIN_SEQ_LEN}"),
    ("model", "dropout", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("model", "init_std", lambda v: _is_num(v) and v > 0, "a number > 0"),
    ("train", "seq_len", _int_at_least(MIN_SEQ_LEN), f"an integer >= {MIN_SEQ_LEN}"),
    ("train", "batch_size", _int_at_least(1), "an integer >= 1"),
    ("train", "grad_accum", _int_at_least(1), "an integer >= 1"),
    ("train", "lr", lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    ("train", "warmup_steps", _int_at_least(0), "an integer >= 0"),
    ("train", "max_steps", _int_at_least(1), "an integer >= 1"),
    ("train", "weight_decay", lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    ("train", "grad_clip", lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    (
        "train",
        "betas",
        lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1), e.g. 0.9,0.98",
    ),
    ("train", "mask_rate", _in_open_unit, "a number strictly between 0 and 1"),
    ("train", "compile", lambda v: isinstance(v, bool), "true or false"),
    ("train", "init_seed", _int_at_least(0), "an integer >= 0"),
    ("train", "data_seed", _int_at_least(0), "an integer >= 0"),
    ("train", "linear_every", _int_at_least(1), "an integer >= 1"),
    (
        "train",
        "steps",
        lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(s) and s >= 0 for s in v)),
        "a non-empty list of integers >= 0",
    ),
    ("train", "val_batches", _int_at_least(1), "an integer >= 1"),
    ("train", "log_every", _int_at_least(1), "an integer >= 1"),
    ("train", "keyframes", _int_at_least(0), "an integer >= 0"),
    ("data", "corpus", lambda v: isinstance(v, str) and v.strip() != "", "'wiki' or a path"),
    ("data", "text_field", lambda v: isinstance(v, str) and v != "", "a field name"),
    ("data", "val_fraction", _in_open_unit, "a number strictly between 0 and 1"),
    ("data", "split_seed", _is_int, "an integer"),
    (
        "data",
        "vocab_size",
        _int_at_least(N_SPECIAL_TOKENS + 1),
        f"an integer > {N_SPECIAL_TOKENS} (the special tokens)",
    ),
    ("data", "lowercase", lambda v: isinstance(v, bool), "true or false"),
    ("sas_reg", "lam", _is_num, "a finite number"),
    ("sas_reg", "release_step", lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0 or none"),
)


def config_problems(cfg: RunConfig) -> list[str]:
    """Every problem of ``cfg`` as a user-facing phrase (empty if it can train). See :meth:`RunConfig.validate`."""
    problems, bad = [], set()
    for section, name, ok, what in _RULES:
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            problems.append(f"{name} must be {what}, got {value!r}")
            bad.add(name)
    for f in config_fields().values():
        choices = get_args(f.type) if get_origin(f.type) is Literal else ()
        value = getattr(getattr(cfg, f.section), f.name)
        if choices and value not in choices:
            problems.append(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
            bad.add(f.name)
    if not bad & {"d_model", "n_heads"} and cfg.model.d_model % cfg.model.n_heads:
        problems.append(f"d_model={cfg.model.d_model} is not divisible by n_heads={cfg.model.n_heads}")
    if not bad & {"seq_len", "max_position"} and cfg.train.seq_len > cfg.model.max_position:
        problems.append(
            f"seq_len={cfg.train.seq_len} exceeds the model's max_position={cfg.model.max_position} "
            f"(lower --seq-len or raise --max-position to {cfg.train.seq_len})"
        )
    steps = cfg.train.steps
    if steps and "steps" not in bad:
        if any(b <= a for a, b in itertools.pairwise(steps)):
            problems.append(f"checkpoint steps must be strictly increasing, got {list(steps)}")
        if "max_steps" not in bad and steps[-1] > cfg.train.max_steps:
            problems.append(f"checkpoint step {steps[-1]} is beyond max_steps={cfg.train.max_steps}")
    return problems


# ------------------------------------------------------------------------------------------------------------------
# Text to values: ``--set FIELD=VALUE`` and the command line's options, cast to the field's declared type
# ------------------------------------------------------------------------------------------------------------------


def field_type(key: str) -> Any:
    """The declared type of the config field with flat name ``key`` (:func:`config_fields`).

    Raises:
        KeyError: no such field.
    """
    if key not in config_fields():
        raise KeyError(f"unknown config field {key!r}")
    return config_fields()[key].type


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def cast_text(text: str, tp: Any, label: str) -> Any:
    """``text`` as a value of type ``tp`` (int, float, str, bool, Literal, Optional, tuple/list of those; lists
    and tuples comma-separated, ``none`` for None).

    Raises:
        ConfigError: ``"<label>: expected <what>"``.
    """
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return cast_text(text, inner[0], label)
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"{label}: expected one of {', '.join(map(str, args))}")
        return text
    if origin in (tuple, list):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                kinds = {int: "integers", float: "numbers"}.get(args[0], "values")
                raise ConfigError(f"{label}: expected {len(args)} comma-separated {kinds}")
            return tuple(cast_text(t, a, label) for t, a in zip(items, args))
        value = [cast_text(t, args[0] if args else str, label) for t in items]
        return tuple(value) if origin is tuple else value
    try:
        if tp is bool:
            return _BOOLS[text.strip().lower()]
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except (KeyError, ValueError):
        what = {bool: "true or false", int: "an integer", float: "a number"}[tp]
        raise ConfigError(f"{label}: expected {what}") from None
    return text


def parse_field_value(key: str, text: str) -> Any:
    """Cast the text of ``--set key=text`` to the field's declared type (lists/tuples: comma-separated).

    Raises:
        KeyError: unknown field. ConfigError: a value that does not parse as the field's type.
    """
    return cast_text(text, field_type(key), f"--set {key}={text}")
