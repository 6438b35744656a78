"""Published trajectories: checkpoints named by hub id and revision, resolved from the Hugging Face cache.

Three ways to name them (``mlmscope analyze SOURCE``, ``mlmscope report SOURCE``, ``mlmscope app SOURCE``,
``Trajectory(SOURCE)``):

* ``hf:ORG/NAME`` with ``--revisions step_0,step_20000`` (or a pattern, ``'step_*'``, matched against the revisions
  the cache holds, or with the hub reachable the repo's branches and tags): one repo, one revision per checkpoint
  (Pythia-style ``step_N`` branches). ``hf:ORG/NAME@REV`` names one revision.
* ``hf:ORG/A,ORG/B,...``: several repos that are checkpoints of one run, one repo per step (MultiBERTs:
  ``google/multiberts-seed_0-step_20k``); each item may carry ``@REV``.
* a suite file (``suite.json``, ``.yaml``/``.yml``) listing checkpoints with their step and seed (schema below).

The step of a checkpoint comes from its revision name, else its repo name (``step_1000``, ``step1000``,
``checkpoint-1000``, ``step_20k`` = 20,000), or from the suite file; a checkpoint whose step cannot be read is an
error, never a guess.

Resolution goes through ``huggingface_hub`` with the standard cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``). With ``HF_HUB_OFFLINE=1`` only the cache is read (``snapshot_download(...,
local_files_only=True)``): revisions missing from it are named in one error with the exact ``hf download`` command
that fetches each elsewhere (also written to ``fetch_missing.sh`` in the results folder). With the hub reachable,
missing checkpoints are downloaded one at a time while the trajectory is analysed, and ``--evict`` deletes each from
the cache once analysed, so a long suite never needs all its checkpoints on disk at once.

A resolved source becomes an ordinary run folder, outside the cache: ``runs/hub/<org>--<name>/`` (or
``runs/suites/<suite name>/`` with one ``seed_<s>/`` run per seed), holding ``step_<N>`` symlinks to the cached
snapshot folders and a ``manifest.json`` whose checkpoints carry the weights' content hash (``weights_sha256`` for
safetensors, as for local checkpoints, so results are keyed the same way; sha256 of the file for a
``pytorch_model.bin``) and whose ``run.hub`` records repo, revision, commit and seed of each. The runner, the report,
the dashboard and ``Trajectory`` read it like any run; a re-run resolves again and recomputes nothing stored, and a
checkpoint evicted after its analysis stays listed (its results are found by hash).

Suite file schema (JSON shown; YAML the same)::

    {"name": "multiberts-early",                       # optional: the results folder name (default: file stem)
     "checkpoints": [
        {"repo": "google/multiberts-seed_0-step_0k", "seed": 0},          # step from the repo name (0)
        {"repo": "ORG/NAME", "revision": "main", "step": 40000, "seed": 1},  # step given
        {"repo": "ORG/NAME", "revisions": ["step_0", "step_1000"], "seed": 2},  # one entry per revision
        {"path": "../runs/x/step_000100", "step": 100, "seed": 3}         # a local folder (relative to the file)
     ]}

``seed`` is given for every entry or for none; a (seed, step) pair may appear once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoints.manifest import (
    MANIFEST,
    CheckpointEntry,
    Manifest,
    ManifestError,
    atomic_write_text,
    has_weights,
    step_dirname,
)
from .target import TOKENIZER_FILES, Target, TargetError, model_hash

if TYPE_CHECKING:
    from .runner import RunnerConfig, Summary

#: Prefix of a hub source on the command line.
HF_PREFIX = "hf:"
#: File suffixes read as suite files.
SUITE_SUFFIXES = (".json", ".yaml", ".yml")
#: Manifest ``run.kind`` of a folder of published checkpoints.
HUB_KIND = "hub"
#: Default parents of the results folders, relative to the current directory (next to ``runs/models``).
DEFAULT_HUB_DIR = Path("runs") / "hub"
DEFAULT_SUITES_DIR = Path("runs") / "suites"
#: Sub-folders of a suite folder holding one seed each (as ``mlmscope train RUN --seeds``).
SEED_PREFIX = "seed_"
#: Written into the results folder when revisions are missing: one ``hf download`` line each.
FETCH_SCRIPT = "fetch_missing.sh"
#: The suite's resolved listing, written at the top of a suite results folder.
SUITE_RECORD = "suite.json"
#: Weight files that are never needed (TensorFlow, Flax, ONNX, Rust): left out of downloads and fetch commands.
UNNEEDED = ("*.h5", "*.msgpack", "*.onnx", "*.ot")
#: Shown inline in the missing-revisions error (all of them go to FETCH_SCRIPT).
SHOW_COMMANDS = 4

# step_1000, step1000, step-1000, checkpoint-1000, ckpt_1000, step_20k (MultiBERTs), step_2M; not "seed_1"
_STEP = re.compile(r"(?<![a-z0-9])(?:step|checkpoint|ckpt)[_-]?(\d+)([km]?)(?![a-z0-9])", re.IGNORECASE)
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_MULTIPLIER = {"": 1, "k": 1_000, "m": 1_000_000}
_SUITE_KEYS = {"name", "checkpoints"}
_ENTRY_KEYS = {"repo", "revision", "revisions", "path", "step", "seed"}


class SourceError(TargetError):
    """A hub source or suite file that cannot be analysed (the message is user-facing; the CLI exits 1)."""


class MissingCheckpointsError(SourceError):
    """Checkpoints of a source are not in the local cache and cannot be downloaded here.

    Attributes:
        missing: The checkpoints, with the reason for each.
        commands: One ``hf download`` command per missing revision.
    """

    def __init__(self, message: str, missing: Sequence[tuple[Checkpoint, str]], commands: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)
        self.commands = list(commands)


# --- naming ---------------------------------------------------------------------------------------------------------


def step_from_name(name: str) -> int | None:
    """The step a revision or repo name states (``step_20k`` -> 20000), None if it states none.

    Raises:
        SourceError: the name states two different steps.
    """
    found = {int(n) * _MULTIPLIER[unit.lower()] for n, unit in _STEP.findall(name)}
    if len(found) > 1:
        raise SourceError(f"{name!r} names several steps ({', '.join(map(str, sorted(found)))}); give the step")
    return found.pop() if found else None


def is_source_spec(text: str | os.PathLike) -> bool:
    """True for ``hf:...`` and for a path ending in .json/.yaml/.yml that is not a folder (a suite file)."""
    s = str(text)
    return s.startswith(HF_PREFIX) or (Path(s).suffix.lower() in SUITE_SUFFIXES and not Path(s).is_dir())


@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint: a hub repo at a revision (or a local folder), its step and seed."""

    step: int
    repo: str | None = None
    revision: str = "main"
    path: str | None = None
    seed: int | None = None

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.revision}" if self.repo else str(self.path)

    def fetch_command(self) -> str:
        """The ``hf download`` command that puts this revision into a Hugging Face cache (TF/Flax/ONNX weights left
        out)."""
        return f"hf download {self.repo} --revision {self.revision}" + "".join(f' --exclude "{p}"' for p in UNNEEDED)


