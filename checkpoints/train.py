"""The lean MLM training loop: corpus → WordPiece → ``BertForMaskedLM`` → a dense trajectory of checkpoints.

Read :func:`train` first: :func:`_setup` builds what a run needs (device, checked run folder, data, model,
optimiser, scheduler, state) into a :class:`_Run`; the loop takes optimiser steps (:func:`_step`) and calls
:func:`_checkpoint` at every step of the schedule (the weights, a rolling resumable state, and at a few keyframe
steps a kept copy of that state); :func:`_finish` marks the run finished. :func:`open_replay`, :func:`restore_state`,
:func:`replay_step` and :func:`write_checkpoint` give ``mlmscope zoom`` (:mod:`.zoom`) the same code for a replay.

Speed (README "Benchmarks"): packed sequences with no padding mask; sparse prediction (the MLM head only at masked
positions); batches built by pure functions of the step (no data-loader workers); and levers chosen by what the
device computes natively (``mlmscope.checkpoints.hardware``): on CPU eager attention (``eager_fp32`` under bf16),
SDPA only on CUDA; bf16 autocast only where bf16 is native, else fp32; fused AdamW where torch has the kernel.

Exact resume: each step's batch and masks are functions of (data_seed, step) (``mlmscope.checkpoints.data``); the
optimiser, scheduler, RNG and loss-EMA states are saved with the latest checkpoint, so a run killed at any moment and
resumed from it reproduces the uninterrupted per-step losses and final weights bit for bit (CPU, same machine).
Keyframes (:func:`keyframe_steps`) keep that state at a few steps, so any stretch can be replayed later.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from . import attention, distributed, hardware  # noqa: F401 (attention registers eager_fp32)
from .config import RunConfig, TrainConfig
from .corpus import CorpusWarning, cache_root, load_corpus, source_description
from .data import Masker, StepBatches, pack, unigram_entropy
from .errors import MlmscopeError
from .manifest import TRAIN_LOG, CheckpointEntry, Manifest, atomic_write_text, step_dirname, weights_sha256
from .tokenizer import (
    load_tokenizer_ref,
    save_atomic,
    shipped_tokenizer,
    store_by_hash,
    tokenizer_hash,
    tokenizer_key,
    train_wordpiece,
)

RESUME_DIR = "resume"
KEYFRAMES_DIR = "keyframes"
STATE_FILE = "state.pt"
TOKENIZER_DIR = "tokenizer"
VAL_MASK_SEED = 1234  # fixed masking of the validation sequences: every checkpoint is scored on the same masks


class TrainingError(MlmscopeError, RuntimeError):
    """Training stopped for a reason the user must act on (message is user-facing)."""


def checkpoint_steps(cfg: TrainConfig) -> list[int]:
    """The checkpoint schedule: 0, 1, 2, 4, … (powers of two below ``linear_every``), then every ``linear_every``
    steps, always ending at ``max_steps``; or the explicit ``cfg.steps`` (validated: strictly increasing, ≥ 0).

    Pythia-style log+linear (Biderman et al. 2023; docs/notes/training.md, "Checkpoint schedule"): dense where the
    model changes fastest, linear where it is slow.
    """
    if cfg.steps:
        steps = [int(s) for s in cfg.steps]
        if any(b <= a for a, b in itertools.pairwise(steps)) or steps[0] < 0:
            raise TrainingError(f"checkpoint steps must be strictly increasing and >= 0, got {steps}")
        if steps[-1] > cfg.max_steps:
            raise TrainingError(f"checkpoint step {steps[-1]} is beyond max_steps={cfg.max_steps}")
        return steps
    if cfg.linear_every <= 0:
        raise TrainingError("linear_every must be positive")
    log = [0] + [2**k for k in range(0, 64) if 2**k < min(cfg.linear_every, cfg.max_steps)]
    lin = list(range(cfg.linear_every, cfg.max_steps + 1, cfg.linear_every))
    return sorted(set(log + lin + [cfg.max_steps]))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then linear decay to 0 at ``max_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps))


def keyframe_steps(cfg: TrainConfig, schedule: list[int]) -> list[int]:
    """Checkpoint steps whose full resumable state is kept (``keyframes/step_XXXXXX/``) for ``mlmscope zoom``.

    For n = ``cfg.keyframes`` and T = ``max_steps``: the schedule step at or before k·T/(n + 1) for k = 1…n
    (duplicates dropped), so a replay never starts more than about T/(n + 1) steps plus one checkpoint spacing
    before its window. Step 0 is never one (its state is rebuilt from the seeds), nor T (nothing follows it).
    """
    out = set()
    for k in range(1, cfg.keyframes + 1):
        at = bisect.bisect_right(schedule, k * cfg.max_steps / (cfg.keyframes + 1)) - 1
        if at >= 0 and 0 < schedule[at] < cfg.max_steps:
            out.add(schedule[at])
    return sorted(out)


def config_sha256(config: dict) -> str:
    """Hash of a run config as the manifest saves it (``run.config``; key order and tuple/list do not matter).

    Recorded as ``run.config_sha256`` when a run starts; ``mlmscope zoom`` refuses a run whose saved config no
    longer hashes to it (edited after training, so a replay would not be the run that was trained).
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


