"""Ray backend on a local instance (``ray.init(num_cpus=2)``): same results as the local backend, failures isolated.

Uses the fake analyses/capture of ``test_runner`` (importable by Ray workers through PYTHONPATH).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from mlmscope.analyses.store import ResultStore, load_results  # noqa: E402 - after the ray importorskip
from test_runner import Chained, FakeMasked, FakeNorm, make_run, runner  # noqa: E402 - after the ray importorskip

TESTS_DIR = Path(__file__).parent


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray instance whose workers can import the test helpers (shut down afterwards)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


def test_ray_results_equal_local_backend(local_ray, tmp_path):
    base = make_run(tmp_path / "run", steps=(0, 1, 3))
    local, remote = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(base, local)
    shutil.copytree(base, remote)
    (remote / "step_000003" / "model.safetensors").write_bytes(b"corrupt")  # isolated failure on Ray too
    analyses = [FakeNorm(), FakeMasked(), Chained()]
    runner(local, analyses).run()
    s = runner(remote, analyses, backend="ray").run()
    assert {(o.step, o.status) for o in s.failures} == {(3, "failed")}
    assert s.counts[("_t_norm", "ok")] == 2 and s.counts[("_t_chain", "ok")] == 2
    for name in ("_t_norm", "_t_masked", "_t_chain"):
        want = load_results(local, name)
        pd.testing.assert_frame_equal(load_results(remote, name), want[want.step != 3].reset_index(drop=True))
    assert load_results(remote, "_t_chain")["prev_step"].tolist() == [-1, 0]  # warm-start chain kept in order
    # the coordinator indexed what the Ray workers wrote
    assert len(ResultStore(remote).entries()) == 6
    # a re-run on Ray computes nothing that is stored
    s = runner(remote, analyses, backend="ray", steps="0-1").run()
    assert s.counts[("_t_norm", "cached")] == 2 and s.failed == 0
