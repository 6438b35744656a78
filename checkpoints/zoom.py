"""``mlmscope zoom``: replay a stretch of a trained run bit-exactly and write checkpoints as dense as wanted into it.

A step's batch and masks are functions of (data seed, step) and the trainer's resumable state holds everything else
(:mod:`.train`), so any window [A, B] of a run can be trained again later:

1. **Restore** the latest keyframe at or before the first step to write (``keyframes/step_XXXXXX/state.pt``, kept by
   the trainer at a few steps: :func:`~.train.keyframe_steps`), with the weights of its checkpoint (hash-checked). A
   run without keyframes is rebuilt at step 0 from its seeds, and the replay starts there (slower).
2. **Replay** with the trainer's own step function (:func:`~.train.replay_step`), in the recorded config, precision,
   attention kernels, optimiser and thread count, up to the first checkpoint of the run at or after B.
3. **Write** a checkpoint every K steps of [A, B] (A, A + K, …, and B) with the trainer's own writer, each listed in
   the manifest with ``segment`` = the zoom segment's id; the segment (who, when, K, the steps written, the steps
   verified) is recorded in ``run.zoom_segments``.
4. **Prove** the replay is the run: at every step the run logged, the replayed loss must equal
   ``train_log.jsonl``'s, and at every checkpoint the run already lists (its own, or earlier zooms'), the replayed
   weights must hash-equal the stored ones. On the first difference the zoom stops, removes every checkpoint of the
   segment, and says which step differed and what differs in the environment from what the manifest recorded.

A zoom killed at any moment keeps the checkpoints it listed; the same command again finishes the segment from the
zoom's own rolling state (``keyframes/zoom/state.pt``) without rewriting them. A window whose checkpoints all exist
already is left alone. Details: docs/notes/training.md, "Zoom".
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import getpass
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import hardware
from .errors import MlmscopeError
from .manifest import Manifest, read_train_log
from .tokenizer import tokenizer_hash
from .train import (
    KEYFRAMES_DIR,
    STATE_FILE,
    TOKENIZER_DIR,
    TrainingError,
    _versions,
    config_sha256,
    list_keyframes,
    open_replay,
    replay_step,
    restore_state,
    save_state,
    weights_digest,
    write_checkpoint,
)

#: Manifest ``run`` key of the zoom segments.
SEGMENTS = "zoom_segments"
#: Rolling state of an unfinished zoom (under ``keyframes/``; removed when the zoom finishes).
ROLLING = "zoom"
#: Scratch folder for hashing replayed weights at a step the run already lists.
SCRATCH = ".zoom_verify.tmp"
#: Held (flock) while a zoom writes into a run: two zooms of one run at once are refused.
LOCK = ".zoom.lock"


class ZoomError(MlmscopeError, ValueError):
    """A zoom that cannot be done, or was undone (the message says why and what to do)."""


class ZoomMismatch(ZoomError):
    """The replay differed from the original run: everything the zoom wrote was removed."""


class ZoomWarning(UserWarning):
    """The environment differs from the one the run recorded (the replay may then not be identical)."""


@dataclass
class ZoomPlan:
    """What a zoom has to do (:func:`plan`).

    Attributes:
        start, end, every: The window [start, end] and the checkpoint spacing inside it.
        targets: The window's checkpoint steps: start, start + every, …, and end.
        missing: Those the run does not list yet (what the zoom writes).
        stop: Where the replay ends: the first checkpoint of the training run at or after the last missing step
            (so the replay is always verified against at least one stored checkpoint after the ones it writes).
    """

    start: int
    end: int
    every: int
    targets: list[int]
    missing: list[int]
    stop: int


@dataclass
class ZoomResult:
    """What a zoom did.

    Attributes:
        plan: The window and what was missing.
        segment: Id of the zoom segment in the manifest (None when there was nothing to do).
        written: Steps written by this call.
        verified: Checkpoints the replay passed whose stored weights it reproduced exactly (hash-equal).
        verified_original: How many of ``verified`` are checkpoints of the training run.
        losses_checked: Replayed steps whose loss equalled the one in ``train_log.jsonl``.
        restored_from: Step the replay started from; ``from_scratch`` when rebuilt at step 0 without a keyframe.
        replayed_steps: Optimiser steps replayed.
        seconds: Wall time of this call.
        retrain_seconds: The training run's own clock at ``plan.stop``: what retraining from step 0 cost.
        environment: Differences from the recorded environment (empty: the same).
    """

    plan: ZoomPlan
    segment: int | None = None
    written: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    verified_original: int = 0
    losses_checked: int = 0
    restored_from: int = 0
    from_scratch: bool = False
    replayed_steps: int = 0
    seconds: float = 0.0
    retrain_seconds: float | None = None
    environment: list[str] = field(default_factory=list)


# --- planning and refusals -----------------------------------------------------------------------------------------


def window_steps(start: int, end: int, every: int) -> list[int]:
    """The checkpoint steps of a window: ``start``, ``start + every``, … up to ``end``, and ``end`` itself."""
    return sorted(set(range(start, end + 1, every)) | {end})


def original_steps(manifest: Manifest) -> list[int]:
    """Checkpoint steps of the training run itself (not written by a zoom)."""
    return [c.step for c in manifest.checkpoints if c.segment is None]


def plan(manifest: Manifest, start: int, end: int, every: int) -> ZoomPlan:
    """Check a window against the run and say what a zoom of it has to write.

    Raises:
        ZoomError: ``every`` < 1, or a window that is empty or not inside the run's trained checkpoints.
    """
    if every < 1:
        raise ZoomError(f"--every must be at least 1 step, got {every}")
    originals = original_steps(manifest)
    if not originals:
        raise ZoomError("the run has no checkpoints to replay from")
    if start > end:
        raise ZoomError(f"the window {start}–{end} is empty: --from must not be after --to")
    if start < 0 or end > originals[-1]:
        raise ZoomError(
            f"the window {start}–{end} is outside the run: its checkpoints cover steps {originals[0]}–{originals[-1]}"
        )
    listed = {c.step for c in manifest.checkpoints}
    targets = window_steps(start, end, every)
    missing = [s for s in targets if s not in listed]
    stop = next(s for s in originals if s >= (missing[-1] if missing else end))
    return ZoomPlan(start, end, every, targets, missing, stop)


def check_run(run_dir: Path, manifest: Manifest) -> None:
    """Refuse a run that cannot be replayed as it was trained: one still training, trained on several processes, or
    whose saved config no longer hashes to the one it was trained with.

    Raises:
        ZoomError: with what is wrong and what to do.
    """
    meta = manifest.run
    if meta.get("status") == "training":
        raise ZoomError(
            f"{run_dir} is being trained (or its training was killed): let it finish, or continue it with "
            f"`mlmscope train {run_dir} --resume`, before zooming"
        )
    if int(meta.get("world_size") or 1) > 1:
        raise ZoomError(f"{run_dir} was trained on {meta['world_size']} processes; zoom replays single-process runs")
    recorded = meta.get("config_sha256")
    if recorded and config_sha256(meta.get("config") or {}) != recorded:
        raise ZoomError(
            f"the config in {run_dir / 'manifest.json'} no longer matches the one the run was trained with "
            f"(hash {recorded[:12]}): it was edited, so a replay would not be this run; restore the manifest"
        )
    if not (run_dir / TOKENIZER_DIR / "tokenizer.json").exists():
        raise ZoomError(f"{run_dir / TOKENIZER_DIR} is missing: the run's tokenizer is needed to replay it")


def _data_check(run_dir: Path, meta: dict[str, Any]) -> Callable[[Any], None]:
    """The check :func:`~.train.open_replay` runs on the loaded data: the corpus and the tokenizer must hash to what
    the manifest recorded."""

    def check(data: Any) -> None:
        if meta.get("corpus_fingerprint") and data.fingerprint != meta["corpus_fingerprint"]:
            raise ZoomError(
                f"the corpus {meta.get('corpus', '')!r} has changed since {run_dir} was trained (fingerprint "
                f"{data.fingerprint[:12]}, recorded {meta['corpus_fingerprint'][:12]}): a replay would train on other "
                f"data; restore the corpus the run was trained on"
            )
        got = tokenizer_hash(data.tok)
        if meta.get("tokenizer_sha256") and got != meta["tokenizer_sha256"]:
            raise ZoomError(
                f"{run_dir / TOKENIZER_DIR} has changed since the run was trained (vocabulary hash {got[:12]}, "
                f"recorded {meta['tokenizer_sha256'][:12]}); restore it (every checkpoint folder holds a copy)"
            )

    return check


def environment_diff(meta: dict[str, Any], device: str, threads: int) -> list[str]:
    """What differs between this process and what a run recorded: package versions, device, thread count, CPU
    capability and native bf16, and the precision this machine would choose for the run's requested one (``auto``
    may resolve differently here; the replay uses the recorded one).

    Each of these can change the order or the arithmetic of float reductions, and so the trained weights.
    """
    out = []
    now = _versions()
    for name, was in (meta.get("versions") or {}).items():
        if now.get(name) != was:
            out.append(f"{name} {now.get(name)} (recorded {was})")
    if meta.get("device") and meta["device"] != device:
        out.append(f"device {device} (recorded {meta['device']})")
    if meta.get("threads") and int(meta["threads"]) != threads:
        out.append(f"{threads} torch threads (recorded {meta['threads']})")
    levers = meta.get("levers") or {}
    hw, hw_now = levers.get("hardware") or {}, hardware.describe()
    for key, label in (("cpu_capability", "CPU capability"), ("cpu_native_bf16", "native bf16"), ("cuda", "CUDA")):
        if key in hw and hw[key] != hw_now[key]:
            out.append(f"{label} {hw_now[key]} (recorded {hw[key]})")
    recorded = (levers.get("precision") or {}).get("value")
    requested = ((meta.get("config") or {}).get("train") or {}).get("precision", "auto")
    if recorded and requested in hardware.PRECISIONS:
        here = hardware.resolve_precision(requested, device)
        if here.value != recorded:
            out.append(f"precision {recorded} as recorded, but this machine would choose {here.value} ({here.reason})")
    return out


# --- the zoom ----------------------------------------------------------------------------------------------------


def zoom(
    run_dir: str | Path,
    start: int,
    end: int,
    every: int,
    device: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> ZoomResult:
    """Replay [start, end] of a trained run and write a checkpoint every ``every`` steps into it, proven identical.

    Args:
        run_dir: A run trained by ``mlmscope train`` (single process).
        start, end: The window, in optimiser steps, inside the run's checkpoints.
        every: Spacing of the new checkpoints (>= 1).
        device: Where to replay; default the recorded device.
        threads: torch threads; default the recorded count (restored afterwards).
        progress: Show a progress bar over the replayed steps.
        say: Receives one line per stage (where the replay starts, warnings of slowness).

    Returns:
        What was written and verified (:class:`ZoomResult`); nothing is written if the window is complete already.

    Raises:
        ZoomError: a refused window or run (see :func:`plan`, :func:`check_run`), a changed corpus or tokenizer.
        ZoomMismatch: the replay differed from the run (everything the segment wrote was removed).
    """
    run_dir, t_start, say = Path(run_dir), time.perf_counter(), say or (lambda _line: None)
    manifest = _load_manifest(run_dir)
    zplan = plan(manifest, start, end, every)
    check_run(run_dir, manifest)
    if not zplan.missing:
        return ZoomResult(zplan)
    device = device or str(manifest.run.get("device") or "cpu")
    with _locked(run_dir), _torch_threads(threads or manifest.run.get("threads")):
        manifest = _load_manifest(run_dir)  # as it is now that this process holds the lock
        zplan = plan(manifest, start, end, every)
        if not zplan.missing:
            return ZoomResult(zplan)
        result = ZoomResult(zplan, environment=environment_diff(manifest.run, device, torch.get_num_threads()))
        if result.environment:
            warnings.warn(
                ZoomWarning(
                    "this environment differs from the one the run recorded ("
                    + "; ".join(result.environment)
                    + "): the replay may differ, which its verification will show"
                ),
                stacklevel=2,
            )
        segment = _open_segment(manifest, zplan)  # refuses first; saved once the replay can start
        run = open_replay(run_dir, manifest, device, check=_data_check(run_dir, manifest.run))
        manifest.save(run_dir)
        result.segment = segment["id"]
        _start(run, segment, zplan, result, say)
        try:
            _replay(run, segment, zplan, result, progress)
        except _Diverged as d:
            removed = _discard(run_dir, manifest, segment)
            raise ZoomMismatch(_mismatch_message(d, removed, result.environment)) from None
        _close_segment(run_dir, manifest, segment, result, t_start)
    return result


def _load_manifest(run_dir: Path) -> Manifest:
    if not (run_dir / "manifest.json").exists():
        raise ZoomError(f"{run_dir} is not a training run: no manifest.json there (zoom replays runs it can retrain)")
    return Manifest.load(run_dir)


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.zoom.lock`` (refused while another zoom of the run holds it; released if killed)."""
    with open(run_dir / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ZoomError(f"another `mlmscope zoom` is writing into {run_dir}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (the run's recorded count by default) for the replay."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _who() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (OSError, KeyError):
        return "unknown"


def _open_segment(manifest: Manifest, zplan: ZoomPlan) -> dict[str, Any]:
    """The unfinished segment of this same window (a killed zoom: continued), else a new one.

    Raises:
        ZoomError: another window's zoom is unfinished (its checkpoints are not all verified yet).
    """
    segments = manifest.run.setdefault(SEGMENTS, [])
    same = (zplan.start, zplan.end, zplan.every)
    for seg in segments:
        if seg["status"] == "running" and (seg["from"], seg["to"], seg["every"]) == same:
            seg["resumed"] = seg.get("resumed", 0) + 1
            return seg
    for seg in [s for s in segments if s["status"] == "running"]:
        if seg["steps"]:
            raise ZoomError(
                f"a zoom of steps {seg['from']}–{seg['to']} every {seg['every']} was interrupted; finish it first "
                f"(`mlmscope zoom RUN --from {seg['from']} --to {seg['to']} --every {seg['every']}`)"
            )
        segments.remove(seg)  # interrupted before it wrote anything
    seg = {
        "id": max((s["id"] for s in segments), default=0) + 1,
        "from": zplan.start,
        "to": zplan.end,
        "every": zplan.every,
        "who": _who(),
        "started": _now(),
        "status": "running",
        "steps": [],
        "verified": [],
    }
    segments.append(seg)
    return seg


def _start(run: Any, segment: dict[str, Any], zplan: ZoomPlan, result: ZoomResult, say: Callable[[str], None]) -> None:
    """Restore the latest saved state at or before the first missing step: this segment's rolling state, else a
    keyframe; without either, stay at step 0 (the run rebuilt from its seeds) and say that this is slower."""
    first = zplan.missing[0]
    listed = {c.step for c in run.manifest.checkpoints}
    for step, blob in _saved_states(run.run_dir, segment["id"], first, listed, say):
        restore_state(run, blob)
        result.restored_from = step
        say(f"replaying from the saved state of step {step:,} to step {zplan.stop:,}")
        return
    result.from_scratch = True
    say(
        f"no keyframe at or before step {first:,} (a run trained without keyframes keeps none): replaying from "
        f"step 0, rebuilt from the run's seeds, which takes as long as training to step {zplan.stop:,} did"
    )


def _saved_states(
    run_dir: Path, segment: int, first: int, listed: set[int], say: Callable[[str], None]
) -> Iterator[tuple[int, dict]]:
    """Usable saved states, latest first: (step, state) of this segment's rolling state and of the keyframes at
    listed steps at or before ``first``; an unreadable file is skipped with a note."""
    files = {s: f for s, f in list_keyframes(run_dir).items() if s <= first and s in listed}
    rolling = run_dir / KEYFRAMES_DIR / ROLLING / STATE_FILE
    if rolling.exists():
        blob = _load_state(rolling, say)
        step = int(blob["train_state"]["step"]) if blob else -1
        if blob and blob.get("segment") == segment and step <= first and step in listed:
            files.pop(step, None)
            yield from _ordered(files, step, blob, say)
            return
    yield from _ordered(files, None, None, say)


def _ordered(
    files: dict[int, Path], step: int | None, blob: dict | None, say: Callable[[str], None]
) -> Iterator[tuple[int, dict]]:
    """Keyframes latest first, with an already loaded state put in its place."""
    extra: set[int] = {step} if step is not None else set()
    steps: list[int] = sorted(set(files) | extra, reverse=True)
    for s in steps:
        loaded = blob if s == step else _load_state(files[s], say)
        if loaded is not None:
            yield s, loaded


def _load_state(path: Path, say: Callable[[str], None]) -> dict | None:
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises several types
        say(f"skipping unreadable saved state {path} ({e})")
        return None


class _Diverged(Exception):
    """The replay differs from the run at ``step`` (``what`` says how)."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"step {step}: {what}")
        self.step, self.what = step, what


def _replay(run: Any, segment: dict[str, Any], zplan: ZoomPlan, result: ZoomResult, progress: bool) -> None:
    """Train from the restored state to ``zplan.stop``: write the missing checkpoints, check every logged loss and
    every listed checkpoint on the way (:class:`_Diverged` on the first difference)."""
    listed = {c.step: c for c in run.manifest.checkpoints}
    missing, first = set(zplan.missing), run.state.step
    logged = {int(r["step"]): r.get("loss") for r in read_train_log(run.run_dir) if "step" in r}
    bar = _bar(progress, zplan.stop - first, run.run_dir.name)
    try:
        while True:
            step = run.state.step
            if step in missing:
                _write(run, segment, result)
            elif step in listed and (step > first or result.from_scratch):
                _verify(run, listed[step], segment, result)
            if step >= zplan.stop:
                break
            try:
                loss = replay_step(run)
            except TrainingError as e:
                raise _Diverged(step + 1, str(e)) from None
            result.replayed_steps += 1
            expected = logged.get(run.state.step)
            if expected is not None:
                if loss != expected:
                    raise _Diverged(run.state.step, f"the replayed loss {loss!r} differs from the logged {expected!r}")
                result.losses_checked += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _bar(progress: bool, total: int, name: str) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, desc=f"zoom {name}")


def _write(run: Any, segment: dict[str, Any], result: ZoomResult) -> None:
    """Write the checkpoint of the current step, list it (manifest and segment at once), then keep the rolling
    state: a zoom killed between the two continues from the previous state and re-checks this checkpoint."""
    entry = write_checkpoint(run, segment=segment["id"])
    run.manifest.add(entry)
    segment["steps"].append(entry.step)
    run.manifest.save(run.run_dir)
    rolling = run.run_dir / KEYFRAMES_DIR / ROLLING / STATE_FILE
    save_state(rolling, run.optimizer, run.scheduler, run.state, segment=segment["id"])
    result.written.append(entry.step)


def _verify(run: Any, entry: Any, segment: dict[str, Any], result: ZoomResult) -> None:
    """The replayed weights at a listed step must hash-equal the stored checkpoint."""
    digest = weights_digest(run, run.run_dir / SCRATCH)
    if digest != entry.sha256:
        kind = "the run's checkpoint" if entry.segment is None else f"zoom segment {entry.segment}'s checkpoint"
        raise _Diverged(entry.step, f"the replayed weights hash {digest[:12]}, {kind} {entry.path} {entry.sha256[:12]}")
    result.verified.append(entry.step)
    result.verified_original += entry.segment is None
    if entry.step not in segment["verified"]:
        segment["verified"].append(entry.step)


def _discard(run_dir: Path, manifest: Manifest, segment: dict[str, Any]) -> int:
    """Remove every checkpoint of a segment that diverged, its record and its rolling state; return how many."""
    mine = [c for c in manifest.checkpoints if c.segment == segment["id"]]
    manifest.checkpoints = [c for c in manifest.checkpoints if c.segment != segment["id"]]
    manifest.run[SEGMENTS] = [s for s in manifest.run.get(SEGMENTS, []) if s["id"] != segment["id"]]
    manifest.save(run_dir)
    for c in mine:
        shutil.rmtree(run_dir / c.path, ignore_errors=True)
    shutil.rmtree(run_dir / KEYFRAMES_DIR / ROLLING, ignore_errors=True)
    return len(mine)


def _mismatch_message(d: _Diverged, removed: int, environment: list[str]) -> str:
    env = (
        "the environment differs from the recorded one: " + "; ".join(environment)
        if environment
        else "the environment matches the recorded one (package versions, precision, device, threads, CPU)"
    )
    return (
        f"the replay differs from the run at step {d.step}: {d.what}; the zoom was undone ({removed} checkpoint"
        f"{'s' if removed != 1 else ''} removed); {env}"
    )


def _close_segment(
    run_dir: Path, manifest: Manifest, segment: dict[str, Any], result: ZoomResult, t_start: float
) -> None:
    """Mark the segment finished with its timing, and drop the rolling state."""
    stop = next(c for c in manifest.checkpoints if c.step == result.plan.stop)
    result.seconds = time.perf_counter() - t_start
    result.retrain_seconds = stop.wall_clock_s or None
    segment.update(
        status="finished",
        finished=_now(),
        restored_from=0 if result.from_scratch else result.restored_from,
        from_scratch=result.from_scratch,
        seconds=round(segment.get("seconds", 0.0) + result.seconds, 1),
    )
    segment["steps"].sort()
    segment["verified"].sort()
    manifest.save(run_dir)
    shutil.rmtree(run_dir / KEYFRAMES_DIR / ROLLING, ignore_errors=True)
