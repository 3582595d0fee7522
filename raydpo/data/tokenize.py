"""Tokenize preference rows in parallel with Ray Data, into the one row schema everything after reads.

Row schema (one row per pair): prompt_ids, chosen_ids, rejected_ids: lists of token ids, where
chosen_ids / rejected_ids are the completions only, not yet truncated (batching truncates). Each
Ray Data task normalises its rows (formats.normalize) and tokenizes them the way TRL 1.16 does. A
bad row never reaches a worker: the task records why in a status column, and the driver, once the
dataset is materialized, raises a ValueError naming the first bad row (index, file and line, field)
or, with skip_bad_rows, drops the bad rows with a warning that counts them.
"""

from __future__ import annotations

import collections
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import ray

from raydpo.data import cache
from raydpo.data.formats import RowError, format_difference, format_label, normalize
from raydpo.data.images import TOKEN_TYPE_KEYS, decode_images, is_processor, multimodal_messages, text_tokenizer
from raydpo.data.sources import raw_rows, to_ray_dataset

logger = logging.getLogger(__name__)

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
STAT_COLUMNS = ("_status", "_error", "_format", "_where", "_prompt_cut", "_prompt_len", "_chosen_len", "_rejected_len",
                "_images")
_IDS = pa.list_(pa.int32())
TOKENIZED_SCHEMA = pa.schema([(c, _IDS) for c in TOKEN_COLUMNS] + [
    ("_status", pa.string()),      # "" (a good row), "bad" (skippable) or "fatal" (never skipped)
    ("_error", pa.string()), ("_format", pa.string()), ("_where", pa.string()),
    ("_prompt_cut", pa.bool_()),   # the tokenized prompt was not a prefix of prompt+completion
    ("_prompt_len", pa.int32()), ("_chosen_len", pa.int32()), ("_rejected_len", pa.int32()),
    # Reference log-probs a row already carries (null when it has none): training uses them as they are.
    ("ref_chosen_logps", pa.float64()), ("ref_rejected_logps", pa.float64()),
    ("images", pa.list_(pa.binary())), ("_images", pa.int32()),  # a vision row's encoded images, and how many
    # a vision prompt's per-token types from the processor (e.g. Qwen2.5-VL's mm_token_type_ids), and that name
    ("prompt_token_types", _IDS), ("token_types_key", pa.string())])
VISION_COLUMNS = ("images", "prompt_token_types", "token_types_key")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class DataSummary:
    """What `raydpo` reports about a dataset: rows kept, format, token lengths, truncated and skipped."""

    rows: int
    format: str
    max_length: Optional[int]
    truncation_mode: str
    truncated: int  # pairs with a sequence longer than max_length (cut when batching)
    skipped: dict = field(default_factory=dict)  # reason -> rows
    first_skipped: str = ""  # the first skipped row and why
    prompt_cut: int = 0  # rows whose tokenized prompt was not a prefix of prompt+completion
    lengths: dict = field(default_factory=dict)  # "prompt"/"chosen"/"rejected"/"sequence" -> stats

    def __str__(self) -> str:
        lines = [f"rows: {self.rows}", f"format: {self.format}",
                 f"skipped: {sum(self.skipped.values())}"
                 + "".join(f"\n  {reason}: {count}" for reason, count in self.skipped.items())
                 + (f"\n  first: {self.first_skipped}" if self.first_skipped else ""),
                 f"truncated: {self.truncated} pair(s) longer than max_length={self.max_length} "
                 f"({self.truncation_mode})"]
        if self.prompt_cut:
            lines.append(f"prompt not a token prefix of prompt+completion: {self.prompt_cut} row(s)")
        lines.append(f"{'tokens':<10}" + "".join(f"{k:>8}" for k in ("min", "p50", "p90", "p99", "max", "mean")))
        for name, stats in self.lengths.items():
            lines.append(f"{name:<10}" + "".join(f"{stats[k]:>8.0f}" for k in ("min", "p50", "p90", "p99", "max"))
                         + f"{stats['mean']:>8.1f}")
        return "\n".join(lines)