class SparseMLM(torch.nn.Module):
    """``BertForMaskedLM`` objective with sparse prediction: the MLM head runs only at masked positions.

    With ``reg`` (a ``SASRegConfig`` with λ ≠ 0) and per-token dependency heads, Chen et al.'s SAS term
    ``λ · Σ_arcs max_{layer, head} α`` is added to the loss (``mlmscope.checkpoints.sas_reg``; needs eager attention).
    """

    def __init__(self, model: BertForMaskedLM, reg=None) -> None:
        super().__init__()
        self.model = model
        self.reg = reg

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, heads: torch.Tensor | None = None, lam: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (mean cross-entropy over masked positions [+ SAS term], number of correct top-1 predictions in
        eval mode, else None)."""
        with_reg = heads is not None and lam != 0.0
        out = self.model.bert(input_ids=input_ids, output_attentions=with_reg)
        sel = labels != -100
        logits = self.model.cls(out.last_hidden_state[sel]).float()
        target = labels[sel]
        loss = F.cross_entropy(logits, target)
        if with_reg:
            from .sas_reg import sas_regularizer

            assert heads is not None and self.reg is not None  # with_reg: heads given; the trainer passes reg with them
            loss = loss + sas_regularizer(out.attentions, heads, lam, self.reg.directions, self.reg.reduction)
        correct = (logits.argmax(-1) == target).sum() if not self.training else None  # eval only: ~2 % of a step
        return loss, correct


@dataclass
class TrainState:
    """Everything besides the weights that an exact resume needs."""

    step: int = 0
    tokens_seen: int = 0
    wall_clock_s: float = 0.0
    loss_ema: float | None = None

    def advance(self, loss: float, tokens: int) -> None:
        """Count one optimiser step: its tokens and its loss in the EMA (0.98)."""
        self.step += 1
        self.tokens_seen += tokens
        self.loss_ema = loss if self.loss_ema is None else 0.98 * self.loss_ema + 0.02 * loss


def _autocast(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    if precision != "fp32":
        raise TrainingError(f"precision must be 'fp32' or 'bf16' once resolved, not {precision!r}")
    return nullcontext()


def resolve_levers(tc: TrainConfig, device: str, recorded: dict | None = None) -> tuple[TrainConfig, dict]:
    """Turn ``auto`` precision/attention into concrete choices for this device (``mlmscope.checkpoints.hardware``).

    Args:
        tc: The run's training config (may say ``auto``).
        device: Where the run trains.
        recorded: The choices a resumed run made originally (``manifest.run["levers"]``): reused, so a resume
            computes exactly what the original run did even on another machine.

    Returns:
        (a copy of ``tc`` with concrete ``precision`` and ``attn``, the choices with their reasons).
    """
    opt = hardware.fused_adamw_ok(device.split(":")[0])
    if recorded:
        prec = hardware.Choice(**recorded["precision"])
        attn = hardware.Choice(**recorded["attention"])
        if "optimizer" in recorded and opt.value == "fused":  # fused where it was fused, if this device can
            opt = hardware.Choice(**recorded["optimizer"])
    else:
        try:
            prec = hardware.resolve_precision(tc.precision, device)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        attn = hardware.resolve_attention(tc.attn, device, prec.value)
    levers = {
        "precision": prec.to_dict(),
        "attention": attn.to_dict(),
        "optimizer": opt.to_dict(),
        "hardware": hardware.describe(),
    }
    return dataclasses.replace(tc, precision=prec.value, attn=attn.value), levers


def _versions() -> dict[str, str]:
    import datasets
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "datasets": datasets.__version__,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, force: bool) -> Manifest | None:
    """Check everything that can be checked, then make the run folder ready; return the manifest when resuming.

    Nothing on disk changes before the config (``RunConfig.validate``) and the corpus (readable, text, splittable:
    ``load_corpus``, whose result is cached for the run itself) have passed. ``force`` never deletes first: the old
    run is renamed to a hidden sibling (:func:`_replaced_path`), deleted once the new run has finished
    (:func:`_drop_replaced`), and moved back if the new run fails before that (:func:`recover_replaced`:
    at once by ``mlmscope train``, and by the next ``train`` on the folder after a kill).

    Raises:
        ConfigError / CorpusError / ManifestError / TrainingError with a user-facing message.
    """
    recover_replaced(run_dir)  # an unfinished --force replacement: the old run comes back unless the new one trained
    manifest_path = run_dir / "manifest.json"
    if resume:
        if not manifest_path.exists() or not (run_dir / RESUME_DIR / "state.pt").exists():
            raise TrainingError(f"cannot resume {run_dir}: no manifest or resumable state there")
        return Manifest.load(run_dir)
    cfg.validate()
    load_corpus(cfg.data)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"{run_dir} is a file, not a run folder")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            if manifest_path.exists():
                old = _without_idle_regulariser(_normalised(Manifest.load(run_dir).run.get("config")))
                new = _without_idle_regulariser(json.loads(json.dumps(cfg.to_dict())))
                if old != new:
                    diff = _config_diff(old or {}, new or {})
                    raise TrainingError(
                        f"run folder {run_dir} already holds a run with a different config "
                        f"({diff}); use --resume to continue it or --force to overwrite it"
                    )
            raise TrainingError(
                f"run folder {run_dir} already exists; use --resume to continue it or --force to overwrite it"
            )
        if not any((run_dir / name).exists() for name in _RUN_MARKERS) and not any(run_dir.glob("step_*")):
            raise TrainingError(
                f"{run_dir} is not an mlmscope run folder (no manifest.json, tokenizer/ or step_* "
                f"folders); --force replaces only runs: delete it yourself or choose another folder"
            )
        os.replace(run_dir, _replaced_path(run_dir))
    return None


#: What a run folder holds from its first seconds on (``--force`` replaces only folders that look like a run).
_RUN_MARKERS = ("manifest.json", TRAIN_LOG, TOKENIZER_DIR, RESUME_DIR)


def _replaced_path(run_dir: Path) -> Path:
    """Where ``--force`` keeps the run it replaces until the new run has finished: a hidden sibling."""
    run_dir = Path(run_dir).resolve()
    return run_dir.with_name(f".{run_dir.name}.replaced")


def _drop_replaced(run_dir: Path) -> None:
    """Delete the run that ``--force`` replaced (called once the new run has listed a checkpoint)."""
    old = _replaced_path(run_dir)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def recover_replaced(run_dir: str | os.PathLike, failed: bool = False) -> bool:
    """Finish or undo an unfinished ``--force`` replacement of ``run_dir``.

    The replaced run is kept until the new run finishes. If the new run failed (``failed``: it raised, e.g. a loss
    that became NaN several steps in), or it never listed a trained checkpoint (step > 0), the new run is deleted and
    the old run moved back. A new run that was interrupted after training a while (kill -9, then ``train`` again,
    typically ``--resume``) is the one the user is continuing: the old run is deleted then.

    Returns:
        True if the old run was moved back into ``run_dir``.
    """
    run_dir = Path(run_dir)
    old = _replaced_path(run_dir)
    if not old.exists():
        return False
    try:
        started = any(c.step > 0 for c in Manifest.load(run_dir).checkpoints) and not failed
    except (OSError, ValueError):  # no manifest yet, or an unreadable one: the new run never got going
        started = False
    if started:
        _drop_replaced(run_dir)
        return False
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.replace(old, run_dir)
    return True


def _normalised(config: dict | None) -> dict | None:
    """A saved config with the fields added since it was written filled in with their defaults (as JSON types), so
    an older run differs from a new config only where a setting really differs."""
    try:
        return json.loads(json.dumps(RunConfig.from_dict(config).to_dict())) if config else config
    except (TypeError, KeyError, ValueError):
        return config


def _without_idle_regulariser(config: dict | None) -> dict | None:
    """``config`` without the SAS regulariser's settings when λ = 0 (they change nothing then, and their defaults
    may differ between the versions that wrote the two configs)."""
    reg = (config or {}).get("sas_reg")
    if isinstance(reg, dict) and not reg.get("lam"):
        return {**(config or {}), "sas_reg": {"lam": reg.get("lam", 0.0)}}
    return config


def _config_diff(a: dict, b: dict, prefix: str = "") -> str:
    diffs = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _config_diff(va, vb, f"{prefix}{k}.")
            if d:
                diffs.append(d)
        elif va != vb:
            diffs.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return ", ".join(diffs)


def _build_tokenizer(
    run_dir: Path, cfg: RunConfig, train_texts, fingerprint: str, resume: bool
) -> tuple[PreTrainedTokenizerFast, str]:
    """The run's tokenizer and where it came from, first match wins:

    1. on resume, the run's own ``tokenizer/``;
    2. ``cfg.data.tokenizer``: a path or the hash of a tokenizer kept by an earlier run (reuse across runs);
    3. the tokenizer shipped for this (corpus, vocab size, casing) — the default corpus's, so that the same command
       trains the same model on every machine (``mlmscope.checkpoints.tokenizer.shipped_tokenizer``);
    4. the per-machine cache for this key; else trained now and cached.

    Every tokenizer used is also kept content-addressed under the cache's ``tokenizers/sha256/`` so a later run can
    name it by the hash its manifest records.
    """
    tok_dir = run_dir / TOKENIZER_DIR
    if resume and tok_dir.exists():
        return PreTrainedTokenizerFast.from_pretrained(str(tok_dir)), "run"
    root = cache_root() / "tokenizers"
    key = tokenizer_key(fingerprint, cfg.data.vocab_size, cfg.data.lowercase)
    cached = root / key
    if cfg.data.tokenizer:
        tok, source = load_tokenizer_ref(cfg.data.tokenizer, root), f"given: {cfg.data.tokenizer}"
    elif (tok := shipped_tokenizer(key)) is not None:
        source = f"shipped: checkpoints/assets/tokenizers/{key}.json"
    elif (cached / "tokenizer.json").exists():
        tok, source = PreTrainedTokenizerFast.from_pretrained(str(cached)), f"cache: {cached}"
    else:
        tok, source = (
            train_wordpiece(train_texts, vocab_size=cfg.data.vocab_size, lowercase=cfg.data.lowercase),
            "trained",
        )
        _keep(lambda: save_atomic(tok, cached))
    _keep(lambda: store_by_hash(tok, root))
    tok.save_pretrained(str(tok_dir))
    return tok, source


def _keep(write: Callable[[], object]) -> None:
    """Run a cache write; the cache is an optimisation, so an unwritable cache must not stop the run."""
    try:
        write()
    except OSError:
        pass


def _build_model(cfg: RunConfig, vocab_size: int, device: str = "cpu") -> BertForMaskedLM:
    torch.manual_seed(cfg.train.init_seed)
    bert_cfg = cfg.model.to_bert_config(vocab_size=vocab_size)
    attn = cfg.train.attn
    if attn == "auto":
        attn = resolve_levers(cfg.train, device)[0].attn
    # The SAS regulariser needs attention probabilities, which only eager attention returns.
    bert_cfg._attn_implementation = "eager" if cfg.sas_reg.active else attn
    return BertForMaskedLM(bert_cfg)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (BERT convention)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW: one kernel per step instead of a loop over tensors (measured ~15 % faster per step on CPU), where
    # torch has the kernel for the parameters' device (``hardware.fused_adamw_ok``); else the foreach loop.
    if fused is None:
        fused = hardware.fused_adamw_ok(next(model.parameters()).device.type).value == "fused"
    betas = cast(tuple[float, float], tuple(cfg.betas))  # two floats (config check); a tuple, as saved before
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=fused, foreach=None if fused else True)


@torch.no_grad()
def evaluate(
    model: BertForMaskedLM, val_inputs: torch.Tensor, val_labels: torch.Tensor, batch_size: int, device: str
) -> tuple[float, float]:
    """Validation MLM loss (nats per masked token) and top-1 accuracy on fixed masks, fp32."""
    was_training = model.training
    model.eval()
    objective = SparseMLM(model).eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in zip(val_inputs.split(batch_size), val_labels.split(batch_size)):
        m = int((y != -100).sum())
        if m == 0:
            continue
        loss, c = objective(x.to(device), y.to(device))
        loss_sum += float(loss) * m
        correct += int(c)
        n += m
    model.train(was_training)
    return (loss_sum / n, correct / n) if n else (float("nan"), float("nan"))


def _save_checkpoint(
    run_dir: Path, model: BertForMaskedLM, tok: PreTrainedTokenizerFast, state: TrainState, last_good: int | None
) -> tuple[str, str]:
    """Write ``step_XXXXXX/`` atomically (temp folder + rename); return (folder name, weights sha256)."""
    name = step_dirname(state.step)
    final, tmp = run_dir / name, run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "mlmscope.json").write_text(json.dumps({"step": state.step, "tokens_seen": state.tokens_seen}, indent=1))
        digest = weights_sha256(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(
            f"could not write checkpoint step {state.step} ({e}); nothing half-written was kept, "
            f"the last complete checkpoint is step {last_good}; free space and run with --resume"
        ) from None
    return name, digest


def save_state(path: Path, optimizer, scheduler, state: TrainState, **extra: object) -> None:
    """Everything but the weights that continuing from ``state.step`` needs (optimiser, scheduler, RNG, train state;
    the weights are the checkpoint of that step), written atomically to ``path``; ``extra`` is stored beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "train_state": vars(state),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **extra,
        },
        tmp,
    )
    os.replace(tmp, path)