@dataclass(frozen=True)
class Suite:
    """A parsed source: its checkpoints, the name of its results folder, what the user typed.

    Attributes:
        name: Results folder name (under ``runs/hub`` for ``hf:``, ``runs/suites`` for a suite file).
        origin: The source as given (``hf:...`` or the suite file path).
        checkpoints: Sorted by (seed, step).
        from_file: A suite file (results in ``runs/suites``) rather than an ``hf:`` source.
    """

    name: str
    origin: str
    checkpoints: tuple[Checkpoint, ...]
    from_file: bool = False

    @property
    def seeds(self) -> list[int | None]:
        return sorted({c.seed for c in self.checkpoints}, key=lambda s: -1 if s is None else s)

    def default_dir(self) -> Path:
        return (DEFAULT_SUITES_DIR if self.from_file else DEFAULT_HUB_DIR) / self.name

    def run_dir(self, root: Path, seed: int | None) -> Path:
        """The run folder of one seed: ``root/seed_<s>``, or ``root`` itself for a suite without seeds."""
        return root if seed is None else root / f"{SEED_PREFIX}{seed}"


def _split_repo(item: str, where: str) -> tuple[str, str | None]:
    repo, _, rev = item.partition("@")
    repo = repo.strip()
    if not _REPO.match(repo) or "--" in repo or ".." in repo:
        raise SourceError(f"{where}: {repo!r} is not a hub repo id (ORG/NAME)")
    return repo, (rev.strip() or None) if rev else None


def _folder_name(repos: Sequence[str]) -> str:
    """``ORG--NAME`` of one repo; for a list (one repo per step) the names without their step token, if they agree."""
    stripped = {re.sub(r"[-_.]+$", "", _STEP.sub("", r)).replace("/", "--") for r in repos}
    if len(repos) == 1:
        return repos[0].replace("/", "--")
    if len(stripped) == 1 and (name := stripped.pop()) and not name.endswith("--"):
        return name
    digest = hashlib.sha256("\n".join(sorted(repos)).encode()).hexdigest()[:8]
    return f"{repos[0].replace('/', '--')}-and-{len(repos) - 1}-more-{digest}"


def _step_of(repo: str | None, revision: str, where: str) -> int:
    """Step from the revision name, else the repo name; an error if neither states one (or they disagree)."""
    by_rev = step_from_name(revision)
    by_repo = step_from_name(repo.rsplit("/", 1)[-1]) if repo else None
    if by_rev is not None and by_repo is not None and by_rev != by_repo:
        raise SourceError(f"{where}: revision {revision!r} says step {by_rev} but the repo name says {by_repo}")
    step = by_rev if by_rev is not None else by_repo
    if step is None:
        raise SourceError(
            f"{where}: cannot tell the step of {repo}@{revision}: neither the revision nor the repo name states one "
            "(step_1000, step1000, checkpoint-1000, step_20k); name revisions with their step, or list the checkpoint "
            'in a suite file with its "step"'
        )
    return step


def _check_unique(cks: Iterable[Checkpoint], where: str) -> None:
    seen: dict[tuple[int | None, int], Checkpoint] = {}
    for c in cks:
        key = (c.seed, c.step)
        if key in seen:
            seed = f" of seed {c.seed}" if c.seed is not None else ""
            hint = "" if c.seed is not None else " (a list of hub ids is one run; put several seeds in a suite file)"
            raise SourceError(f"{where}: step {c.step}{seed} is given twice ({seen[key].label}, {c.label}){hint}")
        seen[key] = c


# --- parsing ----------------------------------------------------------------------------------------------------------


