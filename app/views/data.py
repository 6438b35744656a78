"""What the dashboard reads: run discovery (single runs and seed groups) and cached, read-only loaders.

Every loader takes a run folder (as a string) and a *fingerprint* of that run: the modification times of its
manifest, training log and results folders. Streamlit's ``st.cache_data`` keys on both, so a rerun after a slider
move only filters cached frames, while a run that is still training or being analysed is re-read as soon as
something new is written (the store and the manifest are written atomically, so a half-written file is never seen).

Nothing here loads a model; live panels use :mod:`mlmscope.app.views.live`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from ...analyses.sources import is_source_spec
from ...analyses.store import CHECKPOINT_SCOPE, FAILURES, RESULTS, ResultStore, StoreError
from ...analyses.target import results_folder
from ...checkpoints.errors import MlmscopeError
from ...checkpoints.manifest import MANIFEST, TRAIN_LOG, list_checkpoints

#: Sub-folders of a run holding the seeds of one group (``mlmscope train RUN --seeds 0,1,2``).
SEED_PREFIX = "seed_"
#: Where the runner caches a run's default probe set (``mlmscope.analyses.runner.DEFAULT_PROBES``).
PROBES_SUBDIR = Path("probes") / "default"


@dataclass(frozen=True)
class Source:
    """One entry of the run picker: a single run, or the seeds of one group (drawn as mean ± band).

    Attributes:
        label: What the picker and the legends show.
        runs: Run folders; more than one for a seed group.
    """

    label: str
    runs: tuple[str, ...]

    @property
    def is_group(self) -> bool:
        return len(self.runs) > 1


# --- discovery --------------------------------------------------------------------------------------------------


def is_run(path: Path) -> bool:
    """A folder with a manifest or at least one checkpoint folder (``step_*`` / ``checkpoint-*``)."""
    if not path.is_dir():
        return False
    if (path / MANIFEST).exists():
        return True
    try:
        return bool(list_checkpoints(path))
    except (OSError, ValueError):
        return False


def _seeds(path: Path) -> list[Path]:
    return (
        sorted(
            (d for d in path.iterdir() if d.is_dir() and d.name.startswith(SEED_PREFIX) and is_run(d)),
            key=lambda d: (len(d.name), d.name),
        )
        if path.is_dir()
        else []
    )


def _sources_of(path: Path, depth: int) -> list[Source]:
    out: list[Source] = []
    if is_run(path):
        out.append(Source(str(path), (str(path),)))
    seeds = _seeds(path)
    if seeds:
        out.append(Source(f"{path} (mean of {len(seeds)} seeds)", tuple(str(s) for s in seeds)))
        out += [Source(str(s), (str(s),)) for s in seeds]
    if not out and depth > 0 and path.is_dir():
        for child in sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))):
            out += _sources_of(child, depth - 1)
    return out


def discover_sources(paths: list[str]) -> tuple[list[Source], list[str]]:
    """Picker entries for the folders given on the command line, and one message per folder that does not exist.

    A run folder gives one entry; a folder of ``seed_*`` runs gives a group entry plus one per seed; a folder of runs
    (e.g. ``runs/``) gives the entries of each run in it. A published source analysed before (``hf:ORG/NAME``, a
    suite file; :mod:`mlmscope.analyses.sources`) stands for its results folder (a suite of seeds is a group). An
    existing folder with nothing in it yet is kept as an (empty) run, so its pages can say so.
    """
    sources: list[Source] = []
    problems: list[str] = []
    for raw in paths:
        if is_source_spec(raw):  # hf:ORG/NAME or a suite file analysed before: its results folder
            try:
                raw = str(results_folder(raw))
            except MlmscopeError as e:
                problems.append(str(e))
                continue
        path = Path(raw)
        if not path.is_dir():
            problems.append(f"run folder {raw!r} does not exist")
            continue
        found = _sources_of(path, depth=1)
        sources += found or [Source(str(path), (str(path),))]
    unique = list(dict.fromkeys(sources))
    return unique, problems


# --- fingerprints -------------------------------------------------------------------------------------------------


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def fingerprint(run: str) -> tuple[int, ...]:
    """Modification times of what the loaders read (a few ``stat`` calls, so it is cheap on every rerun)."""
    root = Path(run)
    res = root / RESULTS
    parts = [root / MANIFEST, root / TRAIN_LOG, root, res, res / FAILURES]
    if res.is_dir():
        parts += sorted(d for d in res.iterdir() if d.is_dir())
    return tuple(_mtime(p) for p in parts)


# --- cached loaders (pure reads of the run folder) ------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=256)
def checkpoints(run: str, fp: tuple[int, ...]) -> pd.DataFrame:
    """The run's finished checkpoints (manifest entries, or step folders without a manifest)."""
    cols = [
        "step",
        "path",
        "tokens_seen",
        "wall_clock_s",
        "train_loss",
        "val_loss",
        "val_acc",
        "sha256",
        "duplicate_of",
    ]
    try:
        rows = [vars(c) for c in list_checkpoints(run)]
    except (OSError, ValueError):
        rows = []
    return pd.DataFrame(rows, columns=cols)