def _save_resume(run_dir: Path, optimizer, scheduler, state: TrainState) -> None:
    """Rolling resumable state for the latest checkpoint (replaced atomically, never one per step)."""
    save_state(run_dir / RESUME_DIR / STATE_FILE, optimizer, scheduler, state)


def _save_keyframe(run: _Run) -> None:
    """Keep a copy of the resumable state just written (``keyframes/step_XXXXXX/state.pt``, atomically) and record
    the keyframes and their size in the manifest (``run.keyframes``; saved by the caller)."""
    folder = run.run_dir / KEYFRAMES_DIR / step_dirname(run.state.step)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp"
    shutil.copyfile(run.run_dir / RESUME_DIR / STATE_FILE, tmp)
    os.replace(tmp, folder / STATE_FILE)
    found = list_keyframes(run.run_dir)
    run.manifest.run["keyframes"] = {"steps": sorted(found), "bytes": sum(f.stat().st_size for f in found.values())}


def list_keyframes(run_dir: str | os.PathLike) -> dict[int, Path]:
    """Step -> state file of every keyframe kept in a run folder (``keyframes/step_XXXXXX/state.pt``)."""
    out = {}
    for f in Path(run_dir).glob(f"{KEYFRAMES_DIR}/step_*/{STATE_FILE}"):
        try:
            out[int(f.parent.name.removeprefix("step_"))] = f
        except ValueError:
            continue
    return dict(sorted(out.items()))