def parse_hub_spec(spec: str, revisions: str | None = None, cache_dir: Path | None = None) -> Suite:
    """Parse ``hf:ORG/NAME`` (+ ``--revisions``), ``hf:ORG/NAME@REV`` or ``hf:ORG/A,ORG/B,...``.

    Raises:
        SourceError: malformed ids, a step that cannot be read, a pattern that matches nothing, a step twice.
    """
    body = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else spec
    items = [i.strip() for i in body.split(",") if i.strip()]
    if not items:
        raise SourceError(f"{spec!r}: give a hub repo after hf:, e.g. hf:ORG/NAME --revisions step_0,step_1000")
    parsed = [_split_repo(i, spec) for i in items]
    if len(parsed) > 1:
        if revisions:
            raise SourceError(
                f"--revisions is for one hf:ORG/NAME; {spec!r} lists {len(parsed)} repos (one checkpoint each: "
                "give a revision as ORG/NAME@REV)"
            )
        cks = [Checkpoint(_step_of(r, rev or "main", spec), r, rev or "main") for r, rev in parsed]
    else:
        repo, rev = parsed[0]
        if rev and revisions:
            raise SourceError(f"{spec!r} names revision {rev!r}; give revisions either as @REV or with --revisions")
        if revisions:
            revs = expand_revisions(repo, revisions, cache_dir)
        elif rev:
            revs = [rev]
        elif step_from_name(repo.rsplit("/", 1)[-1]) is not None:
            revs = ["main"]
        else:
            known = _cached_step_refs(repo, cache_dir)
            raise SourceError(
                f"{spec}: which checkpoints? pass --revisions step_0,step_1000 (or a pattern such as 'step*'), or "
                "hf:ORG/NAME@REV"
                + (f"; the cache holds {', '.join(known[:8])}{' ...' if len(known) > 8 else ''}" if known else "")
            )
        cks = [Checkpoint(_step_of(repo, r, spec), repo, r) for r in revs]
    _check_unique(cks, spec)
    return Suite(_folder_name([r for r, _ in parsed]), spec, tuple(sorted(cks, key=lambda c: c.step)))


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def expand_revisions(repo: str, text: str, cache_dir: Path | None = None) -> list[str]:
    """``--revisions``: comma-separated names and glob patterns; patterns match the known revisions (see
    :func:`known_revisions`), sorted by step. Names are kept as given (checked when resolved).

    Raises:
        SourceError: a pattern that matches nothing, or an empty list.
    """
    out: list[str] = []
    known: list[str] | None = None
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if not _is_pattern(item):
            out.append(item)
            continue
        if known is None:
            known = known_revisions(repo, cache_dir)
        hits = [r for r in known if fnmatch.fnmatchcase(r, item)]
        if not hits:
            where = "in the Hugging Face cache" if hub_offline() else "on the hub or in the cache"
            raise SourceError(
                f"no revision of {repo} {where} matches {item!r}"
                + (f" (known: {', '.join(known[:10])}{' ...' if len(known) > 10 else ''})" if known else "")
                + ("; offline, only cached revisions are listed" if hub_offline() else "")
            )
        out += sorted(hits, key=lambda r: (step_from_name(r) is None, step_from_name(r) or 0, r))
    if not out:
        raise SourceError("--revisions is empty; give names (step_0,step_1000) or a pattern ('step_*')")
    return list(dict.fromkeys(out))


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and check a suite file (JSON, or YAML for .yaml/.yml).

    Raises:
        SourceError: a missing or malformed file, naming the file and the entry at fault.
    """
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"suite file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(
                f"suite file {str(p)!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
            ) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise SourceError(f"suite file {str(p)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    where = f"suite file {str(p)!r}"
    if not isinstance(data, dict):
        raise SourceError(f'{where}: expected an object with a "checkpoints" list, got {type(data).__name__}')
    unknown = set(data) - _SUITE_KEYS
    if unknown:
        raise SourceError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: name, checkpoints)")
    entries = data.get("checkpoints")
    if not isinstance(entries, list) or not entries:
        raise SourceError(f'{where}: "checkpoints" must be a non-empty list of {{"repo" or "path", "step", "seed"}}')
    name = data.get("name", p.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SourceError(f'{where}: "name" must be a folder name (letters, digits, . _ -), got {name!r}')
    cks: list[Checkpoint] = []
    for i, e in enumerate(entries):
        cks += _suite_entry(e, f"{where}: checkpoints[{i}]", p.parent)
    has_seed = [c.seed is not None for c in cks]
    if any(has_seed) and not all(has_seed):
        first = has_seed.index(False)
        raise SourceError(f'{where}: {cks[first].label} has no "seed" while others do; give a seed to every entry')
    _check_unique(cks, where)
    cks.sort(key=lambda c: (-1 if c.seed is None else c.seed, c.step))
    return Suite(name, str(p), tuple(cks), from_file=True)


def _int_field(e: dict[str, Any], key: str, where: str) -> int | None:
    v = e.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SourceError(f'{where}: "{key}" must be a non-negative integer, got {v!r}')
    return v


def _suite_entry(e: Any, where: str, base: Path) -> list[Checkpoint]:
    if not isinstance(e, dict):
        raise SourceError(f'{where}: expected an object with "repo" or "path", got {e!r}')
    unknown = set(e) - _ENTRY_KEYS
    if unknown:
        raise SourceError(
            f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(sorted(_ENTRY_KEYS))})"
        )
    if ("repo" in e) == ("path" in e):
        raise SourceError(f'{where}: give exactly one of "repo" (a hub id) and "path" (a local checkpoint folder)')
    step, seed = _int_field(e, "step", where), _int_field(e, "seed", where)
    if "path" in e:
        if not isinstance(e["path"], str) or "revision" in e or "revisions" in e:
            raise SourceError(f'{where}: "path" is a folder name (and takes no revision)')
        path = (base / e["path"]).resolve()
        if step is None:
            step = step_from_name(path.name)
        if step is None:
            raise SourceError(f'{where}: cannot tell the step of {str(path)!r}; give "step"')
        return [Checkpoint(step, path=str(path), seed=seed)]
    repo, rev = _split_repo(str(e["repo"]), where)
    if "revision" in e and "revisions" in e:
        raise SourceError(f'{where}: give "revision" or "revisions", not both')
    if "revisions" in e:
        revs = e["revisions"]
        revs = [r.strip() for r in revs.split(",")] if isinstance(revs, str) else revs
        if not isinstance(revs, list) or not revs or not all(isinstance(r, str) and r for r in revs):
            raise SourceError(f'{where}: "revisions" must be a non-empty list of revision names')
        if step is not None or rev:
            raise SourceError(f'{where}: with "revisions" each step comes from the revision name; drop "step"/@REV')
        return [Checkpoint(_step_of(repo, r, where), repo, r, seed=seed) for r in revs]
    revision = e.get("revision", rev or "main")
    if not isinstance(revision, str) or not revision:
        raise SourceError(f'{where}: "revision" must be a branch, tag or commit name')
    if step is None:
        step = _step_of(repo, revision, where)
    return [Checkpoint(step, repo, revision, seed=seed)]


def parse_source(text: str, revisions: str | None = None, cache_dir: Path | None = None) -> Suite:
    """An ``hf:`` source or a suite file, parsed (see the module docstring).

    Raises:
        SourceError: see :func:`parse_hub_spec` and :func:`load_suite`.
    """
    if text.startswith(HF_PREFIX):
        return parse_hub_spec(text, revisions, cache_dir)
    if revisions:
        raise SourceError(f"--revisions is for hf:ORG/NAME; {text!r} is a suite file (it lists its revisions)")
    return load_suite(text)


# --- the cache --------------------------------------------------------------------------------------------------------


def _truthy(value: str) -> bool:
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return _truthy(env)
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as configured now: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached_refs(repo: str, cache_dir: Path | None) -> list[str]:
    """Branch and tag names the cache holds for ``repo`` (``scan_cache_dir``), sorted by step."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir or hub_cache_dir())
    except Exception:  # CacheNotFound (no cache yet) or an unreadable cache: nothing is known
        return []
    refs = {
        r
        for repo_info in info.repos
        if repo_info.repo_id == repo and repo_info.repo_type == "model"
        for rev in repo_info.revisions
        for r in rev.refs
    }
    return sorted(refs, key=lambda r: (step_from_name(r) is None, step_from_name(r) or 0, r))


