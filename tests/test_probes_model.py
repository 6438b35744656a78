"""load_model: supported architectures, MLM head, RoBERTa, and clear errors for bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mlmscope.probes import ModelLoadError, ProbeError, capture, load_model
from tolerance import assert_close_scaled


def test_mlm_and_headless(micro_model_dir, micro_headless_dir, minilm_dir):
    lm = load_model(micro_model_dir)
    assert lm.has_mlm_head and (lm.n_layers, lm.n_heads, lm.d_model) == (2, 2, 64)
    ids = lm.tokenizer("the cat sat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = lm.arch.encoder_model(ids).last_hidden_state
        assert_close_scaled(lm.arch.apply_mlm_head(hidden), lm.model(ids).logits)
    assert lm.arch.unembedding().shape == (lm.model.config.vocab_size, 64)
    for d in (micro_headless_dir, minilm_dir):
        h = load_model(d)
        assert not h.has_mlm_head and type(h.model).__name__ == "BertModel"
        with pytest.raises(ProbeError, match="no MLM head"):
            h.arch.apply_mlm_head(torch.zeros(1, h.d_model))
        with pytest.raises(ProbeError, match="no MLM head"):
            next(capture(h, [["a", "b"]], names=["mlm_head.hook_out"]))
    mini = load_model(minilm_dir)
    assert (mini.n_layers, mini.n_heads, mini.d_model, mini.arch.max_length) == (6, 12, 384, 512)


def test_roberta(tmp_path, micro_model_dir):
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    RobertaForMaskedLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_model(tmp_path)
    assert lm.arch.family == "roberta" and lm.has_mlm_head and lm.arch.max_length == 40 - tok.pad_token_id - 1
    sents = [["the", "cat", "sat", "on", "the", "mat"], ["dogs", "sleep"]]
    b = next(capture(lm, sents, variants=("mask1",), batch_size=2, sort_by_length=False))
    with torch.no_grad():
        out = lm.model(b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True)
    n = int(b.attention_mask[1].sum())
    assert_close_scaled(b["blocks.1.hook_resid_post"][1, :n], out.hidden_states[2][1, :n])
    r, t = b.head_positions.T
    assert_close_scaled(b["mlm_head.hook_out"], out.logits[r, t])


def test_non_bert_folder_names_what_was_found(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"GPT2LMHeadModel.*model_type='gpt2'"):
        load_model(tmp_path)


def test_missing_and_configless_folders(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid JSON"):
        load_model(tmp_path)


def test_tokenizer_vocab_mismatch(tmp_path, micro_model_dir, minilm_dir):
    d = tmp_path / "mixed"
    shutil.copytree(micro_model_dir, d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
        if (Path(minilm_dir) / f).exists():
            shutil.copy(Path(minilm_dir) / f, d / f)
    with pytest.raises(ModelLoadError, match="tokenizer has 30522 entries but the model's vocabulary has"):
        load_model(d)


def test_headless_config_without_architectures(tmp_path, micro_headless_dir):
    d = tmp_path / "noarch"
    shutil.copytree(micro_headless_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("architectures", None)
    (d / "config.json").write_text(json.dumps(cfg))
    assert not load_model(d).has_mlm_head
