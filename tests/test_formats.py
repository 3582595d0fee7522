"""Every preference format through Ray Data: detection, TRL's tokenization, bad rows, real files, cache.

The tokenizer here is a small byte-level BPE trained in the session, with a ChatML chat template that
renders tools and tool calls (EOS is <|im_end|>, as in Qwen).
"""

import gzip
import json
import os
import warnings

import pytest

from conftest import SHARED_DATA
from raydpo import DPOConfig
from raydpo.data.formats import extract_prompt, normalize
from raydpo.data.sources import to_ray_dataset
from raydpo.models import CHATML_TEMPLATE as CHATML
from raydpo.data.tokenize import prepare_dataset, summarize_dataset, tokenize_dataset, tokenize_pair

SKY = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]
# The same pair in every layout raydpo reads.
LAYOUTS = {
    "trl:standard:explicit": {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    "trl:standard:implicit": {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    "trl:conversational:explicit": {"prompt": SKY, "chosen": BLUE, "rejected": GREEN},
    "trl:conversational:implicit": {"chosen": SKY + BLUE, "rejected": SKY + GREEN},
    "openai:conversational:explicit": {"input": {"messages": SKY}, "preferred_output": BLUE,
                                       "non_preferred_output": GREEN},
    "sharegpt:conversational:explicit": {"conversations": [{"from": "human", "value": "What color is the sky?"}],
                                         "chosen": {"from": "gpt", "value": "It is blue."},
                                         "rejected": {"from": "gpt", "value": "It is green."}},
    "llamafactory:conversational:implicit": {
        "chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "What color is the sky?"}]},
                            {"role": "assistant", "content": [{"type": "text", "value": "It is blue."}],
                             "loss_weight": 1.0}],
        "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "What color is the sky?"}]},
                              {"role": "assistant", "content": [{"type": "text", "value": "It is green."}],
                               "loss_weight": 1.0}]},
}


def args(**overrides):
    return DPOConfig(**{"output_dir": "unused", "max_length": 256, **overrides})


@pytest.fixture(scope="session")
def chat_tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.dumps(row) for row in LAYOUTS.values()] * 20 + [
        "The quick brown fox jumps over the lazy dog. What is the stock price of Goldman Sachs today?",
        "Human: Assistant: system user assistant tool function arguments symbol period name"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<pad>", "<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", chat_template=CHATML)


def rows_of(data):
    return [{k: list(v) for k, v in row.items()} for row in data.dataset.take_all()]


# --- detection and normalisation (no Ray) ----------------------------------------------------------

def test_extract_prompt_follows_trl():
    assert extract_prompt("Q: hi A: yes", "Q: hi A: no") == ("Q: hi A:", " yes", " no")  # the space moves right
    assert extract_prompt(SKY + BLUE, SKY + GREEN) == (SKY, BLUE, GREEN)
    assert extract_prompt("abc", "abcd") == ("ab", "c", "cd")  # TRL's quirk when one is a prefix of the other


@pytest.mark.parametrize("code", LAYOUTS)
def test_every_layout_normalises_to_one_shape(code):
    detected, pair = normalize(LAYOUTS[code])
    assert detected == code
    if pair.conversational:
        assert (pair.prompt, pair.chosen, pair.rejected) == (SKY, BLUE, GREEN)
    else:
        assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", " blue.", " green.")


def test_sharegpt_roles_system_and_tools():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                             {"from": "human", "value": "and?"}],
           "system": "Be brief.", "tools": '[{"type": "function", "function": {"name": "f"}}]',
           "chosen": {"from": "gpt", "value": "yes"}, "rejected": {"from": "gpt", "value": "no"}}
    _, pair = normalize(row)
    assert [m["role"] for m in pair.prompt] == ["system", "user", "assistant", "user"]
    assert pair.tools == [{"type": "function", "function": {"name": "f"}}]