def _cached_step_refs(repo: str, cache_dir: Path | None) -> list[str]:
    return [r for r in _cached_refs(repo, cache_dir) if step_from_name(r) is not None]


def known_revisions(repo: str, cache_dir: Path | None = None) -> list[str]:
    """Revisions a pattern is matched against: the cached refs, plus the hub's branches and tags when online."""
    known = _cached_refs(repo, cache_dir)
    if not hub_offline():
        try:
            from huggingface_hub import HfApi

            refs = HfApi().list_repo_refs(repo)
            known = list(dict.fromkeys([*(b.name for b in refs.branches), *(t.name for t in refs.tags), *known]))
        except Exception:  # unreachable hub, unknown repo: the cache is what is known
            pass
    return known


@dataclass
class Located:
    """Where one checkpoint is on disk, or why it is not usable.

    Attributes:
        checkpoint: The checkpoint.
        folder: The snapshot (or local) folder, None when absent.
        commit: The commit hash of the snapshot (None for a local folder or an absent one).
        problem: Why it cannot be used as it is ("not in the cache", a partial download), or None.
    """

    checkpoint: Checkpoint
    folder: Path | None = None
    commit: str | None = None
    problem: str | None = None


def locate(ck: Checkpoint, cache_dir: Path | None = None) -> Located:
    """Find ``ck`` without any network access (``snapshot_download(local_files_only=True)`` for a hub checkpoint).

    Raises:
        SourceError: the folder holds a model that is not a BERT/RoBERTa masked language model.
    """
    if ck.path is not None:
        folder = Path(ck.path)
        if not folder.is_dir():
            return Located(ck, problem=f"local folder {str(folder)!r} does not exist")
        loc = Located(ck, folder)
    else:
        from huggingface_hub import snapshot_download

        try:
            snap = snapshot_download(
                ck.repo or "",
                revision=ck.revision,
                cache_dir=cache_dir or hub_cache_dir(),
                local_files_only=True,
                allow_patterns=["config.json"],
            )
        except Exception as e:  # LocalEntryNotFoundError, IncompleteSnapshotError, a damaged refs file ...
            return Located(ck, problem=_cache_problem(e))
        folder = Path(snap)
        loc = Located(ck, folder, commit=folder.name)
    loc.problem = _content_problem(ck, folder)
    return loc


def _cache_problem(e: Exception) -> str:
    name = type(e).__name__
    if name == "IncompleteSnapshotError":
        return "partly downloaded (files missing from the cached snapshot)"
    if name in ("LocalEntryNotFoundError", "FileNotFoundError", "EntryNotFoundError"):
        return "not in the cache"
    return f"not readable from the cache ({name}: {e})"


