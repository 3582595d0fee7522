"""raydpo.evaluate.greedy_answers, checked against transformers' own generate on the plain prompt text
(no Ray): the answer it reports is the model's greedy continuation, and matches are counted right."""

import pytest
import torch


def test_greedy_answers_are_the_models_greedy_continuations(tiny_model, parity_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.evaluate import greedy_answers

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rows = parity_rows[:6]

    def oracle(prompt):  # greedy decoding of the prompt's text, as a user would call it
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    # half the rows get the model's own greedy answer as their chosen completion, half keep a parity word
    # that the random model does not produce
    expected = [oracle(row["prompt"]) for row in rows]
    rows = [{**row, "chosen": " " + answer} if i % 2 == 0 else row for i, (row, answer) in enumerate(zip(rows, expected))]
    assert all(answer not in ("even", "odd") for answer in expected[1::2]), expected

    result = greedy_answers(model, tokenizer, rows, max_new_tokens=4)
    assert [answer for _, answer in result["answers"]] == expected
    assert [chosen for chosen, _ in result["answers"]][:2] == [expected[0], rows[1]["chosen"].strip()]
    assert result["num_rows"] == 6 and result["matches_chosen"] == 0.5


def test_greedy_answers_refuse_vision_rows_by_row(tiny_model, parity_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.evaluate import greedy_answers
    from raydpo.tasks import colour_pairs

    rows = parity_rows[:2] + colour_pairs(1, conversational=False)
    with pytest.raises(ValueError, match="row 2 has images"):
        greedy_answers(AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model), rows)


def test_preference_scores_keep_no_autograd_graph(tiny_model, parity_rows):
    """Scoring gathers every batch's log-probs: computed without autograd, so no graph of a whole held-out
    set is kept alive while it runs (the model's parameters do require grad)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.data.formats import normalize
    from raydpo.data.tokenize import tokenize_pair
    from raydpo.evaluate import _pair_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert all(p.requires_grad for p in model.parameters())
    tokenized = [tokenize_pair(tokenizer, normalize(row)[1]) for row in parity_rows[:6]]
    chosen, rejected = _pair_logps(model, tokenized, tokenizer.pad_token_id, 32, "keep_start", 4)
    assert chosen.shape == rejected.shape == (6,)
    assert not chosen.requires_grad and not rejected.requires_grad and chosen.grad_fn is None
