"""Dataclass configs: model shape presets and training settings.

They double as CLI options (``mlmscope train --preset demo --lr 1e-3 ...``) and are saved in the run manifest.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A run configuration that cannot train (message is user-facing: every problem, one line)."""


@dataclass
class ModelConfig:
    """Shape of the ``BertForMaskedLM`` (post-LN, learned absolute positions, tied decoder)."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_ffn: int = 512
    vocab_size: int = 8192
    max_position: int = 128
    dropout: float = 0.0

    def to_bert_config(self, vocab_size: int | None = None):
        from transformers import BertConfig

        return BertConfig(
            vocab_size=vocab_size or self.vocab_size, hidden_size=self.d_model, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, intermediate_size=self.d_ffn,
            max_position_embeddings=self.max_position, hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout, type_vocab_size=2, tie_word_embeddings=True)


@dataclass
class TrainConfig:
    """Optimisation, masking, data and checkpointing settings of one run.

    Attributes:
        seq_len: Tokens per packed training sequence (incl. [CLS]/[SEP]).
        batch_size: Sequences per optimiser step (per process, times ``grad_accum``).
        grad_accum: Micro-batches accumulated per optimiser step.
        lr, warmup_steps, max_steps, weight_decay, grad_clip, betas: AdamW with linear warm-up then linear decay
            to 0 at ``max_steps``.
        mask_rate: Fraction of non-special tokens selected for prediction (BERT: 0.15).
        mask_replace: ``"80/10/10"`` (BERT default: [MASK] / random / unchanged) or ``"mask"`` (100 % [MASK]).
        precision: ``"auto"`` (bf16 autocast where the device computes bf16 natively, else fp32;
            ``mlmscope.checkpoints.hardware``), ``"fp32"`` or ``"bf16"`` (autocast; weights and optimiser state stay fp32).
            What ``auto`` chose, and why, is saved in the manifest (``run.levers``).
        attn: HF attention implementation while training: ``"sdpa"``, ``"eager"``, ``"eager_fp32"``
            (``mlmscope.checkpoints.attention``) or ``"auto"`` (``mlmscope.checkpoints.hardware.resolve_attention``: SDPA on CUDA,
            eager kernels on CPU). Checkpoints load with any implementation.
        compile: ``torch.compile`` the model (CUDA only; on CPU it did not help).
        init_seed: Seed of the weight initialisation (MultiBERTs-style, separate from ``data_seed``).
        data_seed: Seed of the data order and masking.
        eval_every / schedule: Checkpoint steps: log-spaced 0, 1, 2, 4, … below ``linear_every``, then every
            ``linear_every`` steps to ``max_steps``; or an explicit increasing list in ``steps``.
        val_batches: Validation batches (fixed masking) per checkpoint.
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
    mask_replace: str = "80/10/10"
    precision: str = "auto"
    attn: str = "auto"
    compile: bool = False
    init_seed: int = 0
    data_seed: int = 0
    linear_every: int = 400
    steps: list[int] | None = None
    val_batches: int = 16
    log_every: int = 1


@dataclass
class DataConfig:
    """Corpus and tokenizer settings."""

    corpus: str = "wiki"          # "wiki" (default package corpus), a .txt/.jsonl file or folder, or a datasets dir
    text_field: str = "text"
    val_fraction: float = 0.05
    split_seed: int = 0
    vocab_size: int = 8192
    lowercase: bool = True
    tokenizer: str | None = None  # reuse a tokenizer: a path, or the hash a run's manifest records (tokenizer_sha256)


@dataclass
class RunConfig:
    """Everything that defines a run; saved in its manifest. ``sas_reg`` is Chen et al.'s SAS regulariser
    (``mlmscope.checkpoints.sas_reg.SASRegConfig``; λ = 0, i.e. off, by default)."""

    preset: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sas_reg: "SASRegConfig" = field(default_factory=lambda: _sas_reg_config())

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
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        t = dict(d["train"])
        t["betas"] = tuple(t["betas"])
        reg = dict(d.get("sas_reg") or {})
        if "directions" in reg:
            reg["directions"] = tuple(reg["directions"])
        return cls(preset=d["preset"], model=ModelConfig(**d["model"]), train=TrainConfig(**t),
                   data=DataConfig(**d["data"]), sas_reg=_sas_reg_config(**reg))