def _restore(run_dir: Path, manifest: Manifest, blob: dict, model, optimizer, scheduler, verb: str) -> TrainState:
    """Load a saved state (:func:`save_state`) and the weights of its step, checked against the manifest's hash.

    Args:
        verb: What the restore is for in messages (``resume``, ``replay``).

    Raises:
        TrainingError: the step is not listed, its weights are missing, damaged or of another shape.
    """
    state = TrainState(**blob["train_state"])
    entry = next((c for c in manifest.checkpoints if c.step == state.step), None)
    if entry is None:
        raise TrainingError(f"the saved state is for step {state.step}, which the manifest does not list")
    ckpt = run_dir / entry.path
    try:
        digest = weights_sha256(ckpt)
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot {verb} from step {state.step}: {e}") from None
    if digest != entry.sha256:
        raise TrainingError(
            f"cannot {verb}: weights of step {state.step} ({ckpt}) do not match the manifest hash "
            f"(corrupted file); run `mlmscope verify {run_dir}`"
        )
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    if unexpected or [m for m in missing if "decoder" not in m]:
        raise TrainingError(f"checkpoint step {state.step} does not match the run's model shape")
    model.tie_weights()
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return state


def _load_resume(run_dir: Path, manifest: Manifest, model, optimizer, scheduler) -> TrainState:
    blob = torch.load(run_dir / RESUME_DIR / STATE_FILE, weights_only=False)
    state = _restore(run_dir, manifest, blob, model, optimizer, scheduler, "resume")
    # Drop anything written after the resumable checkpoint (a kill between the manifest update and the state).
    manifest.checkpoints = [c for c in manifest.checkpoints if c.step <= state.step]
    log = run_dir / TRAIN_LOG
    if log.exists():
        keep = [ln for ln in log.read_text().splitlines() if (s := _log_step(ln)) is not None and s <= state.step]
        atomic_write_text(log, "".join(ln + "\n" for ln in keep))
    return state


