"""The trajectory store: a run folder of ``step_XXXXXX/`` checkpoint dirs plus ``manifest.json``.

Layout of a run::

    runs/demo/
        manifest.json          # run metadata + one entry per finished checkpoint (written atomically)
        train_log.jsonl        # one line per optimiser step: step, loss, lr, tokens
        step_000000/           # plain save_pretrained dir: model.safetensors, config.json, tokenizer files
        step_000001/ ...
        resume/                # rolling resumable state of the latest checkpoint (optimiser, RNG, data position)
        keyframes/step_XXXXXX/ # the same full state kept at a few steps, for replays (``mlmscope zoom``)

A checkpoint appears in the manifest only after its folder is completely written and hashed, so a reader never sees
a half-written checkpoint. Any folder of checkpoint folders without a manifest (e.g. a downloaded suite) is also
accepted by :func:`list_checkpoints`: steps are parsed from the folder names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import MlmscopeError

MANIFEST = "manifest.json"
TRAIN_LOG = "train_log.jsonl"
WEIGHTS = "model.safetensors"
#: Weight files that make a folder a checkpoint (``pytorch_model.bin``: older ``save_pretrained`` folders).
WEIGHT_FILES = (WEIGHTS, "pytorch_model.bin")
_STEP_RE = re.compile(r"(?:step|checkpoint)[_-]?0*(\d+)")


class ManifestError(MlmscopeError, ValueError):
    """A run's ``manifest.json`` is unreadable, truncated or not a manifest (message names the file)."""


@dataclass
class CheckpointEntry:
    """One finished checkpoint as listed in the manifest.

    Attributes:
        step: Optimiser steps taken (0 = the initialisation).
        path: Folder name relative to the run dir (e.g. ``step_000128``).
        tokens_seen: Training tokens consumed so far (non-padding, all ranks).
        wall_clock_s: Training seconds since the start of the run (resumes continue the clock).
        train_loss: Smoothed (EMA) training MLM loss, None at step 0.
        val_loss: Validation MLM loss (nats per masked token).
        val_acc: Validation top-1 accuracy at masked positions.
        sha256: Content hash of the weights (sha256 over name-sorted tensor names, dtypes, shapes and bytes).
        duplicate_of: Step of an earlier checkpoint with the identical hash, if any (a flagged failure mode).
        segment: Id of the zoom segment that wrote it (``mlmscope zoom``: a replay proven identical to the original
            run, described in the manifest's ``run.zoom_segments``); None for a checkpoint of the training run.
    """

    step: int
    path: str
    tokens_seen: int = 0
    wall_clock_s: float = 0.0
    train_loss: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    sha256: str = ""
    duplicate_of: int | None = None
    segment: int | None = None


@dataclass
class Manifest:
    """Run-level metadata plus the list of finished checkpoints."""

    run: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[CheckpointEntry] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Manifest:
        """Read ``run_dir/manifest.json``.

        Raises:
            FileNotFoundError: no manifest there.
            ManifestError: the file is unreadable, truncated, not JSON or not a manifest (the message names it).
        """
        path = Path(run_dir) / MANIFEST
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"cannot read the run manifest {path}: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(
                f"the run manifest {path} is truncated or damaged (invalid JSON at line {e.lineno}, "
                f"column {e.colno}: {e.msg}); restore it from a copy, or retrain the run with "
                f"--force"
            ) from None
        try:
            return cls(
                run=dict(data.get("run", {})), checkpoints=[CheckpointEntry(**c) for c in data.get("checkpoints", [])]
            )
        except (AttributeError, TypeError, ValueError) as e:
            raise ManifestError(f"the run manifest {path} is not an mlmscope manifest ({e})") from None

    def save(self, run_dir: str | os.PathLike) -> None:
        atomic_write_text(
            Path(run_dir) / MANIFEST,
            json.dumps({"run": self.run, "checkpoints": [asdict(c) for c in self.checkpoints]}, indent=1),
        )

    def add(self, entry: CheckpointEntry) -> CheckpointEntry:
        """Append (or replace the same step), flagging an identical hash at another step as a duplicate."""
        self.checkpoints = [c for c in self.checkpoints if c.step != entry.step]
        for c in self.checkpoints:
            if c.sha256 and c.sha256 == entry.sha256:
                entry.duplicate_of = c.step
                break
        self.checkpoints.append(entry)
        self.checkpoints.sort(key=lambda c: c.step)
        return entry


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def weights_sha256(ckpt_dir: str | os.PathLike) -> str:
    """Content hash of a checkpoint's weights, independent of file layout and metadata.

    Hashes tensor names, dtypes, shapes and raw bytes in name order, so two folders holding the same tensors hash
    equal even if the safetensors header differs. Raises ``FileNotFoundError``/``ValueError`` on a missing or
    corrupted weights file.
    """
    from safetensors import safe_open

    path = Path(ckpt_dir) / WEIGHTS
    h = hashlib.sha256()
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                h.update(name.encode())
                h.update(str(t.dtype).encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises several error types for a damaged header or body
        raise ValueError(f"corrupted weights file {path}: {e}") from None
    return h.hexdigest()


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[CheckpointEntry]:
    """Finished checkpoints of a run, sorted by step.

    With a manifest, exactly its entries; without one, every sub-folder holding a ``config.json`` and a weights file
    (:data:`WEIGHT_FILES`) whose name contains a step number (``step_123``, ``checkpoint-123``), hash left empty: a
    folder with only a tokenizer or only a config is not a checkpoint.
    """
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST).exists():
        return Manifest.load(run_dir).checkpoints
    out = []
    for d in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        m = _STEP_RE.search(d.name)
        if d.is_dir() and m and (d / "config.json").exists() and has_weights(d):
            out.append(CheckpointEntry(step=int(m.group(1)), path=d.name))
    return sorted(out, key=lambda c: c.step)


def has_weights(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds one of :data:`WEIGHT_FILES`."""
    return any((Path(folder) / w).is_file() for w in WEIGHT_FILES)


def read_train_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-step training log records (tolerates a truncated last line from a killed run)."""
    path = Path(run_dir) / TRAIN_LOG
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
