from transformers import AutoModelForMaskedLM, AutoTokenizer


def test_micro_fixture_loads(micro_model_dir):
    tok = AutoTokenizer.from_pretrained(micro_model_dir)
    model = AutoModelForMaskedLM.from_pretrained(micro_model_dir)
    enc = tok("The cat sat on the mat.", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.cls_token_id
    assert model(**enc).logits.shape[-1] == len(tok)