def _sas_reg_config(**kw: Any):
    from .sas_reg import SASRegConfig

    return SASRegConfig(**kw)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Tests: seconds on a CPU.
    "micro": dict(model=dict(n_layers=2, d_model=64, n_heads=2, d_ffn=256, max_position=64),
                  train=dict(seq_len=32, batch_size=16, max_steps=60, warmup_steps=10, linear_every=20,
                             val_batches=2, precision="fp32"),
                  data=dict(vocab_size=1024)),
    # Default: a plateau (~1k-3k steps), then the SAS onset (~3.2k) and a loss drop (~4k-8k) with the shipped
    # tokenizer, at fp32 and bf16 alike. lr 1e-3 reaches it in 8k steps; 2e-3 over 12k left SAS flat past 6.6k and
    # 4e-3 or 6e-3 over 5k stayed on the plateau (docs/notes/training.md, "The demo run").
    "demo": dict(model=dict(n_layers=2, d_model=128, n_heads=4, d_ffn=512, max_position=64),
                 train=dict(seq_len=64, batch_size=32, lr=1e-3, warmup_steps=200, max_steps=8000,
                            linear_every=250)),
    "tiny": dict(model=dict(n_layers=4, d_model=256, n_heads=4, d_ffn=1024, max_position=128),
                 train=dict(seq_len=128, batch_size=32, lr=1e-3, warmup_steps=500, max_steps=20000,
                            linear_every=1000)),
    "small": dict(model=dict(n_layers=6, d_model=512, n_heads=8, d_ffn=2048, max_position=128),
                  train=dict(seq_len=128, batch_size=64, lr=5e-4, warmup_steps=2000, max_steps=50000,
                             linear_every=1000)),
    # BERT-base shape (Chen et al. / MultiBERTs) for GPU users.
    "base": dict(model=dict(n_layers=12, d_model=768, n_heads=12, d_ffn=3072, max_position=512, dropout=0.1),
                 train=dict(seq_len=128, batch_size=256, lr=1e-4, warmup_steps=10000, max_steps=500000,
                            linear_every=5000), data=dict(vocab_size=30522)),
}


