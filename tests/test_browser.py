"""End to end in a real headless browser: `mlmscope app` on 127.0.0.1, every page opened, the step slider moved.

Uses Debian's Chromium (`/usr/bin/chromium`, installed by `make setup`) driven by the PyPI `playwright` package
(never `playwright install`: see docs/notes/dashboard.md, "Browser test setup"). Screenshots of every page (after the
slider move) go to ``$MLMSCOPE_SCREENSHOTS`` (the README's are made with ``MLMSCOPE_SCREENSHOTS=docs/screenshots``),
else to the test's temporary folder. ``$MLMSCOPE_SCREENSHOT_RUN`` shows another run instead of the micro fixture (e.g.
runs/demo).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlmscope.app.bench import ensure_micro_run
from mlmscope.app.views import PAGES

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
METRIC = '[data-testid="stMetricValue"]'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`mlmscope app` exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"dashboard at {url} not healthy after {timeout} s")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    if os.environ.get("MLMSCOPE_SCREENSHOT_RUN"):
        return Path(os.environ["MLMSCOPE_SCREENSHOT_RUN"]).resolve()
    root = tmp_path_factory.getbasetemp() / "dashboard_fixture"
    root.mkdir(exist_ok=True)
    return ensure_micro_run(root)


def _mlmscope() -> list[str]:
    exe = Path(sys.executable).with_name("mlmscope")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlmscope.app.cli"]


def _start_app(
    run_dir: Path | str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`mlmscope app RUN --port P` (default host 127.0.0.1) in a child process of its own session; waits until the
    server answers. Returns the process and the URL; stop it with :func:`_stop_group`."""
    port = _free_port()
    proc = subprocess.Popen(
        [*_mlmscope(), "app", str(run_dir), "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first, first
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc)
    except BaseException:
        _stop_group(proc)
        raise
    return proc, url


@pytest.fixture(scope="module")
def server(run_dir):
    """`mlmscope app RUN --port P` in a child process; yields its URL."""
    proc, url = _start_app(run_dir)
    try:
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the child's whole process group (`mlmscope app` and its streamlit server), SIGKILL what is left.

    The group is the child's own (``start_new_session=True``), so this reaches the server even if `mlmscope app`
    dies first; `mlmscope app` itself also stops the server on SIGTERM (app/serve.py).
    """

    def signal_group(sig) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(0.5)  # let the server finish its own shutdown before anything left is killed
    signal_group(signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        msg = f"{CHROMIUM} is missing: `make setup` installs Debian's chromium (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


def _settled_metrics(page, timeout: float = 90.0, differ_from: list[str] | None = None) -> list[str]:
    """Metric texts once they stop changing for a second (and differ from ``differ_from`` if given)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = page.locator(METRIC).all_inner_texts()
        if now != last:
            last, since = now, time.monotonic()
        elif now and (differ_from is None or now != differ_from) and time.monotonic() - since > 1.0:
            return now
        page.wait_for_timeout(200)
    return last or []


@pytest.mark.parametrize("slug", PAGES)
def test_page_in_browser(server, browser, slug, tmp_path):
    out = Path(os.environ.get("MLMSCOPE_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    try:
        page.goto(f"{server}/?page={slug}")
        page.wait_for_selector(METRIC, timeout=120_000)
        before = _settled_metrics(page)
        assert before, f"{slug}: no metric rendered"
        assert not page.locator('[data-testid="stException"]').count()
        slider = page.locator('[data-testid="stSidebar"] [data-testid="stSlider"] input[type="range"]')
        last = slider.get_attribute("aria-valuetext")
        slider.focus()
        for _ in range(5):  # five checkpoints earlier: adjacent late checkpoints of a real run can share a value
            page.keyboard.press("ArrowLeft")
        after = _settled_metrics(page, differ_from=before)
        assert after != before, f"{slug}: the visible values did not change after moving the slider ({before})"
        assert slider.get_attribute("aria-valuetext") != last
        # The step is bound to the URL; streamlit writes the query string after the rerun has drawn, so wait for it.
        page.wait_for_function("() => location.search.includes('step=')", timeout=30_000)
        assert not page.locator('[data-testid="stException"]').count()
        page.screenshot(path=str(out / f"{slug}.png"), full_page=True)
    finally:
        page.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_app_never_leaves_its_server_running(run_dir, sig):
    """Stopping `mlmscope app` alone (not its process group) stops the streamlit server it started: on SIGTERM it
    stops the server itself; killed outright, Linux sends the server SIGTERM (parent-death signal)."""
    psutil = pytest.importorskip("psutil")
    proc, _ = _start_app(run_dir)
    try:
        servers = psutil.Process(proc.pid).children(recursive=True)
        assert servers, "no streamlit child found"
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(servers, timeout=30)
        assert not alive, f"still running after {sig.name} to `mlmscope app`: {[p.cmdline() for p in alive]}"
    finally:
        _stop_group(proc)


def _plotly_traces(page, title: str) -> list[dict]:
    """Name and fill of every trace of the plotly figure titled ``title`` (markup ignored) as the browser drew it
    (the graph div's ``data``) plus the number of filled areas in its SVG."""
    return page.evaluate(
        """(title) => {
            for (const gd of document.querySelectorAll('.js-plotly-plot')) {
                const t = gd.layout && gd.layout.title;
                if (String((t && (t.text || t)) || '').replace(/<[^>]+>/g, '') !== title) continue;
                return gd.data.map((d) => ({name: d.name || '', fill: d.fill || '',
                                             fills: gd.querySelectorAll('.fills path').length}));
            }
            return [];
        }""",
        title,
    )


def test_suite_of_three_seeds_is_a_band_in_the_browser(browser, tmp_path):
    """A suite.json of 3 seeds x 3 steps, resolved from a Hugging Face cache on disk and analysed with
    `mlmscope analyze suite.json`, opens in `mlmscope app suite.json` as one seed group drawn as mean ± 1 sd."""
    from conftest import _save_micro
    from mlmscope.probes.probeset import sentences_of
    from test_runner import PROBES
    from test_sources import ORG, _suite_file, add_to_cache

    cache = tmp_path / "hf_cache"
    for seed in (0, 1, 2):
        repo = f"{ORG}/micro" if seed == 0 else f"{ORG}/micro-seed_{seed}"
        for step in (0, 10, 20):
            folder = _save_micro(tmp_path / "src" / f"s{seed}_{step}", seed=100 * seed + step)
            add_to_cache(cache, repo, folder, revision=f"step_{step}")
    probes = sentences_of(PROBES).save(tmp_path / "probes")
    suite = _suite_file(tmp_path)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ["analyze", str(suite), "-a", "attention", "--probes", str(probes), "--batch-size", "2", "--threads", "1"]
    done = subprocess.run([*_mlmscope(), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "(3 seeds)" in done.stderr, done.stdout + done.stderr

    proc, url = _start_app(suite, cwd=tmp_path, env=env)
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    try:
        page.goto(f"{url}/?page=attention")
        page.wait_for_selector(METRIC, timeout=120_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot')].some((gd) => gd.data && gd.data.length)",
            timeout=60_000,
        )
        assert not page.locator('[data-testid="stException"]').count()
        group = f"{tmp_path / 'runs/suites/three-seeds'} (mean of 3 seeds)"
        assert group in page.locator('[data-testid="stSidebar"]').inner_text()  # the group is what is selected
        traces = _plotly_traces(page, "Mean over heads")
        lines = [t["name"] for t in traces if t["name"].startswith(group)]
        assert lines == [f"{group} · L0", f"{group} · L1"], traces
        assert sum(t["fill"] == "toself" for t in traces) >= 2, f"no ±1 sd band per layer: {traces}"
        assert traces[0]["fills"] >= 2, "the bands were not drawn"
        out = Path(os.environ.get("MLMSCOPE_SCREENSHOTS", tmp_path))
        page.screenshot(path=str(out / "seed_bands.png"), full_page=True)
    finally:
        page.close()
        _stop_group(proc)
