"""Dashboard benchmark: server-side time to rerun each page after a step-slider move on a 100-checkpoint store.

How it is measured: a results store with ``n`` checkpoints is synthesised from an analysed run (every stored result
folder is copied under a fake checkpoint hash and step, and a manifest lists the fake checkpoints; see
:func:`synthesize_store`), then ``streamlit.testing.v1.AppTest`` runs ``app/dashboard.py`` in-process: each page is
rendered once (caches filled, as for a user who opened it), then the slider is moved ``moves`` times and each
rerun (script run + element tree, i.e. everything the server does before sending the delta) is timed. Live panels
stay off (they are the model-bound part, timed separately by :func:`bench_live`).

``python -m mlmscope.app.bench [SOURCE_RUN]`` or ``mlmscope bench app`` (when mounted). Without a source run that has
results, a ``micro`` run is trained and analysed into a scratch folder first (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import typer

#: Pages timed by the benchmark (the live sentence page is model-bound and timed by :func:`bench_live`).
BENCH_PAGES = ("overview", "syntax", "mask_rank", "outliers", "redundancy", "lens")
#: Issue 9's target for a slider-move rerun.
TARGET_S = 0.300


# --- fixtures: a small analysed run --------------------------------------------------------------------------------


def build_micro_run(run: Path, max_steps: int = 30, linear_every: int = 10, n_docs: int = 300) -> Path:
    """Train a ``micro`` run on the first ``n_docs`` wiki documents and run every analysis on it.

    The default probe set is built from a handful of fixed sentences (spaCy parses, seconds) and stored where the
    runner and the dashboard look for it (``RUN/probes/default``). Used by the dashboard tests and the benchmark.
    """
    from ..analyses.runner import DEFAULT_PROBES, Runner, RunnerConfig
    from ..checkpoints.config import make_config
    from ..checkpoints.corpus import _wiki_texts
    from ..checkpoints.train import train
    from ..probes.model import load_model
    from ..probes.probeset import BuildConfig, build_probe_set

    run = Path(run)
    corpus = run.parent / f".{run.name}-corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in _wiki_texts()[:n_docs]))
    train(
        run,
        make_config("micro", corpus=str(corpus), max_steps=max_steps, linear_every=linear_every),
        progress=False,
        force=True,
    )
    lm = load_model(run / "step_000000")
    ps = build_probe_set(
        PROBE_TEXT, BuildConfig(n=len(PROBE_TEXT), min_words=3), tokenizer=lm.tokenizer, max_length=lm.arch.max_length
    )
    ps.save(run / DEFAULT_PROBES)
    Runner(run, RunnerConfig(batch_size=8)).run()
    return run


def ensure_micro_run(root: Path) -> Path:
    """``root/micro``, built by :func:`build_micro_run` unless a finished one is already there (tests share it)."""
    run = Path(root) / "micro"
    done = run / ".dashboard-fixture-complete"
    if not done.exists():
        build_micro_run(run)
        done.write_text("ok\n")
    return run


#: Probe sentences of the micro fixture (varied syntax, so every SAS relation has a few words).
PROBE_TEXT = [
    "The cat sat on the mat while the dog slept near the warm fire.",
    "Scientists discovered that the river changes its course every few hundred years.",
    "She gave her brother a book about the history of ancient Rome.",
    "The committee approved the new budget after a long and heated debate.",
    "In the morning, the birds sing loudly in the tall trees behind the house.",
    "Many people believe that music can improve memory and concentration.",
    "The old bridge was closed because engineers found cracks in its supports.",
    "He quickly wrote a letter to the mayor, asking for better public transport.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "The museum displays paintings, sculptures and coins from many centuries.",
    "After the storm, volunteers cleaned the streets and repaired the damaged roofs.",
    "Mathematics is the study of numbers, shapes, patterns and their relations.",
    "The city of Paris is the capital of France and lies on the river Seine.",
    "Children learn languages faster than adults, according to several studies.",
    "The company announced that its profits had doubled during the last year.",
]


# --- a synthetic 100-checkpoint store --------------------------------------------------------------------------------


def bench_steps(n: int) -> list[int]:
    """``n`` checkpoint steps: 0, powers of two up to 256, then every 300 (the demo preset's schedule, extended)."""
    steps = [0] + [2**i for i in range(9)]
    while len(steps) < n:
        steps.append(300 * (len(steps) - 9))
    return steps[:n]


def synthesize_store(source: Path, dest: Path, n: int = 100) -> Path:
    """A run folder with ``n`` fake checkpoints whose results are copies of ``source``'s.

    Fake checkpoint i (step ``bench_steps(n)[i]``) gets the hash ``sha256("bench-i")`` and, for every analysis, a
    copy of the result folder of source checkpoint ``i * len(source) // n`` (meta rewritten with the new hash and
    step). The manifest lists the fake checkpoints with the source's losses; there are no weight files, so only the
    pages (not the live panels) can be benchmarked on it.
    """
    import hashlib

    from ..analyses.store import META, ResultKey, ResultStore
    from ..checkpoints.manifest import CheckpointEntry, Manifest, atomic_write_text, step_dirname

    source, dest = Path(source), Path(dest)
    src_store = ResultStore(source)
    src_ck = Manifest.load(source).checkpoints
    by_hash = {c.sha256: c for c in src_ck}
    shutil.rmtree(dest, ignore_errors=True)
    store = ResultStore(dest)
    store.root.mkdir(parents=True)
    steps = bench_steps(n)
    entries = []
    for i, step in enumerate(steps):
        src = src_ck[i * len(src_ck) // n]
        fake = hashlib.sha256(f"bench-{i}".encode()).hexdigest()
        entries.append(
            CheckpointEntry(
                step=step,
                path=step_dirname(step),
                tokens_seen=src.tokens_seen,
                train_loss=src.train_loss,
                val_loss=src.val_loss,
                val_acc=src.val_acc,
                sha256=fake,
            )
        )
        for meta in src_store.entries():
            if meta["ckpt_hash"] != src.sha256 or meta["ckpt_hash"] not in by_hash:
                continue
            key = ResultKey(meta["analysis"], str(meta["version"]), fake, meta["probe_hash"], meta["params_hash"])
            target = store.path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src_store.root / meta["analysis"] / meta["dirname"], target)
            atomic_write_text(
                target / META,
                json.dumps({**meta, "ckpt_hash": fake, "step": step, "dirname": key.dirname}, default=str),
            )
    run_meta = {**Manifest.load(source).run, "status": "finished", "benchmark_of": str(source)}
    Manifest(run=run_meta, checkpoints=entries).save(dest)
    store.index()  # build index.json once, as the runner would have
    return dest


# --- timing ----------------------------------------------------------------------------------------------------------


def _app(run: Path):
    from streamlit.testing.v1 import AppTest

    os.environ["MLMSCOPE_RUNS"] = str(run)
    return AppTest.from_file(str(Path(__file__).with_name("dashboard.py")), default_timeout=600)


def bench_pages(run: Path, moves: int = 10, pages: tuple[str, ...] = BENCH_PAGES) -> dict[str, list[float]]:
    """Seconds of each slider-move rerun, per page (after one warm-up render of the page)."""
    from ..checkpoints.manifest import list_checkpoints

    steps = [c.step for c in list_checkpoints(run)]
    at = _app(run)
    at.run()
    out: dict[str, list[float]] = {}
    for page in pages:
        at.sidebar.radio(key="page").set_value(page).run()
        _check(at, page)
        times = []
        for k in range(moves):
            at.select_slider(key="step").set_value(steps[(len(steps) - 2 - 7 * k) % len(steps)])
            t0 = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - t0)
            _check(at, page)
        out[page] = times
    return out