def make_config(preset: str = "demo", **overrides: Any) -> RunConfig:
    """Build a RunConfig from a preset plus ``section.field``-free overrides (field names are unique).

    Raises:
        KeyError: unknown preset or override name.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    cfg = RunConfig(preset=preset, model=ModelConfig(**p.get("model", {})), train=TrainConfig(**p.get("train", {})),
                    data=DataConfig(**p.get("data", {})))
    if "vocab_size" in p.get("data", {}):
        cfg.model.vocab_size = p["data"]["vocab_size"]
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("sas_"):  # sas_lam, sas_release_step, sas_directions, sas_reduction
            name = key[4:]
            if name == "directions" and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            if name not in {f.name for f in dataclasses.fields(cfg.sas_reg)}:
                raise KeyError(f"unknown config field {key!r}")
            cfg.sas_reg = _sas_reg_config(**{**dataclasses.asdict(cfg.sas_reg), name: value})
            continue
        for section in (cfg.model, cfg.train, cfg.data):
            if key in {f.name for f in dataclasses.fields(section)}:
                setattr(section, key, value)
                break
        else:
            raise KeyError(f"unknown config field {key!r}")
        if key == "vocab_size":
            cfg.model.vocab_size = cfg.data.vocab_size = value
    return cfg


# ------------------------------------------------------------------------------------------------------------------
# Validation: every field's range and the combinations that cannot train, checked before the disk is touched
# ------------------------------------------------------------------------------------------------------------------

#: [PAD] [UNK] [CLS] [SEP] [MASK] (``mlmscope.checkpoints.tokenizer.SPECIAL_TOKENS``): a vocabulary must hold more than these.
N_SPECIAL_TOKENS = 5
#: ``mlmscope.checkpoints.data.pack`` needs [CLS] + [SEP] + a few tokens per sequence.
MIN_SEQ_LEN = 8
#: Attention implementations the trainer knows (``TrainConfig.attn``; ``mlmscope.checkpoints.attention`` adds eager_fp32).
ATTN_CHOICES = ("auto", "sdpa", "eager", "eager_fp32")
MASK_REPLACE_CHOICES = ("80/10/10", "mask")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= lo


def _in_open_unit(v: Any) -> bool:
    return _is_num(v) and 0 < v < 1


#: (section, field, test, what the value must be). ``lr`` may be 0: a frozen-weights control run (every checkpoint
#: is then flagged as a duplicate of step 0), but not negative.
_RULES: tuple[tuple[str, str, Callable[[Any], bool], str], ...] = (
    ("model", "n_layers", _int_at_least(1), "an integer >= 1"),
    ("model", "d_model", _int_at_least(1), "an integer >= 1"),
    ("model", "n_heads", _int_at_least(1), "an integer >= 1"),
    ("model", "d_ffn", _int_at_least(1), "an integer >= 1"),
    ("model", "max_position", _int_at_least(MIN_SEQ_LEN), f"an integer >= {MIN_SEQ_LEN}"),
    ("model", "dropout", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("train", "seq_len", _int_at_least(MIN_SEQ_LEN), f"an integer >= {MIN_SEQ_LEN}"),
    ("train", "batch_size", _int_at_least(1), "an integer >= 1"),
    ("train", "grad_accum", _int_at_least(1), "an integer >= 1"),
    ("train", "lr", lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    ("train", "warmup_steps", _int_at_least(0), "an integer >= 0"),
    ("train", "max_steps", _int_at_least(1), "an integer >= 1"),
    ("train", "weight_decay", lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    ("train", "grad_clip", lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    ("train", "betas", lambda v: isinstance(v, (tuple, list)) and len(v) == 2
     and all(_is_num(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1), e.g. 0.9,0.98"),
    ("train", "mask_rate", _in_open_unit, "a number strictly between 0 and 1"),
    ("train", "mask_replace", lambda v: v in MASK_REPLACE_CHOICES, f"one of {', '.join(MASK_REPLACE_CHOICES)}"),
    ("train", "attn", lambda v: v in ATTN_CHOICES, f"one of {', '.join(ATTN_CHOICES)}"),
    ("train", "compile", lambda v: isinstance(v, bool), "true or false"),
    ("train", "init_seed", _int_at_least(0), "an integer >= 0"),
    ("train", "data_seed", _int_at_least(0), "an integer >= 0"),
    ("train", "linear_every", _int_at_least(1), "an integer >= 1"),
    ("train", "steps", lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) > 0
                                                and all(_is_int(s) and s >= 0 for s in v)),
     "a non-empty list of integers >= 0"),
    ("train", "val_batches", _int_at_least(1), "an integer >= 1"),
    ("train", "log_every", _int_at_least(1), "an integer >= 1"),
    ("data", "corpus", lambda v: isinstance(v, str) and v.strip() != "", "'wiki' or a path"),
    ("data", "text_field", lambda v: isinstance(v, str) and v != "", "a field name"),
    ("data", "val_fraction", _in_open_unit, "a number strictly between 0 and 1"),
    ("data", "split_seed", _is_int, "an integer"),
    ("data", "vocab_size", _int_at_least(N_SPECIAL_TOKENS + 1), f"an integer > {N_SPECIAL_TOKENS} (the special "
                                                                 f"tokens)"),
    ("data", "lowercase", lambda v: isinstance(v, bool), "true or false"),
    ("sas_reg", "lam", _is_num, "a finite number"),
    ("sas_reg", "release_step", lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0 or none"),
)


def config_problems(cfg: RunConfig) -> list[str]:
    """Every problem of ``cfg`` as a user-facing phrase (empty if it can train). See :meth:`RunConfig.validate`."""
    from .hardware import PRECISIONS

    problems, bad = [], set()
    for section, name, ok, what in _RULES:
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            problems.append(f"{name} must be {what}, got {value!r}")
            bad.add(name)
    if cfg.train.precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.train.precision!r}")
    if not bad & {"d_model", "n_heads"} and cfg.model.d_model % cfg.model.n_heads:
        problems.append(f"d_model={cfg.model.d_model} is not divisible by n_heads={cfg.model.n_heads}")
    if not bad & {"seq_len", "max_position"} and cfg.train.seq_len > cfg.model.max_position:
        problems.append(f"seq_len={cfg.train.seq_len} exceeds the model's max_position={cfg.model.max_position} "
                        f"(lower --seq-len or --set max_position={cfg.train.seq_len})")
    steps = cfg.train.steps
    if steps and "steps" not in bad:
        if any(b <= a for a, b in zip(steps, steps[1:])):
            problems.append(f"checkpoint steps must be strictly increasing, got {list(steps)}")
        if "max_steps" not in bad and steps[-1] > cfg.train.max_steps:
            problems.append(f"checkpoint step {steps[-1]} is beyond max_steps={cfg.train.max_steps}")
    return problems


# ------------------------------------------------------------------------------------------------------------------
# ``--set FIELD=VALUE``: text cast to the field's declared type
# ------------------------------------------------------------------------------------------------------------------


def field_type(key: str) -> Any:
    """The declared type of the config field ``key`` (``sas_``-prefixed names are ``SASRegConfig`` fields).

    Raises:
        KeyError: no such field.
    """
    from .sas_reg import SASRegConfig

    if key.startswith("sas_"):
        hints = get_type_hints(SASRegConfig)
        if key[4:] in hints:
            return hints[key[4:]]
    else:
        for cls in (ModelConfig, TrainConfig, DataConfig):
            hints = get_type_hints(cls)
            if key in hints:
                return hints[key]
    raise KeyError(f"unknown config field {key!r}")


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _cast(text: str, tp: Any, key: str) -> Any:
    """``text`` as a value of type ``tp`` (int, float, str, bool, Optional, tuple/list of those)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return _cast(text, inner[0], key)
    if origin in (tuple, list):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                kinds = {int: "integers", float: "numbers"}.get(args[0], "values")
                raise ConfigError(f"--set {key}={text}: expected {len(args)} comma-separated {kinds}")
            return tuple(_cast(t, a, key) for t, a in zip(items, args))
        value = [_cast(t, args[0] if args else str, key) for t in items]
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
        raise ConfigError(f"--set {key}={text}: expected {what}") from None
    return text


def parse_field_value(key: str, text: str) -> Any:
    """Cast the text of ``--set key=text`` to the field's declared type (lists/tuples: comma-separated).

    Raises:
        KeyError: unknown field. ConfigError: a value that does not parse as the field's type.
    """
    return _cast(text, field_type(key), key)
