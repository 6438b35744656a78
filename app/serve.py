"""``mlmscope app [RUN ...]``: start the Streamlit dashboard (bound to 127.0.0.1 unless told otherwise).

``serve`` runs ``streamlit run app/dashboard.py`` in a child process with the run folders in ``MLMSCOPE_RUNS`` and
prints the URL; ``app_command`` is the typer-annotated function the CLI mounts as ``mlmscope app``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import typer

from ..checkpoints.errors import MlmscopeError

#: The Streamlit entry script.
DASHBOARD = Path(__file__).resolve().with_name("dashboard.py")
DEFAULT_RUN = Path("runs/demo")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501


class DashboardError(MlmscopeError):
    """A problem starting the dashboard (missing run folder, port in use); the message is user-facing."""


def check_port(host: str, port: int) -> None:
    """Raise :class:`DashboardError` if ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    if not 0 < port < 65536:
        raise DashboardError(f"port {port} is not a valid TCP port (1-65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise DashboardError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port") from None


def streamlit_command(host: str, port: int) -> list[str]:
    """The ``streamlit run`` command line (headless, no usage statistics)."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(DASHBOARD),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]


def url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _parent_death_signal():
    """A ``preexec_fn`` that has Linux send SIGTERM to the child when this process dies, even by SIGKILL (else None).

    libc is loaded here, in the parent, so the child only makes one system call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_pdeathsig() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return set_pdeathsig


def _stop_on_signal(signum, frame):
    raise KeyboardInterrupt


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate ``proc`` (SIGTERM, then SIGKILL after ``timeout`` seconds) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve(runs: list[Path], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Start the dashboard on ``runs`` and block until it stops (Ctrl-C).

    Args:
        runs: Run folders (a seed-group folder or a folder of runs works too; an analysed published source such as
            ``hf:ORG/NAME`` or a suite file stands for its results folder).
        host: Address to bind; 127.0.0.1 (this machine only) by default. ``0.0.0.0`` exposes it on the network.
        port: TCP port.

    Raises:
        DashboardError: a run folder does not exist, or the port cannot be bound.
        mlmscope.analyses.target.TargetError: a published source that has no results folder yet.
    """
    from ..analyses.sources import is_source_spec
    from ..analyses.target import results_folder

    # hf:ORG/NAME or a suite file: its results folder
    runs = [results_folder(r) if is_source_spec(r) else Path(r) for r in runs] or [DEFAULT_RUN]
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        hint = " (train it with `mlmscope demo`)" if str(DEFAULT_RUN) in missing else ""
        raise DashboardError(f"run folder(s) not found: {', '.join(missing)}{hint}")
    check_port(host, port)
    env = {
        **os.environ,
        "MLMSCOPE_RUNS": os.pathsep.join(str(r.resolve()) for r in runs),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    print(f"mlmscope dashboard: {url(host, port)}  (runs: {', '.join(map(str, runs))}; Ctrl-C to stop)", flush=True)
    # The server never outlives this process: Ctrl-C, SIGTERM and SIGHUP stop it here, and if this process is killed
    # outright (SIGKILL) Linux sends it SIGTERM (parent-death signal).
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _stop_on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        proc = subprocess.Popen(streamlit_command(host, port), env=env, preexec_fn=_parent_death_signal())
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop(proc)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if proc.returncode not in (0, -2, -15, None):
        raise DashboardError(f"streamlit exited with code {proc.returncode}")


def app_command(
    runs: list[Path] | None = typer.Argument(
        None,
        help="Run folders (default runs/demo); a folder of seed_* runs is shown as one group (mean ± band); "
        "published checkpoints analysed before (hf:ORG/NAME, a suite file) show their results folder.",
    ),
    host: str = typer.Option(DEFAULT_HOST, help="Address to bind (127.0.0.1 = this machine only)."),
    port: int = typer.Option(DEFAULT_PORT, help="TCP port."),
) -> None:
    """Start the dashboard: every analysis of RUN over its checkpoints, one step slider driving every view."""
    serve(list(runs or [DEFAULT_RUN]), host=host, port=port)
