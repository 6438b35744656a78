"""The built wheel works on its own: contents, imports, console script and every dashboard page, from a clean venv.

The other tests run against the editable install (``pip install -e .``), which maps ``mlmscope.*`` onto the
repository's folders through a finder hook and so hides packaging mistakes: a subpackage that setup.py's discovery
misses, a data file not declared in pyproject.toml, an import that only resolves from the repository root. Here:

1. the wheel is built (``pip wheel --no-deps --no-build-isolation``) from a copy of the source tree, so no
   ``build/`` or ``*.egg-info`` folder is written into the checkout, and its file list is compared with the
   repository's folders;
2. it is installed (``--no-deps --no-index``) into a fresh venv whose only link to the development venv is a
   ``.pth`` line naming that venv's site-packages: the third-party dependencies are found, but the ``.pth`` files
   inside that directory (the editable install's ``__editable__*`` finder) are not processed;
3. every subprocess runs in a scratch folder (from the repository root, ``mlmscope/`` there would shadow the
   installed package), with ``HF_HUB_OFFLINE=1`` and without ``PYTHONPATH``, and checks where each module came from.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOP = "mlmscope"
#: The top-level folders that setup.py maps to ``mlmscope.<folder>``; ``mlmscope/`` itself holds the top package.
FOLDERS = ("checkpoints", "probes", "analyses", "app")
#: Package data (pyproject.toml ``[tool.setuptools.package-data]``), as repository paths.
DATA = ("checkpoints/assets",)
#: Not copied into the build tree: at the top, VCS, venvs, build outputs, caches and run folders (cf. .gitignore);
#: anywhere, bytecode. (A stale ``build/lib`` would otherwise leak files deleted from the sources into the wheel.)
NOT_SOURCE_TOP = {".git", ".venv", "venv", "build", "dist", ".pytest_cache", ".cache", "runs", "results", "data"}
TIMEOUT = 300  # s per subprocess; each takes seconds


def _not_source(folder: str, names: list[str]) -> set[str]:
    top = Path(folder).resolve() == REPO
    return {
        n
        for n in names
        if n == "__pycache__" or n.endswith(".pyc") or (top and (n in NOT_SOURCE_TOP or n.endswith(".egg-info")))
    }


def _repo_files(pattern: str, roots=(TOP, *FOLDERS)) -> dict[str, Path]:
    """Wheel path (``mlmscope/<rel>``) -> repository file, for every file matching ``pattern`` under ``roots``."""
    out = {}
    for root in roots:
        for f in sorted((REPO / root).rglob(pattern)):
            if f.is_file() and "__pycache__" not in f.parts:
                rel = f.relative_to(REPO / root).as_posix()
                out[f"{TOP}/{rel}" if root == TOP else f"{TOP}/{root}/{rel}"] = f
    return out


def _env() -> dict[str, str]:
    """The test's environment (the process guard's session tag included), offline and with no path overrides."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "MLMSCOPE_RUNS")
    }
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONNOUSERSITE="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _run(cmd: list, cwd: Path, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n"
        f"{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


# --- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The working directory of every subprocess (nothing importable in it)."""
    return tmp_path_factory.mktemp("wheel_cwd")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, scratch) -> Path:
    """``mlmscope-*.whl``, built without network or build isolation from a copy of the working tree."""
    base = tmp_path_factory.mktemp("wheel_build")
    src = base / "src"
    shutil.copytree(REPO, src, ignore=_not_source)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            base / "dist",
            src,
        ],
        cwd=scratch,
    )
    wheels = list((base / "dist").glob("*.whl"))
    assert len(wheels) == 1 and wheels[0].name.startswith(f"{TOP}-"), wheels
    return wheels[0]


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory, wheel, scratch) -> dict[str, Path]:
    """A fresh venv with the wheel installed and the development venv's site-packages appended to ``sys.path``."""
    venv = tmp_path_factory.mktemp("wheel_venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=scratch)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=scratch).stdout.strip()
    )
    # The development venv's pip installs into the new interpreter (`--python`): no ensurepip, no network. The
    # wheel goes in before the .pth exists, so pip does not see the editable mlmscope of the development venv.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            wheel,
        ],
        cwd=scratch,
    )
    dev_sites = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
    assert str(purelib) not in dev_sites, dev_sites
    (purelib / "_mlmscope_dev_deps.pth").write_text("".join(f"{d}\n" for d in dev_sites))
    return {"venv": venv, "python": python, "site": purelib, "bin": venv / "bin"}


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    """The dashboard tests' micro run (tests/test_dashboard.py's ``micro_root`` folder: built once a session)."""
    from mlmscope.app.bench import ensure_micro_run

    root = tmp_path_factory.getbasetemp() / "dashboard_fixture"
    root.mkdir(exist_ok=True)
    return ensure_micro_run(root)