def _content_problem(ck: Checkpoint, folder: Path) -> str | None:
    """None if ``folder`` is a usable BERT/RoBERTa MLM checkpoint; a reason when files are missing.

    Raises:
        SourceError: a model of another kind.
    """
    if not (folder / "config.json").is_file():
        return "no config.json in the snapshot (partly downloaded, or not a model repo)"
    from ..probes.model import ModelLoadError, check_model_folder

    try:
        check_model_folder(folder)
    except ModelLoadError as e:
        raise SourceError(f"{ck.label} (step {ck.step}) is not a BERT/RoBERTa masked language model: {e}") from None
    if not has_weights(folder):
        sharded = any(folder.glob("*.index.json"))
        return (
            "sharded weights (model-0000x-of-0000y): only single-file checkpoints are supported"
            if sharded
            else "no weights file (model.safetensors or pytorch_model.bin) in the snapshot: partly downloaded"
        )
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return "no tokenizer files (tokenizer.json or vocab.txt) in the snapshot: partly downloaded"
    return None


def fetch(ck: Checkpoint, cache_dir: Path | None = None) -> Path:
    """Download one checkpoint into the cache (config, tokenizer files, ONE weights file; safetensors preferred) and
    return its snapshot folder. Needs the hub: not exercised by the offline test suite.

    Raises:
        SourceError: the repo or revision does not exist, or it has no single-file weights.
    """
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = set(HfApi().list_repo_files(ck.repo or "", revision=ck.revision))
    except Exception as e:
        raise SourceError(f"cannot list {ck.label} on the hub ({type(e).__name__}: {e})") from None
    weights = next((w for w in ("model.safetensors", "pytorch_model.bin") if w in files), None)
    if weights is None:
        raise SourceError(f"{ck.label} has no model.safetensors or pytorch_model.bin (sharded or not a PyTorch model)")
    wanted = ["config.json", weights, *(f for f in (*TOKENIZER_FILES, "special_tokens_map.json") if f in files)]
    try:
        return Path(
            snapshot_download(
                ck.repo or "", revision=ck.revision, cache_dir=cache_dir or hub_cache_dir(), allow_patterns=wanted
            )
        )
    except Exception as e:
        raise SourceError(f"download of {ck.label} failed ({type(e).__name__}: {e})") from None


def evict(commit: str, cache_dir: Path | None = None) -> int:
    """Delete one cached revision (its snapshot, refs and the blobs no other revision uses); bytes freed."""
    from huggingface_hub import scan_cache_dir

    strategy = scan_cache_dir(cache_dir or hub_cache_dir()).delete_revisions(commit)
    strategy.execute()
    return int(strategy.expected_freed_size)


# --- results folders --------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A source resolved into run folders.

    Attributes:
        suite: The parsed source.
        root: Results folder (``runs/hub/...`` or ``runs/suites/...``, or ``--out``).
        runs: Run folder -> its checkpoints (those selected by ``--steps``), one run per seed.
        pending: Checkpoints to download while analysing (only when the hub is reachable).
        skipped: Missing checkpoints left out (``--skip-missing``), with the reason.
        cache_dir: The Hugging Face cache read.
        skip_missing: ``--skip-missing`` (also for checkpoints evicted earlier whose weights turn out to be needed).
    """

    suite: Suite
    root: Path
    runs: dict[Path, list[Checkpoint]] = field(default_factory=dict)
    pending: set[Checkpoint] = field(default_factory=set)
    skipped: list[tuple[Checkpoint, str]] = field(default_factory=list)
    cache_dir: Path = field(default_factory=hub_cache_dir)
    skip_missing: bool = False


def _hub_manifest(run_dir: Path) -> Manifest | None:
    """The folder's manifest if it is a folder of published checkpoints; None for a new folder.

    Raises:
        SourceError: the folder holds something else (a training run, single-model results, foreign files).
    """
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        raise SourceError(f"{str(run_dir)!r} exists and is not a folder")
    if not (run_dir / MANIFEST).exists():
        ours = (SUITE_RECORD, FETCH_SCRIPT)
        foreign = [p.name for p in run_dir.iterdir() if not p.name.startswith(SEED_PREFIX) and p.name not in ours]
        if foreign:
            raise SourceError(
                f"{str(run_dir)!r} is not empty and holds no published trajectory; choose another folder (--out)"
            )
        return None
    try:
        m = Manifest.load(run_dir)
    except ManifestError as e:
        raise SourceError(str(e)) from None
    if m.run.get("kind") != HUB_KIND:
        raise SourceError(f"{str(run_dir)!r} holds a run of another kind (not published checkpoints); choose --out")
    return m


def _link(run_dir: Path, name: str, target: Path) -> None:
    """``run_dir/name`` -> ``target`` (a symlink, replaced atomically)."""
    link = run_dir / name
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    if link.exists() and not link.is_symlink():
        raise SourceError(f"{str(link)!r} exists and is not a link to a cached snapshot; choose another folder")
    tmp = run_dir / f".{name}.link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, link)


def record(run_dir: Path, suite: Suite, seed: int | None, located: Sequence[Located], cache_dir: Path) -> Manifest:
    """Add (or refresh) checkpoints in a run folder: ``step_<N>`` links and manifest entries with content hashes.

    Earlier entries (other revisions analysed before, evicted ones) are kept. A hash is reused when the same commit
    (or local folder) was hashed before; otherwise the weights are read once here.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    old = _hub_manifest(run_dir)
    hub: dict[str, Any] = dict(old.run.get("hub", {})) if old else {}
    by_step = {c.step: c for c in old.checkpoints} if old else {}
    first_folder: Path | None = None
    for loc in located:
        ck, folder = loc.checkpoint, loc.folder
        if folder is None:
            continue
        first_folder = first_folder or folder
        name = step_dirname(ck.step)
        prev = hub.get(name, {})
        same = prev.get("commit") == loc.commit and prev.get("repo") == ck.repo and prev.get("path") == ck.path
        digest = (
            by_step[ck.step].sha256 if same and ck.step in by_step and by_step[ck.step].sha256 else model_hash(folder)
        )
        _link(run_dir, name, folder.absolute())
        by_step[ck.step] = CheckpointEntry(step=ck.step, path=name, sha256=digest)
        hub[name] = {
            "step": ck.step,
            "repo": ck.repo,
            "revision": ck.revision if ck.repo else None,
            "commit": loc.commit,
            "path": ck.path,
            "seed": ck.seed,
            "folder": str(folder),
        }
    run: dict[str, Any] = dict(old.run) if old else {}
    run.update(
        kind=HUB_KIND,
        status="finished",
        source=suite.origin,
        name=suite.name,
        seed=seed,
        hub_cache=str(cache_dir),
        hub=dict(sorted(hub.items())),
    )
    if first_folder is not None:
        run.update(_shape(first_folder))
    m = Manifest(run=run)
    for e in sorted(by_step.values(), key=lambda c: c.step):
        m.add(CheckpointEntry(step=e.step, path=e.path, sha256=e.sha256))
    m.save(run_dir)
    return m


