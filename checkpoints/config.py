"""Dataclass configs: model shape presets and training settings.

They double as CLI options (``mlmscope train --preset demo --lr 1e-3 ...``) and are saved in the run manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
            ``checkpoints.hardware``), ``"fp32"`` or ``"bf16"`` (autocast; weights and optimiser state stay fp32).
            What ``auto`` chose, and why, is saved in the manifest (``run.levers``).
        attn: HF attention implementation while training: ``"sdpa"``, ``"eager"``, ``"eager_fp32"``
            (``checkpoints.attention``) or ``"auto"`` (``checkpoints.hardware.resolve_attention``: SDPA on CUDA,
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


@dataclass
class RunConfig:
    """Everything that defines a run; saved in its manifest. ``sas_reg`` is Chen et al.'s SAS regulariser
    (``checkpoints.sas_reg.SASRegConfig``; λ = 0, i.e. off, by default)."""

    preset: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sas_reg: "SASRegConfig" = field(default_factory=lambda: _sas_reg_config())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
    from checkpoints.sas_reg import SASRegConfig

    return SASRegConfig(**kw)


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Tests: seconds on a CPU.
    "micro": dict(model=dict(n_layers=2, d_model=64, n_heads=2, d_ffn=256, max_position=64),
                  train=dict(seq_len=32, batch_size=16, max_steps=60, warmup_steps=10, linear_every=20,
                             val_batches=2, precision="fp32"),
                  data=dict(vocab_size=1024)),
    # Default: ~13 min on 2 CPU cores; plateau ~1k-6k steps then a loss drop with a previous-token head (issue 3).
    "demo": dict(model=dict(n_layers=2, d_model=128, n_heads=4, d_ffn=512, max_position=64),
                 train=dict(seq_len=64, batch_size=32, lr=2e-3, warmup_steps=200, max_steps=12000,
                            linear_every=300)),
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