def _log_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------------------------
# One run: set-up, the loop, the end
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """The run's tokenizer and token data (:func:`_load_data`)."""

    tok: PreTrainedTokenizerFast
    tok_source: str  # where the tokenizer came from (manifest ``tokenizer_source``)
    fingerprint: str  # of the corpus
    train_texts: list[str]  # what the SAS regulariser parses for dependency heads
    batches: StepBatches  # the training batch of any step
    val_inputs: torch.Tensor  # validation sequences, masked once with VAL_MASK_SEED
    val_labels: torch.Tensor
    facts: dict  # what the manifest records about the data


@dataclass
class _Run:
    """A run being trained: what :func:`_setup` builds, the loop advances and :func:`_checkpoint` saves."""

    run_dir: Path
    cfg: RunConfig  # as trained: precision and attention resolved for the device
    device: str
    dist: distributed.Dist
    manifest: Manifest
    schedule: list[int]  # checkpoint steps
    data: _Data
    model: BertForMaskedLM
    objective: torch.nn.Module  # SparseMLM over the model (DDP-wrapped / compiled as configured)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    heads: torch.Tensor | None  # dependency heads of the training sequences (SAS regulariser only)
    state: TrainState
    t0: float  # time.perf_counter() at which the run's wall clock read 0
    last_good: int | None  # the latest checkpoint written completely
    val_loss: float | None  # at the latest checkpoint
    keyframes: tuple[int, ...] = ()  # steps whose resumable state is kept (keyframe_steps)

    @property
    def tc(self) -> TrainConfig:
        return self.cfg.train


def train(
    run_dir: str | os.PathLike,
    cfg: RunConfig,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    progress: bool = True,
    on_checkpoint: Callable[[CheckpointEntry], None] | None = None,
) -> Manifest:
    """Train one run into ``run_dir`` and return its manifest.

    Args:
        run_dir: Run folder (created). With ``resume`` the saved config is used and ``cfg`` is ignored.
        cfg: Full run configuration.
        resume: Continue an interrupted run exactly from its latest checkpoint.
        force: Overwrite an existing run folder.
        device: ``"cpu"``, ``"cuda"``…; default: CUDA if available.
        progress: Show a progress bar.
        on_checkpoint: Called with each new manifest entry (tests, live analysis).

    Raises:
        TrainingError / CorpusError / DataError / TokenizerError with a user-facing message.
    """
    run = _setup(Path(run_dir), cfg, resume, force, device)
    out = _Output(run, progress, on_checkpoint)
    tc, state = run.tc, run.state
    try:
        while True:
            if state.step in run.schedule and not any(c.step == state.step for c in run.manifest.checkpoints):
                _checkpoint(run, out)
            if state.step >= tc.max_steps:
                break
            out.step(run, _step(run))
    except BaseException as e:
        _record_stop(run, e)
        raise
    finally:
        out.close()
    return _finish(run)