def _shape(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {
        "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
        "shape": {
            "n_layers": cfg.get("num_hidden_layers"),
            "d_model": cfg.get("hidden_size"),
            "n_heads": cfg.get("num_attention_heads"),
            "vocab_size": cfg.get("vocab_size"),
        },
    }


def _missing_error(
    suite: Suite, missing: Sequence[tuple[Checkpoint, str]], root: Path, cache_dir: Path, n: int
) -> MissingCheckpointsError:
    """One line: which checkpoints are missing and why, the first commands, where all commands were written."""
    commands = list(dict.fromkeys(c.fetch_command() for c, _ in missing if c.repo))
    script = root / FETCH_SCRIPT
    written = False
    if commands:
        try:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                script,
                "#!/bin/sh\n# run where the hub is reachable, then copy the cache here\nset -e\n"
                + "\n".join(commands)
                + "\n",
            )
            written = True
        except OSError:
            pass
    what = "; ".join(
        f"{c.label} (step {c.step}{'' if c.seed is None else f', seed {c.seed}'}): {why}" for c, why in missing[:10]
    )
    more = f"; ... ({len(missing) - 10} more)" if len(missing) > 10 else ""
    msg = (
        f"{len(missing)} of {n} checkpoints of {suite.origin} are missing from the Hugging Face cache "
        f"{str(cache_dir)!r} and HF_HUB_OFFLINE is set (no downloads): {what}{more}"
    )
    if commands:
        shown = " ; ".join(commands[:SHOW_COMMANDS]) + (" ; ..." if len(commands) > SHOW_COMMANDS else "")
        msg += (
            f". Fetch them where the hub is reachable: {shown}"
            + (
                (f" (all {len(commands)} in {script})" if len(commands) > 1 else f" (also in {script})")
                if written
                else ""
            )
            + ", then copy that machine's cache folders models--ORG--NAME into this cache (or point HF_HUB_CACHE at"
            " them), or run with the hub reachable (HF_HUB_OFFLINE unset) to download one at a time; --skip-missing "
            "analyses the others"
        )
    return MissingCheckpointsError(msg, missing, commands)


def prepare_source(
    text: str,
    revisions: str | None = None,
    out: Path | None = None,
    steps: Callable[[int], bool] | None = None,
    skip_missing: bool = False,
    download: bool | None = None,
    cache_dir: Path | None = None,
) -> Prepared:
    """Parse a source, find its checkpoints in the cache and write its run folder(s).

    Args:
        text: ``hf:...`` or a suite file path.
        revisions: ``--revisions`` (for ``hf:ORG/NAME``).
        out: Results folder (default ``runs/hub/<org>--<name>`` or ``runs/suites/<name>``).
        steps: Step predicate (``--steps``): other checkpoints are neither looked for nor listed.
        skip_missing: Leave missing checkpoints out instead of refusing (they are reported in ``skipped``).
        download: Whether missing checkpoints may be downloaded later (default: unless ``HF_HUB_OFFLINE``).
        cache_dir: Hugging Face cache (default :func:`hub_cache_dir`).

    Raises:
        SourceError: a malformed source, a non-MLM repo, or (offline, without ``skip_missing``) missing checkpoints.
    """
    cache = cache_dir or hub_cache_dir()
    suite = parse_source(text, revisions, cache)
    download = (not hub_offline()) if download is None else download
    chosen = [c for c in suite.checkpoints if steps is None or steps(c.step)]
    if not chosen:
        raise SourceError(
            f"no checkpoint of {suite.origin} matches --steps "
            f"(steps {', '.join(str(c.step) for c in suite.checkpoints[:12])})"
        )
    root = out if out is not None else suite.default_dir()
    prep = Prepared(suite, root, cache_dir=cache, skip_missing=skip_missing)
    located = [locate(c, cache) for c in chosen]
    recorded = _recorded(suite, root)
    missing: list[tuple[Checkpoint, str]] = []
    for loc in located:
        if loc.problem is None:
            continue
        if _key(loc.checkpoint) in recorded:
            continue  # analysed before and evicted since: its results are found by hash (see analyse_source)
        if loc.checkpoint.repo and download:
            prep.pending.add(loc.checkpoint)
        else:
            missing.append((loc.checkpoint, loc.problem))
    if missing:
        error = _missing_error(suite, missing, root, cache, len(chosen))  # writes fetch_missing.sh
        if not skip_missing:
            raise error
    else:
        (root / FETCH_SCRIPT).unlink(missing_ok=True)  # from an earlier call: nothing is missing now
    prep.skipped = missing
    gone = {c for c, _ in missing}
    if suite.from_file and root.exists():
        _hub_manifest_root(root)
    for seed in suite.seeds:
        cks = [c for c in chosen if c.seed == seed and c not in gone]
        if not cks:
            continue
        run_dir = suite.run_dir(root, seed)
        usable = [loc for loc in located if loc.checkpoint in cks and loc.problem is None]
        if usable or not (run_dir / MANIFEST).exists():
            try:
                record(run_dir, suite, seed, usable, cache)
            except OSError as e:
                raise SourceError(
                    f"cannot write the results folder {str(run_dir)!r} ({e.strerror}); pass --out DIR"
                ) from None
        prep.runs[run_dir] = cks
    if suite.from_file:
        listing = {"source": suite.origin, "name": suite.name, "checkpoints": [vars(c) for c in suite.checkpoints]}
        atomic_write_text(root / SUITE_RECORD, json.dumps(listing, indent=1))
    if not prep.runs:
        raise SourceError(f"none of the {len(chosen)} checkpoints of {suite.origin} is available; see the errors above")
    return prep


