"""Notebook entry point: ``Trajectory(run)`` gives the checkpoints, the manifest and (once analysed) the results."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..checkpoints.manifest import MANIFEST, CheckpointEntry, Manifest, list_checkpoints, read_train_log


class Trajectory:
    """A run folder (or any folder of checkpoint folders) seen as a trajectory of checkpoints.

    Example::

        from mlmscope.analyses.trajectory import Trajectory
        t = Trajectory("runs/demo")
        t.checkpoints_frame()         # step, tokens, losses, hash, duplicate flag
        t.results("sas")              # one tidy frame with a `step` column (after `mlmscope analyze`)
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"run folder {self.run_dir} does not exist")

    @property
    def manifest(self) -> Manifest | None:
        return Manifest.load(self.run_dir) if (self.run_dir / MANIFEST).exists() else None

    @property
    def checkpoints(self) -> list[CheckpointEntry]:
        return list_checkpoints(self.run_dir)

    def path(self, entry: CheckpointEntry) -> Path:
        return self.run_dir / entry.path

    def checkpoints_frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(c) for c in self.checkpoints])

    def train_log(self) -> pd.DataFrame:
        return pd.DataFrame(read_train_log(self.run_dir))

    def results(self, analysis: str, table: str | None = None) -> pd.DataFrame:
        """All stored results of one analysis across checkpoints, with a ``step`` column (see :mod:`.store`)."""
        from .store import load_results

        return load_results(self.run_dir, analysis, table=table)