def _in_venv(clean_venv, scratch: Path, name: str, code: str, *args) -> dict:
    """Run ``code`` (a script that prints one JSON object last) with the clean venv's python; return that object."""
    script = scratch / f"{name}.py"
    script.write_text(textwrap.dedent(code))
    out = _run([clean_venv["python"], script, *args], cwd=scratch).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- 1. the wheel's contents -----------------------------------------------------------------------------------------


def test_wheel_holds_every_module_and_data_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if not n.endswith("/")}
        tops = {n.split("/")[0] for n in names}
        dist_info = {t for t in tops if t.endswith(".dist-info")}
        assert len(dist_info) == 1 and tops - dist_info == {TOP}, f"top-level entries of {wheel.name}: {sorted(tops)}"
        entry_points = z.read(f"{next(iter(dist_info))}/entry_points.txt").decode()
    assert f"{TOP} = {TOP}.app.cli:main" in entry_points, entry_points

    modules = _repo_files("*.py")
    assert f"{TOP}/app/views/syntax.py" in modules and f"{TOP}/app/dashboard.py" in modules  # the walk is sane
    missing = sorted(set(modules) - names)
    assert not missing, f"Python files of the repository missing from {wheel.name}: {missing}"

    data = {
        f"{TOP}/{f.relative_to(REPO).as_posix()}": f
        for root in DATA
        for f in sorted((REPO / root).rglob("*"))
        if f.is_file() and "__pycache__" not in f.parts
    }
    assert any(w.endswith(".json") for w in data) and f"{TOP}/checkpoints/assets/tokenizers/hashes.json" in data
    missing = sorted(set(data) - names)
    assert not missing, f"package data missing from {wheel.name} (pyproject.toml package-data): {missing}"
    with zipfile.ZipFile(wheel) as z:
        changed = [w for w, f in data.items() if z.read(w) != f.read_bytes()]
    assert not changed, f"package data differs from the repository: {changed}"

    every_file = _repo_files("*")
    stray = sorted(n for n in names - set(every_file) if n.split("/")[0] == TOP)
    assert not stray, f"files in {wheel.name} that are not in the repository's package folders: {stray}"


# --- 2. the clean venv sees the wheel, not the checkout ------------------------------------------------------------


IMPORT_ALL = r"""
    import importlib, json, pkgutil, sys
    from pathlib import Path

    site = Path(sys.argv[1]).resolve()
    import mlmscope

    errors, outside, names = {}, {}, ["mlmscope"]

    def onerror(name):
        errors[name] = repr(sys.exc_info()[1])

    for info in pkgutil.walk_packages(mlmscope.__path__, prefix="mlmscope.", onerror=onerror):
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except BaseException as e:  # a module that exits or raises on import is reported, not fatal
            errors[info.name] = f"{type(e).__name__}: {e}"
    for name, mod in sorted(sys.modules.items()):
        if name == "mlmscope" or name.startswith("mlmscope."):
            f = getattr(mod, "__file__", None)
            if f is None or not Path(f).resolve().is_relative_to(site):
                outside[name] = f
    finders = [f"{type(f).__module__}.{type(f).__qualname__}" if not isinstance(f, type) else
               f"{f.__module__}.{f.__qualname__}" for f in sys.meta_path]
    print(json.dumps({"file": mlmscope.__file__, "version": mlmscope.__version__, "names": names, "errors": errors,
                      "outside": outside, "finders": finders, "path": sys.path}))
"""