def _hub_manifest_root(root: Path) -> None:
    """A suite root with seeds holds no manifest; refuse one that is some other run folder."""
    if (root / MANIFEST).exists():
        _hub_manifest(root)


def _key(ck: Checkpoint) -> tuple[Any, ...]:
    return (ck.seed, ck.step, ck.repo, ck.revision if ck.repo else None, ck.path)


def _recorded(suite: Suite, root: Path) -> set[tuple[Any, ...]]:
    """Checkpoints of ``suite`` already listed (with a hash) in its run folders."""
    out: set[tuple[Any, ...]] = set()
    for seed in suite.seeds:
        run_dir = suite.run_dir(root, seed)
        try:
            m = _hub_manifest(run_dir)
        except SourceError:
            continue
        if m is None:
            continue
        hashed = {c.path for c in m.checkpoints if c.sha256}
        for name, h in m.run.get("hub", {}).items():
            if name in hashed:
                out.add((seed, h.get("step"), h.get("repo"), h.get("revision"), h.get("path")))
    return out


def to_target(prep: Prepared) -> Target:
    """The :class:`~mlmscope.analyses.target.Target` of a prepared source (``runs``: one run folder per seed)."""
    n = sum(len(v) for v in prep.runs.values())
    return Target("hub", Path(prep.suite.origin), prep.root, n, runs=tuple(prep.runs), source=prep)


def results_folder_of(text: str) -> Path:
    """The default results folder of a source, without resolving anything (``mlmscope report hf:...``).

    Raises:
        SourceError: a malformed source, or one not analysed yet.
    """
    if text.startswith(HF_PREFIX):
        body = text[len(HF_PREFIX) :]
        repos = [_split_repo(i.strip(), text)[0] for i in body.split(",") if i.strip()]
        if not repos:
            raise SourceError(f"{text!r}: give a hub repo after hf:")
        root = DEFAULT_HUB_DIR / _folder_name(repos)
    else:
        root = load_suite(text).default_dir()
    if not root.is_dir():
        raise SourceError(
            f"{text} has no results folder yet ({str(root)!r}): run `mlmscope analyze {text}` first (with --out, "
            "pass that folder instead)"
        )
    return root


# --- analysing --------------------------------------------------------------------------------------------------------


def _steps_text(steps: Iterable[int]) -> str:
    return ",".join(str(s) for s in sorted(set(steps)))


def seed_runs(root: str | os.PathLike) -> list[Path]:
    """The ``seed_*`` run folders of a suite (or seed-group) folder, by seed number; [] for a single run."""
    p = Path(root)
    if not p.is_dir() or (p / MANIFEST).exists():
        return []
    runs = [d for d in p.iterdir() if d.is_dir() and d.name.startswith(SEED_PREFIX) and (d / MANIFEST).exists()]

    def seed_no(d: Path) -> tuple[int, str]:
        tail = d.name[len(SEED_PREFIX) :]
        return (int(tail), "") if tail.isdigit() else (1 << 62, tail)

    return sorted(runs, key=seed_no)


def _needs_weights(run_dir: Path, config: RunnerConfig, probe_set: Any, steps: Sequence[int]) -> set[int]:
    """Steps among ``steps`` with a (checkpoint, analysis) pair not stored yet (so their weights are needed)."""
    from .runner import Runner, probe_set_hash

    if not steps:
        return set()
    r = Runner(run_dir, replace(config, steps=_steps_text(steps)), probe_set=probe_set)
    try:
        jobs, _ = r.plan(r._entries(), probe_set_hash(r.probe_set()))
    except Exception:  # no probe set can be built without the weights: every step needs its weights
        return set(steps)
    return {j.step for j in jobs}


def _share_probes(runs: Sequence[Path]) -> None:
    """Copy the first seed's default probe set to the other seeds when their tokenizers are byte-identical."""
    from .runner import DEFAULT_PROBES

    if len(runs) < 2 or not (runs[0] / DEFAULT_PROBES / "probeset.json").is_file():
        return
    ref = _tokenizer_fingerprint(runs[0])
    for run in runs[1:]:
        dst = run / DEFAULT_PROBES
        if ref is not None and not dst.exists() and _tokenizer_fingerprint(run) == ref:
            shutil.copytree(runs[0] / DEFAULT_PROBES, dst)


