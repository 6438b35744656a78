"""Results store: one Parquet file per (checkpoint hash, analysis, version, probe-set hash, params hash) and table.

Layout under a run folder::

    runs/demo/results/
        index.json                                   # small index: analysis -> result dir -> meta (rebuildable)
        hashes.json                                  # content-hash cache for folders without a manifest
        sas/<ckpt_hash[:24]>-v<version>-<probe_hash[:12]>-<params_hash[:12]>/
            meta.json                                # key, step, status ("ok" / "skipped"), tables, timing
            per_head.parquet  per_layer.parquet ...  # the tidy frames the accumulator returned
            (artefacts the analysis saved, e.g. lens translators)
        _failures/<ckpt folder>__<analysis>.json     # error + traceback of a failed (checkpoint, analysis)

A result directory is written in a temporary sibling folder and renamed into place with ``os.replace``, so a reader
(or a re-run after ``kill -9``) sees either the complete result or nothing; leftover ``.tmp-*`` folders are ignored.
Results are keyed by the *content* hash of the weights (``mlmscope.checkpoints.manifest.weights_sha256``), so a
re-uploaded or re-trained checkpoint can never silently reuse stale results (docs/notes/runner.md), and two
byte-identical checkpoints share one result.

Example::

    from .store import load_results
    df = load_results("runs/demo", "sas", table="per_head")   # one tidy frame with a `step` column
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..checkpoints.errors import MlmscopeError
from ..checkpoints.manifest import atomic_write_text, list_checkpoints

RESULTS = "results"
INDEX = "index.json"
HASHES = "hashes.json"
META = "meta.json"
FAILURES = "_failures"
#: Analysis name used for failures that concern the whole checkpoint (load, hash, NaN weights).
CHECKPOINT_SCOPE = "_checkpoint"
_TMP_PREFIX = ".tmp-"


class StoreError(MlmscopeError):
    """A user-facing problem with stored results (the CLI prints the message and exits 1)."""


def stable_hash(obj: Any) -> str:
    """SHA-256 of a JSON-serialisable object in canonical form (sorted keys; non-JSON values via ``str``)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class ResultKey:
    """Everything a stored result depends on.

    Attributes:
        analysis: Registered analysis name.
        version: The analysis' ``version`` (bump it when its numbers change).
        ckpt_hash: Content hash of the checkpoint weights.
        probe_hash: Content hash of the probe set.
        params_hash: :func:`stable_hash` of the analysis parameters.
    """

    analysis: str
    version: str
    ckpt_hash: str
    probe_hash: str
    params_hash: str

    @property
    def dirname(self) -> str:
        return f"{self.ckpt_hash[:24]}-v{self.version}-{self.probe_hash[:12]}-{self.params_hash[:12]}"

    @property
    def config(self) -> tuple[str, str, str]:
        """What selects one consistent series across checkpoints: (version, probe hash, params hash)."""
        return (self.version, self.probe_hash, self.params_hash)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