@st.cache_data(show_spinner=False, max_entries=64)
def train_log(run: str, fp: tuple[int, ...]) -> pd.DataFrame:
    """Per-optimiser-step training log (``step``, ``loss``, ``lr``, ``tokens``); empty when there is none."""
    from ...checkpoints.manifest import read_train_log

    return pd.DataFrame(read_train_log(run))


@st.cache_data(show_spinner=False, max_entries=64)
def run_meta(run: str, fp: tuple[int, ...]) -> dict[str, Any]:
    """The manifest's ``run`` record (config, status, versions...); empty without a manifest."""
    from ...checkpoints.manifest import Manifest

    try:
        return Manifest.load(run).run if (Path(run) / MANIFEST).exists() else {}
    except (OSError, ValueError, TypeError):
        return {}


@st.cache_data(show_spinner=False, max_entries=64)
def stored(run: str, fp: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """analysis -> {"tables": [...], "ok": n results, "skipped": {reason: n}} of the run's results store."""
    out: dict[str, dict[str, Any]] = {}
    for m in ResultStore(run).entries():
        rec = out.setdefault(m["analysis"], {"tables": set(), "ok": 0, "skipped": {}})
        if m.get("status") == "ok":
            rec["ok"] += 1
            rec["tables"].update(m.get("tables", []))
        else:
            reason = str(m.get("reason", m.get("status")))
            rec["skipped"][reason] = rec["skipped"].get(reason, 0) + 1
    return {k: {**v, "tables": sorted(v["tables"])} for k, v in out.items()}


@st.cache_data(show_spinner=False, max_entries=512)
def results(run: str, analysis: str, table: str, fp: tuple[int, ...]) -> pd.DataFrame:
    """One stored table of one analysis over all checkpoints (``mlmscope.analyses.store.load_results``).

    Empty if absent.
    """
    try:
        return ResultStore(run).load(analysis, table)
    except (StoreError, OSError, ValueError):
        return pd.DataFrame({"step": pd.Series([], dtype="int64")})


@st.cache_data(show_spinner=False, max_entries=64)
def failures(run: str, fp: tuple[int, ...]) -> pd.DataFrame:
    """Recorded failures: step, checkpoint, analysis (``_checkpoint`` = the whole checkpoint), error."""
    recs = ResultStore(run).failures()
    cols = ["step", "checkpoint", "analysis", "error"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in recs], columns=cols)


@st.cache_data(show_spinner="Verifying checkpoint hashes…", max_entries=16)
def verification(run: str, fp: tuple[int, ...]) -> pd.DataFrame:
    """``mlmscope.checkpoints.verify.verify_run``: step, path, status, detail.

    Status is one of ok/mismatch/corrupted/missing/duplicate.
    """
    from ...checkpoints.verify import verify_run

    try:
        rows = [vars(r) for r in verify_run(run)]
    except (OSError, ValueError) as e:
        rows = [{"step": None, "path": run, "status": "error", "detail": str(e)}]
    return pd.DataFrame(rows, columns=["step", "path", "status", "detail"])


@st.cache_data(show_spinner=False, max_entries=16)
def probe_sentences(run: str) -> pd.DataFrame:
    """The run's default probe set (``RUN/probes/default``) as a frame: index, text, words, heads, relations."""
    from ...probes.probeset import load_probe_set

    folder = Path(run) / PROBES_SUBDIR
    if not (folder / "probeset.json").exists():
        return pd.DataFrame(columns=["index", "text", "words", "heads", "relations"])
    ps = load_probe_set(folder)
    return pd.DataFrame(
        {
            "index": range(len(ps)),
            "text": [" ".join(w) for w in ps.sentences],
            "words": ps.sentences,
            "heads": ps.heads,
            "relations": ps.relations,
        }
    )


# --- uncached helpers -----------------------------------------------------------------------------------------------


def failure_scope(df: pd.DataFrame, analysis: str) -> pd.DataFrame:
    """Failures that concern ``analysis``: its own plus whole-checkpoint ones."""
    return df[df["analysis"].isin([analysis, CHECKPOINT_SCOPE])] if len(df) else df


def checkpoint_dir(run: str, step: int, fp: tuple[int, ...]) -> str | None:
    """Folder of the checkpoint at ``step`` (None if the run has no such checkpoint)."""
    ck = checkpoints(run, fp)
    hit = ck[ck["step"] == step]
    return os.path.join(run, str(hit["path"].iloc[0])) if len(hit) else None


@st.cache_data(show_spinner=False, max_entries=256)
def result_dir(run: str, analysis: str, step: int, fp: tuple[int, ...]) -> str | None:
    """Folder of the newest stored ``ok`` result of ``analysis`` for the checkpoint at ``step`` (for artefacts such
    as tuned-lens translators), or None."""
    ck = checkpoints(run, fp)
    hit = ck[ck["step"] == step]
    if not len(hit):
        return None
    store = ResultStore(run)
    ckpt_hash = hit["sha256"].iloc[0] or store.known_hashes().get(str(hit["path"].iloc[0]))
    recs = [m for m in store.entries(analysis) if m.get("status") == "ok" and m.get("ckpt_hash") == ckpt_hash]
    return str(store.root / analysis / recs[-1]["dirname"]) if recs else None
