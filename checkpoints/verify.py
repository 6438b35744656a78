"""``mlmscope verify RUN``: re-hash every checkpoint and compare with the manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .manifest import Manifest, list_checkpoints, weights_sha256


@dataclass
class VerifyResult:
    """Verification status of one checkpoint: ``ok``, ``mismatch``, ``corrupted``, ``missing`` or ``duplicate``."""

    step: int
    path: str
    status: str
    detail: str = ""


def verify_run(run_dir: str | os.PathLike) -> list[VerifyResult]:
    """Re-hash every checkpoint of a run; duplicates (same hash at two steps) are reported too."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    has_manifest = (run_dir / "manifest.json").exists()
    entries = Manifest.load(run_dir).checkpoints if has_manifest else list_checkpoints(run_dir)
    out, seen = [], {}
    for e in entries:
        try:
            digest = weights_sha256(run_dir / e.path)
        except FileNotFoundError:
            out.append(VerifyResult(e.step, e.path, "missing", "weights file not found"))
            continue
        except ValueError as err:
            out.append(VerifyResult(e.step, e.path, "corrupted", str(err)))
            continue
        if has_manifest and digest != e.sha256:
            out.append(VerifyResult(e.step, e.path, "mismatch", f"hash {digest[:12]} != manifest {e.sha256[:12]}"))
        elif digest in seen:
            out.append(VerifyResult(e.step, e.path, "duplicate", f"identical weights to step {seen[digest]}"))
        else:
            out.append(VerifyResult(e.step, e.path, "ok"))
        seen.setdefault(digest, e.step)
    return out
