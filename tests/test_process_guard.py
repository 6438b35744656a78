"""The process guard behind conftest's ``no_leaked_processes`` finds what a plain child list misses, and stops it."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from process_guard import ENV_TAG, ProcessGuard


@pytest.fixture(autouse=True)
def _own_tag(monkeypatch):
    """Each guard here tags os.environ with its own session id: give the session's tag back after the test."""
    monkeypatch.setenv(ENV_TAG, "placeholder")


#: Starts a sleeper in a new session, prints its pid and exits at once: the sleeper is reparented (to init or a
#: subreaper), like the streamlit server of an `mlmscope app` whose parent died first.
_DOUBLE_FORK = """
import subprocess, sys
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(p.pid, flush=True)
"""


def _orphan(env=None) -> psutil.Process:
    out = subprocess.run([sys.executable, "-c", _DOUBLE_FORK], capture_output=True, text=True, check=True, env=env)
    p = psutil.Process(int(out.stdout))
    assert p.ppid() != psutil.Process().pid  # no longer our descendant
    return p


def test_guard_finds_and_kills_reparented_grandchild(tmp_path):
    guard = ProcessGuard(tmp_path)
    orphan = _orphan()  # inherits the session tag through the environment
    assert orphan.pid not in {c.pid for c in psutil.Process().children(recursive=True)}
    leaked = guard.stop_leftovers(grace=0.2)
    assert len(leaked) == 1 and f"pid {orphan.pid} " in leaked[0]
    assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
    assert guard.stop_leftovers(grace=0.2) == []


def test_guard_finds_child_seen_before_it_was_reparented(tmp_path):
    guard = ProcessGuard(tmp_path)
    # an environment without the tag: found only because a snapshot saw it while it was still our grandchild
    parent = subprocess.Popen(
        [sys.executable, "-c", _DOUBLE_FORK + "import time; time.sleep(30)\n"],
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 10
    while pid not in {c.pid for c in psutil.Process().children(recursive=True)} and time.monotonic() < deadline:
        time.sleep(0.05)
    guard.snapshot("the test")
    parent.kill(), parent.wait()
    parent.stdout.close()
    leaked = guard.stop_leftovers(grace=0.2)
    assert any(f"pid {pid} " in d and "[seen after the test]" in d for d in leaked), leaked
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_guard_ignores_processes_that_ended_and_foreign_ones(tmp_path):
    guard = ProcessGuard(tmp_path)
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], env={"PATH": "/usr/bin:/bin"}, start_new_session=True
    )
    try:
        # a direct child is ours whatever its environment; one that exits within the grace period is not a leak
        assert [p.pid for p in guard.survivors()] == [other.pid]
        other.terminate()
        assert guard.stop_leftovers(grace=5) == []
    finally:
        other.kill()
        other.wait()