def test_clean_venv_imports_every_module_from_the_wheel(clean_venv, scratch, wheel):
    site = clean_venv["site"].resolve()
    res = _in_venv(clean_venv, scratch, "import_all", IMPORT_ALL, site)
    assert Path(res["file"]).resolve() == site / TOP / "__init__.py", res["file"]
    assert res["version"] == wheel.name.split("-")[1]  # metadata of the installed wheel, not "0+unknown"
    assert not [f for f in res["finders"] if "editable" in f.lower()], res["finders"]
    assert Path(res["path"][0]).resolve() == scratch.resolve(), res["path"]  # the script's folder, not the repository
    assert str(REPO) not in res["path"] and "" not in res["path"], res["path"]
    assert not res["errors"], f"modules that fail to import from the wheel: {res['errors']}"
    assert not res["outside"], f"mlmscope modules loaded from outside the clean venv: {res['outside']}"
    with zipfile.ZipFile(wheel) as z:
        expected = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in z.namelist() if n.endswith(".py")}
    assert set(res["names"]) == expected, (sorted(expected - set(res["names"])), sorted(set(res["names"]) - expected))


def test_console_script_help(clean_venv, scratch):
    script = clean_venv["bin"] / TOP
    assert script.read_text().splitlines()[0] == f"#!{clean_venv['python']}"
    out = _run([script, "--help"], cwd=scratch, timeout=120).stdout
    for command in ("train", "verify", "demo", "analyze", "app", "report", "probes", "analyses"):
        assert f" {command} " in out, f"`mlmscope --help` does not list {command!r}:\n{out}"


# --- 3. every dashboard page from the installed dashboard.py -------------------------------------------------------


PAGES_FROM_WHEEL = r"""
    import json, os, sys
    from pathlib import Path

    site, run = Path(sys.argv[1]).resolve(), sys.argv[2]
    os.environ["MLMSCOPE_RUNS"] = run
    from streamlit.testing.v1 import AppTest

    import mlmscope
    from mlmscope.app.views import PAGES

    dashboard = Path(mlmscope.__file__).parent / "app" / "dashboard.py"
    pages = {}
    for page in PAGES:
        at = AppTest.from_file(str(dashboard), default_timeout=180)
        at.query_params["page"] = page  # a linked page (?page=...): pick_page reads it on the first run
        at.run()
        shown = at.sidebar.radio(key="page").value if not at.exception else None
        pages[page] = {"exception": [str(e.value) for e in at.exception], "error": [str(e.value) for e in at.error],
                       "shown": shown, "metrics": len(at.metric)}
    loaded = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.startswith("mlmscope")}
    outside = {n: f for n, f in loaded.items() if f is None or not Path(f).resolve().is_relative_to(site)}
    print(json.dumps({"dashboard": str(dashboard), "pages": pages, "outside": outside}))
"""


def test_every_dashboard_page_renders_from_the_wheel(clean_venv, scratch, micro_run):
    site = clean_venv["site"].resolve()
    res = _in_venv(clean_venv, scratch, "pages_from_wheel", PAGES_FROM_WHEEL, site, micro_run)
    assert Path(res["dashboard"]).resolve() == site / TOP / "app" / "dashboard.py"
    from mlmscope.app.views import PAGES

    assert list(res["pages"]) == list(PAGES)
    for page, r in res["pages"].items():
        assert not r["exception"], f"page {page!r} raised: {r['exception']}"
        assert r["shown"] == page, f"?page={page} showed {r['shown']!r}"
        assert not r["error"] and r["metrics"], f"page {page!r}: errors {r['error']}, {r['metrics']} metrics"
    assert not res["outside"], f"mlmscope modules loaded from outside the clean venv: {res['outside']}"
