"""Results store: atomic writes, lookup, index repair, series selection, step mapping, failure records."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from mlmscope.analyses.store import (
    CHECKPOINT_SCOPE,
    INDEX,
    ResultKey,
    ResultStore,
    StoreError,
    load_results,
    stable_hash,
)
from mlmscope.checkpoints.manifest import CheckpointEntry, Manifest


def key(h: str, version: str = "1", probe: str = "p" * 16, params: str = "q" * 64, name: str = "demo") -> ResultKey:
    return ResultKey(name, version, h, probe, params)


def frame(step_value: float, n: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"layer": range(n), "value": [step_value + i for i in range(n)]})


@pytest.fixture
def run(tmp_path):
    """A run whose manifest maps hashes h0, h1, h2 to steps 0, 10, 20 (no weights needed by the store)."""
    m = Manifest(run={"status": "finished"})
    for i, s in enumerate((0, 10, 20)):
        m.add(CheckpointEntry(step=s, path=f"step_{s:06d}", sha256=f"h{i}" * 32))
    m.save(tmp_path)
    return tmp_path


def h(i: int) -> str:
    return f"h{i}" * 32


def test_save_load_roundtrip_with_step_column(run):
    store = ResultStore(run)
    for i in (2, 0, 1):
        store.save(key(h(i)), {"per_layer": frame(100 * i)}, {"step": 999})
    df = load_results(run, "demo")
    assert list(df.columns) == ["step", "layer", "value"]
    assert df["step"].tolist() == [0, 0, 0, 10, 10, 10, 20, 20, 20]  # from the manifest, not the meta's 999
    assert df[df.step == 20]["value"].tolist() == [200, 201, 202]
    assert store.has(key(h(0))) and not store.has(key(h(0), version="2"))


def test_multiple_tables_and_unknown_table(run):
    store = ResultStore(run)
    store.save(key(h(0)), {"a": frame(1, 2), "b": pd.DataFrame({"x": [7.0]})})
    both = load_results(run, "demo")
    assert both.groupby("table").size().to_dict() == {"a": 2, "b": 1}
    assert load_results(run, "demo", table="b")["x"].tolist() == [7.0]
    with pytest.raises(StoreError, match="no table 'c'; stored tables: a, b"):
        load_results(run, "demo", table="c")


def test_nothing_stored_gives_empty_frame_with_step(run):
    df = load_results(run, "nothing")
    assert df.empty and list(df.columns) == ["step"]


def test_failed_save_leaves_nothing_and_tmp_is_ignored(run):
    store = ResultStore(run)

    def crash(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing artefacts

    with pytest.raises(KeyboardInterrupt):
        store.save(key(h(0)), {"per_layer": frame(0)}, write_extra=crash)
    assert not store.has(key(h(0))) and not store.path(key(h(0))).exists()
    assert list((store.root / "demo").iterdir()) == []  # the temporary folder was removed
    # a temporary folder left by kill -9 is invisible to readers and cleaned later
    (store.root / "demo" / ".tmp-abandoned").mkdir()
    (store.root / "demo" / ".tmp-abandoned" / "per_layer.parquet").write_bytes(b"garbage")
    store.save(key(h(1)), {"per_layer": frame(1)})
    assert load_results(run, "demo")["step"].unique().tolist() == [10]
    assert store.clean_tmp(older_than_s=0) == 1


def test_force_replaces_atomically(run):
    store = ResultStore(run)
    first = store.save(key(h(0)), {"per_layer": frame(0)})
    second = store.save(key(h(0)), {"per_layer": frame(5)})
    assert first["result_id"] != second["result_id"]
    assert store.meta(key(h(0)))["result_id"] == second["result_id"]
    assert load_results(run, "demo")["value"].tolist() == [5, 6, 7]
    assert [p.name for p in (store.root / "demo").iterdir()] == [key(h(0)).dirname]


def test_index_is_repaired_from_disk(run):
    store = ResultStore(run)
    for i in range(3):
        store.save(key(h(i)), {"t": frame(i)})
    assert len(store.entries("demo")) == 3 and (store.root / INDEX).exists()
    idx = json.loads((store.root / INDEX).read_text())
    assert set(idx["demo"]) == {key(h(i)).dirname for i in range(3)}
    # a stale index (an entry whose folder vanished, one missing) is repaired on read
    import shutil

    shutil.rmtree(store.path(key(h(1))))
    idx["demo"].pop(key(h(2)).dirname)
    (store.root / INDEX).write_text(json.dumps(idx))
    assert sorted(m["ckpt_hash"] for m in store.entries("demo")) == [h(0), h(2)]
    (store.root / INDEX).write_text("{not json")
    assert len(store.entries("demo")) == 2


def test_latest_series_selected_and_explicit_selection(run):
    store = ResultStore(run)
    store.save(key(h(0), version="1"), {"t": frame(1)})
    store.save(key(h(1), version="1"), {"t": frame(1)})
    store.save(key(h(0), version="2"), {"t": frame(2)})
    df = load_results(run, "demo")  # latest write is version 2: only its series, never mixed with version 1
    assert df["step"].unique().tolist() == [0] and df["value"].tolist() == [2, 3, 4]
    assert load_results(run, "demo", version="1")["step"].unique().tolist() == [0, 10]
    store.save(key(h(0), params="z" * 64), {"t": frame(9)})
    assert load_results(run, "demo", params_hash="qqqq", version="2")["value"].tolist() == [2, 3, 4]


def test_duplicate_and_stale_hashes(run):
    m = Manifest.load(run)
    m.add(CheckpointEntry(step=30, path="step_000030", sha256=h(1)))  # byte-identical to step 10
    m.save(run)
    store = ResultStore(run)
    store.save(key(h(1)), {"t": frame(1)}, {"step": 10})
    store.save(key("old" * 20), {"t": frame(9)}, {"step": 20})  # step 20 was re-trained: content hash changed
    store.save(key("gone" * 16), {"t": frame(4)}, {"step": 40})  # checkpoint deleted since: kept under its step
    df = load_results(run, "demo")
    assert sorted(df["step"].unique()) == [10, 30, 40]


def test_manifest_less_folder_uses_hash_cache(tmp_path):
    (tmp_path / "step_000005").mkdir()
    (tmp_path / "step_000005" / "config.json").write_text("{}")
    (tmp_path / "step_000005" / "model.safetensors").write_bytes(b"abc")
    store = ResultStore(tmp_path)
    calls = []
    digest = store.cached_hash(tmp_path / "step_000005", lambda p: calls.append(p) or "c" * 64)
    assert store.cached_hash(tmp_path / "step_000005", lambda p: calls.append(p) or "d" * 64) == digest
    assert len(calls) == 1  # cached by (size, mtime)
    (tmp_path / "step_000005" / "model.safetensors").write_bytes(b"abcd")
    assert store.cached_hash(tmp_path / "step_000005", lambda p: "e" * 64) == "e" * 64
    store.save(key("e" * 64), {"t": frame(0, 1)}, {"step": 5})
    assert load_results(tmp_path, "demo")["step"].tolist() == [5]


def test_failure_records(run):
    store = ResultStore(run)
    store.record_failure("step_000010", CHECKPOINT_SCOPE, "ValueError: corrupted", "Traceback ...", {"step": 10})
    store.record_failure("step_000010", "sas", "RuntimeError: boom")
    assert {(f["checkpoint"], f["analysis"]) for f in store.failures()} == {
        ("step_000010", CHECKPOINT_SCOPE),
        ("step_000010", "sas"),
    }
    store.clear_failure("step_000010", "sas")
    assert [f["error"] for f in store.failures()] == ["ValueError: corrupted"]


def test_keys_and_hash_stability():
    assert stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 1.5})
    k = key(h(0))
    assert k.dirname.startswith(h(0)[:24]) and "-v1-" in k.dirname
    assert key(h(0), params="r" * 64).dirname != k.dirname


def test_bad_frame_type_is_a_clear_error(run):
    with pytest.raises(TypeError, match="expected a pandas DataFrame"):
        ResultStore(run).save(key(h(0)), {"t": [1, 2, 3]})
    assert not ResultStore(run).has(key(h(0)))
    assert os.listdir(ResultStore(run).root / "demo") == []