def test_conversational_tokens_are_the_chat_template(chat_tok):
    """TRL 1.16: the prompt rendered with the generation prompt, prompt+completion without it, no EOS added."""
    _, pair = normalize(LAYOUTS["trl:conversational:explicit"])
    tokens = tokenize_pair(chat_tok, pair)
    whole = chat_tok.apply_chat_template(SKY + BLUE, tokenize=True, return_dict=True)["input_ids"]
    assert tokens["prompt_ids"] + tokens["chosen_ids"] == list(whole)
    prompt = chat_tok.apply_chat_template(SKY, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert tokens["prompt_ids"] == list(prompt["input_ids"])
    assert chat_tok.decode(tokens["chosen_ids"]) == "It is blue.<|im_end|>\n"  # the template closes the turn
    assert not tokens["prompt_cut"]


# TRL's own _prepare_dataset (run where trl is importable, e.g. PYTHONPATH=/tmp/trl_src) on each of its formats.
TRL_ROWS = {
    "standard explicit": [LAYOUTS["trl:standard:explicit"], {"prompt": "Q: 1+1", "chosen": " 2", "rejected": " 3"}],
    "standard implicit": [LAYOUTS["trl:standard:implicit"], {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}],
    "conversational explicit": [LAYOUTS["trl:conversational:explicit"]],
    "conversational implicit": [LAYOUTS["trl:conversational:implicit"]],
    "tools": [{"prompt": SKY, "chosen": [{"role": "assistant", "content": "",
                                          "tool_calls": [{"type": "function",
                                                          "function": {"name": "look", "arguments": "{}"}}]}],
               "rejected": GREEN, "tools": json.dumps([{"type": "function", "function": {"name": "look"}}])}],
}


@pytest.mark.parametrize("name", TRL_ROWS)
def test_tokens_match_trl(chat_tok, name):
    pytest.importorskip("trl")
    import datasets
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer as TRLTrainer

    rows = TRL_ROWS[name]
    trl_args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    expected = TRLTrainer._prepare_dataset(SimpleNamespace(_tokenizer=chat_tok), datasets.Dataset.from_list(rows),
                                           chat_tok, trl_args, "train")
    for row, trl_row in zip(rows, expected):
        ours = tokenize_pair(chat_tok, normalize(row)[1])
        assert {k: ours[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} == \
               {k: trl_row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


# --- through Ray Data ------------------------------------------------------------------------------

def test_every_layout_through_ray(ray_session, chat_tok):
    """Each layout's dataset tokenizes in Ray Data to exactly the tokens of its normalised pair."""
    for code, row in LAYOUTS.items():
        data = prepare_dataset([row, row], chat_tok, args())
        assert data.num_rows == 2
        expected = tokenize_pair(chat_tok, normalize(row)[1])
        assert rows_of(data)[1] == {k: expected[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}, code
        assert data.summary.format.endswith(("explicit prompt", "implicit prompt", "explicit prompt)",
                                             "implicit prompt)"))


BAD = {
    "missing column": ([{"prompt": "a", "chosen": " b"}], r"row 1: field 'rejected' is missing"),
    "number for text": ([{"prompt": "a", "chosen": 3, "rejected": " c"}], r"row 1: field 'chosen' must be a string"),
    "text for messages": ([{"prompt": SKY, "chosen": "It is blue.", "rejected": GREEN}],
                          r"row 1: field 'chosen' must be a list of messages, got str"),
    "empty chosen": ([{"prompt": "a", "chosen": "", "rejected": " c"}], r"row 1: field 'chosen' is empty"),
    "empty rejected messages": ([{"prompt": SKY, "chosen": BLUE, "rejected": []}],
                                r"row 1: field 'rejected' is empty"),
    "no assistant message": ([{"prompt": SKY, "chosen": [{"role": "user", "content": "x"}], "rejected": GREEN}],
                             r"row 1: field 'chosen' has no assistant message \(roles: user\)"),
    "implicit without shared prompt": ([{"chosen": "Yes it is.", "rejected": "No."}],
                                       r"row 1: field 'prompt' is missing .* share no prompt"),
    "mixed formats": ([LAYOUTS["trl:conversational:explicit"]],
                      r"row 1: field 'chosen' is a list of messages here but text in the rest of the dataset"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_row_names_row_and_field(ray_session, chat_tok, case):
    extra, message = BAD[case]
    good = LAYOUTS["trl:standard:explicit"]
    with pytest.raises(ValueError, match=message):
        prepare_dataset([good] + extra + [good, good], chat_tok, args())


def test_malformed_json_line_names_file_and_line(ray_session, chat_tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(LAYOUTS["trl:standard:explicit"])
    path.write_text(f"{good}\n\n{good}\n{good[:-5]}\n{good}\n")  # line 2 is blank, line 4 is cut short
    with pytest.raises(ValueError, match=rf"row 2 \({path} line 4\): malformed JSON: .*\(1 bad row\(s\) of 4"):
        prepare_dataset(str(path), chat_tok, args())
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 rows \(bad row: 1\)"):
        data = prepare_dataset(str(path), chat_tok, args(skip_bad_rows=True))
    assert data.num_rows == 3 and data.summary.skipped == {"bad row": 1}


def test_skip_bad_rows_counts_and_keeps_the_rest(ray_session, chat_tok):
    good, long_prompt = LAYOUTS["trl:standard:explicit"], {"prompt": "The sky is " * 40, "chosen": " a",
                                                           "rejected": " b"}
    rows = [good, {"prompt": "a"}, good, long_prompt, {"chosen": "x", "rejected": "y"}, good]
    with pytest.raises(ValueError, match=r"row 3: field 'prompt' has \d+ tokens.*max_length=32"):
        prepare_dataset([good, good, good, long_prompt], chat_tok, args(max_length=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = prepare_dataset(rows, chat_tok, args(max_length=32, skip_bad_rows=True))
    assert data.num_rows == 3
    assert data.summary.skipped == {"bad row": 2, "prompt fills max_length": 1}
    assert any("skipped 3 of 6 rows" in str(w.message) and "row 1: field 'chosen' is missing" in str(w.message)
               for w in caught)
    assert all(row == rows_of(data)[0] for row in rows_of(data))


def test_mixed_formats_are_never_skipped(ray_session, chat_tok):
    rows = [LAYOUTS["trl:standard:explicit"]] * 3 + [LAYOUTS["openai:conversational:explicit"]]
    with pytest.raises(ValueError, match=r"row 3: this row is in the OpenAI preference layout .* 3 row\(s\) are "
                                         r"standard, explicit prompt"):
        prepare_dataset(rows, chat_tok, args(skip_bad_rows=True))


def test_errors_that_are_not_row_data(ray_session, chat_tok):
    """A map_fn raising, and a tokenizer without a chat template, name the row instead of crashing a task."""
    row = LAYOUTS["trl:conversational:explicit"]
    with pytest.raises(ValueError, match=r"row 0: map_fn failed: KeyError: 'question'"):
        prepare_dataset([row], chat_tok, args(), map_fn=lambda r: {"prompt": r["question"]})
    plain = chat_tok.__class__(tokenizer_object=chat_tok.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match=r"row 0: conversational rows need a chat template"):
        prepare_dataset([row, row], plain, args(skip_bad_rows=True))


# --- sources ---------------------------------------------------------------------------------------

def test_gzip_folders_parquet_and_dataset_dicts(ray_session, chat_tok, tmp_path):
    import datasets

    rows = [{"prompt": f"Q{i}: the sky is", "chosen": " blue.", "rejected": " green."} for i in range(6)]
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    datasets.Dataset.from_list(rows[2:4]).to_parquet(str(folder / "b.parquet"))
    with gzip.open(folder / "sub" / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[4:]))
    (folder / "README.md").write_text("not data")
    expected = rows_of(prepare_dataset(rows, chat_tok, args()))
    assert rows_of(prepare_dataset(str(folder), chat_tok, args())) == expected  # files in sorted order

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                                   "test": datasets.Dataset.from_list(rows)})
    assert rows_of(prepare_dataset(splits, chat_tok, args(), split="test")) == expected
    splits.save_to_disk(str(tmp_path / "saved"))
    assert prepare_dataset(str(tmp_path / "saved"), chat_tok, args()).num_rows == 1  # "train" by default
    with pytest.raises(ValueError, match=r"DatasetDict without a 'dev' split"):
        prepare_dataset(splits, chat_tok, args(), split="dev")


# --- real files in ../shared/data --------------------------------------------------------------------

REAL = {
    "anthropics_hh-rlhf/harmless-base/test.jsonl.gz": (2312, "standard, implicit prompt", None),
    "LLaMA-Factory/data/dpo_en_demo.json": (300, "ShareGPT (conversational, explicit prompt)", None),
    "LLaMA-Factory/data/v1_dpo_demo.jsonl": (10, "LLaMA-Factory messages (conversational, implicit prompt)", None),
    "microsoft-foundry_fine-tuning/validation.jsonl": (284, "OpenAI preference (conversational, explicit prompt)",
                                                       None),
    "torchtune/tests/assets/stack_exchange_paired_tiny.json": (25, "standard, explicit prompt", "rename"),
}


@pytest.mark.parametrize("name", REAL)
def test_every_shared_preference_file_loads(ray_session, chat_tok, name):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not here")
    rows, label, map_fn = REAL[name]
    if map_fn == "rename":  # docs/data-formats.md's preprocessing function (defined here: Ray pickles it by value)
        def map_fn(row):
            return {"prompt": row["question"], "chosen": row["response_j"], "rejected": row["response_k"]}
    summary = summarize_dataset(path, chat_tok, max_length=None, map_fn=map_fn)
    assert (summary.rows, summary.format, summary.skipped) == (rows, label, {})
    assert summary.lengths["chosen"]["min"] > 0 and summary.lengths["prompt"]["min"] > 0


def test_tool_calling_preferences_from_sft_files(ray_session, chat_tok):
    """The two tool-calling SFT files, turned into preference rows by corrupting the tool call."""
    stock = os.path.join(SHARED_DATA, "microsoft-foundry_fine-tuning/stock_toolcall_validation.jsonl")
    reason = os.path.join(SHARED_DATA, "LLaMA-Factory/data/reason_tool_use_demo_50.jsonl")
    if not (os.path.exists(stock) and os.path.exists(reason)):
        pytest.skip("shared tool-calling files are not here")

    def openai_pair(row):  # prompt = all but the last assistant turn; rejected calls with wrong arguments
        answer = row["messages"][-1]
        wrong = ({**answer, "tool_calls": [{**c, "function": {**c["function"], "arguments": '{"symbol": "WRONG"}'}}
                                           for c in answer["tool_calls"]]} if "tool_calls" in answer
                 else {**answer, "content": "WRONG: I cannot look that up."})
        return {"prompt": row["messages"][:-1], "chosen": [answer], "rejected": [wrong], "tools": row["tools"]}

    data = prepare_dataset(stock, chat_tok, args(max_length=None), map_fn=openai_pair)
    assert data.num_rows == 10 and data.summary.format == "conversational, explicit prompt"
    first = json.loads(open(stock).readline())
    tokens = rows_of(data)[0]
    assert "Tools: " in chat_tok.decode(tokens["prompt_ids"])  # the tools column reached the template
    assert first["tools"][0]["function"]["name"] in chat_tok.decode(tokens["prompt_ids"])
    assert "<tool_call>" in chat_tok.decode(tokens["chosen_ids"]) and "WRONG" in chat_tok.decode(tokens["rejected_ids"])

    def corrupt_tool_calls(row):  # LLaMA-Factory typed parts; rejected calls a tool that does not exist
        def wrong(message):
            parts = [{**p, "value": p["value"].replace('"name": "', '"name": "no_such_')} if p["type"] == "tool_call"
                     else p for p in message["content"]]
            return {**message, "content": parts}
        return {"chosen_messages": row["messages"], "tools": row["tools"],
                "rejected_messages": row["messages"][:2] + [wrong(m) for m in row["messages"][2:]]}

    rows = [json.loads(line) for line in open(reason)]
    with_calls = [r for r in rows if any(p["type"] == "tool_call" for m in r["messages"] for p in m["content"])]
    summary = summarize_dataset(with_calls, chat_tok, max_length=None, map_fn=corrupt_tool_calls)
    assert summary.rows == len(with_calls) and summary.skipped == {}
    _, pair = normalize(corrupt_tool_calls(with_calls[0]))
    assert pair.chosen[0]["tool_calls"][0]["function"]["name"] != pair.rejected[0]["tool_calls"][0]["function"]["name"]
    assert "reasoning_content" in pair.chosen[0] and pair.tools


# --- cache and summary -----------------------------------------------------------------------------

def test_cache_tokenizes_once_per_source_and_tokenizer(ray_session, chat_tok, tmp_path, monkeypatch):
    import raydpo.data.tokenize as tokenize_module

    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q{i}: the sky is", "chosen": " blue.", "rejected": " green."} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cached = args(dataset_cache_dir=str(tmp_path / "cache"))
    first = prepare_dataset(str(path), chat_tok, cached)
    calls = []
    real = tokenize_module.tokenize_raw
    monkeypatch.setattr(tokenize_module, "tokenize_raw", lambda *a: calls.append(1) or real(*a))
    again = prepare_dataset(str(path), chat_tok, args(dataset_cache_dir=cached.dataset_cache_dir, max_length=8,
                                                      skip_bad_rows=True))
    assert calls == [] and rows_of(again) == rows_of(first)  # other max_length / skip settings: same entry
    assert prepare_dataset(to_ray_dataset(str(path)), chat_tok, cached).num_rows == 5 and calls == []

    other = chat_tok.__class__(tokenizer_object=chat_tok.backend_tokenizer, eos_token="<|im_end|>",
                               chat_template=CHATML + "{# another template #}")
    prepare_dataset(str(path), other, cached)
    assert calls == [1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert prepare_dataset(str(path), chat_tok, cached).num_rows == 3 and calls == [1, 1]


def test_summary(ray_session, chat_tok):
    good = LAYOUTS["trl:standard:explicit"]
    too_long, bad = {"prompt": "x " * 40, "chosen": " a", "rejected": " b"}, {"prompt": "a"}
    long_answer = {"prompt": "Q:", "chosen": " long answer" * 10, "rejected": " b"}
    summary = summarize_dataset([good, good, too_long, bad, long_answer], chat_tok, max_length=24)
    assert (summary.rows, summary.format, summary.truncated) == (3, "standard, explicit prompt", 1)
    assert summary.skipped == {"bad row": 1, "prompt fills max_length": 1}
    assert summary.first_skipped.startswith("dataset row 2: field 'prompt' has")
    assert summary.lengths["sequence"]["max"] > 24 and summary.lengths["chosen"]["min"] >= 2
    text = str(summary)
    assert "rows: 3" in text and "bad row: 1" in text and "truncated: 1 pair(s)" in text and "sequence" in text
    nothing = summarize_dataset([bad, bad], chat_tok)  # a summary, not an error, when no row is usable
    assert (nothing.rows, nothing.skipped) == (0, {"bad row": 2})


def test_tokenize_dataset_entry_point_is_unchanged(ray_session, chat_tok):
    rows = [LAYOUTS["trl:standard:explicit"]] * 2
    data = tokenize_dataset(to_ray_dataset(rows), chat_tok, 64, "keep_start")
    assert data.num_rows == 2 and set(rows_of(data)[0]) == {"prompt_ids", "chosen_ids", "rejected_ids"}


def test_sharegpt_rows_train_end_to_end(ray_session, tiny_model, tmp_path):
    """Through the public API: ShareGPT rows, the tokenizer's chat template, one DPO step on one worker."""
    import math

    from transformers import AutoTokenizer

    from raydpo import DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}is {% endif %}"
                         "{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}is {% endif %}")
    rows = [{"conversations": [{"from": "human", "value": f"number {i} {i + 1} {i + 2}"}],
             "chosen": {"from": "gpt", "value": "odd"}, "rejected": {"from": "gpt", "value": "even"}}
            for i in range(8)]
    trainer = DPOTrainer(tiny_model, args=DPOConfig(output_dir=str(tmp_path), num_workers=0, max_steps=1,
                                                    logging_steps=1, per_device_train_batch_size=4, max_length=32),
                         train_dataset=rows, processing_class=tok)
    summary = trainer.train_data.summary
    assert summary.format == "ShareGPT (conversational, explicit prompt)" and summary.prompt_cut == 0
    out = trainer.train()
    assert math.isfinite(out.metrics["loss"]) and out.metrics["global_step"] == 1
