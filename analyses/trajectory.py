"""Notebook entry point: ``Trajectory(run)`` gives the checkpoints, the manifest and (once analysed) the results."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..checkpoints.manifest import MANIFEST, CheckpointEntry, Manifest, list_checkpoints, read_train_log


class Trajectory:
    """A run folder (or any folder of checkpoint folders) seen as a trajectory of checkpoints.

    ``run_dir`` may also name a published source analysed before (``"hf:ORG/NAME"``, a suite file: its results
    folder is found, see :mod:`mlmscope.analyses.sources`). A folder of ``seed_*`` runs (``mlmscope train --seeds``,
    a suite with seeds) is a seed group: :attr:`seeds` gives one Trajectory per seed, and :meth:`results` stacks
    theirs with a ``seed`` column.

    Example::

        from mlmscope.analyses.trajectory import Trajectory
        t = Trajectory("runs/demo")
        t.checkpoints_frame()         # step, tokens, losses, hash, duplicate flag
        t.results("sas")              # one tidy frame with a `step` column (after `mlmscope analyze`)
        Trajectory("hf:google/multiberts-seed_0-step_0k,google/multiberts-seed_0-step_20k").results("sas")
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        from .sources import is_source_spec

        if is_source_spec(run_dir):
            from .target import results_folder

            run_dir = results_folder(run_dir)
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"run folder {self.run_dir} does not exist")

    @property
    def seeds(self) -> dict[str, Trajectory]:
        """``{"seed_0": Trajectory, ...}`` for a folder of seed runs; {} for a single run."""
        from .sources import seed_runs

        return {d.name: Trajectory(d) for d in seed_runs(self.run_dir)}

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
        """All stored results of one analysis across checkpoints, with a ``step`` column (see :mod:`.store`); for a
        seed group, every seed's stacked with a ``seed`` column (the folder name) first."""
        from .store import load_results

        seeds = self.seeds
        if seeds:
            frames = [t.results(analysis, table).assign(seed=name) for name, t in seeds.items()]
            df = pd.concat(frames, ignore_index=True)
            return df[["seed", *[c for c in df.columns if c != "seed"]]]
        return load_results(self.run_dir, analysis, table=table)
