import json

import pytest

from raydpo import DPOConfig, DPOTrainer
from raydpo.data import to_ray_dataset, tokenize_dataset
from raydpo.data.tokenize import tokenize_row

ROWS = [{"prompt": "number 1 2 3 is", "chosen": " odd", "rejected": " even"},
        {"prompt": "number 4 5 6 is", "chosen": " even", "rejected": " odd"},
        {"prompt": "number 7 8 9 is", "chosen": " odd", "rejected": " even"}]


def test_tokenize_row_follows_trl(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tokens = tokenize_row(tok, ROWS[0])
    assert tokens["prompt_ids"][0] == tok.bos_token_id  # the tokenizer's own special tokens, as in TRL
    assert tokens["chosen_ids"][-1] == tok.eos_token_id  # EOS closes each completion
    whole = tok(ROWS[0]["prompt"] + ROWS[0]["chosen"] + tok.eos_token)["input_ids"]
    assert tokens["prompt_ids"] + tokens["chosen_ids"] == whole
    assert tokens["prompt_ids"] == tok(ROWS[0]["prompt"])["input_ids"]


def test_every_source_gives_the_same_tokens(ray_session, tiny_model, tmp_path):
    import datasets
    import ray
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    jsonl, array, parquet = tmp_path / "d.jsonl", tmp_path / "d.json", tmp_path / "d.parquet"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    array.write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    sources = [ROWS, str(jsonl), str(array), str(parquet), datasets.Dataset.from_list(ROWS), ray.data.from_items(ROWS)]
    results = []
    for source in sources:
        data = tokenize_dataset(to_ray_dataset(source), tok, max_length=64, truncation_mode="keep_start")
        assert data.num_rows == 3
        results.append([{k: list(v) for k, v in row.items()} for row in data.dataset.take_all()])
    assert all(r == results[0] for r in results[1:])
    assert results[0][1]["prompt_ids"] + results[0][1]["chosen_ids"] == tok("number 4 5 6 is even</s>")["input_ids"]


@pytest.mark.parametrize("bad_row, index, field, why", [
    ({"prompt": "number 1 is", "chosen": " odd"}, 2, "rejected", "missing"),
    ({"prompt": "number 1 is", "chosen": 3, "rejected": " even"}, 1, "chosen", "must be a string"),
])
def test_bad_row_is_named_before_training(ray_session, tiny_model, bad_row, index, field, why):
    rows = [dict(r) for r in ROWS]
    rows.insert(index, bad_row)
    with pytest.raises(ValueError, match=rf"row {index}: field '{field}' .*{why}"):
        DPOTrainer(tiny_model, args=DPOConfig(output_dir="unused"), train_dataset=rows)


def test_prompt_longer_than_max_length_is_refused(ray_session, tiny_model):
    with pytest.raises(ValueError, match=r"row 0: field 'prompt' has \d+ tokens.*max_length=4"):
        DPOTrainer(tiny_model, args=DPOConfig(max_length=4), train_dataset=ROWS)