class ResultStore:
    """Read/write access to the results of one run folder.

    Args:
        run_dir: The run (or checkpoint-suite) folder.
        root: Where results live; defaults to ``run_dir/results`` (the benchmark points it at a scratch folder).
    """

    def __init__(self, run_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.root = Path(root) if root is not None else self.run_dir / RESULTS

    # --- paths and lookup ---------------------------------------------------------------------------------------
    def path(self, key: ResultKey) -> Path:
        """Final directory of a result (it exists only once the result is complete)."""
        return self.root / _safe_name(key.analysis) / key.dirname

    def meta(self, key: ResultKey) -> dict[str, Any] | None:
        """The stored meta record of a finished (ok or skipped) result, else None."""
        f = self.path(key) / META
        try:
            return json.loads(f.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def has(self, key: ResultKey) -> bool:
        """True when the result is complete (ok or skipped): the runner will not recompute it without --force."""
        return self.meta(key) is not None

    # --- writing ------------------------------------------------------------------------------------------------
    def save(
        self,
        key: ResultKey,
        tables: dict[str, pd.DataFrame],
        meta: dict[str, Any] | None = None,
        write_extra: Callable[[Path], None] | None = None,
        status: str = "ok",
    ) -> dict[str, Any]:
        """Write a result atomically (temp folder + ``os.replace``) and return its meta record.

        Args:
            key: The result key.
            tables: Table name -> tidy frame (written as ``<table>.parquet``).
            meta: Extra meta fields (step, checkpoint path, seconds, params, reason...).
            write_extra: Called with the temporary folder before the rename, for non-tabular artefacts.
            status: ``"ok"`` or ``"skipped"`` (a skipped result is final too: it is not retried).
        """
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{_TMP_PREFIX}{key.dirname}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for name, df in tables.items():
                if not isinstance(df, pd.DataFrame):
                    raise TypeError(
                        f"analysis {key.analysis!r} returned {type(df).__name__} for table {name!r}; "
                        "expected a pandas DataFrame"
                    )
                df.to_parquet(tmp / f"{_safe_name(name)}.parquet", index=False)
            if write_extra is not None:
                write_extra(tmp)
            record = {
                **(meta or {}),
                **asdict(key),
                "dirname": key.dirname,
                "status": status,
                "tables": sorted(tables),
                "rows": {k: len(v) for k, v in tables.items()},
                "result_id": uuid.uuid4().hex,
                "created": time.time(),
            }
            atomic_write_text(tmp / META, json.dumps(record, indent=1, default=str))
            _fsync_dir(tmp)
            self._commit(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return record

    def save_skip(self, key: ResultKey, reason: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record that an analysis cannot run on this checkpoint (e.g. no MLM head); not retried on a re-run."""
        return self.save(key, {}, {**(meta or {}), "reason": reason}, status="skipped")

    @staticmethod
    def _commit(tmp: Path, final: Path) -> None:
        if final.exists():  # --force: move the old result aside first (a crash here just means "not finished")
            trash = final.parent / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)

    def clean_tmp(self, older_than_s: float = 3600.0) -> int:
        """Delete abandoned temporary folders (from killed runs) older than ``older_than_s``; returns the count."""
        n = 0
        now = time.time()
        for adir in self._analysis_dirs():
            for d in adir.iterdir():
                if d.name.startswith(_TMP_PREFIX) and now - d.stat().st_mtime > older_than_s:
                    shutil.rmtree(d, ignore_errors=True)
                    n += 1
        return n

    # --- failures -----------------------------------------------------------------------------------------------
    def _failure_path(self, ckpt: str, analysis: str) -> Path:
        return self.root / FAILURES / f"{_safe_name(ckpt)}__{_safe_name(analysis)}.json"

    def record_failure(
        self, ckpt: str, analysis: str, error: str, traceback: str = "", meta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Record that ``analysis`` (or :data:`CHECKPOINT_SCOPE`) failed on checkpoint folder ``ckpt``."""
        rec = {
            **(meta or {}),
            "checkpoint": ckpt,
            "analysis": analysis,
            "error": error,
            "traceback": traceback,
            "time": time.time(),
        }
        path = self._failure_path(ckpt, analysis)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(rec, indent=1, default=str))
        return rec

    def clear_failure(self, ckpt: str, analysis: str) -> None:
        """Forget a failure (after the (checkpoint, analysis) pair succeeded)."""
        self._failure_path(ckpt, analysis).unlink(missing_ok=True)

    def failures(self) -> list[dict[str, Any]]:
        """All recorded failures (checkpoint-level ones have ``analysis == "_checkpoint"``)."""
        d = self.root / FAILURES
        out = []
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                out.append(json.loads(f.read_text()))
            except json.JSONDecodeError:
                continue
        return out

    # --- hash cache for manifest-less folders ---------------------------------------------------------------------
    def cached_hash(self, ckpt_dir: Path, compute: Callable[[Path], str]) -> str:
        """Content hash of a checkpoint folder, cached by (weights size, mtime) in ``results/hashes.json``."""
        from ..checkpoints.manifest import WEIGHTS

        w = ckpt_dir / WEIGHTS
        st = w.stat()
        sig = [st.st_size, st.st_mtime_ns]
        cache_file = self.root / HASHES
        try:
            cache = json.loads(cache_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            cache = {}
        hit = cache.get(ckpt_dir.name)
        if hit and hit.get("sig") == sig:
            return hit["sha256"]
        digest = compute(ckpt_dir)
        cache[ckpt_dir.name] = {"sig": sig, "sha256": digest}
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=1))
        return digest

    def known_hashes(self) -> dict[str, str]:
        """Checkpoint folder name -> cached content hash."""
        try:
            return {k: v["sha256"] for k, v in json.loads((self.root / HASHES).read_text()).items()}
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    # --- index --------------------------------------------------------------------------------------------------
    def _analysis_dirs(self) -> Iterable[Path]:
        if not self.root.is_dir():
            return []
        return [d for d in sorted(self.root.iterdir()) if d.is_dir() and not d.name.startswith(("_", "."))]

    def _read_index(self) -> dict[str, dict[str, dict[str, Any]]]:
        try:
            return json.loads((self.root / INDEX).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def index(self, analysis: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """analysis -> result dir name -> meta, from ``index.json``, repaired against the folders on disk.

        Only the meta files of result folders missing from the index are read, so loading stays fast; the repaired
        index is written back (best effort: a read-only store is fine).
        """
        idx = self._read_index()
        changed = False
        for gone in [name for name in idx if not (self.root / name).is_dir()]:  # a whole analysis folder was deleted
            del idx[gone]
            changed = True
        for adir in self._analysis_dirs():
            if analysis is not None and adir.name != _safe_name(analysis):
                continue
            on_disk = {d.name for d in adir.iterdir() if not d.name.startswith(_TMP_PREFIX) and d.is_dir()}
            known = idx.setdefault(adir.name, {})
            for gone in set(known) - on_disk:
                del known[gone]
                changed = True
            for new in sorted(on_disk - set(known)):
                try:
                    known[new] = json.loads((adir / new / META).read_text())
                    changed = True
                except (FileNotFoundError, json.JSONDecodeError):
                    continue
        if changed:
            self._write_index(idx)
        return idx if analysis is None else {k: v for k, v in idx.items() if k == _safe_name(analysis)}

    def _write_index(self, idx: dict[str, Any]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.root / INDEX, json.dumps(idx, default=str))
        except OSError:
            pass

    def note_written(self, records: Iterable[dict[str, Any]]) -> None:
        """Add freshly written meta records to the index (called by the runner's coordinating process)."""
        idx = self._read_index()
        for rec in records:
            idx.setdefault(_safe_name(rec["analysis"]), {})[rec["dirname"]] = rec
        self._write_index(idx)

    def entries(self, analysis: str | None = None) -> list[dict[str, Any]]:
        """Meta records of all stored results (optionally of one analysis), oldest first."""
        recs = [m for per in self.index(analysis).values() for m in per.values()]
        return sorted(recs, key=lambda m: m.get("created", 0.0))

    def analyses(self) -> list[str]:
        """Names of analyses with at least one stored result."""
        return sorted({m["analysis"] for m in self.entries()})

    # --- loading ------------------------------------------------------------------------------------------------
    def load(
        self,
        analysis: str,
        table: str | None = None,
        *,
        version: str | None = None,
        probe_hash: str | None = None,
        params_hash: str | None = None,
    ) -> pd.DataFrame:
        """One tidy frame of an analysis across checkpoints, with a ``step`` column first.

        Args:
            analysis: Analysis name.
            table: Table name; if None and the analysis wrote one table, that table; if it wrote several, all of
                them stacked with a ``table`` column.
            version, probe_hash, params_hash: Select a result series; by default the series (version, probe set,
                params) of the most recently written result, so old versions never mix with new ones. A hash may be
                given as a prefix.

        Returns:
            The rows of every checkpoint, sorted by step (a checkpoint whose weights are byte-identical to another
            step's appears under both steps). Empty frame with a ``step`` column when nothing is stored.

        Raises:
            StoreError: ``table`` is not one of the stored tables.
        """
        recs = [m for m in self.entries(analysis) if m.get("status") == "ok"]
        recs = [
            m
            for m in recs
            if (version is None or str(m["version"]) == str(version))
            and (probe_hash is None or m["probe_hash"].startswith(probe_hash))
            and (params_hash is None or m["params_hash"].startswith(params_hash))
        ]
        if not recs:
            return pd.DataFrame({"step": pd.Series([], dtype="int64")})
        latest = recs[-1]
        recs = [
            m
            for m in recs
            if (m["version"], m["probe_hash"], m["params_hash"])
            == (latest["version"], latest["probe_hash"], latest["params_hash"])
        ]
        tables = sorted({t for m in recs for t in m.get("tables", [])})
        if table is not None and table not in tables:
            raise StoreError(f"analysis {analysis!r} has no table {table!r}; stored tables: {', '.join(tables)}")
        wanted = [table] if table is not None else tables
        steps_of = self._steps_by_hash()
        hashed_steps = {s for steps in steps_of.values() for s in steps}
        frames = []
        for m in recs:
            # A result whose hash is not the current content of its step is stale (re-trained/re-uploaded): drop it.
            steps = steps_of.get(m["ckpt_hash"]) or ([] if m.get("step") in hashed_steps else [m.get("step")])
            for t in wanted:
                if t not in m.get("tables", []):
                    continue
                df = pd.read_parquet(self.root / _safe_name(analysis) / m["dirname"] / f"{_safe_name(t)}.parquet")
                if len(wanted) > 1:
                    df.insert(0, "table", t)
                for s in steps:
                    frames.append(df.assign(step=s))
        if not frames:
            return pd.DataFrame({"step": pd.Series([], dtype="int64")})
        out = pd.concat(frames, ignore_index=True)
        out = out[["step"] + [c for c in out.columns if c != "step"]]
        return out.sort_values("step", kind="stable").reset_index(drop=True)

    def _steps_by_hash(self) -> dict[str, list[int]]:
        """Content hash -> steps of the run's current checkpoints (manifest hashes, else the hash cache)."""
        cached = self.known_hashes()
        out: dict[str, list[int]] = {}
        try:
            entries = list_checkpoints(self.run_dir)
        except (OSError, ValueError):
            entries = []
        for c in entries:
            h = c.sha256 or cached.get(c.path)
            if h:
                out.setdefault(h, []).append(c.step)
        return out


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: not every filesystem supports fsync on a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_results(run_dir: str | os.PathLike, analysis: str, table: str | None = None, **select: Any) -> pd.DataFrame:
    """All stored results of one analysis across a run's checkpoints, as one tidy frame with a ``step`` column.

    Args:
        run_dir: Run folder (``mlmscope analyze RUN`` wrote ``RUN/results``).
        analysis: Analysis name (e.g. ``"sas"``).
        table: Table name (see :meth:`ResultStore.load`).
        **select: ``version``, ``probe_hash``, ``params_hash`` to pick a series other than the latest.
    """
    return ResultStore(run_dir).load(analysis, table, **select)