def _setup(run_dir: Path, cfg: RunConfig, resume: bool, force: bool, device: str | None) -> _Run:
    """Everything before the first step: device and process group, the checked run folder, the config (the saved one
    on resume) with its levers resolved, data, model, optimiser and scheduler, and the state (restored on resume)."""
    hf_logging.disable_progress_bar()
    device, dist = _init_device(device)
    manifest = _prepare_run_dir(run_dir, cfg, resume, force) if dist.is_main else None
    distributed.barrier(dist)
    if resume:
        manifest = manifest or Manifest.load(run_dir)
        cfg = RunConfig.from_dict(manifest.run["config"])
    requested_cfg = cfg
    tc, levers = resolve_levers(
        cfg.train, device, manifest.run.get("levers") if resume and manifest is not None else None
    )
    cfg = dataclasses.replace(cfg, train=tc)
    schedule = checkpoint_steps(tc)
    if tc.max_steps < 1:
        raise TrainingError("max_steps must be >= 1")
    with _undone_on_failure(run_dir, None if resume or not dist.is_main else run_dir.exists()):
        run_dir.mkdir(parents=True, exist_ok=True)
        data = _load_data(run_dir, cfg, resume, dist)
        model, heads, objective, optimizer, scheduler = _build_training(cfg, levers, data, device, dist)
        if resume:
            assert manifest is not None  # loaded above
            state = _load_resume(run_dir, manifest, model, optimizer, scheduler)
        else:
            state = TrainState()
            manifest = _new_manifest(requested_cfg, levers, data, model, schedule, device, dist)
    manifest.run["status"] = "training"
    manifest.run.pop("error", None)
    last = manifest.checkpoints[-1] if manifest.checkpoints else None
    return _Run(
        run_dir,
        cfg,
        device,
        dist,
        manifest,
        schedule,
        data,
        model,
        objective,
        optimizer,
        scheduler,
        heads,
        state,
        t0=time.perf_counter() - state.wall_clock_s,
        last_good=last.step if last else None,
        val_loss=last.val_loss if last else None,
        keyframes=tuple(keyframe_steps(tc, schedule)),
    )


def _build_training(cfg: RunConfig, levers: dict, data: _Data, device: str, dist: distributed.Dist) -> tuple:
    """The freshly initialised model (seeded by ``init_seed``: the run at step 0) on ``device``, the dependency heads
    of the SAS regulariser (None without it), the objective (DDP-wrapped / compiled as configured), the optimiser and
    the learning-rate scheduler.

    The torch RNG is left as the initialisation leaves it, which is its state at step 0 of the run.
    """
    tc = cfg.train
    # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), which pyright misreads
    model = _build_model(cfg, len(data.tok), device).to(device)  # pyright: ignore[reportArgumentType]
    model.train()
    heads = None
    if cfg.sas_reg.active:
        from .sas_reg import training_heads

        heads = training_heads(data.tok, data.train_texts, tc.seq_len, root_to_cls=cfg.sas_reg.root_to_cls)
    objective = distributed.wrap(SparseMLM(model, cfg.sas_reg), dist, device)
    if tc.compile and device.startswith("cuda"):
        objective = cast(torch.nn.Module, torch.compile(objective))  # a Module compiles to an OptimizedModule
    optimizer = _optimizer(model, tc, fused=levers["optimizer"]["value"] == "fused")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc))
    return model, heads, objective, optimizer, scheduler


