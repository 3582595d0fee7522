"""Tokenize preference rows in parallel with Ray Data, into the one row schema everything after reads.

Row schema (one row per pair): prompt_ids, chosen_ids, rejected_ids: lists of token ids, where
chosen_ids / rejected_ids are the completions only (EOS appended), not yet truncated. A bad row never reaches a
worker: the UDF records what is wrong in an `error` column, and the driver raises a ValueError
naming the first bad row's index and field once the dataset is materialized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import ray

from raydpo.data.formats import TEXT_FIELDS, row_error

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class TokenizedData:
    dataset: "ray.data.Dataset"  # materialized, columns TOKEN_COLUMNS
    num_rows: int


def common_prefix_length(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_row(tokenizer, row: dict) -> dict:
    """TRL 1.16's rule for standard rows: tokenize prompt, prompt+chosen and prompt+rejected as whole
    strings (the tokenizer's default special tokens, so BOS where it adds one), with the EOS string
    appended to each completion; the completion starts where the three token lists diverge, so
    prompt_ids + chosen_ids is exactly the tokenization of prompt + chosen."""
    eos = tokenizer.eos_token or ""
    prompt = row["prompt"]
    chosen, rejected = (text if text.endswith(eos) else text + eos for text in (row["chosen"], row["rejected"]))
    prompt_ids = tokenizer(prompt)["input_ids"]
    prompt_chosen = tokenizer(prompt + chosen)["input_ids"]
    prompt_rejected = tokenizer(prompt + rejected)["input_ids"]
    split = min(common_prefix_length(prompt_ids, prompt_chosen), common_prefix_length(prompt_ids, prompt_rejected))
    return {"prompt_ids": prompt_ids[:split], "chosen_ids": prompt_chosen[split:],
            "rejected_ids": prompt_rejected[split:]}


def truncation_error(tokens: dict, max_length: Optional[int], truncation_mode: str) -> Optional[str]:
    """Truncation itself happens per sequence when batching (see batching.truncate); this names the
    rows it would leave without a completion token, which TRL drops silently and we refuse."""
    for name in ("chosen", "rejected"):
        if not len(tokens[f"{name}_ids"]):
            return f"field {name!r} is empty after tokenization"
    if max_length is not None and truncation_mode == "keep_start" and len(tokens["prompt_ids"]) >= max_length:
        return (f"field 'prompt' has {len(tokens['prompt_ids'])} tokens, which leaves no completion token within "
                f"max_length={max_length} (truncation_mode='keep_start'); raise max_length or shorten the prompt")
    return None


def _tokenize_batch(batch: dict, tokenizer, max_length, truncation_mode) -> dict:
    n = len(next(iter(batch.values())))
    out = {column: [] for column in TOKEN_COLUMNS}
    out["error"] = []
    for i in range(n):
        row = {name: _plain(batch[name][i]) if name in batch else None for name in TEXT_FIELDS}
        error = row_error(row)
        tokens = None
        if error is None:
            tokens = tokenize_row(tokenizer, row)
            error = truncation_error(tokens, max_length, truncation_mode)
        for column in TOKEN_COLUMNS:
            out[column].append(np.asarray(tokens[column] if tokens else [], dtype=np.int32))
        out["error"].append(error or "")
    return {k: (np.array(v, dtype=object) if k != "error" else np.array(v)) for k, v in out.items()}


def _plain(value):
    """numpy scalars -> python, so type checks see what the user wrote."""
    return value.item() if isinstance(value, np.generic) else value


def tokenize_dataset(ds: "ray.data.Dataset", tokenizer, max_length: Optional[int], truncation_mode: str,
                     split_name: str = "train_dataset") -> TokenizedData:
    """Tokenize in parallel (Ray Data map_batches), materialize, and raise on the first bad row."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # row indices stay meaningful
    tokenized = ds.map_batches(
        _tokenize_batch,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "truncation_mode": truncation_mode},
        batch_format="numpy",
        batch_size=256,
    ).materialize()
    errors = tokenized.select_columns(["error"])
    first_bad, num_bad, index = None, 0, 0
    for batch in errors.iter_batches(batch_format="numpy", batch_size=4096):
        for message in batch["error"]:
            if message:
                num_bad += 1
                if first_bad is None:
                    first_bad = (index, message)
            index += 1
    if first_bad is not None:
        raise ValueError(f"{split_name} row {first_bad[0]}: {first_bad[1]} ({num_bad} bad row(s) of {index})")
    if index == 0:
        raise ValueError(f"{split_name} has no rows")
    return TokenizedData(dataset=tokenized.drop_columns(["error"]).materialize(), num_rows=index)