def bench_live(run: Path, moves: int = 3) -> list[float]:
    """Seconds of a slider-move rerun of the live sentence page (loads each new checkpoint once)."""
    from ..checkpoints.manifest import list_checkpoints

    steps = [c.step for c in list_checkpoints(run)]
    at = _app(run)
    at.run()
    at.sidebar.radio(key="page").set_value("live").run()
    times = []
    for k in range(moves):
        at.select_slider(key="step").set_value(steps[-2 - k])
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
        _check(at, "live")
    return times


def _check(at, page: str) -> None:
    if len(at.exception):
        raise RuntimeError(f"page {page} raised: {at.exception[0].value}")


def report(times: dict[str, list[float]], n: int) -> str:
    lines = [
        f"slider-move rerun, {n}-checkpoint store (server side, streamlit AppTest; target ≤ {TARGET_S * 1e3:.0f} ms)",
        f"{'page':<12} {'median ms':>10} {'max ms':>8}  within target",
    ]
    for page, t in times.items():
        med = statistics.median(t)
        lines.append(f"{page:<12} {med * 1e3:>10.0f} {max(t) * 1e3:>8.0f}  {'yes' if med <= TARGET_S else 'NO'}")
    return "\n".join(lines)


def _has_results(run: Path) -> bool:
    return (run / "manifest.json").exists() and (run / "results").is_dir()


def bench_command(
    source: Path | None = typer.Argument(
        None,
        help="An analysed run to replicate (default: runs/demo if it has results, else a freshly trained micro run).",
    ),
    checkpoints: int = typer.Option(100, help="Checkpoints in the synthetic store."),
    moves: int = typer.Option(10, help="Slider moves timed per page."),
    live: bool = typer.Option(True, help="Also time the live page on the source run (loads checkpoints)."),
    out: Path | None = typer.Option(None, help="Also write the timings as JSON here."),
) -> None:
    """Time a page rerun after a step-slider move on a synthetic results store (target: ≤ 300 ms)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="mlmscope-bench-app-") as tmp:
        src = source if source is not None else Path("runs/demo")
        if not _has_results(src):
            if source is not None:
                raise typer.BadParameter(f"{source} has no manifest.json and results/; run `mlmscope analyze` first")
            print("no analysed runs/demo: training and analysing a micro run first …", flush=True)
            src = build_micro_run(Path(tmp) / "micro")
        store = synthesize_store(src, Path(tmp) / "bench", checkpoints)
        times = bench_pages(store, moves=moves)
        print(report(times, checkpoints))
        result = {"checkpoints": checkpoints, "source": str(src), "pages_s": times}
        if live:
            lt = bench_live(src)
            result["live_s"] = lt
            print(
                f"live sentence page (source run, new checkpoint each move): median "
                f"{statistics.median(lt) * 1e3:.0f} ms, max {max(lt) * 1e3:.0f} ms"
            )
        if out is not None:
            out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    typer.run(bench_command)