def _init_device(device: str | None) -> tuple[str, distributed.Dist]:
    """The device to train on (default: CUDA if available) and this process's place in a torchrun group."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist = distributed.init(device)
    if dist.enabled and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    return device, dist


@contextmanager
def _undone_on_failure(run_dir: Path, existed: bool | None):
    """If the set-up of a new run fails (a tokenizer or packing error, Ctrl-C while the tokenizer trains), remove
    what it wrote, so the next ``train`` is not refused as "already exists" by a folder that holds no checkpoint.

    ``existed``: whether the (then empty: :func:`_prepare_run_dir`) folder was there before, which it is left as;
    None on resume and on ranks other than 0, where nothing is undone. Once a manifest exists this no longer applies.
    """
    try:
        yield
    except BaseException:
        if existed is not None and not (run_dir / "manifest.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            if existed:
                run_dir.mkdir(parents=True, exist_ok=True)
        raise


def _load_data(run_dir: Path, cfg: RunConfig, resume: bool, dist: distributed.Dist) -> _Data:
    """Corpus → tokenizer (rank 0 builds it, the other ranks read it) → packed training sequences, step batches and
    the masked validation sequences."""
    tc = cfg.train
    with warnings.catch_warnings():
        if not (resume and dist.is_main):  # _prepare_run_dir has loaded (and warned about) it once already
            warnings.simplefilter("ignore", CorpusWarning)
        corpus, fingerprint = load_corpus(cfg.data)
    train_texts, val_texts = list(corpus["train"]["text"]), list(corpus["validation"]["text"])
    if dist.is_main:
        tok, tok_source = _build_tokenizer(run_dir, cfg, train_texts, fingerprint, resume)
        distributed.barrier(dist)
    else:
        distributed.barrier(dist)
        tok, tok_source = PreTrainedTokenizerFast.from_pretrained(str(run_dir / TOKENIZER_DIR)), "rank 0"
    special = tuple(tok.all_special_ids)
    mask_id = cast(int, tok.mask_token_id)  # our tokenizers have [MASK]; transformers types the id loosely
    masker = Masker(mask_id, len(tok), special, tc.mask_rate, tc.mask_replace)
    train_data = pack(tok, train_texts, tc.seq_len)
    batches = StepBatches(train_data, masker, tc.batch_size, tc.grad_accum, tc.data_seed, dist.rank, dist.world_size)
    val_all = pack(tok, val_texts, tc.seq_len)
    val_data = val_all[: tc.val_batches * tc.batch_size]
    val_inputs, val_labels = masker(val_data, torch.Generator().manual_seed(VAL_MASK_SEED))
    facts = {
        "n_train_sequences": len(train_data),
        "n_val_sequences": len(val_data),
        "val_unigram_entropy": unigram_entropy(val_all, special),
    }
    return _Data(tok, tok_source, fingerprint, train_texts, batches, val_inputs, val_labels, facts)


def _new_manifest(
    cfg: RunConfig,
    levers: dict,
    data: _Data,
    model: BertForMaskedLM,
    schedule: list[int],
    device: str,
    dist: distributed.Dist,
) -> Manifest:
    """A new run's manifest: the config as requested (``auto`` kept; ``levers`` says what it resolved to), the data
    and the provenance."""
    return Manifest(
        run={
            "config": cfg.to_dict(),
            "config_sha256": config_sha256(cfg.to_dict()),
            "levers": levers,
            "corpus": source_description(cfg.data),
            "corpus_fingerprint": data.fingerprint,
            "tokenizer_sha256": tokenizer_hash(data.tok),
            "tokenizer_source": data.tok_source,
            **data.facts,
            "n_params": sum(p.numel() for p in model.parameters()),
            "schedule": schedule,
            "versions": _versions(),
            "git_commit": _git_commit(),
            "world_size": dist.world_size,
            "device": device,
            "threads": torch.get_num_threads(),
            "status": "training",
        }
    )


class _Output:
    """Where a run's progress goes, on rank 0: ``train_log.jsonl`` every ``log_every`` steps, the progress bar, and
    the ``on_checkpoint`` callback."""

    def __init__(self, run: _Run, progress: bool, on_checkpoint: Callable[[CheckpointEntry], None] | None) -> None:
        main, tc = run.dist.is_main, run.tc
        self.on_checkpoint = on_checkpoint
        self.log = open(run.run_dir / TRAIN_LOG, "a") if main else None  # noqa: SIM115 (closed by close())
        self.bar = None
        if progress and main:
            from tqdm import tqdm

            self.bar = tqdm(
                total=tc.max_steps,
                initial=run.state.step,
                unit="step",
                dynamic_ncols=True,
                desc=f"train {run.run_dir.name} [{tc.precision}, {tc.attn}]",
            )
            reason = run.manifest.run["levers"]["precision"]["reason"]
            self.bar.write(f"precision {tc.precision} ({reason}); attention {tc.attn}")

    def step(self, run: _Run, loss: float) -> None:
        """After an optimiser step (``run.state`` already counts it)."""
        state = run.state
        if self.log is not None and state.step % run.tc.log_every == 0:
            self.log.write(
                json.dumps(
                    {
                        "step": state.step,
                        "loss": loss,
                        "lr": run.scheduler.get_last_lr()[0],
                        "tokens": state.tokens_seen,
                    }
                )
                + "\n"
            )
            self.log.flush()
        if self.bar is not None:
            self.bar.update(1)
            if state.step % 20 == 0:
                self._postfix(run)

    def checkpoint(self, run: _Run, entry: CheckpointEntry) -> None:
        """After a checkpoint is listed in the manifest."""
        if self.bar is not None:
            self._postfix(run)
        if self.on_checkpoint:
            self.on_checkpoint(entry)

    def _postfix(self, run: _Run) -> None:
        assert self.bar is not None  # called only with a progress bar
        shown = {"loss": run.state.loss_ema, "val_loss": run.val_loss}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def _checkpoint(run: _Run, out: _Output) -> None:
    """Write the checkpoint and list it in the manifest, then the resumable state (and at keyframe steps a kept copy
    of it); rank 0 writes, every rank waits for it.

    The state follows the manifest: a run killed between the two resumes from the previous state, and retrains (and
    rewrites, identically) the checkpoint the manifest already lists.
    """
    if run.dist.is_main:
        entry = run.manifest.add(write_checkpoint(run))
        run.manifest.save(run.run_dir)
        _save_resume(run.run_dir, run.optimizer, run.scheduler, run.state)
        if run.state.step in run.keyframes:
            _save_keyframe(run)
            run.manifest.save(run.run_dir)
        run.last_good = run.state.step
        out.checkpoint(run, entry)
    distributed.barrier(run.dist)


def write_checkpoint(run: _Run, segment: int | None = None) -> CheckpointEntry:
    """Score the validation set and write ``step_XXXXXX/`` of the run's current state; return its manifest entry
    (not yet added). ``segment``: the zoom segment writing it (:mod:`.zoom`), None while training."""
    state = run.state
    state.wall_clock_s = time.perf_counter() - run.t0
    run.val_loss, val_acc = evaluate(run.model, run.data.val_inputs, run.data.val_labels, run.tc.batch_size, run.device)
    name, digest = _save_checkpoint(run.run_dir, run.model, run.data.tok, state, run.last_good)
    return CheckpointEntry(
        step=state.step,
        path=name,
        tokens_seen=state.tokens_seen,
        wall_clock_s=round(state.wall_clock_s, 3),
        train_loss=state.loss_ema,
        val_loss=run.val_loss,
        val_acc=val_acc,
        sha256=digest,
        segment=segment,
    )


def _step(run: _Run) -> float:
    """One optimiser step from ``run.state.step`` (the same code trains and replays); returns the step's loss.

    Raises:
        TrainingError: the loss is not finite (on any rank).
    """
    state = run.state
    loss = _train_step(
        run.objective,
        run.optimizer,
        run.scheduler,
        run.data.batches,
        state.step,
        run.tc,
        run.device,
        run.heads,
        run.cfg.sas_reg.lam_at(state.step),
    )
    loss = distributed.mean(loss, run.dist)
    if distributed.any_flag(not math.isfinite(loss), run.dist):
        raise TrainingError(
            f"loss became {loss} at step {state.step + 1}; training stopped, the last good "
            f"checkpoint is step {run.last_good} (lower --lr or use --precision fp32)"
        )
    state.advance(loss, run.data.batches.tokens_per_step())
    return loss


def _record_stop(run: _Run, e: BaseException) -> None:
    """Save in the manifest why training stopped: ``failed`` (a TrainingError) or ``interrupted``."""
    if run.dist.is_main:
        run.manifest.run["status"] = "failed" if isinstance(e, TrainingError) else "interrupted"
        run.manifest.run["error"] = str(e)
        run.manifest.save(run.run_dir)


def _finish(run: _Run) -> Manifest:
    """Mark the run finished, delete the run ``--force`` replaced, leave the process group; every rank returns what
    rank 0 wrote."""
    if run.dist.is_main:
        run.manifest.run["status"] = "finished"
        run.manifest.save(run.run_dir)
        _drop_replaced(run.run_dir)
    distributed.barrier(run.dist)
    distributed.shutdown(run.dist)
    return Manifest.load(run.run_dir)


# ------------------------------------------------------------------------------------------------------------------
# Replays (``mlmscope zoom``): the same set-up, state and step as training, for a finished stretch of a run
# ------------------------------------------------------------------------------------------------------------------


def open_replay(run_dir: Path, manifest: Manifest, device: str, check: Callable[[_Data], None] | None = None) -> _Run:
    """A trained run rebuilt from its folder as it was at step 0, to replay a stretch of it (single process).

    Uses the saved config with the recorded levers (precision, attention, fused AdamW: :func:`resolve_levers`), the
    run's own ``tokenizer/`` and its corpus; the model is freshly initialised from ``init_seed`` and the torch RNG
    left as that leaves it, i.e. the run's state at step 0. Move it on with :func:`restore_state`.

    Args:
        run_dir: The run folder (holds ``tokenizer/``).
        manifest: Its manifest; replayed checkpoints are added to it by the caller.
        device: Where to replay (the recorded one, for identical arithmetic).
        check: Called with the loaded corpus and tokenizer before the model is built (to refuse changed ones).

    Raises:
        TrainingError / CorpusError / DataError with a user-facing message.
    """
    hf_logging.disable_progress_bar()
    dist = distributed.Dist()
    cfg = RunConfig.from_dict(manifest.run["config"])
    tc, levers = resolve_levers(cfg.train, device, manifest.run.get("levers"))
    cfg = dataclasses.replace(cfg, train=tc)
    data = _load_data(run_dir, cfg, True, dist)
    if check is not None:
        check(data)
    model, heads, objective, optimizer, scheduler = _build_training(cfg, levers, data, device, dist)
    schedule = checkpoint_steps(tc)
    state = TrainState()
    return _Run(
        run_dir,
        cfg,
        device,
        dist,
        manifest,
        schedule,
        data,
        model,
        objective,
        optimizer,
        scheduler,
        heads,
        state,
        t0=time.perf_counter(),
        last_good=None,
        val_loss=None,
    )


def restore_state(run: _Run, blob: dict) -> None:
    """Move a replay (:func:`open_replay`) to a saved state (a keyframe's or a replay's own, :func:`save_state`):
    the weights of its step (hash-checked against the manifest), optimiser, scheduler, RNG and train state. The
    run's wall clock continues the saved one."""
    run.state = _restore(run.run_dir, run.manifest, blob, run.model, run.optimizer, run.scheduler, "replay")
    run.t0 = time.perf_counter() - run.state.wall_clock_s
    run.last_good = run.state.step