def _tokenizer_fingerprint(run: Path) -> str | None:
    try:
        entries = Manifest.load(run).checkpoints
    except (OSError, ValueError):
        return None
    for e in reversed(entries):
        folder = run / e.path
        files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
        if files:
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode() + b"\0" + f.read_bytes())
            return h.hexdigest()
    return None


def merge_summaries(parts: Sequence[Summary]) -> Summary:
    """One summary of several runner invocations (counts, seconds and timings added; warnings once)."""
    from .runner import Summary

    out = Summary()
    for s in parts:
        out.counts.update(s.counts)
        out.seconds.update(s.seconds)
        out.failures += s.failures
        out.warnings += [w for w in s.warnings if w not in out.warnings]
        out.checkpoints += s.checkpoints
        out.load_s += s.load_s
        out.capture_s += s.capture_s
        out.wall_s += s.wall_s
    return out


def analyse_source(
    target: Target,
    config: RunnerConfig,
    probe_set: Any = None,
    reporter: Callable[[], Any] | None = None,
    evict_after: bool = False,
    say: Callable[[str], None] = print,
    fetch_fn: Callable[[Checkpoint, Path], Path] | None = None,
    evict_fn: Callable[[str, Path], int] | None = None,
) -> list[tuple[Path, Summary]]:
    """Analyse a prepared source: each seed's run folder in turn.

    A run whose checkpoints are all on disk is analysed in one runner invocation. With checkpoints to download
    (hub reachable) or ``evict_after``, its checkpoints go one at a time in step order: download if needed, analyse,
    then (``evict_after``) delete from the cache. One at a time, chained analyses (the tuned lens) start from
    scratch at each checkpoint instead of warm-starting from the previous one, as with ``--follow``.

    Raises:
        MissingCheckpointsError: offline, a checkpoint evicted earlier lacks results for a requested analysis.
        SourceError: ``evict_after`` while ``HF_HUB_OFFLINE`` is set.
    """
    from .runner import Runner, parse_steps

    prep = target.source
    if not isinstance(prep, Prepared):
        raise SourceError(f"{target.path} is not a published trajectory")
    if evict_after:
        check_evict()
    fetch_fn = fetch_fn or fetch
    evict_fn = evict_fn or evict
    make_reporter = reporter or (lambda: None)
    user_steps = parse_steps(config.steps)
    out: list[tuple[Path, Summary]] = []
    for run_dir, cks in prep.runs.items():
        cks = sorted((c for c in cks if user_steps(c.step)), key=lambda c: c.step)
        on_disk = {c for c in cks if (run_dir / step_dirname(c.step)).is_dir() and c not in prep.pending}
        absent = [c for c in cks if c not in on_disk and c not in prep.pending]
        need = _needs_weights(run_dir, config, probe_set, [c.step for c in absent]) if absent else set()
        refetch = [c for c in absent if c.step in need]
        unfetchable = [c for c in refetch if hub_offline() or c.repo is None]
        if unfetchable:
            why = "evicted from the cache, and not every requested analysis is stored for it"
            if not prep.skip_missing:
                raise _missing_error(prep.suite, [(c, why) for c in unfetchable], prep.root, prep.cache_dir, len(cks))
            for c in unfetchable:
                say(f"skipped {c.label} (step {c.step}): {why}")
            refetch = [c for c in refetch if c not in unfetchable]
        todo = set(prep.pending) | set(refetch)
        keep = [c for c in cks if c in on_disk or c in todo or (c in absent and c.step not in need)]
        if not keep:
            continue
        if not (todo & set(keep)) and not evict_after:
            cfg = replace(config, steps=_steps_text(c.step for c in keep))
            summary = Runner(run_dir, cfg, probe_set=probe_set, reporter=make_reporter()).run()
        else:
            parts = []
            for ck in keep:
                if ck in todo:
                    say(f"downloading {ck.label} (step {ck.step}) into {prep.cache_dir} ...")
                    folder = fetch_fn(ck, prep.cache_dir)
                    record(
                        run_dir,
                        prep.suite,
                        ck.seed,
                        [Located(ck, folder, commit=folder.name if ck.repo else None)],
                        prep.cache_dir,
                    )
                cfg = replace(config, steps=str(ck.step))
                parts.append(Runner(run_dir, cfg, probe_set=probe_set, reporter=make_reporter()).run())
                commit = _commit_of(run_dir, ck)
                if evict_after and ck.repo and commit:
                    freed = evict_fn(commit, prep.cache_dir)
                    say(f"evicted {ck.label} (commit {commit[:12]}) from the cache: {freed / 1e6:.1f} MB freed")
            summary = merge_summaries(parts)
        out.append((run_dir, summary))
        if probe_set is None:
            _share_probes(list(prep.runs))
    return out


def _commit_of(run_dir: Path, ck: Checkpoint) -> str | None:
    try:
        rec = Manifest.load(run_dir).run.get("hub", {}).get(step_dirname(ck.step), {})
    except (OSError, ValueError):
        return None
    return rec.get("commit")


def check_evict() -> None:
    """``--evict`` deletes checkpoints from the cache to be downloaded again later: refused when nothing can be.

    Raises:
        SourceError: ``HF_HUB_OFFLINE`` is set.
    """
    if hub_offline():
        raise SourceError(
            "--evict deletes each checkpoint from the Hugging Face cache after its analysis; with HF_HUB_OFFLINE set "
            "nothing could be downloaded again, so it is refused (unset HF_HUB_OFFLINE where the hub is reachable)"
        )
