"""Find (and stop) processes that tests started and left running; used by the session fixture in conftest.py.

A leaked process can hide from a plain ``psutil.Process(pytest).children(recursive=True)``: a server started by a
test's child (``mlmscope app`` runs ``streamlit run`` in a grandchild) is reparented to init, or to a subreaper,
when its parent dies first, and ``start_new_session=True`` moves it out of pytest's session and process group too.
So a process counts as the suite's when any of these holds:

- it is a descendant of the pytest process now;
- it was seen as a descendant after some test (``snapshot``, called after every test) and is still the same
  process (pid and creation time), wherever it was reparented since;
- its environment carries this session's tag (``ENV_TAG``, set in ``os.environ`` at session start, so every
  subprocess that inherits the environment, or extends it with ``{**os.environ, ...}``, carries it);
- its command line names this session's pytest temporary folder (``basetemp``; unique to the session).

Command lines naming the repository are deliberately not a criterion: other people's ``mlmscope`` processes in the
same checkout would match. Multiprocessing's helper processes (resource tracker, forkserver) that are direct
children of pytest are ignored: they exit with it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

ENV_TAG = "MLMSCOPE_TEST_SESSION"
#: Helper processes that belong to the pytest process itself and end with it.
_INFRASTRUCTURE = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _key(p: psutil.Process) -> tuple[int, float] | None:
    try:
        return p.pid, p.create_time()
    except psutil.Error:
        return None


def describe(p: psutil.Process) -> str:
    """``pid 123 (ppid 1): python -m streamlit run ...`` (command line shortened)."""
    try:
        cmd = " ".join(p.cmdline()) or p.name()
        ppid = p.ppid()
    except psutil.Error:
        cmd, ppid = "?", "?"
    return f"pid {p.pid} (ppid {ppid}): {cmd[:300]}"


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessGuard:
    """Records what the pytest process has at the start; later lists and stops what tests left behind."""

    def __init__(self, basetemp: Path | str | None = None) -> None:
        self.me = psutil.Process()
        self.started = time.time()
        self.tag = f"{os.getpid()}-{time.time_ns()}"
        os.environ[ENV_TAG] = self.tag
        self.basetemp = str(basetemp) if basetemp else None
        self.baseline = {k for k in map(_key, self.me.children(recursive=True)) if k}
        self.seen: dict[tuple[int, float], str] = {}  # (pid, create_time) -> the test after which it was seen

    def snapshot(self, where: str) -> None:
        """Remember every current descendant (so one reparented later is still found) and the test that had it."""
        for p in self.me.children(recursive=True):
            k = _key(p)
            if k and k not in self.baseline:
                self.seen.setdefault(k, where)

    def _ours(self, p: psutil.Process) -> bool:
        try:
            if p.environ().get(ENV_TAG) == self.tag:
                return True
        except psutil.Error:
            pass
        try:
            return bool(self.basetemp) and any(self.basetemp in a for a in p.cmdline())
        except psutil.Error:
            return False

    def _infrastructure(self, p: psutil.Process) -> bool:
        try:
            return p.ppid() == self.me.pid and any(s in " ".join(p.cmdline()) for s in _INFRASTRUCTURE)
        except psutil.Error:
            return False

    def survivors(self) -> list[psutil.Process]:
        """Processes started by this session that are still running (not counting pytest's own helpers)."""
        found: dict[tuple[int, float], psutil.Process] = {}
        for p in self.me.children(recursive=True):
            if (k := _key(p)) and k not in self.baseline:
                found[k] = p
        for pid, ctime in self.seen:
            try:
                p = psutil.Process(pid)
                if p.create_time() == ctime:
                    found[(pid, ctime)] = p
            except psutil.Error:
                pass
        for p in psutil.process_iter():
            k = _key(p)
            if (
                k
                and k not in found
                and k not in self.baseline
                and k[1] >= self.started - 1
                and p.pid != self.me.pid
                and self._ours(p)
            ):
                found[k] = p
        return [p for p in found.values() if _alive(p) and not self._infrastructure(p)]

    def stop_leftovers(self, grace: float = 5.0) -> list[str]:
        """Give survivors ``grace`` seconds to exit on their own, then kill what is left (and its children).

        Returns one description per process that had to be killed (empty: nothing leaked), with the test after which
        it was first seen where known.
        """
        procs = self.survivors()
        if not procs:
            return []
        _, alive = psutil.wait_procs(procs, timeout=grace)
        leaked = []
        for p in alive:
            where = self.seen.get(_key(p) or (0, 0.0))
            leaked.append(describe(p) + (f"  [seen after {where}]" if where else ""))
            try:
                family = p.children(recursive=True) + [p]
            except psutil.Error:
                family = [p]
            for q in family:
                try:
                    q.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(family, timeout=5)
        return leaked