def replay_step(run: _Run) -> float:
    """One optimiser step of a replay: exactly the training loop's step (:func:`_step`); returns its loss."""
    return _step(run)


def weights_digest(run: _Run, scratch: Path) -> str:
    """The content hash (``weights_sha256``) that a checkpoint of the run's current weights would have: saved the
    way :func:`_save_checkpoint` saves them into the folder ``scratch`` (emptied first, removed after)."""
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        run.model.save_pretrained(str(scratch))
        return weights_sha256(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train_step(
    objective,
    optimizer,
    scheduler,
    batches: StepBatches,
    step: int,
    tc: TrainConfig,
    device: str,
    heads: torch.Tensor | None = None,
    lam: float = 0.0,
) -> float:
    """One optimiser step over ``grad_accum`` micro-batches; returns the mean loss (NaN skips the update)."""
    total = 0.0
    micro = batches.micro_batches(step)
    micro_heads = [None] * len(micro)
    if heads is not None and lam != 0.0:
        from .sas_reg import step_heads

        micro_heads = [h.to(device) for h in step_heads(heads, batches, step)]
    for (x, y), h in zip(micro, micro_heads):
        with _autocast(tc.precision, device):
            loss, _ = objective(x.to(device, non_blocking=True), y.to(device, non_blocking=True), h, lam)
        (loss / len(micro)).backward()
        loss = loss.detach()
        total += loss.item() / len(micro)
    if not math.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        return total
    torch.nn.utils.clip_grad_norm_(objective.parameters(), tc.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total