@dataclass
class TokenizedData:
    dataset: "ray.data.Dataset"  # materialized, columns TOKEN_COLUMNS (+ REF_COLUMNS when rows carry them)
    num_rows: int
    summary: Optional[DataSummary] = None
    vision: bool = False  # rows carry images (an "images" column of encoded bytes)


def common_prefix_length(a, b) -> int:
    """Leading elements (token ids, or characters) a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split(prompt_ids: list, prompt_chosen: list, prompt_rejected: list) -> dict:
    """TRL's split: the completion starts where the three token lists diverge, so prompt_ids +
    chosen_ids is exactly the tokenization of prompt + chosen."""
    split = min(common_prefix_length(prompt_ids, prompt_chosen), common_prefix_length(prompt_ids, prompt_rejected))
    return {"prompt_ids": prompt_ids[:split], "chosen_ids": prompt_chosen[split:],
            "rejected_ids": prompt_rejected[split:], "prompt_cut": split < len(prompt_ids)}


def tokenize_row(tokenizer, row: dict) -> dict:
    """TRL 1.16's rule for standard rows: tokenize prompt, prompt+chosen and prompt+rejected as whole
    strings (the tokenizer's default special tokens, so BOS where it adds one), with the EOS string
    appended to each completion."""
    tokens = _tokenize_text(tokenizer, row["prompt"], row["chosen"], row["rejected"])
    return {name: tokens[name] for name in TOKEN_COLUMNS}


def _tokenize_text(tokenizer, prompt: str, chosen: str, rejected: str) -> dict:
    return _tokenize_texts(tokenizer, [(prompt, chosen, rejected)])[0]


def _tokenize_texts(tokenizer, pairs: list) -> list:
    """_tokenize_text of many (prompt, chosen, rejected) text pairs: three tokenizer calls in all, not
    three per pair (a fast tokenizer encodes a list in one call; the same ids, ~20% less time)."""
    eos = tokenizer.eos_token or ""
    prompts, chosen, rejected = [], [], []
    for prompt, *completions in pairs:
        c, r = (text if text.endswith(eos) else text + eos for text in completions)
        prompts.append(prompt)
        chosen.append(prompt + c)
        rejected.append(prompt + r)
    ids = [tokenizer(texts)["input_ids"] for texts in (prompts, chosen, rejected)] if pairs else [[], [], []]
    return [_split(*row) for row in zip(*ids)]


def tokenize_pair(tokenizer, pair) -> dict:
    """A normalised Pair -> prompt_ids / chosen_ids / rejected_ids (+ prompt_cut), as TRL 1.16 does.

    Conversational: the chat template renders the prompt with the generation prompt, and prompt +
    chosen / prompt + rejected without it; nothing is appended (the template closes the assistant
    turn). `tools` and `chat_template_kwargs` go to the template."""
    if pair.images:
        return _tokenize_vision(tokenizer, pair)
    if not pair.conversational:
        return _tokenize_text(text_tokenizer(tokenizer), pair.prompt, pair.chosen, pair.rejected)
    if not getattr(tokenizer, "chat_template", None):
        raise RowError("conversational rows need a chat template, and the tokenizer has none: set "
                       "tokenizer.chat_template (or pass processing_class= a tokenizer with one)", fatal=True)
    kwargs = {"tools": pair.tools, **(pair.chat_template_kwargs or {})}

    def render(messages, **extra):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs,
                                                  **extra)["input_ids"])

    return _split(render(pair.prompt, add_generation_prompt=True), render(pair.prompt + pair.chosen),
                  render(pair.prompt + pair.rejected))


def _tokenize_vision(processor, pair) -> dict:
    """TRL 1.16's vision collator, done once per row: the prompt goes through the processor with the
    row's images (so image placeholders expand to the model's image tokens), the completions through
    the tokenizer alone, without special tokens and without an EOS appended. Conversational rows are
    rendered to text by the processor's chat template first, images placed before the first user text;
    the prompt is the characters the three renderings share."""
    if not is_processor(processor):
        raise RowError("rows with images need a processor (tokenizer and image processor): pass "
                       "processing_class=AutoProcessor.from_pretrained(model)", fatal=True)
    prompt, chosen, rejected = pair.prompt, pair.chosen, pair.rejected
    if pair.conversational:
        kwargs = {"tools": pair.tools, **(pair.chat_template_kwargs or {}), "tokenize": False}
        messages = multimodal_messages(prompt, len(pair.images))
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        full = [processor.apply_chat_template(messages + multimodal_messages(side, 0), **kwargs)
                for side in (chosen, rejected)]
        prompt = prompt[:min(common_prefix_length(prompt, text) for text in full)]
        chosen, rejected = (text[len(prompt):] for text in full)
    image_token = getattr(processor, "image_token", None)
    if image_token and prompt.count(image_token) != len(pair.images):
        raise RowError(f"field 'prompt' holds {prompt.count(image_token)} image placeholder(s) ({image_token!r}) for "
                       f"{len(pair.images)} image(s); a standard row's prompt places each image with that token")
    encoded = processor(images=decode_images(pair.images), text=[prompt], add_special_tokens=False)
    tokenizer = text_tokenizer(processor)
    # Models that place image tokens by a per-token type (Qwen2.5-VL's mm_token_type_ids, Gemma 3's
    # token_type_ids) get the prompt's types from the processor; completion tokens are text (0).
    key = next((name for name in TOKEN_TYPE_KEYS if name in encoded), "")
    return {"prompt_ids": list(encoded["input_ids"][0]), "prompt_cut": False,
            "chosen_ids": tokenizer(chosen, add_special_tokens=False)["input_ids"],
            "rejected_ids": tokenizer(rejected, add_special_tokens=False)["input_ids"],
            "prompt_token_types": [int(t) for t in encoded[key][0]] if key else [], "token_types_key": key}


_TOKENIZERS: "collections.OrderedDict[str, object]" = collections.OrderedDict()  # this process's, by object id
_KEPT_TOKENIZERS = 2


def _tokenizer(ref: "ray.ObjectRef"):
    """The tokenizer behind `ref`, deserialized once per Ray worker process rather than once per task.

    Unpickling a fast tokenizer rebuilds it from its JSON (0.13 s for SmolLM2's), about a quarter of a
    256-row task's CPU time; Ray Data runs a dataset's tasks in a few reused worker processes."""
    key = ref.hex()
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = ray.get(ref)
        while len(_TOKENIZERS) > _KEPT_TOKENIZERS:  # a long-lived worker serves many datasets
            _TOKENIZERS.popitem(last=False)
    return _TOKENIZERS[key]


def _tokenize_block(table: pa.Table, tokenizer) -> pa.Table:
    if isinstance(tokenizer, ray.ObjectRef):
        tokenizer = _tokenizer(tokenizer)
    rows, text_pairs = [], {}  # text pairs (no chat template, no image) are tokenized together, below
    for raw, where, error, fatal in raw_rows(table):
        code, tokens, refs, images = "", None, (None, None), []
        if error is None:
            try:
                code, pair = normalize(raw)
                images = pair.images or []
                refs = _ref_values(raw)
                if pair.images or pair.conversational:
                    tokens = tokenize_pair(tokenizer, pair)
                else:
                    text_pairs[len(rows)] = (pair.prompt, pair.chosen, pair.rejected)
            except RowError as e:
                error, fatal = str(e), e.fatal
            except Exception as e:  # e.g. a chat template raising on this row: name the row, don't crash the task
                error = f"tokenization failed: {type(e).__name__}: {e}"
        rows.append([where, error, fatal, code, tokens, refs, images])
    text = text_tokenizer(tokenizer)
    try:
        tokenized = _tokenize_texts(text, list(text_pairs.values()))
    except Exception:  # one pair at a time, to name the row that fails
        tokenized = []
        for index, pair in text_pairs.items():
            try:
                tokenized.append(_tokenize_text(text, *pair))
            except Exception as e:
                rows[index][1] = f"tokenization failed: {type(e).__name__}: {e}"
                tokenized.append(None)
    for index, tokens in zip(text_pairs, tokenized):
        rows[index][4] = tokens
    return _tokenized_table(rows)


def _tokenized_table(rows: list) -> pa.Table:
    """A block of TOKENIZED_SCHEMA from [where, error, fatal, format, tokens, refs, images] per row."""
    out = {name: [] for name in TOKENIZED_SCHEMA.names}
    for where, error, fatal, code, tokens, refs, images in rows:
        tokens = tokens or {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt_cut": False}
        for name in TOKEN_COLUMNS:
            out[name].append(tokens[name])
            out[f"_{name[:-4]}_len"].append(len(tokens[name]))
        out["_status"].append("" if error is None else "fatal" if fatal else "bad")
        out["_error"].append(error or "")
        out["_format"].append(code)
        out["_where"].append(where)
        out["_prompt_cut"].append(tokens["prompt_cut"])
        for name, value in zip(REF_COLUMNS, refs if error is None else (None, None)):
            out[name].append(value)
        images = images if error is None else []
        out["images"].append(images)
        out["_images"].append(len(images))
        out["prompt_token_types"].append(tokens.get("prompt_token_types", []))
        out["token_types_key"].append(tokens.get("token_types_key", ""))
    return pa.table(out, schema=TOKENIZED_SCHEMA)


def _ref_values(raw: dict) -> tuple:
    """The row's own ref_chosen_logps / ref_rejected_logps (both, or neither is used)."""
    values = []
    for name in REF_COLUMNS:
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RowError(f"field {name!r} must be a number (a summed reference log-prob), "
                           f"got {type(value).__name__}")
        values.append(None if value is None else float(value))
    return tuple(values) if None not in values else (None, None)


def tokenize_raw(ds: "ray.data.Dataset", tokenizer) -> "ray.data.Dataset":
    """Ray Data map_batches over raw rows -> materialized TOKENIZED_SCHEMA rows (bad rows included)."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # row indices stay meaningful
    # The tokenizer goes once into the object store, as a reference each task resolves through _tokenizer.
    return ds.map_batches(_tokenize_block, fn_kwargs={"tokenizer": ray.put(tokenizer)}, batch_format="pyarrow",
                          batch_size=256).materialize()


def _too_long(prompt_len, max_length: Optional[int], truncation_mode: str):
    """Rows whose prompt alone fills max_length: keep_start truncation would leave them no completion
    token (TRL drops them silently; here they raise, or are skipped and counted)."""
    if max_length is None or truncation_mode != "keep_start":
        return np.zeros(len(prompt_len), dtype=bool)
    return np.asarray(prompt_len) >= max_length


def _keep_rows(table: pa.Table, max_length, truncation_mode) -> pa.Table:
    status = table["_status"].to_numpy(zero_copy_only=False)
    keep = (status == "") & ~_too_long(table["_prompt_len"].to_numpy(), max_length, truncation_mode)
    return table.filter(pa.array(keep))


def finish(tokenized: "ray.data.Dataset", split_name: str, max_length: Optional[int], truncation_mode: str,
           skip_bad_rows: bool = False, allow_empty: bool = False) -> TokenizedData:
    """Check the tokenized rows on the driver: raise on the first bad row (or skip and count), refuse
    mixed formats, and keep TOKEN_COLUMNS. `allow_empty` returns a summary even when no row is left."""
    batches = list(tokenized.select_columns(list(STAT_COLUMNS) + list(REF_COLUMNS))
                   .iter_batches(batch_format="pyarrow", batch_size=None))
    stats = pa.concat_tables(batches) if batches else None
    n = stats.num_rows if stats is not None else 0
    if n == 0:
        raise ValueError(f"{split_name} has no rows")
    col = {name: stats[name].to_numpy(zero_copy_only=False) for name in STAT_COLUMNS}
    status, error, code, where = col["_status"], col["_error"], col["_format"], col["_where"]

    def at(i) -> str:
        return f"{split_name} row {i}" + (f" ({where[i]})" if where[i] else "")

    if (status == "fatal").any():
        i = _first(status == "fatal")
        raise ValueError(f"{at(i)}: {error[i]}")
    good = status == ""
    main = _one_format(code, good, at)
    bad, too_long = status == "bad", good & _too_long(col["_prompt_len"], max_length, truncation_mode)
    reasons = {"bad row": bad, "prompt fills max_length": too_long}
    why = {}  # the first row of each reason -> its message
    if bad.any():
        why[_first(bad)] = error[_first(bad)]
    if too_long.any():
        i = _first(too_long)
        why[i] = (f"field 'prompt' has {col['_prompt_len'][i]} tokens, which leaves no completion token within "
                  f"max_length={max_length} (truncation_mode='keep_start'); raise max_length or shorten the prompt")
    if not skip_bad_rows:
        for name, mask in reasons.items():
            if mask.any():
                i, label = _first(mask), "bad row(s)" if name == "bad row" else "such row(s)"
                raise ValueError(f"{at(i)}: {why[i]} ({mask.sum()} {label} of {n}; "
                                 f"DPOConfig(skip_bad_rows=True) skips them)")
    skipped = {name: int(mask.sum()) for name, mask in reasons.items() if mask.any()}
    first_skipped = f"{at(min(why))}: {why[min(why)]}" if why else ""
    if skipped:
        warnings.warn(f"{split_name}: skipped {sum(skipped.values())} of {n} rows ("
                      + ", ".join(f"{reason}: {count}" for reason, count in skipped.items())
                      + f"); the first: {first_skipped}", stacklevel=2)
    keep = good & ~too_long
    if not keep.any() and not allow_empty:
        raise ValueError(f"{split_name}: no row is left to train on ({first_skipped})")

    prompt_cut = int((col["_prompt_cut"] & keep).sum())
    if prompt_cut:
        warnings.warn(f"{split_name}: in {prompt_cut} row(s) the tokenized prompt is not a prefix of the tokenized "
                      "prompt+completion (a chat template that renders the prompt alone differently, or tokens "
                      "merging across the boundary); as in TRL, the completion starts where they diverge",
                      stacklevel=2)
    lengths = {name: col[f"_{name}_len"][keep].astype(np.int64) for name in ("prompt", "chosen", "rejected")}
    lengths["sequence"] = lengths["prompt"] + np.maximum(lengths["chosen"], lengths["rejected"])
    truncated = int((lengths["sequence"] > max_length).sum()) if max_length else 0
    summary = DataSummary(
        rows=int(keep.sum()), format=format_label(main) if main else "none (no good row)", max_length=max_length,
        truncation_mode=truncation_mode, truncated=truncated, skipped=skipped, first_skipped=first_skipped,
        prompt_cut=prompt_cut, lengths={name: _distribution(values) for name, values in lengths.items()})

    if not keep.all():
        tokenized = tokenized.map_batches(_keep_rows, fn_kwargs={"max_length": max_length,
                                                                 "truncation_mode": truncation_mode},
                                          batch_format="pyarrow")
    # The reference columns are kept only when some row carries them (precompute fills the others), and
    # the images only when some row has one.
    carried = list(REF_COLUMNS) if any(stats[name].null_count < n for name in REF_COLUMNS) else []
    vision = bool((col["_images"][keep] > 0).any())
    if vision and max_length is not None and truncation_mode == "keep_end":
        raise ValueError(f"{split_name} has images, and truncation_mode='keep_end' would cut the image tokens at the "
                         "start of the prompt: use truncation_mode='keep_start' (or max_length=None), as TRL requires")
    dataset = tokenized.select_columns(list(TOKEN_COLUMNS) + carried + (list(VISION_COLUMNS) if vision else [])).materialize()
    return TokenizedData(dataset=dataset, num_rows=summary.rows, summary=summary, vision=vision)


def _one_format(code: np.ndarray, good: np.ndarray, at) -> str:
    """The dataset's format: that of most good rows (a tie goes to the first). A good row of another
    format is refused, naming the field that differs; it is never skipped, since the minority format
    may be the one the user meant."""
    good_rows = np.flatnonzero(good)
    codes, first, counts = np.unique(code[good], return_index=True, return_counts=True)
    if not len(codes):
        return ""
    main = codes[np.lexsort((first, -counts))[0]]
    if len(codes) > 1:
        odd = good_rows[np.flatnonzero(code[good] != main)[0]]
        main_rows = good_rows[code[good] == main]
        raise ValueError(f"{at(odd)}: {format_difference(code[odd], main)}. One dataset takes one format: "
                         f"{len(main_rows)} row(s) are {format_label(main)} (the first is row {main_rows[0]}), "
                         f"this one is {format_label(code[odd])}")
    return main


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _distribution(values: np.ndarray) -> dict:
    if not values.size:
        return dict.fromkeys(("min", "p50", "p90", "p99", "max", "mean"), 0.0)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"min": values.min(), "p50": p50, "p90": p90, "p99": p99, "max": values.max(), "mean": values.mean()}


def tokenize_dataset(ds: "ray.data.Dataset", tokenizer, max_length: Optional[int], truncation_mode: str,
                     split_name: str = "train_dataset", skip_bad_rows: bool = False) -> TokenizedData:
    """Tokenize a Ray Dataset of raw rows in parallel, materialize, and check it (no cache)."""
    return finish(tokenize_raw(ds, tokenizer), split_name, max_length, truncation_mode, skip_bad_rows)


def prepare_dataset(source, tokenizer, args, split_name: str = "train_dataset", split: Optional[str] = None,
                    map_fn: Optional[Callable[[dict], dict]] = None) -> TokenizedData:
    """Any supported source -> checked TokenizedData, read from / written to args.dataset_cache_dir.
    Reads args.max_length, truncation_mode, skip_bad_rows and dataset_cache_dir."""
    tokenized = _tokenized(source, tokenizer, getattr(args, "dataset_cache_dir", None), split_name, split, map_fn)
    return finish(tokenized, split_name, args.max_length, args.truncation_mode, getattr(args, "skip_bad_rows", False))


def summarize_dataset(source, tokenizer, max_length: Optional[int] = 1024, truncation_mode: str = "keep_start",
                      split: Optional[str] = None, map_fn: Optional[Callable[[dict], dict]] = None,
                      dataset_cache_dir: Optional[str] = None) -> DataSummary:
    """Rows, detected format, token-length distribution, truncated and skipped counts of a dataset.
    Bad rows are counted (with the first one named), not raised; mixed formats still raise."""
    tokenized = _tokenized(source, tokenizer, dataset_cache_dir, "dataset", split, map_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary itself reports what the warnings would say
        return finish(tokenized, "dataset", max_length, truncation_mode, skip_bad_rows=True, allow_empty=True).summary


def _tokenized(source, tokenizer, cache_dir: Optional[str], split_name: str, split: Optional[str],
               map_fn: Optional[Callable]) -> "ray.data.Dataset":
    """The tokenization of every row (bad ones with their errors), from the cache when it has it.

    The cache key covers the source data, split, map_fn and tokenizer; max_length, truncation_mode
    and skip_bad_rows are applied after loading (finish), so changing them, as a sweep does, reuses it."""
    key = cache.cache_key(source, tokenizer, split, map_fn) if cache_dir else None
    if cache_dir and key is None:
        logger.info("%s: not cached (a Ray Dataset not made by raydpo.data.to_ray_dataset has no cache key)",
                    split_name)
    tokenized = cache.load(cache_dir, key) if key else None
    if tokenized is None:
        tokenized = tokenize_raw(to_ray_dataset(source, split, map_fn, split_name), tokenizer)
        if key:
            cache.save(tokenized, cache_dir, key)
    return tokenized
